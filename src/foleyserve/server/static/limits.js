// The server's limits and defaults from /v1/info, put into the form's ranges, hints and the
// demo banner; the page's own fallbacks stand when the server has no /v1/info.

import { api } from "./api.js";
import { formatBytes, setMode } from "./form.js";
import { FALLBACK_LIMITS, TEXT_OUTPUTS, el, state } from "./state.js";

const INFO = "v1/info";
const INFO_RETRY_MS = [3000, 30000]; // first and longest wait before asking a loading server again

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
export async function loadInfo(retryMs = INFO_RETRY_MS[0]) {
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
