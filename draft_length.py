"""Draft-length control: how many tokens to draft before the target verifies (reading list, "Draft Length Control").

A policy is consulted by the decoding loops and drafters at four points:
  gamma                               the most tokens a chain may draft this step
  keep_drafting(draft_logits, i)      asked by a chain drafter right after it drafted token i from draft_logits [V]
                                      (its raw, unwarped logits): draft token i + 1 too? Stopping keeps token i.
  keep_growing(frontier_logprobs, d)  asked by a dynamic tree drafter after growing level d: grow level d + 1?
  update(drafted, accepted)           after each verification
and reset() when a generation starts, so every run reproduces on its own. Policies that read the draft's
distribution see its raw (temperature 1) logits: at temperature 0 the warped distribution is one-hot and says
nothing about confidence. Prompt lookup has no distribution, so only gamma applies to it.
"""

import json
import math
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch import Tensor

from cost import CostCurve


class DraftLength(Protocol):
    gamma: int  # the most tokens a chain drafts this step

    def reset(self) -> None: ...

    def keep_drafting(self, draft_logits: Tensor, i: int) -> bool: ...

    def keep_growing(self, frontier_logprobs: list[float], depth: int) -> bool: ...

    def update(self, drafted: int, accepted: int) -> None: ...


def entropy(logits: Tensor) -> float:
    """H(softmax(logits)) in nats."""
    return float(torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum())


class FixedLength:
    """gamma drafts every step (Leviathan et al. 2023; the survey's Algorithm 2); trees grow to the drafter's depth."""

    def __init__(self, gamma: int):
        self.gamma = gamma

    def reset(self) -> None:
        pass

    def keep_drafting(self, draft_logits: Tensor, i: int) -> bool:
        return True

    def keep_growing(self, frontier_logprobs: list[float], depth: int) -> bool:
        return True

    def update(self, drafted: int, accepted: int) -> None:
        pass


class Heuristic(FixedLength):
    """transformers' assisted generation schedule "heuristic" (candidate_generator.py, update_candidate_strategy):
    gamma + 2 after a step that accepted every draft, else gamma - 1, never below 1. Reset for every generation,
    as its "heuristic_transient" variant does, so that runs reproduce."""

    def __init__(self, gamma: int):
        self.start = self.gamma = gamma

    def reset(self) -> None:
        self.gamma = self.start

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:  # nothing was drafted (no match, or the budget): nothing learned
            return
        self.gamma = self.gamma + 2 if accepted == drafted else max(1, self.gamma - 1)


class Confidence(FixedLength):
    """Stop drafting once the draft's top probability falls below `threshold` (BiLD's fallback, Kim et al. 2023;
    transformers' assistant_confidence_threshold, default 0.4), at most gamma tokens. BiLD drops the token that
    triggered the fallback; we keep it, since the target verifies it in the same call at no extra step."""

    def __init__(self, gamma: int, threshold: float = 0.4):
        self.gamma, self.threshold = gamma, threshold

    def keep_drafting(self, draft_logits: Tensor, i: int) -> bool:
        return float(torch.softmax(draft_logits.float(), dim=-1).max()) >= self.threshold


class Adaptive(Confidence):
    """Draft & Verify's adaptive draft-exiting (Zhang et al. 2023, §3.3): stop after a draft token whose top
    probability is below a threshold that follows the measured acceptance rate. After each step the acceptance
    rate's moving average r <- b1 r + (1 - b1) accepted / drafted is compared with a target rate: below it, aim
    the threshold `step` higher (stop sooner); above it, `step` lower, unless the whole gamma was drafted; the
    threshold then moves part way there, t <- b2 t + (1 - b2) aim. Defaults: the authors' code (b1 0.5, target
    0.9, step 0.01, b2 0.9; a first threshold of 0.8 at -t 0)."""

    def __init__(
        self,
        gamma: int,
        threshold: float = 0.8,
        target_rate: float = 0.9,
        step: float = 0.01,
        b1: float = 0.5,
        b2: float = 0.9,
    ):
        self.gamma, self.start, self.target_rate, self.step = gamma, threshold, target_rate, step
        self.b1, self.b2 = b1, b2
        self.reset()

    def reset(self) -> None:
        self.threshold, self.rate = self.start, 0.0

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.rate = self.b1 * self.rate + (1 - self.b1) * accepted / drafted
        if self.rate < self.target_rate:
            aim = self.threshold + self.step
        else:
            aim = self.threshold if drafted == self.gamma else self.threshold - self.step
        self.threshold = self.b2 * self.threshold + (1 - self.b2) * aim


class SVIP(FixedLength):
    """SVIP (Zhang et al. 2024, "Draft Model Knows When to Stop"): the acceptance rate of a draft token is bounded
    below by about 1 - sqrt(c * H(q)), H the draft's entropy in nats; drafting stops after a token whose bound falls
    under 1 - threshold, i.e. when sqrt(c * H) > threshold. c = 0.15 and threshold 0.3 are the authors' defaults
    (their code: Geralt-Targaryen/SVIP), so the stop is at H > 0.6 nats."""

    def __init__(self, gamma: int, threshold: float = 0.3, c: float = 0.15):
        self.gamma, self.threshold, self.c = gamma, threshold, c

    def keep_drafting(self, draft_logits: Tensor, i: int) -> bool:
        return math.sqrt(self.c * entropy(draft_logits)) <= self.threshold


class DynamicDepth(FixedLength):
    """Dynamic Depth Decoding (Brown et al. 2024) for EAGLE-2 trees: stop growing when the frontier's total path
    probability, sum over the beam of exp(path log-prob), falls below `threshold`: the deeper nodes would rarely
    be accepted. Chains are left alone."""

    def __init__(self, threshold: float = 0.1):
        self.gamma, self.threshold = 0, threshold

    def keep_growing(self, frontier_logprobs: list[float], depth: int) -> bool:
        return sum(math.exp(s) for s in frontier_logprobs) >= self.threshold


# ---- DISCO: a learned stop rule -------------------------------------------------------------------------------

DISCO_TOP = 10  # top-k draft probabilities among the classifier's inputs (DISCO's "top-10 draft confidences")


def disco_features(draft_logits: Tensor, i: int) -> Tensor:
    """[DISCO_TOP + 2]: the draft's top probabilities (sorted), its entropy and the token's index in the draft."""
    probs = torch.softmax(draft_logits.float(), dim=-1)
    top = probs.topk(min(DISCO_TOP, probs.numel())).values
    top = torch.cat([top, top.new_zeros(DISCO_TOP - len(top))])
    h = torch.special.entr(probs).sum()
    return torch.cat([top, torch.stack([h, torch.tensor(float(i), device=h.device)])]).cpu()


class DiscoClassifier(nn.Module):
    """A small feed-forward net: features of a drafted token -> logit of P(the target accepts it). The inputs are
    standardised with the training set's mean and std, kept as buffers so that they are saved with the weights."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DISCO_TOP + 2, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("mean", torch.zeros(DISCO_TOP + 2))
        self.register_buffer("std", torch.ones(DISCO_TOP + 2))

    def forward(self, features: Tensor) -> Tensor:
        """features [..., DISCO_TOP + 2] -> logits [...]"""
        return self.net((features - self.mean) / self.std).squeeze(-1)

    def save(self, path: str | Path, threshold: float) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(
            json.dumps({"hidden": self.net[0].out_features, "threshold": threshold, "top": DISCO_TOP}, indent=2) + "\n"
        )
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, path / "model.safetensors")

    @classmethod
    def load(cls, path: str | Path) -> tuple["DiscoClassifier", float]:
        """(classifier, the stop threshold chosen by train.py disco)."""
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        if cfg["top"] != DISCO_TOP:
            raise ValueError(f"{path}: trained on the top {cfg['top']} probabilities, this code reads {DISCO_TOP}")
        model = cls(cfg["hidden"])
        model.load_state_dict(load_file(path / "model.safetensors"))
        return model.eval(), cfg["threshold"]


class Disco(FixedLength):
    """DISCO (Mamou et al. 2024, "Dynamic Speculation Lookahead"): after each drafted token a small classifier
    predicts whether the target will accept it; drafting stops when that probability falls below `threshold`.
    Trained by `train.py disco` on acceptance traces of training-split prompts."""

    def __init__(self, gamma: int, classifier: DiscoClassifier, threshold: float):
        self.gamma, self.classifier, self.threshold = gamma, classifier, threshold

    @torch.inference_mode()
    def keep_drafting(self, draft_logits: Tensor, i: int) -> bool:
        return float(torch.sigmoid(self.classifier(disco_features(draft_logits, i)))) >= self.threshold


class Recorder(FixedLength):
    """Drafts a fixed gamma and records every step: the features of each drafted token [drafted, DISCO_TOP + 2]
    and how many of them the target accepted. DISCO's training data (train.py disco)."""

    def __init__(self, gamma: int):
        self.gamma, self.steps, self.pending = gamma, [], []

    def keep_drafting(self, draft_logits: Tensor, i: int) -> bool:
        self.pending.append(disco_features(draft_logits, i))
        return True

    def update(self, drafted: int, accepted: int) -> None:
        if self.pending:
            self.steps.append((torch.stack(self.pending[:drafted]), accepted))
        self.pending = []

    def labelled(self) -> tuple[Tensor, Tensor]:
        """(features [M, DISCO_TOP + 2], accepted? [M]) of every drafted token the target compared: the drafts
        after the first rejection were never compared, so they carry no label."""
        features, labels = [], []
        for step, accepted in self.steps:
            compared = min(accepted + 1, len(step))
            features.append(step[:compared])
            labels += [1.0] * accepted + [0.0] * (compared - accepted)
        return torch.cat(features), torch.tensor(labels)


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens a step of gamma drafts emits on average, (1 - alpha^(gamma+1)) / (1 - alpha) (Leviathan et al. 2023,
    eq. 1): the accepted drafts and the target's own token, each draft accepted with probability alpha."""
    return gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, gamma: int, c: float, v: float = 1.0) -> float:
    """Leviathan et al. 2023's expected speedup of Algorithm 2 (Thm 3.8), with the verify call's cost as a
    parameter: (1 - alpha^(gamma+1)) / ((1 - alpha) (gamma c + v)). alpha is the acceptance rate, c a draft
    token's cost and v the cost of the call of gamma + 1 tokens, both over a one-token target call (the paper
    takes v = 1, a call that costs the same whatever its length; on a CPU it does not)."""
    return expected_tokens(alpha, gamma) / (gamma * c + v)


def best_gamma(alpha: float, c: float, v: float = 1.0, most: int = 16) -> int:
    """The gamma in [0, most] that predicted_speedup ranks first (0: drafting cannot pay), v held fixed."""
    return max(range(most + 1), key=lambda g: predicted_speedup(alpha, g, c, v) if g else 1.0)


# ---- CostAware: gamma from the measured cost of the target's calls --------------------------------------------


class AcceptanceEstimate:
    """A running estimate of the per-draft acceptance rate alpha: a Beta(a, b) prior plus exponentially forgotten
    counts of accepted drafts and rejections (CostAware's, and each row's in specserve.SpecServe). Each verify call
    compares accepted + 1 drafts, or all of them when all pass, so its rejections are 0 or 1 (Stats.acceptance_rate);
    every step forgets at `decay`, steps that drafted nothing too, so the estimate drifts back to the prior's mean."""

    def __init__(self, prior: tuple[float, float], decay: float):
        self.prior, self.decay = prior, decay
        self.accepted, self.rejected = 0.0, 0.0  # forgotten counts since the generation started

    @property
    def alpha(self) -> float:
        a, b = self.prior
        return (a + self.accepted) / (a + b + self.accepted + self.rejected)

    def observe(self, drafted: int, accepted: int) -> None:
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (1.0 if accepted < drafted else 0.0)


class CostAware(FixedLength):
    """Each step, the gamma in [0, most] with the most expected tokens per unit of time (Leviathan et al. 2023,
    Thm 3.8, with the verify call's cost measured instead of taken as 1; survey §9, the speculation length):

        E(gamma) / (gamma c + ratio(gamma + 1)),   E(gamma) = (1 - alpha^(gamma+1)) / (1 - alpha)

    ratio(T) is the measured cost of a target call of T tokens over a call of one (cost.CostCurve), so the
    policy drafts long where long calls are cheap and nothing (gamma 0: the loop then makes a plain one-token
    call) where no length pays. alpha is a running estimate of the per-draft acceptance rate: a Beta(a, b)
    prior plus exponentially forgotten counts of accepted drafts and rejections (each verify call compares
    accepted + 1 drafts, or all of them when all pass, so its rejections are 0 or 1: Stats.acceptance_rate,
    forgotten at `decay` per step). Steps that draft nothing forget too, so the estimate drifts back to the
    prior's mean and the policy tries drafting again.

    The prior is optimistic and light, Beta(0.9, 0.1): mean 0.9, worth one observation. A policy that drafts
    nothing learns nothing, so a pessimistic prior can trap it at gamma 0 for a drafter that would pay (with
    Beta(3, 2), mean 0.6, an int8 self-draft of acceptance 0.82 never drafted on SmolLM2). With this prior the
    first step drafts, the measured rate takes over within a few steps (ten forgotten observations outweigh it
    ten to one), and after a run of zero-draft steps the estimate climbs back and the policy probes again.
    Simulated over acceptance rates 0.2-0.95 and draft costs 0-0.8 on a CPU-shaped curve it keeps at least 0.85 of
    the best fixed gamma's expected speed (tests/test_cost.py), where Beta(3, 2) fell to 0.49.

    c, the drafter's cost per token over a one-token target call, is a constructor argument, measured once
    (cost.draft_cost: a draft model's one-token call over the target's; prompt lookup: 0). The protocol gives
    no timing, and timing inside the policy (wall time from reading gamma to update, less the curve's verify
    cost) would make each step's gamma depend on the machine's load at that moment: runs would no longer
    reproduce, and at temperature > 0 a different gamma draws different uniforms, hence a different sample for
    the same seed. With c and the curve fixed, the choices depend on the acceptance history alone.

    Trees (keep_growing): after level d, growing level d + 1 pays when its expected tokens per added cost beat
    the tree's so far. The expected tokens of a level are its frontier's path probability mass, as in Dynamic
    Depth Decoding (Brown et al. 2024), the next level's extrapolated by the last level's ratio; a level costs
    one more draft call (c) and len(frontier) more nodes in the tree call (the tree curve's ratio), counting a
    beam of nodes per level, about what EAGLE-2's final rerank keeps."""

    def __init__(
        self, curve: CostCurve, c: float, most: int = 16, prior: tuple[float, float] = (0.9, 0.1), decay: float = 0.9
    ):
        if c < 0 or most < 0 or not 0 <= decay < 1 or min(prior) <= 0:
            raise ValueError("need c >= 0, most >= 0, 0 <= decay < 1 and a prior with positive counts")
        self.curve, self.c, self.most, self.prior, self.decay = curve, c, most, prior, decay
        self.reset()

    def reset(self) -> None:
        self.estimate = AcceptanceEstimate(self.prior, self.decay)
        self.levels: list[float] = []  # the tree being grown: each level's frontier mass
        self.nodes = 1
        self.gamma = self.best()

    @property
    def alpha(self) -> float:
        return self.estimate.alpha

    def speedup(self, gamma: int) -> float:
        """Expected tokens per unit of time (one-token target calls) at this gamma, with the current alpha."""
        return predicted_speedup(self.alpha, gamma, self.c, self.curve.ratio(gamma + 1))

    def best(self) -> int:
        return max(range(self.most + 1), key=self.speedup)  # ties: the shorter

    def update(self, drafted: int, accepted: int) -> None:
        self.estimate.observe(drafted, accepted)
        self.gamma = self.best()

    def keep_growing(self, frontier_logprobs: list[float], depth: int) -> bool:
        if depth == 1:  # a new tree: the root, then level 1 was just grown
            self.levels, self.nodes = [], 1
        mass = sum(math.exp(s) for s in frontier_logprobs)
        self.levels.append(mass)
        self.nodes += len(frontier_logprobs)
        before = self.levels[-2] if len(self.levels) > 1 else 1.0  # the root is accepted with certainty
        gain = mass * min(1.0, mass / before) if before > 0 else 0.0  # the next level's expected tokens
        tokens, cost = 1 + sum(self.levels), depth * self.c + self.curve.ratio(self.nodes, tree=True)
        added = (
            self.c
            + self.curve.ratio(self.nodes + len(frontier_logprobs), tree=True)
            - self.curve.ratio(self.nodes, tree=True)
        )
        return added <= 0 or gain / added > tokens / cost
