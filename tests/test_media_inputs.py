"""foleyserve.media on unusual inputs: images given as videos, MPEG-TS start offsets, the request budget."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest

from foleyserve import media
from foleyserve.media import MediaError


def _clip(path: Path, fmt: str, *, n: int = 50, first_pts: int = 0, size: tuple[int, int] = (64, 48)) -> Path:
    """n frames at 25 fps whose gray level encodes the index, the first at ``first_pts`` / 25 s."""
    w, h = size
    with av.open(str(path), "w", format=fmt) as out:
        v = out.add_stream("libx264", rate=25)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        v.options = {"qp": "0"}  # lossless: the TS and MP4 copies decode to the same levels
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((h, w, 3), 20 + 4 * i, np.uint8), format="rgb24")
            f.pts = first_pts + i
            for p in v.encode(f):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
    return path


def _image(path: Path, fmt: str, codec: str, frames: int = 1) -> Path:
    with av.open(str(path), "w", format=fmt) as out:
        s = out.add_stream(codec, rate=10)
        s.width, s.height = 64, 48
        s.pix_fmt = "rgb24" if codec == "png" else ("yuvj420p" if codec == "mjpeg" else "rgb8" if codec == "gif" else "yuv420p")
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return path


# ---------------------------------------------------------------------------------------------
# images


@pytest.mark.parametrize("name, fmt, codec, kind", [
    ("still.png", "image2", "png", "PNG image"),
    ("still.jpg", "image2", "mjpeg", "JPEG image"),
    ("still.gif", "gif", "gif", "GIF image"),
])
def test_an_image_is_refused_as_an_image(tmp_path, name, fmt, codec, kind):
    path = _image(tmp_path / name, fmt, codec)
    for call in (media.probe, media.decode_frames):
        with pytest.raises(MediaError, match=rf"is an? {kind}, not a video file.*pass a video clip") as err:
            call(path)
        assert "too short" not in str(err.value)
    with pytest.raises(MediaError, match=kind):
        media.decode_frames(path.read_bytes())


def test_webp_and_a_renamed_image_are_refused_as_images(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "WEBP")
    (tmp_path / "frame.webp").write_bytes(buf.getvalue())
    (tmp_path / "frame.mp4").write_bytes(_image(tmp_path / "x.png", "image2", "png").read_bytes())
    for name, kind in (("frame.webp", "WebP image"), ("frame.mp4", "PNG image")):
        with pytest.raises(MediaError, match=rf"is an? {kind}, not a video file"):
            media.decode_frames(tmp_path / name)


def test_an_animated_gif_is_a_video(tmp_path):
    path = _image(tmp_path / "anim.gif", "gif", "gif", frames=12)
    assert len(media.decode_frames(path)[25]) >= 12


@pytest.mark.parametrize("head, kind", [
    (b"\x89PNG\r\n\x1a\n" + bytes(40), "a PNG image"), (b"\xff\xd8\xff\xe0" + bytes(40), "a JPEG image"),
    (b"GIF89a" + bytes(40), "a GIF image"), (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "a WebP image"),
    (b"\x00\x00\x00\x1cftypavif" + bytes(20), "an AVIF image"), (b"\x00\x00\x00\x18ftypheic" + bytes(20), "a HEIC image"),
    (b"BM" + bytes(12) + (40).to_bytes(4, "little") + bytes(20), "a BMP image"),
    (b"<!DOCTYPE html><html>", "an HTML page"), (b"RIFF\x00\x00\x00\x00WAVEfmt ", "a WAV audio file"),
    (b"\x00\x00\x00\x18ftypisom" + bytes(20), None), (b"\x1aE\xdf\xa3" + bytes(20), None), (b"\x47" + bytes(200), None),
])
def test_describe_non_video(head, kind):
    assert media.describe_non_video(head) == kind


# ---------------------------------------------------------------------------------------------
# MPEG-TS start offsets


def test_ts_start_offset_is_not_extra_audio(tmp_path):
    # 2 s of video whose first frame is at 1.44 s in TS, and the same frames from 0 in MP4.
    ts = _clip(tmp_path / "clip.ts", "mpegts", first_pts=36)
    mp4 = _clip(tmp_path / "clip.mp4", "mp4")
    with av.open(str(ts)) as c:
        assert c.start_time / av.time_base == pytest.approx(1.44)
    a, b = media.decode_frames(ts, preprocess=False), media.decode_frames(mp4, preprocess=False)
    for fps in (8, 25):
        assert len(a[fps]) == len(b[fps])
        np.testing.assert_array_equal(a[fps], b[fps])
    assert a.duration == b.duration == pytest.approx(2.0)
    assert a.last_frame_time == b.last_frame_time
    # The audio covers the visible video: 25 fps frames / 25 s, not 1.44 s more.
    assert len(a[25]) / 25 == pytest.approx(2.0, abs=0.05)


def test_mux_moves_a_ts_video_to_the_foley_clock(tmp_path):
    ts = _clip(tmp_path / "clip.ts", "mpegts", first_pts=36)
    res = media.mux(ts, np.zeros(96000, np.float32), 48000, tmp_path / "out.mp4")
    with av.open(str(res.path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert float(v.start_time * v.time_base) == pytest.approx(0.0, abs=1e-3)
        assert float(a.start_time * a.time_base) == pytest.approx(0.0, abs=0.03)
        assert sum(1 for _ in c.decode(v)) == 50


# ---------------------------------------------------------------------------------------------
# budget


def _info(width: int, height: int, duration: float | None) -> media.VideoInfo:
    return media.VideoInfo(duration=duration, frame_rate=None, fps=None, num_frames=None, width=width, height=height,
                           has_video=True, has_audio=False, audio_sample_rate=None, audio_channels=None,
                           container="mp4", video_codec="h264", audio_codec=None)


def test_check_budget():
    media.check_budget(_info(1920, 1088, 3600.0))  # the defaults: 1080p passes, any length (15 s are used)
    assert media.DEFAULT_MAX_PIXELS == 1920 * 1088 and media.DEFAULT_MAX_SECONDS is None
    with pytest.raises(MediaError, match=r"3840x2160 \(8\.3 MP per frame\), over the limit of 2\.1 MP .*max_pixels.*scale it down"):
        media.check_budget(_info(3840, 2160, 10.0))
    with pytest.raises(MediaError, match=r"20\.00 s long, over the limit of 16 s \(max_seconds\); cut it"):
        media.check_budget(_info(640, 360, 20.0), max_seconds=16)
    media.check_budget(_info(3840, 2160, None), max_pixels=None, max_seconds=16)
