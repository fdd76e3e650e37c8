"""foleyserve.runtime.batcher: grouping, waiting, equality with solo runs, failures, queue limit,
priorities, cancellation, length buckets and the caches, on the demo engine with tiny clips."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from foleyserve.config import ConfigError
from foleyserve.media import decode_frames
from foleyserve.pipeline.pipeline import Engine
from foleyserve.pipeline.requests import GenerationRequest, RequestError
from foleyserve.runtime import batcher as batcher_module
from foleyserve.runtime import buckets as buckets_module
from foleyserve.runtime.batcher import Batcher, BatcherConfig, QueueFull, trim_to_whole_seconds

WAIT = 60.0  # generous bound for job.wait: only hit when something is broken
STEPS = 3


def _write_clip(path: Path, n_frames: int, rate: int = 25, shade: int = 0) -> Path:
    """A small H.264 clip whose frames differ from each other and, through ``shade``, from other clips."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.height, stream.width = 48, 64
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            img = np.zeros((48, 64, 3), np.uint8)
            img[..., 0] = (7 * i + shade) % 256
            img[: 8 + i % 40, :, 1] = 200
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.demo()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("clips")
    corrupt = d / "corrupt.mp4"
    corrupt.write_bytes(_write_clip(d / "whole.mp4", 25).read_bytes()[:300])  # an MP4 cut short
    return SimpleNamespace(
        one=_write_clip(d / "one.mp4", 25),  # 1.00 s -> 24 frames at 25 fps -> 48 latents
        one_b=_write_clip(d / "one_b.mp4", 25, shade=90),  # same length, other pictures
        longer=_write_clip(d / "longer.mp4", 38),  # 1.52 s -> another latent length
        s13=_write_clip(d / "s13.mp4", 33),  # 1.32 s
        s17=_write_clip(d / "s17.mp4", 43),  # 1.72 s
        ends_on_second=_write_clip(d / "ends.mp4", 26),  # 25 fps to 1.00 s: 25 frames at 25 fps, 9 at 8 fps
        at30=_write_clip(d / "at30.mp4", 30, rate=30),  # 30 fps, 1.0 s: 25 frames at 25 fps, 8 at 8 fps
        short=_write_clip(d / "short.mp4", 10),  # 0.4 s: under one Synchformer window
        corrupt=corrupt,
    )


@pytest.fixture
def calls(engine, monkeypatch) -> list[SimpleNamespace]:
    """Every engine.sample_jobs call: the seeds of its rows, their latent length and when it began."""
    record: list[SimpleNamespace] = []
    original = engine.sample_jobs

    def spy(jobs, **kw):
        record.append(SimpleNamespace(seeds=[j.request.seed for j in jobs], length=jobs[0].latent_length, at=time.monotonic()))
        return original(jobs, **kw)

    monkeypatch.setattr(engine, "sample_jobs", spy)
    return record


def _req(video: Path | bytes, seed: int, out: Path | None = None, **kw) -> GenerationRequest:
    kw.setdefault("steps", STEPS)
    return GenerationRequest(video=video, prompt=kw.pop("prompt", "footsteps on gravel"), seed=seed, output=out, **kw)


def _wait_all(jobs) -> None:
    for job in jobs:
        assert job.wait(WAIT), f"job {job.id} did not finish (status {job.status})"


# ---------------------------------------------------------------------------------------------
# forming batches


def test_same_length_jobs_share_one_denoising_loop(engine, clips, calls):
    batches: list[tuple[int, dict]] = []
    # A minute of max_wait: only reaching max_batch_size can start this batch.
    cfg = BatcherConfig(max_batch_size=2, max_wait_ms=60_000)
    with Batcher(engine, cfg, on_batch=lambda n, stages: batches.append((n, stages))) as b:
        jobs = [b.submit(_req(clips.one, 1)), b.submit(_req(clips.one_b, 2))]
        _wait_all(jobs)
    assert [c.seeds for c in calls] == [[1, 2]]
    assert [j.status for j in jobs] == ["succeeded", "succeeded"]
    assert [j.batch_size for j in jobs] == [2, 2]
    assert [j.progress for j in jobs] == [(STEPS, STEPS)] * 2
    assert len(batches) == 1 and batches[0][0] == 2 and batches[0][1]["dit"] > 0
    assert not any(j.cache_hit for j in jobs)


def test_different_latent_lengths_never_share_a_loop(engine, clips, calls):
    with Batcher(engine, BatcherConfig(max_batch_size=4, max_wait_ms=300)) as b:
        jobs = [b.submit(_req(clips.one, 1)), b.submit(_req(clips.longer, 2))]
        _wait_all(jobs)
    assert sorted(c.seeds for c in calls) == [[1], [2]]
    assert len({c.length for c in calls}) == 2
    assert jobs[0].result.audio_seconds != jobs[1].result.audio_seconds


def test_equal_latent_length_but_different_siglip_frames_batch_apart(engine, clips, calls):
    """1.00 s at 25 fps (up to t=1.0) and 1.0 s at 30 fps give 25 frames at 25 fps (same latent
    length) but 9 and 8 frames at 8 fps, which cannot be stacked into one batch."""
    with Batcher(engine, BatcherConfig(max_batch_size=2, max_wait_ms=300)) as b:
        jobs = [b.submit(_req(clips.ends_on_second, 1)), b.submit(_req(clips.at30, 2))]
        _wait_all(jobs)
    assert [j.status for j in jobs] == ["succeeded", "succeeded"], [j.error for j in jobs]
    assert sorted(c.seeds for c in calls) == [[1], [2]]
    assert calls[0].length == calls[1].length


def test_a_lone_job_waits_max_wait_and_a_later_job_can_join(engine, clips, calls):
    with Batcher(engine, BatcherConfig(max_batch_size=4, max_wait_ms=400)) as b:
        submitted = time.monotonic()
        _wait_all([b.submit(_req(clips.one, 1))])
    # It became ready after it was submitted, and then waited max_wait for company.
    assert len(calls) == 1 and calls[0].at - submitted >= 0.4

    calls.clear()
    # The second job is prepared after the first (one prepare thread), well inside max_wait.
    with Batcher(engine, BatcherConfig(max_batch_size=4, max_wait_ms=2000)) as b:
        _wait_all([b.submit(_req(clips.one, 1)), b.submit(_req(clips.one_b, 2))])
    assert [c.seeds for c in calls] == [[1, 2]]

    calls.clear()
    # Without waiting, the first job goes alone while the second is still being prepared.
    with Batcher(engine, BatcherConfig(max_batch_size=4, max_wait_ms=0)) as b:
        _wait_all([b.submit(_req(clips.one, 1)), b.submit(_req(clips.one_b, 2))])
    assert [c.seeds for c in calls] == [[1], [2]]


def test_batched_results_equal_solo_results(engine, clips, calls, tmp_path):
    # Different prompts (so different token counts, padded in the batch), seeds and guidance.
    reqs = [
        _req(clips.one, 11, tmp_path / "a.wav", prompt="rain", guidance=4.5),
        _req(clips.one_b, 12, tmp_path / "b.wav", prompt="a dog barks twice on a wooden floor", guidance=3.0),
        _req(clips.one, 13, tmp_path / "c.flac", prompt="", guidance=6.0),
    ]
    with Batcher(engine, BatcherConfig(max_batch_size=3, max_wait_ms=60_000)) as b:
        jobs = [b.submit(r) for r in reqs]
        _wait_all(jobs)
    assert [c.seeds for c in calls] == [[11, 12, 13]]
    for job, req in zip(jobs, reqs):
        assert job.status == "succeeded" and job.result.files == [req.output] and req.output.is_file()
        solo = engine.generate(GenerationRequest(**{**req.__dict__, "output": None}))
        # Only float rounding differs between batch sizes (the tanh output is within [-1, 1]).
        torch.testing.assert_close(job.result.waveform, solo.waveform, rtol=0, atol=3e-4)
    # The tolerance is meaningful: another row's audio is nowhere near.
    assert (jobs[0].result.waveform - jobs[2].result.waveform).abs().max() > 0.05


# ---------------------------------------------------------------------------------------------
# failures


def test_bad_inputs_fail_alone_with_error_codes(engine, clips, calls):
    with Batcher(engine, BatcherConfig(max_batch_size=2, max_wait_ms=60_000)) as b:
        good1 = b.submit(_req(clips.one, 1))
        corrupt = b.submit(_req(clips.corrupt, 2))
        garbage = b.submit(_req(b"this is not a video at all", 3))
        short = b.submit(_req(clips.short, 4))
        long_prompt = b.submit(_req(clips.one, 5, prompt="dog " * 200))
        good2 = b.submit(_req(clips.one_b, 6))
        _wait_all([good1, corrupt, garbage, short, long_prompt, good2])
    assert (good1.status, good2.status) == ("succeeded", "succeeded")
    assert [c.seeds for c in calls] == [[1, 6]]
    expected = {corrupt: "invalid_video", garbage: "invalid_video", short: "video_too_short", long_prompt: "invalid_request"}
    for job, code in expected.items():
        assert job.status == "failed" and job.error_code == code and job.result is None
        assert str(job.error) and job.error.__traceback__ is None
    assert "too short" in str(short.error)
    assert "128" in str(long_prompt.error)


def test_a_failing_denoising_loop_fails_its_batch_and_the_worker_goes_on(engine, clips, monkeypatch, caplog):
    original = engine.sample_jobs
    seen = []

    def flaky(jobs, **kw):
        seen.append(len(jobs))
        if len(seen) == 1:
            raise RuntimeError("kernel exploded")
        return original(jobs, **kw)

    monkeypatch.setattr(engine, "sample_jobs", flaky)
    with caplog.at_level(logging.ERROR, logger="foleyserve.batcher"):
        with Batcher(engine, BatcherConfig(max_batch_size=2, max_wait_ms=60_000)) as b:
            first = [b.submit(_req(clips.one, 1)), b.submit(_req(clips.one_b, 2))]
            _wait_all(first)
            after = [b.submit(_req(clips.one, 3)), b.submit(_req(clips.one_b, 4))]
            _wait_all(after)
    assert [j.status for j in first] == ["failed", "failed"]
    assert all(j.error_code == "internal" and "kernel exploded" in str(j.error) for j in first)
    assert [j.status for j in after] == ["succeeded", "succeeded"] and seen == [2, 2]
    # Logged once for the batch, with the traceback; the jobs carry only the message.
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and "kernel exploded" in str(logged[0].exc_info[1])


def test_a_failure_in_one_jobs_finish_fails_only_that_job(engine, clips, calls, monkeypatch):
    original = engine.finish

    def finish(job, latents):
        if job.request.seed == 2:
            raise OSError(28, "No space left on device")
        return original(job, latents)

    monkeypatch.setattr(engine, "finish", finish)
    with Batcher(engine, BatcherConfig(max_batch_size=2, max_wait_ms=60_000)) as b:
        jobs = [b.submit(_req(clips.one, 1)), b.submit(_req(clips.one_b, 2))]
        _wait_all(jobs)
    assert [c.seeds for c in calls] == [[1, 2]]
    assert jobs[0].status == "succeeded"
    assert jobs[1].status == "failed" and jobs[1].error_code == "internal" and "No space left" in str(jobs[1].error)


def test_invalid_submissions_are_refused_up_front(engine, clips):
    b = Batcher(engine, BatcherConfig())
    with pytest.raises(RequestError, match="steps"):
        b.submit(_req(clips.one, 1, steps=0))
    with pytest.raises(RequestError, match="priority"):
        b.submit(_req(clips.one, 1), priority="urgent")
    b.submit(_req(clips.one, 1), job_id="x")
    with pytest.raises(RequestError, match="already in use"):
        b.submit(_req(clips.one, 2), job_id="x")
    for bad in ({"max_batch_size": 0}, {"max_wait_ms": -1}, {"max_queue": 0}, {"length_bucket": "minute"}):
        with pytest.raises(ConfigError):
            Batcher(engine, BatcherConfig(**bad))


# ---------------------------------------------------------------------------------------------
# queue limit, priorities, cancellation, shutdown


def test_a_full_queue_raises_queue_full_with_retry_after(engine, clips):
    b = Batcher(engine, BatcherConfig(max_queue=2))  # not started: nothing drains
    first = b.submit(_req(clips.one, 1))
    b.submit(_req(clips.one, 2))
    with pytest.raises(QueueFull) as err:
        b.submit(_req(clips.one, 3))
    assert err.value.retry_after >= 1.0 and "full" in str(err.value)
    assert b.queue_depth() == 2
    assert b.cancel(first.id)
    b.submit(_req(clips.one, 3))  # the cancelled job freed its place
    assert b.queue_depth() == 2


def test_retry_after_follows_the_drain_rate_and_spreads_refused_clients(engine, clips, monkeypatch):
    import foleyserve.runtime.batcher as batcher_module

    clock = [1000.0]
    monkeypatch.setattr(batcher_module.time, "monotonic", lambda: clock[0])
    b = Batcher(engine, BatcherConfig(max_queue=1))  # not started: we move jobs out by hand
    # Nothing has left the queue yet: a default, a second more for each refusal still pending.
    assert [b.retry_after() for _ in range(3)] == [2.0, 3.0, 4.0]
    clock[0] += 100.0  # those promises expire
    # Ten jobs left the queue over the last 20 s: 0.5 jobs/s, so a slot every 2 s.
    for i in range(10):
        b._leaves.append(clock[0] - 20.0 + 2.0 * i)
    waits = [b.retry_after() for _ in range(4)]
    assert waits == [2.0, 4.0, 6.0, 8.0]  # the k-th refused client is told k slots' time
    clock[0] += 5.0  # the first two promises are due: the next refusal queues behind the other two
    assert b.retry_after() == 3 / (10 / 25.0)
    clock[0] += 3600.0  # an idle hour: old leaves no longer say how fast the queue drains
    assert b.retry_after() == 2.0


def test_jobs_report_preparing_while_their_encoders_run(engine, clips, calls):
    seen: list[str] = []
    b = Batcher(engine, BatcherConfig(max_batch_size=1, max_wait_ms=0), on_update=lambda j: seen.append(j.status))
    with b:
        job = b.submit(_req(clips.one, 1))
        assert job.wait(60)
    assert seen[0] == "preparing" and seen.index("preparing") < seen.index("running") and seen[-1] == "succeeded"


def test_interactive_jobs_go_before_bulk_jobs_fifo_within_each(engine, clips, calls):
    b = Batcher(engine, BatcherConfig(max_batch_size=1, max_wait_ms=0))
    jobs = [
        b.submit(_req(clips.one, 1), priority="bulk"),
        b.submit(_req(clips.one, 2), priority="bulk"),
        b.submit(_req(clips.one, 3)),
        b.submit(_req(clips.one, 4), priority="interactive"),
    ]
    with b:
        _wait_all(jobs)
    assert [c.seeds for c in calls] == [[3], [4], [1], [2]]


def test_bulk_jobs_that_waited_too_long_are_promoted(engine, clips, calls, monkeypatch):
    monkeypatch.setattr(batcher_module, "BULK_PROMOTION_SECONDS", 0.0)
    b = Batcher(engine, BatcherConfig(max_batch_size=1, max_wait_ms=0))
    jobs = [b.submit(_req(clips.one, 1), priority="bulk"), b.submit(_req(clips.one, 2))]
    with b:
        _wait_all(jobs)
    assert [c.seeds for c in calls] == [[1], [2]]


def test_cancelling_a_queued_job_ends_it_at_once(engine, clips, calls):
    updates: list[tuple[str, str]] = []
    b = Batcher(engine, BatcherConfig(max_batch_size=2, max_wait_ms=0), on_update=lambda j: updates.append((j.id, j.status)))
    keep, drop = b.submit(_req(clips.one, 1)), b.submit(_req(clips.one, 2))
    assert b.cancel(drop.id)
    assert drop.status == "cancelled" and drop.wait(0) and (drop.id, "cancelled") in updates
    assert not b.cancel(drop.id) and not b.cancel("no-such-job")
    with b:
        _wait_all([keep])
    assert keep.status == "succeeded" and [c.seeds for c in calls] == [[1]]
    assert not b.cancel(keep.id)
    assert b.get(drop.id) is drop and b.get("no-such-job") is None


def test_cancelling_a_running_job_drops_its_row_and_the_others_are_unchanged(engine, clips, calls, tmp_path):
    steps = 4
    reqs = [_req(clips.one, 21 + i, tmp_path / f"{i}.wav", steps=steps, prompt=p) for i, p in enumerate(["rain", "wind howling", ""])]
    holder: dict[str, Batcher] = {}
    jobs: list = []
    asked = threading.Event()

    def on_update(job) -> None:
        # Cancel the middle job from the denoise thread once the batch has made its first step.
        if jobs and job is jobs[0] and job.progress[0] == 1 and not asked.is_set():
            asked.set()
            assert holder["b"].cancel(jobs[1].id)

    with Batcher(engine, BatcherConfig(max_batch_size=3, max_wait_ms=60_000), on_update=on_update) as b:
        holder["b"] = b
        jobs.extend(b.submit(r) for r in reqs)
        _wait_all(jobs)
    assert asked.is_set() and [c.seeds for c in calls] == [[21, 22, 23]]
    assert jobs[1].status == "cancelled" and jobs[1].result is None and jobs[1].progress[0] < steps
    assert not reqs[1].output.exists()
    for i in (0, 2):
        assert jobs[i].status == "succeeded"
        solo = engine.generate(GenerationRequest(**{**reqs[i].__dict__, "output": None}))
        torch.testing.assert_close(jobs[i].result.waveform, solo.waveform, rtol=0, atol=3e-4)


def test_stop_cancels_waiting_jobs_and_refuses_new_ones(engine, clips):
    b = Batcher(engine, BatcherConfig())
    jobs = [b.submit(_req(clips.one, 1)), b.submit(_req(clips.one, 2))]
    b.stop(timeout=1)
    assert all(j.status == "cancelled" and j.error_code == "shutdown" and j.wait(0) for j in jobs)
    with pytest.raises(QueueFull, match="shutting down"):
        b.submit(_req(clips.one, 3))


# ---------------------------------------------------------------------------------------------
# length buckets


def test_whole_second_frame_counts_follow_the_official_rule():
    # The bundled sample is exactly 4 s at 25 fps and decodes to 99 + 32 frames.
    assert buckets_module._official_frame_count(4, 25) == 99
    assert buckets_module._official_frame_count(4, 8) == 32
    assert buckets_module._official_frame_count(1, 25) == 24


def test_trim_to_whole_seconds(clips):
    for path in (clips.s13, clips.s17, clips.ends_on_second):
        decoded = decode_frames(path)
        trimmed, trim = trim_to_whole_seconds(decoded)
        assert (len(trimmed.frames[25]), len(trimmed.frames[8])) == (24, 8)
        assert np.array_equal(trimmed.frames[25], decoded.frames[25][:24])
        assert trim is not None and trim.video_seconds == decoded.duration
    exact = decode_frames(clips.one)  # already the bucket's length: untouched
    assert trim_to_whole_seconds(exact) == (exact, None)
    short = decode_frames(clips.short)  # under a second: keeps its own length
    assert trim_to_whole_seconds(short) == (short, None)


def test_second_bucket_batches_similar_lengths_and_reports_the_trim(engine, clips, calls):
    cfg = BatcherConfig(max_batch_size=3, max_wait_ms=60_000, length_bucket="second")
    with Batcher(engine, cfg) as b:
        jobs = [b.submit(_req(clips.s13, 1)), b.submit(_req(clips.s17, 2)), b.submit(_req(clips.one, 3))]
        _wait_all(jobs)
    assert [c.seeds for c in calls] == [[1, 2, 3]] and calls[0].length == 48
    assert all(j.status == "succeeded" and j.result.audio_seconds == pytest.approx(0.96) for j in jobs)
    assert [round(j.result.video_seconds, 2) for j in jobs] == [1.32, 1.72, 1.0]
    for job in jobs[:2]:
        assert any("whole seconds" in w for w in job.result.warnings)
        assert not any("15.04" in w for w in job.result.warnings)
    assert not any("whole seconds" in w for w in jobs[2].result.warnings)


# ---------------------------------------------------------------------------------------------
# caches


@pytest.fixture
def memory_cache(engine):
    cache_module = pytest.importorskip("foleyserve.runtime.cache", reason="foleyserve.runtime.cache has not landed yet")
    cache = cache_module.FoleyCache("memory", namespace=f"{engine.components.name}/{engine.precision}")
    yield cache
    cache.close()


def test_a_result_cache_hit_never_runs_the_model(engine, clips, calls, memory_cache, tmp_path):
    with Batcher(engine, BatcherConfig(max_wait_ms=0), cache=memory_cache) as b:
        first = b.submit(_req(clips.one, 7, tmp_path / "first.wav", prompt="rain on a tin roof"))
        _wait_all([first])
        # Same clip, seed and (normalised) prompt, another output format.
        again = b.submit(_req(clips.one, 7, tmp_path / "again.mp4", prompt="  rain on  a tin roof "))
        _wait_all([again])
    assert first.status == again.status == "succeeded"
    assert len(calls) == 1 and not first.cache_hit and again.cache_hit
    assert again.result.files == [tmp_path / "again.mp4"] and (tmp_path / "again.mp4").is_file()
    assert torch.equal(again.result.waveform, first.result.waveform)
    assert memory_cache.stats()["result"]["hits"] == 1


def test_cached_features_skip_the_encoders(engine, clips, calls, memory_cache, monkeypatch):
    encoded: list[int] = []
    texts: list[str] = []
    enc, txt = engine.encode_visual, engine.extract_text
    monkeypatch.setattr(engine, "encode_visual", lambda d, *a, **k: encoded.append(1) or enc(d, *a, **k))
    monkeypatch.setattr(engine, "extract_text", lambda p, n, *a, **k: texts.append(p) or txt(p, n, *a, **k))
    with Batcher(engine, BatcherConfig(max_wait_ms=0), cache=memory_cache) as b:
        _wait_all([b.submit(_req(clips.one, 1, prompt="rain"))])
        second = b.submit(_req(clips.one, 2, prompt="rain"))  # other seed: the model runs, the encoders do not
        _wait_all([second])
    assert second.status == "succeeded" and not second.cache_hit
    assert len(calls) == 2 and len(encoded) == 1 and texts == ["rain"]


def test_a_disabled_cache_behaves_like_none(engine, clips, calls):
    cache_module = pytest.importorskip("foleyserve.runtime.cache", reason="foleyserve.runtime.cache has not landed yet")
    with Batcher(engine, BatcherConfig(max_wait_ms=0), cache=cache_module.FoleyCache("off")) as b:
        jobs = [b.submit(_req(clips.one, 1)), b.submit(_req(clips.one, 1))]
        _wait_all(jobs)
    assert [j.status for j in jobs] == ["succeeded"] * 2 and not any(j.cache_hit for j in jobs)
    assert sum(len(c.seeds) for c in calls) == 2


def test_only_the_latest_finished_jobs_are_kept(engine, clips, monkeypatch):
    monkeypatch.setattr(batcher_module, "KEEP_FINISHED", 1)
    b = Batcher(engine, BatcherConfig())
    old, new = b.submit(_req(clips.one, 1)), b.submit(_req(clips.one, 2))
    b.cancel(old.id)
    b.cancel(new.id)
    assert b.get(old.id) is None and b.get(new.id) is new


def test_a_repeated_upload_hits_without_decoding_or_queueing(engine, clips, calls, memory_cache, monkeypatch, tmp_path):
    with Batcher(engine, BatcherConfig(max_wait_ms=0), cache=memory_cache) as b:
        first = b.submit(_req(clips.one.read_bytes(), seed=11, out=tmp_path / "a.wav"))
        _wait_all([first])
        decodes = []
        original = engine.decode
        monkeypatch.setattr(engine, "decode", lambda *a, **kw: (decodes.append(1), original(*a, **kw))[1])
        # the same bytes, a differently spaced prompt: the normalised key matches
        again = b.submit(_req(clips.one.read_bytes(), seed=11, out=tmp_path / "b.wav", prompt="footsteps  on gravel "))
        assert again.status == "succeeded" and again.cache_hit  # answered inside submit()
        other_seed = b.submit(_req(clips.one.read_bytes(), seed=12, out=tmp_path / "c.wav"))
        _wait_all([other_seed])
    assert decodes == [1]  # only the miss decoded
    assert len(calls) == 2 and not other_seed.cache_hit
    assert (tmp_path / "b.wav").read_bytes() == (tmp_path / "a.wav").read_bytes()
