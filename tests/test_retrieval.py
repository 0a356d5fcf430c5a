"""Retrieval drafters (retrieval.py; prompt lookup, drafters.py) and their structures (suffix.py): each structure,
and prompt lookup's n-gram match, agrees with brute-force substring search on random small token strings
(hypothesis), the draft trees are well-formed tries, and greedy decoding with each drafter on the shipped weights
equals plain decoding. The datastores are built here from a synthetic token stream or the prompts' own tokens:
nothing needs `train.py data` to have run. SAM-Decoding with EAGLE-2 (SamdDrafter): its choice between the
automata and the auxiliary drafter, greedy identity with the shipped EAGLE head, and the sampled law with a power
check."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import table
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drafters import PromptLookupDrafter
from methods import UsageError
from retrieval import RestDrafter, SamdDrafter, SamDrafter, SuffixDrafter, build_datastore, frequency_tree
from specdec import tree_speculative_generate
from suffix import FrozenAutomaton, SuffixAutomaton, SuffixTrie, sa_longest_match, sa_range, sam_step, suffix_array
from tests.test_tree_decoding import first_child_always, sample_tree_decoding, toy_eagle_drafter, toy_target
from tests.toy import BrokenRule, chi_square, chi_square_critical, exact_joint
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


@settings(max_examples=300, deadline=None)
@given(texts, st.integers(1, 4), st.integers(1, 4), st.integers(0, 5), st.integers(0, 3))
def test_prompt_lookup_copies_what_followed_the_latest_matches_of_the_longest_ngram(
    context, ngram_max, ngram_min, length, count
):
    ngram_min = min(ngram_min, ngram_max)
    expected = []
    for n in range(ngram_max, ngram_min - 1, -1):  # earlier matches: each followed by a token
        starts = occurrences(context[:-1], context[-n:])[::-1][:count]
        if starts and length:
            expected = [context[s + n : s + n + length] for s in starts]
            break
    found = PromptLookupDrafter(ngram_max, ngram_min).continuations(context, length, count)
    assert found == expected


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
    np.array(list(range(50)) * 4, dtype=np.uint16).tofile(tmp_path / "train.bin")
    build_datastore(tmp_path)
    assert "suffix array" in capsys.readouterr().out
    rest, sam = RestDrafter.load(tmp_path), SamDrafter.load(tmp_path)
    for drafter in (rest, sam):
        drafter.reset()
        tree = drafter.propose_tree([7, 8, 9], torch.zeros(0), lambda x: x, None)
        assert tree.tokens[:2] == [9, 10]


# ---- SAM-Decoding with an auxiliary drafter (SamdDrafter) --------------------------------------------------------


def follows_an_occurrence(source: list[int], suffix: list[int], found: list[int], length: int) -> bool:
    """Brute force: `found` is what followed some occurrence of `suffix` in `source`, `length` tokens or up to the
    end of the source (nothing, for an occurrence at its very end)."""
    return any(source[s + len(suffix) : s + len(suffix) + length] == found for s in occurrences(source, suffix))


@settings(max_examples=150, deadline=None)
@given(texts, st.lists(st.integers(0, 3), min_size=1, max_size=30), st.integers(0, 4))
def test_retrieval_takes_the_longer_match_with_the_static_one_shortened_by_the_bias(store, context, bias):
    sam = SuffixAutomaton()
    for token in store:
        sam.extend(token)
    drafter = SamDrafter(FrozenAutomaton.freeze(sam), depth=3, size=3)
    for n in range(1, len(context) + 1):  # a growing context, as the loop feeds it
        now = context[:n]
        length, found = drafter.retrieve(now, bias)
        dynamic = longest_suffix_in(now[:-1], now, n)  # occurred earlier in the request
        static = longest_suffix_in(store, now, n)
        assert length == (dynamic if dynamic >= static - bias else static - bias)
        if length <= 0:
            assert found == []
        elif dynamic >= static - bias:  # ties go to the request's own text
            assert found and follows_an_occurrence(now, now[n - dynamic :], found, 3)  # an earlier one: it goes on
        else:
            assert follows_an_occurrence(store, now[n - static :], found, 3)


class StubAux:
    """An auxiliary tree drafter that drafts the root alone and counts its calls."""

    def __init__(self):
        self.calls = 0

    def reset(self):
        pass

    def propose_tree(self, context, features, warp, generator, keep=None):
        self.calls += 1
        return Tree.from_root(context[-1])


@pytest.mark.parametrize("threshold", [1, 2, 3, 5])
@pytest.mark.parametrize("bias", [0, 2])
def test_samd_drafts_the_automata_chain_exactly_when_the_match_reaches_the_threshold(threshold, bias):
    store = [5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6] * 2
    sam = SuffixAutomaton()
    for token in store:
        sam.extend(token)
    context = [1, 2, 3, 7, 8, 9, 1, 2, 3, 4, 0, 1, 2]
    samd = SamdDrafter(SamDrafter(FrozenAutomaton.freeze(sam), depth=4, size=4), StubAux(), threshold, bias)
    alone = SamDrafter(FrozenAutomaton.freeze(sam), depth=4, size=4)  # the same matches, seen from outside
    samd.reset()
    alone.reset()
    for n in range(1, len(context) + 1):
        calls = samd.aux.calls
        tree = samd.propose_tree(context[:n], torch.zeros(0), lambda x: x, None)
        length, found = alone.retrieve(context[:n], bias)
        if length >= threshold and found:
            assert tree.tokens == context[n - 1 : n] + found and tree.parents == list(range(-1, len(found)))
            assert samd.aux.calls == calls
        else:
            assert samd.aux.calls == calls + 1 and len(tree) == 1
    assert 0 < samd.retrieved < len(context)  # both kinds of draft happened


@pytest.fixture(scope="module")
def samd_data(short_references, tmp_path_factory):
    """A data folder whose automaton is built from the prompts' own token stream: long matches to retrieve."""
    enc, target, refs = short_references
    folder = tmp_path_factory.mktemp("samd")
    stream = [t for prompt, out in refs for t in prompt + out + [enc.eot_token]]
    np.array(stream, dtype=np.uint16).tofile(folder / "train.bin")
    build_datastore(folder)
    return folder


def test_greedy_decoding_with_samd_equals_autoregressive_and_uses_both_drafters(short_references, samd_data):
    """-d samd as the command line builds it: the shipped EAGLE head and an automaton of the prompts' own text."""
    enc, target, refs = short_references
    drafter = table.drafter("samd", target, data_dir=samd_data)
    calls = 0
    for i, (prompt, expected) in enumerate(refs):
        out, stats = tree_speculative_generate(target, drafter, prompt, 24, temperature=0, eot=enc.eot_token)
        assert out == expected, f"prompt {i}"
        assert sum(stats.accept_counts) == stats.target_calls and stats.produced == len(out)
        calls += stats.target_calls
    assert 0 < drafter.retrieved < calls  # the automata drafted some calls, EAGLE-2 the others


def test_samd_without_its_head_or_its_automaton_is_a_usage_error(short_references, samd_data, tmp_path):
    enc, target, refs = short_references
    with pytest.raises(UsageError, match="train.bin: python train.py eagle .* python train.py datastore"):
        table.drafter("samd", target, data_dir=tmp_path)
    with pytest.raises(UsageError, match="eagle/model.safetensors: python train.py eagle"):
        table.drafter("samd", target, data_dir=samd_data, weights=tmp_path)


# The sampled law on the toy target (V = 6): EAGLE-2's trees from a random head where the automata's match is short,
# their chains where it is at least 2 tokens; both happen on this prompt.
SAMD_STORE, SAMD_PROMPT = [1, 4, 1, 5, 0, 2, 3, 1, 4, 1, 2, 2, 0, 3, 3, 1], [1, 2, 3]
N_SAMD, N_SAMD_BROKEN = 5_000, 500
WARPED = dict(temperature=0.8, top_k=4, top_p=0.9)


def toy_samd():
    sam = SuffixAutomaton()
    for token in SAMD_STORE:
        sam.extend(token)
    static = SamDrafter(FrozenAutomaton.freeze(sam), depth=2, size=4)
    return SamdDrafter(static, toy_eagle_drafter(), threshold=2, bias=0)


def samd_chi_square(n_samples: int, **opts):
    samples, accept_counts = sample_tree_decoding(toy_samd, SAMD_PROMPT, n_samples, **WARPED, **opts)
    stat, dof = chi_square(samples, exact_joint(toy_target(), SAMD_PROMPT, 3, **WARPED))
    return stat, chi_square_critical(dof), dof, accept_counts


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_samd_sampling_reproduces_the_target_distribution():
    stat, critical, dof, accept_counts = samd_chi_square(N_SAMD)
    print(f"samd sampling: chi2 {stat:.1f} < {critical:.1f} (dof {dof}); accepted per call {accept_counts}")
    assert stat < critical, f"chi2 = {stat:.1f} >= {critical:.1f} (dof {dof})"
    assert (accept_counts > 0).all()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_law_test_with_samd_rejects_a_verifier_that_accepts_every_first_child():
    stat, critical, dof, _ = samd_chi_square(N_SAMD_BROKEN, verifier=BrokenRule(tree_fn=first_child_always))
    print(f"first child always: chi2 {stat:.1f} > {critical:.1f} (dof {dof})")
    assert stat > critical, f"a broken verifier passed: chi2 = {stat:.1f} <= {critical:.1f} (dof {dof})"
