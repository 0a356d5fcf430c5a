"""Tests for the decoding loops of specdec.py: greedy identity on the shipped weights, KV-cache rollback, the exact
output distribution of speculative sampling (chi-square against the enumerated target joint, with power checks
against broken verifiers), the statistics, and the stopping rules. p = target, q = draft (Leviathan et al.)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from drafters import ModelDrafter, PromptLookupDrafter
from methods import load_model
from prompts import function_prompts
from specdec import Stats, generate, speculative_generate, theory_acceptance, tree_speculative_generate, warp_for
from tests.toy import (
    BrokenRule,
    MisreportingDrafter,
    ScriptedDrafter,
    accept_every_draft,
    acceptance_matches_theory,
    chi_square,
    chi_square_critical,
    exact_joint,
    perturbed,
    sample_speculative,
    toy_model,
)
from tokenizer import load_tokenizer
from verify import SpeculativeSampling, acceptance_probability, greedy_verify, sample_token

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
ATOL = 1e-5


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the toy setting: V = 6, 16 positions, a draft that is a noisy copy of the target ---------------------------


def toy_target(seed: int = 2):
    return toy_model(seed)


def toy_draft(seed: int = 2):
    return perturbed(toy_target(seed), seed=100, noise=0.2)


def toy_drafter(kind: str, seed: int = 2):
    return ModelDrafter(toy_draft(seed)) if kind == "model" else PromptLookupDrafter()


MODEL_PROMPT = [1]  # one token: no prefill, the cheapest run (the PLD prompt and the other tests cover prefill)
PLD_PROMPT = [0, 4, 4, 0]  # prompt lookup drafts [4, 4]: accepted in full ~15% of the calls, rejected at once ~70%
TOY_PROMPTS = {"model": MODEL_PROMPT, "pld": PLD_PROMPT}


# ---------------------------------------------------------------------------------------------------------------
# 1. Greedy identity on the shipped weights.

N_PROMPTS, CONTEXT, N_NEW = 24, 128, 32


@pytest.fixture(scope="module")
def shipped():
    enc = load_tokenizer(WEIGHTS / "tokenizer.tiktoken")
    target = load_model(WEIGHTS / "target", "cpu", torch.float32)
    draft = load_model(WEIGHTS / "draft", "cpu", torch.float32)
    return enc, target, draft


@pytest.fixture(scope="module")
def heldout(shipped):
    """(prompt, greedy autoregressive continuation) for each held-out prompt, the reference computed once."""
    enc, target, _ = shipped
    prompts = function_prompts(enc, N_PROMPTS, context_tokens=CONTEXT)
    assert len(prompts) == N_PROMPTS
    return [(p, generate(target, p, N_NEW, temperature=0, eot=enc.eot_token)) for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("drafter_name", ["draft", "pld"])
def test_greedy_speculative_equals_autoregressive_on_shipped_weights(shipped, heldout, drafter_name):
    enc, target, draft = shipped
    drafter = ModelDrafter(draft) if drafter_name == "draft" else PromptLookupDrafter()
    total = Stats()
    for i, (prompt, expected) in enumerate(heldout):
        gamma = 1 + i % 8  # every gamma from 1 to 8, for each drafter
        out, stats = speculative_generate(target, drafter, prompt, N_NEW, temperature=0, gamma=gamma, eot=enc.eot_token)
        assert out == expected, f"prompt {i}, gamma {gamma}"  # whole lists: lengths included
        assert stats.produced == len(out)
        assert stats.tau >= 1 or len(out) < N_NEW  # below 1 only when the end of text cut the last call short
        assert stats.accepted <= stats.drafted
        assert sum(stats.accept_counts) == stats.target_calls
        total.drafted, total.accepted = total.drafted + stats.drafted, total.accepted + stats.accepted
    assert total.drafted > 0 and 0 < total.accepted < total.drafted  # the drafter fired, and was sometimes wrong


# ---------------------------------------------------------------------------------------------------------------
# 2. Rollback: after a rejection the caches hold exactly the accepted text.


@torch.inference_mode()
def test_target_cache_after_a_rejection_holds_exactly_the_accepted_text():
    target, context = toy_target(), [1, 2, 3, 4]
    right = generate(target, context, 3, temperature=0)  # the target's greedy continuation
    drafts = [right[0], (right[1] + 1) % 6, right[2]]  # the second draft is wrong
    cache = target.new_cache()
    target(torch.tensor([context[:-1]]), cache)  # prefill: everything but the last token
    logits = target(torch.tensor([context[-1:] + drafts]), cache)[0]
    n, token = greedy_verify(logits, torch.tensor(drafts))
    cache.truncate(len(context) + n)
    context = context + drafts[:n] + [token]
    assert (n, token) == (1, right[1])
    assert cache.length == len(context) - 1  # the loop's invariant
    after_rollback = target(torch.tensor([context[-1:]]), cache)[0, -1]
    fresh = target(torch.tensor([context]))[0, -1]
    assert torch.allclose(after_rollback, fresh, atol=ATOL, rtol=0)


class CheckedTarget:
    """Wraps a target model; on every call checks that the cache holds exactly the accepted context but its last
    token (the first call: nothing, and it carries the prompt), that the call feeds the rest of the context and the
    drafts, and that the logits equal a cache-free forward over them."""

    def __init__(self, model, drafter: ScriptedDrafter):
        self.model, self.drafter, self.checked = model, drafter, 0

    def __getattr__(self, name):  # device, new_cache, config: the model's
        return getattr(self.model, name)

    def __call__(self, tokens, cache, logits_to_keep=0):
        context, drafts = self.drafter.contexts[-1], self.drafter.proposals[-1]
        assert cache.length == (len(context) - 1 if self.checked else 0)
        assert tokens[0].tolist() == context[cache.length :] + drafts and logits_to_keep == len(drafts) + 1
        logits = self.model(tokens, cache, logits_to_keep=logits_to_keep)
        fresh = self.model(torch.tensor([context + drafts]))[:, -logits_to_keep:]
        assert torch.allclose(logits, fresh, atol=ATOL, rtol=0)
        self.checked += 1
        return logits


@pytest.mark.parametrize("gamma", [1, 2, 3])
def test_every_verification_runs_on_a_cache_of_exactly_the_accepted_text(gamma):
    target, prompt, n_new = toy_target(), [1, 2, 3], 12
    right = generate(target, prompt, n_new, temperature=0)

    def script(step, context):  # step k proposes k % (gamma + 1) right tokens, then wrong ones
        done, n_right = len(context) - len(prompt), step % (gamma + 1)
        return [
            right[done + i] if i < n_right else (right[done + i] + 1) % 6 for i in range(min(gamma, n_new - done - 1))
        ]

    drafter = ScriptedDrafter(script)
    checked = CheckedTarget(target, drafter)
    out, stats = speculative_generate(checked, drafter, prompt, n_new, gamma=gamma, temperature=0)
    assert out == right
    assert checked.checked == stats.target_calls > 1
    assert len(stats.accept_counts) == gamma + 1 and all(stats.accept_counts)  # every rollback, and full accepts


class CountingTarget:
    """Wraps a target model and counts its forwards."""

    def __init__(self, model):
        self.model, self.forwards = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kw):
        self.forwards += 1
        return self.model(*args, **kw)


@pytest.mark.parametrize("prompt", [[1], [1, 2, 3]])
def test_without_drafts_the_chain_loop_makes_as_many_target_forwards_as_generate(prompt):
    """No prefill call on top of generate's one forward per token: the first verify call carries the prompt."""
    target, n_new = toy_target(), 9
    plain, spec = CountingTarget(target), CountingTarget(target)
    right = generate(plain, prompt, n_new, temperature=0)
    out, stats = speculative_generate(spec, ScriptedDrafter(lambda step, context: []), prompt, n_new, temperature=0)
    assert out == right and spec.forwards == plain.forwards == n_new == stats.target_calls
    assert stats.prefill_calls == (len(prompt) > 1)


def assert_cache_holds(cache, model, tokens: list[int]) -> None:
    """The cache holds exactly `tokens`: its length, and K/V equal to a fresh prefill of them."""
    fresh = model.new_cache()
    model(torch.tensor([tokens]), fresh)
    assert cache.length == len(tokens)
    for ours, theirs in zip(cache.k + cache.v, fresh.k + fresh.v):
        assert torch.allclose(ours[:, :, : len(tokens)], theirs[:, :, : len(tokens)], atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_accepted", [0, 1, 2, 3])
@torch.inference_mode()
def test_model_drafter_cache_after_accept_holds_context_and_accepted_drafts(n_accepted):
    draft, context, gamma, greedy = toy_draft(), [1, 2, 3, 4], 3, warp_for(0, 0, 1.0)
    drafter = ModelDrafter(draft)
    drafter.reset()
    drafts, _ = drafter.propose(context, gamma, greedy, None)
    drafter.accept(n_accepted)
    # the last draft is never fed to the draft model, so a full accept keeps one fewer
    assert_cache_holds(drafter.cache, draft, context + drafts[: min(n_accepted, gamma - 1)])
    # next round: the target's correction (or bonus token) follows the accepted drafts
    correction = (drafts[n_accepted] + 1) % 6 if n_accepted < gamma else 0
    next_context = context + drafts[:n_accepted] + [correction]
    fresh_drafter = ModelDrafter(draft)
    fresh_drafter.reset()
    tokens, q = drafter.propose(next_context, gamma, greedy, None)
    fresh_tokens, fresh_q = fresh_drafter.propose(next_context, gamma, greedy, None)
    assert tokens == fresh_tokens and torch.equal(q, fresh_q)


# ---------------------------------------------------------------------------------------------------------------
# 3. End to end: the speculative output is distributed exactly as the target's (chi-square over all V^3
# continuations of 3 tokens), and the same test rejects broken verifiers and a drafter that misreports q.

WARPINGS = {"T1": dict(temperature=1.0), "T0.8-k4-p0.9": dict(temperature=0.8, top_k=4, top_p=0.9)}
N_TRUE, N_BROKEN = 20_000, 1_000


def softmaxed_residual(p, q, draft_tokens, generator):
    """BROKEN: speculative sampling with the residual softmax(p - q) instead of norm(max(0, p - q))."""
    for i, x in enumerate(draft_tokens.tolist()):
        q_i = q[i] if q is not None else torch.nn.functional.one_hot(torch.tensor(x), p.shape[-1]).float()
        if torch.rand(1, generator=generator).item() < acceptance_probability(p[i, x], q_i[x]).item():
            continue
        return i, sample_token(torch.softmax(p[i] - q_i, dim=-1), generator)
    return len(draft_tokens), sample_token(p[len(draft_tokens)], generator)


def speculative_chi_square(drafter, prompt, warping, n_samples, seed=0, **opts):
    """(statistic, critical value, dof, summed Stats) of n_samples 3-token continuations from speculative_generate
    against the target's exact joint distribution. `opts` go to speculative_generate (a verifier, a draft length)."""
    target = toy_target()
    samples, stats = sample_speculative(
        target, drafter, prompt, 3, n_samples, seed, eot=None, **{"gamma": 2, **warping, **opts}
    )
    stat, dof = chi_square(samples, exact_joint(target, prompt, 3, **warping))
    return stat, chi_square_critical(dof), dof, stats


@pytest.mark.slow
@pytest.mark.parametrize("warping", WARPINGS.values(), ids=WARPINGS.keys())
@pytest.mark.parametrize("drafter", ["model", "pld"])
def test_speculative_sampling_reproduces_the_target_distribution(drafter, warping):
    stat, critical, dof, stats = speculative_chi_square(toy_drafter(drafter), TOY_PROMPTS[drafter], warping, N_TRUE)
    print(
        f"{drafter} {warping}: chi2 {stat:.1f} < {critical:.1f} (dof {dof}); accepted per call {stats.accept_counts}"
        f"; acceptance {stats.acceptance_rate:.3f}, theory {stats.predicted_acceptance_rate:.3f}"
    )
    assert stat < critical, f"chi2 = {stat:.1f} >= {critical:.1f} (dof {dof})"
    assert all(stats.accept_counts[:3])  # every path taken: rejection at once, partial accept, bonus token
    assert acceptance_matches_theory(stats)


@pytest.mark.slow
@pytest.mark.parametrize("broken", [accept_every_draft, softmaxed_residual], ids=lambda f: f.__name__)
@pytest.mark.parametrize("warping", WARPINGS.values(), ids=WARPINGS.keys())
@pytest.mark.parametrize("kind", ["model", "pld"])
def test_distribution_test_rejects_a_broken_verifier(kind, warping, broken):
    stat, critical, dof, stats = speculative_chi_square(
        toy_drafter(kind), TOY_PROMPTS[kind], warping, N_BROKEN, verifier=BrokenRule(chain_fn=broken)
    )
    print(f"{broken.__name__} {kind} {warping}: chi2 {stat:.1f} > {critical:.1f} (dof {dof})")
    assert stat > critical, f"broken verifier not detected: chi2 = {stat:.1f} <= {critical:.1f} (dof {dof})"
    if broken is accept_every_draft:  # the acceptance check has power too (a wrong residual leaves it alone)
        assert not acceptance_matches_theory(stats)


@pytest.mark.slow
def test_distribution_test_rejects_a_drafter_whose_q_is_not_what_it_sampled_from():
    stat, critical, dof, _ = speculative_chi_square(
        MisreportingDrafter(toy_draft()), MODEL_PROMPT, WARPINGS["T0.8-k4-p0.9"], 2 * N_BROKEN
    )
    print(f"misreported q: chi2 {stat:.1f} > {critical:.1f} (dof {dof})")
    assert stat > critical, f"misreported q not detected: chi2 = {stat:.1f} <= {critical:.1f} (dof {dof})"


def test_chi_square_critical_values_match_the_table():
    table = {10: 29.588, 20: 45.315, 36: 67.985, 50: 86.661, 100: 149.449, 200: 267.541}  # scipy chi2.ppf(0.999)
    for dof, value in table.items():
        assert value <= chi_square_critical(dof) < 1.01 * value  # Wilson-Hilferty: close, and never too lenient


def test_exact_joint_is_a_distribution_that_agrees_with_the_cached_forward():
    target = toy_target()
    joint = exact_joint(target, MODEL_PROMPT, 3, temperature=1.0)
    assert joint.sum() == pytest.approx(1.0, abs=1e-6)
    cache = target.new_cache()
    with torch.inference_mode():
        first = torch.softmax(target(torch.tensor([MODEL_PROMPT]), cache)[0, -1], dim=-1).double().numpy()
    assert np.allclose(joint.sum(axis=(1, 2)), first, atol=1e-6)


def test_sampling_is_deterministic_in_the_generator_seed():
    target, drafter = toy_target(), ModelDrafter(toy_draft())
    runs = [
        speculative_generate(target, drafter, MODEL_PROMPT, 10, temperature=1.0, generator=seeded(s))[0]
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.parametrize("loop", ["chain", "tree"])
def test_sampled_prompt_lookup_emits_what_autoregressive_sampling_emits_for_the_seed(loop):
    # The deterministic drafts are matched against the target's own draws (verify.sample_match_verify), one draw
    # per emitted token, as generate draws them: the same text for a seed, whatever was drafted and accepted.
    target, accepted = toy_target(), 0
    for seed in range(8):
        reference = generate(target, PLD_PROMPT, 12, temperature=1.0, generator=seeded(seed))
        out, s = sample_lookup(target, loop, seed)
        assert out == reference
        accepted += s.accepted
    assert accepted > 0  # drafts were kept, not only corrected


@pytest.mark.parametrize("loop", ["chain", "tree"])
def test_rejection_sampling_of_the_same_drafts_gives_other_texts_for_the_same_seeds(loop):
    # The test above can fail: rejection sampling draws the same distribution with other random numbers.
    target = toy_target()
    outputs = [sample_lookup(target, loop, seed, SpeculativeSampling())[0] for seed in range(8)]
    assert outputs != [generate(target, PLD_PROMPT, 12, temperature=1.0, generator=seeded(s)) for s in range(8)]


def sample_lookup(target, loop: str, seed: int, verifier=None):
    """Prompt lookup on the toy target at temperature 1, up to 12 tokens, by the chain or the tree loop."""
    decode = speculative_generate if loop == "chain" else tree_speculative_generate
    more = {"gamma": 3} if loop == "chain" else {}
    return decode(
        target,
        PromptLookupDrafter(),
        PLD_PROMPT,
        12,
        temperature=1.0,
        generator=seeded(seed),
        verifier=verifier,
        **more,
    )


# ---------------------------------------------------------------------------------------------------------------
# 4. Statistics.


@pytest.mark.parametrize("drafter", ["model", "pld"])
def test_stats_are_consistent_with_what_was_emitted(drafter):
    target, prompt = toy_target(), TOY_PROMPTS[drafter]
    out, s = speculative_generate(
        target, toy_drafter(drafter), prompt, 10, gamma=3, temperature=1.0, generator=seeded(0)
    )
    assert s.produced == len(out) == 10
    assert s.tau == s.produced / s.target_calls
    assert s.acceptance_rate == s.accepted / s.compared
    assert sum(s.accept_counts) == s.target_calls
    assert sum(n * c for n, c in enumerate(s.accept_counts)) == s.accepted
    assert s.accepted <= s.compared <= s.drafted
    assert s.produced == s.accepted + s.target_calls  # no end of text: one target token per call


def test_mean_accepted_length_and_acceptance_by_position_follow_their_definitions():
    s = Stats()
    # (drafted, accepted, compared): a rejection at the first draft, one at the third, a full accept of four
    for drafted, accepted, compared in ((4, 0, 1), (4, 2, 3), (4, 4, 4)):
        s.record(
            drafted=drafted,
            accepted=accepted,
            compared=compared,
            produced=accepted + 1,
            draft_seconds=0.0,
            verify_seconds=0.0,
        )
    assert s.mean_accepted_length == (0 + 2 + 4 + 3) / 3  # accepted drafts + 1 per target call
    # position 1 was compared in all three calls and accepted in two; position 3 compared twice, accepted once
    assert [s.acceptance_at(i) for i in range(4)] == [2 / 3, 2 / 2, 1 / 2, 1 / 1]
    merged = Stats()
    merged.merge(s)
    merged.merge(s)
    assert [merged.acceptance_at(i) for i in range(4)] == [s.acceptance_at(i) for i in range(4)]
    assert merged.compare_counts == [2 * c for c in s.compare_counts]


def test_predicted_acceptance_equals_measured_at_temperature_0():
    target, prompt = toy_target(), MODEL_PROMPT
    _, s = speculative_generate(target, ModelDrafter(toy_draft()), prompt, 13, gamma=3, temperature=0)
    assert 0 < s.acceptance_rate < 1  # both outcomes happened
    assert s.predicted_acceptance_rate == s.acceptance_rate  # p and q one-hot: sum min(p, q) is 1 or 0


def test_predicted_acceptance_of_a_deterministic_draft_is_p_of_the_draft():
    p = torch.softmax(torch.randn(4, 6, generator=seeded(0)), dim=-1)
    drafts = torch.tensor([5, 0, 3])
    one_hot = torch.nn.functional.one_hot(drafts, 6).float()
    assert theory_acceptance(p, None, drafts) == pytest.approx(theory_acceptance(p, one_hot, drafts), abs=1e-6)
    assert theory_acceptance(p, None, drafts) == pytest.approx(float(p[0, 5] + p[1, 0] + p[2, 3]), abs=1e-6)


def test_on_tokens_streams_exactly_the_output():
    streamed, drafted = [], 0

    def on_tokens(tokens, n_drafted):
        nonlocal drafted
        streamed.extend(tokens)
        drafted += n_drafted
        assert 0 <= n_drafted <= len(tokens)

    out, s = speculative_generate(
        toy_target(),
        ModelDrafter(toy_draft()),
        MODEL_PROMPT,
        12,
        gamma=3,
        temperature=1.0,
        generator=seeded(1),
        on_tokens=on_tokens,
    )
    assert streamed == out and drafted == s.accepted


# ---------------------------------------------------------------------------------------------------------------
# 5. Stopping rules and limits.


@pytest.mark.parametrize("n_new", [1, 2, 5, 9])
@pytest.mark.parametrize("drafter", ["model", "pld"])
def test_max_new_tokens_stops_exactly(drafter, n_new):
    target, prompt = toy_target(), TOY_PROMPTS[drafter]
    assert len(generate(target, prompt, n_new, temperature=1.0, generator=seeded(0))) == n_new
    for gamma in (1, 3, 8):
        out, _ = speculative_generate(
            target, toy_drafter(drafter), prompt, n_new, gamma=gamma, temperature=1.0, generator=seeded(gamma)
        )
        assert len(out) == n_new


@pytest.mark.parametrize("drafter", ["model", "pld"])
def test_greedy_loops_stop_at_eot_identically_and_drop_it(drafter):
    target, prompt = toy_target(seed=0), [1, 2, 3]  # this target's greedy continuation varies: 4 1 0 0 1 3 3 ...
    free = generate(target, prompt, 10, temperature=0)
    eot = max(set(free), key=free.index)  # the token that shows up last: the longest stop-free prefix
    expected = free[: free.index(eot)]
    assert 3 < len(expected) < 10
    assert generate(target, prompt, 10, temperature=0, eot=eot) == expected
    for gamma in (1, 2, 4):
        out, stats = speculative_generate(
            target, toy_drafter(drafter, seed=0), prompt, 10, gamma=gamma, temperature=0, eot=eot
        )
        assert out == expected and stats.produced == len(out)


def test_sampled_output_stops_at_eot_and_never_contains_it():
    target, eot, stopped = toy_target(), 4, 0
    for seed in range(10):
        out, stats = speculative_generate(
            target, ModelDrafter(toy_draft()), MODEL_PROMPT, 10, temperature=1.0, generator=seeded(seed), eot=eot
        )
        assert eot not in out and stats.produced == len(out)
        stopped += len(out) < 10
        assert eot not in generate(target, MODEL_PROMPT, 10, temperature=1.0, generator=seeded(seed), eot=eot)
    assert stopped > 0  # the end of text did come up


@pytest.mark.parametrize("room", [0, 1, 3])
@pytest.mark.parametrize("drafter", ["model", "pld"])
def test_prompt_near_the_context_limit_fills_it_without_overflow(drafter, room):
    target = toy_target()
    prompt = ([1, 2, 3, 1, 2, 3] * 3)[: target.config.max_position_embeddings - room]  # repeats: PLD drafts
    expected = generate(target, prompt, 10, temperature=0)
    assert len(expected) == room
    for gamma in (1, 2, 5):
        out, _ = speculative_generate(target, toy_drafter(drafter), prompt, 10, gamma=gamma, temperature=0)
        assert out == expected
        out, _ = speculative_generate(
            target, toy_drafter(drafter), prompt, 10, gamma=gamma, temperature=1.0, generator=seeded(gamma)
        )
        assert len(out) == room
    assert len(generate(target, prompt, 10, temperature=1.0, generator=seeded(0))) == room


class GammaSpy:
    """Passes everything to a drafter; records (tokens generated so far, gamma asked for) at each step."""

    def __init__(self, drafter, prompt_len: int):
        self.drafter, self.prompt_len, self.asked = drafter, prompt_len, []

    def reset(self):
        self.drafter.reset()

    def propose(self, context, gamma, warp, generator, keep):
        self.asked.append((len(context) - self.prompt_len, gamma))
        return self.drafter.propose(context, gamma, warp, generator, keep)

    def accept(self, n_accepted):
        self.drafter.accept(n_accepted)


@pytest.mark.parametrize("drafter", ["model", "pld"])
def test_gamma_larger_than_the_remaining_budget_is_fine(drafter):
    target, prompt, n_new = toy_target(), TOY_PROMPTS[drafter], 3
    spy = GammaSpy(toy_drafter(drafter), len(prompt))
    out, _ = speculative_generate(target, spy, prompt, n_new, gamma=10, temperature=0)
    assert out == generate(target, prompt, n_new, temperature=0)
    # never more drafts than the budget can use: its last token is always the target's own
    assert all(gamma == n_new - done - 1 for done, gamma in spy.asked)
