"""The README states what the code does: the configuration table and the CI command."""

from __future__ import annotations

import dataclasses

from conftest import ROOT

from stt.config import Settings, markdown_table

README = (ROOT / "README.md").read_text()


def test_readme_configuration_table_is_current() -> None:
    assert markdown_table() in README, "run script/config-table"
    for f in dataclasses.fields(Settings):
        assert f"`{f.metadata['env']}`" in README


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "script/setup && script/test" in README
    assert "script/setup\nscript/test" in ci
