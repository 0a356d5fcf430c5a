"""SpecDec's NAR drafter (nar.py): the one-call K-query forward against a naive cache-free forward written from
scratch, the drafter's own cache after every step, the training layout against one forward per cut, greedy identity
on the shipped weights, and the sampled law on a toy target with power checks. p = target, q = draft."""

from dataclasses import replace
from pathlib import Path

import pytest
import table
import torch
from torch import Tensor

import specdec
from methods import UsageError
from model import ModelConfig
from nar import NarDrafter, NarModel, query_layout
from specdec import generate, speculative_generate
from tests.reference import reference_logits
from tests.test_specdec import acceptance_matches_theory
from tests.toy import chi_square, chi_square_critical, exact_joint, sample_speculative, toy_model
from verify import sample_token

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


def toy_nar(seed: int = 5, k: int = 3, max_len: int = 16, std: float = 0.5) -> NarModel:
    """A random 1-layer NAR drafter for the V = 6 toy target: every weight, the queries included, N(0, std^2)."""
    cfg = ModelConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=6,
        max_position_embeddings=max_len,
    )
    model, gen = NarModel(cfg, k), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def naive_query_logits(model: NarModel, context: list[int]) -> Tensor:
    """The unshared path: one cache-free forward of context + k queries by tests/reference.py (no code shared with
    model.py), the queries passed as k extra vocabulary rows, and SpecDec's mask built here from its definition:
    causal over the context; every query sees the whole context and all k queries. -> [k, V]"""
    cfg, k, V = model.lm.config, model.num_queries, model.lm.config.vocab_size
    state = dict(model.lm.state_dict())
    state["embed_tokens.weight"] = torch.cat([state["embed_tokens.weight"], model.queries.detach()])
    state["lm_head.weight"] = torch.cat([state["lm_head.weight"], torch.zeros(k, cfg.hidden_size)])
    T = len(context) + k
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    mask[len(context) :, len(context) :] = True
    tokens = torch.tensor([context + list(range(V, V + k))])
    return reference_logits(None, tokens, mask=mask, config=replace(cfg, vocab_size=V + k), state=state)[0, -k:, :V]


# ---------------------------------------------------------------------------------------------------------------
# 1. One call, K outputs, a cache that holds the context only.


@pytest.mark.parametrize("split", [0, 3, 9])
@torch.inference_mode()
def test_one_cached_call_gives_the_naive_forward_of_context_and_queries(split):
    model, context = toy_nar(), [1, 4, 0, 3, 5, 2, 2, 1, 0, 4]
    cache = model.lm.new_cache()
    if split:
        model(torch.tensor([context[:split]]), cache)  # an earlier step saw the first tokens
    logits = model(torch.tensor([context[split:]]), cache)[0, 0]  # [k, V]
    assert cache.length == len(context)  # the queries' K/V are gone
    assert torch.allclose(logits, naive_query_logits(model, context), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_the_training_layout_equals_one_forward_per_cut():
    """train.py nar cuts a sequence at many places in one forward: each block of queries must see exactly what
    it would see after its own context alone."""
    model, cuts = toy_nar(max_len=40), [3, 8, 11, 20]
    tokens = torch.randint(0, 6, (2, 20), generator=torch.Generator().manual_seed(0))
    out = model(tokens, cuts=cuts)  # [B, cuts, k, V]
    for b, t in enumerate(cuts):
        assert torch.allclose(out[:, b], model(tokens[:, :t])[:, 0], atol=ATOL, rtol=0)
    positions, mask = query_layout(0, 20, cuts, 3)
    assert positions[20:].tolist() == [t + j for t in cuts for j in range(3)]
    assert not mask[:20, 20:].any()  # no context token ever sees a query


class CheckedNar(NarDrafter):
    """After every proposal that drafted: the cache holds exactly the context, its K/V equal a fresh prefill of it.
    A proposal of nothing (gamma 0, the budget's last token) calls nothing; the next one feeds what it missed."""

    checked = 0

    def propose(self, context, gamma, warp, generator, keep=lambda *_: True):
        out = super().propose(context, gamma, warp, generator, keep)
        if not out[0]:
            return out
        self.checked += 1
        fresh = self.model.lm.new_cache()
        self.model.lm(torch.tensor([context]), fresh)
        assert self.cache.length == len(context)
        for mine, theirs in zip(self.cache.k + self.cache.v, fresh.k + fresh.v):
            assert torch.allclose(mine[:, :, : len(context)], theirs[:, :, : len(context)], atol=ATOL, rtol=0)
        return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_after_every_step_the_drafters_cache_holds_exactly_the_context(temperature):
    target, drafter = toy_model(seed=2), CheckedNar(toy_nar())
    out, stats = speculative_generate(
        target, drafter, [1, 4, 0], 12, gamma=3, temperature=temperature, generator=torch.Generator().manual_seed(0)
    )
    assert drafter.checked == stats.target_calls - stats.compare_counts[0] and len(out) == 12  # each that drafted
    assert stats.drafted > 0 and stats.accepted < stats.drafted  # rejections happened, so rollbacks were tested


@pytest.mark.parametrize("n_prompt", range(1, 16))
def test_greedy_nar_decoding_runs_to_the_end_of_the_context_and_equals_autoregressive(n_prompt):
    """Near the end of the position table only the queries that fit are run."""
    target, prompt = toy_model(seed=2), ([1, 4, 0, 3, 5] * 3)[:n_prompt]
    out, _ = speculative_generate(target, NarDrafter(toy_nar()), prompt, 20, gamma=3, temperature=0)
    assert out == generate(target, prompt, 20)


def test_keep_cuts_the_chain_and_the_drafts_are_each_positions_argmax_at_t0():
    drafter = NarDrafter(toy_nar())
    drafter.reset()
    warp = specdec.warp_for(0.0, 0, 1.0)
    with torch.inference_mode():
        tokens, q = drafter.propose([1, 4, 0], 5, warp, None)  # gamma 5 > k = 3: at most k drafts
        assert tokens == naive_query_logits(drafter.model, [1, 4, 0]).argmax(-1).tolist()
        assert torch.equal(q, warp(naive_query_logits(drafter.model, [1, 4, 0])))
        drafter.reset()
        asked = []
        short, q = drafter.propose([1, 4, 0], 3, warp, None, lambda logits, i: asked.append(i) or i < 1)
    assert short == tokens[:2] and len(q) == 2 and asked == [0, 1]


def test_a_missing_nar_drafter_is_one_usage_error(tmp_path):
    with pytest.raises(UsageError, match="train.py nar"):
        table.drafter("nar", toy_model(seed=2), weights=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 2. Greedy identity on the shipped weights.


@pytest.mark.parametrize("length", ["fixed", "confidence"])
def test_greedy_nar_decoding_equals_autoregressive_on_shipped_weights(short_references, length):
    enc, target, references = short_references
    drafter = table.drafter("nar", target)
    accepted = drafted = 0
    for i, (prompt, expected) in enumerate(references):
        gamma = 1 + i % 6  # below, at and above k
        policy = table.draft_length(length, target, gamma=gamma)
        out, stats = speculative_generate(
            target, drafter, prompt, 24, gamma=gamma, temperature=0, eot=enc.eot_token, draft_length=policy
        )
        assert out == expected, f"prompt {i}, gamma {gamma}"
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    assert 0 < accepted < drafted


# ---------------------------------------------------------------------------------------------------------------
# 3. The sampled law at T = 1: chi-square of 3-token continuations against the toy target's exact joint.

N_TRUE = 6_000
PROMPT = [1, 4, 0, 3]


class MisreportedTemperature(NarDrafter):
    """BROKEN: draws each draft from the T = 0.7 (warped) distribution but reports the loop's T = 1 q."""

    def draft(self, logits, warp, generator):
        drawn = torch.softmax(logits.float() / 0.7, dim=-1)
        return [sample_token(row, generator) for row in drawn], warp(logits)


class WrongPosition(NarDrafter):
    """BROKEN: reports each position's q one position off (rows rolled)."""

    def draft(self, logits, warp, generator):
        tokens, q = super().draft(logits, warp, generator)
        return tokens, q.roll(1, dims=0)


def law(drafter: NarDrafter, n_samples: int):
    target = toy_model(seed=2)
    samples, stats = sample_speculative(
        target, drafter, PROMPT, 3, n_samples, seed=0, eot=None, temperature=1.0, gamma=3
    )
    stat, dof = chi_square(samples, exact_joint(target, PROMPT, 3, temperature=1.0))
    return stat, chi_square_critical(dof), dof, stats


@pytest.mark.slow
def test_nar_sampling_reproduces_the_target_distribution():
    stat, critical, dof, stats = law(NarDrafter(toy_nar()), N_TRUE)
    print(
        f"NAR at T=1: chi2 {stat:.1f} < {critical:.1f} (dof {dof}); accepted per call {stats.accept_counts}; "
        f"acceptance {stats.acceptance_rate:.3f}, theory {stats.predicted_acceptance_rate:.3f}"
    )
    assert stat < critical, f"chi2 = {stat:.1f} >= {critical:.1f} (dof {dof})"
    assert all(stats.accept_counts[:3])  # rejection at once, partial accept, every draft accepted
    assert acceptance_matches_theory(stats)  # accepted drafts agree with sum_x min(p, q) of the reported q


@pytest.mark.slow
@pytest.mark.parametrize("broken", [MisreportedTemperature, WrongPosition], ids=lambda c: c.__name__)
def test_the_law_test_rejects_a_q_that_is_not_what_the_draft_was_drawn_from(broken):
    n_samples = {MisreportedTemperature: 3_000, WrongPosition: 1_000}[broken]  # the subtler one needs more
    stat, critical, dof, _ = law(broken(toy_nar()), n_samples)
    print(f"{broken.__name__}: chi2 {stat:.1f} > {critical:.1f} (dof {dof})")
    assert stat > critical, f"broken q not detected: chi2 = {stat:.1f} <= {critical:.1f} (dof {dof})"
