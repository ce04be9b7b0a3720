"""The transcription engine's settings: which engine, which model, how it decodes, and the
HTTP service's address, retries and circuit breaker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from stt.config.base import Area, setting

ENGINES = ("faster-whisper", "whisper", "http")
COMPUTE_TYPES = ("auto", "int8", "int8_float16", "int8_float32", "int8_bfloat16", "float16",
                 "bfloat16", "float32")


@dataclass(frozen=True)
class TranscriptionSettings(Area):
    area: ClassVar[str] = "transcription"
    help_group: ClassVar[str] = "engine"  # its section of `stt worker --help`

    engine: str = setting("faster-whisper", "STT_ENGINE",
                          "Transcription engine: faster-whisper (local, CTranslate2; embedded "
                          "tiny.en by default), whisper (local openai-whisper on PyTorch: CUDA, "
                          "ROCm, CPU), http (OpenAI-compatible service), or module:Class.")
    engine_workers: int = setting(0, "STT_ENGINE_WORKERS",
                                  "Passes the engine runs at once. http: requests in flight "
                                  "(0 = 16); faster-whisper on CPU: model passes side by side, "
                                  "each on WHISPER_CPU_THREADS threads (0 = one per CPU, up to "
                                  "4: two sessions' finals decode together instead of one "
                                  "after the other); GPU and the whisper engine: 1.")
    language: str = setting("en", "STT_LANGUAGE",
                            "Default language when a session's start gives none ('' = detect).")
    whisper_url: str = setting("http://127.0.0.1:8000", "WHISPER_URL",
                               "Base URL of the Whisper HTTP service (http engine).")
    whisper_path: str = setting("/v1/audio/transcriptions", "WHISPER_PATH",
                                "Path of the transcription endpoint under WHISPER_URL.")
    whisper_api_key: str = setting("", "WHISPER_API_KEY",
                                   "Bearer token for the Whisper HTTP service.", secret=True)
    whisper_model_size: str = setting("", "WHISPER_MODEL_SIZE",
                                      "Whisper model: '' = the embedded tiny.en (offline, "
                                      "checksum verified); a name (tiny.en, base, small, "
                                      "large-v3, distil-large-v3, turbo, ...) downloaded where "
                                      "there is network; a CTranslate2 model directory; or, "
                                      "for the whisper engine, an openai-whisper checkpoint file.")
    whisper_device: str = setting("auto", "WHISPER_DEVICE",
                                  "cuda (NVIDIA or ROCm), cpu, or auto.", choices=("auto", "cuda", "cpu"))
    whisper_download_root: str = setting("", "WHISPER_DOWNLOAD_ROOT",
                                         "Directory for downloaded Whisper weights ('' = the "
                                         "engine's usual cache: Hugging Face's for "
                                         "faster-whisper, ~/.cache/whisper for whisper).")
    whisper_compute_type: str = setting("auto", "WHISPER_COMPUTE_TYPE",
                                        "CTranslate2 compute type (faster-whisper): auto = int8 "
                                        "on CPU, float16 on CUDA; or int8, int8_float16, "
                                        "int8_float32, float16, bfloat16, float32.",
                                        choices=COMPUTE_TYPES)
    engine_timeout_s: float = setting(30.0, "STT_ENGINE_TIMEOUT_S",
                                      "Longest one transcription may take before it fails.")
    # local engines (faster-whisper, whisper)
    whisper_cpu_threads: int = setting(0, "WHISPER_CPU_THREADS",
                                       "Threads of each model pass on CPU (0 = the CPUs this "
                                       "process may use, cgroup quota included, shared among "
                                       "STT_ENGINE_WORKERS).")
    whisper_batch_size: int = setting(8, "WHISPER_BATCH_SIZE",
                                      "Most segments (from any sessions) decoded in one model "
                                      "pass; 1 = no batching.")
    whisper_batch_wait_ms: float = setting(5.0, "WHISPER_BATCH_WAIT_MS",
                                           "How long an idle model waits for other sessions' "
                                           "segments to join a batch.")
    whisper_short_window: str = setting("partials", "WHISPER_SHORT_WINDOW",
                                        "Encode short segments without padding them to 30 s: "
                                        "partials (default), all, or off. Much cheaper; "
                                        "somewhat less accurate.",
                                        choices=("partials", "all", "off"))
    whisper_final_window_s: float = setting(30.0, "WHISPER_FINAL_WINDOW_S",
                                            "With WHISPER_FINAL_ENCODE=window (or the whisper "
                                            "engine): seconds of the window finals are encoded over "
                                            "(audio longer than this gets its own length, up "
                                            "to Whisper's 30 s). 20 s takes a third of 30 s's "
                                            "encoder time on CPU (push-to-talk finals 0.2 s "
                                            "sooner at p95) for +0.006-0.010 corpus WER "
                                            "(tiny.en).")
    whisper_final_encode: str = setting("audio", "WHISPER_FINAL_ENCODE",
                                        "What a final's encoder pass covers (faster-whisper on "
                                        "CPU): audio = its audio plus 3 s, the rest of the "
                                        "30 s window filled from a cached encoding of silence "
                                        "(about half the CPU time of the window; corpus WER "
                                        "0.048 against 0.050 on whole clips); window = "
                                        "WHISPER_FINAL_WINDOW_S of audio and padding, as "
                                        "Whisper does. GPUs always encode the window.",
                                        choices=("audio", "window"))
    whisper_partial_nice: int = setting(10, "WHISPER_PARTIAL_NICE",
                                        "faster-whisper on CPU (Linux): partials decode on a "
                                        "second copy of the model whose threads run at this "
                                        "nice value, so a partial decoding when a final or the "
                                        "turn model needs a core gets only what they leave "
                                        "(the model's memory twice; not with "
                                        "STT_PARTIAL_INTERVAL=0 or stt serve); 0 = one copy, "
                                        "partials and finals share the cores equally.")
    whisper_beam_size: int = setting(1, "WHISPER_BEAM_SIZE",
                                     "Beam search width for finals (1 = greedy; partials are "
                                     "always greedy).")
    whisper_use_context: bool = setting(True, "WHISPER_USE_CONTEXT",
                                        "Give the session's previous final to the model as "
                                        "context for the next final (finals with different "
                                        "context cannot share a batch).")
    whisper_no_speech_threshold: float = setting(0.6, "WHISPER_NO_SPEECH_THRESHOLD",
                                                 "Drop text whose no-speech probability is above "
                                                 "this (and whose avg log-prob is below "
                                                 "WHISPER_LOGPROB_THRESHOLD); 1 = never.")
    whisper_logprob_threshold: float = setting(-1.0, "WHISPER_LOGPROB_THRESHOLD",
                                               "Average token log-probability below which a "
                                               "final is decoded again at a higher temperature.")
    whisper_compression_ratio_threshold: float = setting(
        2.4, "WHISPER_COMPRESSION_RATIO_THRESHOLD",
        "gzip compression ratio above which text counts as a repetition loop: retried at a "
        "higher temperature, then dropped (0 = off).")
    # http engine
    whisper_http_model: str = setting("whisper-1", "WHISPER_HTTP_MODEL",
                                      "'model' field sent to the Whisper HTTP service.")
    whisper_response_format: str = setting("verbose_json", "WHISPER_RESPONSE_FORMAT",
                                           "response_format asked of the HTTP service: "
                                           "verbose_json (segments, words), json or text.",
                                           choices=("verbose_json", "json", "text"))
    whisper_connect_timeout_s: float = setting(3.0, "WHISPER_CONNECT_TIMEOUT_S",
                                               "Connect timeout for the Whisper HTTP service.")
    whisper_read_timeout_s: float = setting(20.0, "WHISPER_READ_TIMEOUT_S",
                                            "Longest wait for the HTTP service's response.")
    whisper_retries: int = setting(2, "WHISPER_RETRIES",
                                   "Retries of a final after a connection error, timeout, 5xx "
                                   "or 429 (partials are not retried).")
    whisper_retry_backoff_s: float = setting(0.2, "WHISPER_RETRY_BACKOFF_S",
                                             "First retry delay; doubles per retry, with "
                                             "jitter (Retry-After is honoured).")
    whisper_breaker_failures: int = setting(5, "WHISPER_BREAKER_FAILURES",
                                            "Consecutive failed requests that open the circuit "
                                            "breaker (requests then fail at once).")
    whisper_breaker_cooldown_s: float = setting(5.0, "WHISPER_BREAKER_COOLDOWN_S",
                                                "Seconds the breaker stays open before one "
                                                "probe request may try the service again.")

    def check(self, need: Callable[[bool, str, str], None]) -> None:
        need(self.engine in ENGINES or ":" in self.engine, "engine",
             f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)} or module:Class")
        need(self.engine_timeout_s > 0, "engine_timeout_s", "must be > 0 seconds")
        need(self.whisper_cpu_threads >= 0, "whisper_cpu_threads", "must be >= 0")
        need(self.engine_workers >= 0, "engine_workers", "must be >= 0")
        need(1 <= self.whisper_batch_size <= 256, "whisper_batch_size",
             "must be between 1 and 256")
        need(0 <= self.whisper_batch_wait_ms <= 1000, "whisper_batch_wait_ms",
             "must be between 0 and 1000 ms")
        need(2.0 <= self.whisper_final_window_s <= 30.0, "whisper_final_window_s",
             "must be between 2 and 30 s")
        need(0 <= self.whisper_partial_nice <= 19, "whisper_partial_nice",
             "must be between 0 and 19")
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
