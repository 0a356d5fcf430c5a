"""Tests for cost.py and draft_length.CostAware: the cost curve interpolates, is cached per machine and measured
again when anything it depends on changes; the policy drafts nothing where no length pays, drafts long where long
calls are cheap, follows its acceptance estimate, and keeps greedy output identical to autoregressive decoding.
No test asserts a timing: the decisions are tested on hand-made curves."""

import json
import math
import os
import time

import pytest
import table
import torch

import cost
from cost import CostCurve, cached_cost_curve, cost_table, measure_cost_curve
from draft_length import CostAware, predicted_speedup
from specdec import speculative_generate, tree_speculative_generate
from tests.toy import toy_model

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [1, 2, 4, 8, 16, 32]


def curve_of(ratio, tree_ratio=None) -> CostCurve:
    """A made-up curve: a one-token call costs 10 ms and a call of T tokens 10 ratio(T) ms."""
    return CostCurve(
        SIZES,
        [10.0 * ratio(T) for T in SIZES],
        [10.0 * tree_ratio(T) for T in SIZES] if tree_ratio else None,
    )


LINEAR = curve_of(lambda T: T)  # every token costs a full call: drafting cannot pay
FLAT = curve_of(lambda T: 1.0, lambda T: 1.0)  # Leviathan et al.'s assumption: any call costs one
GENTLE = curve_of(lambda T: 1 + 0.2 * (T - 1))
# Measured-like: 2-4 tokens are dear, 8 costs less than 4 (a kernel switch), then it climbs again
DIP = CostCurve(SIZES, [10.0, 15.0, 21.0, 18.0, 40.0, 80.0])


# ---------------------------------------------------------------------------------------------------------------
# 1. The curve.


def test_ms_interpolates_between_measured_sizes_and_extrapolates_past_the_last():
    c = CostCurve([1, 2, 4, 8], [10.0, 12.0, 16.0, 24.0], [11.0, 13.0, 17.0, 25.0])
    assert c.ms(1) == 10.0 and c.ms(4) == 16.0
    assert c.ms(3) == pytest.approx(14.0) and c.ms(6) == pytest.approx(20.0)
    assert c.ms(10) == pytest.approx(28.0)  # beyond 8: the last segment's slope
    assert c.ms(0) == 10.0  # below one token: a one-token call
    assert c.ratio(8) == pytest.approx(2.4) and c.ratio(1) == 1.0
    assert c.ms(3, tree=True) == pytest.approx(15.0) and c.ratio(8, tree=True) == pytest.approx(25 / 11)
    assert CostCurve([1, 2], [5.0, 6.0]).ms(2, tree=True) == 6.0  # no tree timings: the chain's


@pytest.fixture
def toy():
    return toy_model(0, vocab_size=16, max_len=64, layers=2)


def test_measure_times_every_size_for_chains_and_trees(toy):
    curve = measure_cost_curve(toy, sizes=(2, 4, 8), tree=True, prefix=20, repeats=2)
    assert curve.sizes == [1, 2, 4, 8]  # one token is always measured: ratios are taken to it
    assert len(curve.chain_ms) == len(curve.tree_ms) == 4 and min(curve.chain_ms + curve.tree_ms) > 0
    assert curve.spread >= 0
    assert measure_cost_curve(toy, sizes=(1, 2), repeats=1).tree_ms is None
    with pytest.raises(ValueError, match="tokens per call"):
        measure_cost_curve(toy, sizes=(1, 65))


def test_the_table_has_a_row_per_size():
    lines = cost_table(FLAT).splitlines()
    assert lines[0] == "| tokens per call | chain ms | tree ms | ratio to one token |"
    assert len(lines) == 2 + len(SIZES) and lines[3].startswith("| 2 | 10.0 | 10.0 | 1.00")
    assert "| 4 | 40.0 | - | 4.00 |" in cost_table(LINEAR)


def test_the_two_forms_of_a_call_are_timed_side_by_side_and_the_model_is_left_as_it_was(toy):
    plain, ours = cost.measure_forms(toy, sizes=(2, 4), prefix=8, repeats=1)
    assert plain.sizes == ours.sizes == [1, 2, 4] and min(plain.chain_ms + ours.chain_ms) > 0
    assert all(type(m) is not torch.nn.Linear for m in toy.modules())  # the model's own projections, LM head too
    assert cost.forms_table(plain, ours).count("\n") == 4  # a header, a rule, a row per size


def test_the_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    cost.plot_cost_curve(FLAT, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Curves 'measured' instantly, counted, into a cache folder of our own (XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake(model, sizes, tree, prefix):
        calls.append(model.config)
        return CostCurve([1, 2], [10.0, 11.0 + len(calls)], [10.0, 12.0] if tree else None, 0.1)

    monkeypatch.setattr(cost, "measure_cost_curve", fake)
    return calls


def test_the_cache_round_trips_and_measures_again_when_the_fingerprint_changes(measured, toy, tmp_path):
    first = cached_cost_curve(toy, sizes=(1, 2))
    assert cost.cache_dir() == tmp_path / "specdec" and len(list(cost.cache_dir().glob("cost-*.json"))) == 1
    assert cached_cost_curve(toy, sizes=(1, 2)) == first and len(measured) == 1  # loaded, not measured
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if before > 1 else 2)  # another thread count: another curve
        assert cached_cost_curve(toy, sizes=(1, 2)) != first and len(measured) == 2
    finally:
        torch.set_num_threads(before)
    other = toy_model(0, vocab_size=16, max_len=64, layers=3)  # another model shape
    cached_cost_curve(other, sizes=(1, 2))
    cached_cost_curve(toy, sizes=(1, 2), tree=True)  # tree calls too
    assert len(measured) == 4
    assert cached_cost_curve(toy, sizes=(1, 2)) == first and len(measured) == 4  # all kept side by side
    assert cached_cost_curve(toy, sizes=(1, 2), refresh=True) != first and len(measured) == 5


def test_a_broken_or_foreign_cache_file_is_measured_again(measured, toy):
    cached_cost_curve(toy, sizes=(1, 2))
    (path,) = cost.cache_dir().glob("cost-*.json")
    path.write_text("{not json")
    cached_cost_curve(toy, sizes=(1, 2))
    assert len(measured) == 2
    stored = json.loads(path.read_text())
    stored["key"]["torch"] = "0.0"  # a file whose key is not ours (a hash collision, an edited file)
    path.write_text(json.dumps(stored))
    cached_cost_curve(toy, sizes=(1, 2))
    assert len(measured) == 3


def test_a_noisy_curve_is_used_but_not_kept(monkeypatch, tmp_path, toy):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    noisy = CostCurve([1], [10.0], None, cost.KEEP_SPREAD + 1)
    monkeypatch.setattr(cost, "measure_cost_curve", lambda *a: noisy)
    assert cached_cost_curve(toy, sizes=(1,)) is noisy
    assert not list(cost.cache_dir().glob("cost-*.json"))


def age(path, seconds: float) -> None:
    """Make a cache file look last checked `seconds` ago."""
    then = path.stat().st_mtime - seconds
    os.utime(path, (then, then))


@pytest.mark.parametrize("fresh_ratio, kept", [(1.25, True), (17.0, False), (0.7, False)])
def test_a_stored_curve_is_rechecked_and_measured_again_if_it_no_longer_holds(
    measured, toy, monkeypatch, fresh_ratio, kept
):
    first = cached_cost_curve(toy, sizes=(1, 2))  # stored: a 2-token call at 1.2x a one-token call
    (path,) = cost.cache_dir().glob("cost-*.json")
    checks = []

    def quick(model, sizes, tree=False, prefix=cost.PREFIX, repeats=5):  # the re-measurement curve_holds makes
        checks.append(repeats)
        return CostCurve([1, 2], [10.0, 10.0 * fresh_ratio])

    monkeypatch.setattr(cost, "measure_cost_curve", quick)
    assert cached_cost_curve(toy, sizes=(1, 2)) == first and not checks  # checked a moment ago: not again
    age(path, cost.CHECK_AFTER + 1)
    again = cached_cost_curve(toy, sizes=(1, 2))
    assert checks[0] == 3  # the quick check, then, where it disagreed, a full measurement
    assert (again == first) == kept and len(checks) == (1 if kept else 2)
    assert time.time() - path.stat().st_mtime < cost.CHECK_AFTER  # checked (or stored) just now


def test_the_key_holds_the_model_code_so_that_a_new_version_measures_again(toy):
    key = cost.curve_key(toy, (1, 2), False, 8)
    assert key["code"] == cost.code_version() and len(key["code"]) == 16


def test_a_stored_draft_cost_is_rechecked_too(monkeypatch, tmp_path):
    draft, target = toy_model(0, vocab_size=16, max_len=64), toy_model(1, vocab_size=16, max_len=64, layers=3)
    values = iter([0.25, 0.24, 0.9, 0.9])  # stored, a check that agrees, a check that does not, the new measurement
    monkeypatch.setattr(cost, "measure_draft_cost", lambda d, t, repeats=9: cost.DraftCost(next(values)))
    assert cost.draft_cost(draft, target, directory=tmp_path) == 0.25
    (path,) = tmp_path.glob("draft-cost-*.json")
    age(path, cost.CHECK_AFTER + 1)
    assert cost.draft_cost(draft, target, directory=tmp_path) == 0.25
    age(path, cost.CHECK_AFTER + 1)
    assert cost.draft_cost(draft, target, directory=tmp_path) == 0.9


def test_an_unwritable_cache_folder_only_costs_a_measurement(measured, toy, tmp_path):
    (tmp_path / "file").write_text("")
    assert cached_cost_curve(toy, sizes=(1, 2), directory=tmp_path / "file" / "specdec").sizes == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# 2. The policy's decisions, on hand-made curves.


def test_it_drafts_nothing_where_drafting_cannot_pay():
    assert CostAware(LINEAR, c=0.0).gamma == 0  # T tokens cost T calls: even free drafts do not pay
    assert CostAware(GENTLE, c=1.0).gamma == 0  # each draft token costs as much as a target call
    policy = CostAware(LINEAR, c=0.1)
    for _ in range(20):
        policy.update(policy.gamma, policy.gamma)  # nothing drafted, nothing learned: still nothing pays
        assert policy.gamma == 0


def test_it_drafts_long_where_a_call_of_8_costs_less_than_one_of_4():
    middling = (3.0, 2.0)  # a prior of mean 0.6
    policy = CostAware(DIP, c=0.02, prior=middling)
    assert policy.gamma == 7  # a call of 8 tokens, the dip of the curve, at the prior's alpha
    rising = CostCurve(SIZES, [10.0, 15.0, 21.0, 30.0, 40.0, 80.0])  # the same but for 8 tokens, now dearer than 4
    assert CostAware(rising, c=0.02, prior=middling).gamma < 4
    for _ in range(30):
        policy.update(7, 5)  # alpha about 5/6
    assert policy.gamma == 7
    ranked = sorted(range(17), key=policy.speedup, reverse=True)
    assert ranked[0] == 7 and policy.speedup(7) > policy.speedup(3) * 1.3  # 4 tokens cost more than 8


def test_it_follows_the_acceptance_estimate():
    policy = CostAware(GENTLE, c=0.1)
    start = policy.gamma
    assert 0 < start < 16 and policy.alpha == pytest.approx(0.9)  # Beta(0.9, 0.1)'s mean: optimistic
    for _ in range(30):
        policy.update(policy.gamma, policy.gamma)  # every draft accepted
    high = policy.gamma
    assert policy.alpha > 0.95 and high >= start
    for _ in range(60):  # every first draft rejected (the counts forget per step: 15 accepted a step weigh long)
        policy.update(max(1, policy.gamma), 0)
    assert policy.alpha < 0.25 and policy.gamma == 0
    steps = 0
    while policy.gamma == 0 and steps < 90:
        policy.update(0, 0)  # steps where it chose to draft nothing forget the counts: alpha drifts back up ...
        steps += 1
    assert 0 < steps < 90 and policy.gamma > 0 and policy.alpha > 0.25  # ... until drafting pays again: a probe
    policy.update(high, high)
    alpha, gamma = policy.alpha, policy.gamma
    policy.reset()  # a new generation: the drafter's rate is still the best guess
    assert policy.alpha == alpha and policy.gamma == gamma
    assert CostAware(GENTLE, c=0.1).alpha == pytest.approx(0.9)  # a new policy starts from the prior


def test_a_step_where_the_drafter_had_nothing_to_offer_leaves_the_estimate_alone():
    policy = CostAware(GENTLE, c=0.0)
    for _ in range(4):
        policy.update(max(1, policy.gamma), 0)  # rejected drafts: alpha falls
    low, gamma = policy.alpha, policy.gamma
    assert low < 0.5 and gamma > 0  # drafting still pays on this curve, a little
    for _ in range(50):
        policy.update(0, 0)  # no match: gamma was asked for, nothing was drafted
    assert policy.alpha == low and policy.gamma == gamma  # neither evidence nor a probe


def simulated_speed(policy: CostAware, alpha: float, seed: int, steps: int = 400) -> float:
    """Tokens per unit of time (one-token target calls) of `policy` where each draft is accepted with probability
    alpha, independently: the i.i.d. model of Leviathan et al. 2023, Thm 3.8."""
    rng, tokens, time = torch.Generator().manual_seed(seed), 0, 0.0
    policy.reset()
    for _ in range(steps):
        gamma = policy.gamma
        passed = (torch.rand(gamma, generator=rng) < alpha).tolist() + [False]
        accepted = passed.index(False)
        tokens, time = tokens + accepted + 1, time + gamma * policy.c + policy.curve.ratio(gamma + 1)
        policy.update(gamma, accepted)
    return tokens / time


def worst_share_of_the_best_fixed_gamma(prior: tuple[float, float]) -> float:
    """The lowest simulated speed of CostAware over the speed of the best fixed gamma (0 to 16) that theory
    predicts, across acceptance rates, draft costs and two measured-like curves."""
    shipped = CostCurve([1, 2, 4, 8, 16, 32], [11.6, 14.0, 15.0, 16.0, 19.0, 28.4])  # gently rising
    worst = 1.0
    for curve in (DIP, shipped):
        for c in (0.0, 0.1, 0.3, 0.5, 0.8):
            for alpha in (0.2, 0.5, 0.7, 0.82, 0.9, 0.95):
                best = max(predicted_speedup(alpha, g, c, curve.ratio(g + 1)) if g else 1.0 for g in range(17))
                got = sum(simulated_speed(CostAware(curve, c, prior=prior), alpha, s) for s in range(2)) / 2
                worst = min(worst, got / best)
    return worst


@pytest.mark.slow
def test_it_keeps_near_the_best_fixed_gamma_whatever_the_acceptance_and_cost():
    assert worst_share_of_the_best_fixed_gamma((0.9, 0.1)) > 0.85  # the default prior
    # A pessimistic prior (mean 0.6, worth five observations) never drafts where drafting only pays at a high
    # acceptance rate, so it never learns the rate: the same test catches it.
    assert worst_share_of_the_best_fixed_gamma((3.0, 2.0)) < 0.7


def test_its_gamma_maximises_leviathans_speedup_with_the_measured_verify_cost():
    policy = CostAware(DIP, c=0.3, most=12)
    for accepted in (3, 1, 4, 0, 2, 5):
        policy.update(5, accepted)
        best = max(range(13), key=lambda g: predicted_speedup(policy.alpha, g, 0.3, DIP.ratio(g + 1)))
        assert policy.gamma == best


def test_trees_stop_growing_where_the_next_level_cannot_pay():
    likely = [math.log(0.5), math.log(0.3), math.log(0.1), math.log(0.05)]  # a frontier with mass 0.95
    flat = CostAware(FLAT, c=0.0)
    assert all(flat.keep_growing(likely, d) for d in range(1, 8))  # free levels: always grow
    steep = CostAware(curve_of(lambda T: T, lambda T: T), c=0.1)
    assert not steep.keep_growing(likely, 1)  # four more nodes cost four calls
    gentle = CostAware(curve_of(lambda T: 1.0, lambda T: 1 + 0.02 * (T - 1)), c=0.05)
    assert gentle.keep_growing(likely, 1)
    assert not gentle.keep_growing([math.log(0.01)] * 4, 2)  # the frontier became unlikely


def test_bad_arguments_are_refused():
    for kwargs in ({"c": -1}, {"c": 0.1, "most": -1}, {"c": 0.1, "decay": 1.0}, {"c": 0.1, "prior": (0, 1)}):
        with pytest.raises(ValueError):
            CostAware(FLAT, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# 3. Greedy identity on the shipped weights: the draft length never changes what is verified.


class Watched(CostAware):
    """CostAware that remembers every gamma it offered."""

    def reset(self) -> None:
        super().reset()
        self.offered = [self.gamma]

    def update(self, drafted: int, accepted: int) -> None:
        super().update(drafted, accepted)
        self.offered.append(self.gamma)


@pytest.mark.parametrize("drafter", ["draft", "pld"])
def test_greedy_identity_on_the_shipped_weights(short_references, drafter):
    enc, target, refs = short_references
    d = table.drafter(drafter, target)
    offered = set()
    for curve, c in ((LINEAR, 0.1), (DIP, 0.05), (GENTLE, 0.1), (FLAT, 0.0)):
        policy = Watched(curve, c)
        for prompt, ref in refs:
            out, stats = speculative_generate(target, d, prompt, len(ref), eot=enc.eot_token, draft_length=policy)
            assert out == ref
            offered.update(policy.offered)
            if curve is LINEAR:  # drafting never pays: plain one-token calls, one per token
                assert stats.drafted == 0 and stats.target_calls == len(ref)
    assert 0 in offered and max(offered) >= 7  # both the plain step and long drafts were exercised


def test_greedy_identity_of_dynamic_trees_on_the_shipped_weights(short_references):
    enc, target, refs = short_references
    d = table.drafter("draft", target, tree=True)
    for curve in (FLAT, curve_of(lambda T: 1.0, lambda T: 1 + 0.1 * (T - 1))):
        for prompt, ref in refs[:3]:
            out, _ = tree_speculative_generate(
                target, d, prompt, len(ref), eot=enc.eot_token, draft_length=CostAware(curve, 0.14)
            )
            assert out == ref


# ---------------------------------------------------------------------------------------------------------------
# 4. -l cost as the command line builds it: the drafter's c from the table of methods, the curve measured here.


@pytest.fixture
def private_cache(monkeypatch, tmp_path):
    """cost.py's per-machine cache in a temporary folder, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


@pytest.mark.parametrize("drafter", ["draft", "cascade", "earlyexit", "layerskip", "quant"])
def test_each_model_drafter_states_its_cost_per_token(short_references, private_cache, drafter):
    _, target, _ = short_references
    policy = table.draft_length("cost", target, drafter=drafter)
    assert 0 < policy.c < 1.5  # a draft token costs less than about one target call, and something


def test_model_free_drafters_cost_nothing(short_references, private_cache):
    _, target, _ = short_references
    assert table.draft_length("cost", target, drafter="pld").c == 0.0


@pytest.mark.parametrize("drafter", ["pld", "draft", "earlyexit"])
def test_greedy_identity_with_the_cli_built_policy(short_references, private_cache, drafter):
    enc, target, refs = short_references
    d, policy = table.drafter(drafter, target), table.draft_length("cost", target, drafter=drafter)
    for prompt, ref in refs:
        out, _ = speculative_generate(target, d, prompt, len(ref), eot=enc.eot_token, draft_length=policy)
        assert out == ref


def test_a_draft_cost_is_one_interleaved_ratio_cached_per_pair(monkeypatch, tmp_path):
    draft, target = toy_model(0, vocab_size=16, max_len=64), toy_model(1, vocab_size=16, max_len=64, layers=3)
    measured = cost.measure_draft_cost(draft, target, prefix=8, repeats=3)
    assert measured.c > 0 and measured.spread >= 0  # a ratio of two timings: its value is the machine's
    pairs = []

    def fake(d, t):
        pairs.append((d, t))
        return cost.DraftCost(0.25, 0.1)

    monkeypatch.setattr(cost, "measure_draft_cost", fake)
    assert cost.draft_cost(draft, target, directory=tmp_path) == 0.25
    assert cost.draft_cost(draft, target, directory=tmp_path) == 0.25 and len(pairs) == 1  # read back
    cost.draft_cost(target, target, directory=tmp_path)  # another pair: measured on its own
    assert len(pairs) == 2 and len(list(tmp_path.glob("draft-cost-*.json"))) == 2
