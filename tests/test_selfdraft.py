"""Tests for selfdraft.py and the partial forwards of model.py it uses: a layer range or a skip set is the naive
reference's forward with those layers left out; skipping nothing or exiting at L is the target exactly; the shared
cache of the early exit gives the logits of a fresh full forward and a cache equal to a prefill, and the draft's
lower-layer work is not redone; every self-drafter is greedy-identical on the shipped weights and keeps the
target's law at T > 0, and the law test rejects a drafter that lets stale K/V into verification."""

from pathlib import Path

import pytest
import table
import torch

from draft_length import Adaptive
from methods import load_model
from selfdraft import (
    DynamicExitDrafter,
    EarlyExitDrafter,
    best_exit,
    exit_topk_agreement,
    greedy_agreement,
    load_skip_set,
    ppd_speedup,
    quantized,
    search_skip_set,
    speed_speedup,
    sublayer_costs,
)
from specdec import generate, speculative_generate, warp_for
from tests.reference import reference_logits
from tests.toy import chi_square, chi_square_critical, exact_joint, sample_speculative, toy_model

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
LAYERS = 3  # toy targets deep enough to exit early


def toy_target():
    return toy_model(seed=2, layers=LAYERS, max_len=24)


# ---------------------------------------------------------------------------------------------------------------
# 1. Partial forwards against the naive reference.


@torch.inference_mode()
@pytest.mark.parametrize("exit_layer", range(1, LAYERS + 1))
def test_an_early_exit_is_the_reference_forward_cut_after_that_layer(exit_layer):
    target, tokens = toy_target(), torch.tensor([[1, 4, 0, 3, 5, 2, 2]])
    ours = target(tokens, layers=range(exit_layer))
    assert torch.allclose(ours, reference_logits(target, tokens, exit_layer=exit_layer), atol=1e-5)


@torch.inference_mode()
@pytest.mark.parametrize("skip", [{"0.attn"}, {"1.mlp"}, {"0.mlp", "2.attn"}, {"1.attn", "1.mlp"}])
def test_a_skip_set_is_the_reference_forward_without_those_sublayers(skip):
    target, tokens = toy_target(), torch.tensor([[1, 4, 0, 3, 5, 2, 2]])
    ours = target(tokens, skip=frozenset(skip))
    assert torch.allclose(ours, reference_logits(target, tokens, skip=skip), atol=1e-5)
    assert not torch.allclose(ours, target(tokens), atol=1e-3)  # the skip does something


@torch.inference_mode()
def test_skipping_nothing_or_exiting_at_the_last_layer_gives_exactly_the_target_logits():
    target, tokens = toy_target(), torch.tensor([[1, 4, 0, 3, 5, 2, 2]])
    full = target(tokens)
    assert torch.equal(target(tokens, skip=frozenset()), full)
    assert torch.equal(target(tokens, layers=range(LAYERS)), full)
    stepwise = target.embed_tokens(tokens)
    for i in range(LAYERS):  # one layer at a time, as EarlyExitDrafter runs them
        stepwise = target.blocks(stepwise, layers=range(i, i + 1))
    assert torch.equal(target.lm_head(target.norm(stepwise)), full)


# ---------------------------------------------------------------------------------------------------------------
# 2. The shared cache of LayerSkip's early exit.


class StaleLowerLayers(EarlyExitDrafter):
    """BROKEN: drafts blocks [0, E) with one sublayer skipped (a Draft & Verify draft) into the SHARED cache, so
    verification reuses K/V and residual streams that are not the target's (docs/pitfalls.md: A shared
    cache is shared only for the same layers)."""

    def lower(self, token):
        x = self.target.embed_tokens(torch.tensor([[token]]))
        start, streams = self.cache.length, []
        for i in range(self.exit):
            self.cache.length = start
            x = self.target.blocks(x, self.cache, layers=range(i, i + 1), skip=frozenset({"0.mlp"}))
            streams.append(x)
        return streams


@torch.inference_mode()
def verify_once(drafter_cls, exit_layer: int, context: list[int], gamma: int):
    """Attach (which prefills context[:-1]), draft gamma tokens greedily, run the drafter's verify call: (logits of
    the call, drafts, target, cache)."""
    target = toy_target()
    cache, drafter = target.new_cache(), drafter_cls(target, exit_layer)
    drafter.reset()
    forward = drafter.attach(target, cache, context)  # prefills context[:-1]
    drafts, _ = drafter.propose(context, gamma, warp_for(0, 0, 1), None)
    logits = forward(torch.tensor([context[-1:] + drafts]), cache)
    return logits, drafts, target, cache


@pytest.mark.parametrize("exit_layer", [1, 2])
def test_early_exit_verification_gives_the_logits_of_a_fresh_full_forward(exit_layer):
    context = [1, 4, 0, 3, 5, 2]
    logits, drafts, target, cache = verify_once(EarlyExitDrafter, exit_layer, context, gamma=4)
    with torch.inference_mode():
        fresh = target(torch.tensor([context + drafts]))[:, len(context) - 1 :]
    assert len(drafts) == 4 and torch.allclose(logits, fresh, atol=1e-5)
    stale, *_ = verify_once(StaleLowerLayers, exit_layer, context, gamma=4)  # the same check catches stale K/V
    assert not torch.allclose(stale, fresh, atol=1e-3)


@pytest.mark.parametrize("n_accepted", [0, 2, 4])
def test_after_rollback_the_shared_cache_equals_a_prefill_of_the_accepted_text(n_accepted):
    context = [1, 4, 0, 3, 5, 2]
    _, drafts, target, cache = verify_once(EarlyExitDrafter, 2, context, gamma=4)
    kept = len(context) + n_accepted
    cache.truncate(kept)  # what the loop does after verification
    fresh = target.new_cache()
    with torch.inference_mode():
        target(torch.tensor([(context + drafts)[:kept]]), fresh)
    for layer in range(LAYERS):
        assert torch.allclose(cache.k[layer][:, :, :kept], fresh.k[layer][:, :, :kept], atol=1e-5), layer
        assert torch.allclose(cache.v[layer][:, :, :kept], fresh.v[layer][:, :, :kept], atol=1e-5), layer


@pytest.mark.parametrize(
    "cls, expected",
    [(EarlyExitDrafter, [((0, 1), 1), ((2,), 4)]), (DynamicExitDrafter, [((0,), 1), ((1,), 1), ((2,), 4)])],
    ids=["layerskip", "del"],
)
def test_verification_reuses_the_drafts_lower_layers_instead_of_recomputing_them(monkeypatch, cls, expected):
    """Only the last draft goes through blocks [0, E) in the verify call; blocks [E, L) take every position. DEL
    runs them one block at a time (its shadow tokens read every block's stream), LayerSkip each range in one call."""
    target = toy_target()
    cache, drafter = target.new_cache(), cls(target, 2)
    drafter.reset()
    context = [1, 4, 0, 3, 5, 2]
    with torch.inference_mode():
        forward = drafter.attach(target, cache, context)
        drafts, _ = drafter.propose(context, 3, warp_for(0, 0, 1), None)
        calls, blocks = [], target.blocks
        monkeypatch.setattr(
            target,
            "blocks",
            lambda x, *a, layers=None, **k: (
                calls.append((tuple(layers), x.shape[1])) or blocks(x, *a, layers=layers, **k)
            ),
        )
        forward(torch.tensor([context[-1:] + drafts]), cache)
    assert calls == expected


def test_dynamic_exit_picks_the_exit_and_length_that_maximise_tokens_per_layer():
    # exit 1 agrees 10% of the time, exit 2 90%, exit 3 99%: with L = 4 the tokens per block run are, for d = 1,
    # (1 + a) / (l + 4): 0.22, 0.32, 0.28; longer drafts at exit 2: d = 2 gives 2.71 / 8 = 0.34, d = 3 3.44 / 10
    alpha = torch.tensor([0.1, 0.9, 0.99])
    assert best_exit(alpha, n_layers=4, max_gamma=3) == (3, 2)
    assert best_exit(torch.tensor([0.999, 0.1, 0.1]), n_layers=4, max_gamma=8)[1] == 1


# ---------------------------------------------------------------------------------------------------------------
# 3. Draft & Verify: the skip-set search and the adaptive threshold.


def test_skip_search_returns_the_best_modelled_set_of_its_curve():
    target = toy_target()
    sequences = [([1, 4, 0, 3], generate(target, [1, 4, 0, 3], 8)), ([2, 2, 5], generate(target, [2, 2, 5], 8))]
    assert greedy_agreement(target, sequences) == 1.0  # nothing skipped: the target agrees with itself
    skip, curve = search_skip_set(target, sequences, max_skipped=3, log=lambda *_: None)
    costs = [row["draft_cost"] for row in curve]
    assert costs == sorted(costs, reverse=True) and len(curve) == 3
    assert skip == frozenset(max(curve, key=lambda r: r["modelled_speedup"])["skipped"])
    assert sum(sublayer_costs(target.config).values()) < 1  # the LM head is the rest


def test_adaptive_threshold_rises_when_acceptance_is_low_and_falls_when_high():
    low = Adaptive(4, threshold=0.5)
    for _ in range(20):
        low.update(4, 0)
    high = Adaptive(4, threshold=0.5)
    for _ in range(20):
        high.update(3, 3)  # accepted everything, but stopped short of gamma: draft longer
    full = Adaptive(4, threshold=0.5)
    for _ in range(10):  # the rate's average starts at 0, as in the authors' code: it takes a few steps to rise
        full.update(4, 4)
    settled = full.threshold
    for _ in range(10):
        full.update(4, 4)  # every step drafted gamma and all were accepted: no reason to move
    assert low.threshold > 0.5 > high.threshold and full.threshold == pytest.approx(settled)
    low.reset()
    assert low.threshold == 0.5


def test_the_shipped_skip_set_names_real_sublayers():
    skip = load_skip_set(WEIGHTS / "layerskip.json")
    target = load_model(WEIGHTS / "target", "cpu", torch.float32)
    assert skip and skip <= set(sublayer_costs(target.config))


# ---------------------------------------------------------------------------------------------------------------
# 4. Lossless: greedy identity on the shipped weights, the sampled law on toy models.

SELF_DRAFTERS = {"layerskip": 8, "earlyexit": 8, "earlyexit E 3": 3, "del": 8, "del from E 2": 2, "quant": 8}


@pytest.mark.parametrize("case", SELF_DRAFTERS)
def test_self_drafting_is_greedy_identical_on_the_shipped_weights(short_references, case):
    enc, target, references = short_references
    name = case.split()[0]
    drafter = table.drafter(name, target, exit_layer=SELF_DRAFTERS[case])
    length = Adaptive(6) if name == "layerskip" else None
    accepted = 0
    for prompt, expected in references:
        out, stats = speculative_generate(
            target, drafter, prompt, len(expected), gamma=4, eot=enc.eot_token, draft_length=length
        )
        assert out == expected
        accepted += stats.accepted
    assert accepted > 0


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_target_is_a_close_draft(bits):
    target = toy_model(seed=2, layers=LAYERS, max_len=24, std=0.3)
    tokens = torch.tensor([[1, 4, 0, 3, 5, 2, 2]])
    with torch.inference_mode():
        p, q = torch.softmax(target(tokens), -1), torch.softmax(quantized(target, bits)(tokens), -1)
    overlap = torch.minimum(p, q).sum(-1)  # the acceptance rate of speculative sampling at T = 1
    assert overlap.min() > 0.9 and not torch.equal(p, q)


N_TRUE, N_BROKEN = 6_000, 1_000
PROMPT = [1, 4, 0, 3]


def law(drafter, n_samples, **opts):
    target = drafter.target if hasattr(drafter, "target") else toy_target()
    samples, stats = sample_speculative(
        target, drafter, PROMPT, 3, n_samples, seed=0, eot=None, temperature=1.0, gamma=2, **opts
    )
    stat, dof = chi_square(samples, exact_joint(target, PROMPT, 3, temperature=1.0))
    return stat, chi_square_critical(dof), stats


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["earlyexit", "del"])
def test_self_drafting_keeps_the_target_distribution(kind):
    """The shared cache is new to the loop; layerskip and quant are ModelDrafters, whose law test_specdec checks."""
    target = toy_target()
    drafter = EarlyExitDrafter(target, 2) if kind == "earlyexit" else DynamicExitDrafter(target, 2)
    stat, critical, stats = law(drafter, N_TRUE)
    assert stat < critical, f"chi2 {stat:.1f} >= {critical:.1f}"
    assert 0 < stats.accepted < stats.drafted


@pytest.mark.slow
def test_the_law_test_rejects_verification_that_reuses_stale_lower_layers():
    stat, critical, _ = law(StaleLowerLayers(toy_target(), 2), N_BROKEN)
    assert stat > critical, f"stale K/V not detected: chi2 {stat:.1f} <= {critical:.1f}"


# ---------------------------------------------------------------------------------------------------------------
# PPD and SPEED's latency models (not runnable methods here: bench.py --pipelined).


def test_early_exit_agreement_counts_positions_where_the_full_greedy_token_is_in_the_exits_top_k():
    target, tokens = toy_target(), [0, 3, 1, 4, 2, 5, 1, 1]
    full = reference_logits(target, torch.tensor([tokens]))[0].argmax(-1)
    for exit_layer in range(1, LAYERS + 1):
        early = reference_logits(target, torch.tensor([tokens]), exit_layer=exit_layer)[0]
        for k in (1, 2, 6):
            hits = [int(full[i]) in early[i].topk(k).indices.tolist() for i in range(len(tokens))]
            assert exit_topk_agreement(target, tokens, exit_layer, k) == pytest.approx(sum(hits) / len(hits))
    assert exit_topk_agreement(target, tokens, LAYERS, 1) == 1.0  # the last layer is the target
    assert exit_topk_agreement(target, tokens, 1, 6) == 1.0  # the whole vocabulary


def test_ppd_gains_nothing_when_guesses_miss_and_saves_the_upper_layers_when_they_hit():
    assert ppd_speedup(0.0, 0.5) == 1.0
    assert ppd_speedup(1.0, 0.25) == pytest.approx(4.0)  # each pass starts a quarter of a pass after the last
    assert ppd_speedup(0.5, 0.5) == pytest.approx(1 / 0.75)
    assert ppd_speedup(0.5, 0.5, concurrent_cost=1.5) == pytest.approx(1 / (1.5 * 0.75))  # one device: dearer


def test_speed_needs_shared_weights_and_right_guesses():
    assert speed_speedup(1.0, 4, stage_cost=1.0) == pytest.approx(4.0)  # a token a step, a quarter of a pass each
    assert speed_speedup(0.0, 4, stage_cost=1.0) == pytest.approx(1.0)  # every guess flushes the pipeline
    assert speed_speedup(1.0, 4, stage_cost=2.0) == pytest.approx(2.0)
    for a in (0.0, 0.5, 1.0):  # unshared weights: a step streams a whole pass's weights
        assert speed_speedup(a, 3, stage_cost=1.0, shared=False) <= 1.0
