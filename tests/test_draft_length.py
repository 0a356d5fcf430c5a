"""Tests for draft_length.py: each policy follows its published rule, the drafters and loops consult it where they
should, every policy keeps greedy output identical to autoregressive decoding (draft length never changes what is
verified, only how much), and thresholds that never trigger give exactly the fixed-gamma run."""

import math
from pathlib import Path

import pytest
import table
import torch

import specdec
from draft_length import (
    SVIP,
    Confidence,
    Disco,
    DiscoClassifier,
    DynamicDepth,
    FixedLength,
    Heuristic,
    Recorder,
    best_gamma,
    disco_features,
    entropy,
    predicted_speedup,
)
from drafters import ModelDrafter
from specdec import generate, speculative_generate, tree_speculative_generate, warp_for
from tests.toy import perturbed, toy_model

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def toy_target():
    return toy_model(seed=2)


def toy_draft():
    return perturbed(toy_target(), seed=100, noise=0.2)


def logits_with_top(prob: float, vocab: int = 6) -> torch.Tensor:
    """Logits whose softmax puts `prob` on token 0 and spreads the rest evenly."""
    rest = (1 - prob) / (vocab - 1)
    return torch.tensor([prob] + [rest] * (vocab - 1)).log()


# ---------------------------------------------------------------------------------------------------------------
# 1. Each policy's rule.


def test_heuristic_adds_two_after_a_full_accept_and_takes_one_otherwise():
    h = Heuristic(4)
    h.reset()
    seen = []
    for drafted, accepted in [(4, 4), (6, 6), (8, 3), (7, 0), (0, 0), (6, 6)]:
        h.update(drafted, accepted)
        seen.append(h.gamma)
    assert seen == [6, 8, 7, 6, 6, 8]  # nothing drafted (no match, the budget): unchanged
    for _ in range(20):
        h.update(1, 0)
    assert h.gamma == 1  # never below one
    h.reset()
    assert h.gamma == 4  # every generation starts afresh


def test_confidence_stops_after_a_token_whose_top_probability_is_below_the_threshold():
    policy = Confidence(8, threshold=0.4)
    assert policy.keep_drafting(logits_with_top(0.45), 0)
    assert not policy.keep_drafting(logits_with_top(0.35), 0)


def test_svip_stops_when_sqrt_c_entropy_exceeds_the_threshold():
    policy = SVIP(8, threshold=0.3, c=0.15)  # the stop is at H > 0.3^2 / 0.15 = 0.6 nats
    uniform = lambda k: torch.tensor([0.0] * k + [-1e9] * (6 - k))  # noqa: E731, H = ln k
    assert entropy(uniform(2)) == pytest.approx(math.log(2), abs=1e-5)
    assert policy.keep_drafting(uniform(1), 3)  # H = 0
    assert not policy.keep_drafting(uniform(2), 3)  # H = 0.69 > 0.6
    assert SVIP(8, threshold=0.33).keep_drafting(uniform(2), 3)  # 0.33^2 / 0.15 = 0.726 > 0.69


def test_dynamic_depth_stops_when_the_frontier_mass_falls_below_the_threshold():
    policy = DynamicDepth(threshold=0.1)
    assert policy.keep_growing([math.log(0.06), math.log(0.05)], 2)
    assert not policy.keep_growing([math.log(0.05), math.log(0.04)], 2)
    assert policy.keep_drafting(logits_with_top(0.01), 0)  # chains are left alone


def test_recorder_labels_only_the_compared_drafts():
    recorder = Recorder(4)
    for drafted, accepted in [(4, 2), (4, 4), (3, 0)]:
        for i in range(drafted):
            assert recorder.keep_drafting(logits_with_top(0.5 + 0.1 * i), i)
        recorder.update(drafted, accepted)
    features, labels = recorder.labelled()
    assert labels.tolist() == [1, 1, 0] + [1, 1, 1, 1] + [0]
    assert features.shape == (8, 12) and features[:, -1].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]  # the index


def test_disco_features_and_classifier_round_trip(tmp_path):
    f = disco_features(logits_with_top(0.5), 3)
    assert f.shape == (12,) and f[0] == pytest.approx(0.5) and f[-1] == 3
    assert f[-2] == pytest.approx(entropy(logits_with_top(0.5)))
    clf = DiscoClassifier(8)
    clf.mean.fill_(0.5)
    clf.save(tmp_path, threshold=0.3)
    loaded, threshold = DiscoClassifier.load(tmp_path)
    assert threshold == 0.3 and torch.allclose(loaded(f), clf(f))


# ---------------------------------------------------------------------------------------------------------------
# 2. Drafters and loops consult the policy.


class StopAt(FixedLength):
    """Says stop after token `at`; records every (i) it was asked about."""

    def __init__(self, gamma, at):
        self.gamma, self.at, self.asked = gamma, at, []

    def keep_drafting(self, draft_logits, i):
        self.asked.append(i)
        return i != self.at


@pytest.mark.parametrize("at", [0, 2, 99])
def test_model_drafter_asks_after_every_token_and_stops_where_told(at):
    drafter, policy = ModelDrafter(toy_draft()), StopAt(5, at)
    drafter.reset()
    with torch.inference_mode():
        tokens, q = drafter.propose([1, 2, 3], 5, warp_for(0, 0, 1.0), None, policy.keep_drafting)
    assert len(tokens) == len(q) == min(at + 1, 5)  # stopping keeps the token it was asked about
    assert policy.asked == list(range(len(tokens)))  # the last token too: DISCO's traces need its features


class GammaLog(FixedLength):
    """gamma 1, 2, 3, ...: one more every step; logs (gamma, drafted, accepted) of every step."""

    def __init__(self):
        self.gamma, self.log = 1, []

    def update(self, drafted, accepted):
        self.log.append((self.gamma, drafted, accepted))
        self.gamma += 1


def test_the_chain_loop_drafts_what_the_policy_asks_and_reports_every_step():
    target, prompt, policy = toy_target(), [1, 2, 3], GammaLog()
    out, stats = speculative_generate(target, ModelDrafter(toy_draft()), prompt, 14, draft_length=policy)
    assert out == generate(target, prompt, 14)
    assert [g for g, _, _ in policy.log] == list(range(1, stats.target_calls + 1))  # told once per step
    assert all(d <= g for g, d, _ in policy.log)  # never more than the policy asked for
    assert sum(d for _, d, _ in policy.log) == stats.drafted and sum(a for _, _, a in policy.log) == stats.accepted


# ---------------------------------------------------------------------------------------------------------------
# 3. Lossless under every policy, and the exact end of every threshold.


def toy_policies():
    clf = DiscoClassifier(4)
    return {
        "heuristic": Heuristic(2),
        "confidence": Confidence(6, 0.8),
        "svip": SVIP(6, 0.2),
        "disco": Disco(6, clf, 0.5),
    }


@pytest.mark.parametrize("name", toy_policies())
@pytest.mark.parametrize("prompt", [[1], [1, 2, 3], [5, 0, 5, 0]])
def test_every_policy_keeps_greedy_output_identical_to_autoregressive(name, prompt):
    target = toy_target()
    out, stats = speculative_generate(target, ModelDrafter(toy_draft()), prompt, 12, draft_length=toy_policies()[name])
    assert out == generate(target, prompt, 12)
    assert stats.produced == len(out) == 12


NEVER = {
    "confidence 0": lambda g: Confidence(g, 0.0),
    "svip inf": lambda g: SVIP(g, math.inf),
    "disco 0": lambda g: Disco(g, DiscoClassifier(4), 0.0),
}


@pytest.mark.parametrize("name", NEVER)
def test_a_threshold_that_never_triggers_drafts_exactly_the_fixed_gamma(name):
    target, prompt = toy_target(), [1, 2, 3]
    runs = [
        speculative_generate(
            target,
            ModelDrafter(toy_draft()),
            prompt,
            12,
            temperature=1.0,
            generator=torch.Generator().manual_seed(5),
            draft_length=policy,
        )
        for policy in (FixedLength(3), NEVER[name](3))
    ]
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].accept_counts == runs[1][1].accept_counts and runs[0][1].drafted == runs[1][1].drafted


# ---------------------------------------------------------------------------------------------------------------
# 4. On the shipped weights: every chain policy with the draft model, Dynamic Depth Decoding with EAGLE-2.


def decode_all(target, enc, references, name, use_tree, length) -> int:
    """Greedy-decodes every reference prompt; asserts each output equals autoregressive decoding; returns the
    total number of drafted tokens."""
    drafter = table.drafter(name, target)
    drafted = 0
    for prompt, expected in references:
        out, stats = specdec.decode(
            target, drafter, use_tree, prompt, 24, 6, draft_length=length, temperature=0, eot=enc.eot_token
        )
        assert out == expected
        drafted += stats.drafted
    return drafted


@pytest.mark.parametrize("policy", ["heuristic", "confidence", "svip", "disco", "dynamic"])
def test_policies_on_the_shipped_weights_keep_greedy_output_identical(short_references, policy):
    enc, target, references = short_references
    use_tree = policy == "dynamic"
    name = "eagle" if use_tree else "draft"
    length = table.draft_length(policy, target, gamma=6, ddd_threshold=0.3)
    drafted = decode_all(target, enc, references, name, use_tree, length)
    assert drafted != decode_all(target, enc, references, name, use_tree, FixedLength(6))  # the policy acted


def test_dynamic_depth_cuts_eagle_trees_short(short_references):
    enc, target, references = short_references
    drafter = table.drafter("eagle", target)
    depths = {}
    for threshold in (0.0, 1.01):  # never stops; always stops after the first level
        trees = []
        tree_speculative_generate(
            target,
            drafter,
            references[0][0],
            8,
            draft_length=DynamicDepth(threshold),
            on_tree=lambda tree, path: trees.append(tree),
        )
        depths[threshold] = max(len(t) for t in trees)
    assert depths[1.01] <= 3 < depths[0.0]  # one level of width 2, plus the root


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("gamma", [1, 4, 7])
def test_predicted_speedup_is_expected_tokens_per_step_over_the_step_cost(alpha, gamma):
    """Leviathan et al.'s model, by enumeration: n drafts accepted with probability alpha^n (1 - alpha) for n < gamma
    and alpha^gamma for n = gamma, each step emitting n + 1 tokens for gamma draft tokens and one verify call."""
    p = [alpha**n * (1 - alpha) for n in range(gamma)] + [alpha**gamma]
    tokens = sum((n + 1) * p_n for n, p_n in enumerate(p))
    for c, v in ((0.1, 1.0), (0.3, 1.7)):
        assert math.isclose(predicted_speedup(alpha, gamma, c, v), tokens / (gamma * c + v))


def test_best_gamma_drafts_nothing_where_drafting_cannot_pay_and_more_as_it_gets_cheaper():
    assert best_gamma(0.1, c=0.5, v=1.5) == 0  # rare acceptance, costly drafts and calls
    assert best_gamma(0.9, c=0.01, v=1.0, most=16) == 16  # nearly free drafts, nearly always accepted
    picks = [best_gamma(0.8, c, v=1.2) for c in (0.4, 0.2, 0.05)]
    assert picks == sorted(picks) and picks[0] < picks[-1]
