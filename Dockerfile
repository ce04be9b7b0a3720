# syntax=docker/dockerfile:1
# HTTP variant (stt_streaming.py): the streaming worker sending audio segments to a Whisper
# HTTP service (WHISPER_URL). CPU only, no PyTorch, no model: a small image.
#
#   docker build -t stt-worker:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp -p 8080:8080 \
#       -e NATS_URL=nats://nats:4222 -e WHISPER_URL=http://whisper:8000 stt-worker:0.1.0
#
# Runs as uid 10001 with a read-only root file system (only /tmp is written, and rarely).
# Health: GET :8080/livez, /readyz, /metrics (STT_HEALTH_PORT).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the package and its dependencies in a virtual environment ------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md* stt_streaming.py stt_streaming_local.py ./
COPY stt ./stt
# Not the `local` extra: no torch, no openai-whisper. `otel` so OTEL_ENABLED/HYPERDX_ENABLED work;
# `turn` and the model file (checksum-verified) for end-of-turn detection (STT_ENDPOINTING=model).
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "/src[otel,turn]" \
    && /opt/venv/bin/python -m stt.engines.turn_model install \
    && /opt/venv/bin/python -c "import stt.cli, stt.transport.connection, stt.engines.http, stt.ops.otel, nkeys"

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 stt \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin stt
COPY --from=build /opt/venv /opt/venv
COPY stt_streaming.py /app/stt_streaming.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    STT_HEALTH_PORT=8080 \
    STT_HEALTH_HOST=0.0.0.0 \
    STT_LOG_FORMAT=json
WORKDIR /app
USER 10001:10001
EXPOSE 8080
# SIGTERM: stop taking sessions, publish every live session's finals, drain NATS, exit 0.
STOPSIGNAL SIGTERM
# /livez, not /readyz: an unhealthy mark during a NATS outage would only restart the worker.
HEALTHCHECK --interval=15s --timeout=4s --start-period=20s --retries=3 \
    CMD ["python", "-m", "stt.ops.health"]
ENTRYPOINT ["python", "/app/stt_streaming.py"]
