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
        "One entry per sample once succeeded, in seed order (empty before); audio_url and video_url are the first's"))


class JobList(BaseModel):
    items: list[JobBody] = Field(description="Most recent first")


class Health(BaseModel):
    status: str
    storage: str = Field(description="ok, or what is wrong with the data directory (full, read-only)")


class Ready(BaseModel):
    status: str
    model: str
    precision: str
    device: str


ERROR_RESPONSES = {
    401: {"model": ErrorBody, "description": "Missing or wrong API key"},
    404: {"model": ErrorBody, "description": "Unknown job id"},
}


