"""Spec-Bench-style measurement (Xia et al. 2024, §8 and Table 5): every method on the same prompts, same model,
same settings, interleaved in one run on one machine; speedup is the ratio to our own autoregressive loop.

Prompts are real code completions: a few hundred tokens of a held-out standard-library file (never trained on),
cut just inside a function body, as an editor would send them (prompts.py). Each table is one function below,
chosen by its flag (TABLES); the rows of the methods table come from the table of methods (methods.py).

    python bench.py --prompts 20 -n 128                        # every drafter (the README's results table)
    python bench.py --verify exact,topk,bild                   # verification rules: speed against quality (-t 0)
    python bench.py --verify exact,typical,lenient -t 0.7      # ... the sampling ones
    python bench.py --verify exact,contrastive -t 1            # ... Speculative Contrastive Decoding (LOSSY)
    python bench.py --verify exact,spectr --sampled-siblings -t 1   # SpecInfer's and SpecTr's rule, the same trees
    python bench.py --draft-length fixed,heuristic,confidence,svip,disco,dynamic   # draft-length policies
    python bench.py --siblings                                 # deterministic vs sampled tree siblings, T 0.7 and 1
    python bench.py --sweep-lookahead --prompts 8 -n 64        # Lookahead decoding's W, N, G on this machine
    python bench.py --sweep-exit --prompts 8 -n 64             # LayerSkip's early exit at every exit layer E
    python bench.py --batch 1,2,4,8,16,32 -n 64 --budget 8     # batched speculative decoding against batch size
    python bench.py --batch 1,4,16,32 -n 32 --specserve        # ... with SpecServe's per-row lengths beside them
    python bench.py --samples 8 -t 1 -n 64                     # 8 samples of one prompt drafting for each other
    python bench.py --suite --prompts 10 -n 32                 # Spec-Bench for code: speedup per prompt category
    python bench.py --suite-all --prompts 10 -n 32             # ... every method (27 minutes on 2 CPU cores)
    python bench.py --online --prompts 8 -n 64                 # OSD: acceptance before and after, on a held-out package
    python bench.py --pipelined --prompts 8                    # PPD and SPEED's latency models, measured costs
    python bench.py --model smollm2 --specbench question.jsonl --per-category 10 -n 32   # Spec-Bench's questions
                                       # (its data/spec_bench/question.jsonl, github.com/hemingkx/Spec-Bench)
    python bench.py --model smollm2 --specbench question.jsonl --per-category 10 -n 32 -r 3   # ... each row's
                                       # fastest of 3 runs of each question: the machine's noise only adds time
"""

import argparse
import contextlib
import copy
import datetime
import io
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cost
import peer
from batched import (
    BatchModelDrafter,
    BatchPromptLookup,
    CrossSampleLookup,
    NoDrafts,
    batch_speculative_generate,
    batch_tree_speculative_generate,
)
from cli import OneLineParser, add_method_flags, add_run_flags, load_target, setup_for
from corpus import document_text, package_documents, read_packages
from draft_length import DraftLength, predicted_speedup
from drafters import Drafter
from methods import (
    DRAFT_LENGTHS,
    DRAFTERS,
    VERIFIERS,
    Entry,
    Setup,
    UsageError,
    brings_fallback,
    default_length,
    draft_model,
    make,
    missing_files,
    refuse,
    rule_misfits,
)
from model import FEW_ROWS
from online import OnlineDrafter
from peer import transformers_missing
from prompts import completion_prompt, function_prompts
from selfdraft import exit_topk_agreement, ppd_speedup, speed_speedup
from specbench import read_questions, subsample
from specdec import Stats, decode
from specserve import SpecServe, StepCost, measured_step_cost
from suite import suite_prompts
from verify import Verifier

SUITE_DRAFTERS = ("none", "draft", "pld", "eagle", "lookahead", "suffix", "sam")  # one method per family
PLOT_FORMATS = (".png", ".pdf", ".svg")  # what --plot writes (matplotlib's Agg backend writes each)
LOOKAHEAD_SWEEP = [(1, 2, 1), (2, 2, 2), (3, 2, 3), (2, 3, 2), (3, 3, 3), (5, 3, 5), (3, 4, 3), (5, 4, 5), (7, 4, 7)]


@dataclass
class Method:
    """One row of a table: how it decodes (a drafter, None = autoregressive, or for batched rows a factory of
    drafters), how its drafts are verified and sized, and what it measured."""

    name: str
    drafter: Drafter | Callable[[], object] | None
    use_tree: bool = False
    verifier: Verifier | None = None  # None: verify.exact
    length: DraftLength | None = None  # None: a fixed gamma (batched rows: a batched.RowLengths per row)
    temperature: float | None = None  # None: the run's -t
    budget: int | None = None  # batched rows: TETRIS's drafts per batched call (None: every draft)
    tokens: int = 0  # summed over prompts: tokens produced ...
    seconds: float = 0.0  # ... wall time ...
    stats: Stats = field(default_factory=Stats)  # ... and the loop's counts
    agree: int = 0  # produced tokens equal to the target's argmax after the text before them
    nll: float = 0.0  # summed -log p_target(token | text before it), temperature 1
    identical: int = 0  # outputs equal to the autoregressive run's, token for token
    per_prompt: list[Stats] = field(default_factory=list)  # the loop's counts of each prompt, in order
    rates: list[float] = field(default_factory=list)  # tokens per second of each prompt, in order
    batch: int = 1  # batched rows: the batch size ...
    prefill: float = 0.0  # ... the target's prefill seconds ...
    target_seconds: float = 0.0  # ... the target's forward seconds over the batched calls, hook-timed ...
    batched_calls: int = 0  # ... and how many batched calls there were
    peer: Callable | None = None  # a row that transformers decodes (peer.py): (prompt, n_new, eot, T, seed) -> ids
    length_name: str = "fixed"  # the draft-length policy's name (-l)
    family: str = ""  # the drafter's taxonomy family (methods.Entry.family): the pictures' colours

    def again(self, **changes) -> "Method":
        """A fresh row with the same method (no measurements), some fields changed. A draft-length policy that
        learns across generations (-l cost) is copied: the new row starts where this row's policy is now."""
        how = ("name", "drafter", "use_tree", "verifier", "length", "temperature", "budget", "peer", "length_name")
        fields = {**{k: getattr(self, k) for k in (*how, "family")}, **changes}
        if learns(fields["length"]):
            fields["length"] = copy.deepcopy(fields["length"])
        return Method(**fields)

    @property
    def tokens_per_second(self) -> float:
        """Over every prompt of the row: its tokens over its wall time."""
        return self.tokens / self.seconds


@dataclass
class Bench:
    """What every table works from."""

    args: argparse.Namespace  # the parsed flags
    setup: Setup  # the target, weights and flags that methods are built from
    enc: object  # the tokenizer
    eot: int  # the token that ends an output
    chat: Callable[[str], list[int]] | None = None  # a user turn in the model's chat template (pretrained.py)
    end_of_turn: int | None = None  # the token that ends a chat answer
    folder: Path | None = None  # the target's Hugging Face folder (--peer loads it in transformers)

    @property
    def target(self):
        return self.setup.target


# ---- measuring ------------------------------------------------------------------------------------------------


def continuation_quality(target, prompt: list[int], out: list[int]) -> tuple[int, float]:
    """(tokens equal to the target's own greedy choice given the text before them, summed NLL of the tokens under
    the target): the quality cost of a lossy rule, teacher-forced on what it produced (untimed)."""
    if not out:
        return 0, 0.0
    device = target.device
    with torch.inference_mode():
        logits = target(torch.tensor([prompt + out], device=device))[0, len(prompt) - 1 : -1].float()  # [len(out), V]
    tokens = torch.tensor(out, device=device)
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).sum()
    return int((logits.argmax(dim=-1) == tokens).sum()), float(nll)


def clock(device: str) -> float:
    """time.perf_counter once the GPU has finished what was queued (its kernels run asynchronously)."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def run(
    target, method: Method, prompt: list[int], args, n_new: int, eot: int | None = None
) -> tuple[list[int], Stats | None, float]:
    """Decode one prompt with `method` (up to n_new tokens or `eot`): (output, the loop's Stats or None for a
    transformers row, wall seconds)."""
    temperature = args.temperature if method.temperature is None else method.temperature
    t0 = clock(args.device)
    if method.peer is not None:  # transformers decodes this row (peer.py)
        out, stats = method.peer(prompt, n_new, eot, temperature, args.seed), None
    else:
        out, stats = decode(
            target,
            method.drafter,
            method.use_tree,
            prompt,
            n_new,
            args.gamma,
            verifier=method.verifier,
            draft_length=method.length,
            temperature=temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eot=eot,
            generator=torch.Generator(args.device).manual_seed(args.seed),
        )
    return out, stats, clock(args.device) - t0


def record(method: Method, out: list[int], stats: Stats | None, seconds: float) -> None:
    """Add one prompt's run to the method's totals."""
    method.seconds += seconds
    method.tokens += len(out)
    method.rates.append(len(out) / seconds)
    if stats:
        method.stats.merge(stats)
        method.per_prompt.append(stats)


def measure(target, methods: list[Method], prompts: list[list[int]], args, eot: int | None = None) -> None:
    """Every method on every prompt, interleaved (drifts of a noisy machine hit every method alike), after an
    untimed warm-up (a policy that learns across generations learns from it too); methods[0] is the autoregressive
    reference that `identical` compares with. Outputs stop at `eot` (chat prompts: the end of the turn) or after
    --max-new-tokens. Each method is measured once: its totals start from zero."""
    for method in methods:
        run(target, method, prompts[0][:64], args, 8)
    for i, prompt in enumerate(prompts):
        best = fastest_runs(target, methods, prompt, args, eot, f"prompt {i + 1} of {len(prompts)}")
        for method, (out, stats, seconds) in zip(methods, best):
            record(method, out, stats, seconds)
            agree, nll = continuation_quality(target, prompt, out)
            method.agree += agree
            method.nll += nll
            method.identical += out == best[0][0]
    progress(args, f"{len(prompts)} prompts done\n")


def learns(x) -> bool:
    """Whether a drafter or draft-length policy keeps what it learned from one generation to the next."""
    return getattr(x, "learns_across_generations", False)


def fastest_runs(target, methods: list[Method], prompt: list[int], args, eot: int | None, where: str) -> list:
    """Each method's fastest of --repeats runs of `prompt`, the methods in turn: (output, Stats, seconds), so the
    cost split is the kept run's. The runs do the same work: the same seed, and the same starting state (a policy
    that learns across generations starts each later run from a copy of itself as the prompt found it; a drafter
    that learns across generations runs once, its second run would draft from its first), so they differ only by
    what the machine did meanwhile, which only adds time. A run whose output differs from the first's is not kept."""
    states = [copy.deepcopy(m.length) if learns(m.length) and args.repeats > 1 else m.length for m in methods]
    best: list = [None] * len(methods)
    for r in range(args.repeats):
        for k, method in enumerate(methods):
            if r and learns(method.drafter):
                continue
            progress(args, f"{where}: {method.name}" + (f", run {r + 1} of {args.repeats}" if r else ""))
            out, stats, seconds = run(
                target, method.again(length=states[k]) if r else method, prompt, args, args.max_new_tokens, eot
            )
            if best[k] is None or (out == best[k][0] and seconds < best[k][2]):
                best[k] = (out, stats, seconds)
    return best


def progress(args, line: str) -> None:
    """One line on stderr, rewritten in place (off with --quiet): a long run shows where it is."""
    if not args.quiet:
        print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)


# ---- columns --------------------------------------------------------------------------------------------------

SPEED = (
    "tau (tokens/call) | mean accepted length | acceptance (theory) | acceptance at draft positions 1-4 | tokens/s "
    "| speedup"
)


def speed_columns(m: Method, base: Method) -> str:
    """tau = tokens emitted per target call; mean accepted length = accepted drafts + 1 per call (vLLM's, Spec-Bench's);
    acceptance = accepted / compared drafts (Leviathan et al.'s alpha), then the same at each draft position."""
    rate, base_rate = m.tokens_per_second, base.tokens_per_second
    s = m.stats
    if m.peer is not None:  # transformers does not say how many calls it made
        return f"- | - | - | - | {rate:.1f} | {rate / base_rate:.2f}x"
    if s.target_calls == 0:
        return f"1.00 | 1.00 | - | - | {rate:.1f} | {rate / base_rate:.2f}x"
    theory = f" ({s.predicted_acceptance_rate:.2f})" if s.expected_accepted else ""
    positions = " ".join(f"{s.acceptance_at(i):.2f}" for i in range(min(4, len(s.compare_counts) - 1)))
    return (
        f"{s.tau:.2f} | {s.mean_accepted_length:.2f} | {s.acceptance_rate:.2f}{theory} | {positions} | "
        f"{rate:.1f} | {rate / base_rate:.2f}x"
    )


def cost_columns(m: Method, base: Method) -> str:
    """Draft, verify and overhead ms per target call, and the speedup Leviathan et al.'s cost model predicts from
    them (chains: c = a draft token, v = this run's verify call, both over a one-token call of the baseline).
    Overhead is the loop's own time: the run's wall time less drafting, verifying and the prompt's prefill."""
    s, calls = m.stats, max(1, m.stats.target_calls)
    if not s.target_calls:
        return f"- | {1000 * m.seconds / max(1, m.tokens):.1f} | - | -"
    one_call = base.seconds / max(1, base.tokens)
    overhead = m.seconds - s.draft_seconds - s.verify_seconds - s.prefill_seconds
    split = " | ".join(
        f"{1000 * t:.1f}" for t in (s.draft_seconds / calls, s.verify_seconds_per_call, overhead / calls)
    )
    if m.use_tree or not s.verify_calls:  # no verify call apart from the prompt's to model
        return f"{split} | -"
    gamma, c = max(1, round(s.drafted / calls)), s.draft_seconds / max(1, s.drafted) / one_call
    return f"{split} | {predicted_speedup(s.acceptance_rate, gamma, c, s.verify_seconds_per_call / one_call):.2f}x"


def print_histograms(methods: list[Method]) -> None:
    for m in methods:
        if m.stats.target_calls:
            print(f"{m.name}: accepted drafts per call {dict(enumerate(m.stats.accept_counts))}")


def print_table(header: str, rows: list[str]) -> None:
    """A Markdown table: the header's cells, then one line per row."""
    print(f"| {header} |")
    print("|" + "---|" * (header.count("|") + 1))
    for row in rows:
        print(f"| {row} |")


def print_methods(methods: list[Method], n_prompts: int, temperature: float) -> None:
    base = methods[0]
    print_table(
        f"Method | {SPEED} | draft ms/call | verify ms/call | overhead ms/call | cost model predicts | "
        "candidates + extra tokens per call",
        [f"{m.name} | {speed_columns(m, base)} | {cost_columns(m, base)} | {width(m.stats)}" for m in methods],
    )
    print_histograms(methods)


def width(s: Stats) -> str:
    calls = max(1, s.target_calls)
    return f"{s.drafted / calls:.1f} + {s.extra / calls:.1f}" if s.target_calls else "-"


def print_verifiers(methods: list[Method], n_prompts: int, temperature: float) -> None:
    base = methods[0]

    def row(m: Method) -> str:
        lossy = "-" if m.verifier is None else ("**LOSSY**" if m.verifier.lossy else "no")
        identical = f"{m.identical}/{n_prompts}"  # at -t > 0 too: -v exact keeps the seed's text for lookup drafts
        return (
            f"{m.name} | {lossy} | {speed_columns(m, base)} | {m.agree / max(1, m.tokens):.3f} | "
            f"{m.nll / max(1, m.tokens):.3f} | {identical}"
        )

    print_table(
        f"Rule | lossy | {SPEED} | agreement with target greedy | target NLL/token | outputs identical to "
        "autoregressive (same seed)",
        [row(m) for m in methods],
    )
    print_histograms(methods)


def print_lengths(methods: list[Method], n_prompts: int, temperature: float) -> None:
    def row(m: Method) -> str:
        s, calls = m.stats, max(1, m.stats.target_calls)
        return (
            f"{m.name} | {'EAGLE-2 tree' if m.use_tree else 'draft model chain'} | {speed_columns(m, methods[0])} "
            f"| {s.drafted / calls:.2f} | {(s.drafted - s.accepted) / calls:.2f} | {cost_columns(m, methods[0])}"
        )

    print_table(
        f"Policy | drafter | {SPEED} | drafted/call | wasted drafts/call | draft ms/call | verify ms/call | "
        "overhead ms/call | cost model predicts",
        [row(m) for m in methods[1:]],
    )
    print_histograms(methods[1:])


def print_siblings(methods: list[Method], n_prompts: int, temperature: float) -> None:
    bases = {m.temperature: m for m in methods if m.drafter is None}
    rows = [
        f"{m.name.replace(', ', ' | ')} | {m.temperature} | {speed_columns(m, bases[m.temperature])}"
        for m in methods
        if m.drafter is not None
    ]
    print_table(f"Drafter | siblings | temperature | {SPEED}", rows)


def acceptance(stats: list[Stats]) -> str:
    accepted, compared = sum(s.accepted for s in stats), sum(s.compared for s in stats)
    return f"{accepted / max(1, compared):.3f} ({accepted}/{compared})"


def print_online(methods: list[Method], n_prompts: int, temperature: float) -> None:
    base, half = methods[0], n_prompts // 2

    def row(m: Method) -> str:
        online = m.drafter if isinstance(m.drafter, OnlineDrafter) else None
        halves = f"{acceptance(m.per_prompt[:half])} | {acceptance(m.per_prompt[half:])}" if m.per_prompt else "- | -"
        updates = (
            f"{online.updates} | {online.update_seconds:.2f} | {online.update_seconds / m.seconds:.1%}"
            if online
            else "- | - | -"
        )
        return f"{m.name} | {halves} | {speed_columns(m, base)} | {updates}"

    print_table(
        f"Method | acceptance, first half of the prompts | acceptance, second half | {SPEED} | draft updates "
        "| updating s (inside the timing) | share of the time",
        [row(m) for m in methods],
    )
    print_histograms(methods)
    for m in methods:
        if isinstance(m.drafter, OnlineDrafter):
            print(
                f"{m.name}: KL(p||q) on the buffer before each update {' '.join(f'{x:.2f}' for x in m.drafter.losses)}"
            )


def mean_rate(methods: list[Method]) -> float:
    """Tokens/s averaged over every prompt of these Methods (Spec-Bench averages per prompt, not per token)."""
    return sum(r for m in methods for r in m.rates) / sum(len(m.rates) for m in methods)


def spec_bench_speedup(methods: list[Method], baselines: list[Method]) -> float:
    """nan where the baseline produced nothing (its outputs all ended at once: a sampled end of text)."""
    base = mean_rate(baselines)
    return mean_rate(methods) / base if base > 0 else float("nan")


def print_suite(results: dict[str, list[Method]], temperature: float) -> None:
    """Spec-Bench's Table 5 layout: each method's speedup per category (the keys of `results`) and overall, its tau
    and mean accepted length over all categories, then each method's accepted-length histogram. A speedup is
    Spec-Bench's (its evaluation/speed.py): the mean of the method's per-prompt tokens/s over the mean of the
    baseline's, "overall" pooling every category's prompts."""
    print(f"\nT = {temperature}\n")
    rows, totals = [], []  # totals: each method over every category, for the histograms
    categories = list(results)
    for i, name in enumerate(m.name for m in results[categories[0]]):
        mine, base = [results[c][i] for c in categories], [results[c][0] for c in categories]
        total = Method(name, None)
        for m in mine:
            total.stats.merge(m.stats)
        calls = total.stats.target_calls
        tau = f"{total.stats.tau:.2f} | {total.stats.mean_accepted_length:.2f}" if calls else "1.00 | 1.00"
        speedups = " | ".join(f"{spec_bench_speedup([m], [b]):.2f}x" for m, b in zip(mine, base))
        rows.append(f"{name} | {speedups} | {spec_bench_speedup(mine, base):.2f}x | {tau}")
        totals.append(total)
    print_table(f"Method | {' | '.join(categories)} | overall | tau | mean accepted length", rows)
    print_histograms(totals)


# ---- rows -----------------------------------------------------------------------------------------------------


def drafter_rows(b: Bench, names: list[str], variants: bool = True) -> list[Method]:
    """A row for each drafter of the table (its default loop and draft length), then its variants; each row whose
    length is sized by cost (-l cost, the default) is followed by the same drafter at a fixed gamma. A drafter whose
    files are missing is left out with a note."""
    rows = []
    for name in names:
        e = DRAFTERS[name]
        if missing_files(e, b.setup):
            print(f"note: no {e.bench} row: {missing_files(e, b.setup)}")
            continue
        mine = [(e.bench, b.setup.with_opts(drafter=name))]
        mine += [(label, b.setup.with_opts(drafter=name, **changes)) for label, changes in e.variants if variants]
        for label, setup in mine:
            try:
                rows.append(drafter_row(b, e, label, setup))
            except UsageError as err:  # a variant this target cannot run (a tree of a cross-vocabulary draft)
                print(f"note: no {label} row: {err}")
                continue
            if rows[-1].length_name == "cost":
                rows.append(drafter_row(b, e, f"{label}, -l fixed", setup.with_opts(draft_length="fixed")))
    return rows


def drafter_row(b: Bench, e: Entry, label: str, setup: Setup) -> Method:
    """The row of drafter `e`: -l if the setup names one (a variant's; bench.py's own -l picks the draft-length
    table, so it is unset wherever this runs), else the drafter's default draft length."""
    use_tree = e.shape == "tree" or setup.opts.tree
    name = getattr(setup.opts, "draft_length", None) or default_length(e, use_tree, b.args.temperature == 0)
    drafter = make(DRAFTERS, e.name, setup)
    length = None  # a fixed gamma; a policy that stops early may draft up to --max-gamma
    if name != "fixed":
        length = make(DRAFT_LENGTHS, name, setup.with_opts(gamma=b.args.max_gamma).with_drafter(drafter))
    return Method(label, drafter, use_tree, length=length, length_name=name, family=e.family)


def prompts_for(b: Bench) -> list[list[int]]:
    return function_prompts(b.enc, b.args.prompts, heldout=True)


def table_methods(b: Bench) -> None:
    """Every drafter of the table (or --drafters), its variants included; with --peer, transformers' rows too."""
    rows = drafter_rows(b, b.args.drafters or list(DRAFTERS))
    rows += peer_rows(b) if b.args.peer else []
    report(b, rows, prompts_for(b), print_methods)
    if b.args.peer:
        print_peer_summary(rows)
    if b.args.plot:
        plot_speedup_tau(rows, b.args.plot, b.args.model or "the shipped weights")


def peer_rows(b: Bench) -> list[Method]:
    """transformers' autoregressive decoding, prompt lookup and (with a draft of this tokenizer) assisted
    generation, on the same weights (peer.py)."""
    a, draft = b.args, None
    try:
        draft_model(b.setup)  # refuses a draft that is missing or of another tokenizer
        draft = a.draft_model
    except UsageError as err:
        print(f"note: no assisted-generation row: {err}")
    return [Method(label, None, peer=decode) for label, decode in peer.rows(b.folder, draft, a.device)]


def print_peer_summary(rows: list[Method]) -> None:
    """Each side's best speculative row over its own autoregressive decoding, and ours over theirs."""
    ours, theirs = [m for m in rows if m.peer is None], [m for m in rows if m.peer is not None]

    def rate(m: Method) -> float:
        return m.tokens_per_second

    mine, peers = max(ours[1:], key=rate), max(theirs[1:], key=rate)
    print(
        f"\nours: {mine.name} {rate(mine):.1f} tokens/s, {rate(mine) / rate(ours[0]):.2f}x our autoregressive; "
        f"transformers: {peers.name} {rate(peers):.1f} tokens/s, {rate(peers) / rate(theirs[0]):.2f}x its "
        f"autoregressive; ours over theirs {rate(mine) / rate(peers):.2f}x"
    )


def table_verify(b: Bench) -> None:
    """One drafter, every rule named: speed against quality (the lossy rules' cost). With --sampled-siblings every
    row verifies the drafter's trees of i.i.d. children (-v exact is then SpecInfer's rule, -v spectr SpecTr's)."""
    drafter, a = DRAFTERS[b.args.drafter], b.args
    refuse([(drafter.name == "none", "--verify needs a drafter whose drafts the rules verify")])
    use_tree = drafter.shape == "tree" or a.sampled_siblings
    refuse(
        [
            (
                a.sampled_siblings and not (a.temperature > 0 and drafter.dynamic),
                "--sampled-siblings samples tree children at -t > 0: use -d eagle or -d draft",
            )
        ]
    )
    rows = [Method("Autoregressive", None)]
    for name in names(b.args.verify, VERIFIERS, "--verify"):
        rule = VERIFIERS[name]
        refuse(rule_misfits(rule, drafter, use_tree, a.temperature == 0, a.sampled_siblings))
        length = rule.fallback(b.setup) if brings_fallback(rule, drafter, use_tree, False) else None
        rows.append(
            Method(name, make(DRAFTERS, drafter.name, b.setup), use_tree, make(VERIFIERS, name, b.setup), length)
        )
    report(b, rows, prompts_for(b), print_verifiers)


def table_draft_length(b: Bench) -> None:
    """Chain policies on the draft model (fixed at gamma and --max-gamma; those that stop early up to --max-gamma);
    fixed, cost and the tree policies (dynamic depth, AdaEAGLE) on EAGLE-2 trees."""
    chosen, g, most = names(b.args.draft_length, DRAFT_LENGTHS, "--draft-length"), b.args.gamma, b.args.max_gamma

    def policy(name: str, gamma: int, use_tree: bool) -> Method:
        drafter = "eagle" if use_tree else "draft"
        setup = b.setup.with_opts(gamma=gamma, drafter=drafter)
        label = f"{name} ({'EAGLE-2' if use_tree else f'gamma {gamma}'})"
        return Method(
            label,
            make(DRAFTERS, drafter, setup),
            use_tree,
            length=make(DRAFT_LENGTHS, name, setup),
        )

    rows = [Method("Autoregressive", None)]
    rows += [policy("fixed", gamma, False) for gamma in sorted({g, most}) if "fixed" in chosen]
    chains = [n for n in chosen if n != "fixed" and DRAFT_LENGTHS[n].shape in ("chain", "both")]
    rows += [policy(n, g if n == "heuristic" else most, False) for n in chains]
    trees = [n for n in chosen if n in ("fixed", "cost") or DRAFT_LENGTHS[n].shape == "tree"]
    rows += [policy(n, g, True) for n in trees]
    report(b, rows, prompts_for(b), print_lengths)


def table_siblings(b: Bench) -> None:
    """SpecInfer/SpecTr: sampled tree children against top-k children, at T = 0.7 and 1.0."""
    rows = []
    for t in (0.7, 1.0):
        rows.append(Method("Autoregressive", None, temperature=t))
        for name, label in (("draft", "SpS tree"), ("eagle", "EAGLE-2")):
            for sampled in (False, True):
                drafter = make(DRAFTERS, name, b.setup.with_opts(sampled_siblings=sampled))
                rows.append(
                    Method(f"{label}, {'sampled i.i.d.' if sampled else 'top-k'}", drafter, True, temperature=t)
                )
    report(b, rows, prompts_for(b), print_siblings, temperature="0.7 and 1.0")


def table_sweep_lookahead(b: Bench) -> None:
    """Lookahead decoding's knobs (W, N, G): extra tokens cost time on a CPU."""
    rows = [Method("Autoregressive", None)] + [
        Method(
            f"lookahead W {w}, N {n}, G {g}",
            make(
                DRAFTERS, "lookahead", b.setup.with_opts(lookahead_window=w, lookahead_ngram=n, lookahead_candidates=g)
            ),
            True,
        )
        for w, n, g in LOOKAHEAD_SWEEP
    ]
    report(b, rows, prompts_for(b), print_methods)


def table_sweep_exit(b: Bench) -> None:
    """LayerSkip's early exit at every exit layer: acceptance against draft cost."""
    rows = [Method("Autoregressive", None)] + [
        Method(f"early exit E {e}", make(DRAFTERS, "earlyexit", b.setup.with_opts(exit_layer=e)))
        for e in range(1, b.target.config.num_hidden_layers)
    ]
    report(b, rows, prompts_for(b), print_methods)


def table_online(b: Bench) -> None:
    """OSD: one OnlineDrafter per row, carried across the prompts of a held-out package, so it learns across
    requests; acceptance in the first and second half of the prompts."""
    fixed = b.setup.with_opts(online=False)
    rows = [Method("Autoregressive", None), Method("SpS (fixed draft)", make(DRAFTERS, "draft", fixed))]
    for kept, label in (("rejected", "rejected positions, as the paper"), ("all", "every verified position")):
        rows.append(Method(f"OSD ({label})", make(DRAFTERS, "draft", b.setup.with_opts(online_rows=kept))))
    prompts = package_prompts(b.enc, b.args.prompts, b.args.online_package, b.args.corpus_dir)
    a = b.args
    note = (
        f"OSD: Adam lr {a.online_lr}, an update when the buffer holds {a.online_every} positions, "
        f"{a.online_steps} steps each; forward KL(p || q); one drafter per row carried across the prompts\n"
    )
    report(b, rows, prompts, print_online, source=f"from the held-out package {a.online_package}", note=note)


def report(
    b: Bench,
    rows: list[Method],
    prompts: list[list[int]],
    printer,
    temperature=None,
    source="from the standard library",
    note: str = "",
) -> None:
    """Measure the rows on the prompts, then print the run's settings and the table."""
    measure(b.target, rows, prompts, b.args)
    a = b.args
    print(
        f"\n{len(prompts)} held-out prompts {source}, {a.max_new_tokens} new tokens max, gamma {a.gamma}, "
        f"temperature {a.temperature if temperature is None else temperature}, device {a.device}, "
        f"{'bf16' if a.bf16 else 'fp32'}; trees: {a.tree_size} nodes, depth {a.tree_depth}, width {a.tree_width}\n"
    )
    print(note, end="")
    printer(rows, len(prompts), a.temperature)


def table_suite(b: Bench) -> None:
    """Spec-Bench for code: each method on each category of held-out prompts (suite.py), T 0 and 1; one method of
    each family (--suite), or every method (--suite-all, about 30 minutes on a 2-core CPU)."""
    rows = drafter_rows(b, b.args.drafters or list(DRAFTERS if b.args.suite_all else SUITE_DRAFTERS), b.args.suite_all)
    categories = suite_prompts(b.enc, b.args.prompts)
    sizes = [len(c) for c in categories.values()]
    speedups = run_categories(b, rows, categories, f"{min(sizes)}-{max(sizes)} held-out prompts per category", b.eot)
    if b.args.plot:
        plot_categories(speedups, b.args.plot, f"Spec-Bench for code, {b.args.model or 'the shipped weights'}")


def table_specbench(b: Bench) -> None:
    """Spec-Bench itself (specbench.py): the first turn of each question in the model's chat template, stopped at
    the end of the turn, one method of each family (or --drafters), T 0 and 1, in Spec-Bench's Table 5 layout."""
    a = b.args
    refuse([(b.chat is None, "--specbench asks chat questions: use a model with a chat template (--model smollm2)")])
    try:
        questions = read_questions(a.specbench)
    except ValueError as e:
        raise UsageError(str(e)) from None
    questions = subsample(questions, a.per_category) if a.per_category else questions
    categories = {s: [b.chat(q) for q in qs] for s, qs in questions.items()}
    rows = drafter_rows(b, a.drafters or list(SUITE_DRAFTERS), variants=False)
    sizes = [len(c) for c in categories.values()]
    source = f"Spec-Bench ({a.specbench}), first turns, {min(sizes)}-{max(sizes)} questions per subtask, chat template"
    speedups = run_categories(b, rows, categories, source, b.end_of_turn)
    if a.plot:
        plot_categories(speedups, a.plot, f"Spec-Bench's questions, {a.model or 'the shipped weights'}")


def run_categories(b: Bench, rows: list[Method], categories: dict[str, list[list[int]]], source: str, eot) -> dict:
    """Each row on each category's prompts at T 0 and then T 1, printed in Spec-Bench's Table 5 layout; returns
    {T: {category: {row name: speedup}}} for the picture."""
    a = b.args
    print(
        f"{source}, {a.max_new_tokens} new tokens max, gamma {a.gamma}, device {a.device}, "
        f"{'bf16' if a.bf16 else 'fp32'}"
    )
    speedups = {}
    for t in (0.0, 1.0):
        results = {c: [m.again(temperature=t) for m in rows] for c in categories}
        for category, todo in categories.items():
            progress(a, f"T {t}, {category}: ")
            measure(b.target, results[category], todo, a, eot)
        print_suite(results, t)
        speedups[t] = {c: {m.name: spec_bench_speedup([m], [ms[0]]) for m in ms} for c, ms in results.items()}
    return speedups


def table_cost_curve(b: Bench) -> None:
    """ms per target call against tokens per call, chain and tree calls (cost.py), measured afresh and stored for
    the cost-aware draft length; --plot draws it."""
    a = b.args
    curve = cost.cached_cost_curve(b.target, tree=True, refresh=True)
    what = a.model or "the shipped target"
    print(
        f"verify-cost curve of {what}: {a.device}, {'bf16' if a.bf16 else 'fp32'}, after a {cost.PREFIX}-token prefix\n"
    )
    cost.print_cost_curve(curve)
    if a.plot:
        cost.plot_cost_curve(curve, a.plot)
    plain, ours = cost.measure_forms(b.target)
    print(
        "\nThe same chain calls in two forms, interleaved: every projection as x @ W^T (nn.Linear, as transformers "
        f"computes it) and as model.Linear computes calls of up to {FEW_ROWS} rows, by columns (model.by_columns)\n"
    )
    print(cost.forms_table(plain, ours))


def table_pipelined(b: Bench) -> None:
    """PPD and SPEED (survey §5.2, Fig. 3): not runnable here (concurrent passes; a weight-shared model), so their
    latency models (selfdraft.ppd_speedup, speed_speedup) with this machine's measured call costs and the target's
    measured early-exit agreement on the held-out prompts."""
    curve, L = cost.cached_cost_curve(b.target, tree=True), b.target.config.num_hidden_layers  # -l cost's curve
    prompts = prompts_for(b)

    def agreement(exit_layer: int, k: int) -> float:
        return sum(exit_topk_agreement(b.target, p, exit_layer, k) for p in prompts) / len(prompts)

    print(f"\n{len(prompts)} held-out prompts; one-token call {curve.ms(1):.1f} ms (cost.py), {L} blocks\n")
    rows = []
    for exit_layer in sorted({max(1, L // 4), L // 2, round(2 * L / 3)}):
        for k in (1, 3):
            a, e = agreement(exit_layer, k), exit_layer / L
            ideal, one = ppd_speedup(a, e), ppd_speedup(a, e, curve.ratio(k + 1))
            rows.append(f"E {exit_layer} (e {e:.2f}) | {k} | {a:.2f} | {ideal:.2f}x | {one:.2f}x")
    print_table("PPD exit | top k | a_k | speedup, k idle devices | speedup, one device (k + 1 tokens a layer)", rows)
    rows = []
    for stages in (2, 3, 4):
        a = agreement(max(1, L // stages), 1)
        shared, ours = speed_speedup(a, stages, curve.ratio(stages)), speed_speedup(a, stages, 1.0, shared=False)
        rows.append(f"{stages} | {a:.2f} | {curve.ratio(stages):.2f} | {shared:.2f}x | {ours:.2f}x")
    print()
    print_table("SPEED stages S | a (exit after stage one) | ratio(S) | speedup, weights shared | speedup, ours", rows)


# ---- batched decoding (survey §9) -----------------------------------------------------------------------------


def batched_rows(b: Bench) -> list[Method]:
    """Autoregressive, SpS, PLD and EAGLE-2 (one drafter per row, sharing the head), batched; TETRIS with
    --budget, cross-sample lookup with --samples, SpS and PLD with SpecServe's lengths with --specserve."""
    draft, eagle = draft_model(b.setup), make(DRAFTERS, "eagle", b.setup)
    rows = [
        Method("Autoregressive", NoDrafts),
        Method("SpS (draft model)", lambda: BatchModelDrafter(draft)),
        Method("PLD (prompt lookup)", BatchPromptLookup),
        Method("EAGLE-2 (dynamic tree, drafted row by row)", lambda: copy.copy(eagle), True),
    ]
    if b.args.budget is not None:
        rows.append(
            Method(
                f"SpS + TETRIS ({b.args.budget} drafts/call)", lambda: BatchModelDrafter(draft), budget=b.args.budget
            )
        )
    if b.args.samples:  # n samples of one prompt: the others' text drafts for each sample
        rows.append(Method("Cross-sample lookup (multi-sample SD)", CrossSampleLookup))
    if b.args.specserve:  # the same drafters, each step's lengths from the profiled cost model (specserve.py)
        step = measured_step_cost(b.target, BatchModelDrafter(draft))  # a few seconds the first time
        sps, pld = SpecServe(step), SpecServe(StepCost(step.verify))  # prompt lookup's drafting: not modelled
        rows.append(Method("SpS + SpecServe (adaptive per-row length)", lambda: BatchModelDrafter(draft), length=sps))
        rows.append(Method("PLD + SpecServe (adaptive per-row length)", BatchPromptLookup, length=pld))
    return rows


def decode_batch(b: Bench, m: Method, prompts: list[list[int]], n_new: int):
    a = b.args
    opts = dict(
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        eot=b.eot,
        generator=torch.Generator(a.device).manual_seed(a.seed),
    )
    if m.use_tree:  # one tree drafter per row (batch_tree_speculative_generate)
        return batch_tree_speculative_generate(b.target, [m.drafter() for _ in prompts], prompts, n_new, **opts)
    return batch_speculative_generate(
        b.target, m.drafter(), prompts, n_new, gamma=a.gamma, budget=m.budget, lengths=m.length, **opts
    )


def measure_batch(b: Bench, m: Method, prompts: list[list[int]]) -> Method:
    """One batched run after an untimed warm-up. [start, end] of each call of the target's forward, one per
    batched call (Stats count one per active row). The EAGLE head reads only the target's embedding and head,
    submodules these hooks do not see."""
    device = b.args.device
    decode_batch(b, m, prompts, 4)
    forwards = []
    hooks = (
        b.target.register_forward_pre_hook(lambda *_: forwards.append([clock(device)])),
        b.target.register_forward_hook(lambda *_: forwards[-1].append(clock(device))),
    )
    t0 = clock(device)
    out, stats = decode_batch(b, m, prompts, b.args.max_new_tokens)
    seconds = clock(device) - t0
    for hook in hooks:
        hook.remove()
    times = [end - start for start, end in forwards]
    prefilled = max(map(len, prompts)) > 1  # a batch of one-token prompts has nothing to prefill
    prefill, calls = (times[0], times[1:]) if prefilled else (0.0, times)
    return m.again(
        batch=len(prompts),
        tokens=sum(map(len, out)),
        seconds=seconds,
        stats=stats,
        prefill=prefill,
        target_seconds=sum(calls),
        batched_calls=len(calls),
    )


def table_batch(b: Bench) -> None:
    """Survey §9: tokens per second of each batched method against batch size (--batch), or n samples of one
    prompt (--samples); each batch's first row is its baseline."""
    a = b.args
    if a.samples:
        batches = [[function_prompts(b.enc, 1, heldout=True)[0][-128:]] * a.samples]
    else:
        sizes = batch_sizes(a.batch)
        prompts = [p[-128:] for p in function_prompts(b.enc, max(sizes), heldout=True)]
        refuse(
            [
                (
                    len(prompts) < max(sizes),
                    f"--batch {max(sizes)} needs that many held-out prompts; there are {len(prompts)}",
                )
            ]
        )
        batches = [prompts[:B] for B in sizes]
    rows, methods = [], batched_rows(b)
    for prompts in batches:
        for m in methods:
            rows.append(measure_batch(b, m, prompts))
            progress(a, f"batch {len(prompts)}: {m.name} done")
    progress(a, "batches done\n")
    print_batches(rows)
    if a.plot:
        plot_batches(rows, a.plot)


def print_batches(rows: list[Method]) -> None:
    base = {m.batch: m.tokens_per_second for m in rows if m.drafter is NoDrafts}

    def row(m: Method) -> str:  # the Stats' draft time is the whole batch's
        s, calls, rate = m.stats, max(1, m.batched_calls), m.tokens_per_second
        accepted = f"{s.acceptance_rate:.2f}" if s.drafted else "-"
        # overhead: setting up the caches and drafters, masks and positions, each row's acceptance rule (Python,
        # row by row), dropping finished rows. The drafters' own prefill counts as drafting.
        other = m.seconds - m.prefill - s.draft_seconds - m.target_seconds
        split = " | ".join(f"{1000 * t / calls:.1f}" for t in (s.draft_seconds, m.target_seconds, other))
        return (
            f"{m.batch} | {m.name} | {s.tau:.2f} | {s.mean_accepted_length:.2f} | {accepted} | {rate:.1f} | "
            f"{rate / base[m.batch]:.2f}x | {1000 * m.prefill:.0f} | {split}"
        )

    print_table(
        "batch | method | tau (tokens/row/call) | mean accepted length | acceptance | tokens/s (all rows) | "
        "speedup over batched autoregressive | prefill ms | draft ms/call | target ms/call | overhead ms/call",
        [row(m) for m in rows],
    )


def pyplot():
    """matplotlib's pyplot on its file-only backend: an optional extra, checked before the run (matplotlib_missing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def plot_batches(rows: list[Method], path: Path) -> None:
    """Tokens per second of all rows against batch size, one line per batched method."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(m.name for m in rows):
        mine = [m for m in rows if m.name == name]
        ax.plot([m.batch for m in mine], [m.tokens_per_second for m in mine], marker="o", label=name)
    ax.set_xscale("log", base=2)
    sizes = sorted({m.batch for m in rows})
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s, all rows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def plot_speedup_tau(rows: list[Method], path: Path, what: str) -> None:
    """Speedup over our autoregressive loop against tau (tokens per target call), one point per speculative row,
    coloured by its family in the survey's taxonomy; transformers' rows (no tau reported) as dashed lines."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))

    def speedup(m: Method) -> float:
        return m.tokens_per_second / rows[0].tokens_per_second

    ours = [m for m in rows[1:] if m.peer is None and m.stats.target_calls]
    for i, family in enumerate(dict.fromkeys(m.family for m in ours)):
        mine = [m for m in ours if m.family == family]
        ax.scatter([m.stats.tau for m in mine], [speedup(m) for m in mine], color=f"C{i}", label=family, alpha=0.8)
    theirs = [m for m in rows if m.peer is not None]
    for m in theirs[1:]:
        ax.axhline(speedup(m), color="gray", ls="--", lw=1)
        ax.annotate(m.name, (ax.get_xlim()[0], speedup(m)), fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xlabel("tau: tokens per target call")
    ax.set_ylabel("speedup over our autoregressive loop")
    ax.set_title(f"Every drafter on {what}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def plot_categories(speedups: dict, path: Path, what: str) -> None:
    """Each row's speedup per category (run_categories), one group of bars per category, a panel per temperature."""
    temperatures = list(speedups)
    fig, axes = pyplot().subplots(1, len(temperatures), figsize=(11, 4), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], temperatures):
        categories = list(speedups[t])
        names = list(speedups[t][categories[0]])[1:]  # the first row is the baseline
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            x = [c + (i - (len(names) - 1) / 2) * width for c in range(len(categories))]
            ax.bar(x, [speedups[t][c][name] for c in categories], width, label=name, color=f"C{i}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{what}, T = {t}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("speedup over autoregressive")
    axes[0][-1].legend(fontsize=7)
    save(fig, path)


# ---- inputs ---------------------------------------------------------------------------------------------------


def package_prompts(enc, n: int, package: str, corpus_dir: Path, context_tokens: int = 384) -> list[list[int]]:
    """Up to n code-completion prompts cut as function_prompts cuts them, from the files of a package that
    corpus_packages.txt holds out (never trained on), in path order."""
    held = {p.name: p for p in read_packages(Path(__file__).parent / "corpus_packages.txt") if p.heldout}
    refuse(
        [
            (package not in held, f"--online-package must be a held-out package ({', '.join(held)}), got {package!r}"),
            (not (corpus_dir / "packages").is_dir(), f"no package corpus in {corpus_dir}: run python train.py corpus"),
        ]
    )
    prompts = []
    for doc in package_documents(held[package], corpus_dir):
        prompt = completion_prompt(enc, document_text(doc), context_tokens) if len(prompts) < n else None
        prompts += [prompt] if prompt else []
    return prompts


def matplotlib_missing() -> bool:
    try:
        import matplotlib  # noqa: F401 (only --plot needs it)
    except ImportError:
        return True
    return False


def batch_sizes(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",")]
    except ValueError:
        raise UsageError(f"--batch takes comma-separated batch sizes, e.g. 1,2,4,8, got {value!r}") from None
    refuse([(min(sizes) < 1, f"--batch sizes must be at least 1, got {value}")])
    return sizes


def names(value: str, known: dict, flag: str) -> list[str]:
    chosen = value.split(",")
    unknown = [n for n in chosen if n not in known]
    refuse([(bool(unknown), f"unknown {flag} {', '.join(unknown)}: choose from {', '.join(known)}")])
    return chosen


TABLES = {  # the flag that asks for a table: the function that measures and prints it
    "verify": table_verify,
    "draft_length": table_draft_length,
    "siblings": table_siblings,
    "sweep_lookahead": table_sweep_lookahead,
    "sweep_exit": table_sweep_exit,
    "batch": table_batch,
    "samples": table_batch,
    "suite": table_suite,
    "suite_all": table_suite,
    "specbench": table_specbench,
    "online": table_online,
    "cost_curve": table_cost_curve,
    "pipelined": table_pipelined,
}


PLOTTED = (table_methods, table_batch, table_cost_curve, table_suite, table_specbench)  # the tables --plot draws


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20, help="number of held-out prompts (per category: --suite)")
    ap.add_argument(
        "--max-gamma",
        type=int,
        default=8,
        help="the most drafts of the policies that stop early "
        "(confidence, svip, disco, adaptive, thompson), and a second fixed row of --draft-length",
    )
    ap.add_argument("-d", "--drafter", default="draft", help="--verify: the drafter whose drafts the rules verify")
    t = ap.add_argument_group("tables (one at a time; without any: every drafter)")
    t.add_argument(
        "-v",
        "--verify",
        default=None,
        help="compare these verification rules (comma-separated: "
        f"{', '.join(VERIFIERS)}), speed against quality; the lossy ones are marked",
    )
    t.add_argument(
        "-l",
        "--draft-length",
        default=None,
        help=f"compare these draft-length policies (comma-separated: {', '.join(DRAFT_LENGTHS)})",
    )
    t.add_argument("--siblings", action="store_true", help="compare top-k and sampled tree siblings at T 0.7 and 1")
    t.add_argument("--sweep-lookahead", action="store_true", help="Lookahead decoding with several (W, N, G)")
    t.add_argument("--sweep-exit", action="store_true", help="LayerSkip's early exit at every exit layer E")
    t.add_argument(
        "--batch",
        default=None,
        help="batched decoding at these batch sizes (comma-separated, e.g. "
        "1,2,4,8,16): tokens/s of autoregressive, SpS, PLD and EAGLE-2 against batch size",
    )
    t.add_argument(
        "--samples",
        type=int,
        default=0,
        help="n samples of one prompt at -t > 0, batched: each drafts "
        "from the others' text (multi-sample speculative decoding)",
    )
    t.add_argument(
        "--suite",
        action="store_true",
        help="Spec-Bench for code: speedup per category of held-out "
        "prompts (suite.py), at T 0 and 1; --prompts is the number per category",
    )
    t.add_argument("--suite-all", action="store_true", help="--suite with every method of the table")
    t.add_argument(
        "--cost-curve",
        action="store_true",
        help="ms per target call against tokens per call (1-32), chain and tree calls, measured on this machine",
    )
    t.add_argument(
        "--pipelined",
        action="store_true",
        help="PPD and SPEED, early exits not runnable here: their latency models with this machine's measured costs",
    )
    t.add_argument(
        "--specbench",
        type=Path,
        default=None,
        metavar="PATH",
        help="Spec-Bench's question.jsonl (github.com/hemingkx/Spec-Bench, data/spec_bench/): speedup per subtask "
        "in the model's chat template, at T 0 and 1 (needs a chat model: --model smollm2)",
    )
    ap.add_argument(
        "--per-category",
        type=int,
        default=0,
        metavar="N",
        help="--specbench: at most N questions per subtask, spread over its rows (0 = all 80)",
    )
    ap.add_argument(
        "--drafters",
        type=lambda v: ["none"] + [n for n in names(v, DRAFTERS, "drafter") if n != "none"],
        default=None,
        help="the methods table, --suite and --specbench: only these drafters (comma-separated; none is the "
        "baseline and always comes first)",
    )
    ap.add_argument(
        "--budget",
        type=int,
        default=None,
        help="--batch/--samples: add a row of SpS with TETRIS's "
        "draft selection, at most this many drafts verified per batched call",
    )
    ap.add_argument(
        "--specserve",
        action="store_true",
        help="--batch/--samples: add rows of SpS and PLD whose draft lengths SpecServe chooses each step from a "
        "profiled cost model of the batched step and each row's acceptance (0 when the batch is busy)",
    )
    ap.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="also draw the table to this image file (needs matplotlib): the methods table speedup against tau, "
        "--batch tokens/s against batch size, --cost-curve ms per call, --suite/--specbench speedup per category",
    )
    ap.add_argument("--online-package", default="httpx", help="--online: the held-out package the prompts come from")
    ap.add_argument(
        "--corpus-dir",
        type=Path,
        default=Path(__file__).parent / "data" / "corpus",
        help="--online: where python train.py corpus put the packages",
    )
    ap.add_argument(
        "--peer",
        action="store_true",
        help="the methods table: add transformers' generate on the same weights (autoregressive, prompt lookup, "
        "assisted generation with the draft), the peer a user would pick (needs transformers)",
    )
    ap.add_argument(
        "-r",
        "--repeats",
        type=int,
        default=1,
        help="decode each prompt this many times with every method, interleaved, and keep each method's fastest "
        "run (the runs decode the same tokens; the machine's noise only adds time); drafters that learn across "
        "generations run once",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress line on stderr")
    ap.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="FILE",
        help="also append what the table prints (Markdown) to FILE, under a heading with the command, machine and date",
    )
    ap.set_defaults(tree=False)  # variant rows set it (methods.Setup.with_opts)
    add_run_flags(ap)
    add_method_flags(ap)  # --online here asks for the OSD table; its knobs are the CLI's
    return ap.parse_args(argv)


def check(a: argparse.Namespace) -> list:
    """The bench's own refusals; returns the table functions asked for."""
    tables = list(dict.fromkeys(f for flag, f in TABLES.items() if getattr(a, flag)))
    plot = a.plot
    refuse(
        [
            (a.prompts < 1, f"--prompts must be at least 1, got {a.prompts}"),
            (a.per_category < 0, f"--per-category must be at least 0, got {a.per_category}"),
            (a.repeats < 1, f"--repeats must be at least 1, got {a.repeats}"),
            (
                a.repeats > 1 and (a.batch or a.samples or a.cost_curve or a.pipelined),
                "--repeats repeats the decoding tables: --batch, --samples, --cost-curve and --pipelined time "
                "their own way",
            ),
            (a.per_category and a.specbench is None, "--per-category subsamples --specbench: add --specbench PATH"),
            (
                len(tables) > 1,
                "--verify, --draft-length, --siblings, --sweep-lookahead, --sweep-exit, --batch, "
                "--samples, --suite (or --suite-all), --specbench, --cost-curve, --pipelined and --online are separate "
                "tables: "
                "one at a time",
            ),
            (
                a.budget is not None and not (a.batch or a.samples),
                "--budget caps batched calls: add --batch or --samples",
            ),
            (a.budget is not None and a.budget < 0, f"--budget must be >= 0, got {a.budget}"),
            (a.specserve and not (a.batch or a.samples), "--specserve sizes batched drafts: add --batch or --samples"),
            (a.samples < 0 or a.samples == 1, f"--samples must be at least 2, got {a.samples}"),
            (a.samples > 0 and a.temperature == 0, "--samples draws several samples of one prompt: use -t > 0"),
            (
                plot is not None and (tables or [table_methods])[0] not in PLOTTED,
                "--plot draws the methods table, --batch, --cost-curve, --suite or --specbench",
            ),
            (a.peer and transformers_missing(), "--peer runs transformers' generate: pip install transformers"),
            (
                plot is not None and matplotlib_missing(),
                "--plot needs matplotlib, an optional extra: pip install matplotlib (the table alone does not)",
            ),
            (plot is not None and not plot.parent.is_dir(), f"--plot {plot}: that folder does not exist"),
            (
                plot is not None and plot.suffix.lower() not in PLOT_FORMATS,
                f"--plot writes {', '.join(PLOT_FORMATS)} images, got {plot}",
            ),
            (a.batch is not None and not batch_sizes(a.batch), "--batch needs at least one batch size"),
            (a.drafter not in DRAFTERS, f"unknown drafter {a.drafter!r}: choose one of {', '.join(DRAFTERS)}"),
        ]
    )
    return tables or [table_methods]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    (table,) = check(args)
    ck = load_target(args)
    bench = Bench(args, setup_for(args, ck), ck.enc, ck.eot, ck.chat, ck.end_of_turn, ck.folder)
    if args.markdown is None:
        return table(bench)
    printed = io.StringIO()
    with contextlib.redirect_stdout(Tee(sys.stdout, printed)):
        table(bench)
    with open(args.markdown, "a") as f:
        heading = markdown_heading(argv if argv is not None else sys.argv[1:], args)
        f.write(f"{heading}\n{markdown_body(printed.getvalue())}\n")


class Tee:
    """A stream that writes to several: the terminal and the Markdown being collected (--markdown)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def markdown_body(printed: str) -> str:
    """What the bench printed, as Markdown: a table's rows stay together, every other line is a paragraph of its
    own (a terminal shows one line per note or histogram, which Markdown would run together)."""
    lines = [line for line in printed.splitlines() if line.strip()]
    out = lines[:1]
    for before, line in zip(lines, lines[1:]):
        out.append(line if before.startswith("|") and line.startswith("|") else f"\n{line}")
    return "\n".join(out) + "\n"


def markdown_heading(argv: list[str], args: argparse.Namespace) -> str:
    """### the command (less --markdown), then the machine and date it ran on: every table in docs/results.md says
    where it is from."""
    kept = [a for i, a in enumerate(argv) if not a.startswith("--markdown") and (i == 0 or argv[i - 1] != "--markdown")]
    command = " ".join(["python bench.py", *(shlex.quote(a) for a in kept)])
    machine = (
        f"{cost.cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name(0)}; {machine}"
    return f"### `{command}`\n{machine}, {'bf16' if args.bf16 else 'fp32'}, {datetime.date.today().isoformat()}\n"


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
