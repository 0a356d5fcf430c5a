"""The wider corpus for the next training run, and bits per byte on held-out code (used by train.py).

    python train.py corpus                   # pip-download corpus_packages.txt, extract the .py files to data/corpus/
    python train.py data --corpus packages   # stdlib + packages -> data/packages/train.bin, val.bin
    python train.py eval                     # bits per byte of weights/target and weights/draft on held-out code

Every package is pinned to an exact version in corpus_packages.txt, so anyone with pip gets the same files. The
packages after the `# heldout` line are never trained on: they are whole packages the models have not seen, which
tells more about generalisation than held-out files of a package whose neighbours were trained on.
"""

import hashlib
import math
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

VENDORED_DIRS = {"_vendor", "vendor", "_vendored", "vendored"}  # copies of other projects' code, inside a package


class CorpusError(Exception):
    """Bad input or a failed download: train.py prints the message as one line and exits non-zero."""


class Package(NamedTuple):
    name: str
    version: str
    heldout: bool


class Document(NamedTuple):
    group: str  # the package name, or "stdlib"
    path: str  # relative path, as in the `# file:` line
    content: bytes


# ---- package list ---------------------------------------------------------------------------------------------


def read_packages(path: str | Path) -> list[Package]:
    """`name==version` lines; a comment line starting with `# heldout` starts the held-out section."""
    packages, heldout = [], False
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if line.startswith("# heldout"):
            heldout = True
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise CorpusError(f"{path}:{number}: expected name==version, got {line!r}")
        packages.append(Package(name.strip(), version.strip(), heldout))
    return packages


# ---- download and extraction ----------------------------------------------------------------------------------


def download(pkg: Package, dest: Path) -> Path:
    """The package's archive, fetched by pip at its exact version: a Linux x86_64 / Python 3.11 wheel (wheels with
    compiled parts still hold the .py files), or the sdist where no wheel exists. Kept, so reruns are offline."""
    folder = dest / f"{pkg.name}-{pkg.version}"
    found = sorted(folder.glob("*")) if folder.exists() else []
    if found:
        return found[0]
    pip = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"{pkg.name}=={pkg.version}",
        "--no-deps",
        "-d",
        str(folder),
        "--disable-pip-version-check",
        "-q",
    ]
    wheel = ["--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11"]
    for extra in (wheel, ["--no-binary=:all:"]):
        run = subprocess.run(pip + extra, capture_output=True, text=True)
        found = sorted(folder.glob("*")) if folder.exists() else []
        if run.returncode == 0 and found:
            return found[0]
    last = (run.stderr.strip().splitlines() or ["no output"])[-1]
    raise CorpusError(f"pip could not download {pkg.name}=={pkg.version}: {last}")


def archive_python_files(archive: Path) -> list[tuple[str, bytes]]:
    """(path inside the package, content) of every .py file in a wheel (zip) or an sdist (.tar.gz, .zip)."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            files = [(i.filename, z.read(i)) for i in z.infolist() if i.filename.endswith(".py")]
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar.bz2")):
        with tarfile.open(archive) as t:
            files = [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isfile() and m.name.endswith(".py")]
    else:
        raise CorpusError(f"{archive.name}: not a wheel or an sdist")
    if archive.suffix != ".whl":  # an sdist has one top folder, name-version/
        files = [(name.partition("/")[2], data) for name, data in files]
    return [(package_path(name), data) for name, data in files if safe_path(name)]


def package_path(name: str) -> str:
    """A wheel's `x.data/purelib/pkg/mod.py` is installed as `pkg/mod.py`."""
    parts = name.split("/")
    if len(parts) > 2 and parts[0].endswith(".data") and parts[1] in ("purelib", "platlib"):
        return "/".join(parts[2:])
    return name


def safe_path(name: str) -> bool:
    """No absolute paths and no `..`: an archive must not write outside its folder."""
    return bool(name) and not name.startswith("/") and ".." not in name.split("/")


def extract(pkg: Package, archive: Path, dest: Path) -> Path:
    """Write the archive's .py files under dest/name-version/, replacing what was there."""
    folder = dest / f"{pkg.name}-{pkg.version}"
    shutil.rmtree(folder, ignore_errors=True)
    for name, data in archive_python_files(archive):
        out = folder / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    folder.mkdir(parents=True, exist_ok=True)  # an archive without .py files still counts as extracted
    return folder


def fetch_corpus(packages: list[Package], corpus_dir: Path) -> None:
    for i, pkg in enumerate(packages, 1):
        archive = download(pkg, corpus_dir / "downloads")
        folder = extract(pkg, archive, corpus_dir / "packages")
        count = sum(1 for _ in folder.rglob("*.py"))
        print(f"[{i}/{len(packages)}] {pkg.name}=={pkg.version}: {archive.name}, {count} .py files", flush=True)


# ---- documents and splits -------------------------------------------------------------------------------------


def package_documents(pkg: Package, corpus_dir: Path) -> list[Document]:
    folder = corpus_dir / "packages" / f"{pkg.name}-{pkg.version}"
    if not folder.is_dir():
        raise CorpusError(f"{folder} is missing: run `python train.py corpus` first")
    files = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*.py") if p.is_file())
    return [Document(pkg.name, rel, path.read_bytes()) for rel, path in files]


def is_vendored(path: str) -> bool:
    return any(part in VENDORED_DIRS for part in path.split("/")[:-1])


def dedupe(docs: list[Document], seen: set[bytes]) -> list[Document]:
    """The documents whose content is not in `seen` (md5 digests), first copy only; `seen` is updated."""
    kept = []
    for doc in docs:
        digest = hashlib.md5(doc.content).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append(doc)
    return kept


def split_documents(
    stdlib_train: list[Document], stdlib_val: list[Document], packages: list[Package], corpus_dir: Path
) -> dict[str, list[Document]]:
    """{'train': ..., 'stdlib': held-out stdlib files, <held-out package>: its files}. Held-out groups claim their
    contents first, so a training file identical to a held-out one is dropped from training, never the reverse.
    Vendored folders of training packages are skipped: they are other projects' code (possibly a held-out one)."""
    seen: set[bytes] = set()
    groups = {"stdlib": dedupe(stdlib_val, seen)}
    for pkg in packages:
        if pkg.heldout:
            groups[pkg.name] = dedupe(package_documents(pkg, corpus_dir), seen)
    train = list(stdlib_train)
    for pkg in packages:
        if not pkg.heldout:
            train += [d for d in package_documents(pkg, corpus_dir) if not is_vendored(d.path)]
    return {"train": dedupe(train, seen), **groups}


def document_text(doc: Document) -> str:
    """The text the model sees for one file, as train.corpus_documents writes the standard library."""
    return f"# file: {doc.path}\n" + doc.content.decode("utf-8", errors="replace")


# ---- bits per byte --------------------------------------------------------------------------------------------


def token_stream(enc, texts: list[str]) -> list[int]:
    """<|endoftext|>, then each text followed by <|endoftext|>, as the training data joins files."""
    ids = [enc.eot_token]
    for text in texts:
        ids += enc.encode_ordinary(text) + [enc.eot_token]
    return ids


def window_spans(n_tokens: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) of the tokens each window scores: [1, 1 + stride), [1 + stride, 1 + 2 stride), ... The first
    token is only context."""
    return [(start, min(start + stride, n_tokens)) for start in range(1, n_tokens, stride)]


def evenly_spaced(spans: list, count: int) -> list:
    """`count` of the spans, evenly spaced from the first to the last (all of them if count >= len(spans))."""
    if count >= len(spans):
        return spans
    return [spans[round(i * (len(spans) - 1) / max(1, count - 1))] for i in range(count)]


@torch.inference_mode()
def spans_nll(model, ids: list[int], spans: list[tuple[int, int]], context: int) -> float:
    """Sum of -ln p(ids[t] | ids[end - context:t]) over the tokens t of each span [start, end): each span is
    scored in one window of `context` tokens that ends with it."""
    total = 0.0
    for start, end in spans:
        begin = max(0, end - context)
        if begin >= start:  # the window must also hold the token before the first one it scores
            raise CorpusError(f"span {start}..{end} does not fit a window of {context} tokens")
        logits = model(torch.tensor([ids[begin:end]]))[0, start - begin - 1 : end - begin - 1]
        total += F.cross_entropy(logits.float(), torch.tensor(ids[start:end]), reduction="sum").item()
    return total


def bits_per_byte(
    model, enc, texts: list[str], context: int, stride: int, max_bytes: int | None = None
) -> tuple[float, int]:
    """NLL in bits / UTF-8 bytes, over the token stream of `texts` (end-of-text predictions included; they are 0
    bytes). Sliding windows of `context` tokens advance by `stride` and score their last `stride` tokens, so each
    token has at least context - stride tokens before it. With max_bytes, only evenly spaced windows holding about
    that many bytes are scored: an estimate for the whole stream at a fraction of the cost (a sample of whole files
    would be at the mercy of a few large ones, such as a 100 KB table of numbers). Returns (bits/byte, bytes)."""
    if not 0 < stride < context:
        raise CorpusError(f"stride must be in 1..{context - 1} (the context less one), got {stride}")
    ids = token_stream(enc, texts)
    sizes = [0 if t == enc.eot_token else len(enc.decode_single_token_bytes(t)) for t in range(enc.eot_token + 1)]
    spans = window_spans(len(ids), stride)
    if max_bytes is not None:
        per_span = sum(len(t.encode()) for t in texts) / max(1, len(spans))
        spans = evenly_spaced(spans, math.ceil(max_bytes / per_span))
    n_bytes = sum(sizes[t] for start, end in spans for t in ids[start:end])
    return spans_nll(model, ids, spans, context) / math.log(2) / n_bytes, n_bytes
