// AudioWorklet: the microphone at the context's rate (44.1 or 48 kHz, usually) -> mono 16-bit
// PCM at the rate the page asks for (24 kHz, the Realtime API's), in chunks of chunkMs.
// Resampling: a windowed-sinc low-pass below the new Nyquist, then linear interpolation.
// Each chunk goes to the page with its level (RMS, dBFS) for the timeline.

function lowpass(cutoff, taps) {
  // cutoff: a fraction of the input rate (0 .. 0.5); a Blackman-windowed sinc, unit DC gain
  const h = new Float32Array(taps);
  const mid = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (taps - 1))
      + 0.08 * Math.cos((4 * Math.PI * i) / (taps - 1));
    h[i] = sinc * w;
    sum += h[i];
  }
  for (let i = 0; i < taps; i++) h[i] /= sum;
  return h;
}

class MicProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.target = opts.targetRate || 24000;
    this.step = sampleRate / this.target;           // input samples per output sample
    this.taps = this.step > 1 ? lowpass(0.45 / this.step, 63) : null;
    this.hist = new Float32Array(this.taps ? this.taps.length : 1);
    this.at = 0;                                    // where history[0] is written next
    this.t = 0;                                     // next output time, in input samples
    this.index = -1;                                // input samples seen, minus one
    this.prev = 0;                                  // the previous filtered input sample
    this.chunk = new Int16Array(Math.round((this.target * (opts.chunkMs || 40)) / 1000));
    this.n = 0;
    this.energy = 0;
  }

  filtered(x) {
    if (!this.taps) return x;
    const h = this.taps, hist = this.hist, len = h.length;
    hist[this.at] = x;
    let y = 0, j = this.at;
    for (let i = 0; i < len; i++) {
      y += h[i] * hist[j];
      j = j === 0 ? len - 1 : j - 1;
    }
    this.at = (this.at + 1) % len;
    return y;
  }

  emit(y) {
    const s = Math.max(-1, Math.min(1, y));
    this.chunk[this.n++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    this.energy += s * s;
    if (this.n === this.chunk.length) {
      const rms = Math.sqrt(this.energy / this.n);
      const pcm = this.chunk.slice(0);
      this.port.postMessage({ pcm: pcm.buffer, db: 20 * Math.log10(rms + 1e-9) }, [pcm.buffer]);
      this.n = 0;
      this.energy = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const frames = input[0].length;
    for (let k = 0; k < frames; k++) {
      let x = 0;
      for (let c = 0; c < input.length; c++) x += input[c][k];
      const y = this.filtered(x / input.length);
      this.index += 1;
      while (this.t <= this.index) {                // interpolate between prev and y
        const frac = this.t - (this.index - 1);
        this.emit(this.prev + (y - this.prev) * frac);
        this.t += this.step;
      }
      this.prev = y;
    }
    return true;
  }
}

registerProcessor("mic-processor", MicProcessor);
