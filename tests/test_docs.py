"""The documentation's claims that a test can check: every test docs/pitfalls.md names exists, and every
"(docs/pitfalls.md: heading)" citation in the code names one of its headings."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PITFALLS = (ROOT / "docs" / "pitfalls.md").read_text()


def test_every_test_the_pitfalls_page_names_exists():
    named = set(re.findall(r"`(tests/test_\w+\.py)::(\w+)`", PITFALLS))
    assert len(named) > 20
    for path, name in sorted(named):
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name}"


def test_every_citation_of_the_pitfalls_page_names_one_of_its_headings():
    headings = [h.lower() for h in re.findall(r"^## (.+)$", PITFALLS, re.M)]
    sources = [p for p in ROOT.glob("*.py")] + list((ROOT / "tests").glob("*.py"))
    text = " ".join(p.read_text() for p in sources if p.name != "test_docs.py")
    assert "(docs/pitfalls.md)" not in text  # a citation names its section
    cited = re.findall(r"docs/pitfalls\.md: ([^)]+)\)", text)
    assert len(cited) > 10
    for citation in cited:  # a comment may wrap a heading over two lines
        assert " ".join(re.sub(r"\s*#\s*", " ", citation).lower().split()) in headings, citation


# ------------------------------------------------------------------------------------------ the reader's pages

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "weights" / "README.md"]


def prose(text: str) -> str:
    """The Markdown outside fenced code blocks, where a link is a link."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", prose(path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first table under a `## heading`, header and rule left out."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


def test_every_relative_link_in_the_docs_resolves():
    checked = 0
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.relative_to(ROOT)}: {target}"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path), f"{page.relative_to(ROOT)}: {target}"
            checked += 1
    assert checked > 20


def test_the_file_table_lists_every_module_and_folder_and_nothing_else():
    named = {
        name
        for row in table_rows((ROOT / "README.md").read_text(), "Files")
        for name in re.findall(r"`([^`]+)`", row[0])
    }
    for name in named:
        assert (ROOT / name).exists(), f"README's file table names {name}, which does not exist"
    ignored = {line.strip("/") for line in (ROOT / ".gitignore").read_text().split() if line.endswith("/")}
    folders = {p.name + "/" for p in ROOT.iterdir() if p.is_dir() and p.name[0] not in "._" and p.name not in ignored}
    for name in sorted({p.name for p in ROOT.glob("*.py")} | folders):
        assert name in named, f"README's file table has no line for {name}"


def test_every_row_of_the_taxonomy_table_names_real_code_and_real_methods():
    import methods

    rows = table_rows((ROOT / "README.md").read_text(), "The survey's taxonomy, mapped to code")
    assert len(rows) > 50
    tables = {"-d": methods.DRAFTERS, "-v": methods.VERIFIERS, "-l": methods.DRAFT_LENGTHS}
    for _section, method, cli, where in rows:
        for flag, name in re.findall(r"(?<![\w-])(-[dvl]) (\w+)", cli):
            assert name in tables[flag], f"{method}: {flag} {name} is not in methods.py"
        for ref in re.findall(r"`(\w+)\.(\w+)`", where):
            module, attr = ref
            if attr == "py":
                assert (ROOT / f"{module}.py").exists(), f"{method}: {module}.py"
            else:
                assert hasattr(importlib.import_module(module), attr), f"{method}: {module}.{attr}"
