"""Tests for token-tree speculative decoding (specdec.tree_speculative_generate, §6.3): greedy identity with
autoregressive decoding for every tree drafter on the shipped weights; the exact output distribution of tree sampling
(chi-square against the enumerated target joint, with power checks against broken tree verifiers and the LOSSY
typical acceptance); the KV-cache mechanics of the loop; and the drafters' tree proposals.
p = target, q = draft (Leviathan et al.)."""

import dataclasses
import multiprocessing
import os
import random
from pathlib import Path

import numpy as np
import pytest
import table
import torch

import specdec
from approximate import Typical
from drafters import ModelDrafter, PromptLookupDrafter, always
from heads import EagleDrafter, EagleHead, HydraDrafter
from methods import load_model
from model import KVCache
from prompts import function_prompts
from specdec import generate, tree_speculative_generate, trim_tree
from tests.toy import BrokenRule, chi_square, chi_square_critical, exact_joint, perturbed, toy_model
from tokenizer import load_tokenizer
from tree import Tree, children, depths, path_to, rerank_top_m
from verify import residual_distribution, sample_token

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
ATOL = 1e-5


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# 1. Greedy identity on the shipped weights, every tree drafter, two tree shapes.

N_HELDOUT, CONTEXT, N_NEW = 6, 128, 32
SHAPES = {
    "default": dict(tree_size=24, tree_depth=6, tree_width=4),  # the command line's defaults
    "small": dict(tree_size=8, tree_depth=3, tree_width=2),
}


@pytest.fixture(scope="module")
def shipped():
    enc = load_tokenizer(WEIGHTS / "tokenizer.tiktoken")
    return enc, load_model(WEIGHTS / "target", "cpu", torch.float32)


def shipped_drafter(name: str, target, tree_size: int, tree_depth: int, tree_width: int):
    """Built exactly as the command line builds it: ModelDrafter(draft), PromptLookupDrafter(), MedusaDrafter and
    EagleDrafter from weights/."""
    return table.drafter(name, target, tree_size=tree_size, tree_depth=tree_depth, tree_width=tree_width)


@pytest.fixture(scope="module")
def greedy_references(shipped):
    """(prompt, greedy autoregressive continuation): held-out code, a one-token prompt and a short prompt."""
    enc, target = shipped
    prompts = function_prompts(enc, N_HELDOUT, context_tokens=CONTEXT)
    assert len(prompts) == N_HELDOUT
    prompts += [enc.encode_ordinary("import")[:1], enc.encode_ordinary("class Stack:")]
    return [(p, generate(target, p, N_NEW, temperature=0, eot=enc.eot_token)) for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES.keys())
@pytest.mark.parametrize("name", ["draft", "pld", "medusa", "hydra", "eagle"])
def test_greedy_tree_decoding_equals_autoregressive_on_shipped_weights(shipped, greedy_references, name, shape):
    enc, target = shipped
    drafter = shipped_drafter(name, target, **SHAPES[shape])
    accepted = 0
    for i, (prompt, expected) in enumerate(greedy_references):
        out, stats = tree_speculative_generate(target, drafter, prompt, N_NEW, temperature=0, eot=enc.eot_token)
        assert out == expected, f"prompt {i} ({len(prompt)} tokens)"  # whole lists: lengths included
        assert stats.produced == len(out)
        assert stats.tau >= 1 or len(out) < N_NEW  # below 1 only when the end of text cut the last call short
        assert sum(stats.accept_counts) == stats.target_calls
        assert sum(n * c for n, c in enumerate(stats.accept_counts)) == stats.accepted <= stats.drafted
        accepted += stats.accepted
    assert accepted > 0, f"{name} never had a draft accepted"


def test_blockwise_drafts_one_chain_of_the_heads_top_tokens_and_equals_autoregressive(shipped, greedy_references):
    """Blockwise Parallel Decoding (Stern et al. 2018) is Medusa's heads with one guess each: a chain."""
    enc, target = shipped
    drafter = shipped_drafter("blockwise", target, **SHAPES["default"])
    trees = []
    for prompt, expected in greedy_references[:6]:
        out, _ = tree_speculative_generate(
            target,
            drafter,
            prompt,
            N_NEW,
            temperature=0,
            eot=enc.eot_token,
            on_tree=lambda tree, path: trees.append(tree),
        )
        assert out == expected
    heads = len(drafter.heads.linears)
    assert all(t.parents == list(range(-1, len(t) - 1)) and len(t) <= heads + 1 for t in trees)  # chains
    assert max(len(t) for t in trees) == heads + 1


# ---------------------------------------------------------------------------------------------------------------
# 2. End to end: tree sampling emits exactly the target's distribution (chi-square over all V^3 continuations of
# 3 tokens), for any tree; the same test rejects broken tree verifiers and the lossy typical acceptance.


def toy_target():
    return toy_model(seed=2)  # V = 6, 16 positions, every weight N(0, 0.5^2): far from uniform


def toy_model_drafter():
    return ModelDrafter(perturbed(toy_target(), seed=100, noise=0.2), depth=2, width=2, beam=2, size=4)


def toy_eagle_drafter(depth: int = 2, width: int = 2, beam: int = 2, size: int = 4):
    """A random EAGLE head (one layer, the toy target's shape): its trees are arbitrary, which must not matter."""
    target = toy_target()
    torch.manual_seed(7)
    head = EagleHead(dataclasses.replace(target.config, num_hidden_layers=1))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(std=0.5)
    return EagleDrafter(target, head.eval(), depth=depth, width=width, beam=beam, size=size)


def toy_pld_drafter():
    return PromptLookupDrafter(depth=2, matches=3)


def toy_sampled_drafter():
    """Children sampled i.i.d. from the warped draft (SpecInfer, SpecTr): 2 per node, duplicates kept."""
    return ModelDrafter(perturbed(toy_target(), seed=100, noise=0.2), depth=2, width=2, beam=2, size=4, sampled=True)


MODEL_PROMPT = [1, 2, 3]
PLD_PROMPT = [1, 2, 1, 3, 1, 4, 1]  # the last "1" follows 2, 3 and 4 before: three sibling drafts at depth 1
TOY = {
    "model": (toy_model_drafter, MODEL_PROMPT),
    "pld": (toy_pld_drafter, PLD_PROMPT),
    "sampled": (toy_sampled_drafter, MODEL_PROMPT),
}
N_BROKEN_SAMPLED = 1_000
UNWARPED, WARPED = dict(temperature=1.0), dict(temperature=0.8, top_k=4, top_p=0.9)
N_TRUE, N_TOKENS, CHUNKS = 20_000, 3, 4  # fixed chunks: the samples do not depend on the cores


def _sample_chunk(args):
    make_drafter, prompt, n_samples, seed, opts = args
    torch.set_num_threads(1)
    target, drafter, generator = toy_target(), make_drafter(), seeded(seed)
    out, accept_counts = np.empty((n_samples, N_TOKENS), dtype=np.int64), np.zeros(N_TOKENS, dtype=np.int64)
    for i in range(n_samples):
        tokens, stats = tree_speculative_generate(
            target, drafter, prompt, N_TOKENS, generator=generator, eot=None, **opts
        )
        out[i] = tokens  # exactly N_TOKENS: no end of text, and trees are trimmed to the budget
        accept_counts[: len(stats.accept_counts)] += stats.accept_counts
    return out, accept_counts


def sample_tree_decoding(make_drafter, prompt, n_samples: int, seed: int = 0, **opts):
    """n_samples 3-token continuations [n_samples, 3] and the summed accept_counts. Deterministic in `seed`: fixed
    chunks, each with its own generator, run in forked workers, one per core; `opts` go to the loop (a verifier)."""
    chunks = [
        (make_drafter, prompt, n_samples // CHUNKS + (i < n_samples % CHUNKS), 1000 * seed + i, opts)
        for i in range(CHUNKS)
    ]
    workers = min(CHUNKS, len(os.sched_getaffinity(0)))
    if workers == 1:
        results = [_sample_chunk(c) for c in chunks]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map_async(_sample_chunk, chunks).get(timeout=600)
    return np.concatenate([r[0] for r in results]), sum(r[1] for r in results)


def tree_law_chi_square(make_drafter, prompt, warping: dict, n_samples: int, **opts):
    """(statistic, critical value at alpha = 1e-3, dof, accept_counts) of samples tree-decoded with the drafters
    make_drafter() builds against toy_target()'s exact joint (the law test of every tree drafter)."""
    samples, accept_counts = sample_tree_decoding(make_drafter, prompt, n_samples, **warping, **opts)
    stat, dof = chi_square(samples, exact_joint(toy_target(), prompt, N_TOKENS, **warping))
    return stat, chi_square_critical(dof), dof, accept_counts


def chi_square_of_tree_decoding(drafter: str, warping: dict, n_samples: int, **opts):
    """tree_law_chi_square of one of the TOY drafters."""
    return tree_law_chi_square(*TOY[drafter], warping, n_samples, **opts)


# ModelDrafter (top-k siblings from a model) unwarped; prompt lookup (a trie of earlier matches) with every warper.
# Losslessness holds for ANY fixed tree, and EAGLE's trees are just other trees: its 20k-sample case (~5 ms a sample
# on one core) is left out for time; EAGLE is covered by the greedy, context-limit and proposal tests.
TRUE_CASES = {"model-T1": ("model", UNWARPED), "pld-T0.8-k4-p0.9": ("pld", WARPED)}


@pytest.mark.slow
@pytest.mark.parametrize("case", TRUE_CASES.keys())
def test_tree_sampling_reproduces_the_target_distribution(case):
    drafter, warping = TRUE_CASES[case]
    stat, critical, dof, accept_counts = chi_square_of_tree_decoding(drafter, warping, N_TRUE)
    print(f"{case}: chi2 {stat:.1f} < {critical:.1f} (dof {dof}); accepted per call {accept_counts.tolist()}")
    assert stat < critical, f"chi2 = {stat:.1f} >= {critical:.1f} (dof {dof})"
    assert (accept_counts > 0).all()  # every outcome happened: a rejection at the root, one accept, two


def untested_residual(target_probs, draft_probs, tokens, parents, generator):
    """BROKEN: tests every sibling against the node's original p instead of the residual left by the siblings
    rejected before it (the final sample still comes from the correct residual)."""
    token_list, kids, node, path = tokens.tolist(), children(parents.tolist()), 0, []
    while True:
        p = r = target_probs[node]
        accepted = None
        for c in kids[node]:
            x = token_list[c]
            if torch.rand(1, generator=generator).item() < p[x].item():
                accepted = c
                break
            r = residual_distribution(r, torch.nn.functional.one_hot(torch.tensor(x), len(r)).float())
        if accepted is None:
            return path, sample_token(r, generator)
        node = accepted
        path.append(node)


def first_child_always(target_probs, draft_probs, tokens, parents, generator):
    """BROKEN: accepts the first child at every node, then draws the bonus token from p of the leaf."""
    kids, node, path = children(parents.tolist()), 0, []
    while kids[node]:
        node = kids[node][0]
        path.append(node)
    return path, sample_token(target_probs[node], generator)


BROKEN = {untested_residual: 3_000, first_child_always: 500}  # samples: the subtler bug needs more


@pytest.mark.slow
@pytest.mark.parametrize("broken", BROKEN.keys(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", TRUE_CASES.keys())
def test_distribution_test_rejects_a_broken_tree_verifier(case, broken):
    drafter, warping = TRUE_CASES[case]
    stat, critical, dof, _ = chi_square_of_tree_decoding(
        drafter, warping, BROKEN[broken], verifier=BrokenRule(tree_fn=broken)
    )
    print(f"{broken.__name__} {case}: chi2 {stat:.1f} > {critical:.1f} (dof {dof})")
    assert stat > critical, f"broken verifier not detected: chi2 = {stat:.1f} <= {critical:.1f} (dof {dof})"


@pytest.mark.slow
def test_typical_acceptance_is_detectably_not_the_target_distribution():
    """Medusa's typical acceptance is documented as LOSSY (its next token is the argmax): the test must see it."""
    stat, critical, dof, _ = chi_square_of_tree_decoding("model", UNWARPED, 500, verifier=Typical())
    print(f"typical acceptance: chi2 {stat:.1f} > {critical:.1f} (dof {dof})")
    assert stat > critical, f"typical acceptance looks lossless: chi2 = {stat:.1f} <= {critical:.1f} (dof {dof})"


def test_tree_sampling_is_deterministic_in_the_generator_seed():
    target, drafter = toy_target(), toy_model_drafter()
    runs = [
        tree_speculative_generate(target, drafter, MODEL_PROMPT, 10, temperature=1.0, generator=seeded(s))[0]
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1] != runs[2]


class RerankedSampledDrafter(ModelDrafter):
    """BROKEN on purpose: samples a node's children i.i.d. from q, then keeps only the best-scored ones, as EAGLE-2
    reranks its top-k trees. The survivors are no longer draws from q, so the i.i.d. rule, which trusts tree.q, is
    biased towards the tokens q favours."""

    def propose_tree(self, context, features, warp, generator, keep=always):
        return rerank_top_m(super().propose_tree(context, features, warp, generator, keep), 1)


def toy_reranked_drafter():
    return RerankedSampledDrafter(
        perturbed(toy_target(), seed=100, noise=0.2), depth=1, width=3, beam=1, size=3, sampled=True
    )


TOY["reranked"] = (toy_reranked_drafter, MODEL_PROMPT)


@pytest.mark.slow
def test_sampled_siblings_reproduce_the_target_distribution_and_a_reranked_sample_does_not():
    """Every sample draws a fresh tree (each tree_speculative_generate call samples its own children), as the
    i.i.d. rule is lossless only averaged over that drawing. Power check: the same test rejects trees whose sampled
    children were pruned by score. (Verifying sampled siblings with the deterministic-sibling rule, q one-hot, is
    NOT a power check: that rule is lossless for every fixed tree, so for any mixture of trees too; it only accepts
    less. tests/test_verify.py's duplicate_sibling case shows it handles the repeats that sampling makes.)"""
    stat, critical, dof, accept_counts = chi_square_of_tree_decoding("sampled", WARPED, N_TRUE)
    print(f"sampled siblings: chi2 {stat:.1f} < {critical:.1f} (dof {dof}); accepted per call {accept_counts.tolist()}")
    assert stat < critical, f"chi2 = {stat:.1f} >= {critical:.1f} (dof {dof})"
    assert (accept_counts > 0).all()
    stat, critical, dof, _ = chi_square_of_tree_decoding("reranked", WARPED, N_BROKEN_SAMPLED)
    print(f"reranked sampled siblings: chi2 {stat:.1f} > {critical:.1f} (dof {dof})")
    assert stat > critical, f"reranked sampled siblings not detected: chi2 = {stat:.1f} <= {critical:.1f}"


def test_sampled_trees_record_q_keep_duplicates_and_draw_from_the_generator_only():
    target, drafter = toy_target(), toy_sampled_drafter()
    warp = specdec.warp_for(1.0, 0, 1.0)
    trees = []
    for seed in range(40):
        drafter.reset()
        torch.manual_seed(0)
        rng_state = torch.get_rng_state()
        with torch.inference_mode():
            tree = drafter.propose_tree(MODEL_PROMPT, features_of(target, MODEL_PROMPT), warp, seeded(seed))
        assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG was not touched
        trees.append(tree)
        kids = children(tree.parents)
        assert len(tree) == 5 and len(kids[0]) == 2  # index order: the root's 2 children, then 2 grandchildren
        draft_logits = drafter.model(torch.tensor([MODEL_PROMPT]))[0, -1]
        assert torch.allclose(tree.q[0], warp(draft_logits), atol=1e-6)  # the root's children came from q[0]
        for node, below in enumerate(kids):
            if below:  # q of an expanded node: the draft's warped distribution after its root path
                path = [tree.tokens[i] for i in path_to(tree, node)[1:]]
                logits = drafter.model(torch.tensor([MODEL_PROMPT + path]))[0, -1]
                assert torch.allclose(tree.q[node], warp(logits), atol=1e-5)
    assert any(len({tree.tokens[c] for c in children(tree.parents)[0]}) == 1 for tree in trees)  # duplicates stay
    assert len({tuple(tree.tokens) for tree in trees}) > 5  # the trees really are random


# ---------------------------------------------------------------------------------------------------------------
# 3. Mechanics of the loop: the cache after each step, trimming to the budget, the end of the context.


class DecoyDrafter:
    """BAD on purpose: at each depth the first child is a wrong decoy (with a child of its own) and the second
    follows the target's greedy continuation `right` for step % 4 levels, so the accepted path is never the
    first branch and the cache must MOVE its K/V (docs/pitfalls.md: Move the accepted path's K/V, do not just
    truncate). Records what the loop gives it."""

    def __init__(self, prompt: list[int], right: list[int], vocab_size: int):
        self.prompt, self.right, self.V = prompt, right, vocab_size
        self.contexts, self.features, self.trees = [], [], []

    def reset(self):
        self.contexts, self.features, self.trees = [], [], []

    def propose_tree(self, context, features, warp, generator, keep):
        self.contexts.append(list(context))
        self.features.append(features.clone())
        ahead = self.right[len(context) - len(self.prompt) :] + [0] * 4
        n_right, tree, node = (len(self.contexts) - 1) % 4, Tree.from_root(context[-1]), 0
        for d in range(3):
            decoy = tree.add(node, (ahead[d] + 1) % self.V, -1.0)
            tree.add(decoy, ahead[d + 1], -2.0)
            node = tree.add(node, ahead[d] if d < n_right else (ahead[d] + 2) % self.V, -1.5)
        self.trees.append(tree)
        return tree


class CheckedTarget:
    """Wraps the target. On every verification call: the cache holds exactly the accepted context but its last
    token, and the logits of EVERY tree node equal a cache-free forward over the context and that node's root path;
    the features handed to the drafter equal a cache-free forward's hidden states of the context but its last."""

    def __init__(self, model, drafter: DecoyDrafter, n_new: int):
        self.model, self.drafter, self.config, self.device = model, drafter, model.config, model.device
        self.embed_tokens, self.n_new = model.embed_tokens, n_new
        self.cache, self.checked = None, 0

    def new_cache(self):
        self.cache = self.model.new_cache()
        return self.cache

    def __call__(self, tokens, cache, *args, **kw):
        if not self.drafter.contexts:  # the prefill
            return self.model(tokens, cache, *args, **kw)
        context = self.drafter.contexts[-1]
        budget = self.n_new - (len(context) - len(self.drafter.prompt))
        tree = trim_tree(self.drafter.trees[-1], budget - 1, cache.max_len - cache.length)  # what the loop verifies
        assert torch.equal(kw["inputs_embeds"], self.model.embed_tokens(torch.tensor([tree.tokens])))
        assert cache.length == len(context) - 1 and tree.tokens[0] == context[-1]
        fresh_hidden = self.model(torch.tensor([context[:-1]]), return_hidden=True)[1][0]
        assert torch.allclose(self.drafter.features[-1], fresh_hidden, atol=ATOL, rtol=0)
        logits, hidden = self.model(tokens, cache, *args, **kw)
        for node in range(len(tree)):
            path = [tree.tokens[i] for i in path_to(tree, node)[1:]]
            fresh = self.model(torch.tensor([context + path]))[0, -1]
            assert torch.allclose(logits[0, node], fresh, atol=ATOL, rtol=0), f"node {node}"
        self.checked += 1
        return logits, hidden


def decode_with_checks(n_new: int = 14):
    target, prompt = toy_model(seed=2, max_len=32), [1, 2, 3]  # room for a 10-node tree at every step
    right = generate(target, prompt, n_new + 4, temperature=0)
    drafter = DecoyDrafter(prompt, right, target.config.vocab_size)
    checked = CheckedTarget(target, drafter, n_new)
    paths = []
    out, stats = tree_speculative_generate(
        checked, drafter, prompt, n_new, temperature=0, on_tree=lambda tree, path: paths.append(list(path))
    )
    return out, stats, right[:n_new], checked, paths, prompt


def test_every_tree_verification_runs_on_a_cache_of_exactly_the_accepted_text():
    out, stats, right, checked, paths, prompt = decode_with_checks()
    assert out == right
    assert checked.checked == stats.target_calls > 3  # every verification call was checked
    assert checked.cache.length == len(prompt) + len(out) - 1  # the invariant after the last step too
    assert any(path and path != list(range(1, len(path) + 1)) for path in paths)  # K/V had to move
    assert all(stats.accept_counts[n] > 0 for n in range(4))  # steps that accepted 0, 1, 2 and 3 drafts


def test_the_cache_check_catches_a_keep_that_only_truncates(monkeypatch):
    def truncate_only(self, indices):  # BROKEN: right only when the accepted path is the first branch
        self.length = int(indices[0]) + len(indices)

    monkeypatch.setattr(KVCache, "keep", truncate_only)
    with pytest.raises(AssertionError):
        decode_with_checks()


def random_tree(rng: random.Random, n: int) -> Tree:
    tree = Tree.from_root(rng.randrange(6))
    for i in range(1, n):
        tree.add(rng.randrange(i), rng.randrange(6), -rng.random())
    return tree


def test_trim_tree_keeps_exactly_the_nodes_within_the_depth_and_size_budgets():
    rng = random.Random(0)
    for _ in range(200):
        tree = random_tree(rng, rng.randint(1, 20))
        small = trim_tree(tree, 10, 3)
        assert len(small) == min(3, len(tree)) and small.tokens == tree.tokens[: len(small)]
        for max_depth in range(5):
            trimmed, d = trim_tree(tree, max_depth, len(tree)), depths(tree)
            assert max(depths(trimmed)) <= max_depth
            assert len(trimmed) == sum(x <= max_depth for x in d)  # nothing else is dropped
            kept = [i for i in range(len(tree)) if d[i] <= max_depth]  # same root paths, in the same order
            assert [[tree.tokens[j] for j in path_to(tree, i)] for i in kept] == [
                [trimmed.tokens[j] for j in path_to(trimmed, i)] for i in range(len(trimmed))
            ]


class ChainDrafter:
    """Proposes the target's next `length` greedy tokens as one chain: always right, so only the budget stops it."""

    def __init__(self, prompt, right, length):
        self.prompt, self.right, self.length = prompt, right, length

    def reset(self):
        pass

    def propose_tree(self, context, features, warp, generator, keep):
        tree, done = Tree.from_root(context[-1]), len(context) - len(self.prompt)
        for i, token in enumerate(self.right[done : done + self.length]):
            tree.add(i, token, -1.0 - i)
        return tree


@pytest.mark.parametrize("n_new", [1, 4, 5, 9])
def test_trees_in_the_loop_never_reach_past_the_budget(n_new):
    target, prompt = toy_target(), [1, 2, 3]
    right = generate(target, prompt, 12, temperature=0)
    budgets, produced = [], []

    def on_tree(tree, path):
        budgets.append((max(depths(tree)), n_new - sum(produced)))
        produced.append(len(path) + 1)

    out, _ = tree_speculative_generate(
        target, ChainDrafter(prompt, right, 3), prompt, n_new, temperature=0, on_tree=on_tree
    )
    assert out == right[:n_new]
    assert all(depth <= budget - 1 for depth, budget in budgets)


class WideDrafter:
    """Proposes every token of the vocabulary under the first two nodes of each level: 30 nodes, the greedy path
    among them."""

    def __init__(self, width=6, depth=3):
        self.width, self.depth = width, depth

    def reset(self):
        pass

    def propose_tree(self, context, features, warp, generator, keep):
        tree, frontier = Tree.from_root(context[-1]), [0]
        for _ in range(self.depth):
            frontier = [tree.add(node, t, -1.0) for node in frontier[:2] for t in range(self.width)]
        return tree


NEAR_LIMIT = {
    "model": toy_model_drafter,
    "pld": toy_pld_drafter,
    "eagle": lambda: toy_eagle_drafter(3, 2, 2, 6),
    "wide": WideDrafter,
}


@pytest.mark.parametrize("room", [1, 2, 3])
@pytest.mark.parametrize("drafter", NEAR_LIMIT.keys())
def test_prompt_near_the_context_limit_fills_it_without_overflow(drafter, room):
    target = toy_target()
    prompt = ([1, 2, 3, 1, 2, 4] * 3)[: target.config.max_position_embeddings - room]  # repeats: PLD drafts
    expected = generate(target, prompt, 10, temperature=0)
    assert len(expected) == room
    out, _ = tree_speculative_generate(target, NEAR_LIMIT[drafter](), prompt, 10, temperature=0)
    assert out == expected
    out, _ = tree_speculative_generate(
        target, NEAR_LIMIT[drafter](), prompt, 10, temperature=1.0, generator=seeded(room)
    )
    assert len(out) == room


@pytest.fixture(scope="module")
def three_from_the_end(shipped):
    """(prompt that leaves 3 positions of the context, its greedy continuation)."""
    enc, target = shipped
    text = Path(specdec.__file__).read_text() * 4
    prompt = enc.encode_ordinary(text)[: target.config.max_position_embeddings - 3]
    return prompt, generate(target, prompt, 10, temperature=0)


@pytest.mark.parametrize("name", ["draft", "pld", "medusa", "hydra", "eagle"])
def test_shipped_drafters_fill_the_last_three_positions_of_the_context(shipped, three_from_the_end, name):
    enc, target = shipped
    prompt, expected = three_from_the_end
    assert len(expected) == 3
    out, _ = tree_speculative_generate(
        target, shipped_drafter(name, target, **SHAPES["default"]), prompt, 10, temperature=0
    )
    assert out == expected


# ---------------------------------------------------------------------------------------------------------------
# 4. Tree proposals of the model drafters: deterministic, well formed, and independent of their past calls.


@pytest.fixture(scope="module")
def proposal_setup(shipped):
    enc, target = shipped
    draft = load_model(WEIGHTS / "draft", "cpu", torch.float32)
    context = function_prompts(enc, 1, context_tokens=64)[0]
    return target, draft, context


def features_of(target, context):
    with torch.inference_mode():
        return target(torch.tensor([context[:-1]]), return_hidden=True)[1][0]


def test_hydra_scores_each_node_by_its_own_head_reading_its_own_path(proposal_setup):
    """Hydra (Ankner et al. 2024): a node at depth k was drafted by head k from h_t and the embeddings of the k tokens
    on its path from the root; its score is its parent's plus that head's log-probability of it."""
    target, _, context = proposal_setup
    drafter = HydraDrafter.from_pretrained(target, WEIGHTS / "hydra", width=3, beam=3, size=12)
    features = features_of(target, context)
    with torch.inference_mode():
        tree = drafter.propose_tree(context, features, None, None)
        assert len(tree) > 4 and tree.tokens[0] == context[-1]
        for node in range(1, len(tree)):
            path = [tree.tokens[a] for a in path_to(tree, node)]  # root .. node
            embeds = target.embed_tokens(torch.tensor(path[:-1]))  # [k, C]
            logits = drafter.heads(len(path) - 1, features[-1], embeds, target.lm_head)
            expected = tree.scores[tree.parents[node]] + torch.log_softmax(logits.float(), -1)[path[-1]].item()
            assert tree.scores[node] == pytest.approx(expected, abs=1e-4)


def make_proposer(kind, target, draft, shape):
    size, depth, width = shape["tree_size"], shape["tree_depth"], shape["tree_width"]
    if kind == "draft":
        return ModelDrafter(draft, depth=depth, width=width, beam=width, size=size)
    return EagleDrafter.from_pretrained(target, WEIGHTS / "eagle", depth=depth, width=width, beam=width, size=size)


def propose(drafter, target, context, fresh=True):
    if fresh:
        drafter.reset()
    with torch.inference_mode():
        return drafter.propose_tree(context, features_of(target, context), None, None)


@pytest.mark.parametrize("shape", SHAPES.keys())
@pytest.mark.parametrize("kind", ["draft", "eagle"])
def test_tree_proposals_are_deterministic_well_formed_and_use_no_randomness(proposal_setup, kind, shape):
    target, draft, context = proposal_setup
    size, depth = SHAPES[shape]["tree_size"], SHAPES[shape]["tree_depth"]
    drafters = [make_proposer(kind, target, draft, SHAPES[shape]) for _ in range(2)]
    torch.manual_seed(1)
    rng_state = torch.get_rng_state()
    tree = propose(drafters[0], target, context)
    assert torch.equal(torch.get_rng_state(), rng_state)  # drew no random numbers
    torch.manual_seed(2)
    assert propose(drafters[1], target, context) == tree  # exactly: tokens, parents and scores
    assert tree.tokens[0] == context[-1] and tree.parents[0] == -1
    assert all(0 <= p < i for i, p in enumerate(tree.parents) if i > 0)
    assert 1 < len(tree) <= size + 1 and max(depths(tree)) <= depth
    for kids in children(tree.parents):
        assert len({tree.tokens[c] for c in kids}) == len(kids)  # top-k siblings: distinct tokens
        assert all(tree.scores[c] <= tree.scores[tree.parents[c]] for c in kids)  # log-probs add up


@pytest.mark.parametrize("kind", ["draft", "eagle"])
def test_next_proposal_after_a_step_equals_a_fresh_drafters(proposal_setup, kind):
    """The loop's use: after a tree, the context grows by an accepted path and the target's token; the drafter's
    own cache must have dropped the tree's nodes, so it proposes what a drafter that never saw the tree would."""
    target, draft, context = proposal_setup
    drafter = make_proposer(kind, target, draft, SHAPES["default"])
    tree = propose(drafter, target, context)
    for n_accepted in (0, 2, 1):  # a rejection at the root, two accepted drafts, one
        leaf = next(i for i in range(len(tree)) if depths(tree)[i] == n_accepted)
        correction = tree.tokens[-1]  # any token stands in for the target's
        context = context + [tree.tokens[i] for i in path_to(tree, leaf)[1:]] + [correction]
        tree = propose(drafter, target, context, fresh=False)
        expected = propose(make_proposer(kind, target, draft, SHAPES["default"]), target, context)
        assert tree.tokens == expected.tokens and tree.parents == expected.parents
        assert np.allclose(tree.scores, expected.scores, atol=1e-4)


@pytest.mark.parametrize("kind", ["draft", "eagle"])
def test_proposing_twice_on_the_same_context_gives_the_same_tree(proposal_setup, kind):
    target, draft, context = proposal_setup
    drafter = make_proposer(kind, target, draft, SHAPES["default"])
    first = propose(drafter, target, context)
    for _ in range(2):
        again = propose(drafter, target, context, fresh=False)
        assert again.tokens == first.tokens and again.parents == first.parents
        assert np.allclose(again.scores, first.scores, atol=1e-4)  # the root is refed alone: rounding differs
