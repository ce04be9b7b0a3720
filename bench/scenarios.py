"""Scenario audio with known ground truth, for ``bench.evaluate``.

Every scenario is one live session: a float32 16 kHz mono signal, the state the session starts
in, timed ``state_change`` messages, and what is *in* the audio by construction:

* :class:`Utterance` — one corpus clip placed at a known time, with its speech onset and offset
  (found offline on the clean clip) and any hesitation gaps inserted inside it;
* :class:`Burst` — one generated noise burst (white, pink, click, click train, door slam) or a
  stretch of corpus silence, which contains no speech at all.

Speech boundaries come from webrtcvad (the worker's detector, same aggressiveness) gated by
energy: webrtcvad alone calls low-level room noise "speech" now and then, and the ground truth
must say where a person talks, not where the worker's detector happens to fire.

Nothing here touches NATS or the worker; building is deterministic for a given seed, so a sweep
streams exactly the same audio for every value.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stt.core.audio import SAMPLE_RATE, load_16k_mono

from .common import corpus_rows, speech_bounds

FRAME_S = 0.03
FRAME = int(SAMPLE_RATE * FRAME_S)   # 480 samples, webrtcvad's 30 ms frame

PAUSES_S = (0.15, 0.3, 0.5, 0.8, 1.2, 2.0)   # between clips in the multi scenario
HESITATION_S = (0.25, 0.5)                    # silence inserted inside a clip (uniform range)
MULTI_GROUP = 3                               # clips per multi session
CLIP_PAD_S = 0.2                              # clip audio kept around its speech when trimmed
SINGLE_LEAD_S = 0.5
PTT_RELEASE_S = 0.1                           # push-to-talk: the button let go after the speech
BARGE_LEAD_S = 1.0
NOISE_GAP_S = 2.0                             # quiet after each burst (> any chunk timeout)
NOISE_LEAD_S = 1.0
NOISE_BURSTS_PER_SESSION = 8
ROOM_TONE_DBFS = -68.0                        # the hiss between and around clips (see room_tone)
SILENCE_SESSION_S = 30.0                      # longest corpus-silence session


# --- corpus ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusClip:
    name: str              # path relative to the corpus directory
    reference: str         # the dataset's transcript
    audio: np.ndarray      # float32 16 kHz mono
    onset_s: float         # first and last speech inside the clip
    offset_s: float

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE


def load_corpus(corpus: Path, aggressiveness: int = 2) -> list[CorpusClip]:
    clips = []
    for rel, reference in corpus_rows(corpus):
        audio = load_16k_mono(str(corpus / rel))
        onset, offset = speech_bounds(audio, aggressiveness)
        clips.append(CorpusClip(rel, reference, audio, onset, offset))
    return clips


def select(clips: list[CorpusClip], limit: int) -> list[CorpusClip]:
    """``limit`` clips spread evenly over the corpus (both datasets), or all for 0."""
    if limit <= 0 or limit >= len(clips):
        return list(clips)
    return [clips[round(i * len(clips) / limit)] for i in range(limit)]


# --- ground truth ---------------------------------------------------------------------------


@dataclass
class Utterance:
    clip: str
    reference: str
    onset_s: float          # scenario time of the first speech
    offset_s: float         # scenario time of the last speech
    gaps: list[tuple[float, float]] = field(default_factory=list)  # inserted hesitations

    def speech_intervals(self) -> list[tuple[float, float]]:
        """The utterance's speech with its hesitation gaps taken out."""
        out, t = [], self.onset_s
        for a, b in sorted(self.gaps):
            out.append((t, a))
            t = b
        out.append((t, self.offset_s))
        return out


@dataclass
class Burst:
    kind: str               # white, pink, click, clicks, slam, corpus-silence
    label: str              # e.g. "white 0.3s -30dBFS"
    start_s: float
    end_s: float


@dataclass
class Scenario:
    name: str               # unique in a run; also the session id's suffix
    group: str              # single, multi, barge, barge-listen, noise
    kind: str               # finer: noise-responding, silence-listening, ...
    audio: np.ndarray
    state: str = "listening"
    utterances: list[Utterance] = field(default_factory=list)
    bursts: list[Burst] = field(default_factory=list)
    pauses_s: list[float] = field(default_factory=list)   # between consecutive utterances
    state_changes: list[tuple[float, str]] = field(default_factory=list)  # (audio time, state)
    twin: str | None = None  # barge: the listening session streaming the same audio

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE


# --- signal helpers -------------------------------------------------------------------------


def _secs(n: float) -> int:
    return round(n * SAMPLE_RATE)


def db(level_dbfs: float) -> float:
    return float(10.0 ** (level_dbfs / 20.0))


def room_tone(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Faint hiss for pauses (-68 dBFS, about what a mic with noise suppression sends).

    Not digital zeros, which would be an unnaturally easy silence; and not white noise at the
    clips' own floor (-50 to -60 dBFS): webrtcvad keeps calling such hiss speech when it starts
    right after speech, so utterances would never end — an artefact of splicing, not of speech.
    """
    return (rng.standard_normal(_secs(seconds)) * db(ROOM_TONE_DBFS)).astype(np.float32)


def white(seconds: float, rms: float, rng: np.random.Generator) -> np.ndarray:
    return _fade((rng.standard_normal(_secs(seconds)) * rms).astype(np.float32))


def pink(seconds: float, rms: float, rng: np.random.Generator) -> np.ndarray:
    """1/f noise by shaping white noise's spectrum (amplitude 1/sqrt(f)), scaled to ``rms``."""
    n = _secs(seconds)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    f[0] = f[1] if f.size > 1 else 1.0
    x = np.fft.irfft(spectrum / np.sqrt(f), n)
    x *= rms / (np.sqrt(np.mean(x ** 2)) + 1e-12)
    return _fade(x.astype(np.float32))


def click(peak: float, rng: np.random.Generator) -> np.ndarray:
    """A 5 ms impulse: a sharp edge ringing down within a millisecond or two (a tap, a pop)."""
    n = _secs(0.005)
    t = np.arange(n) / SAMPLE_RATE
    x = rng.standard_normal(n) * np.exp(-t / 0.0008)
    x[0] = 1.0
    return (x / np.max(np.abs(x)) * peak).astype(np.float32)


def click_train(peak: float, count: int, rate_hz: float, rng: np.random.Generator) -> np.ndarray:
    """Keyboard typing, finger taps: ``count`` clicks at ``rate_hz`` with a little jitter."""
    period = 1.0 / rate_hz
    out = np.zeros(_secs(count * period + 0.01), dtype=np.float32)
    for i in range(count):
        at = _secs(i * period + rng.uniform(0, period * 0.2))
        c = click(peak * rng.uniform(0.6, 1.0), rng)
        out[at: at + c.size] += c[: out.size - at]
    return out


def door_slam(peak: float, rng: np.random.Generator) -> np.ndarray:
    """A decaying broadband burst with a low thump under it, 0.8 s long."""
    n = _secs(0.8)
    t = np.arange(n) / SAMPLE_RATE
    attack = np.minimum(1.0, t / 0.002)
    crack = rng.standard_normal(n) * np.exp(-t / 0.06)
    thump = np.sin(2 * np.pi * 70.0 * t) * np.exp(-t / 0.15) * 2.0
    rattle = rng.standard_normal(n) * np.exp(-t / 0.25) * 0.15   # the frame settling
    x = attack * (crack + thump + rattle)
    return (x / np.max(np.abs(x)) * peak).astype(np.float32)


def beep(seconds: float, freq_hz: float, peak: float) -> np.ndarray:
    """A notification tone with two harmonics: periodic, unlike noise, so the pitch guard
    cannot tell it from voice by itself."""
    t = np.arange(_secs(seconds)) / SAMPLE_RATE
    x = (np.sin(2 * np.pi * freq_hz * t) + 0.5 * np.sin(4 * np.pi * freq_hz * t)
         + 0.25 * np.sin(6 * np.pi * freq_hz * t))
    return _fade((peak * x / np.max(np.abs(x))).astype(np.float32), 0.01)


def _fade(x: np.ndarray, seconds: float = 0.005) -> np.ndarray:
    """5 ms ramps, so a noise burst's edges are not clicks of their own."""
    n = min(_secs(seconds), x.size // 2)
    if n:
        ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


class _Tape:
    """Appends pieces of audio and says where each landed on the session timeline."""

    def __init__(self) -> None:
        self.pieces: list[np.ndarray] = []
        self.samples = 0

    @property
    def now_s(self) -> float:
        return self.samples / SAMPLE_RATE

    def add(self, x: np.ndarray) -> float:
        at = self.now_s
        self.pieces.append(x.astype(np.float32, copy=False))
        self.samples += x.size
        return at

    def audio(self) -> np.ndarray:
        return np.concatenate(self.pieces) if self.pieces else np.zeros(0, dtype=np.float32)


# --- hesitations ----------------------------------------------------------------------------


def split_point(clip: CorpusClip) -> float | None:
    """A quiet moment between words in the middle of the clip's speech (seconds), or None.

    The lowest 80 ms-smoothed energy in the middle 40% of the speech: between words the level
    drops for longer than inside one (a stop consonant's closure is shorter than 80 ms).
    """
    if clip.offset_s - clip.onset_s < 1.5:
        return None
    hop = SAMPLE_RATE // 100  # 10 ms
    lo = _secs(clip.onset_s + 0.3 * (clip.offset_s - clip.onset_s))
    hi = _secs(clip.onset_s + 0.7 * (clip.offset_s - clip.onset_s))
    seg = clip.audio[lo:hi]
    n = seg.size // hop
    if n < 10:
        return None
    energy = np.mean(seg[: n * hop].reshape(n, hop).astype(np.float64) ** 2, axis=1)
    smooth = np.convolve(energy, np.ones(8) / 8, mode="same")
    best = int(np.argmin(smooth[4:-4])) + 4
    return (lo + best * hop) / SAMPLE_RATE


# --- builders -------------------------------------------------------------------------------


def _alone(clips: list[CorpusClip], group: str, tail_s: float, seed: int,
           cut: bool = False) -> list[Scenario]:
    """Each clip alone: 0.5 s of room tone before, ``tail_s`` after; ``cut``: the clip's audio
    stops ``PTT_RELEASE_S`` after its last speech."""
    rng = np.random.default_rng(seed)
    out = []
    for i, clip in enumerate(clips):
        tape = _Tape()
        tape.add(room_tone(SINGLE_LEAD_S, rng))
        audio = clip.audio
        if cut:
            audio = audio[:_secs(min(clip.duration_s, clip.offset_s + PTT_RELEASE_S))]
        at = tape.add(audio)
        tape.add(room_tone(tail_s, rng))
        out.append(Scenario(f"{group}-{i:02d}", group, group, tape.audio(),
                            utterances=[Utterance(clip.name, clip.reference, at + clip.onset_s,
                                                  at + clip.offset_s)]))
    return out


def single(clips: list[CorpusClip], tail_s: float, seed: int = 1) -> list[Scenario]:
    """Each clip alone: 0.5 s of room tone before, ``tail_s`` after."""
    return _alone(clips, "single", tail_s, seed)


def ptt(clips: list[CorpusClip], seed: int = 6) -> list[Scenario]:
    """Push-to-talk: each clip alone, its audio stopping ``PTT_RELEASE_S`` after the last
    speech, and ``end`` sent at once: no silence for the endpoint to wait for."""
    return _alone(clips, "ptt", 0.0, seed, cut=True)


def multi(clips: list[CorpusClip], tail_s: float, seed: int = 2) -> list[Scenario]:
    """Clips joined ``MULTI_GROUP`` to a session, with pauses from :data:`PAUSES_S`.

    A pause is the silence from one clip's last speech to the next clip's first. Every value of
    :data:`PAUSES_S` is used equally often (a shuffled cycle), so short pauses, which a good
    segmenter should bridge, and long ones, which it should cut, are both well represented.
    Every other clip long enough gets a hesitation: split at a quiet point between words, with
    0.25-0.5 s of room tone inserted — a pause *inside* a sentence.
    """
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    cycle: list[float] = []
    out = []
    for g in range(0, len(clips), MULTI_GROUP):
        group = clips[g: g + MULTI_GROUP]
        pauses = []
        for _ in group[1:]:
            if not cycle:
                cycle = list(PAUSES_S)
                rnd.shuffle(cycle)
            pauses.append(cycle.pop())
        tape = _Tape()
        tape.add(room_tone(SINGLE_LEAD_S, rng))
        utterances: list[Utterance] = []
        prev_tail = 0.0   # seconds of the previous clip's own audio kept after its speech
        for j, clip in enumerate(group):
            # keep up to CLIP_PAD_S of the clip's own audio around its speech but never more
            # than half a pause on either side; room tone fills the rest of the pause
            lead = CLIP_PAD_S if j == 0 else min(CLIP_PAD_S, pauses[j - 1] / 2)
            tail = CLIP_PAD_S if j == len(group) - 1 else min(CLIP_PAD_S, pauses[j] / 2)
            a = max(0, _secs(clip.onset_s - lead))
            b = min(clip.audio.size, _secs(clip.offset_s + tail))
            if j:
                fill = pauses[j - 1] - prev_tail - (clip.onset_s - a / SAMPLE_RATE)
                tape.add(room_tone(max(0.0, fill), rng))
            base = tape.now_s - a / SAMPLE_RATE   # scenario time of the clip's sample 0
            utt = Utterance(clip.name, clip.reference, base + clip.onset_s, base + clip.offset_s)
            piece = clip.audio[a:b]
            cut = split_point(clip) if (g + j) % 2 == 0 else None
            if cut is not None and a / SAMPLE_RATE < cut < b / SAMPLE_RATE:
                gap = rnd.uniform(*HESITATION_S)
                k = _secs(cut) - a
                tape.add(piece[:k])
                gap_at = tape.add(room_tone(gap, rng))
                tape.add(piece[k:])
                utt.gaps.append((gap_at, gap_at + gap))
                utt.offset_s += gap
            else:
                tape.add(piece)
            utterances.append(utt)
            prev_tail = b / SAMPLE_RATE - clip.offset_s
        tape.add(room_tone(tail_s, rng))
        u = utterances
        out.append(Scenario(f"multi-{g // MULTI_GROUP:02d}", "multi", "multi", tape.audio(),
                            utterances=u,
                            pauses_s=[round(u[i + 1].onset_s - u[i].offset_s, 3)
                                      for i in range(len(u) - 1)]))
    return out


LEAD_INS = ("quiet", "pink", "white", "typing", "slam", "beep")


def lead_in(kind: str, rng: np.random.Generator) -> np.ndarray:
    """What comes before a barge-in: quiet, a fan, or a burst the assistant must not take for
    the user (white noise, typing, a door, a notification tone), then quiet."""
    if kind == "pink":  # low-level pink noise under the whole lead-in (a fan, a street)
        return pink(BARGE_LEAD_S, db(-55.0), rng) + room_tone(BARGE_LEAD_S, rng)
    burst = {"quiet": lambda: np.zeros(0, np.float32),
             "white": lambda: white(0.3, db(-30.0), rng),
             "typing": lambda: click_train(db(-6.0), 8, 12.0, rng),
             "slam": lambda: door_slam(db(-6.0), rng),
             "beep": lambda: beep(0.25, 880.0, db(-20.0))}[kind]()
    burst = burst + room_tone(burst.size / SAMPLE_RATE, rng)[: burst.size]
    return np.concatenate([burst, room_tone(BARGE_LEAD_S, rng)])


def barge(clips: list[CorpusClip], tail_s: float, seed: int = 3) -> list[Scenario]:
    """The user talks over the assistant: ``responding``, a lead-in (:func:`lead_in`, each kind
    in turn), the clip.

    Each barge-in session has a twin that streams the same audio in ``listening``: comparing
    their finals shows the words an interruption loses at its start.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i, clip in enumerate(clips):
        tape = _Tape()
        tape.add(lead_in(LEAD_INS[i % len(LEAD_INS)], rng))
        at = tape.add(clip.audio)
        tape.add(room_tone(tail_s, rng))
        audio = tape.audio()
        utt = Utterance(clip.name, clip.reference, at + clip.onset_s, at + clip.offset_s)
        name = f"barge-{i:02d}"
        out.append(Scenario(name, "barge", "barge-responding", audio, state="responding",
                            utterances=[utt], twin=f"{name}-listen"))
        out.append(Scenario(f"{name}-listen", "barge-listen", "barge-listening", audio,
                            utterances=[Utterance(utt.clip, utt.reference, utt.onset_s,
                                                  utt.offset_s)]))
    return out


# Voices the corpus does not have (it holds two speakers): espeak-ng's accents, male and female
# variants, other speeds and pitches. Synthetic speech is for detecting a barge-in, not for WER.
SYNTH_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp+f2", "en-us+f3",
                "en-gb-x-gbclan+m3", "en-us+f4")
SYNTH_LINES = ("Wait, stop, I have a question about that.",
               "No, no, that is not what I asked for.",
               "Sorry, can you say the last part again?",
               "Hold on a second, I need to check something.")


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray | None:
    """16 kHz float32 speech from espeak-ng, or None where it is not installed."""
    import shutil
    import subprocess

    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    wav = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout",
                          text], capture_output=True, check=True, timeout=30).stdout
    return load_16k_mono(io.BytesIO(wav))


def synth(tail_s: float, seed: int = 5) -> list[Scenario]:
    """Barge-ins by synthetic voices (:data:`SYNTH_VOICES`) after every kind of lead-in."""
    rng = np.random.default_rng(seed)
    out = []
    for i, voice in enumerate(SYNTH_VOICES):
        for j, kind in enumerate(LEAD_INS[i % 2::2]):
            text = SYNTH_LINES[(i + j) % len(SYNTH_LINES)]
            speech = espeak(text, voice, speed=150 + 20 * ((i + j) % 3), pitch=40 + 10 * j)
            if speech is None:
                return []
            onset, offset = speech_bounds(speech, 2)
            tape = _Tape()
            tape.add(lead_in(kind, rng))
            at = tape.add(speech)
            tape.add(room_tone(tail_s, rng))
            out.append(Scenario(f"synth-{i:02d}-{kind}", "synth", "synth-responding",
                                tape.audio(), state="responding",
                                utterances=[Utterance(f"espeak:{voice}", text, at + onset,
                                                      at + offset)]))
    return out


def noise_bursts(rng: np.random.Generator) -> list[tuple[str, str, np.ndarray]]:
    """(kind, label, audio) for every burst: levels from barely audible to very loud."""
    out: list[tuple[str, str, np.ndarray]] = []
    for kind, make in (("white", white), ("pink", pink)):
        for seconds in (0.1, 0.3, 0.6, 1.0):
            for level in (-45.0, -30.0, -15.0):
                out.append((kind, f"{kind} {seconds}s {level:.0f}dBFS",
                            make(seconds, db(level), rng)))
    for level in (-20.0, -6.0, -1.0):
        out.append(("click", f"click peak {level:.0f}dBFS", click(db(level), rng)))
    for level in (-20.0, -6.0):
        out.append(("clicks", f"typing 8 clicks peak {level:.0f}dBFS",
                    click_train(db(level), 8, 12.0, rng)))
    for level in (-12.0, -6.0, -1.0):
        out.append(("slam", f"door slam peak {level:.0f}dBFS", door_slam(db(level), rng)))
    return out


def noise(clips: list[CorpusClip], seed: int = 4) -> list[Scenario]:
    """No speech at all: generated bursts, and silence cut from the corpus clips.

    Each audio is streamed twice: in ``responding`` (any interrupt is false; a ``state_change``
    back to ``responding`` before every burst, as an assistant that resumed talking would send)
    and in ``listening`` (any final with words is invented text).
    """
    rng = np.random.default_rng(seed)
    bursts = noise_bursts(rng)
    sessions: list[list[tuple[str, str, np.ndarray]]] = [[] for _ in range(
        max(1, -(-len(bursts) // NOISE_BURSTS_PER_SESSION)))]
    for i, b in enumerate(bursts):   # round robin, so each session mixes kinds and levels
        sessions[i % len(sessions)].append(b)
    out: list[Scenario] = []
    for s, items in enumerate(sessions):
        tape = _Tape()
        tape.add(room_tone(NOISE_LEAD_S, rng))
        placed: list[Burst] = []
        changes: list[tuple[float, str]] = []
        for kind, label, x in items:
            changes.append((max(0.0, tape.now_s - 0.4), "responding"))
            at = tape.add(x + room_tone(x.size / SAMPLE_RATE, rng)[: x.size])
            placed.append(Burst(kind, label, at, at + x.size / SAMPLE_RATE))
            tape.add(room_tone(NOISE_GAP_S, rng))
        audio = tape.audio()
        out.append(Scenario(f"noise-{s:02d}-responding", "noise", "noise-responding", audio,
                            state="responding", bursts=placed, state_changes=changes))
        out.append(Scenario(f"noise-{s:02d}-listening", "noise", "noise-listening", audio,
                            bursts=[Burst(b.kind, b.label, b.start_s, b.end_s) for b in placed]))
    silence = corpus_silence(clips, rng)
    if silence is not None:
        audio, burst = silence
        # back to responding every 2 s, in case a false interrupt handed the turn over
        changes = [(float(t), "responding") for t in np.arange(2.0, burst.end_s, 2.0)]
        out.append(Scenario("silence-responding", "noise", "silence-responding", audio,
                            state="responding", bursts=[burst], state_changes=changes))
        out.append(Scenario("silence-listening", "noise", "silence-listening", audio,
                            bursts=[Burst(burst.kind, burst.label, burst.start_s, burst.end_s)]))
    return out


def corpus_silence(clips: list[CorpusClip],
                   rng: np.random.Generator) -> tuple[np.ndarray, Burst] | None:
    """The quiet parts of real recordings (room noise, breaths, lip smacks) joined together.

    Taken 0.15 s clear of each clip's speech, with 10 ms cross-fades at the joins.
    """
    margin = 0.15
    parts = []
    for clip in clips:
        lead = clip.audio[: max(0, _secs(clip.onset_s - margin))]
        trail = clip.audio[_secs(clip.offset_s + margin):]
        parts += [p for p in (lead, trail) if p.size >= _secs(0.2)]
    if not parts:
        return None
    out = np.zeros(0, dtype=np.float32)
    fade = _secs(0.01)
    for p in parts:
        p = p.astype(np.float32).copy()
        if out.size >= fade:
            ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
            p[:fade] = p[:fade] * ramp + out[-fade:] * ramp[::-1]
            out = out[:-fade]
        out = np.concatenate((out, p))
        if out.size >= _secs(SILENCE_SESSION_S):
            break
    out = out[: _secs(SILENCE_SESSION_S)]
    tail = room_tone(NOISE_GAP_S, rng)
    return (np.concatenate((out, tail)),
            Burst("corpus-silence", f"corpus silence {out.size / SAMPLE_RATE:.1f}s", 0.0,
                  out.size / SAMPLE_RATE))


def build(clips: list[CorpusClip], all_clips: list[CorpusClip], groups: list[str],
          tail_s: float) -> list[Scenario]:
    """Every scenario of the requested groups (single, ptt, multi, barge, noise, synth)."""
    out: list[Scenario] = []
    if "single" in groups:
        out += single(clips, tail_s)
    if "ptt" in groups:
        out += ptt(clips)
    if "multi" in groups:
        out += multi(clips, tail_s)
    if "barge" in groups:
        out += barge(clips, tail_s)
    if "noise" in groups:
        out += noise(all_clips)
    if "synth" in groups:
        out += synth(tail_s)
    return out
