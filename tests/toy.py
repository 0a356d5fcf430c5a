"""Tiny random models, scripted drafters and a chi-square test, shared by tests/test_specdec.py."""

import copy
import math
import multiprocessing
import os

import numpy as np
import torch

import specdec
from model import ModelConfig, Transformer
from verify import probs_from_logits, sample_token

# ---- models ---------------------------------------------------------------------------------------------------


def toy_model(seed: int, vocab_size: int = 6, max_len: int = 16, std: float = 0.5, layers: int = 1) -> Transformer:
    """A 1-layer (or `layers`-layer) fp32 model whose every weight (norms included) is drawn N(0, std^2): peaked
    next-token distributions that depend on the whole context."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=vocab_size,
        max_position_embeddings=max_len,
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=std)
    return model.eval()


def perturbed(model: Transformer, seed: int, noise: float) -> Transformer:
    """A copy of `model` with N(0, noise^2) added to every weight: a draft that agrees with the target often,
    but not always (a draft from an unrelated seed would almost never be accepted)."""
    torch.manual_seed(seed)
    copy = Transformer(model.config)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(noise * torch.randn_like(p))
    return copy.eval()


@torch.inference_mode()
def exact_joint(target: Transformer, prompt: list[int], n: int, **warping) -> np.ndarray:
    """P(next n tokens = x_1..x_n) under the target with `warping` (probs_from_logits' keywords), enumerating all
    V^n continuations with cache-free forwards. Returns float64 of shape [V] * n."""
    V = target.config.vocab_size
    joint, prefixes = np.ones(1), [()]
    for _ in range(n):  # P(x_1..x_k) = P(x_1..x_{k-1}) * p(x_k | prompt, x_1..x_{k-1})
        rows = torch.tensor([prompt + list(x) for x in prefixes])  # [V^(k-1), len(prompt) + k - 1]
        step = probs_from_logits(target(rows)[:, -1], **warping).double().numpy()  # [V^(k-1), V]
        joint = (joint[:, None] * step).reshape(-1)
        prefixes = [x + (v,) for x in prefixes for v in range(V)]
    return joint.reshape([V] * n)


# ---- drafters -------------------------------------------------------------------------------------------------


class ScriptedDrafter:
    """Proposes script(step, context)[:gamma] with a one-hot q (None); records every step's context and drafts."""

    def __init__(self, script):
        self.script, self.contexts, self.proposals = script, [], []

    def reset(self):
        self.contexts, self.proposals = [], []

    def propose(self, context, gamma, warp, generator, keep=None):
        drafts = list(self.script(len(self.contexts), list(context)))[:gamma]
        self.contexts.append(list(context))
        self.proposals.append(drafts)
        return drafts, None

    def accept(self, n_accepted):
        pass


class MisreportingDrafter:
    """BROKEN on purpose (transformers #47932): draws each draft from the warped draft distribution but reports
    the unwarped softmax as q. Cache-free: one full forward per draft token."""

    def __init__(self, model: Transformer):
        self.model = model

    def reset(self):
        pass

    @torch.inference_mode()
    def propose(self, context, gamma, warp, generator, keep=None):
        tokens, qs = [], []
        for _ in range(gamma):
            logits = self.model(torch.tensor([context + tokens]))[0, -1]
            tokens.append(sample_token(warp(logits), generator))
            qs.append(torch.softmax(logits.float(), dim=-1))
        return tokens, torch.stack(qs) if qs else None

    def accept(self, n_accepted):
        pass


# ---- verifiers ------------------------------------------------------------------------------------------------


class BrokenRule:
    """Wraps a BROKEN verification function as a verify.Verifier, so that a law test can run the loop with it:
    chain_fn(p, q, draft_tokens, generator) -> (n, token), tree_fn(p, q, tokens, parents, generator) -> (path,
    token), with the signatures of verify.speculative_sample and verify.tree_speculative_sample."""

    lossy = False  # claims to be lossless: the law test must catch it

    def __init__(self, chain_fn=None, tree_fn=None):
        self.chain_fn, self.tree_fn = chain_fn, tree_fn

    def chain(self, logits, p, q, drafts, generator):
        return self.chain_fn(p, q, drafts, generator)

    def tree(self, logits, p, tree, generator):
        return self.tree_fn(p, tree.q, torch.tensor(tree.tokens), torch.tensor(tree.parents), generator)


def accept_every_draft(p, q, draft_tokens, generator):
    """BROKEN: no rejection test (transformers PR #28508's n_matches bug)."""
    return len(draft_tokens), sample_token(p[len(draft_tokens)], generator)


# ---- sampling -------------------------------------------------------------------------------------------------

CHUNKS = 2  # fixed, so the samples do not depend on how many workers run them


def _sample_chunk(args) -> tuple[np.ndarray, specdec.Stats]:
    # Private copies: a forked worker receives its tensors in shared memory (torch's pickling), so without them two
    # workers would write one drafter's weights (an online drafter trains them) or cache at once, a race; and in one
    # process a chunk would start where the last one left a stateful drafter. Each chunk starts from `args`.
    # One thread, as in the workers: the thread count can change a float sum's order, and so a sample.
    target, drafter, prompt, n_tokens, n_samples, seed, opts = copy.deepcopy(args)
    generator = torch.Generator().manual_seed(seed)
    out, total = np.empty((n_samples, n_tokens), dtype=np.int64), specdec.Stats()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(n_samples):
            out[i], stats = specdec.speculative_generate(target, drafter, prompt, n_tokens, generator=generator, **opts)
            add_stats(total, stats)
    finally:
        torch.set_num_threads(threads)
    return out, total


def add_stats(total: specdec.Stats, stats: specdec.Stats) -> None:
    for name in ("target_calls", "drafted", "accepted", "compared", "produced", "expected_accepted"):
        setattr(total, name, getattr(total, name) + getattr(stats, name))
    total.accept_counts += [0] * (len(stats.accept_counts) - len(total.accept_counts))
    for n, count in enumerate(stats.accept_counts):
        total.accept_counts[n] += count


def sample_speculative(
    target, drafter, prompt, n_tokens: int, n_samples: int, seed: int, **opts
) -> tuple[np.ndarray, specdec.Stats]:
    """n_samples continuations [n_samples, n_tokens] from speculative_generate (pass eot=None: each then has
    exactly n_tokens, as the drafts of a step never exceed the budget), and the runs' summed Stats.

    Deterministic in `seed`. The CHUNKS chunks run in forked worker processes when there is more than one core.
    `opts` go to speculative_generate (a broken verifier among them)."""
    chunks = [
        (target, drafter, prompt, n_tokens, n_samples // CHUNKS + (i < n_samples % CHUNKS), seed * 1000 + i, opts)
        for i in range(CHUNKS)
    ]
    workers = min(CHUNKS, len(os.sched_getaffinity(0)))
    if workers == 1:
        results = [_sample_chunk(c) for c in chunks]
    else:
        # one thread each (_sample_chunk): on toy tensors, thread hand-offs would cost more than the arithmetic.
        # The parent's tensors are left in shared memory by the pickling.
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map_async(_sample_chunk, chunks).get(timeout=600)
    total = specdec.Stats()
    for _, stats in results:
        add_stats(total, stats)
    return np.concatenate([samples for samples, _ in results]), total


def acceptance_matches_theory(stats: specdec.Stats) -> bool:
    """Each compared draft is accepted with probability sum_x min(p, q) given the past, so accepted minus
    expected_accepted is a martingale: within 4 sigma of 0, sigma <= sqrt(compared) / 2."""
    return abs(stats.accepted - stats.expected_accepted) < 4 * math.sqrt(stats.compared) / 2


# ---- chi-square -----------------------------------------------------------------------------------------------


def chi_square_critical(dof: int, alpha: float = 1e-3) -> float:
    """Upper alpha quantile of chi-square(dof), Wilson-Hilferty approximation (no scipy)."""
    z = {1e-3: 3.090232306167813}[alpha]  # standard normal upper quantile
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(samples: np.ndarray, joint: np.ndarray) -> tuple[float, int]:
    """Pearson statistic of sampled sequences [N, n] against the exact joint [V] * n, and its degrees of freedom.
    Cells with expected count < 5 are pooled into one; a sample in a zero-probability cell gives inf."""
    counts = np.bincount(np.ravel_multi_index(samples.T, joint.shape), minlength=joint.size).astype(np.float64)
    expected = len(samples) * joint.reshape(-1)
    possible = expected > 0
    order = np.argsort(expected[possible])
    e, o = expected[possible][order], counts[possible][order]  # ascending expected counts
    k = int((e < 5).sum())  # pool the cells too small to stand alone ...
    while 0 < e[:k].sum() < 5:  # ... and as many of the next ones as it takes for the pool to reach 5
        k += 1
    if k:
        e, o = np.append(e[k:], e[:k].sum()), np.append(o[k:], o[:k].sum())
    if counts[~possible].sum() > 0:  # an outcome the target cannot produce
        return math.inf, len(e) - 1
    return float(((o - e) ** 2 / e).sum()), len(e) - 1
