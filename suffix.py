"""Suffix structures for the retrieval drafters of retrieval.py (survey §5.1, tuning-free drafting): a suffix array
(REST), a depth-limited suffix trie with counts (SuffixDecoding) and a suffix automaton (SAM Decoding).

Texts are token ids. Every structure answers the same question: the longest suffix of a query that occurs in the
text, and what followed its occurrences. tests/test_retrieval.py checks each against brute-force substring search.
"""

import bisect
from pathlib import Path

import numpy as np

# ---- suffix array (REST, He et al. 2023) -----------------------------------------------------------------------


def suffix_array(tokens: np.ndarray, width: int | None = None) -> np.ndarray:
    """Suffix start positions in lexicographic order, by prefix doubling (Manber & Myers 1990) with numpy sorts.
    With `width`, stop once suffixes are sorted by their first `width` tokens (ties in any order): every lookup of
    up to `width` tokens, all REST does, is then exact, and a 9M-token stream needs 4 sorts instead of ~12."""
    n = len(tokens)
    rank = tokens.astype(np.int64)  # rank[i]: order of suffix i by its first k tokens
    sa, k = np.argsort(rank, kind="stable"), 1
    while n > 1 and (width is None or k < width):
        second = np.full(n, -1, dtype=np.int64)  # -1: the suffix ends first, so it sorts first
        second[: n - k] = rank[k:]
        sa = np.lexsort((second, rank))  # by (first k tokens, next k tokens) = first 2k tokens
        r, s = rank[sa], second[sa]
        bumps = np.concatenate([[0], np.cumsum((r[1:] != r[:-1]) | (s[1:] != s[:-1]))])
        rank = np.empty(n, dtype=np.int64)
        rank[sa] = bumps
        if bumps[-1] == n - 1:  # all distinct: fully sorted
            break
        k *= 2
    return sa.astype(np.int32)


def sa_range(tokens: np.ndarray, sa: np.ndarray, pattern: list[int]) -> tuple[int, int]:
    """[lo, hi): the rows of `sa` whose suffix starts with `pattern` (two binary searches, O(m log n))."""
    m = len(pattern)

    def head(s) -> list[int]:  # list comparison is lexicographic, a shorter list first: the suffix order
        return tokens[s : s + m].tolist()

    return bisect.bisect_left(sa, pattern, key=head), bisect.bisect_right(sa, pattern, key=head)


def sa_longest_match(tokens: np.ndarray, sa: np.ndarray, query: list[int], max_len: int) -> tuple[int, int, int]:
    """(L, lo, hi): the longest suffix of `query`, at most max_len tokens, that occurs in `tokens`, and its rows.
    A suffix that occurs has shorter suffixes that occur, so L is binary searched (REST tries lengths in turn)."""
    best, lo_len, hi_len = (0, 0, len(sa)), 1, min(max_len, len(query))
    while lo_len <= hi_len:
        mid = (lo_len + hi_len) // 2
        lo, hi = sa_range(tokens, sa, query[-mid:])
        if hi > lo:
            best, lo_len = (mid, lo, hi), mid + 1
        else:
            hi_len = mid - 1
    return best


# ---- suffix trie with counts (SuffixDecoding, Oliaro et al. 2024) ----------------------------------------------


class SuffixTrie:
    """Every substring of at most `depth` tokens of the documents added, with its number of occurrences: the paper's
    suffix tree, uncompressed and cut at `depth` (SuffixDecoding, Oliaro et al. 2024). Appending a token costs
    O(depth); the paper's Ukkonen tree costs amortised O(1) but is far longer to read."""

    def __init__(self, depth: int):
        self.depth = depth
        self.children: list[dict[int, int]] = [{}]  # node -> {token: child node}; node 0 is the root
        self.count: list[int] = [0]  # occurrences of the node's string (the root: tokens seen)
        self.active = [0]  # nodes of the current document's last suffixes, by length 0..depth-1

    def start_document(self) -> None:
        """Substrings never span two documents (requests)."""
        self.active = [0]

    def append(self, token: int) -> None:
        self.count[0] += 1
        grown = [0]
        for node in self.active:  # every kept suffix of the document grows by `token`
            child = self.children[node].get(token)
            if child is None:
                child = self.children[node][token] = len(self.count)
                self.children.append({})
                self.count.append(0)
            self.count[child] += 1
            grown.append(child)
        self.active = grown[: self.depth]  # a node at depth `depth` cannot grow further

    def find(self, pattern: list[int]) -> int | None:
        node = 0
        for token in pattern:
            node = self.children[node].get(token)
            if node is None:
                return None
        return node

    def longest_match(self, query: list[int], max_len: int) -> tuple[int, int]:
        """(L, node): the longest suffix of `query` (at most max_len) that occurs followed by some token, so there is
        something to draft. Monotone in L like any suffix match, so binary searched."""
        best, lo, hi = (0, 0), 1, min(max_len, self.depth - 1, len(query))
        while lo <= hi:
            mid = (lo + hi) // 2
            node = self.find(query[-mid:])
            if node is not None and self.children[node]:
                best, lo = (mid, node), mid + 1
            else:
                hi = mid - 1
        return best


# ---- suffix automaton (SAM Decoding, Hu et al. 2024) -----------------------------------------------------------


class SuffixAutomaton:
    """The smallest automaton accepting every substring of `tokens` (Blumer et al. 1985), built online in amortised
    O(1) per token (SAM Decoding, Hu et al. 2024). A state is a class of substrings with the same end positions;
    end[state] is the first end position, so tokens[end + 1:] is what followed an occurrence."""

    def __init__(self):
        self.next: list[dict[int, int]] = [{}]
        self.link, self.length, self.end = [-1], [0], [-1]  # suffix link, longest string, first end position
        self.last, self.tokens = 0, []

    def _state(self, length: int, end: int, link: int = -1, nxt: dict | None = None) -> int:
        self.next.append(nxt or {})
        self.link.append(link)
        self.length.append(length)
        self.end.append(end)
        return len(self.length) - 1

    def goto(self, state: int, token: int) -> int:
        return self.next[state].get(token, -1)

    def extend(self, token: int) -> None:
        """The textbook construction: new state, walk suffix links adding transitions, clone on a length gap."""
        self.tokens.append(token)
        cur, p = self._state(self.length[self.last] + 1, len(self.tokens) - 1), self.last
        while p != -1 and token not in self.next[p]:
            self.next[p][token] = cur
            p = self.link[p]
        if p == -1:
            self.link[cur] = 0
        else:
            q = self.next[p][token]
            if self.length[p] + 1 == self.length[q]:
                self.link[cur] = q
            else:
                clone = self._state(self.length[p] + 1, self.end[q], self.link[q], dict(self.next[q]))
                while p != -1 and self.next[p].get(token) == q:
                    self.next[p][token] = clone
                    p = self.link[p]
                self.link[q] = self.link[cur] = clone
        self.last = cur


class FrozenAutomaton:
    """A SuffixAutomaton as flat arrays, for the static datastore: transitions are sorted keys state * 65536 + token
    found by binary search (12 bytes each instead of a dict entry's ~100), saved and loaded with numpy."""

    def __init__(
        self,
        keys: np.ndarray,
        targets: np.ndarray,
        link: np.ndarray,
        length: np.ndarray,
        end: np.ndarray,
        tokens: np.ndarray,
    ):
        self.keys, self.targets = keys, targets  # [transitions] int64 sorted, int32
        self.link, self.length, self.end, self.tokens = link, length, end, tokens  # [states] int32; [n] uint16

    @classmethod
    def freeze(cls, sam: SuffixAutomaton) -> "FrozenAutomaton":
        pairs = sorted((s * 65536 + t, n) for s, d in enumerate(sam.next) for t, n in d.items())
        keys = np.array([k for k, _ in pairs], dtype=np.int64)
        targets = np.array([n for _, n in pairs], dtype=np.int32)
        return cls(
            keys,
            targets,
            np.array(sam.link, np.int32),
            np.array(sam.length, np.int32),
            np.array(sam.end, np.int32),
            np.array(sam.tokens, np.uint16),
        )

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            keys=self.keys,
            targets=self.targets,
            link=self.link,
            length=self.length,
            end=self.end,
            tokens=self.tokens,
        )

    @classmethod
    def load(cls, path: str | Path) -> "FrozenAutomaton":
        z = np.load(path)
        return cls(z["keys"], z["targets"], z["link"], z["length"], z["end"], z["tokens"])

    def goto(self, state: int, token: int) -> int:
        key = state * 65536 + token
        i = int(np.searchsorted(self.keys, key))
        return int(self.targets[i]) if i < len(self.keys) and self.keys[i] == key else -1


def sam_step(sam: SuffixAutomaton | FrozenAutomaton, state: int, length: int, token: int) -> tuple[int, int]:
    """Longest-suffix matching: (state, L) of the query's longest suffix in the text, advanced by one query token.
    Follows suffix links until `token` can be read: amortised O(1) per token, as SAM Decoding relies on."""
    while state != 0 and sam.goto(state, token) == -1:
        state = int(sam.link[state])
        length = int(sam.length[state])
    nxt = sam.goto(state, token)
    return (nxt, length + 1) if nxt != -1 else (0, 0)
