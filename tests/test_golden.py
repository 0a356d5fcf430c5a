"""Golden outputs on the shipped weights (as llama2.c's tests keep): greedy fp32 continuations recorded when the
weights were committed. A change to the model code, the loader or the tokenizer that alters them fails here.
If the weights are retrained on purpose, record the new continuations (specdec.generate, 24 tokens)."""

from pathlib import Path

import pytest
import torch

from drafters import ModelDrafter
from heads import EagleDrafter
from methods import load_model
from specdec import generate, speculative_generate, tree_speculative_generate
from tokenizer import load_tokenizer

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
GOLDEN = {
    ("target", "def fibonacci(n):"): [
        10,
        258,
        436,
        10,
        258,
        2432,
        320,
        1362,
        331,
        288,
        3006,
        268,
        747,
        660,
        323,
        3406,
        458,
        331,
        288,
        3006,
        268,
        747,
        660,
        323,
    ],
    ("target", "class Stack:"): [
        10,
        258,
        436,
        10,
        258,
        456,
        398,
        355,
        271,
        359,
        398,
        355,
        271,
        359,
        398,
        355,
        271,
        359,
        398,
        355,
        271,
        359,
        398,
        355,
    ],
    ("draft", "def fibonacci(n):"): [
        10,
        258,
        436,
        10,
        258,
        801,
        1013,
        362,
        331,
        1367,
        458,
        2988,
        115,
        458,
        331,
        1367,
        458,
        2988,
        115,
        46,
        279,
        258,
        527,
        281,
    ],
    ("draft", "class Stack:"): [
        10,
        258,
        436,
        10,
        258,
        456,
        114,
        799,
        58,
        10,
        259,
        456,
        114,
        799,
        58,
        10,
        276,
        456,
        114,
        799,
        58,
        10,
        326,
        456,
    ],
}


@pytest.fixture(scope="module")
def shipped():
    enc = load_tokenizer(WEIGHTS / "tokenizer.tiktoken")
    return enc, {name: load_model(WEIGHTS / name, "cpu", torch.float32) for name in ("target", "draft")}


@pytest.mark.parametrize("model_name, prompt", list(GOLDEN))
def test_greedy_continuation_matches_the_recorded_golden_tokens(shipped, model_name, prompt):
    enc, models = shipped
    assert (
        generate(models[model_name], enc.encode_ordinary(prompt), 24, eot=enc.eot_token) == GOLDEN[model_name, prompt]
    )


@pytest.mark.parametrize("prompt", ["def fibonacci(n):", "class Stack:"])
def test_speculative_loops_reproduce_the_golden_target_tokens(shipped, prompt):
    enc, models = shipped
    ids, golden = enc.encode_ordinary(prompt), GOLDEN["target", prompt]
    out, _ = speculative_generate(models["target"], ModelDrafter(models["draft"]), ids, 24, eot=enc.eot_token)
    assert out == golden
    eagle = EagleDrafter.from_pretrained(models["target"], WEIGHTS / "eagle")
    out, _ = tree_speculative_generate(models["target"], eagle, ids, 24, eot=enc.eot_token)
    assert out == golden
