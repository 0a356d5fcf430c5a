"""Ouroboros (ouroboros.py): the phrase pool's insertion and lookup and the lengthened tree, each against brute force
(hypothesis); the phrases recycled from the target's outputs on rejected tails, against brute force and, in the loop,
against cache-free forwards of the target; the draft model's cache after every proposal, with a broken cache caught;
greedy output equal to autoregressive decoding on the shipped weights; and at -t > 0 (accepted: the drafts are
deterministic) the target's law, with a broken verifier rejected by the same test. p = target, q = draft (one-hot)."""

import subprocess
import sys
from pathlib import Path

import pytest
import table
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ouroboros
from maskpredict import remember
from model import KVCache
from ouroboros import OuroborosDrafter, candidate_suffixes, lengthen, tail_phrases
from specdec import generate, tree_speculative_generate, warp_for
from tests.test_maskpredict import CacheChecked, keep_and_leak
from tests.test_tree_decoding import first_child_always, toy_target, tree_law_chi_square
from tests.toy import BrokenRule, perturbed
from tree import Tree, children, keep_indices, path_to, root_to_leaf_paths

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


def toy_ouroboros(**knobs) -> OuroborosDrafter:
    """The toy target (V = 6, 16 positions) and a perturbed copy of it as the draft model: they agree often."""
    target = toy_target()
    shape = dict(gamma=2, window=2, ngram=3, candidates=2, suffixes=2) | knobs
    return OuroborosDrafter(target, perturbed(target, seed=100, noise=0.2), **shape)


# ---- the phrase pool -------------------------------------------------------------------------------------------

entries = st.lists(st.tuples(st.integers(0, 3), st.tuples(st.integers(0, 3), st.integers(0, 3))), max_size=40)


@settings(max_examples=200, deadline=None)
@given(entries, st.integers(1, 5))
def test_the_pool_keeps_each_keys_newest_distinct_phrases_newest_first(inserted, size):
    pool = {}
    for key, phrase in inserted:
        remember(pool, key, phrase, size)
    for key in range(4):
        last_seen = {phrase: i for i, (k, phrase) in enumerate(inserted) if k == key}  # brute force
        newest_first = sorted(last_seen, key=lambda phrase: -last_seen[phrase])[:size]
        assert pool.get(key, []) == newest_first


@settings(max_examples=100, deadline=None)
@given(entries, st.integers(0, 4), st.integers(0, 4))
def test_candidate_suffixes_are_the_k_newest_phrases_after_the_drafts_last_token(inserted, last, k):
    pool = {}
    for key, phrase in inserted:
        remember(pool, key, phrase, 3)
    suffixes = candidate_suffixes(pool, last, k)
    assert suffixes == [list(phrase) for phrase in pool.get(last, [])[:k]] and len(suffixes) <= k


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 5),
    st.lists(st.integers(0, 5), min_size=1, max_size=6),
    st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=4), max_size=4),
)
def test_the_lengthened_tree_is_the_draft_as_trunk_with_every_suffix_after_it(root, draft, suffixes):
    tree = lengthen(root, draft, suffixes)
    paths = {tuple(tree.tokens[i] for i in path) for path in root_to_leaf_paths(tree)}
    wanted = {(root, *draft, *s) for s in suffixes} or {(root, *draft)}
    assert {p for p in wanted if not any(q != p and q[: len(p)] == p for q in wanted)} == paths  # leaves only
    assert [tree.tokens[i] for i in range(len(draft) + 1)] == [root] + draft  # the trunk comes first
    assert tree.parents[: len(draft) + 1] == [-1] + list(range(len(draft)))
    for kids in children(tree.parents):
        assert len({tree.tokens[c] for c in kids}) == len(kids)  # a trie: distinct siblings, one-hot verifiable
    assert tree.q is None


# ---- the target's outputs on rejected tails, recycled -----------------------------------------------------------


@st.composite
def calls(draw):
    """A random tree, the target's output at each node, an accepted root path and a phrase length."""
    n = draw(st.integers(1, 12))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    tree = Tree(list(range(n)), parents, [0.0] * n)
    outputs = draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
    leaf = draw(st.integers(0, n - 1))
    path = path_to(tree, draw(st.sampled_from(path_to(tree, leaf))))[1:]
    return tree, outputs, path, draw(st.integers(1, 4))


def below(tree: Tree, node: int) -> list[int]:
    """node and every node under it."""
    return [i for i in range(len(tree)) if node in path_to(tree, i)]


@settings(max_examples=300, deadline=None)
@given(calls())
def test_each_output_below_the_last_accepted_node_keys_the_outputs_after_it_down_each_branch(call):
    tree, outputs, path, length = call
    u = path[-1] if path else 0
    chains = [[v] for v in below(tree, u)]
    for _ in range(length):  # brute force: every downward chain of length + 1 nodes that starts at u or under it
        chains = [c + [k] for c in chains for k in children(tree.parents)[c[-1]]]
    wanted = {(outputs[c[0]], tuple(outputs[v] for v in c[1:])) for c in chains}
    got = tail_phrases(tree, outputs, path, length)
    assert set(got) == wanted
    first = [u]  # the first branch: first children, in index order, down to a leaf
    while children(tree.parents)[first[-1]]:
        first.append(children(tree.parents)[first[-1]][0])
    if len(first) > length:  # inserted last, so first in the pool: the emitted token's phrase on the first branch
        assert got[-1] == (outputs[u], tuple(outputs[v] for v in first[1 : length + 1]))


class Recorded(OuroborosDrafter):
    """Remembers the context of every proposal."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.contexts = []

    def propose_tree(self, context, *args):
        self.contexts.append(list(context))
        return super().propose_tree(context, *args)


def test_after_a_call_the_emitted_tokens_first_phrase_is_the_targets_own_output_down_the_first_rejected_branch():
    """In the loop: the phrase at the front of the pool under the token just emitted is the target's argmax at each
    node of the first branch below the last accepted node, from cache-free forwards of context + root path."""
    base = toy_ouroboros(gamma=3, suffixes=2)
    drafter = Recorded(base.target, base.model, gamma=3, window=2, ngram=3, candidates=2, suffixes=2)
    target, checked = drafter.target, []

    def on_tree(tree, path):
        if tree.extra_tokens is None:  # trimmed at the end of the budget: the loop did not ask it to read
            return
        context, kids = drafter.contexts[-1], children(tree.parents)
        branch = [path[-1] if path else 0]
        while kids[branch[-1]] and len(branch) <= 2:
            branch.append(kids[branch[-1]][0])
        if len(branch) < 3:
            return
        seen = [context + [tree.tokens[n] for n in path_to(tree, v)[1:]] for v in branch]
        outputs = [int(target(torch.tensor([s]))[0, -1].argmax()) for s in seen]
        assert drafter.pool[outputs[0]][0] == tuple(outputs[1:])
        checked.append(True)

    with torch.inference_mode():
        out, _ = tree_speculative_generate(target, drafter, [1, 2, 3, 1, 2], 10, temperature=0, on_tree=on_tree)
    assert out == generate(target, [1, 2, 3, 1, 2], 10)
    assert checked and drafter.recycled > 0


# ---- the draft model's cache and the loop ------------------------------------------------------------------------


class DraftCacheChecked(OuroborosDrafter):
    """After every proposal, the draft's cache holds exactly the context and the draft but its last token, and its
    K/V equal a fresh prefill of that text."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.checked, self.contexts = 0, []

    def propose_tree(self, context, *args):
        self.contexts.append(list(context))
        tree = super().propose_tree(context, *args)
        fed_draft = len(self.fed) - len(context)  # the draft's tokens in the cache: all but its last
        assert self.cache.length == len(self.fed) and fed_draft >= 0 and self.fed[: len(context)] == context
        assert self.fed[len(context) :] == tree.tokens[1 : 1 + fed_draft]  # the trunk, nodes 1, 2, ...
        assert tree.parents[: 2 + fed_draft] == [-1] + list(range(1 + fed_draft))
        fresh = self.model.new_cache()
        self.model(torch.tensor([self.fed]), fresh)
        for ours, theirs in zip(self.cache.k + self.cache.v, fresh.k + fresh.v):
            assert torch.allclose(ours[:, :, : fresh.length], theirs[:, :, : fresh.length], atol=ATOL, rtol=0)
        self.checked += 1
        return tree


def run_with_cache_checks() -> None:
    target, draft = toy_target(), perturbed(toy_target(), seed=100, noise=0.2)
    drafter = DraftCacheChecked(target, draft, gamma=3, window=2, ngram=3, candidates=2, suffixes=2)
    checked = CacheChecked(target, drafter.contexts)  # the target's cache too, at every verification
    prompt = [1, 2, 3, 1, 2, 3, 1]
    with torch.inference_mode():
        out, stats = tree_speculative_generate(checked, drafter, prompt, 8, temperature=0)
    assert out == generate(target, prompt, 8)
    assert drafter.checked == stats.target_calls == checked.checked and stats.accepted > 0


def test_the_draft_cache_holds_exactly_the_context_and_the_draft_after_every_proposal():
    run_with_cache_checks()


def keep_one_more(path, prefix, device=None):
    """BROKEN keep_indices for the draft's calls only: also keeps the slot after the accepted phrase's last one."""
    indices = keep_indices(path, prefix, device)
    return torch.cat([indices, indices[-1:] + 1])


@pytest.mark.parametrize("broken", ["a leaked slot in both caches", "a leaked slot in the draft's cache"])
def test_the_cache_checks_catch_a_keep_that_leaves_an_extra_slot(monkeypatch, broken):
    if broken == "a leaked slot in both caches":
        monkeypatch.setattr(KVCache, "keep", keep_and_leak)
    else:  # the loop's keep_indices is specdec's, so the target's cache stays right
        monkeypatch.setattr(ouroboros, "keep_indices", keep_one_more)
    with pytest.raises(AssertionError):
        run_with_cache_checks()


def test_it_runs_to_the_end_of_the_context():
    """Near the end of the budget or of the 16 positions, the loop trims the target's tree and the drafter trims
    its own calls: the output is still the target's."""
    for n_prompt in range(1, 15):
        prompt = ([1, 2, 3, 1, 2] * 3)[:n_prompt]
        with torch.inference_mode():
            out, _ = tree_speculative_generate(toy_target(), toy_ouroboros(gamma=4), prompt, 16, temperature=0)
        assert out == generate(toy_target(), prompt, 16), n_prompt


def test_the_pool_is_kept_across_generations_only_with_the_warm_start():
    for warm in (False, True):
        drafter = toy_ouroboros(warm=warm)
        with torch.inference_mode():
            tree_speculative_generate(drafter.target, drafter, [1, 2, 3, 1, 2], 8, temperature=0)
        pool = {key: list(phrases) for key, phrases in drafter.pool.items()}
        drafter.reset()  # what the loop does when the next generation starts
        assert pool and drafter.pool == (pool if warm else {})


# ---- greedy identity on the shipped weights ----------------------------------------------------------------------

SETTINGS = {
    "default": {},
    "token by token, no suffixes": dict(ouroboros_window=1, ouroboros_ngram=2, ouroboros_candidates=1,
                                        ouroboros_suffixes=0),
    "long phrases, gamma 6": dict(gamma=6, ouroboros_window=4, ouroboros_ngram=5, ouroboros_candidates=6,
                                  ouroboros_suffixes=4),
    "warm": dict(ouroboros_warm=True),
}  # fmt: skip


@pytest.mark.parametrize("setting", SETTINGS)
def test_greedy_ouroboros_equals_autoregressive_on_shipped_weights(short_references, setting):
    enc, target, refs = short_references
    drafter, accepted = table.drafter("ouroboros", target, **SETTINGS[setting]), 0
    for i, (prompt, expected) in enumerate(refs[:2] + refs[-1:]):
        out, stats = tree_speculative_generate(target, drafter, prompt, 24, temperature=0, eot=enc.eot_token)
        assert out == expected, f"prompt {i}"  # whole lists: lengths included
        assert sum(stats.accept_counts) == stats.target_calls and stats.produced == len(out)
        accepted += stats.accepted
    assert accepted > 0 and drafter.recycled > 0


# ---- -t > 0: deterministic drafts, the one-hot rule, the target's law ----------------------------------------------


def test_a_sampled_step_drafts_the_same_tree_and_draws_no_random_numbers():
    trees = []
    for temperature in (0.0, 0.8):
        drafter, generator = toy_ouroboros(), torch.Generator().manual_seed(0)
        drafter.reset()
        rng, state = torch.get_rng_state(), generator.get_state()
        with torch.inference_mode():
            tree = drafter.propose_tree([1, 2, 3, 1], torch.zeros(3, 16), warp_for(temperature, 0, 1.0), generator)
        assert torch.equal(torch.get_rng_state(), rng) and torch.equal(generator.get_state(), state)
        assert tree.q is None  # one-hot: verified with the deterministic-sibling rule
        trees.append((tree.tokens, tree.parents))
    assert trees[0] == trees[1]


N_TRUE, N_BROKEN = 4_000, 500  # the toy drafter makes several draft calls a step: fewer samples than elsewhere
WARPED = dict(temperature=0.8, top_k=4, top_p=0.9)
PROMPT = [1, 2, 3, 1, 2]


def ouroboros_chi_square(n_samples: int, **opts):
    return tree_law_chi_square(toy_ouroboros, PROMPT, WARPED, n_samples, **opts)


@pytest.mark.slow
def test_ouroboros_sampling_reproduces_the_target_distribution():
    stat, critical, dof, accept_counts = ouroboros_chi_square(N_TRUE)
    print(f"ouroboros sampling: chi2 {stat:.1f} < {critical:.1f} (dof {dof}); accepted per call {accept_counts}")
    assert stat < critical, f"chi2 = {stat:.1f} >= {critical:.1f} (dof {dof})"
    assert (accept_counts > 0).all()  # rejections at the root, one accepted draft, two


@pytest.mark.slow
def test_the_law_test_with_ouroboros_rejects_a_verifier_that_accepts_every_first_child():
    stat, critical, dof, _ = ouroboros_chi_square(N_BROKEN, verifier=BrokenRule(tree_fn=first_child_always))
    print(f"first child always: chi2 {stat:.1f} > {critical:.1f} (dof {dof})")
    assert stat > critical, f"a broken verifier passed: chi2 = {stat:.1f} <= {critical:.1f} (dof {dof})"


def test_the_command_line_samples_with_it_losslessly():
    r = subprocess.run(
        [sys.executable, "specdec.py", "-p", "def parse(s):", "-n", "8", "-d", "ouroboros", "-t", "0.8", "-s", "1"]
        + ["--ouroboros-suffixes", "2", "--no-color"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "drafter ouroboros, token tree" in r.stdout and "[verification: exact (lossless)" in r.stdout
