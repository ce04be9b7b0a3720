"""What every area of the settings is made of: a field with its environment variable, help
text and allowed values (:func:`setting`), the error a bad value raises (:class:`ConfigError`),
and :class:`Area`, the base of the per-area dataclasses, which checks its own values."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A setting has a bad value. ``variable`` names the environment variable; the message
    names its command-line flag too (``STT_CHUNK_TIMEOUT (--chunk-timeout-s): ...``), whichever
    of the two the value came from."""

    def __init__(self, variable: str, message: str) -> None:
        flag = flag_of(variable)
        super().__init__(f"{variable} ({flag}): {message}" if flag else f"{variable}: {message}")
        self.variable = variable
        self.flag = flag


AREAS: list[type[Area]] = []  # every area, in the order Settings lists them (registered below)


def flag_of(variable: str) -> str | None:
    """The ``--flag`` of the setting read from environment variable ``variable``, if any."""
    for area in AREAS:
        for f in dataclasses.fields(area):  # type: ignore[arg-type]
            if f.metadata["env"] == variable:
                return flag(f.name)
    return None


def setting(default: Any, env: str, help: str, *, choices: tuple[str, ...] | None = None,
            secret: bool = False) -> Any:
    """One setting: its default, environment variable, help (the configuration tables and
    ``--help`` are generated from it), allowed values and whether it is a secret (masked in
    logs). The flag is the field's name: ``--chunk-timeout-s``."""
    return field(default=default, metadata={"env": env, "help": help, "choices": choices,
                                            "secret": secret})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Area:
    """A frozen dataclass of related settings that checks its own values (:meth:`check`,
    called by :meth:`validate` after the allowed values of every field)."""

    area: ClassVar[str]  # its attribute on Settings: settings.nats, settings.cluster, ...
    help_group: ClassVar[str]  # its section of ``--help`` (areas may share one)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        AREAS.append(cls)

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            choices = f.metadata["choices"]
            self.need(choices is None or getattr(self, f.name) in choices, f.name,
                      f"must be one of {', '.join(choices or ())}")
        self.check(self.need)

    def check(self, need: Callable[[bool, str, str], None]) -> None:
        """The area's own rules: ``need(condition, field name, message)``."""

    @classmethod
    def need(cls, cond: bool, name: str, message: str) -> None:
        if not cond:
            env = next(f.metadata["env"] for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                       if f.name == name)
            raise ConfigError(env, message)


def convert(raw: Any, hint: Any, source: str) -> Any:
    """A value from the environment or a flag (text) as the field's type."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    text = str(raw).strip()
    try:
        if hint is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("expected true/false")
        if hint is int:
            return int(text.replace("_", ""))
        if hint is float:
            return float(text)
        return text
    except ValueError as exc:
        raise ConfigError(source, f"bad value {text!r}: {exc}") from None
