// Talking to the server: every request carries X-Client-Id and the API key; a refusal becomes
// an ApiError, which the alert above the form describes.

import { API, el } from "./state.js";

export const KEY_STORAGE = "foleyserve.apiKey";
const CLIENT_STORAGE = "foleyserve.clientId";

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

export async function api(path, options = {}) {
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
export function uploadJob(formData, onProgress) {
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

export function showAlert(text, code = "") {
  el.alertMessage.textContent = text;
  el.alert.dataset.code = code;
  el.alert.hidden = false;
}

export function showError(err) {
  showAlert(describeError(err), err instanceof ApiError ? err.code : "page_error");
}

export function hideAlert() {
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

el.alertClose.addEventListener("click", hideAlert);
