// The form's inputs: the video, the seed, text-only mode and the output formats it allows.

import { hideAlert, showAlert } from "./api.js";
import { el, state } from "./state.js";

const OUTPUT_LABELS = {
  mp4: "MP4: the video with the new sound",
  wav: "WAV audio",
  flac: "FLAC audio",
};

export function formatBytes(n) {
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

export function tooLarge(file) {
  return state.limits.maxUploadBytes > 0 && file.size > state.limits.maxUploadBytes;
}

export function tooLargeMessage(file) {
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

export function randomSeed() {
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

export function setMode(mode) {
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

function setOutputs(outputs, defaultOutput) {
  if (!Array.isArray(outputs) || outputs.length === 0) return;
  const chosen = state.touched.has(el.output.id) ? el.output.value : defaultOutput;
  el.output.replaceChildren(
    ...outputs.map((name) => new Option(OUTPUT_LABELS[name] || String(name).toUpperCase(), name)),
  );
  el.output.value = outputs.includes(chosen) ? chosen : outputs[0];
}
