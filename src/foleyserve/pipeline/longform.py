"""Full-length generation: any duration, and ``start``/``duration`` ranges, in windows of <= 15 s.

:func:`plan_for` decides whether a request needs windows at all. A whole video of at most 15.05 s,
or a range from 0 of at most 15 s, runs on the single-clip path exactly as before (bit-identical
to the official; ``duration=15`` is the old "first 15 s" behaviour, 15.04 s of audio by the
official decoder's rule). Anything else is cut into windows (:mod:`foleyserve.pipeline.windowing`
says how, and how the joins and seeds are chosen) and runs in three stages, like a single clip:

* :func:`prepare`: ONE decode pass hands out each window's frames as a standalone clip of that time
  range would be decoded (:func:`foleyserve.media.windows.decode_windows`); each window is encoded
  (SigLIP2, Synchformer) and its frames dropped at once, after the scene-cut search of the overlap
  that follows it, so memory holds about two windows of preprocessed frames whatever the length.
  CLAP runs once for the request. ``progress("window", i, n)`` after each window.
* :func:`sample`: windows with equal batch keys (all of them, for a constant-rate video) share ONE
  ``engine.sample_jobs`` loop, at most :data:`MAX_WINDOW_BATCH` rows at a time; the ``denoise``
  progress counts over all the loops.
* :func:`finish`: the DAC decodes one window at a time and the windows are crossfaded into one
  waveform whose timeline is the range's: sample 0 is ``start``, the length is the range's. An mp4
  keeps the whole video (packets copied), the Foley placed at ``start`` (silent outside the range);
  a .wav/.flac holds the range only.

The server's batcher runs a windowed request as ONE job (:class:`LongformJob`, a batch key of its
own) whose windows are batched here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from foleyserve import media
from foleyserve.media.windows import decode_windows, video_seconds
from foleyserve.pipeline.features import TextFeatures
from foleyserve.pipeline.requests import GenerationRequest, GenerationResult, RequestError
from foleyserve.pipeline.stages import StageTimer
from foleyserve.pipeline.windowing import Join, WindowPlan, assemble, place_join, plan_windows, window_seed

if TYPE_CHECKING:
    from foleyserve.pipeline.pipeline import Engine, PreparedJob, ProgressFn

log = logging.getLogger("foleyserve")

# The single-clip path's tolerance: write_result calls a video up to this much past 15 s "covered".
SINGLE_CLIP_SLACK = 0.05
# Rows per denoising loop: bounds the DiT's activation memory for very long videos (a 40 s video
# is 3 windows, one loop; 10 minutes is 49 windows, 4 loops).
MAX_WINDOW_BATCH = 16


def plan_for(request: GenerationRequest, seconds: float | None = None) -> WindowPlan | None:
    """The windows a request needs, or None when it runs on the single-clip path.

    ``seconds`` is the video's length when the caller knows it (else the header is read). Raises
    :class:`RequestError` for a ``start`` at or past the video's end."""
    request.validate()
    if request.video is None:  # text to audio (pipeline/textonly.py): no frames to window
        return None
    start = float(request.start)
    if start == 0 and request.duration is not None and request.duration <= media.MAX_SECONDS:
        return None
    if seconds is None:
        seconds = video_seconds(request.video)
    if start == 0 and request.duration is None and seconds <= media.MAX_SECONDS + SINGLE_CLIP_SLACK:
        return None
    if start >= seconds:
        raise RequestError(f"start {start:g} s is at or past the end of the {seconds:.2f} s video; choose an earlier start")
    end = seconds if request.duration is None else min(seconds, start + float(request.duration))
    return plan_windows(Fraction(start), Fraction(end).limit_denominator(1_000_000))


@dataclass
class LongformJob:
    """A windowed request after its encoders ran: one prepared job per window (None where the
    video ended before the window), the joins between them, and the request's timer."""

    request: GenerationRequest
    plan: WindowPlan
    windows: "list[PreparedJob | None]"
    joins: list[Join]
    video_seconds: float
    info: media.VideoInfo
    timer: StageTimer
    warnings: list[str] = field(default_factory=list)

    def batch_key(self) -> tuple:
        """A key of its own: the windows are batched inside the job, never with other jobs."""
        return ("longform", id(self))

    @property
    def steps(self) -> int:
        return self.request.steps


def is_longform(job: object) -> bool:
    """Whether a prepared job (from the batcher's queue, say) is a windowed one."""
    return isinstance(job, LongformJob)


def prepare(
    engine: "Engine",
    request: GenerationRequest,
    *,
    plan: WindowPlan | None = None,
    text: TextFeatures | None = None,
    timer: StageTimer | None = None,
    progress: "ProgressFn | None" = None,
    cancelled: Callable[[], bool] | None = None,
) -> LongformJob:
    """Decode and encode every window of ``request`` (see the module docstring).

    Raises :class:`~foleyserve.media.MediaError` when the first window has too few frames, and
    ValueError for a request that needs no windows."""
    timer = timer or StageTimer(engine.device)
    report = progress or (lambda _stage, _done, _total: None)
    seconds = video_seconds(request.video)
    plan = plan or plan_for(request, seconds)
    if plan is None:
        raise ValueError("this request runs on the single-clip path; use Engine.prepare")
    if text is None:
        text = engine.extract_text(request.prompt, request.negative_prompt, timer)
    n = len(plan.windows)
    overlaps = plan.overlaps()
    jobs: "list[PreparedJob | None]" = []
    joins: list[Join] = []
    warnings: list[str] = []
    info: media.VideoInfo | None = None
    report("window", 0, n)
    frames = decode_windows(request.video, [(w.start, w.end) for w in plan.windows])
    try:
        for w in plan.windows:
            with timer.stage("decode"):
                decoded = next(frames)
            warnings.extend(x for x in decoded.warnings if x not in warnings)
            info = info or decoded.info
            n25 = len(decoded.frames[media.SYNC_FPS])
            if n25 < media.MIN_SYNC_FRAMES:
                if w.index == 0:
                    media.check_min_frames(n25)
                jobs.append(None)
            else:
                visual = engine.encode_visual(decoded, timer)
                # The window runs as its own clip: its seed, no output of its own.
                clip = dataclasses.replace(
                    request, seed=window_seed(request.seed, w.index), output=None, keep_original_audio_gain=None,
                    start=0.0, duration=None,
                )
                jobs.append(engine.prepare(clip, decoded=dataclasses.replace(decoded, frames={}), visual=visual, text=text))
            if w.index < n - 1:
                joins.append(place_join(overlaps[w.index], w.start, decoded.frames[media.SYNC_FPS] if n25 > 1 else None))
            del decoded
            report("window", w.index + 1, n)
            if cancelled is not None and cancelled():
                break
    finally:
        frames.close()
    missing = [w for w, j in zip(plan.windows, jobs) if j is None]
    if missing:
        warnings.append(
            f"the video's frames end before {float(missing[0].start):.2f} s (its header says {seconds:.2f} s): "
            f"the audio from there on is silent"
        )
    assert info is not None, "the first window was decoded or raised"
    return LongformJob(
        request=request, plan=plan, windows=jobs, joins=joins, video_seconds=seconds, info=info, timer=timer, warnings=warnings
    )


def sample(
    engine: "Engine",
    job: LongformJob,
    *,
    progress: "ProgressFn | None" = None,
    keep_rows: Callable[[], "list[bool] | None"] | None = None,
) -> "list[torch.Tensor | None]":
    """Latents per window (None for a window without frames); windows with equal batch keys share
    one denoising loop. ``keep_rows()`` (one flag: this job) stops the loops when it turns False."""
    ready = [(i, p) for i, p in enumerate(job.windows) if p is not None]
    groups: dict[tuple, list[int]] = {}
    for i, p in ready:
        groups.setdefault(p.batch_key(), []).append(i)
    chunks = [idx[k : k + MAX_WINDOW_BATCH] for idx in groups.values() for k in range(0, len(idx), MAX_WINDOW_BATCH)]
    steps, total = job.request.steps, job.request.steps * len(chunks)
    latents: "list[torch.Tensor | None]" = [None] * len(job.windows)

    def alive() -> bool:
        keep = keep_rows() if keep_rows is not None else None
        return keep is None or bool(keep[0])

    for c, chunk in enumerate(chunks):
        if not alive():
            break

        def report(stage: str, done: int, _total: int, offset: int = c * steps) -> None:
            if progress is not None and stage == "denoise":
                progress("denoise", offset + done, total)

        rows = (lambda n=len(chunk): None if alive() else [False] * n) if keep_rows is not None else None
        with job.timer.stage("dit"):
            out = engine.sample_jobs([job.windows[i] for i in chunk], progress=report, keep_rows=rows)  # type: ignore[misc]
        for i, lat in zip(chunk, out):
            latents[i] = lat
    return latents


def finish(engine: "Engine", job: LongformJob, latents: "list[torch.Tensor | None]") -> GenerationResult:
    """DAC-decode each window, crossfade them onto the range's timeline and write the output."""
    pieces: list[tuple[Fraction, torch.Tensor] | None] = []
    for w, lat in zip(job.plan.windows, latents):
        if lat is None:
            pieces.append(None)
            continue
        with job.timer.stage("dac"):
            pieces.append((w.start, engine.decode_audio(lat)[0].reshape(-1)))
    with job.timer.stage("join"):
        audio = assemble(pieces, job.joins, start=job.plan.start, end=job.plan.end, sample_rate=engine.sample_rate)
    return write(engine, job, audio)


def write(engine: "Engine", job: LongformJob, audio: torch.Tensor) -> GenerationResult:
    """Write ``audio`` ([1, N], the range's timeline) as the request asks and describe it.

    The engine's own ``write_result`` writes it (loudness, formats, muxing stay in one place); an
    mp4 keeps the whole video, whose sample 0 is the video's, so the range's audio goes in after
    ``start`` seconds of silence, which the returned result leaves out again."""
    request, plan, rate = job.request, job.plan, engine.sample_rate
    mp4 = request.output is not None and Path(request.output).suffix.lower() == ".mp4"
    lead = int(round(plan.start * rate)) if mp4 else 0
    written = torch.cat([torch.zeros(1, lead, dtype=audio.dtype), audio], dim=1) if lead else audio
    # Described as covering exactly what it covers: the range's own silence is not a shortfall.
    stub = media.DecodedVideo(frames={}, duration=written.shape[-1] / rate, last_frame_time=0.0, info=job.info)
    result = engine.write_result(request, written, stub, job.timer)
    result.waveform, result.audio_seconds, result.video_seconds = audio, audio.shape[-1] / rate, job.video_seconds
    if lead and getattr(result, "output_waveform", None) is not None:
        result.output_waveform = result.output_waveform[..., lead:]
    notes = list(job.warnings)
    if mp4 and (plan.start > 0 or float(plan.end) < job.video_seconds - SINGLE_CLIP_SLACK):
        notes.append(
            f"the Foley covers {float(plan.start):.2f}-{float(plan.end):.2f} s of the {job.video_seconds:.2f} s "
            f"video; the rest of the mp4 has no Foley"
        )
    for note in notes:
        log.warning(note)
    result.warnings.extend(notes)
    return result


def generate(
    engine: "Engine", request: GenerationRequest, progress: "ProgressFn | None" = None, *, plan: WindowPlan | None = None
) -> GenerationResult:
    """Run a windowed request end to end (``Engine.generate`` sends requests here when
    :func:`plan_for` gives a plan)."""
    job = prepare(engine, request, plan=plan, progress=progress)
    return finish(engine, job, sample(engine, job, progress=progress))
