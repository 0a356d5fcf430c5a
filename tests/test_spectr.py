"""Tests for spectr.py, SpecTr's k-sequential draft selection (K-SEQ, Sun et al. 2023): rho* is the smallest valid
rho in [1, k]; the rule reproduces p exactly (an identity over random p, q, k); sampled over freshly drawn trees its
first two tokens follow the target, and the same test rejects a wrong rho (1) and wrong residuals at the same seed,
while rho = k with its own residual is lossless and only accepts less; the exact acceptance of K-SEQ and of
SpecInfer's recursive rule agree with Monte Carlo on the same trees; at temperature 0 it is greedy tree
verification; in the loop on a toy model it keeps the target's law; the command line takes it only where it
applies. p = target, q = draft (Leviathan et al.)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cli
import specdec
from drafters import ModelDrafter
from methods import UsageError
from spectr import (
    SpecTr,
    expected_accepted_length,
    kseq_acceptance,
    kseq_residual,
    kseq_rho,
    kseq_select,
    recursive_acceptance,
    tree_kseq_sample,
)
from tests.test_verify import assert_detects, assert_matches, dirichlet_rows
from tests.toy import BrokenRule, chi_square, chi_square_critical, exact_joint, perturbed, toy_model
from tree import Tree, children
from verify import (
    acceptance_probability,
    probs_from_logits,
    residual_distribution,
    sample_token,
    speculative_sample,
    tree_greedy_verify,
    tree_speculative_sample,
)

no_deadline = settings(deadline=None, max_examples=60)
pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def distribution_pairs(draw):
    """(p, q, k): distributions on 2..6 tokens with zeros and one-hots (integer weights), p == q included."""
    vocab = draw(st.integers(2, 6))
    weights = st.lists(st.integers(0, 4), min_size=vocab, max_size=vocab).filter(lambda w: sum(w) > 0)
    p = torch.tensor(draw(weights), dtype=torch.float32)
    q = p.clone() if draw(st.booleans()) else torch.tensor(draw(weights), dtype=torch.float32)
    return p / p.sum(), q / q.sum(), draw(st.integers(1, 5))


def emitted_law(p: torch.Tensor, q: torch.Tensor, k: int, rho: float, residual: torch.Tensor) -> torch.Tensor:
    """What K-SEQ emits, exactly: the i-th try is reached with (1 - beta)^(i - 1) and keeps x with
    min(q(x), p(x) / rho); after k misses, the residual."""
    accepted = torch.minimum(q, p / rho)
    beta = accepted.sum()
    return sum((1 - beta) ** i for i in range(k)) * accepted + (1 - beta) ** k * residual


def condition(p: torch.Tensor, q: torch.Tensor, k: int, rho: float) -> float:
    """rho beta(rho) - (1 - (1 - beta(rho))^k): >= 0 exactly where p_res is a distribution."""
    beta = float(torch.minimum(q.double(), p.double() / rho).sum())
    return rho * beta - (1 - (1 - beta) ** k)


# ---------------------------------------------------------------------------------------------------------------
# 1. rho* and the exact identity.


@no_deadline
@given(distribution_pairs())
def test_rho_is_the_smallest_valid_rho_in_one_to_k(pqk):
    p, q, k = pqk
    rho = kseq_rho(p, q, k)
    assert 1.0 <= rho <= k
    assert condition(p, q, k, rho) >= -1e-9
    grid = np.linspace(1.0, rho, 200)[:-1]
    if rho > 1 + 1e-6:  # everything below rho* is invalid: rho* is the paper's choice, the largest acceptance
        assert all(condition(p, q, k, r) < 1e-9 for r in grid)
        assert condition(p, q, k, rho - 1e-6) < 0


@no_deadline
@given(distribution_pairs())
def test_kseq_reproduces_the_target_exactly_at_rho_star_and_at_k(pqk):
    p, q, k = pqk
    for rho in (kseq_rho(p, q, k), float(k)):  # any valid rho with ITS residual is lossless
        torch.testing.assert_close(emitted_law(p, q, k, rho, kseq_residual(p, q, rho, k)), p, atol=1e-5, rtol=0)
    assert kseq_acceptance(p, q, k) >= 1 - (1 - float(torch.minimum(q, p / k).sum())) ** k - 1e-6  # rho* beats k


def test_the_identity_fails_for_a_rho_below_rho_star_and_for_other_residuals():
    p, q, k = P1, Q1, 3
    rho = kseq_rho(p, q, k)
    assert rho > 2  # these distributions need a large rho: the variants below are far off
    wrong = {
        "rho 1": emitted_law(p, q, k, 1.0, kseq_residual(p, q, 1.0, k)),
        "SpecInfer's residual": emitted_law(p, q, k, rho, residual_distribution(p, q)),
        "residual of rho = k": emitted_law(p, q, k, rho, kseq_residual(p, q, float(k), k)),
    }
    for name, law in wrong.items():
        assert (law - p).abs().max() > 0.02, name


# ---------------------------------------------------------------------------------------------------------------
# 2. Monte Carlo over freshly drawn trees. Root row P1, children ~ Q1 (k = 3); a child with token t has row P2[t]
# and k2 = 2 children ~ Q2[t]; deeper rows P3. The first two tokens emitted must follow P1(x1) P2(x2 | x1).

V = 4
P1 = torch.tensor([0.3, 0.1, 0.1, 0.5])
Q1 = torch.tensor([0.1, 0.2, 0.6, 0.1])  # far from P1: rho* = 2.2 with k = 3
P2, Q2 = dirichlet_rows(seed=12, rows=V, vocab=V), dirichlet_rows(seed=13, rows=V, vocab=V).flip(-1)
P3 = dirichlet_rows(seed=14, rows=1, vocab=V)[0]
JOINT = (P1[:, None] * P2).flatten().numpy()
K, K2, TRUE_TRIALS, BROKEN_TRIALS = 3, 2, 5_000, 2_000


def fresh_trees(seed: int, trials: int):
    """make_tree(t) -> (target rows, draft rows, tokens, parents): tree t, drawn i.i.d. as described above."""
    g = seeded(seed)
    level1 = torch.multinomial(Q1, trials * K, replacement=True, generator=g).view(trials, K)
    level2 = torch.multinomial(Q2[level1.flatten()], K2, replacement=True, generator=g).view(trials, K * K2)
    parents = torch.tensor([-1] + [0] * K + [1 + c for c in range(K) for _ in range(K2)])
    tokens = torch.cat([torch.zeros(trials, 1, dtype=torch.long), level1, level2], dim=1)

    def make_tree(t: int):
        target = torch.cat([P1[None], P2[level1[t]], P3[None].expand(K * K2, V)])
        draft = torch.cat([Q1[None], Q2[level1[t]], torch.zeros(K * K2, V)])
        return target, draft, tokens[t], parents

    return make_tree


def emitted_tokens(sampler, seed: int, trials: int, second: bool) -> np.ndarray:
    """The first emitted token (x1 * V + x2 for the first two when `second`: if a step emits one token, the next
    starts from a root-only tree, whose token is a sample of P2[x1])."""
    make_tree, g = fresh_trees(seed, trials), seeded(seed + 1)
    out = np.empty(trials, dtype=np.int64)
    for t in range(trials):
        target, draft, tokens, parents = make_tree(t)
        path, token = sampler(target, draft, tokens, parents, g)
        emitted = [int(tokens[i]) for i in path] + [token]
        if second and len(emitted) == 1:
            emitted.append(sample_token(P2[emitted[0]], g))
        out[t] = emitted[0] * V + emitted[1] if second else emitted[0]
    return out


def broken_kseq(bug: str):
    """tree_kseq_sample at the root with one bug (deeper nodes are not reached by the first-token test's answer)."""

    def sample(target, draft, tokens, parents, generator):
        p, q, kids = target[0], draft[0], children(parents.tolist())[0]
        drafts = [int(tokens[c]) for c in kids]
        rho = kseq_rho(p, q, len(drafts))
        accept_rho = {"rho_one": 1.0, "acceptance_at_k_residual_at_rho_star": float(K)}.get(bug, rho)
        for c, x in zip(kids, drafts):
            if torch.rand(1, generator=generator).item() < acceptance_probability(p[x], q[x], accept_rho).item():
                return [c], sample_token(target[c], generator)
        if bug == "specinfer_residual":
            residual = residual_distribution(p, q)
        else:
            residual = kseq_residual(p, q, 1.0 if bug == "rho_one" else rho, len(drafts))
        return [], sample_token(residual, generator)

    return sample


def consistent_rho_k(target, draft, tokens, parents, generator):
    """rho = k at the root, acceptance and residual alike: valid, so lossless, but it accepts less than rho*."""
    kids = children(parents.tolist())[0]
    chosen, token = kseq_select(target[0], draft[0], [int(tokens[c]) for c in kids], generator, rho=float(K))
    return ([kids[chosen]], sample_token(target[kids[chosen]], generator)) if chosen is not None else ([], token)


def test_kseq_over_fresh_trees_follows_the_target():
    joint = emitted_tokens(tree_kseq_sample, seed=20, trials=TRUE_TRIALS, second=True)
    assert_matches(joint // V, P1.numpy())
    assert_matches(joint, JOINT)


@pytest.mark.parametrize("bug", ["rho_one", "specinfer_residual", "acceptance_at_k_residual_at_rho_star"])
def test_the_same_test_rejects_a_wrong_rho_or_residual(bug):
    # Fewer trials than the lossless run: the statistic of a wrong law grows linearly with the trials, so what is
    # detected with BROKEN_TRIALS is detected with TRUE_TRIALS too.
    assert_detects(emitted_tokens(broken_kseq(bug), seed=20, trials=BROKEN_TRIALS, second=False), P1.numpy())


def test_rho_k_with_its_own_residual_is_lossless_and_accepts_less():
    first = emitted_tokens(consistent_rho_k, seed=20, trials=BROKEN_TRIALS, second=False)
    assert_matches(first, P1.numpy())
    at_k = 1 - (1 - float(torch.minimum(Q1, P1 / K).sum())) ** K
    assert at_k < kseq_acceptance(P1, Q1, K) - 0.03  # 0.61 against 0.64


# ---------------------------------------------------------------------------------------------------------------
# 3. Acceptance: K-SEQ against SpecInfer's recursive rule on the same trees, exact and by Monte Carlo.


def test_exact_acceptance_of_both_rules_matches_monte_carlo_on_the_same_trees():
    make_tree, trials = fresh_trees(seed=30, trials=3_000), 3_000
    accepted = {"spectr": 0, "specinfer": 0}
    g = seeded(31)
    for t in range(trials):
        target, draft, tokens, parents = make_tree(t)
        one_level = (target[: K + 1], draft[: K + 1], tokens[: K + 1], parents[: K + 1])  # the root and its k
        accepted["spectr"] += len(tree_kseq_sample(*one_level, g)[0])
        accepted["specinfer"] += len(tree_speculative_sample(*one_level, g)[0])
    exact = {"spectr": kseq_acceptance(P1, Q1, K), "specinfer": recursive_acceptance(P1, Q1, K)}
    for rule, a in exact.items():  # binomial: 4 sigma <= 4 * sqrt(0.25 / trials) = 0.037
        assert abs(accepted[rule] / trials - a) < 0.037, (rule, accepted[rule] / trials, a)
    print(
        f"one level, k = {K}: acceptance SpecTr {exact['spectr']:.3f}, SpecInfer {exact['specinfer']:.3f}; expected "
        f"accepted length of a depth-4 tree of such levels: {expected_accepted_length(exact['spectr'], 4):.2f} vs "
        f"{expected_accepted_length(exact['specinfer'], 4):.2f}"
    )
    assert exact["spectr"] > exact["specinfer"]  # here; not a theorem
    assert expected_accepted_length(0.5, 2) == 1.75  # 1 + 1/2 + 1/4


@no_deadline
@given(distribution_pairs())
def test_one_draft_is_speculative_sampling(pqk):
    p, q, _ = pqk
    assert kseq_rho(p, q, 1) == 1.0
    torch.testing.assert_close(kseq_residual(p, q, 1.0, 1), residual_distribution(p, q), atol=1e-6, rtol=0)
    assert abs(kseq_acceptance(p, q, 1) - recursive_acceptance(p, q, 1)) < 1e-6


def test_a_chain_is_verified_by_speculative_sampling():
    p, q = dirichlet_rows(seed=40, rows=4, vocab=V), dirichlet_rows(seed=41, rows=3, vocab=V)
    drafts = torch.tensor([0, 2, 1])
    for seed in range(20):
        assert SpecTr().chain(None, p, q, drafts, seeded(seed)) == speculative_sample(p, q, drafts, seeded(seed))


@st.composite
def one_hot_trees(draw):
    """Trees as sampled at temperature 0: every child of a node is the argmax of its q (one-hot), p one-hot."""
    n = draw(st.integers(1, 8))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    best_q = draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n))
    logits = torch.tensor(draw(st.lists(st.integers(-2, 2), min_size=n * V, max_size=n * V)), dtype=torch.float32)
    tree = Tree([0] + [best_q[parents[i]] for i in range(1, n)], parents, [0.0] * n)
    tree.q = torch.nn.functional.one_hot(torch.tensor(best_q), V).float()
    return logits.view(n, V), tree


@no_deadline
@given(one_hot_trees(), st.integers(0, 2**32))
def test_at_temperature_zero_it_is_greedy_tree_verification(case, seed):
    logits, tree = case
    path, token = SpecTr().tree(logits, probs_from_logits(logits, 0.0), tree, seeded(seed))
    assert (path, token) == tree_greedy_verify(logits, torch.tensor(tree.tokens), torch.tensor(tree.parents))


def test_randomness_comes_only_from_the_generator_and_deterministic_siblings_are_refused():
    target, draft, tokens, parents = fresh_trees(seed=50, trials=1)(0)
    tree = Tree(tokens.tolist(), parents.tolist(), [0.0] * len(tokens), draft)
    runs = []
    for reseed in (1, 2):
        torch.manual_seed(reseed)
        runs.append(SpecTr().tree(None, target, tree, seeded(7)))
    assert runs[0] == runs[1]
    tree.q = None
    with pytest.raises(ValueError, match="i.i.d."):
        SpecTr().tree(None, target, tree, seeded(7))


# ---------------------------------------------------------------------------------------------------------------
# 4. In the tree loop on a toy model: sampled trees from a model drafter, the first two of three tokens.

N_LOOP, N_BROKEN_LOOP = 800, 800  # about 5 ms a sample on one core; at 400 rho = 1 was near the critical value


def rho_one_everywhere(p, q, tokens, parents, generator):
    """BROKEN: rho = 1 at every node, with its residual (clamped at 0 where it goes negative)."""
    kids, node, path = children(parents.tolist()), 0, []
    while kids[node]:
        chosen, token = kseq_select(p[node], q[node], [int(tokens[c]) for c in kids[node]], generator, rho=1.0)
        if chosen is None:
            return path, token
        node = kids[node][chosen]
        path.append(node)
    return path, sample_token(p[node], generator)


def loop_samples(verifier, n_samples: int, seed: int) -> np.ndarray:
    target = toy_model(seed=2)
    drafter = ModelDrafter(perturbed(target, seed=100, noise=0.2), depth=2, width=3, beam=2, size=6, sampled=True)
    g, out = seeded(seed), np.empty((n_samples, 2), dtype=np.int64)
    for i in range(n_samples):
        tokens, _ = specdec.tree_speculative_generate(
            target, drafter, [1, 2, 3], 3, temperature=1.0, generator=g, eot=None, verifier=verifier
        )
        out[i] = tokens[:2]
    return out


def test_in_the_loop_spectr_keeps_the_target_law_and_rho_one_does_not():
    joint = exact_joint(toy_model(seed=2), [1, 2, 3], 2, temperature=1.0)
    stat, dof = chi_square(loop_samples(SpecTr(), N_LOOP, seed=60), joint)
    print(f"spectr in the loop: chi2 {stat:.1f} < {chi_square_critical(dof):.1f} (dof {dof})")
    assert stat < chi_square_critical(dof), f"chi2 = {stat:.1f} (dof {dof})"

    stat, dof = chi_square(loop_samples(BrokenRule(tree_fn=rho_one_everywhere), N_BROKEN_LOOP, seed=60), joint)
    print(f"rho = 1 in the loop: chi2 {stat:.1f} > {chi_square_critical(dof):.1f} (dof {dof})")
    assert stat > chi_square_critical(dof), f"rho = 1 not detected: chi2 = {stat:.1f} (dof {dof})"


# ---------------------------------------------------------------------------------------------------------------
# 5. The command line takes -v spectr only on sampled trees at -t > 0.

REFUSED = {
    "a chain": (["-t", "1"], "--sampled-siblings"),
    "a chain with sampled siblings": (["-t", "1", "--sampled-siblings"], "verifies token trees: add --tree"),
    "top-k siblings": (["-t", "1", "--tree"], "--sampled-siblings"),
    "greedy": (["--tree"], "-t > 0"),
}


@pytest.mark.parametrize("case", REFUSED.keys())
def test_the_command_line_refuses_spectr_where_it_does_not_apply(case):
    flags, message = REFUSED[case]
    with pytest.raises(UsageError, match=message):
        cli.choose(*cli.parse_args(["-p", "x", "-v", "spectr", *flags]))
    choice = cli.choose(*cli.parse_args(["-p", "x", "-v", "spectr", "-t", "1", "--tree", "--sampled-siblings"]))
    assert choice.use_tree and not choice.rule.lossy
