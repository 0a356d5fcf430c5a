"""Golden outputs on the shipped weights (as llama2.c's tests keep): greedy fp32 continuations recorded when the
weights were committed. A change to the model code, the loader or the tokenizer that alters them fails here.
If the weights are retrained on purpose, record the new continuations (specdec.generate, 24 tokens)."""
from pathlib import Path

import pytest
import torch

from drafters import EagleDrafter, ModelDrafter
from specdec import generate, load_model, speculative_generate, tree_speculative_generate
from tokenizer import load_tokenizer

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
GOLDEN = {
    ("target", "def fibonacci(n):"): [10, 258, 436, 1130, 321, 288, 3006, 268, 747, 660, 323, 105, 304, 305, 3006,
                                      268, 747, 660, 323, 105, 304, 305, 3006, 268],
    ("target", "class Stack:"): [10, 276, 309, 525, 800, 591, 265, 44, 496, 489, 44, 1034, 1209, 285, 10, 326, 273, 46,
                                 1209, 277, 2998, 10, 326, 273],
    ("draft", "def fibonacci(n):"): [10, 258, 382, 288, 3006, 268, 747, 660, 571, 1137, 41, 279, 534, 288, 3006, 268,
                                     747, 660, 571, 1137, 285, 10, 258, 382],
    ("draft", "class Stack:"): [10, 258, 309, 525, 800, 591, 265, 44, 496, 489, 285, 10, 259, 273, 521, 471, 313, 277,
                                1105, 10, 259, 273, 521, 471],
}


@pytest.fixture(scope="module")
def shipped():
    enc = load_tokenizer(WEIGHTS / "tokenizer.tiktoken")
    return enc, {name: load_model(WEIGHTS / name, "cpu", torch.float32) for name in ("target", "draft")}


@pytest.mark.parametrize("model_name, prompt", list(GOLDEN))
def test_greedy_continuation_matches_the_recorded_golden_tokens(shipped, model_name, prompt):
    enc, models = shipped
    assert generate(models[model_name], enc.encode_ordinary(prompt), 24, eot=enc.eot_token) == GOLDEN[model_name, prompt]


@pytest.mark.parametrize("prompt", ["def fibonacci(n):", "class Stack:"])
def test_speculative_loops_reproduce_the_golden_target_tokens(shipped, prompt):
    enc, models = shipped
    ids, golden = enc.encode_ordinary(prompt), GOLDEN["target", prompt]
    out, _ = speculative_generate(models["target"], ModelDrafter(models["draft"]), ids, 24, eot=enc.eot_token)
    assert out == golden
    eagle = EagleDrafter.from_pretrained(models["target"], WEIGHTS / "eagle")
    out, _ = tree_speculative_generate(models["target"], eagle, ids, 24, eot=enc.eot_token)
    assert out == golden
