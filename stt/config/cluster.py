"""Scale-out: the partitions replicas share, their leases and hand-over, and the durable
mode's stream (docs/operations.md, "Many replicas")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from stt.config.base import Area, setting


def _token_ok(token: str) -> bool:
    return bool(token) and all(c.isalnum() or c in "-_" for c in token)


@dataclass(frozen=True)
class ClusterSettings(Area):
    area: ClassVar[str] = "cluster"
    help_group: ClassVar[str] = "worker"  # its section of `stt worker --help`

    partitions: int = setting(0, "STT_PARTITIONS",
                              "Partitions of the input subject that replicas share (0 = one "
                              "worker takes every session). Must equal N in the server's "
                              "mapping partition(N,1) (k8s/nats/nats-server.conf: 32).")
    partition_subject: str = setting("stt.in", "STT_PARTITION_SUBJECT",
                                     "Where the server's mapping sends session messages: "
                                     "PREFIX.{partition}.{session_id}.")
    cluster_bucket: str = setting("stt", "STT_CLUSTER_BUCKET",
                                  "Prefix of the JetStream key-value buckets for partition "
                                  "leases (PREFIX-leases) and session formats (PREFIX-sessions).")
    lease_ttl_s: float = setting(2.0, "STT_LEASE_TTL_S",
                                 "A partition's lease lapses this long after its replica stops "
                                 "renewing it (a crash); another replica then takes it over.")
    handover_wait_s: float = setting(3.0, "STT_HANDOVER_WAIT_S",
                                     "A partition handed to another replica (SIGTERM, "
                                     "rebalancing) waits up to this long for its sessions to "
                                     "be between utterances; one still speaking then is handed "
                                     "when that utterance ends.")
    durable: bool = setting(False, "STT_DURABLE",
                            "With STT_PARTITIONS: the session audio rides a JetStream stream "
                            "(PREFIX-audio from STT_CLUSTER_BUCKET), acknowledged once the words "
                            "it holds are published, so a replica killed mid-utterance loses no "
                            "words: the next owner replays what was not acknowledged. Costs "
                            "server CPU and disk (docs/operations.md, durable mode).")
    durable_max_age_s: float = setting(60.0, "STT_DURABLE_MAX_AGE_S",
                                       "Audio older than this leaves the durable stream "
                                       "(STT_DURABLE), acknowledged or not.")
    durable_max_bytes: int = setting(256 << 20, "STT_DURABLE_MAX_BYTES",
                                     "Size limit of the durable stream (STT_DURABLE); the oldest "
                                     "audio goes first. A live session stores about 45 kB/s of "
                                     "seed chunks: size it for sessions x 45 kB x max age.")
    durable_storage: str = setting("file", "STT_DURABLE_STORAGE",
                                   "Where the server keeps the durable stream: file (survives a "
                                   "server restart) or memory (less server CPU).",
                                   choices=("file", "memory"))

    def check(self, need: Callable[[bool, str, str], None]) -> None:
        need(0 <= self.partitions <= 1024, "partitions", "must be between 0 and 1024")
        need(0.5 <= self.lease_ttl_s <= 60, "lease_ttl_s", "must be between 0.5 and 60 s")
        need(0 <= self.handover_wait_s <= 60, "handover_wait_s", "must be between 0 and 60 s")
        need(not (self.durable and not self.partitions), "durable",
             "needs STT_PARTITIONS: the stream's consumers are the partitions")
        need(10 <= self.durable_max_age_s <= 86_400, "durable_max_age_s",
             "must be between 10 s and a day")
        need(self.durable_max_bytes >= 1 << 20, "durable_max_bytes", "must be at least 1 MiB")
        need(_token_ok(self.cluster_bucket), "cluster_bucket",
             "letters, digits, '-' and '_' only")
        need(all(_token_ok(t) for t in self.partition_subject.split(".")), "partition_subject",
             "a subject prefix of plain tokens (no wildcards, no trailing dot)")
