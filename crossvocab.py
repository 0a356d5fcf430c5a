"""Cross-vocabulary drafting: a draft model with its own tokenizer drafts for a target with another.

Independent drafting (survey §5.1) takes "a small LM from the same series" because such models share a tokenizer;
this drafter drops that condition, so any small model can draft for any target, e.g. the shipped draft (its own
4096-token byte-level BPE) for SmolLM2-135M-Instruct (49152 tokens). Verification is untouched: the target checks
target tokens with the project's exact rule (§6.1 greedy matching at temperature 0, §6.2 speculative sampling
above). Two drafting rules, after Timor et al. 2025, "Accelerating LLM Inference with Lossless Speculative Decoding
Algorithms for Heterogeneous Vocabularies" (arXiv 2502.05202, ICML 2025), and transformers' universal assisted
generation (Intel Labs and Hugging Face, 2024):

- String level (Timor et al.'s SLEM; UAG): the target's context is decoded to text and re-encoded with the draft's
  tokenizer, the draft writes greedily in its own vocabulary, and its text is re-encoded into target tokens, which
  are proposed as a deterministic chain (q = None, one-hot). Any deterministic proposal, however it was made, is
  verified losslessly by the exact rule at every temperature (a one-hot q is the distribution it was drawn from;
  verify.speculative_sample), so this rule is lossless without any condition on the two tokenizers.
- Token-level intersection (Timor et al.'s TLI), for sampling: the draft's warped distribution is restricted to the
  tokens both vocabularies hold as the same byte string (and special tokens of the same name) and renormalised: the
  logits outside are masked before warping, which at a pure temperature is exactly that restriction, and under
  top-k / top-p makes them choose among the tokens the target can be offered (our choice; lossless either way). A
  sampled draft token is proposed as the target token with its bytes, and q is that distribution carried over to the
  target's ids, zero elsewhere: the token was drawn from exactly q, so standard speculative sampling stays lossless.
  The map (draft id -> target id) is computed once.

Which rule runs is decided by the warp: a deterministic one (temperature 0, top-k 1: it maps distinct logits to a
one-hot) drafts at string level, any other by TLI, whose positions where the warped draft happens to be one-hot are
one-hot in q too. Each rule reports its true q, so the output keeps the target's distribution.
String-level drafts do not consult the draft-length policy's keep(): their draft tokens are not the tokens proposed.
They are accepted where the target writes the canonical tokenization of its text, as trained models mostly do.

Token boundaries. The draft's text goes after the context's bytes, but the target's own tokenization of context +
text may merge across the boundary (a context ending in " s" and a draft "elf" tokenize as " self"), and the context
cannot be re-split: it is already emitted. extend_exactly therefore re-encodes the context's last tokens plus the
text, keeps the target's tokens from the first token boundary at or after the end of the context, and encodes the
bytes before that boundary (the draft's part of a token that would straddle it) on their own: a split the target can
still produce next, and the proposal's bytes are exactly the text's. A context that ends inside a UTF-8 character
(a byte token) gets no string-level proposal: the draft, which reads text, cannot continue that character.

The draft's own KV cache is reused for the longest common prefix of draft tokens between what it holds and the
re-encoded context, and rolled back for the rest (a re-encoding can re-split the last few tokens). Context limits:
the target's are the loop's (drafts never exceed its budget); when the draft's encoding of the context would not
leave room in its own cache for a step's drafts, the draft reads a suffix of the context instead, about half its
cache long, re-read once and then reused again until it fills up.
"""

import math
from itertools import accumulate
from typing import Protocol

import torch
from torch import Tensor

from drafters import KeepDrafting, Warp, always
from model import Transformer
from verify import sample_token


class Codec(Protocol):
    """The tokenizer methods used here; tiktoken.Encoding has them all."""

    n_vocab: int
    special_tokens_set: set[str]

    def encode_ordinary(self, text: str) -> list[int]: ...

    def encode_single_token(self, text: str) -> int: ...

    def decode_bytes(self, tokens: list[int]) -> bytes: ...

    def decode_single_token_bytes(self, token: int) -> bytes: ...


# ---- text and tokens ------------------------------------------------------------------------------------------


def utf8_prefix(data: bytes) -> str:
    """The longest prefix of `data` that is valid UTF-8, decoded (a draft may stop inside a character)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return data[: e.start].decode("utf-8")


def complete_tail(data: bytes) -> str | None:
    """The longest suffix of `data` that is valid UTF-8, decoded; None if `data` ends inside a character."""
    while True:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.end >= len(data):  # the bad bytes reach the end: an unfinished character
                return None
            data = data[e.end :]


def specials(enc: Codec) -> dict[int, str]:
    """Special token id -> name."""
    return {enc.encode_single_token(name): name for name in enc.special_tokens_set}


def ordinary_tokens(enc: Codec) -> dict[bytes, int]:
    """Byte string -> id of every ordinary (non-special) token."""
    special, out = specials(enc), {}
    for token in range(enc.n_vocab):
        if token in special:
            continue
        try:
            out[enc.decode_single_token_bytes(token)] = token
        except KeyError:  # a hole in the id range
            pass
    return out


def shared_vocabulary(draft_enc: Codec, target_enc: Codec, draft_vocab_size: int) -> Tensor:
    """TLI's map [draft_vocab_size]: the target id of each draft token that the target's vocabulary holds too (the
    same bytes; special tokens: the same name), -1 for the others (model rows past the tokenizer included)."""
    target_bytes, target_special = ordinary_tokens(target_enc), {n: t for t, n in specials(target_enc).items()}
    shared = torch.full((draft_vocab_size,), -1, dtype=torch.long)
    for data, token in ordinary_tokens(draft_enc).items():
        if token < draft_vocab_size and data in target_bytes:
            shared[token] = target_bytes[data]
    for token, name in specials(draft_enc).items():
        if token < draft_vocab_size and name in target_special:
            shared[token] = target_special[name]
    return shared


def translate(ids: list[int], source: Codec, dest: Codec, source_specials: dict[int, str]) -> list[int]:
    """`ids` of one tokenizer re-encoded with another: text runs decoded (invalid bytes replaced, which only the
    draft ever reads) and re-encoded, special tokens mapped by name (spelled out as text where dest has none)."""
    out, run = [], []
    for token in ids + [None]:
        if token is not None and token not in source_specials:
            run.append(token)
            continue
        if run:
            out += dest.encode_ordinary(source.decode_bytes(run).decode("utf-8", errors="replace"))
            run = []
        if token is not None:
            name = source_specials[token]
            out += [dest.encode_single_token(name)] if name in dest.special_tokens_set else dest.encode_ordinary(name)
    return out


def extend_exactly(enc: Codec, context: list[int], text: str, tail_tokens: int = 16) -> list[int]:
    """Target tokens (of `enc`) to append to `context` whose bytes are exactly those of `text`: the target's own
    tokenization of the context's last `tail_tokens` tokens + text, from its first token boundary at or after the
    end of the context; the bytes before that boundary are encoded on their own. [] when the context ends inside a
    UTF-8 character (no text can continue it there). decode(context + result) == decode(context) + text."""
    tail = enc.decode_bytes(context[-tail_tokens:])
    tail_text = complete_tail(tail)
    if not text or tail_text is None:
        return []
    tail_len = len(tail_text.encode("utf-8"))
    joint, data = enc.encode_ordinary(tail_text + text), (tail_text + text).encode("utf-8")
    boundary, first = 0, len(joint)  # byte offset where token `first` starts
    for i, token in enumerate(joint):
        if boundary >= tail_len:
            first = i
            break
        boundary += len(enc.decode_single_token_bytes(token))
    gap = data[tail_len : max(boundary, tail_len)]  # the draft's part of a token across the context's end
    try:
        head = enc.encode_ordinary(gap.decode("utf-8")) if gap else []
    except UnicodeDecodeError:  # the boundary splits a character: no exact split of the gap on its own
        return []
    return head + joint[first:]


def is_greedy(warp: Warp, size: int, device) -> bool:
    """Whether `warp` is deterministic (temperature 0, top-k 1): it maps distinct logits to a one-hot."""
    return int((warp(torch.arange(size, dtype=torch.float32, device=device) / size) > 0).sum()) == 1


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


# ---- the drafter ----------------------------------------------------------------------------------------------


class CrossVocabDrafter:
    """A draft model with its own tokenizer, drafting for a target with another (module docstring): string-level
    greedy drafts re-encoded for the target (q = None) when the warp is deterministic, Token-Level Intersection
    sampling otherwise (q over the target's vocabulary). A chain drafter (drafters.ChainDrafter).

    draft, draft_enc: the draft model and its tokenizer; target_enc: the target's tokenizer; target_vocab_size: the
    target MODEL's vocabulary (rows of p; default target_enc.n_vocab); draft_steps: at most ceil(draft_steps *
    gamma) draft tokens per string-level proposal (draft tokens are often shorter than target tokens); tail_tokens:
    context tokens re-encoded with the draft's text to find the target's token boundary."""

    def __init__(
        self,
        draft: Transformer,
        draft_enc: Codec,
        target_enc: Codec,
        target_vocab_size: int | None = None,
        draft_steps: float = 2.0,
        tail_tokens: int = 16,
    ):
        self.model, self.draft_enc, self.target_enc = draft, draft_enc, target_enc
        self.target_vocab_size = target_vocab_size or target_enc.n_vocab
        self.draft_steps, self.tail_tokens = draft_steps, tail_tokens
        device = draft.device
        shared = shared_vocabulary(draft_enc, target_enc, draft.config.vocab_size)
        shared[shared >= self.target_vocab_size] = -1  # a tokenizer id past the target model's rows: never offered
        self.inside = torch.nonzero(shared >= 0).squeeze(-1).to(device)  # draft ids the target shares
        if len(self.inside) == 0:
            raise ValueError("the draft's and the target's vocabularies share no token")
        self.shared, self.outside = shared.to(device), (shared < 0).to(device)  # [V_d]
        self.target_specials, self.draft_specials = specials(target_enc), specials(draft_enc)
        self.cache, self.fed, self.window, self.start = None, [], 0, 0  # fed: the draft ids in the cache
        self.drafted, self.proposed, self.sampled = [], [], False  # the last step's draft and target tokens, rule

    def reset(self) -> None:
        self.cache, self.fed, self.window = self.model.new_cache(), [], 0

    @torch.inference_mode()
    def propose(
        self, context: list[int], gamma: int, warp: Warp, generator: torch.Generator | None, keep: KeepDrafting = always
    ) -> tuple[list[int], Tensor | None]:
        self.drafted, self.proposed, self.sampled = [], [], False
        if gamma <= 0:
            return [], None
        steps = max(gamma, math.ceil(self.draft_steps * gamma))
        logits = self.read_context(context, steps)
        if logits is None:
            return [], None
        if is_greedy(warp, len(logits), logits.device):  # string-level drafting
            self.proposed = self.draft_strings(context, logits, gamma, steps)
            return self.proposed, None
        self.sampled = True
        self.proposed, q = self.draft_shared(logits, gamma, warp, generator, keep)
        return self.proposed, q

    def accept(self, n_accepted: int) -> None:
        # The cache holds the context and the drafts but the last: keep the drafts the accepted text covers (TLI:
        # one draft token per target token; string level: those whose bytes end within the accepted bytes).
        if self.sampled:
            kept = n_accepted
        else:
            accepted = len(self.target_enc.decode_bytes(self.proposed[:n_accepted]))
            ends = accumulate(len(self.draft_enc.decode_single_token_bytes(t)) for t in self.drafted)
            kept = sum(end <= accepted for end in ends)
        self.fed = self.fed[: min(len(self.fed), self.start + kept)]
        self.cache.truncate(len(self.fed))

    # ---- the draft's view of the context ----

    def read_context(self, context: list[int], steps: int) -> Tensor | None:
        """Re-encode the context for the draft, reuse its cache for the common prefix, feed the rest; the draft's
        next-token logits [V_d], or None when its cache has no room at all."""
        ids = self.fit_window(context, steps)
        if not ids or len(ids) >= self.cache.max_len:
            return None
        reuse = min(common_prefix(self.fed, ids), len(ids) - 1)  # refeed at least the last token for its logits
        self.cache.truncate(reuse)
        device = self.model.device
        logits = self.model(torch.tensor([ids[reuse:]], device=device), self.cache, logits_to_keep=1)[0, -1]
        self.fed, self.start = list(ids), len(ids)
        return logits

    def fit_window(self, context: list[int], steps: int) -> list[int]:
        """The draft ids of context[window:], the window moved forward (to about half the draft's cache) when they
        would leave fewer than `steps` free slots."""
        self.window = min(self.window, len(context) - 1)
        ids = translate(context[self.window :], self.target_enc, self.draft_enc, self.target_specials)
        half = self.cache.max_len // 2
        room = min(steps, half)  # the drafting loops stop at a full cache anyway
        while len(ids) + room > self.cache.max_len and self.window < len(context) - 1:
            kept = len(context) - self.window  # target tokens read now
            self.window = len(context) - max(1, min(kept - 1, kept * half // max(1, len(ids))))
            ids = translate(context[self.window :], self.target_enc, self.draft_enc, self.target_specials)
        return ids

    def feed(self, token: int) -> Tensor:
        self.fed.append(token)
        return self.model(torch.tensor([[token]], device=self.model.device), self.cache)[0, -1]

    # ---- string level (SLEM; deterministic) ----

    def draft_strings(self, context: list[int], logits: Tensor, gamma: int, steps: int) -> list[int]:
        """Greedy draft text, re-encoded into up to gamma target tokens that extend the context exactly. A draft
        special token (end of text) ends the text; it is proposed when the target has one of the same name."""
        proposal, end = [], -1
        for step in range(steps):
            token = int(logits.argmax())
            if token >= self.draft_enc.n_vocab or token in self.draft_specials:
                end = int(self.shared[token]) if token in self.draft_specials else -1
                break
            self.drafted.append(token)
            text = utf8_prefix(self.draft_enc.decode_bytes(self.drafted))
            proposal = extend_exactly(self.target_enc, context, text, self.tail_tokens)
            if len(proposal) >= gamma or step == steps - 1 or self.cache.length >= self.cache.max_len:
                break
            logits = self.feed(token)
        if end >= 0 and len(proposal) < gamma and (proposal or not self.drafted):
            proposal = proposal + [end]
        return proposal[:gamma]

    # ---- token-level intersection (TLI; sampled) ----

    def shared_distribution(self, logits: Tensor, warp: Warp) -> tuple[Tensor, Tensor]:
        """(q_draft [V_d], q [V_t]): the warped draft distribution over the shared tokens only, renormalised (the
        masked logits are warped), and the same probabilities at the target's ids, zero elsewhere."""
        q_draft = warp(logits.masked_fill(self.outside, float("-inf")))  # [V_d]
        q = torch.zeros(self.target_vocab_size, dtype=q_draft.dtype, device=q_draft.device)
        q[self.shared[self.inside]] = q_draft[self.inside]
        return q_draft, q

    def draft_shared(
        self, logits: Tensor, gamma: int, warp: Warp, generator: torch.Generator | None, keep: KeepDrafting
    ) -> tuple[list[int], Tensor]:
        tokens, qs = [], []
        for i in range(gamma):
            q_draft, q = self.shared_distribution(logits, warp)
            token = sample_token(q_draft, generator)
            tokens.append(int(self.shared[token]))
            qs.append(q)
            self.drafted.append(token)
            if not keep(logits, i) or i == gamma - 1 or self.cache.length >= self.cache.max_len:
                break
            logits = self.feed(token)
        return tokens, torch.stack(qs)
