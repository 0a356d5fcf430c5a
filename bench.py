"""Spec-Bench-style measurement (Xia et al. 2024, §8 and Table 5): every method on the same prompts, same model,
same settings, interleaved in one run on one machine; speedup is the ratio to our own autoregressive loop.

Prompts are real code completions: a few hundred tokens of a held-out standard-library file (never trained on),
cut just inside a function body, as an editor would send them.

    python bench.py --prompts 20 --max-new-tokens 128
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from drafters import EagleDrafter, MedusaDrafter, ModelDrafter, PromptLookupDrafter
from specdec import Stats, UsageError, check_args, decode, load_checked, load_model
from tokenizer import load_tokenizer
from train import is_heldout, stdlib_files


def heldout_prompts(enc, n: int, context_tokens: int = 384) -> list[list[int]]:
    """Up to n prompts, one per held-out file in path order: the `context_tokens` tokens before the end of the
    first body line of the first function that has that much context before it."""
    prompts = []
    for rel, path in stdlib_files():
        if not is_heldout(rel) or len(prompts) == n:
            continue
        text = f"# file: {rel}\n" + path.read_bytes().decode("utf-8", errors="replace")
        lines, offset = text.splitlines(keepends=True), 0
        for line, body in zip(lines, lines[1:]):
            offset += len(line)
            if line.lstrip().startswith("def ") and line.rstrip().endswith(":") and body.strip():
                ids = enc.encode_ordinary(text[:offset + len(body)])
                if len(ids) >= context_tokens:
                    prompts.append(ids[-context_tokens:])
                    break
    return prompts


def run_method(target, method: tuple, prompt, args, device) -> tuple[int, float, Stats | None]:
    """(new tokens, seconds, stats) for one prompt; method = (drafter or None, draft trees?)."""
    drafter, use_tree = method
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out, stats = decode(target, drafter, use_tree, prompt, args.max_new_tokens, args.gamma, typical=False,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        generator=torch.Generator(device).manual_seed(args.seed))
    if device == "cuda":
        torch.cuda.synchronize()
    return len(out), time.perf_counter() - t0, stats


def main(weights: str, device: str | None, prompts: int, max_new_tokens: int, gamma: int, temperature: float,
         top_k: int, top_p: float, seed: int, bf16: bool, tree_size: int, tree_depth: int, tree_width: int) -> None:
    args = argparse.Namespace(max_new_tokens=max_new_tokens, gamma=gamma, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, tree_size=tree_size, tree_depth=tree_depth,
                              tree_width=tree_width)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_args("bench", max_new_tokens, temperature, top_k, top_p, gamma, "draft", device, tree_size, tree_depth,
               tree_width, seed)
    if prompts < 1:
        raise UsageError(f"--prompts must be at least 1, got {prompts}")
    dtype = torch.bfloat16 if bf16 else torch.float32
    weights = Path(weights)
    enc = load_checked("tokenizer", weights / "tokenizer.tiktoken", load_tokenizer)
    target = load_model(weights / "target", device, dtype)
    draft = load_model(weights / "draft", device, dtype)
    shape = dict(width=tree_width, size=tree_size)
    methods = {  # name: (drafter, draft trees?)
        "Autoregressive": (None, False),
        "SpS (draft model)": (ModelDrafter(draft), False),
        "PLD (prompt lookup)": (PromptLookupDrafter(), False),
        "SpS tree (draft model, EAGLE-2 tree)": (ModelDrafter(draft, depth=tree_depth, beam=tree_width, **shape), True),
        "PLD tree (several matches)": (PromptLookupDrafter(depth=tree_depth, matches=tree_width), True),
        "Medusa (static tree)": (load_checked("Medusa heads", weights / "medusa", lambda p: MedusaDrafter.from_pretrained(
            target, p, **shape)), True),
        "EAGLE-2 (dynamic tree)": (load_checked("EAGLE head", weights / "eagle", lambda p: EagleDrafter.from_pretrained(
            target, p, depth=tree_depth, beam=tree_width, **shape)), True),
    }
    todo = heldout_prompts(enc, prompts)
    for method in methods.values():  # warm-up, untimed: first calls pay for allocations and kernel set-up
        run_method(target, method, todo[0][:64], argparse.Namespace(**{**vars(args), "max_new_tokens": 8}), device)
    totals = {name: [0, 0.0, Stats()] for name in methods}
    for prompt in todo:  # interleaved, so drifts of a noisy machine hit every method alike
        for name, method in methods.items():
            n, seconds, stats = run_method(target, method, prompt, args, device)
            totals[name][0] += n
            totals[name][1] += seconds
            if stats:
                totals[name][2].merge(stats)
    print_table(totals, len(todo), args, device)


def print_table(totals: dict, n_prompts: int, args, device: str) -> None:
    base_tokens, base_seconds, _ = totals["Autoregressive"]
    base_rate = base_tokens / base_seconds
    print(f"\n{n_prompts} held-out prompts, {args.max_new_tokens} new tokens max, gamma {args.gamma}, temperature "
          f"{args.temperature}, device {device}; trees: {args.tree_size} nodes, depth {args.tree_depth}, width "
          f"{args.tree_width}\n")
    print("| Method | tau (tokens/call) | acceptance (theory) | tokens/s | speedup | draft ms/drafted token | verify ms/call |")
    print("|---|---|---|---|---|---|---|")
    for name, (tokens, seconds, s) in totals.items():
        rate = tokens / seconds
        if s.target_calls == 0:
            print(f"| {name} | 1.00 | - | {rate:.1f} | 1.00x | - | {1000 / base_rate:.1f} |")
            continue
        theory = f" ({s.predicted_acceptance_rate:.2f})" if s.expected_accepted else ""
        print(f"| {name} | {s.tau:.2f} | {s.acceptance_rate:.2f}{theory} | {rate:.1f} | "
              f"{rate / base_rate:.2f}x | {1000 * s.draft_seconds / max(1, s.drafted):.2f} | "
              f"{1000 * s.verify_seconds / s.target_calls:.1f} |")
    for name, (_, _, s) in totals.items():
        if s.target_calls:
            print(f"{name}: accepted drafts per call {dict(enumerate(s.accept_counts))}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--weights", default=str(Path(__file__).parent / "weights"), help="weights directory")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--prompts", type=int, default=20, help="number of held-out prompts")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=128, help="tokens to generate per prompt")
    ap.add_argument("-g", "--gamma", type=int, default=4, help="draft tokens per target call")
    ap.add_argument("--tree-size", type=int, default=12, help="drafted nodes per tree")
    ap.add_argument("--tree-depth", type=int, default=6, help="deepest tree level")
    ap.add_argument("--tree-width", type=int, default=2, help="children per node and nodes expanded per level")
    ap.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("-k", "--top-k", type=int, default=0, help="top-k warping (0 = off)")
    ap.add_argument("--top-p", type=float, default=1.0, help="top-p warping (1 = off)")
    ap.add_argument("-s", "--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 models (fp32 by default)")
    try:
        main(**vars(ap.parse_args()))
    except UsageError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
