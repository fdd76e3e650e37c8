"""Audio out: WAV/FLAC files, and MP4 muxing of the Foley with the source's video stream."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Union

import av
import numpy as np
import torch

from foleyserve.media.source import (
    SAMPLE_RATE, MediaError, VideoSource, _frames, _label, _open, _video_stream, time_origin,
)

log = logging.getLogger(__name__)

Waveform = Union[torch.Tensor, np.ndarray]

_WRITE_EXTENSIONS = (".wav", ".flac")

# ---------------------------------------------------------------------------------------------
# audio out


def _as_channels(waveform: Waveform) -> np.ndarray:
    """Any mono/stereo waveform -> float32 [C, T] numpy."""
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().to("cpu", torch.float32).numpy()
    a = np.asarray(waveform, dtype=np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] not in (1, 2) or a.shape[1] == 0:
        raise ValueError(f"waveform must be [T], [1, T] or [2, T] with T > 0, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _audio_frame(samples: np.ndarray, fmt: str, rate: int) -> av.AudioFrame:
    """[C, T] array already in the sample format's dtype -> one AudioFrame."""
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    planar = av.AudioFormat(fmt).is_planar
    data = samples if planar else samples.T.reshape(1, -1)  # packed formats interleave the channels
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
    frame.sample_rate = rate
    frame.pts = 0
    return frame


def _to_int(samples: np.ndarray, bits: int) -> np.ndarray:
    # Symmetric full scale (2^(bits-1) - 1) so +1.0 and -1.0 both fit without clipping asymmetry.
    scale = float(2 ** (bits - 1) - 1)
    q = np.rint(np.clip(samples, -1.0, 1.0).astype(np.float64) * scale)
    if bits == 16:
        return q.astype(np.int16)
    return q.astype(np.int32) << (32 - bits)  # 24-bit samples live in the top bits of s32


def _prepare_output(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MediaError(f"cannot create the output folder for {path}: {e.strerror}; choose a writable path") from e
    if path.is_dir():
        raise MediaError(f"cannot write {path}: it is a directory; give a file name")


def _open_output(path: Path, fmt: str) -> av.container.OutputContainer:
    try:
        return av.open(str(path), "w", format=fmt)
    except (OSError, av.error.FFmpegError) as e:
        raise MediaError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}; choose a writable path") from e


def _remove_partial(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def write_audio(path: str | os.PathLike, waveform: Waveform, sample_rate: int = SAMPLE_RATE, *, bits: int | None = None) -> Path:
    """Write a mono (or stereo) waveform as .wav or .flac.

    WAV defaults to 32-bit float, like the official (torchaudio.save of a float tensor): values are
    stored as they are, nothing is clipped. ``bits=16`` or ``24`` writes PCM at that depth. FLAC is
    integer-only: 24-bit by default, ``bits=16`` for 16-bit; integer formats clip to [-1, 1].
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in _WRITE_EXTENSIONS:
        raise MediaError(f"cannot write audio to {path}: use a .wav or .flac file name (or .mp4 to mux with the video)")
    samples = _as_channels(waveform)
    if ext == ".wav":
        if bits in (None, 32):
            fmt, codec, data = "flt", "pcm_f32le", samples
        elif bits == 16:
            fmt, codec, data = "s16", "pcm_s16le", _to_int(samples, 16)
        elif bits == 24:
            fmt, codec, data = "s32", "pcm_s24le", _to_int(samples, 24)  # the encoder keeps the top 24 bits
        else:
            raise ValueError(f"WAV bits must be 32 (float), 24 or 16, got {bits}")
        container_fmt = "wav"
    else:
        if bits in (None, 24):
            fmt, codec, data = "s32", "flac", _to_int(samples, 24)
        elif bits == 16:
            fmt, codec, data = "s16", "flac", _to_int(samples, 16)
        else:
            raise ValueError(f"FLAC bits must be 24 or 16, got {bits}")
        container_fmt = "flac"
    _prepare_output(path)
    out = _open_output(path, container_fmt)
    try:
        with out:
            stream = out.add_stream(codec, rate=sample_rate)
            stream.layout = "mono" if data.shape[0] == 1 else "stereo"
            stream.format = fmt
            for packet in stream.encode(_audio_frame(data, fmt, sample_rate)):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
    except (OSError, av.error.FFmpegError) as e:
        _remove_partial(path)
        raise MediaError(f"writing {path} failed: {getattr(e, 'strerror', None) or e}; check the disk and path") from e
    return path


# ---------------------------------------------------------------------------------------------
# muxing


@dataclass
class MuxResult:
    path: Path
    video_copied: bool  # False when the video had to be re-encoded to H.264
    notes: list[str] = field(default_factory=list)


def _parse_bitrate(bitrate: str | int) -> int:
    if isinstance(bitrate, int):
        return bitrate
    s = bitrate.strip().lower()
    mult = {"k": 1000, "m": 1_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if mult != 1 else s) * mult)


def _resample_48k(frames: Iterator[av.AudioFrame], layout: str = "stereo") -> tuple[np.ndarray, float | None]:
    """Decoded audio frames -> float32 [C, N] at 48 kHz and the time of the first sample."""
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    start: float | None = None
    for frame in frames:
        if start is None and frame.time is not None:
            start = frame.time
        chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
    chunks.extend(f.to_ndarray() for f in resampler.resample(None))
    channels = 1 if layout == "mono" else 2
    if not chunks:
        return np.zeros((channels, 0), np.float32), start
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), start


def _foley_stereo(waveform: Waveform, sample_rate: int) -> np.ndarray:
    a = _as_channels(waveform)
    if a.shape[0] == 1:
        a = np.concatenate([a, a])  # pan=stereo|c0=c0|c1=c0: the mono track on both channels
    if sample_rate == SAMPLE_RATE:
        return a
    out, _ = _resample_48k(iter([_audio_frame(a, "fltp", sample_rate)]))
    return out


def _original_audio(container: av.container.InputContainer, origin: Fraction) -> np.ndarray | None:
    if not container.streams.audio:
        return None
    audio = container.streams.audio[0]

    def frames() -> Iterator[av.AudioFrame]:
        for packet in container.demux(audio):
            try:
                yield from packet.decode()
            except av.error.FFmpegError:
                continue  # a damaged packet only leaves a gap in a background track

    # A mono track goes on both channels at full level, like the Foley (FFmpeg's own mono->stereo
    # upmix would lower it by 3 dB).
    mono = audio.codec_context.channels == 1
    samples, start = _resample_48k(frames(), "mono" if mono else "stereo")
    if mono:
        samples = np.concatenate([samples, samples])
    # Place the track on the output's clock, which starts at ``origin`` (the Foley's sample 0).
    offset = int(round(((start or 0.0) - float(origin)) * SAMPLE_RATE))
    if offset > 0:
        samples = np.concatenate([np.zeros((2, offset), np.float32), samples], axis=1)
    elif offset < 0:
        samples = samples[:, -offset:]
    return samples


def mux(
    video: VideoSource,
    waveform: Waveform,
    sample_rate: int,
    out_path: str | os.PathLike,
    *,
    keep_original_audio_gain: float | None = None,
    bitrate: str | int = "192k",
    mix: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> MuxResult:
    """MP4 with the source's video stream copied packet for packet and the Foley as stereo AAC 48 kHz.

    Like the official (no ``-shortest``) the output keeps the video's full length even when the audio
    is shorter. ``keep_original_audio_gain`` mixes the source's own first audio track (resampled to
    48 kHz stereo) under the Foley at that linear gain; the sum is clipped to [-1, 1] and lasts as long
    as the longer of the two. ``mix(foley, original)`` (both [2, T] at 48 kHz, the original already
    at its gain) replaces that plain sum, e.g. with :func:`foleyserve.loudness.duck_and_mix`.

    A video codec that MP4 cannot hold (VP8, Theora, ...) is re-encoded to H.264 (yuv420p, CRF 18,
    odd sizes scaled to the next even size); ``MuxResult.video_copied`` is then False and a note says so.
    """
    out_path = Path(out_path)
    label = _label(video)
    if not isinstance(video, (bytes, bytearray, memoryview)):
        src = Path(video)
        if src.exists() and out_path.exists() and os.path.samefile(src, out_path):
            raise MediaError(f"the output {out_path} is the input video; choose another output path")
    foley = _foley_stereo(waveform, sample_rate)
    notes: list[str] = []
    if keep_original_audio_gain is not None:
        with _open(video) as container:
            vin = _video_stream(container, label)
            orig = _original_audio(container, time_origin(container))
        if orig is None or orig.shape[1] == 0:
            notes.append(f"{label} has no audio track to keep; the output has the Foley only")
        else:
            orig = np.float32(keep_original_audio_gain) * orig
            if mix is not None:
                mixed = _as_channels(mix(foley, orig))
            else:
                mixed = np.zeros((2, max(foley.shape[1], orig.shape[1])), np.float32)
                mixed[:, : foley.shape[1]] += foley
                mixed[:, : orig.shape[1]] += orig
            foley = np.clip(mixed, -1.0, 1.0)
    with _open(video) as container:
        vin = _video_stream(container, label)
        _prepare_output(out_path)
        out = _open_output(out_path, "mp4")
        try:
            with out:
                copied = True
                try:
                    # PyAV resets the codec tag (an AVI fourcc, say), so the MP4 muxer picks its own.
                    vout = out.add_stream_from_template(vin)
                except ValueError as e:
                    copied = False
                    notes.append(
                        f"the video codec {vin.codec_context.name!r} cannot be stored in MP4 ({e}); "
                        f"the video was re-encoded to H.264"
                    )
                    vout = _h264_stream(out, vin)
                aout = out.add_stream("aac", rate=SAMPLE_RATE)
                aout.layout = "stereo"
                aout.bit_rate = _parse_bitrate(bitrate)
                audio_packets = list(aout.encode(_audio_frame(foley, "fltp", SAMPLE_RATE)))
                audio_packets += list(aout.encode(None))
                # decode_frames measures time from the container's start, so the Foley's sample 0
                # is there: move the video by as much (the ffmpeg CLI does the same by default).
                shift = _shift_ticks(time_origin(container), vin.time_base)
                if copied:
                    video_packets = _copy_packets(container, vin, vout, shift)
                else:
                    video_packets = _reencode_packets(container, vin, vout, notes, shift)
                _interleave(out, video_packets, audio_packets)
        except (OSError, av.error.FFmpegError) as e:
            _remove_partial(out_path)
            raise MediaError(f"writing {out_path} failed: {getattr(e, 'strerror', None) or e}") from e
        except BaseException:
            _remove_partial(out_path)
            raise
    for note in notes:
        log.warning(note)
    return MuxResult(path=out_path, video_copied=copied, notes=notes)


def _packet_time(p: av.Packet) -> float:
    ts = p.dts if p.dts is not None else p.pts
    return float(ts * p.time_base) if ts is not None and p.time_base is not None else 0.0


def _shift_ticks(origin: Fraction, time_base: Fraction | None) -> int:
    """``origin`` seconds in a stream's time base (0 when there is nothing to shift)."""
    if not origin or time_base is None:
        return 0
    return int(round(origin / Fraction(time_base)))


def _copy_packets(container: av.container.InputContainer, vin: av.VideoStream, vout: av.VideoStream, shift: int = 0) -> Iterator[av.Packet]:
    for packet in container.demux(vin):
        if packet.dts is None and packet.pts is None:  # the demuxer's end-of-stream marker
            continue
        if shift:
            if packet.pts is not None:
                packet.pts -= shift
            if packet.dts is not None:
                packet.dts -= shift
        packet.stream = vout
        yield packet


def _h264_stream(out: av.container.OutputContainer, vin: av.VideoStream) -> av.VideoStream:
    rate = vin.average_rate or vin.guessed_rate or Fraction(25)
    vout = out.add_stream("libx264", rate=rate)
    vout.width = vin.codec_context.width + (vin.codec_context.width % 2)
    vout.height = vin.codec_context.height + (vin.codec_context.height % 2)
    vout.pix_fmt = "yuv420p"
    vout.time_base = vin.time_base
    vout.codec_context.time_base = vin.time_base
    vout.options = {"crf": "18", "preset": "veryfast"}
    return vout


def _reencode_packets(
    container: av.container.InputContainer, vin: av.VideoStream, vout: av.VideoStream, notes: list[str], shift: int = 0
) -> Iterator[av.Packet]:
    errors: list[str] = []
    last_pts = None
    for frame in _frames(container, vin, errors):
        pts = frame.pts - shift if frame.pts is not None else None
        if pts is None or (last_pts is not None and pts <= last_pts):
            pts = (last_pts + 1) if last_pts is not None else 0
        last_pts = pts
        new = frame.reformat(width=vout.width, height=vout.height, format="yuv420p")
        new.pts = pts
        new.time_base = vin.time_base
        yield from vout.encode(new)
    yield from vout.encode(None)
    if errors:
        notes.append(f"{len(errors)} damaged video packet(s) skipped while re-encoding ({errors[0]})")


def _interleave(out: av.container.OutputContainer, video_packets: Iterator[av.Packet], audio_packets: list[av.Packet]) -> None:
    # Feed the muxer in time order so its interleaving queue stays small on long videos.
    i = 0
    for vp in video_packets:
        t = _packet_time(vp)
        while i < len(audio_packets) and _packet_time(audio_packets[i]) <= t:
            out.mux(audio_packets[i])
            i += 1
        out.mux(vp)
    for ap in audio_packets[i:]:
        out.mux(ap)
