"""Spec-Bench for code (Xia et al. 2024, §8; Spec-Bench's Table 5): prompt categories built from held-out standard
library files only (prompts.is_heldout: 5% of files by a hash of their path, never trained on). Spec-Bench's finding
is that the best method depends on the task: retrieval drafters win where the output copies the input, model
drafters on free generation. Each category takes at most one prompt per file, files in path order.

  completion   inside a function body: the 256 tokens before the end of its first body line (bench.py's prompts)
  body         a signature and its docstring, up to the end of the docstring: the model writes the body
  repetitive   a run of similar lines (3+ consecutive lines with the same first 12 characters, as in tests and
               tables), cut after its third line: the output continues the pattern
  retrieval    a whole function, then a blank line and the same function's signature again: the answer copies
  prose        inside a docstring or comment block, cut after its first line of text
  scratch      a short prompt from nothing: one `def name(` line, under 16 tokens
"""

import re

from prompts import is_heldout, stdlib_files

CATEGORIES = ("completion", "body", "repetitive", "retrieval", "prose", "scratch")
DEF = re.compile(r"^(\s*)def \w+\(.*\):\s*$")


def functions(lines: list[str]) -> list[tuple[int, int]]:
    """(first line, end line) of each one-line `def`, the end being the first later line indented no deeper."""
    out = []
    for i, line in enumerate(lines):
        m = DEF.match(line)
        if not m:
            continue
        indent, end = len(m.group(1)), i + 1
        while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
            end += 1
        out.append((i, end))
    return out


def cut(text: str, lines: list[str], category: str) -> str | None:
    """The text before the cut of `category` in this file, or None if the file has no such place."""
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    for start, end in functions(lines):
        body = lines[start + 1] if start + 1 < len(lines) else ""
        if category == "completion" and body.strip():
            return text[: offsets[start + 2]]
        if category == "body" and body.strip().startswith('"""'):
            closing = next(
                (
                    j
                    for j in range(start + 1, end)
                    if lines[j].rstrip().endswith('"""') and (j > start + 1 or body.strip().count('"""') == 2)
                ),
                None,
            )
            if closing is not None and closing + 1 < end:
                return text[: offsets[closing + 1]]
        if (
            category == "prose"
            and body.strip().startswith('"""')
            and len(body.strip()) > 12
            and body.strip().count('"""') == 1
        ):
            return text[: offsets[start + 2]]
        if category == "retrieval" and 8 <= end - start <= 40:
            return text[offsets[start] : offsets[end]] + "\n" + lines[start]
        if category == "scratch":
            return lines[start].lstrip()
    if category == "repetitive":
        for i in range(len(lines) - 3):
            heads = {line.strip()[:12] for line in lines[i : i + 3]}
            if len(heads) == 1 and len(lines[i].strip()) >= 12 and not lines[i].lstrip().startswith("#"):
                return text[: offsets[i + 3]]
    return None


def suite_prompts(enc, n: int, context_tokens: int = 256) -> dict[str, list[list[int]]]:
    """Up to n prompts per category, from held-out files only, each at most `context_tokens` long."""
    prompts = {c: [] for c in CATEGORIES}
    for rel, path in stdlib_files():
        if not is_heldout(rel):
            continue
        text = f"# file: {rel}\n" + path.read_bytes().decode("utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        for category in CATEGORIES:
            if len(prompts[category]) == n:
                continue
            found = cut(text, lines, category)
            if found is None:
                continue
            ids = enc.encode_ordinary(found)
            if category == "scratch" and len(ids) >= 16 or category != "scratch" and len(ids) < 32:
                continue
            prompts[category].append(ids[-context_tokens:])
    return prompts
