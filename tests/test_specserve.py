"""Tests for specserve.py and the batched cost curve (cost.BatchCostCurve): the curve interpolates in both sizes
and is cached per machine; SpecServe drafts nothing where its cost model says speculation cannot pay, long drafts
where it pays, nothing once the batch is busy, follows each row's acceptance, and keeps up with the better of
autoregressive and fixed-gamma decoding in simulation; in the batched loop any per-row lengths keep every row's
greedy output equal to decoding it alone, and sampled rows keep the target's law. No test asserts a timing: the
decisions are tested on hand-made curves."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bench
import cost
import specserve
from batched import BatchModelDrafter, BatchPromptLookup, batch_speculative_generate
from cost import BatchCostCurve, cached_batch_cost_curve, measure_batch_cost_curve
from methods import UsageError, load_model
from specdec import generate
from specserve import SpecServe, StepCost, measure_drafter_cost_curve, measured_step_cost
from tests.conftest import WEIGHTS
from tests.test_batched import PROMPTS, toy_pair
from tests.toy import BrokenRule, accept_every_draft, chi_square, chi_square_critical, exact_joint, perturbed, toy_model

pytestmark = pytest.mark.usefixtures("one_thread")

BATCHES, SIZES = [1, 4, 16, 32], [1, 2, 3, 5, 9]


def curve_of(ms) -> BatchCostCurve:
    """A made-up batched curve: a call of B rows of T tokens costs ms(B, T)."""
    return BatchCostCurve(BATCHES, SIZES, [[float(ms(B, T)) for T in SIZES] for B in BATCHES])


FLAT = curve_of(lambda B, T: 10)  # any call costs the same: Leviathan et al.'s assumption, at every batch size
LINEAR = curve_of(lambda B, T: 10 * B * T)  # every token costs its share: drafts cannot pay, even free ones
# Idle at batch 1 (a call of 9 tokens costs 1.2 of one), busy at 32 (each token costs nearly its share)
BUSY = curve_of(lambda B, T: 10 * (1 + (T - 1) * B / 40) * (1 + B / 4))
# The shape measured on 2 CPU cores with the shipped target (ms): cheap drafts at batch 1, dear ones at 32
CPU = BatchCostCurve(
    BATCHES,
    SIZES,
    [
        [36.6, 40.9, 44.0, 49.7, 56.7],
        [56.3, 56.4, 73.6, 75.9, 111.9],
        [87.8, 106.5, 133.7, 177.4, 246.5],
        [99.4, 149.4, 197.8, 307.4, 466.2],
    ],
)


def estimates_at(policy: SpecServe, rows: int, accepted_of: tuple[int, int]) -> SpecServe:
    """`policy` reset for `rows` rows, each having seen many steps that accepted `accepted` of `drafted` drafts."""
    policy.reset(rows)
    accepted, drafted = accepted_of
    for _ in range(100):
        policy.update([drafted] * rows, [accepted] * rows)
    return policy


# ---------------------------------------------------------------------------------------------------------------
# 1. The batched curve.


def test_the_batched_curve_interpolates_in_both_sizes():
    c = BatchCostCurve([1, 4], [1, 3], [[10.0, 14.0], [22.0, 30.0]])
    assert c.ms(1, 1) == 10.0 and c.ms(4, 3) == 30.0
    assert c.ms(1, 2) == pytest.approx(12.0) and c.ms(2, 1) == pytest.approx(14.0)  # along each size
    assert c.ms(2, 2) == pytest.approx(12.0 + (26.0 - 12.0) / 3)  # both: tokens first, then rows
    assert c.ms(8, 1) == pytest.approx(38.0) and c.ms(1, 5) == pytest.approx(18.0)  # past the last: last slope
    assert c.ms(0, 0) == 10.0  # below the first: the first


def test_measure_times_every_batch_and_size_of_a_ragged_call():
    toy = toy_model(0, vocab_size=16, max_len=64, layers=2)
    c = measure_batch_cost_curve(toy, batches=(3,), sizes=(4,), prefix=20, repeats=1)
    assert c.batches == [1, 3] and c.sizes == [1, 4]  # a one-row one-token call is always measured
    assert len(c.grid_ms) == 2 and all(len(row) == 2 and min(row) > 0 for row in c.grid_ms) and c.spread >= 0


def test_the_drafter_curve_times_each_batch_and_gamma_and_leaves_the_drafter_usable():
    target = toy_model(2, max_len=64)
    drafter = BatchModelDrafter(perturbed(target, seed=100, noise=0.2))
    between = []  # the loop's target call after each proposal
    c = measure_drafter_cost_curve(drafter, batches=(2,), gammas=(3,), prefix=4, repeats=1, between=between.append)
    assert c.batches == [1, 2] and c.sizes == [1, 3] and min(min(row) for row in c.grid_ms) > 0
    assert sorted(set(between)) == [1, 2] and len(between) == 2 * 2 * 2  # batches x gammas x (1 + repeats)
    out, _ = batch_speculative_generate(target, drafter, PROMPTS, 6, gamma=3)
    assert out == [generate(target, p, 6) for p in PROMPTS]


def test_the_batched_curve_is_cached_per_machine_and_measured_again_when_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(
        cost, "measure_batch_cost_curve", lambda *a: calls.append(a) or curve_of(lambda B, T: len(calls))
    )
    toy = toy_model(0, vocab_size=16, max_len=64)
    first = cached_batch_cost_curve(toy)
    assert cached_batch_cost_curve(toy) == first and len(calls) == 1  # read back, not measured
    assert len(list(cost.cache_dir().glob("batch-cost-*.json"))) == 1 and not list(cost.cache_dir().glob("cost-*"))
    cached_batch_cost_curve(toy, batches=(8,))  # other batch sizes: another curve
    assert len(calls) == 2 and cached_batch_cost_curve(toy, refresh=True) != first and len(calls) == 3


def test_the_step_cost_is_measured_once_per_machine_for_the_target_and_the_drafter(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = []
    monkeypatch.setattr(cost, "measure_batch_cost_curve", lambda *a: measured.append("target") or FLAT)
    monkeypatch.setattr(specserve, "measure_drafter_cost_curve", lambda *a, **k: measured.append("drafter") or BUSY)
    target, draft = toy_pair()
    assert measured_step_cost(target, BatchModelDrafter(draft)) == StepCost(FLAT, BUSY)
    assert measured_step_cost(target, BatchModelDrafter(draft)) == StepCost(FLAT, BUSY)
    assert measured_step_cost(target) == StepCost(FLAT) and measured == ["target", "drafter"]  # then read back


# ---------------------------------------------------------------------------------------------------------------
# 2. The choice, on hand-made curves.


def test_it_drafts_nothing_where_the_cost_model_says_speculation_cannot_pay():
    policy = SpecServe(StepCost(LINEAR))
    for rows in (1, 4, 32):
        policy.reset(rows)  # at the optimistic prior
        assert policy.gamma([20] * rows) == 0 and policy.keep([3] * rows, 3) == [0] * rows
        policy = estimates_at(policy, rows, (8, 8))  # every draft accepted: still a draft costs what it brings
        assert policy.gamma([20] * rows) == 0
    draft_as_dear_as_target = StepCost(FLAT, curve_of(lambda B, T: 10 * T))
    assert estimates_at(SpecServe(draft_as_dear_as_target), 4, (1, 4)).gamma([20] * 4) == 0


def test_it_drafts_long_where_speculation_pays_and_verifies_what_each_row_has():
    policy = SpecServe(StepCost(FLAT))
    assert policy.most == 8  # the longest chain the curve measured: 9 tokens a row
    policy.reset(4)
    assert policy.gamma([20, 20, 3, 0]) == 8 and policy.gamma([3, 2, 0, 0]) == 3  # no longer than a row can use
    assert policy.keep([8, 3, 0, 5], 8) == [8, 3, 0, 5]  # a call costs the same: every draft is worth verifying
    assert estimates_at(policy, 4, (7, 8)).gamma([20] * 4) == 8


def test_a_busy_batch_drafts_nothing_where_a_small_one_drafts_long():
    policy = SpecServe(StepCost(BUSY))
    chosen = {rows: estimates_at(policy, rows, (1, 2)).gamma([20] * rows) for rows in BATCHES}  # alpha 0.5
    assert chosen[1] >= 4 and chosen[32] == 0
    assert chosen[1] >= chosen[4] >= chosen[16] >= chosen[32]


def test_drafts_found_for_too_few_rows_are_not_verified_where_they_would_lengthen_everyone_s_call():
    policy = SpecServe(StepCost(BUSY))
    policy.reset(16)  # the prior, alpha 0.9: drafting pays if every row drafts ...
    gamma = policy.gamma([20] * 16)
    assert gamma > 0 and policy.keep([gamma] * 16, gamma) == [gamma] * 16
    assert policy.keep([gamma] + [0] * 15, gamma) == [0] * 16  # ... not if prompt lookup found drafts for one row
    assert 0 < max(policy.keep([gamma] * 8 + [0] * 8, gamma)) <= gamma


def test_each_row_keeps_its_own_estimate_and_takes_it_along_when_others_leave():
    shared = curve_of(lambda B, T: 10 * (1 + (T - 1) * B / 8))  # a row's extra token costs B/8 of a call
    policy = SpecServe(StepCost(shared))
    policy.reset(4)
    for _ in range(30):
        policy.update([4, 4, 4, 4], [4, 0, 4, 0])  # rows 0 and 2 accept everything, 1 and 3 nothing
    alphas = [row.alpha for row in policy.rows]
    assert alphas[0] > 0.95 and alphas[1] < 0.1 and alphas[0] == alphas[2] and alphas[1] == alphas[3]
    all_four = policy.gamma([20] * 4)
    policy.keep_rows([0, 2])  # the poor rows finished
    assert [row.alpha for row in policy.rows] == [alphas[0], alphas[2]]
    assert policy.gamma([20, 20]) == 8 and all_four < 2  # two good rows alone draft long
    policy.keep_rows([])
    policy.reset(3)
    assert [row.alpha for row in policy.rows] == [pytest.approx(0.9)] * 3  # a new generation: the prior again


def simulated_speed(B: int, alpha: float, step: StepCost, gamma_of, seed: int, steps: int = 150) -> float:
    """Tokens per ms of B rows decoding together where each draft is accepted with probability alpha, i.i.d. (the
    model of Leviathan et al. 2023, Thm 3.8), each step's gamma from gamma_of(drafted, accepted) (the last step's
    per-row counts), every row verifying all of its gamma drafts (a draft model's)."""
    rng, tokens, ms, drafted, accepted = torch.Generator().manual_seed(seed), 0, 0.0, [0] * B, [0] * B
    for _ in range(steps):
        gamma = gamma_of(drafted, accepted)
        passed = (torch.rand(B, gamma + 1, generator=rng) < alpha).tolist()
        drafted, accepted = [gamma] * B, [(row[:gamma] + [False]).index(False) for row in passed]
        tokens, ms = tokens + sum(accepted) + B, ms + step.ms(B, gamma, gamma)
    return tokens / ms


def specserve_speed(B: int, alpha: float, step: StepCost, seed: int) -> float:
    policy = SpecServe(step)
    policy.reset(B)

    def gamma(drafted, accepted):
        policy.update(drafted, accepted)
        return policy.gamma([1000] * B)

    return simulated_speed(B, alpha, step, gamma, seed)


def test_in_simulation_it_keeps_up_with_the_better_of_autoregressive_and_fixed_gamma_at_every_batch_size():
    step = StepCost(CPU, curve_of(lambda B, T: 1.0 + 0.3 * B * T))  # a draft model's proposals, CPU-shaped too
    worst = 1.0
    for B in BATCHES:
        for alpha in (0.3, 0.6, 0.8, 0.95):
            fixed = [simulated_speed(B, alpha, step, lambda d, a, g=g: g, 0) for g in (0, 4)]
            worst = min(worst, sum(specserve_speed(B, alpha, step, s) for s in range(2)) / 2 / max(fixed))
    assert worst > 0.9


# ---------------------------------------------------------------------------------------------------------------
# 3. In the batched loop: lossless whatever the lengths.


class ScriptedRows:
    """Lengths from a script: each step's list of per-row lengths (cycled over steps, and over rows by their
    original index); the drafter drafts the longest, each row verifies its own, within what it has."""

    def __init__(self, script: list[list[int]]):
        self.script, self.steps = script, 0

    def reset(self, rows):
        self.rows = list(range(rows))

    def lengths(self) -> list[int]:
        step = self.script[self.steps % len(self.script)]
        return [step[r % len(step)] for r in self.rows]

    def gamma(self, caps):
        return max(self.lengths())

    def keep(self, drafted, gamma):
        return [min(n, d) for n, d in zip(self.lengths(), drafted)]

    def update(self, drafted, accepted):
        self.steps += 1

    def keep_rows(self, rows):
        self.rows = [self.rows[i] for i in rows]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=3), min_size=1, max_size=4), st.booleans())
def test_any_per_row_lengths_keep_every_row_equal_to_decoding_it_alone(script, model_drafts):
    target, draft = toy_pair()
    drafter = BatchModelDrafter(draft) if model_drafts else BatchPromptLookup()
    out, stats = batch_speculative_generate(target, drafter, PROMPTS, 8, lengths=ScriptedRows(script))
    assert out == [generate(target, p, 8) for p in PROMPTS]


def test_where_nothing_pays_every_step_is_a_plain_batched_decoding_call():
    target, draft = toy_pair()
    drafter, gammas = BatchModelDrafter(draft), []
    propose = drafter.propose
    drafter.propose = lambda contexts, gamma, *a: gammas.append(gamma) or propose(contexts, gamma, *a)
    out, stats = batch_speculative_generate(target, drafter, PROMPTS, 8, lengths=SpecServe(StepCost(LINEAR)))
    assert out == [generate(target, p, 8) for p in PROMPTS]
    assert stats.drafted == 0 and set(gammas) == {0} and stats.produced == stats.target_calls == 8 * len(PROMPTS)


@pytest.mark.parametrize("kind", ["draft", "pld"])
def test_every_row_equals_decoding_it_alone_on_the_shipped_weights_as_the_lengths_move(short_references, kind):
    enc, target, references = short_references
    prompts, expected = [p for p, _ in references], [out for _, out in references]  # 4 of 96 tokens, 1 short
    if kind == "draft":
        draft = load_model(WEIGHTS / "draft", "cpu", torch.float32)
        drafter, step = BatchModelDrafter(draft), StepCost(CPU, curve_of(lambda B, T: 2.0 * T))
    else:
        drafter, step = BatchPromptLookup(), StepCost(CPU)
    policy, verified = SpecServe(step), []
    keep = policy.keep
    policy.keep = lambda drafted, gamma: verified.append(keep(drafted, gamma)) or verified[-1]
    out, stats = batch_speculative_generate(target, drafter, prompts, 24, eot=enc.eot_token, lengths=policy)
    assert out == expected
    assert len({max(lengths) for lengths in verified}) > 1 and stats.drafted > 0  # the lengths moved


# ---------------------------------------------------------------------------------------------------------------
# 4. Sampling: each row keeps the target's law, and the same test rejects a broken verifier.


def specserve_law(n_calls: int, verifier=None) -> list[tuple[float, float]]:
    """(chi2, critical) per row: n_calls batches of 4-token continuations at T = 1 of ragged rows of draft-model
    chains, each row's samples against its own exact joint. The lengths turn on the accept tests before them: on
    this curve SpecServe drafts 2 at the prior, then 1 or 0 for the rows left as their acceptance says."""
    target, draft = toy_pair()
    step = StepCost(curve_of(lambda B, T: 10 * (1 + 0.47 * (T - 1))))
    generator, samples = torch.Generator().manual_seed(0), [[] for _ in PROMPTS]
    for _ in range(n_calls):
        lengths = SpecServe(step, most=2)
        out, _ = batch_speculative_generate(
            target,
            BatchModelDrafter(draft),
            PROMPTS,
            4,
            temperature=1.0,
            generator=generator,
            lengths=lengths,
            verifier=verifier,
        )
        for row, tokens in zip(samples, out):
            row.append(tokens)
    return [
        (stat, chi_square_critical(dof))
        for stat, dof in (
            chi_square(np.array(s), exact_joint(target, p, 4, temperature=1.0)) for p, s in zip(PROMPTS, samples)
        )
    ]


@pytest.mark.slow
def test_each_row_of_a_sampled_batch_with_specserve_lengths_has_the_target_distribution():
    for stat, critical in specserve_law(2000):
        assert stat < critical, f"chi2 {stat:.1f} >= {critical:.1f}"


@pytest.mark.slow
def test_the_specserve_law_test_rejects_a_verifier_that_accepts_every_draft():
    assert all(stat > critical for stat, critical in specserve_law(400, BrokenRule(chain_fn=accept_every_draft)))


# ---------------------------------------------------------------------------------------------------------------
# 5. bench.py's flag.


def test_bench_refuses_specserve_without_a_batched_table():
    with pytest.raises(UsageError, match="--specserve"):
        bench.check(bench.parse_args(["--specserve"]))
