"""Byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant), trained from scratch, used through tiktoken.

The file format is tiktoken's own: one `base64(token bytes) rank` line per token, ranks 0..255 being the single
bytes. `<|endoftext|>` is the one special token, numbered right after the last rank.
"""

import base64
import heapq
import re
from collections import Counter
from pathlib import Path

import tiktoken

EOT = "<|endoftext|>"
# GPT-4's (cl100k) split pattern, less one thing: punctuation does not swallow the newlines after it. With
# "):\n" a single token, a prompt ending in "):" would stop at a token boundary the model never saw in training.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# The same pattern for Python's `re` (no \p{..}): a letter is [^\W\d_], a number \d, and `_` is neither.
# Only the trainer uses it; a rare mismatch with tiktoken's split costs a little compression, never correctness.
TRAIN_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|(?:[^\r\n\w]|_)?+[^\W\d_]++|\d{1,3}+| ?(?:[^\s\w]|_)++"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)


def load_tokenizer(path: str | Path) -> tiktoken.Encoding:
    ranks = {}
    for line in Path(path).read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name=Path(path).stem, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)}
    )


def save_ranks(ranks: dict[bytes, int], path: str | Path) -> None:
    lines = (
        f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    )
    Path(path).write_text("\n".join(lines) + "\n")


def count_pretokens(texts) -> Counter:
    """Frequency of every pre-token (split chunk) in the corpus: BPE never merges across chunks."""
    split = re.compile(TRAIN_SPLIT_PATTERN)
    counts = Counter()
    for text in texts:
        counts.update(split.findall(text))
    return counts


def train_bpe(texts, vocab_size: int) -> dict[bytes, int]:
    """Byte-level BPE ranks for `texts`, with `vocab_size` entries once <|endoftext|> is added."""
    return learn_merges(count_pretokens(texts), vocab_size)


def learn_merges(pretoken_counts: Counter, vocab_size: int) -> dict[bytes, int]:
    """Merge the most frequent adjacent pair until the vocabulary is full.

    Pair counts are kept incrementally over the distinct pre-tokens: a merge only revisits the words containing
    the merged pair, and a max-heap with lazy deletion finds the next best pair (ties: the smallest pair ids).
    """
    words = [list(w.encode("utf-8")) for w in pretoken_counts]
    freqs = list(pretoken_counts.values())
    vocab = [bytes([b]) for b in range(256)]
    ids = {tok: i for i, tok in enumerate(vocab)}
    pair_count, where = Counter(), {}
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_count[pair] += f
            where.setdefault(pair, set()).add(w)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size - 1 and heap:  # - 1: room for <|endoftext|>
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg or neg == 0:
            continue  # stale heap entry
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged not in ids:  # two merge paths can spell the same bytes; tiktoken needs unique tokens
            ids[merged] = len(vocab)
            vocab.append(merged)
        new = ids[merged]
        for w in list(where[pair]):
            old_pairs = Counter(zip(words[w], words[w][1:]))
            words[w] = merge_pair(words[w], pair, new)
            new_pairs = Counter(zip(words[w], words[w][1:]))
            for p in old_pairs | new_pairs:
                delta = (new_pairs[p] - old_pairs[p]) * freqs[w]
                if delta:
                    pair_count[p] += delta
                    heapq.heappush(heap, (-pair_count[p], p))
                if new_pairs[p]:
                    where.setdefault(p, set()).add(w)
                elif p in where:
                    where[p].discard(w)
    return {tok: i for i, tok in enumerate(vocab)}


def merge_pair(word: list[int], pair: tuple[int, int], new: int) -> list[int]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out
