"""bench.py's arithmetic, on hand-made counts: the suite's speedups are Spec-Bench's (evaluation/speed.py), the
mean of a method's per-prompt tokens/s over the mean of the baseline's, "overall" pooling every category; --repeats
keeps each row's fastest run of the same work, which holds for every drafter of the table."""

import argparse
from pathlib import Path

import pytest
import table

import bench
from bench import Method, print_suite
from methods import DRAFTERS, make, missing_files
from specdec import decode
from suite import CATEGORIES


def row_of(name: str, printed: str) -> list[str]:
    line = next(line for line in printed.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_suite_speedups_are_ratios_of_mean_per_prompt_speeds(capsys):
    results = {}
    for i, category in enumerate(CATEGORIES):
        base, fast = Method("Autoregressive", None), Method("Fast", None)
        base.rates = [10.0, 30.0]  # mean 20 in every category
        fast.rates = [20.0, 20.0 + 40.0 * i]  # mean 20 + 20 i: speedup 1 + i
        results[category] = [base, fast]
    print_suite(results, 0.0)
    cells = row_of("Fast", capsys.readouterr().out)
    assert cells[: len(CATEGORIES)] == [f"{1 + i:.2f}x" for i in range(len(CATEGORIES))]
    pooled = sum(20 + 20 * i for i in range(len(CATEGORIES))) / len(CATEGORIES) / 20
    assert cells[len(CATEGORIES)] == f"{pooled:.2f}x"  # = the mean of the speedups here: equal prompt counts


def test_overall_weighs_each_prompt_not_each_category(capsys):
    results = {}
    for i, category in enumerate(CATEGORIES):
        base, fast = Method("Autoregressive", None), Method("Fast", None)
        base.rates = [10.0] * (1 if i else 5)  # the first category has five prompts, the others one
        fast.rates = [20.0 if i else 40.0] * len(base.rates)
        results[category] = [base, fast]
    print_suite(results, 1.0)
    cells = row_of("Fast", capsys.readouterr().out)
    overall = (5 * 40 + 20 * (len(CATEGORIES) - 1)) / (len(CATEGORIES) + 4) / 10
    assert cells[len(CATEGORIES)] == f"{overall:.2f}x"
    unweighted = (4 + 2 * (len(CATEGORIES) - 1)) / len(CATEGORIES)  # the mean of the six speedups: not it
    assert cells[len(CATEGORIES)] != f"{unweighted:.2f}x"


def test_the_markdown_heading_names_the_command_without_markdown_and_the_machine():
    args = argparse.Namespace(markdown=Path("out.md"), device="cpu", bf16=False)
    for argv in (
        ["--pipelined", "--markdown", "out.md", "--prompts", "8"],
        ["--pipelined", "--markdown=out.md", "--prompts", "8"],
    ):
        heading = bench.markdown_heading(argv, args)
        assert heading.startswith("### `python bench.py --pipelined --prompts 8`\n"), heading
        assert "fp32" in heading and "cores" in heading


def test_markdown_keeps_a_table_together_and_gives_every_other_line_its_own_paragraph():
    printed = "settings line\n\n| a | b |\n|---|---|\n| 1 | 2 |\nhistogram one\nhistogram two\n"
    assert bench.markdown_body(printed) == (
        "settings line\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nhistogram one\n\nhistogram two\n"
    )


def test_the_pictures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    base = bench.Method("Autoregressive", None, tokens=100, seconds=10.0)
    rows = [base]
    for i, family in enumerate(["retrieval (§5.1)", "heads (§5.2)"]):
        m = bench.Method(f"row {i}", None, tokens=100, seconds=5.0 + i, family=family)
        m.stats.target_calls, m.stats.produced = 40, 100
        rows.append(m)
    rows.append(bench.Method("transformers prompt lookup", None, tokens=100, seconds=7.0, peer=lambda *a: []))
    bench.plot_speedup_tau(rows, tmp_path / "tau.png", "toy rows")
    speedups = {t: {c: {"Autoregressive": 1.0, "PLD": 1.2 + t} for c in ("qa", "math")} for t in (0.0, 1.0)}
    bench.plot_categories(speedups, tmp_path / "categories.png", "toy")
    for name in ("tau.png", "categories.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_repeats_keep_each_methods_fastest_run_and_run_a_learning_drafter_once(monkeypatch):
    class Learns:
        learns_across_generations = True

    timings = {"Autoregressive": [3.0, 1.0, 2.0], "Learns": [2.0, 0.5, 0.5]}  # per prompt-run, in call order
    calls = []

    def fake_run(target, method, prompt, args, n_new, eot=None):
        if n_new == 8:  # the untimed warm-up
            return [0] * 8, None, 9.0
        calls.append(method.name)
        return [1, 2, 3, 4], None, timings[method.name].pop(0)

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "continuation_quality", lambda target, prompt, out: (0, 0.0))
    args = argparse.Namespace(repeats=3, max_new_tokens=4, quiet=True)
    base, learner = Method("Autoregressive", None), Method("Learns", Learns())
    bench.measure(None, [base, learner], [[5, 6, 7]], args)
    assert calls == ["Autoregressive", "Learns", "Autoregressive", "Autoregressive"]
    assert base.seconds == 1.0 and base.rates == [4.0]  # the fastest of three runs
    assert learner.seconds == 2.0 and learner.rates == [2.0]  # its only run, not a faster second one


def test_every_repeat_starts_from_the_draft_length_policy_the_prompt_found(monkeypatch):
    class Learning:  # a policy that learns across generations, like -l cost
        learns_across_generations = True
        generations = 0

    seen = []

    def fake_run(target, method, prompt, args, n_new, eot=None):
        if n_new == args.max_new_tokens:  # not the warm-up
            seen.append(method.length.generations)
        method.length.generations += 1
        return [1], None, 1.0

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "continuation_quality", lambda target, prompt, out: (0, 0.0))
    args = argparse.Namespace(repeats=3, max_new_tokens=4, quiet=True)
    method = Method("Learns its length", None, length=Learning())
    bench.measure(None, [method], [[5], [6]], args)
    assert seen == [1, 1, 1, 2, 2, 2]  # the warm-up is its first generation; each prompt's runs start alike
    assert method.length.generations == 3  # one generation per prompt learned from, as without repeats


def test_a_repeat_that_wrote_other_tokens_is_not_kept(monkeypatch):
    runs = iter([([1, 2, 3], 3.0), ([1, 2], 1.0), ([1, 2, 3], 2.0)])  # the second stopped early: other work

    def fake_run(target, method, prompt, args, n_new, eot=None):
        out, seconds = next(runs) if n_new == args.max_new_tokens else ([0], 1.0)
        return out, None, seconds

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "continuation_quality", lambda target, prompt, out: (0, 0.0))
    method = Method("Autoregressive", None)
    bench.measure(None, [method], [[5]], argparse.Namespace(repeats=3, max_new_tokens=3, quiet=True))
    assert method.tokens == 3 and method.seconds == 2.0


ROWS = [(n, flags) for n, e in DRAFTERS.items() if n != "none" for flags in [{}, *(f for _, f in e.variants)]]
ROWS.append(("ouroboros", {"ouroboros_warm": True}))


@pytest.mark.parametrize("name, flags", ROWS, ids=[f"{n} {f}" if f else n for n, f in ROWS])
def test_a_drafter_whose_second_run_of_a_prompt_drafts_otherwise_says_it_learns_across_generations(
    short_references, name, flags
):
    """--repeats times the same work only where a drafter's reset() forgets everything, or where the drafter says
    it does not (it then runs once): a drafter that learns and does not say so would be timed on easier runs."""
    enc, target, refs = short_references
    entry, setup = DRAFTERS[name], table.setup(target).with_opts(drafter=name, **flags)
    if missing_files(entry, setup):
        pytest.skip(missing_files(entry, setup))
    drafter, prompt = make(DRAFTERS, name, setup), refs[0][0]
    use_tree = entry.shape == "tree" or setup.opts.tree
    runs = [decode(target, drafter, use_tree, prompt, 16, 4, eot=enc.eot_token)[1] for _ in range(2)]
    first, second = [(s.drafted, s.accepted, s.accept_counts) for s in runs]
    assert first == second or bench.learns(drafter)
