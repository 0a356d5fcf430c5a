"""specbench.py reads Spec-Bench's question file into its six subtasks and subsamples them evenly; bench.py's
rows keep their method when a table runs them again at another temperature."""

import json
from pathlib import Path

import pytest

from bench import Method
from specbench import SUBTASKS, read_questions, subsample

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "specbench" / "question.jsonl"


def write_questions(path: Path, per_category: int = 2) -> Path:
    rows = [
        {"question_id": i, "category": c, "turns": [f"{c} {i}?", "and then?"]}
        for c in (c for cs in SUBTASKS.values() for c in cs)
        for i in range(per_category)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_questions_fall_into_the_six_subtasks_with_their_first_turns(tmp_path):
    questions = read_questions(write_questions(tmp_path / "q.jsonl"))
    assert list(questions) == list(SUBTASKS)
    assert len(questions["mt_bench"]) == 16 and questions["mt_bench"][:2] == ["writing 0?", "writing 1?"]
    assert questions["rag"] == ["rag 0?", "rag 1?"]


@pytest.mark.skipif(not SHARED.is_file(), reason="Spec-Bench's question file is not beside this checkout")
def test_spec_benchs_own_file_has_80_questions_per_subtask():
    assert {s: len(q) for s, q in read_questions(SHARED).items()} == {s: 80 for s in SUBTASKS}


def test_subsampling_spreads_over_mt_benchs_categories(tmp_path):
    questions = subsample(read_questions(write_questions(tmp_path / "q.jsonl", per_category=10)), 8)
    assert [q.split()[0] for q in questions["mt_bench"]] == list(SUBTASKS["mt_bench"])  # one of each category
    assert all(len(q) == 8 for q in questions.values())
    assert subsample({"qa": ["a", "b"]}, 5) == {"qa": ["a", "b"]}  # fewer than asked: all of them


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json\n", "not a Spec-Bench question"),
        ('{"question_id": 1, "category": "poetry", "turns": ["x"]}\n', "unknown category 'poetry'"),
        ('{"question_id": 1, "category": "qa", "turns": ["x"]}\n', "no questions for mt_bench"),
    ],
)
def test_a_file_that_is_not_spec_benchs_is_one_line(tmp_path, text, message):
    (tmp_path / "q.jsonl").write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        read_questions(tmp_path / "q.jsonl")
    assert "\n" not in str(e.value)


def test_a_row_run_again_keeps_its_method_and_drops_its_measurements():
    row = Method("PLD", object(), use_tree=True, temperature=0.0, budget=3, tokens=12, seconds=1.5)
    again = row.again(temperature=1.0)
    assert (again.name, again.drafter, again.use_tree, again.budget) == (row.name, row.drafter, True, 3)
    assert again.temperature == 1.0 and again.tokens == 0 and again.seconds == 0.0
