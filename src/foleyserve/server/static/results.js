// A finished job's result: the players, the list of samples with their downloads, the details.

import { api, showAlert, showError } from "./api.js";
import { orderedResults, rankedByText, scoreCell } from "./bestof.js";
import { el, state } from "./state.js";
import { drawFromBlob } from "./waveform.js";

export function clearResult() {
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

export async function showResult(job, token) {
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
  const audio = await drawFromBlob(take.audioBlob || take.mainBlob, token);
  if (audio) metaRow("Audio", audio);
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
