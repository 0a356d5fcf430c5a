"""What a target call costs against the number of tokens it takes: the curve that every speedup rests on.

Leviathan et al. 2023 count time in target calls (§3.3, Thm 3.8): a step of gamma drafts costs gamma c + 1, c the
draft's cost over a target call, since a call verifying gamma + 1 tokens is taken to cost as much as a call of
one. Their §3.4 counts what that hides: the verify call does gamma + 1 times the arithmetic, which is free only
while the hardware waits on memory (decoding is memory-bound, survey §3.1 and §4.1). The survey names the
drafter's cost beside the acceptance rate as what the speedup hinges on (§4.2), and the trade-off between the two,
and the speculation length, as open questions (§9). On a small model on a CPU the extra tokens are not free, and
the curve need not even be monotone: the matrix library picks its kernel by the number of rows.

This module measures the curve once per machine (ms per call of T new tokens after a realistic prefix, for draft
chains and for token trees, which add a tree mask and their own positions), caches it under the user's cache
folder, and prints or plots it; draft_length.CostAware plans with it. A stored curve is trusted only after a quick
re-measurement of a few sizes agrees with it (curve_holds; draft costs alike, not the batched curve, whose least of
the repeats load cannot lower), at most every CHECK_AFTER seconds, and the key holds a hash of model.py: a curve
stored under a crowded machine or older code is measured again, not planned with.

    curve = cached_cost_curve(target, tree=True)   # ~2 s the first time on the shipped target; then a quick check
    curve.ratio(5)                                 # a call of 5 tokens over a call of one
    print_cost_curve(curve)
    batched = cached_batch_cost_curve(target)      # batched chain calls: ms against rows x tokens per row, a few s
    batched.ms(16, 5)                              # 16 rows of 5 tokens (specserve.SpecServe plans with it)

Timings are wall-clock medians of a few interleaved rounds after a warm-up (the batched curve's: the least of them);
other processes on the same cores make them noisy (see CostCurve.spread), and on a CPU the thread count changes the
whole curve, so it is part of the key.
"""

import copy
import hashlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from model import Transformer, as_plain_linears
from tree import Tree, tree_attention_mask, tree_positions

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # tokens per call that are measured; 1 is always among them
PREFIX = 256  # tokens already cached before each measured call (a prompt of a few hundred tokens)
CACHE_FORMAT = 1  # bump when the stored JSON changes, so that old files are measured afresh
BATCHES = (1, 4, 16, 32)  # rows per batched call that are measured (BatchCostCurve); linear in between
BATCH_SIZES = (1, 2, 3, 5, 9)  # tokens per row of a batched call: 0 to 8 drafts and the row's last token
BATCH_PREFIX = 128  # cached slots per row before each batched call (bench.py --batch cuts its prompts to 128)
# A curve whose repeats spread wider than this (max - min over the median) is used but not stored: with two
# threads and another busy process on two cores a call can take 100x its quiet time, at random.
KEEP_SPREAD = 1.0
# A stored curve is measured afresh when a quick re-measurement (CHECK_SIZES, chain calls, 3 rounds) finds any of its
# ratios off by this factor: a curve can be stored quiet and still wrong, e.g. measured while other work crowded
# the cores (calls of 2-32 tokens at 13-17x a one-token call, steadily, in one curve stored during a test run).
RECHECK = 1.5
CHECK_SIZES = (1, 2, 4, 8)
CHECK_AFTER = 600.0  # seconds: a curve checked this recently is used unchecked (bench.py builds a policy per row)


@dataclass
class CostCurve:
    sizes: list[int]  # tokens per call, ascending, starting at 1
    chain_ms: list[float]  # median ms of a chain call (causal, consecutive positions) of sizes[i] tokens
    tree_ms: list[float] | None = None  # ... of a tree call (tree mask, positions = prefix + depth); None: not measured
    spread: float = 0.0  # the worst (max - min) / median over the repeats of any size: how noisy the timing was

    def ms(self, tokens: float, tree: bool = False) -> float:
        """Milliseconds of a call of `tokens` tokens, linear between measured sizes and beyond the last two."""
        return interpolate(self.sizes, self.tree_ms if tree and self.tree_ms is not None else self.chain_ms, tokens)

    def ratio(self, tokens: float, tree: bool = False) -> float:
        """A call of `tokens` tokens over a one-token call: Leviathan et al.'s verify cost v, measured."""
        return self.ms(tokens, tree) / self.ms(1, tree)


def interpolate(xs: list[int], ys: list[float], x: float) -> float:
    """ys at x, linear between the points (xs ascending), the first y below xs[0], the last segment's slope past
    the last point."""
    if len(xs) == 1:
        return ys[0]
    x = max(x, xs[0])
    i = next((i for i in range(1, len(xs)) if x <= xs[i]), len(xs) - 1)  # the segment [xs[i-1], xs[i]]
    slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + slope * (x - xs[i - 1])


@dataclass
class BatchCostCurve:
    """What a batched chain call costs against both of its sizes: rows in the batch and tokens per row (the
    batched loop pads every row to the longest chain, so a call of B rows carrying at most T tokens each costs
    ms(B, T) whatever the rows' own lengths). Survey §9: the drafts that are free at batch 1 are paid for once
    the batch fills the hardware."""

    batches: list[int]  # rows per call, ascending, starting at 1
    sizes: list[int]  # tokens per row, ascending, starting at 1
    grid_ms: list[list[float]]  # grid_ms[i][j]: ms of a call of batches[i] rows of sizes[j] tokens each
    spread: float = 0.0  # the worst (max - min) / median over the repeats of any cell

    def ms(self, batch: float, tokens: float) -> float:
        """Milliseconds of a call of `batch` rows of `tokens` tokens: linear in tokens along each measured batch
        size, then linear in the batch size between them (and past the last two)."""
        return interpolate(self.batches, [interpolate(self.sizes, row, tokens) for row in self.grid_ms], batch)


# ---- measuring ------------------------------------------------------------------------------------------------


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # time the kernels, not their launch
    return time.perf_counter()


def time_rounds(calls: dict, device: torch.device, repeats: int) -> dict:
    """key -> ms of calls[key] = (run, reset) in each of `repeats` rounds, after a warm-up round. All calls are
    interleaved round by round, in an order that alternates so that drift cancels out; reset (rolling a cache back)
    runs after each, untimed."""
    times = {key: [] for key in calls}
    for r in range(repeats + 1):
        for key in list(calls) if r % 2 else list(calls)[::-1]:
            run, reset = calls[key]
            t0 = clock(device)
            run()
            elapsed = clock(device) - t0
            reset()
            if r:  # round 0 warms up
                times[key].append(1000 * elapsed)
    return times


def sample_tree(tokens: list[int]) -> Tree:
    """A tree of len(tokens) nodes, each node i > 0 under node (i - 1) // 2: a bushy tree like EAGLE-2's. Only its
    size matters to the cost (the mask is dense either way); its depths set the positions."""
    return Tree(tokens, [-1] + [(i - 1) // 2 for i in range(1, len(tokens))], [0.0] * len(tokens))


def call_for(model: Transformer, cache, tokens: torch.Tensor, tree: bool, prefix: int):
    """The target call that the loops make on `tokens` [1, T] after `prefix` cached tokens, as a closure."""
    if not tree:
        return lambda: model(tokens, cache)
    t = sample_tree(tokens[0].tolist())
    positions, mask = tree_positions(t, prefix, tokens.device), tree_attention_mask(t, prefix, tokens.device)
    # As tree_speculative_generate calls it: embeddings in, hidden states out
    return lambda: model(None, cache, positions, mask, return_hidden=True, inputs_embeds=model.embed_tokens(tokens))


def prefilled_calls(model: Transformer, sizes: list[int], kinds: list[bool], prefix: int) -> dict:
    """(tree, T) -> (run, reset): the call of T new tokens after `prefix` cached tokens (prefilled here), chain or
    tree, for time_rounds; reset rolls the cache back to the prefix."""
    device, cache = model.lm_head.weight.device, model.new_cache()
    generator = torch.Generator().manual_seed(0)  # the tokens do not change the cost; a fixed draw anyway
    text = torch.randint(model.config.vocab_size, (1, prefix + sizes[-1]), generator=generator).to(device)
    if prefix:
        model(text[:, :prefix], cache)
    reset = partial(cache.truncate, prefix)
    tokens = {T: text[:, prefix : prefix + T] for T in sizes}
    return {(k, T): (call_for(model, cache, tokens[T], k, prefix), reset) for k in kinds for T in sizes}


def sizes_and_prefix(model: Transformer, sizes: tuple[int, ...], prefix: int) -> tuple[list[int], int]:
    """(sizes with 1 added, sorted; the prefix, shortened where prefix + the largest size would not fit)."""
    sizes, max_len = sorted(set(sizes) | {1}), model.config.max_position_embeddings
    if sizes[0] < 1 or sizes[-1] > max_len:
        raise ValueError(f"tokens per call must be in [1, {max_len}] (the model's context), got {sizes}")
    return sizes, max(0, min(prefix, max_len - sizes[-1]))


def curve_from(times: dict, sizes: list[int], tree: bool, form: tuple = ()) -> CostCurve:
    """A CostCurve of the medians of time_rounds' times keyed (*form, tree, T)."""
    median = {key: statistics.median(ts) for key, ts in times.items() if key[: len(form)] == form}
    spread = max((max(times[key]) - min(times[key])) / median[key] for key in median)
    chain = [median[(*form, False, T)] for T in sizes]
    return CostCurve(sizes, chain, [median[(*form, True, T)] for T in sizes] if tree else None, spread)


@torch.inference_mode()
def measure_cost_curve(
    model: Transformer,
    sizes: tuple[int, ...] = SIZES,
    tree: bool = False,
    prefix: int = PREFIX,
    repeats: int = 5,
) -> CostCurve:
    """Median wall-clock ms of a call of T new tokens for each T in `sizes` (1 added if missing), after `prefix`
    cached tokens: chain calls and, with tree=True, tree calls too. All calls are interleaved round by round (a
    warm-up round first, then `repeats`), so that a change of load hits every size alike."""
    sizes, prefix = sizes_and_prefix(model, sizes, prefix)
    calls = prefilled_calls(model, sizes, [False, True] if tree else [False], prefix)
    return curve_from(time_rounds(calls, model.lm_head.weight.device, repeats), sizes, tree)


@torch.inference_mode()
def measure_forms(
    model: Transformer, sizes: tuple[int, ...] = SIZES, prefix: int = PREFIX, repeats: int = 5
) -> tuple[CostCurve, CostCurve]:
    """(chain calls as x @ W^T, the same calls as the model computes them): every projection of a plain copy of
    the model (nn.Linear, weights shared) against model.Linear's few-row form, interleaved round by round as in
    measure_cost_curve. What model.Linear gains, measured on this machine."""
    sizes, prefix = sizes_and_prefix(model, sizes, prefix)
    plain = as_plain_linears(copy.deepcopy(model, memo={id(p): p for p in model.parameters()}))
    calls = {("plain", *key): call for key, call in prefilled_calls(plain, sizes, [False], prefix).items()}
    calls |= {("model", *key): call for key, call in prefilled_calls(model, sizes, [False], prefix).items()}
    times = time_rounds(calls, model.lm_head.weight.device, repeats)
    return curve_from(times, sizes, False, ("plain",)), curve_from(times, sizes, False, ("model",))


@torch.inference_mode()
def measure_batch_cost_curve(
    model: Transformer,
    batches: tuple[int, ...] = BATCHES,
    sizes: tuple[int, ...] = BATCH_SIZES,
    prefix: int = BATCH_PREFIX,
    repeats: int = 3,
) -> BatchCostCurve:
    """Wall-clock ms of a batched chain call, as batched.batch_speculative_generate makes it (per-row positions
    and an explicit [B, T, prefix + T] mask), of B rows of T new tokens after `prefix` cached slots, for each B in
    `batches` and T in `sizes` (1 added to both), interleaved round by round as in measure_cost_curve. The least
    of the repeats, not their median: the curve is read for ratios between cells, and other processes on the
    cores only ever slow a call, at random, so the least is the closest to each call's own cost (with a dozen busy
    processes on 2 cores, the median of a 2 ms call was 30 ms). The prefix is zeros written into the cache, not a
    prefill: a call's cost does not depend on the values it attends to, and prefilling 32 rows would take longer
    than all the measured calls."""
    batches, sizes = sorted(set(batches) | {1}), sorted(set(sizes) | {1})
    device = model.lm_head.weight.device
    prefix = max(0, min(prefix, model.config.max_position_embeddings - sizes[-1]))
    generator = torch.Generator().manual_seed(0)  # the tokens do not change the cost; a fixed draw anyway
    calls = {}
    for B in batches:
        cache = model.new_cache(B)
        for buf in cache.k + cache.v:
            buf[:, :, :prefix].zero_()
        cache.length = prefix
        for T in sizes:
            tokens = torch.randint(model.config.vocab_size, (B, T), generator=generator).to(device)
            positions = (prefix + torch.arange(T, device=device)).expand(B, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = torch.cat([torch.ones(T, prefix, dtype=torch.bool, device=device), causal], dim=1).expand(B, T, -1)
            run = partial(model, tokens, cache, positions=positions, attn_mask=mask)
            calls[(B, T)] = (run, partial(cache.truncate, prefix))
    times = time_rounds(calls, device, repeats)
    spread = max((max(ts) - min(ts)) / statistics.median(ts) for ts in times.values())
    return BatchCostCurve(batches, sizes, [[min(times[(B, T)]) for T in sizes] for B in batches], spread)


# ---- the per-machine cache ------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The processor's name (Linux: /proc/cpuinfo's "model name"), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def curve_key(model: Transformer, sizes: tuple[int, ...], tree: bool, prefix: int) -> dict:
    """Everything a curve depends on: the model's shape, dtype and device, torch, the processor and its threads
    (and OpenMP's wait policy, which decides how threads fare when other processes share the cores)."""
    w = model.lm_head.weight
    device = str(w.device) + (f" {torch.cuda.get_device_name(w.device)}" if w.device.type == "cuda" else "")
    return {
        "format": CACHE_FORMAT,
        "code": code_version(),
        "config": asdict(model.config),
        "dtype": str(w.dtype),
        "device": device,
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "sizes": sorted(set(sizes) | {1}),
        "tree": tree,
        "prefix": prefix,
    }


def code_version() -> str:
    """A hash of model.py, which decides how a call is computed: a curve measured under older code is stale."""
    source = inspect.getsourcefile(Transformer)  # None where only compiled files were installed
    return hashlib.sha256(Path(source).read_bytes() if source else b"").hexdigest()[:16]


def fingerprint(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/specdec, or ~/.cache/specdec."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specdec"


def cached_cost_curve(
    model: Transformer,
    sizes: tuple[int, ...] = SIZES,
    tree: bool = False,
    prefix: int = PREFIX,
    directory: Path | None = None,
    refresh: bool = False,
) -> CostCurve:
    """The curve measured on this machine before, for this model shape and setting, else measured now and stored
    (directory default: cache_dir()) unless it was too noisy to keep (KEEP_SPREAD). refresh=True measures again.
    A folder that cannot be written only costs the next run a measurement."""
    key = curve_key(model, sizes, tree, prefix)
    path = (directory or cache_dir()) / f"cost-{fingerprint(key)}.json"
    measure, check = lambda: measure_cost_curve(model, sizes, tree, prefix), partial(curve_holds, model, prefix=prefix)
    return stored_or_measured(path, key, CostCurve, measure, refresh, check)


def curve_holds(model: Transformer, stored: CostCurve, prefix: int = PREFIX) -> bool:
    """Whether a quick chain re-measurement at CHECK_SIZES (a fraction of a second on the shipped target, about one
    on SmolLM2) gives every ratio within a factor RECHECK of the stored curve's. Ratios, not milliseconds: a
    machine that is busier now than then slows every size alike."""
    sizes = tuple(T for T in CHECK_SIZES if T in stored.sizes)
    if len(sizes) < 2:  # no ratio to compare: a one-token call over itself is 1 in any curve
        return True
    fresh = measure_cost_curve(model, sizes, prefix=prefix, repeats=3)
    return all(agrees(stored.ratio(T), fresh.ratio(T)) for T in fresh.sizes)


def agrees(stored: float, fresh: float) -> bool:
    """Whether two positive measurements of one ratio are within a factor RECHECK of each other."""
    return stored > 0 and fresh > 0 and abs(math.log(stored / fresh)) < math.log(RECHECK)


def cached_batch_cost_curve(
    model: Transformer,
    batches: tuple[int, ...] = BATCHES,
    sizes: tuple[int, ...] = BATCH_SIZES,
    prefix: int = BATCH_PREFIX,
    directory: Path | None = None,
    refresh: bool = False,
) -> BatchCostCurve:
    """cached_cost_curve for batched calls (measure_batch_cost_curve), stored beside the batch-1 curves."""
    key = {**curve_key(model, sizes, False, prefix), "batches": sorted(set(batches) | {1})}
    path = (directory or cache_dir()) / f"batch-cost-{fingerprint(key)}.json"
    measure = lambda: measure_batch_cost_curve(model, batches, sizes, prefix)
    return stored_or_measured(path, key, BatchCostCurve, measure, refresh)


def stored_or_measured(
    path: Path, key: dict, kind: type, measure: Callable[[], object], refresh: bool, check: Callable | None = None
):
    """The curve of type `kind` stored at `path` under `key`, else measure() stored there if quiet enough. A stored
    curve not checked in the last CHECK_AFTER seconds must pass check(curve), if given, or is measured again; a
    passed check is recorded as the file's modification time."""
    stored, checked = None, 0.0
    if not refresh and path.is_file():
        try:
            raw, checked = json.loads(path.read_text()), path.stat().st_mtime
            stored = kind(**raw["curve"]) if raw["key"] == key else None
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable, gone, or from another format: measure again
    if stored is not None:
        if check is None or time.time() - checked < CHECK_AFTER:
            return stored
        if check(stored):
            try:
                os.utime(path)
            except OSError:
                pass  # a read-only cache: checked again on each use
            return stored
    curve = measure()
    if curve.spread > KEEP_SPREAD:
        return curve
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        written = path.with_suffix(f".{os.getpid()}.tmp")
        written.write_text(json.dumps({"key": key, "curve": asdict(curve)}, indent=1) + "\n")
        written.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass
    return curve


@dataclass
class DraftCost:
    c: float  # the median over rounds of (the draft's one-token call) / (the target's one-token call)
    spread: float = 0.0  # (max - min) / median of those ratios: how noisy the timing was


@torch.inference_mode()
def measure_draft_cost(draft: Transformer, target: Transformer, prefix: int = PREFIX, repeats: int = 9) -> DraftCost:
    """Leviathan et al.'s c as one ratio: a one-token call of the draft, then one of the target, round by round,
    each after `prefix` cached tokens. Two curves measured at different times can disagree by the load between
    them (a c measured beside other work made -l cost draft nothing); within a round both see the same load."""
    calls = {}
    for name, model in (("draft", draft), ("target", target)):
        sizes, p = sizes_and_prefix(model, (1,), prefix)
        calls[name] = prefilled_calls(model, sizes, [False], p)[(False, 1)]
    times = time_rounds(calls, target.lm_head.weight.device, repeats)
    ratios = [d / t for d, t in zip(times["draft"], times["target"])]  # round by round
    c = statistics.median(ratios)
    return DraftCost(c, (max(ratios) - min(ratios)) / c)


def draft_cost(draft: Transformer, target: Transformer, directory: Path | None = None) -> float:
    """Leviathan et al.'s c for a draft model (measure_draft_cost), cached per machine and pair of shapes."""
    key = {"draft": curve_key(draft, (1,), False, PREFIX), "target": curve_key(target, (1,), False, PREFIX)}
    key["draft_modules"] = sorted({type(m).__name__ for m in draft.modules()})  # a quantized copy: same config
    path = (directory or cache_dir()) / f"draft-cost-{fingerprint(key)}.json"
    measure, check = lambda: measure_draft_cost(draft, target), partial(draft_cost_holds, draft, target)
    return stored_or_measured(path, key, DraftCost, measure, False, check).c


def draft_cost_holds(draft: Transformer, target: Transformer, stored: DraftCost) -> bool:
    """Whether a quick re-measurement (3 rounds) gives a c within a factor RECHECK of the stored one."""
    return agrees(stored.c, measure_draft_cost(draft, target, repeats=3).c)


# ---- showing --------------------------------------------------------------------------------------------------


def cost_table(curve: CostCurve) -> str:
    """The curve as a Markdown table: tokens per call, chain and tree ms, and each over a one-token call."""
    tree = curve.tree_ms is not None
    lines = ["| tokens per call | chain ms | tree ms | ratio to one token |", "|---:|---:|---:|---:|"]
    for i, T in enumerate(curve.sizes):
        tree_ms = f"{curve.tree_ms[i]:.1f}" if tree else "-"
        ratio = f"{curve.ratio(T):.2f}" + (f" (tree {curve.ratio(T, tree=True):.2f})" if tree else "")
        lines.append(f"| {T} | {curve.chain_ms[i]:.1f} | {tree_ms} | {ratio} |")
    return "\n".join(lines)


def forms_table(plain: CostCurve, model: CostCurve) -> str:
    """measure_forms' two curves as a Markdown table: ms of each form of a chain call and the second over the first."""
    lines = ["| tokens per call | x @ W^T ms | model.Linear ms | model.Linear over x @ W^T |", "|---:|---:|---:|---:|"]
    for T, before, after in zip(plain.sizes, plain.chain_ms, model.chain_ms):
        lines.append(f"| {T} | {before:.1f} | {after:.1f} | {after / before:.2f} |")
    return "\n".join(lines)


def print_cost_curve(curve: CostCurve, file=None) -> None:
    """cost_table, then how noisy the timing was."""
    print(cost_table(curve), file=file or sys.stdout)
    print(
        f"\n[median of interleaved repeats; the worst (max - min) / median was {curve.spread:.0%}; "
        f"{torch.get_num_threads()} threads]",
        file=file or sys.stdout,
    )


def plot_cost_curve(curve: CostCurve, path: str | Path) -> None:
    """ms per call against tokens per call, chain and tree, to an image file. Needs matplotlib (optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve.sizes, curve.chain_ms, "o-", label="chain call")
    if curve.tree_ms is not None:
        ax.plot(curve.sizes, curve.tree_ms, "s--", label="tree call")
    ax.set_xlabel("tokens per target call")
    ax.set_ylabel("ms per call")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
