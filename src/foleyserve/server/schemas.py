"""The JSON bodies the API answers with (they are also its OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. invalid_video, queue_full, not_found")
    message: str = Field(description="What went wrong and what to do about it")


class ErrorBody(BaseModel):
    error: ErrorInfo


class Progress(BaseModel):
    step: int = Field(description="Denoising steps done")
    total: int = Field(description="Denoising steps in all (0 until the job reaches the denoiser)")


class SampleResult(BaseModel):
    seed: int = Field(description="The seed this sample was made with")
    audio_url: str | None = Field(description="Its audio (…/audio?seed=S for a job of several samples)")
    video_url: str | None = Field(description="Its mp4 (output=mp4 only)")


class Candidate(BaseModel):
    seed: int = Field(description="The seed this candidate was made with")
    desync: float | None = Field(description=(
        "Audio-video offset in seconds as Synchformer sees it (lower is better); null under 4.8 s and for text to audio"))
    offsets_sec: list[float] | None = Field(description="The offset per 4.8 s window (start and end of the clip)")
    clap: float = Field(description="CLAP audio-prompt similarity (higher is better)")
    rank: int = Field(description="1 = best (the kept one)")
    kept: bool = Field(description="True for the one audio_url/video_url serve")
    audio_url: str | None = Field(description="Its audio (…/audio?seed=S)")


class JobBody(BaseModel):
    id: str = Field(description="Server-generated job id (32 hex digits)")
    status: Literal["queued", "preparing", "running", "succeeded", "failed", "cancelled"] = Field(
        description="queued, preparing (reading the video and prompt, running the encoders), running (denoising), then succeeded, failed or cancelled"
    )
    priority: str = Field(description="interactive or bulk")
    progress: Progress
    cache_hit: bool = Field(description="True when the result came from the result cache (no model ran)")
    timings: dict[str, float] = Field(description="Seconds per pipeline stage (decode, siglip2, synchformer, clap, dit, dac, write)")
    error: ErrorInfo | None = Field(description="Why the job failed; null otherwise")
    created: float = Field(description="Unix time the upload was accepted")
    started: float | None = Field(description="Unix time the job started running")
    finished: float | None = Field(description="Unix time the job ended")
    audio_url: str | None = Field(description="Where to download the audio once succeeded")
    video_url: str | None = Field(description="Where to download the mp4 once succeeded (output=mp4 only)")
    expired: bool = Field(description="True when the result files are gone (deleted by DELETE or retention, or missing)")
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    seed: int
    output: str = Field(description="Requested format: mp4, wav or flac")
    keep_original_audio: float | None = Field(description="Gain of the source video's own sound mixed under the Foley (mp4)")
    duration: float | None = Field(description="Seconds of generated audio")
    video_duration: float | None = Field(description="Seconds of the uploaded video (0 for text to audio)")
    batch_size: int | None = Field(description="Jobs that shared this job's denoising loop")
    warnings: list[str] = Field(description="Notes about the result (e.g. a video longer than the model covers)")
    text_only: bool = Field(description="True for text to audio: no video was sent, duration set the length")
    num_samples: int = Field(description="Samples asked for (seeds seed .. seed + num_samples - 1)")
    results: list[SampleResult] = Field(description=(
        "One entry per sample once succeeded, in seed order (empty before); audio_url and video_url are the first's, "
        "or with best_of the kept one's"))
    best_of: int | None = Field(None, description="Candidates asked for with best_of (then num_samples is the same); null otherwise")
    rank: str | None = Field(None, description="The measures asked to rank by, in order (best_of only)")
    ranked_by: list[str] | None = Field(None, description=(
        "The measures that decided (rank minus what no candidate has: no desync under 4.8 s or for text to audio)"))
    candidates: list[Candidate] = Field(default_factory=list, description=(
        "best_of: every candidate's scores once succeeded, best first (empty before and for other jobs)"))


    replica: str | None = Field(None, description=(
        "The engine replica that runs or ran the job (a server scaled out on Ray Serve); null on one machine "
        "and while the job waits in the queue"))
    attempt: int = Field(0, description="How many times a replica took the job (above 1: a replica died and another re-ran it)")


class ReplicaInfo(BaseModel):
    id: str = Field(description="The replica's id (its Ray Serve replica id)")
    ready: bool = Field(description="The model is loaded and it takes jobs")
    queue_depth: int = Field(description="Jobs waiting in its batcher")
    running: int = Field(description="Jobs it holds (waiting or denoising)")
    model: str | None = None
    precision: str | None = None
    device: str | None = None
    node: str | None = Field(None, description="The host it runs on")
    pid: int | None = None
    age_s: float = Field(description="Seconds since its last heartbeat")


class JobList(BaseModel):
    items: list[JobBody] = Field(description="Most recent first")


class Health(BaseModel):
    status: str
    storage: str = Field(description="ok, or what is wrong with the data directory (full, read-only)")
    replicas: list[ReplicaInfo] | None = Field(None, description="Scaled out: every engine replica heard from lately")


class Ready(BaseModel):
    status: str
    model: str
    precision: str
    device: str
    replicas: list[ReplicaInfo] | None = Field(None, description="Scaled out: every engine replica heard from lately")


ERROR_RESPONSES = {
    401: {"model": ErrorBody, "description": "Missing or wrong API key"},
    404: {"model": ErrorBody, "description": "Unknown job id"},
}


