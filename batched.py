"""Batched speculative decoding (survey §9, "batched inference"): B prompts at once, each row accepting its own
number of drafts, with the chain drafters (the draft model, prompt lookup); TETRIS's draft selection under a
verification budget; multi-sample drafting, where n samples of one prompt draft for each other.

Ragged rows, one write pointer. Every call writes its tokens for all rows at the same cache slots (the KVCache's
single length), so the batch stays one tensor and model.py stays the same model. A row that accepts fewer drafts
than the call carried, or whose prompt is shorter than the longest, leaves holes: RaggedCache.valid [B, slots] says
which slots hold that row's text. Each row has its own positions (its token count, not the slot index, so RoPE
sees no gap) and its own attention mask (its valid slots, and causality within the call). When the slots run
out, compact() gathers each row's valid slots to the front: the gather + copy that keeps a tree path. A row that
finishes leaves the batch (keep_rows), so it costs nothing afterwards. Right padding, holes and per-row positions
are simpler to read than left padding, which would shift every row's positions by its own offset.

Greedy: each row's output equals decoding that row alone (tests/test_batched.py). Sampling: each row is verified
by the exact rule (verify.exact) with its own draft distributions, so each row has the target's law.
"""

import time
from typing import Protocol

import torch
from torch import Tensor

from drafters import PromptLookupDrafter, Warp
from model import Transformer
from specdec import Stats, check_generator, cut_at_eot, theory_acceptance, trim_tree, warp_for
from tree import depths, tree_attention_mask, tree_positions
from verify import Verifier, exact, sample_token


class RaggedCache:
    """A model's KV cache for B rows of different lengths: one write pointer, a validity mask per row."""

    def __init__(self, model: Transformer, batch_size: int, max_len: int | None = None):
        self.kv = model.new_cache(batch_size, max_len)
        self.valid = torch.zeros(batch_size, self.kv.max_len, dtype=torch.bool, device=self.kv.k[0].device)
        self.max_position = model.config.max_position_embeddings - 1

    def call_inputs(self, real: list[int], first_positions: list[int], T: int) -> tuple[Tensor, Tensor]:
        """A call of T tokens per row at slots length .. length+T-1, of which row b's first real[b] are its text
        and the rest padding: positions [B, T] and attention mask [B, T, length + T]. Marks the text valid."""
        s0, device = self.kv.length, self.valid.device
        j = torch.arange(T, device=device)
        positions = (torch.tensor(first_positions, device=device)[:, None] + j).clamp(max=self.max_position)
        text = j[None] < torch.tensor(real, device=device)[:, None]  # [B, T]
        self.valid[:, s0 : s0 + T] = text
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = torch.cat([self.valid[:, None, :s0].expand(-1, T, -1), causal[None] & text[:, None, :]], dim=-1)
        mask[:, j, s0 + j] = True  # padding sees itself, so no row of the mask is all False (NaN attention)
        return positions, mask

    def room_for(self, T: int) -> None:
        """Make sure T more slots fit, compacting every row's text to the front if they do not."""
        if self.kv.length + T > self.kv.max_len:
            self.compact()
        if self.kv.length + T > self.kv.max_len:
            raise ValueError(f"KV cache overflow: {self.kv.length + T} > max_len {self.kv.max_len}")

    def compact(self) -> None:
        counts = self.valid.sum(dim=1)  # [B]
        for b in range(len(counts)):
            slots = self.valid[b].nonzero()[:, 0]  # ascending, so the gather reads before the copy overwrites
            for buf in self.kv.k + self.kv.v:
                buf[b, :, : len(slots)] = buf[b, :, slots]
        self.valid = torch.arange(self.kv.max_len, device=self.valid.device)[None] < counts[:, None]
        self.kv.length = int(counts.max())

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (finished ones) from the batch. Only the slots in use are copied: the
        buffers span the model's whole context (8192 slots for SmolLM2), most of it not yet written."""
        used = self.kv.length

        def kept(buf: Tensor) -> Tensor:
            out = buf.new_empty(len(rows), *buf.shape[1:])
            out[:, :, :used] = buf[rows, :, :used]
            return out

        self.kv.k, self.kv.v = [kept(k) for k in self.kv.k], [kept(v) for v in self.kv.v]
        self.valid = self.valid[rows]


def pad(rows: list[list[int]], T: int, device) -> Tensor:
    return torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)


class BatchModelDrafter:
    """The draft model (SpS, Leviathan et al. 2023), drafting gamma tokens for every row at once in its own ragged
    cache. After each verification, accept(n) marks the row's rejected drafts as holes."""

    def __init__(self, model: Transformer):
        self.model = model

    def reset(self, prompts: list[list[int]]) -> None:
        self.cache, self.seen, self.draft_slots = RaggedCache(self.model, len(prompts)), [0] * len(prompts), []

    def propose(
        self, contexts: list[list[int]], gamma: int, warp: Warp, generator: torch.Generator | None
    ) -> list[tuple[list[int], Tensor]]:
        device = self.model.device
        if gamma == 0:  # nothing to draft (a row is at its end): the context is caught up next time
            self.draft_slots = []
            return [([], None, None) for _ in contexts]
        new = [c[s:] for c, s in zip(contexts, self.seen)]  # the prompt, then the correction (+ our last draft)
        T = max(len(n) for n in new)
        self.cache.room_for(T + gamma)
        positions, mask = self.cache.call_inputs([len(n) for n in new], self.seen, T)
        logits = self.model(pad(new, T, device), self.cache.kv, positions=positions, attn_mask=mask)  # [B, T, V]
        logits = logits[torch.arange(len(new)), torch.tensor([len(n) - 1 for n in new])]  # [B, V]
        self.seen, self.draft_slots = [len(c) for c in contexts], []
        drafts, qs, confidence = [[] for _ in contexts], [[] for _ in contexts], [[] for _ in contexts]
        for i in range(gamma):
            q, raw = warp(logits), torch.softmax(logits.float(), dim=-1)  # [B, V]: raw, for TETRIS even at T=0
            for b in range(len(contexts)):
                drafts[b].append(sample_token(q[b], generator))
                qs[b].append(q[b])
                confidence[b].append(float(raw[b, drafts[b][-1]]))
            if i == gamma - 1:
                break
            self.draft_slots.append(self.cache.kv.length)
            positions, mask = self.cache.call_inputs([1] * len(contexts), [len(c) + i for c in contexts], 1)
            last = torch.tensor([[d[-1]] for d in drafts], device=device)
            logits = self.model(last, self.cache.kv, positions=positions, attn_mask=mask)[:, -1]
        return [(d, torch.stack(q), c) for d, q, c in zip(drafts, qs, confidence)]

    def accept(self, n_accepted: list[int]) -> None:
        for b, n in enumerate(n_accepted):  # fed drafts d_1 .. d_(gamma-1): keep the accepted ones
            self.cache.valid[b, self.draft_slots[n:]] = False
            self.seen[b] += min(n, len(self.draft_slots))

    def keep_rows(self, rows: list[int]) -> None:
        self.cache.keep_rows(rows)
        self.seen = [self.seen[r] for r in rows]


class BatchPromptLookup:
    """Prompt lookup (Saxena 2023) for each row on its own: no model, so nothing to batch; q is one-hot."""

    def __init__(self, lookup: PromptLookupDrafter | None = None):
        self.lookup = lookup or PromptLookupDrafter()

    def reset(self, prompts: list[list[int]]) -> None:
        pass

    def propose(
        self, contexts: list[list[int]], gamma: int, warp: Warp, generator: torch.Generator | None
    ) -> list[tuple[list[int], Tensor | None, list[float] | None]]:
        return [(*self.lookup.propose(c, gamma, warp, generator), None) for c in contexts]

    def accept(self, n_accepted: list[int]) -> None:
        pass

    def keep_rows(self, rows: list[int]) -> None:
        pass


class NoDrafts(BatchPromptLookup):
    """Drafts nothing: the batched loop then verifies one token per row per call, which is batched autoregressive
    decoding (the baseline of bench.py --batch, through the same code)."""

    def propose(self, contexts, gamma, warp, generator):
        return [([], None, None) for _ in contexts]


class CrossSampleLookup(BatchPromptLookup):
    """Speculative decoding for multi-sample inference (reading list, 2025): n samples of ONE prompt, each drafted
    by prompt lookup over the other samples' text as well as its own (the other texts first, its own last, so
    the latest match wins). The drafts depend only on text already sampled, never on this step's draws, so the
    one-hot rule keeps every sample exactly the target's."""

    def propose(self, contexts, gamma, warp, generator):
        out = []
        for b, c in enumerate(contexts):
            others = [t for i, other in enumerate(contexts) if i != b for t in other]
            out.append((*self.lookup.propose(others + c, gamma, warp, generator), None))
        return out


def select_drafts(confidence: list[list[float] | None], lengths: list[int], budget: int) -> list[int]:
    """TETRIS (Wu et al. 2025): under a budget of draft tokens per batched call, keep the drafts most likely to be
    accepted, across rows. A draft's chance is the product of the draft's probabilities of it and of the drafts
    before it; the products fall along a chain, so the best `budget` are a prefix of each row's chain. Rows
    without probabilities (prompt lookup) count each draft as 1: earlier positions first, row by row.
    Returns how many drafts each row keeps."""
    ranked = []
    for b, (conf, n) in enumerate(zip(confidence, lengths)):
        chance = 1.0
        for i in range(n):
            chance *= conf[i] if conf is not None else 1.0
            ranked.append((chance, -i, -b))  # ties: earlier positions, then earlier rows
    keep = [0] * len(lengths)
    for _, _, b in sorted(ranked, reverse=True)[: max(0, budget)]:
        keep[-b] += 1
    return keep


BatchDrafter = BatchModelDrafter | BatchPromptLookup


class RowLengths(Protocol):
    """How long each active row's chain is, each step of batch_speculative_generate (its `lengths` argument): how
    far the drafter drafts every row, then how many of each row's drafts the target verifies."""

    def reset(self, rows: int) -> None: ...  # a generation of `rows` rows starts

    def gamma(self, caps: list[int]) -> int: ...  # drafts to make for every row; row i can use at most caps[i]

    def keep(self, drafted: list[int], gamma: int) -> list[int]: ...  # of row i's drafted[i], how many to verify

    def update(self, drafted: list[int], accepted: list[int]) -> None: ...  # after each verification, per row

    def keep_rows(self, rows: list[int]) -> None: ...  # the rows that stay in the batch, by index


class FixedRows:
    """gamma drafts for every row, every step, all verified (Algorithm 2's fixed gamma): the loop's default."""

    def __init__(self, gamma: int):
        self.fixed = gamma

    def reset(self, rows: int) -> None:
        pass

    def gamma(self, caps: list[int]) -> int:
        return self.fixed

    def keep(self, drafted: list[int], gamma: int) -> list[int]:
        return drafted

    def update(self, drafted: list[int], accepted: list[int]) -> None:
        pass

    def keep_rows(self, rows: list[int]) -> None:
        pass


@torch.inference_mode()
def batch_speculative_generate(
    target: Transformer,
    drafter: BatchDrafter,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    gamma: int = 4,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eot: int | None = None,
    budget: int | None = None,
    verifier: Verifier | None = None,
    lengths: RowLengths | None = None,
) -> tuple[list[list[int]], Stats]:
    """Algorithm 2 for B prompts at once (survey §9). Each step: every active row drafts, ONE target call verifies
    all rows' chains (padded to the longest), each row keeps its own accepted prefix. Stats count per row, so tau
    is tokens per row per call. `lengths` sets how far the rows draft and how many of each row's drafts are
    verified (default FixedRows(gamma); SpecServe's cost model: specserve.SpecServe); a step whose rows verify no
    drafts is a plain batched decoding call. `budget` caps the drafts verified per call, across rows, chosen by
    TETRIS (select_drafts). Neither changes how a draft is verified, only how many there are: both stay lossless.

    Invariant: for every active row, the target's valid slots hold its context but the last token."""
    check_generator(temperature, generator)
    device, warp, stats = target.device, warp_for(temperature, top_k, top_p), Stats()
    verifier = verifier or exact(temperature)
    contexts, rows = [list(p) for p in prompts], list(range(len(prompts)))  # rows: the batch's original indices
    budgets = [min(max_new_tokens, target.config.max_position_embeddings - len(p)) for p in prompts]
    cache = RaggedCache(target, len(prompts))
    drafter.reset(prompts)
    lengths = lengths or FixedRows(gamma)
    lengths.reset(len(prompts))
    T = max(len(p) - 1 for p in prompts)
    if T > 0:  # prefill, right-padded: a shorter prompt leaves holes at the end
        positions, mask = cache.call_inputs([len(p) - 1 for p in prompts], [0] * len(prompts), T)
        prompt = pad([p[:-1] for p in prompts], T, device)
        target(prompt, cache.kv, positions=positions, attn_mask=mask, logits_to_keep=1)  # K/V only
    while rows:
        t0 = time.perf_counter()
        # 1. How far to draft. Near a row's end, every row drafts less: no row may write past its context (its
        # budget), and all rows share the slots a call writes
        g = min(lengths.gamma([budgets[r] - 1 for r in rows]), min(budgets[r] for r in rows) - 1)
        proposals = drafter.propose([contexts[r] for r in rows], g, warp, generator)  # 2. draft, every row
        drafts = [d[: max(0, budgets[r] - 1)] for (d, _, _), r in zip(proposals, rows)]
        keep = lengths.keep([len(d) for d in drafts], g)  # 3. how many of each row's drafts to verify ...
        if budget is not None:  # ... and, under a budget per call, TETRIS's choice among those
            keep = select_drafts([c for _, _, c in proposals], keep, budget)
        drafts = [d[:k] for d, k in zip(drafts, keep)]
        qs = [q[: len(d)] if q is not None else None for (_, q, _), d in zip(proposals, drafts)]
        t1 = time.perf_counter()
        G = max(len(d) for d in drafts)
        cache.room_for(1 + G)
        s0 = cache.kv.length
        positions, mask = cache.call_inputs([1 + len(d) for d in drafts], [len(contexts[r]) - 1 for r in rows], 1 + G)
        tokens = pad([contexts[r][-1:] + d for r, d in zip(rows, drafts)], 1 + G, device)
        logits = target(tokens, cache.kv, positions=positions, attn_mask=mask)  # 4. one call: [B, 1 + G, V]
        accepted, done = [], []
        seconds = dict(draft_seconds=(t1 - t0) / len(rows), verify_seconds=(time.perf_counter() - t1) / len(rows))
        for i, (r, d, q) in enumerate(zip(rows, drafts, qs)):  # 5. verify each row on its own
            row_logits = logits[i, : 1 + len(d)]
            p, draft_tokens = warp(row_logits), torch.tensor(d, dtype=torch.long, device=device)
            n, token = verifier.chain(row_logits, p, q, draft_tokens, generator)
            cache.valid[i, s0 + 1 + n : s0 + 1 + G] = False  # 6. the rejected drafts become holes
            new, finished = cut_at_eot(d[:n] + [token], eot)
            compared = min(n + 1, len(d))
            stats.record(
                drafted=len(d),
                accepted=n,
                compared=compared,
                produced=len(new),
                **seconds,
                expected_accepted=theory_acceptance(p[:compared], q, draft_tokens[:compared]),
            )
            contexts[r], budgets[r] = contexts[r] + new, budgets[r] - len(new)
            accepted.append(n)
            if finished or budgets[r] <= 0:
                done.append(i)
        drafter.accept(accepted)
        lengths.update([len(d) for d in drafts], accepted)  # 7. each row's acceptance, for the next lengths
        if done:  # finished rows leave the batch
            keep = [i for i in range(len(rows)) if i not in done]
            cache.keep_rows(keep)
            drafter.keep_rows(keep)
            lengths.keep_rows(keep)
            rows = [rows[i] for i in keep]
    return [c[len(p) :] for c, p in zip(contexts, prompts)], stats


@torch.inference_mode()
def batch_tree_speculative_generate(
    target: Transformer,
    drafters: list,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eot: int | None = None,
    verifier: Verifier | None = None,
) -> tuple[list[list[int]], Stats]:
    """Token trees (§6.3) for B prompts at once, one tree drafter per row (EAGLE-2's head keeps a cache per row,
    so drafting runs row by row; the target call, the costly part, is batched). ONE target call scores every row's
    tree, padded to the largest, with each row's tree mask and positions (prefix + depth). A node off its row's
    accepted path becomes a hole, so nothing is moved: the path's K/V stay where they were written, and attention
    does not care in which slot a key sits, only at which position it was rotated.

    Invariant: for every active row, the valid slots hold its context but the last token, and features[r] holds
    the target's last hidden state of each of those tokens (EAGLE reads them)."""
    check_generator(temperature, generator)
    device, warp, stats = target.device, warp_for(temperature, top_k, top_p), Stats()
    verifier = verifier or exact(temperature)
    contexts, rows = [list(p) for p in prompts], list(range(len(prompts)))
    budgets = [min(max_new_tokens, target.config.max_position_embeddings - len(p)) for p in prompts]
    cache = RaggedCache(target, len(prompts))
    features = [torch.zeros(0, target.config.hidden_size, device=device) for _ in prompts]
    for drafter in drafters:
        drafter.reset()
    T = max(len(p) - 1 for p in prompts)
    if T > 0:  # prefill, right-padded, keeping each row's hidden states for its drafter
        positions, mask = cache.call_inputs([len(p) - 1 for p in prompts], [0] * len(prompts), T)
        prompt = pad([p[:-1] for p in prompts], T, device)
        _, hidden = target(prompt, cache.kv, positions=positions, attn_mask=mask, return_hidden=True, logits_to_keep=1)
        features = [hidden[b, : len(p) - 1] for b, p in enumerate(prompts)]
    while rows:
        t0 = time.perf_counter()
        room = cache.kv.max_len - max(len(contexts[r]) - 1 for r in rows)  # slots left once compacted
        trees = [
            trim_tree(drafters[r].propose_tree(contexts[r], features[r], warp, generator), budgets[r] - 1, room)
            for r in rows
        ]  # 1. draft, row by row
        t1 = time.perf_counter()
        N = max(len(t) for t in trees)
        cache.room_for(N)
        s0 = cache.kv.length
        positions, mask = cache.call_inputs([len(t) for t in trees], [len(contexts[r]) - 1 for r in rows], N)
        for i, (r, t) in enumerate(zip(rows, trees)):  # each row's tree: its ancestors only, positions by depth
            mask[i, : len(t), s0 : s0 + len(t)] = tree_attention_mask(t, 0, device)
            positions[i, : len(t)] = tree_positions(t, len(contexts[r]) - 1, device)
        logits, hidden = target(
            pad([t.tokens for t in trees], N, device), cache.kv, positions=positions, attn_mask=mask, return_hidden=True
        )  # 2. one call: [B, N, V]
        done = []
        seconds = dict(draft_seconds=(t1 - t0) / len(rows), verify_seconds=(time.perf_counter() - t1) / len(rows))
        for i, (r, t) in enumerate(zip(rows, trees)):  # 3. verify each row's tree on its own
            path, token = verifier.tree(logits[i, : len(t)], warp(logits[i, : len(t)]), t, generator)
            kept = [0] + path
            cache.valid[i, s0 : s0 + N] = False  # 4. the root and the accepted path stay; the rest become holes
            cache.valid[i, [s0 + k for k in kept]] = True
            features[r] = torch.cat([features[r], hidden[i, kept]])
            new, finished = cut_at_eot([t.tokens[k] for k in path] + [token], eot)
            stats.record(
                drafted=len(t) - 1,
                accepted=len(path),
                compared=min(len(path) + 1, max(depths(t))),
                produced=len(new),
                **seconds,
            )
            contexts[r], budgets[r] = contexts[r] + new, budgets[r] - len(new)
            if finished or budgets[r] <= 0:
                done.append(i)
        if done:
            keep = [i for i in range(len(rows)) if i not in done]
            cache.keep_rows(keep)
            rows = [rows[i] for i in keep]
    return [c[len(p) :] for c, p in zip(contexts, prompts)], stats
