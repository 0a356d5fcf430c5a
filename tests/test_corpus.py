"""The wider corpus (corpus.py): package list, extraction from archives built here, dedupe, the held-out split by
package, and bits per byte against brute force. Offline: nothing is downloaded."""

import io
import math
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import corpus
from corpus import Document, Package
from tests.toy import toy_model

ROOT = Path(__file__).resolve().parent.parent


# ---- package list ---------------------------------------------------------------------------------------------


def test_read_packages_marks_the_heldout_section(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("# header\nalpha==1.0\n\nbeta==2.0.1  # why\n# heldout: never trained on\npip==24.0\n")
    assert corpus.read_packages(path) == [
        Package("alpha", "1.0", False),
        Package("beta", "2.0.1", False),
        Package("pip", "24.0", True),
    ]
    path.write_text("alpha>=1.0\n")
    with pytest.raises(corpus.CorpusError, match="expected name==version"):
        corpus.read_packages(path)


def test_shipped_package_list_holds_out_pip_and_two_more():
    packages = corpus.read_packages(ROOT / "corpus_packages.txt")
    heldout = {p.name for p in packages if p.heldout}
    assert "pip" in heldout and len(heldout) >= 3
    assert len({p.name for p in packages}) == len(packages)  # no package twice, so none is both train and held out


# ---- extraction -----------------------------------------------------------------------------------------------


def make_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("demo/__init__.py", "x = 1\n")
        z.writestr("demo/sub/mod.py", "def f():\n    return 2\n")
        z.writestr("demo/data.json", "{}")
        z.writestr("demo/_speedups.cpython-311-x86_64-linux-gnu.so", b"\x7fELF")
        z.writestr("demo-1.0.data/purelib/extra.py", "y = 3\n")
        z.writestr("demo-1.0.dist-info/METADATA", "Name: demo\n")
        z.writestr("../evil.py", "import os\n")
    return path


def test_wheel_gives_its_py_files_only(tmp_path):
    files = dict(corpus.archive_python_files(make_wheel(tmp_path / "demo-1.0-py3-none-any.whl")))
    assert files == {
        "demo/__init__.py": b"x = 1\n",
        "demo/sub/mod.py": b"def f():\n    return 2\n",
        "extra.py": b"y = 3\n",
    }


def test_sdist_drops_its_top_folder(tmp_path):
    path = tmp_path / "demo-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for name, text in [
            ("demo-1.0/setup.py", b"setup()\n"),
            ("demo-1.0/src/demo/a.py", b"a = 1\n"),
            ("demo-1.0/README.md", b"# demo\n"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(text)
            t.addfile(info, io.BytesIO(text))
    assert dict(corpus.archive_python_files(path)) == {"setup.py": b"setup()\n", "src/demo/a.py": b"a = 1\n"}


def test_extract_writes_under_name_version_and_replaces_old_files(tmp_path):
    pkg = Package("demo", "1.0", False)
    stale = tmp_path / "out" / "demo-1.0" / "stale.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("old\n")
    folder = corpus.extract(pkg, make_wheel(tmp_path / "demo-1.0-py3-none-any.whl"), tmp_path / "out")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "demo/__init__.py",
        "demo/sub/mod.py",
        "extra.py",
    ]
    assert not (tmp_path / "evil.py").exists() and not (tmp_path / "out" / "evil.py").exists()


# ---- dedupe and splits ----------------------------------------------------------------------------------------


def test_dedupe_keeps_the_first_copy_of_each_content():
    docs = [Document("a", "x.py", b"same"), Document("b", "y.py", b"other"), Document("c", "z.py", b"same")]
    seen = set()
    assert corpus.dedupe(docs, seen) == docs[:2]
    assert corpus.dedupe([Document("d", "w.py", b"other"), Document("d", "v.py", b"new")], seen) == [
        Document("d", "v.py", b"new")
    ]


def write_package(corpus_dir: Path, name: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = corpus_dir / "packages" / f"{name}-1.0" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_split_holds_out_whole_packages(tmp_path):
    write_package(
        tmp_path,
        "lib",
        {
            "lib/core.py": "core\n",
            "lib/shared.py": "shared\n",
            "lib/__init__.py": "",
            "lib/_vendor/pipstuff.py": "vendored\n",
        },
    )
    write_package(tmp_path, "tool", {"tool/main.py": "main\n", "tool/shared.py": "shared\n", "tool/__init__.py": ""})
    write_package(tmp_path, "pip", {"pip/cli.py": "cli\n", "pip/_vendor/pipstuff.py": "vendored\n"})
    packages = [Package("lib", "1.0", False), Package("tool", "1.0", True), Package("pip", "1.0", True)]
    stdlib_train = [Document("stdlib", "os.py", b"os\n"), Document("stdlib", "empty/__init__.py", b"")]
    stdlib_val = [Document("stdlib", "json.py", b"json\n")]
    groups = corpus.split_documents(stdlib_train, stdlib_val, packages, tmp_path)
    assert list(groups) == ["train", "stdlib", "tool", "pip"]
    paths = {name: [d.path for d in docs] for name, docs in groups.items()}
    # the held-out package keeps its copy of a shared file and the empty __init__.py; training loses both, and
    # skips the vendored folder (pip, held out, vendors the same file)
    assert paths["train"] == ["os.py", "lib/core.py"]
    assert paths["tool"] == ["tool/__init__.py", "tool/main.py", "tool/shared.py"]
    assert paths["pip"] == ["pip/_vendor/pipstuff.py", "pip/cli.py"]
    assert paths["stdlib"] == ["json.py"]
    train_contents = {d.content for d in groups["train"]}
    assert not any(d.content in train_contents for name in ("stdlib", "tool", "pip") for d in groups[name])


def test_missing_package_folder_is_a_clear_error(tmp_path):
    with pytest.raises(corpus.CorpusError, match="train.py corpus"):
        corpus.split_documents([], [], [Package("gone", "1.0", False)], tmp_path)


def test_cli_error_is_one_line(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "data",
            "--corpus",
            "packages",
            "--corpus-dir",
            str(tmp_path / "none"),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode != 0
    assert len(run.stderr.strip().splitlines()) == 1 and "train.py corpus" in run.stderr


# ---- bits per byte --------------------------------------------------------------------------------------------


class ByteEncoder:
    """Bytes as tokens 0..255 and <|endoftext|> as 256: the fewest moving parts for the arithmetic."""

    eot_token = 256

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode())

    def decode_single_token_bytes(self, token: int) -> bytes:
        return bytes([token])


class Bigram(torch.nn.Module):
    """Logits depend only on the previous token, so any window and stride must give the same NLL."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, tokens):
        return self.table[tokens]


def brute_force_nll(model, ids: list[int], tokens, context: int, stride: int) -> float:
    """-ln p of each token t in `tokens`, from one cache-free forward on exactly the context the windows give it:
    t is scored by window k = (t - 1) // stride, which ends at 1 + (k + 1) stride and starts `context` before."""
    total = 0.0
    with torch.no_grad():
        for t in tokens:
            end = min(1 + stride * ((t - 1) // stride + 1), len(ids))
            begin = max(0, end - context)
            assert t - begin >= min(t, context - stride)  # the promised context
            total -= F.log_softmax(model(torch.tensor([ids[begin:t]]))[0, -1].float(), -1)[ids[t]].item()
    return total


TEXTS = ["def f(x):\n    return x\n", "naïve = 'é'\n", "a", "class C:\n    pass\n" * 3]


@pytest.mark.parametrize("context,stride", [(4, 1), (4, 3), (7, 3), (64, 16), (1000, 999)])
def test_bits_per_byte_of_a_bigram_equals_brute_force(context, stride):
    model, enc = Bigram(257), ByteEncoder()
    ids = [256] + [t for text in TEXTS for t in list(text.encode()) + [256]]
    logp = model.table.detach().log_softmax(-1)
    nll = -sum(logp[ids[t - 1], ids[t]].item() for t in range(1, len(ids)))
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert corpus.token_stream(enc, TEXTS) == ids
    bpb, scored = corpus.bits_per_byte(model, enc, TEXTS, context, stride)
    assert scored == n_bytes and bpb == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert corpus.bits_per_byte(model, enc, TEXTS, context, stride, max_bytes=10**6) == (bpb, scored)


def test_windows_give_each_token_the_promised_context():
    model = toy_model(seed=4, vocab_size=6, max_len=16)
    ids = torch.randint(0, 6, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    for context, stride in [(8, 3), (16, 15), (16, 1)]:
        spans = corpus.window_spans(len(ids), stride)
        assert [t for start, end in spans for t in range(start, end)] == list(range(1, 30))  # each token once
        assert corpus.spans_nll(model, ids, spans, context) == pytest.approx(
            brute_force_nll(model, ids, range(1, 30), context, stride), rel=1e-5
        )


def test_windows_holding_the_whole_stream_equal_a_prefix_at_a_time():
    model = toy_model(seed=3, vocab_size=6, max_len=16)
    ids = torch.randint(0, 6, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        brute = sum(-F.log_softmax(model(torch.tensor([ids[:t]]))[0, -1], -1)[ids[t]].item() for t in range(1, 13))
    for stride in (1, 5, 15):  # with the whole stream in every window, the stride cannot matter
        assert corpus.spans_nll(model, ids, corpus.window_spans(13, stride), 16) == pytest.approx(brute, rel=1e-5)


def test_max_bytes_scores_evenly_spaced_windows_only():
    model, enc = toy_model(seed=5, vocab_size=257, max_len=16), ByteEncoder()
    ids = corpus.token_stream(enc, TEXTS)  # 80 tokens: 27 windows of 3
    spans = corpus.window_spans(len(ids), 3)
    chosen = corpus.evenly_spaced(spans, 5)
    assert chosen[0] == spans[0] and chosen[-1] == spans[-1] and len(set(chosen)) == 5
    tokens = [t for start, end in chosen for t in range(start, end)]
    n_bytes = sum(ids[t] != 256 for t in tokens)  # one byte per token, none for <|endoftext|>
    per_window = sum(len(t.encode()) for t in TEXTS) / len(spans)
    bpb, scored = corpus.bits_per_byte(model, enc, TEXTS, 8, 3, max_bytes=int(4.5 * per_window))  # -> 5 windows
    assert scored == n_bytes
    assert bpb == pytest.approx(brute_force_nll(model, ids, tokens, 8, 3) / math.log(2) / n_bytes, rel=1e-5)


def test_bad_stride_is_rejected():
    with pytest.raises(corpus.CorpusError, match="stride"):
        corpus.bits_per_byte(Bigram(257), ByteEncoder(), ["abc"], context=4, stride=4)
