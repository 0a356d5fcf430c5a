"""Tests for contrastive.py, Speculative Contrastive Decoding (Yuan et al. 2023), a LOSSY rule: p_cd is the
contrast of target and draft on the plausible head; the sampled output follows p_cd exactly (chi-square at a fixed
seed, function by function and in the loop), and the same test rejects a rule that takes the bonus token from the
target or the residual from p; the output is detectably not the target's; beta = 0, alpha = 0 is exact speculative
sampling draw for draw; it is labelled LOSSY wherever it is shown; the command line takes it only with a drafter
that has a q, on chains, at -t > 0, without top-k/top-p. p = target (expert), q = draft (amateur)."""

import numpy as np
import pytest
import table
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cli
import specdec
from contrastive import Contrastive, contrastive_distribution, contrastive_sample, plausible_head
from drafters import ModelDrafter
from methods import VERIFIERS, UsageError
from tests.test_verify import assert_detects, assert_matches, dirichlet_rows
from tests.toy import BrokenRule, chi_square, chi_square_critical, exact_joint, perturbed, toy_model
from verify import SpeculativeSampling, acceptance_probability, residual_distribution, sample_token

no_deadline = settings(deadline=None, max_examples=60)
pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


rows = st.integers(2, 6).flatmap(
    lambda v: st.tuples(
        st.lists(st.floats(-4, 4, width=32), min_size=v, max_size=v),
        st.lists(st.floats(-4, 4, width=32), min_size=v, max_size=v),
    )
)


# ---------------------------------------------------------------------------------------------------------------
# 1. The contrastive distribution.


@no_deadline
@given(rows, st.floats(0, 1), st.floats(0, 3))
def test_contrastive_distribution_is_the_contrast_on_the_plausible_head(pair, alpha, beta):
    p, q = (torch.softmax(torch.tensor(r), dim=-1) for r in pair)
    cd = contrastive_distribution(p, q, alpha, beta)
    head = plausible_head(p, alpha)
    assert torch.isclose(cd.sum(), torch.tensor(1.0)) and (cd[~head] == 0).all() and (cd[head] > 0).all()
    assert head[p.argmax()] and (p[head] >= alpha * p.max()).all() and (p[~head] < alpha * p.max()).all()
    weight = p[head] ** (1 + beta) / q[head] ** beta  # softmax((1 + beta) log p - beta log q) on the head
    torch.testing.assert_close(cd[head], weight / weight.sum(), rtol=1e-4, atol=1e-6)


def test_the_exact_end_is_p_itself_and_a_zero_of_q_on_the_head_is_the_limit():
    p, q = torch.tensor([0.5, 0.3, 0.15, 0.05]), torch.tensor([0.2, 0.0, 0.8, 0.0])
    assert contrastive_distribution(p, q, 0.0, 0.0) is p  # bit for bit
    head = contrastive_distribution(p, None, 0.2, 0.0)  # beta = 0: the target's plausible head, no q needed
    torch.testing.assert_close(head, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    limit = contrastive_distribution(p, q, 0.0, 0.5)  # tokens 1, 3: q = 0 < p, an infinite contrast
    w = torch.tensor([0.0, 0.3**1.5, 0.0, 0.05**1.5])
    torch.testing.assert_close(limit, w / w.sum())
    eps = torch.tensor([0.2, 1e-12, 0.8, 1e-12])
    torch.testing.assert_close(contrastive_distribution(p, eps / eps.sum(), 0.0, 0.5), limit, atol=1e-4, rtol=0)


@no_deadline
@given(st.integers(0, 5), st.integers(0, 2**32), st.integers(0, 2**32))
def test_beta_and_alpha_zero_is_exact_speculative_sampling_draw_for_draw(gamma, data_seed, seed):
    vocab = 5
    p = dirichlet_rows(data_seed % 1000, gamma + 1, vocab)
    q = dirichlet_rows(data_seed % 1000 + 1, max(gamma, 1), vocab)[:gamma]
    drafts = torch.multinomial(q, 1, generator=seeded(seed))[:, 0] if gamma else torch.zeros(0, dtype=torch.long)
    q = q if gamma else None
    exact = SpeculativeSampling().chain(None, p, q, drafts, seeded(seed))
    assert Contrastive(0.0, 0.0).chain(None, p, q, drafts, seeded(seed)) == exact


# ---------------------------------------------------------------------------------------------------------------
# 2. The law, function by function. Position 1: target row P1, draft row Q1; position 2 after token t: P2[t], Q2[t].
# A step drafts gamma tokens (x1 ~ Q1, x2 ~ Q2[x1]); when it emits one token only, the next step drafts one from the
# row after it. The first two emitted tokens must follow p_cd(x1) p_cd(x2 | x1).

V, ALPHA, BETA, TRIALS, BROKEN_TRIALS = 5, 0.1, 0.5, 8_000, 3_000
P1, Q1 = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1]), torch.tensor([0.4, 0.1, 0.15, 0.3, 0.05])
P2, Q2 = dirichlet_rows(seed=21, rows=V, vocab=V), dirichlet_rows(seed=22, rows=V, vocab=V)
P3 = dirichlet_rows(seed=23, rows=1, vocab=V)[0]
CD1 = contrastive_distribution(P1, Q1, ALPHA, BETA)
CD_JOINT = (CD1[:, None] * contrastive_distribution(P2, Q2, ALPHA, BETA)).flatten().numpy()
TARGET_JOINT = (P1[:, None] * P2).flatten().numpy()


def first_two_tokens(rule, gamma: int, trials: int, seed: int = 30) -> np.ndarray:
    """x1 * V + x2 of the first two emitted tokens; rule(target [γ+1, V], q [γ, V], drafts [γ], g) -> (n, token)."""
    g, out = seeded(seed), np.empty(trials, dtype=np.int64)
    for t in range(trials):
        x1 = int(torch.multinomial(Q1, 1, generator=g))
        x2 = int(torch.multinomial(Q2[x1], 1, generator=g))
        target, q, drafts = torch.stack([P1, P2[x1], P3]), torch.stack([Q1, Q2[x1]]), torch.tensor([x1, x2])
        n, token = rule(target[: gamma + 1], q[:gamma], drafts[:gamma], g)
        emitted = drafts[:n].tolist() + [token]
        if len(emitted) == 1:
            e = emitted[0]
            y = torch.multinomial(Q2[e], 1, generator=g)
            emitted.append(rule(torch.stack([P2[e], P3]), Q2[e][None], y, g)[1])
        out[t] = emitted[0] * V + emitted[1]
    return out


def scd(target, q, drafts, g):
    return contrastive_sample(target, q, drafts, g, ALPHA, BETA)


def bonus_from_the_target(target, q, drafts, g):
    """BROKEN: p_cd at the drafts, but after a full accept the bonus token comes from the target's own row."""
    if not len(drafts):  # a step without drafts, as the rule does it
        return scd(target, q, drafts, g)
    p_cd = contrastive_distribution(target[: len(drafts)], q, ALPHA, BETA)
    return speculative_sample_rows(torch.cat([p_cd, target[len(drafts) :]]), q, drafts, g, p_cd)


def residual_of_the_target(target, q, drafts, g):
    """BROKEN: accepts against p_cd, but a rejection samples norm(max(0, p - q)) of the target."""
    return speculative_sample_rows(contrastive_distribution(target, q, ALPHA, BETA), q, drafts, g, target)


def speculative_sample_rows(accept_rows, q, drafts, g, residual_rows):
    """Speculative sampling that accepts against accept_rows, resamples from residual_rows; bonus: the last row."""
    for i, x in enumerate(drafts.tolist()):
        if torch.rand(1, generator=g).item() < acceptance_probability(accept_rows[i, x], q[i, x]).item():
            continue
        return i, sample_token(residual_distribution(residual_rows[i], q[i]), g)
    return len(drafts), sample_token(accept_rows[len(drafts)], g)


@pytest.mark.parametrize("gamma", [1, 2])
def test_the_output_follows_the_contrastive_distribution_and_not_the_target(gamma):
    joint = first_two_tokens(scd, gamma, TRIALS)
    assert_matches(joint // V, CD1.numpy())
    assert_matches(joint, CD_JOINT)
    assert_detects(joint, TARGET_JOINT)  # LOSSY: detectably not the target's law


@pytest.mark.parametrize("broken", [bonus_from_the_target, residual_of_the_target], ids=lambda f: f.__name__)
def test_the_same_test_rejects_a_broken_rule(broken):
    assert_detects(first_two_tokens(broken, 1, BROKEN_TRIALS), CD_JOINT)


def test_a_full_accept_ends_on_the_last_draft_and_no_draft_samples_the_plausible_head():
    p = torch.stack([P1, P2[0], P3])
    q = torch.stack([P1, P2[0]])  # q = p on the head's tokens is accepted often
    ends = {contrastive_sample(p, q, torch.tensor([0, 1]), seeded(s), ALPHA, BETA)[0] for s in range(200)}
    assert 1 in ends and ends <= {0, 1}  # n <= gamma - 1: never a bonus token
    draws = {
        contrastive_sample(P1[None], None, torch.zeros(0, dtype=torch.long), seeded(s), 0.9, BETA)[1] for s in range(50)
    }
    assert draws == {0}  # only P1's argmax is within 0.9 of it


# ---------------------------------------------------------------------------------------------------------------
# 3. In the chain loop on toy models: the draft model is the amateur.

N_LOOP, N_BROKEN_LOOP, PROMPT = 800, 600, [1, 2, 3]


@torch.inference_mode()
def contrastive_joint(target, draft, prompt: list[int]) -> np.ndarray:
    """p_cd(x1) p_cd(x2 | x1) of two tokens, from cache-free forwards of both models (temperature 1)."""
    first = contrastive_distribution(
        *(torch.softmax(m(torch.tensor([prompt]))[0, -1], -1) for m in (target, draft)), ALPHA, BETA
    )
    after = torch.tensor([prompt + [x] for x in range(len(first))])
    second = contrastive_distribution(*(torch.softmax(m(after)[:, -1], -1) for m in (target, draft)), ALPHA, BETA)
    return (first[:, None] * second).double().numpy()


def loop_chi_square(verifier, gamma: int, n_samples: int, seed: int = 40) -> dict[str, tuple[float, float]]:
    """(statistic, critical value) of the first two of three tokens against p_cd's joint and the target's."""
    target = toy_model(seed=2)
    draft = perturbed(target, seed=100, noise=0.6)
    drafter, g, out = ModelDrafter(draft), seeded(seed), np.empty((n_samples, 2), dtype=np.int64)
    for i in range(n_samples):
        tokens, _ = specdec.speculative_generate(
            target, drafter, PROMPT, 3, gamma=gamma, temperature=1.0, generator=g, eot=None, verifier=verifier
        )
        out[i] = tokens[:2]  # the third may come from a step without drafts: the target's plausible head
    laws = {
        "contrast": contrastive_joint(target, draft, PROMPT),
        "target": exact_joint(target, PROMPT, 2, temperature=1.0),
    }
    return {
        name: (stat, chi_square_critical(dof))
        for name, (stat, dof) in ((n, chi_square(out, j)) for n, j in laws.items())
    }


@pytest.mark.parametrize("gamma", [1, 2])
def test_in_the_loop_the_output_follows_the_contrast_of_target_and_draft(gamma):
    chi = loop_chi_square(Contrastive(ALPHA, BETA), gamma, N_LOOP)
    print(f"contrastive in the loop, gamma {gamma}: {chi}")
    assert chi["contrast"][0] < chi["contrast"][1]
    assert chi["target"][0] > chi["target"][1]  # LOSSY


def test_in_the_loop_the_same_test_rejects_a_bonus_token_from_the_target():
    # gamma 1: the first step's full accept is followed by the bonus token, the second of the two tokens tested
    chi = loop_chi_square(BrokenRule(chain_fn=bonus_from_the_target), 1, N_BROKEN_LOOP)
    print(f"bonus from the target in the loop: {chi}")
    assert chi["contrast"][0] > chi["contrast"][1]


def test_the_exact_end_in_the_loop_equals_speculative_sampling_on_the_shipped_weights(short_references):
    enc, target, references = short_references
    draft = table.drafter("draft", target)
    for prompt, _ in references[:2]:
        runs = [
            specdec.speculative_generate(
                target, draft, prompt, 16, temperature=1.0, generator=seeded(3), eot=enc.eot_token, verifier=rule
            )[0]
            for rule in (Contrastive(0.0, 0.0), SpeculativeSampling())
        ]
        assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------------------------------------
# 4. Labels and the command line.


def test_it_is_labelled_lossy_with_the_papers_defaults():
    entry = VERIFIERS["contrastive"]
    assert entry.lossy and entry.summary.startswith("LOSSY:") and Contrastive.lossy
    assert "LOSSY" in Contrastive.__doc__ and "LOSSY" in __import__("contrastive").__doc__
    args, _ = cli.parse_args(["-p", "x"])
    assert (args.contrastive_alpha, args.contrastive_beta) == (0.1, 0.5) == (Contrastive().alpha, Contrastive().beta)


REFUSED = {
    "greedy": ([], "-t > 0"),
    "no draft distribution": (["-t", "1", "-d", "pld"], "reads the draft's distribution"),
    "a tree": (["-t", "1", "--tree"], "verifies chains"),
}


@pytest.mark.parametrize("case", REFUSED.keys())
def test_the_command_line_refuses_it_where_it_does_not_apply(case):
    flags, message = REFUSED[case]
    with pytest.raises(UsageError, match=message):
        cli.choose(*cli.parse_args(["-p", "x", "-v", "contrastive", *flags]))


def test_the_stats_footer_says_lossy_and_top_k_is_refused(capsys):
    cli.main(["-p", "def parse(s):", "-n", "8", "-t", "1", "-v", "contrastive", "--no-color", "--device", "cpu"])
    assert "[verification: contrastive (LOSSY" in capsys.readouterr().out
    with pytest.raises(UsageError, match="drop --top-k and --top-p"):
        cli.main(["-p", "x", "-n", "8", "-t", "1", "-k", "20", "-v", "contrastive", "--device", "cpu"])
