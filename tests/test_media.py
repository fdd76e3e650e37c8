"""foleyserve.media: frame sampling against the official fixtures, bad inputs, preprocessing, audio out, muxing."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from foleyserve import media
from foleyserve.media import MediaError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "foleyserve" / "assets" / "sample.mp4"
FIXTURE_VIDEOS = ["ntsc_29.97fps_126f", "24fps_100f", "30fps_480f_16s"]


# ---------------------------------------------------------------------------------------------
# helpers that build small media files with PyAV


def _write_video(path: Path, frames: list[np.ndarray], *, codec: str = "libx264", pix_fmt: str = "yuv420p",
                 rate: int = 25, pts: list[int] | None = None, time_base: Fraction | None = None,
                 options: dict | None = None, audio: np.ndarray | None = None, fmt: str | None = None) -> Path:
    with av.open(str(path), "w", format=fmt) as out:
        v = out.add_stream(codec, rate=rate)
        v.height, v.width = frames[0].shape[:2]
        v.pix_fmt = pix_fmt
        if time_base is not None:
            v.codec_context.time_base = time_base
        if options:
            v.options = options
        a = None
        if audio is not None:
            a = out.add_stream("aac", rate=48000)
            a.layout = "mono"
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = pts[i] if pts is not None else i
            if time_base is not None:
                f.time_base = time_base
            for p in v.encode(f):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
        if a is not None:
            af = av.AudioFrame.from_ndarray(audio[None].astype(np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = 48000, 0
            for p in a.encode(af):
                out.mux(p)
            for p in a.encode(None):
                out.mux(p)
    return path


def _gray_frames(n: int, h: int, w: int, step: int = 8) -> list[np.ndarray]:
    return [np.full((h, w, 3), step * i + 4, np.uint8) for i in range(n)]


def _band_index(frames: np.ndarray) -> np.ndarray:
    """Source-frame index encoded by the fixture videos: band k rows 16k..16k+15, gray 8 + 15*digit_k."""
    digits = []
    for k in range(3):
        band = frames[:, 16 * k + 4 : 16 * k + 12, 8:-8].astype(np.float64).mean(axis=(1, 2, 3))
        digits.append(np.rint((band - 8) / 15).astype(np.int64))
    return digits[0] + 16 * digits[1] + 256 * digits[2]


def _decode_audio(path: Path) -> tuple[np.ndarray, av.AudioStream]:
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        chunks = [f.to_ndarray() for f in c.decode(s)]
        return np.concatenate(chunks, axis=1), s


def _packets(path: Path, kind: str = "video") -> list[bytes]:
    with av.open(str(path)) as c:
        s = getattr(c.streams, kind)[0]
        return [bytes(p) for p in c.demux(s) if p.size]


@pytest.fixture(scope="module")
def sample_bytes() -> bytes:
    assert SAMPLE.is_file(), "src/foleyserve/assets/sample.mp4 is missing; run scripts/make_sample_clip.py"
    return SAMPLE.read_bytes()


# ---------------------------------------------------------------------------------------------
# sampling


@pytest.mark.parametrize("name", FIXTURE_VIDEOS)
def test_sampling_matches_official(fixtures_dir, name):
    ref = load_file(str(fixtures_dir / "video_sampling.safetensors"))
    decoded = media.decode_frames(fixtures_dir / f"video_{name}.mp4", fps_list=(8, 25), preprocess=False)
    for fps in (8, 25):
        frames = decoded.frames[fps]
        assert frames.dtype == np.uint8 and frames.shape[1:] == (48, 64, 3)
        np.testing.assert_array_equal(_band_index(frames), ref[f"{name}.idx_at_{fps}fps"])
    if name == "30fps_480f_16s":
        # A 16 s video is cut after 15 s: 376 frames at 25 fps = 15.04 s of audio, 121 at 8 fps.
        assert len(decoded[25]) == 376 and len(decoded[8]) == 121
        assert decoded.duration == pytest.approx(16.0) and decoded.last_frame_time <= 15.0


def test_bytes_input_equals_path_input(sample_bytes):
    a = media.decode_frames(SAMPLE)
    b = media.decode_frames(sample_bytes)
    assert a.frames.keys() == b.frames.keys() == {8, 25}
    for fps in a.frames:
        np.testing.assert_array_equal(a.frames[fps], b.frames[fps])
    assert a.duration == b.duration == pytest.approx(4.0)
    assert media.probe(sample_bytes) == media.probe(SAMPLE)


def test_vfr_and_odd_size(tmp_path):
    # 30 frames of 33x17 at irregular times (ms); each frame's gray level encodes its index.
    rng = np.random.default_rng(0)
    pts = np.cumsum(np.r_[0, rng.integers(15, 90, 29)]).tolist()
    path = _write_video(tmp_path / "vfr.mkv", _gray_frames(30, 17, 33), codec="ffv1", pix_fmt="yuv444p",
                        pts=pts, time_base=Fraction(1, 1000))
    info = media.probe(path)
    assert (info.width, info.height) == (33, 17)
    decoded = media.decode_frames(path, fps_list=(8, 25), preprocess=False)
    times = np.array(pts) / 1000.0
    for fps in (8, 25):
        frames = decoded.frames[fps]
        assert frames.shape[1:] == (17, 33, 3)
        got = np.rint((frames[:, 8, 16, :].mean(axis=1) - 4) / 8).astype(int)
        # Independent formulation: sample k takes the first frame at or after the k-th accumulated time.
        samples = np.add.accumulate(np.r_[0.0, np.full(200, 1 / fps)])
        samples = samples[samples <= times[-1]]
        np.testing.assert_array_equal(got, np.searchsorted(times, samples, side="left"))


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_media_error_is_value_error():
    assert issubclass(MediaError, ValueError)


def test_missing_file(tmp_path):
    for fn in (media.probe, media.decode_frames):
        with pytest.raises(MediaError, match="not found"):
            fn(tmp_path / "nope.mp4")


def test_not_a_video(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("this is not a video\n" * 20)
    with pytest.raises(MediaError, match="not a video file"):
        media.probe(p)
    with pytest.raises(MediaError, match="not a video file"):
        media.decode_frames(p.read_bytes())
    with pytest.raises(MediaError, match="empty"):
        media.decode_frames(b"")


def test_audio_only(tmp_path):
    p = tmp_path / "speech.m4a"
    with av.open(str(p), "w", format="mp4") as out:
        a = out.add_stream("aac", rate=48000)
        a.layout = "mono"
        f = av.AudioFrame.from_ndarray(np.zeros((1, 4800), np.float32), format="fltp", layout="mono")
        f.sample_rate, f.pts = 48000, 0
        for pk in list(a.encode(f)) + list(a.encode(None)):
            out.mux(pk)
    with pytest.raises(MediaError, match="audio but no video"):
        media.probe(p)
    with pytest.raises(MediaError, match="audio but no video"):
        media.decode_frames(p)


def test_truncated_mp4(tmp_path, sample_bytes):
    # Index (moov) at the end, as PyAV and most recorders write it: cutting the file loses the index.
    half = tmp_path / "half.mp4"
    half.write_bytes(sample_bytes[: len(sample_bytes) // 2])
    with pytest.raises(MediaError, match="truncated or corrupt"):
        media.probe(half)
    with pytest.raises(MediaError, match="truncated or corrupt"):
        media.decode_frames(half.read_bytes())


def test_truncated_faststart_mp4(tmp_path):
    # Index at the front ("faststart"): the file opens, then the frame data runs out part way.
    src = SAMPLE
    fs = tmp_path / "fs.mp4"
    with av.open(str(src)) as c, av.open(str(fs), "w", options={"movflags": "faststart"}) as out:
        v = out.add_stream_from_template(c.streams.video[0])
        for p in c.demux(c.streams.video[0]):
            if p.dts is not None:
                p.stream = v
                out.mux(p)
    data = fs.read_bytes()
    cut = tmp_path / "fs_cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated or corrupt"):
        media.decode_frames(cut)
    cut.write_bytes(data[: len(data) // 5])  # not even the first frame survives
    with pytest.raises(MediaError, match="no decodable frames"):
        media.probe(cut)


def test_zero_frames(tmp_path):
    # A video stream with no frames at all (the file still holds an audio track, so it opens).
    p = tmp_path / "empty_video.mkv"
    with av.open(str(p), "w") as out:
        v = out.add_stream("ffv1", rate=25)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = out.add_stream("flac", rate=48000)
        a.layout, a.format = "mono", "s16"
        f = av.AudioFrame.from_ndarray(np.zeros((1, 4800), np.int16), format="s16", layout="mono")
        f.sample_rate, f.pts = 48000, 0
        for pk in list(a.encode(f)) + list(a.encode(None)) + list(v.encode(None)):
            out.mux(pk)
    with pytest.raises(MediaError, match="no decodable frames"):
        media.probe(p)
    with pytest.raises(MediaError, match="no decodable frames"):
        media.decode_frames(p)


def test_too_short(tmp_path):
    p = _write_video(tmp_path / "short.mp4", _gray_frames(12, 48, 64))  # 0.48 s
    decoded = media.decode_frames(p)
    assert len(decoded[25]) == 12
    with pytest.raises(MediaError, match=r"minimum is 16 frames at 25 fps = 0\.64 s"):
        media.check_min_frames(decoded[25])
    media.check_min_frames(16)  # exactly the minimum is fine


# ---------------------------------------------------------------------------------------------
# preprocessing


def test_preprocessing_shapes_and_ranges(sample_bytes):
    decoded = media.decode_frames(sample_bytes)
    sig = media.siglip_pixels(decoded[8])
    syn = media.synchformer_pixels(decoded[25])
    assert sig.shape == (len(decoded[8]), 3, 512, 512) and sig.dtype == torch.float32
    assert syn.shape == (len(decoded[25]), 3, 224, 224) and syn.dtype == torch.float32
    for x in (sig, syn):
        assert x.min() >= -1.0 and x.max() <= 1.0 and x.std() > 0.1
    # Chunking is an implementation detail: results must not depend on it.
    assert torch.equal(media.siglip_pixels(decoded[8][:7], chunk=3), sig[:7])
    assert torch.equal(media.synchformer_pixels(decoded[25][:7], chunk=2), syn[:7])
    # Odd sizes go through both paths.
    odd = np.random.default_rng(1).integers(0, 256, (2, 17, 33, 3), dtype=np.uint8)
    assert media.siglip_pixels(odd).shape == (2, 3, 512, 512)
    assert media.synchformer_pixels(odd).shape == (2, 3, 224, 224)


def test_preprocessing_identity_sizes():
    rng = np.random.default_rng(2)
    x224 = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    t = torch.from_numpy(x224).permute(0, 3, 1, 2).to(torch.float32)
    # torchvision ToDtype(scale=True) multiplies by float32(1/255); Normalize(0.5, 0.5).
    assert torch.equal(media.synchformer_pixels(x224), (t.mul(1.0 / 255) - 0.5) / 0.5)
    x512 = rng.integers(0, 256, (2, 512, 512, 3), dtype=np.uint8)
    t = torch.from_numpy(x512).permute(0, 3, 1, 2).to(torch.float32)
    # torchvision v1 ToTensor divides by 255.
    assert torch.equal(media.siglip_pixels(x512), (t.div(255) - 0.5) / 0.5)


def test_synchformer_geometry():
    # (resized h, resized w, crop top, crop left): short side -> 224, long = int(224*long/short),
    # offsets int(round(x / 2.0)) with Python's round-half-to-even.
    assert media.synchformer_size(240, 320) == (224, 298, 0, 37)
    assert media.synchformer_size(320, 240) == (298, 224, 37, 0)
    assert media.synchformer_size(17, 33) == (224, 434, 0, 105)
    assert media.synchformer_size(1080, 1920) == (224, 398, 0, 87)
    assert media.synchformer_size(224, 225) == (224, 225, 0, 0)  # round(0.5) == 0
    assert media.synchformer_size(224, 227) == (224, 227, 0, 2)  # round(1.5) == 2


def test_synchformer_crop_of_resized():
    # A frame whose short side is already 224: no resampling at all, only the center crop.
    x = np.random.default_rng(3).integers(0, 256, (2, 224, 300, 3), dtype=np.uint8)
    t = torch.from_numpy(x[:, :, 38:262]).permute(0, 3, 1, 2).to(torch.float32)
    assert torch.equal(media.synchformer_pixels(x), (t.mul(1.0 / 255) - 0.5) / 0.5)


def test_decode_preprocesses_as_frames_arrive(sample_bytes):
    # Stored frames are the encoders' uint8 inputs, equal to preprocessing the full-resolution frames.
    raw = media.decode_frames(sample_bytes, preprocess=False)
    pre = media.decode_frames(sample_bytes)
    assert pre.preprocessed and not raw.preprocessed
    assert pre[8].shape == (len(raw[8]), 512, 512, 3) and pre[25].shape == (len(raw[25]), 224, 224, 3)
    np.testing.assert_array_equal(pre[8], media.siglip_frames(raw[8]))
    np.testing.assert_array_equal(pre[25], media.synchformer_frames(raw[25]))
    assert torch.equal(media.siglip_pixels(pre[8]), media.siglip_pixels(raw[8]))
    assert torch.equal(media.synchformer_pixels(pre[25]), media.synchformer_pixels(raw[25]))
    assert (pre.duration, pre.last_frame_time, pre.info) == (raw.duration, raw.last_frame_time, raw.info)


# ---------------------------------------------------------------------------------------------
# audio out


def _tone(seconds: float = 0.5, rate: int = 48000) -> torch.Tensor:
    t = torch.arange(int(seconds * rate), dtype=torch.float64) / rate
    return (0.6 * torch.sin(2 * torch.pi * 440 * t)).float()[None]  # [1, T], like the DAC output


def test_write_wav_float_roundtrip(tmp_path):
    w = _tone()
    w[0, 0] = 1.25  # float WAV keeps out-of-range values, like torchaudio.save
    p = media.write_audio(tmp_path / "a.wav", w)
    got, s = _decode_audio(p)
    assert s.codec_context.name == "pcm_f32le" and s.sample_rate == 48000 and got.shape == (1, w.shape[1])
    np.testing.assert_array_equal(got[0], w[0].numpy())


def test_write_wav16_and_flac(tmp_path):
    w = _tone()[0].numpy()  # [T] works too
    got, s = _decode_audio(media.write_audio(tmp_path / "a16.wav", w, bits=16))
    assert s.codec_context.name == "pcm_s16le" and got.shape == (1, w.size)
    np.testing.assert_allclose(got[0] / 32767, w, atol=0.6 / 32767)
    got, s = _decode_audio(media.write_audio(tmp_path / "a.flac", w))
    assert s.codec_context.name == "flac" and s.sample_rate == 48000 and got.shape == (1, w.size)
    assert (tmp_path / "a.flac").read_bytes()[:4] == b"fLaC"
    np.testing.assert_allclose(got[0] / 2.0**31, w, atol=1.0 / 2**23)  # 24-bit in the top bits of s32
    got, _ = _decode_audio(media.write_audio(tmp_path / "b.flac", w, bits=16))
    np.testing.assert_allclose(got[0] / 32767, w, atol=0.6 / 32767)


def test_write_audio_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MediaError, match=re.escape(str(blocker / "out.wav"))):
        media.write_audio(blocker / "out.wav", _tone())
    with pytest.raises(MediaError, match=r"\.wav or \.flac"):
        media.write_audio(tmp_path / "out.ogg", _tone())


# ---------------------------------------------------------------------------------------------
# muxing


def test_mux_copies_video_and_adds_stereo_aac(tmp_path, sample_bytes):
    out = tmp_path / "out.mp4"
    res = media.mux(SAMPLE, _tone(3.0), 48000, out)  # audio shorter than the 4 s video
    assert res.video_copied and res.path == out and not res.notes
    with av.open(str(out)) as c:
        assert len(c.streams.video) == 1 and len(c.streams.audio) == 1
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264"
        assert a.codec_context.name == "aac" and a.sample_rate == 48000 and a.codec_context.channels == 2
        # No -shortest: the video keeps its full length.
        assert c.duration / av.time_base == pytest.approx(4.0, abs=0.05)
    # Copied, not re-encoded: identical packet payloads.
    assert _packets(out) == _packets(SAMPLE)
    audio, _ = _decode_audio(out)
    # The mono track on both channels (AAC is lossy, so only nearly equal).
    assert audio.shape[0] == 2 and np.abs(audio[0] - audio[1]).max() < 0.01
    assert audio.shape[1] == pytest.approx(3.0 * 48000, abs=2048)
    # Bytes input gives the same video stream.
    media.mux(sample_bytes, _tone(3.0), 48000, tmp_path / "out2.mp4")
    assert _packets(tmp_path / "out2.mp4") == _packets(SAMPLE)


def test_mux_keep_original_audio(tmp_path):
    t = np.arange(48000) / 48000
    src = _write_video(tmp_path / "with_audio.mp4", _gray_frames(25, 48, 64),
                       audio=0.5 * np.sin(2 * np.pi * 330 * t))
    info = media.probe(src)
    assert info.has_audio and info.audio_sample_rate == 48000 and info.audio_channels == 1 and info.audio_codec == "aac"
    silence = torch.zeros(1, 48000)
    media.mux(src, silence, 48000, tmp_path / "foley_only.mp4")
    media.mux(src, silence, 48000, tmp_path / "mixed.mp4", keep_original_audio_gain=0.5)
    only, _ = _decode_audio(tmp_path / "foley_only.mp4")
    mixed, _ = _decode_audio(tmp_path / "mixed.mp4")
    rms = lambda x: float(np.sqrt(np.mean(x[:, 2048:-2048] ** 2)))  # noqa: E731
    assert rms(only) < 1e-3
    assert rms(mixed) == pytest.approx(0.5 * 0.5 / np.sqrt(2), rel=0.1)
    # A source without audio: mixing is a no-op with a note.
    res = media.mux(SAMPLE, _tone(1.0), 48000, tmp_path / "x.mp4", keep_original_audio_gain=0.5)
    assert res.notes and "no audio track" in res.notes[0]


def test_mux_reencodes_codec_mp4_cannot_hold(tmp_path):
    src = _write_video(tmp_path / "vp8.webm", _gray_frames(10, 48, 64, step=20), codec="libvpx", fmt="webm")
    res = media.mux(src, _tone(0.4), 48000, tmp_path / "out.mp4")
    assert not res.video_copied and "re-encoded to H.264" in res.notes[0]
    with av.open(str(res.path)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in c.decode(video=0)) == 10
    np.testing.assert_array_equal(_band_gray(res.path), _band_gray(src))


def _band_gray(path: Path) -> np.ndarray:
    return np.rint(media.decode_frames(path, fps_list=(25,), preprocess=False)[25][:, 24, 32].mean(axis=1) / 20)


def test_mux_errors(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        media.mux(tmp_path / "missing.mp4", _tone(), 48000, tmp_path / "o.mp4")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MediaError, match="o.mp4"):
        media.mux(SAMPLE, _tone(), 48000, blocker / "o.mp4")
