"""One way to connect to NATS, for the worker and for ``stt stream`` / ``stt tail``.

:func:`nats_options` turns the settings (``NATS_URL``, ``NATS_USER``/``NATS_PASSWORD``,
``NATS_TOKEN``, ``NATS_NKEY_SEED``, ``NATS_CREDS``, ``NATS_TLS_CA``/``_CERT``/``_KEY``,
``NATS_CLIENT_NAME``) into nats-py's ``connect`` arguments; :func:`connect` connects with them:

* every try is one attempt at every server in ``NATS_URL`` (nats-py's own first-connect loop
  never ends while reconnecting is on, and never looks at a stop signal: it is turned off for
  the first connect and put back once connected);
* between tries it waits 0.5 s, doubling up to 5 s (:data:`BACKOFF_S`, :data:`BACKOFF_MAX_S`);
* a set ``stop`` event ends the wait at once, mid-try included: :func:`connect` returns None;
* a NATS that cannot be reached is tried ``max_tries`` times (0 = until ``stop``), then
  :class:`NatsUnreachable`;
* what retrying cannot fix raises :class:`ConnectionFatal`, with one line that names the
  variable to fix: a seed or creds file that is not an nkey, a missing ``nkeys`` package, a
  bad TLS file (at once, before any try); an authorization violation, a server certificate that
  does not verify or a TLS handshake the server rejects (after :data:`FATAL_TRIES` tries, in
  case the server was mid-reload: about 1.5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from nats.aio.client import Client
from nats.errors import NoServersError, StaleConnectionError

from stt.config.nats import NatsSettings

log = logging.getLogger("stt.connection")

BACKOFF_S = 0.5       # first wait between tries ...
BACKOFF_MAX_S = 5.0   # ... doubling up to this
FATAL_TRIES = 3       # tries before an authorization or certificate error is final
CONNECT_TIMEOUT_S = 3  # one server's TCP + TLS + CONNECT/PING exchange


async def subscribed(nc: Client, timeout_s: int = 10) -> None:
    """Until the server holds every subscription this connection made so far, so that a
    message published from now on, from any connection, reaches them.

    One ``flush()`` is not enough with nats-py (2.12-2.16 at least): its PING is written to the
    socket at once, while a SUB made just before waits in the pending buffer for the flusher
    task, so the PONG can come back before the server has the SUB (measured: with another
    connection publishing right after, a few of every thousand subscriptions missed the
    message, under no load). The first round trip lets the flusher write the SUB; the second
    PING goes out behind it.
    """
    await nc.flush(timeout=timeout_s)
    await nc.flush(timeout=timeout_s)


class ConnectError(Exception):
    """Connecting to NATS failed; ``str()`` is one line for a person."""

    def __init__(self, message: str, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable


class NatsUnreachable(ConnectError):
    """No server in ``NATS_URL`` answered within the tries allowed."""


class ConnectionFatal(ConnectError):
    """The server answered but refuses these settings; retrying will not help."""


def servers(settings: NatsSettings) -> list[str]:
    return [u.strip() for u in settings.nats_url.split(",") if u.strip()]


def nats_options(settings: NatsSettings) -> dict[str, Any]:
    """nats-py ``connect`` keyword arguments for these settings (no callbacks, no retry policy).

    Raises :class:`ConnectionFatal` for TLS files that cannot be loaded."""
    s = settings
    options: dict[str, Any] = {"servers": servers(s), "name": s.nats_name}
    if s.nats_user:
        options["user"], options["password"] = s.nats_user, s.nats_password
    if s.nats_token:
        options["token"] = s.nats_token
    if s.nats_nkey_seed:
        options["nkeys_seed"] = s.nats_nkey_seed
    if s.nats_creds:
        options["user_credentials"] = s.nats_creds
    if s.nats_tls_ca or s.nats_tls_cert:
        options["tls"] = _tls_context(s)
    return options


def _tls_context(s: NatsSettings) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=s.nats_tls_ca or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConnectionFatal(f"NATS_TLS_CA: cannot load {s.nats_tls_ca} as a PEM CA bundle "
                              f"({_reason(exc)})", "NATS_TLS_CA") from None
    if s.nats_tls_cert:
        try:
            ctx.load_cert_chain(s.nats_tls_cert, s.nats_tls_key or None)
        except (ssl.SSLError, OSError) as exc:
            raise ConnectionFatal(
                f"NATS_TLS_CERT/NATS_TLS_KEY: cannot load the client certificate "
                f"{s.nats_tls_cert} with key {s.nats_tls_key or '(in the same file)'} "
                f"({_reason(exc)})", "NATS_TLS_CERT") from None
    return ctx


def check_credentials(settings: NatsSettings) -> None:
    """Fail at once, naming the variable, for nkey material that no retry can fix."""
    s = settings
    if not (s.nats_nkey_seed or s.nats_creds):
        return
    variable = "NATS_CREDS" if s.nats_creds else "NATS_NKEY_SEED"
    try:
        import nkeys
    except ImportError:
        raise ConnectionFatal(f"{variable} needs the nkeys package: pip install nkeys "
                              "(a dependency of stt-streaming: reinstall it)", variable) from None
    if s.nats_nkey_seed:
        seed = _read(s.nats_nkey_seed, "NATS_NKEY_SEED").strip()
        _check_seed(nkeys, seed, "NATS_NKEY_SEED", s.nats_nkey_seed)
    if s.nats_creds:
        text = _read(s.nats_creds, "NATS_CREDS")
        blocks = _creds_blocks(text)
        if "NATS USER JWT" not in blocks or "USER NKEY SEED" not in blocks:
            raise ConnectionFatal(f"NATS_CREDS: {s.nats_creds} is not a .creds file (it needs "
                                  "a NATS USER JWT and a USER NKEY SEED block, as `nsc "
                                  "generate creds` writes)", "NATS_CREDS")
        _check_seed(nkeys, blocks["USER NKEY SEED"], "NATS_CREDS", s.nats_creds)


def _read(path: str, variable: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConnectionFatal(f"{variable}: cannot read {path} ({exc.strerror or exc})",
                              variable) from None


def _creds_blocks(text: bytes) -> dict[str, bytes]:
    """``-----BEGIN X-----`` / first line / ``------END X------`` -> {X: first line}."""
    blocks: dict[str, bytes] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip().strip(b"-").strip()
        if stripped.startswith(b"BEGIN ") and i + 1 < len(lines):
            blocks[stripped[6:].decode(errors="replace")] = lines[i + 1].strip()
    return blocks


def _check_seed(nkeys: Any, seed: bytes, variable: str, path: str) -> None:
    try:
        nkeys.from_seed(bytearray(seed)).wipe()
    except Exception as exc:  # nkeys.ErrInvalidSeed and friends, binascii errors
        raise ConnectionFatal(f"{variable}: {path} holds no valid nkey seed "
                              f"({type(exc).__name__}; a user seed starts with SU)",
                              variable) from None


def classify(exc: BaseException, settings: NatsSettings) -> ConnectionFatal | None:
    """The :class:`ConnectionFatal` for an error retrying cannot fix, else None."""
    text = f"{type(exc).__name__} {exc}".lower()
    if "authorization violation" in text or "authorizationerror" in text \
            or "authentication" in text:
        variable, hint = _auth_hint(settings)
        return ConnectionFatal(f"NATS refused the credentials ({_reason(exc)}): {hint}",
                               variable)
    if isinstance(exc, ssl.SSLCertVerificationError) or "certificate verify failed" in text:
        return ConnectionFatal(
            f"the NATS server's TLS certificate does not verify ({_reason(exc)}): set "
            f"NATS_TLS_CA to the CA that signed it", "NATS_TLS_CA")
    if isinstance(exc, ssl.SSLError) or "certificate required" in text \
            or "tls handshake" in text or "bad certificate" in text:
        return _handshake_rejected(settings, _reason(exc))
    if ("secure connection" in text and "required" in text) or "no ssl context" in text:
        return ConnectionFatal(f"the NATS server requires TLS ({_reason(exc)}): use a tls:// "
                               "URL in NATS_URL or set NATS_TLS_CA", "NATS_URL")
    if isinstance(exc, ImportError) and "nkeys" in text:
        return ConnectionFatal(f"nkey authentication needs the nkeys package ({exc}): "
                               "pip install nkeys", "NATS_NKEY_SEED")
    return None


def _handshake_rejected(s: NatsSettings, reason: str) -> ConnectionFatal:
    if s.nats_tls_cert:
        hint = "check that NATS_TLS_CERT/NATS_TLS_KEY are signed by a CA the server trusts"
    else:
        hint = "the server wants a client certificate: set NATS_TLS_CERT and NATS_TLS_KEY"
    return ConnectionFatal(f"the NATS server rejected the TLS handshake ({reason}): {hint}",
                           "NATS_TLS_CERT")


def _auth_hint(s: NatsSettings) -> tuple[str, str]:
    if s.nats_creds:
        return "NATS_CREDS", f"check NATS_CREDS ({s.nats_creds}): is its user JWT signed by an " \
                             "account the server trusts, and not expired?"
    if s.nats_nkey_seed:
        return "NATS_NKEY_SEED", (f"check NATS_NKEY_SEED ({s.nats_nkey_seed}): is its public "
                                  "key one of the server's users?")
    if s.nats_token:
        return "NATS_TOKEN", "check NATS_TOKEN"
    if s.nats_user:
        return "NATS_USER", "check NATS_USER and NATS_PASSWORD"
    if any("@" in u for u in servers(s)):
        return "NATS_URL", "check the user and password in NATS_URL"
    return "NATS_USER", ("the server requires credentials: set NATS_USER and NATS_PASSWORD, "
                         "NATS_TOKEN, NATS_NKEY_SEED or NATS_CREDS")


def _reason(exc: BaseException) -> str:
    """One line: the library's message without newlines or nats-py's quoting."""
    text = " ".join((str(exc) or type(exc).__name__).split())
    if text.startswith("nats: "):
        text = text[6:].strip("'\"")
    return text[:300]


Callback = Callable[..., Awaitable[None]]


async def connect(settings: NatsSettings, *, stop: asyncio.Event | None = None, max_tries: int = 0,
                  allow_reconnect: bool = True, **callbacks: Any) -> Client | None:
    """Connect with backoff; None if ``stop`` was set first.

    ``max_tries`` bounds the tries while no server answers (0 = until ``stop``).
    ``allow_reconnect`` and the other keyword arguments (``error_cb``, ``disconnected_cb``,
    ``reconnected_cb``, ``closed_cb``, ``max_reconnect_attempts``, ``ping_interval`` ...) apply
    once connected; ``error_cb`` is not called for the failed tries (they are logged here).
    Raises :class:`ConnectionFatal` or :class:`NatsUnreachable`.
    """
    check_credentials(settings)
    options = {"connect_timeout": CONNECT_TIMEOUT_S, **nats_options(settings), **callbacks}
    connected = False

    def gated(cb: Callback) -> Callback:
        async def call(*args: Any) -> None:
            if connected:
                await cb(*args)
        return call

    errors: list[BaseException] = []  # what each server said during the current try

    async def record(exc: Exception) -> None:
        if not connected:
            errors.append(exc)

    for name in CALLBACKS:  # the failed tries are logged here, not through the callbacks
        options[name] = gated(options[name]) if options.get(name) else gated(_ignore)
    after = {k: options.get(k, v) for k, v in (("allow_reconnect", allow_reconnect),
                                                ("max_reconnect_attempts", 60),
                                                ("reconnect_time_wait", 2))}
    # One try = each server twice at most, at once; the wait between tries is ours.
    first = {**options, "allow_reconnect": False, "max_reconnect_attempts": 1,
             "reconnect_time_wait": 0, "error_cb": _chain(record, options["error_cb"])}
    where = ", ".join(_redact(u) for u in options["servers"])
    delay = BACKOFF_S
    fatal_tries = tries = 0
    while True:
        if stop is not None and stop.is_set():
            return None
        tries += 1
        errors.clear()
        nc = Client()
        error = await _try(nc, first, stop)
        if error is None:
            if stop is not None and stop.is_set():
                await _discard(nc)
                return None
            nc.options.update(after)
            connected = True
            return nc
        await _discard(nc)
        if isinstance(error, _Stopped):
            return None
        if isinstance(error, NoServersError) and errors:
            error = errors[-1]  # why the servers failed, not that they did
        fatal = classify(error, settings) or await _probe(settings, error)
        if fatal is not None:
            fatal_tries += 1
            if fatal_tries >= FATAL_TRIES:
                raise fatal from None
            log.warning("NATS refused the connection, trying again",
                        extra={"nats": where, "error": str(fatal), "retry_s": delay,
                               "tries_left": FATAL_TRIES - fatal_tries})
        elif max_tries and tries >= max_tries:
            raise NatsUnreachable(f"cannot reach NATS at {where} ({_reason(error)}) after "
                                  f"{tries} {'try' if tries == 1 else 'tries'}: is it running? "
                                  "set NATS_URL (or --nats-url)", "NATS_URL") from None
        else:
            log.warning("cannot reach NATS, retrying",
                        extra={"nats": where, "error": _reason(error), "retry_s": delay})
        if stop is None:
            await asyncio.sleep(delay)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, BACKOFF_MAX_S)


def _chain(first: Callback, then: Callback) -> Callback:
    async def call(exc: Exception) -> None:
        await first(exc)
        await then(exc)
    return call


async def _probe(settings: NatsSettings, error: BaseException) -> ConnectionFatal | None:
    """After a connection lost in the TLS handshake: does the server ask for a client
    certificate? (A server that rejects one may just close the connection.) The server's INFO
    line, sent in plain text before TLS starts, says."""
    if not isinstance(error, (OSError, StaleConnectionError)) or \
            isinstance(error, ConnectionRefusedError):
        return None
    for url in servers(settings):
        parts = urlsplit(url if "://" in url else "nats://" + url)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 4222), 1.0)
        except (OSError, TimeoutError):
            continue
        try:
            line = await asyncio.wait_for(reader.readline(), 1.0)
        except (OSError, TimeoutError):
            line = b""
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if not line.startswith(b"INFO "):
            continue
        try:
            info = json.loads(line[5:])
        except ValueError:
            continue
        if info.get("tls_verify"):
            return _handshake_rejected(settings, "the server closed the connection in the "
                                                 "TLS handshake")
    return None


CALLBACKS = ("error_cb", "disconnected_cb", "closed_cb", "reconnected_cb",
             "discovered_server_cb", "lame_duck_mode_cb")


class _Stopped(Exception):
    pass


async def _ignore(*args: Any) -> None:
    return None


async def _try(nc: Client, options: dict[str, Any], stop: asyncio.Event | None
               ) -> BaseException | None:
    """One connect attempt (every server once); the error, or None once connected."""
    attempt = asyncio.ensure_future(nc.connect(**options))
    waiters: set[asyncio.Future[Any]] = {attempt}
    stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
    if stopped is not None:
        waiters.add(stopped)
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stopped is not None:
            stopped.cancel()
        if not attempt.done():
            attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
    if attempt.cancelled():
        return _Stopped()
    return attempt.exception()


async def _discard(nc: Client) -> None:
    # nats-py's close() after a failed TLS handshake waits for ever on the transport
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 0.5)


def _redact(url: str) -> str:
    """A server URL without the password or token in it."""
    scheme, sep, rest = url.rpartition("://")
    if "@" not in rest:
        return url
    auth, _, host = rest.rpartition("@")
    user = auth.split(":", 1)[0] if ":" in auth else "***"
    return f"{scheme}{sep}{user}:***@{host}" if ":" in auth else f"{scheme}{sep}***@{host}"
