"""SpecTr's k-sequential draft selection (Sun et al. 2023, "SpecTr: Fast Speculative Decoding via Optimal
Transport", NeurIPS 2023, its K-SEQ; survey §6.3), a lossless rule for token trees whose siblings were drawn i.i.d.
from the draft (`--sampled-siblings`, drafters.grow_tree). Paper: 2.13x wall-clock speedup over autoregressive
decoding and 1.37x over speculative decoding (PaLM-2-Bison with a PaLM-2-Gecko draft, LM1B).

At a node, p is the target's row and the node's k children x_1..x_k are i.i.d. draws from q (tree.q). They are
tried in turn, each against the SAME p (SpecInfer's recursive rule, verify.tree_speculative_sample, tests each
against the residual the earlier ones left instead):

    accept x_i with probability min(1, p(x_i) / (rho q(x_i)));  if none is accepted, sample p_res.

One draft is accepted with probability beta(rho) = sum_x min(q(x), p(x) / rho), so token x leaves through an
acceptance with probability min(q(x), p(x) / rho) * (1 + (1 - beta) + ... + (1 - beta)^(k - 1)), and the residual is
what p has left:

    p_res(x) = [p(x) - min(q(x), p(x) / rho) (1 - (1 - beta)^k) / beta] / (1 - beta)^k,

a distribution exactly when rho beta(rho) >= 1 - (1 - beta(rho))^k. That holds at rho = k and fails below 1 (for
k >= 2 and p != q); its left side grows with rho and its right side shrinks, so the valid rho form an interval
[rho*, inf), and the paper takes rho*, the root in [1, k], where the acceptance 1 - (1 - beta)^k is largest. Any
rho >= rho* with its own p_res is lossless too (rho = k only accepts less); a rho < rho*, or a residual that does not
match the rho of the acceptances, is not (tests/test_spectr.py runs each of them through the law test).

k = 1 gives rho* = 1 and p_res = norm(max(0, p - q)): speculative sampling, so chains are verified as
verify.speculative_sample does. At temperature 0 p and q are one-hot: rho* = 1 and the rule is greedy
verification; the command line refuses it there (--sampled-siblings needs -t > 0; -v exact is that rule).
p = target, q = draft (Leviathan et al.).
"""

import torch
from torch import Tensor

from tree import Tree, children
from verify import acceptance_probability, residual_distribution, sample_token, speculative_sample, tree_tensors

BISECTIONS = 60  # halvings of an interval inside [1, k]: far below float64's resolution of rho


def kseq_rho(p: Tensor, q: Tensor, k: int) -> float:
    """rho*: the smallest rho in [1, k] with rho beta(rho) >= 1 - (1 - beta(rho))^k (Sun et al. 2023, K-SEQ), for
    p, q [V] and k i.i.d. drafts.

    beta(rho) = sum_{r(x) > rho} q(x) + sum_{r(x) <= rho} p(x) / rho with r = p / q, so between two consecutive
    ratios r(x) it is a + b / rho for fixed a, b. The condition is checked at every ratio in [1, k] at once, then
    the root is bisected inside the one interval where it turns true."""
    if k == 1:
        return 1.0
    p, q = p.double(), q.double()
    ratio = torch.where(q > 0, p / q.clamp_min(torch.finfo(q.dtype).tiny), torch.inf)  # q(x) = 0: never p / rho
    ratio, order = ratio.sort()
    zero = ratio.new_zeros(1)
    mass_p, mass_q = torch.cat([zero, p[order].cumsum(0)]), torch.cat([zero, q[order].cumsum(0)])
    points = torch.cat([ratio.new_ones(1), ratio[(ratio > 1) & (ratio < k)], ratio.new_full((1,), k)])  # sorted
    below = torch.searchsorted(ratio, points, right=True)  # how many tokens have r(x) <= rho
    a, b = mass_q[-1] - mass_q[below], mass_p[below]  # beta(rho) = a + b / rho just above each point
    beta = a + b / points
    valid = points * beta >= 1 - (1 - beta) ** k
    valid[-1] = True  # true at rho = k in exact arithmetic (Bernoulli's inequality)
    first = int(valid.int().argmax())  # the first point where the condition holds
    if first == 0:
        return 1.0
    lo, hi = points[first - 1].item(), points[first].item()
    a, b = a[first - 1].item(), b[first - 1].item()  # constant on (lo, hi]
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        if mid * a + b >= 1 - (1 - a - b / mid) ** k:
            hi = mid
        else:
            lo = mid
    return hi  # the valid side of the root


def kseq_residual(p: Tensor, q: Tensor, rho: float, k: int) -> Tensor:
    """p_res [V]: what p has left after k sequential tries with min(1, p / (rho q)), renormalised (Sun et al. 2023,
    K-SEQ). Valid for rho >= kseq_rho(p, q, k); below it the bracket is negative somewhere and the clamp at 0 that
    keeps it a distribution makes the rule biased. The sum is 0 only where no rejection can happen: fall back to p."""
    accepted = torch.minimum(q, p / rho)  # [V]: the mass with which one draft is accepted, per token
    beta = float(accepted.sum())
    tries = sum((1 - beta) ** i for i in range(k))  # expected number of drafts tried = (1 - (1 - beta)^k) / beta
    residual = (p - tries * accepted).clamp_min(0.0)
    total = residual.sum()
    return residual / total if total > 0 else p


def kseq_select(
    p: Tensor, q: Tensor, drafts: list[int], generator: torch.Generator, rho: float | None = None
) -> tuple[int | None, int]:
    """K-SEQ at one node: (index of the accepted draft or None, the token emitted). drafts are k i.i.d. draws from
    q, p the target's row; rho defaults to rho* (another rho: the tests' variants). One uniform per try."""
    k = len(drafts)
    rho = kseq_rho(p, q, k) if rho is None else rho
    for i, x in enumerate(drafts):
        u = torch.rand(1, generator=generator, device=generator.device).item()
        if u < acceptance_probability(p[x], q[x], lenience=rho).item():  # min(1, p / (rho q)): rho >= 1, stricter
            return i, x
    return None, sample_token(kseq_residual(p, q, rho, k), generator)


def tree_kseq_sample(
    target_probs: Tensor, draft_probs: Tensor, tokens: Tensor, parents: Tensor, generator: torch.Generator
) -> tuple[list[int], int]:
    """Walk a tree with sampled siblings from the root: K-SEQ among each node's children, into the accepted one;
    when none is accepted (or there are none) the walk ends on p_res (on p at a leaf). Rows as in
    verify.tree_speculative_sample: target_probs [N, V], draft_probs[i] the q that node i's children were drawn
    from. Lossless averaged over the drawing of the tree. Returns (accepted path, root excluded; next token)."""
    token_list, kids = tokens.tolist(), children(parents.tolist())
    node, path = 0, []
    while kids[node]:
        chosen, token = kseq_select(
            target_probs[node], draft_probs[node], [token_list[c] for c in kids[node]], generator
        )
        if chosen is None:
            return path, token
        node = kids[node][chosen]
        path.append(node)
    return path, sample_token(target_probs[node], generator)


def kseq_acceptance(p: Tensor, q: Tensor, k: int) -> float:
    """Probability that K-SEQ accepts one of k i.i.d. drafts from q: 1 - (1 - beta(rho*))^k (exact)."""
    beta = float(torch.minimum(q, p / kseq_rho(p, q, k)).sum())
    return 1 - (1 - beta) ** k


def recursive_acceptance(p: Tensor, q: Tensor, k: int) -> float:
    """The same for SpecInfer's recursive rule (verify.tree_speculative_sample with i.i.d. siblings): try j accepts
    with probability sum_x min(q(x), r_j(x)), and a rejection leaves r_{j+1} = norm(max(0, r_j - q)) whatever was
    drawn, so the misses multiply (exact)."""
    r, miss = p, 1.0
    for _ in range(k):
        miss *= 1 - float(torch.minimum(q, r).sum())
        r = residual_distribution(r, q)
    return 1 - miss


def expected_accepted_length(acceptance: float, depth: int) -> float:
    """Accepted drafts + 1 per call on a tree of `depth` levels in which every level accepts with the same
    probability: 1 + a + a^2 + ... + a^depth (a step of identical levels; the comparison of the two rules above)."""
    return sum(acceptance**d for d in range(depth + 1))


class SpecTr:
    """SpecTr's k-sequential draft selection (Sun et al. 2023; survey §6.3) behind verify.Verifier. Lossless on
    trees with sampled siblings (tree.q); a chain is k = 1 at every position, speculative sampling."""

    lossy = False

    def chain(
        self, logits: Tensor, p: Tensor, q: Tensor | None, drafts: Tensor, generator: torch.Generator | None
    ) -> tuple[int, int]:
        return speculative_sample(p, q, drafts, generator)

    def tree(self, logits: Tensor, p: Tensor, tree: Tree, generator: torch.Generator | None) -> tuple[list[int], int]:
        if tree.q is None:
            raise ValueError("SpecTr selects among siblings drawn i.i.d. from q: this tree has none (tree.q is None)")
        if generator is None:
            raise ValueError("SpecTr samples: it needs an explicit torch.Generator")
        return tree_kseq_sample(p, tree.q, *tree_tensors(tree, p.device), generator)
