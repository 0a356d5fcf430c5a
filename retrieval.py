"""Retrieval drafters: no model, the draft is text that followed the context's suffix somewhere else (survey §5.1,
tuning-free drafting; §6.3 token trees). The structures are in suffix.py.

    RestDrafter      REST (He et al. 2023): suffix array over the training split, frequency trie of continuations
    SuffixDrafter    SuffixDecoding (Oliaro et al. 2024): suffix tries over this request and all earlier outputs
    SamDrafter       SAM Decoding (Hu et al. 2024): static automaton over the datastore, dynamic over the request
    SamdDrafter      SAM Decoding with an auxiliary drafter (EAGLE-2) where the automata's match is short

The first three are deterministic (tree.q is None): at temperature > 0 they are matched against the
target's own draws (verify.SampleMatch), lossless for every fixed tree; SamdDrafter's retrieved chains are too.
REST's own sampled mode, exact match of independently sampled paths, is not distribution preserving and is not
implemented (docs/pitfalls.md: Retrieval and mask-predict drafters are deterministic).

Datastore files, built by `python train.py datastore` from data/train.bin (uint16 token ids):
    data/datastore.npy   int32 suffix array of train.bin, sorted by the first SA_WIDTH tokens
    data/sam.npz         FrozenAutomaton of the first SAM_TOKENS tokens of train.bin
"""

import heapq
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from drafters import KeepGrowing, Warp, always
from suffix import FrozenAutomaton, SuffixAutomaton, SuffixTrie, sa_longest_match, sam_step, suffix_array
from tree import Tree, subtree, top_m_nodes

SA_WIDTH = 16  # the longest context suffix REST looks up; the suffix array is sorted this deep
SAM_TOKENS = 2_000_000  # the static automaton covers this much of train.bin (Python dicts: 1.9 GB peak while building)


def build_datastore(data_dir: Path, sam_tokens: int = SAM_TOKENS) -> None:
    """train.py datastore: the suffix array (REST) and the static suffix automaton (SAM Decoding) of train.bin."""
    tokens = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    t0 = time.time()
    np.save(data_dir / "datastore.npy", suffix_array(tokens, SA_WIDTH))
    print(
        f"suffix array: {len(tokens) / 1e6:.2f}M tokens, {(data_dir / 'datastore.npy').stat().st_size / 1e6:.0f} MB "
        f"(+ {tokens.nbytes / 1e6:.0f} MB of tokens), {time.time() - t0:.1f}s"
    )
    t0, sam = time.time(), SuffixAutomaton()
    for token in tokens[:sam_tokens].tolist():
        sam.extend(token)
    FrozenAutomaton.freeze(sam).save(data_dir / "sam.npz")
    print(
        f"suffix automaton: first {min(sam_tokens, len(tokens)) / 1e6:.2f}M tokens, {len(sam.length) / 1e6:.2f}M "
        f"states, {(data_dir / 'sam.npz').stat().st_size / 1e6:.0f} MB, {time.time() - t0:.1f}s"
    )


def frequency_tree(root: int, continuations: Counter, size: int) -> Tree:
    """The trie of `continuations` (token tuple -> times seen), each node scored by the log of the fraction of them
    that pass through it; the `size` most frequent nodes are kept (REST, He et al. 2023; survey §6.3). A child is
    never more frequent than its parent, so the kept nodes are ancestor-closed."""
    tree, node_of, count = Tree.from_root(root), {}, [sum(continuations.values())]
    for seq, times in continuations.items():
        node = 0
        for token in seq:
            if (node, token) not in node_of:
                node_of[(node, token)] = tree.add(node, token, 0.0)
                count.append(0)
            node = node_of[(node, token)]
            count[node] += times
    tree.scores = [math.log(c / max(1, count[0])) if c else 0.0 for c in count]
    return subtree(tree, top_m_nodes(tree, size))


class RestDrafter:
    """REST (He et al. 2023; survey §5.1, §6.3): look up the longest context suffix in a suffix array of a corpus,
    count what followed its first `occurrences` matches, and draft the most frequent continuations as a trie."""

    def __init__(
        self,
        tokens: np.ndarray,
        sa: np.ndarray,
        depth: int = 6,
        size: int = 12,
        max_match: int = SA_WIDTH,
        occurrences: int = 500,
    ):
        self.tokens, self.sa = tokens, sa  # [n] uint16, [n] int32
        self.depth, self.size, self.max_match, self.occurrences = depth, size, max_match, occurrences

    @classmethod
    def load(cls, data_dir: Path, **kw) -> "RestDrafter":
        tokens = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
        return cls(tokens, np.load(data_dir / "datastore.npy"), **kw)

    def reset(self) -> None:
        pass

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree:
        length, lo, hi = sa_longest_match(self.tokens, self.sa, context, self.max_match)
        if length == 0:
            return Tree.from_root(context[-1])
        starts = self.sa[lo : min(hi, lo + self.occurrences)].astype(np.int64) + length  # REST caps the matches read
        found = Counter(tuple(self.tokens[s : s + self.depth].tolist()) for s in starts)
        return frequency_tree(context[-1], found, self.size)


class SuffixDrafter:
    """SuffixDecoding (Oliaro et al. 2024; survey §5.1, §6.3): suffix tries over this request (prompt and output so
    far) and over every earlier output of this drafter; the match's most frequent continuations form a tree of at
    most alpha x match length nodes (the paper's MAX_SPEC), and the better-scoring of the two trees is drafted."""

    learns_across_generations = True  # the history: a second run of a prompt finds the first's output

    def __init__(self, depth: int = 6, size: int = 12, alpha: float = 2.0, max_match: int = 16):
        self.depth, self.size, self.alpha, self.max_match = depth, size, alpha, max_match
        self.history = SuffixTrie(max_match + depth)  # earlier outputs: kept across reset(), so it learns
        self.current = SuffixTrie(max_match + depth)
        self.seen, self.prompt_len, self.output = 0, None, []  # as reset() leaves them

    def reset(self) -> None:
        # The previous request's output joins the history (its last step's tokens, never drafted from, are lost).
        if self.output:
            self.history.start_document()
            for token in self.output:
                self.history.append(token)
        self.current, self.seen, self.prompt_len, self.output = SuffixTrie(self.max_match + self.depth), 0, None, []

    def speculate(self, trie: SuffixTrie, context: list[int]) -> tuple[float, Tree]:
        """Best-first by frequency from the match node: (the paper's tree score, sum of node frequencies; the tree)."""
        length, match = trie.longest_match(context, self.max_match)
        tree, budget, score = Tree.from_root(context[-1]), min(self.size, int(self.alpha * length)), 0.0
        total = max(1, sum(trie.count[c] for c in trie.children[match].values())) if length else 1
        heap = [(-trie.count[c], 1, 0, t, c) for t, c in trie.children[match].items()] if length else []
        heapq.heapify(heap)  # (-count, depth, parent in tree, token, trie node): most frequent first
        while heap and len(tree) <= budget:
            neg, d, parent, token, node = heapq.heappop(heap)
            index = tree.add(parent, token, math.log(-neg / total))
            score += -neg / total
            if d < self.depth:
                for t, c in trie.children[node].items():
                    heapq.heappush(heap, (-trie.count[c], d + 1, index, t, c))
        return score, tree

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree:
        if self.prompt_len is None:
            self.prompt_len = len(context)
        for token in context[self.seen :]:  # accepted tokens only: context never contains a rejected draft
            self.current.append(token)
        self.seen, self.output = len(context), context[self.prompt_len :]
        return max(
            self.speculate(self.current, context), self.speculate(self.history, context), key=lambda scored: scored[0]
        )[1]


class SamDrafter:
    """SAM Decoding (Hu et al. 2024; survey §5.1): a static suffix automaton over the datastore and a dynamic one
    over this request, each matched against the context one token at a time (amortised O(1)); the continuation
    of the longer match is drafted as a chain (a one-branch tree)."""

    def __init__(self, static: FrozenAutomaton | SuffixAutomaton, depth: int = 6, size: int = 12):
        self.static, self.length = static, min(depth, size)  # a chain: depth and node budget both bound it
        self.reset()

    @classmethod
    def load(cls, data_dir: Path, **kw) -> "SamDrafter":
        return cls(FrozenAutomaton.load(data_dir / "sam.npz"), **kw)

    def reset(self) -> None:
        self.dynamic, self.seen = SuffixAutomaton(), 0
        self.s_state, self.s_len, self.d_state, self.d_len = 0, 0, 0, 0  # (state, match length) in each

    def feed(self, token: int) -> None:
        self.s_state, self.s_len = sam_step(self.static, self.s_state, self.s_len, token)
        # Match against the text before this token, then add it: the match then always has a continuation.
        self.d_state, self.d_len = sam_step(self.dynamic, self.d_state, self.d_len, token)
        self.dynamic.extend(token)
        if self.d_state and self.d_len <= self.dynamic.length[self.dynamic.link[self.d_state]]:
            self.d_state = self.dynamic.link[self.d_state]  # the extension cloned our state: the clone holds our match

    def retrieve(self, context: list[int], static_bias: int = 0) -> tuple[int, list[int]]:
        """(match length, what followed the match): the longer of the two automata's matches, the static one's
        shortened by static_bias first (SAM-Decoding's l_bias, which trusts the corpus less than the request);
        ties go to the request's own text. Feeds the automata the context they have not seen."""
        for token in context[self.seen :]:
            self.feed(token)
        self.seen = len(context)
        if self.d_len >= self.s_len - static_bias:
            length, end, text = self.d_len, self.dynamic.end[self.d_state], self.dynamic.tokens
        else:
            length, end, text = self.s_len - static_bias, int(self.static.end[self.s_state]), self.static.tokens
        return length, ([int(t) for t in text[end + 1 : end + 1 + self.length]] if length > 0 else [])

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree:
        return chain(context[-1], self.retrieve(context)[1])


def chain(root: int, tokens: list[int]) -> Tree:
    """A one-branch tree: root, tokens[0], tokens[1], ..."""
    tree = Tree.from_root(root)
    for token in tokens:
        tree.add(len(tree) - 1, token, 0.0)
    return tree


class SamdDrafter:
    """SAM-Decoding with an auxiliary drafter (Hu et al. 2024; survey §5.1, §6.3), SAMD[EAGLE2] with EAGLE-2's tree:
    when the automata's match is at least `threshold` tokens long (the static automaton's shortened by `bias`),
    its continuation is drafted as a chain; otherwise the auxiliary drafter drafts its tree. The paper's adaptive
    draft selection, with its release's defaults (threshold 5, bias 5). Paper: 2.49x on Spec-Bench (Vicuna-7B,
    A6000; EAGLE-2 alone 2.38x there); Spec-Bench's leaderboard: 2.38x. A retrieved chain is deterministic
    (q None, one-hot); the auxiliary tree is what that drafter drafts, so the pair is as lossless as each part."""

    def __init__(self, sam: SamDrafter, aux, threshold: int = 5, bias: int = 5):
        self.sam, self.aux, self.threshold, self.bias = sam, aux, threshold, bias
        self.retrieved = 0  # trees drafted by retrieval, over the drafter's life (the rest are aux's)

    def reset(self) -> None:
        self.sam.reset()
        self.aux.reset()

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree:
        length, found = self.sam.retrieve(context, self.bias)  # the automata see every token, drafted from or not
        if length >= self.threshold and found:
            self.retrieved += 1
            return chain(context[-1], found)
        return self.aux.propose_tree(context, features, warp, generator, keep)
