"""How every file in weights/ was made. Stages, each a sub-command (see weights/README.md for the exact runs):

    python train.py tokenizer   # corpus -> weights/tokenizer.tiktoken (byte-level BPE, 4096 tokens)
    python train.py data        # corpus -> data/train.bin, data/val.bin (uint16 token ids)
    python train.py datastore   # train.bin -> data/datastore.npy, data/sam.npz (REST's and SAM Decoding's indexes)
    python train.py target      # data -> weights/target/  (LLaMA, ~16M parameters)
    python train.py draft       # data -> weights/draft/   (LLaMA, ~1.6M parameters, same tokenizer)
    python train.py medusa      # target -> weights/medusa/ (4 Medusa heads on the frozen target)
    python train.py eagle       # target -> weights/eagle/  (one EAGLE decoder layer on the frozen target)
    python train.py disco       # target + draft -> weights/disco/ (DISCO's stop classifier, draft_length.py)
    python train.py adaeagle    # target + eagle -> weights/adaeagle/ (AdaEAGLE's length predictor, draft_length.py)
    python train.py pass        # target -> weights/pass/  (PaSS's lookahead embeddings, maskpredict.py)
    python train.py layerskip   # target -> weights/layerskip.json (Draft & Verify's skip set, selfdraft.py)
    python train.py nar         # target + draft -> weights/nar/ (SpecDec's NAR drafter, nar.py)
    python train.py corpus      # corpus_packages.txt -> data/corpus/ (the wider corpus for the next run, corpus.py)
    python train.py eval        # bits per byte of the target and the draft on held-out packages and stdlib files

With `--model NAME|DIR` (a pretrained target, pretrained.py), `data`, `datastore` and `layerskip` build that
model's own files with its own tokenizer: data/NAME/ and weights/NAME/layerskip.json, where specdec.py --model
NAME looks for them.

The default corpus is the Python standard library of the interpreter running this file (tests included,
site-packages excluded), so anyone can rebuild the weights offline; `--data FILE` trains on any text file instead,
and `--corpus packages` on the standard library plus the packages of corpus_packages.txt (after `train.py corpus`).
"""

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import corpus
import pretrained
import retrieval
from draft_length import DepthRecorder, DiscoClassifier, LengthPredictor, Recorder, penalized_l1
from drafters import ModelDrafter
from heads import EagleDrafter, EagleHead, HydraHeads, MedusaHeads, save_head
from maskpredict import PassEmbeddings
from model import ModelConfig, Transformer
from nar import NarModel
from prompts import function_prompts, is_heldout, stdlib_files
from selfdraft import save_skip_set, search_skip_set
from specdec import generate, speculative_generate, tree_speculative_generate
from tokenizer import EOT, load_tokenizer, save_ranks, train_bpe

HERE = Path(__file__).resolve().parent  # default locations are next to this file, wherever it is run from
MODEL_SIZES = {
    "target": ModelConfig(
        hidden_size=384, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=6, num_key_value_heads=2
    ),
    "draft": ModelConfig(
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    ),
}


# ---- corpus ---------------------------------------------------------------------------------------------------


def corpus_documents(split: str, data_file: str | None = None, args=None) -> list[str]:
    """The documents of `split` ('train' or 'val'): each stdlib file preceded by a `# file:` line. With
    `--corpus packages`, training adds the training packages' files; validation stays the held-out stdlib files."""
    if data_file:  # any text file: its last 5% is the validation split
        text = Path(data_file).read_text(errors="replace")
        cut = int(len(text) * 0.95)
        return [text[:cut]] if split == "train" else [text[cut:]]
    if args is not None and args.corpus == "packages":
        groups = package_splits(args)
        return [corpus.document_text(d) for d in groups["train" if split == "train" else "stdlib"]]
    return [
        f"# file: {rel}\n" + path.read_bytes().decode("utf-8", errors="replace")
        for rel, path in stdlib_files()
        if is_heldout(rel) == (split == "val")
    ]


def stdlib_documents() -> tuple[list[corpus.Document], list[corpus.Document]]:
    """(training, held-out) standard-library files, split by `is_heldout`."""
    docs = [corpus.Document("stdlib", rel, path.read_bytes()) for rel, path in stdlib_files()]
    return [d for d in docs if not is_heldout(d.path)], [d for d in docs if is_heldout(d.path)]


def package_splits(args) -> dict[str, list[corpus.Document]]:
    """corpus.split_documents on this interpreter's standard library and the packages of --packages."""
    return corpus.split_documents(*stdlib_documents(), corpus.read_packages(args.packages), Path(args.corpus_dir))


# ---- stages ---------------------------------------------------------------------------------------------------

MODEL_STAGES = ("data", "datastore", "layerskip")  # the stages that build a --model target's own files


def pretrained_target(args) -> pretrained.Checkpoint:
    """The pretrained --model, or a one-line exit where pretrained.py cannot load it."""
    try:
        return pretrained.load_checkpoint(args.model)
    except ValueError as e:
        sys.exit(f"train.py {args.stage}: {e}")


def stage_tokenizer(args) -> tuple[object, int]:
    """(tokenizer, end-of-text id): the shipped tokenizer of --weights (the target need not exist yet), or --model's."""
    if args.model is not None:
        ck = pretrained_target(args)
        return ck.enc, ck.eot
    enc = load_tokenizer(Path(args.weights) / "tokenizer.tiktoken")
    return enc, enc.eot_token


def stage_target(args) -> tuple[Transformer, object]:
    """(target, tokenizer): the shipped target of --weights, or the pretrained --model."""
    if args.model is not None:
        ck = pretrained_target(args)
        return ck.model, ck.enc
    return Transformer.from_pretrained(Path(args.weights) / "target"), stage_tokenizer(args)[0]


def build_tokenizer(args) -> None:
    t0 = time.time()
    ranks = train_bpe(corpus_documents("train", args.data, args), vocab_size=args.vocab_size)
    Path(args.weights).mkdir(parents=True, exist_ok=True)
    save_ranks(ranks, Path(args.weights) / "tokenizer.tiktoken")
    print(f"tokenizer: {len(ranks)} ranks + {EOT} in {time.time() - t0:.0f}s")


def build_data(args) -> None:
    enc, eot = stage_tokenizer(args)
    if enc.n_vocab > 2**16:  # the retrieval indexes and the training windows read uint16 ids
        raise SystemExit(f"train.py data: {enc.n_vocab} token ids do not fit the uint16 token files")
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        docs = corpus_documents(split, args.data, args)
        ids = [t for doc in docs for t in enc.encode_ordinary(doc) + [eot]]
        np.array(ids, dtype=np.uint16).tofile(Path(args.data_dir) / f"{split}.bin")
        print(f"{split}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB, {len(ids) / 1e6:.2f}M tokens")


def build_datastore(args) -> None:
    if not (Path(args.data_dir) / "train.bin").is_file():
        raise SystemExit(f"no {Path(args.data_dir) / 'train.bin'}: run python train.py data first")
    retrieval.build_datastore(Path(args.data_dir))


def build_corpus(args) -> None:
    """Fetch and extract every package of --packages, then print the table of weights/README.md: files, MB and
    tokens (current tokenizer) of each package after deduplication, by split."""
    packages = corpus.read_packages(args.packages)
    corpus.fetch_corpus(packages, Path(args.corpus_dir))
    groups = package_splits(args)
    enc = load_tokenizer(Path(args.weights) / "tokenizer.tiktoken")
    extracted = {
        p.name: sorted((Path(args.corpus_dir) / "packages" / f"{p.name}-{p.version}").rglob("*.py")) for p in packages
    }
    stdlib_counts = dict(zip(("train", "held out"), map(len, stdlib_documents())))
    versions = {p.name: p.version for p in packages} | {"stdlib": platform.python_version()}
    print("| package | version | split | .py files (before dedupe) | files kept | MB kept | tokens kept |")
    print("|---|---|---|---|---|---|---|")
    totals = {}
    for split, docs in groups.items():
        by_package: dict[str, list[corpus.Document]] = {}
        for doc in docs:
            by_package.setdefault(doc.group, []).append(doc)
        for name, pkg_docs in by_package.items():
            texts = [corpus.document_text(d) for d in pkg_docs]
            n_bytes = sum(len(t.encode()) for t in texts)
            n_tokens = sum(map(len, enc.encode_ordinary_batch(texts, num_threads=1))) + len(texts)  # + <|endoftext|>
            label = "train" if split == "train" else "held out"
            n_extracted = len(extracted[name]) if name in extracted else stdlib_counts[label]
            print(
                f"| {name} | {versions[name]} | {label} | {n_extracted} | {len(pkg_docs)} | {n_bytes / 1e6:.1f} | "
                f"{n_tokens / 1e6:.2f}M |",
                flush=True,
            )
            totals[label] = [a + b for a, b in zip(totals.get(label, [0, 0, 0]), (len(pkg_docs), n_bytes, n_tokens))]
    for label, (files, n_bytes, n_tokens) in totals.items():
        print(f"| **total {label}** | | | | {files} | {n_bytes / 1e6:.1f} | {n_tokens / 1e6:.2f}M |")


def evaluate(args) -> None:
    """Bits per byte of the target and the draft on each held-out package and on the held-out stdlib files: each set
    is one token stream (files in path order), scored in windows of the model's context that advance by
    --eval-stride, on evenly spaced windows holding about --eval-bytes (corpus.bits_per_byte)."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    enc = load_tokenizer(Path(args.weights) / "tokenizer.tiktoken")
    models = {name: Transformer.from_pretrained(Path(args.weights) / name) for name in ("target", "draft")}
    contexts = {name: eval_context(args, m) for name, m in models.items()}
    if not 0 < args.eval_stride < min(contexts.values()):
        raise corpus.CorpusError(f"--eval-stride must be in 1..{min(contexts.values()) - 1}, got {args.eval_stride}")
    groups = package_splits(args)
    print(f"evenly spaced windows of {contexts} tokens, scoring the last {args.eval_stride} of each", flush=True)
    print(f"| held-out set | files | MB | bytes scored | {' | '.join(f'{m} bits/byte' for m in models)} | seconds |")
    print("|---|---|---|---|" + "---|" * len(models) + "---|")
    for name, docs in groups.items():
        if name == "train":
            continue
        t0, texts = time.time(), [corpus.document_text(d) for d in docs]
        scores = [
            corpus.bits_per_byte(m, enc, texts, contexts[key], args.eval_stride, args.eval_bytes)
            for key, m in models.items()
        ]
        print(
            f"| {name} | {len(docs)} | {sum(len(t.encode()) for t in texts) / 1e6:.1f} | {scores[0][1]:,} | "
            + " | ".join(f"{s:.3f}" for s, _ in scores)
            + f" | {time.time() - t0:.0f} |",
            flush=True,
        )


def eval_context(args, model: Transformer) -> int:
    """--eval-context, or the model's whole context; never more, since RoPE tables stop there."""
    limit = model.config.max_position_embeddings
    if args.eval_context > limit:
        raise corpus.CorpusError(f"--eval-context {args.eval_context} exceeds the model's context ({limit})")
    return args.eval_context or limit


def random_windows(data: np.ndarray, batch_size: int, length: int, gen: torch.Generator, device) -> torch.Tensor:
    """[B, length] token windows cut at random offsets of the token stream."""
    starts = torch.randint(0, len(data) - length, (batch_size,), generator=gen).tolist()
    return torch.from_numpy(np.stack([data[s : s + length].astype(np.int64) for s in starts])).to(device)


def fixed_windows(data: np.ndarray, count: int, length: int, device) -> list[torch.Tensor]:
    """Evenly spaced windows of the held-out split, in batches of 8, for a comparable validation loss."""
    starts = np.linspace(0, len(data) - length - 1, count).astype(np.int64)
    chunks = torch.from_numpy(np.stack([data[s : s + length].astype(np.int64) for s in starts])).to(device)
    return list(chunks.split(8))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(args, module: torch.nn.Module, next_batch, loss_fn, val_batches: list, save, val_fn=None) -> None:
    """AdamW on `module`'s parameters: progress lines, periodic validation, checkpoints, --resume, and an optional
    time budget that fixes the step count once the speed is known. Shared by every stage that trains."""
    device = next(module.parameters()).device
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() == 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    ckpt_path = Path(args.checkpoints) / f"{args.stage}.pt"
    step, steps, gen = 0, args.steps, torch.Generator().manual_seed(args.seed)
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device)
        module.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["opt"]), gen.set_state(ckpt["gen"])
        step, steps = ckpt["step"], ckpt["steps"]
        print(f"resumed from {ckpt_path} at step {step}/{steps}")
    print(f"{args.stage}: {sum(p.numel() for p in params) / 1e6:.2f}M trained parameters, device {device}")
    t0, start_step, loss_sum, n_logged, tokens = time.time(), step, 0.0, 0, 0
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup)
        batch = next_batch(gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step, tokens = step + 1, tokens + batch.numel()
        loss_sum, n_logged = loss_sum + loss.item(), n_logged + 1
        if step == start_step + 20:
            t20 = time.time()
        if args.max_minutes and step == start_step + 50:  # fit the schedule to the time budget, once warm
            per_step = (time.time() - t20) / 30
            steps = min(steps, start_step + int(args.max_minutes * 60 / per_step))
            print(f"time budget {args.max_minutes} min at {per_step * 1000:.0f} ms/step: {steps} steps")
        if step % args.log_every == 0 or step == steps:
            elapsed = time.time() - t0
            print(
                f"step {step}/{steps} loss {loss_sum / n_logged:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{tokens / elapsed:,.0f} tok/s elapsed {elapsed / 60:.1f} min "
                f"eta {(steps - step) * elapsed / (step - start_step) / 60:.1f} min",
                flush=True,
            )
            loss_sum, n_logged = 0.0, 0
        if step % args.eval_every == 0 or step == steps:
            module.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                val = sum((val_fn or loss_fn)(b).item() for b in val_batches) / len(val_batches)
            module.train()
            print(f"step {step} val_loss {val:.4f}", flush=True)
        if step % args.checkpoint_every == 0 or step == steps:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "model": module.state_dict(),
                    "opt": opt.state_dict(),
                    "gen": gen.get_state(),
                    "step": step,
                    "steps": steps,
                },
                ckpt_path,
            )
    save()
    print(f"saved {args.stage}: {step} steps, {tokens / 1e6:.1f}M tokens this run, {(time.time() - t0) / 60:.1f} min")


def load_splits(args) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.fromfile(Path(args.data_dir) / "train.bin", dtype=np.uint16),
        np.fromfile(Path(args.data_dir) / "val.bin", dtype=np.uint16),
    )


def frozen_target(args, device) -> Transformer:
    target = Transformer.from_pretrained(Path(args.weights) / "target", device=device)
    return target.requires_grad_(False)


def train_lm(args) -> None:
    """Target or draft: next-token cross-entropy, or with --distill the target's whole next-token distribution
    (DistillSpec, Zhou et al. 2023; survey §7 "Alignment": a drafter that agrees with the target is accepted more)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = True
    train, val = load_splits(args)
    enc = load_tokenizer(Path(args.weights) / "tokenizer.tiktoken")
    cfg = ModelConfig(
        **{**MODEL_SIZES[args.stage].__dict__, "vocab_size": enc.n_vocab, "max_position_embeddings": args.seq_len}
    )
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(device)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    teacher = Transformer.from_pretrained(args.distill, device=device) if args.distill else None

    def next_token_loss(chunk):  # also the validation loss, distilled or not, so the two stay comparable
        return F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1).float(), chunk[:, 1:].flatten())

    def distill_loss(chunk):
        with torch.no_grad():
            soft = teacher(chunk[:, :-1]).flatten(0, 1).float().softmax(-1)
        return F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1).float(), soft)

    train_loop(
        args,
        model,
        lambda g: random_windows(train, args.batch_size, args.seq_len + 1, g, device),
        distill_loss if teacher else next_token_loss,
        fixed_windows(val, 160, args.seq_len + 1, device),
        lambda: model.save_pretrained(Path(args.weights) / args.stage),
        val_fn=next_token_loss,
    )


@torch.no_grad()
def self_distilled_text(
    target: Transformer,
    train: np.ndarray,
    args,
    device,
    greedy: bool = False,
    sequences: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Continuations that the target samples itself from corpus prompts (Medusa's self-distillation, survey §7):
    the heads learn what the target says, not what the corpus says. [n, prompt + new] tokens. greedy: the target's
    argmax continuations instead (SpecDec's sequence-level distillation)."""
    gen, out = torch.Generator(device).manual_seed(args.seed), []
    for i in range(0, sequences or args.distill_sequences, args.distill_batch):
        prompt = random_windows(
            train, args.distill_batch, args.distill_prompt, torch.Generator().manual_seed(seed + i), device
        )
        cache = target.new_cache(len(prompt), args.distill_prompt + args.distill_new)
        logits, seq = target(prompt, cache)[:, -1], [prompt]
        for _ in range(args.distill_new):
            seq.append(
                logits.argmax(-1, keepdim=True)
                if greedy
                else torch.multinomial(logits.float().softmax(-1), 1, generator=gen)
            )
            logits = target(seq[-1], cache)[:, -1]
        out.append(torch.cat(seq, 1))
    return torch.cat(out)


def train_heads(args) -> None:
    """Medusa-1 (Cai et al. 2024) or Hydra (Ankner et al. 2024) heads on the frozen target's last hidden state h_t,
    trained on the target's self-distilled text. Head k (1-based) learns token t+1+k, k places after the LM head's
    own next token, with loss weight 0.8^(k-1) as in the Medusa paper; a Hydra head also reads the embeddings of the
    true tokens t+1 .. t+k before it (teacher forcing)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train, val = load_splits(args)
    target = frozen_target(args, device)
    data = self_distilled_text(target, train, args, device)
    print(f"self-distilled {data.shape[0]} sequences of {data.shape[1]} tokens")
    K, C = args.medusa_heads, target.config.hidden_size
    heads = (MedusaHeads if args.stage == "medusa" else HydraHeads)(C, K).to(device)

    def medusa_logits(x, h):  # head k's guesses of x[:, k + 1:], k = 1..K: [B, T - k - 1, V] each
        logits = heads(h, target.lm_head)  # [K, B, T, V]
        return [logits[k - 1, :, : -k - 1] for k in range(1, K + 1)]

    def hydra_logits(x, h):
        e, out = target.embed_tokens(x), []  # e [B, T, C]
        for k in range(1, K + 1):
            n = x.shape[1] - k - 1
            path = torch.stack([e[:, 1 + j : 1 + j + n] for j in range(k)], dim=2)  # [B, n, k, C]: tokens t+1 .. t+k
            out.append(heads(k, h[:, :n], path, target.lm_head))
        return out

    def loss_fn(x):
        with torch.no_grad():
            _, h = target(x, return_hidden=True)
        logits = (medusa_logits if args.stage == "medusa" else hydra_logits)(x, h)
        return sum(
            0.8 ** (k - 1) * F.cross_entropy(y.flatten(0, 1).float(), x[:, k + 1 :].flatten())
            for k, y in enumerate(logits, start=1)
        )

    def next_batch(g):
        return data[torch.randint(0, len(data), (args.batch_size,), generator=g).to(device)]

    train_loop(
        args,
        heads,
        next_batch,
        loss_fn,
        fixed_windows(val, 80, data.shape[1], device),
        lambda: save_head(heads, {"hidden_size": C, "num_heads": K}, Path(args.weights) / args.stage),
    )


def train_eagle(args) -> None:
    """EAGLE (Li et al. 2024): from (f_j, embedding of x_{j+1}) predict f_{j+1}, the target's next feature; loss =
    smooth-L1 on features + 0.1 x cross-entropy against the target's own next-token distribution, with uniform
    noise on the input features as in the paper (the head will read its own imperfect predictions)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train, val = load_splits(args)
    target = frozen_target(args, device)
    head = EagleHead(ModelConfig(**{**target.config.__dict__, "num_hidden_layers": 1})).to(device)

    def loss_fn(x):
        with torch.no_grad():
            logits, f = target(x, return_hidden=True)  # [B, T, V], [B, T, C]
        noisy = f[:, :-1] + (torch.rand_like(f[:, :-1]) - 0.5) * 0.2 * head.training
        pred = head(noisy, target.embed_tokens(x[:, 1:]))  # predicts f[:, 1:]
        soft = logits[:, 1:].float().softmax(-1)
        return F.smooth_l1_loss(pred.float(), f[:, 1:].float()) + 0.1 * F.cross_entropy(
            target.lm_head(pred).flatten(0, 1).float(), soft.flatten(0, 1)
        )

    cfg = {k: v for k, v in head.config.__dict__.items()}
    train_loop(
        args,
        head,
        lambda g: random_windows(train, args.batch_size, args.seq_len, g, device),
        loss_fn,
        fixed_windows(val, 80, args.seq_len, device),
        lambda: save_head(head, cfg, Path(args.weights) / "eagle"),
    )


def time_calls(target: Transformer, prompt: list[int], max_tokens: int, repeats: int = 15) -> list[float]:
    """Median seconds of a target call that verifies k tokens after `prompt`, for k = 1 .. max_tokens."""
    cache = target.new_cache()
    target(torch.tensor([prompt[:-1]]), cache)
    seconds = []
    for k in range(1, max_tokens + 1):
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            target(torch.tensor([prompt[-1:] * k]), cache)
            runs.append(time.perf_counter() - t0)
            cache.truncate(len(prompt) - 1)
        seconds.append(sorted(runs)[repeats // 2])
    return seconds


def train_disco(args) -> None:
    """DISCO (Mamou et al. 2024): a classifier that predicts, from the draft's distribution, whether the target
    accepts a drafted token. Traces: the shipped draft model drafting a fixed --disco-gamma for the shipped target,
    greedy, on training-split prompts. The stop threshold maximises tokens per second over those traces, under the
    costs measured here: a drafted token, and a target call as a function of how many tokens it verifies."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    enc = load_tokenizer(Path(args.weights) / "tokenizer.tiktoken")
    target = Transformer.from_pretrained(Path(args.weights) / "target")
    draft = Transformer.from_pretrained(Path(args.weights) / "draft")
    prompts = function_prompts(enc, args.disco_prompts, args.disco_context, heldout=False)
    recorder, t0, drafted, draft_seconds = Recorder(args.disco_gamma), time.time(), 0, 0.0
    for prompt in prompts:
        _, stats = speculative_generate(target, ModelDrafter(draft), prompt, args.disco_new, draft_length=recorder)
        drafted, draft_seconds = drafted + stats.drafted, draft_seconds + stats.draft_seconds
    features, labels = (t.clone() for t in recorder.labelled())  # out of inference mode, to train on
    print(
        f"traces: {len(prompts)} prompts, {len(recorder.steps)} steps, {len(labels)} compared drafts "
        f"({labels.mean():.2f} accepted) in {time.time() - t0:.0f}s"
    )

    gen = torch.Generator().manual_seed(args.seed)
    clf = DiscoClassifier(args.disco_hidden)
    with torch.no_grad():
        for p in clf.net.parameters():  # explicit generator: the same weights on every run
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        clf.mean, clf.std = features.mean(0), features.std(0).clamp_min(1e-6)
    order = torch.randperm(len(labels), generator=gen)
    val, fit = order[: len(labels) // 10], order[len(labels) // 10 :]
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    for _ in range(args.disco_epochs):  # full batch: a few thousand rows
        loss = F.binary_cross_entropy_with_logits(clf(features[fit]), labels[fit])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        val_logits = clf(features[val])
        val_loss = F.binary_cross_entropy_with_logits(val_logits, labels[val])
        accuracy = ((val_logits > 0).float() == labels[val]).float().mean()
        majority = max(labels[val].mean(), 1 - labels[val].mean())
    print(
        f"classifier: train BCE {loss:.3f}, held-out BCE {val_loss:.3f}, accuracy {accuracy:.3f} "
        f"(always the majority class: {majority:.3f})"
    )

    per_draft = draft_seconds / drafted
    with torch.inference_mode():
        verify = time_calls(target, prompts[0], args.disco_gamma + 1)
    print(
        f"costs: {1000 * per_draft:.2f} ms per drafted token; a target call verifying k tokens: "
        + ", ".join(f"{k + 1}: {1000 * s:.1f} ms" for k, s in enumerate(verify))
    )
    best = (0.0, 0.0)
    for threshold in [i / 20 for i in range(20)]:
        produced = seconds = 0.0
        for step, accepted in recorder.steps:  # what this threshold would have drafted on each step
            with torch.no_grad():
                keep = torch.sigmoid(clf(step)) >= threshold
            kept = int(keep.logical_not().int().argmax()) + 1 if not keep.all() else len(step)
            produced += min(accepted, kept) + 1
            seconds += kept * per_draft + verify[kept]
        print(f"threshold {threshold:.2f}: {produced / seconds:.1f} tokens/s estimated")
        if produced / seconds > best[1]:
            best = (threshold, produced / seconds)
    clf.save(Path(args.weights) / "disco", best[0])
    print(f"saved disco: threshold {best[0]:.2f} ({best[1]:.1f} tokens/s estimated; threshold 0 = fixed gamma)")


def adaeagle_traces(target: Transformer, drafter: EagleDrafter, prompts: list[list[int]], new: int) -> tuple:
    """(LDLP inputs [N, 2 C], accepted levels [N], prompt index [N]) of every step of greedy EAGLE-2 decoding at
    full depth, `new` tokens after each prompt. The run goes depth + 1 tokens further and those last steps are
    dropped: the budget would have cut their trees short (specdec.trim_tree), and their labels with them."""
    recorder, rows = DepthRecorder(target.embed_tokens), []
    for k, prompt in enumerate(prompts):
        recorder.steps = []
        tree_speculative_generate(target, drafter, prompt, new + drafter.depth + 1, draft_length=recorder)
        rows += [(x, accepted, k) for position, x, accepted in recorder.steps if position - len(prompt) <= new]
    inputs = torch.stack([x for x, _, _ in rows]).clone()  # out of inference mode, to train on
    return inputs, torch.tensor([float(a) for _, a, _ in rows]), torch.tensor([k for _, _, k in rows])


def init_small(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights N(0, 1 / fan_in), biases 0, from an explicit generator: the same weights on every run."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0 * p)


def fit_length_predictor(x: torch.Tensor, y: torch.Tensor, args, gen: torch.Generator) -> tuple:
    """(LDLP, the best constant prediction, optimizer steps): AdamW on the penalised L1 (Eq. 4) in shuffled batches,
    cosine learning rate, from weights drawn from `gen` and an output bias at the best constant, the
    penalty / (1 + penalty) quantile of the labels y [N] of the inputs x [N, 2 C]."""
    model, lam = LengthPredictor(x.shape[1] // 2, args.adaeagle_hidden), args.adaeagle_penalty
    init_small(model, gen)
    constant = torch.quantile(y, lam / (1 + lam))
    with torch.no_grad():
        model.mean, model.std = x.mean(0), x.std(0).clamp_min(1e-6)
        model.out.bias.fill_(float(constant))
    # strong decay: a few thousand rows of 768 inputs, which the MLP would otherwise learn by heart within epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1.0)
    steps = args.adaeagle_epochs * math.ceil(len(y) / args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(args.adaeagle_epochs):
        for batch in torch.randperm(len(y), generator=gen).split(args.batch_size):
            loss = penalized_l1(model(x[batch]), y[batch], lam)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return model, constant, steps


def train_adaeagle(args) -> None:
    """AdaEAGLE (Zhang et al. 2024; draft_length.AdaEagle): the Lightweight Draft Length Predictor, from the
    target's embedding and last hidden state of the last accepted token to the levels of the next tree the target
    will accept. Traces: the shipped EAGLE head growing trees of --adaeagle-depth levels (width and size as
    specdec.py's defaults) for the shipped target, greedy, on training-split prompts; one row per step. The loss is
    the paper's penalised L1 (Eq. 4); a tenth of the prompts are held out to report it beside the best constant
    prediction (the penalty / (1 + penalty) quantile of the training labels)."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    enc = load_tokenizer(Path(args.weights) / "tokenizer.tiktoken")
    target = Transformer.from_pretrained(Path(args.weights) / "target")
    w, most = args.adaeagle_width, args.adaeagle_depth
    drafter = EagleDrafter.from_pretrained(
        target, Path(args.weights) / "eagle", depth=most, width=w, beam=w, size=args.adaeagle_size
    )
    prompts = function_prompts(enc, args.adaeagle_prompts, args.adaeagle_context, heldout=False)
    t0 = time.time()
    x, y, prompt_of = adaeagle_traces(target, drafter, prompts, args.adaeagle_new)
    counts = torch.bincount(y.long(), minlength=most + 1).tolist()
    print(
        f"traces: {len(prompts)} prompts, {len(y)} steps, {y.mean():.2f} levels accepted of {most} "
        f"(steps accepting 0..{most}: {counts}) in {time.time() - t0:.0f}s",
        flush=True,
    )

    gen = torch.Generator().manual_seed(args.seed)
    held = torch.randperm(len(prompts), generator=gen)[: max(1, len(prompts) // 10)]
    val = torch.isin(prompt_of, held)
    fit = (~val).nonzero().squeeze(1)
    lam, t0 = args.adaeagle_penalty, time.time()
    model, constant, steps = fit_length_predictor(x[fit], y[fit], args, gen)
    with torch.no_grad():
        train_loss = penalized_l1(model(x[fit]), y[fit], lam)
        predicted = model(x[val])
        depth = (predicted + 0.5).floor().clamp(1, most)
        val_loss = penalized_l1(predicted, y[val], lam)
        base = penalized_l1(constant.expand(int(val.sum())), y[val], lam)
        exact, near = (depth == y[val]).float().mean(), ((depth - y[val]).abs() <= 1).float().mean()
        kept = (torch.minimum(depth, y[val]).sum() + val.sum()) / (y[val].sum() + val.sum())
    print(
        f"predictor: {steps} steps in {time.time() - t0:.0f}s, train loss {train_loss:.3f}, held-out loss "
        f"{val_loss:.3f} (the best constant, {float(constant):.1f}: {base:.3f}); held-out depth = accepted "
        f"{exact:.3f}, within one {near:.3f}; mean depth {depth.mean():.2f} of {most}, keeping about {kept:.3f} "
        "of the tokens that full depth accepts",
        flush=True,
    )
    model.save(Path(args.weights) / "adaeagle", most, lam)
    print(f"saved {Path(args.weights) / 'adaeagle'}")


def pass_layout(context: int, k: int, cuts: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [context + len(cuts) k] and attention mask (bool, square) for training PaSS on several cut points of
    one window at once: block b holds the k embeddings placed after token cuts[b], seeing tokens 0..cuts[b] and the
    embeddings of its own block before it, at positions cuts[b] + 1 .. cuts[b] + k."""
    n = context + len(cuts) * k
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:context, :context] = torch.ones(context, context, dtype=torch.bool, device=device).tril()
    positions = torch.cat(
        [torch.arange(context, device=device)] + [torch.arange(c + 1, c + 1 + k, device=device) for c in cuts]
    )
    for b, c in enumerate(cuts):
        rows = slice(context + b * k, context + (b + 1) * k)
        mask[rows, : c + 1] = True
        mask[rows, rows] = torch.ones(k, k, dtype=torch.bool, device=device).tril()
    return positions, mask


def train_pass(args) -> None:
    """PaSS (Monea et al. 2023): k lookahead embeddings appended after a context of the frozen target; the output
    at embedding j must predict the token j + 1 places after the context's last token (embedding 1 stands where
    the next token goes). Only the k embeddings are trained. Each window is cut at --pass-cuts evenly spaced
    places at once (pass_layout), so one forward trains on many contexts."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads or torch.get_num_threads())
    train, val = load_splits(args)
    target = frozen_target(args, device)
    k, context, C = args.pass_tokens, args.pass_context, target.config.hidden_size
    cuts = [int(c) for c in np.linspace(context // 4, context - k - 2, args.pass_cuts)]  # last token of each context
    positions, mask = pass_layout(context, k, cuts, device)
    labels = torch.tensor(
        [c + 1 + j for c in cuts for j in range(1, k + 1)], device=device
    )  # window index of each target
    module = PassEmbeddings(k, C).to(device)
    with torch.no_grad():  # start at the average token embedding: a plausible input for every place
        module.embeds.copy_(target.embed_tokens.weight.mean(0).expand(k, C))

    def loss_fn(x):  # x [B, context]
        inputs = torch.cat([target.embed_tokens(x), module.embeds.repeat(len(cuts), 1).expand(len(x), -1, C)], dim=1)
        logits = target(None, positions=positions, attn_mask=mask, inputs_embeds=inputs)[:, context:]  # [B, cuts k, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), x[:, labels].flatten())

    train_loop(
        args,
        module,
        lambda g: random_windows(train, args.batch_size, context, g, device),
        loss_fn,
        fixed_windows(val, 40, context, device),
        lambda: save_head(module, {"num_tokens": k, "hidden_size": C}, Path(args.weights) / "pass"),
    )


def train_nar(args) -> None:
    """SpecDec's NAR drafter (Xia et al. 2023; nar.py), distilled from the frozen target. SpecDec trains its drafter
    by sequence-level knowledge distillation: on the teacher's own outputs. Here those are the target's greedy
    continuations of training-split prompts (--distill-prompt corpus tokens + --distill-new generated ones), and the
    loss is cross-entropy on them: after a context cut at t inside the generated part, query j must predict the
    target's greedy token t + j, which is exactly what greedy verification accepts. Each sequence is cut at
    --nar-cuts random places at once (nar.query_layout), fresh every step. The model starts from weights/draft
    (same width and tokenizer), the queries from its mean token embedding. Validation: the same loss on
    continuations of held-out prompts."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads or torch.get_num_threads())
    train, val = load_splits(args)
    target = frozen_target(args, device)
    t0 = time.time()
    data = self_distilled_text(target, train, args, device, greedy=True)
    val_data = self_distilled_text(target, val, args, device, greedy=True, sequences=args.distill_batch, seed=10**6)
    print(
        f"greedy continuations: {len(data)} + {len(val_data)} held-out sequences of {data.shape[1]} tokens in "
        f"{time.time() - t0:.0f}s",
        flush=True,
    )
    del target
    k, P, S = args.nar_queries, args.distill_prompt, data.shape[1]
    model = NarModel.from_lm(Transformer.from_pretrained(Path(args.weights) / "draft"), k).to(device)
    cut_gen = torch.Generator().manual_seed(args.seed + 1)

    def loss_at(x, cuts):  # x [B, S]: one forward over the whole sequence and every cut's queries
        labels = torch.tensor([t + j for t in cuts for j in range(k)], device=device)  # query j of cut t: token t+j
        logits = model(x, cuts=cuts, k=k)  # [B, cuts, k, V]
        return F.cross_entropy(logits.flatten(0, 2).float(), x[:, labels].flatten())

    def loss_fn(x):  # fresh cuts every step, all inside the generated part: far more contexts than sequences
        return loss_at(x, sorted((torch.randperm(S - k - P + 1, generator=cut_gen)[: args.nar_cuts] + P).tolist()))

    fixed_cuts = [int(c) for c in np.linspace(P, S - k, args.nar_cuts)]  # validation: the same every time

    def next_batch(g):
        return data[torch.randint(0, len(data), (args.batch_size,), generator=g).to(device)]

    train_loop(
        args,
        model,
        next_batch,
        loss_fn,
        list(val_data.split(8)),
        lambda: model.save_pretrained(Path(args.weights) / "nar"),
        lambda x: loss_at(x, fixed_cuts),
    )


def search_layerskip(args) -> None:
    """Draft & Verify's skip set (Zhang et al. 2023), searched on training-split prompts only: the target's greedy
    continuations of them, and which sublayers can go while the skipped model still predicts those tokens."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    target, enc = stage_target(args)
    t0 = time.time()
    prompts = function_prompts(enc, args.layerskip_prompts, args.layerskip_context, heldout=False)
    sequences = [(p, generate(target, p, args.layerskip_new)) for p in prompts]
    skip, curve = search_skip_set(target, sequences, args.layerskip_max)
    command = "python train.py layerskip " + " ".join(sys.argv[2:])
    save_skip_set(Path(args.weights) / "layerskip.json", skip, curve, command.strip())
    print(
        f"{len(prompts)} prompts x {args.layerskip_new} tokens, {time.time() - t0:.0f}s: skipping {len(skip)} "
        f"sublayers -> {Path(args.weights) / 'layerskip.json'}"
    )


def main(stage: str, **args) -> None:
    args = argparse.Namespace(stage=stage, **args)
    if args.model is not None:  # a pretrained target's files go in folders of its name (cli.setup_for)
        if stage not in MODEL_STAGES:
            sys.exit(f"train.py: error: --model builds only the stages {', '.join(MODEL_STAGES)}")
        args.weights = str(Path(args.weights) / Path(args.model).name)
        args.data_dir = args.data_dir or str(HERE / "data" / Path(args.model).name)
    if args.data_dir is None:  # the wider corpus gets its own token files, so the stdlib ones stay as they were
        args.data_dir = str(HERE / "data" / ("packages" if args.corpus == "packages" else ""))
    stages = {
        "tokenizer": build_tokenizer,
        "data": build_data,
        "target": train_lm,
        "draft": train_lm,
        "datastore": build_datastore,
        "medusa": train_heads,
        "hydra": train_heads,
        "eagle": train_eagle,
        "disco": train_disco,
        "adaeagle": train_adaeagle,
        "pass": train_pass,
        "corpus": build_corpus,
        "eval": evaluate,
        "layerskip": search_layerskip,
        "nar": train_nar,
    }
    try:
        stages[stage](args)
    except corpus.CorpusError as e:
        sys.exit(f"train.py {stage}: {e}")


RENAMED_STAGES = {"specdec": "nar"}  # old stage names, refused with the new one

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in RENAMED_STAGES:
        print(f"train.py: error: the stage {sys.argv[1]} is now called {RENAMED_STAGES[sys.argv[1]]}", file=sys.stderr)
        sys.exit(2)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "stage",
        choices=[
            "tokenizer",
            "data",
            "datastore",
            "target",
            "draft",
            "medusa",
            "hydra",
            "eagle",
            "disco",
            "adaeagle",
            "pass",
            "layerskip",
            "nar",
            "corpus",
            "eval",
        ],
        help="what to build (datastore: the retrieval indexes of -d rest and -d sam, after data)",
    )
    ap.add_argument("--data", default=None, help="train on this text file instead of the Python standard library")
    ap.add_argument(
        "--model",
        default=None,
        help="data, datastore, layerskip: for this pretrained target (smollm2 or a Hugging Face Llama folder) "
        "instead of the shipped one, into data/NAME/ and weights/NAME/",
    )
    ap.add_argument(
        "--weights", default=str(HERE / "weights"), help="output directory for the tokenizer and the models"
    )
    ap.add_argument(
        "--data-dir",
        default=None,
        help="where the tokenized corpus is written and read (default: data/, or data/packages/ with "
        "--corpus packages)",
    )
    ap.add_argument(
        "--corpus",
        choices=["stdlib", "packages"],
        default="stdlib",
        help="stdlib: the standard library (the shipped weights); packages: plus corpus_packages.txt",
    )
    ap.add_argument(
        "--packages",
        default=str(HERE / "corpus_packages.txt"),
        help="pinned package list (name==version lines; a '# heldout' line starts the held-out ones)",
    )
    ap.add_argument(
        "--corpus-dir",
        default=str(HERE / "data" / "corpus"),
        help="where `corpus` puts the downloads and the extracted .py files",
    )
    ap.add_argument(
        "--eval-bytes",
        type=int,
        default=100_000,
        help="eval: about this many UTF-8 bytes scored per held-out set, in evenly spaced windows",
    )
    ap.add_argument(
        "--eval-stride",
        type=int,
        default=512,
        help="eval: tokens a window advances, less than the context (each window scores only its last "
        "stride tokens, so each token has at least context - stride tokens before it)",
    )
    ap.add_argument("--eval-context", type=int, default=0, help="eval: window length in tokens (0 = model's context)")
    ap.add_argument("--checkpoints", default=str(HERE / "checkpoints"), help="where training checkpoints go")
    ap.add_argument("--distill", default=None, help="train on this model's soft labels (a trained target dir)")
    ap.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint")
    ap.add_argument("--vocab-size", type=int, default=4096, help="tokenizer size, <|endoftext|> included")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    ap.add_argument("--max-minutes", type=float, default=0, help="cut the step count to fit this time budget")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=1024, help="training context (also the model's max positions)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    ap.add_argument("--seed", type=int, default=0, help="seed for initialisation and batch sampling")
    ap.add_argument("--medusa-heads", type=int, default=4, help="Medusa or Hydra heads (tokens guessed ahead)")
    ap.add_argument("--distill-sequences", type=int, default=2048, help="self-distilled sequences for Medusa and Hydra")
    ap.add_argument("--distill-batch", type=int, default=512, help="sequences generated at once")
    ap.add_argument("--distill-prompt", type=int, default=64, help="corpus tokens that start each sequence")
    ap.add_argument("--distill-new", type=int, default=256, help="tokens the target generates after them")
    ap.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    ap.add_argument("--eval-every", type=int, default=500, help="steps between validation losses")
    ap.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    ap.add_argument("--disco-prompts", type=int, default=300, help="disco: training-split prompts to trace")
    ap.add_argument("--disco-context", type=int, default=128, help="disco: prompt tokens")
    ap.add_argument("--disco-new", type=int, default=64, help="disco: tokens generated per prompt")
    ap.add_argument("--disco-gamma", type=int, default=8, help="disco: drafts per step while tracing")
    ap.add_argument("--disco-hidden", type=int, default=32, help="disco: hidden width of the classifier")
    ap.add_argument("--disco-epochs", type=int, default=500, help="disco: full-batch Adam steps")
    ap.add_argument("--adaeagle-prompts", type=int, default=480, help="adaeagle: training-split prompts to trace")
    ap.add_argument("--adaeagle-context", type=int, default=128, help="adaeagle: prompt tokens")
    ap.add_argument("--adaeagle-new", type=int, default=64, help="adaeagle: tokens generated per prompt")
    ap.add_argument("--adaeagle-depth", type=int, default=6, help="adaeagle: tree depth while tracing (k_max)")
    ap.add_argument("--adaeagle-width", type=int, default=2, help="adaeagle: tree width and beam while tracing")
    ap.add_argument("--adaeagle-size", type=int, default=12, help="adaeagle: drafted nodes per tree while tracing")
    ap.add_argument("--adaeagle-hidden", type=int, default=64, help="adaeagle: hidden width of the predictor")
    ap.add_argument("--adaeagle-penalty", type=float, default=2.0, help="adaeagle: the loss's lambda (Eq. 4)")
    ap.add_argument("--adaeagle-epochs", type=int, default=10, help="adaeagle: passes over the traces")
    ap.add_argument("--pass-tokens", type=int, default=4, help="pass: lookahead embeddings (drafts per call)")
    ap.add_argument("--pass-context", type=int, default=128, help="pass: training window in tokens")
    ap.add_argument("--pass-cuts", type=int, default=16, help="pass: contexts cut from each window, trained at once")
    ap.add_argument("--nar-queries", type=int, default=4, help="nar: [MASK] queries (tokens drafted per call)")
    ap.add_argument("--nar-cuts", type=int, default=16, help="nar: contexts cut from each sequence, trained at once")
    ap.add_argument("--layerskip-prompts", type=int, default=8, help="layerskip: training-split prompts searched on")
    ap.add_argument("--layerskip-context", type=int, default=128, help="layerskip: prompt tokens")
    ap.add_argument("--layerskip-new", type=int, default=32, help="layerskip: target tokens generated per prompt")
    ap.add_argument("--layerskip-max", type=int, default=12, help="layerskip: most sublayers skipped (the curve's end)")
    main(**vars(ap.parse_args()))
