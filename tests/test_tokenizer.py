"""The shipped byte-level BPE tokenizer through tiktoken, and the trainer against a naive BPE trainer."""

import re
import string
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tokenizer import (
    EOT,
    GPT2_SPLIT_PATTERN,
    TRAIN_SPLIT_PATTERN,
    byte_level_alphabet,
    count_pretokens,
    encoding_from_bpe,
    learn_merges,
    load_tokenizer,
    save_ranks,
    train_bpe,
)

TOKENIZER = Path(__file__).resolve().parent.parent / "weights" / "tokenizer.tiktoken"


@pytest.fixture(scope="module")
def enc():
    if not TOKENIZER.exists():
        pytest.skip(f"{TOKENIZER} not shipped")
    return load_tokenizer(TOKENIZER)


# ------------------------------------------------------------------------------------------ shipped tokenizer

CODE_ALPHABET = string.printable + "éß日本語👍\u00a0\u2028"


@settings(max_examples=200, deadline=None)
@given(text=st.text() | st.text(alphabet=CODE_ALPHABET))
@example(text="")
@example(text="def f(x):\n    return {'a': [x, 1.5e-3]}  # done\r\n\n\n\t\t}")
@example(text="naïve café, 日本語のテキスト, emoji 👍🏽 and Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̗̻̊")
@example(text="   trailing spaces   \n\n   ")
@example(text="<|endoftext|>")
def test_decoding_the_ordinary_encoding_gives_back_the_text(enc, text):
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_the_vocabulary_has_4096_ids_with_endoftext_last(enc):
    assert enc.n_vocab == 4096
    assert enc.eot_token == 4095 == enc.n_vocab - 1
    assert enc.encode_single_token(EOT) == 4095
    assert enc.encode(EOT, allowed_special="all") == [4095]
    assert enc.decode([4095]) == EOT


def test_the_shipped_ranks_are_the_256_bytes_then_contiguous_unique_merges(enc):
    ranks = enc._mergeable_ranks
    assert sorted(ranks.values()) == list(range(4095))
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert all(len(token) > 1 for token, rank in ranks.items() if rank >= 256)


def test_endoftext_in_plain_text_is_refused_by_encode_and_ordinary_for_encode_ordinary(enc):
    text = "the end.<|endoftext|>The start"
    with pytest.raises(ValueError):
        enc.encode(text)
    ids = enc.encode_ordinary(text)
    assert 4095 not in ids
    assert enc.decode(ids) == text
    assert enc.encode(text, allowed_special="all").count(4095) == 1


# -------------------------------------------------------------------------------------------------- pretrained BPE


def tiny_bpe(drop: str = ""):
    """A byte-level vocabulary spelt as in a tokenizer.json: the 256 byte characters (less `drop`), three merges,
    one special token."""
    chars = [c for c in sorted(byte_level_alphabet(), key=byte_level_alphabet().get) if c not in drop]
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return vocab, merges, {"<|end|>": len(vocab)}


def test_a_byte_level_bpe_runs_through_tiktoken_with_its_own_ids():
    vocab, merges, specials = tiny_bpe()
    enc = encoding_from_bpe("tiny", vocab, merges, specials, GPT2_SPLIT_PATTERN)
    assert enc.encode_ordinary(" the") == [vocab["Ġthe"]]
    assert enc.encode_ordinary("the") == [vocab["t"], vocab["he"]]
    assert enc.encode("x<|end|>", allowed_special="all") == [vocab["x"], specials["<|end|>"]]
    assert enc.n_vocab == len(vocab) + 1
    assert enc.decode(enc.encode_ordinary("naïve 日本 the\n")) == "naïve 日本 the\n"


def test_a_byte_the_vocabulary_lacks_is_dropped():
    vocab, merges, specials = tiny_bpe(drop="a")
    enc = encoding_from_bpe("tiny", vocab, merges, specials, GPT2_SPLIT_PATTERN)
    assert enc.encode_ordinary("cat") == [vocab["c"], vocab["t"]]
    assert enc.encode_ordinary_batch(["a", "ba"]) == [[], [vocab["b"]]]
    assert enc.n_vocab == len(vocab) + 1  # the extra rank for "a" is not an id of the model


def test_ids_out_of_merge_order_and_tokens_outside_the_byte_alphabet_are_refused():
    vocab, merges, specials = tiny_bpe()
    vocab["Ġt"], vocab["he"] = vocab["he"], vocab["Ġt"]
    with pytest.raises(ValueError, match="merge order"):
        encoding_from_bpe("tiny", vocab, merges, specials, GPT2_SPLIT_PATTERN)
    vocab, merges, specials = tiny_bpe()
    vocab["▁the"] = len(vocab) + 1  # sentencepiece's spelling
    with pytest.raises(ValueError, match="byte-level alphabet"):
        encoding_from_bpe("tiny", vocab, merges, specials, GPT2_SPLIT_PATTERN)


# -------------------------------------------------------------------------------------------------- training

CORPUS = (
    "the quick brown fox jumps over the lazy dog. the dog sleeps; the fox runs.\n"
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # 3\n"
)


@pytest.fixture(scope="module")
def small_ranks():
    return train_bpe([CORPUS * 20], vocab_size=300)


def test_trained_ranks_are_the_256_bytes_then_contiguous_unique_merges(small_ranks):
    assert len(small_ranks) == 299  # + <|endoftext|> = 300
    assert all(small_ranks[bytes([b])] == b for b in range(256))
    assert sorted(small_ranks.values()) == list(range(299))  # unique and contiguous
    merged = [token for token, rank in small_ranks.items() if rank >= 256]
    assert all(len(token) > 1 for token in merged)
    assert len(set(merged)) == len(merged)


def test_saved_ranks_load_back_as_the_same_tokenizer(small_ranks, tmp_path):
    save_ranks(small_ranks, tmp_path / "small.tiktoken")
    enc = load_tokenizer(tmp_path / "small.tiktoken")
    assert enc._mergeable_ranks == small_ranks
    assert enc.n_vocab == 300 and enc.eot_token == 299
    ids = enc.encode_ordinary(CORPUS)
    assert len(ids) < len(CORPUS.encode())  # the merges compress the text they were trained on
    assert enc.decode(ids) == CORPUS


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_the_trainer_pre_tokenizer_keeps_every_character(text):
    assert "".join(re.findall(TRAIN_SPLIT_PATTERN, text)) == text


def naive_bpe(pretoken_counts, vocab_size):
    """Textbook BPE: recount every pair before each merge, merge the most frequent (ties: smallest ids)."""
    words = [(list(w.encode("utf-8")), n) for w, n in pretoken_counts.items()]
    vocab = [bytes([b]) for b in range(256)]
    while len(vocab) < vocab_size - 1:
        counts = Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                counts[pair] += n
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merged = vocab[best[0]] + vocab[best[1]]
        if merged not in vocab:
            vocab.append(merged)
        new = vocab.index(merged)
        for ids, _ in words:
            i = 0
            while i < len(ids) - 1:
                if (ids[i], ids[i + 1]) == best:
                    ids[i : i + 2] = [new]
                i += 1
    return {token: i for i, token in enumerate(vocab)}


ascii_words = st.lists(st.text(alphabet="abcde", min_size=1, max_size=8), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None)
@given(words=ascii_words, extra=st.integers(10, 30))
@example(words=["abc", "abc", "bca", "cab", "aaaa", "aaa"], extra=20)
def test_the_incremental_merge_loop_agrees_with_the_naive_trainer(words, extra):
    counts = count_pretokens([" ".join(words), "\n".join(words[::2])])
    assert learn_merges(counts, 256 + extra) == naive_bpe(counts, 256 + extra)
