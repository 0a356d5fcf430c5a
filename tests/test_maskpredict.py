"""Tests for the mask-predict loop extension (tree.ExtraTokens: extra tokens in the target call) and its drafters,
Jacobi and Lookahead decoding (maskpredict.py): the combined mask against brute force, every row's logits against
the naive reference forward of that token's visible sequence, nothing of the extra tokens left in the cache, greedy
identity on the shipped weights, and the sampled law with a power check. p = target, q = draft."""

import random

import pytest
import table
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskpredict import JacobiDrafter, LookaheadDrafter, PassDrafter
from model import KVCache
from specdec import call_embeds, generate, tree_speculative_generate
from tests.reference import reference_logits
from tests.test_tree_decoding import sample_tree_decoding
from tests.toy import chi_square, chi_square_critical, exact_joint, toy_model
from train import pass_layout
from tree import ExtraTokens, Tree, path_to, tree_attention_mask, tree_positions

no_deadline = settings(deadline=None, max_examples=40)
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def noop_read(logits, path):
    pass


def random_layout(rng: random.Random, hidden: int, vocab: int) -> tuple[Tree, list[list[int]], list[int]]:
    """A random tree and random extra tokens that hang off tree nodes or earlier extra tokens, each seeing its
    chain of ancestors (a consistent causal sequence, so its logits can be checked). Returns the tree (with its
    ExtraTokens), every row's visible sequence as indices into tree nodes + extras, and the extras' tokens."""
    tree = Tree.from_root(rng.randrange(vocab))
    for i in range(1, rng.randint(1, 6)):
        tree.add(rng.randrange(i), rng.randrange(vocab), 0.0)
    n, m = len(tree), rng.randint(0, 5)
    chains = [path_to(tree, i) for i in range(n)]
    tokens, depth = [], []
    for j in range(m):
        parent = rng.randrange(n + j)
        chains.append(chains[parent] + [n + j])
        tokens.append(rng.randrange(vocab))
        depth.append(len(chains[-1]) - 1)
    sees = torch.zeros(m, n + m, dtype=torch.bool)
    for j in range(m):
        sees[j, chains[n + j]] = True
    tree.extra_tokens = ExtraTokens(torch.zeros(m, hidden), depth, sees, noop_read, tokens)
    return tree, chains, tokens


@no_deadline
@given(st.integers(0, 2**32), st.integers(0, 5))
def test_combined_mask_matches_brute_force(seed, prefix):
    tree, chains, _ = random_layout(random.Random(seed), 8, 6)
    n, m = len(tree), len(tree.extra_tokens)
    mask = tree_attention_mask(tree, prefix)
    assert mask.shape == (n + m, prefix + n + m)
    assert mask[:, :prefix].all()  # everyone sees the prefix
    for row in range(n + m):
        assert sorted(torch.nonzero(mask[row, prefix:]).flatten().tolist()) == sorted(chains[row])
    assert not mask[:n, prefix + n :].any()  # no candidate ever sees an extra token
    assert tree_positions(tree, prefix).tolist() == [prefix + len(c) - 1 for c in chains]


@pytest.mark.parametrize("seed", range(6))
def test_every_row_of_one_call_equals_its_visible_sequence_run_alone(seed):
    """One cached forward over prefix, tree and extras: each candidate's and each extra token's logits equal the
    naive cache-free reference forward of that token's visible sequence as a plain sequence."""
    target, rng = toy_model(seed=seed, max_len=32), random.Random(seed)
    tree, chains, extra_tokens = random_layout(rng, target.config.hidden_size, 6)
    tree.extra_tokens.embeds = target.embed_tokens(torch.tensor(extra_tokens, dtype=torch.long))
    prompt = [rng.randrange(6) for _ in range(rng.randint(1, 5))]
    all_tokens = tree.tokens + extra_tokens
    cache = target.new_cache()
    with torch.inference_mode():
        target(torch.tensor([prompt]), cache)
        logits = target(
            None,
            cache,
            tree_positions(tree, len(prompt)),
            tree_attention_mask(tree, len(prompt)),
            inputs_embeds=call_embeds(target, tree),
        )[0]
        for row, chain in enumerate(chains):
            alone = reference_logits(target, torch.tensor([prompt + [all_tokens[i] for i in chain]]))[0, -1]
            assert torch.allclose(logits[row], alone, atol=ATOL, rtol=0), f"row {row}"


# ---------------------------------------------------------------------------------------------------------------
# The loop: nothing of the extra tokens stays in the cache, and greedy output is the target's.


class CacheChecked:
    """Wraps the toy target. On every verification call, the cache's K/V in use equal those of prefilling the
    accepted context alone (but its last token): no extra token of the previous call left anything behind."""

    def __init__(self, model, contexts: list):
        self.model, self.contexts, self.checked = model, contexts, 0
        self.config, self.device, self.embed_tokens = model.config, model.device, model.embed_tokens

    def new_cache(self):
        return self.model.new_cache()

    def __call__(self, tokens, cache, *args, **kw):
        if self.contexts:
            context = self.contexts[-1]
            fresh = self.model.new_cache()
            self.model(torch.tensor([context[:-1]]), fresh)
            assert cache.length == len(context) - 1
            for ours, theirs in zip(cache.k + cache.v, fresh.k + fresh.v):
                assert torch.allclose(ours[:, :, : cache.length], theirs[:, :, : cache.length], atol=ATOL, rtol=0)
            self.checked += 1
        return self.model(tokens, cache, *args, **kw)


class RecordingExtraTokens(LookaheadDrafter):
    def __init__(self, target, contexts, **knobs):
        super().__init__(target, **knobs)
        self.contexts = contexts

    def propose_tree(self, context, *args):
        self.contexts.append(list(context))
        return super().propose_tree(context, *args)


def test_after_every_step_the_cache_holds_exactly_the_accepted_text():
    target, prompt, contexts = toy_model(seed=2, max_len=48), [1, 2, 3, 1, 2, 3, 1], []
    checked = CacheChecked(target, contexts)
    drafter = RecordingExtraTokens(target, contexts, window=3, ngram=3, candidates=3)
    with torch.inference_mode():
        out, stats = tree_speculative_generate(checked, drafter, prompt, 24, temperature=0)
    assert out == generate(target, prompt, 24)
    assert checked.checked == stats.target_calls and stats.accepted > 0  # n-grams were verified and accepted


def keep_and_leak(self, indices):
    """BROKEN KVCache.keep: also keeps the call's last slot, the last extra token's K/V, after the accepted path."""
    REAL_KEEP(self, torch.cat([indices, torch.tensor([self.length - 1], device=indices.device)]))


REAL_KEEP = KVCache.keep


def test_the_cache_check_catches_an_extra_token_left_in_the_cache(monkeypatch):
    monkeypatch.setattr(KVCache, "keep", keep_and_leak)
    with pytest.raises(AssertionError):
        test_after_every_step_the_cache_holds_exactly_the_accepted_text()


def test_jacobi_refines_its_guesses_from_the_targets_own_outputs():
    target, prompt = toy_model(seed=2, max_len=48), [1, 2, 3, 1, 2]
    drafter = JacobiDrafter(target, block=3)
    drafter.reset()
    with torch.inference_mode():
        tree = drafter.propose_tree(prompt, torch.zeros(0, 16), None, None)
        assert tree.parents == [-1, 0, 1, 2] and len(tree.extra_tokens) == 0  # a chain, no extra tokens
        logits = torch.zeros(4, 6)
        logits[torch.arange(4), torch.tensor([5, 4, 3, 2])] = 1.0  # argmax per row: 5 4 3 2
        drafter.read(logits, [1])  # one guess accepted, row 1 (argmax 4) was emitted
        assert drafter.guesses == [3, 2]  # rows 2 and 3: the next guesses


def test_pass_appends_its_embeddings_causally_after_the_chain_and_keeps_drafts_only_after_a_full_accept():
    target, k = toy_model(seed=2, max_len=48), 3
    drafter = PassDrafter(target, torch.randn(k, target.config.hidden_size, generator=torch.Generator().manual_seed(0)))
    drafter.reset()
    drafter.drafts = [4, 5]
    tree = drafter.propose_tree([1, 2, 3], torch.zeros(0, 16), None, None)
    assert tree.tokens == [3, 4, 5] and tree.parents == [-1, 0, 1]
    assert tree.extra_tokens.depths == [3, 4, 5]  # the first embedding stands where the bonus token goes
    mask = tree_attention_mask(tree, 0)
    assert mask[3:, :3].all() and torch.equal(mask[3:, 3:], torch.ones(k, k, dtype=torch.bool).tril())
    logits = torch.zeros(3 + k, 6)
    logits[torch.arange(3 + k), torch.tensor([0, 1, 2, 3, 4, 5])] = 1.0
    drafter.read(logits, [1, 2])  # both drafts accepted: the embeddings' outputs are the next drafts
    assert drafter.drafts == [3, 4, 5]
    drafter.read(logits, [1])  # a rejection: they were conditioned on a wrong token, so no drafts
    assert drafter.drafts == []
    with torch.inference_mode():
        out, _ = tree_speculative_generate(target, drafter, [1, 2, 3], 20, temperature=0)
    assert out == generate(target, [1, 2, 3], 20)


@pytest.mark.parametrize("name", ["jacobi", "lookahead", "pass"])
def test_mask_predict_drafters_run_to_the_end_of_the_context(name):
    """Near the end of the budget or the context the loop trims the tree; extra tokens laid out for the whole tree
    must then go, not run past the position table."""
    target = toy_model(seed=2)  # 16 positions
    drafters = {
        "jacobi": lambda: JacobiDrafter(target, block=4),
        "lookahead": lambda: LookaheadDrafter(target, window=3, ngram=3, candidates=3),
        "pass": lambda: PassDrafter(
            target, torch.randn(4, target.config.hidden_size, generator=torch.Generator().manual_seed(0))
        ),
    }
    for n_prompt in range(1, 15):
        prompt = ([1, 2, 3, 1, 2] * 3)[:n_prompt]
        with torch.inference_mode():
            out, _ = tree_speculative_generate(target, drafters[name](), prompt, 16, temperature=0)
        assert out == generate(target, prompt, 16)


def test_pass_training_layout_equals_one_forward_per_cut():
    """train.py pass trains on several cuts of a window in one forward: each block's outputs must equal a forward
    of the tokens up to its cut followed by the embeddings alone."""
    target, (T, k, cuts) = toy_model(seed=3, max_len=64), (20, 3, [4, 9, 15])
    positions, mask = pass_layout(T, k, cuts, "cpu")
    tokens = torch.randint(0, 6, (1, T), generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(k, target.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = target(
            None,
            positions=positions,
            attn_mask=mask,
            inputs_embeds=torch.cat([target.embed_tokens(tokens), embeds.repeat(len(cuts), 1)[None]], dim=1),
        )[0, T:]
        for b, c in enumerate(cuts):
            alone = target(None, inputs_embeds=torch.cat([target.embed_tokens(tokens[:, : c + 1]), embeds[None]], 1))[0]
            assert torch.allclose(out[b * k : (b + 1) * k], alone[c + 1 :], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Greedy identity on the shipped weights, several knob settings.

SETTINGS = {
    "jacobi block 2": ("jacobi", dict(jacobi_block=2)),
    "jacobi block 5": ("jacobi", dict(jacobi_block=5)),
    "lookahead 3-3-3": ("lookahead", dict(lookahead_window=3, lookahead_ngram=3, lookahead_candidates=3)),
    "lookahead 2-4-2": ("lookahead", dict(lookahead_window=2, lookahead_ngram=4, lookahead_candidates=2)),
    "lookahead 4-2-4": ("lookahead", dict(lookahead_window=4, lookahead_ngram=2, lookahead_candidates=4)),
    "pass": ("pass", {}),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_mask_predict_greedy_decoding_equals_autoregressive_on_shipped_weights(short_references, setting):
    enc, target, references = short_references
    name, knobs = SETTINGS[setting]
    drafter = table.drafter(name, target, **knobs)
    for prompt, expected in references:
        out, stats = tree_speculative_generate(target, drafter, prompt, 24, temperature=0, eot=enc.eot_token)
        assert out == expected
        assert sum(stats.accept_counts) == stats.target_calls


# ---------------------------------------------------------------------------------------------------------------
# The sampled law: chi-square of 3-token continuations against the toy target's exact joint, with a power check.

N_TRUE, N_BROKEN = 20_000, 1_000
WARPED = dict(temperature=0.8, top_k=4, top_p=0.9)
PROMPT = [1, 2, 1, 3, 1]


def toy_lookahead():
    return LookaheadDrafter(toy_model(seed=2), window=2, ngram=2, candidates=2)  # 2 extra tokens per call


def lookahead_chi_square(n_samples: int) -> tuple[float, float, int]:
    samples, _ = sample_tree_decoding(toy_lookahead, PROMPT, n_samples, **WARPED)
    stat, dof = chi_square(samples, exact_joint(toy_model(seed=2), PROMPT, 3, **WARPED))
    return stat, chi_square_critical(dof), dof


@pytest.mark.slow
def test_lookahead_sampling_reproduces_the_target_distribution():
    stat, critical, dof = lookahead_chi_square(N_TRUE)
    print(f"lookahead sampling: chi2 {stat:.1f} < {critical:.1f} (dof {dof})")
    assert stat < critical, f"chi2 = {stat:.1f} >= {critical:.1f} (dof {dof})"


@pytest.mark.slow
def test_the_law_test_rejects_an_extra_token_left_in_the_cache(monkeypatch):
    monkeypatch.setattr(KVCache, "keep", keep_and_leak)  # forked workers inherit the patch
    stat, critical, dof = lookahead_chi_square(N_BROKEN)
    print(f"extra token left in the cache: chi2 {stat:.1f} > {critical:.1f} (dof {dof})")
    assert stat > critical, f"a leaked extra token was not detected: chi2 = {stat:.1f} <= {critical:.1f}"
