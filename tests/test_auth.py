"""The NATS authentication matrix against real nats-server processes.

user/password, token, nkey, creds (operator mode: operator, account and user JWTs made here with
the ``nkeys`` package), TLS and mTLS (a CA, server and client certificates made here with
``cryptography``). For each: :func:`stt.transport.connection.connect`, ``stt tail`` and ``stt stream``
(real processes, configured only by the documented variables) connect with the right
credentials, and with wrong ones fail within seconds with one line that names the variable to
fix, and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import ROOT, SAMPLE

from stt.config import Settings
from stt.config.nats import NatsSettings
from stt.transport.connection import (
    FATAL_TRIES,
    ConnectionFatal,
    NatsUnreachable,
    connect,
    subscribed,
)
from stt.transport.nats_server import NatsServer, free_port

nkeys = pytest.importorskip("nkeys")
x509 = pytest.importorskip("cryptography.x509")

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

# --- credentials made at test time -----------------------------------------------------------


def _key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(key: Any, cn: str, issuer: tuple[Any, str] | None = None, *, ca: bool = False,
          server: bool = False) -> Any:
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_key, issuer_cn = issuer or (key, cn)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(path: Path, obj: Any) -> str:
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(obj.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(path)


def _nkey(prefix: int) -> tuple[bytes, str]:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return bytes(seed), nkeys.from_seed(bytearray(seed)).public_key.decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(signer_seed: bytes, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS v2 JWT (what ``nsc`` writes): ed25519-nkey signed by the issuer's seed."""
    signer = nkeys.from_seed(bytearray(signer_seed))
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": signer.public_key.decode(),
                              "name": name, "sub": subject, "nats": {**nats, "version": 2}}
    claims["jti"] = base64.b32encode(hashlib.sha256(
        json.dumps(claims, sort_keys=True).encode()).digest()).decode().rstrip("=")
    body = (_b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode()) + "."
            + _b64(json.dumps(claims).encode()))
    return body + "." + _b64(signer.sign(body.encode()))


def _creds(user_jwt: str, user_seed: bytes) -> str:
    return (f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n"
            "------END USER NKEY SEED------\n")


UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
             "wildcards": True, "conn": -1, "leaf": -1}


@dataclass
class Case:
    name: str
    server_args: list[str]
    good: dict[str, str]           # environment variables that connect
    bad: dict[str, str]            # ... that the server refuses
    variable: str                  # what the refusal must name
    scheme: str = "nats"
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    d = tmp_path_factory.mktemp("auth")
    out: dict[str, Case] = {}
    out["user-password"] = Case("user-password", ["--user", "ann", "--pass", "s3cret"],
                                {"NATS_USER": "ann", "NATS_PASSWORD": "s3cret"},
                                {"NATS_USER": "ann", "NATS_PASSWORD": "wrong"}, "NATS_PASSWORD")
    out["token"] = Case("token", ["--auth", "t0ken"], {"NATS_TOKEN": "t0ken"},
                        {"NATS_TOKEN": "nope"}, "NATS_TOKEN")

    seed, public = _nkey(nkeys.PREFIX_BYTE_USER)
    stranger, _ = _nkey(nkeys.PREFIX_BYTE_USER)
    (d / "user.nk").write_bytes(seed)
    (d / "stranger.nk").write_bytes(stranger)
    (d / "nkey.conf").write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    out["nkey"] = Case("nkey", ["-c", str(d / "nkey.conf")],
                       {"NATS_NKEY_SEED": str(d / "user.nk")},
                       {"NATS_NKEY_SEED": str(d / "stranger.nk")}, "NATS_NKEY_SEED")

    op_seed, op_pub = _nkey(nkeys.PREFIX_BYTE_OPERATOR)
    acc_seed, acc_pub = _nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    rogue_seed, _ = _nkey(nkeys.PREFIX_BYTE_ACCOUNT)  # an account the server does not trust
    user_seed, user_pub = _nkey(nkeys.PREFIX_BYTE_USER)
    operator = _jwt(op_seed, op_pub, "op", {"type": "operator"})
    account = _jwt(op_seed, acc_pub, "acc", {"type": "account", "limits": UNLIMITED})
    user = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
    (d / "user.creds").write_text(_creds(_jwt(acc_seed, user_pub, "u", user), user_seed))
    (d / "rogue.creds").write_text(_creds(_jwt(rogue_seed, user_pub, "u", user), user_seed))
    (d / "operator.conf").write_text(
        f'operator: "{operator}"\nresolver: MEMORY\n'
        f'resolver_preload: {{ {acc_pub}: "{account}" }}\n')
    out["creds"] = Case("creds", ["-c", str(d / "operator.conf")],
                        {"NATS_CREDS": str(d / "user.creds")},
                        {"NATS_CREDS": str(d / "rogue.creds")}, "NATS_CREDS")

    ca_key, other_key = _key(), _key()
    ca = _pem(d / "ca.pem", _cert(ca_key, "stt test CA", ca=True))
    other_ca = _pem(d / "other-ca.pem", _cert(other_key, "another CA", ca=True))
    server_key = _key()
    server_cert = _pem(d / "server.pem", _cert(server_key, "localhost", (ca_key, "stt test CA"),
                                               server=True))
    server_key_path = _pem(d / "server-key.pem", server_key)
    client_key = _key()
    client_cert = _pem(d / "client.pem", _cert(client_key, "stt", (ca_key, "stt test CA")))
    client_key_path = _pem(d / "client-key.pem", client_key)
    tls = f'cert_file: "{server_cert}"\nkey_file: "{server_key_path}"\nca_file: "{ca}"\n'
    (d / "tls.conf").write_text(f"tls {{\n{tls}}}\n")
    (d / "mtls.conf").write_text(f"tls {{\n{tls}verify: true\n}}\n")
    out["tls"] = Case("tls", ["-c", str(d / "tls.conf")], {"NATS_TLS_CA": ca},
                      {"NATS_TLS_CA": other_ca}, "NATS_TLS_CA", scheme="tls")
    out["mtls"] = Case("mtls", ["-c", str(d / "mtls.conf")],
                       {"NATS_TLS_CA": ca, "NATS_TLS_CERT": client_cert,
                        "NATS_TLS_KEY": client_key_path},
                       {"NATS_TLS_CA": ca}, "NATS_TLS_CERT", scheme="tls")
    return out


CASES = ["user-password", "token", "nkey", "creds", "tls", "mtls"]


def settings_for(url: str, env: dict[str, str]) -> NatsSettings:
    return Settings.from_env(environ={"NATS_URL": url, **env}).nats


def url_of(case: Case, server: NatsServer) -> str:
    return f"{case.scheme}://127.0.0.1:{server.port}"


# --- stt.transport.connection.connect -----------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
async def test_connect_with_right_and_wrong_credentials(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    with NatsServer(extra_args=case.server_args) as server:
        url = url_of(case, server)
        nc = await connect(settings_for(url, case.good), max_tries=2)
        assert nc is not None and nc.is_connected
        got: list[bytes] = []

        async def cb(msg: Any) -> None:
            got.append(msg.data)

        await nc.subscribe("auth.check", cb=cb)
        await nc.publish("auth.check", b"hello")
        await nc.flush()
        await asyncio.sleep(0.05)
        assert got == [b"hello"]
        await nc.close()

        t0 = time.monotonic()
        with pytest.raises(ConnectionFatal) as raised:
            await connect(settings_for(url, case.bad), max_tries=0)  # 0: would retry for ever
        took = time.monotonic() - t0
        message = str(raised.value)
        assert case.variable in message and "\n" not in message, message
        assert took < 10, f"{took:.1f} s to give up"  # FATAL_TRIES tries, 0.5 s + 1 s apart


async def test_unreachable_nats_gives_up_after_max_tries_and_stop_returns_at_once() -> None:
    settings = settings_for(f"nats://127.0.0.1:{free_port()}", {})
    t0 = time.monotonic()
    with pytest.raises(NatsUnreachable, match="NATS_URL"):
        await connect(settings, max_tries=3)
    assert 1.0 <= time.monotonic() - t0 < 6  # 0.5 s + 1 s of backoff
    stop = asyncio.Event()
    task = asyncio.create_task(connect(settings, stop=stop, max_tries=0))
    await asyncio.sleep(1.2)
    assert not task.done()
    t0 = time.monotonic()
    stop.set()
    assert await asyncio.wait_for(task, 2) is None
    assert time.monotonic() - t0 < 0.5


async def test_a_server_that_starts_late_is_connected_to() -> None:
    port = free_port()
    task = asyncio.create_task(connect(settings_for(f"nats://127.0.0.1:{port}", {}),
                                       max_tries=0))
    await asyncio.sleep(1.0)
    with NatsServer(port=port):
        nc = await asyncio.wait_for(task, 10)
        assert nc is not None and nc.is_connected
        await nc.close()


async def test_bad_seed_and_creds_files_fail_at_once(tmp_path: Path) -> None:
    (tmp_path / "bad.nk").write_text("SUnotaseed\n")
    (tmp_path / "bad.creds").write_text("just some text\n")
    with NatsServer() as server:
        for env, variable in (({"NATS_NKEY_SEED": str(tmp_path / "bad.nk")}, "NATS_NKEY_SEED"),
                              ({"NATS_CREDS": str(tmp_path / "bad.creds")}, "NATS_CREDS")):
            t0 = time.monotonic()
            with pytest.raises(ConnectionFatal, match=variable):
                await connect(settings_for(server.url, env), max_tries=0)
            assert time.monotonic() - t0 < 0.5  # before any try


def test_fatal_tries_are_bounded() -> None:
    assert 1 <= FATAL_TRIES <= 5


# --- stt stream and stt tail, as a user runs them --------------------------------------------

def run_stt(*args: str, env: dict[str, str], timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "STT_"))}
    return subprocess.run([sys.executable, "-m", "stt", *args], cwd=ROOT,
                          env={**clean, "PYTHONUNBUFFERED": "1", **env},
                          capture_output=True, text=True, timeout=timeout)


async def answer_ends(url: str, env: dict[str, str]) -> Any:
    """A stand-in worker: answers each session's ``end`` with an ``end`` message."""
    nc = await connect(settings_for(url, env), max_tries=2)
    assert nc is not None

    async def cb(msg: Any) -> None:
        message = msgpack.unpackb(msg.data)
        if message.get("type") == "end":
            sid = msg.subject.rsplit(".", 1)[1]
            await nc.publish(f"ai.voice.transcription.{sid}", msgpack.packb(
                {"type": "end", "session_id": sid, "sequence": 1, "reason": "end",
                 "audio_seconds": 1.0, "segments": 0}))

    await nc.subscribe("ai.voice.stream.*", cb=cb)
    await subscribed(nc)
    return nc


@pytest.mark.parametrize("name", CASES)
async def test_stream_and_tail_take_the_worker_credentials(cases: dict[str, Case],
                                                           name: str) -> None:
    case = cases[name]
    with NatsServer(extra_args=case.server_args) as server:
        env = {"NATS_URL": url_of(case, server), **case.good}
        tail = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stt", "tail", cwd=ROOT,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("NATS_")}, **env},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert tail.stderr is not None and tail.stdout is not None
        try:
            line = (await asyncio.wait_for(tail.stderr.readline(), 30)).decode()
            assert line.startswith("listening on ai.voice.transcription.>"), line
            responder = await answer_ends(env["NATS_URL"], case.good)
            try:
                out = await asyncio.to_thread(run_stt, "stream", str(SAMPLE), "--speed", "0",
                                              "--session-id", "auth", "--timeout", "10", env=env)
            finally:
                await responder.close()
            assert out.returncode == 0, out.stderr
            assert "[auth #1] END reason=end" in out.stdout
            tailed = (await asyncio.wait_for(tail.stdout.readline(), 10)).decode()
            assert "[auth #1] END" in tailed
        finally:
            tail.terminate()
            await tail.wait()

        bad = {"NATS_URL": env["NATS_URL"], **case.bad}
        for command in (["stream", str(SAMPLE), "--speed", "0"], ["tail"]):
            t0 = time.monotonic()
            out = await asyncio.to_thread(run_stt, *command, env=bad)
            assert out.returncode != 0
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1, out.stderr
            assert lines[0].startswith(f"stt {command[0]}: ") and case.variable in lines[0]
            assert "Traceback" not in out.stderr
            assert time.monotonic() - t0 < 20


def test_stream_flags_override_the_environment(cases: dict[str, Case]) -> None:
    case = cases["token"]
    with NatsServer(extra_args=case.server_args) as server:
        out = run_stt("stream", str(SAMPLE), "--speed", "0", "--timeout", "1",
                      "--nats-url", server.url, "--nats-token", "t0ken",
                      env={"NATS_TOKEN": "wrong"})
        # connected (the flag won): no worker answers, so it waits for `end` and says so
        assert out.returncode == 1 and "is a worker running" in out.stderr, out.stderr


# --- the worker ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nkey", "user-password", "mtls"])
async def test_the_worker_with_the_documented_variables_transcribes_a_session(
        cases: dict[str, Case], name: str) -> None:
    """``stt worker`` and ``stt stream``, both real processes, both from the documented
    variables: a session of real speech comes back with words; wrong credentials stop the
    worker with one line naming the variable."""
    if name not in cases:
        pytest.skip(f"no {name} case")
    case = cases[name]
    with NatsServer(extra_args=case.server_args) as server:
        env = {"NATS_URL": url_of(case, server), **case.good, "STT_PARTIAL_INTERVAL": "0",
               "STT_LOG_FORMAT": "json"}
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "STT_"))}
        worker = subprocess.Popen([sys.executable, "-m", "stt", "worker"], cwd=ROOT,  # noqa: ASYNC220
                                  env={**clean, **env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        try:
            assert worker.stdout is not None
            lines: list[bytes] = []
            while not any(b'"listening"' in line for line in lines):
                line = await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), 120)
                assert line, b"".join(lines)
                lines.append(line)
            out = await asyncio.to_thread(run_stt, "stream", str(SAMPLE), "--speed", "0",
                                          "--print-text", "--timeout", "60", env=env,
                                          timeout=120)
        finally:
            worker.terminate()
            worker.wait(30)
        assert out.returncode == 0, out.stderr
        assert "Dashwood" in out.stdout or "dashwood" in out.stdout.lower(), out.stdout

        bad = {**clean, "NATS_URL": env["NATS_URL"], **case.bad}
        refused = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "stt", "worker"], cwd=ROOT, env=bad,
            capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1
        errors = [line for line in (refused.stdout + refused.stderr).splitlines()
                  if "cannot connect to NATS" in line]
        assert len(errors) == 1 and case.variable in errors[0], refused.stdout + refused.stderr
        assert "Traceback" not in refused.stdout + refused.stderr
