"""Properties of tree.py, checked against brute-force references on random trees (hypothesis)."""

import itertools
import math
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tree import (  # noqa: E402
    Tree,
    children,
    default_tree_choices,
    depths,
    expand_frontier,
    keep_indices,
    path_to,
    render_tree,
    rerank_top_m,
    root_to_leaf_paths,
    static_tree,
    subtree,
    top_m_nodes,
    tree_attention_mask,
    tree_from_sequences,
    tree_positions,
)

# Per-test settings (no global profile: other test files keep theirs). No deadline: CI machines vary.
fast = settings(max_examples=60, deadline=None)

# A few repeated log-probs (0.0 included) so ties between scores are common.
LOGPROBS = st.one_of(st.sampled_from([0.0, -0.5, -1.0]), st.floats(-5.0, 0.0))


@st.composite
def trees(draw, max_nodes: int = 16) -> Tree:
    """Random tree: parents[i] < i, random tokens, score = parent score + a log-prob <= 0."""
    n = draw(st.integers(1, max_nodes))
    tree = Tree.from_root(draw(st.integers(0, 9)))
    for i in range(1, n):
        parent = draw(st.integers(0, i - 1))
        tree.add(parent, draw(st.integers(0, 9)), tree.scores[parent] + draw(LOGPROBS))
    return tree


prefix_lens = st.integers(0, 5)


def ancestors_or_self(tree: Tree, i: int) -> set[int]:
    """Reference: walk parent pointers up to the root."""
    out = {i}
    while tree.parents[i] != -1:
        i = tree.parents[i]
        out.add(i)
    return out


def brute_depth(tree: Tree, i: int) -> int:
    return len(ancestors_or_self(tree, i)) - 1


def leaves(tree: Tree) -> list[int]:
    return [i for i in range(len(tree)) if i not in tree.parents]


# ---------------------------------------------------------------------------------------------------------------
# Tree basics


def test_tree_rejects_parents_that_do_not_come_first():
    with pytest.raises(ValueError):
        Tree(tokens=[1, 2], parents=[-1, 1], scores=[0.0, 0.0])
    with pytest.raises(ValueError):
        Tree(tokens=[1, 2], parents=[0, 0], scores=[0.0, 0.0])
    with pytest.raises(ValueError):
        Tree.from_root(1).add(parent=3, token=2, score=0.0)


@fast
@given(trees())
def test_depths_and_children_agree_with_parent_pointers(tree):
    assert depths(tree) == [brute_depth(tree, i) for i in range(len(tree))]
    assert children(tree.parents) == [[j for j in range(len(tree)) if tree.parents[j] == i] for i in range(len(tree))]


# ---------------------------------------------------------------------------------------------------------------
# Mask, positions, paths, cache slots


@fast
@given(trees(), prefix_lens)
def test_mask_allows_exactly_prefix_ancestors_and_self(tree, prefix_len):
    mask = tree_attention_mask(tree, prefix_len)
    n = len(tree)
    assert mask.dtype == torch.bool and mask.shape == (n, prefix_len + n)
    for i in range(n):
        allowed = ancestors_or_self(tree, i)
        for j in range(prefix_len + n):
            assert mask[i, j].item() == (j < prefix_len or (j - prefix_len) in allowed)


def test_mask_of_a_small_tree_reads_as_expected():
    #   0 ─ 1 ─ 3
    #     └ 2
    tree = Tree(tokens=[10, 11, 12, 13], parents=[-1, 0, 0, 1], scores=[0.0, -1.0, -2.0, -1.5])
    expected = [
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 1, 0, 1],
    ]
    assert tree_attention_mask(tree, prefix_len=1).tolist() == [[bool(x) for x in row] for row in expected]
    assert tree_positions(tree, prefix_len=1).tolist() == [1, 2, 2, 3]


@fast
@given(trees(), prefix_lens)
def test_positions_equal_prefix_len_plus_depth(tree, prefix_len):
    positions = tree_positions(tree, prefix_len)
    assert positions.dtype == torch.long
    assert positions.tolist() == [prefix_len + brute_depth(tree, i) for i in range(len(tree))]


@fast
@given(trees())
def test_path_to_is_the_parent_walk_reversed(tree):
    for i in range(len(tree)):
        path = path_to(tree, i)
        assert path == sorted(ancestors_or_self(tree, i))  # parents < children, so the walk is sorted
        assert path[0] == 0 and path[-1] == i
        assert all(tree.parents[b] == a for a, b in zip(path, path[1:]))


@fast
@given(trees())
def test_every_leaf_ends_exactly_one_root_to_leaf_path(tree):
    paths = root_to_leaf_paths(tree)
    assert [p[-1] for p in paths] == leaves(tree)  # one per leaf, leaves in index order
    assert paths == [path_to(tree, leaf) for leaf in leaves(tree)]
    for leaf in leaves(tree):
        assert sum(leaf in p for p in paths) == 1


@fast
@given(trees(), prefix_lens, st.data())
def test_keep_indices_are_the_root_and_path_slots_after_the_prefix(tree, prefix_len, data):
    node = data.draw(st.integers(0, len(tree) - 1))
    path = path_to(tree, node)[1:]  # accepted drafts, root excluded
    expected = [prefix_len] + [prefix_len + i for i in path]
    assert keep_indices(path, prefix_len).tolist() == expected
    assert keep_indices(path_to(tree, node), prefix_len).tolist() == expected  # a leading root is tolerated
    assert keep_indices(path, prefix_len).dtype == torch.long


def test_keep_indices_rejects_something_that_is_not_a_root_path():
    with pytest.raises(ValueError):
        keep_indices([3, 1], prefix_len=2)


# ---------------------------------------------------------------------------------------------------------------
# SpecInfer merge


sequence_lists = st.lists(st.lists(st.integers(0, 3), max_size=5), max_size=6)


@fast
@given(st.integers(0, 9), sequence_lists)
def test_every_sequence_is_a_root_path_of_the_merged_trie(root, sequences):
    tree = tree_from_sequences(root, sequences)
    kids = children(tree.parents)
    for seq in sequences:
        node = 0
        for token in seq:
            (node,) = [c for c in kids[node] if tree.tokens[c] == token]  # exactly one child has that token
        assert [tree.tokens[i] for i in path_to(tree, node)] == [root] + seq


@fast
@given(st.integers(0, 9), sequence_lists)
def test_trie_has_one_node_per_distinct_prefix_plus_the_root(root, sequences):
    tree = tree_from_sequences(root, sequences)
    distinct_prefixes = {tuple(seq[: k + 1]) for seq in sequences for k in range(len(seq))}
    assert len(tree) == len(distinct_prefixes) + 1


def test_trie_keeps_order_of_first_appearance_and_best_score():
    tree = tree_from_sequences(7, [[1, 2], [1, 3], [4]], logprobs=[[-1.0, -1.0], [-0.5, -0.5], [-3.0]])
    assert tree.tokens == [7, 1, 2, 3, 4]
    assert tree.parents == [-1, 0, 1, 1, 0]
    assert tree.scores == [0.0, -0.5, -2.0, -1.0, -3.0]  # node 1 is shared: it keeps the better -0.5


# ---------------------------------------------------------------------------------------------------------------
# Medusa static tree


def ancestor_closed(choices) -> bool:
    chosen = set(choices)
    return all(c[:k] in chosen for c in chosen for k in range(1, len(c)))


@st.composite
def medusa_inputs(draw):
    depth, width = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    candidates = [draw(st.lists(st.integers(0, 50), min_size=width, max_size=width)) for _ in range(depth)]
    logprobs = [sorted(draw(st.lists(LOGPROBS, min_size=width, max_size=width)), reverse=True) for _ in range(depth)]
    every_path = [p for d in range(1, depth + 1) for p in itertools.product(range(width), repeat=d)]
    picked = draw(st.lists(st.sampled_from(every_path), unique=True, max_size=12))
    closed = {p[:k] for p in picked for k in range(1, len(p) + 1)}  # add missing prefixes
    choices = draw(st.permutations(sorted(closed)))
    return candidates, logprobs, list(choices)


@fast
@given(medusa_inputs())
def test_static_tree_puts_the_ranked_candidate_at_each_choice(inputs):
    candidates, logprobs, choices = inputs
    tree = static_tree(5, candidates, choices, logprobs)
    assert len(tree) == len(choices) + 1
    node_choice = [()] + sorted(choices, key=len)  # node order: by depth, then choice order
    d = depths(tree)
    for i in range(1, len(tree)):
        c = node_choice[i]
        assert d[i] == len(c)
        assert tree.tokens[i] == candidates[len(c) - 1][c[-1]]
        assert node_choice[tree.parents[i]] == c[:-1]
        assert math.isclose(tree.scores[i], sum(logprobs[k][r] for k, r in enumerate(c)), abs_tol=1e-9)


@pytest.mark.parametrize(
    "choices",
    [
        [(0, 0)],  # prefix (0,) missing
        [(0,), (1, 0)],  # prefix (1,) missing
        [(0,), (0,)],  # duplicate
        [()],  # the root is not a choice
        [(0,), (0, 0), (0, 0, 0)],  # deeper than the candidates
        [(5,)],  # rank beyond the top-k
        [(-1,)],
    ],
)
def test_static_tree_rejects_invalid_choices(choices):
    candidates = [[10, 11], [20, 21]]
    with pytest.raises(ValueError):
        static_tree(1, candidates, choices)


@fast
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_default_tree_choices_are_ancestor_closed_with_the_requested_size(depth, width, data):
    most = sum(width**d for d in range(1, depth + 1))
    size = data.draw(st.integers(0, min(most, 40)))
    choices = default_tree_choices(depth, width, size)
    assert len(choices) == len(set(choices)) == size
    assert ancestor_closed(choices)
    assert all(1 <= len(c) <= depth and all(0 <= r < width for r in c) for c in choices)
    prior = lambda c: math.prod(1 / (r + 1) for r in c)  # noqa: E731
    if size < most:  # greedy: nothing left out is strictly more likely than something taken
        left_out = set(p for d in range(1, depth + 1) for p in itertools.product(range(width), repeat=d))
        left_out -= set(choices)
        assert max(map(prior, left_out)) <= min(map(prior, choices), default=1.0) + 1e-12
    static_tree(0, [list(range(width))] * depth, choices)  # usable as is


def test_default_tree_choices_refuses_more_nodes_than_fit():
    with pytest.raises(ValueError):
        default_tree_choices(depth=2, width=2, size=7)


# ---------------------------------------------------------------------------------------------------------------
# EAGLE-2 dynamic tree


@fast
@given(trees(max_nodes=6), st.data())
def test_expand_frontier_adds_cumulative_scores_and_returns_the_best_new_nodes(tree, data):
    frontier = data.draw(st.lists(st.integers(0, len(tree) - 1), unique=True, min_size=1, max_size=3))
    k = data.draw(st.integers(0, 3))
    child_tokens = [data.draw(st.lists(st.integers(0, 9), min_size=k, max_size=k)) for _ in frontier]
    child_logprobs = [data.draw(st.lists(LOGPROBS, min_size=k, max_size=k)) for _ in frontier]
    beam = data.draw(st.integers(0, 5))
    before = len(tree)

    best = expand_frontier(tree, frontier, child_tokens, child_logprobs, beam)

    new = list(range(before, len(tree)))
    assert len(new) == k * len(frontier)
    for i in new:
        j = i - before
        f, c = divmod(j, k)
        assert tree.parents[i] == frontier[f] and tree.tokens[i] == child_tokens[f][c]
        assert tree.scores[i] == tree.scores[frontier[f]] + child_logprobs[f][c]
    assert best == sorted(new, key=lambda i: (-tree.scores[i], i))[:beam]


@fast
@given(trees(), st.integers(0, 20))
def test_rerank_keeps_the_root_and_the_brute_force_top_m(tree, m):
    d = depths(tree)
    by_rank = sorted(range(1, len(tree)), key=lambda i: (-tree.scores[i], d[i], i))
    expected = [0] + sorted(by_rank[:m])
    assert top_m_nodes(tree, m) == expected  # ancestor closure added nothing: scores are cumulative log-probs
    assert len(expected) == min(m, len(tree) - 1) + 1

    tagged = Tree(list(range(len(tree))), tree.parents, tree.scores)  # token = original index, to trace nodes
    kept = rerank_top_m(tagged, m)
    assert kept.tokens == expected  # same set, relative order preserved
    assert all(0 <= kept.parents[i] < i for i in range(1, len(kept)))
    for i in range(1, len(kept)):  # parent links survive reindexing
        assert kept.tokens[kept.parents[i]] == tree.parents[kept.tokens[i]]
        assert kept.scores[i] == tree.scores[kept.tokens[i]]


@fast
@given(st.integers(0, 9), st.integers(1, 4), st.integers(1, 3), st.integers(0, 12), st.data())
def test_eagle2_expand_then_rerank_gives_an_ancestor_closed_tree(root, steps, beam, m, data):
    tree = Tree.from_root(root)
    frontier = [0]
    for _ in range(steps):
        kids = [data.draw(st.lists(st.integers(0, 9), min_size=beam, max_size=beam)) for _ in frontier]
        lps = [data.draw(st.lists(LOGPROBS, min_size=beam, max_size=beam)) for _ in frontier]
        frontier = expand_frontier(tree, frontier, kids, lps, beam)
    for i in range(1, len(tree)):  # scores are root-path log-probs, so never above the parent's
        assert tree.scores[i] <= tree.scores[tree.parents[i]]
    kept = rerank_top_m(tree, m)
    assert len(kept) == min(m, len(tree) - 1) + 1
    assert kept.parents[0] == -1 and all(0 <= kept.parents[i] < i for i in range(1, len(kept)))


def test_subtree_refuses_a_set_that_is_not_ancestor_closed():
    tree = Tree(tokens=[0, 1, 2], parents=[-1, 0, 1], scores=[0.0, -1.0, -2.0])
    with pytest.raises(ValueError):
        subtree(tree, [0, 2])


# ---------------------------------------------------------------------------------------------------------------
# Rendering


@fast
@given(trees(), st.data())
def test_render_shows_every_token_and_marks_the_accepted_path(tree, data):
    node = data.draw(st.integers(0, len(tree) - 1))
    accepted = path_to(tree, node)
    decode = lambda t: f"tok{t}"  # noqa: E731
    lines = render_tree(tree, decode, accepted).splitlines()
    assert len(lines) == len(tree)
    shown = {int(line.split("#")[1].split()[0]): line for line in lines}  # node index -> its line
    assert sorted(shown) == list(range(len(tree)))
    for i, line in shown.items():
        assert repr(decode(tree.tokens[i])) in line
        assert f"{tree.scores[i]:.2f}" in line
        assert ("[accepted]" in line) == (i in accepted)


def test_render_of_a_small_tree():
    tree = Tree(tokens=[0, 1, 2, 3], parents=[-1, 0, 0, 1], scores=[0.0, -0.51, -0.92, -1.2])
    words = {0: "The", 1: " cat", 2: " dog", 3: " sat"}
    assert render_tree(tree, words.get, accepted=[0, 1, 3]) == "\n".join(
        [
            "#0 'The' 0.00 [accepted]",
            "├─ #1 ' cat' -0.51 [accepted]",
            "│  └─ #3 ' sat' -1.20 [accepted]",
            "└─ #2 ' dog' -0.92",
        ]
    )
