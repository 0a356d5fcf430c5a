"""Cascade and collective drafting (cascade.py): greedy identity with autoregressive decoding on the shipped weights;
the sampled law of the cascade on toy models (chi-square against the exact target joint), with power checks against
two broken cascades that misreport q; the draft model's cache after each step; and SpecInfer's merge, whose tree
holds every drafter's proposal as a root path (hypothesis over random proposals)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade import CascadeDrafter, CollectiveDrafter, merge_proposals, ranked_paths
from drafters import ModelDrafter, PromptLookupDrafter
from methods import load_model
from retrieval import RestDrafter
from specdec import speculative_generate, tree_speculative_generate, warp_for
from suffix import suffix_array
from tests.test_specdec import (
    WARPINGS,
    acceptance_matches_theory,
    assert_cache_holds,
    speculative_chi_square,
    toy_draft,
)
from tree import Tree, children, depths, path_to

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
pytestmark = pytest.mark.usefixtures("one_thread")  # batch-1 forwards: one thread is fastest on a shared CPU


# ---------------------------------------------------------------------------------------------------------------
# 1. Greedy identity on the shipped weights (fp32), a few prompts of 24 tokens.


@pytest.fixture(scope="module")
def shipped_draft():
    return load_model(WEIGHTS / "draft", "cpu", torch.float32)


def few(refs):
    return refs[:2] + refs[-1:]  # two held-out code prompts and the short one


@pytest.mark.parametrize("horizontal, gamma", [(0, 4), (2, 5)], ids=["vertical", "horizontal-2"])
def test_greedy_cascade_equals_autoregressive_on_shipped_weights(short_references, shipped_draft, horizontal, gamma):
    enc, target, refs = short_references
    drafter = CascadeDrafter(shipped_draft, PromptLookupDrafter(), horizontal)
    for i, (prompt, expected) in enumerate(few(refs)):
        out, stats = speculative_generate(target, drafter, prompt, 24, gamma=gamma, temperature=0, eot=enc.eot_token)
        assert out == expected, f"prompt {i}"  # whole lists: lengths included
        assert stats.produced == len(out) and 0 < stats.accepted <= stats.drafted
    assert drafter.inner_accepted > 0  # prompt lookup's tokens were accepted by the draft model: the cascade ran


@pytest.mark.parametrize("with_rest", [True, False], ids=["draft+pld+rest", "draft+pld"])
def test_greedy_collective_equals_autoregressive_on_shipped_weights(short_references, shipped_draft, with_rest):
    enc, target, refs = short_references
    stream = np.array(
        [t for prompt, _ in refs for t in prompt + [enc.eot_token]] + list(range(300)) * 2, dtype=np.uint16
    )  # REST's datastore: the prompts' own tokens, so that it has matches
    rest = RestDrafter(stream, suffix_array(stream, 16), depth=6, size=12) if with_rest else None
    drafter = CollectiveDrafter(
        ModelDrafter(shipped_draft, depth=6, width=2, beam=2, size=12),
        PromptLookupDrafter(depth=6, matches=2),
        rest,
        size=12,
        depth=6,
    )
    for i, (prompt, expected) in enumerate(few(refs)):
        out, stats = tree_speculative_generate(target, drafter, prompt, 24, temperature=0, eot=enc.eot_token)
        assert out == expected, f"prompt {i}"
        assert stats.produced == len(out) and 0 < stats.accepted <= stats.drafted <= 12 * stats.target_calls


# ---------------------------------------------------------------------------------------------------------------
# 2. The sampled law on toy models (V = 6; tests/toy.py): 3-token continuations against the exact target joint, and
# two BROKEN cascades that the same test must reject at a fixed seed.

PROMPT = [0, 4, 4, 0]  # prompt lookup proposes 4 after the last 0: the draft model accepts it ~35% of the time
N_TRUE, N_BROKEN = 10_000, 2_000


class OneHotInnerCascade(CascadeDrafter):
    """BROKEN: a lookup token that the draft model accepted is reported with a one-hot q ("prompt lookup drafted
    it"). It was drawn, through the inner rejection sampling, from the draft's q: that is what the target must see."""

    def propose(self, context, gamma, warp, generator, keep=lambda *_: True):
        tokens, q = super().propose(context, gamma, warp, generator, keep)
        for i, source in enumerate(self.sources):
            if source == "cascade":
                q[i] = torch.nn.functional.one_hot(torch.tensor(tokens[i]), q.shape[-1]).float()
        return tokens, q


class DraftQTailCascade(CascadeDrafter):
    """BROKEN: the horizontal tail's lookup tokens are reported with the draft model's q at their position instead
    of a one-hot q (a cache-free forward computes it)."""

    @torch.inference_mode()
    def propose(self, context, gamma, warp, generator, keep=lambda *_: True):
        tokens, q = super().propose(context, gamma, warp, generator, keep)
        for i, source in enumerate(self.sources):
            if source == "lookup":
                q[i] = warp(self.model(torch.tensor([context + tokens[:i]]))[0, -1])
        return tokens, q


CASES = {"vertical-T0.8-k4-p0.9": (CascadeDrafter, 0, "T0.8-k4-p0.9"), "horizontal-1-T1": (CascadeDrafter, 1, "T1")}
BROKEN = {"one-hot-inner-q": (OneHotInnerCascade, 0, "T1"), "draft-q-tail": (DraftQTailCascade, 1, "T1")}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_cascade_sampling_reproduces_the_target_distribution(case):
    cls, horizontal, warping = CASES[case]
    drafter = cls(toy_draft(), PromptLookupDrafter(), horizontal)
    stat, critical, dof, stats = speculative_chi_square(drafter, PROMPT, WARPINGS[warping], N_TRUE)
    print(f"{case}: chi2 {stat:.1f} < {critical:.1f} (dof {dof}); accepted per call {stats.accept_counts}")
    assert stat < critical, f"chi2 = {stat:.1f} >= {critical:.1f} (dof {dof})"
    assert all(stats.accept_counts[:3])  # rejection at once, partial accept, bonus token
    assert acceptance_matches_theory(stats)


@pytest.mark.slow
@pytest.mark.parametrize("case", BROKEN)
def test_distribution_test_rejects_a_cascade_that_misreports_q(case):
    cls, horizontal, warping = BROKEN[case]
    drafter = cls(toy_draft(), PromptLookupDrafter(), horizontal)
    stat, critical, dof, _ = speculative_chi_square(drafter, PROMPT, WARPINGS[warping], N_BROKEN)
    print(f"{case}: chi2 {stat:.1f} > {critical:.1f} (dof {dof})")
    assert stat > critical, f"broken cascade not detected: chi2 = {stat:.1f} <= {critical:.1f} (dof {dof})"


def test_cascade_proposals_mark_their_sources_and_report_one_hot_q_for_the_tail():
    drafter, warp = CascadeDrafter(toy_draft(), PromptLookupDrafter(), horizontal=1), warp_for(1.0, 0, 1.0)
    drafter.reset()
    tokens, q = drafter.propose([0, 4, 4, 0, 4, 4, 0], 4, warp, torch.Generator().manual_seed(0))
    assert drafter.sources[0] == "model" and len(tokens) == len(q) == len(drafter.sources)
    for token, row, source in zip(tokens, q, drafter.sources):
        assert torch.allclose(row.sum(), torch.tensor(1.0))
        assert row[token] > 0  # every token could have been drawn from the q it is reported with
        if source == "lookup":
            assert row[token] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# 3. The draft model's cache: after accept(n) it holds exactly the context and the accepted drafts (never the last
# one, which the draft model has not fed), so the next proposal equals a fresh drafter's.


@pytest.mark.parametrize("n_accepted", [0, 1, 2, 4])
@torch.inference_mode()
def test_cascade_cache_after_accept_holds_context_and_accepted_drafts(n_accepted):
    draft, context, gamma, greedy = toy_draft(), [0, 4, 4, 0, 4, 4, 0], 4, warp_for(0, 0, 1.0)
    drafter = CascadeDrafter(draft, PromptLookupDrafter())
    drafter.reset()
    drafts, _ = drafter.propose(context, gamma, greedy, None)
    assert len(drafts) == gamma and drafter.draft_calls < gamma  # lookup's tokens saved draft calls
    drafter.accept(n_accepted)
    assert_cache_holds(drafter.cache, draft, context + drafts[: min(n_accepted, gamma - 1)])
    correction = (drafts[n_accepted] + 1) % 6 if n_accepted < gamma else 0
    next_context = context + drafts[:n_accepted] + [correction]
    fresh_drafter = CascadeDrafter(draft, PromptLookupDrafter())
    fresh_drafter.reset()
    tokens, q = drafter.propose(next_context, gamma, greedy, None)
    fresh_tokens, fresh_q = fresh_drafter.propose(next_context, gamma, greedy, None)
    assert tokens == fresh_tokens and torch.allclose(q, fresh_q)


def test_greedy_cascade_drafts_what_the_draft_model_drafts_alone():
    """At temperature 0 the vertical cascade is lossless for the draft model too: same chain as plain SpS."""
    draft, warp = toy_draft(), warp_for(0, 0, 1.0)
    for context in ([0, 4, 4, 0], [1, 2, 1, 2, 1], [3]):
        cascade, plain = CascadeDrafter(draft, PromptLookupDrafter()), ModelDrafter(draft)
        cascade.reset()
        plain.reset()
        assert cascade.propose(context, 5, warp, None)[0] == plain.propose(context, 5, warp, None)[0]


# ---------------------------------------------------------------------------------------------------------------
# 4. SpecInfer's merge: one trie that holds every drafter's proposal.


def assert_trie(tree: Tree) -> None:
    for kids in children(tree.parents):
        siblings = [tree.tokens[c] for c in kids]
        assert len(siblings) == len(set(siblings))  # no duplicate sibling: each path appears once


def is_root_path(tree: Tree, sequence: list[int]) -> bool:
    node = 0
    for token in sequence:
        node = next((c for c in children(tree.parents)[node] if tree.tokens[c] == token), None)
        if node is None:
            return False
    return True


sequences = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), max_size=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(sequences, min_size=1, max_size=3), st.integers(1, 30), st.integers(1, 6))
def test_merged_tree_holds_every_proposal_as_a_root_path(proposals, size, depth):
    tree = merge_proposals(9, proposals, size, depth)
    assert tree.tokens[0] == 9 and tree.q is None and len(tree) <= size + 1 and max(depths(tree)) <= depth
    assert_trie(tree)
    cut = [[seq[:depth] for seq in drafter] for drafter in proposals]
    for node in range(1, len(tree)):  # nothing invented: every node lies on some proposal
        path = [tree.tokens[i] for i in path_to(tree, node)[1:]]
        assert any(seq[: len(path)] == path for drafter in cut for seq in drafter)
    if proposals[0]:  # the first drafter's best sequence always fits, as far as the size allows
        assert is_root_path(tree, cut[0][0][:size])
    distinct = {tuple(seq[:k]) for drafter in cut for seq in drafter for k in range(1, len(seq) + 1)}
    if len(distinct) <= size:  # room for everything: every proposal is a root path, each prefix one node
        assert len(tree) == len(distinct) + 1
        assert all(is_root_path(tree, seq) for drafter in cut for seq in drafter)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=10))
def test_collective_tree_holds_each_drafters_tree(context):
    """On toy models: the draft model's top-k tree, prompt lookup's trie and REST's trie all lie in the merged tree
    (its size is large enough here), rooted at the context's last token, deterministic (q is None)."""
    stream = np.array([0, 4, 4, 0, 1, 2, 3, 4, 5] * 3, dtype=np.uint16)
    parts = [
        ModelDrafter(toy_draft(), depth=3, width=2, beam=2, size=6),
        PromptLookupDrafter(depth=3, matches=2),
        RestDrafter(stream, suffix_array(stream, 16), depth=3, size=6),
    ]
    collective = CollectiveDrafter(*parts, size=100, depth=3)
    collective.reset()
    warp = warp_for(1.0, 0, 1.0)
    with torch.inference_mode():
        tree = collective.propose_tree(context, torch.zeros(0), warp, None)
        assert tree.tokens[0] == context[-1] and tree.q is None
        assert_trie(tree)
        for part in parts:
            part.reset()
            for seq in ranked_paths(part.propose_tree(context, torch.zeros(0), warp, None), 3):
                assert is_root_path(tree, seq)


def test_collective_refuses_sampled_siblings():
    with pytest.raises(ValueError, match="deterministic"):
        CollectiveDrafter(ModelDrafter(toy_draft(), sampled=True), PromptLookupDrafter(), None)


def test_cascade_refuses_a_negative_horizontal_length():
    with pytest.raises(ValueError, match=">= 0"):
        CascadeDrafter(toy_draft(), PromptLookupDrafter(), -1)
