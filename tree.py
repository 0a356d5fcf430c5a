"""Token trees for speculative decoding: build, mask, position, walk, render.

§6.3 of Xia et al. 2024 (token tree verification, SpecInfer, Miao et al. 2024): several draft continuations are
merged into one tree and the target verifies all of them in a single forward pass, using an attention mask in
which each node sees only the prefix, its ancestors and itself.

Layout (kept exactly; the verifier and the decoding loop code against it):
  node 0 is the root = the last token already accepted, fed to the target at position prefix_len;
  nodes 1..N-1 are drafted tokens; parents[0] == -1 and 0 <= parents[i] < i, so parents come before children.
  The target's KV cache holds prefix_len tokens (everything before the root) when the tree is verified.

Nothing here runs a model: drafters produce the tokens and log-probs, this file only arranges them.
"""

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Tree:
    tokens: list[int]  # token id per node; tokens[0] is the root (already accepted)
    parents: list[int]  # parent index per node; parents[0] == -1, parents[i] < i
    scores: list[float]  # draft log-prob of the node's root path (0.0 for the root); used to rank nodes
    # [N, V] or None. Row i: the draft distribution that node i's children were sampled from, i.i.d. (sampled
    # siblings, SpecInfer/SpecTr); None: deterministic siblings (top-k, tries), verified with a one-hot q.
    q: torch.Tensor | None = field(default=None, compare=False, repr=False)
    extra_tokens: "ExtraTokens | None" = field(default=None, compare=False, repr=False)  # extra tokens of the call

    def __post_init__(self) -> None:
        # Fail at construction, not three files later inside an attention mask.
        if not (len(self.tokens) == len(self.parents) == len(self.scores) >= 1):
            raise ValueError("tokens, parents, scores must be non-empty and of equal length")
        if self.parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(self.parents) if i > 0):
            raise ValueError(f"need parents[0] == -1 and 0 <= parents[i] < i, got {self.parents}")

    @classmethod
    def from_root(cls, root: int) -> "Tree":
        return cls(tokens=[root], parents=[-1], scores=[0.0])

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, score: float) -> int:
        """Append a node under `parent`; return its index (always len(self) - 1, so parents precede children)."""
        if not 0 <= parent < len(self):
            raise ValueError(f"parent {parent} is not a node of a tree with {len(self)} nodes")
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        return len(self) - 1


@dataclass
class ExtraTokens:
    """Extra tokens that a mask-predict drafter (survey §5.2: Jacobi, Lookahead, PaSS) adds to the target call after
    the tree's N nodes. They are evaluated only so that the drafter can read their outputs: never verified, and
    never kept in the target's cache (the loop keeps only the root and the accepted path)."""

    embeds: torch.Tensor  # [M, C] their input embeddings: the target's embeddings of tokens, or learned (PaSS)
    depths: list[int]  # [M] each sits at the root's position + depth
    sees: torch.Tensor  # bool [M, N + M]: the tree nodes and extra tokens each attends to; the prefix always
    read: Callable[[torch.Tensor, list[int]], None]  # gets the call's logits [N + M, V] and the accepted path
    tokens: list[int] | None = None  # their token ids, for showing a step (None: learned embeddings)

    def __len__(self) -> int:
        return len(self.depths)


def depths(tree: Tree) -> list[int]:
    d = [0] * len(tree)
    for i in range(1, len(tree)):
        d[i] = d[tree.parents[i]] + 1  # parents[i] < i, so its depth is already known
    return d


def children(parents: list[int]) -> list[list[int]]:
    """kids[i] = the children of node i, given every node's parent (tree.parents), in index order."""
    kids: list[list[int]] = [[] for _ in parents]
    for i in range(1, len(parents)):
        kids[parents[i]].append(i)  # visited in index order, so each list is sorted
    return kids


def path_to(tree: Tree, node: int) -> list[int]:
    """Node indices root..node (root included)."""
    path = [node]
    while tree.parents[path[-1]] != -1:
        path.append(tree.parents[path[-1]])
    return path[::-1]


def root_to_leaf_paths(tree: Tree) -> list[list[int]]:
    """One path (node indices, root included) per leaf, leaves in index order. A root alone is its own leaf."""
    kids = children(tree.parents)
    return [path_to(tree, i) for i in range(len(tree)) if not kids[i]]


# ----------------------------------------------------------------------------------------------------------------
# Building trees


def tree_from_sequences(root: int, sequences: list[list[int]], logprobs: list[list[float]] | None = None) -> Tree:
    """Merge draft sequences into a prefix-sharing trie (§6.3, SpecInfer (Miao et al. 2024) token tree merge).

    Identical prefixes share one node; nodes appear in order of first appearance. logprobs[s][t] (optional) is
    the draft log-prob of sequences[s][t] given its prefix. A shared node keeps the best (max) cumulative score
    over the sequences through it, so a child never outscores its parent. Without logprobs every score is 0.0.
    """
    tree = Tree.from_root(root)
    node_of: dict[tuple[int, int], int] = {}  # (parent node, token) -> child node
    for s, seq in enumerate(sequences):
        node, score = 0, 0.0
        for t, token in enumerate(seq):
            score += logprobs[s][t] if logprobs is not None else 0.0
            if (node, token) not in node_of:
                node_of[(node, token)] = tree.add(node, token, score)
            node = node_of[(node, token)]
            tree.scores[node] = max(tree.scores[node], score)
    return tree


def check_tree_choices(choices: Sequence[tuple[int, ...]], max_depth: int | None = None) -> None:
    """Medusa's rule: every prefix of a choice is a choice (else a node would have no parent). Raises ValueError."""
    seen = set(map(tuple, choices))
    if len(seen) != len(choices):
        raise ValueError("duplicate tree choice")
    for c in seen:
        if len(c) == 0 or any(r < 0 for r in c) or (max_depth is not None and len(c) > max_depth):
            raise ValueError(f"bad tree choice {c}: need 1..{max_depth} non-negative ranks")
        if len(c) > 1 and c[:-1] not in seen:
            raise ValueError(f"tree choice {c} lacks its prefix {c[:-1]}")


def static_tree(
    root: int,
    candidates: list[list[int]],
    choices: list[tuple[int, ...]],
    logprobs: list[list[float]] | None = None,
) -> Tree:
    """Medusa (Cai et al. 2024) sparse tree: a fixed set of rank paths filled in with this step's top-k tokens.

    candidates[d] is the ranked top-k token list for depth d+1 (Medusa head d); logprobs[d][r] (optional) is the
    log-prob of candidates[d][r]. Choice (0, 1) = rank-0 token at depth 1, then rank-1 token at depth 2; its score
    is the sum of the per-level log-probs (Medusa heads are independent given the hidden state).
    Nodes are ordered by depth, then by choice order.
    """
    check_tree_choices(choices, max_depth=len(candidates))
    tree = Tree.from_root(root)
    node_of: dict[tuple[int, ...], int] = {(): 0}
    for c in sorted(map(tuple, choices), key=len):  # stable: depth first, then choice order
        d, r = len(c) - 1, c[-1]
        if r >= len(candidates[d]):
            raise ValueError(f"tree choice {c} asks for rank {r} but depth {d + 1} has {len(candidates[d])}")
        lp = logprobs[d][r] if logprobs is not None else 0.0
        parent = node_of[c[:-1]]
        node_of[c] = tree.add(parent, candidates[d][r], tree.scores[parent] + lp)
    return tree


def default_tree_choices(depth: int, width: int, size: int) -> list[tuple[int, ...]]:
    """A sparse tree of `size` drafted nodes (the tree has size + 1 with the root), ranks < width, depth <= depth.

    Greedy best-first under a fixed rank prior: rank r is accepted with probability ~ 1/(r+1), independently per
    level, so a path's prior is prod 1/(r_d+1). We take the `size` paths with the largest prior (ties: shallower,
    then lexicographic). A child's prior never exceeds its parent's, so the set is ancestor-closed by construction.
    This stands in for Medusa's calibrated trees (mc_sim_7b_63), which need acceptance statistics we do not have.
    """
    if depth < 1 or width < 1 or size < 0:
        raise ValueError("need depth >= 1, width >= 1, size >= 0")
    if size > sum(width**d for d in range(1, depth + 1)):
        raise ValueError(f"a depth-{depth}, width-{width} tree has fewer than {size} nodes")
    heap = [(r + 1, 1, (r,)) for r in range(width)]  # (prod of (rank+1), depth, path): smallest = most likely
    picked: list[tuple[int, ...]] = []
    while len(picked) < size:
        cost, d, c = heapq.heappop(heap)
        picked.append(c)
        if d < depth:
            for r in range(width):
                heapq.heappush(heap, (cost * (r + 1), d + 1, c + (r,)))  # integers: exact ties
    return sorted(picked, key=len)  # stable: depth first, then by prior, i.e. the node order of static_tree


def expand_frontier(
    tree: Tree, frontier: list[int], child_tokens: list[list[int]], child_logprobs: list[list[float]], beam: int
) -> list[int]:
    """EAGLE-2 (Li et al. 2024) dynamic tree, expansion step. Mutates `tree`.

    child_tokens[i] / child_logprobs[i] are the drafter's top children of frontier[i] and their log-probs. All of
    them are added (score = parent score + log-prob, so the score is the path's draft log-prob); the `beam` new
    nodes with the highest scores (ties: lower index) are returned, best first, as the next frontier.
    """
    if beam < 0 or not len(frontier) == len(child_tokens) == len(child_logprobs):
        raise ValueError("need beam >= 0 and one child list (tokens and log-probs) per frontier node")
    new: list[int] = []
    for parent, toks, lps in zip(frontier, child_tokens, child_logprobs):
        if len(toks) != len(lps):
            raise ValueError("child_tokens and child_logprobs differ in length")
        new += [tree.add(parent, t, tree.scores[parent] + lp) for t, lp in zip(toks, lps)]
    return sorted(new, key=lambda i: (-tree.scores[i], i))[:beam]


def top_m_nodes(tree: Tree, m: int) -> list[int]:
    """Root plus the m drafted nodes ranked first by (-score, depth, index), closed under ancestors, sorted.

    Log-probs are <= 0, so a child's score never exceeds its parent's; ranking depth before index makes a parent
    win any tie, so the top m are already ancestor-closed. The closure only matters for scores that are not.
    """
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    d = depths(tree)
    ranked = sorted(range(1, len(tree)), key=lambda i: (-tree.scores[i], d[i], i))
    keep = {0}
    for i in ranked[:m]:
        keep.update(path_to(tree, i))
    return sorted(keep)


def subtree(tree: Tree, keep: list[int]) -> Tree:
    """The nodes `keep` (must contain the root and be ancestor-closed), reindexed in their original order. Extra
    extra tokens are not carried over: they were laid out for the whole tree."""
    keep = sorted(keep)
    new_index = {old: new for new, old in enumerate(keep)}
    if keep[:1] != [0] or any(tree.parents[i] not in new_index for i in keep[1:]):
        raise ValueError("keep must contain the root and every ancestor of its nodes")
    parents = [-1] + [new_index[tree.parents[i]] for i in keep[1:]]  # order preserved, so parents < children
    q = tree.q[keep] if tree.q is not None else None
    return Tree([tree.tokens[i] for i in keep], parents, [tree.scores[i] for i in keep], q)


def rerank_top_m(tree: Tree, m: int) -> Tree:
    """EAGLE-2 (Li et al. 2024) reranking: verify only the m drafted nodes with the highest path scores.

    Shallow nodes that were never expanded can outscore deep expanded ones, so the final tree is chosen over all
    drafted nodes, not layer by layer. Returns a new tree of m + 1 nodes (fewer if the tree is smaller).
    """
    return subtree(tree, top_m_nodes(tree, m))


# ----------------------------------------------------------------------------------------------------------------
# Verifying trees


def tree_attention_mask(tree: Tree, prefix_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool [N + M, prefix_len + N + M], True = may attend: every prefix slot, the node's ancestors and itself (§6.3).

    Column prefix_len + j is tree node j, i.e. the tree is written to the cache right after the prefix. Siblings
    and cousins are hidden, so each root path is scored as if it were the only continuation (SpecInfer). The M
    extra tokens of tree.extra_tokens (none by default) follow: they see the prefix and what `sees` says; no tree
    node ever sees them, so the candidates' logits are exactly those of the tree alone.
    """
    n, m = len(tree), len(tree.extra_tokens) if tree.extra_tokens is not None else 0
    anc = torch.zeros(n + m, n + m, dtype=torch.bool)  # [N + M, N + M] anc[i, j]: j is i or an ancestor of i
    for i in range(n):
        if i > 0:
            anc[i] = anc[tree.parents[i]]  # parent's row is complete because parents[i] < i
        anc[i, i] = True
    if m:
        anc[n:] = tree.extra_tokens.sees
    prefix = torch.ones(n + m, prefix_len, dtype=torch.bool)  # [N + M, prefix_len]
    return torch.cat([prefix, anc], dim=1).to(device)


def tree_positions(tree: Tree, prefix_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Long [N + M]: prefix_len + depth. Siblings share a position: each branch is its own continuation of the
    prefix. The extra tokens of tree.extra_tokens follow, at prefix_len + their depths."""
    extra = tree.extra_tokens.depths if tree.extra_tokens is not None else []
    return torch.tensor(depths(tree) + extra, dtype=torch.long, device=device) + prefix_len


def keep_indices(path: list[int], prefix_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Long [1 + len(path)]: cache slots of the root and the accepted path, for `KVCache.keep`.

    path: accepted node indices, root excluded (a leading 0, as from path_to, is dropped). The root's K/V is
    always kept. The kept entries must then be MOVED to the contiguous slots prefix_len, prefix_len + 1, ...:
    just truncating the cache is only right when the accepted path happens to be the first branch
    (docs/pitfalls.md: Move the accepted path's K/V, do not just truncate).
    """
    path = [int(i) for i in path]  # a list or a tensor of indices
    path = path[1:] if path[:1] == [0] else path
    if any(b <= a for a, b in zip([0] + path, path)):
        raise ValueError(f"a root path has strictly increasing node indices >= 1, got {path}")
    return torch.tensor([0] + path, dtype=torch.long, device=device) + prefix_len


# ----------------------------------------------------------------------------------------------------------------
# Showing trees


def render_tree(tree: Tree, decode: Callable[[int], str], accepted: Sequence[int] = ()) -> str:
    """Plain-text tree, one line per node: index, repr of the token text, score, and `[accepted]` if accepted.

    #0 'The' 0.00 [accepted]
    ├─ #1 ' cat' -0.51 [accepted]
    │  └─ #3 ' sat' -1.20 [accepted]
    └─ #2 ' dog' -0.92
    """
    accepted_set = {int(i) for i in accepted}  # ints, so a tensor of indices works too

    def label(i: int) -> str:
        mark = " [accepted]" if i in accepted_set else ""
        return f"#{i} {decode(tree.tokens[i])!r} {tree.scores[i]:.2f}{mark}"

    kids = children(tree.parents)
    lines = [label(0)]
    stack = [(c, "", c == kids[0][-1]) for c in reversed(kids[0])]  # (node, indent, is last sibling)
    while stack:  # depth-first, children in index order
        node, indent, last = stack.pop()
        lines.append(indent + ("└─ " if last else "├─ ") + label(node))
        below = indent + ("   " if last else "│  ")
        stack += [(c, below, c == kids[node][-1]) for c in reversed(kids[node])]
    return "\n".join(lines)


def render_call(tree: Tree, decode: Callable[[int], str]) -> str:
    """One target call's layout beyond the prefix: the N tree nodes, then the M extra lookahead tokens, each row
    with its depth and what it attends to (# = attends; the prefix, always visible, is not drawn)."""
    n, mask = len(tree), tree_attention_mask(tree, 0)  # [N + M, N + M]
    extra = tree.extra_tokens.tokens if tree.extra_tokens is not None and tree.extra_tokens.tokens is not None else []
    labels = [f"node {i} {decode(t)!r}" for i, t in enumerate(tree.tokens)]
    labels += [f"extra {j} {decode(t)!r}" for j, t in enumerate(extra)] or [
        f"extra {j} (embedding)" for j in range(len(mask) - n)
    ]
    depth = tree_positions(tree, 0).tolist()
    width = max(len(label) for label in labels)
    lines = [f"{'':{width}}  depth  " + "".join("N" if j < n else "x" for j in range(len(mask)))]
    for i, (label, row) in enumerate(zip(labels, mask.tolist())):
        lines.append(f"{label:{width}}  {depth[i]:5d}  " + "".join("#" if seen else "." for seen in row))
    return "\n".join(lines)
