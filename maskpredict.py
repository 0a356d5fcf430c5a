"""Self-drafting by mask-predict (survey §5.2): the target drafts for itself from tokens that are not candidates.

    JacobiDrafter      Parallel (Jacobi) decoding (Santilli et al. 2023; survey §5.2, §6.1)
    LookaheadDrafter   Lookahead decoding (Fu et al. 2024; survey §5.2, §6.3)
    PassDrafter        PaSS, parallel speculative sampling with learned lookahead embeddings (Monea et al. 2023)

All three are tree drafters whose proposals carry a tree.ExtraTokens: the loop runs its extra tokens in the same target
call as the candidates, verifies only the candidates, and hands the call's logits back through ExtraTokens.read.
Their candidates are deterministic (argmax guesses, pool n-grams), so under sampling they are matched against the
target's own draws (verify.SampleMatch) and decoding stays lossless (docs/pitfalls.md: Retrieval and mask-predict
drafters are deterministic).
"""

from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from drafters import KeepGrowing, Warp, always
from heads import load_head
from model import Transformer
from tree import ExtraTokens, Tree, tree_from_sequences


class JacobiDrafter:
    """Parallel decoding by Jacobi iteration (Santilli et al. 2023; survey §5.2, §6.1). A block of `block` guesses
    follows the last token; the target scores the whole block in one call; greedy verification accepts the
    guesses that equal the target's own argmax; the target's argmax after every rejected guess becomes the next
    call's guess for that place (one Jacobi iteration), and the block slides past what was accepted.

    Initialisation: where no guess exists yet (the first call, or the end of a block), the guess is the token that
    followed the latest earlier occurrence of the previous guess in the context, else a copy of it. Santilli et
    al. start from [PAD]; copying from the context is as cheap and gives the iteration a better start on code.
    """

    def __init__(self, target: Transformer, block: int = 4):
        self.target, self.block = target, block
        self.guesses: list[int] = []

    def reset(self) -> None:
        self.guesses = []

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree:
        guesses = self.guesses[: self.block]
        while len(guesses) < self.block:
            guesses.append(next_after(context + guesses, (context + guesses)[-1]))
        tree = Tree.from_root(context[-1])
        for i, token in enumerate(guesses):
            tree.add(i, token, 0.0)  # a chain: node i + 1 is guess i
        device = self.target.device  # no extra tokens: Jacobi reads the candidates' own outputs
        tree.extra_tokens = ExtraTokens(
            torch.zeros(0, self.target.config.hidden_size, device=device, dtype=self.target.lm_head.weight.dtype),
            [],
            torch.zeros(0, len(tree), dtype=torch.bool),
            self.read,
            [],
        )
        return tree

    def read(self, logits: Tensor, path: list[int]) -> None:
        """logits [N, V] of the chain's nodes; row i predicts the token after node i. Row len(path) was emitted
        (the correction, or the bonus token); the rows after it are the next guesses, one Jacobi iteration on."""
        self.guesses = logits.argmax(dim=-1).tolist()[len(path) + 1 :]


def next_after(context: list[int], token: int) -> int:
    """The token that followed the latest earlier occurrence of `token` in context (the token itself if none)."""
    for i in range(len(context) - 2, -1, -1):
        if context[i] == token:
            return context[i + 1]
    return token


class LookaheadDrafter:
    """Lookahead decoding (Fu et al. 2024; survey §5.2). Knobs: window W, n-gram size N, verification candidates G.

    Lookahead branch: a 2D window of N - 1 levels by W places of earlier Jacobi guesses, fed as extra tokens.
    Token (l, i) sits at depth l + i + 1 and sees the root, level 0's places 0..i and the tokens (1..l, i) of its
    own column: a causal sequence root, (0, 0..i), (1, i), .., (l, i), the paper's attention pattern. The output
    of the top level's token (N - 2, i) is a new guess; with the column below it, it closes an n-gram
    ((0, i), (1, i), .., (N - 2, i), new) that goes into a pool keyed by its first token; the window then drops
    level 0 and gains the new guesses as its top level.
    Verification branch: up to G pool n-grams that start with the last token, merged into a token tree.
    """

    def __init__(self, target: Transformer, window: int = 3, ngram: int = 3, candidates: int = 3):
        if window < 1 or ngram < 2 or candidates < 0:
            raise ValueError("need window >= 1, ngram >= 2 and candidates >= 0")
        self.target, self.W, self.N, self.G = target, window, ngram, candidates
        self.levels: list[list[int]] = []  # N - 1 levels of W guesses; level 0 the oldest
        self.pool: dict[int, list[tuple[int, ...]]] = {}  # first token -> the rest of its n-grams, newest first
        self.sees = self.window_mask()  # [M, M] the window's attention pattern, the same every step

    def reset(self) -> None:
        self.levels, self.pool = [], {}

    def window_mask(self) -> Tensor:
        """Bool [M, M], M = (N - 1) * W, rows and columns level-major: token (l, i) sees (0, 0..i) and (1..l, i)."""
        W, levels = self.W, self.N - 1
        sees = torch.zeros(levels * W, levels * W, dtype=torch.bool)
        for l in range(levels):
            for i in range(W):
                sees[l * W + i, : i + 1] = True  # level 0, places 0..i
                sees[l * W + i, [k * W + i for k in range(1, l + 1)]] = True  # its own column, levels 1..l
        return sees

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree:
        if not self.levels:  # start from the context's last tokens: no random numbers, no special tokens
            m = self.W * (self.N - 1)
            tail = (context * (m // len(context) + 1))[-m:]
            self.levels = [tail[l * self.W : (l + 1) * self.W] for l in range(self.N - 1)]
        grams = self.pool.get(context[-1], [])[: self.G]
        tree = tree_from_sequences(context[-1], [list(g) for g in grams])  # verification branch
        window = [t for level in self.levels for t in level]
        device = self.target.device
        sees = torch.cat([torch.zeros(len(window), len(tree), dtype=torch.bool), self.sees], dim=1)
        sees[:, 0] = True  # every window token follows the root
        tree.extra_tokens = ExtraTokens(
            self.target.embed_tokens(torch.tensor(window, device=device)),
            [l + i + 1 for l in range(self.N - 1) for i in range(self.W)],
            sees,
            self.read,
            window,
        )
        return tree

    def read(self, logits: Tensor, path: list[int]) -> None:
        """logits [N_tree + M, V]: the top level's outputs are the new guesses; every column closes an n-gram."""
        top = logits[-self.W :].argmax(dim=-1).tolist()  # outputs of level N - 2, the last W extra tokens
        for i in range(self.W):
            gram = tuple(level[i] for level in self.levels) + (top[i],)
            remember(self.pool, gram[0], gram[1:], self.G)
        self.levels = self.levels[1:] + [top]


def remember(pool: dict[int, list[tuple[int, ...]]], key: int, rest: tuple[int, ...], size: int) -> None:
    """Put an n-gram (key, *rest) into a pool keyed by its first token: newest first, each n-gram once, `size` per
    key, as the reference's guess set (the newest are the likeliest to recur)."""
    known = pool.setdefault(key, [])
    if rest in known:
        known.remove(rest)
    known.insert(0, rest)
    del known[size:]


class PassEmbeddings(nn.Module):
    """PaSS's k learned lookahead embeddings (Monea et al. 2023), the only weights it trains (train.py pass)."""

    def __init__(self, k: int, hidden_size: int):
        super().__init__()
        self.embeds = nn.Parameter(torch.zeros(k, hidden_size))  # [k, C]


class PassDrafter:
    """PaSS (Monea et al. 2023; survey §5.2 mask-predict, §6.2). k learned embeddings ride after the candidates as
    extra tokens; the first sits where the token after the candidates (the bonus token) will go, and the output at
    embedding j predicts the token j places after that one. When every candidate is accepted, those k outputs
    (argmax) are the next call's candidates; otherwise the next call has none and drafts afresh from the new
    root. So a call verifies the last call's drafts and drafts the next ones, with the frozen target alone."""

    def __init__(self, target: Transformer, embeds: Tensor):
        self.target, self.embeds = target, embeds  # [k, C]
        self.drafts: list[int] = []

    @classmethod
    def from_pretrained(cls, target: Transformer, path: str | Path) -> "PassDrafter":
        cfg, state = load_head(path)
        if cfg["hidden_size"] != target.config.hidden_size:
            raise ValueError(
                f"{path}: embeddings of width {cfg['hidden_size']}, the target's is {target.config.hidden_size}"
            )
        module = PassEmbeddings(cfg["num_tokens"], cfg["hidden_size"])
        module.load_state_dict(state)
        w = target.lm_head.weight
        return cls(target, module.embeds.detach().to(w.device, w.dtype))

    def reset(self) -> None:
        self.drafts = []

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree:
        tree, k = Tree.from_root(context[-1]), len(self.embeds)
        for i, token in enumerate(self.drafts):
            tree.add(i, token, 0.0)  # a chain
        n = len(tree)
        sees = torch.zeros(k, n + k, dtype=torch.bool)
        sees[:, :n] = True  # the root and every candidate ...
        sees[:, n:] = torch.ones(k, k, dtype=torch.bool).tril()  # ... and the embeddings before it: causal
        tree.extra_tokens = ExtraTokens(self.embeds, [n - 1 + j for j in range(1, k + 1)], sees, self.read)
        return tree

    def read(self, logits: Tensor, path: list[int]) -> None:
        """logits [N + k, V]: if every candidate stood, the embeddings' outputs are the next candidates."""
        n = len(logits) - len(self.embeds)
        self.drafts = logits[n:].argmax(dim=-1).tolist() if len(path) == n - 1 else []
