// tta playground: plain JS, no build step, no external scripts. It talks to the service that serves it, through
// the public API only (GET /models, POST /jobs and its events and result), so it shows exactly what any other
// client gets.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("gen-form"), apiKeyRow: $("api-key-row"), apiKey: $("api-key"), prompt: $("prompt"), model: $("model"),
  modelHelp: $("model-help"), duration: $("duration"), steps: $("steps"), guidance: $("guidance"), seed: $("seed"),
  generate: $("generate"), cancel: $("cancel"), progressBox: $("progress-box"), progress: $("progress"),
  progressLabel: $("progress-label"), elapsed: $("elapsed"), status: $("status"), error: $("error"),
  result: $("result"), player: $("player"), download: $("download"), seedOut: $("seed-out"),
  reuseSeed: $("reuse-seed"), canvas: $("spectrogram"), timingBody: document.querySelector("#timing tbody"),
  timingHelp: $("timing-help"), mode: $("mode"), modeHelp: $("mode-help"), negativeRow: $("negative-row"),
  negative: $("negative_prompt"), initBox: $("init-box"), initFile: $("init_audio"), useLast: $("use-last"),
  initInfo: $("init-info"), initCanvas: $("init-spectrogram"), spanInfo: $("span-info"),
  levelSlider: $("level-slider"), level: $("init_noise_level"), inpaintStart: $("inpaint_start"),
  inpaintEnd: $("inpaint_end"),
};
const KEY_STORAGE = "tta-api-key";  // sessionStorage: the key lives as long as the tab, never on disk
const MAX_SEED = 2n ** 63n - 1n;    // the API's seed range; BigInt because seeds exceed 2^53
const STAGES = ["queue", "encode", "denoise", "decode"];
const PICKABLE_MODES = ["text-to-audio", "audio-to-audio", "inpainting"];  // the fourth, negative-prompt, is a field
const DEFAULT_LEVEL = { "audio-to-audio": 0.6, "inpainting": 1 };  // inpainting: the span from pure noise

let models = {};       // name -> ModelInfo from GET /models
let audioUrl = null;   // current blob: URL, revoked when a new result replaces it
let inflight = null;   // {controller: AbortController, job: its id once submitted} of the running generation
let lastResult = null; // {blob, name} of the latest generated clip, for "Use the last result"
let initClip = null;   // {blob, name, seconds, image}: the clip audio-to-audio and inpainting start from
let dragFrom = null;   // seconds where a drag on the init spectrogram started, while it lasts
let shownMode = null;  // the mode the inputs were last laid out for

// ------------------------------------------------------------------------------------------------ API helpers
function authHeaders() {
  const key = ui.apiKey.value.trim();
  return key ? { "X-API-Key": key } : {};
}

// Every API error is JSON {"error": {"code", "message", "field"?}}; anything else (a proxy page, a dropped
// connection) still becomes the same shape so that one function shows all errors.
async function readError(resp) {
  const err = { status: resp.status, code: "http_" + resp.status, message: resp.statusText || "request failed" };
  try {
    const body = await resp.json();
    if (body && body.error) Object.assign(err, body.error);
  } catch (_) { /* not JSON: keep the HTTP status text */ }
  const retry = resp.headers.get("Retry-After");
  if (retry) err.message += ` (retry after ${retry} s)`;
  return err;
}

function showError(err) {
  ui.error.hidden = false;
  ui.error.textContent = err.status ? `Error ${err.status} (${err.code}): ${err.message}` : err.message;
  // Point at the offending input when the API names one (422 invalid_input, 404 unknown_model).
  const input = err.field && ui.form.elements.namedItem(err.field);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
  for (const input of ui.form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

const setStatus = (text) => { ui.status.textContent = text; };

// ------------------------------------------------------------------------------------------------ models
async function loadModels() {
  setStatus("Loading the model list…");
  let resp;
  try {
    resp = await fetch("/models", { headers: authHeaders() });
  } catch (e) {
    setStatus("");
    showError({ message: `Cannot reach the service (${e.message}); retrying in 5 s.` });
    setTimeout(loadModels, 5000);
    return;
  }
  if (resp.status === 503) {  // still loading weights / warming up: wait as long as the server asks
    const wait = Number(resp.headers.get("Retry-After")) || 5;
    setStatus(`The service is still loading its models; retrying in ${wait} s…`);
    setTimeout(loadModels, wait * 1000);
    return;
  }
  if (!resp.ok) {
    setStatus("");
    const err = await readError(resp);
    if (resp.status === 401) {  // authentication is on: ask for a key, and reload the list once one is given
      ui.apiKeyRow.hidden = false;
      err.message += ui.apiKey.value ? " — the key entered was refused." : " — enter one in the API key field.";
      ui.apiKey.focus();
    }
    showError(err);
    return;
  }
  const list = (await resp.json()).filter((m) => m.status !== "failed");  // failed ones cannot be asked for
  models = Object.fromEntries(list.map((m) => [m.name, m]));
  const chosen = ui.model.value;
  ui.model.replaceChildren(...list.map((m) => new Option(`${m.name} — ${m.kind}, ${m.default_steps} steps`, m.name)));
  const fallback = list.find((m) => m.default) || list[0];
  ui.model.value = chosen in models ? chosen : fallback.name;
  ui.model.disabled = false;
  applyModelDefaults();
  clearError();
  setStatus("");
  ui.generate.disabled = inflight !== null;
}

// A new model brings its own step count, duration range and guidance: reset the inputs to its defaults.
function applyModelDefaults() {
  const m = models[ui.model.value];
  if (!m) return;
  ui.steps.max = m.max_steps;
  ui.steps.value = m.default_steps;
  ui.duration.max = m.max_duration;
  ui.duration.value = m.default_duration;
  ui.guidance.value = "";
  ui.guidance.placeholder = `default ${m.default_guidance}`;
  ui.modelHelp.textContent = `${m.kind} · ${m.sampler} sampler · default ${m.default_steps} steps (max ` +
    `${m.max_steps}) · up to ${m.max_duration} s · ${m.runtime}`;
  showModelModes(m);
}

// ------------------------------------------------------------------------------------------------ modes
const modelModes = () => models[ui.model.value]?.modes || ["text-to-audio"];

// The mode picker offers only what the model lists in `modes`; the negative prompt shows where it has one.
function showModelModes(m) {
  const offered = PICKABLE_MODES.filter((mode) => m.modes.includes(mode));
  const chosen = ui.mode.value;
  ui.mode.replaceChildren(...offered.map((mode) => new Option(mode, mode)));
  ui.mode.value = offered.includes(chosen) ? chosen : "text-to-audio";
  ui.mode.disabled = offered.length < 2;
  ui.modeHelp.textContent = offered.length < 2 ? "this model only generates from text" : "";
  ui.negativeRow.hidden = !m.modes.includes("negative-prompt");
  showModeInputs();
}

// What the chosen mode needs: an init clip and noise level (audio-to-audio, inpainting), a span (inpainting).
function showModeInputs() {
  const mode = ui.mode.value, inpainting = mode === "inpainting";
  ui.initBox.hidden = mode === "text-to-audio";
  for (const el of ui.initBox.querySelectorAll(".inpaint-only")) el.hidden = !inpainting;
  ui.initCanvas.classList.toggle("draggable", inpainting);
  ui.spanInfo.hidden = !inpainting;
  if (mode !== shownMode && mode in DEFAULT_LEVEL) setLevel(DEFAULT_LEVEL[mode]);
  shownMode = mode;
  drawInitTimeline();
}

function setLevel(value) {
  ui.level.value = value;
  ui.levelSlider.value = value;
}

// ------------------------------------------------------------------------------------------------ generate
// The request as a multipart form (fetch sets the content type and boundary): every value is sent as typed, so
// seeds up to 2^63 - 1 arrive exactly and the API judges every range; the init clip goes as a file.
function requestForm() {
  const mode = ui.mode.value;
  const form = new FormData();
  const add = (name, value) => { if (value.trim() !== "") form.append(name, value.trim()); };
  form.append("prompt", ui.prompt.value);
  form.append("model", ui.model.value);
  add("duration", ui.duration.value);
  add("steps", ui.steps.value);
  add("guidance", ui.guidance.value);
  add("seed", ui.seed.value);
  form.append("format", "wav");
  if (modelModes().includes("negative-prompt")) add("negative_prompt", ui.negative.value);
  if (mode !== "text-to-audio") {
    form.append("init_audio", initClip.blob, initClip.name);
    add("init_noise_level", ui.level.value);
  }
  if (mode === "inpainting") {
    add("inpaint_start", ui.inpaintStart.value);
    add("inpaint_end", ui.inpaintEnd.value);
  }
  return form;
}

function checkSeed() {
  const seed = ui.seed.value.trim();
  const ok = seed === "" || (/^\d{1,19}$/.test(seed) && BigInt(seed) <= MAX_SEED);
  ui.seed.setCustomValidity(ok ? "" : `A whole number from 0 to ${MAX_SEED}, or empty for a random seed.`);
}

// Progress comes from the job's own events (GET /jobs/{id}/events, Server-Sent Events): its place in the queue,
// one event per denoising step, decoding, then its end. Read with fetch and a stream reader rather than
// EventSource, which cannot send the API key.
async function* jobEvents(id, signal) {
  const resp = await fetch(`/jobs/${id}/events`, { headers: authHeaders(), signal });
  if (!resp.ok) throw await readError(resp);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    for (let cut = buffer.indexOf("\n\n"); cut >= 0; cut = buffer.indexOf("\n\n")) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const event = { name: null, data: {} };
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event.name = line.slice(7);
        else if (line.startsWith("data: ")) event.data = JSON.parse(line.slice(6));
      }
      if (event.name) yield event;  // lines starting ":" are keep-alives
    }
  }
}

function startProgress(steps, duration) {
  const started = performance.now();
  ui.progressBox.hidden = false;
  ui.progress.removeAttribute("value");  // indeterminate until the job is admitted
  ui.progressLabel.textContent = `Submitting ${duration} s with ${steps} steps…`;
  const tick = () => { ui.elapsed.textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`; };
  tick();
  const timer = setInterval(tick, 100);
  return () => {
    clearInterval(timer);
    ui.progressBox.hidden = true;
    return performance.now() - started;
  };
}

// One job event on the progress bar: the steps fill it to 95 %, decoding takes the rest.
function showEvent(event, steps) {
  const d = event.data;
  if (event.name === "queued") {
    ui.progressLabel.textContent = d.position ? `Queued: position ${d.position}…` : "Queued…";
  } else if (event.name === "running") {
    ui.progress.value = 0;
    ui.progressLabel.textContent = `Denoising: step 0 of ${steps}…`;
  } else if (event.name === "step") {
    ui.progress.value = 0.95 * d.step / d.steps;
    ui.progressLabel.textContent = `Denoising: step ${d.step} of ${d.steps}…`;
  } else if (event.name === "decoding") {
    ui.progress.value = 0.95;
    ui.progressLabel.textContent = "Decoding…";
  } else if (event.name === "done") {
    ui.progress.value = 1;
  }
}

async function generate(event) {
  event.preventDefault();
  if (inflight) return;
  clearError();
  checkSeed();
  if (!ui.form.reportValidity()) return;
  if (ui.mode.value !== "text-to-audio" && !initClip) {
    showError({ message: `${ui.mode.value} starts from a clip: upload one or use the last result.`,
                field: "init_audio" });
    return;
  }
  const steps = Number(ui.steps.value), duration = Number(ui.duration.value);
  inflight = { controller: new AbortController(), job: null };
  const signal = inflight.controller.signal;
  ui.generate.disabled = true;
  ui.cancel.hidden = false;
  ui.form.setAttribute("aria-busy", "true");
  setStatus("");
  const stopProgress = startProgress(steps, duration);
  try {
    const resp = await fetch("/jobs", { method: "POST", headers: authHeaders(), body: requestForm(), signal });
    if (!resp.ok) {
      stopProgress();
      if (resp.status === 401) ui.apiKeyRow.hidden = false;
      showError(await readError(resp));
      return;
    }
    const job = await resp.json();
    inflight.job = job.id;
    let last = null;
    for await (const ev of jobEvents(job.id, signal)) {
      last = ev;
      showEvent(ev, job.steps);
    }
    if (!last || last.name !== "done") {
      stopProgress();
      if (last && last.name === "cancelled") setStatus("Cancelled.");
      else showError(last ? last.data.error : { message: "the job's event stream ended early" });
      return;
    }
    const res = await fetch(`/jobs/${job.id}/result`, { headers: authHeaders(), signal });
    if (!res.ok) {
      stopProgress();
      showError(await readError(res));
      return;
    }
    const wav = await res.blob();
    const totalMs = stopProgress();
    await showResult(wav, res.headers, parseServerTiming(res.headers.get("Server-Timing")), totalMs, duration);
  } catch (e) {
    stopProgress();
    if (e.name === "AbortError") setStatus("Cancelled.");
    else if (e.status) showError(e);
    else showError({ message: `Request failed: ${e.message}` });
  } finally {
    inflight = null;
    ui.generate.disabled = false;
    ui.cancel.hidden = true;
    ui.form.removeAttribute("aria-busy");
  }
}

// Cancel: a submitted job is cancelled on the server (its stream then ends with "cancelled"); before that, the
// submission itself is abandoned.
async function cancel() {
  if (!inflight) return;
  if (!inflight.job) {
    inflight.controller.abort();
    return;
  }
  const resp = await fetch(`/jobs/${inflight.job}`, { method: "DELETE", headers: authHeaders() });
  if (!resp.ok && resp.status !== 404) showError(await readError(resp));
}

// "queue;dur=1.20, encode;dur=3.40, ..." -> {queue: 1.2, encode: 3.4, ...} in milliseconds.
function parseServerTiming(header) {
  const out = {};
  for (const entry of (header || "").split(",")) {
    const [name, ...params] = entry.trim().split(";");
    const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    if (name && dur) out[name] = Number(dur.slice(4));
  }
  return out;
}

function slug(text) {
  const s = text.normalize("NFKD").replace(/[\u0300-\u036f]/g, "").toLowerCase()
    .replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 48).replace(/-+$/, "");
  return s || "tta";
}

async function showResult(wav, headers, timings, totalMs, duration) {
  const seed = headers.get("X-Seed");
  if (audioUrl) URL.revokeObjectURL(audioUrl);
  audioUrl = URL.createObjectURL(wav);
  ui.player.src = audioUrl;
  ui.download.href = audioUrl;
  ui.download.download = `${slug(ui.prompt.value)}-seed${seed}.wav`;
  ui.download.textContent = `Download ${ui.download.download}`;
  ui.seedOut.value = seed;
  lastResult = { blob: wav, name: ui.download.download };
  ui.useLast.disabled = false;
  ui.reuseSeed.dataset.seed = seed;
  showTimings(timings, totalMs, duration, headers);
  ui.result.hidden = false;
  try {
    await drawSpectrogram(ui.canvas, await wav.arrayBuffer(), models[headers.get("X-Model")]?.sample_rate || 44100);
  } catch (e) {
    showError({ message: `The audio arrived but could not be decoded for the spectrogram: ${e.message}` });
  }
}

function showTimings(timings, totalMs, duration, headers) {
  const serverMs = STAGES.reduce((s, k) => s + (timings[k] || 0), 0);
  const rows = STAGES.map((k) => [k, timings[k] || 0]);
  rows.push(["HTTP, WAV encoding, transfer", Math.max(0, totalMs - serverMs)]);
  ui.timingBody.replaceChildren(...rows.map(([name, ms]) => {
    const tr = document.createElement("tr");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(100 * ms / Math.max(totalMs, 1e-9)).toFixed(1)}%`;
    const cells = [name, ms.toFixed(1)].map((text) => {
      const td = document.createElement("td");
      td.textContent = text;
      return td;
    });
    const barCell = document.createElement("td");
    barCell.append(bar);
    tr.append(...cells, barCell);
    return tr;
  }));
  const rtf = duration / (totalMs / 1000);
  ui.timingHelp.textContent = `Round trip ${totalMs.toFixed(0)} ms in the browser for ${duration} s of audio ` +
    `(${rtf.toFixed(1)}× real time) · model ${headers.get("X-Model")} · ${headers.get("X-Steps")} steps · ` +
    `guidance ${headers.get("X-Guidance")} · request ${headers.get("X-Request-Id")}`;
}

// ------------------------------------------------------------------------------------------------ spectrogram
// Iterative radix-2 Cooley-Tukey FFT of size n (a power of two), in place on two Float64Arrays. The bit-reversal
// table and twiddles are computed once per size because the spectrogram runs hundreds of same-size transforms.
function makeFFT(n) {
  const levels = Math.log2(n);
  if (!Number.isInteger(levels)) throw new Error(`FFT size ${n} is not a power of two`);
  const rev = new Uint32Array(n);
  for (let i = 1; i < n; i++) rev[i] = (rev[i >> 1] >> 1) | ((i & 1) << (levels - 1));
  const cos = new Float64Array(n / 2), sin = new Float64Array(n / 2);
  for (let i = 0; i < n / 2; i++) {
    cos[i] = Math.cos(2 * Math.PI * i / n);
    sin[i] = Math.sin(2 * Math.PI * i / n);
  }
  return function fft(re, im) {
    for (let i = 0; i < n; i++) {
      const j = rev[i];
      if (j > i) {
        [re[i], re[j]] = [re[j], re[i]];
        [im[i], im[j]] = [im[j], im[i]];
      }
    }
    for (let size = 2; size <= n; size <<= 1) {
      const half = size >> 1, stride = n / size;
      for (let start = 0; start < n; start += size) {
        for (let k = 0; k < half; k++) {
          const wr = cos[k * stride], wi = -sin[k * stride];  // e^(-2 pi i k / size): the forward transform
          const a = start + k, b = a + half;
          const tr = re[b] * wr - im[b] * wi, ti = re[b] * wi + im[b] * wr;
          re[b] = re[a] - tr; im[b] = im[a] - ti;
          re[a] += tr; im[a] += ti;
        }
      }
    }
  };
}

// Short-time power spectra in dB of a mono signal: `columns` Hann-windowed frames of `size` samples spread evenly
// over the clip (the hop follows the clip length, so every clip fills the canvas). Returns frames x (size/2 + 1).
function stftDb(signal, size, columns) {
  const fft = makeFFT(size), bins = size / 2 + 1;
  const window = new Float64Array(size);
  for (let i = 0; i < size; i++) window[i] = 0.5 - 0.5 * Math.cos(2 * Math.PI * i / size);
  const norm = 1 / (size / 4) ** 2;  // a Hann-windowed full-scale sine peaks at size/4: it reads 0 dB
  const hop = Math.max(0, signal.length - size) / Math.max(1, columns - 1);
  const out = new Float32Array(columns * bins);
  const re = new Float64Array(size), im = new Float64Array(size);
  for (let c = 0; c < columns; c++) {
    const start = Math.round(c * hop);
    for (let i = 0; i < size; i++) {
      re[i] = (signal[start + i] || 0) * window[i];  // past the end: zero padding
      im[i] = 0;
    }
    fft(re, im);
    for (let k = 0; k < bins; k++) out[c * bins + k] = 10 * Math.log10((re[k] ** 2 + im[k] ** 2) * norm + 1e-12);
  }
  return { db: out, bins, columns };
}

// Perceptually ordered dark-to-bright anchors (close to matplotlib's "inferno"); values in between interpolate.
const COLOURS = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
  [250, 193, 39], [252, 255, 164]];
function colour(v) {
  const x = Math.min(1, Math.max(0, v)) * (COLOURS.length - 1);
  const i = Math.min(COLOURS.length - 2, Math.floor(x)), f = x - i;
  return COLOURS[i].map((c, j) => c + (COLOURS[i + 1][j] - c) * f);
}

const RANGE_DB = 80;

// An audio file's bytes -> its mono mix and the decoded AudioBuffer. An OfflineAudioContext decodes without a user
// gesture; at the file's own rate it also decodes without resampling.
async function decodeMono(bytes, sampleRate) {
  const audio = await new OfflineAudioContext(1, 1, sampleRate).decodeAudioData(bytes);
  const mono = new Float32Array(audio.length);
  for (let ch = 0; ch < audio.numberOfChannels; ch++) {
    const data = audio.getChannelData(ch);
    for (let i = 0; i < data.length; i++) mono[i] += data[i] / audio.numberOfChannels;
  }
  return { mono, audio };
}

// The spectrogram as a small canvas of frames x bins pixels (high frequencies at the top), to be stretched onto a
// bigger one with drawImage; `top` is its peak in dBFS.
function spectrogramImage(mono, maxColumns) {
  const { db, bins, columns } = stftDb(mono, 1024, Math.min(maxColumns, Math.max(1, Math.floor(mono.length / 256))));
  const top = db.reduce((m, v) => Math.max(m, v), -Infinity);
  const image = new ImageData(columns, bins);
  for (let c = 0; c < columns; c++) {
    for (let k = 0; k < bins; k++) {
      const [r, g, b] = colour((db[c * bins + k] - top + RANGE_DB) / RANGE_DB);
      const p = 4 * ((bins - 1 - k) * columns + c);
      image.data[p] = r; image.data[p + 1] = g; image.data[p + 2] = b; image.data[p + 3] = 255;
    }
  }
  const small = document.createElement("canvas");
  small.width = columns;
  small.height = bins;
  small.getContext("2d").putImageData(image, 0, 0);
  return { image: small, top };
}

async function drawSpectrogram(canvas, wavBytes, sampleRate) {
  const { mono, audio } = await decodeMono(wavBytes, sampleRate);
  const { image, top } = spectrogramImage(mono, canvas.width);
  const g = canvas.getContext("2d");
  g.imageSmoothingEnabled = true;
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.drawImage(image, 0, 0, canvas.width, canvas.height);
  canvas.setAttribute("aria-label", `Spectrogram of ${(audio.length / audio.sampleRate).toFixed(2)} s of ` +
    `${audio.numberOfChannels}-channel audio at ${audio.sampleRate} Hz; peak ${top.toFixed(0)} dBFS`);
}

// ------------------------------------------------------------------------------------------------ init clip
// The clip that audio-to-audio and inpainting start from: an uploaded file or the last result. Its spectrogram is
// drawn on a timeline of the requested duration, so a duration longer than the clip shows room to outpaint.
async function useInitClip(blob, name) {
  const clip = { blob, name, seconds: null, image: null };
  initClip = clip;
  ui.initInfo.textContent = `${name} (${(blob.size / 1024).toFixed(1)} KiB)`;
  try {
    const { mono, audio } = await decodeMono(await blob.arrayBuffer(), 44100);
    if (initClip !== clip) return;  // another clip was chosen meanwhile
    clip.seconds = audio.length / audio.sampleRate;
    clip.image = spectrogramImage(mono, ui.initCanvas.width).image;
    ui.initInfo.textContent += ` · ${clip.seconds.toFixed(2)} s, ${audio.numberOfChannels} channel(s)`;
    ui.initCanvas.setAttribute("aria-label", `Spectrogram of the init clip ${name}, ${clip.seconds.toFixed(2)} s`);
    fitDurationToClip(clip.seconds);
  } catch (e) {
    if (initClip === clip) ui.initInfo.textContent += ` · no preview (${e.message}); the server decodes it itself`;
  }
  drawInitTimeline();
}

// Start from the clip's own length (to 0.1 s, within the model's maximum); a longer duration outpaints.
function fitDurationToClip(seconds) {
  const max = Number(ui.duration.max) || Infinity;
  ui.duration.value = Math.min(max, Math.max(0.5, Math.round(seconds * 10) / 10));
}

function timelineSeconds() {
  return Number(ui.duration.value) > 0 ? Number(ui.duration.value) : initClip?.seconds || 1;
}

function drawInitTimeline() {
  const canvas = ui.initCanvas, g = canvas.getContext("2d"), { width, height } = canvas;
  const total = timelineSeconds();
  g.fillStyle = "#222";  // past the clip's end: silence, or what outpainting fills
  g.fillRect(0, 0, width, height);
  if (initClip?.image) {  // the part of the clip within the duration; the server cuts the rest
    const shown = Math.min(1, total / initClip.seconds);
    g.drawImage(initClip.image, 0, 0, initClip.image.width * shown, initClip.image.height,
                0, 0, width * Math.min(1, initClip.seconds / total), height);
  }
  if (ui.mode.value === "inpainting") drawSpan(g, total);
}

// The span to regenerate as a highlighted region with its start and end seconds.
function drawSpan(g, total) {
  const start = Number(ui.inpaintStart.value), end = Number(ui.inpaintEnd.value);
  const { width, height } = g.canvas;
  if (ui.inpaintStart.value === "" || ui.inpaintEnd.value === "") {
    ui.spanInfo.textContent = "Drag across the spectrogram to mark the span to regenerate.";
    return;
  }
  const x0 = width * start / total, x1 = width * end / total;
  g.fillStyle = "rgba(143, 166, 255, 0.35)";
  g.fillRect(x0, 0, x1 - x0, height);
  g.fillStyle = "#fff";
  g.fillRect(x0 - 1, 0, 2, height);
  g.fillRect(x1 - 1, 0, 2, height);
  g.font = "14px system-ui, sans-serif";
  g.fillText(`${start.toFixed(2)} s`, x0 + 4, 16);
  g.fillText(`${end.toFixed(2)} s`, x1 + 4, height - 8);
  const past = initClip?.seconds != null && end > initClip.seconds ? " (past the clip's end: outpainting)" : "";
  ui.spanInfo.textContent = `Regenerates ${start.toFixed(2)}-${end.toFixed(2)} s of ${total} s and keeps the ` +
    `rest${past}. Drag across the spectrogram to mark another span.`;
}

// A pointer's position on the init spectrogram in seconds of the timeline (to 0.01 s).
function pointerSeconds(event) {
  const rect = ui.initCanvas.getBoundingClientRect();
  const fraction = Math.min(1, Math.max(0, (event.clientX - rect.left) / rect.width));
  return Math.round(fraction * timelineSeconds() * 100) / 100;
}

function startSpanDrag(event) {
  if (ui.mode.value !== "inpainting") return;
  dragFrom = pointerSeconds(event);
  ui.initCanvas.setPointerCapture(event.pointerId);
  setSpan(dragFrom, dragFrom);
}

function moveSpanDrag(event) {
  if (dragFrom === null) return;
  const here = pointerSeconds(event);
  setSpan(Math.min(dragFrom, here), Math.max(dragFrom, here));
}

function setSpan(start, end) {
  ui.inpaintStart.value = start.toFixed(2);
  ui.inpaintEnd.value = end.toFixed(2);
  drawInitTimeline();
}

// ------------------------------------------------------------------------------------------------ wiring
ui.form.addEventListener("submit", generate);
ui.cancel.addEventListener("click", cancel);
ui.model.addEventListener("change", applyModelDefaults);
ui.mode.addEventListener("change", showModeInputs);
ui.duration.addEventListener("input", drawInitTimeline);
ui.initFile.addEventListener("change", () => {
  const file = ui.initFile.files[0];
  if (file) useInitClip(file, file.name);
});
ui.useLast.addEventListener("click", () => {
  ui.initFile.value = "";
  useInitClip(lastResult.blob, lastResult.name);
});
ui.levelSlider.addEventListener("input", () => { ui.level.value = ui.levelSlider.value; });
ui.level.addEventListener("input", () => { ui.levelSlider.value = ui.level.value; });
ui.inpaintStart.addEventListener("input", drawInitTimeline);
ui.inpaintEnd.addEventListener("input", drawInitTimeline);
ui.initCanvas.addEventListener("pointerdown", startSpanDrag);
ui.initCanvas.addEventListener("pointermove", moveSpanDrag);
ui.initCanvas.addEventListener("pointerup", () => { dragFrom = null; });
ui.initCanvas.addEventListener("pointercancel", () => { dragFrom = null; });
ui.seed.addEventListener("input", checkSeed);
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ui.form.requestSubmit();
});
ui.reuseSeed.addEventListener("click", () => { ui.seed.value = ui.reuseSeed.dataset.seed || ""; checkSeed(); });
ui.apiKey.addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORAGE, ui.apiKey.value.trim());
  loadModels();
});
const savedKey = sessionStorage.getItem(KEY_STORAGE);
if (savedKey) {
  ui.apiKey.value = savedKey;
  ui.apiKeyRow.hidden = false;
}
loadModels();

// Exposed for the browser test and the console: the maths the spectrogram is built on.
window.playground = { makeFFT, stftDb, parseServerTiming };
