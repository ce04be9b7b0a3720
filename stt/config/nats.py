"""How the worker reaches NATS (servers, credentials, TLS) and the subjects it uses."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from stt.config.base import Area, setting
from stt.wire.protocol import Subjects


@dataclass(frozen=True)
class NatsSettings(Area):
    area: ClassVar[str] = "nats"
    help_group: ClassVar[str] = "nats"  # its section of `stt worker --help`

    nats_url: str = setting("nats://127.0.0.1:4222", "NATS_URL",
                            "NATS server(s), comma separated.")
    nats_user: str = setting("", "NATS_USER", "NATS user name.")
    nats_password: str = setting("", "NATS_PASSWORD", "NATS password.", secret=True)
    nats_token: str = setting("", "NATS_TOKEN", "NATS token.", secret=True)
    nats_nkey_seed: str = setting("", "NATS_NKEY_SEED",
                                  "Path to an nkey seed file.")
    nats_creds: str = setting("", "NATS_CREDS", "Path to a .creds file (JWT + nkey).")
    nats_tls_ca: str = setting("", "NATS_TLS_CA", "CA bundle for the NATS server's certificate.")
    nats_tls_cert: str = setting("", "NATS_TLS_CERT", "Client certificate for NATS mTLS.")
    nats_tls_key: str = setting("", "NATS_TLS_KEY", "Client key for NATS mTLS.")
    nats_name: str = setting("stt-worker", "NATS_CLIENT_NAME", "Client name shown by the server.")
    input_subject: str = setting(Subjects.input_subject, "STT_INPUT_SUBJECT",
                                 "Subscription subject; the last token is the session id.")
    output_subject_prefix: str = setting(Subjects.output_prefix, "STT_OUTPUT_SUBJECT_PREFIX",
                                         "Transcripts go to PREFIX.{session_id}.")
    queue_group: str = setting("", "STT_QUEUE_GROUP",
                               "NATS queue group ('' = none). Only safe when each session's "
                               "messages reach one worker (see README, scaling).")

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.input_subject, self.output_subject_prefix)

    def check(self, need: Callable[[bool, str, str], None]) -> None:
        need(self.input_subject.endswith(".*") or self.input_subject.endswith(".>"),
             "input_subject", "must end with '.*' or '.>' (the last token is the session id)")
        need(bool(self.output_subject_prefix) and not self.output_subject_prefix.endswith("."),
             "output_subject_prefix", "must be a subject prefix without a trailing dot")
        for name in ("nats_creds", "nats_nkey_seed", "nats_tls_ca", "nats_tls_cert", "nats_tls_key"):
            path = getattr(self, name)
            need(not path or os.path.isfile(path), name, f"file not found: {path}")
