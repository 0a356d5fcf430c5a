"""Decoding loops and the command line.

generate                    autoregressive decoding, the survey's Algorithm 1
speculative_generate        draft-then-verify, the survey's Algorithm 2 (§4.2; Leviathan et al. 2023, Chen et al. 2023)
tree_speculative_generate   token-tree drafting and verification (§6.3; SpecInfer, Medusa, EAGLE)

python specdec.py --prompt "def fibonacci(n):" --compare
"""

import argparse
import codecs
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from approximate import BiLD, Lenient, TopK, Typical
from cascade import CascadeDrafter, CollectiveDrafter, note_without_rest
from draft_length import (
    SVIP,
    Adaptive,
    Confidence,
    Disco,
    DiscoClassifier,
    DraftLength,
    DynamicDepth,
    FixedLength,
    Heuristic,
)
from drafters import ChainDrafter, Drafter, ModelDrafter, PromptLookupDrafter, TreeDrafter
from heads import EagleDrafter, HydraDrafter, MedusaDrafter
from maskpredict import JacobiDrafter, LookaheadDrafter, PassDrafter
from model import Transformer
from nar import NarDrafter, NarModel
from online import OnlineDrafter
from retrieval import RestDrafter, SamDrafter, SuffixDrafter
from selfdraft import DynamicExitDrafter, EarlyExitDrafter, load_skip_set, quantized, sublayer_costs
from tokenizer import load_tokenizer
from tree import Tree, depths, keep_indices, render_call, render_tree, subtree, tree_attention_mask, tree_positions
from verify import Verifier, exact, expected_acceptance, probs_from_logits, sample_token

OnTokens = Callable[[list[int], int], None]  # (new tokens, how many of them are accepted drafts)


@dataclass
class Stats:
    target_calls: int = 0  # verification forwards of the target (the prompt's prefill not counted)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    produced: int = 0  # tokens emitted (accepted drafts + one target token per call)
    draft_seconds: float = 0.0  # wall time spent drafting
    verify_seconds: float = 0.0  # wall time spent in target forwards and verification
    accept_counts: list[int] = field(default_factory=list)  # accept_counts[n]: steps that accepted n drafts
    expected_accepted: float = 0.0  # sum over compared positions of sum_x min(p(x), q(x))
    compared: int = 0  # draft positions compared with the target
    extra: int = 0  # extra lookahead tokens in the target calls, not candidates (mask-predict drafters, §5.2)

    def record(
        self,
        drafted: int,
        accepted: int,
        compared: int,
        produced: int,
        draft_seconds: float,
        verify_seconds: float,
        expected_accepted: float = 0.0,
        extra: int = 0,
    ) -> None:
        """Add one draft-and-verify step (one target call)."""
        self.target_calls, self.drafted, self.accepted = (
            self.target_calls + 1,
            self.drafted + drafted,
            self.accepted + accepted,
        )
        self.compared, self.produced = self.compared + compared, self.produced + produced
        self.draft_seconds, self.verify_seconds = (
            self.draft_seconds + draft_seconds,
            self.verify_seconds + verify_seconds,
        )
        self.expected_accepted, self.extra = self.expected_accepted + expected_accepted, self.extra + extra
        self.accept_counts += [0] * (accepted + 1 - len(self.accept_counts))
        self.accept_counts[accepted] += 1

    def merge(self, other: "Stats") -> None:
        """Add another run's counts (bench.py sums over prompts)."""
        for name in (
            "target_calls",
            "drafted",
            "accepted",
            "compared",
            "produced",
            "draft_seconds",
            "verify_seconds",
            "expected_accepted",
            "extra",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.accept_counts += [0] * (len(other.accept_counts) - len(self.accept_counts))
        for n, count in enumerate(other.accept_counts):
            self.accept_counts[n] += count

    @property
    def tau(self) -> float:
        """Mean tokens per target call: (accepted drafts + 1) per verification (peer-pitfalls: the +1 counts)."""
        return self.produced / max(1, self.target_calls)

    @property
    def acceptance_rate(self) -> float:
        """Leviathan et al.'s alpha, measured: accepted / compared (drafts after a rejection are never compared)."""
        return self.accepted / max(1, self.compared)

    @property
    def predicted_acceptance_rate(self) -> float:
        """What theory predicts from the same steps: mean of sum_x min(p, q) (Leviathan et al. 2023, Thm 3.5)."""
        return self.expected_accepted / max(1, self.compared)


def check_generator(temperature: float, generator: torch.Generator | None) -> None:
    if temperature > 0 and generator is None:  # never the global RNG: every run must be reproducible by its seed
        raise ValueError("sampling (temperature > 0) needs an explicit torch.Generator")


def warp_for(temperature: float, top_k: int, top_p: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits -> probabilities, the same for target and draft (§6.2); temperature 0 gives one-hot argmax."""
    return partial(probs_from_logits, temperature=temperature, top_k=top_k, top_p=top_p)


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eot: int | None = None,
    on_tokens: OnTokens | None = None,
) -> list[int]:
    """Autoregressive decoding (Algorithm 1): one target forward per token; stops at `eot` (not returned)."""
    check_generator(temperature, generator)
    device = model.lm_head.weight.device
    warp, cache, out = warp_for(temperature, top_k, top_p), model.new_cache(), []
    logits = model(torch.tensor([prompt_ids], device=device), cache)[0, -1]
    for _ in range(min(max_new_tokens, cache.max_len - len(prompt_ids))):
        token = int(logits.argmax()) if temperature == 0 else sample_token(warp(logits), generator)
        if token == eot:
            break
        out.append(token)
        if on_tokens:
            on_tokens([token], 0)
        if len(out) < max_new_tokens and cache.length < cache.max_len:
            logits = model(torch.tensor([[token]], device=device), cache)[0, -1]
    return out


@torch.inference_mode()
def speculative_generate(
    target: Transformer,
    drafter: ChainDrafter,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    gamma: int = 4,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eot: int | None = None,
    on_tokens: OnTokens | None = None,
    verifier: Verifier | None = None,
    draft_length: DraftLength | None = None,
) -> tuple[list[int], Stats]:
    """Draft-then-verify decoding (Algorithm 2). With the default verifier (verify.exact) it is lossless: the output
    is distributed exactly as `generate`'s. `draft_length` (default: a fixed gamma) says how many tokens to draft.

    Invariant: the target's cache holds every context token but the last, which opens the next verify call.
    """
    check_generator(temperature, generator)
    device = target.lm_head.weight.device
    warp, cache, stats = warp_for(temperature, top_k, top_p), target.new_cache(), Stats()
    verifier, length = verifier or exact(temperature), draft_length or FixedLength(gamma)
    context = list(prompt_ids)
    drafter.reset()
    length.reset()
    # An optional hook: self-drafting by early exit (§5.2, LayerSkip) drafts into the target's own cache and finishes
    # the verify call from the layer it exited at; online speculative decoding (online.py) only reads the call's
    # logits. Every other drafter leaves the target's call alone.
    forward = drafter.attach(target, cache) if hasattr(drafter, "attach") else target
    if len(context) > 1:
        target(torch.tensor([context[:-1]], device=device), cache)  # prefill
    budget = min(max_new_tokens, cache.max_len - len(context))
    while budget > 0:
        t0 = time.perf_counter()
        drafts, q = drafter.propose(
            context, min(length.gamma, budget - 1), warp, generator, length.keep_drafting
        )  # 1. draft
        t1 = time.perf_counter()
        logits = forward(torch.tensor([context[-1:] + drafts], device=device), cache)[0]  # 2. one call: [γ+1, V]
        p, draft_tokens = warp(logits), torch.tensor(drafts, dtype=torch.long, device=device)
        n, token = verifier.chain(logits, p, q, draft_tokens, generator)  # 3. verify (§6)
        cache.truncate(len(context) + n)  # 4. roll back past the rejected drafts
        drafter.accept(n)
        length.update(len(drafts), n)
        new = drafts[:n] + [token]
        finished = eot in new
        new = new[: new.index(eot)] if finished else new
        compared = min(n + 1, len(drafts))  # draft positions actually compared with the target
        stats.record(
            len(drafts),
            n,
            compared,
            len(new),
            t1 - t0,
            time.perf_counter() - t1,
            theory_acceptance(p[:compared], q, draft_tokens[:compared]),
        )
        context, budget = context + new, budget - len(new)
        if on_tokens and new:
            on_tokens(new, min(n, len(new)))
        if finished:
            break
    return context[len(prompt_ids) :], stats


def theory_acceptance(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor) -> float:
    """Sum over draft positions of sum_x min(p(x), q(x)): the acceptance probability that theory predicts
    (Leviathan et al. 2023, Thm 3.5); a deterministic draft has a one-hot q."""
    q = q[: len(drafts)] if q is not None else torch.nn.functional.one_hot(drafts, p.shape[-1]).to(p.dtype)
    return sum(expected_acceptance(p_i, q_i) for p_i, q_i in zip(p, q))


@torch.inference_mode()
def tree_speculative_generate(
    target: Transformer,
    drafter: TreeDrafter,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eot: int | None = None,
    on_tokens: OnTokens | None = None,
    on_tree: Callable | None = None,
    verifier: Verifier | None = None,
    draft_length: DraftLength | None = None,
) -> tuple[list[int], Stats]:
    """Token-tree speculative decoding (§6.3; SpecInfer, Medusa, EAGLE): draft a tree rooted at the last token,
    verify every node in ONE target call (tree attention mask, positions = prefix + depth), keep the accepted path.
    The verifier and draft length work as in speculative_generate (draft_length.DynamicDepth cuts trees short).

    Invariant as in speculative_generate; `features` holds the target's last hidden state of every cached token.
    """
    check_generator(temperature, generator)
    device = target.lm_head.weight.device
    warp, cache, stats = warp_for(temperature, top_k, top_p), target.new_cache(), Stats()
    verifier, length = verifier or exact(temperature), draft_length or FixedLength(0)
    context, features = list(prompt_ids), torch.zeros(0, target.config.hidden_size, device=device)
    drafter.reset()
    length.reset()
    if len(context) > 1:
        features = target(torch.tensor([context[:-1]], device=device), cache, return_hidden=True)[1][0]
    budget = min(max_new_tokens, cache.max_len - len(context))
    while budget > 0:
        t0 = time.perf_counter()
        tree = drafter.propose_tree(context, features, warp, generator, length.keep_growing)  # 1. draft
        tree = trim_tree(tree, budget - 1, cache.max_len - cache.length)
        t1 = time.perf_counter()
        prefix, n = cache.length, len(tree)
        logits, hidden = target(
            None,
            cache,
            tree_positions(tree, prefix, device),
            tree_attention_mask(tree, prefix, device),
            return_hidden=True,
            inputs_embeds=call_embeds(target, tree),
        )  # 2. one call
        path, token = verifier.tree(logits[0, :n], warp(logits[0, :n]), tree, generator)  # 3. verify (§6.3)
        cache.keep(keep_indices(path, prefix, device))  # 4. keep the accepted path's K/V: no extra token's
        length.update(n - 1, len(path))
        if tree.lookahead is not None:  # a mask-predict drafter reads the call's outputs (§5.2)
            tree.lookahead.read(logits[0], path)
        features = torch.cat([features, hidden[0, [0] + path]])
        new = [tree.tokens[i] for i in path] + [token]
        finished = eot in new
        new = new[: new.index(eot)] if finished else new
        stats.record(
            n - 1,
            len(path),
            min(len(path) + 1, max(depths(tree))),
            len(new),
            t1 - t0,
            time.perf_counter() - t1,  # compared: the depths tested along the accepted path
            extra=len(tree.lookahead) if tree.lookahead is not None else 0,
        )
        context, budget = context + new, budget - len(new)
        if on_tree:
            on_tree(tree, path)
        if on_tokens and new:
            on_tokens(new, min(len(path), len(new)))
        if finished:
            break
    return context[len(prompt_ids) :], stats


def trim_tree(tree: Tree, max_depth: int, max_nodes: int) -> Tree:
    """Keep nodes no deeper than max_depth (a step never yields more tokens than the budget) and at most max_nodes
    in all, extra lookahead tokens included (the target's cache must hold the whole call). Index order keeps the
    result ancestor-closed. Extra tokens were laid out for the whole tree: if a node must go, or they do not fit,
    they are dropped (near the end of the budget or the context; the drafter is then not asked to read)."""
    keep = [i for i, d in enumerate(depths(tree)) if d <= max_depth][:max_nodes]
    extra = len(tree.lookahead) if tree.lookahead is not None else 0
    return tree if len(keep) == len(tree) and len(tree) + extra <= max_nodes else subtree(tree, keep)


def call_embeds(target: Transformer, tree: Tree) -> torch.Tensor:
    """[1, N + M, C]: the input of a tree call, the tree's tokens embedded, then any lookahead embeddings."""
    embeds = target.embed_tokens(torch.tensor([tree.tokens], device=target.lm_head.weight.device))
    return embeds if tree.lookahead is None else torch.cat([embeds, tree.lookahead.embeds[None]], dim=1)


# ---- command line ---------------------------------------------------------------------------------------------

DRAFTERS = (
    "none",
    "draft",
    "pld",
    "medusa",
    "hydra",
    "eagle",
    "blockwise",
    "jacobi",
    "lookahead",
    "pass",
    "rest",
    "suffix",
    "sam",
    "cascade",
    "collective",
    "layerskip",
    "earlyexit",
    "del",
    "quant",
    "specdec",
)
# drafters that only draft trees (blockwise, jacobi, pass and sam: one-branch trees)
TREE_ONLY = (
    "medusa",
    "hydra",
    "eagle",
    "blockwise",
    "jacobi",
    "lookahead",
    "pass",
    "rest",
    "suffix",
    "sam",
    "collective",
)
DATA_DIR = Path(__file__).resolve().parent / "data"  # train.py's default: train.bin and the retrieval datastore
DYNAMIC_TREES = ("draft", "hydra", "eagle", "layerskip", "quant")  # EAGLE-2 trees: sampled siblings, DDD
VERIFIERS = ("exact", "typical", "topk", "bild", "lenient")
DRAFT_LENGTHS = ("fixed", "heuristic", "confidence", "adaptive", "svip", "disco", "dynamic")
# no propose_tree: the early exits share the target's cache by slot; SpecDec's NAR drafter drafts one chain of k
CHAIN_ONLY = ("cascade", "earlyexit", "del", "specdec")
EXIT_DRAFTERS = ("earlyexit", "del")  # the drafters that take --exit-layer
EXIT_LAYER = 8  # earlyexit and del: the default E, 8 of the shipped target's 12 blocks (README: the early-exit sweep)
QUANT_BITS = 8  # quant: int8 by default, the one kernel that is faster than fp32 here
MIN_TEMPERATURE = 1e-3  # logits / T must stay finite in float32 (fp32 max 3.4e38; logits here are < 1e3)


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


def refuse(checks: list[tuple[bool, str]]) -> None:
    """Raise the message of the first failed check as a UsageError."""
    for failed, message in checks:
        if failed:
            raise UsageError(message)


def check_args(
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    gamma: int,
    drafter: str,
    device: str,
    tree_size: int,
    tree_depth: int,
    tree_width: int,
    seed: int,
) -> None:
    refuse(
        [
            (not prompt, "the prompt is empty"),
            (max_new_tokens < 1, f"--max-new-tokens must be at least 1, got {max_new_tokens}"),
            (
                not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf),
                f"--temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {temperature}",
            ),
            (not 0 <= seed < 2**63, f"--seed must be in [0, 2**63), got {seed}"),
            (top_k < 0, f"--top-k must be >= 0 (0 = off), got {top_k}"),
            (not 0 < top_p <= 1, f"--top-p must be in (0, 1], got {top_p}"),
            (gamma < 1, f"--gamma must be at least 1, got {gamma}"),
            (min(tree_size, tree_depth, tree_width) < 1, "--tree-size, --tree-depth and --tree-width must be >= 1"),
            (drafter not in DRAFTERS, f"unknown drafter {drafter!r}: choose one of {', '.join(DRAFTERS)}"),
            (device not in ("cpu", "cuda"), f"unknown device {device!r}: use cpu or cuda"),
            (device == "cuda" and not torch.cuda.is_available(), "device cuda is not available here: use cpu"),
        ]
    )


def load_checked(what: str, path: Path, load: Callable):
    """load(path), with any failure (missing or broken files, mismatched shapes) reported as one UsageError line."""
    try:
        return load(path)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(
            f"cannot load the {what} from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def load_model(path: Path, device: str, dtype: torch.dtype) -> Transformer:
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise UsageError(f"no model in {path}: expected config.json and model.safetensors (see train.py)")
    return load_checked("model", path, lambda p: Transformer.from_pretrained(p, device=device, dtype=dtype))


def make_drafter(
    name: str,
    weights: Path,
    target: Transformer,
    dtype: torch.dtype,
    tree_size: int,
    tree_depth: int,
    tree_width: int,
    sampled_siblings: bool = False,
    jacobi_block: int = 4,
    lookahead: tuple[int, int, int] = (3, 3, 3),
    data_dir: Path = DATA_DIR,
    suffix_alpha: float = 2.0,
    cascade_horizontal: int = 0,
    exit_layer: int = EXIT_LAYER,
    quant_bits: int = QUANT_BITS,
) -> Drafter | None:
    device, shape = target.lm_head.weight.device, dict(width=tree_width, size=tree_size)
    L = target.config.num_hidden_layers
    refuse(
        [
            (
                name in EXIT_DRAFTERS and not 1 <= exit_layer < L,
                f"--exit-layer must be in [1, {L - 1}] for this {L}-layer target, got {exit_layer}",
            ),
            (name == "quant" and quant_bits not in (4, 8), f"--quant-bits must be 8 or 4, got {quant_bits}"),
            (
                name == "quant" and quant_bits == 8 and (device.type != "cpu" or dtype != torch.float32),
                "--quant-bits 8 uses torch's CPU int8 kernels: run it on the CPU in float32, or use --quant-bits 4",
            ),
            (
                name == "layerskip" and not (weights / "layerskip.json").is_file(),
                f"no skip set in {weights / 'layerskip.json'}: run python train.py layerskip",
            ),
        ]
    )
    if name == "layerskip":  # Draft & Verify: the target minus a searched set of sublayers, with its own cache
        skip = load_skip_set(weights / "layerskip.json")
        unknown = sorted(skip - set(sublayer_costs(target.config)))
        refuse(
            [
                (
                    bool(unknown),
                    f"{weights / 'layerskip.json'} names sublayers this {L}-layer target does not have: "
                    f"{', '.join(unknown)}",
                )
            ]
        )
        return ModelDrafter(target, depth=tree_depth, beam=tree_width, sampled=sampled_siblings, skip=skip, **shape)
    if name == "earlyexit":
        return EarlyExitDrafter(target, exit_layer)
    if name == "del":
        return DynamicExitDrafter(target, exit_layer)
    if name == "quant":
        return ModelDrafter(
            quantized(target, quant_bits), depth=tree_depth, beam=tree_width, sampled=sampled_siblings, **shape
        )
    index = {"rest": "datastore.npy", "sam": "sam.npz"}.get(name)  # files under data_dir
    if index and not ((data_dir / "train.bin").is_file() and (data_dir / index).is_file()):
        raise UsageError(f"no retrieval datastore in {data_dir}: run python train.py data && python train.py datastore")
    head = {
        "medusa": "medusa",
        "blockwise": "medusa",
        "hydra": "hydra",
        "eagle": "eagle",  # under weights/
        "pass": "pass",
    }.get(name)
    if head and not (weights / head / "model.safetensors").is_file():
        raise UsageError(f"no {head} weights in {weights / head} (see train.py)")
    if name in ("draft", "cascade", "collective"):
        draft = load_model(weights / "draft", device, dtype)
        if draft.config.vocab_size != target.config.vocab_size:
            raise UsageError(
                f"the draft's vocabulary ({draft.config.vocab_size}) differs from the target's "
                f"({target.config.vocab_size}): they must share a tokenizer"
            )
        if name == "cascade":  # prompt lookup under the draft model (vertical), and after it (horizontal)
            return CascadeDrafter(draft, PromptLookupDrafter(), cascade_horizontal)
        if name == "collective":  # the draft model's top-k tree, prompt lookup and, with a datastore, REST
            rest = None
            if (data_dir / "train.bin").is_file() and (data_dir / "datastore.npy").is_file():
                rest = RestDrafter.load(data_dir, depth=tree_depth, size=tree_size)
            else:
                note_without_rest(data_dir)
            return CollectiveDrafter(
                ModelDrafter(draft, depth=tree_depth, beam=tree_width, **shape),
                PromptLookupDrafter(depth=tree_depth, matches=tree_width),
                rest,
                size=tree_size,
                depth=tree_depth,
            )
        return ModelDrafter(draft, depth=tree_depth, beam=tree_width, sampled=sampled_siblings, **shape)
    if name == "specdec":  # SpecDec's NAR drafter (Xia et al. 2023): k [MASK] queries, one call per step
        if not (weights / "specdec" / "model.safetensors").is_file():
            raise UsageError(f"no SpecDec drafter in {weights / 'specdec'}: run python train.py specdec")
        nar = load_checked(
            "SpecDec drafter", weights / "specdec", lambda path: NarModel.from_pretrained(path, device, dtype)
        )
        if nar.lm.config.vocab_size != target.config.vocab_size:
            raise UsageError(
                f"the SpecDec drafter's vocabulary ({nar.lm.config.vocab_size}) differs from the "
                f"target's ({target.config.vocab_size}): they must share a tokenizer"
            )
        return NarDrafter(nar)
    if name == "pld":
        return PromptLookupDrafter(depth=tree_depth, matches=tree_width)
    if name == "medusa":
        return MedusaDrafter.from_pretrained(target, weights / "medusa", **shape)
    if name == "blockwise":  # Blockwise Parallel Decoding (Stern et al. 2018) = Medusa's heads, top-1 each: a chain
        heads = MedusaDrafter.from_pretrained(target, weights / "medusa", width=1, size=1).heads
        return MedusaDrafter(target, heads, width=1, size=len(heads.linears))
    if name == "rest":
        return RestDrafter.load(data_dir, depth=tree_depth, size=tree_size)
    if name == "suffix":
        return SuffixDrafter(depth=tree_depth, size=tree_size, alpha=suffix_alpha)
    if name == "sam":
        return SamDrafter.load(data_dir, depth=tree_depth, size=tree_size)
    if name == "hydra":
        return HydraDrafter.from_pretrained(
            target, weights / "hydra", beam=tree_width, sampled=sampled_siblings, **shape
        )
    if name == "eagle":
        return EagleDrafter.from_pretrained(
            target, weights / "eagle", depth=tree_depth, beam=tree_width, sampled=sampled_siblings, **shape
        )
    if name == "jacobi":
        return JacobiDrafter(target, jacobi_block)
    if name == "lookahead":
        return LookaheadDrafter(target, *lookahead)
    if name == "pass":
        return PassDrafter.from_pretrained(target, weights / "pass")
    return None


def make_verifier(
    name: str,
    temperature: float,
    topk_beta: int,
    topk_tau: float,
    bild_rollback: float,
    lenience: float,
    typical_epsilon: float,
    typical_delta: float,
) -> Verifier:
    """--verify: the lossless rule (verify.exact) or one of approximate.py's LOSSY rules, with its knobs."""
    refuse(
        [
            (name not in VERIFIERS, f"unknown --verify {name!r}: choose one of {', '.join(VERIFIERS)}"),
            (
                name in ("topk", "bild") and temperature > 0,
                f"--verify {name} is a greedy-decoding rule (survey §6.1): use it with -t 0",
            ),
            (
                name == "lenient" and temperature == 0,
                "--verify lenient relaxes speculative sampling (survey §6.2): use it with -t > 0",
            ),
            (topk_beta < 1, f"--topk-beta must be at least 1, got {topk_beta}"),
            (not topk_tau >= 0, f"--topk-tau must be >= 0, got {topk_tau}"),
            (not bild_rollback >= 0, f"--bild-rollback must be >= 0, got {bild_rollback}"),
            (not 0 < lenience <= 1, f"--lenience must be in (0, 1], got {lenience}"),
            (not (typical_epsilon >= 0 and typical_delta >= 0), "--typical-epsilon and --typical-delta must be >= 0"),
        ]
    )
    if name == "typical":
        return Typical(typical_epsilon, typical_delta)
    if name == "topk":
        return TopK(topk_beta, topk_tau)
    if name == "bild":
        return BiLD(bild_rollback)
    if name == "lenient":
        return Lenient(lenience)
    return exact(temperature)


def make_draft_length(
    name: str,
    gamma: int,
    use_tree: bool,
    drafter: str,
    weights: Path,
    confidence: float,
    svip_threshold: float,
    disco_threshold: float | None,
    ddd_threshold: float,
) -> DraftLength:
    """--draft-length: how much to draft per step (draft_length.py)."""
    refuse(
        [
            (name not in DRAFT_LENGTHS, f"unknown --draft-length {name!r}: choose one of {', '.join(DRAFT_LENGTHS)}"),
            (
                name not in ("fixed", "dynamic") and use_tree,
                f"--draft-length {name} sets the length of draft chains: tree drafters take fixed or dynamic",
            ),
            (
                name == "dynamic" and not (use_tree and drafter in DYNAMIC_TREES),
                "--draft-length dynamic (Dynamic Depth Decoding) grows EAGLE-2 trees: use -d eagle or -d draft --tree",
            ),
            (
                name in ("confidence", "adaptive", "svip", "disco") and drafter == "pld",
                f"--draft-length {name} reads the draft's distribution, and prompt lookup has none",
            ),
            (not 0 <= confidence <= 1, f"--confidence must be in [0, 1], got {confidence}"),
            (not svip_threshold >= 0, f"--svip-threshold must be >= 0, got {svip_threshold}"),
            (
                disco_threshold is not None and not 0 <= disco_threshold <= 1,
                f"--disco-threshold must be in [0, 1], got {disco_threshold}",
            ),
            (not 0 <= ddd_threshold <= 1, f"--ddd-threshold must be in [0, 1], got {ddd_threshold}"),
        ]
    )
    if name == "heuristic":
        return Heuristic(gamma)
    if name == "adaptive":
        return Adaptive(gamma)
    if name == "confidence":
        return Confidence(gamma, confidence)
    if name == "svip":
        return SVIP(gamma, svip_threshold)
    if name == "disco":
        if not (weights / "disco" / "model.safetensors").is_file():
            raise UsageError(f"no DISCO classifier in {weights / 'disco'} (see train.py disco)")
        classifier, trained_threshold = load_checked("DISCO classifier", weights / "disco", DiscoClassifier.load)
        return Disco(gamma, classifier, trained_threshold if disco_threshold is None else disco_threshold)
    if name == "dynamic":
        return DynamicDepth(ddd_threshold)
    return FixedLength(gamma)


def decode(
    target: Transformer,
    drafter: Drafter | None,
    use_tree: bool,
    prompt_ids: list[int],
    max_new_tokens: int,
    gamma: int,
    on_tree: Callable | None = None,
    verifier: Verifier | None = None,
    draft_length: DraftLength | None = None,
    **opts,
) -> tuple[list[int], Stats | None]:
    """Pick the loop: plain decoding, a draft chain (Algorithm 2) or a draft tree (§6.3)."""
    if drafter is None:
        return generate(target, prompt_ids, max_new_tokens, **opts), None
    if use_tree:
        return tree_speculative_generate(
            target,
            drafter,
            prompt_ids,
            max_new_tokens,
            on_tree=on_tree,
            verifier=verifier,
            draft_length=draft_length,
            **opts,
        )
    return speculative_generate(
        target, drafter, prompt_ids, max_new_tokens, gamma=gamma, verifier=verifier, draft_length=draft_length, **opts
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


def main(
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    device: str | None,
    weights: str,
    drafter: str,
    gamma: int,
    tree: bool,
    tree_size: int,
    tree_depth: int,
    tree_width: int,
    sampled_siblings: bool,
    verify: str,
    topk_beta: int,
    topk_tau: float,
    bild_rollback: float,
    bild_fallback: float,
    lenience: float,
    typical_epsilon: float,
    typical_delta: float,
    draft_length: str | None,
    confidence: float,
    svip_threshold: float,
    disco_threshold: float | None,
    ddd_threshold: float,
    jacobi_block: int,
    lookahead_window: int,
    lookahead_ngram: int,
    lookahead_candidates: int,
    suffix_alpha: float,
    cascade_horizontal: int,
    exit_layer: int | None,
    quant_bits: int | None,
    show_tree: bool,
    compare: bool,
    no_color: bool,
    bf16: bool,
    online: bool = False,
    online_lr: float = 1e-5,
    online_every: int = 32,
    online_steps: int = 4,
    online_rows: str = "rejected",
) -> None:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_args(
        prompt,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        gamma,
        drafter,
        device,
        tree_size,
        tree_depth,
        tree_width,
        seed,
    )
    use_tree = tree or drafter in TREE_ONLY
    explicit_length = draft_length  # None: the drafter's own default (Draft & Verify's adaptive stop for layerskip)
    if draft_length is None:
        draft_length = "adaptive" if drafter == "layerskip" and not use_tree else "fixed"
    refuse(
        [
            (jacobi_block < 1, f"--jacobi-block must be at least 1, got {jacobi_block}"),
            (
                lookahead_window < 1 or lookahead_ngram < 2 or lookahead_candidates < 0,
                "--lookahead-window must be >= 1, --lookahead-ngram >= 2 and --lookahead-candidates >= 0",
            ),
            (not 0 < suffix_alpha < math.inf, f"--suffix-alpha must be a finite number > 0, got {suffix_alpha}"),
            (cascade_horizontal < 0, f"--cascade-horizontal must be >= 0 (0 = off), got {cascade_horizontal}"),
            (cascade_horizontal > 0 and drafter != "cascade", "--cascade-horizontal is an option of -d cascade"),
            (
                exit_layer is not None and drafter not in EXIT_DRAFTERS,
                "--exit-layer is an option of -d earlyexit and -d del",
            ),
            (quant_bits is not None and drafter != "quant", "--quant-bits is an option of -d quant"),
            (tree and drafter in CHAIN_ONLY, f"-d {drafter} drafts chains: drop --tree"),
            (not 0 <= bild_fallback <= 1, f"--bild-fallback must be in [0, 1], got {bild_fallback}"),
            (
                drafter == "none" and (verify != "exact" or draft_length != "fixed"),
                "--verify and --draft-length need a drafter: plain decoding (-d none) verifies nothing",
            ),
            (
                sampled_siblings and not (temperature > 0 and use_tree and drafter in DYNAMIC_TREES),
                "--sampled-siblings samples tree children at -t > 0: use -d eagle or -d draft --tree",
            ),
            (
                online and drafter != "draft",
                f"--online trains the draft model as it decodes: use it with -d draft, not -d {drafter}",
            ),
            (online and use_tree, "--online drafts chains: drop --tree"),
            (not 0 < online_lr < math.inf, f"--online-lr must be a finite number > 0, got {online_lr}"),
            (online_every < 1 or online_steps < 1, "--online-every and --online-steps must be at least 1"),
            (online_rows not in ("rejected", "all"), f"--online-rows must be rejected or all, got {online_rows!r}"),
        ]
    )
    verifier = make_verifier(
        verify, temperature, topk_beta, topk_tau, bild_rollback, lenience, typical_epsilon, typical_delta
    )
    weights, dtype = Path(weights), torch.bfloat16 if bf16 else torch.float32
    if verify == "bild" and not explicit_length and not use_tree and drafter != "pld":  # fallback + rollback
        draft_length, confidence = "confidence", bild_fallback
    length = make_draft_length(
        draft_length, gamma, use_tree, drafter, weights, confidence, svip_threshold, disco_threshold, ddd_threshold
    )
    enc = load_checked("tokenizer", weights / "tokenizer.tiktoken", load_tokenizer)
    target = load_model(weights / "target", device, dtype)
    context = target.config.max_position_embeddings
    refuse(
        [
            (
                tree_width > target.config.vocab_size,
                f"--tree-width {tree_width} is larger than the vocabulary ({target.config.vocab_size})",
            ),
            (
                jacobi_block >= context or lookahead_window * (lookahead_ngram - 1) >= context,
                f"--jacobi-block and the lookahead window (W x (N - 1) tokens) must fit the context of {context}",
            ),
        ]
    )
    draft = load_checked(
        f"{drafter} drafter",
        weights,
        lambda _: make_drafter(
            drafter,
            weights,
            target,
            dtype,
            tree_size,
            tree_depth,
            tree_width,
            sampled_siblings,
            jacobi_block,
            (lookahead_window, lookahead_ngram, lookahead_candidates),
            suffix_alpha=suffix_alpha,
            cascade_horizontal=cascade_horizontal,
            exit_layer=EXIT_LAYER if exit_layer is None else exit_layer,
            quant_bits=QUANT_BITS if quant_bits is None else quant_bits,
        ),
    )
    if online:  # OSD (online.py): a private copy of the draft model, distilled on the verify calls' logits
        draft = OnlineDrafter(draft.model, online_lr, online_every, online_steps, online_rows)
    prompt_ids = enc.encode_ordinary(prompt)
    if len(prompt_ids) >= target.config.max_position_embeddings:
        raise UsageError(
            f"the prompt has {len(prompt_ids)} tokens; the context holds "
            f"{target.config.max_position_embeddings}, and at least one must be left to generate"
        )
    opts = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, eot=enc.eot_token, verifier=verifier, draft_length=length
    )
    color, trees = sys.stdout.isatty() and not no_color, []
    if compare:  # untimed warm-up of both loops, so neither pays for first-call allocations and kernel set-up
        for d in {draft, None}:
            decode(target, d, use_tree, prompt_ids, 4, gamma, generator=torch.Generator(device), **opts)
    sys.stdout.write(prompt)
    t0 = time.perf_counter()
    out, stats = decode(
        target,
        draft,
        use_tree,
        prompt_ids,
        max_new_tokens,
        gamma,
        on_tokens=Printer(enc, color),
        on_tree=lambda t, path: trees.append((t, path)) if show_tree else None,
        generator=torch.Generator(device).manual_seed(seed),
        **opts,
    )
    seconds = time.perf_counter() - t0
    print(
        f"\n\n[{len(out)} new tokens in {seconds:.2f} s, {len(out) / seconds:.1f} tokens/s, drafter {drafter}"
        + (", token tree" if use_tree and draft else "")
        + (", sampled siblings" if sampled_siblings else "")
        + "]"
    )
    if stats:
        print(
            f"[verification: {verify}"
            + (" (LOSSY: the output is not the target's)" if verifier.lossy else " (lossless)")
            + f"; draft length: {draft_length}]"
        )
        theory = f" (theory predicts {stats.predicted_acceptance_rate:.2f})" if stats.expected_accepted else ""
        print(
            f"[target calls {stats.target_calls}, tau {stats.tau:.2f} tokens/call, acceptance rate "
            f"{stats.acceptance_rate:.2f}{theory}, drafted {stats.drafted / max(1, stats.target_calls):.2f} "
            f"tokens/call, drafting {stats.draft_seconds:.2f} s, verifying {stats.verify_seconds:.2f} s]"
        )
        print(
            f"[accepted drafts per call: {dict(enumerate(stats.accept_counts))}"
            + ("; green = accepted draft tokens]" if color else "]")
        )
    if online:
        print(
            f"[online: draft updates {draft.updates}, {draft.update_seconds:.2f} s (inside the time above); "
            f"KL(p||q) on the buffer before each: {', '.join(f'{x:.2f}' for x in draft.losses) or 'none'}]"
        )
    for step, (t, path) in enumerate(trees):
        print(
            f"\nstep {step}: {len(t) - 1} drafted nodes, accepted {len(path)}\n"
            + render_tree(t, lambda i: enc.decode([i]), [0] + path)
        )
        if t.lookahead is not None:  # a mask-predict step: its extra tokens and the call's mask
            print(render_call(t, lambda i: enc.decode([i])))
    if compare:
        t0 = time.perf_counter()
        baseline = generate(
            target,
            prompt_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eot=enc.eot_token,
            generator=torch.Generator(device).manual_seed(seed),
        )
        base_seconds = time.perf_counter() - t0
        if baseline == out:
            same = "identical to"
        elif verifier.lossy:
            same = "differs from (expected: the rule is lossy)"
        elif temperature > 0:
            same = "differs from (expected when sampling)"
        else:
            same = "differs from (in bf16, rounding can do this; in fp32 it is a bug)"
        print(
            f"[autoregressive: {len(baseline)} tokens in {base_seconds:.2f} s, {len(baseline) / base_seconds:.1f} "
            f"tokens/s; speedup {(len(out) / seconds) / max(len(baseline) / base_seconds, 1e-9):.2f}x; output {same} "
            f"the speculative one]"
        )


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        """argparse's own errors (a missing -p, -n abc) as one line and exit code 2, like ours."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = OneLineParser(description="Speculative decoding on the shipped models (see README.md).")
    ap.add_argument("-p", "--prompt", required=True, help="text to continue")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=128, help="most tokens to generate")
    ap.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    ap.add_argument("-k", "--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    ap.add_argument("-s", "--seed", type=int, default=0, help="random seed, for reproducible sampling")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--bf16", action="store_true", help="run the models in bfloat16 (fp32 by default)")
    ap.add_argument(
        "-w",
        "--weights",
        default=str(Path(__file__).parent / "weights"),
        help="directory with target/, draft/ and tokenizer.tiktoken",
    )
    ap.add_argument(
        "-d",
        "--drafter",
        default="draft",
        help="none (plain decoding), draft (small model), pld "
        "(prompt lookup), medusa (Medusa heads, token tree), hydra (Hydra's sequentially dependent heads, "
        "dynamic tree), eagle (EAGLE head, EAGLE-2 dynamic tree), "
        "blockwise (Blockwise Parallel Decoding: Medusa's heads, top-1 each, one chain), jacobi (Jacobi "
        "decoding), lookahead (Lookahead decoding), pass (PaSS: learned lookahead embeddings); retrieval, "
        "no model: rest (REST: suffix array of the training split, frequency trie), suffix "
        "(SuffixDecoding: suffix tries of this prompt and earlier outputs), sam (SAM Decoding: suffix "
        "automata, one chain); rest and sam need python train.py data && python train.py datastore; "
        "self-drafting (the target made cheaper): layerskip (Draft & Verify: sublayers skipped), "
        "earlyexit (LayerSkip: the first --exit-layer blocks, one shared cache), del (DEL: the exit layer "
        "and draft length chosen every step), quant (ML-SpecQD: the target's weights quantized); "
        "cascade (Cascade Speculative Drafting: prompt lookup drafts for the draft model, which verifies "
        "it losslessly), collective (SpecInfer: the draft model's tree, prompt lookup and REST if its "
        "datastore exists, merged into one tree); specdec (SpecDec: a non-autoregressive drafter, k [MASK] "
        "queries give k drafts in one call, at most k per step; python train.py specdec)",
    )
    ap.add_argument(
        "-g",
        "--gamma",
        type=int,
        default=4,
        help="draft tokens per target call (chains); the most "
        "for --draft-length confidence/svip/disco, the start for heuristic",
    )
    ap.add_argument("--tree", action="store_true", help="draft and verify token trees with draft or pld too")
    ap.add_argument(
        "--tree-size", type=int, default=12, help="drafted nodes per tree (EAGLE-2's m; every tree drafter)"
    )
    ap.add_argument(
        "--tree-depth",
        type=int,
        default=6,
        help="deepest tree level (draft and eagle trees, pld, rest, suffix; sam's chain length)",
    )
    ap.add_argument("--tree-width", type=int, default=2, help="children tried per node, and nodes expanded per level")
    ap.add_argument(
        "--sampled-siblings",
        action="store_true",
        help="at -t > 0, draft and eagle trees sample each "
        "node's children i.i.d. from the draft (SpecInfer, SpecTr) instead of taking its top-k; lossless",
    )
    ap.add_argument(
        "-v",
        "--verify",
        default="exact",
        help="verification rule: exact (lossless: greedy at -t 0, "
        "rejection sampling above), or the LOSSY approximate rules typical (Medusa), topk (SpecDec, "
        "-t 0), bild (BiLD's fallback and rollback, -t 0), lenient (Leviathan et al., -t > 0)",
    )
    ap.add_argument("--topk-beta", type=int, default=5, help="topk (LOSSY): accept drafts among the target's top beta")
    ap.add_argument(
        "--topk-tau",
        type=float,
        default=3.0,
        help="topk (LOSSY): ... and within tau nats of the top token's log-probability (inf: Blockwise's top-k rule)",
    )
    ap.add_argument(
        "--bild-rollback",
        type=float,
        default=5.0,
        help="bild (LOSSY): reject a draft whose "
        "cross-entropy -log p(draft) under the target exceeds this (0 = greedy)",
    )
    ap.add_argument(
        "--bild-fallback",
        type=float,
        default=0.6,
        help="bild: stop drafting after a token whose draft probability is below this",
    )
    ap.add_argument(
        "--lenience", type=float, default=0.5, help="lenient (LOSSY): accept with min(1, p / (l q)); 1 = exact"
    )
    ap.add_argument("--typical-epsilon", type=float, default=0.09, help="typical (LOSSY): Medusa's posterior_threshold")
    ap.add_argument("--typical-delta", type=float, default=0.3, help="typical (LOSSY): Medusa's posterior_alpha")
    ap.add_argument(
        "-l",
        "--draft-length",
        default=None,
        help="draft-length policy: fixed (gamma; the default), "
        "heuristic (transformers: +2 after a full accept, -1 otherwise), confidence, adaptive (Draft & "
        "Verify's threshold that follows the acceptance rate; the default of layerskip), svip, disco "
        "(chains); dynamic (Dynamic Depth Decoding, EAGLE-2 trees); all lossless",
    )
    ap.add_argument(
        "--confidence",
        type=float,
        default=0.4,
        help="confidence: stop after a draft token whose top probability is below this",
    )
    ap.add_argument(
        "--svip-threshold", type=float, default=0.3, help="svip: stop when sqrt(0.15 H(draft)) exceeds this"
    )
    ap.add_argument(
        "--disco-threshold",
        type=float,
        default=None,
        help="disco: stop when the classifier's acceptance probability is below this (default: the trained one)",
    )
    ap.add_argument(
        "--ddd-threshold",
        type=float,
        default=0.1,
        help="dynamic: stop growing the tree when the frontier's total path probability is below this",
    )
    ap.add_argument(
        "--exit-layer",
        type=int,
        default=None,
        help="earlyexit: draft with this many blocks of the "
        f"target (LayerSkip's E); del: the first step's E (default {EXIT_LAYER})",
    )
    ap.add_argument(
        "--quant-bits",
        type=int,
        default=None,
        help="quant: 8 (int8 matmuls, CPU) or 4 (int4 weights, "
        f"dequantized: shows acceptance, not speed); default {QUANT_BITS}",
    )
    ap.add_argument("--jacobi-block", type=int, default=4, help="jacobi: guesses refined per call")
    ap.add_argument("--lookahead-window", type=int, default=3, help="lookahead: window W (places per level)")
    ap.add_argument("--lookahead-ngram", type=int, default=3, help="lookahead: n-gram size N (N - 1 levels)")
    ap.add_argument("--lookahead-candidates", type=int, default=3, help="lookahead: G, pool n-grams verified per call")
    ap.add_argument(
        "--suffix-alpha",
        type=float,
        default=2.0,
        help="suffix: at most alpha x match length "
        "drafted nodes (SuffixDecoding's MAX_SPEC), and never more than --tree-size",
    )
    ap.add_argument(
        "--cascade-horizontal",
        type=int,
        default=0,
        help="cascade: the draft model drafts the first h "
        "positions of each chain (itself sped up by prompt lookup), prompt lookup alone the rest "
        "(horizontal cascade; 0 = off: the draft model drafts all gamma)",
    )
    ap.add_argument(
        "--show-tree",
        action="store_true",
        help="print every step's draft tree, accepted path marked; "
        "for jacobi, lookahead and pass also the call's extra tokens and its attention mask",
    )
    ap.add_argument(
        "--online",
        action="store_true",
        help="-d draft: Online Speculative Decoding (Liu et al. 2023): "
        "distil a private copy of the draft model on the target's verify logits while decoding; lossless",
    )
    ap.add_argument("--online-lr", type=float, default=1e-5, help="--online: Adam learning rate of the draft updates")
    ap.add_argument(
        "--online-every", type=int, default=32, help="--online: update when the buffer holds this many positions"
    )
    ap.add_argument("--online-steps", type=int, default=4, help="--online: Adam steps per update")
    ap.add_argument(
        "--online-rows",
        default="rejected",
        help="--online: buffer the positions where the draft was "
        "rejected (rejected, as the paper does) or every verified position on the accepted path (all)",
    )
    ap.add_argument("-c", "--compare", action="store_true", help="also run plain decoding and print the speedup")
    ap.add_argument("--no-color", action="store_true", help="do not highlight accepted draft tokens")
    return ap.parse_args(argv)


if __name__ == "__main__":
    try:
        main(**vars(parse_args()))
    except UsageError as e:
        print(f"specdec.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, with the shell's usual status for SIGINT
        print(file=sys.stderr)
        sys.exit(130)
