"""The decoding loops (the command line is cli.py; `python specdec.py ...` runs it).

generate                    autoregressive decoding, the survey's Algorithm 1
speculative_generate        draft-then-verify, the survey's Algorithm 2 (§4.2; Leviathan et al. 2023, Chen et al. 2023)
tree_speculative_generate   token-tree drafting and verification (§6.3; SpecInfer, Medusa, EAGLE)

python specdec.py --prompt "def fibonacci(n):" --compare
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from draft_length import DraftLength, FixedLength
from drafters import ChainDrafter, Drafter, TreeDrafter
from model import Transformer
from tree import Tree, depths, keep_indices, subtree, tree_attention_mask, tree_positions
from verify import Verifier, exact, expected_acceptance, probs_from_logits, sample_token

OnTokens = Callable[[list[int], int], None]  # (new tokens, how many of them are accepted drafts)


@dataclass
class Stats:
    target_calls: int = 0  # verify calls of the target (the tree loop's prefill of the prompt is not one)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    produced: int = 0  # tokens emitted (accepted drafts + one target token per call)
    draft_seconds: float = 0.0  # wall time spent drafting
    verify_seconds: float = 0.0  # wall time spent in target forwards and verification, prefill_calls' not counted
    prefill_seconds: float = 0.0  # wall time of the target's prefill of the prompt
    prefill_calls: int = 0  # verify calls that carried the prompt (the chain loop's first): timed as its prefill
    accept_counts: list[int] = field(default_factory=list)  # accept_counts[n]: steps that accepted n drafts
    expected_accepted: float = 0.0  # sum over compared positions of sum_x min(p(x), q(x))
    compared: int = 0  # draft positions compared with the target
    extra: int = 0  # extra tokens in the target calls, not candidates (mask-predict drafters, §5.2)
    compare_counts: list[int] = field(default_factory=list)  # compare_counts[n]: steps that compared n drafts

    def record(
        self,
        *,
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
        self.compare_counts += [0] * (compared + 1 - len(self.compare_counts))
        self.compare_counts[compared] += 1

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
            "prefill_seconds",
            "prefill_calls",
            "expected_accepted",
            "extra",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.accept_counts, other.accept_counts), (self.compare_counts, other.compare_counts)):
            mine += [0] * (len(theirs) - len(mine))
            for n, count in enumerate(theirs):
                mine[n] += count

    @property
    def tau(self) -> float:
        """Tokens emitted per target call: accepted drafts + 1 per verification
        (docs/pitfalls.md: tau counts the bonus token; show the histogram)."""
        return self.produced / max(1, self.target_calls)

    @property
    def verify_calls(self) -> int:
        """The target calls whose time is in verify_seconds: those that did not carry the prompt."""
        return self.target_calls - self.prefill_calls

    @property
    def verify_seconds_per_call(self) -> float:
        """Wall time of a verify call, over verify_calls (nan if there were none)."""
        return self.verify_seconds / self.verify_calls if self.verify_calls else math.nan

    @property
    def mean_accepted_length(self) -> float:
        """Accepted drafts + 1 (the target's own token) per target call: vLLM's "mean acceptance length",
        Spec-Bench's "#mean accepted tokens". It equals tau but at the last call, which the end of text may cut."""
        return (self.accepted + self.target_calls) / max(1, self.target_calls)

    def acceptance_at(self, i: int) -> float:
        """Of the drafts at position i (0-based) that were compared with the target, the share accepted. Drafts
        after a rejection are never compared, so this is a conditional rate, not alpha**(i + 1)."""
        compared = sum(self.compare_counts[i + 1 :])
        return sum(self.accept_counts[i + 1 :]) / max(1, compared)

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
    device = model.device
    warp, cache, out = warp_for(temperature, top_k, top_p), model.new_cache(), []
    logits = model(torch.tensor([prompt_ids], device=device), cache, logits_to_keep=1)[0, -1]
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

    Invariant: the target's cache holds the context but its last token, which opens the next verify call; before
    the first call it holds nothing, and that call carries the prompt, so a generation makes as many target calls
    as `generate`, whose prompt call yields the first token
    (docs/pitfalls.md: No target call on top of the prefill).
    """
    check_generator(temperature, generator)
    device = target.device
    warp, cache, stats = warp_for(temperature, top_k, top_p), target.new_cache(), Stats()
    verifier, length = verifier or exact(temperature), draft_length or FixedLength(gamma)
    context = list(prompt_ids)
    drafter.reset()
    length.reset()
    # An optional hook: self-drafting by early exit (§5.2, LayerSkip) drafts into the target's own cache, so it
    # prefills it with the prompt but its last token (timed as the prefill), and finishes the verify call from the
    # layer it exited at; online speculative decoding (online.py) only reads the call's logits. Every other drafter
    # leaves the target's call alone, and the first verify call carries the prompt.
    t0 = time.perf_counter()
    forward = drafter.attach(target, cache, context) if hasattr(drafter, "attach") else target
    stats.prefill_seconds = time.perf_counter() - t0
    budget = min(max_new_tokens, cache.max_len - len(context))
    while budget > 0:
        t0 = time.perf_counter()
        fed = context[cache.length :]  # what the target has not seen: the last token; in the first call, the prompt
        drafts, q = drafter.propose(
            context, min(length.gamma, budget - 1), warp, generator, length.keep_drafting
        )  # 1. draft
        t1 = time.perf_counter()
        logits = forward(torch.tensor([fed + drafts], device=device), cache, logits_to_keep=len(drafts) + 1)[0]
        # 2. one call, logits [γ+1, V]: the rows of the context's last token and the drafts
        p, draft_tokens = warp(logits), torch.tensor(drafts, dtype=torch.long, device=device)
        n, token = verifier.chain(logits, p, q, draft_tokens, generator)  # 3. verify (§6)
        cache.truncate(len(context) + n)  # 4. roll back past the rejected drafts
        drafter.accept(n)
        length.update(len(drafts), n)
        new, finished = cut_at_eot(drafts[:n] + [token], eot)
        compared = min(n + 1, len(drafts))  # draft positions actually compared with the target
        # A call that carries the prompt is timed as its prefill (with its verification and rollback)
        seconds, carried = time.perf_counter() - t1, len(fed) > 1
        stats.prefill_seconds += seconds if carried else 0.0
        stats.prefill_calls += carried
        stats.record(
            drafted=len(drafts),
            accepted=n,
            compared=compared,
            produced=len(new),
            draft_seconds=t1 - t0,
            verify_seconds=0.0 if carried else seconds,
            expected_accepted=theory_acceptance(p[:compared], q, draft_tokens[:compared]),
        )
        context, budget = context + new, budget - len(new)
        if on_tokens and new:
            on_tokens(new, min(n, len(new)))
        if finished:
            break
    return context[len(prompt_ids) :], stats


def cut_at_eot(tokens: list[int], eot: int | None) -> tuple[list[int], bool]:
    """(the tokens before the first end of text, whether there was one): the end of text is never emitted."""
    return (tokens[: tokens.index(eot)], True) if eot in tokens else (tokens, False)


def theory_acceptance(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor) -> float:
    """Sum over draft positions of sum_x min(p(x), q(x)): the acceptance probability that theory predicts
    (Leviathan et al. 2023, Thm 3.5); a deterministic draft has a one-hot q, and the sum is then p(draft)."""
    if q is None:  # read p where the drafts are, rather than build one-hot rows of the vocabulary (0.15 ms a step)
        return float(p[torch.arange(len(drafts), device=p.device), drafts].sum())
    return sum(expected_acceptance(p_i, q_i) for p_i, q_i in zip(p, q[: len(drafts)]))


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
    The verifier and draft length work as in speculative_generate (draft_length.DynamicDepth cuts trees short;
    draft_length.AdaEagle plans each tree's depth before it is drafted).

    Invariant as in speculative_generate, but the prompt is prefilled before the first tree (the tree drafters read
    the target's hidden states of the context), all but its last token, which opens the first tree call: one target
    forward more than `generate` per generation. `features` holds the target's last hidden state of every cached
    token.
    """
    check_generator(temperature, generator)
    device = target.device
    warp, cache, stats = warp_for(temperature, top_k, top_p), target.new_cache(), Stats()
    verifier, length = verifier or exact(temperature), draft_length or FixedLength(0)
    context, features = list(prompt_ids), torch.zeros(0, target.config.hidden_size, device=device)
    drafter.reset()
    length.reset()
    t0 = time.perf_counter()
    if len(context) > 1:  # prefill; its logits are not read
        prompt = torch.tensor([context[:-1]], device=device)
        features = target(prompt, cache, return_hidden=True, logits_to_keep=1)[1][0]
    stats.prefill_seconds = time.perf_counter() - t0
    budget = min(max_new_tokens, cache.max_len - len(context))
    while budget > 0:
        t0 = time.perf_counter()
        length.plan(context, features)  # a policy may size the tree from the target's last hidden state (AdaEAGLE)
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
        if tree.extra_tokens is not None:  # a mask-predict drafter reads the call's outputs (§5.2)
            tree.extra_tokens.read(logits[0], path)
        features = torch.cat([features, hidden[0, [0] + path]])
        new, finished = cut_at_eot([tree.tokens[i] for i in path] + [token], eot)
        stats.record(
            drafted=n - 1,
            accepted=len(path),
            compared=min(len(path) + 1, max(depths(tree))),  # the depths
            produced=len(new),
            draft_seconds=t1 - t0,
            verify_seconds=time.perf_counter() - t1,  # tested
            extra=len(tree.extra_tokens) if tree.extra_tokens is not None else 0,
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
    in all, extra tokens included (the target's cache must hold the whole call). Index order keeps the
    result ancestor-closed. Extra tokens were laid out for the whole tree: if a node must go, or they do not fit,
    they are dropped (near the end of the budget or the context; the drafter is then not asked to read)."""
    keep = [i for i, d in enumerate(depths(tree)) if d <= max_depth][:max_nodes]
    extra = len(tree.extra_tokens) if tree.extra_tokens is not None else 0
    return tree if len(keep) == len(tree) and len(tree) + extra <= max_nodes else subtree(tree, keep)


def call_embeds(target: Transformer, tree: Tree) -> torch.Tensor:
    """[1, N + M, C]: the input of a tree call, the tree's tokens embedded, then the extra tokens' embeddings."""
    embeds = target.embed_tokens(torch.tensor([tree.tokens], device=target.device))
    return embeds if tree.extra_tokens is None else torch.cat([embeds, tree.extra_tokens.embeds[None]], dim=1)


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


if __name__ == "__main__":
    import cli  # the command line sits above the loops: it knows every method

    cli.run()
