"""Spec-Bench-style measurement (Xia et al. 2024, §8 and Table 5): every method on the same prompts, same model,
same settings, interleaved in one run on one machine; speedup is the ratio to our own autoregressive loop.

Prompts are real code completions: a few hundred tokens of a held-out standard-library file (never trained on),
cut just inside a function body, as an editor would send them.

    python bench.py --prompts 20 -n 128                        # every drafter (the README's results table)
    python bench.py --verify exact,topk,bild                   # verification rules: speed against quality (-t 0)
    python bench.py --verify exact,typical,lenient -t 0.7      # ... the sampling ones
    python bench.py --draft-length fixed,heuristic,confidence,svip,disco,dynamic   # draft-length policies
    python bench.py --siblings                                 # deterministic vs sampled tree siblings, T 0.7 and 1
    python bench.py --sweep-lookahead --prompts 8 -n 64        # Lookahead decoding's W, N, G on this machine
    python bench.py --sweep-exit --prompts 8 -n 64             # LayerSkip's early exit at every exit layer E
    python bench.py --batch 1,2,4,8,16,32 -n 64 --budget 8     # batched speculative decoding against batch size
    python bench.py --samples 8 -t 1 -n 64                     # 8 samples of one prompt drafting for each other
    python bench.py --suite --prompts 10 -n 32                 # Spec-Bench for code: speedup per prompt category
    python bench.py --suite-all --prompts 10 -n 32             # ... every method (27 minutes on 2 CPU cores)
    python bench.py --online --prompts 8 -n 64                 # OSD: acceptance before and after, on a held-out package
"""

import argparse
import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from batched import (
    BatchModelDrafter,
    BatchPromptLookup,
    CrossSampleLookup,
    NoDrafts,
    batch_speculative_generate,
    batch_tree_speculative_generate,
)
from corpus import document_text, package_documents, read_packages
from draft_length import Adaptive, DraftLength
from drafters import Drafter
from online import OnlineDrafter
from specdec import (
    DATA_DIR,
    DRAFT_LENGTHS,
    EXIT_LAYER,
    TREE_ONLY,
    VERIFIERS,
    OneLineParser,
    Stats,
    UsageError,
    check_args,
    decode,
    load_checked,
    load_model,
    make_draft_length,
    make_drafter,
    make_verifier,
    refuse,
)
from suite import CATEGORIES, suite_prompts
from tokenizer import load_tokenizer
from train import completion_prompt, function_prompts
from verify import Verifier

SUITE_FAMILIES = ("Autoregressive", "SpS", "PLD", "EAGLE-2", "Lookahead", "SuffixDecoding", "SAM Decoding")
PLOT_FORMATS = (".png", ".pdf", ".svg")  # what --plot writes (matplotlib's Agg backend writes each)
LOOKAHEAD_SWEEP = [(1, 2, 1), (2, 2, 2), (3, 2, 3), (2, 3, 2), (3, 3, 3), (5, 3, 5), (3, 4, 3), (5, 4, 5), (7, 4, 7)]


@dataclass
class Method:
    """One row of a table: a drafter (None = autoregressive) and how its drafts are verified and sized."""

    name: str
    drafter: Drafter | None
    use_tree: bool = False
    verifier: Verifier | None = None  # None: verify.exact
    length: DraftLength | None = None  # None: a fixed gamma
    temperature: float | None = None  # None: the run's -t
    tokens: int = 0  # summed over prompts: tokens produced ...
    seconds: float = 0.0  # ... wall time ...
    stats: Stats = field(default_factory=Stats)  # ... and the loop's counts
    agree: int = 0  # produced tokens equal to the target's argmax after the text before them
    nll: float = 0.0  # summed -log p_target(token | text before it), temperature 1
    identical: int = 0  # outputs equal to the autoregressive run's, token for token
    per_prompt: list[Stats] = field(default_factory=list)  # the loop's counts of each prompt, in order
    rates: list[float] = field(default_factory=list)  # tokens per second of each prompt, in order


def continuation_quality(target, prompt: list[int], out: list[int]) -> tuple[int, float]:
    """(tokens equal to the target's own greedy choice given the text before them, summed NLL of the tokens under
    the target): the quality cost of a lossy rule, teacher-forced on what it produced (untimed)."""
    if not out:
        return 0, 0.0
    device = target.lm_head.weight.device
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


def run(target, method: Method, prompt: list[int], args, device: str) -> list[int]:
    """Decode one prompt with `method`, add its counts to the method's totals, return the output."""
    temperature = args.temperature if method.temperature is None else method.temperature
    t0 = clock(device)
    out, stats = decode(
        target,
        method.drafter,
        method.use_tree,
        prompt,
        args.max_new_tokens,
        args.gamma,
        verifier=method.verifier,
        draft_length=method.length,
        temperature=temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=torch.Generator(device).manual_seed(args.seed),
    )
    seconds = clock(device) - t0
    method.seconds += seconds
    method.tokens += len(out)
    method.rates.append(len(out) / seconds)
    if stats:
        method.stats.merge(stats)
        method.per_prompt.append(stats)
    return out


def measure(target, methods: list[Method], prompts: list[list[int]], args, device: str) -> None:
    """Every method on every prompt, interleaved (drifts of a noisy machine hit every method alike), after an
    untimed warm-up; methods[0] is the autoregressive reference that `identical` compares with."""
    warm = argparse.Namespace(**{**vars(args), "max_new_tokens": 8})
    for method in methods:
        run(target, method, prompts[0][:64], warm, device)
        method.tokens, method.seconds, method.stats, method.per_prompt, method.rates = 0, 0.0, Stats(), [], []
    for i, prompt in enumerate(prompts):
        reference = None
        for method in methods:
            progress(args, f"prompt {i + 1} of {len(prompts)}: {method.name}")
            out = run(target, method, prompt, args, device)
            reference = out if reference is None else reference
            agree, nll = continuation_quality(target, prompt, out)
            method.agree += agree
            method.nll += nll
            method.identical += out == reference
    progress(args, f"{len(prompts)} prompts done\n")


def mean_rate(methods: list[Method]) -> float:
    """Tokens/s averaged over every prompt of these Methods (Spec-Bench averages per prompt, not per token)."""
    return sum(r for m in methods for r in m.rates) / sum(len(m.rates) for m in methods)


def spec_bench_speedup(methods: list[Method], baselines: list[Method]) -> float:
    return mean_rate(methods) / mean_rate(baselines)


def print_suite(results: dict[str, list[Method]], temperature: float) -> None:
    """Spec-Bench's Table 5 layout: each method's speedup per category and overall, its tau over all categories,
    then each method's accepted-length histogram. A speedup is Spec-Bench's (its evaluation/speed.py): the mean of
    the method's per-prompt tokens/s over the mean of the baseline's, "overall" pooling every category's prompts."""
    print(f"\nT = {temperature}\n")
    print("| Method | " + " | ".join(CATEGORIES) + " | overall | tau |")
    print("|---|" + "---|" * (len(CATEGORIES) + 2))
    totals = []  # each method over every category, for the histograms
    for i, name in enumerate(m.name for m in results[CATEGORIES[0]]):
        rows = [results[c][i] for c in CATEGORIES]
        base = [results[c][0] for c in CATEGORIES]
        total = Method(name, None)
        for m in rows:
            total.stats.merge(m.stats)
        tau = f"{total.stats.tau:.2f}" if total.stats.target_calls else "1.00"
        print(
            f"| {name} | "
            + " | ".join(f"{spec_bench_speedup([m], [b]):.2f}x" for m, b in zip(rows, base))
            + f" | {spec_bench_speedup(rows, base):.2f}x | {tau} |"
        )
        totals.append(total)
    print_histograms(totals)


def progress(args, line: str) -> None:
    """One line on stderr, rewritten in place (off with --quiet): a long run shows where it is."""
    if not args.quiet:
        print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)


def speed_columns(m: Method, base: Method) -> str:
    rate, base_rate = m.tokens / m.seconds, base.tokens / base.seconds
    s = m.stats
    if s.target_calls == 0:
        return f"1.00 | - | {rate:.1f} | 1.00x"
    theory = f" ({s.predicted_acceptance_rate:.2f})" if s.expected_accepted else ""
    return f"{s.tau:.2f} | {s.acceptance_rate:.2f}{theory} | {rate:.1f} | {rate / base_rate:.2f}x"


def print_methods(methods: list[Method], n_prompts: int, temperature: float) -> None:
    print(
        "| Method | tau (tokens/call) | acceptance (theory) | tokens/s | speedup | draft ms/drafted token "
        "| verify ms/call | candidates + extra tokens per call |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = methods[0]
    for m in methods:
        s = m.stats
        calls = max(1, s.target_calls)
        draft_ms = f"{1000 * s.draft_seconds / max(1, s.drafted):.2f}" if s.target_calls else "-"
        verify_ms = 1000 * (s.verify_seconds / s.target_calls if s.target_calls else m.seconds / m.tokens)
        width = f"{s.drafted / calls:.1f} + {s.extra / calls:.1f}" if s.target_calls else "-"
        print(f"| {m.name} | {speed_columns(m, base)} | {draft_ms} | {verify_ms:.1f} | {width} |")
    print_histograms(methods)


def print_histograms(methods: list[Method]) -> None:
    for m in methods:
        if m.stats.target_calls:
            print(f"{m.name}: accepted drafts per call {dict(enumerate(m.stats.accept_counts))}")


def print_verifiers(methods: list[Method], n_prompts: int, temperature: float) -> None:
    print(
        "| Rule | lossy | tau (tokens/call) | acceptance (lossless theory) | tokens/s | speedup | agreement with "
        "target greedy | target NLL/token | outputs identical to autoregressive |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = methods[0]
    for m in methods:
        lossy = "-" if m.verifier is None else ("**LOSSY**" if m.verifier.lossy else "no")
        identical = f"{m.identical}/{n_prompts}" if temperature == 0 else "n/a (sampling)"
        print(
            f"| {m.name} | {lossy} | {speed_columns(m, base)} | {m.agree / max(1, m.tokens):.3f} | "
            f"{m.nll / max(1, m.tokens):.3f} | {identical} |"
        )
    print_histograms(methods)


def print_lengths(methods: list[Method], n_prompts: int, temperature: float) -> None:
    print(
        "| Policy | drafter | tau (tokens/call) | acceptance (theory) | tokens/s | speedup | drafted/call | "
        "wasted drafts/call | draft ms/call | verify ms/call |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in methods[1:]:
        s, calls = m.stats, max(1, m.stats.target_calls)
        print(
            f"| {m.name} | {'EAGLE-2 tree' if m.use_tree else 'draft model chain'} | {speed_columns(m, methods[0])} | "
            f"{s.drafted / calls:.2f} | {(s.drafted - s.accepted) / calls:.2f} | "
            f"{1000 * s.draft_seconds / calls:.1f} | {1000 * s.verify_seconds / calls:.1f} |"
        )
    print_histograms(methods[1:])


def print_siblings(methods: list[Method], n_prompts: int, temperature: float) -> None:
    print("| Drafter | siblings | temperature | tau (tokens/call) | acceptance | tokens/s | speedup |")
    print("|---|---|---|---|---|---|---|")
    bases = {m.temperature: m for m in methods if m.drafter is None}
    for m in methods:
        if m.drafter is not None:
            drafter, siblings = m.name.split(", ")
            print(f"| {drafter} | {siblings} | {m.temperature} | {speed_columns(m, bases[m.temperature])} |")


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


def acceptance(stats: list[Stats]) -> str:
    accepted, compared = sum(s.accepted for s in stats), sum(s.compared for s in stats)
    return f"{accepted / max(1, compared):.3f} ({accepted}/{compared})"


def print_online(methods: list[Method], n_prompts: int, temperature: float) -> None:
    print(
        "| Method | acceptance, first half of the prompts | acceptance, second half | tau (tokens/call) | tokens/s | "
        "speedup | draft updates | updating s (inside the timing) | share of the time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base, half = methods[0], n_prompts // 2
    for m in methods:
        online = m.drafter if isinstance(m.drafter, OnlineDrafter) else None
        halves = f"{acceptance(m.per_prompt[:half])} | {acceptance(m.per_prompt[half:])}" if m.per_prompt else "- | -"
        rate = m.tokens / m.seconds
        updates = (
            f"{online.updates} | {online.update_seconds:.2f} | {online.update_seconds / m.seconds:.1%}"
            if online
            else "- | - | -"
        )
        tau = f"{m.stats.tau:.2f}" if m.stats.target_calls else "1.00"
        print(f"| {m.name} | {halves} | {tau} | {rate:.1f} | {rate / (base.tokens / base.seconds):.2f}x | {updates} |")
    print_histograms(methods)
    for m in methods:
        if isinstance(m.drafter, OnlineDrafter):
            print(
                f"{m.name}: KL(p||q) on the buffer before each update {' '.join(f'{x:.2f}' for x in m.drafter.losses)}"
            )


def main(
    weights: str,
    device: str | None,
    prompts: int,
    max_new_tokens: int,
    gamma: int,
    max_gamma: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    bf16: bool,
    tree_size: int,
    tree_depth: int,
    tree_width: int,
    drafter: str,
    verify: str | None,
    draft_length: str | None,
    siblings: bool,
    sweep_lookahead: bool,
    sweep_exit: bool,
    batch: str | None,
    plot: str | None,
    quiet: bool,
    budget: int | None,
    samples: int,
    suite: bool,
    suite_all: bool,
    online: bool,
    online_package: str,
    corpus_dir: str,
    online_lr: float,
    online_every: int,
    online_steps: int,
    topk_beta: int,
    topk_tau: float,
    bild_rollback: float,
    bild_fallback: float,
    lenience: float,
    typical_epsilon: float,
    typical_delta: float,
    confidence: float,
    svip_threshold: float,
    disco_threshold: float | None,
    ddd_threshold: float,
) -> None:
    args = argparse.Namespace(
        max_new_tokens=max_new_tokens,
        gamma=gamma,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        quiet=quiet,
    )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    suite = suite or suite_all  # --suite-all is the suite with every method
    check_args(
        "bench",
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        min(gamma, max_gamma),
        drafter,
        device,
        tree_size,
        tree_depth,
        tree_width,
        seed,
    )
    refuse(
        [
            (prompts < 1, f"--prompts must be at least 1, got {prompts}"),
            (
                sum(
                    map(
                        bool,
                        (verify, draft_length, siblings, sweep_lookahead, sweep_exit, batch, samples, suite, online),
                    )
                )
                > 1,
                "--verify, --draft-length, --siblings, --sweep-lookahead, --sweep-exit, --batch, --samples, --suite "
                "(or --suite-all) and --online are separate tables: one at a time",
            ),
            (budget is not None and not (batch or samples), "--budget caps batched calls: add --batch or --samples"),
            (budget is not None and budget < 0, f"--budget must be >= 0, got {budget}"),
            (samples < 0 or samples == 1, f"--samples must be at least 2, got {samples}"),
            (samples > 0 and temperature == 0, "--samples draws several samples of one prompt: use -t > 0"),
            (plot is not None and not batch, "--plot draws the --batch curve: add --batch"),
            (
                plot is not None and matplotlib_missing(),
                "--plot needs matplotlib, an optional extra: pip install matplotlib (the table alone does not)",
            ),
            (plot is not None and not Path(plot).parent.is_dir(), f"--plot {plot}: that folder does not exist"),
            (
                plot is not None and Path(plot).suffix.lower() not in PLOT_FORMATS,
                f"--plot writes {', '.join(PLOT_FORMATS)} images, got {plot}",
            ),
            (
                not 0 < online_lr < float("inf") or online_every < 1 or online_steps < 1,
                "--online-lr must be > 0, --online-every and --online-steps at least 1",
            ),
            (bool(verify) and drafter == "none", "--verify needs a drafter whose drafts the rules verify"),
            (not 0 <= bild_fallback <= 1, f"--bild-fallback must be in [0, 1], got {bild_fallback}"),
        ]
    )
    dtype = torch.bfloat16 if bf16 else torch.float32
    weights = Path(weights)
    enc = load_checked("tokenizer", weights / "tokenizer.tiktoken", load_tokenizer)
    target = load_model(weights / "target", device, dtype)

    def drafter_named(name: str, sampled: bool = False, exit_layer: int = EXIT_LAYER) -> Drafter:
        return load_checked(
            f"{name} drafter",
            weights,
            lambda _: make_drafter(
                name, weights, target, dtype, tree_size, tree_depth, tree_width, sampled, exit_layer=exit_layer
            ),
        )

    if batch or samples:  # survey §9: batched speculative decoding
        draft = load_model(weights / "draft", device, dtype)
        eagle = drafter_named("eagle")  # one per row, sharing the head: each keeps its own cache
        methods = [
            ("Autoregressive", NoDrafts, None, False),
            ("SpS (draft model)", lambda: BatchModelDrafter(draft), None, False),
            ("PLD (prompt lookup)", BatchPromptLookup, None, False),
            ("EAGLE-2 (dynamic tree, drafted row by row)", lambda: copy.copy(eagle), None, True),
        ]
        if budget is not None:
            methods.append((f"SpS + TETRIS ({budget} drafts/call)", lambda: BatchModelDrafter(draft), budget, False))
        if samples:  # n samples of one prompt: the others' text drafts for each sample
            methods.append(("Cross-sample lookup (multi-sample SD)", CrossSampleLookup, None, False))
            batches = [[function_prompts(enc, 1, heldout=True)[0][-128:]] * samples]
        else:
            prompts = [p[-128:] for p in function_prompts(enc, max(batch_sizes(batch)), heldout=True)]
            refuse(
                [
                    (
                        len(prompts) < max(batch_sizes(batch)),
                        f"--batch {max(batch_sizes(batch))} needs that many held-out prompts; there are {len(prompts)}",
                    )
                ]
            )
            batches = [prompts[:B] for B in batch_sizes(batch)]
        measure_batches(target, batches, methods, args, device, enc.eot_token, plot)
        return
    autoregressive = Method("Autoregressive", None)
    if verify:  # one drafter, every rule: speed against quality
        use_tree = drafter in TREE_ONLY
        methods = [autoregressive] + [
            Method(
                rule,
                drafter_named(drafter),
                use_tree,
                make_verifier(
                    rule, temperature, topk_beta, topk_tau, bild_rollback, lenience, typical_epsilon, typical_delta
                ),
                make_draft_length(
                    "confidence",
                    gamma,
                    use_tree,
                    drafter,
                    weights,
                    bild_fallback,
                    svip_threshold,
                    disco_threshold,
                    ddd_threshold,
                )
                if rule == "bild" and not use_tree and drafter != "pld"
                else None,
            )
            for rule in names(verify, VERIFIERS, "--verify")
        ]
        printer = print_verifiers
    elif draft_length:  # chain policies on the draft model; fixed and dynamic depth on EAGLE-2 trees
        chosen = names(draft_length, DRAFT_LENGTHS, "--draft-length")

        def policy(name: str, g: int, use_tree: bool) -> Method:
            return Method(
                f"{name} ({'EAGLE-2' if use_tree else f'gamma {g}'})",
                drafter_named("eagle" if use_tree else "draft"),
                use_tree,
                length=make_draft_length(
                    name,
                    g,
                    use_tree,
                    "eagle" if use_tree else "draft",
                    weights,
                    confidence,
                    svip_threshold,
                    disco_threshold,
                    ddd_threshold,
                ),
            )

        methods = [autoregressive]
        methods += [policy("fixed", g, False) for g in sorted({gamma, max_gamma}) if "fixed" in chosen]
        methods += [policy("heuristic", gamma, False)] if "heuristic" in chosen else []
        methods += [policy(name, max_gamma, False) for name in ("confidence", "svip", "disco") if name in chosen]
        methods += [policy(name, gamma, True) for name in ("fixed", "dynamic") if name in chosen]
        printer = print_lengths
    elif sweep_lookahead:  # Lookahead decoding's knobs (W, N, G): extra tokens cost time on a CPU
        methods = [autoregressive] + [
            Method(
                f"lookahead W {w}, N {n}, G {g}",
                make_drafter(
                    "lookahead", weights, target, dtype, tree_size, tree_depth, tree_width, lookahead=(w, n, g)
                ),
                True,
            )
            for w, n, g in LOOKAHEAD_SWEEP
        ]
        printer = print_methods
    elif sweep_exit:  # LayerSkip's early exit at every exit layer: acceptance against draft cost
        methods = [autoregressive] + [
            Method(f"early exit E {e}", drafter_named("earlyexit", exit_layer=e))
            for e in range(1, target.config.num_hidden_layers)
        ]
        printer = print_methods
    elif siblings:  # SpecInfer/SpecTr: sampled tree children against top-k children, at T = 0.7 and 1.0
        methods = []
        for t in (0.7, 1.0):
            methods.append(Method("Autoregressive", None, temperature=t))
            for name, label in (("draft", "SpS tree"), ("eagle", "EAGLE-2")):
                for sampled in (False, True):
                    methods.append(
                        Method(
                            f"{label}, {'sampled i.i.d.' if sampled else 'top-k'}",
                            drafter_named(name, sampled),
                            True,
                            temperature=t,
                        )
                    )
        printer = print_siblings
    elif online:  # OSD: one OnlineDrafter per row, carried across the prompts, so it learns across requests
        draft = drafter_named("draft").model  # each OnlineDrafter trains its own deepcopy of it
        methods = [autoregressive, Method("SpS (fixed draft)", drafter_named("draft"))] + [
            Method(f"OSD ({label})", OnlineDrafter(draft, online_lr, online_every, online_steps, rows))
            for rows, label in (("rejected", "rejected positions, as the paper"), ("all", "every verified position"))
        ]
        printer = print_online
    else:
        methods = [
            autoregressive,
            Method("SpS (draft model)", drafter_named("draft")),
            Method("PLD (prompt lookup)", drafter_named("pld")),
            Method("SpS tree (draft model, EAGLE-2 tree)", drafter_named("draft"), True),
            Method("PLD tree (several matches)", drafter_named("pld"), True),
            Method("Medusa (static tree)", drafter_named("medusa"), True),
            Method("Hydra (dynamic tree)", drafter_named("hydra"), True),
            Method("Blockwise (Medusa's heads, top-1 chain)", drafter_named("blockwise"), True),
            Method("EAGLE-2 (dynamic tree)", drafter_named("eagle"), True),
            Method("Jacobi (block 4)", drafter_named("jacobi"), True),
            Method("Lookahead (W 3, N 3, G 3)", drafter_named("lookahead"), True),
            Method("PaSS (4 lookahead embeddings)", drafter_named("pass"), True),
            Method("SuffixDecoding (suffix tries, learns across prompts)", drafter_named("suffix"), True),
            Method(
                "Draft & Verify (sublayers skipped, adaptive stop)",
                drafter_named("layerskip"),
                length=Adaptive(max_gamma),
            ),
            Method(f"LayerSkip early exit (E {EXIT_LAYER}, shared cache)", drafter_named("earlyexit")),
            Method("DEL (exit layer and length chosen per step)", drafter_named("del")),
            Method("ML-SpecQD (int8 self-draft)", drafter_named("quant")),
            Method("CS Drafting (vertical: PLD under the draft model)", drafter_named("cascade")),
            Method(
                f"CS Drafting (vertical + horizontal: PLD after {max(1, gamma // 2)} model tokens)",
                make_drafter(
                    "cascade",
                    weights,
                    target,
                    dtype,
                    tree_size,
                    tree_depth,
                    tree_width,
                    cascade_horizontal=max(1, gamma // 2),
                ),
            ),
            Method(
                "Collective tree (SpecInfer: draft model + PLD"
                + (" + REST)" if (DATA_DIR / "datastore.npy").is_file() else ")"),
                drafter_named("collective"),
                True,
            ),
        ]
        if (weights / "specdec" / "model.safetensors").is_file():
            methods.append(Method("SpecDec NAR drafter (K mask queries, one call)", drafter_named("specdec")))
        else:
            print(f"note: no SpecDec drafter in {weights / 'specdec'}, so no SpecDec row (python train.py specdec)")
        if (DATA_DIR / "datastore.npy").is_file() and (DATA_DIR / "sam.npz").is_file():
            methods += [
                Method("REST (suffix array of train split)", drafter_named("rest"), True),
                Method("SAM Decoding (suffix automata)", drafter_named("sam"), True),
            ]
        else:
            print(
                f"note: no retrieval datastore in {DATA_DIR}, so no REST and SAM rows "
                "(python train.py data && python train.py datastore)"
            )
        printer = print_methods
    if suite:  # Spec-Bench for code: every method of the table, on each category of held-out prompts, T 0 and 1
        categories = suite_prompts(enc, prompts)
        print(
            f"{min(map(len, categories.values()))}-{max(map(len, categories.values()))} held-out prompts per "
            f"category, {max_new_tokens} new tokens max, gamma {gamma}, device {device}, "
            f"{'bf16' if bf16 else 'fp32'}"
        )
        if not suite_all:  # one method of each family: every method is about 30 minutes on a 2-core CPU
            methods = [m for m in methods if m.name.split(" (")[0] in SUITE_FAMILIES]
        for t in (0.0, 1.0):
            results = {
                c: [Method(m.name, m.drafter, m.use_tree, m.verifier, m.length, temperature=t) for m in methods]
                for c in categories
            }
            for category, todo in categories.items():
                progress(args, f"T {t}, {category}: ")
                measure(target, results[category], todo, args, device)
            print_suite(results, t)
        return
    todo = (
        package_prompts(enc, prompts, online_package, Path(corpus_dir))
        if online
        else function_prompts(enc, prompts, heldout=True)
    )
    measure(target, methods, todo, args, device)
    source = f"from the held-out package {online_package}" if online else "from the standard library"
    print(
        f"\n{len(todo)} held-out prompts {source}, {max_new_tokens} new tokens max, gamma {gamma}, temperature "
        f"{'0.7 and 1.0' if siblings else temperature}, device {device}, {'bf16' if bf16 else 'fp32'}; trees: "
        f"{tree_size} nodes, depth {tree_depth}, width {tree_width}\n"
    )
    if online:
        print(
            f"OSD: Adam lr {online_lr}, an update when the buffer holds {online_every} positions, {online_steps} "
            f"steps each; forward KL(p || q); one drafter per row carried across the prompts\n"
        )
    printer(methods, len(todo), temperature)


def measure_batches(
    target, batches: list[list[list[int]]], methods: list[tuple], args, device: str, eot: int, plot: str | None
) -> None:
    """Survey §9: tokens per second of each batched method (name, drafter factory, TETRIS budget or None, trees?)
    on each batch of prompts, after an untimed warm-up of that batch; the first method is each batch's baseline.
    A tree method's factory makes one drafter per row (batch_tree_speculative_generate)."""
    rows = []
    for prompts in batches:
        for name, make, budget, tree in methods:
            opts = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eot=eot)
            if not tree:
                opts.update(gamma=args.gamma, budget=budget)

            def decode_batch(n_new: int):
                if tree:
                    return batch_tree_speculative_generate(
                        target,
                        [make() for _ in prompts],
                        prompts,
                        n_new,
                        **opts,
                        generator=torch.Generator(device).manual_seed(args.seed),
                    )
                return batch_speculative_generate(
                    target, make(), prompts, n_new, **opts, generator=torch.Generator(device).manual_seed(args.seed)
                )

            decode_batch(4)  # warm-up
            # [start, end] of each call of the target's forward, one per batched call (Stats count one per active
            # row). The EAGLE head reads only the target's embedding and head, submodules these hooks do not see.
            forwards = []
            hooks = (
                target.register_forward_pre_hook(lambda *_: forwards.append([clock(device)])),
                target.register_forward_hook(lambda *_: forwards[-1].append(clock(device))),
            )
            t0 = clock(device)
            out, stats = decode_batch(args.max_new_tokens)
            seconds = clock(device) - t0
            for hook in hooks:
                hook.remove()
            times = [end - start for start, end in forwards]
            prefilled = max(map(len, prompts)) > 1  # a batch of one-token prompts has nothing to prefill
            prefill, verify = (times[0], times[1:]) if prefilled else (0.0, times)
            rows.append((len(prompts), name, stats, sum(map(len, out)) / seconds, seconds, prefill, verify))
            progress(args, f"batch {len(prompts)}: {name} done")
    progress(args, "batches done\n")
    print(
        "| batch | method | tau (tokens/row/call) | acceptance | tokens/s (all rows) | speedup over batched "
        "autoregressive | prefill ms | draft ms/call | target ms/call | overhead ms/call |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {B: rate for B, name, _, rate, *_ in rows if name == methods[0][0]}
    for B, name, s, rate, seconds, prefill, verify in rows:  # the Stats' draft time is the whole batch's
        acceptance = f"{s.acceptance_rate:.2f}" if s.drafted else "-"
        # overhead: setting up the caches and drafters, masks and positions, each row's acceptance rule (Python,
        # row by row), dropping finished rows. The drafters' own prefill counts as drafting.
        other = seconds - prefill - s.draft_seconds - sum(verify)
        per_call = [1000 * t / max(1, len(verify)) for t in (s.draft_seconds, sum(verify), other)]
        print(
            f"| {B} | {name} | {s.tau:.2f} | {acceptance} | {rate:.1f} | {rate / base[B]:.2f}x | "
            f"{1000 * prefill:.0f} | " + " | ".join(f"{ms:.1f}" for ms in per_call) + " |"
        )
    if plot:
        import matplotlib  # an optional extra, checked before the run (matplotlib_missing)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for name, *_ in methods:
            plt.plot(
                [row[0] for row in rows if row[1] == name],
                [row[3] for row in rows if row[1] == name],
                marker="o",
                label=name,
            )
        plt.xscale("log", base=2)
        plt.xlabel("batch size")
        plt.ylabel("tokens/s, all rows")
        plt.legend()
        plt.savefig(plot, dpi=120)


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


def names(value: str, known: tuple, flag: str) -> list[str]:
    chosen = value.split(",")
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise UsageError(f"unknown {flag} {', '.join(unknown)}: choose from {', '.join(known)}")
    return chosen


if __name__ == "__main__":
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--weights", default=str(Path(__file__).parent / "weights"), help="weights directory")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--prompts", type=int, default=20, help="number of held-out prompts")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=128, help="tokens to generate per prompt")
    ap.add_argument("-g", "--gamma", type=int, default=4, help="draft tokens per target call")
    ap.add_argument(
        "--max-gamma",
        type=int,
        default=8,
        help="--draft-length: the most drafts of the policies that "
        "stop early (confidence, svip, disco), and a second fixed row",
    )
    ap.add_argument("--tree-size", type=int, default=12, help="drafted nodes per tree")
    ap.add_argument("--tree-depth", type=int, default=6, help="deepest tree level")
    ap.add_argument("--tree-width", type=int, default=2, help="children per node and nodes expanded per level")
    ap.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("-k", "--top-k", type=int, default=0, help="top-k warping (0 = off)")
    ap.add_argument("--top-p", type=float, default=1.0, help="top-p warping (1 = off)")
    ap.add_argument("-s", "--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 models (fp32 by default)")
    ap.add_argument("-d", "--drafter", default="draft", help="--verify: the drafter whose drafts the rules verify")
    ap.add_argument(
        "-v",
        "--verify",
        default=None,
        help="compare these verification rules (comma-separated: "
        f"{', '.join(VERIFIERS)}), speed against quality; the lossy ones are marked",
    )
    ap.add_argument(
        "-l",
        "--draft-length",
        default=None,
        help=f"compare these draft-length policies (comma-separated: {', '.join(DRAFT_LENGTHS)})",
    )
    ap.add_argument("--siblings", action="store_true", help="compare top-k and sampled tree siblings at T 0.7 and 1")
    ap.add_argument("--sweep-lookahead", action="store_true", help="Lookahead decoding with several (W, N, G)")
    ap.add_argument("--sweep-exit", action="store_true", help="LayerSkip's early exit at every exit layer E")
    ap.add_argument(
        "--batch",
        default=None,
        help="batched decoding at these batch sizes (comma-separated, e.g. "
        "1,2,4,8,16): tokens/s of autoregressive, SpS, PLD and EAGLE-2 against batch size",
    )
    ap.add_argument(
        "--budget",
        type=int,
        default=None,
        help="--batch/--samples: add a row of SpS with TETRIS's "
        "draft selection, at most this many drafts verified per batched call",
    )
    ap.add_argument(
        "--samples",
        type=int,
        default=0,
        help="n samples of one prompt at -t > 0, batched: each drafts "
        "from the others' text (multi-sample speculative decoding)",
    )
    ap.add_argument(
        "--suite",
        action="store_true",
        help="Spec-Bench for code: speedup per category of held-out "
        "prompts (suite.py), at T 0 and 1; --prompts is the number per category",
    )
    ap.add_argument(
        "--suite-all", action="store_true", help="--suite with every method of the table, not one per family"
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress line on stderr")
    ap.add_argument("--plot", default=None, help="--batch: also draw the curve to this image file (needs matplotlib)")
    ap.add_argument(
        "--online",
        action="store_true",
        help="Online Speculative Decoding: the fixed draft against "
        "drafts distilled while serving, acceptance in the first and second half of the prompts",
    )
    ap.add_argument("--online-package", default="httpx", help="--online: the held-out package the prompts come from")
    ap.add_argument(
        "--corpus-dir",
        default=str(Path(__file__).parent / "data" / "corpus"),
        help="--online: where python train.py corpus put the packages",
    )
    ap.add_argument("--online-lr", type=float, default=1e-5, help="--online: Adam learning rate")
    ap.add_argument(
        "--online-every", type=int, default=32, help="--online: update when the buffer holds this many positions"
    )
    ap.add_argument("--online-steps", type=int, default=4, help="--online: Adam steps per update")
    ap.add_argument("--topk-beta", type=int, default=5, help="topk rule: top beta")
    ap.add_argument("--topk-tau", type=float, default=3.0, help="topk rule: log-probability tolerance")
    ap.add_argument("--bild-rollback", type=float, default=5.0, help="bild rule: rollback threshold")
    ap.add_argument("--bild-fallback", type=float, default=0.6, help="bild rule: fallback threshold")
    ap.add_argument("--lenience", type=float, default=0.5, help="lenient rule: lenience l")
    ap.add_argument("--typical-epsilon", type=float, default=0.09, help="typical rule: epsilon")
    ap.add_argument("--typical-delta", type=float, default=0.3, help="typical rule: delta")
    ap.add_argument("--confidence", type=float, default=0.4, help="confidence policy: threshold")
    ap.add_argument("--svip-threshold", type=float, default=0.3, help="svip policy: threshold")
    ap.add_argument("--disco-threshold", type=float, default=None, help="disco policy: threshold (default: trained)")
    ap.add_argument("--ddd-threshold", type=float, default=0.1, help="dynamic policy: frontier mass threshold")
    try:
        main(**vars(ap.parse_args()))
    except UsageError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
