"""The one table of methods: every drafter (-d), verification rule (-v) and draft-length policy (-l), each one
`Entry` with its name, a one-line summary citing its survey section, how it is built, what it needs and which
flags it reads. The command line (cli.py) and bench.py take their choices, help, refusals and rows from here;
the decoding loops (specdec.py) never see a name.

Adding a method: write its module (a drafter, a Verifier or a DraftLength, behind the interfaces of drafters.py,
verify.py and draft_length.py), then add one Entry below; declare any flag of its own in cli.add_method_flags.
"""

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from approximate import BiLD, Lenient, TopK, Typical
from cascade import CascadeDrafter, CollectiveDrafter, note_without_rest
from contrastive import Contrastive
from cost import cached_cost_curve, draft_cost
from crossvocab import CrossVocabDrafter
from draft_length import (
    SVIP,
    AdaEagle,
    Adaptive,
    Confidence,
    CostAware,
    Disco,
    DiscoClassifier,
    DynamicDepth,
    FixedLength,
    Heuristic,
    LengthPredictor,
    Thompson,
)
from drafters import ModelDrafter, PromptLookupDrafter
from heads import EagleDrafter, HydraDrafter, MedusaDrafter
from maskpredict import JacobiDrafter, LookaheadDrafter, PassDrafter
from model import Transformer
from nar import NarDrafter, NarModel
from online import OnlineDrafter
from ouroboros import OuroborosDrafter
from recycling import RecyclingDrafter
from retrieval import RestDrafter, SamdDrafter, SamDrafter, SuffixDrafter
from selfdraft import DynamicExitDrafter, EarlyExitDrafter, load_skip_set, quantized, sublayer_costs
from spectr import SpecTr
from tokenizer import load_tokenizer
from verify import SpeculativeSampling, exact


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


def refuse(checks: list[tuple[bool, str]]) -> None:
    """Raise the message of the first failed check as a UsageError."""
    for failed, message in checks:
        if failed:
            raise UsageError(message)


def load_checked(what: str, path: Path, load: Callable):
    """load(path), with any failure (missing or broken files, mismatched shapes) reported as one UsageError line."""
    try:
        return load(path)
    except UsageError:
        raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot load the {what} from {path}: {reason}") from None


def load_model(path: Path, device, dtype: torch.dtype) -> Transformer:
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise UsageError(f"no model in {path}: expected config.json and model.safetensors (see train.py)")
    return load_checked("model", path, lambda p: Transformer.from_pretrained(p, device=device, dtype=dtype))


@dataclass(frozen=True)
class Setup:
    """What a method is built from."""

    target: Transformer  # the model being sped up
    enc: Any  # its tokenizer (a tiktoken Encoding)
    weights: Path  # the folder of the files trained for this target (eagle/, layerskip.json, ...; weights/README.md)
    data_dir: Path  # train.py's data folder (train.bin and the retrieval datastores)
    opts: argparse.Namespace  # the parsed flags: the run's (gamma, tree, temperature) and cli.add_method_flags'
    drafter: Any = None  # the built drafter, once there is one: a policy sized by its cost reads it (-l cost)

    @property
    def dtype(self) -> torch.dtype:
        return self.target.embed_tokens.weight.dtype

    def with_opts(self, **changes) -> "Setup":
        """The same setup with some flags changed (bench.py's variant rows, a second gamma)."""
        return replace(self, opts=argparse.Namespace(**{**vars(self.opts), **changes}))

    def with_drafter(self, drafter) -> "Setup":
        """The same setup, holding the drafter built from it (for the draft-length policy built next)."""
        return replace(self, drafter=drafter)


@dataclass(frozen=True)
class Entry:
    """One method: a drafter, a verification rule or a draft-length policy."""

    name: str  # its name on the command line
    summary: str  # one line for --help, the README and bench.py, with its survey section
    build: Callable[[Setup], Any]  # makes the drafter (None: plain decoding), Verifier or DraftLength
    shape: str = "chain"  # the loop it runs in: chain, tree or both (-d: --tree picks; -l: chain or tree)
    weights: tuple[str, ...] = ()  # files it reads under the weights folder ...
    data: tuple[str, ...] = ()  # ... and under the data folder
    make: str = ""  # the command that makes those files
    options: tuple[str, ...] = ()  # flags (argparse dests) that only this method reads: refused with any other
    has_q: bool = True  # -d: drafts from a distribution (policies that read it, BiLD's fallback)
    dynamic: bool = False  # -d: grows EAGLE-2 dynamic trees (--sampled-siblings, -l dynamic)
    length: str = "cost"  # -d: its draft-length policy when -l is not given
    temperature: str = "any"  # -v: greedy (-t 0 only), sampling (-t > 0 only) or any
    lossy: bool = False  # -v: the output is not the target's (approximate.py)
    fallback: Callable[[Setup], Any] | None = None  # -v: the draft length it brings when -l is not given
    needs: str = ""  # -l, -v: "q" reads the draft's distribution, "dynamic" grows dynamic trees, "siblings" (-v)
    # selects among tree children sampled i.i.d. (--sampled-siblings)
    cost: Callable[[Setup], float] | None = None  # -d: a draft token's cost over a one-token target call, for
    # -l cost, from the setup and its built drafter (None: no model runs, 0)
    bench: str = ""  # bench.py's row label (the summary's head when empty)
    family: str = ""  # -d: its family in the survey's taxonomy (§5), which colours bench.py's pictures
    variants: tuple[tuple[str, dict], ...] = ()  # bench.py's extra rows: (label, flags changed)


def missing_files(entry: Entry, setup: Setup) -> str | None:
    """The refusal for an entry whose files are not there, or None."""
    for folder, names in ((setup.weights, entry.weights), (setup.data_dir, entry.data)):
        for name in names:
            if not (folder / name).is_file():
                return f"{entry.name} needs {folder / name}: {entry.make}"
    return None


def default_length(drafter: Entry, use_tree: bool, greedy: bool = True, rule: str = "exact") -> str:
    """The draft length a drafter runs with when -l is not given: its own, but on a tree that does not grow level by
    level (a static or retrieved tree) nothing is sized, so fixed. When sampling the drafts of a distribution, or
    under any rule but -v exact, fixed too: -l cost chooses from this machine's measured call costs, and a different
    gamma draws different uniforms, so the same --seed would give another sample on another machine, or on a busy
    one (-l cost stays available). A deterministic drafter under -v exact keeps its own: it then emits the seed's
    autoregressive sample whatever was drafted, up to rounding (verify.SampleMatch)."""
    if (not greedy and (drafter.has_q or rule != "exact")) or (use_tree and not drafter.dynamic):
        return "fixed"
    return drafter.length


def brings_fallback(rule: Entry, drafter: Entry, use_tree: bool, length_given: bool) -> bool:
    """Does the rule bring its own draft length (BiLD's fallback, a confidence stop)? Only on chains whose drafter
    has a distribution, and only when no -l was given."""
    return rule.fallback is not None and not length_given and not use_tree and drafter.has_q


def make(table: dict[str, Entry], name: str, setup: Setup):
    """Build the method `name` of a table; a missing file or a failed load is one UsageError line."""
    entry = table[name]
    refuse([(missing_files(entry, setup) is not None, missing_files(entry, setup) or "")])
    return load_checked(name, setup.weights, lambda _: entry.build(setup))


# ---- drafters (-d) --------------------------------------------------------------------------------------------


def tree_shape(o: argparse.Namespace) -> dict:
    return dict(width=o.tree_width, size=o.tree_size)


def draft_tokenizer(folder: Path):
    """The draft's tokenizer: tokenizer.tiktoken in its folder or the folder above (the shipped layout)."""
    for path in (folder / "tokenizer.tiktoken", folder.parent / "tokenizer.tiktoken"):
        if path.is_file():
            return load_checked("draft's tokenizer", path, load_tokenizer)
    raise UsageError(f"no tokenizer for the draft in {folder}: expected tokenizer.tiktoken there or one folder up")


def shares_tokenizer(draft: Transformer, draft_enc, s: Setup) -> bool:
    """Same vocabulary size, and the same bytes for the first tokens: one tokenizer for draft and target."""
    if draft.config.vocab_size != s.target.config.vocab_size or draft_enc.n_vocab != s.enc.n_vocab:
        return False
    first = range(min(512, s.enc.n_vocab))
    return all(draft_enc.decode_single_token_bytes(i) == s.enc.decode_single_token_bytes(i) for i in first)


def draft_model(s: Setup) -> Transformer:
    """The draft model of --draft-model (the shipped draft by default), sharing the target's tokenizer."""
    draft = load_model(s.opts.draft_model, s.target.device, s.dtype)
    same = shares_tokenizer(draft, draft_tokenizer(s.opts.draft_model), s)
    refuse([(not same, "the draft's tokenizer differs from the target's: this method needs one vocabulary")])
    return draft


def build_draft(s: Setup):
    """The draft model drafts (SpS); with another tokenizer than the target's, across vocabularies (crossvocab.py)."""
    o = s.opts
    draft = load_model(o.draft_model, s.target.device, s.dtype)
    draft_enc = draft_tokenizer(o.draft_model)
    if not shares_tokenizer(draft, draft_enc, s):
        refuse([(o.tree or o.online, "a draft of another tokenizer drafts chains: drop --tree and --online")])
        return CrossVocabDrafter(draft, draft_enc, s.enc, s.target.config.vocab_size)
    if o.online:  # OSD: a private copy of the draft model, distilled on the verify calls' logits (online.py)
        refuse([(o.tree, "--online drafts chains: drop --tree")])
        return OnlineDrafter(draft, o.online_lr, o.online_every, o.online_steps, o.online_rows)
    return ModelDrafter(draft, depth=o.tree_depth, beam=o.tree_width, sampled=o.sampled_siblings, **tree_shape(o))


def build_collective(s: Setup):
    """The draft model's top-k tree, prompt lookup and, when its datastore exists, REST, merged (SpecInfer)."""
    o, rest = s.opts, None
    if (s.data_dir / "train.bin").is_file() and (s.data_dir / "datastore.npy").is_file():
        rest = RestDrafter.load(s.data_dir, depth=o.tree_depth, size=o.tree_size)
    else:
        note_without_rest(s.data_dir)
    model = ModelDrafter(draft_model(s), depth=o.tree_depth, beam=o.tree_width, **tree_shape(o))
    lookup = PromptLookupDrafter(depth=o.tree_depth, matches=o.tree_width)
    return CollectiveDrafter(model, lookup, rest, size=o.tree_size, depth=o.tree_depth)


def build_ouroboros(s: Setup):
    """The draft model drafting phrase by phrase (Lookahead decoding over the phrase pool), lengthened by suffixes."""
    o = s.opts
    return OuroborosDrafter(
        s.target,
        draft_model(s),
        o.gamma,
        o.ouroboros_window,
        o.ouroboros_ngram,
        o.ouroboros_candidates,
        o.ouroboros_suffixes,
        o.ouroboros_warm,
    )


def build_nar(s: Setup):
    nar = load_checked(
        "NAR drafter", s.weights / "nar", lambda p: NarModel.from_pretrained(p, s.target.device, s.dtype)
    )
    vocab = nar.lm.config.vocab_size
    refuse(
        [
            (
                vocab != s.target.config.vocab_size,
                f"the NAR drafter's vocabulary ({vocab}) differs from the target's ({s.target.config.vocab_size}): "
                "they must share a tokenizer",
            )
        ]
    )
    return NarDrafter(nar)


def exit_layer(s: Setup) -> int:
    """--exit-layer, by default two thirds of the target's blocks (8 of the shipped target's 12: the README's
    early-exit sweep)."""
    L = s.target.config.num_hidden_layers
    E = round(2 * L / 3) if s.opts.exit_layer is None else s.opts.exit_layer
    refuse([(not 1 <= E < L, f"--exit-layer must be in [1, {L - 1}] for this {L}-layer target, got {E}")])
    return E


def build_layerskip(s: Setup):
    """Draft & Verify: the target minus a searched set of sublayers (weights/layerskip.json), with its own cache."""
    path, o = s.weights / "layerskip.json", s.opts
    skip = load_skip_set(path)
    unknown = sorted(skip - set(sublayer_costs(s.target.config)))
    refuse([(bool(unknown), f"{path} names sublayers this target does not have: {', '.join(unknown)}")])
    return ModelDrafter(
        s.target, depth=o.tree_depth, beam=o.tree_width, sampled=o.sampled_siblings, skip=skip, **tree_shape(o)
    )


def build_quant(s: Setup):
    o = s.opts
    refuse(
        [
            (
                o.quant_bits == 8 and (s.target.device.type != "cpu" or s.dtype != torch.float32),
                "--quant-bits 8 uses torch's CPU int8 kernels: run it on the CPU in float32, or use --quant-bits 4",
            )
        ]
    )
    target = quantized(s.target, o.quant_bits)
    return ModelDrafter(target, depth=o.tree_depth, beam=o.tree_width, sampled=o.sampled_siblings, **tree_shape(o))


def build_blockwise(s: Setup):
    """Blockwise Parallel Decoding (Stern et al. 2018) = Medusa's heads, top-1 each: one chain."""
    heads = MedusaDrafter.from_pretrained(s.target, s.weights / "medusa", width=1, size=1).heads
    return MedusaDrafter(s.target, heads, width=1, size=len(heads.linears))


def build_samd(s: Setup):
    """SAM-Decoding's automata and, where their match is short, EAGLE-2's tree (SAMD[EAGLE2])."""
    o = s.opts
    sam = SamDrafter.load(s.data_dir, depth=o.tree_depth, size=o.tree_size)
    eagle = EagleDrafter.from_pretrained(
        s.target, s.weights / "eagle", depth=o.tree_depth, beam=o.tree_width, **tree_shape(o)
    )
    return SamdDrafter(sam, eagle, o.samd_threshold, o.samd_bias)


def model_cost(s: Setup) -> float:
    """A draft model's one-token call over the target's, both measured once per machine (cost.py). The drafter
    holds the draft model (SpS, OSD, the cascade's; a draft of another tokenizer too)."""
    return draft_cost(s.drafter.model, s.target)


def exit_cost(s: Setup) -> float:
    """An early exit after E of L blocks: E / L of the blocks (and the LM head, as the target's call)."""
    return exit_layer(s) / s.target.config.num_hidden_layers


def skip_cost(s: Setup) -> float:
    """The target without the skipped sublayers, by their share of the weights' multiply-adds."""
    costs = sublayer_costs(s.target.config)
    return 1 - sum(costs.get(name, 0.0) for name in load_skip_set(s.weights / "layerskip.json"))


def quant_cost(s: Setup) -> float:
    """The quantized target's one-token call over the target's (the drafter's model), measured once per machine."""
    return draft_cost(s.drafter.model, s.target)


DATASTORE = "python train.py data && python train.py datastore"
SIBLINGS = ("sampled_siblings",)  # the flag of every drafter that grows EAGLE-2 dynamic trees
# The tables are laid out by hand, an entry a few lines, to read top to bottom.
# fmt: off
DRAFTERS = {
    e.name: e
    for e in [
        Entry("none", "plain autoregressive decoding, the baseline (Algorithm 1)", lambda s: None, has_q=False,
              length="fixed", bench="Autoregressive"),
        Entry("draft", "a small draft model (§5.1; SpS, Leviathan et al. 2023, Chen et al. 2023); --tree: its "
              "EAGLE-2 tree; of another tokenizer than the target's: string-level drafts at -t 0, Token-Level "
              "Intersection above (Timor et al. 2025)", build_draft, "both", options=SIBLINGS + ("draft_model",
              "online", "online_lr", "online_every", "online_steps", "online_rows"), dynamic=True,
              cost=model_cost, bench="SpS (draft model)", family="draft model (§5.1)",
              variants=(("SpS tree (draft model, EAGLE-2 tree)", {"tree": True}),)),
        Entry("pld", "prompt lookup: copy what followed the last n-gram's earlier match (§5.1; LLMA, Yang et al. "
              "2023; Saxena 2023); "
              "--tree: several matches", lambda s: PromptLookupDrafter(depth=s.opts.tree_depth,
              matches=s.opts.tree_width), "both", has_q=False, bench="PLD (prompt lookup)", family="retrieval (§5.1)",
              variants=(("PLD tree (several matches)", {"tree": True}),)),
        Entry("medusa", "Medusa heads on the target's hidden state, a static token tree (§5.2, §6.3; Cai et al. "
              "2024)", lambda s: MedusaDrafter.from_pretrained(s.target, s.weights / "medusa", **tree_shape(s.opts)),
              "tree", weights=("medusa/model.safetensors",), make="python train.py medusa",
              bench="Medusa (static tree)", family="heads (§5.2)"),
        Entry("hydra", "Hydra's sequentially dependent heads, a dynamic tree (§5.2; Ankner et al. 2024)",
              lambda s: HydraDrafter.from_pretrained(s.target, s.weights / "hydra", beam=s.opts.tree_width,
              sampled=s.opts.sampled_siblings, **tree_shape(s.opts)), "tree", weights=("hydra/model.safetensors",),
              make="python train.py hydra", options=SIBLINGS, dynamic=True, bench="Hydra (dynamic tree)",
              family="heads (§5.2)"),
        Entry("eagle", "EAGLE's feature-level head with EAGLE-2's dynamic tree (§5.2, §6.3; Li et al. 2024)",
              lambda s: EagleDrafter.from_pretrained(s.target, s.weights / "eagle", depth=s.opts.tree_depth,
              beam=s.opts.tree_width, sampled=s.opts.sampled_siblings, **tree_shape(s.opts)), "tree",
              weights=("eagle/model.safetensors",), make="python train.py eagle", options=SIBLINGS, dynamic=True,
              bench="EAGLE-2 (dynamic tree)", family="heads (§5.2)"),
        Entry("blockwise", "Blockwise Parallel Decoding: Medusa's heads, top-1 each, one chain (§3.2; Stern et al. "
              "2018)", build_blockwise, "tree", weights=("medusa/model.safetensors",), make="python train.py medusa",
              bench="Blockwise (Medusa's heads, top-1 chain)", family="heads (§5.2)"),
        Entry("jacobi", "Jacobi decoding: refine a block of guesses in the target call (§5.2; Santilli et al. 2023)",
              lambda s: JacobiDrafter(s.target, s.opts.jacobi_block), "tree", options=("jacobi_block",),
              bench="Jacobi (block 4)", family="mask-predict (§5.2)"),
        Entry("lookahead", "Lookahead decoding: Jacobi's n-gram pool, verified in the same call (§5.2; Fu et al. "
              "2024)", lambda s: LookaheadDrafter(s.target, s.opts.lookahead_window, s.opts.lookahead_ngram,
              s.opts.lookahead_candidates), "tree", options=("lookahead_window", "lookahead_ngram",
              "lookahead_candidates"), bench="Lookahead (W 3, N 3, G 3)", family="mask-predict (§5.2)"),
        Entry("pass", "PaSS: learned lookahead embeddings in the target call (§5.2; Monea et al. 2023)",
              lambda s: PassDrafter.from_pretrained(s.target, s.weights / "pass"), "tree",
              weights=("pass/model.safetensors",), make="python train.py pass",
              bench="PaSS (4 lookahead embeddings)", family="mask-predict (§5.2)"),
        Entry("rest", "REST: retrieval from a suffix array of the training split, a frequency trie (§5.1; He et al. "
              "2023)", lambda s: RestDrafter.load(s.data_dir, depth=s.opts.tree_depth, size=s.opts.tree_size),
              "tree", data=("train.bin", "datastore.npy"), make=DATASTORE, has_q=False,
              bench="REST (suffix array of train split)", family="retrieval (§5.1)"),
        Entry("suffix", "SuffixDecoding: suffix tries of this prompt and earlier outputs (§5.1; Oliaro et al. 2024)",
              lambda s: SuffixDrafter(depth=s.opts.tree_depth, size=s.opts.tree_size, alpha=s.opts.suffix_alpha),
              "tree", options=("suffix_alpha",), has_q=False,
              bench="SuffixDecoding (suffix tries, learns across prompts)", family="retrieval (§5.1)"),
        Entry("sam", "SAM Decoding: suffix automata of the context and the training split, one chain (§5.1; Hu et "
              "al. 2024)", lambda s: SamDrafter.load(s.data_dir, depth=s.opts.tree_depth, size=s.opts.tree_size),
              "tree", data=("train.bin", "sam.npz"), make=DATASTORE, has_q=False,
              bench="SAM Decoding (suffix automata)", family="retrieval (§5.1)"),
        Entry("samd", "SAM-Decoding[EAGLE-2]: the automata's chain where their match is long enough, EAGLE-2's "
              "tree otherwise (§5.1, §5.2; Hu et al. 2024)", build_samd, "tree",
              weights=("eagle/model.safetensors",), data=("train.bin", "sam.npz"),
              make=f"python train.py eagle (the EAGLE head) and {DATASTORE} (the automaton)",
              options=("samd_threshold", "samd_bias"), bench="SAM-Decoding[EAGLE-2] (automata, else EAGLE-2 tree)",
              family="retrieval (§5.1)"),
        Entry("recycling", "Token Recycling: each token's top-k next tokens from every verify call, rejected "
              "candidates too, fill a static tree (§5.2, §6.3; Luo et al. 2024)", lambda s: RecyclingDrafter(
              s.target, size=s.opts.tree_size, depth=s.opts.tree_depth), "tree", has_q=False,
              bench="Token Recycling (adjacency matrix, learns across prompts)", family="retrieval (§5.1)",
              variants=(("Token Recycling (the paper's 80-node tree)", {"tree_size": 80}),)),
        Entry("cascade", "Cascade Speculative Drafting: prompt lookup drafts for the draft model (§5.1; Chen et al. "
              "2023)", lambda s: CascadeDrafter(draft_model(s), PromptLookupDrafter(), s.opts.cascade_horizontal),
              options=("draft_model", "cascade_horizontal"), cost=model_cost,
              bench="CS Drafting (vertical: PLD under the draft model)", family="draft model (§5.1)",
              variants=(("CS Drafting (vertical + horizontal: PLD after 2 model tokens)", {"cascade_horizontal": 2}),)),
        Entry("collective", "SpecInfer's collective tree: the draft model's tree, prompt lookup and REST, merged "
              "(§5.1, §6.3; Miao et al. 2024)", build_collective, "tree", options=("draft_model",),
              bench="Collective tree (SpecInfer: draft model + PLD + REST)", family="draft model (§5.1)"),
        Entry("ouroboros", "Ouroboros: the draft model drafts at least --gamma tokens phrase by phrase (Lookahead "
              "decoding over a phrase pool), pool phrases lengthen the draft into a tree, and the target's outputs "
              "on rejected tails go back into the pool (§5.1, §6.3; Zhao et al. 2024)", build_ouroboros, "tree",
              options=("draft_model", "ouroboros_window", "ouroboros_ngram", "ouroboros_candidates",
              "ouroboros_suffixes", "ouroboros_warm"), has_q=False,
              bench="Ouroboros (draft model phrase by phrase + pool suffixes)", family="draft model (§5.1)"),
        Entry("layerskip", "Draft & Verify: the target with a searched set of sublayers skipped (§5.2; Zhang et al. "
              "2023)", build_layerskip, "both", weights=("layerskip.json",), make="python train.py layerskip",
              options=SIBLINGS, dynamic=True, cost=skip_cost, bench="Draft & Verify (sublayers skipped)",
              family="early exit (§5.2)",
              variants=(("Draft & Verify, the paper's adaptive stop", {"draft_length": "adaptive"}),)),
        Entry("earlyexit", "LayerSkip: the first --exit-layer blocks draft into the target's own cache (§5.2; Elhoushi "
              "et al. 2024)", lambda s: EarlyExitDrafter(s.target, exit_layer(s)), options=("exit_layer",),
              cost=exit_cost,
              bench="LayerSkip early exit (shared cache)", family="early exit (§5.2)"),
        Entry("del", "DEL: the exit layer and draft length chosen every step (§5.2; Entezari Zarch et al. 2025)",
              lambda s: DynamicExitDrafter(s.target, exit_layer(s)), options=("exit_layer",), cost=exit_cost,
              bench="DEL (exit layer and length chosen per step)", family="early exit (§5.2)"),
        Entry("quant", "ML-SpecQD: the target's own weights quantized, int8 or int4 (§5.2; Georganas et al. 2025)",
              build_quant, "both", options=SIBLINGS + ("quant_bits",), dynamic=True, cost=quant_cost,
              bench="ML-SpecQD (int8 self-draft)", family="early exit (§5.2)"),
        Entry("nar", "SpecDec's non-autoregressive drafter: k [MASK] queries, k drafts in one call (§5.1; Xia et "
              "al. 2023)", build_nar, weights=("nar/model.safetensors",), make="python train.py nar",
              bench="SpecDec NAR drafter (k mask queries, one call)", family="draft model (§5.1)"),
    ]
}
# fmt: on
RENAMED = {"specdec": "nar"}  # old drafter names, refused with the new one


# ---- verification rules (-v) ----------------------------------------------------------------------------------


def build_contrastive(s: Setup):
    """SCD contrasts the draft's whole distribution: a top-k or top-p draft has q = 0 on most tokens."""
    o = s.opts
    refuse(
        [
            (
                o.top_k > 0 or o.top_p < 1,
                "--verify contrastive contrasts the draft's full distribution: drop --top-k and --top-p",
            )
        ]
    )
    return Contrastive(o.contrastive_alpha, o.contrastive_beta)


def rule_misfits(rule: Entry, drafter: Entry, use_tree: bool, greedy: bool, sampled: bool) -> list[tuple[bool, str]]:
    """The refusals of a verification rule that does not fit the run: its temperature, chain or tree, what it reads
    of the drafter (cli.py and bench.py's --verify table)."""
    return [
        (
            rule.temperature == "greedy" and not greedy,
            f"--verify {rule.name} is a greedy-decoding rule (survey §6.1): use it with -t 0",
        ),
        (
            rule.temperature == "sampling" and greedy,
            f"--verify {rule.name} is a rule of speculative sampling (survey §6.2, §6.3): use it with -t > 0",
        ),
        (
            rule.shape == "chain" and use_tree,
            f"--verify {rule.name} verifies chains: use a drafter of chains, without --tree",
        ),
        (
            rule.needs == "siblings" and not sampled,
            f"--verify {rule.name} selects among children drawn i.i.d. from the draft: add --sampled-siblings "
            "(on a tree: -d draft --tree, eagle, hydra, layerskip --tree, quant --tree)",
        ),
        (
            rule.shape == "tree" and not use_tree,
            f"--verify {rule.name} verifies token trees: add --tree",
        ),
        (
            rule.needs == "q" and not drafter.has_q,
            f"--verify {rule.name} reads the draft's distribution, and -d {drafter.name} has none",
        ),
    ]


# fmt: off
VERIFIERS = {
    e.name: e
    for e in [
        Entry("exact", "lossless: greedy at -t 0; above, a deterministic draft kept while it equals the target's "
              "own sample, so the text is autoregressive sampling's for the seed (Daliri et al. 2024), a sampled one "
              "by speculative sampling (§6.1, §6.2; Leviathan et al. 2023)", lambda s: exact(s.opts.temperature),
              "both"),
        Entry("rejection", "lossless: speculative sampling for every draft, a deterministic draft's one-hot q too: "
              "the same acceptance as -v exact, other random numbers (§6.2, §6.3; Leviathan et al. 2023, SpecInfer)",
              lambda s: SpeculativeSampling(), "both", temperature="sampling"),
        Entry("typical", "LOSSY: Medusa's typical acceptance (§6.1, §6.2; Cai et al. 2024)",
              lambda s: Typical(s.opts.typical_epsilon, s.opts.typical_delta), "both", lossy=True,
              options=("typical_epsilon", "typical_delta")),
        Entry("topk", "LOSSY: SpecDec's top-beta acceptance, greedy (§6.1; Xia et al. 2023)",
              lambda s: TopK(s.opts.topk_beta, s.opts.topk_tau), "both", temperature="greedy", lossy=True,
              options=("topk_beta", "topk_tau")),
        Entry("bild", "LOSSY: BiLD's rollback, with its fallback as the draft length, greedy (§6.1; Kim et al. "
              "2023)", lambda s: BiLD(s.opts.bild_rollback), "both", temperature="greedy", lossy=True,
              options=("bild_rollback", "bild_fallback"),
              fallback=lambda s: Confidence(s.opts.gamma, s.opts.bild_fallback)),
        Entry("lenient", "LOSSY: lenient speculative sampling, min(1, p / (l q)) (§6.2; Leviathan et al. 2023 App. A)",
              lambda s: Lenient(s.opts.lenience), "both", temperature="sampling", lossy=True, options=("lenience",)),
        Entry("spectr", "lossless: SpecTr's k-sequential selection among children sampled i.i.d. (--tree "
              "--sampled-siblings), min(1, p / (rho q)) with its optimal-transport rho (§6.3; Sun et al. 2023)",
              lambda s: SpecTr(), "tree", temperature="sampling", needs="siblings"),
        Entry("contrastive", "LOSSY: Speculative Contrastive Decoding, drafts verified against the contrast of target "
              "and draft (§9, §6.2; Yuan et al. 2023)", build_contrastive, "chain", temperature="sampling",
              lossy=True, needs="q", options=("contrastive_alpha", "contrastive_beta")),
    ]
}
# fmt: on


# ---- draft-length policies (-l) -------------------------------------------------------------------------------


def build_disco(s: Setup):
    classifier, trained = load_checked("DISCO classifier", s.weights / "disco", DiscoClassifier.load)
    return Disco(s.opts.gamma, classifier, trained if s.opts.disco_threshold is None else s.opts.disco_threshold)


def build_adaeagle(s: Setup):
    """AdaEAGLE: the trained length predictor (weights/adaeagle), on the target's device, reading its embeddings."""
    predictor, most = load_checked("AdaEAGLE length predictor", s.weights / "adaeagle", LengthPredictor.load)
    width = len(predictor.mean) // 2
    refuse(
        [
            (
                width != s.target.config.hidden_size,
                f"the AdaEAGLE predictor reads {width}-wide hidden states, the target's are "
                f"{s.target.config.hidden_size}: python train.py adaeagle for this target",
            )
        ]
    )
    return AdaEagle(predictor.to(s.target.device), s.target.embed_tokens, most)


def build_cost(s: Setup):
    """CostAware: the target's measured call-cost curve (cost.py, cached per machine) and the drafter's c."""
    entry = DRAFTERS[s.opts.drafter]
    if entry.cost is not None and s.drafter is None:  # built on its own (tests): build the drafter it sizes
        s = s.with_drafter(make(DRAFTERS, entry.name, s))
    c = entry.cost(s) if entry.cost is not None else 0.0
    return CostAware(cached_cost_curve(s.target, tree=True), c, most=s.opts.most_drafts)


# fmt: off
DRAFT_LENGTHS = {
    e.name: e
    for e in [
        Entry("fixed", "gamma drafts every step (Leviathan et al. 2023)", lambda s: FixedLength(s.opts.gamma), "both"),
        Entry("cost", "the gamma (or tree depth) with the most expected tokens per second, from the measured cost "
              "of target calls and the running acceptance rate (Leviathan et al. 2023's optimum, measured verify "
              "cost; survey §9)", build_cost, "both", options=("most_drafts",)),
        Entry("heuristic", "transformers' schedule: +2 after a full accept, -1 otherwise",
              lambda s: Heuristic(s.opts.gamma)),
        Entry("confidence", "stop after a draft token whose top probability is below --confidence (BiLD's "
              "fallback, Kim et al. 2023)",
              lambda s: Confidence(s.opts.gamma, s.opts.confidence), needs="q", options=("confidence",)),
        Entry("adaptive", "Draft & Verify's stop threshold that follows the acceptance rate (Zhang et al. 2023)",
              lambda s: Adaptive(s.opts.gamma), needs="q"),
        Entry("svip", "SVIP: stop when the draft's entropy says a rejection is likely (Zhang et al. 2024)",
              lambda s: SVIP(s.opts.gamma, s.opts.svip_threshold), needs="q", options=("svip_threshold",)),
        Entry("disco", "DISCO: a trained classifier decides each step's length (Mamou et al. 2024)", build_disco,
              weights=("disco/model.safetensors",), make="python train.py disco", needs="q",
              options=("disco_threshold",)),
        Entry("dynamic", "Dynamic Depth Decoding: stop growing an EAGLE-2 tree when its frontier is unlikely "
              "(Brown et al. 2024)", lambda s: DynamicDepth(s.opts.ddd_threshold), "tree", needs="dynamic",
              options=("ddd_threshold",)),
        Entry("adaeagle", "AdaEAGLE: a small MLP on the target's last hidden state predicts each EAGLE-2 tree's depth "
              "before it is drafted (Zhang et al. 2024)", build_adaeagle, "tree",
              weights=("adaeagle/model.safetensors",), make="python train.py adaeagle", needs="dynamic"),
        Entry("thompson", "EESD's Thompson sampling: a Beta posterior on a draft's acceptance, updated after each "
              "verification, decides each step's length, at most gamma (Liu et al. 2024; survey §9)",
              lambda s: Thompson(s.opts.gamma, tuple(s.opts.thompson_prior), s.opts.seed),
              options=("thompson_prior",)),
    ]
}
# fmt: on
