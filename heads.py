"""Drafting heads on the target's own hidden states (survey §5.2, self-drafting): Medusa, Hydra and EAGLE.

Each head reads the target's last hidden states (`features`, passed to propose_tree by the tree loop) and its
frozen LM head; none has its own vocabulary projection, which keeps weights/ small. Their trees are verified by
tree_speculative_generate like every other drafter's (drafters.py has the drafter interface).
"""

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from drafters import KeepGrowing, Warp, always, grow_tree, tree_step_inputs
from model import Block, KVCache, ModelConfig, Transformer, precompute_rope, run_blocks
from tree import Tree, default_tree_choices, path_to, static_tree


class MedusaHeads(nn.Module):
    """K residual SiLU blocks on the target's last hidden state h_t; head k (1-based) guesses token t+1+k, k places
    after the LM head's own next token, read out through the target's frozen LM head (Medusa-1, Cai et al. 2024).
    Medusa gives each head its own vocabulary projection, initialised from the LM head; sharing the frozen one
    keeps weights/ small."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_heads))
        for lin in self.linears:  # zero init: every head starts as "the next token again", a sane guess
            nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)

    def forward(self, h: Tensor, lm_head: nn.Linear) -> Tensor:
        """h [..., C] -> logits [K, ..., V]"""
        return torch.stack([lm_head(h + F.silu(lin(h))) for lin in self.linears])


class HydraHeads(nn.Module):
    """Hydra's sequentially dependent heads (Ankner et al. 2024; survey §5.2): Medusa's residual SiLU block, but head
    k (1-based) also reads the embeddings of the k tokens drafted before its own, t+1 .. t+k, so it guesses token
    t+1+k knowing which path of the tree it extends. Read out by the target's frozen LM head, as MedusaHeads."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear((k + 2) * hidden_size, hidden_size) for k in range(num_heads))
        for lin in self.linears:  # zero init, as MedusaHeads: every head starts as "the next token again"
            nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)

    def forward(self, k: int, h: Tensor, path_embeds: Tensor, lm_head: nn.Linear) -> Tensor:
        """Head k (1-based): h [..., C], path_embeds [..., k, C] (tokens t+1 .. t+k) -> logits of t+1+k [..., V]"""
        x = torch.cat([h, path_embeds.flatten(-2)], dim=-1)  # [..., (k + 1) C]
        return lm_head(h + F.silu(self.linears[k - 1](x)))


class EagleHead(nn.Module):
    """One decoder layer that maps (target feature f_j, embedding of token x_{j+1}) to the next feature f_{j+1},
    read out by the target's own LM head (EAGLE, Li et al. 2024; survey §5.2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList([Block(cfg)])
        cos, sin = precompute_rope(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, features: Tensor, token_embeds: Tensor, cache=None, positions=None, attn_mask=None) -> Tensor:
        """features, token_embeds [B, T, C] -> predicted next features [B, T, C]"""
        x = self.fc(torch.cat([token_embeds, features], dim=-1))
        return run_blocks(self.layers, x, self.rope_cos, self.rope_sin, cache, positions, attn_mask)


def save_head(module: nn.Module, config: dict, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(
        {k: v.detach().to(torch.bfloat16).contiguous() for k, v in module.state_dict().items()},
        path / "model.safetensors",
    )


def load_head(path: str | Path) -> tuple[dict, dict]:
    path = Path(path)
    return json.loads((path / "config.json").read_text()), load_file(path / "model.safetensors")


def load_heads(kind: type, target: Transformer, path: str | Path) -> nn.Module:
    """MedusaHeads or HydraHeads saved under `path`, on the target's device and dtype, in eval mode."""
    cfg, state = load_head(path)
    heads = kind(cfg["hidden_size"], cfg["num_heads"])
    heads.load_state_dict(state)
    w = target.lm_head.weight
    return heads.to(w.device, w.dtype).eval()


class MedusaDrafter:
    """Medusa's sparse static tree (Cai et al. 2024): the top-`width` tokens of each head, combined along `choices`."""

    def __init__(self, target: Transformer, heads: MedusaHeads, width: int = 4, size: int = 24):
        self.target, self.heads = target, heads
        self.choices = default_tree_choices(len(heads.linears), width, size)
        self.width = width

    @classmethod
    def from_pretrained(cls, target: Transformer, path: str | Path, **tree_options) -> "MedusaDrafter":
        return cls(target, load_heads(MedusaHeads, target, path), **tree_options)

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
        if len(features) == 0:  # a one-token prompt: no hidden state yet
            return Tree.from_root(context[-1])
        # Head k on the hidden state of context[-2] guesses the token k places after the root.
        top = torch.log_softmax(self.heads(features[-1], self.target.lm_head).float(), -1).topk(self.width)  # [K, w]
        return static_tree(context[-1], top.indices.tolist(), self.choices, top.values.tolist())


class HydraDrafter:
    """Hydra's tree (Ankner et al. 2024), grown as EAGLE-2's dynamic tree: a node at depth d is extended by head d+1,
    which reads the target's hidden state h_t and the embeddings of the node's path from the root (token t+1)."""

    def __init__(
        self,
        target: Transformer,
        heads: HydraHeads,
        width: int = 4,
        beam: int = 4,
        size: int = 24,
        sampled: bool = False,
    ):
        self.target, self.heads = target, heads
        self.width, self.beam, self.size, self.sampled = width, beam, size, sampled

    @classmethod
    def from_pretrained(cls, target: Transformer, path: str | Path, **tree_options) -> "HydraDrafter":
        return cls(target, load_heads(HydraHeads, target, path), **tree_options)

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
        if len(features) == 0:  # a one-token prompt: no hidden state yet
            return Tree.from_root(context[-1])
        h = features[-1]  # the hidden state of context[-2]; the root context[-1] is token t+1

        def heads_logits(paths: list[list[int]]) -> Tensor:  # paths of equal length k from the root -> [F, V]
            embeds = self.target.embed_tokens(torch.tensor(paths, device=h.device))  # [F, k, C]
            return self.heads(len(paths[0]), h.expand(len(paths), -1), embeds, self.target.lm_head)

        def expand(tree: Tree, nodes: list[int]) -> Tensor:
            return heads_logits([[tree.tokens[a] for a in path_to(tree, n)] for n in nodes])

        return grow_tree(
            context[-1],
            heads_logits([[context[-1]]])[0],
            expand,
            len(self.heads.linears),
            self.width,
            self.beam,
            self.size,
            keep,
            (warp, generator) if self.sampled else None,
        )


class EagleDrafter:
    """EAGLE's feature-level drafting with EAGLE-2's dynamic tree (Li et al. 2024a, 2024b). The head keeps its own
    KV cache: slot j holds the pair (f_j, x_{j+1}), with true target features for the committed context."""

    def __init__(
        self,
        target: Transformer,
        head: EagleHead,
        depth: int = 6,
        width: int = 4,
        beam: int = 4,
        size: int = 24,
        sampled: bool = False,
    ):
        self.target, self.head = target, head
        self.depth, self.width, self.beam, self.size, self.sampled = depth, width, beam, size, sampled
        self.cache, self.committed_before = None, 0

    @classmethod
    def from_pretrained(cls, target: Transformer, path: str | Path, **tree_options) -> "EagleDrafter":
        cfg, state = load_head(path)
        head = EagleHead(ModelConfig(**cfg))
        head.load_state_dict(state)
        w = target.lm_head.weight
        return cls(target, head.to(w.device, w.dtype).eval(), **tree_options)

    def reset(self) -> None:
        self.cache = KVCache(
            1,
            1,
            self.head.config.num_key_value_heads,
            self.target.config.max_position_embeddings,
            self.head.config.head_dim,
            self.target.lm_head.weight.dtype,
            self.target.device,
        )
        self.committed_before = 0

    def run(self, features: Tensor, tokens: list[int], **kw) -> Tensor:
        """Predicted features [T, C] for pairs (features[i], tokens[i]), appended to the head's cache."""
        embeds = self.target.embed_tokens(torch.tensor([tokens], device=features.device))
        return self.head(features[None], embeds, self.cache, **kw)[0]

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree:
        committed = len(context) - 1  # pairs (f_j, x_{j+1}) for j < len(context) - 1 use true features
        if committed == 0:
            return Tree.from_root(context[-1])
        self.cache.truncate(min(self.cache.length, self.committed_before, committed - 1))  # drop the last tree's nodes
        start = self.cache.length
        predicted = self.run(features[start:committed], context[start + 1 :])  # catch up: [committed - start, C]
        self.committed_before, feats, slot = committed, {0: predicted[-1]}, {0: committed - 1}
        depth = min(self.depth, (self.cache.max_len - committed) // self.beam)

        def expand(tree: Tree, nodes: list[int]) -> Tensor:
            positions, mask = tree_step_inputs(tree, nodes, slot, committed, committed - 1, predicted.device)
            parent_feats = torch.stack([feats[tree.parents[n]] for n in nodes])
            out = self.run(parent_feats, [tree.tokens[n] for n in nodes], positions=positions, attn_mask=mask)
            feats.update(zip(nodes, out))
            return self.target.lm_head(out)

        root_logits = self.target.lm_head(predicted[-1])
        return grow_tree(
            context[-1],
            root_logits,
            expand,
            depth,
            self.width,
            self.beam,
            self.size,
            keep,
            (warp, generator) if self.sampled else None,
        )
