"""Fixtures shared by several test modules."""

from pathlib import Path

import pytest
import torch

import specdec
from methods import load_model
from prompts import function_prompts
from tokenizer import load_tokenizer

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


@pytest.fixture(scope="module")
def one_thread():
    """Toy-sized matmuls and batch-1 forwards run fastest on one thread, and several threads crawl when other jobs
    share the CPU. A module asks for it with pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def short_references():
    """(tokenizer, shipped target, [(prompt, its greedy 24-token continuation)]): four held-out code prompts of
    96 tokens and one short prompt. For the quick greedy-identity checks of each policy, rule and drafter."""
    enc = load_tokenizer(WEIGHTS / "tokenizer.tiktoken")
    target = load_model(WEIGHTS / "target", "cpu", torch.float32)
    prompts = function_prompts(enc, 4, context_tokens=96) + [enc.encode_ordinary("def parse(s):")]
    return enc, target, [(p, specdec.generate(target, p, 24, eot=enc.eot_token)) for p in prompts]
