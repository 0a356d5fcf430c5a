"""Tests for verify.py: exactness identities, Monte Carlo distribution tests with power checks, brute-force
references for the greedy rules. p = target, q = draft (Leviathan et al.).
The lossy rules: tests/test_approximate.py."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verify import (
    acceptance_probability,
    expected_acceptance,
    greedy_verify,
    probs_from_logits,
    residual_distribution,
    sample_match_verify,
    sample_token,
    speculative_sample,
    tree_greedy_verify,
    tree_sample_match_verify,
    tree_speculative_sample,
    warp_logits,
)

TRIALS = 20_000
no_deadline = settings(deadline=None)  # torch's first calls are slow; timing is not what these tests check
# chi2.ppf(1 - 1e-3, dof), from scipy.stats, hard-coded so the tests need no scipy.
CHI2_CRITICAL = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 8: 26.124, 15: 37.697, 24: 51.179}


def chi_square(samples: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    """Pearson statistic of integer samples against p, and its degrees of freedom. An impossible outcome = inf."""
    counts = np.bincount(samples, minlength=p.size).astype(np.float64)
    expected = counts.sum() * p
    if np.any(counts[expected == 0] > 0):
        return math.inf, int((p > 0).sum()) - 1
    m = expected > 0
    return float(((counts[m] - expected[m]) ** 2 / expected[m]).sum()), int(m.sum()) - 1


def assert_matches(samples: np.ndarray, p: np.ndarray) -> None:
    stat, dof = chi_square(samples, p)
    assert stat < CHI2_CRITICAL[dof], f"chi2 = {stat:.1f} >= {CHI2_CRITICAL[dof]} (dof {dof})"


def assert_detects(samples: np.ndarray, p: np.ndarray) -> None:
    stat, dof = chi_square(samples, p)
    assert stat > CHI2_CRITICAL[dof], f"broken variant not detected: chi2 = {stat:.1f} (dof {dof})"


def dirichlet_rows(seed: int, rows: int, vocab: int) -> torch.Tensor:
    """Random distributions bounded away from 0 (half uniform), so every chi-square cell has a large count."""
    d = np.random.default_rng(seed).dirichlet(np.ones(vocab), size=rows)
    return torch.tensor(0.5 * d + 0.5 / vocab, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Strategies: distributions on 2..6 tokens with zeros and one-hots (integer weights), p == q included.


@st.composite
def distribution_pairs(draw):
    vocab = draw(st.integers(2, 6))
    weights = st.lists(st.integers(0, 4), min_size=vocab, max_size=vocab).filter(lambda w: sum(w) > 0)
    p = torch.tensor(draw(weights), dtype=torch.float32)
    q = p.clone() if draw(st.booleans()) else torch.tensor(draw(weights), dtype=torch.float32)
    return p / p.sum(), q / q.sum()


@st.composite
def trees(draw, distinct_siblings: bool):
    vocab, n = draw(st.integers(2, 4)), draw(st.integers(1, 8))
    tokens, parents = [draw(st.integers(0, vocab - 1))], [-1]
    for i in range(1, n):
        kids = lambda j: [tokens[c] for c in range(1, i) if parents[c] == j]  # noqa: E731
        # Node i-1 has no children yet, so some parent always has a free token.
        open_parents = [j for j in range(i) if not distinct_siblings or len(kids(j)) < vocab]
        parents.append(draw(st.sampled_from(open_parents)))
        used = kids(parents[i]) if distinct_siblings else []
        tokens.append(draw(st.sampled_from([t for t in range(vocab) if t not in used])))
    logits = draw(st.lists(st.integers(-2, 2), min_size=len(tokens) * vocab, max_size=len(tokens) * vocab))
    logits = torch.tensor(logits, dtype=torch.float32).view(len(tokens), vocab)  # small ints: argmax ties too
    return logits, torch.tensor(tokens), torch.tensor(parents)


# ---------------------------------------------------------------------------------------------------------------
# Drawing one token: every sampled token of every loop goes through sample_token.

P_DRAW = torch.tensor([0.0, 0.3, 0.0, 0.05, 0.4, 0.0, 0.25, 0.0])  # zeros at both ends and between, unsorted


def draws(sample, p: torch.Tensor, seed: int, trials: int = TRIALS) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return np.array([sample(p, g) for _ in range(trials)])


def sample_token_off_by_one(probs, generator):
    """The inverse transform with an off-by-one search: the token before the drawn one, so mass moves onto the
    zeros (a bug that a sum to the left of the token instead of through it gives)."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    return int(torch.searchsorted(cdf, u * cdf[-1:], right=True).item() - 1) % probs.numel()


def test_sample_token_follows_probs_and_never_draws_a_zero():
    assert_matches(draws(sample_token, P_DRAW, seed=0), P_DRAW.numpy())


def test_sample_token_chi_square_has_power_against_an_off_by_one_search():
    assert_detects(draws(sample_token_off_by_one, P_DRAW, seed=0), P_DRAW.numpy())


def test_sample_token_refuses_a_row_without_mass():
    for row in (torch.zeros(4), torch.full((4,), float("nan"))):
        with pytest.raises(ValueError, match="total mass"):
            sample_token(row, torch.Generator().manual_seed(0))


@no_deadline
@given(distribution_pairs(), st.integers(0, 2**32))
def test_sample_token_draws_only_tokens_of_positive_probability(pq, seed):
    p, g = pq[0], torch.Generator().manual_seed(seed)
    assert all(p[sample_token(p, g)] > 0 for _ in range(20))


# ---------------------------------------------------------------------------------------------------------------
# Chain rule: exactness (Leviathan et al. 2023 App. A.1) as an identity, with the helpers the code uses.


@no_deadline
@given(distribution_pairs())
def test_accept_or_resample_reproduces_target_exactly(pq):
    p, q = pq
    a = acceptance_probability(p, q)
    r = residual_distribution(p, q)
    reject = 1.0 - (q * a).sum()
    torch.testing.assert_close(q * a + reject * r, p, atol=1e-5, rtol=0)
    assert abs(expected_acceptance(p, q) - (q * a).sum().item()) < 1e-5


@no_deadline
@given(distribution_pairs())
def test_deterministic_draft_with_one_hot_q_reproduces_target_exactly(pq):
    p, _ = pq
    for x in range(p.numel()):
        q = torch.nn.functional.one_hot(torch.tensor(x), p.numel()).float()
        a, r = acceptance_probability(p, q), residual_distribution(p, q)
        torch.testing.assert_close(q * a + (1.0 - (q * a).sum()) * r, p, atol=1e-5, rtol=0)


@no_deadline
@given(distribution_pairs(), st.integers(0, 5), st.integers(0, 2**32))
def test_never_emits_a_token_the_target_forbids(pq, x, seed):
    p, q = pq
    x = x % p.numel()  # any draft token, even one with q(x) == 0 (a bug upstream): no NaN, no forbidden token
    g = torch.Generator().manual_seed(seed)
    n, token = speculative_sample(torch.stack([p, p]), q[None], torch.tensor([x]), g)
    assert (n == 1 and p[x] > 0) or n == 0
    assert p[token] > 0


@no_deadline
@given(trees(distinct_siblings=False), st.integers(0, 2**32), st.integers(0, 2**32))
def test_randomness_comes_only_from_the_generator(tree, seed, global_seed):
    logits, tokens, parents = tree
    p = probs_from_logits(logits, 1.0)
    results = []
    for reseed in (global_seed, global_seed + 1):  # a different global RNG state must not matter
        torch.manual_seed(reseed)
        g = torch.Generator().manual_seed(seed)
        chain = speculative_sample(p[: len(tokens)], p[: len(tokens) - 1], tokens[1:], g)
        results.append((chain, tree_speculative_sample(p, p.flip(-1), tokens, parents, g)))
    assert results[0] == results[1]


# ---------------------------------------------------------------------------------------------------------------
# Chain rule: Monte Carlo, gamma = 1. The first emitted token (accepted draft or correction) must follow p.

P_CHAIN = torch.tensor([0.35, 0.25, 0.2, 0.15, 0.05])
Q_CHAIN = torch.tensor([0.1, 0.15, 0.25, 0.2, 0.3])


def broken_speculative_sample(target_probs, draft_probs, draft_tokens, generator, bug):
    """speculative_sample with one known bug from docs/pitfalls.md (gamma = 1 is enough)."""
    p, q, x = target_probs[0], draft_probs[0], int(draft_tokens[0])
    if bug == "accept_every_draft" or torch.rand(1, generator=generator).item() < (p[x] / q[x]).item():
        return 1, sample_token(target_probs[1], generator)
    if bug == "softmaxed_residual":
        residual = torch.softmax((p - q).clamp_min(0), dim=-1)
    elif bug == "zero_only_rejected_token":
        residual = p.clone()
        residual[x] = 0.0
    return 0, sample_token(residual / residual.sum(), generator)


def first_chain_tokens(sampler, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(Q_CHAIN, TRIALS, replacement=True, generator=g)  # x ~ q, fresh every trial
    target, draft = torch.stack([P_CHAIN, P_CHAIN.flip(0)]), Q_CHAIN[None]
    out = np.empty(TRIALS, dtype=np.int64)
    for t in range(TRIALS):
        n, token = sampler(target, draft, drafts[t : t + 1], g)
        out[t] = drafts[t].item() if n == 1 else token
    return out


@pytest.mark.slow
def test_speculative_sample_first_token_follows_target():
    assert_matches(first_chain_tokens(speculative_sample, seed=1), P_CHAIN.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("bug", ["accept_every_draft", "softmaxed_residual", "zero_only_rejected_token"])
def test_chain_chi_square_has_power_against(bug):
    sampler = lambda *args: broken_speculative_sample(*args, bug=bug)  # noqa: E731
    assert_detects(first_chain_tokens(sampler, seed=1), P_CHAIN.numpy())


def first_matched_tokens(sampler, seed: int) -> np.ndarray:
    """The first emitted token when token 0 (p 0.35), then 1, are drafted deterministically."""
    g = torch.Generator().manual_seed(seed)
    target, drafts = torch.stack([P_CHAIN, P_CHAIN.flip(0), P_CHAIN]), torch.tensor([0, 1])
    out = np.empty(TRIALS, dtype=np.int64)
    for t in range(TRIALS):
        n, token = sampler(target, drafts, g)
        out[t] = 0 if n else token  # a kept first draft is token 0
    return out


def resample_after_a_miss(target_probs, draft_tokens, generator):
    """sample_match_verify that draws the correction afresh instead of emitting the draw that missed: the draft's
    token then comes out with p(x) + (1 - p(x)) p(x)."""
    n, token = sample_match_verify(target_probs, draft_tokens, generator)
    return (n, token) if n == len(draft_tokens) else (n, sample_token(target_probs[n], generator))


@pytest.mark.slow
def test_sample_match_first_token_follows_target():
    assert_matches(first_matched_tokens(sample_match_verify, seed=1), P_CHAIN.numpy())


@pytest.mark.slow
def test_sample_match_chi_square_has_power_against_resampling_after_a_miss():
    assert_detects(first_matched_tokens(resample_after_a_miss, seed=1), P_CHAIN.numpy())


# ---------------------------------------------------------------------------------------------------------------
# Tree rule: Monte Carlo. Target rows: root -> P1, a depth-1 node with token t -> P2[t], deeper -> P3.
# The first two emitted tokens must follow P1(x1) P2(x2 | x1).

V = 5
P1 = torch.tensor([0.1, 0.4, 0.15, 0.25, 0.1])
P2 = dirichlet_rows(seed=2, rows=V, vocab=V)  # [V, V], row x1 = p(. | x1)
P3 = dirichlet_rows(seed=3, rows=1, vocab=V)[0]
JOINT = (P1[:, None] * P2).flatten().numpy()  # [V * V], index x1 * V + x2


def broken_tree_sample(target_probs, draft_probs, tokens, parents, generator, bug):
    """tree_speculative_sample with one known sibling bug."""
    node, path = 0, []
    while True:
        r = target_probs[node]
        kids = [c for c in range(1, len(parents)) if int(parents[c]) == node]
        for c in kids:
            x = int(tokens[c])
            q = draft_probs[node] if draft_probs is not None else torch.nn.functional.one_hot(tokens[c], V).float()
            test_against = target_probs[node] if bug == "original_p" else r
            if torch.rand(1, generator=generator).item() < acceptance_probability(test_against[x], q[x]).item():
                node, path = c, path + [c]
                break
            r = (r - q).clamp_min(0) if bug == "no_renormalisation" else residual_distribution(test_against, q)
        else:
            return path, sample_token(r if r.sum() > 0 else target_probs[node], generator)


def first_tree_tokens(sampler, make_tree, seed: int, second: bool = True, trials: int = TRIALS) -> np.ndarray:
    """First emitted token (or x1 * V + x2 for the first two when `second`). If one step emits only one token,
    the next step starts from a root-only tree, whose answer is a sample of P2[x1]."""
    g = torch.Generator().manual_seed(seed)
    out = np.empty(trials, dtype=np.int64)
    for t in range(trials):
        target, draft, tokens, parents = make_tree(t)
        path, token = sampler(target, draft, tokens, parents, g)
        emitted = [int(tokens[i]) for i in path] + [token]
        if second and len(emitted) == 1:
            root_only = (P2[emitted[0]][None], None, torch.tensor(emitted), torch.tensor([-1]))
            emitted.append(tree_speculative_sample(*root_only, g)[1])
        out[t] = emitted[0] * V + emitted[1] if second else emitted[0]
    return out


def fixed_tree(child_tokens: list[int]):
    """Root (token 0) with the given children; the first child has two children, the second one."""
    tokens = [0] + child_tokens + [2, 4, 1]
    parents = [-1] + [0] * len(child_tokens) + [1, 1, 2]
    rows = [P1] + [P2[t] for t in child_tokens] + [P3] * 3
    tree = (torch.stack(rows), None, torch.tensor(tokens), torch.tensor(parents))
    return lambda t: tree


def iid_trees(seed: int, k: int = 3, k2: int = 2):
    """Fresh tree each trial: k children ~ Q1, then k2 children of each child c ~ Q2[token c], all i.i.d."""
    q1, q2 = dirichlet_rows(seed=4, rows=1, vocab=V)[0], dirichlet_rows(seed=5, rows=V, vocab=V)
    g = torch.Generator().manual_seed(seed)
    level1 = torch.multinomial(q1, TRIALS * k, replacement=True, generator=g).view(TRIALS, k)
    level2 = torch.multinomial(q2[level1.flatten()], k2, replacement=True, generator=g).view(TRIALS, k * k2)
    parents = torch.tensor([-1] + [0] * k + [1 + c for c in range(k) for _ in range(k2)])
    p_table, q_table = torch.cat([P2, P1[None], P3[None]]), torch.cat([q2, q1[None]])  # rows V, V+1: P1, P3
    p_rows = torch.cat([torch.full((TRIALS, 1), V), level1, torch.full((TRIALS, k * k2), V + 1)], dim=1)
    q_rows = torch.cat([torch.full((TRIALS, 1), V), level1, torch.full((TRIALS, k * k2), V)], dim=1)
    tokens = torch.cat([torch.zeros(TRIALS, 1, dtype=torch.long), level1, level2], dim=1)
    return lambda t: (p_table[p_rows[t]], q_table[q_rows[t]], tokens[t], parents)


def tree_sample_match(target_probs, draft_probs, tokens, parents, generator):
    return tree_sample_match_verify(target_probs, tokens, parents, generator)


def tree_resample_after_a_miss(target_probs, draft_probs, tokens, parents, generator):
    """tree_sample_match_verify that draws the token after the walk afresh: the children's tokens come out too
    often."""
    path, _ = tree_sample_match_verify(target_probs, tokens, parents, generator)
    return path, sample_token(target_probs[path[-1] if path else 0], generator)


@pytest.mark.slow
@pytest.mark.parametrize("children", [[1, 3, 0], [1, 1, 3]], ids=["distinct", "duplicate_sibling"])
@pytest.mark.parametrize("rule", [tree_speculative_sample, tree_sample_match], ids=["rejection", "sample_match"])
def test_tree_deterministic_siblings_follow_target(rule, children):
    joint = first_tree_tokens(rule, fixed_tree(children), seed=6)
    assert_matches(joint // V, P1.numpy())
    assert_matches(joint, JOINT)


@pytest.mark.slow
def test_tree_sample_match_chi_square_has_power_against_resampling_after_a_miss():
    assert_detects(first_tree_tokens(tree_resample_after_a_miss, fixed_tree([1, 3, 0]), seed=6), JOINT)


@pytest.mark.slow
def test_tree_iid_siblings_follow_target_averaged_over_fresh_trees():
    joint = first_tree_tokens(tree_speculative_sample, iid_trees(seed=7), seed=8)
    assert_matches(joint // V, P1.numpy())
    assert_matches(joint, JOINT)


@pytest.mark.slow
@pytest.mark.parametrize("bug", ["no_renormalisation", "original_p"])
@pytest.mark.parametrize("variant", ["deterministic", "iid"])
def test_tree_chi_square_has_power_against(bug, variant):
    # A quarter of the trials, to save time: the statistic of a wrong distribution grows linearly with the
    # number of trials, so a bug detected with TRIALS // 4 is detected with TRIALS.
    sampler = lambda *args: broken_tree_sample(*args, bug=bug)  # noqa: E731
    make_tree = fixed_tree([1, 3, 0]) if variant == "deterministic" else iid_trees(seed=7)
    first = first_tree_tokens(sampler, make_tree, seed=8, second=False, trials=TRIALS // 4)
    assert_detects(first, P1.numpy())


# ---------------------------------------------------------------------------------------------------------------
# Greedy rules against brute force, and greedy as the temperature-0 case of sampling.


@st.composite
def chains(draw):
    vocab, gamma = draw(st.integers(2, 4)), draw(st.integers(0, 5))
    logits = draw(st.lists(st.integers(-2, 2), min_size=(gamma + 1) * vocab, max_size=(gamma + 1) * vocab))
    drafts = draw(st.lists(st.integers(0, vocab - 1), min_size=gamma, max_size=gamma))
    return torch.tensor(logits, dtype=torch.float32).view(gamma + 1, vocab), torch.tensor(drafts, dtype=torch.long)


@no_deadline
@given(chains(), st.integers(0, 2**32))
def test_sample_match_emits_the_targets_own_draws_whatever_was_drafted(chain, seed):
    logits, drafts = chain
    p = probs_from_logits(logits, 1.0)
    n, token = sample_match_verify(p, drafts, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    own = [sample_token(p[i], g) for i in range(n + 1)]  # what generate draws at these positions, in order
    assert own == drafts[:n].tolist() + [token]


def first_argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)  # first maximal index, as torch.argmax


@no_deadline
@given(chains())
def test_greedy_verify_accepts_longest_matching_prefix(chain):
    logits, drafts = chain
    best = [first_argmax(row) for row in logits.tolist()]
    d = drafts.tolist()
    n = max(k for k in range(len(d) + 1) if d[:k] == best[:k])
    assert greedy_verify(logits, drafts) == (n, best[n])


@no_deadline
@given(trees(distinct_siblings=True))
def test_tree_greedy_verify_finds_longest_matching_root_path(tree):
    logits, tokens, parents = tree
    best, tok, par = [first_argmax(row) for row in logits.tolist()], tokens.tolist(), parents.tolist()
    paths = [[]]
    for node in range(1, len(tok)):
        path = [node]
        while par[path[0]] != 0:
            path.insert(0, par[path[0]])
        if all(tok[c] == best[par[c]] for c in path):
            paths.append(path)
    longest = max(paths, key=len)
    assert tree_greedy_verify(logits, tokens, parents) == (longest, best[longest[-1] if longest else 0])


@no_deadline
@given(chains(), st.integers(0, 2**32))
def test_speculative_sample_at_temperature_zero_is_greedy(chain, seed):
    logits, drafts = chain
    g = torch.Generator().manual_seed(seed)
    assert speculative_sample(probs_from_logits(logits, 0.0), None, drafts, g) == greedy_verify(logits, drafts)


@no_deadline
@given(trees(distinct_siblings=False), st.integers(0, 2**32))
def test_tree_speculative_sample_at_temperature_zero_is_tree_greedy(tree, seed):
    logits, tokens, parents = tree
    g = torch.Generator().manual_seed(seed)
    sampled = tree_speculative_sample(probs_from_logits(logits, 0.0), None, tokens, parents, g)
    assert sampled == tree_greedy_verify(logits, tokens, parents)


# ---------------------------------------------------------------------------------------------------------------
# Warpers.

logit_rows = st.integers(2, 8).flatmap(lambda v: st.lists(st.floats(-8, 8, width=32), min_size=v, max_size=v))


@no_deadline
@given(st.integers(2, 8).flatmap(lambda v: st.permutations(list(range(v)))), st.integers(1, 8))
def test_top_k_keeps_exactly_the_k_largest(values, k):
    logits = torch.tensor(values, dtype=torch.float32)  # distinct values: no ties
    kept = torch.isfinite(warp_logits(logits, 0.7, top_k=k))
    assert kept.sum().item() == min(k, logits.numel())
    if not kept.all():
        assert logits[kept].min() > logits[~kept].max()


@no_deadline
@given(logit_rows, st.floats(0.0, 0.999), st.floats(0.1, 2.0))
def test_top_p_keeps_smallest_set_reaching_mass(values, top_p, temperature):
    logits = torch.tensor(values)
    full = torch.softmax(logits / temperature, dim=-1)
    kept = probs_from_logits(logits, temperature, top_p=top_p) > 0
    assert kept.any() and full[kept].max() == full.max()
    mass = full[kept].sum().item()
    assert mass >= top_p - 1e-5 or kept.all()  # enough mass ...
    assert mass - full[kept].min().item() < top_p + 1e-5  # ... and dropping the least likely kept one is too little


@no_deadline
@given(st.integers(1, 4), logit_rows)
def test_temperature_zero_is_one_hot_argmax(n, values):
    logits = torch.tensor([values] * n)  # [N, V]
    probs = probs_from_logits(logits, 0.0)
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float())
    assert torch.equal(probs_from_logits(logits[0], 0.0), probs[0])  # [V] works too


@no_deadline
@given(logit_rows, st.floats(0.05, 3.0), st.integers(0, 10), st.floats(0.0, 1.0))
def test_warped_probabilities_are_distributions(values, temperature, top_k, top_p):
    logits = torch.tensor([values, values[::-1]]).to(torch.bfloat16)  # [2, V], low precision in
    probs = probs_from_logits(logits, temperature, top_k, top_p)
    assert probs.dtype == torch.float32 and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
