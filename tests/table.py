"""Methods built from the table of methods (methods.py) exactly as the command line builds them, for the tests."""

from pathlib import Path

import cli
from methods import DRAFT_LENGTHS, DRAFTERS, Setup, make
from tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights"


def setup(target, weights: Path = WEIGHTS, data_dir: Path = ROOT / "data", enc=None, **flags) -> Setup:
    """The Setup of a command line that left every flag but `flags` at its default; `enc` is the target's
    tokenizer (the shipped one by default)."""
    enc = enc or load_tokenizer(WEIGHTS / "tokenizer.tiktoken")
    return Setup(target, enc, weights, data_dir, cli.defaults(**flags))


def drafter(name: str, target, **flags):
    """-d name, with these flags (tree_size=..., exit_layer=..., weights=..., data_dir=..., enc=...)."""
    return make(DRAFTERS, name, setup(target, **flags))


def draft_length(name: str, target, **flags):
    """-l name, with these flags (gamma=..., ddd_threshold=...)."""
    return make(DRAFT_LENGTHS, name, setup(target, **flags))
