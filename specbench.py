"""Spec-Bench's questions (Xia et al. 2024, survey §8 and Appendix C), read from the file a user names.

Spec-Bench publishes them as data/spec_bench/question.jsonl in github.com/hemingkx/Spec-Bench: 480 rows, one JSON
object each with `question_id`, `category` and `turns` (the user turns). Its six subtasks: MT-bench's 80
two-turn questions (8 categories of 10), then 80 each of translation (WMT14 DE-EN), summarization (CNN/DM),
question answering (Natural Questions), mathematical reasoning (GSM8K) and retrieval-augmented generation (NQ with
retrieved passages). bench.py --specbench runs the first turns through the model's chat template, in its Table 5
layout. The file is input data: this project never copies it.
"""

import json
from pathlib import Path

SUBTASKS = {  # Spec-Bench's Table 5 column: the categories of question.jsonl it is made of
    "mt_bench": ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"),
    "translation": ("translation",),
    "summarization": ("summarization",),
    "qa": ("qa",),
    "math_reasoning": ("math_reasoning",),
    "rag": ("rag",),
}


def read_questions(path: Path) -> dict[str, list[str]]:
    """The first user turn of every question, by subtask, in file order. Raises ValueError (one line) for a file
    that is not Spec-Bench's."""
    subtask_of = {c: s for s, categories in SUBTASKS.items() for c in categories}
    out: dict[str, list[str]] = {s: [] for s in SUBTASKS}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            category, first = row["category"], row["turns"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"{path}:{n}: not a Spec-Bench question (question_id, category, turns)") from None
        if category not in subtask_of:
            raise ValueError(f"{path}:{n}: unknown category {category!r}")
        out[subtask_of[category]].append(first)
    empty = [s for s, questions in out.items() if not questions]
    if empty:
        raise ValueError(f"{path}: no questions for {', '.join(empty)}: is it Spec-Bench's question.jsonl?")
    return out


def subsample(questions: dict[str, list[str]], n: int) -> dict[str, list[str]]:
    """At most n questions per subtask, spread evenly over its rows (so MT-bench keeps its categories mixed)."""
    return {s: [q[i * len(q) // min(n, len(q))] for i in range(min(n, len(q)))] for s, q in questions.items()}
