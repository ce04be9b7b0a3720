"""One typed settings object, built from the environment and command-line flags.

Long because every one of the ~90 settings is declared here once, with its variable, flag, help
and check (the README's table and ``--help`` are generated from them).

Every knob lives here once: its environment variable, its command-line flag (derived from
the field name), its unit (in the field name) and its default. ``stt worker --help`` and the
README's configuration table are generated from the same fields, so they cannot drift.

Defaults are chosen to work on a laptop; the Kubernetes manifests set the production values.
Bad values fail at start-up with a message naming the variable (:class:`ConfigError`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stt.core.params import SessionParams, SessionProfile
from stt.core.segmenter import (
    BYTES_PER_SECOND_16K,
    ONSET_WINDOW_FRAMES,
    VAD_START_WINDOW_MS,
    SegmenterParams,
)
from stt.core.turn import TurnParams
from stt.core.vad import FRAME_S
from stt.wire.protocol import ENDPOINTING, Subjects

ENGINES = ("faster-whisper", "whisper", "http")
COMPUTE_TYPES = ("auto", "int8", "int8_float16", "int8_float32", "int8_bfloat16", "float16",
                 "bfloat16", "float32")


class ConfigError(ValueError):
    """A setting has a bad value. ``variable`` names the environment variable; the message
    names its command-line flag too (``STT_CHUNK_TIMEOUT (--chunk-timeout-s): ...``), whichever
    of the two the value came from."""

    def __init__(self, variable: str, message: str) -> None:
        flag = flag_of(variable)
        super().__init__(f"{variable} ({flag}): {message}" if flag else f"{variable}: {message}")
        self.variable = variable
        self.flag = flag


def flag_of(variable: str) -> str | None:
    """The ``--flag`` of the setting read from environment variable ``variable``, if any."""
    for f in dataclasses.fields(Settings):
        if f.metadata["env"] == variable:
            return "--" + f.name.replace("_", "-")
    return None


def _token_ok(token: str) -> bool:
    return bool(token) and all(c.isalnum() or c in "-_" for c in token)


def setting(default: Any, env: str, help: str, *, choices: tuple[str, ...] | None = None,
            secret: bool = False, group: str = "worker") -> Any:
    return field(default=default, metadata={"env": env, "help": help, "choices": choices,
                                            "secret": secret, "group": group})


@dataclass(frozen=True)
class Settings:
    # --- engine ------------------------------------------------------------------------
    engine: str = setting("faster-whisper", "STT_ENGINE",
                          "Transcription engine: faster-whisper (local, CTranslate2; embedded "
                          "tiny.en by default), whisper (local openai-whisper on PyTorch: CUDA, "
                          "ROCm, CPU), http (OpenAI-compatible service), or module:Class.",
                          group="engine")
    engine_workers: int = setting(0, "STT_ENGINE_WORKERS",
                                  "http engine: requests in flight (0 = 16).",
                                  group="engine")
    language: str = setting("en", "STT_LANGUAGE",
                            "Default language when a session's start gives none ('' = detect).",
                            group="engine")
    whisper_url: str = setting("http://127.0.0.1:8000", "WHISPER_URL",
                               "Base URL of the Whisper HTTP service (http engine).", group="engine")
    whisper_path: str = setting("/v1/audio/transcriptions", "WHISPER_PATH",
                                "Path of the transcription endpoint under WHISPER_URL.",
                                group="engine")
    whisper_api_key: str = setting("", "WHISPER_API_KEY",
                                   "Bearer token for the Whisper HTTP service.", secret=True,
                                   group="engine")
    whisper_model_size: str = setting("", "WHISPER_MODEL_SIZE",
                                      "Whisper model: '' = the embedded tiny.en (offline, "
                                      "checksum verified); a name (tiny.en, base, small, "
                                      "large-v3, distil-large-v3, turbo, ...) downloaded where "
                                      "there is network; a CTranslate2 model directory; or, "
                                      "for the whisper engine, an openai-whisper checkpoint file.",
                                      group="engine")
    whisper_device: str = setting("auto", "WHISPER_DEVICE",
                                  "cuda (NVIDIA or ROCm), cpu, or auto.", choices=("auto", "cuda", "cpu"),
                                  group="engine")
    whisper_download_root: str = setting("", "WHISPER_DOWNLOAD_ROOT",
                                         "Directory for downloaded Whisper weights ('' = the "
                                         "engine's usual cache: Hugging Face's for "
                                         "faster-whisper, ~/.cache/whisper for whisper).",
                                         group="engine")
    whisper_compute_type: str = setting("auto", "WHISPER_COMPUTE_TYPE",
                                        "CTranslate2 compute type (faster-whisper): auto = int8 "
                                        "on CPU, float16 on CUDA; or int8, int8_float16, "
                                        "int8_float32, float16, bfloat16, float32.",
                                        choices=COMPUTE_TYPES, group="engine")
    engine_timeout_s: float = setting(30.0, "STT_ENGINE_TIMEOUT_S",
                                      "Longest one transcription may take before it fails.",
                                      group="engine")
    # local whisper engine
    whisper_cpu_threads: int = setting(0, "WHISPER_CPU_THREADS",
                                       "Inference threads on CPU (0 = the CPUs this process may "
                                       "use, cgroup quota included).", group="engine")
    whisper_batch_size: int = setting(8, "WHISPER_BATCH_SIZE",
                                      "Most segments (from any sessions) decoded in one model "
                                      "pass; 1 = no batching.", group="engine")
    whisper_batch_wait_ms: float = setting(5.0, "WHISPER_BATCH_WAIT_MS",
                                           "How long an idle model waits for other sessions' "
                                           "segments to join a batch.", group="engine")
    whisper_short_window: str = setting("partials", "WHISPER_SHORT_WINDOW",
                                        "Encode short segments without padding them to 30 s: "
                                        "partials (default), all, or off. Much cheaper; "
                                        "somewhat less accurate.",
                                        choices=("partials", "all", "off"), group="engine")
    whisper_final_window_s: float = setting(30.0, "WHISPER_FINAL_WINDOW_S",
                                            "Seconds of the window finals are encoded over "
                                            "(audio longer than this gets its own length, up "
                                            "to Whisper's 30 s). 20 s takes a third of 30 s's "
                                            "encoder time on CPU (push-to-talk finals 0.2 s "
                                            "sooner at p95) for +0.006-0.010 corpus WER "
                                            "(tiny.en).",
                                            group="engine")
    whisper_beam_size: int = setting(1, "WHISPER_BEAM_SIZE",
                                     "Beam search width for finals (1 = greedy; partials are "
                                     "always greedy).", group="engine")
    whisper_use_context: bool = setting(True, "WHISPER_USE_CONTEXT",
                                        "Give the session's previous final to the model as "
                                        "context for the next final (finals with different "
                                        "context cannot share a batch).", group="engine")
    whisper_no_speech_threshold: float = setting(0.6, "WHISPER_NO_SPEECH_THRESHOLD",
                                                 "Drop text whose no-speech probability is above "
                                                 "this (and whose avg log-prob is below "
                                                 "WHISPER_LOGPROB_THRESHOLD); 1 = never.",
                                                 group="engine")
    whisper_logprob_threshold: float = setting(-1.0, "WHISPER_LOGPROB_THRESHOLD",
                                               "Average token log-probability below which a "
                                               "final is decoded again at a higher temperature.",
                                               group="engine")
    whisper_compression_ratio_threshold: float = setting(
        2.4, "WHISPER_COMPRESSION_RATIO_THRESHOLD",
        "gzip compression ratio above which text counts as a repetition loop: retried at a "
        "higher temperature, then dropped (0 = off).", group="engine")
    # http engine
    whisper_http_model: str = setting("whisper-1", "WHISPER_HTTP_MODEL",
                                      "'model' field sent to the Whisper HTTP service.",
                                      group="engine")
    whisper_response_format: str = setting("verbose_json", "WHISPER_RESPONSE_FORMAT",
                                           "response_format asked of the HTTP service: "
                                           "verbose_json (segments, words), json or text.",
                                           choices=("verbose_json", "json", "text"),
                                           group="engine")
    whisper_connect_timeout_s: float = setting(3.0, "WHISPER_CONNECT_TIMEOUT_S",
                                               "Connect timeout for the Whisper HTTP service.",
                                               group="engine")
    whisper_read_timeout_s: float = setting(20.0, "WHISPER_READ_TIMEOUT_S",
                                            "Longest wait for the HTTP service's response.",
                                            group="engine")
    whisper_retries: int = setting(2, "WHISPER_RETRIES",
                                   "Retries of a final after a connection error, timeout, 5xx "
                                   "or 429 (partials are not retried).", group="engine")
    whisper_retry_backoff_s: float = setting(0.2, "WHISPER_RETRY_BACKOFF_S",
                                             "First retry delay; doubles per retry, with "
                                             "jitter (Retry-After is honoured).", group="engine")
    whisper_breaker_failures: int = setting(5, "WHISPER_BREAKER_FAILURES",
                                            "Consecutive failed requests that open the circuit "
                                            "breaker (requests then fail at once).",
                                            group="engine")
    whisper_breaker_cooldown_s: float = setting(5.0, "WHISPER_BREAKER_COOLDOWN_S",
                                                "Seconds the breaker stays open before one "
                                                "probe request may try the service again.",
                                                group="engine")
    # `stt serve`, `stt realtime`, `stt live`
    serve_host: str = setting("127.0.0.1", "STT_SERVE_HOST",
                              "Address `stt serve`, `stt realtime` and `stt live` bind.",
                              group="serve")
    serve_port: int = setting(8000, "STT_SERVE_PORT",
                              "Port `stt serve`, `stt realtime` and `stt live` listen on (`stt "
                              "live` takes a free one if it is taken).", group="serve")
    serve_max_bytes: int = setting(25 * 1024 * 1024, "STT_SERVE_MAX_BYTES",
                                   "Largest request body `stt serve` accepts (413 beyond).",
                                   group="serve")
    serve_api_key: str = setting("", "STT_SERVE_API_KEY",
                                 "If set, `stt serve` and the Realtime websocket require "
                                 "'Authorization: Bearer KEY' (a browser: the subprotocol "
                                 "'openai-insecure-api-key.KEY').",
                                 secret=True, group="serve")

    # --- NATS --------------------------------------------------------------------------
    nats_url: str = setting("nats://127.0.0.1:4222", "NATS_URL",
                            "NATS server(s), comma separated.", group="nats")
    nats_user: str = setting("", "NATS_USER", "NATS user name.", group="nats")
    nats_password: str = setting("", "NATS_PASSWORD", "NATS password.", secret=True, group="nats")
    nats_token: str = setting("", "NATS_TOKEN", "NATS token.", secret=True, group="nats")
    nats_nkey_seed: str = setting("", "NATS_NKEY_SEED",
                                  "Path to an nkey seed file.", group="nats")
    nats_creds: str = setting("", "NATS_CREDS", "Path to a .creds file (JWT + nkey).", group="nats")
    nats_tls_ca: str = setting("", "NATS_TLS_CA", "CA bundle for the NATS server's certificate.",
                               group="nats")
    nats_tls_cert: str = setting("", "NATS_TLS_CERT", "Client certificate for NATS mTLS.",
                                 group="nats")
    nats_tls_key: str = setting("", "NATS_TLS_KEY", "Client key for NATS mTLS.", group="nats")
    nats_name: str = setting("stt-worker", "NATS_CLIENT_NAME", "Client name shown by the server.",
                             group="nats")
    input_subject: str = setting(Subjects.input_subject, "STT_INPUT_SUBJECT",
                                 "Subscription subject; the last token is the session id.",
                                 group="nats")
    output_subject_prefix: str = setting(Subjects.output_prefix, "STT_OUTPUT_SUBJECT_PREFIX",
                                         "Transcripts go to PREFIX.{session_id}.", group="nats")
    queue_group: str = setting("", "STT_QUEUE_GROUP",
                               "NATS queue group ('' = none). Only safe when each session's "
                               "messages reach one worker (see README, scaling).", group="nats")

    # --- scale-out (see README, "Many replicas") -----------------------------------------
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

    # --- segmentation -------------------------------------------------------------------
    buffer_size_bytes: int = setting(480_000, "STT_BUFFER_SIZE_BYTES",
                                     "Longest segment before it is cut (at a quiet point) and "
                                     "finalized, in bytes of 16 kHz 16-bit mono audio (32000 "
                                     "per second) whatever the session's format.")
    chunk_timeout_s: float = setting(0.8, "STT_CHUNK_TIMEOUT",
                                     "Seconds of silence that end an utterance.")
    audio_gap_timeout_s: float = setting(1.0, "STT_AUDIO_GAP_TIMEOUT",
                                         "Seconds without any audio arriving that end an utterance "
                                         "in progress (push-to-talk released, client gone); the "
                                         "larger of this and STT_CHUNK_TIMEOUT applies, so network "
                                         "jitter does not cut speech.")
    endpointing: str = setting("model", "STT_ENDPOINTING",
                               "How a turn's end is found: model (the end-of-turn model on the "
                               "trailing silence, combined with the speculative final's words; "
                               "STT_TURN_* below), silence (STT_CHUNK_TIMEOUT of silence) or "
                               "adaptive (STT_ENDPOINT_MIN_S once the speculative final reads as "
                               "a finished sentence, STT_ENDPOINT_MAX_S when it does not). A "
                               "start may ask for model or silence; without the model file, "
                               "silence.", choices=ENDPOINTING)
    endpoint_min_s: float = setting(0.5, "STT_ENDPOINT_MIN_S",
                                    "Adaptive endpointing: the silence that ends a finished "
                                    "sentence.")
    endpoint_max_s: float = setting(1.2, "STT_ENDPOINT_MAX_S",
                                    "Adaptive endpointing: the silence that ends an utterance "
                                    "that reads as unfinished.")
    turn_query_s: str = setting("0.06,0.3,0.75", "STT_TURN_QUERY_S",
                                "Model endpointing: the trailing silences (seconds, ascending) "
                                "at which the end-of-turn model is asked.")
    turn_thresholds: str = setting("0.06:0.8,0.3:1.1,0.75:1.1", "STT_TURN_THRESHOLDS",
                                   "Model endpointing: silence:score pairs; from that much "
                                   "silence on, a combined score (the model's probability, plus "
                                   "STT_TURN_FINISHED_BONUS when the words end a sentence; never "
                                   "when they end on 'the', 'to', 'and', 'um' or a comma) at "
                                   "least this high ends the turn.")
    turn_finished_bonus: float = setting(0.3, "STT_TURN_FINISHED_BONUS",
                                         "Model endpointing: added to the model's probability "
                                         "when the speculative final ends like a finished "
                                         "sentence.")
    turn_eager: float = setting(0.6, "STT_TURN_EAGER",
                                "Model endpointing: the combined score that sends an "
                                "eager_end_of_turn (once per pause; turn_resumed if speech "
                                "comes back); above 1.5 = never.")
    turn_speculate_p: float = setting(0.3, "STT_TURN_SPECULATE_P",
                                      "Model endpointing: a probability at least this high "
                                      "starts the final's decode at once instead of at "
                                      "STT_SPECULATIVE_MS (a pause the model calls mid-sentence "
                                      "costs no decode).")
    turn_max_silence_s: float = setting(1.3, "STT_TURN_MAX_SILENCE_S",
                                        "Model endpointing: the silence that ends a turn "
                                        "whatever the model and the words say.")
    turn_model_path: str = setting("", "STT_TURN_MODEL_PATH",
                                   "The Smart Turn v3.2 ONNX file (empty: the copy script/setup "
                                   "installs in the environment); its SHA-256 is checked before "
                                   "loading.")
    turn_threads: int = setting(1, "STT_TURN_THREADS",
                                "Threads that run end-of-turn model queries (one query per "
                                "session at a time; queries never delay a final).")
    stall_timeout_s: float = setting(5.0, "STT_STALL_TIMEOUT_S",
                                     "Longest wait for audio that stops arriving while the last "
                                     "frames are voiced (a network stall mid-word): the "
                                     "utterance resumes with the burst that follows, and ends "
                                     "after this long without audio.")
    speculative_ms: int = setting(200, "STT_SPECULATIVE_MS",
                                  "Silence after speech at which the final's decode starts, "
                                  "before the endpoint is certain; published at the endpoint if "
                                  "no speech came back, discarded if it did (0 = off: decode at "
                                  "the endpoint).")
    enable_vad: bool = setting(True, "STT_ENABLE_VAD",
                               "Voice activity detection; off = every frame counts as speech.")
    vad_aggressiveness: int = setting(2, "STT_VAD_AGGRESSIVENESS", "webrtcvad mode, 0-3.")
    vad_start_ms: int = setting(90, "STT_VAD_START_MS",
                                f"Voiced audio within a {VAD_START_WINDOW_MS} ms window that "
                                "opens an utterance.")
    preroll_ms: int = setting(300, "STT_PREROLL_MS",
                              "Audio kept before detected speech, so first syllables survive.")
    hangover_ms: int = setting(300, "STT_HANGOVER_MS",
                               "Silence kept after speech in a finalized segment.")
    noise_gate_db: float = setting(10.0, "STT_NOISE_GATE_DB",
                                   "A voiced frame less than this far above the noise floor "
                                   "does not hold an utterance open (breath, room noise after "
                                   "the last word); 0 = off.")
    partial_interval_s: float = setting(0.5, "STT_PARTIAL_INTERVAL",
                                        "Seconds of new speech between partial transcripts "
                                        "(0 = no partials).")
    partial_window_s: float = setting(10.0, "STT_PARTIAL_WINDOW_S",
                                      "Longest utterance a partial decodes from its start; past "
                                      "it, partials decode only the audio after the stable words.")
    final_window: str = setting("full", "STT_FINAL_WINDOW",
                                "What a final decodes once partials have made words stable: full "
                                "(the whole utterance; the most accurate, may revise a stable "
                                "word), prefix (the whole utterance with the stable words forced "
                                "as its start: never revises them; local engines) or tail (only "
                                "the audio after them: cheapest, soonest, least accurate).",
                                choices=("full", "prefix", "tail"))
    enable_interrupt_detection: bool = setting(True, "STT_ENABLE_INTERRUPT_DETECTION",
                                               "Detect the user talking over the assistant while "
                                               "'responding'; off = half duplex.")
    min_pitched_ms: int = setting(90, "STT_MIN_PITCHED_MS",
                                  "Voiced audio with a pitch an utterance needs before it is "
                                  "transcribed or can interrupt: noise, clicks and door slams have "
                                  "none (0 = off).")
    interrupt_min_speech_ms: int = setting(300, "STT_INTERRUPT_MIN_SPEECH_MS",
                                           "Voiced audio needed before an interrupt fires.")

    # --- limits ---------------------------------------------------------------------------
    session_idle_timeout_s: float = setting(30.0, "STT_SESSION_IDLE_TIMEOUT",
                                            "Seconds without any message before a session is ended "
                                            "(reason idle_timeout).", group="limits")
    max_sessions: int = setting(2000, "STT_MAX_SESSIONS",
                                "Concurrent sessions per worker; more get 'overloaded'.",
                                group="limits")
    max_chunk_bytes: int = setting(256 * 1024, "STT_MAX_CHUNK_BYTES",
                                   "Largest decoded audio chunk; larger get 'too_large'.",
                                   group="limits")
    max_segment_s: float = setting(30.0, "STT_MAX_SEGMENT_SECONDS",
                                   "Hard cap on one segment sent to the engine and on one chunk's "
                                   "duration.", group="limits")
    final_retry_s: float = setting(10.0, "STT_FINAL_RETRY_S",
                                   "How long a final whose engine call failed is retried (with "
                                   "backoff) before the session gets engine_failed; partials "
                                   "are not retried.", group="limits")
    max_pending_segments: int = setting(8, "STT_MAX_PENDING_SEGMENTS",
                                        "Finals queued per session while the engine is busy; more "
                                        "are dropped with 'overloaded'.", group="limits")
    drain_timeout_s: float = setting(20.0, "STT_DRAIN_TIMEOUT_S",
                                     "On SIGTERM, longest wait for live sessions' finals.",
                                     group="limits")

    # --- operations -----------------------------------------------------------------------
    health_port: int = setting(0, "STT_HEALTH_PORT",
                               "Port for /livez, /readyz and /metrics (0 = off).", group="ops")
    health_host: str = setting("0.0.0.0", "STT_HEALTH_HOST", "Address the health port binds.",
                               group="ops")
    log_level: str = setting("INFO", "STT_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR.", group="ops")
    log_format: str = setting("text", "STT_LOG_FORMAT", "text or json.", choices=("text", "json"),
                              group="ops")
    otel_enabled: bool = setting(False, "OTEL_ENABLED",
                                 "OpenTelemetry traces and metrics over OTLP.", group="ops")
    hyperdx_enabled: bool = setting(False, "HYPERDX_ENABLED",
                                    "Send telemetry to HyperDX (needs HYPERDX_API_KEY).", group="ops")
    hyperdx_api_key: str = setting("", "HYPERDX_API_KEY", "HyperDX ingestion key.", secret=True,
                                   group="ops")

    # ------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Settings:
        """Environment first, then ``overrides`` (parsed command-line flags) on top."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            env = f.metadata["env"]
            if env in environ:
                values[f.name] = _convert(environ[env], hints[f.name], env)
        for name, value in (overrides or {}).items():
            if value is None:
                continue
            env = _FIELDS[name].metadata["env"]
            values[name] = _convert(value, hints[name], env) if isinstance(value, str) else value
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        def need(cond: bool, name: str, message: str) -> None:
            if not cond:
                raise ConfigError(_FIELDS[name].metadata["env"], message)

        for f in dataclasses.fields(self):  # the choices live in each setting's metadata
            choices = f.metadata["choices"]
            need(choices is None or getattr(self, f.name) in choices, f.name,
                 f"must be one of {', '.join(choices or ())}")
        need(self.engine in ENGINES or ":" in self.engine, "engine",
             f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)} or module:Class")
        need(self.engine_timeout_s > 0, "engine_timeout_s", "must be > 0 seconds")
        need(self.whisper_cpu_threads >= 0, "whisper_cpu_threads", "must be >= 0")
        need(1 <= self.whisper_batch_size <= 256, "whisper_batch_size",
             "must be between 1 and 256")
        need(0 <= self.whisper_batch_wait_ms <= 1000, "whisper_batch_wait_ms",
             "must be between 0 and 1000 ms")
        need(2.0 <= self.whisper_final_window_s <= 30.0, "whisper_final_window_s",
             "must be between 2 and 30 s")
        need(1 <= self.whisper_beam_size <= 16, "whisper_beam_size", "must be between 1 and 16")
        need(0 <= self.whisper_no_speech_threshold <= 1, "whisper_no_speech_threshold",
             "must be between 0 and 1")
        need(self.whisper_compression_ratio_threshold >= 0,
             "whisper_compression_ratio_threshold", "must be >= 0 (0 = off)")
        need(self.whisper_connect_timeout_s > 0, "whisper_connect_timeout_s", "must be > 0")
        need(self.whisper_read_timeout_s > 0, "whisper_read_timeout_s", "must be > 0")
        need(0 <= self.whisper_retries <= 10, "whisper_retries", "must be between 0 and 10")
        need(self.whisper_retry_backoff_s >= 0, "whisper_retry_backoff_s", "must be >= 0")
        need(self.whisper_breaker_failures >= 1, "whisper_breaker_failures", "must be >= 1")
        need(self.whisper_breaker_cooldown_s > 0, "whisper_breaker_cooldown_s", "must be > 0")
        need(self.engine != "http" or self.whisper_url.startswith(("http://", "https://")),
             "whisper_url", "must start with http:// or https://")
        need(0 < self.serve_port <= 65535, "serve_port", "must be a TCP port")
        need(self.serve_max_bytes >= 1024, "serve_max_bytes", "must be at least 1024 bytes")
        need(0 <= self.vad_aggressiveness <= 3, "vad_aggressiveness", "must be 0, 1, 2 or 3")
        need(self.chunk_timeout_s > 0, "chunk_timeout_s", "must be > 0 seconds")
        need(self.audio_gap_timeout_s > 0, "audio_gap_timeout_s", "must be > 0 seconds")
        need(self.buffer_size_bytes >= 3200, "buffer_size_bytes", "must be at least 3200 bytes")
        need(self.partial_interval_s >= 0, "partial_interval_s", "must be >= 0")
        need(0 <= self.speculative_ms <= 10_000, "speculative_ms", "must be between 0 and 10000")
        need(self.stall_timeout_s >= 0, "stall_timeout_s", "must be >= 0")
        need(self.turn_max_silence_s >= 0.1, "turn_max_silence_s", "must be at least 0.1 s")
        need(1 <= self.turn_threads <= 16, "turn_threads", "must be between 1 and 16")
        try:
            self.turn_params()
        except ValueError as exc:
            need(False, "turn_thresholds", str(exc))
        need(0.1 <= self.endpoint_min_s <= self.endpoint_max_s <= 10, "endpoint_min_s",
             "must be at least 0.1 s and at most STT_ENDPOINT_MAX_S (at most 10 s)")
        need(self.final_retry_s >= 0, "final_retry_s", "must be >= 0")
        need(self.partial_window_s >= 1.0, "partial_window_s", "must be at least 1 s")
        need(self.session_idle_timeout_s > 0, "session_idle_timeout_s", "must be > 0")
        need(self.max_sessions > 0, "max_sessions", "must be > 0")
        need(self.max_chunk_bytes > 0, "max_chunk_bytes", "must be > 0")
        need(1.0 <= self.max_segment_s <= 600, "max_segment_s", "must be between 1 and 600 s")
        need(self.max_pending_segments > 0, "max_pending_segments", "must be > 0")
        need(self.interrupt_min_speech_ms >= 30, "interrupt_min_speech_ms", "must be >= 30 ms")
        need(0 <= self.min_pitched_ms <= 1000, "min_pitched_ms", "must be between 0 and 1000 ms")
        need(0 <= self.vad_start_ms <= VAD_START_WINDOW_MS, "vad_start_ms",
             f"must be between 0 and {VAD_START_WINDOW_MS} ms")
        need(0 <= self.preroll_ms <= 2000, "preroll_ms", "must be between 0 and 2000 ms")
        need(0 <= self.hangover_ms <= 2000, "hangover_ms", "must be between 0 and 2000 ms")
        need(0 <= self.noise_gate_db <= 40, "noise_gate_db", "must be between 0 and 40 dB")
        need(0 <= self.health_port <= 65535, "health_port", "must be a TCP port or 0")
        need(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
             "must be DEBUG, INFO, WARNING or ERROR")
        need(self.input_subject.endswith(".*") or self.input_subject.endswith(".>"),
             "input_subject", "must end with '.*' or '.>' (the last token is the session id)")
        need(bool(self.output_subject_prefix) and not self.output_subject_prefix.endswith("."),
             "output_subject_prefix", "must be a subject prefix without a trailing dot")
        need(not (self.hyperdx_enabled and not self.hyperdx_api_key), "hyperdx_api_key",
             "HYPERDX_ENABLED is set but HYPERDX_API_KEY is empty")
        need(self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0")
        need(0 <= self.partitions <= 1024, "partitions", "must be between 0 and 1024")
        need(not (self.partitions and self.queue_group), "queue_group",
             "must be empty with STT_PARTITIONS: partitions already give each session one worker")
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
        for name in ("nats_creds", "nats_nkey_seed", "nats_tls_ca", "nats_tls_cert", "nats_tls_key"):
            path = getattr(self, name)
            need(not path or os.path.isfile(path), name, f"file not found: {path}")

    # --- what the sans-I/O core is built from ---------------------------------------------

    def segmenter_params(self, endpoint_s: float | None = None) -> SegmenterParams:
        """Every segmentation rule in frames. ``endpoint_s``: the longest trailing silence (the
        session's endpointing decides it: the model's or adaptive endpointing's maximum, which
        the session usually undercuts); by default STT_CHUNK_TIMEOUT."""
        endpoint = max(1, math.ceil((endpoint_s or self.chunk_timeout_s) / FRAME_S))
        # STT_BUFFER_SIZE_BYTES is bytes of 16 kHz 16-bit mono, the seed's format: the limit is a
        # length of speech that does not shrink 12x when a browser sends 48 kHz stereo float.
        longest_s = min(self.buffer_size_bytes / BYTES_PER_SECOND_16K, self.max_segment_s)
        vad = self.enable_vad
        return SegmenterParams(
            vad_enabled=vad, vad_aggressiveness=self.vad_aggressiveness,
            onset_frames=max(1, math.ceil(self.vad_start_ms / 1000 / FRAME_S)) if vad else 1,
            preroll_frames=max(ONSET_WINDOW_FRAMES, round(self.preroll_ms / 1000 / FRAME_S)),
            endpoint_frames=endpoint,
            hangover_frames=max(0, round(self.hangover_ms / 1000 / FRAME_S)),
            gate_db=self.noise_gate_db if vad else 0.0,
            max_frames=max(endpoint + 2, int(longest_s / FRAME_S)),
            pitch_frames=math.ceil(self.min_pitched_ms / 1000 / FRAME_S) if vad else 0)

    def session_params(self, mode: str) -> SessionParams:
        """A session's parameters under one endpointing mode (model, silence or adaptive)."""
        turn = self.turn_params(mode)
        speculative = (max(1, round(self.speculative_ms / 1000 / FRAME_S))
                       if self.speculative_ms > 0 else 0)
        if mode == "adaptive":
            endpoint_s = self.endpoint_max_s
        elif turn.uses_model:
            # the final's decode starts at STT_SPECULATIVE_MS, or sooner when the model says
            # the turn is probably over (Session.turn_scored)
            endpoint_s = turn.max_silence_s
        else:
            endpoint_s = self.chunk_timeout_s
        return SessionParams(
            segmenter=self.segmenter_params(endpoint_s),
            audio_gap_s=max(self.audio_gap_timeout_s, self.chunk_timeout_s),
            partial_frames=(round(self.partial_interval_s / FRAME_S)
                            if self.partial_interval_s > 0 else 0),
            partial_window_frames=round(self.partial_window_s / FRAME_S),
            interrupt_frames=max(1, math.ceil(self.interrupt_min_speech_ms / 1000 / FRAME_S)),
            speculative_frames=speculative,
            stall_s=self.stall_timeout_s,
            adaptive=mode == "adaptive",
            endpoint_fixed_frames=max(1, math.ceil(self.chunk_timeout_s / FRAME_S)),
            endpoint_min_frames=max(1, math.ceil(self.endpoint_min_s / FRAME_S)),
            turn=turn)

    def session_profile(self, model: bool = True) -> SessionProfile:
        """What every session of this worker reads. ``model``: whether the end-of-turn model
        can be asked (without it, a session that asks for model endpointing gets silence)."""
        params = {mode: self.session_params(mode if mode != "model" or model else "silence")
                  for mode in ENDPOINTING}
        return SessionProfile(
            params=params, endpointing=self.endpointing, idle_timeout_s=self.session_idle_timeout_s,
            language=self.language or None, max_chunk_bytes=self.max_chunk_bytes,
            max_segment_s=self.max_segment_s, interrupts=self.enable_interrupt_detection,
            final_window=self.final_window, max_pending_segments=self.max_pending_segments)

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.input_subject, self.output_subject_prefix)

    def turn_params(self, mode: str | None = None) -> TurnParams:
        """The end-of-turn rules (``mode``: a start's choice, else STT_ENDPOINTING's)."""
        mode = mode or self.endpointing
        try:
            query = tuple(float(x) for x in self.turn_query_s.split(",") if x.strip())
            steps = tuple((float(a), float(b)) for a, b in
                          (pair.split(":") for pair in self.turn_thresholds.split(",")
                           if pair.strip()))
        except ValueError:
            raise ValueError("STT_TURN_QUERY_S is comma-separated seconds and "
                             "STT_TURN_THRESHOLDS comma-separated silence:score pairs") from None
        return TurnParams(mode="model" if mode == "model" else "silence", query_s=query,
                          thresholds=steps, finished_bonus=self.turn_finished_bonus,
                          eager=self.turn_eager, max_silence_s=self.turn_max_silence_s,
                          speculate_p=self.turn_speculate_p,
                          fallback_s=min(self.chunk_timeout_s, self.turn_max_silence_s))

    def redacted(self) -> dict[str, Any]:
        """Settings for logs: secrets masked."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if f.metadata["secret"] and value else value
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def settings_summary(settings: Settings) -> dict[str, Any]:
    """For the start-up log line: the settings that differ from the defaults (secrets masked),
    plus the engine, which every reader of the log wants to see; not all 70 settings."""
    changed = {k: v for k, v in settings.redacted().items() if v != _FIELDS[k].default}
    return {"engine": settings.engine, **changed}


def _convert(raw: Any, hint: Any, source: str) -> Any:
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


def add_arguments(parser: argparse.ArgumentParser, groups: tuple[str, ...] | None = None) -> None:
    """One ``--flag`` per setting (``--chunk-timeout-s`` for ``chunk_timeout_s``).

    Flags default to ``None`` so that an unset flag leaves the environment's value alone.
    """
    hints = typing.get_type_hints(Settings)
    sections: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Settings):
        group = f.metadata["group"]
        if groups is not None and group not in groups:
            continue
        section = sections.get(group) or parser.add_argument_group(f"{group} settings")
        sections[group] = section
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [env {f.metadata['env']}, default {f.default!r}]"
        if hints[f.name] is bool:
            section.add_argument(flag, dest=f.name, default=None,
                                 action=argparse.BooleanOptionalAction, help=help_text)
        else:
            section.add_argument(flag, dest=f.name, default=None, metavar=f.metadata["env"],
                                 choices=f.metadata["choices"], help=help_text)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in _FIELDS if getattr(args, name, None) is not None}


def markdown_table() -> str:
    """The README's configuration table."""
    rows = ["| variable | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default != "" else "(empty)"
        rows.append(f"| `{f.metadata['env']}` | `{flag}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)
