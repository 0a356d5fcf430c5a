"""Retrieval drafters (retrieval.py) and their structures (suffix.py): each structure agrees with brute-force
substring search on random small token strings (hypothesis), the draft trees are well-formed tries, and greedy
decoding with each drafter on the shipped weights equals plain decoding. The datastores are built here from a
synthetic token stream or the prompts' own tokens: nothing needs `train.py data` to have run."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import table
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from methods import UsageError
from retrieval import RestDrafter, SamDrafter, SuffixDrafter, frequency_tree
from specdec import tree_speculative_generate
from suffix import FrozenAutomaton, SuffixAutomaton, SuffixTrie, sa_longest_match, sa_range, sam_step, suffix_array
from tree import Tree, depths, path_to

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
texts = st.lists(st.integers(0, 3), min_size=1, max_size=40)  # 4 symbols: many repeats, long matches
queries = st.lists(st.integers(0, 3), min_size=1, max_size=12)


def occurrences(text: list[int], pattern: list[int]) -> list[int]:
    """Brute force: every start of `pattern` in `text`."""
    return [i for i in range(len(text) - len(pattern) + 1) if text[i : i + len(pattern)] == pattern]


def longest_suffix_in(text: list[int], query: list[int], max_len: int, followed: bool = False) -> int:
    """Brute force: the longest suffix of `query` (at most max_len) occurring in `text` (followed by a token)."""
    best = 0
    for n in range(1, min(max_len, len(query)) + 1):
        starts = occurrences(text, query[-n:])
        if any(s + n < len(text) for s in starts) if followed else starts:
            best = n
    return best


# ---- structures against brute force ----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(texts, st.sampled_from([None, 1, 2, 3, 16]))
def test_suffix_array_sorts_suffixes(text, width):
    sa = suffix_array(np.array(text, dtype=np.uint16), width).tolist()
    assert sorted(sa) == list(range(len(text)))
    if width is None:
        assert sa == sorted(range(len(text)), key=lambda i: text[i:])
    else:  # sorted by the first `width` tokens, ties in any order
        heads = [text[i : i + width] for i in sa]
        assert heads == sorted(heads)


@settings(max_examples=150, deadline=None)
@given(texts, queries, st.integers(1, 6))
def test_suffix_array_lookups_agree_with_brute_force(text, query, max_len):
    tokens = np.array(text, dtype=np.uint16)
    sa = suffix_array(tokens, 8)
    lo, hi = sa_range(tokens, sa, query[-3:])
    assert sorted(sa[lo:hi].tolist()) == occurrences(text, query[-3:])
    length, lo, hi = sa_longest_match(tokens, sa, query, max_len)
    assert length == longest_suffix_in(text, query, max_len)
    if length:
        assert sorted(sa[lo:hi].tolist()) == occurrences(text, query[-length:])


@settings(max_examples=150, deadline=None)
@given(st.lists(texts, min_size=1, max_size=3), queries, st.integers(2, 6))
def test_suffix_trie_counts_and_matches_agree_with_brute_force(docs, query, depth):
    trie = SuffixTrie(depth)
    for doc in docs:
        trie.start_document()
        for token in doc:
            trie.append(token)
    for n in range(1, min(depth, len(query)) + 1):  # substrings of up to `depth` tokens, counted over all docs
        pattern = query[:n]
        node = trie.find(pattern)
        count = sum(len(occurrences(doc, pattern)) for doc in docs)
        assert (trie.count[node] if node is not None else 0) == count
        if node is not None:  # children = what followed its occurrences, with counts
            after = Counter(d[s + n] for d in docs for s in occurrences(d, pattern) if s + n < len(d))
            assert {t: trie.count[c] for t, c in trie.children[node].items()} == (after if n < depth else {})
    length, node = trie.longest_match(query, 8)
    assert length == max(longest_suffix_in(d, query, min(8, depth - 1), followed=True) for d in docs)
    assert length == 0 or node == trie.find(query[-length:])


@settings(max_examples=150, deadline=None)
@given(texts, queries)
def test_suffix_automaton_matches_longest_suffixes(text, query):
    sam = SuffixAutomaton()
    for token in text:
        sam.extend(token)
    for automaton in (sam, FrozenAutomaton.freeze(sam)):
        state, length = 0, 0
        for i, token in enumerate(query):
            state, length = sam_step(automaton, state, length, token)
            assert length == longest_suffix_in(text, query[: i + 1], len(query))
            end = int(automaton.end[state])
            assert length == 0 or text[end - length + 1 : end + 1] == query[i + 1 - length : i + 1]  # a real occurrence


@settings(max_examples=150, deadline=None)
@given(texts)
def test_dynamic_automaton_match_always_has_a_continuation(text):
    """SamDrafter.feed: after each token, the longest suffix that occurred EARLIER, at an earlier end position."""
    drafter = SamDrafter(SuffixAutomaton())
    for i, token in enumerate(text):
        drafter.feed(token)
        assert drafter.d_len == longest_suffix_in(text[:i], text[: i + 1], i + 1)
        end = drafter.dynamic.end[drafter.d_state]
        if drafter.d_len:
            assert end < i and text[end - drafter.d_len + 1 : end + 1] == text[i + 1 - drafter.d_len : i + 1]


# ---- draft trees -----------------------------------------------------------------------------------------------


def assert_trie(tree: Tree, size: int) -> None:
    assert len(tree) - 1 <= size
    assert all(0 <= p < i for i, p in enumerate(tree.parents) if i)
    paths = {tuple(tree.tokens[n] for n in path_to(tree, i)) for i in range(len(tree))}
    assert len(paths) == len(tree)  # a trie: no two siblings share a token
    assert all(tree.scores[i] <= tree.scores[tree.parents[i]] + 1e-12 for i in range(1, len(tree)))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), max_size=4), max_size=12), st.integers(0, 10))
def test_frequency_tree_keeps_the_most_frequent_continuations(seqs, size):
    found = Counter(map(tuple, seqs))
    tree = frequency_tree(9, found, size)
    assert_trie(tree, size)
    prefix_count = Counter(s[:d] for s, n in found.items() for d in range(1, len(s) + 1) for _ in range(n))
    counts = sorted(prefix_count.values(), reverse=True)
    for i in range(1, len(tree)):
        path = tuple(tree.tokens[n] for n in path_to(tree, i))[1:]
        assert np.isclose(np.exp(tree.scores[i]), prefix_count[path] / max(1, len(seqs)))
    kept = sorted((round(np.exp(s) * len(seqs)) for s in tree.scores[1:]), reverse=True)
    assert kept == counts[: len(kept)] and len(kept) == min(size, len(counts))  # the most frequent ones


def synthetic_drafters(tokens: list[int], size: int = 12, depth: int = 6):
    stream = np.array(tokens, dtype=np.uint16)
    sam = SuffixAutomaton()
    for t in tokens:
        sam.extend(t)
    return {
        "rest": RestDrafter(stream, suffix_array(stream, 16), depth=depth, size=size),
        "suffix": SuffixDrafter(depth=depth, size=size, alpha=2.0),
        "sam": SamDrafter(FrozenAutomaton.freeze(sam), depth=depth, size=size),
    }


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=60),
    st.lists(st.integers(0, 3), min_size=1, max_size=30),
    st.integers(1, 8),
)
def test_drafters_propose_well_formed_trees_rooted_at_the_last_token(store, context, size):
    for drafter in synthetic_drafters(store, size=size, depth=3).values():
        drafter.reset()
        for n in range(1, len(context) + 1):  # a growing context, as the loop feeds it
            tree = drafter.propose_tree(context[:n], torch.zeros(0), lambda x: x, None)
            assert tree.tokens[0] == context[n - 1] and tree.q is None  # deterministic: one-hot q
            assert_trie(tree, size)
            assert max(depths(tree)) <= 3


# ---- on the shipped weights ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def drafters_on(short_references):
    """Datastores of the prompts' own token stream (so there is something to retrieve) and a synthetic tail."""
    enc, target, refs = short_references
    stream = [t for prompt, out in refs for t in prompt + [enc.eot_token]] + list(range(300)) * 2
    return synthetic_drafters(stream)


@pytest.mark.parametrize("name", ["rest", "suffix", "sam"])
def test_greedy_decoding_with_retrieval_drafters_equals_autoregressive(short_references, drafters_on, name):
    enc, target, refs = short_references
    drafter, accepted = drafters_on[name], 0
    torch.set_num_threads(1)
    for i, (prompt, expected) in enumerate(refs):
        out, stats = tree_speculative_generate(target, drafter, prompt, 24, temperature=0, eot=enc.eot_token)
        assert out == expected, f"prompt {i}"
        assert sum(n * c for n, c in enumerate(stats.accept_counts)) == stats.accepted <= stats.drafted
        accepted += stats.accepted
    assert accepted > 0, f"{name} never had a draft accepted"


@pytest.mark.parametrize("name", ["rest", "suffix", "sam"])
def test_sampling_with_retrieval_drafters_runs_and_stays_in_budget(short_references, drafters_on, name):
    enc, target, refs = short_references
    out, stats = tree_speculative_generate(
        target,
        drafters_on[name],
        refs[0][0],
        20,
        temperature=0.8,
        top_k=20,
        generator=torch.Generator().manual_seed(0),
        eot=enc.eot_token,
    )
    assert len(out) <= 20 and stats.produced == len(out)


def test_suffix_drafter_learns_across_requests(short_references):
    """The second run of a prompt drafts from the first run's output: SuffixDecoding's history."""
    enc, target, refs = short_references
    prompt, expected = refs[-1]  # the short prompt: little to match in itself
    drafter = SuffixDrafter(depth=6, size=12)
    first = tree_speculative_generate(target, drafter, prompt, 24, eot=enc.eot_token)
    second = tree_speculative_generate(target, drafter, prompt, 24, eot=enc.eot_token)
    assert first[0] == second[0] == expected
    assert second[1].accepted > first[1].accepted and drafter.history.count[0] > 0


def test_missing_datastore_is_a_usage_error(short_references, tmp_path):
    enc, target, refs = short_references
    for name in ("rest", "sam"):
        with pytest.raises(UsageError, match="python train.py data && python train.py datastore"):
            table.drafter(name, target, data_dir=tmp_path)
    assert isinstance(table.drafter("suffix", target), SuffixDrafter)


def test_datastore_files_round_trip(tmp_path, capsys):
    """train.py datastore's files load into working drafters (a small train.bin here)."""
    from retrieval import build_datastore

    np.array(list(range(50)) * 4, dtype=np.uint16).tofile(tmp_path / "train.bin")
    build_datastore(tmp_path)
    assert "suffix array" in capsys.readouterr().out
    rest, sam = RestDrafter.load(tmp_path), SamDrafter.load(tmp_path)
    for drafter in (rest, sam):
        drafter.reset()
        tree = drafter.propose_tree([7, 8, 9], torch.zeros(0), lambda x: x, None)
        assert tree.tokens[:2] == [9, 10]
