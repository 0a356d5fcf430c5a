"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating Inference of Large Language Models
with Token Recycling"): training-free drafting from the target's own earlier outputs (survey §5.2 self-drafting,
§6.3 token trees). Paper: about 2x on Spec-Bench (Vicuna 7B-33B, A100), 30% above the other training-free methods;
Spec-Bench's leaderboard: 1.40x on a 3090, 2.22x on an A100.

Every verify call computes the target's distribution after each of its tokens, and decoding keeps one row of it
(the accepted path's) and throws the rest away. Token Recycling keeps the top-k next tokens of every row in an
adjacency matrix M [V, k]: M[t] = the k likeliest tokens after t, the last time t was in a call. Rejected
candidates count too: that is the "trash" recycled. The next draft is a static token tree filled by breadth-first
search from the last token: a node of rank r under a parent with token t gets M[t, r], level by level.

The matrix lives on the target's device and is kept across generations (the paper's matrix carries over from
earlier queries, and the SAM-Decoding authors' reimplementation never resets it either), so the drafter learns
what a model says after each token from everything it has decoded. A row never written is unknown: the subtree
under such a token is left out. The drafts are deterministic (tree.q is None): at temperature > 0 they are
matched against the target's own draws (verify.SampleMatch), lossless for every fixed tree
(docs/pitfalls.md: Retrieval and mask-predict drafters are deterministic).

The call's logits reach the drafter as Jacobi decoding's do (maskpredict.py): the tree carries a tree.ExtraTokens
with no extra tokens, whose read() the loop calls with the logits of every node.
"""

import math

import torch
from torch import Tensor

from drafters import KeepGrowing, Warp, always
from model import Transformer
from tree import ExtraTokens, Tree, check_tree_choices

# The static tree of the paper's release, as rank paths from the root (Medusa's "choices"): (0, 2) is the rank-2
# token after the rank-0 token after the root. 80 drafted nodes, depth 6, at most 8 children: k = 8.
PAPER_TREE: list[tuple[int, ...]] = [
    *[(r,) for r in range(8)],
    *[(0, r) for r in range(8)], (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1),
    (4, 0), (5, 0), (6, 0), (7, 0),
    *[(0, 0, r) for r in range(8)], (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1), (0, 3, 0), (0, 4, 0),
    (0, 5, 0), (0, 6, 0), (0, 7, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 0, 0),
    *[(0, 0, 0, r) for r in range(5)], (0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0),
    (0, 1, 0, 0), (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0), (0, 0, 1, 0, 0),
    (0, 1, 0, 0, 0), (1, 0, 0, 0, 0),
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0),
]  # fmt: skip


def rank_prior(choice: tuple[int, ...]) -> int:
    """prod (rank + 1): the smaller, the likelier (rank r accepted with probability ~ 1 / (r + 1), as
    tree.default_tree_choices assumes)."""
    prior = 1
    for r in choice:
        prior *= r + 1
    return prior


def cut_tree(choices: list[tuple[int, ...]], size: int, depth: int, k: int) -> list[tuple[int, ...]]:
    """The `size` likeliest choices of a static tree under the rank prior, none deeper than `depth` nor of a rank
    >= k (a vocabulary smaller than the tree's width). Ties go to the shallower, then to the earlier choice, so a
    parent always comes before its children: the cut is ancestor-closed. In depth order, as static trees are laid
    out (tree.static_tree)."""
    order = {c: i for i, c in enumerate(choices)}
    fits = [c for c in choices if len(c) <= depth and max(c) < k]
    kept = sorted(fits, key=lambda c: (rank_prior(c), len(c), order[c]))[:size]
    kept.sort(key=lambda c: (len(c), order[c]))
    check_tree_choices(kept)
    return kept


class RecyclingDrafter:
    """Token Recycling (Luo et al. 2024): an adjacency matrix of each token's top-k next tokens, from every position
    of every verify call, and a static tree (the paper's, cut to `size` nodes and `depth` levels) filled from it by
    breadth-first search from the last token."""

    learns_across_generations = True  # the matrix: a second run of a prompt drafts from the first's calls

    def __init__(self, target: Transformer, size: int = 80, depth: int = 6, choices: list | None = None):
        self.target, V = target, target.config.vocab_size
        self.choices = cut_tree(PAPER_TREE if choices is None else choices, size, depth, V)
        self.k = 1 + max((max(c) for c in self.choices), default=0)  # the widest rank the tree asks for
        node_of = {(): 0} | {c: i + 1 for i, c in enumerate(self.choices)}
        self.parents = [-1] + [node_of[c[:-1]] for c in self.choices]
        self.scores = [0.0] + [-math.log(rank_prior(c)) for c in self.choices]  # the rank prior, for --show-tree
        device = target.device
        self.levels = []  # per depth: (its nodes, their parents, their ranks), index tensors for one gather each
        for d in range(1, 1 + max((len(c) for c in self.choices), default=0)):
            level = [(node_of[c], node_of[c[:-1]], c[-1]) for c in self.choices if len(c) == d]
            self.levels.append(tuple(torch.tensor(x, device=device) for x in zip(*level)))
        self.matrix = torch.full((V, self.k), -1, dtype=torch.long, device=device)  # [V, k]; -1: never seen
        self.calls = 0  # verify calls read into the matrix, over the drafter's life

    def reset(self) -> None:
        pass  # the matrix is kept across generations (the paper's); a new drafter starts empty

    def fill(self, root: int) -> Tree:
        """The static tree filled by breadth-first search from `root`: one gather from M per level. Nodes under a
        token whose row is unknown are dropped."""
        tokens = torch.full((len(self.parents),), -1, dtype=torch.long, device=self.matrix.device)  # [N]
        tokens[0] = root
        for nodes, parents, ranks in self.levels:
            above = tokens[parents]
            tokens[nodes] = torch.where(above >= 0, self.matrix[above.clamp(min=0), ranks], -1)
        found = tokens.tolist()  # one copy to the host per draft
        tree, new = Tree.from_root(root), {0: 0}
        for i in range(1, len(found)):
            if found[i] >= 0:  # a known parent: its own token is >= 0, so it was kept before this node
                new[i] = tree.add(new[self.parents[i]], found[i], self.scores[i])
        return tree

    def update(self, tokens: list[int], logits: Tensor, path: list[int]) -> None:
        """M[token of node i] = top-k of the target's logits at node i, for every node of the call [N, V]. A token
        in several nodes keeps the row of the accepted path's node (the real context), else of the last one."""
        accepted = set([0] + path)
        order = [i for i in range(len(tokens)) if i not in accepted] + sorted(accepted)
        writer = {tokens[i]: i for i in order}  # token -> the node whose row it keeps: one write per row
        rows = torch.tensor(list(writer), device=self.matrix.device)
        top = logits[list(writer.values())].topk(self.k, dim=-1).indices  # [rows, k]
        self.matrix[rows] = top
        self.calls += 1

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree:
        tree = self.fill(context[-1])
        target = self.target  # no extra tokens: the drafter reads the candidates' own outputs (as Jacobi)
        tree.extra_tokens = ExtraTokens(
            torch.zeros(0, target.config.hidden_size, device=target.device, dtype=target.lm_head.weight.dtype),
            [],
            torch.zeros(0, len(tree), dtype=torch.bool),
            lambda logits, path: self.update(tree.tokens, logits, path),
            [],
        )
        return tree
