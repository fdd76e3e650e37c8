// The waveform under the result's player: drawn from the decoded audio, with a playhead that
// follows playback and a click to seek.

import { el, state } from "./state.js";

// Resolves to a line describing the audio for the result's details, or nothing when it could
// not be decoded or another job is shown by now.
export async function drawFromBlob(blob, token) {
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
  el.waveformCaption.textContent = `Waveform, ${decoded.duration.toFixed(2)} s; click it to seek.`;
  drawWaveform();
  return `${decoded.duration.toFixed(2)} s · ${decoded.numberOfChannels} ch · ${db}`;
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
