"""What a caller asks for and what it gets back: the engine's public data types."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from foleyserve.loudness import DEFAULT_TARGET_LUFS, check_target

DEFAULT_NEGATIVE_PROMPT = "noisy, harsh"
OUTPUT_FORMATS = ("wav", "flac", "mp4")
# Integrated loudness of what is written, in LUFS (EBU R128's -23; foleyserve.loudness says why).
DEFAULT_LOUDNESS = DEFAULT_TARGET_LUFS
BIT_DEPTHS = (16, 24)


class RequestError(ValueError):
    """A request the engine cannot run as given; the message says what to change."""


@dataclass
class GenerationRequest:
    """One generation: which video, which sound, how to sample, and where to write the result.

    ``video`` is a file path or the file's bytes. ``steps`` (1-1000) and ``guidance`` (0-100;
    <= 1 turns classifier-free guidance off) set the sampler; the same ``seed`` gives the same
    audio on every device and precision. ``output`` ending in .wav/.flac writes the audio, .mp4
    the video with the new sound (``keep_original_audio_gain`` mixes the video's own sound under
    it). ``loudness`` normalises what is written (and ``GenerationResult.output_waveform``) to that
    integrated loudness in LUFS under a -1 dBTP true peak, ducking the Foley under a kept original;
    None writes the model's raw output. ``bit_depth`` (16 or 24) sets .wav/.flac PCM depth (default:
    32-bit float WAV, 24-bit FLAC). :meth:`validate` checks the fields; the engine calls it first.
    ``start``/``duration`` select a time range of the video (default: all of it; over 15 s runs
    in overlapping windows, see :mod:`foleyserve.pipeline.longform`).
    """

    video: str | Path | bytes | None  # None: text to audio of ``duration`` seconds (pipeline/textonly.py)
    prompt: str = ""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    steps: int = 50
    guidance: float = 4.5
    seed: int = 0
    # Where to write the result; the suffix picks the format (.wav, .flac or .mp4). None: nothing written.
    output: str | Path | None = None
    # Mix the source video's own sound under the Foley at this linear gain (mp4 output only).
    keep_original_audio_gain: float | None = None
    # The time range to score, in seconds of the video: [start, start + duration), None = to the end.
    # Ranges over 15 s run in windows (pipeline/longform.py).
    start: float = 0.0
    duration: float | None = None
    # Target integrated loudness in LUFS of what is written; None: off (the raw model output).
    loudness: float | None = DEFAULT_LOUDNESS
    # PCM bits of a .wav/.flac output (16 or 24); None: the format's default.
    bit_depth: int | None = None

    def validate(self) -> None:
        """Raise :class:`RequestError` naming the first field that cannot be used."""
        if self.video is None:  # text to audio: the learned empty visual features stand in
            _check_text_only(self)
        elif isinstance(self.video, (str, Path)):
            if not str(self.video):
                raise RequestError("no video given: pass a video file path or its bytes")
        elif not isinstance(self.video, (bytes, bytearray)) or not self.video:
            raise RequestError("video must be a file path or non-empty bytes")
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise RequestError("prompt and negative_prompt must be strings")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise RequestError(f"steps must be an integer from 1 to 1000, got {self.steps!r}")
        if not 0.0 <= float(self.guidance) <= 100.0:
            raise RequestError(f"guidance must be between 0 and 100, got {self.guidance!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise RequestError(f"seed must be a non-negative integer below 2**63, got {self.seed!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, (int, float)) or not 0.0 <= self.start < 1e7:
            raise RequestError(f"start must be a number of seconds >= 0, got {self.start!r}")
        if self.duration is not None and (
            isinstance(self.duration, bool) or not isinstance(self.duration, (int, float)) or not 0.0 < self.duration < 1e7
        ):
            raise RequestError(f"duration must be a positive number of seconds (or None: to the end), got {self.duration!r}")
        if self.output is not None:
            suffix = Path(self.output).suffix.lower().lstrip(".")
            if suffix not in OUTPUT_FORMATS:
                raise RequestError(
                    f"output {str(self.output)!r} has an unknown format; end it in .wav, .flac or .mp4"
                )
        if self.keep_original_audio_gain is not None:
            if self.output is None or Path(self.output).suffix.lower() != ".mp4":
                raise RequestError("keep_original_audio_gain applies to .mp4 output only")
            if not 0.0 <= self.keep_original_audio_gain <= 4.0:
                raise RequestError("keep_original_audio_gain must be between 0 and 4")
        if self.loudness is not None:
            try:
                check_target(self.loudness)
            except (TypeError, ValueError) as e:
                raise RequestError(str(e)) from None
        if self.bit_depth is not None:
            if self.bit_depth not in BIT_DEPTHS or isinstance(self.bit_depth, bool):
                raise RequestError(f"bit_depth must be 16 or 24, got {self.bit_depth!r}")
            if self.output is None or Path(self.output).suffix.lower() not in (".wav", ".flac"):
                raise RequestError("bit_depth applies to .wav and .flac output only (mp4 audio is AAC)")


# Text to audio: Synchformer's 16 frames at 25 fps at least; one model window at most.
TEXT_ONLY_SECONDS = (0.64, 15.0)


def _check_text_only(request: GenerationRequest) -> None:
    low, high = TEXT_ONLY_SECONDS
    d = request.duration
    if d is None or isinstance(d, bool) or not isinstance(d, (int, float)) or not low <= d <= high:
        raise RequestError(f"without a video, give duration: the seconds of audio to make, {low:g} to {high:g}, got {d!r}")
    if request.start:
        raise RequestError("start applies to a video; without one, leave it at 0")
    if request.output is not None and Path(request.output).suffix.lower() == ".mp4":
        raise RequestError("without a video there is nothing to put the sound in: write .wav or .flac")
    if request.keep_original_audio_gain is not None:
        raise RequestError("keep_original_audio_gain needs a video with sound; there is no video")


@dataclass
class GenerationResult:
    """What a generation produced: the audio, where it was written, and what it cost.

    ``audio_seconds`` is what the audio covers (the video, or the range asked for; a range from 0
    of at most 15 s keeps the official 15.04 s rule); ``video_seconds`` the whole video.
    ``timings`` and ``memory`` are per stage; ``warnings`` say what the caller should know (the
    demo model's noise, a range that leaves part of an mp4 without Foley).
    """

    # [1, T] float32 mono: the decoder's raw output, before loudness (what caches keep and what
    # the conformance checks compare)
    waveform: torch.Tensor
    sample_rate: int
    audio_seconds: float
    video_seconds: float
    seed: int
    timings: dict[str, float]  # stage -> wall seconds
    # stage -> {seconds, host_peak_bytes, device_peak_bytes}, plus "overall" (stages.OVERALL): the
    # whole run, whose device peak is the max over stages (each stage resets the CUDA peak counter)
    memory: dict[str, dict[str, Any]]
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    model: str = ""
    # The Foley as written: ``waveform`` normalised to the request's loudness (``waveform`` itself
    # when loudness is off). A kept original is mixed into the mp4 only, not into this.
    output_waveform: torch.Tensor | None = None
    # What the loudness step measured and did (foleyserve.loudness.LoudnessReport); None when off.
    loudness: Any = None
    # Best-of-N (pipeline/bestof.py): every candidate's scores, in seed order, each a dict
    # {seed, desync, offsets_sec, clap, rank, kept, file}; ``ranked_by`` the measures that decided
    # (DeSync drops out for clips under 4.8 s). None for a plain generation.
    candidates: list[dict[str, Any]] | None = None
    ranked_by: list[str] | None = None
