"""Byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant), trained from scratch, used through tiktoken.

The file format is tiktoken's own: one `base64(token bytes) rank` line per token, ranks 0..255 being the single
bytes. `<|endoftext|>` is the one special token, numbered right after the last rank.

A pretrained model's byte-level BPE (a Hugging Face tokenizer.json, a GGUF's token list) is run through tiktoken too:
encoding_from_bpe makes each token's id its rank.
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


# GPT-2's split (Radford et al. 2019), what Hugging Face's ByteLevel pre-tokenizer applies with use_regex=True.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits=True) then ByteLevel (SmolLM's tokenizer.json; llama.cpp's "smollm" pre-tokenizer) as
# one regex: every number character alone, then GPT-2's split on the text between them. A run of spaces before a
# digit ends where that text ends, so it stays whole: (?![^\s\p{N}]) is (?!\S) with a digit counted as an end.
DIGITS_SPLIT_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


def load_tokenizer(path: str | Path) -> tiktoken.Encoding:
    ranks = {}
    for line in Path(path).read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name=Path(path).stem, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)}
    )


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (bytes_to_unicode), inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return {c: b for b, c in chars.items()}


class ByteLevelEncoding(tiktoken.Encoding):
    """A tiktoken Encoding whose vocabulary may lack some single bytes (SmolLM's has no 0x04, no 0xF1, ...).

    tiktoken needs every byte to have a rank, so those bytes get ranks from `n_ids` on, and encoding drops them
    from its output: what llama.cpp does with a byte it has no token for (the pieces on either side of it never
    merge across it; a Hugging Face BPE drops the byte before merging, so they can). n_vocab is `n_ids`.
    """

    def __init__(self, *, n_ids: int, **kwargs):
        super().__init__(**kwargs)
        self.n_ids = n_ids
        self.max_token_value = n_ids - 1

    def encode_ordinary(self, text: str) -> list[int]:
        return [t for t in super().encode_ordinary(text) if t < self.n_ids]

    def encode(self, text: str, **kwargs) -> list[int]:
        return [t for t in super().encode(text, **kwargs) if t < self.n_ids]

    def encode_ordinary_batch(self, text: list[str], **kwargs) -> list[list[int]]:
        return [[t for t in ids if t < self.n_ids] for ids in super().encode_ordinary_batch(text, **kwargs)]

    def encode_batch(self, text: list[str], **kwargs) -> list[list[int]]:
        return [[t for t in ids if t < self.n_ids] for ids in super().encode_batch(text, **kwargs)]


def encoding_from_bpe(
    name: str, vocab: dict[str, int], merges: list[tuple[str, str]], specials: dict[str, int], pattern: str
) -> tiktoken.Encoding:
    """A byte-level BPE (tokens spelt in GPT-2's byte alphabet, id = position) as a tiktoken Encoding, rank = id.

    tiktoken merges the adjacent pair whose merged bytes have the lowest rank; a Hugging Face BPE, the pair that
    comes first in `merges`. The two agree when every merge makes a token of a higher id than the merge before
    it, as a trained BPE numbers them; refused otherwise. `specials` (text -> id) are matched whole in encode
    with allowed_special, never by encode_ordinary.
    """
    alphabet = byte_level_alphabet()
    ranks = {}
    for token, i in vocab.items():
        if token in specials:
            continue
        if not set(token) <= alphabet.keys():
            raise ValueError(f"token {i} ({token!r}) is not spelt in the byte-level alphabet")
        ranks[bytes(alphabet[c] for c in token)] = i
    made = [vocab.get(a + b) for a, b in merges]
    if None in made:
        raise ValueError(f"merge {made.index(None)} ({' '.join(merges[made.index(None)])}) makes no token")
    if any(x >= y for x, y in zip(made, made[1:])):
        raise ValueError("the tokens' ids are not in merge order, so tiktoken would merge differently")
    n_ids = max([*ranks.values(), *specials.values()]) + 1
    lacking = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    ranks |= {token: n_ids + i for i, token in enumerate(lacking)}
    return ByteLevelEncoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials, n_ids=n_ids)


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
