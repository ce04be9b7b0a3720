"""The settings object: one small dataclass per area, composed, read from the environment and
command-line flags (flags on top), every area checking its own values.

The worker reads ``settings.nats.nats_url``, ``settings.cluster.partitions``, ...; each part of
the code is given the area it needs. Flags and environment variables are flat
(``--chunk-timeout-s``, ``STT_CHUNK_TIMEOUT``): every field name is unique across areas, so
``Settings.from_env(overrides={"chunk_timeout_s": 0.5})`` and :meth:`Settings.replace` take the
flat names too.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from stt.config.base import Area, ConfigError, convert
from stt.config.cluster import ClusterSettings
from stt.config.nats import NatsSettings
from stt.config.service import OpsSettings, ServeSettings
from stt.config.session import (
    LimitSettings,
    SessionSettings,
    TurnSettings,
    segmenter_params,
    session_profile,
)
from stt.config.transcription import TranscriptionSettings
from stt.core.params import SessionProfile
from stt.core.segmenter import SegmenterParams
from stt.core.turn import TurnParams


@dataclass(frozen=True)
class Settings:
    transcription: TranscriptionSettings = field(default_factory=TranscriptionSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    nats: NatsSettings = field(default_factory=NatsSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    session: SessionSettings = field(default_factory=SessionSettings)
    turn: TurnSettings = field(default_factory=TurnSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    ops: OpsSettings = field(default_factory=OpsSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Settings:
        """Environment first, then ``overrides`` (parsed command-line flags, flat names) on
        top."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {name: environ[f.metadata["env"]]  # text: replace() parses it
                                  for name, (_, f) in FIELDS.items() if f.metadata["env"] in environ}
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls().replace(**values)

    def replace(self, **values: Any) -> Settings:
        """A copy with settings changed by their flat names (text is parsed as the environment's
        would be), checked."""
        changed: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            area, f = FIELDS[name]
            if isinstance(value, str):
                value = convert(value, typing.get_type_hints(type(getattr(self, area)))[name],
                                f.metadata["env"])
            changed.setdefault(area, {})[name] = value
        settings = dataclasses.replace(self, **{
            area: dataclasses.replace(getattr(self, area), **fields)
            for area, fields in changed.items()})
        settings.validate()
        return settings

    def areas(self) -> Iterator[Area]:
        for f in dataclasses.fields(self):
            yield getattr(self, f.name)

    def validate(self) -> None:
        for area in self.areas():
            area.validate()
        if self.cluster.partitions and self.nats.queue_group:
            raise ConfigError("STT_QUEUE_GROUP", "must be empty with STT_PARTITIONS: partitions "
                                                 "already give each session one worker")

    # --- what the sans-I/O core is built from ---------------------------------------------

    def session_profile(self, model: bool = True) -> SessionProfile:
        """What every session of this worker reads (``model``: whether the end-of-turn model
        can be asked)."""
        return session_profile(self.session, self.turn, self.limits,
                               self.transcription.language, model)

    def segmenter_params(self, endpoint_s: float | None = None) -> SegmenterParams:
        return segmenter_params(self.session, self.limits, endpoint_s)

    def turn_params(self, mode: str | None = None) -> TurnParams:
        return self.turn.params(mode, self.session.chunk_timeout_s)

    def redacted(self) -> dict[str, Any]:
        """Settings for logs, by their flat names: secrets masked."""
        out: dict[str, Any] = {}
        for area in self.areas():
            for f in dataclasses.fields(area):  # type: ignore[arg-type]
                value = getattr(area, f.name)
                out[f.name] = "***" if f.metadata["secret"] and value else value
        return out


def area_types() -> list[type[Area]]:
    """The areas in the order Settings lists them (the README's table and ``--help`` too)."""
    hints = typing.get_type_hints(Settings)
    return [hints[f.name] for f in dataclasses.fields(Settings)]


def all_fields() -> Iterator[dataclasses.Field[Any]]:
    """Every setting, area by area."""
    for area in area_types():
        yield from dataclasses.fields(area)  # type: ignore[arg-type]


FIELDS: dict[str, tuple[str, dataclasses.Field[Any]]] = {  # flat name -> (area, field)
    f.name: (area.area, f)
    for area in area_types() for f in dataclasses.fields(area)}  # type: ignore[arg-type]
