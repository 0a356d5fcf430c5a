"""Tests for batched.py: each row of a ragged batch decodes exactly as that row alone (greedy, shipped weights and
toy models, through compaction and rows that leave early), and each row keeps the target's law at T = 1, while
the same test rejects a batch whose positions count slots instead of the row's own tokens."""
import numpy as np
import pytest
import torch

import batched
from batched import BatchModelDrafter, BatchPromptLookup, RaggedCache, batch_speculative_generate
from specdec import generate, load_model
from tests.conftest import WEIGHTS
from tests.toy import chi_square, chi_square_critical, exact_joint, perturbed, toy_model

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTS_PROMPT_CUTS = [96, 81, 60, 45]  # held-out prompts cut to different lengths: a ragged prefill


@pytest.mark.parametrize("kind", ["draft", "pld"])
def test_every_row_of_a_batch_equals_decoding_it_alone_on_the_shipped_weights(short_references, kind):
    enc, target, references = short_references
    prompts = [p[-cut:] for (p, _), cut in zip(references, WEIGHTS_PROMPT_CUTS)] + [references[-1][0]]
    expected = [generate(target, p, 24, eot=enc.eot_token) for p in prompts]
    drafter = BatchModelDrafter(load_model(WEIGHTS / "draft", "cpu", torch.float32)) if kind == "draft" \
        else BatchPromptLookup()
    out, stats = batch_speculative_generate(target, drafter, prompts, 24, gamma=4, eot=enc.eot_token)
    assert out == expected
    assert 0 < stats.accepted < stats.drafted


def toy_pair():
    target = toy_model(seed=2, max_len=24)
    return target, perturbed(target, seed=100, noise=0.2)


def test_a_cache_that_fills_up_is_compacted_and_every_row_still_equals_decoding_it_alone(monkeypatch):
    target, draft = toy_pair()
    prompts = [[1, 4, 0, 3, 5, 2, 2, 1], [2, 5], [3, 3, 1, 0], [4]]
    compactions = []
    compact = RaggedCache.compact
    monkeypatch.setattr(RaggedCache, "compact", lambda self: compactions.append(1) or compact(self))
    for drafter in (BatchModelDrafter(draft), BatchPromptLookup()):
        out, _ = batch_speculative_generate(target, drafter, prompts, 12, gamma=3)
        assert out == [generate(target, p, 12) for p in prompts]
    assert compactions  # 8 + 12 tokens in 24 slots, with holes: the test did exercise compact()


def test_rows_that_finish_early_leave_the_batch_and_the_rest_go_on():
    target, draft = toy_pair()
    prompts = [[1, 4, 0, 3], [2, 5, 1], [3, 3]]
    eot = generate(target, prompts[1], 3)[-1]  # row 1 ends after at most 3 tokens
    out, _ = batch_speculative_generate(target, BatchModelDrafter(draft), prompts, 8, gamma=2, eot=eot)
    assert out == [generate(target, p, 8, eot=eot) for p in prompts]
    assert len(out[1]) < 3


PROMPTS = [[1, 4, 0, 3, 5, 2, 2], [2, 5], [3, 3, 1]]  # different lengths: holes after the shorter prompts


def batched_law(n_calls: int, seed: int = 0) -> list[tuple[float, float]]:
    """(chi2, critical) per row: 3-token continuations of each row, sampled in batches, against its exact joint."""
    target, draft = toy_pair()
    generator = torch.Generator().manual_seed(seed)
    samples = [[] for _ in PROMPTS]
    for _ in range(n_calls):
        out, _ = batch_speculative_generate(target, BatchModelDrafter(draft), PROMPTS, 3, gamma=2, temperature=1.0,
                                            generator=generator)
        for row, o in zip(samples, out):
            row.append(o)
    result = []
    for prompt, row in zip(PROMPTS, samples):
        stat, dof = chi_square(np.array(row), exact_joint(target, prompt, 3, temperature=1.0))
        result.append((stat, chi_square_critical(dof)))
    return result


def slot_positions(self, real, first_positions, T):
    """BROKEN: every token's position is its cache slot, as if the batch had no holes."""
    s0 = self.kv.length
    positions, mask = CALL_INPUTS(self, real, first_positions, T)
    return torch.arange(s0, s0 + T).expand_as(positions).clamp(max=self.max_position), mask


CALL_INPUTS = RaggedCache.call_inputs


@pytest.mark.slow
def test_each_row_of_a_sampled_batch_has_the_target_distribution():
    for stat, critical in batched_law(3000):
        assert stat < critical, f"chi2 {stat:.1f} >= {critical:.1f}"


@pytest.mark.slow
def test_the_law_test_rejects_positions_that_count_slots(monkeypatch):
    monkeypatch.setattr(batched.RaggedCache, "call_inputs", slot_positions)
    assert any(stat > critical for stat, critical in batched_law(800))
