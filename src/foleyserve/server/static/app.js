// foleyserve web page: upload a video, follow the job, play and inspect the result.
// Plain ES modules, no build step and no third-party code, so the page works offline.
// It talks only to the public HTTP API (/v1/info, /v1/generations...).

import { KEY_STORAGE, hideAlert, showAlert } from "./api.js";
import "./job.js"; // for its listeners: the form's submit and Cancel
import { loadInfo } from "./limits.js";
import { refreshRecent } from "./recent.js";
import { el, state } from "./state.js";

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

async function start() {
  state.info = loadInfo();
  const answer = await state.info;
  // With a missing or wrong key both requests would answer 401; asking for the key once is enough.
  if (answer !== "unauthorized") refreshRecent();
}

start();
