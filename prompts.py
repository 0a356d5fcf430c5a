"""The benchmark prompts: real code completions, a few hundred tokens of a held-out standard-library file (5% of
the files, chosen by a hash of their path, never trained on), cut just inside a function body, as an editor would
send them. bench.py, suite.py and the tests measure on held-out ones; train.py's DISCO stage learns on training
ones. This module reads files and tokenizes; it imports nothing of the project.
"""

import hashlib
import sysconfig
from pathlib import Path


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative path, file) for every .py file of this interpreter's standard library, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    return sorted((p.relative_to(root).as_posix(), p) for p in files)


def is_heldout(rel_path: str) -> bool:
    """A deterministic 5% of files, chosen by a hash of their path, for validation and benchmark prompts."""
    return int(hashlib.md5(rel_path.encode()).hexdigest(), 16) % 20 == 0


def function_prompts(enc, n: int, context_tokens: int = 384, heldout: bool = True) -> list[list[int]]:
    """Up to n code-completion prompts, one per file of the held-out (or training) split in path order: the
    `context_tokens` tokens before the end of the first body line of the first function that has that much context
    before it, as an editor would send them. bench.py measures on held-out ones; train.py disco learns on training
    ones."""
    prompts = []
    for rel, path in stdlib_files():
        if is_heldout(rel) != heldout or len(prompts) == n:
            continue
        prompt = completion_prompt(
            enc, f"# file: {rel}\n" + path.read_bytes().decode("utf-8", errors="replace"), context_tokens
        )
        prompts += [prompt] if prompt else []
    return prompts


def completion_prompt(enc, text: str, context_tokens: int) -> list[int] | None:
    """The `context_tokens` tokens before the end of the first body line of the first function of `text` that has
    that much context before it (None if none has)."""
    lines, offset = text.splitlines(keepends=True), 0
    for line, body in zip(lines, lines[1:]):
        offset += len(line)
        if line.lstrip().startswith("def ") and line.rstrip().endswith(":") and body.strip():
            ids = enc.encode_ordinary(text[: offset + len(body)])
            if len(ids) >= context_tokens:
                return ids[-context_tokens:]
    return None
