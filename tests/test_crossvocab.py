"""Tests for crossvocab.py: a draft with another vocabulary than the target's. Greedy identity on toy vocabularies
and on the shipped weights, the exact output law of Token-Level Intersection sampling (chi-square against the
enumerated target joint, with power checks against two broken q's), the exact-extension property of string-level
proposals, and the draft cache's reuse. p = target, q = draft (Leviathan et al.)."""

import dataclasses

import pytest
import tiktoken
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossvocab import CrossVocabDrafter, extend_exactly, is_greedy, shared_vocabulary
from drafters import ModelDrafter, always
from methods import load_model
from model import Transformer
from specdec import Stats, generate, speculative_generate, warp_for
from tests.conftest import WEIGHTS
from tests.toy import (
    acceptance_matches_theory,
    chi_square,
    chi_square_critical,
    exact_joint,
    perturbed,
    sample_speculative,
    toy_model,
)
from tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- toy vocabularies: the same three bytes, different merges ------------------------------------------------
# target: a b ' ' ab ' a' ba        draft: a b ' ' aa ' b' ab        shared: a b ' ' ab (draft 5 = target 3)

PATTERN = r" ?[ab]+| +"
TARGET_ENC = tiktoken.Encoding(
    "toy-target", pat_str=PATTERN, mergeable_ranks={b"a": 0, b"b": 1, b" ": 2, b"ab": 3, b" a": 4, b"ba": 5},
    special_tokens={},
)  # fmt: skip
DRAFT_ENC = tiktoken.Encoding(
    "toy-draft", pat_str=PATTERN, mergeable_ranks={b"a": 0, b"b": 1, b" ": 2, b"aa": 3, b" b": 4, b"ab": 5},
    special_tokens={},
)  # fmt: skip
V = 6


def toy_target():
    return toy_model(2, vocab_size=V, max_len=32)


def close_draft(target, max_len: int) -> Transformer:
    """A draft close to the target across the two vocabularies: a perturbed copy whose shared tokens' embedding
    and output rows are the target's rows of the same bytes ('aa' and ' b' keep perturbed rows of other tokens)."""
    draft = perturbed(target, seed=100, noise=0.2)
    draft.config = dataclasses.replace(target.config, max_position_embeddings=max_len)
    with torch.no_grad():
        for d, t in enumerate(shared_vocabulary(DRAFT_ENC, TARGET_ENC, V).tolist()):
            if t >= 0:
                draft.embed_tokens.weight[d], draft.lm_head.weight[d] = (
                    target.embed_tokens.weight[t],
                    target.lm_head.weight[t],
                )
    return draft


def toy_drafter(max_len: int = 64, cls=CrossVocabDrafter):
    return cls(close_draft(toy_model(2, vocab_size=V, max_len=64), max_len), DRAFT_ENC, TARGET_ENC)


def test_the_map_holds_the_tokens_with_the_same_bytes():
    assert shared_vocabulary(DRAFT_ENC, TARGET_ENC, V).tolist() == [0, 1, 2, -1, -1, 3]
    assert shared_vocabulary(DRAFT_ENC, TARGET_ENC, V + 2).tolist()[-2:] == [-1, -1]  # model rows past the tokenizer


def test_tli_q_is_the_renormalised_restriction_at_the_target_ids():
    drafter, logits = toy_drafter(), torch.tensor([0.5, -1.0, 2.0, 3.0, 1.0, 0.0])
    q_draft, q = drafter.shared_distribution(logits, warp_for(1.0, 0, 1.0))
    expected = torch.softmax(torch.tensor([0.5, -1.0, 2.0, 0.0]), dim=-1)  # a b ' ' ab, 'aa' and ' b' left out
    assert torch.allclose(q_draft[[0, 1, 2, 5]], expected) and q_draft[[3, 4]].sum() == 0
    assert torch.allclose(q[:4], expected) and q[4:].sum() == 0


def test_string_level_runs_for_deterministic_warps_only():
    assert is_greedy(warp_for(0.0, 0, 1.0), V, "cpu") and is_greedy(warp_for(0.7, 1, 1.0), V, "cpu")
    assert not is_greedy(warp_for(1.0, 0, 1.0), V, "cpu") and not is_greedy(warp_for(0.8, 3, 0.9), V, "cpu")


# ---------------------------------------------------------------------------------------------------------------
# 1. Greedy identity: speculative_generate with the cross-vocabulary drafter equals generate, token for token.


class Recording(CrossVocabDrafter):
    """Records (context, proposal, draft text) of every step."""

    def reset(self):
        super().reset()
        self.steps = []

    def propose(self, context, gamma, warp, generator, keep=always):
        tokens, q = super().propose(context, gamma, warp, generator, keep)
        self.steps.append((list(context), gamma, list(tokens), self.draft_enc.decode_bytes(self.drafted)))
        return tokens, q


PROMPTS = [[0], [2, 3], [4, 1, 2], [5, 5, 0, 2, 4], [3, 3, 1, 2, 0, 4, 5]]  # non-canonical ones too


@pytest.mark.parametrize("draft_len", [64, 12], ids=["room", "window"])  # 12: the draft must slide its window
def test_greedy_cross_vocabulary_equals_autoregressive(draft_len):
    target, drafter, total = toy_target(), toy_drafter(draft_len, Recording), Stats()
    for i, prompt in enumerate(PROMPTS):
        expected = generate(target, prompt, 20)
        out, stats = speculative_generate(target, drafter, prompt, 20, gamma=(1, 2, 3, 4, 8)[i])
        assert out == expected, f"prompt {prompt}"
        total.merge(stats)
        for _, _, proposal, text in drafter.steps:  # every proposal is a prefix of the draft's text
            assert text.startswith(TARGET_ENC.decode_bytes(proposal))
    print(f"draft max_len {draft_len}: drafted {total.drafted}, accepted {total.accepted}, tau {total.tau:.2f}")
    assert total.drafted > 0 and 0 < total.accepted < total.drafted
    assert (drafter.window > 0) == (draft_len == 12)


def test_greedy_identity_with_one_vocabulary_and_a_close_draft():
    # The same tokenizer on both sides (intersection = everything) and a draft close to the target: long accepts,
    # through the re-encoding path (the target's greedy output is often not the canonical tokenization).
    target = toy_target()
    drafter, total = CrossVocabDrafter(perturbed(target, seed=100, noise=0.2), TARGET_ENC, TARGET_ENC), Stats()
    for prompt in PROMPTS:
        out, stats = speculative_generate(target, drafter, prompt, 20, gamma=4)
        assert out == generate(target, prompt, 20)
        total.merge(stats)
    print(f"one vocabulary: acceptance {total.acceptance_rate:.2f}, accept counts {total.accept_counts}")
    assert total.accept_counts[4] > 0


@pytest.mark.parametrize("room", [1, 2, 5])
def test_prompts_near_both_context_limits(room):
    # The target's cache (32) leaves `room` tokens; the draft's (12) holds less than the prompt.
    target, drafter = toy_target(), toy_drafter(12)
    prompt = torch.randint(0, V, (32 - room,), generator=torch.Generator().manual_seed(room)).tolist()
    out, _ = speculative_generate(target, drafter, prompt, 40, gamma=4)
    assert out == generate(target, prompt, 40) and len(out) == room
    generator = torch.Generator().manual_seed(0)
    out, _ = speculative_generate(target, drafter, prompt, 40, gamma=4, temperature=1.0, generator=generator)
    assert len(out) == room


def test_reused_draft_cache_proposes_what_a_fresh_one_does():
    target, drafter = toy_target(), toy_drafter(64, Recording)
    for prompt in PROMPTS[1:3]:
        speculative_generate(target, drafter, prompt, 20, gamma=3)
        for context, gamma, proposal, _ in drafter.steps:
            fresh = toy_drafter(64)
            fresh.reset()
            assert fresh.propose(context, gamma, warp_for(0.0, 0, 1.0), None) == (proposal, None)


# ---------------------------------------------------------------------------------------------------------------
# 2. The extension is exact: decode(context + proposal) == decode(context) + a prefix of the draft's text.


@pytest.fixture(scope="module")
def shipped_enc():
    return load_tokenizer(WEIGHTS / "tokenizer.tiktoken")


alphabet_text = st.text(alphabet="ab ", max_size=12)


@settings(deadline=None, max_examples=300)
@given(st.lists(st.integers(0, V - 1), min_size=1, max_size=24), alphabet_text, st.integers(0, 8))
def test_proposal_extends_the_context_exactly_on_toy_vocabularies(context, text, gamma):
    proposal = extend_exactly(TARGET_ENC, context, text, tail_tokens=4)
    assert TARGET_ENC.decode_bytes(proposal) == text.encode()  # the whole text, always (toy bytes are characters)
    head = proposal[:gamma]
    assert (
        TARGET_ENC.decode_bytes(context + head)
        == TARGET_ENC.decode_bytes(context) + text.encode()[: len(TARGET_ENC.decode_bytes(head))]
    )


@settings(deadline=None, max_examples=200)
@given(
    st.lists(st.integers(0, 4095), min_size=1, max_size=24),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=16),
)
def test_proposal_extends_the_context_exactly_with_byte_tokens(shipped_enc, context, text):
    # Real byte-level BPE: random ids end inside UTF-8 characters; no proposal then, the exact text otherwise.
    proposal = extend_exactly(shipped_enc, context, text)
    data = shipped_enc.decode_bytes(context)
    assert shipped_enc.decode_bytes(context + proposal) == data + shipped_enc.decode_bytes(proposal)
    assert shipped_enc.decode_bytes(proposal) in (b"", text.encode())
    ends_inside_a_character = data.decode("utf-8", errors="replace").endswith("\ufffd")
    if text and not ends_inside_a_character:
        assert shipped_enc.decode_bytes(proposal) == text.encode()


def test_a_token_across_the_context_end_is_split_at_it():
    context = TARGET_ENC.encode_ordinary(" a")  # [' a']; " a" + "b" is ' ' 'ab' for the target, not ' a' 'b'
    assert TARGET_ENC.encode_ordinary(" ab") == [2, 3]
    assert extend_exactly(TARGET_ENC, context, "b ab") == [1] + TARGET_ENC.encode_ordinary(" ab")


# ---------------------------------------------------------------------------------------------------------------
# 3. The law of TLI sampling: 3 emitted tokens distributed as the target's (all 6^3 continuations), and the same
# test rejects a drafter whose q is not renormalised after the restriction, and one whose q sits at draft ids.

WARPINGS = {"T1": dict(temperature=1.0), "T0.8-k3-p0.9": dict(temperature=0.8, top_k=3, top_p=0.9)}
LAW_PROMPT, N_TRUE, N_BROKEN = [2, 3], 8_000, 1_000


class Unrenormalised(CrossVocabDrafter):
    """BROKEN: samples from the restricted, renormalised q but reports the unrestricted q at the shared ids."""

    def shared_distribution(self, logits, warp):
        q_draft, _ = super().shared_distribution(logits, warp)
        q = torch.zeros(self.target_vocab_size)
        q[self.shared[self.inside]] = warp(logits)[self.inside]
        return q_draft, q


class Unmapped(CrossVocabDrafter):
    """BROKEN: reports q over the draft's ids as if they were the target's (no map)."""

    def shared_distribution(self, logits, warp):
        q_draft, _ = super().shared_distribution(logits, warp)
        return q_draft, q_draft.clone()


def tli_chi_square(cls, warping, n_samples, seed=0):
    target = toy_target()
    samples, stats = sample_speculative(
        target, toy_drafter(cls=cls), LAW_PROMPT, 3, n_samples, seed, eot=None, gamma=2, **warping
    )
    stat, dof = chi_square(samples, exact_joint(target, LAW_PROMPT, 3, **warping))
    return stat, chi_square_critical(dof), dof, stats


@pytest.mark.slow
@pytest.mark.parametrize("warping", WARPINGS.values(), ids=WARPINGS.keys())
def test_tli_sampling_reproduces_the_target_distribution(warping):
    stat, critical, dof, stats = tli_chi_square(CrossVocabDrafter, warping, N_TRUE)
    print(
        f"TLI {warping}: chi2 {stat:.1f} < {critical:.1f} (dof {dof}); accept counts {stats.accept_counts}; "
        f"acceptance {stats.acceptance_rate:.3f}, theory {stats.predicted_acceptance_rate:.3f}"
    )
    assert stat < critical, f"chi2 = {stat:.1f} >= {critical:.1f} (dof {dof})"
    assert all(stats.accept_counts[:3])  # rejection at once, partial accept, full accept with a bonus token
    assert acceptance_matches_theory(stats)


# Not renormalising matters where the draft puts mass outside the shared tokens: at temperature 1. Under top-k 3
# the draft's 3 best are mostly shared tokens, so the unrestricted and restricted q nearly agree there.
BROKEN = [(Unrenormalised, "T1"), (Unmapped, "T1"), (Unmapped, "T0.8-k3-p0.9")]


@pytest.mark.slow
@pytest.mark.parametrize("broken, warping", BROKEN, ids=[f"{c.__name__}-{w}" for c, w in BROKEN])
def test_law_test_rejects_a_wrong_tli_q(broken, warping):
    stat, critical, dof, _ = tli_chi_square(broken, WARPINGS[warping], N_BROKEN)
    print(f"{broken.__name__} {warping}: chi2 {stat:.1f} > {critical:.1f} (dof {dof})")
    assert stat > critical, f"broken q not detected: chi2 = {stat:.1f} <= {critical:.1f} (dof {dof})"


# ---------------------------------------------------------------------------------------------------------------
# 4. End to end on the shipped weights, the draft's tokenizer given as another: the intersection is everything.


def test_shipped_draft_through_the_cross_vocabulary_path(short_references):
    enc, target, references = short_references
    draft = load_model(WEIGHTS / "draft", "cpu", torch.float32)
    assert torch.equal(shared_vocabulary(enc, enc, 4096), torch.arange(4096))
    totals = {"cross": Stats(), "model": Stats()}
    for prompt, expected in references:
        for name, drafter in (("cross", CrossVocabDrafter(draft, enc, enc, 4096)), ("model", ModelDrafter(draft))):
            out, stats = speculative_generate(target, drafter, prompt, 24, gamma=4, eot=enc.eot_token)
            assert out == expected
            totals[name].merge(stats)
    for name, stats in totals.items():
        print(f"{name}: acceptance {stats.acceptance_rate:.3f}, tau {stats.tau:.2f}, counts {stats.accept_counts}")
    assert totals["cross"].accepted > 0
    generator = torch.Generator().manual_seed(0)  # TLI over the whole vocabulary: plain speculative sampling
    out, stats = speculative_generate(
        target, CrossVocabDrafter(draft, enc, enc, 4096), references[0][0], 16, gamma=4, temperature=0.8,
        generator=generator,
    )  # fmt: skip
    assert len(out) > 0 and stats.accepted > 0
