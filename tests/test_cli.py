"""The command line, run as a user runs it (`python specdec.py ...` in a subprocess) on the shipped weights: every
drafter works, greedy speculative output equals plain decoding, sampling is reproducible, and every bad input is
one line on stderr with exit code 2, never a traceback.

Each run pays for importing torch, so all of them start at once in the `cli` fixture, two at a time."""

import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def fibonacci(n):"
SAMPLING = ["-p", PROMPT, "-n", "16", "-t", "0.8", "-k", "20", "--top-p", "0.9"]
STATS = re.compile(r"\n\n\[\d+ new tokens in [\d.]+ s")  # the first line after the streamed text

RUNS = {  # name: the arguments of `python specdec.py`
    "bare": ["--prompt", PROMPT],
    "drafter none": ["-p", PROMPT, "-n", "16", "-d", "none", "--compare"],
    "drafter draft": ["-p", PROMPT, "-n", "16", "-d", "draft", "--compare"],
    "drafter pld": ["-p", PROMPT, "-n", "16", "-d", "pld", "--compare"],
    "drafter blockwise": ["-p", PROMPT, "-n", "16", "-d", "blockwise", "--compare"],
    "drafter jacobi": ["-p", "class Stack:", "-n", "16", "-d", "jacobi", "--compare"],
    "drafter lookahead": ["-p", "class Stack:", "-n", "16", "-d", "lookahead", "--compare"],
    "drafter pass": ["-p", "class Stack:", "-n", "16", "-d", "pass", "--compare"],
    "drafter recycling": ["-p", "def parse(s):", "-n", "16", "-d", "recycling", "--compare"],
    "drafter cascade": ["-p", "def parse(s):", "-n", "16", "-d", "cascade", "--cascade-horizontal", "3", "--compare"],
    "drafter collective": ["-p", "def parse(s):", "-n", "16", "-d", "collective", "--compare"],
    "drafter earlyexit": ["-p", "def parse(s):", "-n", "16", "-d", "earlyexit", "--exit-layer", "6", "--compare"],
    "drafter quant": ["-p", "def parse(s):", "-n", "16", "-d", "quant", "--compare"],
    "draft length svip": ["-p", PROMPT, "-n", "16", "-l", "svip", "--compare"],
    "drafter nar": ["-p", "def parse(s):", "-n", "16", "-d", "nar", "--compare"],
    "lossy topk": ["-p", PROMPT, "-n", "16", "-v", "topk", "--compare"],
    "seed 1": SAMPLING + ["-s", "1"],
    "seed 1 again": SAMPLING + ["-s", "1"],
    "seed 2": SAMPLING + ["-s", "2"],
    "sampled pld": ["-p", PROMPT, "-n", "24", "-d", "pld", "-t", "1", "-s", "3", "-l", "fixed", "--compare"],
    "non-integer -n": ["-p", PROMPT, "-n", "abc"],  # rejected by argparse itself
}
BAD_INPUTS = {
    "empty prompt": ["-p", ""],
    "prompt longer than the context": ["-p", "x " * 5000],
    "unknown drafter": ["-p", PROMPT, "-d", "nope"],
    "gamma 0": ["-p", PROMPT, "--gamma", "0"],
    "negative temperature": ["-p", PROMPT, "-t", "-1"],
    "top-p above 1": ["-p", PROMPT, "--top-p", "1.5"],
    "top-p 0": ["-p", PROMPT, "--top-p", "0"],
    "negative top-k": ["-p", PROMPT, "-k", "-1"],
    "no new tokens": ["-p", PROMPT, "-n", "0"],
    "missing weights": ["-p", PROMPT, "-w", "/nonexistent"],
    "weights without a target model": ["-p", PROMPT, "-w", "{tokenizer_only}"],
    "broken target weights": ["-p", PROMPT, "-w", "{broken}"],
    "cuda without cuda": ["-p", PROMPT, "--device", "cuda"],
    "nan temperature": ["-p", PROMPT, "-t", "nan"],
    "seed out of range": ["-p", PROMPT, "-s", "99999999999999999999"],
    "temperature too small for float32": ["-p", PROMPT, "-t", "1e-40"],
    "tree wider than the vocabulary": ["-p", PROMPT, "-d", "eagle", "--tree-width", "5000"],
    "medusa tree larger than its heads allow": ["-p", PROMPT, "-d", "medusa", "--tree-size", "1000"],
    "unknown verification rule": ["-p", PROMPT, "-v", "nope"],
    "topk while sampling": ["-p", PROMPT, "-t", "0.8", "-v", "topk"],
    "lenient at temperature 0": ["-p", PROMPT, "-v", "lenient"],
    "lenience 0": ["-p", PROMPT, "-t", "0.8", "-v", "lenient", "--lenience", "0"],
    "unknown draft length": ["-p", PROMPT, "-l", "nope"],
    "dynamic depth on a chain": ["-p", PROMPT, "-l", "dynamic"],
    "svip without a draft distribution": ["-p", PROMPT, "-d", "pld", "-l", "svip"],
    "chain policy on a tree": ["-p", PROMPT, "-d", "eagle", "-l", "heuristic"],
    "lookahead n-gram of one": ["-p", PROMPT, "-d", "lookahead", "--lookahead-ngram", "1"],
    "jacobi block 0": ["-p", PROMPT, "-d", "jacobi", "--jacobi-block", "0"],
    "negative cascade horizontal": ["-p", PROMPT, "-d", "cascade", "--cascade-horizontal", "-1"],
    "cascade horizontal on another drafter": ["-p", PROMPT, "-d", "draft", "--cascade-horizontal", "2"],
    "cascade as a tree": ["-p", PROMPT, "-d", "cascade", "--tree"],
    "nar as a tree": ["-p", PROMPT, "-d", "nar", "--tree"],
    "a drafter's old name": ["-p", PROMPT, "-d", "specdec"],
    "exit layer 0": ["-p", PROMPT, "-d", "earlyexit", "--exit-layer", "0"],
    "exit layer past the last block": ["-p", PROMPT, "-d", "del", "--exit-layer", "12"],
    "early exit as a tree": ["-p", PROMPT, "-d", "earlyexit", "--tree"],
    "quant bits 3": ["-p", PROMPT, "-d", "quant", "--quant-bits", "3"],
    "exit layer on another drafter": ["-p", PROMPT, "-d", "draft", "--exit-layer", "4"],
    "quant bits on another drafter": ["-p", PROMPT, "-d", "layerskip", "--quant-bits", "4"],
    "int8 quant in bf16": ["-p", PROMPT, "-d", "quant", "--bf16"],
    "sampled siblings at temperature 0": ["-p", PROMPT, "-d", "eagle", "--sampled-siblings"],
    "verification without a drafter": ["-p", PROMPT, "-d", "none", "-v", "topk"],
    "spectr on a chain": ["-p", PROMPT, "-t", "1", "-v", "spectr"],
    "spectr on top-k siblings": ["-p", PROMPT, "-t", "1", "--tree", "-v", "spectr"],
    "contrastive without a draft distribution": ["-p", PROMPT, "-t", "1", "-d", "pld", "-v", "contrastive"],
    "contrastive with top-k": ["-p", PROMPT, "-t", "1", "-k", "20", "-v", "contrastive"],
    "missing prompt": ["-n", "3"],
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "specdec.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def run_in_terminal(*args: str) -> str:
    """stdout of `python specdec.py ARGS` when it is a terminal (so colour is on unless --no-color)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "specdec.py", *args],
        cwd=ROOT,
        stdout=follower,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    os.close(follower)
    out = b""
    while select.select([leader], [], [], 300)[0]:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child has exited and closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    return out.decode("utf-8", errors="replace")


def weights_dirs(root: Path) -> dict[str, Path]:
    """A weights dir with only the tokenizer, and one whose target/model.safetensors is garbage."""
    dirs = {"tokenizer_only": root / "tokenizer_only", "broken": root / "broken"}
    for d in dirs.values():
        d.mkdir()
        shutil.copy(ROOT / "weights" / "tokenizer.tiktoken", d)
    (dirs["broken"] / "target").mkdir()
    shutil.copy(ROOT / "weights" / "target" / "config.json", dirs["broken"] / "target")
    (dirs["broken"] / "target" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    return dirs


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict:
    """name -> CompletedProcess for every entry of RUNS and BAD_INPUTS; "terminal" and "terminal --no-color" ->
    the stdout of a run on a pseudo-terminal."""
    dirs = {k: str(v) for k, v in weights_dirs(tmp_path_factory.mktemp("weights")).items()}
    jobs = {name: (run_cli, *args) for name, args in RUNS.items()}
    jobs |= {name: (run_cli, *(a.format(**dirs) for a in args)) for name, args in BAD_INPUTS.items()}
    # -l fixed: the cost-aware default may draft nothing on a machine whose small calls are dear, and then no
    # token is green
    jobs["terminal"] = (run_in_terminal, "-p", PROMPT, "-n", "16", "-d", "pld", "-l", "fixed")
    jobs["terminal --no-color"] = (run_in_terminal, "-p", PROMPT, "-n", "16", "-d", "pld", "-l", "fixed", "--no-color")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(*job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def generated_text(stdout: str) -> str:
    """The prompt and the streamed continuation: stdout up to the statistics."""
    return STATS.split(stdout)[0]


def test_bare_command_prints_the_continuation_then_the_stats(cli):
    r = cli["bare"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(PROMPT) and len(generated_text(r.stdout)) > len(PROMPT)
    assert STATS.search(r.stdout) and "[target calls" in r.stdout and "tau" in r.stdout
    assert "mean accepted length" in r.stdout and "[acceptance by draft position" in r.stdout
    assert "Traceback" not in r.stderr


def test_compare_prints_the_cost_model_beside_the_measured_speedup(cli):
    r = cli["drafter draft"]
    assert re.search(
        r"\[cost model \(Leviathan et al\. 2023\): alpha [\d.]+, draft cost c [\d.]+, verify cost v "
        r"[\d.]+ .* predicts [\d.]+x \(measured [\d.]+x\); it would pick gamma \d+\]",
        r.stdout,
    ), r.stdout


@pytest.mark.parametrize(
    "run",
    [
        "drafter none",
        "drafter draft",
        "drafter pld",
        "drafter blockwise",
        "drafter jacobi",
        "drafter lookahead",
        "drafter pass",
        "drafter recycling",
        "drafter cascade",
        "drafter collective",
        "drafter earlyexit",
        "drafter quant",
        "draft length svip",
        "drafter nar",
    ],
)
def test_each_drafter_runs_and_matches_plain_greedy_decoding(cli, run):
    r = cli[run]
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(RUNS[run][1]) and STATS.search(r.stdout)
    assert re.search(r"speedup \d+\.\d+x; output identical to the speculative one", r.stdout), r.stdout
    assert "LOSSY" not in r.stdout


def test_a_lossy_rule_says_so_in_the_stats_footer(cli):
    r = cli["lossy topk"]
    assert r.returncode == 0, r.stderr
    assert "[verification: topk (LOSSY" in r.stdout


def test_ctrl_c_stops_quietly():
    # SIGINT back to its default in the child: a test run started in the background by a shell (`pytest &`) passes
    # SIGINT down ignored, and Python then never installs its KeyboardInterrupt handler
    proc = subprocess.Popen(
        [sys.executable, "specdec.py", "-p", PROMPT, "-n", "1000", "-d", "none"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout.read(len(PROMPT)) == PROMPT  # generating: the prompt is echoed first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and err.strip() == ""


def test_no_color_output_has_no_ansi_escapes_on_a_terminal(cli):
    assert "\x1b[32m" in cli["terminal"]  # on a terminal, accepted drafts are green ...
    assert "\x1b" not in cli["terminal --no-color"]  # ... unless --no-color


def test_sampling_is_reproducible_with_a_seed(cli):
    runs = [cli[name] for name in ("seed 1", "seed 1 again", "seed 2")]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    texts = [generated_text(r.stdout) for r in runs]
    assert texts[0] == texts[1] != texts[2]
    assert all(t.startswith(PROMPT) and len(t) > len(PROMPT) for t in texts)


def test_sampled_prompt_lookup_prints_the_autoregressive_sample_of_the_seed(cli):
    r = cli["sampled pld"]
    assert r.returncode == 0, r.stderr
    assert re.search(r"speedup \d+\.\d+x; output identical to the speculative one", r.stdout), r.stdout


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(cli, case):
    if case == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = cli[case]
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("specdec.py: error: "), r.stderr
    assert r.stdout == ""  # nothing printed before the error


def test_argparse_errors_are_one_line_with_exit_code_2_too(cli):
    r = cli["non-integer -n"]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("specdec.py: error: ")


@pytest.mark.parametrize(
    "args",
    [
        ["--prompts", "0"],
        ["-w", "/nonexistent"],
        ["-t", "-1"],
        ["-g", "0"],
        ["--batch", "0,2"],
        ["--samples", "3"],
        ["--verify", "exact,topk", "--plot", "curve.png"],  # a table --plot does not draw
        ["--suite-all", "--batch", "2"],
        ["--batch", "1", "--plot", "no/such/dir/c.png"],
        ["--batch", "1", "--plot", "curve.xyz"],
        ["--per-category", "3"],
        ["--specbench", "question.jsonl"],  # the shipped target has no chat template
        ["--drafters", "pld,nope"],
        ["--cost-curve", "--suite"],
        ["--verify", "exact,spectr", "-t", "1"],  # spectr needs --sampled-siblings
    ],
)
def test_bench_bad_input_is_one_line_on_stderr_and_exit_code_2(args):
    r = subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("bench.py: error: ")


def test_bench_plot_without_matplotlib_is_refused_before_the_run():
    """matplotlib is an optional extra: hidden here (a None entry in sys.modules makes its import fail), --plot is
    refused at once, before any model loads or anything is measured."""
    hide = (
        "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['bench.py', '--batch', '1', '--plot', "
        "'curve.png']; runpy.run_path('bench.py', run_name='__main__')"
    )
    r = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.startswith("bench.py: error: --plot needs matplotlib") and len(r.stderr.splitlines()) == 1
