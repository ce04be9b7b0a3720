"""The settings' other faces, generated from their fields: ``--flags`` (``stt worker --help``),
the README's configuration table, and the start-up log's summary of what differs from the
defaults."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from stt.config.base import flag
from stt.config.settings import FIELDS, Settings, area_types


def add_arguments(parser: argparse.ArgumentParser, groups: tuple[str, ...] | None = None) -> None:
    """One ``--flag`` per setting (``--chunk-timeout-s`` for ``chunk_timeout_s``).

    Flags default to ``None`` so that an unset flag leaves the environment's value alone.
    """
    hints: dict[str, Any] = {}
    for area in area_types():
        hints.update(typing.get_type_hints(area))
    sections: dict[str, Any] = {}  # group name -> what parser.add_argument_group returned
    for area in area_types():
        group = area.help_group
        if groups is not None and group not in groups:
            continue
        section = sections.get(group) or parser.add_argument_group(f"{group} settings")
        sections[group] = section
        for f in dataclasses.fields(area):  # type: ignore[arg-type]
            help_text = f"{f.metadata['help']} [env {f.metadata['env']}, default {f.default!r}]"
            if hints[f.name] is bool:
                section.add_argument(flag(f.name), dest=f.name, default=None,
                                     action=argparse.BooleanOptionalAction, help=help_text)
            else:
                section.add_argument(flag(f.name), dest=f.name, default=None,
                                     metavar=f.metadata["env"], choices=f.metadata["choices"],
                                     help=help_text)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}


def markdown_table() -> str:
    """The configuration tables of docs/configuration.md, one per area."""
    out: list[str] = []
    for area in area_types():
        out += [f"### `settings.{area.area}` ({area.__module__.replace('.', '/')}.py)", "",
                "| variable | flag | default | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(area):  # type: ignore[arg-type]
            default = f.default if f.default != "" else "(empty)"
            out.append(f"| `{f.metadata['env']}` | `{flag(f.name)}` | `{default}` | "
                       f"{f.metadata['help']} |")
        out.append("")
    return "\n".join(out).rstrip("\n")


def settings_summary(settings: Settings) -> dict[str, Any]:
    """For the start-up log line: the settings that differ from the defaults (secrets masked),
    plus the engine, which every reader of the log wants to see; not all 90 settings."""
    changed = {k: v for k, v in settings.redacted().items() if v != FIELDS[k][1].default}
    return {"engine": settings.transcription.engine, **changed}
