"""Tests for batched.py: each row of a ragged batch decodes exactly as that row alone (greedy, shipped weights and
toy models, through compaction and rows that leave early), and each row keeps the target's law at T = 1, while
the same test rejects a batch whose positions count slots instead of the row's own tokens."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import batched
import model
from batched import (
    BatchModelDrafter,
    BatchPromptLookup,
    CrossSampleLookup,
    RaggedCache,
    batch_speculative_generate,
    batch_tree_speculative_generate,
    select_drafts,
)
from drafters import ModelDrafter, PromptLookupDrafter
from heads import EagleDrafter
from methods import load_model
from specdec import generate, speculative_generate, tree_speculative_generate
from tests.conftest import WEIGHTS
from tests.test_tree_decoding import first_child_always
from tests.toy import BrokenRule, accept_every_draft, chi_square, chi_square_critical, exact_joint, perturbed, toy_model

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTS_PROMPT_CUTS = [96, 81, 60, 45]  # held-out prompts cut to different lengths: a ragged prefill


@pytest.mark.parametrize("kind", ["draft", "pld"])
def test_every_row_of_a_batch_equals_decoding_it_alone_on_the_shipped_weights(short_references, kind):
    enc, target, references = short_references
    prompts = [p[-cut:] for (p, _), cut in zip(references, WEIGHTS_PROMPT_CUTS)] + [references[-1][0]]
    expected = [generate(target, p, 24, eot=enc.eot_token) for p in prompts]
    drafter = (
        BatchModelDrafter(load_model(WEIGHTS / "draft", "cpu", torch.float32))
        if kind == "draft"
        else BatchPromptLookup()
    )
    out, stats = batch_speculative_generate(target, drafter, prompts, 24, gamma=4, eot=enc.eot_token)
    assert out == expected
    assert 0 < stats.accepted < stats.drafted


def toy_pair():
    target = toy_model(seed=2, max_len=24)
    return target, perturbed(target, seed=100, noise=0.2)


def test_a_cache_that_fills_up_is_compacted_and_every_row_still_equals_decoding_it_alone(monkeypatch):
    target, draft = toy_pair()
    prompts = [[1, 4, 0, 3, 5, 2, 2, 1], [2, 5], [3, 3, 1, 0], [4]]
    compact = RaggedCache.compact
    for drafter in (BatchModelDrafter(draft), BatchPromptLookup()):
        compactions = []
        monkeypatch.setattr(RaggedCache, "compact", lambda self: compactions.append(1) or compact(self))
        out, _ = batch_speculative_generate(target, drafter, prompts, 12, gamma=3)
        assert out == [generate(target, p, 12) for p in prompts]
        assert compactions  # 8 + 12 tokens in 24 slots, with holes: the test did exercise compact()


@pytest.mark.parametrize("kind", ["draft", "pld"])
def test_rows_at_the_end_of_the_context_draft_less_and_never_overflow(kind):
    target, draft = toy_pair()
    prompts = [[1, 4, 0, 3, 5, 2, 2, 1, 3, 0, 4, 4, 2, 5, 1, 1, 3, 2, 0, 4, 5], [2, 5], [3, 3, 1, 0, 4, 2]]
    drafter = BatchModelDrafter(draft) if kind == "draft" else BatchPromptLookup()
    out, _ = batch_speculative_generate(target, drafter, prompts, 12, gamma=4)  # the first row has 3 positions left
    assert out == [generate(target, p, 12) for p in prompts] and len(out[0]) == 3


def test_rows_that_finish_early_leave_the_batch_and_the_rest_go_on():
    target, draft = toy_pair()
    prompts = [[1, 4, 0, 3], [2, 5, 1], [3, 3]]
    eot = generate(target, prompts[1], 3)[-1]  # row 1 ends after at most 3 tokens
    out, _ = batch_speculative_generate(target, BatchModelDrafter(draft), prompts, 8, gamma=2, eot=eot)
    assert out == [generate(target, p, 8, eot=eot) for p in prompts]
    assert len(out[1]) < 3


PROMPTS = [[1, 4, 0, 3, 5, 2, 2], [2, 5], [3, 3, 1]]  # different lengths: holes after the shorter prompts


def per_row_law(prompts: list[list[int]], n_calls: int, decode_batch) -> list[tuple[float, float]]:
    """(chi2, critical) per row: n_calls batches of 3-token continuations at T = 1 from decode_batch(target, draft,
    generator) -> one output per row, each row's samples against its own exact joint."""
    target, draft = toy_pair()
    generator, samples = torch.Generator().manual_seed(0), [[] for _ in prompts]
    for _ in range(n_calls):
        for row, out in zip(samples, decode_batch(target, draft, generator)):
            row.append(out)
    return [
        (stat, chi_square_critical(dof))
        for stat, dof in (
            chi_square(np.array(s), exact_joint(target, p, 3, temperature=1.0)) for p, s in zip(prompts, samples)
        )
    ]


def batched_law(n_calls: int) -> list[tuple[float, float]]:
    """Ragged rows of draft-model chains."""
    return per_row_law(
        PROMPTS,
        n_calls,
        lambda target, draft, generator: batch_speculative_generate(
            target, BatchModelDrafter(draft), PROMPTS, 3, gamma=2, temperature=1.0, generator=generator
        )[0],
    )


def slot_positions(self, real, first_positions, T):
    """BROKEN: every token's position is its cache slot, as if the batch had no holes."""
    s0 = self.kv.length
    positions, mask = CALL_INPUTS(self, real, first_positions, T)
    return torch.arange(s0, s0 + T).expand_as(positions).clamp(max=self.max_position), mask


CALL_INPUTS = RaggedCache.call_inputs


@pytest.mark.slow
def test_each_row_of_a_sampled_batch_has_the_target_distribution():
    for stat, critical in batched_law(2000):
        assert stat < critical, f"chi2 {stat:.1f} >= {critical:.1f}"


@pytest.mark.slow
def test_the_law_test_rejects_positions_that_count_slots(monkeypatch):
    monkeypatch.setattr(batched.RaggedCache, "call_inputs", slot_positions)
    assert any(stat > critical for stat, critical in batched_law(800))


# ---------------------------------------------------------------------------------------------------------------
# TETRIS's budgeted draft selection and multi-sample drafting.


@given(
    st.lists(st.one_of(st.none(), st.lists(st.floats(0.01, 1.0), min_size=0, max_size=5)), min_size=1, max_size=5),
    st.integers(0, 30),
)
def test_tetris_keeps_a_prefix_of_each_chain_within_the_budget_and_the_likeliest_drafts(confidence, budget):
    lengths = [len(c) if c is not None else 3 for c in confidence]
    keep = select_drafts(confidence, lengths, budget)
    assert sum(keep) == min(budget, sum(lengths)) and all(0 <= k <= n for k, n in zip(keep, lengths))
    chance = lambda b, i: math.prod(confidence[b][: i + 1]) if confidence[b] is not None else 1.0
    kept = [chance(b, k - 1) for b, k in enumerate(keep) if k]
    left = [chance(b, k) for b, k in enumerate(keep) if k < lengths[b]]
    assert not kept or not left or min(kept) >= max(left)  # nothing left out beats anything kept


def test_a_verification_budget_keeps_every_row_equal_to_decoding_it_alone(short_references):
    enc, target, references = short_references
    prompts = [p[-cut:] for (p, _), cut in zip(references, WEIGHTS_PROMPT_CUTS)]
    drafter, steps = BatchModelDrafter(load_model(WEIGHTS / "draft", "cpu", torch.float32)), []
    propose = drafter.propose
    drafter.propose = lambda *a: steps.append(1) or propose(*a)
    out, stats = batch_speculative_generate(target, drafter, prompts, 24, gamma=4, eot=enc.eot_token, budget=5)
    assert out == [generate(target, p, 24, eot=enc.eot_token) for p in prompts]
    assert 0 < stats.drafted <= 5 * len(steps) < 4 * len(prompts) * len(steps)  # the budget bit: 5 of 16


def multi_sample_law(n_calls: int, verifier=None) -> list[tuple[float, float]]:
    """3 samples of one prompt drafting for each other."""
    prompts = [[1, 4, 0, 3]] * 3
    return per_row_law(
        prompts,
        n_calls,
        lambda target, draft, generator: batch_speculative_generate(
            target, CrossSampleLookup(), prompts, 3, gamma=2, temperature=1.0, generator=generator, verifier=verifier
        )[0],
    )


@pytest.mark.slow
def test_samples_that_draft_for_each_other_each_have_the_target_distribution():
    for stat, critical in multi_sample_law(3000):
        assert stat < critical, f"chi2 {stat:.1f} >= {critical:.1f}"


@pytest.mark.slow
def test_the_multi_sample_law_test_rejects_a_verifier_that_accepts_every_draft():
    assert all(stat > critical for stat, critical in multi_sample_law(400, BrokenRule(chain_fn=accept_every_draft)))


# ---------------------------------------------------------------------------------------------------------------
# Batched token trees: EAGLE-2 and prompt-lookup tries, one per row.


@pytest.mark.parametrize("kind", ["eagle", "pld"])
def test_every_row_of_a_batch_of_trees_equals_decoding_it_alone_on_the_shipped_weights(short_references, kind):
    enc, target, references = short_references
    prompts = [p[-cut:] for (p, _), cut in zip(references, WEIGHTS_PROMPT_CUTS)] + [references[-1][0]]
    drafters = [
        EagleDrafter.from_pretrained(target, WEIGHTS / "eagle", width=2, size=12)
        if kind == "eagle"
        else PromptLookupDrafter()
        for _ in prompts
    ]
    out, stats = batch_tree_speculative_generate(target, drafters, prompts, 24, eot=enc.eot_token)
    assert out == [generate(target, p, 24, eot=enc.eot_token) for p in prompts]
    assert 0 < stats.accepted < stats.drafted


def batched_tree_law(n_calls: int, verifier=None) -> list[tuple[float, float]]:
    """Ragged rows of top-k draft-model trees (one-hot siblings)."""
    return per_row_law(
        PROMPTS,
        n_calls,
        lambda target, draft, generator: batch_tree_speculative_generate(
            target,
            [ModelDrafter(draft, depth=2, width=2, beam=2, size=4) for _ in PROMPTS],
            PROMPTS,
            3,
            temperature=1.0,
            generator=generator,
            verifier=verifier,
        )[0],
    )


@pytest.mark.slow
def test_each_row_of_a_sampled_batch_of_trees_has_the_target_distribution():
    for stat, critical in batched_tree_law(1200):
        assert stat < critical, f"chi2 {stat:.1f} >= {critical:.1f}"


@pytest.mark.slow
def test_the_batched_tree_law_test_rejects_a_verifier_that_always_takes_the_first_child():
    assert all(stat > critical for stat, critical in batched_tree_law(300, BrokenRule(tree_fn=first_child_always)))


def test_no_loop_reads_a_cache_slot_it_has_not_written(short_references, monkeypatch):
    """KVCache allocates its buffers uninitialised (model.py): filled with NaN here, any read of an unwritten slot
    would spread NaN into the logits and change the output. Chain, tree and batched loops, on the shipped weights."""
    enc, target, references = short_references
    init = model.KVCache.__init__

    def nan_filled(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for buf in self.k + self.v:
            buf.fill_(float("nan"))

    monkeypatch.setattr(model.KVCache, "__init__", nan_filled)
    prompts = [p for p, _ in references[:3]]
    expected = [out for _, out in references[:3]]
    eot = enc.eot_token
    chain = [speculative_generate(target, PromptLookupDrafter(), p, 24, eot=eot)[0] for p in prompts]
    tree = [tree_speculative_generate(target, PromptLookupDrafter(matches=3), p, 24, eot=eot)[0] for p in prompts]
    batch, _ = batched.batch_speculative_generate(target, BatchPromptLookup(), prompts, 24, eot=eot)
    assert chain == tree == batch == expected
