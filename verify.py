"""Verification: decide which drafted tokens the target model accepts, and what token comes next.

§6 of Xia et al. 2024 ("Unlocking Efficiency in LLM Inference", survey of speculative decoding):
  §6.1 greedy verification, §6.2 speculative sampling (Leviathan et al. 2023, Chen et al. 2023),
  §6.3 token tree verification (SpecInfer, Miao et al. 2024; SpecTr, Sun et al. 2023). These are the LOSSLESS
  rules; the approximate (lossy) ones of §6.1/§6.2 are in approximate.py, behind the same Verifier interface.

Notation follows Leviathan et al. 2023: p = TARGET distribution, q = DRAFT distribution. The survey swaps the
two letters (its Eq. 6-7 and Algorithm 2 call the target q and the drafter p); the formulas are the same.

Rules kept everywhere (docs/pitfalls.md says what other code got wrong, and the test that catches each):
  - p and q are warped identically (temperature, top-k, top-p) and q is the distribution the draft token was
    actually drawn from; a deterministic draft (argmax, prompt lookup) has a one-hot q.
  - Temperature 0 gives one-hot p, so greedy decoding is a special case of the sampling rules below.
  - All randomness comes from an explicit torch.Generator, one uniform per tested draft token or drawn token;
    the generator must live on the same device as the probabilities.
  - At temperature > 0 a deterministic draft is matched against the target's own sample (sample_match_verify):
    the same acceptance as rejection sampling, and the output of `generate` for the same seed.

Everything here works on one sequence (no batch dim) and returns Python ints.
"""

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from tree import Tree, children

# ---------------------------------------------------------------------------------------------------------------
# Logit warpers (§6.2: speculative sampling preserves whatever distribution the target samples from, so the same
# warping must be applied to the target and the draft before verification).


def warp_logits(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k (0 = off), then nucleus top-p (1.0 = off), over the last dim; masked = -inf.

    Same order and rules as HF transformers' TemperatureLogitsWarper / TopKLogitsWarper / TopPLogitsWarper.
    Returns float32: warping bf16/fp16 logits in their own dtype would change which tokens survive.
    """
    assert temperature > 0, "temperature 0 (greedy) is handled by probs_from_logits"
    logits = logits.float() / temperature  # [..., V]
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th value survive
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [..., V]
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly more likely tokens
        drop = mass_before >= top_p  # keep the smallest prefix whose mass reaches top_p ...
        drop[..., 0] = False  # ... and always the most likely token
        drop = torch.zeros_like(drop).scatter(-1, order, drop)  # back from sorted to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probs_from_logits(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Softmax of the warped logits in float32 ([V] or [N, V]); temperature 0 = one-hot of the argmax (greedy)."""
    if temperature == 0:
        # Greedy as a one-hot distribution: the sampling rules below then reduce to exact argmax matching.
        argmax = logits.argmax(dim=-1, keepdim=True)  # [..., 1]
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, argmax, 1.0)
    return torch.softmax(warp_logits(logits, temperature, top_k, top_p), dim=-1)


def sample_token(probs: Tensor, generator: torch.Generator | None) -> int:
    """Draw one token from probs [V] with the caller's generator (never the global RNG): inverse transform
    sampling, the first token whose cumulative probability exceeds u * total for one uniform u in [0, 1). A token of
    probability 0 adds nothing to the sum and is never drawn. torch.multinomial draws the same distribution, but took
    1.0 ms for SmolLM2's 49152 tokens on a 2-core CPU (this: 0.08 ms), an eighth of the shipped target's one-token
    call, paid at every sampled token. The sum is in float64 so that rounding over 49152 terms leaves no gap."""
    if generator is None:  # temperature 0 (the loops refuse sampling without one): probs is one-hot, no draw needed
        return int(probs.argmax().item())
    cdf = probs.double().cumsum(-1)  # [V]
    u = torch.rand(1, generator=generator, device=generator.device, dtype=torch.float64).to(cdf.device)
    token, total = torch.cat([torch.searchsorted(cdf, u * cdf[-1:], right=True).double(), cdf[-1:]]).tolist()
    if not total > 0:  # all zeros or NaN: no token can be drawn (torch.multinomial raised here too)
        raise ValueError(f"cannot sample from a distribution of total mass {total}")
    return int(token)


def _uniform(generator: torch.Generator) -> float:
    return torch.rand(1, generator=generator, device=generator.device).item()


def _one_hot(token: int, like: Tensor) -> Tensor:
    """The draft distribution of a deterministic draft: all mass on the drafted token."""
    q = torch.zeros_like(like)
    q[token] = 1.0
    return q


# ---------------------------------------------------------------------------------------------------------------
# The two pieces of rejection sampling (§6.2 Eq. 6-7; Leviathan et al. 2023 Alg. 1; Chen et al. 2023 Alg. 2).


def acceptance_probability(p: Tensor, q: Tensor, lenience: float = 1.0) -> Tensor:
    """min(1, p / q) elementwise: probability of keeping a token drawn from q when the target is p (Eq. 6).

    q == 0 only happens for a token the drafter could not have drawn (a bug upstream); we guard the division so
    that it gives 1 if p > 0 and 0 if p == 0, i.e. a token the target forbids is never accepted.
    lenience l < 1 gives min(1, p / (l q)): Leviathan et al.'s LOSSY lenient rule (approximate.Lenient).
    """
    return (p / (lenience * q).clamp_min(torch.finfo(q.dtype).tiny)).clamp(max=1.0)


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(0, p - q)) over the last dim: the distribution to sample after a rejection (Eq. 7).

    Together with acceptance_probability this reproduces p exactly (Leviathan et al. 2023 App. A.1).

    Renormalised, never softmaxed (transformers PR #28508), and the whole vector is adjusted, not only the
    rejected token (EAGLE #20). The sum is 0 only when p == q, where rejection has probability 0: fall back to p.
    """
    residual = (p - q).clamp_min(0.0)  # [..., V]
    total = residual.sum(dim=-1, keepdim=True)  # [..., 1]
    return torch.where(total > 0, residual / total.clamp_min(torch.finfo(p.dtype).tiny), p)


def expected_acceptance(p: Tensor, q: Tensor) -> float:
    """sum_x min(p(x), q(x)) for p, q [V]: probability that a token drawn from q is accepted (Leviathan Thm 3.5)."""
    return float(torch.minimum(p, q).sum().item())


# ---------------------------------------------------------------------------------------------------------------
# Chain verification (§6.1, §6.2, survey Algorithm 2).


def greedy_verify(target_logits: Tensor, draft_tokens: Tensor) -> tuple[int, int]:
    """Accept the longest prefix of drafts equal to the target's argmax (§6.1); correct with the argmax (Eq. 5).

    target_logits [γ+1, V]: row i is the target's prediction for draft i; row γ gives the bonus token.
    Returns (n_accepted, next_token), next_token = argmax of row n_accepted.
    """
    argmax = target_logits.argmax(dim=-1)  # [γ+1]
    matches = (argmax[:-1] == draft_tokens).int()  # [γ]
    n_accepted = int(torch.cumprod(matches, dim=0).sum().item())  # length of the all-ones prefix
    return n_accepted, int(argmax[n_accepted].item())


def speculative_sample(
    target_probs: Tensor,
    draft_probs: Tensor | None,
    draft_tokens: Tensor,
    generator: torch.Generator,
    lenience: float = 1.0,
) -> tuple[int, int]:
    """Exact rejection sampling of a draft chain (§6.2; Leviathan et al. 2023 Alg. 1; Chen et al. 2023 Alg. 2).

    target_probs [γ+1, V] (p), draft_probs [γ, V] (q) or None for deterministic drafts (q = one-hot of the draft
    token), draft_tokens [γ]. Draft i is kept with probability min(1, p_i(x_i) / q_i(x_i)), one uniform each;
    the first rejection is replaced by a sample from norm(max(0, p_i - q_i)) and ends the step; if all γ are
    kept, a bonus token is drawn from p_{γ+1} = target_probs[γ]. The emitted tokens are distributed exactly as
    γ+1 steps of sampling from the target. Returns (n_accepted, next_token). lenience < 1: LOSSY, see
    acceptance_probability.
    """
    tokens = draft_tokens.tolist()
    for i, x in enumerate(tokens):
        p = target_probs[i]  # [V]
        q = draft_probs[i] if draft_probs is not None else _one_hot(x, p)  # [V]
        if _uniform(generator) < acceptance_probability(p[x], q[x], lenience).item():
            continue
        return i, sample_token(residual_distribution(p, q), generator)
    # Bonus token only when every draft was accepted (docs/pitfalls.md: The bonus token only after a full accept).
    return len(tokens), sample_token(target_probs[len(tokens)], generator)


def sample_match_verify(
    target_probs: Tensor, draft_tokens: Tensor, generator: torch.Generator | None
) -> tuple[int, int]:
    """Deterministic drafts checked against the target's own sample (§6.2; Daliri, Musco, Suresh 2024, drafter-invariant
    speculative decoding, for a one-hot q): at each position the target samples its token with sample_token, as
    autoregressive decoding would; the draft is kept while it equals that token, and the first token that differs is
    emitted as the correction. target_probs [γ+1, V], draft_tokens [γ] -> (n_accepted, next_token).

    Every emitted token is the target's own draw, one draw per emitted token in order, so the output is exactly what
    `specdec.generate` samples with the same generator, whatever was drafted. A draft x is kept with probability p(x),
    as min(1, p(x) / q(x)) keeps a one-hot q's, and after a miss the token is distributed as p without x, renormalised:
    the residual norm(max(0, p - q)). Rejection sampling (speculative_sample) draws the same distribution with other
    random numbers, so its output for a seed depends on the drafter."""
    for i, x in enumerate(draft_tokens.tolist()):
        token = sample_token(target_probs[i], generator)
        if token != x:
            return i, token
    return len(draft_tokens), sample_token(target_probs[len(draft_tokens)], generator)


# ---------------------------------------------------------------------------------------------------------------
# Tree verification (§6.3). Layout as in tree.py: node 0 is the root (the last accepted token, not a draft),
# parents[0] == -1, 0 <= parents[i] < i; row i of target_probs/target_logits [N, V] is the target's distribution
# for the children of node i. Results are (path, next_token), path = accepted nodes root->leaf, root excluded.


def follow_matches(tokens: Tensor, parents: Tensor, choose: Callable[[int], int]) -> tuple[list[int], int]:
    """Token tree verification by matching (§6.3): walk from the root, each time into the first child (index order)
    whose token is choose(node), the target's token after that node; stop where no child has it. Returns (path, the
    target's token where the walk stopped). choose is called once per node walked through, in order."""
    token_list, kids = tokens.tolist(), children(parents.tolist())
    node, path = 0, []
    while True:
        token = choose(node)
        child = next((c for c in kids[node] if token_list[c] == token), None)
        if child is None:
            return path, token
        node = child
        path.append(node)


def tree_greedy_verify(target_logits: Tensor, tokens: Tensor, parents: Tensor) -> tuple[list[int], int]:
    """follow_matches with the target's argmax as its token.

    Gives the longest root path that matches the target's greedy continuation when sibling tokens are distinct
    (tree.py's trie builder guarantees it); with duplicate siblings only the first one is explored, exactly as
    tree_speculative_sample does at temperature 0. next_token = argmax of the last accepted node's row.
    """
    return follow_matches(tokens, parents, target_logits.argmax(dim=-1).tolist().__getitem__)


def tree_sample_match_verify(
    target_probs: Tensor, tokens: Tensor, parents: Tensor, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """sample_match_verify on a tree of deterministic siblings (§6.3; Daliri et al. 2024): follow_matches with the
    target's own sample at each node walked through. The walk leaves a node by one of its children with probability sum
    of p(child tokens), the same as recursive rejection sampling of one-hot siblings, and emits what generate samples
    with the same generator."""
    return follow_matches(tokens, parents, lambda node: sample_token(target_probs[node], generator))


def tree_speculative_sample(
    target_probs: Tensor,
    draft_probs: Tensor | None,
    tokens: Tensor,
    parents: Tensor,
    generator: torch.Generator,
    lenience: float = 1.0,
) -> tuple[list[int], int]:
    """Multi-draft recursive rejection sampling (SpecInfer, Miao et al. 2024, "multi-step speculative sampling";
    SpecTr Sun et al. 2023). Lossless: the emitted tokens are distributed as sampling from the target.

    At a node, r = p(node row). Siblings are tried in index order: child c is accepted with probability
    min(1, r(x_c) / q(x_c)) (one uniform per try) and the walk restarts at c; on rejection r = norm(max(0, r - q))
    and the next sibling is tested against this UPDATED residual. When every child is rejected (or there are
    none), next_token is sampled from r.

    Two variants, chosen by draft_probs:
      None: deterministic siblings (top-k, tries, prompt lookup). q is the one-hot of each sibling's token, so
        acceptance is r(x) and a rejection zeroes x in r and renormalises. Lossless for EVERY fixed tree;
        a duplicate sibling token has r(x) = 0 by then and is simply rejected.
      [N, V]: draft_probs[i] is the distribution the children of node i were drawn from, i.i.d. Lossless only
        averaged over that random drawing of the tree (SpecInfer's multi-step speculative sampling; SpecTr's
        k-sequential selection for the same trees is spectr.py).
    lenience < 1: LOSSY, see acceptance_probability.
    """
    token_list, kids = tokens.tolist(), children(parents.tolist())
    node, path = 0, []
    while True:
        r = target_probs[node]  # [V]
        accepted = None
        for c in kids[node]:
            x = token_list[c]
            q = draft_probs[node] if draft_probs is not None else _one_hot(x, r)  # [V]
            if _uniform(generator) < acceptance_probability(r[x], q[x], lenience).item():
                accepted = c
                break
            r = residual_distribution(r, q)
        if accepted is None:
            return path, sample_token(r, generator)
        node = accepted
        path.append(node)


# ---------------------------------------------------------------------------------------------------------------
# The verifier interface: the decoding loops take a rule as they take a drafter (§6's taxonomy: greedy decoding,
# speculative sampling, token trees; lossless here, approximate in approximate.py).


class Verifier(Protocol):
    """A verification rule. Both methods get the target's raw logits and p = the warped target distribution
    (one-hot at temperature 0), rows as in the functions above, and return what the loop keeps."""

    lossy: bool  # True: the output is NOT distributed as the target's (labelled everywhere it is shown)

    def chain(
        self, logits: Tensor, p: Tensor, q: Tensor | None, drafts: Tensor, generator: torch.Generator | None
    ) -> tuple[int, int]:
        """logits, p [γ+1, V]; q [γ, V] or None (one-hot); drafts [γ] -> (n_accepted, next_token)."""

    def tree(self, logits: Tensor, p: Tensor, tree: Tree, generator: torch.Generator | None) -> tuple[list[int], int]:
        """logits, p [N, V], one row per node; tree.q as in tree.py -> (accepted path, root excluded; next_token)."""


def tree_tensors(tree: Tree, device) -> tuple[Tensor, Tensor]:
    """(tokens [N], parents [N]) of a tree, for the rules above."""
    return torch.tensor(tree.tokens, device=device), torch.tensor(tree.parents, device=device)


class Greedy:
    """§6.1 greedy decoding: drafts must equal the target's argmax. Lossless at temperature 0."""

    lossy = False

    def chain(self, logits, p, q, drafts, generator):
        return greedy_verify(logits, drafts)

    def tree(self, logits, p, tree, generator):
        return tree_greedy_verify(logits, *tree_tensors(tree, logits.device))


class SpeculativeSampling:
    """§6.2 speculative sampling (Leviathan et al. 2023; Chen et al. 2023) and, on trees, §6.3 multi-draft
    recursive rejection sampling (SpecInfer; SpecTr). Lossless at every temperature (approximate.Lenient sets a
    lenience < 1 and is not)."""

    lossy = False
    lenience = 1.0

    def chain(
        self, logits: Tensor, p: Tensor, q: Tensor | None, drafts: Tensor, generator: torch.Generator | None
    ) -> tuple[int, int]:
        return speculative_sample(p, q, drafts, generator, self.lenience)

    def tree(self, logits: Tensor, p: Tensor, tree: Tree, generator: torch.Generator | None) -> tuple[list[int], int]:
        return tree_speculative_sample(p, tree.q, *tree_tensors(tree, p.device), generator, self.lenience)


class SampleMatch(SpeculativeSampling):
    """Speculative sampling (§6.2, §6.3) where a deterministic draft (q None: prompt lookup, tries, n-gram pools, top-k
    trees) is checked against the target's own sample (sample_match_verify, tree_sample_match_verify; Daliri et al.
    2024), drafts with a q by rejection sampling as SpeculativeSampling. Lossless at every temperature; for
    deterministic drafts the output is what autoregressive sampling gives with the same seed, token for token, at the
    same acceptance rate as rejection sampling. Up to rounding: a verify call computes a row in another shape than
    generate's one-token call, its logits can differ in the last bits, and a draw that lands that close to the edge
    between two tokens can pick the other (on SmolLM2 at T 1, one of 20 answers of 32 tokens differed in one run)."""

    def chain(
        self, logits: Tensor, p: Tensor, q: Tensor | None, drafts: Tensor, generator: torch.Generator | None
    ) -> tuple[int, int]:
        return (
            sample_match_verify(p, drafts, generator) if q is None else super().chain(logits, p, q, drafts, generator)
        )

    def tree(self, logits: Tensor, p: Tensor, tree: Tree, generator: torch.Generator | None) -> tuple[list[int], int]:
        if tree.q is not None:
            return super().tree(logits, p, tree, generator)
        return tree_sample_match_verify(p, *tree_tensors(tree, p.device), generator)


def exact(temperature: float) -> Verifier:
    """The lossless rule for a temperature: greedy matching at 0 (no random numbers), above it a deterministic
    draft matched against the target's own sample and a sampled draft by rejection sampling (SampleMatch)."""
    return Greedy() if temperature == 0 else SampleMatch()
