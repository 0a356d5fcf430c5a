"""LOSSY: Speculative Contrastive Decoding (Yuan et al. 2023, "Speculative Contrastive Decoding", ACL 2024; survey
§9, which names it as speculative decoding joined with contrastive decoding, and §6.2 for the rule it changes).
Paper: acceleration factors comparable to speculative decoding's, which secondary summaries give as 1.78x-3.32x
(LLaMA-2-70B expert, a smaller LLaMA-2 amateur), with contrastive decoding's quality gains on WikiText, HumanEval,
AlpacaEval and GSM8K.

The draft model is contrastive decoding's amateur and the target its expert (Li et al. 2023). Drafts x ~ q are
verified by speculative sampling, not against the target's p but against the contrastive distribution

    p_cd(x) = softmax((1 + beta) log p(x) - beta log q(x))  over the plausible head {x : p(x) >= alpha max p},

0 outside it (O'Brien & Lewis 2023's form of the contrast, which SCD uses; alpha is Li et al.'s plausibility
constraint, beta the strength). A draft is kept with min(1, p_cd(x) / q(x)), a rejection samples
norm(max(0, p_cd - q)), so the output follows p_cd exactly: LOSSY, it is not the target's distribution (nor its
greedy text). beta = 0 and alpha = 0 give p_cd = p: exact speculative sampling, draw for draw.

p_cd needs the amateur's q at every emitted position. The drafter hands q for its drafts only, so with beta > 0
there is no contrastive row for the bonus token: a full accept ends on the last draft, which is then the step's own
token (the step emits at most gamma tokens, gamma - 1 of them counted as accepted drafts: SCD with gamma - 1 drafts
whose amateur also computed the row after them). A step without drafts (the last token of -n, or a plain call of
-l cost) has no amateur row at all and samples the target's plausible head, p_cd with beta = 0. At beta = 0 q is
not needed for p_cd and every row, the bonus row too, is known.

Where q(x) = 0 on the head (a truncated or one-hot q: the command line refuses top-k and top-p with this rule), the
contrast is +inf there: p_cd is its limit, proportional to p^(1 + beta) on those tokens. The head is read on the
warped p (at -t 1 Li et al.'s constraint exactly), and the contrast of warped rows is that of the logits, then the
temperature: ((1 + beta) s_p - beta s_q) / T. p = target (expert), q = draft (amateur), as Leviathan et al.
"""

import torch
from torch import Tensor

from tree import Tree
from verify import acceptance_probability, residual_distribution, sample_token, speculative_sample


def plausible_head(p: Tensor, alpha: float) -> Tensor:
    """bool [..., V]: Li et al.'s plausibility constraint, p(x) >= alpha max p (and p(x) > 0)."""
    return (p >= alpha * p.amax(dim=-1, keepdim=True)) & (p > 0)


def contrastive_distribution(p: Tensor, q: Tensor | None, alpha: float = 0.1, beta: float = 0.5) -> Tensor:
    """p_cd [..., V] from the expert's p and the amateur's q (rows alike): softmax((1 + beta) log p - beta log q)
    on the plausible head, 0 elsewhere. q may be None when beta = 0. alpha = beta = 0: p itself, bit for bit."""
    if alpha == 0 and beta == 0:
        return p
    head = plausible_head(p, alpha)
    score = p.log()
    if beta > 0:
        score = (1 + beta) * score - beta * q.log()  # +inf where q = 0 < p
        unseen = torch.isposinf(score) & head  # the amateur cannot draw these: CD prefers them infinitely
        only_unseen = unseen.any(dim=-1, keepdim=True)
        score = torch.where(only_unseen, (1 + beta) * p.log(), score)  # the limit: p^(1 + beta) on those tokens
        head = torch.where(only_unseen, unseen, head)
    return torch.softmax(score.masked_fill(~head, float("-inf")), dim=-1)


def contrastive_sample(
    target_probs: Tensor,
    draft_probs: Tensor | None,
    draft_tokens: Tensor,
    generator: torch.Generator,
    alpha: float = 0.1,
    beta: float = 0.5,
) -> tuple[int, int]:
    """Speculative sampling of a draft chain against p_cd (Yuan et al. 2023): target_probs [γ+1, V], draft_probs
    [γ, V] (the q the drafts were drawn from), draft_tokens [γ] -> (n_accepted, next_token). Every emitted token
    follows p_cd of its position. With beta > 0, no bonus row: a full accept returns (γ - 1, the last draft)."""
    if beta == 0:  # p_cd needs no q: every row is known, the bonus row too
        return speculative_sample(
            contrastive_distribution(target_probs, None, alpha, 0.0), draft_probs, draft_tokens, generator
        )
    tokens = draft_tokens.tolist()
    if not tokens:  # no amateur row: the target's plausible head (p_cd at beta = 0)
        return 0, sample_token(contrastive_distribution(target_probs[0], None, alpha, 0.0), generator)
    p_cd = contrastive_distribution(target_probs[: len(tokens)], draft_probs, alpha, beta)  # [γ, V]
    for i, x in enumerate(tokens):
        q = draft_probs[i]
        u = torch.rand(1, generator=generator, device=generator.device).item()
        if u < acceptance_probability(p_cd[i, x], q[x]).item():
            if i == len(tokens) - 1:  # the last draft stands where the bonus token would
                return i, x
            continue
        return i, sample_token(residual_distribution(p_cd[i], q), generator)
    raise AssertionError("unreachable: the last draft returns above")


class Contrastive:
    """LOSSY: Speculative Contrastive Decoding (Yuan et al. 2023) behind verify.Verifier, chains only (a tree's
    leaves have no amateur row). Defaults alpha = 0.1, beta = 0.5: O'Brien & Lewis 2023's, whose contrast SCD
    uses."""

    lossy = True

    def __init__(self, alpha: float = 0.1, beta: float = 0.5):
        if not 0 <= alpha <= 1 or not 0 <= beta < float("inf"):
            raise ValueError(f"need alpha in [0, 1] and a finite beta >= 0, got {alpha}, {beta}")
        self.alpha, self.beta = alpha, beta

    def chain(
        self, logits: Tensor, p: Tensor, q: Tensor | None, drafts: Tensor, generator: torch.Generator | None
    ) -> tuple[int, int]:
        if q is None and len(drafts) and self.beta > 0:
            raise ValueError("contrastive decoding contrasts the draft's distribution: this drafter has none (q)")
        if generator is None:
            raise ValueError("speculative contrastive decoding samples: it needs an explicit torch.Generator")
        return contrastive_sample(p, q, drafts, generator, self.alpha, self.beta)

    def tree(self, logits: Tensor, p: Tensor, tree: Tree, generator: torch.Generator | None) -> tuple[list[int], int]:
        raise ValueError("contrastive decoding verifies chains: a tree's leaves have no draft distribution")
