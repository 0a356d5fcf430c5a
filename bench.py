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
"""
import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draft_length import Adaptive, DraftLength
from drafters import Drafter
from specdec import (DATA_DIR, DRAFT_LENGTHS, TREE_ONLY, VERIFIERS, OneLineParser, Stats, UsageError, check_args, decode,
                     load_checked, load_model, make_draft_length, make_drafter, make_verifier, refuse)
from tokenizer import load_tokenizer
from train import function_prompts
from verify import Verifier


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


def continuation_quality(target, prompt: list[int], out: list[int]) -> tuple[int, float]:
    """(tokens equal to the target's own greedy choice given the text before them, summed NLL of the tokens under
    the target): the quality cost of a lossy rule, teacher-forced on what it produced (untimed)."""
    if not out:
        return 0, 0.0
    device = target.lm_head.weight.device
    with torch.inference_mode():
        logits = target(torch.tensor([prompt + out], device=device))[0, len(prompt) - 1:-1].float()  # [len(out), V]
    tokens = torch.tensor(out, device=device)
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).sum()
    return int((logits.argmax(dim=-1) == tokens).sum()), float(nll)


def run(target, method: Method, prompt: list[int], args, device: str) -> list[int]:
    """Decode one prompt with `method`, add its counts to the method's totals, return the output."""
    temperature = args.temperature if method.temperature is None else method.temperature
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, stats = decode(target, method.drafter, method.use_tree, prompt, args.max_new_tokens, args.gamma,
                        verifier=method.verifier, draft_length=method.length, temperature=temperature,
                        top_k=args.top_k, top_p=args.top_p, generator=torch.Generator(device).manual_seed(args.seed))
    if device == "cuda":
        torch.cuda.synchronize()
    method.seconds += time.perf_counter() - t0
    method.tokens += len(out)
    if stats:
        method.stats.merge(stats)
    return out


def measure(target, methods: list[Method], prompts: list[list[int]], args, device: str) -> None:
    """Every method on every prompt, interleaved (drifts of a noisy machine hit every method alike), after an
    untimed warm-up; methods[0] is the autoregressive reference that `identical` compares with."""
    warm = argparse.Namespace(**{**vars(args), "max_new_tokens": 8})
    for method in methods:
        run(target, method, prompts[0][:64], warm, device)
        method.tokens, method.seconds, method.stats = 0, 0.0, Stats()
    for prompt in prompts:
        reference = None
        for method in methods:
            out = run(target, method, prompt, args, device)
            reference = out if reference is None else reference
            agree, nll = continuation_quality(target, prompt, out)
            method.agree += agree
            method.nll += nll
            method.identical += out == reference


def speed_columns(m: Method, base: Method) -> str:
    rate, base_rate = m.tokens / m.seconds, base.tokens / base.seconds
    s = m.stats
    if s.target_calls == 0:
        return f"1.00 | - | {rate:.1f} | 1.00x"
    theory = f" ({s.predicted_acceptance_rate:.2f})" if s.expected_accepted else ""
    return f"{s.tau:.2f} | {s.acceptance_rate:.2f}{theory} | {rate:.1f} | {rate / base_rate:.2f}x"


def print_methods(methods: list[Method], n_prompts: int, temperature: float) -> None:
    print("| Method | tau (tokens/call) | acceptance (theory) | tokens/s | speedup | draft ms/drafted token | verify ms/call "
          "| candidates + extra tokens per call |")
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
    print("| Rule | lossy | tau (tokens/call) | acceptance (lossless theory) | tokens/s | speedup | agreement with "
          "target greedy | target NLL/token | outputs identical to autoregressive |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = methods[0]
    for m in methods:
        lossy = "-" if m.verifier is None else ("**LOSSY**" if m.verifier.lossy else "no")
        identical = f"{m.identical}/{n_prompts}" if temperature == 0 else "n/a (sampling)"
        print(f"| {m.name} | {lossy} | {speed_columns(m, base)} | {m.agree / max(1, m.tokens):.3f} | "
              f"{m.nll / max(1, m.tokens):.3f} | {identical} |")
    print_histograms(methods)


def print_lengths(methods: list[Method], n_prompts: int, temperature: float) -> None:
    print("| Policy | drafter | tau (tokens/call) | acceptance (theory) | tokens/s | speedup | drafted/call | "
          "wasted drafts/call | draft ms/call | verify ms/call |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in methods[1:]:
        s, calls = m.stats, max(1, m.stats.target_calls)
        print(f"| {m.name} | {'EAGLE-2 tree' if m.use_tree else 'draft model chain'} | {speed_columns(m, methods[0])} | "
              f"{s.drafted / calls:.2f} | {(s.drafted - s.accepted) / calls:.2f} | "
              f"{1000 * s.draft_seconds / calls:.1f} | {1000 * s.verify_seconds / calls:.1f} |")
    print_histograms(methods[1:])


def print_siblings(methods: list[Method], n_prompts: int, temperature: float) -> None:
    print("| Drafter | siblings | temperature | tau (tokens/call) | acceptance | tokens/s | speedup |")
    print("|---|---|---|---|---|---|---|")
    bases = {m.temperature: m for m in methods if m.drafter is None}
    for m in methods:
        if m.drafter is not None:
            drafter, siblings = m.name.split(", ")
            print(f"| {drafter} | {siblings} | {m.temperature} | {speed_columns(m, bases[m.temperature])} |")


def main(weights: str, device: str | None, prompts: int, max_new_tokens: int, gamma: int, max_gamma: int,
         temperature: float, top_k: int, top_p: float, seed: int, bf16: bool, tree_size: int, tree_depth: int,
         tree_width: int, drafter: str, verify: str | None, draft_length: str | None, siblings: bool,
         sweep_lookahead: bool, sweep_exit: bool,
         topk_beta: int, topk_tau: float, bild_rollback: float, bild_fallback: float, lenience: float,
         typical_epsilon: float, typical_delta: float, confidence: float, svip_threshold: float,
         disco_threshold: float | None, ddd_threshold: float) -> None:
    args = argparse.Namespace(max_new_tokens=max_new_tokens, gamma=gamma, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_args("bench", max_new_tokens, temperature, top_k, top_p, min(gamma, max_gamma), drafter, device,
               tree_size, tree_depth, tree_width, seed)
    refuse([(prompts < 1, f"--prompts must be at least 1, got {prompts}"),
            (sum(map(bool, (verify, draft_length, siblings, sweep_lookahead, sweep_exit))) > 1,
             "--verify, --draft-length, --siblings, --sweep-lookahead and --sweep-exit are separate tables: one at a "
             "time"),
            (bool(verify) and drafter == "none", "--verify needs a drafter whose drafts the rules verify"),
            (not 0 <= bild_fallback <= 1, f"--bild-fallback must be in [0, 1], got {bild_fallback}")])
    dtype = torch.bfloat16 if bf16 else torch.float32
    weights = Path(weights)
    enc = load_checked("tokenizer", weights / "tokenizer.tiktoken", load_tokenizer)
    target = load_model(weights / "target", device, dtype)

    def drafter_named(name: str, sampled: bool = False, exit_layer: int = 8) -> Drafter:
        return load_checked(f"{name} drafter", weights, lambda _: make_drafter(
            name, weights, target, dtype, tree_size, tree_depth, tree_width, sampled, exit_layer=exit_layer))

    autoregressive = Method("Autoregressive", None)
    if verify:  # one drafter, every rule: speed against quality
        use_tree = drafter in TREE_ONLY
        methods = [autoregressive] + [
            Method(rule, drafter_named(drafter), use_tree, make_verifier(
                rule, temperature, topk_beta, topk_tau, bild_rollback, lenience, typical_epsilon, typical_delta),
                   make_draft_length("confidence", gamma, use_tree, drafter, weights, bild_fallback, svip_threshold,
                                     disco_threshold, ddd_threshold) if rule == "bild" and not use_tree and drafter != "pld" else None)
            for rule in names(verify, VERIFIERS, "--verify")]
        printer = print_verifiers
    elif draft_length:  # chain policies on the draft model; fixed and dynamic depth on EAGLE-2 trees
        chosen = names(draft_length, DRAFT_LENGTHS, "--draft-length")

        def policy(name: str, g: int, use_tree: bool) -> Method:
            return Method(f"{name} ({'EAGLE-2' if use_tree else f'gamma {g}'})", drafter_named(
                "eagle" if use_tree else "draft"), use_tree, length=make_draft_length(
                name, g, use_tree, "eagle" if use_tree else "draft", weights, confidence, svip_threshold,
                disco_threshold, ddd_threshold))

        methods = [autoregressive]
        methods += [policy("fixed", g, False) for g in sorted({gamma, max_gamma}) if "fixed" in chosen]
        methods += [policy("heuristic", gamma, False)] if "heuristic" in chosen else []
        methods += [policy(name, max_gamma, False) for name in ("confidence", "svip", "disco") if name in chosen]
        methods += [policy(name, gamma, True) for name in ("fixed", "dynamic") if name in chosen]
        printer = print_lengths
    elif sweep_lookahead:  # Lookahead decoding's knobs (W, N, G): extra tokens cost time on a CPU
        methods = [autoregressive] + [
            Method(f"lookahead W {w}, N {n}, G {g}", make_drafter("lookahead", weights, target, dtype, tree_size,
                                                                  tree_depth, tree_width, lookahead=(w, n, g)), True)
            for w, n, g in LOOKAHEAD_SWEEP]
        printer = print_methods
    elif sweep_exit:  # LayerSkip's early exit at every exit layer: acceptance against draft cost
        methods = [autoregressive] + [Method(f"early exit E {e}", drafter_named("earlyexit", exit_layer=e))
                                      for e in range(1, target.config.num_hidden_layers)]
        printer = print_methods
    elif siblings:  # SpecInfer/SpecTr: sampled tree children against top-k children, at T = 0.7 and 1.0
        methods = []
        for t in (0.7, 1.0):
            methods.append(Method("Autoregressive", None, temperature=t))
            for name, label in (("draft", "SpS tree"), ("eagle", "EAGLE-2")):
                for sampled in (False, True):
                    methods.append(Method(f"{label}, {'sampled i.i.d.' if sampled else 'top-k'}",
                                          drafter_named(name, sampled), True, temperature=t))
        printer = print_siblings
    else:
        methods = [autoregressive,
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
                   Method("Draft & Verify (sublayers skipped, adaptive stop)", drafter_named("layerskip"),
                          length=Adaptive(max_gamma)),
                   Method("LayerSkip early exit (E 8, shared cache)", drafter_named("earlyexit")),
                   Method("DEL (exit layer and length chosen per step)", drafter_named("del")),
                   Method("ML-SpecQD (int8 self-draft)", drafter_named("quant")),
                   Method("CS Drafting (vertical: PLD under the draft model)", drafter_named("cascade")),
                   Method(f"CS Drafting (vertical + horizontal: PLD after {max(1, gamma // 2)} model tokens)",
                          make_drafter("cascade", weights, target, dtype, tree_size, tree_depth, tree_width,
                                       cascade_horizontal=max(1, gamma // 2))),
                   Method("Collective tree (SpecInfer: draft model + PLD"
                          + (" + REST)" if (DATA_DIR / "datastore.npy").is_file() else ")"),
                          drafter_named("collective"), True)]
        if (weights / "specdec" / "model.safetensors").is_file():
            methods.append(Method("SpecDec NAR drafter (K mask queries, one call)", drafter_named("specdec")))
        else:
            print(f"note: no SpecDec drafter in {weights / 'specdec'}, so no SpecDec row (python train.py specdec)")
        if (DATA_DIR / "datastore.npy").is_file() and (DATA_DIR / "sam.npz").is_file():
            methods += [Method("REST (suffix array of train split)", drafter_named("rest"), True),
                        Method("SAM Decoding (suffix automata)", drafter_named("sam"), True)]
        else:
            print(f"note: no retrieval datastore in {DATA_DIR}, so no REST and SAM rows "
                  "(python train.py data && python train.py datastore)")
        printer = print_methods
    todo = function_prompts(enc, prompts, heldout=True)
    measure(target, methods, todo, args, device)
    print(f"\n{len(todo)} held-out prompts, {max_new_tokens} new tokens max, gamma {gamma}, temperature "
          f"{'0.7 and 1.0' if siblings else temperature}, device {device}, {'bf16' if bf16 else 'fp32'}; trees: "
          f"{tree_size} nodes, depth {tree_depth}, width {tree_width}\n")
    printer(methods, len(todo), temperature)


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
    ap.add_argument("--max-gamma", type=int, default=8, help="--draft-length: the most drafts of the policies that "
                    "stop early (confidence, svip, disco), and a second fixed row")
    ap.add_argument("--tree-size", type=int, default=12, help="drafted nodes per tree")
    ap.add_argument("--tree-depth", type=int, default=6, help="deepest tree level")
    ap.add_argument("--tree-width", type=int, default=2, help="children per node and nodes expanded per level")
    ap.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("-k", "--top-k", type=int, default=0, help="top-k warping (0 = off)")
    ap.add_argument("--top-p", type=float, default=1.0, help="top-p warping (1 = off)")
    ap.add_argument("-s", "--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 models (fp32 by default)")
    ap.add_argument("-d", "--drafter", default="draft", help="--verify: the drafter whose drafts the rules verify")
    ap.add_argument("-v", "--verify", default=None, help="compare these verification rules (comma-separated: "
                    f"{', '.join(VERIFIERS)}), speed against quality; the lossy ones are marked")
    ap.add_argument("-l", "--draft-length", default=None, help="compare these draft-length policies (comma-"
                    f"separated: {', '.join(DRAFT_LENGTHS)})")
    ap.add_argument("--siblings", action="store_true", help="compare top-k and sampled tree siblings at T 0.7 and 1")
    ap.add_argument("--sweep-lookahead", action="store_true", help="Lookahead decoding with several (W, N, G)")
    ap.add_argument("--sweep-exit", action="store_true", help="LayerSkip's early exit at every exit layer E")
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
