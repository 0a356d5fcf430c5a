"""A LLaMA-style decoder with a hand-written KV cache, in Hugging Face Llama layout.

Architecture (Touvron et al. 2023): RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP,
no biases. Tensor names are HF's (`model.layers.0.self_attn.q_proj.weight`, ...), so our checkpoints load in
`transformers.LlamaForCausalLM` and real Llama checkpoints (config.json + model.safetensors) load here.
This file imports nothing from the project.
"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


@dataclass
class ModelConfig:
    hidden_size: int = 384  # width of the residual stream
    intermediate_size: int = 1024  # hidden width of the SwiGLU MLP
    num_hidden_layers: int = 8  # decoder blocks
    num_attention_heads: int = 6  # query heads
    num_key_value_heads: int = 2  # key/value heads (fewer than query heads: grouped-query attention)
    vocab_size: int = 4096  # tokenizer size, special tokens included
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    max_position_embeddings: int = 1024  # longest context the model was trained for
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        raw = json.loads(Path(path).read_text())
        rope = raw.get("rope_parameters") or {}  # transformers >= 5 keeps rope_theta (and the scaling) here
        if raw.get("rope_scaling") or rope.get("rope_type", "default") != "default":
            # Llama 3.1's frequency rescaling (and YaRN, NTK, ...) is not implemented here
            raise ValueError(f"{path}: rope_scaling={raw.get('rope_scaling') or rope} is not supported")
        if "rope_theta" in rope:
            raw.setdefault("rope_theta", rope["rope_theta"])
        for bias in ("attention_bias", "mlp_bias"):
            if raw.get(bias):
                raise ValueError(f"{path}: {bias}=true is not supported (these blocks have no biases)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act={raw['hidden_act']!r} is not supported (the MLP is SwiGLU)")
        if (
            raw.get("head_dim", raw["hidden_size"] // raw["num_attention_heads"]) * raw["num_attention_heads"]
            != raw["hidden_size"]
        ):
            raise ValueError(f"{path}: head_dim * num_attention_heads must equal hidden_size")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_json(self, path: str | Path, dtype: str = "bfloat16") -> None:
        hf = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "torch_dtype": dtype,
            "bos_token_id": None,
            "eos_token_id": self.vocab_size - 1,
        }
        Path(path).write_text(json.dumps({**hf, **asdict(self)}, indent=2) + "\n")


class KVCache:
    """Preallocated keys/values, one [B, H_kv, T_max, D] buffer pair per layer (as gpt-fast's KVCache).

    New entries are written at slots length .. length+T-1. Speculative rollback is just setting the length;
    keeping an accepted token-tree path is a gather + copy into contiguous slots.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        # Uninitialised: a slot is written before anything reads it (update returns slots [0, end) only), and
        # zeroing a model's whole context (377 MB for SmolLM2's 8192 slots) would cost every generation a call.
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0  # slots in use, the same for every layer
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H_kv, T, D] after the current entries; return everything cached so far for this layer."""
        end = self.length + k.shape[2]  # run_blocks has checked that it fits
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        """Discard every entry from slot `length` on (rejected draft tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def keep(self, indices: torch.Tensor) -> None:
        """Keep slots [0, indices[0]) and move the entries at `indices` (ascending) to slots indices[0], +1, ...

        Used after token-tree verification: `indices` are the root and the accepted path; their K/V must be moved
        to contiguous slots, since truncating alone is only right when the path is the tree's first branch.
        """
        start = int(indices[0])
        for buf in self.k + self.v:
            buf[:, :, start : start + len(indices)] = buf[:, :, indices]  # the gather copies before the write
        self.length = start + len(indices)


def precompute_rope(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim]. HF rotate-half convention: dimension i is paired with i + head_dim/2
    (not with its neighbour 2i+1 as in Meta's original complex-number code)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, D]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, D] (or [B, 1, T, D], one row of positions per sequence) already indexed by each
    token's position."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in fp32, as HF does, so bf16 runs stay close to fp32 ones
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size)

    def forward(self, x, cos, sin, layer, cache, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, H_kv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, H_kv, L + T, D]
        # enable_gqa repeats each K/V head for n_heads / n_kv_heads consecutive query heads, as HF's repeat_kv.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and cache is None and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU (Shazeer 2020)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layer, cache, mask, skip_attn: bool = False, skip_mlp: bool = False):
        # A skipped sublayer adds nothing to the residual stream (Draft & Verify's self-draft; its cache layer
        # is then left unwritten, so that cache must be the draft's own)
        if not skip_attn:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache, mask)
        if not skip_mlp:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


FEW_ROWS = 8  # the longest call that Linear computes by columns (faster up to here, slower from 12 rows), and
# whose logits LMHead copies out of the transposed layout


def by_columns(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """rows [N, C] @ weight^T, computed as (weight @ rows^T)^T: [N, out], in the transposed layout. Same numbers up
    to summation order, but on a CPU the matrix library then streams the weight once for the call, where
    rows @ weight^T took about one pass per row. One row goes in as two columns: a product with one column is the
    library's matrix-vector routine, which ran on one thread (SmolLM2's 49152 x 576 LM head: 9.8 ms, against
    3.0 ms for two columns on two threads)."""
    columns = torch.cat([rows, rows]) if rows.shape[0] == 1 else rows  # [max(N, 2), C]; cat: 1 us, repeat: 7
    return (weight @ columns.T).T[: rows.shape[0]]


class Linear(nn.Linear):
    """nn.Linear without a bias, computed by columns (by_columns) on a CPU for a call of up to FEW_ROWS rows: the
    calls that decoding and speculative verification make. SmolLM2's calls of 1-8 tokens cost 32-58 ms this way,
    48-73 ms as x @ W^T; the shipped target's 7-11 ms against 11-14 (medians of 18 interleaved calls after a
    256-token prefix, 2-core CPU; bench.py --cost-curve measures both). From 12 rows on (prefill, large trees)
    x @ W^T was as fast or faster and is kept."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)  # Llama's projections have none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [N, C]
        if rows.shape[0] > FEW_ROWS or x.device.type != "cpu":  # measured on CPUs only; a GPU has its own kernels
            return super().forward(x)
        # contiguous: a transposed output carries its layout on, and q would then reach SDPA with T innermost,
        # which its fused CPU kernel refuses (every call of 2-8 tokens fell back to SDPA's slower math path)
        return by_columns(self.weight, rows).contiguous().reshape(*x.shape[:-1], self.out_features)


class LMHead(nn.Linear):
    """The output projection, always computed by columns on a CPU (by_columns): SmolLM2's head took 2.3x a one-row
    call at 2 rows and 3.5x at 3 as h @ W^T, 1.0x / 1.4x this way. The logits of a call of up to FEW_ROWS rows are
    copied out of the transposed layout, row by row: at a sampled verify call of SmolLM2 a softmax along the
    vocabulary at stride N took 0.32 ms for two rows against 0.06 contiguous, 1.2 ms for five against 0.17, and
    .contiguous() itself 0.25 ms for two rows (a parallel transposing copy) against 0.03 for torch.stack of the rows
    (2-core CPU). A longer call's logits keep the transposed layout: a prefill's [T, V], of which one row is read,
    and also a tree call of more than FEW_ROWS nodes, which reads them all."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.device.type != "cpu":
            return super().forward(h)
        rows = h.reshape(-1, h.shape[-1])  # [N, C]
        logits = by_columns(self.weight, rows)  # [N, V], transposed layout
        logits = torch.stack(logits.unbind()) if rows.shape[0] <= FEW_ROWS else logits
        return logits.reshape(*h.shape[:-1], self.out_features)


def as_plain_linears(module: nn.Module) -> nn.Module:
    """Every Linear and LMHead under `module` made a plain nn.Linear, in place: x @ W^T for any number of rows.
    For what swaps modules by their exact type (torch.ao's quantization), and for measuring the two forms of a
    call side by side (cost.measure_forms)."""
    for m in module.modules():
        if isinstance(m, (Linear, LMHead)):
            m.__class__ = nn.Linear
    return module


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = precompute_rope(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def device(self) -> torch.device:
        """Where the weights are (the embedding: a quantized copy's linear layers may hold no .weight)."""
        return self.embed_tokens.weight.device

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        cfg, w = self.config, self.lm_head.weight
        return KVCache(
            cfg.num_hidden_layers,
            batch_size,
            cfg.num_key_value_heads,
            max_len or cfg.max_position_embeddings,
            cfg.head_dim,
            w.dtype,
            w.device,
        )

    def forward(
        self,
        tokens: torch.Tensor | None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        layers: range | None = None,
        skip: frozenset[str] = frozenset(),
        logits_to_keep: int = 0,
    ):
        """tokens [B, T] -> logits [B, T, V] (and the final normed hidden states [B, T, C] if return_hidden).

        With a cache, the new keys/values are appended after `cache.length` entries. `positions` [T] default to
        cache.length + 0..T-1; a token tree passes prefix_len + depth instead. `attn_mask` [T, cache.length + T]
        (bool, True = may attend) defaults to causal. A ragged batch passes both per row: positions [B, T] with
        attn_mask [B, T, cache.length + T]. `inputs_embeds` [B, T, C] replace the tokens' embeddings
        (tokens=None): some inputs are not tokens, e.g. PaSS's learned lookahead embeddings. `layers` and `skip`
        run part of the model (see blocks): range(E) reads the residual stream after block E-1 out through the
        final norm and LM head, an early exit (LayerSkip). `logits_to_keep` n > 0 runs the LM head on the last n
        positions only (logits [B, n, V]; as transformers' argument of that name): a prefill reads one row, and the
        head's T x V products over a whole prompt are about a tenth of SmolLM2's prefill.
        """
        x = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds
        x = self.blocks(x, cache, positions, attn_mask, layers, skip)
        h = self.norm(x)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        return (logits, h) if return_hidden else logits

    def blocks(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        layers: range | None = None,
        skip: frozenset[str] = frozenset(),
    ) -> torch.Tensor:
        """The residual stream x [B, T, C] through the blocks in `layers` (default: all), minus the sublayers named
        in `skip` ("3.attn", "3.mlp": Draft & Verify's self-draft). Self-drafting by early exit runs range(E) to
        draft and range(E, L) on the saved residual stream to finish verifying (survey §5.2)."""
        return run_blocks(self.layers, x, self.rope_cos, self.rope_sin, cache, positions, attn_mask, layers, skip)

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype=None) -> "Transformer":
        """Load config.json + model.safetensors, or the shards its index names (HF Llama names). Default: CPU,
        float32."""
        path = Path(path)
        cfg = ModelConfig.from_json(path / "config.json")
        with torch.device("meta"):
            model = cls(cfg)
        state = {hf_to_ours(k): v for k, v in load_safetensors(path).items()}
        state = {k: v for k, v in state.items() if "rotary_emb" not in k}  # old HF files store inv_freq
        if cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        cos, sin = precompute_rope(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        model.rope_cos, model.rope_sin = cos, sin
        return model.to(device=device or "cpu", dtype=dtype or torch.float32).eval()

    def save_pretrained(self, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.to_json(path / "config.json", str(dtype).removeprefix("torch."))
        state = {ours_to_hf(k): v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")  # safetensors stores no shared tensors; HF re-ties on load
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    rope_cos: torch.Tensor,
    rope_sin: torch.Tensor,
    cache: KVCache | None,
    positions: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    layers: range | None = None,
    skip: frozenset[str] = frozenset(),
) -> torch.Tensor:
    """x [B, T, C] through decoder blocks `layers` (default all); shared by Transformer and the one-layer EAGLE head
    (heads.py). The cache's length then counts these T tokens as written, though only `layers` wrote them: the
    caller that runs a partial range writes the other layers' slots later (self-drafting by early exit, §5.2)."""
    T, past = x.shape[1], cache.length if cache is not None else 0
    if cache is not None and past + T > cache.max_len:
        raise ValueError(f"KV cache overflow: {past + T} > max_len {cache.max_len}")
    if positions is None:
        positions = torch.arange(past, past + T, device=x.device)
        if past + T > len(rope_cos):
            raise ValueError(f"position {past + T - 1} is beyond max_position_embeddings {len(rope_cos)}")
    if attn_mask is None and cache is not None and T > 1:
        attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
    cos, sin = rope_cos[positions], rope_sin[positions]  # [T, D]
    if positions.dim() == 2:  # [B, T]: every row its own positions (a ragged batch, batched.py)
        if attn_mask is None:
            raise ValueError("per-row positions [B, T] need a per-row attention mask [B, T, S]")
        cos, sin, attn_mask = cos[:, None], sin[:, None], attn_mask[:, None]  # [B, 1, T, D], mask [B, 1, T, S]
    for i in layers if layers is not None else range(len(blocks)):
        x = blocks[i](x, cos, sin, i, cache, attn_mask, f"{i}.attn" in skip, f"{i}.mlp" in skip)
    if cache is not None:
        cache.length = past + T
    return x


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or every shard that model.safetensors.index.json names (HF's layout for big models)."""
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").exists() or not index.exists():
        return load_file(path / "model.safetensors")
    state = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(path / shard))
    return state


def ours_to_hf(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def hf_to_ours(name: str) -> str:
    return name.removeprefix("model.")
