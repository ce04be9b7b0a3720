// The live microphone page: an OpenAI Realtime transcription client of this server's
// /v1/realtime websocket (the bridge onto the worker's NATS subjects), with ?stt_events=1 so the
// worker's own messages (stable words, turn events) come too, for the timeline.
"use strict";

const RATE = 24000;          // audio/pcm as the Realtime API defines it
const CHUNK_MS = 40;
const WINDOW_S = 20;         // the timeline shows the last 20 s of audio

const $ = (id) => document.getElementById(id);
const ui = { start: $("start"), status: $("status"), key: $("key"), partial: $("partial"),
             finals: $("finals"), events: $("events"), canvas: $("timeline") };

let ws = null, audio = null, running = false;
let sentSamples = 0;         // audio sent, in samples at RATE: the session's timeline
const levels = [];           // {t, db}
const spans = [];            // {item, start, end|null}
const bounds = [];           // {t, kind: "start" | "end", eot}
const turns = [];            // {t, p, kind}
let itemSpan = {};           // item_id -> span
let lastStopped = 0;

function now() { return sentSamples / RATE; }

function status(text) { ui.status.textContent = text; }

function log(text) {
  const line = `${now().toFixed(2).padStart(6)} s  ${text}\n`;
  ui.events.textContent = (line + ui.events.textContent).slice(0, 6000);
}

function b64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

function connect() {
  return new Promise((resolve, reject) => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const protocols = ["realtime"];
    if (ui.key.value) protocols.push("openai-insecure-api-key." + ui.key.value);
    const sock = new WebSocket(
      `${scheme}://${location.host}/v1/realtime?intent=transcription&stt_events=1`, protocols);
    let opened = false;
    sock.onopen = () => {
      opened = true;
      ws = sock;
      send({ type: "session.update", session: { type: "transcription", audio: { input: {
        format: { type: "audio/pcm", rate: RATE }, turn_detection: { type: "server_vad" } } } } });
      resolve();
    };
    sock.onmessage = (e) => onEvent(JSON.parse(e.data));
    sock.onclose = (e) => {
      if (!opened) {
        ui.key.style.display = "inline-block";
        reject(new Error("the server refused the websocket (API key required?)"));
        return;
      }
      ws = null;
      if (running) stop();
      status(`disconnected (${e.code})`);
    };
  });
}

async function start() {
  ui.start.disabled = true;
  try {
    if (!ws) await connect();
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: true } });
    const ctx = new AudioContext();
    await ctx.audioWorklet.addModule("mic-worklet.js");
    const source = ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ctx, "mic-processor",
      { processorOptions: { targetRate: RATE, chunkMs: CHUNK_MS } });
    const mute = ctx.createGain();
    mute.gain.value = 0;                       // pulled by the graph, never heard
    source.connect(node).connect(mute).connect(ctx.destination);
    node.port.onmessage = (e) => {
      send({ type: "input_audio_buffer.append", audio: b64(e.data.pcm) });
      sentSamples += e.data.pcm.byteLength / 2;
      levels.push({ t: now(), db: e.data.db });
    };
    await ctx.resume();
    audio = { ctx, stream, node };
    running = true;
    ui.start.textContent = "Stop microphone";
    ui.start.classList.add("on");
    status(`listening at ${ctx.sampleRate} Hz → ${RATE} Hz`);
  } catch (err) {
    status(`error: ${err.message}`);
  } finally {
    ui.start.disabled = false;
  }
}

function stop() {
  running = false;
  if (audio) {
    audio.node.port.onmessage = null;
    audio.stream.getTracks().forEach((t) => t.stop());
    audio.ctx.close();
    audio = null;
  }
  // the utterance in progress ends here (its final still comes on the open websocket)
  if (spans.length && spans[spans.length - 1].end === null) send({ type: "input_audio_buffer.commit" });
  ui.start.textContent = "Start microphone";
  ui.start.classList.remove("on");
  status(ws ? "microphone off" : "idle");
}

ui.start.onclick = () => (running ? stop() : start());

function addFinal(text, t, eot, p) {
  const row = document.createElement("div");
  row.className = "final";
  const at = document.createElement("span");
  at.className = "at";
  at.textContent = `${t.toFixed(2)} s`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text || "(no words)";
  row.append(at, body);
  if (eot !== undefined && eot !== null) {
    const badge = document.createElement("span");
    badge.className = eot ? "badge eot" : "badge";
    badge.textContent = (eot ? "end of turn" : "turn continues") + (p != null ? ` p=${p.toFixed(2)}` : "");
    row.append(badge);
  }
  ui.finals.append(row);
  ui.finals.scrollTop = ui.finals.scrollHeight;
}

let lastWorkerFinal = null;  // the worker's final (turn fields) for the completed that follows

function onWorker(m) {
  if (m.type === "transcript" && m.is_partial) {
    ui.partial.innerHTML = "";
    const stable = document.createElement("span");
    stable.textContent = m.stable_text ? m.stable_text + " " : "";
    const rest = document.createElement("span");
    rest.className = "unstable";
    rest.textContent = m.unstable_text !== undefined ? m.unstable_text : m.transcript;
    ui.partial.append(stable, rest);
  } else if (m.type === "transcript" && m.is_final) {
    lastWorkerFinal = m;
    ui.partial.textContent = "";
  } else if (m.type === "eager_end_of_turn") {
    turns.push({ t: now(), p: m.turn_probability, kind: "eager" });
    log(`eager_end_of_turn p=${(m.turn_probability ?? 0).toFixed(2)} "${m.transcript || ""}"`);
  } else if (m.type === "turn_resumed") {
    log(`turn_resumed (segment ${m.segment_id})`);
  } else if (m.type === "interrupt" || m.type === "interrupt_cancelled") {
    log(m.type);
  } else if (m.type === "end") {
    log(`worker session end (${m.reason})`);
  }
}

function onEvent(e) {
  switch (e.type) {
    case "stt.worker":
      onWorker(e.message);
      break;
    case "session.created":
      status(`connected · ${e.session.id}`);
      log(`session.created ${e.session.id}`);
      break;
    case "input_audio_buffer.speech_started": {
      const span = { item: e.item_id, start: e.audio_start_ms / 1000, end: null };
      spans.push(span);
      itemSpan[e.item_id] = span;
      bounds.push({ t: span.start, kind: "start" });
      log(`speech_started at ${(e.audio_start_ms / 1000).toFixed(2)} s`);
      break;
    }
    case "input_audio_buffer.speech_stopped": {
      const span = itemSpan[e.item_id];
      if (span) span.end = e.audio_end_ms / 1000;
      lastStopped = e.audio_end_ms / 1000;
      log(`speech_stopped at ${lastStopped.toFixed(2)} s`);
      break;
    }
    case "conversation.item.input_audio_transcription.completed": {
      const w = lastWorkerFinal || {};
      const span = itemSpan[e.item_id];
      const t = span && span.end !== null ? span.end : now();
      bounds.push({ t, kind: "end", eot: w.end_of_turn });
      if (w.turn_probability != null) turns.push({ t, p: w.turn_probability, kind: "final" });
      addFinal(e.transcript, t, w.end_of_turn, w.turn_probability);
      lastWorkerFinal = null;
      break;
    }
    case "error":
      log(`error ${e.error.code}: ${e.error.message}`);
      break;
    default:
      break;
  }
}

function draw() {
  const c = ui.canvas, g = c.getContext("2d");
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth, h = c.clientHeight;
  if (c.width !== w * dpr) { c.width = w * dpr; c.height = h * dpr; }
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const t1 = Math.max(now(), WINDOW_S), t0 = t1 - WINDOW_S;
  const x = (t) => ((t - t0) / WINDOW_S) * (w - 40) + 36;
  const rows = { level: [6, 58], voice: [70, 88], turn: [100, 150] };
  g.font = "10px system-ui"; g.fillStyle = "#7a8593";
  g.fillText("level", 0, 34); g.fillText("voice", 0, 82); g.fillText("turn p", 0, 128);
  for (let s = Math.ceil(t0); s <= t1; s++) {         // seconds
    g.fillStyle = s % 5 === 0 ? "#c3cad3" : "#eceff3";
    g.fillRect(x(s), 0, 1, 156);
    if (s % 5 === 0) { g.fillStyle = "#7a8593"; g.fillText(`${s}s`, Math.min(x(s) - 6, w - 20), 166); }
  }
  g.fillStyle = "#94a3b8";                             // input level, -70 .. 0 dBFS
  const [la, lb] = rows.level;
  for (const l of levels) {
    if (l.t < t0) continue;
    const v = Math.max(0, Math.min(1, (l.db + 70) / 70));
    g.fillRect(x(l.t) - 1, lb - v * (lb - la), 2, v * (lb - la));
  }
  g.fillStyle = "#16a34a";                             // voice activity: the worker's utterances
  for (const s of spans) {
    const end = s.end === null ? now() : s.end;
    if (end < t0) continue;
    g.fillRect(x(Math.max(s.start, t0)), rows.voice[0], Math.max(2, x(end) - x(Math.max(s.start, t0))),
      rows.voice[1] - rows.voice[0]);
  }
  for (const b of bounds) {                            // utterance boundaries
    if (b.t < t0) continue;
    g.fillStyle = b.kind === "end" ? (b.eot ? "#c2410c" : "#1d232b") : "#9aa5b1";
    g.fillRect(x(b.t), 4, b.kind === "end" ? 2 : 1, 150);
  }
  const [ta, tb] = rows.turn;                          // end-of-turn probability per query
  g.fillStyle = "#eceff3"; g.fillRect(36, ta + (tb - ta) / 2, w - 40, 1);
  if (!turns.length) {
    g.fillStyle = "#9aa5b1";
    g.fillText("no end-of-turn probabilities from this worker (no turn model)", 44, ta + 18);
  }
  for (const p of turns) {
    if (p.t < t0) continue;
    g.fillStyle = g.strokeStyle = "#c2410c";
    g.beginPath();
    g.arc(x(p.t), tb - p.p * (tb - ta), p.kind === "final" ? 4 : 3, 0, 2 * Math.PI);
    p.kind === "final" ? g.fill() : g.stroke();
  }
  requestAnimationFrame(draw);
}
requestAnimationFrame(draw);
