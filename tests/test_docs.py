"""The documentation's claims that a test can check: every test docs/pitfalls.md names exists, and every
"(docs/pitfalls.md: heading)" citation in the code names one of its headings."""

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
