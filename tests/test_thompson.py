"""Tests for -l thompson (draft_length.Thompson, EESD's Beta-TS): the posterior counts what verification saw, the
drawn lengths follow the per-token rule (with a power check), high acceptance drafts longer and low acceptance
shorter, runs reproduce from the seed and the policy touches no other generator, greedy output stays identical to
autoregressive decoding on the shipped weights, and sampled output keeps the target's distribution."""

import numpy as np
import pytest
import table
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cli
import specdec
from draft_length import FixedLength, Thompson
from drafters import ModelDrafter, PromptLookupDrafter
from methods import UsageError
from specdec import generate, speculative_generate
from tests.toy import (
    BrokenRule,
    ScriptedDrafter,
    accept_every_draft,
    chi_square,
    chi_square_critical,
    exact_joint,
    perturbed,
    sample_speculative,
    toy_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_target():
    return toy_model(seed=2)


def toy_draft():
    return perturbed(toy_target(), seed=100, noise=0.2)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# 1. The rule: the posterior and the lengths drawn from it.

steps = st.lists(st.integers(0, 8).flatmap(lambda d: st.tuples(st.just(d), st.integers(0, d))), max_size=12)


@settings(deadline=None, max_examples=50)  # torch's first calls are slow; timing is not what this checks
@given(steps, st.integers(1, 8), st.floats(0.1, 5.0), st.floats(0.1, 5.0))
def test_the_posterior_counts_accepted_drafts_and_one_rejection_per_step(history, gamma, a, b):
    policy = Thompson(gamma, (a, b), seed=0)
    successes = failures = 0
    for drafted, accepted in history:
        policy.update(drafted, accepted)
        successes, failures = successes + accepted, failures + (accepted < drafted)  # drafts after a rejection: unseen
        assert policy.posterior == pytest.approx((a + successes, b + failures))
        assert 1 <= policy.gamma <= gamma
    policy.reset()
    assert policy.posterior == (a, b)  # every generation starts from the prior


class OneThetaPerStep(Thompson):
    """NOT the rule: one theta for the whole step, where the rule draws a fresh theta for each drafted token."""

    def draw_length(self) -> int:
        a, b = self.posterior
        theta = torch._sample_dirichlet(torch.tensor([a, b], dtype=torch.float64), generator=self.generator)[0]
        go_on = torch.rand(self.most - 1, dtype=torch.float64, generator=self.generator) < theta
        stops = (~go_on).nonzero()
        return int(stops[0]) + 1 if len(stops) else self.most


def length_chi_square(policy: Thompson, n: int) -> tuple[float, float]:
    """(statistic, critical value) of n lengths drawn at the policy's posterior against the rule's law: a fresh
    theta per token makes each "go on" a coin of the posterior mean m, so P(L = k) = m^(k-1) (1 - m) below the
    cap and P(L = gamma) = m^(gamma-1)."""
    a, b = policy.posterior
    m, most = a / (a + b), policy.most
    law = np.array([m ** (k - 1) * (1 - m) for k in range(1, most)] + [m ** (most - 1)])
    lengths = np.array([policy.draw_length() - 1 for _ in range(n)])
    stat, dof = chi_square(lengths[:, None], law)
    return stat, chi_square_critical(dof)


def test_drawn_lengths_follow_a_fresh_theta_per_token_and_a_single_theta_per_step_does_not():
    for policy in (Thompson(6, (3.0, 2.0), seed=1), Thompson(6, (1.0, 1.0), seed=2)):
        stat, critical = length_chi_square(policy, 4000)
        assert stat < critical, f"chi2 {stat:.1f} >= {critical:.1f} at the posterior {policy.posterior}"
    stat, critical = length_chi_square(OneThetaPerStep(6, (3.0, 2.0), seed=1), 4000)
    assert stat > critical, f"one theta per step not detected: chi2 {stat:.1f} <= {critical:.1f}"


def test_full_accepts_lengthen_the_drafts_and_rejections_shorten_them():
    full, none = Thompson(8, seed=0), Thompson(8, seed=0)
    long, short = [], []
    for _ in range(40):
        full.update(full.gamma, full.gamma)
        none.update(none.gamma, 0)
        long.append(full.gamma)
        short.append(none.gamma)
    assert np.mean(long[-20:]) > 7 and np.mean(short[-20:]) < 1.2
    assert full.posterior[0] / sum(full.posterior) > 0.95 > 0.05 > none.posterior[0] / sum(none.posterior)


def test_in_the_loop_a_drafter_that_is_always_right_gets_longer_drafts_than_one_that_is_always_wrong():
    target, most = toy_target(), 6
    V = target.config.vocab_size

    def right(step, context):  # the target's greedy continuation
        return generate(target, context, min(most, target.config.max_position_embeddings - len(context)))

    def wrong(step, context):  # a first token the target does not pick
        return [(right(step, context)[0] + 1) % V] * most

    per_call = {}
    for name, script in (("right", right), ("wrong", wrong)):
        policy = Thompson(most, seed=0)
        out, stats = speculative_generate(target, ScriptedDrafter(script), [1], 14, draft_length=policy)
        assert out == generate(target, [1], 14)
        per_call[name] = stats.drafted / stats.target_calls
        accepted_all = name == "right"
        assert (stats.accepted == stats.drafted) == accepted_all and (stats.accepted == 0) != accepted_all
        rejections = 0 if accepted_all else stats.compared  # one compared draft per step, rejected (none at the end)
        assert policy.posterior == (1 + stats.accepted, 1 + rejections)
    assert per_call["right"] > 2 * per_call["wrong"], per_call


# ---------------------------------------------------------------------------------------------------------------
# 2. Randomness: the policy's own generator, seeded from --seed.


class Replay(FixedLength):
    """Drafts the lengths it is given, one per step, then fixed."""

    def __init__(self, lengths: list[int]):
        self.lengths, self.gamma = lengths, lengths[0]

    def reset(self):
        self.step, self.gamma = 0, self.lengths[0]

    def update(self, drafted, accepted):
        self.step += 1
        self.gamma = self.lengths[min(self.step, len(self.lengths) - 1)]


class Logged(Thompson):
    """Thompson, logging the gamma of every step."""

    def reset(self):
        super().reset()
        self.log = [self.gamma]

    def update(self, drafted, accepted):
        super().update(drafted, accepted)
        self.log.append(self.gamma)


def sampled(policy, target=None, draft=None, n: int = 12):
    """A sampled run (T = 1, sampling generator seeded 5) on the toy models under `policy`."""
    target, draft = target or toy_target(), draft or toy_draft()
    return speculative_generate(
        target, ModelDrafter(draft), [1], n, temperature=1.0, generator=seeded(5), draft_length=policy
    )


def test_same_seed_same_run_and_the_policy_draws_nothing_from_the_global_or_the_sampling_generator():
    target, draft = toy_target(), toy_draft()  # before the global state is read: toy_model seeds it
    global_state = torch.get_rng_state()
    policy = Logged(4, seed=7)
    (out, stats), (again, stats_again) = sampled(policy, target, draft), sampled(policy, target, draft)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert out == again and stats.accept_counts == stats_again.accept_counts  # one object twice: reset restarts it
    assert stats.drafted == stats_again.drafted
    # The run depends on the policy only through its lengths: replaying them gives the same sample, so the policy
    # took no uniform of the drafter's and the verifier's generator.
    replayed, replay_stats = sampled(Replay(policy.log), target, draft)
    assert replayed == out and replay_stats.accept_counts == stats.accept_counts


def test_another_seed_draws_other_lengths():
    logs = []
    for seed in (7, 8):
        policy = Logged(6, seed=seed)
        sampled(policy, n=14)
        logs.append(policy.log)
    assert logs[0] != logs[1]


def test_the_cli_hands_the_run_seed_to_the_policy_and_checks_its_prior(capsys):
    policy = table.draft_length("thompson", toy_target(), seed=11, thompson_prior=[2.0, 3.0], gamma=5)
    assert (policy.seed, policy.prior, policy.most) == (11, (2.0, 3.0), 5)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["-p", "x", "-l", "thompson", "--thompson-prior", "0", "1"])
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(UsageError, match="--thompson-prior is an option of -l thompson"):
        cli.choose(*cli.parse_args(["-p", "x", "-l", "fixed", "--thompson-prior", "2", "1"]))


# ---------------------------------------------------------------------------------------------------------------
# 3. Lossless: greedy identity on the shipped weights, the target's law when sampling.


@pytest.mark.parametrize("name", ["earlyexit", "draft", "pld"])
def test_greedy_output_on_the_shipped_weights_is_identical_to_autoregressive(short_references, name):
    enc, target, references = short_references
    drafter, policy = table.drafter(name, target), table.draft_length("thompson", target, gamma=6)

    def decode(prompt, length):
        return specdec.decode(
            target, drafter, False, prompt, 24, 6, draft_length=length, temperature=0, eot=enc.eot_token
        )

    runs = [decode(prompt, policy) for prompt, _ in references]
    assert [out for out, _ in runs] == [expected for _, expected in references]
    assert runs[0][1].drafted != decode(references[0][0], FixedLength(6))[1].drafted  # the policy acted


N_TRUE, N_BROKEN, SEEDS = 1500, 600, 3  # samples; each policy seed takes its share


def thompson_chi_square(kind: str, n_samples: int, **opts) -> tuple[float, float, int]:
    """(statistic, critical value, dof) of 3-token continuations at T = 1 under -l thompson (at most 3 drafts)
    against the target's exact joint, the samples split over SEEDS policy seeds (each run of one policy starts
    from the same draws, so one seed would size the first step alike in every sample)."""
    target = toy_target()
    drafter, prompt = (ModelDrafter(toy_draft()), [1]) if kind == "model" else (PromptLookupDrafter(), [0, 4, 4, 0])
    samples = np.concatenate(
        [
            sample_speculative(
                target, drafter, prompt, 3, n_samples // SEEDS, seed, eot=None, temperature=1.0,
                draft_length=Thompson(3, seed=seed), **opts,
            )[0]
            for seed in range(SEEDS)
        ]
    )  # fmt: skip
    stat, dof = chi_square(samples, exact_joint(target, prompt, 3, temperature=1.0))
    return stat, chi_square_critical(dof), dof


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "pld"])
def test_sampled_output_under_thompson_has_the_target_distribution(kind):
    stat, critical, dof = thompson_chi_square(kind, N_TRUE)
    assert stat < critical, f"chi2 = {stat:.1f} >= {critical:.1f} (dof {dof})"


@pytest.mark.slow
def test_the_same_law_test_under_thompson_rejects_a_verifier_that_accepts_every_draft():
    stat, critical, dof = thompson_chi_square("model", N_BROKEN, verifier=BrokenRule(chain_fn=accept_every_draft))
    assert stat > critical, f"broken verifier not detected: chi2 = {stat:.1f} <= {critical:.1f} (dof {dof})"
