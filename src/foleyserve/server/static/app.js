// foleyserve web page: upload a video, follow the job, play and inspect the result.
// Plain ES module, no build step and no third-party code, so the page works offline.
// It talks only to the public HTTP API (/v1/info, /v1/generations...).

import { orderedResults, rankedByText, scoreCell } from "./bestof.js";

const API = "v1/generations"; // relative: the page keeps working behind a proxy sub-path
const INFO = "v1/info";
const POLL_MS = 500;
const INFO_RETRY_MS = [3000, 30000]; // first and longest wait before asking a loading server again
const RECENT_LIMIT = 20;
const KEY_STORAGE = "foleyserve.apiKey";
const CLIENT_STORAGE = "foleyserve.clientId";
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
// What the page assumes of a server whose /v1/info is missing or older than the page.
const FALLBACK_LIMITS = {
  steps: [1, 1000], guidance: [0, 100], maxUploadBytes: 0, maxSeconds: 15, maxPromptChars: 2000,
  numSamples: [1, 8], textSeconds: [0.64, 15], bestOf: [2, 8],
};
// Without a video there is nothing to put the sound in: audio formats only.
const TEXT_OUTPUTS = ["wav", "flac"];
const OUTPUT_LABELS = {
  mp4: "MP4: the video with the new sound",
  wav: "WAV audio",
  flac: "FLAC audio",
};

const $ = (id) => document.getElementById(id);

const el = {
  demoBanner: $("demo-banner"),
  videoLimits: $("video-limits"),
  stepsHint: $("steps-hint"),
  guidanceHint: $("guidance-hint"),
  alert: $("alert"),
  alertMessage: $("alert-message"),
  alertClose: $("alert-close"),
  keyForm: $("apikey-form"),
  keyInput: $("apikey-input"),
  form: $("generate-form"),
  dropzone: $("dropzone"),
  videoInput: $("video-input"),
  videoInfo: $("video-info"),
  preview: $("preview"),
  prompt: $("prompt"),
  negative: $("negative-prompt"),
  steps: $("steps"),
  guidance: $("guidance"),
  seed: $("seed"),
  seedRandom: $("seed-random"),
  output: $("output"),
  modeRadios: document.querySelectorAll("input[name=mode]"),
  videoField: $("video-field"),
  durationField: $("duration-field"),
  duration: $("duration"),
  durationHint: $("duration-hint"),
  numSamples: $("num-samples"),
  samplesHint: $("samples-hint"),
  bestOf: $("best-of"),
  bestOfField: $("best-of-field"),
  samples: $("samples"),
  sampleList: $("sample-list"),
  generate: $("generate"),
  jobEmpty: $("job-empty"),
  progressPanel: $("progress-panel"),
  status: $("status"),
  progressBar: $("progress-bar"),
  progressText: $("progress-text"),
  cancel: $("cancel"),
  result: $("result"),
  resultVideo: $("result-video"),
  resultAudio: $("result-audio"),
  waveform: $("waveform"),
  waveformCaption: $("waveform-caption"),
  downloadMain: $("download-main"),
  downloadAudio: $("download-audio"),
  resultMeta: $("result-meta"),
  reuseSeed: $("reuse-seed"),
  recentList: $("recent-jobs"),
  recentEmpty: $("recent-empty"),
  recentRefresh: $("recent-refresh"),
};

const state = {
  file: null, // the chosen video File
  previewUrl: null,
  jobId: null, // the job shown in the Result panel
  track: 0, // bumped whenever the shown job changes, so stale polls and downloads stop
  resultUrls: [], // object URLs of the shown result, revoked when it is replaced
  audio: null, // {data: Float32Array[], sampleRate, duration} of the shown result, for redraws
  lastSeed: null,
  uploading: false,
  submitted: new Map(), // job id -> the seed string this page sent
  limits: { ...FALLBACK_LIMITS },
  info: null, // the promise of the latest /v1/info answer, which a submit waits for
  touched: new Set(), // fields the user has edited, which the server's defaults must not overwrite
  mode: "video", // or "text": text to audio, no video
  outputs: { video: ["mp4", "wav", "flac"], text: TEXT_OUTPUTS, videoDefault: "mp4", textDefault: "wav" },
  samples: [], // [{seed, audioBlob, mainBlob}] of the shown job when it has several
};

// ---------------------------------------------------------------------------------------------
// talking to the server

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function newClientId() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  // randomUUID exists only in secure contexts; a page served over plain HTTP on a LAN address
  // still has getRandomValues, so build the same version-4 UUID from it.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

// The server lists only the jobs sent with the same id, so this browser sees its own history.
// It is not a secret: it sorts jobs, the API key is what guards them.
const CLIENT_ID = (() => {
  try {
    let id = localStorage.getItem(CLIENT_STORAGE);
    if (!id) {
      id = newClientId();
      localStorage.setItem(CLIENT_STORAGE, id);
    }
    return id;
  } catch {
    return newClientId(); // storage refused (private mode, policy): a history for this visit only
  }
})();

function requestHeaders() {
  const key = apiKey();
  const headers = { "X-Client-Id": CLIENT_ID };
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// The server answers {"error": {"code", "message"}}; FastAPI's own fallbacks use {"detail": ...}.
function errorFromBody(status, body, fallbackText) {
  if (body && typeof body === "object") {
    if (body.error && typeof body.error === "object") {
      return new ApiError(status, body.error.code || `http_${status}`, body.error.message || fallbackText);
    }
    if (body.detail !== undefined) {
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      return new ApiError(status, `http_${status}`, detail);
    }
  }
  const text = (fallbackText || "").trim().slice(0, 300);
  return new ApiError(status, `http_${status}`, text || `the server answered HTTP ${status}`);
}

async function errorFromResponse(response) {
  const text = await response.text().catch(() => "");
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: a proxy error page, say; its text is the best description we have
  }
  return errorFromBody(response.status, body, text);
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...requestHeaders(), ...(options.headers || {}) } });
  } catch (e) {
    throw new ApiError(0, "network", `cannot reach the server (${e.message}); check that it is running`);
  }
  if (!response.ok) {
    const err = await errorFromResponse(response);
    if (response.status === 401) askForKey();
    throw err;
  }
  return response;
}

// XMLHttpRequest rather than fetch for the upload: fetch cannot report upload progress.
function uploadJob(formData, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", API);
    for (const [name, value] of Object.entries(requestHeaders())) xhr.setRequestHeader(name, value);
    xhr.responseType = "text";
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // handled below as a non-JSON answer
      }
      if (xhr.status >= 200 && xhr.status < 300 && body && body.id) {
        resolve(body);
        return;
      }
      const err = errorFromBody(xhr.status, body, xhr.responseText);
      if (xhr.status === 429) {
        const wait = xhr.getResponseHeader("Retry-After");
        if (wait) err.message += ` (try again in about ${wait} s)`;
      }
      if (xhr.status === 401) askForKey();
      reject(err);
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network", "the upload failed: cannot reach the server")));
    xhr.addEventListener("abort", () => reject(new ApiError(0, "aborted", "the upload was aborted")));
    xhr.send(formData);
  });
}

// ---------------------------------------------------------------------------------------------
// alert and API key

const STATUS_HINTS = {
  0: "No connection",
  400: "Bad request",
  401: "API key needed",
  403: "Not allowed",
  404: "Not found",
  410: "Result expired",
  413: "The video is too large",
  415: "That file is not a video the server can read",
  422: "The server cannot use this request",
  429: "The server is busy",
  503: "The server is not ready",
};

function describeError(err) {
  if (!(err instanceof ApiError)) return `Something went wrong in the page: ${err && err.message ? err.message : err}`;
  const hint = STATUS_HINTS[err.status] || (err.status >= 500 ? "Server error" : `HTTP ${err.status}`);
  return `${hint}: ${err.message}`;
}

function showAlert(text, code = "") {
  el.alertMessage.textContent = text;
  el.alert.dataset.code = code;
  el.alert.hidden = false;
}

function showError(err) {
  showAlert(describeError(err), err instanceof ApiError ? err.code : "page_error");
}

function hideAlert() {
  el.alert.hidden = true;
  el.alertMessage.textContent = "";
  delete el.alert.dataset.code;
}

function askForKey() {
  const hadKey = Boolean(apiKey());
  if (hadKey) sessionStorage.removeItem(KEY_STORAGE);
  el.keyForm.hidden = false;
  el.keyInput.value = "";
  el.keyInput.focus();
  showAlert(
    hadKey
      ? "API key needed: the server did not accept the key. Enter it again above."
      : "API key needed: this server only answers requests with a key. Enter it above, then try again.",
    "unauthorized",
  );
}

el.keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const key = el.keyInput.value.trim();
  if (!key) {
    showAlert("API key needed: the key field is empty.", "unauthorized");
    el.keyInput.focus();
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  el.keyInput.value = "";
  el.keyForm.hidden = true;
  hideAlert();
  start();
});

el.alertClose.addEventListener("click", hideAlert);

// ---------------------------------------------------------------------------------------------
// choosing a video

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} kB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function chooseFile(file) {
  hideAlert();
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.file = file || null;
  state.previewUrl = null;
  el.preview.removeAttribute("src");
  el.preview.hidden = true;
  if (!file) {
    el.videoInfo.textContent = "";
    return;
  }
  el.videoInfo.textContent = `${file.name} · ${formatBytes(file.size)}`;
  if (file.size === 0) {
    showAlert(`Empty file: ${file.name} has no content; choose another video.`, "empty_file");
    state.file = null;
    return;
  }
  if (tooLarge(file)) {
    showAlert(tooLargeMessage(file), "payload_too_large");
    state.file = null;
    return;
  }
  state.previewUrl = URL.createObjectURL(file);
  el.preview.src = state.previewUrl;
  el.preview.hidden = false;
}

function tooLarge(file) {
  return state.limits.maxUploadBytes > 0 && file.size > state.limits.maxUploadBytes;
}

function tooLargeMessage(file) {
  return `The video is too large: ${file.name} is ${formatBytes(file.size)} and this server takes at most ${formatBytes(state.limits.maxUploadBytes)}. Trim or re-encode it.`;
}

el.preview.addEventListener("loadedmetadata", () => {
  if (state.file && Number.isFinite(el.preview.duration)) {
    let text = `${state.file.name} · ${formatBytes(state.file.size)} · ${el.preview.duration.toFixed(1)} s`;
    const max = state.limits.maxSeconds;
    if (max > 0 && el.preview.duration > max + 0.05) text += ` · sound for the first ${max} s only; the rest stays silent`;
    el.videoInfo.textContent = text;
  }
});

// The browser may lack a codec the server has, so a failed preview is a note, not a refusal.
el.preview.addEventListener("error", () => {
  if (!state.file) return;
  el.preview.hidden = true;
  el.videoInfo.textContent = `${state.file.name} · ${formatBytes(state.file.size)} · this browser cannot preview it; the server will check it`;
});

el.videoInput.addEventListener("change", () => chooseFile(el.videoInput.files[0]));

for (const type of ["dragenter", "dragover"]) {
  el.dropzone.addEventListener(type, (e) => {
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
    el.dropzone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "dragend"]) {
  el.dropzone.addEventListener(type, (e) => {
    if (!el.dropzone.contains(e.relatedTarget)) el.dropzone.classList.remove("dragging");
  });
}
el.dropzone.addEventListener("drop", (e) => {
  e.preventDefault();
  el.dropzone.classList.remove("dragging");
  const files = e.dataTransfer.files;
  if (!files || files.length === 0) {
    showAlert("Nothing to upload: drop a video file (not a link or text).", "no_file");
    return;
  }
  // Keep the file input in step with the drop, so the form shows what will be sent.
  try {
    el.videoInput.files = files;
  } catch {
    // older browsers cannot assign FileLists; the dropped file is still used below
  }
  chooseFile(files[0]);
});
// A file dropped next to the drop zone would otherwise make the browser navigate away from the page.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

// ---------------------------------------------------------------------------------------------
// the form

function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

el.seedRandom.addEventListener("click", () => {
  el.seed.value = String(randomSeed());
});

el.reuseSeed.addEventListener("click", () => {
  if (state.lastSeed !== null) {
    el.seed.value = String(state.lastSeed);
    el.seed.focus();
  }
});

function setMode(mode) {
  state.mode = mode === "text" ? "text" : "video";
  const textOnly = state.mode === "text";
  el.videoField.hidden = textOnly;
  el.durationField.hidden = !textOnly;
  for (const radio of el.modeRadios) radio.checked = radio.value === state.mode;
  const o = state.outputs;
  setOutputs(textOnly ? o.text : o.video, textOnly ? o.textDefault : o.videoDefault);
  if (textOnly) hideAlert(); // a message about the video no longer applies
}

for (const radio of el.modeRadios) radio.addEventListener("change", () => radio.checked && setMode(radio.value));

function fieldLabel(input) {
  const label = document.querySelector(`label[for="${input.id}"]`);
  return label ? label.textContent.trim() : input.name;
}

function firstInvalidField() {
  const fields = [el.steps, el.guidance, el.seed, el.numSamples];
  if (state.mode === "text") fields.unshift(el.duration);
  for (const input of fields) {
    if (!input.checkValidity()) return input;
  }
  return null;
}

function setUploading(fraction) {
  state.uploading = fraction !== null;
  el.generate.disabled = state.uploading;
  el.generate.setAttribute("aria-busy", String(state.uploading));
  el.generate.textContent = state.uploading ? `Uploading ${Math.round(fraction * 100)}%` : "Generate";
}

el.form.addEventListener("submit", async (e) => {
  e.preventDefault();
  if (state.uploading) return;
  hideAlert();
  const textOnly = state.mode === "text";
  if (!textOnly && !state.file) {
    showAlert("No video chosen: drop a video file on the drop zone or use the file picker, or choose Text only.", "no_file");
    el.videoInput.focus();
    return;
  }
  // The fields' ranges come from the server: a press before its answer must not skip them.
  if (state.info) {
    state.uploading = true;
    try {
      await state.info;
    } finally {
      state.uploading = false;
    }
  }
  if (!textOnly && tooLarge(state.file)) {
    showAlert(tooLargeMessage(state.file), "payload_too_large");
    return;
  }
  const invalid = firstInvalidField();
  if (invalid) {
    showAlert(`${fieldLabel(invalid)}: ${invalid.validationMessage}`, "invalid_parameter");
    invalid.focus();
    return;
  }
  // Sent as typed: seeds go up to 2**63, past what a JS number holds exactly.
  const seed = el.seed.value.trim() === "" ? String(randomSeed()) : el.seed.value.trim();
  const data = new FormData();
  if (textOnly) data.append("duration", el.duration.value);
  else data.append("video", state.file, state.file.name);
  data.append("prompt", el.prompt.value);
  data.append("negative_prompt", el.negative.value);
  data.append("steps", el.steps.value);
  data.append("guidance", el.guidance.value);
  data.append("seed", seed);
  data.append("output", el.output.value);
  // Only when asked for: a server older than the field would refuse it as unknown.
  const takes = Number(el.numSamples.value);
  if (el.bestOf.checked && !el.bestOfField.hidden) {
    const [low, high] = state.limits.bestOf || FALLBACK_LIMITS.bestOf;
    if (takes < low || takes > high) {
      showAlert(`Samples: ranking needs ${low}–${high} samples to compare; set Samples or untick the ranking.`, "invalid_parameter");
      el.numSamples.focus();
      return;
    }
    data.append("best_of", String(takes));
    data.append("rank", state.rank || "desync,clap");
  } else if (takes > 1) data.append("num_samples", el.numSamples.value);
  setUploading(0);
  let created;
  try {
    created = await uploadJob(data, setUploading);
  } catch (err) {
    showError(err);
    return;
  } finally {
    setUploading(null);
  }
  state.lastSeed = seed;
  state.submitted.set(created.id, seed);
  refreshRecent();
  track(created.id, created);
});

// ---------------------------------------------------------------------------------------------
// following a job

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function statusLine(job) {
  const step = job.progress ? job.progress.step : 0;
  const total = job.progress ? job.progress.total : 0;
  switch (job.status) {
    case "queued":
      return "Queued: waiting for the model";
    case "preparing":
      return "Preparing: reading the video and prompt…";
    case "running":
      return step > 0 && total > 0 ? `Generating: step ${step} of ${total}` : "Generating: starting";
    case "succeeded":
      return job.cache_hit ? "Done (served from the cache)" : "Done";
    case "failed":
      return "Failed";
    case "cancelled":
      return "Cancelled";
    default:
      return job.status || "Unknown status";
  }
}

const NO_RESULT = {
  failed: "No result: the job failed; the reason is shown beside the Generate button.",
  cancelled: "No result: the job was cancelled.",
};

function renderProgress(job) {
  // The progress itself is in the form's dock; this panel says where the result will be.
  el.jobEmpty.hidden = job.status === "succeeded";
  el.jobEmpty.textContent = FINAL.has(job.status)
    ? NO_RESULT[job.status] || ""
    : "The result will appear here when the job is done.";
  el.progressPanel.hidden = false;
  el.progressPanel.dataset.status = job.status;
  el.status.textContent = statusLine(job);
  const total = job.progress && job.progress.total > 0 ? job.progress.total : 0;
  const step = job.progress ? Math.min(job.progress.step, total) : 0;
  const bar = el.progressBar;
  if (job.status === "succeeded") {
    bar.max = total || 1;
    bar.value = bar.max; // a cache hit never runs a step, yet it is complete
  } else if (job.status === "running" && total > 0 && step > 0) {
    bar.max = total;
    bar.value = step;
  } else if (FINAL.has(job.status)) {
    bar.max = total || 1;
    bar.value = step;
  } else {
    bar.removeAttribute("value"); // indeterminate while queued or preparing
  }
  el.progressText.textContent = total > 0 && (job.status === "running" || FINAL.has(job.status))
    ? `${job.status === "succeeded" ? total : step} / ${total} denoising steps`
    : "";
  el.cancel.hidden = FINAL.has(job.status);
  if (FINAL.has(job.status)) el.cancel.disabled = false;
}

function clearResult() {
  for (const url of state.resultUrls) URL.revokeObjectURL(url);
  state.resultUrls = [];
  state.audio = null;
  for (const player of [el.resultVideo, el.resultAudio]) {
    player.pause();
    player.removeAttribute("src");
    player.load();
    player.hidden = true;
  }
  el.downloadMain.hidden = true;
  el.downloadAudio.hidden = true;
  el.downloadMain.removeAttribute("href");
  el.downloadAudio.removeAttribute("href");
  el.resultMeta.replaceChildren();
  el.reuseSeed.hidden = true;
  state.samples = [];
  el.sampleList.replaceChildren();
  el.samples.hidden = true;
  const ctx = el.waveform.getContext("2d");
  ctx.clearRect(0, 0, el.waveform.width, el.waveform.height);
  delete el.waveform.dataset.drawn;
  el.result.hidden = true;
}

async function track(id, first = null) {
  const token = ++state.track;
  state.jobId = id;
  markSelected();
  clearResult();
  el.cancel.disabled = false;
  if (first) renderProgress({ progress: { step: 0, total: 0 }, ...first });
  let failures = 0;
  let lastStatus = null;
  while (token === state.track) {
    let job;
    try {
      job = await (await api(`${API}/${encodeURIComponent(id)}`)).json();
      failures = 0;
    } catch (err) {
      if (token !== state.track) return;
      // A restart or a dropped connection should not lose the job: keep asking, more slowly.
      if (err.status === 0 || err.status >= 502) {
        failures += 1;
        el.status.textContent = `Lost contact with the server; retrying (${failures})`;
        await sleep(Math.min(POLL_MS * 2 ** failures, 10000));
        continue;
      }
      showError(err);
      el.progressPanel.hidden = true;
      return;
    }
    if (token !== state.track) return;
    renderProgress(job);
    if (job.status !== lastStatus) {
      lastStatus = job.status;
      updateRecentItem(job); // keep the list's badge in step with what the panel shows
    }
    if (FINAL.has(job.status)) {
      await finished(job, token);
      return;
    }
    await sleep(POLL_MS);
  }
}

async function finished(job, token) {
  if (job.status === "failed") {
    const err = job.error || {};
    showAlert(`The job failed (${err.code || "error"}): ${err.message || "no reason given"}`, err.code || "failed");
    return;
  }
  if (job.status === "succeeded") await showResult(job, token);
}

el.cancel.addEventListener("click", async () => {
  const id = state.jobId;
  if (!id) return;
  el.cancel.disabled = true;
  el.status.textContent = "Cancelling";
  try {
    await api(`${API}/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (err) {
    showError(err);
    el.cancel.disabled = false;
  }
  // The poll loop picks up the final status.
});

// ---------------------------------------------------------------------------------------------
// showing a result

async function fetchBlob(url) {
  const response = await api(url);
  return response.blob();
}

function extensionOf(blob, fallback) {
  const type = (blob.type || "").toLowerCase();
  if (type.includes("mp4")) return "mp4";
  if (type.includes("flac")) return "flac";
  if (type.includes("wav") || type.includes("wave")) return "wav";
  return fallback;
}

function objectUrl(blob) {
  const url = URL.createObjectURL(blob);
  state.resultUrls.push(url);
  return url;
}

function metaRow(term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  el.resultMeta.append(dt, dd);
}

function jobSeed(job) {
  if (Number.isFinite(job.seed)) return job.seed;
  const params = job.params || job.request || {};
  return Number.isFinite(params.seed) ? params.seed : null;
}

function describeTimings(timings) {
  if (!timings || typeof timings !== "object") return "";
  const parts = Object.entries(timings)
    .filter(([, s]) => Number.isFinite(s))
    .map(([stage, s]) => `${stage} ${s.toFixed(2)} s`);
  return parts.join(" · ");
}

// Seed k of a job as exact text: the typed seed string plus k (seeds reach past 2**53).
function takeSeed(job, result, k) {
  const typed = state.submitted.get(job.id);
  if (typed !== undefined && /^\d+$/.test(String(typed))) return String(BigInt(typed) + BigInt(k));
  return result && result.seed !== undefined ? String(result.seed) : jobSeed(job);
}

async function fetchTake(job, result, k) {
  const video = result ? result.video_url : job.video_url;
  const audio = result ? result.audio_url : job.audio_url;
  return {
    seed: takeSeed(job, result, k),
    mainBlob: video ? await fetchBlob(video) : null,
    audioBlob: audio ? await fetchBlob(audio) : null,
  };
}

async function showResult(job, token) {
  // A best_of job's samples are listed best first, so the first take is the kept one.
  const results = Array.isArray(job.results) && job.results.length > 1 ? orderedResults(job) : null;
  let takes;
  try {
    // Every take is fetched up front: with an API key a plain link could not be played.
    takes = results
      ? await Promise.all(results.map(async ({ result, k, candidate }) => ({ ...(await fetchTake(job, result, k)), candidate })))
      : [await fetchTake(job, null, 0)];
  } catch (err) {
    if (token === state.track) showError(err);
    return;
  }
  if (token !== state.track) return;
  if (!takes[0].mainBlob && !takes[0].audioBlob) {
    if (job.expired) showAlert("Result expired: the server has deleted this job's files (retention limit).", "expired");
    else showAlert("The job finished but the server lists no file to download.", "no_result_file");
    return;
  }
  if (results) {
    state.samples = takes;
    renderSamples(job, token);
  }
  await showTake(job, takes[0], token);
}

function takeUrls(take) {
  if (take.mainBlob && !take.mainUrl) take.mainUrl = objectUrl(take.mainBlob);
  if (take.audioBlob && !take.audioUrl) take.audioUrl = objectUrl(take.audioBlob);
  return take;
}

function takeName(job, take, ext) {
  const label = state.samples.length > 1 ? `-seed${take.seed}` : "";
  return `foley-${String(job.id).slice(0, 8)}${label}.${ext}`;
}

// The main player, downloads, details and waveform show one take (the first, or the one picked).
async function showTake(job, take, token) {
  takeUrls(take);
  for (const player of [el.resultVideo, el.resultAudio]) {
    player.pause();
    player.hidden = true;
  }
  el.downloadMain.hidden = true;
  el.downloadAudio.hidden = true;
  el.result.hidden = false;
  if (take.mainBlob) {
    el.resultVideo.src = take.mainUrl;
    el.resultVideo.hidden = false;
    el.downloadMain.href = take.mainUrl;
    el.downloadMain.download = takeName(job, take, "mp4");
    el.downloadMain.textContent = "Download video (MP4)";
    el.downloadMain.hidden = false;
    if (take.audioBlob) {
      const ext = extensionOf(take.audioBlob, "wav");
      el.downloadAudio.href = take.audioUrl;
      el.downloadAudio.download = takeName(job, take, ext);
      el.downloadAudio.textContent = `Download audio (${ext.toUpperCase()})`;
      el.downloadAudio.hidden = false;
    }
  } else {
    const ext = extensionOf(take.audioBlob, job.output || "wav");
    el.resultAudio.src = take.audioUrl;
    el.resultAudio.hidden = false;
    el.downloadMain.href = take.audioUrl;
    el.downloadMain.download = takeName(job, take, ext);
    el.downloadMain.textContent = `Download audio (${ext.toUpperCase()})`;
    el.downloadMain.hidden = false;
  }

  el.resultMeta.replaceChildren();
  if (job.prompt !== undefined) metaRow("Prompt", job.prompt || "(none)");
  if (job.text_only) metaRow("Source", "text only (no video)");
  if (take.seed !== null && take.seed !== undefined) {
    metaRow("Seed", String(take.seed));
    state.lastSeed = take.seed;
    el.reuseSeed.hidden = false;
  }
  metaRow("Cache", job.cache_hit ? "hit: no model ran" : "miss");
  const timings = describeTimings(job.timings);
  if (timings) metaRow("Timings", timings);
  if (Array.isArray(job.warnings) && job.warnings.length) metaRow("Notes", job.warnings.join(" "));
  if (take.candidate) metaRow("Ranked by", rankedByText(job));

  // The WAV is the cheapest thing to decode; the MP4's AAC track is the fallback.
  await drawFromBlob(take.audioBlob || take.mainBlob, token);
}

function renderSamples(job, token) {
  const items = state.samples.map((take, k) => {
    takeUrls(take);
    const li = document.createElement("li");
    li.className = "sample";
    li.dataset.testid = "sample";
    li.dataset.seed = String(take.seed);
    const label = document.createElement("span");
    label.className = "sample-seed";
    label.textContent = `Seed ${take.seed}`;
    if (take.candidate) li.dataset.rank = String(take.candidate.rank);
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.preload = "metadata";
    audio.dataset.testid = "sample-audio";
    audio.setAttribute("aria-label", `Sample with seed ${take.seed}`);
    if (take.audioUrl) audio.src = take.audioUrl;
    const link = document.createElement("a");
    link.className = "button-link secondary";
    link.dataset.testid = "sample-download";
    const main = take.mainBlob ? take.mainUrl : take.audioUrl;
    const ext = take.mainBlob ? "mp4" : extensionOf(take.audioBlob, job.output || "wav");
    link.href = main;
    link.download = takeName(job, take, ext);
    link.textContent = "Download";
    link.setAttribute("aria-label", `Download the sample with seed ${take.seed}`);
    const pick = document.createElement("button");
    pick.type = "button";
    pick.className = "secondary";
    pick.dataset.testid = "sample-pick";
    pick.addEventListener("click", () => pickSample(job, k, token));
    li.append(label, audio, link, pick);
    // On a row of its own: beside the seed it would squeeze the player to nothing.
    if (take.candidate) li.append(scoreCell(take.candidate));
    return li;
  });
  el.sampleList.replaceChildren(...items);
  el.samples.hidden = false;
  markPicked(0);
}

function markPicked(k) {
  el.sampleList.querySelectorAll(".sample").forEach((li, i) => {
    const picked = i === k;
    li.dataset.picked = String(picked);
    const button = li.querySelector("[data-testid=sample-pick]");
    button.setAttribute("aria-pressed", String(picked));
    button.textContent = picked ? "In use" : "Use this one";
  });
}

async function pickSample(job, k, token) {
  if (token !== state.track || !state.samples[k]) return;
  markPicked(k);
  await showTake(job, state.samples[k], token);
}

async function drawFromBlob(blob, token) {
  let decoded;
  try {
    const bytes = await blob.arrayBuffer();
    // An offline context decodes without needing a user gesture and resamples to 48 kHz.
    const ctx = new OfflineAudioContext(1, 1, 48000);
    decoded = await ctx.decodeAudioData(bytes);
  } catch (err) {
    if (token === state.track) {
      el.waveformCaption.textContent = `The waveform cannot be drawn: this browser could not decode the audio (${err.message || err}).`;
    }
    return;
  }
  if (token !== state.track) return;
  const data = [];
  for (let c = 0; c < decoded.numberOfChannels; c++) data.push(decoded.getChannelData(c));
  let peak = 0;
  for (const channel of data) for (let i = 0; i < channel.length; i++) peak = Math.max(peak, Math.abs(channel[i]));
  state.audio = { data, sampleRate: decoded.sampleRate, duration: decoded.duration, peak };
  const db = peak > 0 ? `${(20 * Math.log10(peak)).toFixed(1)} dBFS peak` : "silent";
  metaRow("Audio", `${decoded.duration.toFixed(2)} s · ${decoded.numberOfChannels} ch · ${db}`);
  el.waveformCaption.textContent = `Waveform, ${decoded.duration.toFixed(2)} s; click it to seek.`;
  drawWaveform();
}

function activePlayer() {
  if (!el.resultVideo.hidden) return el.resultVideo;
  if (!el.resultAudio.hidden) return el.resultAudio;
  return null;
}

function cssColor(name, fallback) {
  const value = getComputedStyle(el.waveform).getPropertyValue(name).trim();
  return value || fallback;
}

// Min/max envelope per pixel column: every sample counts, so short clicks stay visible.
function drawWaveform() {
  const canvas = el.waveform;
  const audio = state.audio;
  const dpr = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(canvas.clientWidth * dpr));
  const height = Math.max(1, Math.round(canvas.clientHeight * dpr));
  if (canvas.width !== width) canvas.width = width;
  if (canvas.height !== height) canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  if (!audio) return;
  const axis = Math.round(14 * dpr);
  const plot = height - axis;
  const mid = plot / 2;
  const length = audio.data[0].length;
  const perColumn = length / width;

  ctx.fillStyle = cssColor("--wave", "#3b82f6");
  for (let x = 0; x < width; x++) {
    const start = Math.floor(x * perColumn);
    const end = Math.max(start + 1, Math.floor((x + 1) * perColumn));
    let lo = 1;
    let hi = -1;
    for (const channel of audio.data) {
      for (let i = start; i < end && i < length; i++) {
        const v = channel[i];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    }
    if (hi < lo) continue;
    const top = mid - Math.min(1, hi) * mid;
    const bottom = mid - Math.max(-1, lo) * mid;
    ctx.fillRect(x, top, 1, Math.max(1, bottom - top));
  }

  // Time axis: a tick per second, labelled every second or every few for long clips.
  ctx.fillStyle = cssColor("--axis", "#6b7280");
  ctx.font = `${Math.round(10 * dpr)}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  const every = audio.duration > 20 ? 5 : audio.duration > 8 ? 2 : 1;
  for (let t = 0; t <= audio.duration + 1e-6; t += 1) {
    const x = Math.min(width - 1, Math.round((t / audio.duration) * width));
    ctx.fillRect(x, plot, Math.max(1, dpr), Math.round(4 * dpr));
    if (t % every === 0 && x < width - 20 * dpr) ctx.fillText(`${t}s`, x + 2 * dpr, plot + 2 * dpr);
  }

  const player = activePlayer();
  if (player && Number.isFinite(player.currentTime) && audio.duration > 0) {
    const x = Math.round((player.currentTime / audio.duration) * width);
    ctx.fillStyle = cssColor("--playhead", "#ef4444");
    ctx.fillRect(Math.min(width - Math.max(1, dpr), x), 0, Math.max(1, dpr), plot);
  }
  canvas.dataset.drawn = "true";
}

let frame = 0;
function followPlayhead() {
  cancelAnimationFrame(frame);
  const player = activePlayer();
  drawWaveform();
  if (player && !player.paused && !player.ended) frame = requestAnimationFrame(followPlayhead);
}

for (const player of [el.resultVideo, el.resultAudio]) {
  for (const type of ["play", "seeked", "pause", "ended"]) player.addEventListener(type, followPlayhead);
}

el.waveform.addEventListener("click", (e) => {
  const player = activePlayer();
  if (!player || !state.audio) return;
  const rect = el.waveform.getBoundingClientRect();
  const fraction = Math.min(1, Math.max(0, (e.clientX - rect.left) / rect.width));
  player.currentTime = fraction * state.audio.duration;
  followPlayhead();
});

let resizeTimer = 0;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(drawWaveform, 100);
});

// ---------------------------------------------------------------------------------------------
// recent jobs

function formatTime(value) {
  if (value === null || value === undefined) return "";
  let date;
  if (typeof value === "number") date = new Date(value < 1e12 ? value * 1000 : value);
  else date = new Date(value);
  if (Number.isNaN(date.getTime())) return "";
  const sameDay = date.toDateString() === new Date().toDateString();
  return sameDay ? date.toLocaleTimeString() : date.toLocaleString();
}

// Existing buttons are refilled rather than replaced, so keyboard focus survives an update.
function fillRecentButton(button, job) {
  button.dataset.status = job.status;
  const badge = document.createElement("span");
  badge.className = `badge status-${job.status}`;
  badge.textContent = job.status;
  const prompt = document.createElement("span");
  prompt.className = "job-prompt";
  prompt.textContent = job.prompt ? job.prompt : "(no prompt)";
  const when = document.createElement("span");
  when.className = "job-time";
  when.textContent = formatTime(job.created);
  button.replaceChildren(badge, prompt, when);
  if (job.cache_hit) {
    const cache = document.createElement("span");
    cache.className = "badge cache";
    cache.textContent = "cache";
    button.append(cache);
  }
  button.setAttribute("aria-label", `${job.status} job: ${prompt.textContent}${when.textContent ? `, ${when.textContent}` : ""}`);
}

function recentButton(id) {
  return el.recentList.querySelector(`.job-item[data-job-id="${CSS.escape(String(id))}"]`);
}

function recentItem(job) {
  const existing = recentButton(job.id);
  if (existing) {
    fillRecentButton(existing, job);
    return existing.parentElement;
  }
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "job-item";
  button.dataset.jobId = job.id;
  button.dataset.testid = "recent-job";
  fillRecentButton(button, job);
  button.addEventListener("click", () => {
    hideAlert();
    if (job.id !== state.jobId || el.result.hidden) track(job.id);
  });
  li.append(button);
  return li;
}

function markSelected() {
  for (const button of el.recentList.querySelectorAll(".job-item")) {
    if (button.dataset.jobId === state.jobId) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

function updateRecentItem(job) {
  if (recentButton(job.id)) {
    recentItem(job);
    markSelected();
  } else {
    refreshRecent();
  }
}

let recentToken = 0;
async function refreshRecent() {
  const token = ++recentToken;
  let items;
  try {
    const body = await (await api(`${API}?limit=${RECENT_LIMIT}`)).json();
    items = Array.isArray(body) ? body : body.items || [];
  } catch (err) {
    if (token === recentToken && err.status !== 401) showError(err);
    return;
  }
  if (token !== recentToken) return; // a newer refresh has already answered
  const focused = document.activeElement;
  el.recentList.replaceChildren(...items.map(recentItem));
  // Re-inserting a node drops its focus; give it back to a keyboard user who was on the list.
  if (focused && focused !== document.activeElement && el.recentList.contains(focused)) focused.focus();
  el.recentEmpty.hidden = items.length > 0;
  markSelected();
}

el.recentRefresh.addEventListener("click", () => {
  hideAlert();
  refreshRecent();
});

// ---------------------------------------------------------------------------------------------
// the server's limits and defaults

function pair(value, fallback) {
  return Array.isArray(value) && value.length === 2 && value.every(Number.isFinite) ? value : fallback;
}

function setNumberField(input, [min, max], defaultValue) {
  input.min = String(min);
  input.max = String(max);
  if (state.touched.has(input.id)) return; // out of range, it is refused on submit, naming the range
  const value = Number.isFinite(defaultValue) ? defaultValue : Number(input.value);
  if (Number.isFinite(value)) input.value = String(Math.min(max, Math.max(min, value)));
}

function setOutputs(outputs, defaultOutput) {
  if (!Array.isArray(outputs) || outputs.length === 0) return;
  const chosen = state.touched.has(el.output.id) ? el.output.value : defaultOutput;
  el.output.replaceChildren(
    ...outputs.map((name) => new Option(OUTPUT_LABELS[name] || String(name).toUpperCase(), name)),
  );
  el.output.value = outputs.includes(chosen) ? chosen : outputs[0];
}

function isDemo(info) {
  if (info.demo === true) return true;
  // Servers whose /v1/info has no demo flag still name the model.
  const model = info.engine && typeof info.engine.model === "string" ? info.engine.model : "";
  return /^demo\b/i.test(model);
}

function applyInfo(info) {
  const limits = info.limits || {};
  const defaults = info.defaults || {};
  const steps = pair(limits.steps, FALLBACK_LIMITS.steps);
  const guidance = pair(limits.guidance, FALLBACK_LIMITS.guidance);
  state.limits = {
    steps,
    guidance,
    maxUploadBytes: Number.isFinite(limits.max_upload_bytes) ? limits.max_upload_bytes : FALLBACK_LIMITS.maxUploadBytes,
    // null: the whole video gets sound (the server runs long clips in windows).
    maxSeconds: limits.max_video_seconds === null ? 0
      : Number.isFinite(limits.max_video_seconds) ? limits.max_video_seconds : FALLBACK_LIMITS.maxSeconds,
    maxPromptChars: Number.isFinite(limits.max_prompt_chars) ? limits.max_prompt_chars : FALLBACK_LIMITS.maxPromptChars,
  };

  setNumberField(el.steps, steps, defaults.steps);
  const reference = Number.isFinite(defaults.steps) ? defaults.steps : 50;
  el.stepsHint.textContent = `${steps[0]}–${steps[1]}; fewer is faster, this server's default is ${reference}.`;
  setNumberField(el.guidance, guidance, defaults.guidance);
  el.guidanceHint.textContent = `${guidance[0]}–${guidance[1]}; how strongly the text steers the sound.`;
  const seed = pair(limits.seed, null);
  if (seed) el.seed.max = String(seed[1]);
  if (typeof defaults.negative_prompt === "string" && !state.touched.has(el.negative.id)) el.negative.value = defaults.negative_prompt;
  for (const input of [el.prompt, el.negative]) input.maxLength = state.limits.maxPromptChars;
  if (Array.isArray(limits.outputs) && limits.outputs.length) state.outputs.video = limits.outputs;
  if (typeof defaults.output === "string") state.outputs.videoDefault = defaults.output;
  const textOutputs = Array.isArray(limits.text_only_outputs) ? limits.text_only_outputs : TEXT_OUTPUTS;
  state.outputs.text = textOutputs.filter((name) => state.outputs.video.includes(name));
  if (state.outputs.text.length === 0) state.outputs.text = textOutputs;
  if (typeof defaults.text_only_output === "string") state.outputs.textDefault = defaults.text_only_output;
  setMode(state.mode);
  const samples = pair(limits.num_samples, FALLBACK_LIMITS.numSamples);
  const seconds = pair(limits.text_only_seconds, FALLBACK_LIMITS.textSeconds);
  state.limits.numSamples = samples;
  state.limits.textSeconds = seconds;
  setNumberField(el.numSamples, samples, defaults.num_samples);
  el.samplesHint.textContent = `${samples[0]}–${samples[1]} takes in one run (seed, seed + 1, …); pick the best.`;
  // A server without best_of would refuse the field: no ranking offered then.
  state.limits.bestOf = pair(limits.best_of, null);
  el.bestOfField.hidden = !state.limits.bestOf;
  if (typeof defaults.rank === "string") state.rank = defaults.rank;
  setNumberField(el.duration, seconds, undefined);
  el.durationHint.textContent = `${seconds[0]}–${seconds[1]} s of audio, made from the description alone.`;

  const parts = [];
  if (state.limits.maxUploadBytes > 0) parts.push(`Up to ${formatBytes(state.limits.maxUploadBytes)}`);
  if (state.limits.maxSeconds > 0) parts.push(`sound is made for its first ${state.limits.maxSeconds}\u00a0s`);
  else parts.push("any length (long clips are made in windows of 15\u00a0s)");
  if (parts.length) el.videoLimits.textContent = `${parts.join("; ")}.`;
  el.demoBanner.hidden = !isDemo(info);
  document.body.dataset.limits = "server"; // lets a test tell the server's values from the page's own
}

for (const input of [el.steps, el.guidance, el.negative, el.output, el.numSamples, el.duration]) {
  input.addEventListener("input", () => state.touched.add(input.id));
}

// Resolves to "ok", "unauthorized" or "failed"; a server that is still loading its model is asked
// again later, since only then does it know what model (demo or not) it runs.
async function loadInfo(retryMs = INFO_RETRY_MS[0]) {
  let info;
  try {
    info = await (await api(INFO)).json();
  } catch (err) {
    if (err.status === 401) return "unauthorized";
    // An older server without /v1/info: the page's own ranges stand and the server still checks.
    console.warn(`foleyserve: ${INFO} unavailable (${err.message}); using the page's built-in limits`);
    return "failed";
  }
  applyInfo(info);
  // Backing off: a model that failed to load never turns ready.
  if (info.ready === false) setTimeout(() => loadInfo(Math.min(retryMs * 2, INFO_RETRY_MS[1])), retryMs);
  return "ok";
}

async function start() {
  state.info = loadInfo();
  const answer = await state.info;
  // With a missing or wrong key both requests would answer 401; asking for the key once is enough.
  if (answer !== "unauthorized") refreshRecent();
}

start();
