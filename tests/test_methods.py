"""The table of methods (methods.py) and the command line built from it (cli.py): every entry is complete, every
flag it names exists, a flag of one method is refused with any other, and the CLI's help lists every method."""

import re

import pytest

import cli
from methods import DRAFT_LENGTHS, DRAFTERS, RENAMED, VERIFIERS, UsageError, default_length, rule_misfits

TABLES = {"-d": DRAFTERS, "-v": VERIFIERS, "-l": DRAFT_LENGTHS}
ENTRIES = [(flag, e) for flag, table in TABLES.items() for e in table.values()]
OPTIONS = sorted({dest for _, e in ENTRIES for dest in e.options})


def another_value(default):
    """A value the flag's default is not."""
    return not default if isinstance(default, bool) else (0.25 if default != 0.25 else 0.75)


def parser_dests() -> set[str]:
    _, ap = cli.parse_args(["-p", "x"])
    return {a.dest for a in ap._actions}


@pytest.mark.parametrize("flag, entry", ENTRIES, ids=[f"{f} {e.name}" for f, e in ENTRIES])
def test_each_entry_is_complete(flag, entry):
    assert entry.summary and entry.build is not None
    assert entry.shape in ("chain", "tree", "both")
    assert set(entry.options) <= parser_dests()  # every flag it reads is declared in cli.py
    if entry.weights or entry.data:
        assert entry.make.startswith("python train.py")  # a missing file says how to make it
    if flag != "-l" and entry.name != "none":
        assert "§" in entry.summary  # drafters and rules cite their survey section
    if entry.name not in ("none", "exact", "heuristic"):
        assert re.search(r"(19|20)\d\d", entry.summary)  # ... and their paper


def test_the_tables_agree_with_each_other():
    assert all(e.length in DRAFT_LENGTHS for e in DRAFTERS.values())  # a drafter's default policy exists
    assert all(new in DRAFTERS and old not in DRAFTERS for old, new in RENAMED.items())
    assert all(e.bench for e in DRAFTERS.values())  # every drafter has a bench.py row
    families = {e.family for name, e in DRAFTERS.items() if name != "none"}
    assert "" not in families and all(re.search(r"\(§5\.[12]\)$", f) for f in families)  # the pictures' colours


@pytest.mark.parametrize("dest", OPTIONS)
def test_a_method_flag_is_refused_with_a_method_that_does_not_read_it(dest):
    args, ap = cli.parse_args(["-p", "x", "-d", "none"])
    setattr(args, dest, another_value(ap.get_default(dest)))
    with pytest.raises(UsageError, match=f"--{dest.replace('_', '-')} is an option of "):
        cli.refuse_foreign_options(args, ap, [DRAFTERS["none"], VERIFIERS["exact"], DRAFT_LENGTHS["fixed"]])


@pytest.mark.parametrize("dest", OPTIONS)
def test_a_method_flag_is_accepted_with_a_method_that_reads_it(dest):
    args, ap = cli.parse_args(["-p", "x"])
    setattr(args, dest, another_value(ap.get_default(dest)))
    owners = [e for _, e in ENTRIES if dest in e.options]
    cli.refuse_foreign_options(args, ap, owners[:1])


def test_help_lists_every_method_with_its_summary(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at spaces and after hyphens
    for _, e in ENTRIES:
        assert "".join(f"{e.name}: {e.summary}".split()) in help_text


def test_an_old_drafter_name_points_to_the_new_one():
    with pytest.raises(UsageError, match="-d specdec is now called -d nar"):
        cli.choose(*cli.parse_args(["-p", "x", "-d", "specdec"]))


def test_sampling_keeps_cost_sizing_only_where_the_text_cannot_depend_on_it():
    # -v exact emits a deterministic draft's seed sample whatever gamma is (verify.SampleMatch); drafts of a
    # distribution, or other rules, draw other uniforms at another gamma, so they default to a fixed one
    assert default_length(DRAFTERS["pld"], use_tree=False, greedy=False) == "cost"
    assert default_length(DRAFTERS["pld"], use_tree=False, greedy=False, rule="rejection") == "fixed"
    assert default_length(DRAFTERS["draft"], use_tree=False, greedy=False) == "fixed"
    assert default_length(DRAFTERS["draft"], use_tree=False, greedy=True) == "cost"


def test_rejection_sampling_is_refused_when_greedy():
    refusals = rule_misfits(VERIFIERS["rejection"], DRAFTERS["pld"], use_tree=False, greedy=True, sampled=False)
    assert any(refused for refused, _ in refusals)
