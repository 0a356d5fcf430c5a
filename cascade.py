"""Cascades and collectives of drafters (survey §5.1 independent drafting, tuning-free; §6.3 token trees).

    CascadeDrafter      Cascade Speculative Drafting (Chen et al. 2023b) and StagedSpec (Spector & Re 2023): prompt
                        lookup drafts for the draft model, which verifies it losslessly (vertical cascade); the
                        chain's tail comes from prompt lookup alone (horizontal cascade). A chain drafter.
    CollectiveDrafter   SpecInfer's collective drafting (Miao et al. 2024): the draft model's tree, prompt lookup
                        and REST merged into one token tree, verified in one target call. A tree drafter.

The cascade's q rows are the draft model's own warped distributions: the inner verification makes every drafted
token a sample of exactly that distribution (Leviathan et al. 2023, Thm 3.1, applied to the draft model as the
"target" and prompt lookup as its "draft"), so the target's verifier sees what it would see from plain SpS.
"""

import sys

import torch
from torch import Tensor

from drafters import KeepDrafting, KeepGrowing, ModelDrafter, PromptLookupDrafter, Warp, always
from model import Transformer
from retrieval import RestDrafter
from tree import Tree, path_to
from verify import Greedy, SpeculativeSampling, Verifier


class CascadeDrafter:
    """Cascade Speculative Drafting (Chen et al. 2023b, "Cascade Speculative Drafting for Even Faster LLM
    Inference"; StagedSpec, Spector & Re 2023, is the same vertical cascade with trees; survey §5.1)."""

    def __init__(self, model: Transformer, lookup: PromptLookupDrafter | None = None, horizontal: int = 0):
        if horizontal < 0:
            raise ValueError(f"horizontal must be >= 0 (0 = off), got {horizontal}")
        self.model, self.lookup, self.horizontal = model, lookup or PromptLookupDrafter(), horizontal
        self.cache, self.start = None, 0
        self.draft_calls = self.inner_drafted = self.inner_accepted = 0  # the vertical cascade at work
        # Per token of the last proposal: "model" (sampled by the draft model), "cascade" (proposed by prompt lookup
        # and accepted by the draft model) or "lookup" (the horizontal tail, never seen by the draft model).
        self.sources: list[str] = []

    def reset(self) -> None:
        self.cache, self.start = self.model.new_cache(), 0

    def propose(
        self, context: list[int], gamma: int, warp: Warp, generator: torch.Generator | None, keep: KeepDrafting = always
    ) -> tuple[list[int], Tensor | None]:
        device = self.model.device
        # The draft model verifies prompt lookup exactly as the target verifies the draft model (Algorithm 2 one
        # level down): greedy matching without a generator (temperature 0), else rejection sampling against the
        # draft's warped q. One-hot p at temperature 0 makes the two agree, so a generator changes nothing there.
        inner: Verifier = Greedy() if generator is None else SpeculativeSampling()
        n_model = min(gamma, self.horizontal) if self.horizontal else gamma  # horizontal: the model's positions
        tokens, qs, self.sources, stopped = [], [], [], False
        self.start = len(context)
        while len(tokens) < n_model and not stopped:
            seq = context + tokens
            # Vertical cascade: prompt lookup over the context and the drafts so far proposes ys, and the draft
            # model scores [its last unfed token] + ys in ONE call. Never more than the model's positions left.
            ys, _ = self.lookup.propose(seq, n_model - len(tokens) - 1, warp, generator)
            fed = self.cache.length
            call = torch.tensor([seq[fed:] + ys], device=device)
            logits = self.model(call, self.cache, logits_to_keep=len(ys) + 1)[0]
            q = warp(logits)  # [len(ys) + 1, V]: the draft's distribution before each y, and after the last
            n, token = inner.chain(logits, q, None, torch.tensor(ys, dtype=torch.long, device=device), generator)
            self.cache.truncate(len(seq) + n)  # keep the accepted ys; the new token is not fed yet (as in SpS)
            self.draft_calls, self.inner_drafted = self.draft_calls + 1, self.inner_drafted + len(ys)
            self.inner_accepted += n
            # Each of the n + 1 new tokens is distributed as q's row at its position given the tokens before it
            # (lossless inner rule): exactly the distribution the target's verifier must be told.
            for j, (y, q_i, row) in enumerate(zip(ys[:n] + [token], q, logits)):
                tokens.append(y)
                qs.append(q_i)
                self.sources.append("cascade" if j < n else "model")
                if not keep(row, len(tokens) - 1):  # a draft-length policy sees every token, in order, as in SpS
                    self.cache.truncate(min(self.cache.length, self.start + len(tokens) - 1))  # holds tokens[:-1]
                    stopped = True
                    break
        if self.horizontal and not stopped and len(tokens) < gamma:
            # Horizontal cascade: later positions, which are less likely to be accepted anyway, from prompt lookup
            # alone (no draft call). Deterministic: their q rows are one-hot
            # (docs/pitfalls.md: q is the distribution the draft was drawn from).
            tail, _ = self.lookup.propose(context + tokens, gamma - len(tokens), warp, generator)
            for y in tail:
                qs.append(torch.zeros_like(qs[0]).scatter_(0, torch.tensor([y], device=device), 1.0))
            tokens, self.sources = tokens + tail, self.sources + ["lookup"] * len(tail)
        # Why this can be slower than plain SpS here: the draft model is a small share of a step (its 298 draft
        # tokens on 3 held-out prompts cost 0.6 s against 1.5 s of verification), so saving draft calls saves
        # little (212 calls instead of 298 there: lookup proposed 290 tokens, the draft model accepted 86), while a
        # call of 1 + k tokens costs more than a call of 1 on a CPU and every rejected lookup token is paid for.
        # A layout that first asks the draft model for q and then verifies lookup's tokens in a second call pays an
        # extra draft call per round whenever lookup finds nothing; feeding the unfed token WITH the proposals
        # avoids that: a round without proposals is exactly one step of plain SpS. The paper's bottom drafter is
        # a bigram model that always proposes; prompt lookup only does when the context repeats itself. The
        # horizontal tail costs no draft call, but is accepted less often than the model's own tokens.
        return tokens, torch.stack(qs) if qs else None

    def accept(self, n_accepted: int) -> None:
        # As ModelDrafter: the cache holds context + model drafts[:-1]; keep the context and the accepted drafts
        # (lookup tail tokens were never fed). After a full accept the last draft is fed by the next propose.
        self.cache.truncate(min(self.cache.length, self.start + n_accepted))


def ranked_paths(tree: Tree, depth: int) -> list[list[int]]:
    """A drafter's proposal as token sequences: one per leaf, best leaf score first (ties: index order), each cut
    to `depth` tokens; the root (the context's last token) is left out."""
    kids = [0] * len(tree)
    for parent in tree.parents[1:]:
        kids[parent] += 1
    leaves = sorted((i for i in range(1, len(tree)) if not kids[i]), key=lambda i: (-tree.scores[i], i))
    return [[tree.tokens[j] for j in path_to(tree, i)[1:]][:depth] for i in leaves]


def merge_proposals(root: int, proposals: list[list[list[int]]], size: int, depth: int) -> Tree:
    """SpecInfer's token tree merge (Miao et al. 2024, §6.3) of several drafters' sequences, proposals[d] being
    drafter d's, best first. The sequences are taken round-robin over the drafters (each one's best, then each
    one's second, ...), so every drafter gets a share of the `size` drafted nodes; shared prefixes share nodes, a
    sequence that no longer fits is cut where the budget runs out, and no node is deeper than `depth`."""
    tree, node_of = Tree.from_root(root), {}  # (parent, token) -> node: siblings are distinct tokens
    turns = max((len(p) for p in proposals), default=0)
    for rank in range(turns):
        for sequences in proposals:
            if rank >= len(sequences):
                continue
            node = 0
            for token in sequences[rank][:depth]:
                if (node, token) not in node_of:
                    if len(tree) > size:
                        break  # full: the rest of this sequence has no room
                    node_of[(node, token)] = tree.add(node, token, 0.0)
                node = node_of[(node, token)]
    return tree


class CollectiveDrafter:
    """SpecInfer's collective drafting (Miao et al. 2024, "SpecInfer: Accelerating LLM Serving with Tree-based
    Speculative Inference and Verification"; survey §5.1, §6.3): several drafters' proposals, one merged tree.

    Every candidate is deterministic (the draft model's top-k tree, prompt lookup's matches, REST's frequency
    trie), so tree.q is None and verification matches it against the target's own draws (verify.SampleMatch), which is
    lossless for every fixed tree at any temperature. SpecInfer boost-tunes its small models to differ; ours are
    different kinds of drafter instead, which disagree for free."""

    def __init__(
        self,
        model: ModelDrafter | None,
        lookup: PromptLookupDrafter | None,
        rest: RestDrafter | None,
        size: int = 12,
        depth: int = 6,
    ):
        if model is not None and model.sampled:
            raise ValueError("collective trees merge deterministic candidates: the draft model must use top-k siblings")
        self.drafters = [d for d in (model, lookup, rest) if d is not None]  # the model first: its best path leads
        self.size, self.depth = size, depth

    def reset(self) -> None:
        for drafter in self.drafters:
            drafter.reset()

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree:
        proposals = [
            ranked_paths(d.propose_tree(context, features, warp, generator, keep), self.depth) for d in self.drafters
        ]
        return merge_proposals(context[-1], proposals, self.size, self.depth)


def note_without_rest(data_dir) -> None:
    """Said once, when the collective is built without a datastore."""
    print(
        f"note: no retrieval datastore in {data_dir}, so -d collective merges the draft model and prompt lookup "
        "only, without REST (python train.py data && python train.py datastore)",
        file=sys.stderr,
    )
