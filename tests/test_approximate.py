"""Tests for approximate.py, the LOSSY verification rules: each follows its own published criterion (against brute
force), accepts at least what the lossless rule accepts, reduces EXACTLY to the lossless rule at its exact end
(beta = 1, rollback = 0, lenience = 1, temperature 0), and is detectably not the target's distribution otherwise.
p = target, q = draft (Leviathan et al.)."""

import math
from pathlib import Path

import numpy as np
import pytest
import table
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specdec
from approximate import BiLD, Lenient, TopK, Typical, chain_tree, longest_acceptable_path
from tests.test_verify import P_CHAIN, assert_detects, assert_matches, chains, first_chain_tokens
from tree import Tree, path_to
from verify import Greedy, SpeculativeSampling, probs_from_logits

no_deadline = settings(deadline=None)


@st.composite
def trees(draw, distinct_siblings: bool = True):
    """(logits [N, V], Tree): small integer logits, so that ties happen."""
    vocab, n = draw(st.integers(2, 4)), draw(st.integers(1, 8))
    tree = Tree.from_root(draw(st.integers(0, vocab - 1)))
    for i in range(1, n):
        open_parents = [
            j
            for j in range(i)
            if not distinct_siblings or len([c for c in range(1, i) if tree.parents[c] == j]) < vocab
        ]
        parent = draw(st.sampled_from(open_parents))
        used = {tree.tokens[c] for c in range(1, i) if tree.parents[c] == parent} if distinct_siblings else set()
        tree.add(parent, draw(st.sampled_from([t for t in range(vocab) if t not in used])), 0.0)
    logits = draw(st.lists(st.integers(-2, 2), min_size=n * vocab, max_size=n * vocab))
    return torch.tensor(logits, dtype=torch.float32).view(n, vocab), tree


def greedy_p(logits):
    return probs_from_logits(logits, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# 1. The exact end of every rule is the lossless rule, token for token.

EXACT_ENDS = {"topk beta=1": TopK(beta=1, tau=3.0), "bild rollback=0": BiLD(rollback=0.0), "typical at T=0": Typical()}


@no_deadline
@pytest.mark.parametrize("rule", EXACT_ENDS.values(), ids=EXACT_ENDS.keys())
@given(chain=chains())
def test_exact_end_is_greedy_verification_on_chains(rule, chain):
    logits, drafts = chain
    assert rule.chain(logits, greedy_p(logits), None, drafts, None) == Greedy().chain(logits, None, None, drafts, None)


@no_deadline
@pytest.mark.parametrize("rule", EXACT_ENDS.values(), ids=EXACT_ENDS.keys())
@given(case=trees(distinct_siblings=True))
def test_exact_end_is_greedy_verification_on_trees(rule, case):
    logits, tree = case
    assert rule.tree(logits, greedy_p(logits), tree, None) == Greedy().tree(logits, None, tree, None)


@no_deadline
@given(chain=chains(), case=trees(distinct_siblings=False), seed=st.integers(0, 2**32))
def test_lenience_one_is_exact_speculative_sampling(chain, case, seed):
    logits, drafts = chain
    p = probs_from_logits(logits, 1.0)
    q = probs_from_logits(logits.flip(-1)[:-1], 1.0)  # any draft distribution
    runs = [
        rule.chain(logits, p, q, drafts, torch.Generator().manual_seed(seed))
        for rule in (Lenient(1.0), SpeculativeSampling())
    ]
    assert runs[0] == runs[1]
    logits, tree = case
    tree.q = probs_from_logits(logits.roll(1, dims=-1), 1.0)
    p = probs_from_logits(logits, 1.0)
    runs = [
        rule.tree(logits, p, tree, torch.Generator().manual_seed(seed))
        for rule in (Lenient(1.0), SpeculativeSampling())
    ]
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------------------------------------
# 2. Each rule's criterion, against brute force.


def brute_force_longest(tree: Tree, ok) -> list[int]:
    """The longest root path of nodes with ok(node) (root excluded), first in index order among the longest."""
    best = []
    for node in range(1, len(tree)):
        path = path_to(tree, node)[1:]
        if all(ok(i) for i in path) and len(path) > len(best):
            best = path
    return best


@no_deadline
@given(case=trees(distinct_siblings=False), data=st.data())
def test_longest_acceptable_path_matches_brute_force(case, data):
    _, tree = case
    ok = [True] + data.draw(st.lists(st.booleans(), min_size=len(tree) - 1, max_size=len(tree) - 1))
    assert longest_acceptable_path(ok, tree.parents) == brute_force_longest(tree, ok.__getitem__)


@no_deadline
@given(
    case=trees(distinct_siblings=False), beta=st.integers(1, 4), tau=st.sampled_from([0.0, 0.5, 1.5, math.inf])
)  # off the integer gaps
def test_topk_accepts_drafts_ranked_within_beta_and_tau_of_the_top(case, beta, tau):
    logits, tree = case
    logprobs = torch.log_softmax(logits, dim=-1).tolist()

    def ok(i):  # brute force: rank by (log-prob descending, index ascending), as argmax breaks ties
        row, x = logprobs[tree.parents[i]], tree.tokens[i]
        rank = sorted(range(len(row)), key=lambda t: (-row[t], t)).index(x)
        return rank < beta and row[x] >= max(row) - tau

    path, token = TopK(beta, tau).tree(logits, greedy_p(logits), tree, None)
    assert path == brute_force_longest(tree, ok)
    assert token == int(logits[path[-1] if path else 0].argmax())


@no_deadline
@given(case=trees(distinct_siblings=False), rollback=st.sampled_from([0.0, 0.5, 1.2, 3.0, math.inf]))
def test_bild_rolls_back_drafts_whose_cross_entropy_exceeds_the_threshold(case, rollback):
    logits, tree = case
    logprobs = torch.log_softmax(logits, dim=-1).tolist()

    def ok(i):
        row, x = logprobs[tree.parents[i]], tree.tokens[i]
        return -row[x] <= rollback or x == int(logits[tree.parents[i]].argmax())

    path, token = BiLD(rollback).tree(logits, greedy_p(logits), tree, None)
    assert path == brute_force_longest(tree, ok)
    assert token == int(logits[path[-1] if path else 0].argmax())


@no_deadline
@given(case=trees(distinct_siblings=True), rule=st.sampled_from([TopK(3, 2.0), BiLD(2.0), TopK(2, math.inf)]))
def test_relaxed_rules_accept_at_least_what_greedy_accepts(case, rule):
    logits, tree = case
    assert len(rule.tree(logits, greedy_p(logits), tree, None)[0]) >= len(Greedy().tree(logits, None, tree, None)[0])


def test_chain_tree_is_a_path_with_the_draft_distributions_as_rows():
    drafts, q = torch.tensor([3, 1, 2]), torch.rand(3, 5)
    tree = chain_tree(drafts, q)
    assert tree.tokens[1:] == [3, 1, 2] and tree.parents == [-1, 0, 1, 2]
    assert torch.equal(tree.q[:3], q) and len(tree.q) == 4
    assert chain_tree(drafts, None).q is None


def test_typical_accept_takes_confident_path_and_returns_argmax():
    probs = torch.full((4, 6), 0.01)
    probs[0, 1], probs[1, 4], probs[2, 2], probs[3, 0] = 0.95, 0.95, 0.95, 0.95  # confident rows
    tree = Tree([5, 1, 4, 3], [-1, 0, 1, 0], [0.0] * 4)
    assert Typical().tree(probs.log(), probs, tree, None) == ([1, 2], 2)


def test_typical_accept_rejects_improbable_token():
    probs = torch.tensor([[0.001, 0.989, 0.01], [0.3, 0.3, 0.4]])
    assert Typical().tree(probs.log(), probs, Tree([1, 0], [-1, 0], [0.0, 0.0]), None) == ([], 1)


def test_typical_accept_takes_longest_path_and_accepts_anything_plausible_when_flat():
    probs = torch.full((5, 8), 1 / 8)  # flat: threshold 0.3 / 8 < 1 / 8, every token is acceptable (lossy)
    tree = Tree([0, 3, 5, 7, 7], [-1, 0, 0, 2, 2], [0.0] * 5)
    assert Typical().tree(probs.log(), probs, tree, None) == ([2, 3], 0)


def test_lenient_acceptance_is_min_one_p_over_l_q():
    from verify import acceptance_probability

    p, q = torch.tensor([0.1, 0.6, 0.3]), torch.tensor([0.5, 0.2, 0.3])
    assert torch.allclose(acceptance_probability(p, q, 0.5), torch.tensor([0.4, 1.0, 1.0]))
    with pytest.raises(ValueError):
        Lenient(0.0)


# ---------------------------------------------------------------------------------------------------------------
# 3. Lossy means lossy: the chi-square test that accepts exact speculative sampling rejects lenience 0.5 (the first
# token of a chain, gamma = 1, as tests/test_verify.py does for the lossless rule).


def lenient_sampler(lenience):
    def sample(target, draft, drafts, generator):
        return Lenient(lenience).chain(target.log(), target, draft, drafts, generator)

    return sample


@pytest.mark.slow
def test_lenient_sampling_is_exact_at_one_and_detectably_lossy_below():
    assert_matches(first_chain_tokens(lenient_sampler(1.0), seed=1), P_CHAIN.numpy())
    assert_detects(first_chain_tokens(lenient_sampler(0.5), seed=1), P_CHAIN.numpy())


def test_lossy_rules_say_so():
    assert all(rule.lossy for rule in (Typical(), TopK(), BiLD(), Lenient()))
    assert not Greedy().lossy and not SpeculativeSampling().lossy
    assert np.isclose(TopK().beta, 5) and TopK().tau == 3.0 and BiLD().rollback == 5.0  # the authors' defaults


# ---------------------------------------------------------------------------------------------------------------
# 4. On the shipped weights, in the decoding loops: each rule at its exact end gives the autoregressive output.

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


@pytest.mark.parametrize("rule", EXACT_ENDS.values(), ids=EXACT_ENDS.keys())
@pytest.mark.parametrize("drafter", ["draft", "eagle"])
def test_exact_ends_in_the_loops_equal_autoregressive_on_the_shipped_weights(short_references, rule, drafter):
    enc, target, references = short_references
    use_tree = drafter == "eagle"
    draft = table.drafter(drafter, target)
    for prompt, expected in references:
        out, _ = specdec.decode(target, draft, use_tree, prompt, 24, 4, verifier=rule, temperature=0, eot=enc.eot_token)
        assert out == expected


def test_lossy_rules_in_the_loop_accept_more_and_change_the_output(short_references):
    enc, target, references = short_references
    draft = table.drafter("draft", target)
    accepted, changed = {}, {}
    for name, rule in {"exact": Greedy(), "topk": TopK(), "bild": BiLD(2.0)}.items():
        accepted[name] = changed[name] = 0
        for prompt, expected in references:
            out, stats = specdec.decode(
                target, draft, False, prompt, 24, 4, verifier=rule, temperature=0, eot=enc.eot_token
            )
            accepted[name] += stats.accepted
            changed[name] += out != expected
    assert changed["exact"] == 0 and changed["topk"] > 0 and changed["bild"] > 0
    assert accepted["topk"] > accepted["exact"] and accepted["bild"] > accepted["exact"]
