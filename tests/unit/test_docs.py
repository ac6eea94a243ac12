"""The README and docs/ are the contract: complete, linked, and self-contained."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tracker.db.models import Base

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DECISIONS = DOCS / "decisions"
PAGES = sorted([README, *DOCS.rglob("*.md")])
RECORDS = sorted(DECISIONS.glob("[0-9][0-9][0-9][0-9]-*.md"))

LINK = re.compile(r"\]\(([^)\s]+)\)")
# What the docs must not lean on: design notes and vendor files kept outside the repository.
OUTSIDE = re.compile(r"\bSPEC\b|\.\./shared|shared/|NOTES\.md|SERVICES\.md|luma-tasks-api")


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to -."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _section(text: str, heading: str) -> str:
    return text.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]


def test_readme_is_a_front_door() -> None:
    lines = README.read_text().count("\n")
    assert lines <= 200, f"README.md has {lines} lines; move the detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if ROOT not in resolved.parents and resolved != ROOT:
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{_name(page)}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_pages_refer_to_nothing_outside_the_repository(page: Path) -> None:
    found = sorted({m.group(0) for m in OUTSIDE.finditer(page.read_text())})
    assert not found, f"{_name(page)} refers to {found}; state what is needed in docs/ instead"


def test_readme_links_every_docs_page() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(README.read_text())}
    pages = set(DOCS.glob("*.md")) | {DECISIONS / "README.md"}
    missing = sorted(_name(page) for page in pages if page.resolve() not in linked)
    assert not missing, f"README.md links no {missing}"


def test_decision_index_lists_every_record() -> None:
    index = (DECISIONS / "README.md").read_text()
    missing = [record.name for record in RECORDS if f"({record.name})" not in index]
    assert RECORDS
    assert not missing, f"docs/decisions/README.md does not list {missing}"


@pytest.mark.parametrize("record", RECORDS, ids=lambda record: record.name)
def test_decision_records_are_short_and_complete(record: Path) -> None:
    text = record.read_text()
    for heading in ("## Context", "## Decision", "## Figures", "## Consequences"):
        assert f"\n{heading}\n" in text, f"{record.name} has no {heading!r}"
    assert text.count("\n") <= 60, f"{record.name} is longer than 60 lines"


def test_readme_documents_the_history_tables_with_example_queries() -> None:
    section = _section(README.read_text(), "## History database")
    missing = sorted(name for name in Base.metadata.tables if f"`{name}`" not in section)
    assert not missing, f"README.md's History database section does not name {missing}"
    assert section.count("```sql") >= 2, "the README shows two or three example queries"


def test_database_page_documents_every_column() -> None:
    text = (DOCS / "database.md").read_text()
    problems = []
    for name, table in Base.metadata.tables.items():
        section = _section(text, f"### `{name}`")
        first_cells = re.findall(r"^\| ([^|]+) \|", section, flags=re.MULTILINE)
        documented = {c for cell in first_cells for c in re.findall(r"`(\w+)`", cell)}
        columns = {column.name for column in table.columns}
        if documented != columns:
            problems.append(f"{name}: missing {columns - documented}, extra {documented - columns}")
    assert not problems, problems
