"""Full-length generation: window plan, windowed decoding, scene-cut joins, seeds, ranges, and a 40 s
clip end to end on the demo model."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from foleyserve import media
from foleyserve.media.windows import decode_windows
from foleyserve.pipeline import longform
from foleyserve.pipeline.demo import sample_clip_path
from foleyserve.pipeline.pipeline import Engine
from foleyserve.pipeline.requests import GenerationRequest, RequestError
from foleyserve.pipeline.windowing import (
    CUT_FADE, Join, assemble, place_join, plan_windows, scene_cuts, window_seed,
)

CUT_IN_OVERLAP = 13.7  # inside the first overlap of a 40 s plan (12.48-15 s)
CUT_OUTSIDE = 20.3


def make_clip(path, seconds: float, *, fps: int = 25, cuts=(), first_frame: int = 0, lossless: bool = False):
    """A small synthetic clip: moving stripes over a flat colour that changes at each cut.

    Frame i is the same picture whatever ``first_frame`` is, so a clip made from ``first_frame=k``
    is the standalone cut of a longer one from k/fps seconds on (exactly so with ``lossless``)."""
    h, w = 48, 64
    yy, xx = np.mgrid[0:h, 0:w]
    colours = np.array([[40, 90, 160], [200, 120, 40], [60, 180, 90]], np.float64)
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1" if lossless else "libx264", rate=fps)
        s.width, s.height = w, h
        s.pix_fmt = "yuv444p" if lossless else "yuv420p"
        if not lossless:
            s.options = {"crf": "18", "preset": "ultrafast"}
        for k in range(int(round(seconds * fps))):
            i = first_frame + k
            scene = sum(i / fps >= cut for cut in cuts)
            img = colours[scene % 3] + 30 * np.sin((xx + 3 * i) / 7.0)[..., None] + 20 * np.cos((yy - 2 * i) / 5.0)[..., None]
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, fps)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def engine():
    return Engine.demo()


@pytest.fixture(scope="module")
def clip40(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("lf") / "clip40.mp4", 40.0, cuts=(CUT_IN_OVERLAP, CUT_OUTSIDE))


# -- the plan ----------------------------------------------------------------------------------


def test_plan_40_s_is_three_equal_windows_overlapping_2_5_s():
    plan = plan_windows(0, 40)
    assert [(float(w.start), float(w.end)) for w in plan.windows] == [(0, 15), (12.48, 27.48), (25, 40)]
    assert {w.end - w.start for w in plan.windows} == {Fraction(15)}
    assert [float(b - a) for a, b in plan.overlaps()] == pytest.approx([2.52, 2.48])


@pytest.mark.parametrize("length", [15.5, 16, 27.5, 40, 41, 61.3, 600])
def test_plans_cover_the_range_with_equal_windows_of_at_most_15_s(length):
    plan = plan_windows(2, 2 + length)
    w = plan.windows
    assert w[0].start == 2 and w[-1].end == Fraction(2 + length).limit_denominator(1_000_000)
    sizes = {x.end - x.start for x in w}
    # one length (the last window may end a fraction of a frame early, where the range does)
    assert max(sizes) <= 15 and max(sizes) - min(sizes) < Fraction(1, 25)
    assert all(float(b - a) >= 2.5 - 0.04 for a, b in plan.overlaps())
    # the fewest windows: one fewer could not keep 2.5 s overlaps at 15 s each
    assert (len(w) - 1) * 15 - (len(w) - 2) * 2.5 < length


def test_a_range_of_at_most_15_s_is_one_window():
    assert len(plan_windows(3, 18).windows) == 1


# -- seeds ---------------------------------------------------------------------------------------


def test_window_seeds_are_deterministic_distinct_and_start_with_the_request_seed():
    assert window_seed(7, 0) == 7
    seeds = [window_seed(7, i) for i in range(50)]
    assert seeds == [window_seed(7, i) for i in range(50)]
    assert len(set(seeds)) == 50 and all(0 <= s < 2**63 for s in seeds)
    assert window_seed(7, 1) != window_seed(8, 0) and window_seed(7, 1) != window_seed(8, 1)
    assert window_seed(0, 1) == 7437440666149519712  # pinned: a change is a change of every long result


# -- decoding --------------------------------------------------------------------------------------


def test_each_window_decodes_exactly_like_its_standalone_cut(tmp_path):
    full = make_clip(tmp_path / "full.mkv", 12.0, lossless=True, cuts=(5.0,))
    windows = [(Fraction(0), Fraction(5)), (Fraction(4), Fraction(9)), (Fraction(172, 25), Fraction(12))]
    got = list(decode_windows(full, windows))
    assert len(got) == 3
    for (a, b), dec in zip(windows, got):
        cut = make_clip(tmp_path / f"cut{float(a)}.mkv", float(b - a), lossless=True, cuts=(5.0,), first_frame=int(a * 25))
        want = media.decode_frames(cut)
        for fps in (8, 25):
            assert dec.frames[fps].shape == want.frames[fps].shape
            assert np.array_equal(dec.frames[fps], want.frames[fps])
        assert dec.last_frame_time == pytest.approx(want.last_frame_time)


def test_windows_past_the_end_of_the_frames_come_back_empty(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", 3.0)
    a, b = decode_windows(clip, [(Fraction(0), Fraction(2)), (Fraction(4), Fraction(6))])
    # 49, not 50: the official rule's accumulated sample times pass 1.96 s (as decode_frames does)
    assert len(a.frames[25]) == 49 and len(b.frames[25]) == 0


# -- scene cuts and joins ---------------------------------------------------------------------------


def test_scene_cut_rule_finds_the_cut_and_not_the_motion(clip40):
    (dec,) = decode_windows(clip40, [(Fraction(10), Fraction(22))])
    times = [10 + k / 25 for k, _ in scene_cuts(dec.frames[25])]
    # within two 25 fps samples: the official sampling rule's float accumulation shifts samples by one
    assert len(times) == 2 and all(abs(t - cut) <= 0.08 for t, cut in zip(times, (CUT_IN_OVERLAP, CUT_OUTSIDE)))


def test_joins_sit_on_a_cut_in_the_overlap_else_span_it(clip40):
    plan = plan_windows(0, 40)
    first, second, _ = decode_windows(clip40, [(w.start, w.end) for w in plan.windows])
    (ov1, ov2) = plan.overlaps()
    j1 = place_join(ov1, plan.windows[0].start, first.frames[25])
    j2 = place_join(ov2, plan.windows[1].start, second.frames[25])
    assert j1.at_cut and j1.end - j1.start == CUT_FADE
    assert abs(float(j1.start + j1.end) / 2 - CUT_IN_OVERLAP) <= 0.08
    assert not j2.at_cut and (j2.start, j2.end) == ov2


def test_assemble_is_equal_power_and_continuous():
    rate, ones, zeros = 1000, torch.ones(3000), torch.zeros(3000)
    join = [Join(Fraction(2), Fraction(3), False)]

    def run(a, b):
        out = assemble([(Fraction(0), a), (Fraction(2), b)], join, start=Fraction(0), end=Fraction(5), sample_rate=rate)
        assert out.shape == (1, 5000)
        return out[0].double()

    fade_out, fade_in = run(ones, zeros), run(zeros, ones)
    assert torch.equal(fade_out[:2000], torch.ones(2000)) and not fade_out[3000:].any()
    assert not fade_in[:2000].any() and torch.equal(fade_in[3000:], torch.ones(2000))
    # equal power: the gains' squares sum to one across the whole fade
    assert torch.allclose(fade_out[2000:3000] ** 2 + fade_in[2000:3000] ** 2, torch.ones(1000, dtype=torch.float64), atol=1e-6)
    # and neither gain steps: the largest sample-to-sample change is one ramp increment
    both = run(ones, ones)
    assert (both[1:] - both[:-1]).abs().max() <= 1.5 * torch.pi / 2 / 1000


# -- ranges and routing -------------------------------------------------------------------------------


def test_start_and_duration_are_validated():
    for kwargs, match in [(dict(start=-1.0), "start"), (dict(duration=0.0), "duration"), (dict(start=float("nan")), "start")]:
        with pytest.raises(RequestError, match=match):
            GenerationRequest(video="x.mp4", **kwargs).validate()


def test_routing(clip40):
    assert longform.plan_for(GenerationRequest(video=sample_clip_path())) is None  # a <= 15 s clip: as before
    assert longform.plan_for(GenerationRequest(video=clip40, duration=15)) is None  # the old cut, kept
    assert len(longform.plan_for(GenerationRequest(video=clip40)).windows) == 3
    plan = longform.plan_for(GenerationRequest(video=clip40, start=30.0, duration=20.0))
    assert (plan.start, plan.end) == (30, 40)
    with pytest.raises(RequestError, match="past the end"):
        longform.plan_for(GenerationRequest(video=clip40, start=40.0))


def test_a_short_clip_is_bit_identical_to_the_single_clip_path(engine):
    req = GenerationRequest(video=sample_clip_path(), steps=2, seed=5)
    job = engine.prepare(req)
    want = engine.finish(job, engine.sample_jobs([job])[0]).waveform
    assert torch.equal(engine.generate(req).waveform, want)


def test_a_range_equals_generating_its_standalone_cut(engine, tmp_path):
    full = make_clip(tmp_path / "full.mkv", 6.0, lossless=True, cuts=(3.0,))
    cut = make_clip(tmp_path / "cut.mkv", 3.0, lossless=True, cuts=(3.0,), first_frame=25)
    ranged = engine.generate(GenerationRequest(video=full, start=1.0, duration=3.0, steps=2, seed=9))
    alone = engine.generate(GenerationRequest(video=cut, steps=2, seed=9))
    assert ranged.audio_seconds == pytest.approx(3.0) and ranged.video_seconds == pytest.approx(6.0)
    # The cut's own audio stops where its 25 fps samples do (2.96 s, the official rule); the range's
    # timeline goes on to 3 s in silence.
    n = alone.waveform.shape[-1]
    assert n == 148 * 960 and torch.equal(ranged.waveform[:, :n], alone.waveform)
    assert not ranged.waveform[:, n:].any()


# -- 40 s end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_run(engine, clip40, tmp_path_factory):
    events, calls = [], []
    real = engine.sample_jobs

    def spy(jobs, **kw):
        calls.append([j.request.seed for j in jobs])
        return real(jobs, **kw)

    engine.sample_jobs = spy
    try:
        out = tmp_path_factory.mktemp("out") / "long.mp4"
        req = GenerationRequest(video=clip40, prompt="footsteps", steps=2, seed=3, output=out, keep_original_audio_gain=0.5)
        result = engine.generate(req, progress=lambda *e: events.append(e))
    finally:
        del engine.sample_jobs
    return result, events, calls


@pytest.mark.slow
def test_40_s_clip_gives_40_s_of_audio_in_one_batch(long_run):
    result, events, calls = long_run
    assert result.waveform.shape == (1, 40 * 48000)
    assert result.audio_seconds == pytest.approx(40.0) and result.video_seconds == pytest.approx(40.0)
    assert not any("silent" in w for w in result.warnings)
    # all three windows in ONE denoising loop, each with its own seed
    assert calls == [[window_seed(3, i) for i in range(3)]]
    assert [e for e in events if e[0] == "window"] == [("window", i, 3) for i in range(4)]
    assert ("denoise", 2, 2) in events
    (out,) = result.files
    with av.open(str(out)) as c:
        assert float(c.duration / av.time_base) == pytest.approx(40.0, abs=0.1)
        audio = c.streams.audio[0]
        assert float(audio.duration * audio.time_base) == pytest.approx(40.0, abs=0.1)


def _flux(x: np.ndarray, n: int = 1024, hop: int = 512) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(x, n)[::hop] * np.hanning(n)
    mag = np.log1p(np.abs(np.fft.rfft(frames, axis=1)) * 100)
    return np.concatenate([[0.0], np.sqrt((np.diff(mag, axis=0) ** 2).mean(axis=1))])


@pytest.mark.slow
def test_joins_show_no_discontinuity(engine, clip40, long_run):
    result = long_run[0]
    x = result.waveform[0].numpy().astype(np.float64)
    plan = longform.plan_for(GenerationRequest(video=clip40))
    first, second, _ = decode_windows(clip40, [(w.start, w.end) for w in plan.windows])
    joins = [place_join(o, w.start, d.frames[25]) for o, w, d in zip(plan.overlaps(), plan.windows, (first, second))]
    edges = sorted({int(round(t * 48000)) for j in joins for t in (j.start, j.end, (j.start + j.end) / 2)})
    hop, flux = 512, _flux(x)
    near = np.zeros(len(flux), bool)
    for e in edges:
        near[max(0, e // hop - 3) : e // hop + 2] = True
    assert flux[near].max() <= np.percentile(flux[~near], 99)
    jumps = np.abs(np.diff(x))
    at = np.zeros(len(jumps), bool)
    for e in edges:
        at[max(0, e - 2) : e + 2] = True
    assert jumps[at].max() <= np.percentile(jumps[~at], 99.9)


def test_cli_start_and_duration_reach_the_request(tmp_path):
    from foleyserve import cli

    args = cli.build_parser().parse_args(["generate", "in.mp4", "--demo", "--start", "12.5", "--duration", "30"])
    req = cli._request(args, args.video, tmp_path / "o.wav")
    assert (req.start, req.duration) == (12.5, 30.0)
    plain = cli.build_parser().parse_args(["generate", "in.mp4", "--demo"])
    assert (cli._request(plain, plain.video, tmp_path / "o.wav").start, plain.duration) == (0.0, None)


def test_server_form_takes_start_and_duration():
    from foleyserve.server.forms import TEXT_FIELDS, form_model
    from foleyserve.server.settings import ServerConfig

    assert {"start", "duration"} <= set(TEXT_FIELDS)
    model = form_model(ServerConfig())
    form = model(start="20", duration="25.5")
    assert (form.start, form.duration) == (20.0, 25.5)
    with pytest.raises(ValueError):
        model(duration="0")


def test_the_batcher_runs_a_long_request_as_one_job_next_to_short_ones(engine, tmp_path):
    from foleyserve.runtime.batcher import Batcher, BatcherConfig

    long_clip = make_clip(tmp_path / "long.mp4", 17.0)
    calls = []
    real = engine.sample_jobs

    def spy(jobs, **kw):
        calls.append(len(jobs))
        return real(jobs, **kw)

    engine.sample_jobs = spy
    try:
        with Batcher(engine, BatcherConfig(max_batch_size=4, max_wait_ms=200)) as b:
            long_job = b.submit(GenerationRequest(video=long_clip, steps=2, seed=4))
            short_job = b.submit(GenerationRequest(video=sample_clip_path(), steps=2, seed=4))
            ranged = b.submit(GenerationRequest(video=long_clip, steps=2, seed=4, start=1.0, duration=2.0))
            for job in (long_job, short_job, ranged):
                assert job.wait(600), job.status
    finally:
        del engine.sample_jobs
    assert [j.status for j in (long_job, short_job, ranged)] == ["succeeded"] * 3
    assert long_job.result.waveform.shape == (1, 17 * 48000) and long_job.progress == (2, 2)
    assert ranged.result.waveform.shape == (1, 2 * 48000)
    assert short_job.result.audio_seconds == pytest.approx(3.96)
    assert sorted(calls) == [1, 1, 2]  # the long job's two windows in one loop of their own


def test_generate_batch_runs_a_long_request_in_windows(engine, tmp_path):
    long_clip = make_clip(tmp_path / "long.mp4", 16.0)
    res, bad = engine.generate_batch([GenerationRequest(video=long_clip, steps=1), GenerationRequest(video=long_clip, start=99.0)])
    assert res.waveform.shape == (1, 16 * 48000)
    assert isinstance(bad, RequestError) and "past the end" in str(bad)
