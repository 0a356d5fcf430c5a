"""Ouroboros (Zhao et al. 2024, "Ouroboros: Generating Longer Drafts Phrase by Phrase for Faster Speculative
Decoding", EMNLP 2024; survey §5.1 independent drafting, tuning-free, with §5.2's Lookahead decoding run on the
draft model and §6.3 token tree verification). Paper: up to 3.9x over greedy decoding and 2.8x over speculative
decoding (HumanEval, MBPP, GSM8K, CNN/DM, WMT16; Yi 34B/6B, DeepSeek-Coder 33B, CodeLlama 34B, Llama-2 70B/7B;
greedy); its README's GSM8K row: 2.48x for Llama-2 70B/7B, 1.72x for Yi 34B/6B.

One phrase pool (maskpredict.LookaheadDrafter's n-gram pool: first token -> the N - 1 tokens after it, newest
first, G per key) feeds the three steps of a decoding step, and all three feed it:

  1. Drafting phrase by phrase: the draft model runs Lookahead decoding (Fu et al. 2024). Each draft-model call
     verifies up to G pool phrases that start with the draft's last token, greedily against its own argmax, and
     runs Lookahead's Jacobi window beside them, whose columns close new n-grams for the pool. A call extends the
     draft by the longest phrase it accepts plus its own next token: several tokens per call where SpS gets one.
     Calls go on until the draft holds at least gamma tokens.
  2. Lengthening the draft by candidate suffixes: up to k pool phrases that start with the draft's last token
     are appended after it, each as its own branch; draft and suffixes form one token tree (the draft the trunk),
     verified by the target in one call (§6.3).
  3. Generating phrases from verification: the target's call computes its argmax at every node, also below the
     last accepted one, where decoding throws it away. Along a rejected branch those outputs are what the target
     would write if the draft had been right up to there: a phrase of the target's own. Every output keys the
     N - 1 outputs after it along the branch, and they go into the pool; the first is keyed by the token the step
     emitted, the next step's last token, so the next draft call tries the target's own continuation first.

The paper's warm start (Ouroboros with a dagger: the pool kept from earlier generations) is --ouroboros-warm.

The loop is tree_speculative_generate, unchanged: the call's logits come back through a tree.ExtraTokens with no
extra tokens, as Token Recycling's and Jacobi's do (recycling.py, maskpredict.py). The draft model keeps its own
KV cache; at every step it is cut back to its longest prefix that is still the context, so the draft never depends
on what the loop did with the last tree (a rejected trunk, an accepted suffix, a tree trimmed at the budget).

Sampling. The paper decodes greedily. Here every draft token is an argmax (of the draft model, or a pool phrase
that its argmax confirmed, or a pool phrase as such), a deterministic function of the text so far: q is one-hot,
tree.q is None, and at -t > 0 -v exact matches the tree against the target's own draws (verify.SampleMatch),
lossless for every fixed tree
(docs/pitfalls.md: Retrieval and mask-predict drafters are deterministic). So -t > 0 is accepted and keeps the
target's distribution; what it costs is acceptance, since the target samples where the draft takes the argmax.
Drafting from the draft's warped q instead would need a q for every node: the draft model's rows for the tokens
it sampled, and for a pool phrase that the draft model "verified", a speculative-sampling test against its q as
in cascade.py (Leviathan et al. 2023, Thm 3.1, one level down) so that each kept token is a sample of q. The
suffixes, copied from the pool, would stay several deterministic siblings under the trunk's last node, which a q
row cannot describe: verify.tree_speculative_sample reads a node's children as i.i.d. draws from its q row when
tree.q is given, so such a tree needs a rule that takes both kinds of node.
"""

import torch
from torch import Tensor

from drafters import KeepGrowing, Warp, always
from maskpredict import LookaheadDrafter, remember
from model import Transformer
from specdec import call_embeds, trim_tree
from tree import (
    ExtraTokens,
    Tree,
    children,
    keep_indices,
    tree_attention_mask,
    tree_from_sequences,
    tree_positions,
)
from verify import tree_greedy_verify, tree_tensors

Pool = dict[int, list[tuple[int, ...]]]  # first token -> the phrases (N - 1 tokens) that followed it, newest first


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def candidate_suffixes(pool: Pool, last: int, k: int) -> list[list[int]]:
    """The k newest pool phrases that start after `last`: the draft's candidate continuations."""
    return [list(phrase) for phrase in pool.get(last, [])[:k]]


def lengthen(root: int, draft: list[int], suffixes: list[list[int]]) -> Tree:
    """The target's tree: the draft as the trunk from the root, each candidate suffix a branch after its last token
    (a prefix-sharing trie of draft + suffix, SpecInfer's merge; one chain when there are none)."""
    return tree_from_sequences(root, [draft + s for s in suffixes] or [draft])


def tail_phrases(tree: Tree, outputs: list[int], path: list[int], length: int) -> list[tuple[int, tuple[int, ...]]]:
    """The pool entries that the target's outputs on the rejected tails give, in the order to insert them.

    outputs[i] is the target's argmax at node i; path the accepted nodes (root excluded). Below the last accepted
    node u, every branch down to a leaf carries the outputs o_0 = outputs[u], o_1, o_2, ...; each o_j keys the
    phrase (o_{j+1}, .., o_{j+length}) where the branch is long enough. Listed deepest and last branch first, so
    that, inserted newest first, the phrase keyed by the emitted token o_0 on the first branch ends up in front."""
    kids, start = children(tree.parents), path[-1] if path else 0
    branches, stack = [], [[start]]
    while stack:  # depth first, children in index order: branches in leaf order
        nodes = stack.pop()
        below = kids[nodes[-1]]
        if not below:
            branches.append(nodes)
        stack.extend(nodes + [c] for c in reversed(below))
    entries = []
    for nodes in branches:
        o = [outputs[n] for n in nodes]
        entries += [(o[j], tuple(o[j + 1 : j + 1 + length])) for j in range(len(o) - length)]
    return entries[::-1]


class OuroborosDrafter:
    """Ouroboros (Zhao et al. 2024): the draft model drafts phrase by phrase with Lookahead decoding over a phrase
    pool, the draft is lengthened by the pool's candidate suffixes, and the target's outputs on rejected tails go
    back into the pool. `model` is the draft model, of the target's tokenizer. Knobs: Lookahead's window W,
    n-gram size N and G (pool phrases tried per draft call and kept per key), k candidate suffixes, gamma draft
    tokens at least, and warm (keep the pool across generations).
    """

    def __init__(
        self,
        target: Transformer,
        model: Transformer,
        gamma: int = 4,
        window: int = 3,
        ngram: int = 4,
        candidates: int = 4,
        suffixes: int = 3,
        warm: bool = False,
    ):
        if gamma < 1 or suffixes < 0:
            raise ValueError("need gamma >= 1 and suffixes >= 0")
        self.target, self.model, self.gamma, self.k, self.warm = target, model, gamma, suffixes, warm
        self.learns_across_generations = warm  # the warm pool keeps the phrases of earlier generations
        self.lookahead = LookaheadDrafter(model, window, ngram, candidates)  # the draft model's Lookahead decoding
        self.cache, self.fed = None, []  # the draft model's cache and the tokens it holds, slot by slot
        self.draft_calls = self.recycled = 0  # over the drafter's life: draft-model calls, phrases from the target

    @property
    def pool(self) -> Pool:
        return self.lookahead.pool

    def reset(self) -> None:
        pool = self.lookahead.pool
        self.lookahead.reset()  # a new Jacobi window, started from the next prompt
        if self.warm:  # the paper's warm start: phrases of earlier generations stay
            self.lookahead.pool = pool
        self.cache, self.fed = self.model.new_cache(), []

    def catch_up(self, context: list[int]) -> None:
        """Cut the draft's cache back to its longest prefix that is still the context, then feed the rest of the
        context but its last token (the token after an accepted trunk, accepted suffix tokens) in one call."""
        keep = common_prefix(self.fed, context[:-1])
        self.cache.truncate(keep)
        self.fed = self.fed[:keep]
        new = context[keep:-1]
        if new:
            self.model(torch.tensor([new], device=self.model.device), self.cache, logits_to_keep=1)  # K/V only
            self.fed += new
            self.draft_calls += 1

    def draft_phrase(self, text: list[int]) -> list[int]:
        """One Lookahead step of the draft model after `text` (its cache holds text[:-1]): pool phrases after
        text[-1] verified greedily against the draft's argmax, the Jacobi window beside them. Returns the accepted
        phrase tokens and the draft's own next token; its cache then holds text and the accepted phrase."""
        device, prefix = self.model.device, self.cache.length
        tree = self.lookahead.propose_tree(text, None, None, None)
        tree = trim_tree(tree, self.cache.max_len, self.cache.max_len - prefix)  # the window goes if it cannot fit
        n = len(tree)
        logits = self.model(
            None,
            self.cache,
            tree_positions(tree, prefix, device),
            tree_attention_mask(tree, prefix, device),
            inputs_embeds=call_embeds(self.model, tree),
        )[0]
        path, token = tree_greedy_verify(logits[:n], *tree_tensors(tree, device))
        self.cache.keep(keep_indices(path, prefix, device))  # the root and the accepted phrase, moved into place
        if tree.extra_tokens is not None:
            tree.extra_tokens.read(logits, path)  # the window's new n-grams go into the pool
        phrase = [tree.tokens[i] for i in path]
        self.fed += [text[-1]] + phrase
        self.draft_calls += 1
        return phrase + [token]

    def draft_phrases(self, context: list[int]) -> list[int]:
        """Draft-model calls until the draft holds at least gamma tokens (a call's phrase is kept whole), or the
        draft's context is full."""
        draft: list[int] = []
        while len(draft) < self.gamma and len(context) + len(draft) < self.cache.max_len:
            draft += self.draft_phrase(context + draft)
        return draft

    def recycle(self, tree: Tree, logits: Tensor, path: list[int]) -> None:
        """The target's outputs on the rejected tails of this call, as phrases into the pool (tail_phrases)."""
        outputs = logits[: len(tree)].argmax(dim=-1).tolist()
        for key, phrase in tail_phrases(tree, outputs, path, self.lookahead.N - 1):
            remember(self.pool, key, phrase, self.lookahead.G)
            self.recycled += 1

    def propose_tree(
        self,
        context: list[int],
        features: Tensor,
        warp: Warp,
        generator: torch.Generator | None,
        keep: KeepGrowing = always,
    ) -> Tree:
        if len(context) > self.cache.max_len:  # a draft model of a shorter context than the target's: no draft
            return Tree.from_root(context[-1])
        self.catch_up(context)
        draft = self.draft_phrases(context)
        tree = lengthen(context[-1], draft, candidate_suffixes(self.pool, draft[-1], self.k) if draft else [])
        target = self.target  # no extra tokens: the hook only reads the target's outputs at the tree's nodes
        tree.extra_tokens = ExtraTokens(
            torch.zeros(0, target.config.hidden_size, device=target.device, dtype=target.lm_head.weight.dtype),
            [],
            torch.zeros(0, len(tree), dtype=torch.bool),
            lambda logits, path: self.recycle(tree, logits, path),
            [],
        )
        return tree
