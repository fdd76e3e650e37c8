"""Output loudness and mixing (foleyserve.loudness): BS.1770-4 level to a target under a true-peak
ceiling, silence left alone, the sidechain ducker's depth and timing, 24-bit files, and the
options through the engine, the CLI and the HTTP form."""

from __future__ import annotations

import io
import math
from pathlib import Path

import av
import numpy as np
import pyloudnorm
import pytest
import torch
from scipy.signal import resample

from foleyserve import loudness as L
from foleyserve import media
from foleyserve.pipeline.demo import sample_clip_path
from foleyserve.pipeline.requests import GenerationRequest, RequestError

SR = 48000


# ------------------------------------------------------------------------- reference measures


def lufs(x: np.ndarray) -> float:
    """pyloudnorm on the mono signal played as dual mono (what the mp4 carries)."""
    x = np.asarray(x, np.float64).reshape(-1, np.asarray(x).shape[-1])
    if x.shape[0] == 1:
        x = np.concatenate([x, x])
    return pyloudnorm.Meter(SR).integrated_loudness(x.T)


def true_peak_fft(x: np.ndarray) -> float:
    """4x oversampled peak by FFT interpolation: independent of the polyphase filter under test."""
    x = np.asarray(x, np.float64).reshape(-1, np.asarray(x).shape[-1])
    return 20 * math.log10(np.abs(resample(x, 4 * x.shape[-1], axis=-1)).max())


def speech_like(seconds: float = 6.0, seed: int = 0) -> np.ndarray:
    """Noise shaped to the speech band, in 4 Hz syllables with pauses between phrases."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec *= np.exp(-0.5 * (np.log(np.maximum(f, 1) / 500) / 0.8) ** 2)
    voice = np.fft.irfft(spec, n)
    voice = np.clip(voice, -3 * voice.std(), 3 * voice.std())  # speech's crest factor, ~12 dB
    t = np.arange(n) / SR
    syllables = 0.2 + 0.8 * np.abs(np.sin(2 * np.pi * 4 * t))
    phrases = (np.sin(2 * np.pi * 0.35 * t) > -0.3).astype(float)
    x = voice * syllables * phrases
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def noise(seconds: float = 6.0, rms: float = 0.05, seed: int = 1) -> np.ndarray:
    return (rms * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def tone(seconds: float = 6.0, freq: float = 997.0, amp: float = 0.1, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


SIGNALS = {"speech": speech_like, "noise": noise, "tone": tone}


# ------------------------------------------------------------------------- measure / normalise


def test_measure_is_bs1770_calibrated_and_mono_reads_as_dual_mono():
    # BS.1770: a 997 Hz sine at -20 dBFS peak in both channels of a stereo pair reads -20 LUFS
    # (the same sine in one channel alone reads 3 dB lower).
    x = tone(amp=0.1)
    assert L.measure(x, SR) == pytest.approx(-20.0, abs=0.1)
    assert L.measure(x, SR, dual_mono=False) == pytest.approx(-23.01, abs=0.1)
    assert L.measure(np.stack([x, x]), SR) == pytest.approx(L.measure(x, SR), abs=1e-9)


@pytest.mark.parametrize("target", [-23.0, -16.0])
@pytest.mark.parametrize("kind", sorted(SIGNALS))
def test_normalise_reaches_the_target_under_the_ceiling(kind, target):
    x = SIGNALS[kind]()
    y, report = L.normalise(x, SR, target)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert report.limited_by == "target" and report.note() is None
    assert abs(lufs(y) - target) <= 0.5  # measured: < 0.01 LU
    assert abs(report.output_lufs - lufs(y)) < 0.01
    assert true_peak_fft(y) <= L.DEFAULT_TRUE_PEAK_DBTP + 0.05
    assert report.true_peak_dbtp == pytest.approx(L.true_peak(y, SR), abs=1e-6)


def test_true_peak_sees_inter_sample_peaks():
    # A quarter-rate sine sampled 45 degrees off its crests: every sample is at 0.707 of the peak.
    # Faded in and out: an abrupt start really overshoots (by 0.1 dB here), which is not the point.
    fade = np.hanning(960)
    x = tone(1.0, freq=SR / 4, amp=0.5, phase=math.pi / 4)
    x[:480] *= fade[:480]
    x[-480:] *= fade[480:]
    assert 20 * math.log10(np.abs(x).max()) == pytest.approx(20 * math.log10(0.5) - 3.01, abs=0.01)
    assert L.true_peak(x, SR) == pytest.approx(20 * math.log10(0.5), abs=0.1)
    assert L.true_peak(x, SR) == pytest.approx(true_peak_fft(x), abs=0.1)


def test_peaky_audio_stops_at_the_true_peak_ceiling_and_says_so():
    clicks = np.zeros(6 * SR, np.float32)
    clicks[:: SR // 2] = 0.5  # sharp transients: a large crest factor
    clicks += noise(6.0, rms=0.002)
    y, report = L.normalise(clicks, SR, -14.0)
    assert report.limited_by == "true_peak"
    assert report.true_peak_dbtp == pytest.approx(-1.0, abs=1e-9)
    assert true_peak_fft(y) <= -1.0 + 0.05
    assert lufs(y) < -14.0 - 0.5 and "true-peak ceiling" in report.note()


def test_silence_and_sub_gate_audio_are_left_untouched():
    for x in (np.zeros(3 * SR, np.float32), noise(3.0, rms=10 ** (-85 / 20))):
        y, report = L.normalise(x, SR, -23.0)
        assert np.array_equal(y, x) and report.gain_db == 0.0 and report.limited_by == "below_gate"
        assert "left as it is" in report.note()
    short = noise(0.2)
    y, report = L.normalise(short, SR, -23.0)
    assert np.array_equal(y, short) and report.limited_by == "too_short"


def test_a_very_quiet_output_is_raised_at_most_the_gain_cap():
    x = noise(4.0, rms=10 ** (-62 / 20))  # about -60 LUFS: above the gate, far under the target
    y, report = L.normalise(x, SR, -23.0)
    assert report.limited_by == "max_gain" and report.gain_db == pytest.approx(L.MAX_GAIN_DB)
    assert lufs(y) == pytest.approx(lufs(x) + L.MAX_GAIN_DB, abs=0.01)


def test_targets_outside_the_range_are_refused():
    with pytest.raises(ValueError, match="loudness must be from -60 to -5"):
        L.normalise(noise(1.0), SR, -3.0)
    with pytest.raises(RequestError, match="loudness"):
        GenerationRequest(video="x.mp4", loudness=float("nan")).validate()
    with pytest.raises(RequestError, match="bit_depth applies to .wav and .flac"):
        GenerationRequest(video="x.mp4", output="x.mp4", bit_depth=24).validate()
    with pytest.raises(RequestError, match="bit_depth must be 16 or 24"):
        GenerationRequest(video="x.mp4", output="x.wav", bit_depth=32).validate()


# ------------------------------------------------------------------------------------ ducking


def _reduction_db(gain: np.ndarray, t: float) -> float:
    return -20 * math.log10(gain[int(t * SR)])


def test_ducking_depth_and_timing():
    s = L.DuckSettings()
    side = np.zeros(6 * SR, np.float32)
    side[2 * SR : 4 * SR] = noise(2.0, rms=0.1)  # -20 dBFS RMS from 2 s to 4 s
    g = L.duck_gain(side, SR, 6 * SR, s)
    # 16 dB over the threshold at 4:1 asks for 12 dB, the depth.
    expected = min(s.depth_db, (-20 - s.threshold_db) * (1 - 1 / s.ratio))
    assert np.all(g[: int(1.95 * SR)] == 1.0)  # nothing before the original gets loud
    assert _reduction_db(g, 3.0) == pytest.approx(expected, abs=0.3)
    # Attack: a 63 % step within attack_ms (+ half the RMS window, which starts the rise early),
    # all of it within 5 time constants.
    half_window = s.window_ms / 2000
    assert _reduction_db(g, 2.0 + s.attack_ms / 1000 + half_window) >= 0.63 * expected - 0.3
    assert _reduction_db(g, 2.0 + 5 * s.attack_ms / 1000 + half_window) >= 0.99 * expected - 0.3
    assert _reduction_db(g, 2.0 - 3 * half_window) < 0.05
    # Release: back to 37 % after release_ms, and gone after 6 time constants.
    assert _reduction_db(g, 4.0 + half_window + s.release_ms / 1000) == pytest.approx(expected / math.e, abs=0.4)
    assert _reduction_db(g, 4.0 + half_window + 6 * s.release_ms / 1000) < 0.05 * expected


def test_ducking_lowers_the_foley_only_where_the_original_is_loud():
    foley = noise(6.0, rms=0.05, seed=5)
    side = np.zeros((2, 6 * SR), np.float32)
    side[:, 2 * SR : 4 * SR] = noise(2.0, rms=0.1, seed=6)
    ducked = L.duck(foley, side, SR)
    rms_db = lambda x, a, b: 10 * math.log10(np.mean(x[int(a * SR) : int(b * SR)] ** 2))  # noqa: E731
    assert rms_db(ducked, 0.5, 1.5) == pytest.approx(rms_db(foley, 0.5, 1.5), abs=1e-6)
    assert rms_db(ducked, 5.5, 6.0) == pytest.approx(rms_db(foley, 5.5, 6.0), abs=0.05)  # 6+ release constants on
    assert rms_db(foley, 2.5, 3.5) - rms_db(ducked, 2.5, 3.5) == pytest.approx(12.0, abs=0.3)
    # A quiet background (room tone under the threshold) never ducks.
    room = noise(6.0, rms=10 ** (-50 / 20), seed=7)
    assert np.array_equal(L.duck(foley, room, SR), foley)


def test_duck_and_mix_is_normalised_and_as_long_as_the_longer():
    foley, _ = L.normalise(np.stack([noise(4.0)] * 2), SR, -23.0)
    original = np.stack([speech_like(5.0)] * 2)
    mixed, report = L.duck_and_mix(foley, original, SR, -23.0)
    assert mixed.shape == (2, 5 * SR)
    assert abs(lufs(mixed) - (-23.0)) <= 0.5 and report.limited_by == "target"
    assert true_peak_fft(mixed) <= -1.0 + 0.05


# ------------------------------------------------------------------------------------ bit depth


def _decode(path: Path) -> tuple[np.ndarray, str]:
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        return np.concatenate([f.to_ndarray() for f in c.decode(s)], axis=-1).reshape(-1), s.codec_context.name


@pytest.mark.parametrize("ext,bits", [("wav", 24), ("flac", 24), ("wav", 16), ("flac", 16)])
def test_pcm_files_round_trip_at_their_bit_depth(tmp_path, ext, bits):
    x = np.clip(speech_like(1.0) * 3, -1, 1)
    got, codec = _decode(media.write_audio(tmp_path / f"x.{ext}", x, SR, bits=bits))
    if ext == "wav":
        assert codec == f"pcm_s{bits}le"
    ints = got.astype(np.int64) >> (32 - bits) if got.dtype == np.int32 else got.astype(np.int64)
    if got.dtype == np.int32:
        assert np.all(got.astype(np.int64) & ((1 << (32 - bits)) - 1) == 0)  # nothing below 24 bits
    scale = 2 ** (bits - 1) - 1
    np.testing.assert_array_equal(ints, np.rint(x.astype(np.float64) * scale).astype(np.int64))
    assert np.abs(ints / scale - x).max() <= 0.5 / scale + 1e-9


# ----------------------------------------------------------------------- engine, CLI and API


@pytest.fixture(scope="module")
def engine():
    from foleyserve import Engine

    return Engine.demo()


def clip_with_audio(path: Path, seconds: float = 2.0) -> Path:
    """A small H.264 clip with a loud mono AAC track (speech-like) for keep_original_audio."""
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=25)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = out.add_stream("aac", rate=SR)
        a.layout = "mono"
        for i in range(int(seconds * 25)):
            for p in v.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 9 * i % 256, np.uint8), format="rgb24")):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
        frame = av.AudioFrame.from_ndarray(speech_like(seconds)[None] * 2, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = SR, 0
        for p in [*a.encode(frame), *a.encode(None)]:
            out.mux(p)
    return path


def test_engine_writes_the_target_and_keeps_the_raw_waveform(engine, tmp_path):
    req = dict(video=sample_clip_path(), prompt="a ball bouncing", steps=1, seed=3)
    raw = engine.generate(GenerationRequest(**req, output=tmp_path / "raw.wav", loudness=None))
    web = engine.generate(GenerationRequest(**req, output=tmp_path / "web.flac", loudness=-16.0, bit_depth=16))
    # Conformance and caches see the decoder's output, whatever the loudness.
    assert torch.equal(raw.waveform, web.waveform) and raw.output_waveform is raw.waveform
    written, _ = _decode(web.files[0])
    assert written.dtype == np.int16
    assert abs(lufs(written / 32767.0) - (-16.0)) <= 0.5
    assert abs(lufs(web.output_waveform.numpy()) - (-16.0)) <= 0.5
    assert web.loudness.limited_by == "target" and true_peak_fft(web.output_waveform.numpy()) <= -1.0 + 0.05
    raw_file, _ = _decode(raw.files[0])
    np.testing.assert_array_equal(raw_file, raw.waveform.numpy().reshape(-1))


def test_engine_ducks_under_a_kept_original_and_normalises_the_mix(engine, tmp_path):
    src = clip_with_audio(tmp_path / "talk.mp4")
    res = engine.generate(GenerationRequest(video=src, steps=1, output=tmp_path / "mix.mp4", keep_original_audio_gain=1.0))
    mixed, _ = _decode(res.files[0])  # fltp stereo, planes one after the other
    mixed = mixed.reshape(2, -1)
    # AAC is lossy; the level survives it within a fraction of a LU.
    assert abs(lufs(mixed) - L.DEFAULT_TARGET_LUFS) <= 0.5
    assert true_peak_fft(mixed) <= -1.0 + 0.5


def test_cli_generate_and_batch_accept_the_options(tmp_path, capsys):
    from foleyserve.cli import main

    out = tmp_path / "x.wav"
    assert main(["generate", str(sample_clip_path()), "--demo", "--steps", "1", "--out", str(out),
                 "--loudness", "-18", "--bit-depth", "24"]) == 0
    got, codec = _decode(out)
    assert codec == "pcm_s24le" and abs(lufs(got / 2.0**31) - (-18.0)) <= 0.5
    assert main(["generate", str(sample_clip_path()), "--demo", "--out", str(tmp_path / "y.mp4"), "--bit-depth", "24"]) == 2
    assert "bit_depth applies to .wav and .flac" in capsys.readouterr().err
    assert main(["generate", str(sample_clip_path()), "--demo", "--loudness", "-2"]) == 2
    assert "loudness must be from -60 to -5" in capsys.readouterr().err
    (tmp_path / "jobs.csv").write_text(f"id,video,prompt\nball,{sample_clip_path()},a ball\n")
    batch = ["batch", str(tmp_path / "jobs.csv"), "--out-dir", str(tmp_path / "out"), "--demo", "--steps", "1"]
    assert main([*batch, "--format", "mp4", "--bit-depth", "16"]) == 2
    assert "--bit-depth applies to wav and flac" in capsys.readouterr().err
    assert main([*batch, "--format", "flac", "--loudness", "off", "--bit-depth", "16"]) == 0
    got, _ = _decode(tmp_path / "out" / "ball.flac")
    assert got.dtype == np.int16


def test_api_form_takes_loudness_and_bit_depth(engine, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from foleyserve.server.app import create_app
    from foleyserve.server.settings import ServerConfig

    video = sample_clip_path().read_bytes()
    with TestClient(create_app(ServerConfig(data_dir=tmp_path / "data", cache="memory"), engine=engine)) as c:
        info = c.get("/v1/info").json()
        assert info["defaults"]["loudness"] == L.DEFAULT_TARGET_LUFS and info["limits"]["bit_depths"] == [16, 24]

        def post(**fields):
            data = {"steps": "1", **fields}
            return c.post("/v1/generations?wait=60", files={"video": ("c.mp4", video, "video/mp4")}, data=data)

        r = post(output="wav", loudness="-20", bit_depth="24")
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        got, codec = _decode_bytes(c.get(r.json()["audio_url"]).content)
        assert codec == "pcm_s24le" and abs(lufs(got / 2.0**31) - (-20.0)) <= 0.5
        r = post(output="wav", loudness="off")
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        for bad, named in ((dict(loudness="loud"), "loudness must be a target in LUFS"),
                           (dict(bit_depth="32", output="wav"), "bit_depth must be 16 or 24"),
                           (dict(bit_depth="16"), "bit_depth applies to")):
            r = post(**bad)
            assert r.status_code == 422 and named in r.json()["error"]["message"], r.text


def _decode_bytes(data: bytes) -> tuple[np.ndarray, str]:
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.audio[0]
        return np.concatenate([f.to_ndarray() for f in c.decode(s)], axis=-1).reshape(-1), s.codec_context.name
