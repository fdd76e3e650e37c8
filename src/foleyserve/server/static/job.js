// A job's life on the page: the submit, then polling its status into the progress dock until it
// ends, with Cancel on the way.

import { api, hideAlert, showAlert, showError, uploadJob } from "./api.js";
import { randomSeed, tooLarge, tooLargeMessage } from "./form.js";
import { markSelected, refreshRecent, updateRecentItem } from "./recent.js";
import { clearResult, showResult } from "./results.js";
import { API, FALLBACK_LIMITS, el, state } from "./state.js";

const POLL_MS = 500;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);

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

export async function track(id, first = null) {
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
