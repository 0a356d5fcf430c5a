"""How every file in weights/ was made. Stages, each a sub-command (see weights/README.md for the exact runs):

    python train.py tokenizer   # corpus -> weights/tokenizer.tiktoken (byte-level BPE, 4096 tokens)
    python train.py data        # corpus -> data/train.bin, data/val.bin (uint16 token ids)
    python train.py target      # data -> weights/target/  (LLaMA, ~16M parameters)
    python train.py draft       # data -> weights/draft/   (LLaMA, ~1.6M parameters, same tokenizer)

The default corpus is the Python standard library of the interpreter running this file (tests included,
site-packages excluded), so anyone can rebuild the weights offline; `--data FILE` trains on any text file instead.
"""
import argparse
import hashlib
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer
from tokenizer import EOT, load_tokenizer, save_ranks, train_bpe

MODEL_SIZES = {
    "target": ModelConfig(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                          num_key_value_heads=2),
    "draft": ModelConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=3,
                         num_key_value_heads=1, tie_word_embeddings=True),
}


# ---- corpus ---------------------------------------------------------------------------------------------------

def stdlib_files() -> list[tuple[str, Path]]:
    """(relative path, file) for every .py file of this interpreter's standard library, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    return sorted((p.relative_to(root).as_posix(), p) for p in files)


def is_heldout(rel_path: str) -> bool:
    """A deterministic 5% of files, chosen by a hash of their path, for validation and benchmark prompts."""
    return int(hashlib.md5(rel_path.encode()).hexdigest(), 16) % 20 == 0


def corpus_documents(split: str, data_file: str | None = None) -> list[str]:
    """The documents of `split` ('train' or 'val'): each stdlib file preceded by a `# file:` line."""
    if data_file:  # any text file: its last 5% is the validation split
        text = Path(data_file).read_text(errors="replace")
        cut = int(len(text) * 0.95)
        return [text[:cut]] if split == "train" else [text[cut:]]
    return [f"# file: {rel}\n" + path.read_bytes().decode("utf-8", errors="replace")
            for rel, path in stdlib_files() if is_heldout(rel) == (split == "val")]


# ---- stages ---------------------------------------------------------------------------------------------------

def build_tokenizer(args) -> None:
    t0 = time.time()
    ranks = train_bpe(corpus_documents("train", args.data), vocab_size=args.vocab_size)
    Path(args.weights).mkdir(parents=True, exist_ok=True)
    save_ranks(ranks, Path(args.weights) / "tokenizer.tiktoken")
    print(f"tokenizer: {len(ranks)} ranks + {EOT} in {time.time() - t0:.0f}s")


def build_data(args) -> None:
    enc = load_tokenizer(Path(args.weights) / "tokenizer.tiktoken")
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        docs = corpus_documents(split, args.data)
        ids = [t for doc in docs for t in enc.encode_ordinary(doc) + [enc.eot_token]]
        np.array(ids, dtype=np.uint16).tofile(Path(args.data_dir) / f"{split}.bin")
        print(f"{split}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB, {len(ids) / 1e6:.2f}M tokens")


def random_windows(data: np.ndarray, batch_size: int, seq_len: int, gen: torch.Generator, device):
    """Inputs and next-token targets [B, T] cut at random offsets of the token stream."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen).tolist()
    chunk = torch.from_numpy(np.stack([data[s:s + seq_len + 1].astype(np.int64) for s in starts]))
    return chunk[:, :-1].to(device), chunk[:, 1:].to(device)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validation_loss(model, val: np.ndarray, seq_len: int, device, batches: int = 20) -> float:
    """Mean loss over fixed, evenly spaced windows of the held-out split."""
    model.eval()
    starts = np.linspace(0, len(val) - seq_len - 1, batches * 8).astype(np.int64)
    losses = []
    for i in range(0, len(starts), 8):
        chunk = torch.from_numpy(np.stack([val[s:s + seq_len + 1].astype(np.int64) for s in starts[i:i + 8]]))
        x, y = chunk[:, :-1].to(device), chunk[:, 1:].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses.append(F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def init_weights(model: Transformer) -> None:
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)


def train_model(args) -> None:
    """Next-token cross-entropy with AdamW; logs, periodic validation, checkpoints and --resume."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = True
    train = np.fromfile(Path(args.data_dir) / "train.bin", dtype=np.uint16)
    val = np.fromfile(Path(args.data_dir) / "val.bin", dtype=np.uint16)
    enc = load_tokenizer(Path(args.weights) / "tokenizer.tiktoken")
    cfg = ModelConfig(**{**MODEL_SIZES[args.stage].__dict__, "vocab_size": enc.n_vocab,
                         "max_position_embeddings": args.seq_len})
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(device)
    init_weights(model)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    ckpt_path = Path(args.checkpoints) / f"{args.stage}.pt"
    step, steps, gen = 0, args.steps, torch.Generator().manual_seed(args.seed)
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device)
        model.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["opt"]), gen.set_state(ckpt["gen"])
        step, steps = ckpt["step"], ckpt["steps"]
        print(f"resumed from {ckpt_path} at step {step}/{steps}")
    teacher = Transformer.from_pretrained(args.distill, device=device) if args.distill else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.stage}: {n_params / 1e6:.2f}M parameters, {len(train) / 1e6:.2f}M train tokens, device {device}")
    tokens_per_step = args.batch_size * args.seq_len
    t0, loss_sum, n_logged = time.time(), 0.0, 0
    start_step = step
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup)
        x, y = random_windows(train, args.batch_size, args.seq_len, gen, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x).flatten(0, 1).float()
            if teacher is None:
                loss = F.cross_entropy(logits, y.flatten())
            else:  # DistillSpec (Zhou et al. 2024, survey §5.1): match the target's whole next-token distribution
                with torch.no_grad():
                    soft = teacher(x).flatten(0, 1).float().softmax(-1)
                loss = F.cross_entropy(logits, soft)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_sum, n_logged = loss_sum + loss.item(), n_logged + 1
        if step == start_step + 20:
            t20 = time.time()
        if args.max_minutes and step == start_step + 50:  # fit the schedule to the time budget, once warm
            per_step = (time.time() - t20) / 30
            steps = min(steps, start_step + int(args.max_minutes * 60 / per_step))
            print(f"time budget {args.max_minutes} min at {per_step * 1000:.0f} ms/step: {steps} steps")
        if step % args.log_every == 0 or step == steps:
            elapsed = time.time() - t0
            rate = (step - start_step) * tokens_per_step / elapsed
            eta = (steps - step) * tokens_per_step / rate
            print(f"step {step}/{steps} loss {loss_sum / n_logged:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{rate:,.0f} tok/s elapsed {elapsed / 60:.1f} min eta {eta / 60:.1f} min", flush=True)
            loss_sum, n_logged = 0.0, 0
        if step % args.eval_every == 0 or step == steps:
            print(f"step {step} val_loss {validation_loss(model, val, args.seq_len, device):.4f}", flush=True)
        if step % args.checkpoint_every == 0 or step == steps:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                        "step": step, "steps": steps}, ckpt_path)
    model.save_pretrained(Path(args.weights) / args.stage)
    print(f"saved {Path(args.weights) / args.stage}: {step} steps, {step * tokens_per_step / 1e6:.1f}M tokens seen, "
          f"{(time.time() - t0) / 60:.1f} min")


def main(stage: str, **args) -> None:
    args = argparse.Namespace(stage=stage, **args)
    {"tokenizer": build_tokenizer, "data": build_data, "target": train_model, "draft": train_model}[stage](args)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["tokenizer", "data", "target", "draft"], help="what to build")
    ap.add_argument("--data", default=None, help="train on this text file instead of the Python standard library")
    ap.add_argument("--weights", default="weights", help="output directory for the tokenizer and the models")
    ap.add_argument("--data-dir", default="data", help="where the tokenized corpus is written and read")
    ap.add_argument("--checkpoints", default="checkpoints", help="where training checkpoints go")
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
    ap.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    ap.add_argument("--eval-every", type=int, default=500, help="steps between validation losses")
    ap.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    main(**vars(ap.parse_args()))
