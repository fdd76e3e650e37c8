// What every module of the page shares: the elements it drives and what it remembers.

export const API = "v1/generations"; // relative: the page keeps working behind a proxy sub-path

// What the page assumes of a server whose /v1/info is missing or older than the page.
export const FALLBACK_LIMITS = {
  steps: [1, 1000], guidance: [0, 100], maxUploadBytes: 0, maxSeconds: 15, maxPromptChars: 2000,
  numSamples: [1, 8], textSeconds: [0.64, 15], bestOf: [2, 8],
};
// Without a video there is nothing to put the sound in: audio formats only.
export const TEXT_OUTPUTS = ["wav", "flac"];

const $ = (id) => document.getElementById(id);

export const el = {
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

export const state = {
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
