"""Drafters: cheap guesses of the target's next tokens (survey §5, "Drafting").

Drafters share these methods, so the decoding loops never know which one they run (chains: the first three;
trees: reset and propose_tree; the heads of heads.py draft trees only):
  reset()                                  a new generation starts
  propose(context, gamma, warp, generator, keep)
                                        -> (tokens, q): a chain of up to gamma draft tokens and the distributions
                                           they were drawn from, q [len(tokens), V], or None for deterministic
                                           drafts (q is then one-hot; verify.py treats None so). A drafter with a
                                           distribution calls keep(draft_logits, i) after drafting token i and
                                           stops when it says no (draft_length.py: SVIP, DISCO, BiLD's fallback)
  accept(n)                                the first n drafts were accepted: roll back any state built on the rest
  propose_tree(context, features, warp, generator, keep)
                                        -> Tree: a token tree rooted at context[-1] (§6.3); `features`
                                           [len(context)-1, C] are the target's last hidden states of context[:-1]
                                           (Medusa, EAGLE); dynamic trees ask keep(frontier_logprobs, depth) before
                                           each new level (Dynamic Depth Decoding)
A chain drafter may also have attach(target, cache, prompt) -> forward: it is then handed the target's own cache
and the prompt when a generation starts, and runs the verify call itself (self-drafting by early exit, selfdraft.py,
prefills the cache with the prompt but its last token, drafts into the target's lower layers and finishes the call
from there); the loop calls target(tokens, cache, logits_to_keep=...) otherwise, and its first call carries the
prompt. The tree loop prefills the prompt but its last token before the first proposal (tree drafters read the
target's hidden states of it).
`warp` maps logits to the (temperature / top-k / top-p warped) probabilities that the target is verified with, so
q is warped exactly like p (docs/pitfalls.md: q is the distribution the draft was drawn from).
Tree children are a node's top-k draft tokens (deterministic siblings: verify.tree_speculative_sample with a
one-hot q is lossless for every tree), or, with sampled=True at temperature > 0, `width` tokens drawn i.i.d. from
the warped draft distribution, recorded in tree.q (SpecInfer's multi-step sampling; SpecTr): the i.i.d. rule is
lossless averaged over that drawing (docs/pitfalls.md: Fixed or i.i.d. siblings: say which).
"""

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from model import Transformer
from tree import Tree, depths, expand_frontier, path_to, rerank_top_m, subtree, tree_from_sequences
from verify import sample_token

Warp = Callable[[Tensor], Tensor]
KeepDrafting = Callable[[Tensor, int], bool]  # (raw draft logits [V] token i came from, i) -> draft token i + 1?
KeepGrowing = Callable[[list[float], int], bool]  # (frontier path log-probs, depth grown) -> grow another level?


def always(*_) -> bool:
    """The keep callback of a fixed draft length."""
    return True


class ChainDrafter(Protocol):
    """Drafts a chain for speculative_generate (Algorithm 2): ModelDrafter, PromptLookupDrafter."""

    def reset(self) -> None: ...

    def propose(
        self, context: list[int], gamma: int, warp: Warp, generator: torch.Generator | None, keep: KeepDrafting = always
    ) -> tuple[list[int], Tensor | None]: ...

    def accept(self, n_accepted: int) -> None: ...


class TreeDrafter(Protocol):
    """Drafts a token tree for tree_speculative_generate (§6.3): all four drafters."""

    def reset(self) -> None: ...

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree: ...


Drafter = ChainDrafter | TreeDrafter


def grow_tree(
    root: int,
    root_logits: Tensor,
    expand: Callable[[Tree, list[int]], Tensor],
    depth: int,
    width: int,
    beam: int,
    size: int,
    keep: KeepGrowing = always,
    sample: tuple[Warp, torch.Generator] | None = None,
) -> Tree:
    """EAGLE-2's dynamic draft tree (Li et al. 2024; survey §6.3): each depth expands the `beam` best nodes into
    their top `width` children, a node scored by the draft log-probability of its whole path; the `size` best
    nodes are kept at the end. expand(tree, nodes) returns the drafter's next-token logits for those nodes [F, V].
    keep(frontier log-probs, depth) may stop the growth early (Dynamic Depth Decoding, draft_length.py).

    With sample = (warp, generator), children are instead drawn i.i.d. from q = warp(logits) (SpecInfer; SpecTr),
    duplicates kept, and tree.q records each node's q. The final cut then keeps nodes in index order, never by
    score: dropping a node for its own sampled value would bias the i.i.d. siblings the verifier relies on."""
    if (
        sample is not None and sample[1] is None
    ):  # never the global RNG (docs/pitfalls.md: One uniform per position, from an explicit generator)
        raise ValueError("sampled siblings need an explicit torch.Generator")
    tree, frontier, logits = Tree.from_root(root), [0], root_logits[None]  # logits [F, V]
    q_rows = {}  # node -> the distribution its children were drawn from (sampled siblings only)
    for d in range(depth):
        if sample is None:
            top = torch.log_softmax(logits.float(), dim=-1).topk(width)
            tokens, logprobs = top.indices, top.values  # [F, width]
        else:
            warp, generator = sample
            q = warp(logits)  # [F, V]
            q_rows.update(zip(frontier, q))
            tokens = torch.multinomial(q, width, replacement=True, generator=generator)  # [F, width]
            logprobs = q.gather(-1, tokens).log()
        frontier = expand_frontier(tree, frontier, tokens.tolist(), logprobs.tolist(), beam)
        if d + 1 == depth or not keep([tree.scores[n] for n in frontier], d + 1):
            break
        logits = expand(tree, frontier)
    if sample is None:
        return rerank_top_m(tree, size)
    tree.q = torch.zeros(len(tree), root_logits.shape[-1], device=root_logits.device)
    for node, q in q_rows.items():
        tree.q[node] = q
    return subtree(tree, list(range(min(len(tree), size + 1))))


def tree_step_inputs(
    tree: Tree, nodes: list[int], slot: dict[int, int], committed: int, root_position: int, device
) -> tuple[Tensor, Tensor]:
    """Positions [F] and attention mask [F, first free slot + F] for feeding `nodes` of a growing tree to a
    drafter's own cache: each node sees the committed cache, the slots of its drafted ancestors and itself (the
    mask of §6.3, laid out by cache slot). Assigns the nodes their slots."""
    first = max(slot.values()) + 1  # the next free cache slot (the root sits at committed - 1)
    slot.update((n, first + i) for i, n in enumerate(nodes))
    depth = depths(tree)
    mask = torch.zeros(len(nodes), first + len(nodes), dtype=torch.bool)
    mask[:, :committed] = True
    for row, node in enumerate(nodes):
        mask[row, [slot[a] for a in path_to(tree, node)[1:]]] = True
    positions = torch.tensor([root_position + depth[n] for n in nodes], device=device)
    return positions, mask.to(device)


class ModelDrafter:
    """An independent small LM of the same family, with its own KV cache (SpS: Leviathan et al. 2023, Chen et al.
    2023; survey §5.1 "independent drafting"). Its trees grow as EAGLE-2's do, from the draft LM's log-probs.
    The model may be the target itself made cheaper (survey §5.2, selfdraft.py): with sublayers in `skip`
    (Draft & Verify) or with quantized weights (ML-SpecQD); its cache is its own either way."""

    def __init__(
        self,
        model: Transformer,
        depth: int = 5,
        width: int = 4,
        beam: int = 4,
        size: int = 24,
        sampled: bool = False,
        skip: frozenset[str] = frozenset(),
    ):
        self.model, self.skip = model, skip
        self.depth, self.width, self.beam, self.size, self.sampled = depth, width, beam, size, sampled
        self.cache, self.start = None, 0

    def reset(self) -> None:
        self.cache, self.start = self.model.new_cache(), 0

    def propose(
        self, context: list[int], gamma: int, warp: Warp, generator: torch.Generator | None, keep: KeepDrafting = always
    ):
        device = self.model.device
        if gamma == 0:  # nothing to draft (-l cost, the last token): feed nothing now; the next draft catches up on
            self.start = self.cache.length  # the whole gap in one call, and accept(0) keeps what the cache holds
            return [], None
        # Catch up on the context this cache has not seen: the whole prompt at first, then the target's correction
        # or bonus token, and after a full accept also our own last draft, which was never fed
        # (docs/pitfalls.md: After a full accept the draft has not seen its last draft).
        new = torch.tensor([context[self.cache.length :]], device=device)
        logits = self.model(new, self.cache, skip=self.skip, logits_to_keep=1)[0, -1]
        self.start = len(context)
        tokens, qs = [], []
        for i in range(gamma):
            q = warp(logits)  # [V]
            tokens.append(sample_token(q, generator))
            qs.append(q)
            if not keep(logits, i) or i == gamma - 1:  # the policy sees every drafted token, the last one too
                break
            logits = self.model(torch.tensor([[tokens[-1]]], device=device), self.cache, skip=self.skip)[0, -1]
        return tokens, torch.stack(qs) if qs else None

    def accept(self, n_accepted: int) -> None:
        # The cache holds context + drafts[:-1]; keep the context and the accepted drafts only.
        self.cache.truncate(min(self.cache.length, self.start + n_accepted))

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree:
        device = self.model.device
        self.cache.truncate(min(self.cache.length, self.start, len(context) - 1))  # drop the last tree; refeed the root
        root_logits = self.model(
            torch.tensor([context[self.cache.length :]], device=device), self.cache, skip=self.skip, logits_to_keep=1
        )[0, -1]
        self.start, slot = len(context), {0: len(context) - 1}
        depth = min(self.depth, (self.cache.max_len - self.start) // self.beam)  # room in our own cache

        def expand(tree: Tree, nodes: list[int]) -> Tensor:
            positions, mask = tree_step_inputs(tree, nodes, slot, self.start, self.start - 1, device)
            tokens = torch.tensor([[tree.tokens[n] for n in nodes]], device=device)
            return self.model(tokens, self.cache, positions=positions, attn_mask=mask, skip=self.skip)[0]

        return grow_tree(
            context[-1],
            root_logits,
            expand,
            depth,
            self.width,
            self.beam,
            self.size,
            keep,
            (warp, generator) if self.sampled else None,
        )


class PromptLookupDrafter:
    """Copy what followed the latest earlier occurrence of the context's last n-gram (LLMA, Yang et al. 2023;
    prompt lookup decoding, Saxena 2023; survey Appendix A and §8, PLD in Spec-Bench). No model: q is one-hot."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1, depth: int = 5, matches: int = 4):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError("need 1 <= ngram_min <= ngram_max")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.depth, self.matches = depth, matches

    def reset(self) -> None:
        pass

    def continuations(self, context: list[int], length: int, count: int) -> list[list[int]]:
        """What followed the `count` latest earlier matches of the longest n-gram that matches at all."""
        if length == 0 or len(context) < 2:
            return []
        ids = np.asarray(context)
        # Every longer n-gram match is also a match of the last token, so one scan finds every candidate: the
        # positions i where an earlier token equals the last (each followed by a token), newest first; each n then
        # keeps the candidates whose n - 1 tokens before also match. A scan of the whole context for each n took
        # 0.07 ms on a 400-token context (0.15 ms at 1500); this takes 0.02 ms (0.04).
        ends = np.flatnonzero(ids[:-1] == ids[-1])[::-1]
        for n in range(min(self.ngram_max, len(ids) - 1), self.ngram_min - 1, -1):  # longest first: most specific
            hits = ends[ends >= n - 1]
            for k in range(1, n):
                hits = hits[ids[hits - k] == ids[-1 - k]]
            if len(hits):
                return [ids[i + 1 : i + 1 + length].tolist() for i in hits[:count]]
        return []

    def propose(
        self, context: list[int], gamma: int, warp: Warp, generator: torch.Generator | None, keep: KeepDrafting = always
    ):
        found = self.continuations(context, gamma, 1)  # no distribution to consult: keep is not asked
        return (found[0] if found else []), None

    def accept(self, n_accepted: int) -> None:
        pass

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree:
        # Several matches, merged into a prefix-sharing trie (SpecInfer's token tree merge).
        return tree_from_sequences(context[-1], self.continuations(context, self.depth, self.matches))
