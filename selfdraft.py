"""Self-drafting: the target drafts for itself, made cheaper (survey §5.2 "Early Exiting"; reading list).

-d layerskip  Draft & Verify (Zhang et al. 2023): the draft is the target with some attention and MLP sublayers
              skipped, found by a search on training prompts (search_skip_set, `train.py layerskip`); drafting
              stops when the draft's confidence falls below a threshold that follows the acceptance rate
              (draft_length.Adaptive). The skipped model computes different activations in every later layer,
              so its K/V are its own: it is a drafters.ModelDrafter with its own cache
              (docs/pitfalls.md: A shared cache is shared only for the same layers).
-d earlyexit  LayerSkip's self-speculation (Elhoushi et al. 2024): draft with blocks [0, E), read out through the
              final norm and LM head; verification runs only blocks [E, L) on the drafted tokens, from the residual
              stream the draft saved, and reuses the K/V that drafting wrote for blocks [0, E) in the target's own
              cache: the draft's work is not done twice (EarlyExitDrafter).
-d del        DEL (Entezari Zarch et al. 2025): the same, with E and the draft length chosen before every step
              from running per-layer acceptance estimates ("shadow tokens", DynamicExitDrafter).
-d quant      ML-SpecQD (Georganas et al. 2025): the target's own weights quantized are its draft (quantized).
"""

import copy
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from drafters import KeepDrafting, Warp, always
from model import KVCache, Transformer, as_plain_linears
from verify import sample_token

# ---- Draft & Verify: which sublayers to skip ------------------------------------------------------------------


def sublayer_costs(cfg) -> dict[str, float]:
    """Each sublayer's share of a one-token forward, by its weights' multiply-adds (the LM head included in the
    total): attention q, k, v, o; the MLP's three matrices. The cost model of the skip search."""
    C, I, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    attn, mlp = 2 * C * C + 2 * C * kv, 3 * C * I
    total = cfg.num_hidden_layers * (attn + mlp) + C * cfg.vocab_size
    return {
        f"{i}.{kind}": cost / total
        for i in range(cfg.num_hidden_layers)
        for kind, cost in (("attn", attn), ("mlp", mlp))
    }


@torch.inference_mode()
def greedy_agreement(
    target: Transformer,
    sequences: list[tuple[list[int], list[int]]],
    skip: frozenset[str] = frozenset(),
    layers: range | None = None,
) -> float:
    """Share of the target's own greedy tokens that the cheaper model predicts too, teacher-forced on (prompt,
    target continuation) pairs: the acceptance rate of a greedy self-draft, measured without decoding."""
    agree = total = 0
    for prompt, out in sequences:
        ids = torch.tensor([prompt + out], device=target.device)
        draft = target(ids, skip=skip, layers=layers)[0, len(prompt) - 1 : -1].argmax(-1)
        agree += int((draft == torch.tensor(out, device=ids.device)).sum())
        total += len(out)
    return agree / max(total, 1)


def search_skip_set(
    target: Transformer, sequences: list[tuple[list[int], list[int]]], max_skipped: int, gamma: int = 4, log=print
) -> tuple[frozenset[str], list[dict]]:
    """Greedy search for Draft & Verify's skip set (the paper uses Bayesian optimisation): at each step skip the
    one more sublayer that keeps the greedy agreement highest. Returns the set with the best modelled speedup,
    E[tokens per step] / (gamma x draft cost + 1), and the whole curve (skipped, agreement, draft cost)."""
    costs, skip, curve = sublayer_costs(target.config), frozenset(), []
    for _ in range(max_skipped):
        scores = {s: greedy_agreement(target, sequences, skip | {s}) for s in costs if s not in skip}
        best = max(scores, key=scores.get)
        skip = skip | {best}
        alpha, cost = scores[best], 1 - sum(costs[s] for s in skip)
        tokens = sum(alpha**i for i in range(gamma + 1))  # 1 + alpha + ... + alpha^gamma (Leviathan et al.)
        curve.append(
            dict(
                skipped=sorted(skip, key=lambda s: (int(s.split(".")[0]), s)),
                agreement=round(alpha, 4),
                draft_cost=round(cost, 4),
                modelled_speedup=round(tokens / (gamma * cost + 1), 4),
            )
        )
        log(
            f"skip {len(skip):2d} sublayers (+{best}): agreement {alpha:.3f}, draft cost {cost:.2f} of a forward, "
            f"modelled speedup {curve[-1]['modelled_speedup']:.2f}x"
        )
    chosen = max(curve, key=lambda row: row["modelled_speedup"])
    return frozenset(chosen["skipped"]), curve


def save_skip_set(path: Path, skip: frozenset[str], curve: list[dict], command: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(skip=sorted(skip), command=command, curve=curve), indent=1) + "\n")


def load_skip_set(path: Path) -> frozenset[str]:
    return frozenset(json.loads(Path(path).read_text())["skip"])


# ---- LayerSkip: early exit with a shared cache ----------------------------------------------------------------


class EarlyExitDrafter:
    """LayerSkip's self-speculation (Elhoushi et al. 2024; survey §5.2): draft token i + 1 from the residual stream
    after block E-1 of token i, read out through the target's final norm and LM head (the target was not trained
    for early exits; tests and the README measure how well it reads out anyway).

    One cache serves both: drafting writes blocks [0, E) of the target's own cache at the drafted tokens' slots and
    saves their residual streams; the verify call (verify_forward, returned by attach) runs blocks [0, E) on the last
    draft only, then blocks [E, L) on every drafted position from the saved streams. Rejected slots are rolled back
    by the loop's truncate, for all layers at once."""

    def __init__(self, target: Transformer, exit_layer: int):
        self.target, self.exit = target, exit_layer
        self.cache, self.start, self.streams, self.upper = None, 0, [], []

    def reset(self) -> None:
        self.cache, self.start, self.streams = None, 0, []

    def attach(self, target: Transformer, cache: KVCache, prompt: list[int]):
        """The loop's target cache is ours to draft into, so we prefill it with the prompt but its last token (our
        first draft reads it); the loop's verify call is ours to finish."""
        self.cache = cache
        if len(prompt) > 1:
            target(torch.tensor([prompt[:-1]], device=target.device), cache, logits_to_keep=1)
        return self.verify_forward

    def run(self, x: Tensor, layers: range) -> list[Tensor]:
        """x [1, T, C] through blocks `layers` at the cache's next T slots -> [the residual stream after the last
        block], in one call. DEL keeps every block's stream instead, at a call per block (SmolLM2's 30 blocks one
        at a time made LayerSkip's verify calls 4% slower: 29.1 against 27.9 ms, interleaved on a 2-core CPU)."""
        return [self.target.blocks(x, self.cache, layers=layers)]

    def lower(self, token: int) -> list[Tensor]:
        """Blocks [0, E) on one token at the cache's next slot: run's streams, each [1, 1, C]."""
        return self.run(self.target.embed_tokens(torch.tensor([[token]], device=self.target.device)), range(self.exit))

    def exit_logits(self, x: Tensor) -> Tensor:
        return self.target.lm_head(self.target.norm(x))

    def propose(
        self, context: list[int], gamma: int, warp: Warp, generator: torch.Generator | None, keep: KeepDrafting = always
    ) -> tuple[list[int], Tensor | None]:
        # Loop invariant: the cache holds every context token but the last, in every layer (attach prefilled it).
        self.start, self.streams, tokens, qs = self.cache.length, [], [], []
        token = context[-1]
        for i in range(gamma):
            self.streams.append(self.lower(token))
            logits = self.exit_logits(self.streams[-1][-1])[0, -1]
            q = warp(logits)
            token = sample_token(q, generator)
            tokens.append(token)
            qs.append(q)
            if not keep(logits, i):
                break
        return tokens, torch.stack(qs) if qs else None

    def verify_forward(self, tokens: Tensor, cache: KVCache, logits_to_keep: int = 0) -> Tensor:
        """tokens [1, T] (what the target has not seen, then n drafts; all but the last are already in the cache or
        the saved streams) -> the target's logits [1, 1 + n, V], computing only what drafting did not (so the loop's
        logits_to_keep, 1 + n, is what it computes anyway)."""
        self.streams.append(self.lower(int(tokens[0, -1])))  # the last draft (or, with none, context[-1])
        self.cache.length = self.start  # blocks [E, L) write the same slots that blocks [0, E) wrote
        x = torch.cat([s[-1] for s in self.streams], dim=1)  # [1, 1 + n, C]: the residual stream after block E-1
        self.upper = self.run(x, range(self.exit, len(self.target.layers)))
        return self.target.lm_head(self.target.norm(self.upper[-1]))

    def accept(self, n_accepted: int) -> None:
        pass  # the loop's truncate rolls back every layer of the shared cache


class DynamicExitDrafter(EarlyExitDrafter):
    """DEL (Entezari Zarch et al. 2025, "Context-Aware Dynamic Exit Layer for Efficient Self-Speculative
    Decoding"): before each step choose the exit layer l and the draft length d that maximise the tokens per layer
    run, TPL(l, d) = (1 - a_l^(d+1)) / (1 - a_l) / (d l + L), a_l the running acceptance rate of exit l. a_l is
    measured for every l at once from "shadow tokens": every drafted and verified position's residual stream after
    each block, read out through the LM head, compared with the target's argmax on the accepted positions, with
    exponentially decayed counts. The shadow read-outs cost (L - 1) x (1 + n) LM-head rows per step."""

    def __init__(self, target: Transformer, exit_layer: int, max_gamma: int = 8, decay: float = 0.9):
        super().__init__(target, exit_layer)
        self.first_exit, self.max_gamma, self.decay = exit_layer, max_gamma, decay
        self.reset()

    def reset(self) -> None:
        super().reset()
        L = len(self.target.layers)
        self.exit, self.gamma = self.first_exit, self.max_gamma
        self.matched, self.compared = torch.zeros(L - 1), torch.zeros(L - 1)  # exits l = 1 .. L-1

    def run(self, x: Tensor, layers: range) -> list[Tensor]:
        start, streams = self.cache.length, []
        for i in layers:  # one block at a time, each writing the same slots: the shadow tokens read every layer
            self.cache.length = start
            x = self.target.blocks(x, self.cache, layers=range(i, i + 1))
            streams.append(x)
        return streams

    def propose(
        self, context: list[int], gamma: int, warp: Warp, generator: torch.Generator | None, keep: KeepDrafting = always
    ) -> tuple[list[int], Tensor | None]:
        return super().propose(context, min(gamma, self.gamma), warp, generator, keep)

    def verify_forward(self, tokens: Tensor, cache: KVCache, logits_to_keep: int = 0) -> Tensor:
        logits = super().verify_forward(tokens, cache)
        self.target_tokens = logits[0].argmax(-1)  # [1 + n]
        return logits

    def accept(self, n_accepted: int) -> None:
        # Positions 0..n saw only accepted text, so their shadow tokens are fair tests of every exit. The exits
        # below E read the streams that drafting saved, the exits from E on those of the verify call.
        k = n_accepted + 1
        lower = [torch.cat([s[i] for s in self.streams], dim=1)[:, :k] for i in range(self.exit)]  # each [1, k, C]
        streams = torch.cat(lower + [x[:, :k] for x in self.upper[:-1]])  # [L - 1, k, C]
        shadow = self.exit_logits(streams).argmax(-1)  # [L - 1, k]
        hits = (shadow == self.target_tokens[:k]).sum(-1).float().cpu()
        self.matched = self.decay * self.matched + hits
        self.compared = self.decay * self.compared + k
        alpha = ((self.matched + 0.5) / (self.compared + 1)).clamp(max=0.999)  # [L - 1], smoothed away from 1
        self.gamma, self.exit = best_exit(alpha, len(self.target.layers), self.max_gamma)


def best_exit(alpha: Tensor, n_layers: int, max_gamma: int) -> tuple[int, int]:
    """DEL's choice: the draft length d and exit layer l maximising TPL(l, d) = (1 - a_l^(d+1)) / (1 - a_l) /
    (d l + L), the expected tokens of a step (Leviathan et al.'s formula) per block run. alpha [L - 1]: exits 1..L-1."""
    d = torch.arange(1, max_gamma + 1)[:, None]  # [D, 1]
    exits = torch.arange(1, n_layers)[None]  # [1, L - 1]
    tpl = (1 - alpha ** (d + 1)) / (1 - alpha) / (d * exits + n_layers)  # [D, L - 1]
    best = int(tpl.argmax())
    return best // (n_layers - 1) + 1, best % (n_layers - 1) + 1


# ---- PPD and SPEED: early exits that need concurrency or shared weights (latency models only) ------------------
#
# Survey Fig. 3 files both under Early Exiting (§5.2) with lossless greedy verification (§6.1). Neither is a
# drafter behind our interfaces: PPD runs forward passes concurrently with the one that produces their input, and
# SPEED pipelines tokens through a decoder whose layers share their weights. Their latency models below, with this
# machine's measured costs plugged in (bench.py --pipelined), say what each would gain here.


@torch.inference_mode()
def exit_topk_agreement(target: Transformer, tokens: list[int], exit_layer: int, k: int) -> float:
    """a_k: the share of positions of `tokens` (teacher-forced, one call) where the target's greedy next token is
    among the top k of the early exit after `exit_layer` blocks, read out through the final norm and LM head."""
    x = torch.tensor([tokens], device=target.device)
    full = target(x)[0].argmax(-1)  # [T]
    early = target(x, layers=range(exit_layer))[0].topk(k, dim=-1).indices  # [T, k]
    return float((early == full[:, None]).any(-1).float().mean())


def ppd_speedup(a_k: float, exit_fraction: float, concurrent_cost: float = 1.0) -> float:
    """Predictive Pipelined Decoding (Yang et al. 2023b): once token i's pass reaches the exit layer, a fraction
    e = E / L of a full pass, k more passes start on the early exit's top-k guesses for token i + 1. If one of them
    is right (probability a_k), its pass is already 1 - e done when token i is known, so a token costs
    t (1 - a_k (1 - e)) on average. That needs the k passes to run beside the first at no cost (k idle devices or
    cores): concurrent_cost = 1. On one device the k + 1 passes are one call of k + 1 tokens, each layer then
    costing ratio(k + 1) of a one-token layer (cost.CostCurve.ratio): pass that as concurrent_cost."""
    return 1.0 / (concurrent_cost * (1.0 - a_k * (1.0 - exit_fraction)))


def speed_speedup(a: float, stages: int, stage_cost: float, shared: bool = True) -> float:
    """SPEED (Hooper et al. 2023): the L layers form S stages; each step runs every token in flight through one
    more stage, in one batch, while the next token enters stage one, guessed from the early exit after stage one
    (right with probability a). With weights shared across the stages (the paper trains such a model), a step
    streams one stage's weights for S tokens: stage_cost = ratio(S), the cost of S tokens over one, so a step costs
    t ratio(S) / S and, when every guess is right, yields one token. A wrong guess flushes the S - 1 tokens behind
    it: 1 + (1 - a)(S - 1) steps per token. Without shared weights (our models), a step streams all S stages'
    weights, a full pass's worth, for one token at best: never faster than plain decoding."""
    if not shared:
        return 1.0 / (1.0 + (1.0 - a) * (stages - 1))
    return stages / (stage_cost * (1.0 + (1.0 - a) * (stages - 1)))


# ---- ML-SpecQD: a quantized copy of the target ----------------------------------------------------------------


def quantized(target: Transformer, bits: int = 8) -> Transformer:
    """The target with its decoder blocks' linear layers quantized, as its own draft (ML-SpecQD, Georganas et al.
    2025, which drafts with MXFP4 weights on Intel AMX). bits=8: torch.ao's dynamic quantization, int8 weights per
    output channel and int8 activations quantized per call, run by fbgemm's int8 matmuls: on this CPU the only int8
    path that is faster than float32 (the weight-only kernel was 4x slower). bits=4: int4 weights in groups of 32,
    dequantized once (float32 matmuls: it shows the acceptance of 4-bit weights, not their speed). The embedding,
    final norm and LM head stay float32, so the draft reads out exactly as the target does."""
    draft = copy.deepcopy(target)
    if bits == 8:
        with warnings.catch_warnings():  # torch.ao's eager quantization warns that it moved to torchao
            warnings.simplefilter("ignore")
            import torch.ao.quantization as tq

            layers = as_plain_linears(draft.layers)  # torch.ao swaps a module by its exact type: nn.Linear
            draft.layers = tq.quantize_dynamic(layers, {nn.Linear: tq.per_channel_dynamic_qconfig})
        return draft
    for module in draft.layers.modules():
        if isinstance(module, nn.Linear):
            group = math.gcd(32, module.in_features)
            w = module.weight.data.float().reshape(module.out_features, -1, group)  # [out, in / 32, 32]
            scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 7  # symmetric int4: -7 .. 7
            module.weight.data = ((w / scale).round().clamp(-7, 7) * scale).reshape(module.weight.shape)
    return draft
