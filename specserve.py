"""SpecServe's adaptive speculation for batched decoding (survey §9: speculative decoding in batched inference, and
the speculation length; Huang et al. 2025, "SpecServe: Efficient and SLO-Aware Large Language Model Serving with
Adaptive Speculative Decoding", published as AdaSpec at SoCC 2025).

The drafts that are free at batch 1 are paid for once the batch fills the hardware: a verify call of B rows of
1 + gamma tokens does B (1 + gamma) tokens of arithmetic. SpecServe models what a step costs from the draft and
verify times, profiled against the batch and the tokens, and each request's acceptance from its own history, and
each step picks each request's speculative length to maximise the batch's expected tokens per second, down to no
speculation at all when the batch is busy. Here:

    cost      StepCost: the target's batched call, profiled over batch size x tokens per row (cost.BatchCostCurve,
              cached per machine), plus the draft model's proposal of gamma tokens for every row, profiled over
              batch size x gamma the same way (none for prompt lookup, which runs no model)
    estimate  one draft_length.AcceptanceEstimate per row (CostAware's: a light optimistic Beta prior and
              exponentially forgotten counts)
    choice    before drafting, the gamma maximising  sum_rows E(alpha_row, min(gamma, cap_row)) / step ms, where
              E(alpha, g) = (1 - alpha^(g+1)) / (1 - alpha)  (Leviathan et al. 2023), over 0 .. most; after
              drafting, the same over what each row did draft (prompt lookup may find none), drafting paid

Where this departs from the paper, and why: SpecServe chooses a length per request. batched.py pads every row to
the longest chain, so a call costs the same whichever rows fill it up to that length, and a longer chain never
lowers a row's expected tokens: the best lengths are one longest chain G for the call and min(G, what the row has)
for each row, with G chosen over all rows' estimates together. SpecServe's SLO awareness (its latency targets)
and the rest of its drafting and verification algorithms are not here: this is its cost model and its per-step
choice of lengths.

Lossless: the lengths depend on past verifications, the profiled curves and how many drafts each row has, never
on this step's accept tests, and the drafts kept are verified exactly as with a fixed gamma
(tests/test_specserve.py).

    python bench.py --batch 1,4,16,32 -n 32 --specserve
"""

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from batched import BatchModelDrafter
from cost import (
    BATCH_PREFIX,
    BATCHES,
    BatchCostCurve,
    cache_dir,
    cached_batch_cost_curve,
    clock,
    curve_key,
    fingerprint,
    stored_or_measured,
)
from draft_length import AcceptanceEstimate, expected_tokens
from model import Transformer
from specdec import warp_for

DRAFT_GAMMAS = (1, 2, 4)  # drafts per row at which a drafter is timed; its cost is about linear in them


@dataclass
class StepCost:
    """What one step of the batched chain loop costs, in ms: the drafter's proposal and the target's verify call."""

    verify: BatchCostCurve  # the target's batched calls of B rows of T tokens (cost.cached_batch_cost_curve)
    draft: BatchCostCurve | None = None  # the drafter's proposals for B rows of gamma drafts (its sizes are the
    # gammas: cached_drafter_cost_curve); None: drafting is not modelled (prompt lookup: a search per row)

    def ms(self, batch: int, gamma: int, longest: int) -> float:
        """A step of `batch` rows that drafts gamma tokens a row (nothing at gamma 0) and verifies at most
        `longest` of them a row, in one call of 1 + longest tokens a row."""
        drafting = self.draft.ms(batch, gamma) if self.draft is not None and gamma > 0 else 0.0
        return drafting + self.verify.ms(batch, 1 + longest)


@torch.inference_mode()
def measure_drafter_cost_curve(
    drafter: BatchModelDrafter,
    batches: tuple[int, ...] = BATCHES,
    gammas: tuple[int, ...] = DRAFT_GAMMAS,
    prefix: int = BATCH_PREFIX,
    repeats: int = 5,
    between: Callable[[int], object] | None = None,
) -> BatchCostCurve:
    """Wall-clock ms of drafter.propose for B rows and gamma drafts each after `prefix` tokens a row, for each B in
    `batches` and gamma in `gammas` (1 added to both), greedy, the least of the repeats (as
    cost.measure_batch_cost_curve). The whole proposal is timed, not only the draft model's calls: at batch 32 its
    per-row sampling in Python costs about as much as the calls. Every draft is accepted and each row's context
    grows by its drafts and one token, so every timed proposal feeds 2 new tokens, as in a decoding step.
    between(B), untimed after each proposal, stands for the loop's target call, which evicts the draft model from
    the processor's caches: timed back to back with itself, a proposal took about a quarter less (2 CPU cores)."""
    batches, gammas = sorted(set(batches) | {1}), sorted(set(gammas) | {1})
    warp, generator = warp_for(0.0, 0, 1.0), torch.Generator().manual_seed(0)
    vocab_size, device = drafter.model.config.vocab_size, drafter.model.device
    times: dict[tuple[int, int], list[float]] = {(B, g): [] for B in batches for g in gammas}
    for B in batches:
        contexts = torch.randint(vocab_size, (B, prefix), generator=generator).tolist()
        drafter.reset(contexts)
        for r in range(repeats + 1):
            for g in gammas if r % 2 else gammas[::-1]:  # alternate the order: drift cancels out
                t0 = clock(device)
                proposals = drafter.propose(contexts, g, warp, generator)
                elapsed = clock(device) - t0
                drafter.accept([g] * B)
                contexts = [c + d + [0] for c, (d, _, _) in zip(contexts, proposals)]
                if between is not None:
                    between(B)
                if r:  # round 0 warms up (its first proposal feeds the prefix)
                    times[(B, g)].append(1000 * elapsed)
    spread = max((max(ts) - min(ts)) / statistics.median(ts) for ts in times.values())
    return BatchCostCurve(batches, gammas, [[min(times[(B, g)]) for g in gammas] for B in batches], spread)


def cached_drafter_cost_curve(
    drafter: BatchModelDrafter,
    between: Callable[[int], object] | None = None,
    directory: Path | None = None,
    refresh: bool = False,
) -> BatchCostCurve:
    """measure_drafter_cost_curve, cached per machine beside the target's curves (cost.py)."""
    key = {
        **curve_key(drafter.model, DRAFT_GAMMAS, False, BATCH_PREFIX),
        "batches": sorted(set(BATCHES) | {1}),
        "drafter": type(drafter).__name__,
    }
    path = (directory or cache_dir()) / f"drafter-cost-{fingerprint(key)}.json"
    measure = lambda: measure_drafter_cost_curve(drafter, between=between)
    return stored_or_measured(path, key, BatchCostCurve, measure, refresh)


def measured_step_cost(target: Transformer, drafter: BatchModelDrafter | None = None) -> StepCost:
    """StepCost from this machine's profiled curves of the target's batched calls and of the draft model's
    proposals (measured the first time, a few seconds, then read from the cache folder); no drafter: prompt
    lookup, whose cost is not modelled."""
    if drafter is None:
        return StepCost(cached_batch_cost_curve(target))
    one_token_call = lambda B: target(torch.zeros(B, 1, dtype=torch.long, device=target.device))
    return StepCost(cached_batch_cost_curve(target), cached_drafter_cost_curve(drafter, one_token_call))


class SpecServe:
    """Per-row draft lengths for batched.batch_speculative_generate (its `lengths` argument, a RowLengths): each
    step, the lengths with the most expected tokens per ms of the whole step, from the StepCost model and each
    row's running acceptance estimate, in two decisions:

        gamma(caps)          how far the drafter drafts every row, as if each row could use min(gamma, its cap)
        keep(drafted, gamma) how many of each row's drafts to verify, now that the drafts are known (prompt lookup
                             finds fewer than gamma, or none, for some rows), the drafting already paid for

    Both pick the longest chain G of the call and give each row min(G, what it has): with padded calls that is the
    best per-row choice. G = 0 for every row, where no length pays, makes the step a plain batched decoding call.

    A row that has drafted nothing for a while forgets its counts and returns to the prior's mean (0.9), so the
    batch probes again when the estimates say drafting might pay; where even that cannot pay (a busy batch whose
    long calls cost nearly their tokens' worth), gamma stays 0."""

    def __init__(
        self,
        cost: StepCost,
        most: int | None = None,
        prior: tuple[float, float] = (0.9, 0.1),
        decay: float = 0.9,
    ):
        most = max(cost.verify.sizes) - 1 if most is None else most  # default: the longest the curve measured
        if most < 0 or not 0 <= decay < 1 or min(prior) <= 0:
            raise ValueError("need most >= 0, 0 <= decay < 1 and a prior with positive counts")
        self.cost, self.most, self.prior, self.decay = cost, most, prior, decay
        self.rows: list[AcceptanceEstimate] = []

    def reset(self, rows: int) -> None:
        self.rows = [AcceptanceEstimate(self.prior, self.decay) for _ in range(rows)]

    def tokens_per_ms(self, lengths: list[int], gamma: int) -> float:
        """The batch's expected tokens per ms of a step that drafts gamma tokens a row and verifies lengths[i] of
        row i's."""
        tokens = sum(expected_tokens(row.alpha, n) for row, n in zip(self.rows, lengths))
        return tokens / self.cost.ms(len(lengths), gamma, max(lengths))

    def best(self, available: list[int], longest: int, gamma: int | None) -> int:
        """The longest chain G in [0, longest] with the most tokens per ms, each row verifying min(G, available);
        gamma None: drafting G too. Ties: the shorter."""
        rate = lambda G: self.tokens_per_ms([min(G, n) for n in available], G if gamma is None else gamma)
        return max(range(longest + 1), key=rate)

    def gamma(self, caps: list[int]) -> int:
        return self.best(caps, self.most, None)

    def keep(self, drafted: list[int], gamma: int) -> list[int]:
        G = self.best(drafted, max(drafted), gamma)
        return [min(G, n) for n in drafted]

    def update(self, drafted: list[int], accepted: list[int]) -> None:
        for row, d, a in zip(self.rows, drafted, accepted):
            row.observe(d, a)

    def keep_rows(self, rows: list[int]) -> None:
        self.rows = [self.rows[i] for i in rows]
