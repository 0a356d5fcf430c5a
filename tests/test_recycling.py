"""Token Recycling (recycling.py): the paper's static tree and its cut, the breadth-first fill of that tree from the
adjacency matrix and the matrix's update from a call's logits, each against brute force (hypothesis); in the loop,
every node's row, rejected ones included, is the target's own top-k there; greedy output equals autoregressive
decoding on the shipped weights; the matrix carries over to the next generation; and sampled output has the
target's law, with a broken verifier rejected by the same test. p = target, q = draft (one-hot: deterministic)."""

import pytest
import table
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recycling import PAPER_TREE, RecyclingDrafter, cut_tree, rank_prior
from specdec import tree_speculative_generate
from tests.test_tree_decoding import MODEL_PROMPT, first_child_always, toy_target, tree_law_chi_square
from tests.toy import BrokenRule, toy_model
from tree import check_tree_choices, children, depths, path_to

pytestmark = pytest.mark.usefixtures("one_thread")


def tree_paths(tree) -> list[tuple[int, ...]]:
    """Every node's tokens from the root (root included), in node order."""
    return [tuple(tree.tokens[n] for n in path_to(tree, i)) for i in range(len(tree))]


# ---- the static tree -------------------------------------------------------------------------------------------


def test_the_papers_tree_has_80_nodes_6_levels_and_at_most_8_children():
    check_tree_choices(PAPER_TREE)  # every prefix of a choice is a choice
    assert len(PAPER_TREE) == 80 and max(map(len, PAPER_TREE)) == 6
    kids = {c: sum(1 for d in PAPER_TREE if d[:-1] == c) for c in [()] + PAPER_TREE}
    assert max(kids.values()) == 8 == kids[()]
    assert cut_tree(PAPER_TREE, 80, 6, 1000) == sorted(PAPER_TREE, key=len)  # uncut: the whole tree


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 90), st.integers(1, 7), st.integers(1, 9))
def test_a_cut_keeps_the_likeliest_choices_that_fit_and_is_a_tree(size, depth, k):
    kept = cut_tree(PAPER_TREE, size, depth, k)
    check_tree_choices(kept)  # ancestor-closed
    fits = [c for c in PAPER_TREE if len(c) <= depth and max(c) < k]
    assert set(kept) <= set(fits) and len(kept) == min(size, len(fits))
    left = [c for c in fits if c not in kept]
    assert not left or max(map(rank_prior, kept)) <= min(map(rank_prior, left))  # none left out is likelier
    assert [len(c) for c in kept] == sorted(len(c) for c in kept)  # depth order, as the tree is laid out


# ---- the breadth-first fill and the update, against brute force -------------------------------------------------


def drafter_with(matrix: torch.Tensor, size: int, depth: int) -> RecyclingDrafter:
    drafter = RecyclingDrafter(toy_model(seed=0, vocab_size=matrix.shape[0]), size=size, depth=depth)
    drafter.matrix = matrix[:, : drafter.k].clone()
    return drafter


@st.composite
def matrices(draw):
    """A [V, 8] matrix of distinct next tokens per row, some rows unknown (-1), as the drafter keeps it."""
    V = draw(st.integers(2, 9))
    rows = [draw(st.permutations(range(V)))[:8] + [0] * max(0, 8 - V) for _ in range(V)]  # the drafter's k <= V
    known = draw(st.lists(st.booleans(), min_size=V, max_size=V))
    return torch.tensor([row if ok else [-1] * 8 for row, ok in zip(rows, known)])


@settings(max_examples=200, deadline=None)
@given(matrices(), st.integers(1, 80), st.integers(1, 6), st.data())
def test_the_fill_follows_the_matrix_from_the_root_breadth_first(matrix, size, depth, data):
    drafter = drafter_with(matrix, size, depth)
    root = data.draw(st.integers(0, len(matrix) - 1))
    tree = drafter.fill(root)

    def walk(choice):  # brute force: follow M rank by rank; None where a row is unknown
        token = root
        for r in choice:
            if matrix[token, 0] < 0:
                return None
            token = int(matrix[token, r])
        return token

    expected = [(root,)]
    for c in drafter.choices:  # the cut tree's order: depth by depth
        if all(walk(c[:d]) is not None for d in range(1, len(c) + 1)):
            expected.append(tuple([root] + [walk(c[:d]) for d in range(1, len(c) + 1)]))
    assert tree_paths(tree) == expected and tree.q is None
    assert all(0 <= p < i for i, p in enumerate(tree.parents) if i) and max(depths(tree)) <= depth
    for kids in children(tree.parents):
        assert len({tree.tokens[c] for c in kids}) == len(kids)  # a row's top-k are distinct: so are siblings
    assert all(tree.scores[i] <= tree.scores[tree.parents[i]] for i in range(1, len(tree)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=12), st.integers(0, 2**32 - 1), st.data())
def test_the_update_writes_every_nodes_top_k_and_the_accepted_path_wins_a_shared_token(tokens, seed, data):
    V = 7
    drafter = drafter_with(torch.full((V, 8), -1), 80, 6)
    before = torch.randint(0, V, (V, drafter.k), generator=torch.Generator().manual_seed(seed))
    drafter.matrix = before.clone()
    parents = [-1] + [data.draw(st.integers(0, i - 1)) for i in range(1, len(tokens))]
    leaf = data.draw(st.integers(0, len(tokens) - 1))
    path = [n for n in range(len(tokens)) if n == leaf or n in ancestors(parents, leaf)][1:]
    logits = torch.randn(len(tokens), V, generator=torch.Generator().manual_seed(seed + 1))  # ties improbable
    drafter.update(tokens, logits, path)
    for t in range(V):
        nodes = [i for i in range(len(tokens)) if tokens[i] == t]
        if not nodes:
            assert torch.equal(drafter.matrix[t], before[t])  # a token not in the call keeps its row
            continue
        on_path = [i for i in nodes if i in [0] + path]
        writer = on_path[-1] if on_path else nodes[-1]
        assert torch.equal(drafter.matrix[t], logits[writer].topk(drafter.k).indices)


def ancestors(parents: list[int], node: int) -> set[int]:
    out = set()
    while parents[node] != -1:
        node = parents[node]
        out.add(node)
    return out


# ---- in the loop -------------------------------------------------------------------------------------------------


class Recorded(RecyclingDrafter):
    """Remembers the context of every draft, so a test can recompute the target's outputs at each node."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.contexts = []

    def propose_tree(self, context, *args):
        self.contexts.append(list(context))
        return super().propose_tree(context, *args)


def test_every_node_of_a_call_rejected_ones_included_gives_its_token_the_targets_top_k_there():
    """The trash is recycled: after each call, the row of a token that sat in one node is the top-k of a cache-free
    forward of the context and that node's root path, whether the node was accepted or not."""
    target, prompt = toy_model(seed=2, vocab_size=12, max_len=48), [1, 2, 3, 1, 2]
    drafter, checked = Recorded(target, size=12, depth=3), []

    def on_tree(tree, path):
        if tree.extra_tokens is None:  # trimmed at the end of the budget: the loop did not ask it to read
            return
        context = drafter.contexts[-1]
        for i in range(len(tree)):
            if tree.tokens.count(tree.tokens[i]) == 1:
                seen = context + [tree.tokens[n] for n in path_to(tree, i)[1:]]
                top = target(torch.tensor([seen]))[0, -1].topk(drafter.k).indices
                assert torch.equal(drafter.matrix[tree.tokens[i]], top), f"node {i}"
                checked.append(i not in [0] + list(path))

    with torch.inference_mode():
        tree_speculative_generate(target, drafter, prompt, 30, temperature=0, on_tree=on_tree)
    assert any(checked), "no rejected node was checked"


SHAPES = {"default": {}, "the paper's tree": dict(tree_size=80), "small": dict(tree_size=4, tree_depth=2)}


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_decoding_with_token_recycling_equals_autoregressive(short_references, shape):
    enc, target, refs = short_references
    drafter, accepted = table.drafter("recycling", target, **SHAPES[shape]), 0
    for i, (prompt, expected) in enumerate(refs):
        out, stats = tree_speculative_generate(target, drafter, prompt, 24, temperature=0, eot=enc.eot_token)
        assert out == expected, f"prompt {i}"
        assert sum(stats.accept_counts) == stats.target_calls and stats.produced == len(out)
        accepted += stats.accepted
    assert accepted > 0 and drafter.calls > 0


def test_the_matrix_carries_over_to_the_next_generation(short_references):
    """The second run of a prompt drafts from the first run's calls (the paper keeps its matrix across queries)."""
    enc, target, refs = short_references
    prompt, expected = refs[-1]
    drafter = table.drafter("recycling", target)
    assert (drafter.matrix < 0).all()  # a new drafter knows nothing
    first = tree_speculative_generate(target, drafter, prompt, 24, eot=enc.eot_token)
    drafter.reset()  # what the loop does at the start of a generation: the matrix stays
    second = tree_speculative_generate(target, drafter, prompt, 24, eot=enc.eot_token)
    assert first[0] == second[0] == expected
    assert second[1].accepted > first[1].accepted


# ---- the sampled law: chi-square of 3-token continuations of the toy target, and a power check ---------------

N_TRUE, N_BROKEN = 10_000, 500
WARPED = dict(temperature=0.8, top_k=4, top_p=0.9)


def toy_recycling():
    return RecyclingDrafter(toy_target(), size=6, depth=2)  # V = 6: ranks 0..5 of the paper's tree


def recycling_chi_square(n_samples: int, **opts):
    return tree_law_chi_square(toy_recycling, MODEL_PROMPT, WARPED, n_samples, **opts)


@pytest.mark.slow
def test_token_recycling_sampling_reproduces_the_target_distribution():
    stat, critical, dof, accept_counts = recycling_chi_square(N_TRUE)
    print(f"recycling sampling: chi2 {stat:.1f} < {critical:.1f} (dof {dof}); accepted per call {accept_counts}")
    assert stat < critical, f"chi2 = {stat:.1f} >= {critical:.1f} (dof {dof})"
    assert (accept_counts > 0).all()  # rejections at the root, one accepted draft, two


@pytest.mark.slow
def test_the_law_test_with_token_recycling_rejects_a_verifier_that_accepts_every_first_child():
    stat, critical, dof, _ = recycling_chi_square(N_BROKEN, verifier=BrokenRule(tree_fn=first_child_always))
    print(f"first child always: chi2 {stat:.1f} > {critical:.1f} (dof {dof})")
    assert stat > critical, f"a broken verifier passed: chi2 = {stat:.1f} <= {critical:.1f} (dof {dof})"
