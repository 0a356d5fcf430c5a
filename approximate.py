"""Approximate verification: rules that accept more drafts than the target would produce. Every rule here is LOSSY:
the output is NOT the target's greedy output or distribution (survey §6.1 and §6.2, "Approximate").

    Typical   Medusa's typical acceptance (Cai et al. 2024 §2.3.1; survey §6.1/§6.2)
    TopK      SpecDec's relaxed top-beta verification (Xia et al. 2023; survey §6.1); with tau = inf it is
              Blockwise Parallel Decoding's top-k criterion (Stern et al. 2018 §5; survey §3.2, §6.1)
    BiLD      Big Little Decoder's rollback (Kim et al. 2023; survey §6.1); its fallback is a draft-length
              rule, draft_length.Confidence
    Lenient   lenient speculative sampling (Leviathan et al. 2023 App. A.5; DistillSpec, Zhou et al. 2023; §6.2)

Each reduces to the lossless rule at its exact end, which the tests check: Typical at temperature 0, TopK with
beta = 1, BiLD with rollback = 0, Lenient with lenience = 1. They share verify.py's Verifier interface.
p = target, q = draft (Leviathan et al.).
"""

import math

import torch
from torch import Tensor

from tree import Tree
from verify import SpeculativeSampling, tree_tensors


def chain_tree(drafts: Tensor, q: Tensor | None) -> Tree:
    """A chain as a tree: node i + 1 is draft i, child of node i (the root, node 0, stands for the last context
    token; no rule here reads its token). tree.q[i] = q[i], the distribution draft i was drawn from."""
    n = len(drafts)
    q_rows = torch.cat([q[:n], q.new_zeros(1, q.shape[-1])]) if q is not None else None
    return Tree([-1] + drafts.tolist(), list(range(-1, n)), [0.0] * (n + 1), q_rows)


def longest_acceptable_path(ok: list[bool], parents: list[int]) -> list[int]:
    """The longest root path of acceptable nodes (ok[0], the root, is ignored), root excluded; ties: the first
    in index order (Medusa's choice)."""
    fine, depth, best = [True], [0], 0  # fine[i]: every node on the root path to i is acceptable
    for i in range(1, len(parents)):
        fine.append(fine[parents[i]] and ok[i])
        depth.append(depth[parents[i]] + 1)
        if fine[i] and depth[i] > depth[best]:
            best = i
    path = []
    while best != 0:
        path.append(best)
        best = parents[best]
    return path[::-1]


class RelaxedRule:
    """Accept the longest root path whose every draft passes `acceptable`, then emit the target's argmax after
    it: greedy verification (§6.1) with a wider acceptance set. Subclasses define acceptable(logits, p, tokens):
    logits and p [M, V] are the rows that predict tokens [M] (each node's parent row) -> bool [M]."""

    lossy = True

    def tree(self, logits: Tensor, p: Tensor, tree: Tree, generator) -> tuple[list[int], int]:
        tokens, parents = tree_tensors(tree, logits.device)
        ok = [True] + self.acceptable(logits[parents[1:]], p[parents[1:]], tokens[1:]).tolist()
        path = longest_acceptable_path(ok, tree.parents)
        return path, int(logits[path[-1] if path else 0].argmax())

    def chain(self, logits: Tensor, p: Tensor, q: Tensor | None, drafts: Tensor, generator) -> tuple[int, int]:
        path, token = self.tree(logits, p, chain_tree(drafts, q), generator)
        return len(path), token


class Typical(RelaxedRule):
    """Medusa's typical acceptance (Cai et al. 2024 §2.3.1). LOSSY. A draft x is acceptable if
    p(x) > min(epsilon, delta * exp(-H(p))), p the temperature-warped target row; the next token is the argmax
    (Medusa picks it greedily), so at temperature 0 (one-hot p) it is exactly greedy verification. Defaults are
    Medusa's posterior_threshold = 0.09 and posterior_alpha = 0.3."""

    def __init__(self, epsilon: float = 0.09, delta: float = 0.3):
        self.epsilon, self.delta = epsilon, delta

    def acceptable(self, logits: Tensor, p: Tensor, tokens: Tensor) -> Tensor:
        entropy = torch.special.entr(p).sum(dim=-1)  # [M], entr(0) = 0
        threshold = torch.clamp(self.delta * torch.exp(-entropy), max=self.epsilon)
        return p.gather(-1, tokens[:, None])[:, 0] > threshold


class TopK(RelaxedRule):
    """SpecDec's relaxed verification (Xia et al. 2023 §3.2). LOSSY. A draft x is acceptable if it is among the
    target's top `beta` tokens (ties broken by index, as argmax does) AND log p(x) >= log p(top-1) - tau, with p
    the target's own distribution at temperature 1. The authors' scripts use beta = 5, tau = 3.0 (hemingkx/SpecDec).
    beta = 1 is greedy verification exactly; tau = inf is Blockwise Parallel Decoding's top-k rule (Stern et al.
    2018 §5). A greedy-decoding rule (§6.1): the next token is the target's argmax."""

    def __init__(self, beta: int = 5, tau: float = 3.0):
        self.beta, self.tau = beta, tau

    def acceptable(self, logits: Tensor, p: Tensor, tokens: Tensor) -> Tensor:
        mine = logits.gather(-1, tokens[:, None])  # [M, 1]; ranks on the raw logits, exactly as argmax does
        index = torch.arange(logits.shape[-1], device=logits.device)
        ahead = (logits > mine) | ((logits == mine) & (index < tokens[:, None]))  # tokens ranked before x
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [M, V]
        gap = logprobs.max(dim=-1).values - logprobs.gather(-1, tokens[:, None])[:, 0]
        return (ahead.sum(dim=-1) < self.beta) & (gap <= self.tau)


class BiLD(RelaxedRule):
    """Big Little Decoder's rollback policy (Kim et al. 2023 §3.3). LOSSY. A draft x is rolled back (rejected)
    when its distance from the target, the cross-entropy -log p(x) of the target's temperature-1 distribution,
    exceeds `rollback`, unless x is the target's argmax (the official code skips such a rollback: it would put x
    back). The authors' default rollback threshold is 5.0 (kssteven418/BigLittleDecoder). rollback = 0 is greedy
    verification exactly. The fallback half of BiLD (the draft hands over when its top probability drops below a
    threshold, 0.6 by default) is draft_length.Confidence, which `--verify bild` turns on."""

    def __init__(self, rollback: float = 5.0):
        self.rollback = rollback

    def acceptable(self, logits: Tensor, p: Tensor, tokens: Tensor) -> Tensor:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        distance = -logprobs.gather(-1, tokens[:, None])[:, 0]
        return (tokens == logits.argmax(dim=-1)) | (distance <= self.rollback)


class Lenient(SpeculativeSampling):
    """Lenient speculative sampling (Leviathan et al. 2023 App. A.5; DistillSpec's lenience, Zhou et al. 2023).
    LOSSY for lenience < 1. A draft x ~ q is accepted with probability min(1, p(x) / (l q(x))), so more drafts
    stand; after a rejection the token comes from the usual residual norm(max(0, p - q)) (the complement of the
    accepted mass min(q, p / l) with DistillSpec's f(p) = p / l). l = 1 is exact speculative sampling: the same
    chain and tree walks as verify.SpeculativeSampling, with the lenience passed down."""

    lossy = True

    def __init__(self, lenience: float = 0.5):
        if not 0 < lenience <= 1 or math.isnan(lenience):
            raise ValueError(f"lenience must be in (0, 1], got {lenience}")
        self.lenience = lenience
