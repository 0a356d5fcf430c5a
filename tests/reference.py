"""A naive, cache-free LLaMA forward written from the paper-level description, as the oracle for model.py.

It reads only `model.state_dict()` (or a plain dict of HF-named tensors) and `model.config`, and recomputes every
step with explicit matmuls: no KV cache, no scaled_dot_product_attention, no code shared with model.py.
Slow and obvious on purpose; use it with toy sizes.
"""

import math

import torch


def rms_norm(x, weight, eps):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half(x):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([-x2, x1], dim=-1)


def rope(x, positions, theta):
    """x [B, H, T, D], positions [T]: HF rotate-half RoPE, dimension i paired with i + D/2."""
    D = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)  # [D/2]
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, D]
    return x * angles.cos() + rotate_half(x) * angles.sin()


def _weights(model_or_state):
    """HF names -> tensors, whether given a model or a dict; our model's names lack the `model.` prefix."""
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    out = {}
    for name, w in state.items():
        name = name if name.startswith(("model.", "lm_head.")) else "model." + name
        out[name] = w.detach().float()
    return out


def reference_logits(model, tokens, positions=None, mask=None, config=None, state=None, exit_layer=None, skip=()):
    """tokens [B, T] -> logits [B, T, V], recomputed from scratch.

    positions [T] default to 0..T-1; mask [T, T] (bool, True = may attend) defaults to causal.
    `config`/`state` override `model.config`/`model.state_dict()` (for hand-made checkpoints, pass model=None).
    exit_layer E reads the residual stream after layer E-1 out through the final norm and head (early exit);
    `skip` names sublayers ("3.attn", "3.mlp") whose output is not added (a layer-skipping self-draft).
    """
    cfg = config if config is not None else model.config
    w = _weights(state if state is not None else model)
    B, T = tokens.shape
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    group = H // H_kv
    if positions is None:
        positions = torch.arange(T)
    if mask is None:
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))

    x = w["model.embed_tokens.weight"][tokens]  # [B, T, C]
    for i in range(cfg.num_hidden_layers if exit_layer is None else exit_layer):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(B, T, H, D).transpose(1, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(B, T, H_kv, D).transpose(1, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, T, H_kv, D).transpose(1, 2)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        # kv head j serves query heads j*group .. (j+1)*group - 1
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # [B, H, T, T]
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v  # [B, H, T, D]
        attn = attn.transpose(1, 2).reshape(B, T, H * D)
        x = x + (0 if f"{i}.attn" in skip else attn @ w[p + "self_attn.o_proj.weight"].T)
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (0 if f"{i}.mlp" in skip else (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T)
    x = rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps)
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return x @ head.T


@torch.no_grad()
def reference_greedy(model, prompt_ids, n):
    """The naive generator: rerun the whole sequence for every new token, take the argmax."""
    ids = list(prompt_ids)
    for _ in range(n):
        logits = reference_logits(model, torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]
