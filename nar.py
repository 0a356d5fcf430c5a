"""SpecDec's non-autoregressive drafter (Xia et al. 2023, "Speculative Decoding: Exploiting Speculative Execution
for Accelerating Seq2seq Generation"; survey §5.1 "independent drafting", fine-tuned).

SpecDec drafts k tokens at once: its NAR decoder reads k [MASK] queries and emits k distributions in one forward,
the queries attending to the source and to each other (bidirectionally). Here the drafter is a small LLaMA
(model.py's Transformer) whose input is the context followed by k learned query embeddings at positions
len .. len+k-1; query j predicts the token at position len + j. Its attention mask (query_layout):
  - context tokens are causal and never see a query, so their K/V are those of the context alone and stay cached;
  - every query sees the whole context and all k queries of its block.
A draft step therefore feeds only the context tokens this cache has not seen plus the k queries, in ONE call, and
truncates the queries' K/V afterwards. Training (train.py nar) distils the frozen target: SpecDec's
sequence-level knowledge distillation, the target's greedy continuations as labels.

SpecDec verifies with a lossy top-beta rule (approximate.TopK); here the drafts go through the same lossless rules
as every other drafter (greedy matching, or speculative sampling with the q below).
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch import Tensor

from drafters import KeepDrafting, Warp, always
from model import KVCache, ModelConfig, Transformer
from verify import sample_token


def query_layout(past: int, n: int, cuts: list[int], k: int, device=None) -> tuple[Tensor, Tensor]:
    """Positions [n + len(cuts) k] and attention mask [n + len(cuts) k, past + n + len(cuts) k] (bool, True = may
    attend) for n context tokens after `past` cached ones, then one block of k [MASK] queries per cut.

    A cut t is a context length (past < t <= past + n): its queries stand at positions t .. t+k-1, see context
    tokens 0 .. t-1 and every query of their own block (SpecDec's bidirectional NAR decoder), nothing else. Context
    tokens see only the tokens up to themselves. Inference uses one cut at past + n; training (train.py nar)
    puts many cuts after one window, so one forward trains on many contexts."""
    rows, total = n + len(cuts) * k, past + n + len(cuts) * k
    mask = torch.zeros(rows, total, dtype=torch.bool, device=device)
    mask[:n, : past + n] = torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)
    positions = [torch.arange(past, past + n, device=device)]
    for b, t in enumerate(cuts):
        if not past < t <= past + n:
            raise ValueError(f"cut {t} outside the context ({past} cached + {n} new tokens)")
        block = slice(n + b * k, n + (b + 1) * k)
        mask[block, :t] = True
        mask[block, past + block.start : past + block.stop] = True  # bidirectional among its own k queries
        positions.append(torch.arange(t, t + k, device=device))
    return torch.cat(positions), mask


class NarModel(nn.Module):
    """A small LLaMA plus k learned [MASK] query embeddings (SpecDec's NAR drafter)."""

    def __init__(self, cfg: ModelConfig, num_queries: int):
        super().__init__()
        self.lm = Transformer(cfg)  # embeddings, blocks, norm and LM head: model.py's, unchanged
        self.queries = nn.Parameter(torch.zeros(num_queries, cfg.hidden_size))  # [k, C], one per future position

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    def forward(
        self, tokens: Tensor, cache: KVCache | None = None, cuts: list[int] | None = None, k: int | None = None
    ) -> Tensor:
        """tokens [B, n] (the context tokens the cache has not seen) -> logits [B, len(cuts), k, V] of the queries
        after each cut (default: one cut at the end of the context; k default: all queries). With a cache, the
        context tokens' K/V are appended and the queries' K/V are dropped again: the cache holds the context."""
        B, n = tokens.shape
        past, k = (cache.length if cache is not None else 0), k or self.num_queries
        cuts = cuts or [past + n]
        positions, mask = query_layout(past, n, cuts, k, tokens.device)
        x = torch.cat([self.lm.embed_tokens(tokens), self.queries[:k].repeat(len(cuts), 1).expand(B, -1, -1)], 1)
        h = self.lm.blocks(x, cache, positions, mask)
        if cache is not None:
            cache.truncate(past + n)  # the queries' K/V are never kept
        return self.lm.lm_head(self.lm.norm(h[:, n:])).view(B, len(cuts), k, -1)

    @classmethod
    def from_lm(cls, lm: Transformer, num_queries: int) -> "NarModel":
        """Start from a trained small LM (weights/draft): the queries start at its mean token embedding, a
        plausible input for every position (as PaSS's embeddings, train.py pass)."""
        model = cls(lm.config, num_queries)
        model.lm.load_state_dict(lm.state_dict())
        with torch.no_grad():
            model.queries.copy_(lm.embed_tokens.weight.mean(0).expand(num_queries, -1))
        return model

    def save_pretrained(self, path: str | Path) -> None:
        """config.json (ModelConfig + num_queries) and model.safetensors in bf16 (a tied LM head is not stored)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        raw = {"model_type": "specdec_nar", **asdict(self.lm.config), "num_queries": self.num_queries}
        (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        state = {
            k: v.detach().to(torch.bfloat16).contiguous()
            for k, v in self.state_dict().items()
            if not (k == "lm.lm_head.weight" and self.lm.config.tie_word_embeddings)
        }
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype=None) -> "NarModel":
        path = Path(path)
        cfg = ModelConfig.from_json(path / "config.json")
        model = cls(cfg, json.loads((path / "config.json").read_text())["num_queries"])
        state = load_file(path / "model.safetensors")
        if cfg.tie_word_embeddings:
            state["lm.lm_head.weight"] = state["lm.embed_tokens.weight"]
        model.load_state_dict(state, strict=True)
        if cfg.tie_word_embeddings:
            model.lm.lm_head.weight = model.lm.embed_tokens.weight
        return model.to(device=device or "cpu", dtype=dtype or torch.float32).eval()


class NarDrafter:
    """SpecDec's NAR drafter as a chain drafter (drafters.py's protocol): k drafts from ONE call per step.

    At T = 0 each position's draft is its argmax. At T > 0 each position j is sampled from its own warped
    distribution q_j = warp(logits_j), and those rows are returned as q. Since the k queries read only the
    context, never each other's drafted tokens, draft j is drawn independently of drafts 0..j-1, so q_j is exactly
    the distribution it was drawn from given the context and the drafts before it: speculative sampling with this q
    is lossless (docs/pitfalls.md: q is the distribution the draft was drawn from). keep(logits_j, j) may cut the chain
    after draft j (draft_length.py); it only shortens it, the call is made once either way.
    """

    def __init__(self, model: NarModel):
        self.model = model
        self.cache: KVCache | None = None

    def reset(self) -> None:
        self.cache = self.model.lm.new_cache()

    def propose(
        self, context: list[int], gamma: int, warp: Warp, generator: torch.Generator | None, keep: KeepDrafting = always
    ) -> tuple[list[int], Tensor | None]:
        room = self.model.lm.config.max_position_embeddings - len(context)  # the queries' positions must exist
        k = min(self.model.num_queries, room)
        if gamma < 1 or k < 1:
            return [], None
        device = self.model.lm.device
        new = torch.tensor([context[self.cache.length :]], dtype=torch.long, device=device)
        logits = self.model(new, self.cache, k=k)[0, 0]  # [k, V]: one call for all k positions
        n = min(gamma, k)
        for i in range(n):  # the policy sees every drafted position, the last one too
            if not keep(logits[i], i):
                n = i + 1
                break
        return self.draft(logits[:n], warp, generator)

    def draft(self, logits: Tensor, warp: Warp, generator: torch.Generator | None) -> tuple[list[int], Tensor]:
        """Each position drawn independently from its own warped distribution; q = those distributions."""
        q = warp(logits)  # [n, V]
        return [sample_token(row, generator) for row in q], q

    def accept(self, n_accepted: int) -> None:
        pass  # the cache holds the context alone; the next call feeds the accepted drafts and the target's token
