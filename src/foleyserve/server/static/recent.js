// The Recent jobs list: this browser's jobs (by X-Client-Id), each a button that shows it again.

import { api, hideAlert, showError } from "./api.js";
import { track } from "./job.js";
import { API, el, state } from "./state.js";

const RECENT_LIMIT = 20;

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

export function markSelected() {
  for (const button of el.recentList.querySelectorAll(".job-item")) {
    if (button.dataset.jobId === state.jobId) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

export function updateRecentItem(job) {
  if (recentButton(job.id)) {
    recentItem(job);
    markSelected();
  } else {
    refreshRecent();
  }
}

let recentToken = 0;
export async function refreshRecent() {
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
