"""The documentation states what the code does: the configuration table (docs/), the CI
command (README), links that lead somewhere."""

from __future__ import annotations

import re

from conftest import ROOT

from stt.config import all_fields, markdown_table

README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()


def test_the_configuration_table_is_current() -> None:
    assert markdown_table() in CONFIGURATION, "run script/config-table"
    for f in all_fields():
        assert f"`{f.metadata['env']}`" in CONFIGURATION


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_leads_to_a_file_and_a_heading() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), (page.name, target)
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", file.read_text(), flags=re.M)
                assert anchor in {slug(h) for h in headings}, (page.name, target)


def test_the_readme_is_a_front_door() -> None:
    assert len(README.splitlines()) <= 160
    for doc in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{doc.name})" in README, doc.name


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "script/setup && script/test" in README
    assert "script/setup\nscript/test" in ci
