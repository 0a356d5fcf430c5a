"""Draft-length control: how many tokens to draft before the target verifies (reading list, "Draft Length Control").

A policy is consulted by the decoding loops and drafters at five points:
  gamma                               the most tokens a chain may draft this step
  plan(context, features)             asked by the tree loop before each tree is drafted, with the target's last
                                      hidden states of context[:-1] [len(context) - 1, C] (AdaEAGLE plans the
                                      tree's depth from them; every other policy does nothing)
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
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from cost import CostCurve


class DraftLength(Protocol):
    gamma: int  # the most tokens a chain drafts this step

    def reset(self) -> None: ...

    def plan(self, context: list[int], features: Tensor) -> None: ...

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

    def plan(self, context: list[int], features: Tensor) -> None:
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
        self.accepted, self.rejected = 0.0, 0.0  # the forgotten counts of every step observed

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
    forgotten at `decay` per step). Steps where the policy chose to draft nothing forget too, so the estimate drifts
    back to the prior's mean and the policy tries drafting again; steps where the drafter had nothing to offer are
    not counted at all.

    The prior is optimistic and light, Beta(0.9, 0.1): mean 0.9, worth one observation. A policy that drafts
    nothing learns nothing, so a pessimistic prior can trap it at gamma 0 for a drafter that would pay (with
    Beta(3, 2), mean 0.6, an int8 self-draft of acceptance 0.82 never drafted on SmolLM2). With this prior the
    first step drafts, the measured rate takes over within a few steps (ten forgotten observations outweigh it
    ten to one), and after a run of zero-draft steps the estimate climbs back and the policy probes again.
    A new generation (reset) keeps the estimate: the rate is the drafter's on this target and this kind of text,
    not the prompt's, so only a new policy pays the prior's first long draft (SpecServe's per-row estimates, by
    contrast, start afresh with each batch: specserve.py). That first draft was about one wasted target call in
    each of Spec-Bench's 32-token QA answers at T 1 (prompt lookup, acceptance about 0.05): 0.986x autoregressive
    with an estimate per answer, 1.000x carried (one paired run of 10 questions, bench.py --repeats 3).
    Simulated over acceptance rates 0.2-0.95 and draft costs 0-0.8 on a CPU-shaped curve it keeps at least 0.85 of
    the best fixed gamma's expected speed (tests/test_cost.py), where Beta(3, 2) fell to 0.49.

    c, the drafter's cost per token over a one-token target call, is a constructor argument, measured once
    (cost.draft_cost: a draft model's one-token call over the target's; prompt lookup: 0). The protocol gives
    no timing, and timing inside the policy (wall time from reading gamma to update, less the curve's verify
    cost) would make each step's gamma depend on the machine's load at that moment: runs would no longer
    reproduce, and at temperature > 0 a different gamma draws different uniforms, hence a different sample for
    the same seed. With c and the curve fixed, the choices depend on the acceptance history alone, which spans
    the policy's earlier generations: where a sample depends on gamma (a draft model's drafts at T > 0, whose
    default is therefore fixed), a second prompt's sample depends on the first's.

    Trees (keep_growing): after level d, growing level d + 1 pays when its expected tokens per added cost beat
    the tree's so far. The expected tokens of a level are its frontier's path probability mass, as in Dynamic
    Depth Decoding (Brown et al. 2024), the next level's extrapolated by the last level's ratio; a level costs
    one more draft call (c) and len(frontier) more nodes in the tree call (the tree curve's ratio), counting a
    beam of nodes per level, about what EAGLE-2's final rerank keeps."""

    learns_across_generations = True  # its acceptance estimate (bench.py's --repeats restores it between runs)

    def __init__(
        self, curve: CostCurve, c: float, most: int = 16, prior: tuple[float, float] = (0.9, 0.1), decay: float = 0.9
    ):
        if c < 0 or most < 0 or not 0 <= decay < 1 or min(prior) <= 0:
            raise ValueError("need c >= 0, most >= 0, 0 <= decay < 1 and a prior with positive counts")
        self.curve, self.c, self.most, self.prior, self.decay = curve, c, most, prior, decay
        self.ratios = [curve.ratio(gamma + 1) for gamma in range(most + 1)]  # read every step: interpolated once
        self.estimate = AcceptanceEstimate(prior, decay)
        self.reset()

    def reset(self) -> None:
        # A new generation keeps the acceptance estimate (see the class docstring): the rate is the drafter's on
        # this target and this traffic, not the prompt's.
        self.levels: list[float] = []  # the tree being grown: each level's frontier mass
        self.nodes = 1
        self.gamma = self.best()

    @property
    def alpha(self) -> float:
        return self.estimate.alpha

    def speedup(self, gamma: int) -> float:
        """Expected tokens per unit of time (one-token target calls) at this gamma, with the current alpha."""
        return predicted_speedup(self.alpha, gamma, self.c, self.ratios[gamma])

    def best(self) -> int:
        return max(range(self.most + 1), key=self.speedup)  # ties: the shorter

    def update(self, drafted: int, accepted: int) -> None:
        # A step that drafted nothing though gamma > 0 was asked for (prompt lookup found no match) tells nothing
        # about acceptance, and is no step back from drafting either: the estimate is left as it was. Were it
        # forgotten, a chat answer's long stretches without a match would carry alpha back to the prior's 0.9, and
        # each rare match would be drafted long and rejected (seen on Spec-Bench's MT-bench questions).
        if drafted or not self.gamma:
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


# ---- Thompson: EESD's Thompson-sampling control -----------------------------------------------------------------

THOMPSON_STREAM = 0x5EED_7505  # XORed into --seed for the policy's own generator. The verifier's generator is seeded
# with --seed itself, and two generators seeded alike draw the same uniforms: the policy's "go on" draws could line up
# with the verifier's accept tests, and the length would then depend on them.


class Thompson(FixedLength):
    """EESD's Thompson-sampling control of the draft length, its Beta-TS (Liu et al. 2024, "Speculative Decoding via
    Early-exiting for Faster LLM Inference with Thompson Sampling Control Mechanism", ACL Findings; survey §9, the
    determination of the speculation length; the reading list files the paper under "Draft Models", for its early-exit
    drafter, here -d earlyexit). Whether the target accepts a drafted token is a Bernoulli(theta) trial,
    theta unknown and Beta(a, b) a posteriori. After each drafted token, theta is drawn from the posterior and then
    the trial: drafting goes on if it comes up "accepted", at most gamma tokens. After each verification the
    accepted drafts count as successes and a rejection, if there was one, as one failure (the drafts after it were
    never compared, as in CostAware's counts). High acceptance moves the posterior up and the drafts grow; rejections
    move it down and the drafts shrink. The prior is Beta(1, 1), uniform, by default.

    Where this departs from the paper, and why:
    - The decisions of a step read nothing of the draft, only the posterior, which changes only between steps. So
      they are all drawn when the step's gamma is set: L tokens are L - 1 "go on"s then a "stop", or gamma - 1
      "go on"s and the cap. That is the law of asking after each token (keep_drafting), and it also sizes
      drafters that have no distribution and never ask (prompt lookup).
    - Calibration-TS, the paper's variant that calibrates theta with the early exit's confidence, is not here
      (-l confidence, svip and disco read the draft's confidence).
    - The cap is --gamma, as for the other rules that stop drafting (confidence, svip, disco).
    - The posterior starts from the prior at every generation (reset), and the generator from its seed, so that
      every run reproduces on its own.
    Randomness comes from the policy's own torch.Generator, seeded from --seed (THOMPSON_STREAM), never from the
    sampling generator: the policy draws none of the uniforms that the drafter and the verifier draw. Lossless as
    every policy here: the length depends on past verifications and the policy's own draws, never on the accept
    tests of the step it sizes."""

    def __init__(self, gamma: int, prior: tuple[float, float] = (1.0, 1.0), seed: int = 0):
        if gamma < 1 or min(prior) <= 0:
            raise ValueError("need gamma >= 1 and a prior with positive counts")
        self.most, self.prior, self.seed = gamma, prior, seed
        self.generator = torch.Generator().manual_seed(seed ^ THOMPSON_STREAM)
        self.reset()

    def reset(self) -> None:
        self.generator.manual_seed(self.seed ^ THOMPSON_STREAM)
        self.accepted, self.rejected = 0, 0  # successes and failures since the generation started
        self.gamma = self.draw_length()

    @property
    def posterior(self) -> tuple[float, float]:
        """(a, b) of the Beta posterior of a draft's acceptance probability."""
        a, b = self.prior
        return a + self.accepted, b + self.rejected

    def draw_length(self) -> int:
        """1 + the "go on"s before the first "stop", at most gamma: a fresh theta ~ Beta(a, b) and a trial after each
        of the first gamma - 1 tokens (after the last, the cap stops). Always gamma - 1 pairs of draws, so the
        generator's state after a step does not depend on where drafting stopped."""
        n = self.most - 1
        a, b = self.posterior
        # Beta(a, b) is the first coordinate of Dirichlet(a, b), as torch.distributions.Beta samples it; this call
        # takes an explicit generator, torch.distributions' .sample() would draw from the global one.
        theta = torch._sample_dirichlet(
            torch.tensor([[a, b]], dtype=torch.float64).repeat(n, 1), generator=self.generator
        )
        go_on = torch.rand(n, dtype=torch.float64, generator=self.generator) < theta[:, 0]  # [n]
        stops = (~go_on).nonzero()
        return int(stops[0]) + 1 if len(stops) else self.most

    def update(self, drafted: int, accepted: int) -> None:
        self.accepted += accepted
        self.rejected += 1 if accepted < drafted else 0
        self.gamma = self.draw_length()


# ---- AdaEAGLE: the tree's depth, predicted before drafting -----------------------------------------------------


def ldlp_input(embed: nn.Embedding, context: list[int], features: Tensor) -> Tensor:
    """[2 C]: AdaEAGLE's LDLP input (§3.2), the target's embedding e and final-normed last hidden state f of the
    last token of the validated prefix. That is context[-2]: its f predicted the target's own token context[-1],
    the root of the next tree, which the target has not run yet. features [len(context) - 1, C], as the tree loop
    holds them."""
    e = embed(torch.tensor(context[-2], device=features.device))
    return torch.cat([e, features[-1]]).float()


def penalized_l1(predicted: Tensor, accepted: Tensor, penalty: float) -> Tensor:
    """AdaEAGLE's loss (Eq. 4): |k_pred - k|, times `penalty` (lambda > 1) where k_pred < k. A prediction short of
    the accepted length costs a whole extra target call, one too long only the draft's wasted levels; the minimiser
    is the penalty / (1 + penalty) quantile of the accepted length."""
    error = predicted - accepted
    return torch.where(error < 0, -penalty * error, error).mean()


class LengthPredictor(nn.Module):
    """AdaEAGLE's Lightweight Draft Length Predictor (LDLP): [e; f] [..., 2 C] -> a real-valued draft length.
    "A three-layer MLP with residual connections", the last hidden vector mapped to the scalar by a linear layer
    (Zhang et al. 2024, §3.2 and §4.1): the first layer maps 2 C to `width`, the next two add their SiLU output to
    their input. The inputs are standardised with the training set's mean and std, kept as buffers so that they are
    saved with the weights (as DiscoClassifier's)."""

    def __init__(self, hidden_size: int, width: int = 64):
        super().__init__()
        self.first = nn.Linear(2 * hidden_size, width)
        self.residual = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.out = nn.Linear(width, 1)
        self.register_buffer("mean", torch.zeros(2 * hidden_size))
        self.register_buffer("std", torch.ones(2 * hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        """x [..., 2 C] -> predicted accepted length [...]"""
        h = F.silu(self.first((x - self.mean) / self.std))
        for layer in self.residual:
            h = h + F.silu(layer(h))
        return self.out(h).squeeze(-1)

    def save(self, path: str | Path, most: int, penalty: float) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = {"hidden_size": len(self.mean) // 2, "width": self.first.out_features, "most": most, "penalty": penalty}
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, path / "model.safetensors")

    @classmethod
    def load(cls, path: str | Path) -> tuple["LengthPredictor", int]:
        """(predictor, the deepest length it was trained to predict: k_max of the traces of train.py adaeagle)."""
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        model = cls(cfg["hidden_size"], cfg["width"])
        model.load_state_dict(load_file(path / "model.safetensors"))
        return model.eval(), cfg["most"]


class AdaEagle(FixedLength):
    """AdaEAGLE (Zhang et al. 2024, "AdaEAGLE: Optimizing Speculative Decoding via Explicit Modeling of Adaptive
    Draft Structures"; survey §9, the speculation length; reading list "Draft Length Control"): before each draft,
    the Lightweight Draft Length Predictor reads the target's state and says how many tokens will be accepted, and
    the drafter drafts that many, k = min(k_max, max(1, Round(LDLP(e, f)))) (Eq. 3). Other policies stop drafting
    on what the draft outputs (DISCO, DDD, EAGLE-2's own scores); this one decides before the draft runs, from the
    target's last hidden state, so it needs no threshold. Trained by `train.py adaeagle` with the penalised L1 loss
    (penalized_l1) on the accepted lengths of full-depth drafts (DepthRecorder).

    Where this departs from the paper, and why:
      - The paper drafts chains (its Limitations leave trees for later work); here k is the depth of EAGLE-2's
        dynamic tree: it grows at most k levels (keep_growing). `-d eagle --tree-width 1` grows a chain, the
        paper's structure (a predictor for it would be trained on chains: train.py adaeagle --adaeagle-width 1).
      - Labels: the levels the target accepted of trees grown to the drafter's depth k_max, at the start of each
        step of a decoding run (DepthRecorder); the paper drafts k_max tokens from every position of the target's
        greedy output and takes their common prefix with it. Ours sees the positions the policy is asked at, and
        costs one decoding run per prompt instead of a draft per token.
      - k >= 1: a tree always grows its first level (the paper allows k = 0, no draft).
      - lambda is not reported in the paper; ours (2, in adaeagle/config.json) did best of 1, 1.5 and 2 in a
        simulation of tokens per unit of time over held-out prompts. The MLP's width (64) and SiLU are ours too.
      - Sizes and optimiser: the paper's LDLP sits on Vicuna-7B (C = 4096, width not given), trained on 68K
        ShareGPT dialogues for 5 epochs (lr 5e-5, cosine, batch 128); ours on the shipped 384-wide target and
        training-split code prompts (weights/README.md has the run). Inputs are standardised (our addition).
      - AdaEAGLE-DDD (the paper's best: grow while under k or while the draft is confident) is not implemented."""

    def __init__(self, predictor: LengthPredictor, embed: nn.Embedding, most: int):
        self.gamma, self.predictor, self.embed, self.most = most, predictor, embed, most
        self.depth = most  # the tree being drafted grows at most this many levels

    def reset(self) -> None:
        self.depth = self.most

    @torch.inference_mode()
    def plan(self, context: list[int], features: Tensor) -> None:
        if len(features) == 0:  # a one-token prompt: no hidden state yet (the drafter drafts nothing either)
            self.depth = self.most
            return
        predicted = float(self.predictor(ldlp_input(self.embed, context, features)))
        self.depth = min(self.most, max(1, math.floor(predicted + 0.5)))

    def keep_growing(self, frontier_logprobs: list[float], depth: int) -> bool:
        return depth < self.depth


class DepthRecorder(FixedLength):
    """Lets trees grow to the drafter's depth and records every step: the position (the context's length), the
    LDLP input planned on and how many levels the target accepted. AdaEAGLE's training data (train.py adaeagle):
    labels are the accepted lengths observed when drafting at full depth."""

    def __init__(self, embed: nn.Embedding):
        self.gamma, self.embed, self.steps, self.pending = 0, embed, [], None

    def plan(self, context: list[int], features: Tensor) -> None:
        self.pending = (len(context), ldlp_input(self.embed, context, features)) if len(features) else None

    def update(self, drafted: int, accepted: int) -> None:
        if self.pending is not None:
            self.steps.append((*self.pending, accepted))
        self.pending = None
