"""The multi-level cache: keys, exact round trips, byte bounds with LRU eviction on every tier,
Redis shared by replicas, and backend failures that must never reach the caller."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import diskcache
import numpy as np
import pytest
import torch

from foleyserve import media
from foleyserve.pipeline.demo import sample_clip_path
from foleyserve.pipeline.features import TextFeatures, VisualFeatures
from foleyserve.runtime.cache import (
    CachedResult,
    FoleyCache,
    decode_entry,
    encode_entry,
    frames_key,
    normalise_prompt,
    result_key,
    text_key,
)
from redis_server import RedisServer, free_port, redis_server_binary, start_redis

REPO = Path(__file__).resolve().parents[1]
LOGGER = "foleyserve.runtime.cache"


# ---------------------------------------------------------------------------------------------
# helpers and fixtures


def decoded_video(seed: int = 0, t8: int = 4, t25: int = 12, h: int = 6, w: int = 8) -> media.DecodedVideo:
    rng = np.random.default_rng(seed)
    info = media.VideoInfo(
        duration=t25 / 25, frame_rate=None, fps=25.0, num_frames=t25, width=w, height=h, has_video=True,
        has_audio=False, audio_sample_rate=None, audio_channels=None, container="mp4", video_codec="h264", audio_codec=None,
    )
    return media.DecodedVideo(
        frames={
            8: rng.integers(0, 256, (t8, h, w, 3), dtype=np.uint8),
            25: rng.integers(0, 256, (t25, h, w, 3), dtype=np.uint8),
        },
        duration=t25 / 25,
        last_frame_time=(t25 - 1) / 25,
        info=info,
    )


def visual(seed: int = 0, t8: int = 8, dim: int = 16) -> VisualFeatures:
    g = torch.Generator().manual_seed(seed)
    return VisualFeatures(siglip=torch.randn(1, t8, dim, generator=g), sync=torch.randn(1, 3 * t8, dim, generator=g), frames_25fps=3 * t8)


def text(seed: int = 0, length: int = 7, dim: int = 16) -> TextFeatures:
    g = torch.Generator().manual_seed(seed)
    both = torch.randn(2, length, dim, generator=g)
    # Views of one batch, as a batched CLAP call produces them.
    return TextFeatures(text=both[:1], uncond=both[1:])


def result(seed: int = 0, samples: int = 4800) -> CachedResult:
    g = torch.Generator().manual_seed(seed)
    return CachedResult(
        waveform=torch.rand(1, samples, generator=g) * 2 - 1,
        sample_rate=48000,
        meta={"seed": seed, "timings": {"dit": 0.25}, "model": "demo", "warnings": []},
    )


def entry_size(level: str, value) -> int:
    return len(encode_entry(level, value))


def assert_visual_equal(a: VisualFeatures, b: VisualFeatures) -> None:
    assert torch.equal(a.siglip, b.siglip) and a.siglip.dtype == b.siglip.dtype
    assert torch.equal(a.sync, b.sync) and a.sync.dtype == b.sync.dtype
    assert a.frames_25fps == b.frames_25fps


def assert_roundtrips(cache: FoleyCache, reader: FoleyCache | None = None) -> None:
    reader = reader or cache
    v, t, r = visual(1), text(2), result(3)
    cache.put_visual("v1", v)
    cache.put_text("t1", t)
    cache.put_result("r1", r)
    assert_visual_equal(reader.get_visual("v1"), v)
    got_t = reader.get_text("t1")
    assert torch.equal(got_t.text, t.text) and torch.equal(got_t.uncond, t.uncond)
    got_r = reader.get_result("r1")
    assert torch.equal(got_r.waveform, r.waveform) and got_r.waveform.dtype == torch.float32
    assert got_r.sample_rate == r.sample_rate and got_r.meta == r.meta


@pytest.fixture
def redis_url(tmp_path: Path):
    server = redis_or_skip(tmp_path)
    yield server.url
    server.stop()


@pytest.fixture
def redis_handle(tmp_path: Path):
    server = redis_or_skip(tmp_path)
    yield server
    server.stop()


def redis_or_skip(tmp_path: Path) -> RedisServer:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (run scripts/install-system.sh); the Redis backend is untested")
    directory = tmp_path / "redis"
    directory.mkdir()
    return start_redis(directory)


def warnings_from_cache(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------------
# keys


def test_frames_key_same_frames_same_key():
    a, b = decoded_video(0), decoded_video(0)
    assert a.frames[25] is not b.frames[25]
    assert frames_key(a) == frames_key(b)
    assert len(frames_key(a)) == 64 and frames_key(a) != frames_key(decoded_video(1))


def test_frames_key_sees_one_changed_25fps_frame():
    # Same 8 fps key frames, different motion at 25 fps: the Synchformer features differ, so must the key.
    a, b = decoded_video(0), decoded_video(0)
    b.frames[25][7, 3, 2, 1] ^= 1
    assert np.array_equal(a.frames[8], b.frames[8])
    assert frames_key(a) != frames_key(b)


def test_frames_key_sees_8fps_frames_and_shapes():
    a, b = decoded_video(0), decoded_video(0)
    b.frames[8][0, 0, 0, 0] ^= 1
    assert frames_key(a) != frames_key(b)
    # The same bytes cut into frames of another shape are other frames.
    c = decoded_video(0)
    c.frames[25] = c.frames[25].reshape(12, 8, 6, 3)
    assert frames_key(a) != frames_key(c)


def test_frames_key_of_non_contiguous_frames_equals_contiguous():
    a = decoded_video(0)
    b = decoded_video(0)
    wide = np.zeros((12, 6, 16, 3), np.uint8)
    wide[:, :, ::2] = b.frames[25]
    b.frames[25] = wide[:, :, ::2]
    assert not b.frames[25].flags.c_contiguous
    assert frames_key(a) == frames_key(b)


def test_frames_key_of_a_real_decode_is_stable():
    first = media.decode_frames(sample_clip_path())
    second = media.decode_frames(sample_clip_path())
    assert frames_key(first) == frames_key(second)


def test_frames_key_without_both_rates_says_what_to_do():
    d = decoded_video(0)
    del d.frames[25]
    with pytest.raises(ValueError, match="no 25 fps frames; decode it with engine.decode"):
        frames_key(d)


def test_normalise_prompt():
    assert normalise_prompt("  a   Dog\tbarks \n loudly ") == "a Dog barks loudly"
    assert normalise_prompt("") == "" and normalise_prompt(" \t\n") == ""
    assert text_key(" a  dog ", "noisy,  harsh") == text_key("a dog", "noisy, harsh")
    assert text_key("a dog", "x") != text_key("A dog", "x")  # case is kept: CLAP is case-sensitive
    assert text_key("a", "b") != text_key("b", "a")


BASE = dict(frames="f" * 64, prompt="a dog barks", negative_prompt="noisy, harsh", seed=0, steps=50, guidance=4.5, model="demo", precision="fp32")


@pytest.mark.parametrize(
    "name,other",
    [("frames", "e" * 64), ("prompt", "a cat meows"), ("negative_prompt", "quiet"), ("seed", 1), ("steps", 25),
     ("guidance", 4.0), ("model", "hunyuanvideo-foley-xxl"), ("precision", "bf16")],
)
def test_result_key_changes_with_each_parameter(name, other):
    assert result_key(**{**BASE, name: other}) != result_key(**BASE)


def test_result_key_normalises_what_means_the_same():
    same = {**BASE, "prompt": " a dog  barks", "guidance": np.float64(4.5)}
    assert result_key(**same) == result_key(**BASE)
    assert result_key(**{**BASE, "guidance": 4}) == result_key(**{**BASE, "guidance": 4.0})


# ---------------------------------------------------------------------------------------------
# serialisation


def test_entries_are_safetensors_not_pickle():
    blob = encode_entry("visual", visual(0))
    assert blob.startswith(b"FSCACHE1")
    with pytest.raises(ValueError, match="not a text entry"):
        decode_entry("text", blob)  # a visual entry read as text is refused, not misread
    with pytest.raises(ValueError, match="bad magic"):
        decode_entry("visual", b"\x80\x04garbage")


def test_round_trip_keeps_half_precision_dtypes():
    v = VisualFeatures(siglip=torch.randn(1, 3, 4).bfloat16(), sync=torch.randn(1, 6, 4).half(), frames_25fps=6)
    assert_visual_equal(decode_entry("visual", encode_entry("visual", v)), v)


# ---------------------------------------------------------------------------------------------
# memory tier


def test_memory_round_trips_exactly():
    assert_roundtrips(FoleyCache("memory"))


def test_memory_returns_copies_the_caller_cannot_corrupt():
    cache = FoleyCache("memory")
    v = visual(0)
    cache.put_visual("k", v)
    v.siglip.zero_()  # the caller reuses its tensor after the put
    got = cache.get_visual("k")
    got.sync.zero_()
    again = cache.get_visual("k")
    assert not torch.equal(again.siglip, v.siglip)
    assert_visual_equal(again, visual(0))


def test_memory_bound_and_lru_order():
    size = entry_size("visual", visual(0))
    cache = FoleyCache("memory", memory_bytes=3 * size)
    for i in range(3):
        cache.put_visual(f"k{i}", visual(i))
    assert cache.get_visual("k0") is not None  # k0 is now the most recently used
    cache.put_visual("k3", visual(3))  # evicts the least recently used: k1
    assert cache.get_visual("k1") is None
    for key in ("k0", "k2", "k3"):
        assert cache.get_visual(key) is not None
    s = cache.stats()["visual"]
    assert (s["entries"], s["bytes"]) == (3, 3 * size)


def test_memory_bound_spans_levels_and_skips_oversized_values():
    v_size = entry_size("visual", visual(0))
    cache = FoleyCache("memory", memory_bytes=2 * v_size)
    cache.put_result("huge", result(0, samples=4 * v_size))  # bigger than the whole tier
    assert cache.get_result("huge") is None
    cache.put_visual("a", visual(0))
    cache.put_text("b", text(0))
    cache.put_visual("c", visual(1))  # pushes out the oldest entry, whatever its level
    assert cache.get_visual("a") is None and cache.get_text("b") is not None
    stats = cache.stats()
    assert sum(s["bytes"] for s in stats.values()) <= 2 * v_size


def test_memory_bytes_zero_keeps_nothing_in_memory():
    cache = FoleyCache("memory", memory_bytes=0)
    cache.put_text("t", text(0))
    assert cache.get_text("t") is None


def test_stats_count_hits_and_misses_per_level():
    cache = FoleyCache("memory")
    assert cache.get_visual("v") is None
    cache.put_visual("v", visual(0))
    cache.get_visual("v")
    cache.get_visual("v")
    cache.get_text("t")
    s = cache.stats()
    assert s["visual"] == {"hits": 2, "misses": 1, "bytes": entry_size("visual", visual(0)), "entries": 1}
    assert s["text"] == {"hits": 0, "misses": 1, "bytes": 0, "entries": 0}
    assert s["result"] == {"hits": 0, "misses": 0, "bytes": 0, "entries": 0}


def test_namespace_separates_features_but_not_results(tmp_path):
    a = FoleyCache("disk", directory=tmp_path / "c", namespace="model-a/fp32")
    b = FoleyCache("disk", directory=tmp_path / "c", namespace="model-b/fp32")
    a.put_visual("v", visual(0))
    a.put_text("t", text(0))
    a.put_result("r", result(0))
    assert b.get_visual("v") is None and b.get_text("t") is None
    assert b.get_result("r") is not None  # result keys already name the model and precision


@pytest.mark.parametrize("url", [None, "off"])
def test_disabled_cache_misses_and_drops(url):
    cache = FoleyCache(url)
    assert cache.enabled is False
    cache.put_visual("v", visual(0))
    assert cache.get_visual("v") is None
    assert cache.stats()["visual"]["entries"] == 0


def test_bad_url_names_the_accepted_forms():
    with pytest.raises(ValueError, match=r'"memory", "disk".*redis://host:port/db'):
        FoleyCache("memcached://localhost")
    with pytest.raises(ValueError, match="redis://host:port/db"):
        FoleyCache("redis://localhost:notaport/0")
    with pytest.raises(ValueError, match="numeric db"):
        FoleyCache("redis://localhost:6379/cache")
    with pytest.raises(ValueError, match="max_bytes must be"):
        FoleyCache("memory", max_bytes=-1)


def test_put_of_the_wrong_type_warns_and_stores_nothing(caplog):
    cache = FoleyCache("memory")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cache.put_visual("v", text(0))
        cache.put_result("r", CachedResult(waveform=torch.zeros(1, 4), sample_rate=48000, meta={"bad": object()}))
    assert cache.get_visual("v") is None and cache.get_result("r") is None
    assert len(warnings_from_cache(caplog)) == 2


def test_threads_share_one_cache(tmp_path):
    cache = FoleyCache("disk", directory=tmp_path / "c", memory_bytes=3 * entry_size("text", text(0)))
    errors: list[BaseException] = []
    gets_per_thread = 30

    def worker(n: int) -> None:
        try:
            for i in range(gets_per_thread):
                key = f"k{(n + i) % 6}"
                if cache.get_text(key) is None:
                    cache.put_text(key, text((n + i) % 6))
                else:
                    assert torch.equal(cache.get_text(key).text, text((n + i) % 6).text)
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = cache.stats()["text"]
    assert s["entries"] == 6
    assert s["hits"] + s["misses"] >= 4 * gets_per_thread


# ---------------------------------------------------------------------------------------------
# disk tier


def test_disk_round_trips_and_survives_a_restart(tmp_path):
    directory = tmp_path / "cache"
    with FoleyCache("disk", directory=directory) as first:
        assert_roundtrips(first)
    # A new process (memory tier empty) reads what the old one wrote.
    second = FoleyCache("disk", directory=directory, memory_bytes=0)
    assert_roundtrips(second, reader=second)
    assert second.get_result("r1") is not None and second.stats()["result"]["entries"] == 1


def test_disk_bound_and_lru_eviction(tmp_path):
    size = entry_size("result", result(0, samples=16000))  # ~64 kB: stored as a file
    # Room for ~39 entries (the SQLite index takes some); diskcache evicts in chunks of 10, so
    # 50 puts evict r1..r20 at most and never reach the refreshed r0.
    limit = 40 * size
    cache = FoleyCache("disk", directory=tmp_path / "c", max_bytes=limit, memory_bytes=0)
    for i in range(30):
        cache.put_result(f"r{i}", result(i, samples=16000))
    assert cache.get_result("r0") is not None  # refresh r0: recently used, so it must survive
    backend = cache._backend
    for i in range(30, 50):
        cache.put_result(f"r{i}", result(i, samples=16000))
        assert backend.volume() <= limit
    assert cache.get_result("r0") is not None
    assert cache.get_result("r1") is None  # the least recently used went first
    for i in range(45, 50):
        assert torch.equal(cache.get_result(f"r{i}").waveform, result(i, samples=16000).waveform)
    s = cache.stats()["result"]
    assert 0 < s["entries"] < 50 and s["bytes"] <= limit


def test_disk_bound_holds_for_one_large_value(tmp_path):
    size = entry_size("result", result(0, samples=16000))
    limit = 40 * size
    cache = FoleyCache("disk", directory=tmp_path / "c", max_bytes=limit, memory_bytes=0)
    for i in range(38):
        cache.put_result(f"r{i}", result(i, samples=16000))
    assert cache.stats()["result"]["entries"] == 38  # all fit: nothing evicted yet
    # Worth 25 small values: diskcache's own cull on set frees only 10, so more rounds are needed.
    cache.put_result("big", result(99, samples=25 * 16000))
    assert cache._backend.volume() <= limit and cache.get_result("big") is not None
    assert cache.get_result("r0") is None and cache.get_result("r37") is not None


def test_disk_corrupt_and_pickled_entries_are_misses(tmp_path, caplog):
    directory = tmp_path / "c"
    cache = FoleyCache("disk", directory=directory, memory_bytes=0)
    raw = diskcache.Cache(str(directory))
    raw.set(cache._key("visual", "garbage"), b"FSCACHE1\xff\xff\xff\xffnope")
    raw.set(cache._key("text", "pickled"), {"a pickled": "dict"})  # what another program might leave there
    raw.close()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.get_visual("garbage") is None
        assert cache.get_text("pickled") is None
    assert warnings_from_cache(caplog)
    # The corrupt entry was dropped, so the next put/get works normally.
    cache.put_visual("garbage", visual(0))
    assert_visual_equal(cache.get_visual("garbage"), visual(0))


def test_disk_failure_is_a_miss_not_an_error(tmp_path, caplog):
    cache = FoleyCache("disk", directory=tmp_path / "c", memory_bytes=0)
    cache.put_text("t", text(0))

    def broken(*_a, **_k):
        raise OSError(28, "No space left on device")

    cache._backend.cache.set = broken
    cache._backend.cache.get = broken
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cache.put_text("u", text(1))
        assert cache.get_text("t") is None
        assert cache.get_text("u") is None
    assert len(warnings_from_cache(caplog)) == 1  # once, not per call


def test_unwritable_disk_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot open the disk cache .*writable directory"):
        FoleyCache("disk", directory=blocker / "cache")


# ---------------------------------------------------------------------------------------------
# Redis tier (a real redis-server per test)


def test_redis_round_trips_exactly(redis_url):
    assert_roundtrips(FoleyCache(redis_url, memory_bytes=0))


def test_two_replicas_share_one_redis(redis_url):
    a = FoleyCache(redis_url, namespace="demo/fp32")
    b = FoleyCache(redis_url, namespace="demo/fp32")
    assert_roundtrips(a, reader=b)
    assert b.stats()["visual"]["hits"] == 1 and a.stats()["visual"]["hits"] == 0
    # Features of another engine identity stay apart even in the shared store.
    c = FoleyCache(redis_url, namespace="other-model/bf16")
    assert c.get_visual("v1") is None and c.get_result("r1") is not None
    for cache in (a, b, c):
        cache.close()


def test_redis_bound_and_lru_eviction(redis_url):
    size = entry_size("result", result(0))
    limit = 4 * size
    writer = FoleyCache(redis_url, max_bytes=limit, memory_bytes=0)
    reader = FoleyCache(redis_url, max_bytes=limit, memory_bytes=0)
    for i in range(4):
        writer.put_result(f"r{i}", result(i))
    assert reader.get_result("r0") is not None  # another replica's read refreshes r0 for everyone
    writer.put_result("r4", result(4))
    writer.put_result("r5", result(5))
    assert reader.get_result("r1") is None and reader.get_result("r2") is None
    for i in (0, 3, 4, 5):
        assert torch.equal(reader.get_result(f"r{i}").waveform, result(i).waveform)
    s = writer.stats()["result"]
    assert (s["entries"], s["bytes"]) == (4, 4 * size)
    assert writer._backend.volume() <= limit
    # The server holds exactly the surviving values (nothing leaked past the budget).
    data_keys = writer._backend.client.keys("foleyserve:cache:d:*")
    assert len(data_keys) == 4


def test_redis_books_follow_values_the_server_evicted(redis_handle):
    cache = FoleyCache(redis_handle.url, memory_bytes=0)
    cache.put_text("a", text(0))
    cache.put_text("b", text(1))
    client = redis_handle.client()
    client.delete(*client.keys("foleyserve:cache:d:text:*a"))  # as a server-side maxmemory eviction would
    assert cache.get_text("a") is None
    assert cache.stats()["text"]["entries"] == 1
    assert cache.stats()["text"]["bytes"] == entry_size("text", text(1))


def test_redis_corrupt_entry_is_a_dropped_miss(redis_handle, caplog):
    cache = FoleyCache(redis_handle.url, memory_bytes=0)
    cache.put_visual("v", visual(0))
    client = redis_handle.client()
    (key,) = client.keys("foleyserve:cache:d:visual:*")
    client.set(key, b"\x80\x04\x95 a pickle would go here")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.get_visual("v") is None
    assert any("corrupt" in m for m in warnings_from_cache(caplog))
    assert client.exists(key) == 0 and cache.stats()["visual"]["entries"] == 0


def test_redis_killed_mid_test_gives_misses_not_errors(redis_handle, caplog):
    cache = FoleyCache(redis_handle.url, memory_bytes=entry_size("text", text(0)))
    other = FoleyCache(redis_handle.url)
    cache.retry_after = 0.0  # retry the dead server on every call: still one warning per outage
    cache.put_text("kept-in-memory", text(0))
    other.put_visual("only-in-redis", visual(0))
    redis_handle.stop()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert cache.get_visual("only-in-redis") is None
        cache.put_result("r", result(0))
        assert cache.get_result("r") is None
        assert torch.equal(cache.get_text("kept-in-memory").text, text(0).text)  # the memory tier still serves
        stats = cache.stats()
    assert stats["visual"]["misses"] == 1 and stats["text"]["hits"] == 1
    assert len(warnings_from_cache(caplog)) == 1, warnings_from_cache(caplog)
    caplog.clear()
    # Redis comes back (empty: no persistence) and the cache uses it again.
    redis_handle.start()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cache.put_result("r", result(0))
    assert any("reachable again" in m for m in warnings_from_cache(caplog))
    assert FoleyCache(redis_handle.url, memory_bytes=0).get_result("r") is not None


def test_redis_down_at_start_is_not_fatal(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        # Nothing listens on a free port once the probe socket is closed.
        cache = FoleyCache(f"redis://127.0.0.1:{free_port()}/0")
    assert any("unavailable" in m for m in warnings_from_cache(caplog))
    cache.put_visual("v", visual(0))
    assert cache.get_visual("v") is not None  # the memory tier works on its own
    assert cache.get_text("t") is None


# ---------------------------------------------------------------------------------------------
# scripts/install-system.sh


SCRIPT = REPO / "scripts" / "install-system.sh"


def run_script(tmp_path: Path, present: bool, apt: str | None) -> tuple[subprocess.CompletedProcess, list[str]]:
    # PATH holds only what the script and the fake apt-get may use, so no real apt-get is found.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("env", "touch"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    log = tmp_path / "apt.log"
    if apt is not None:
        (bin_dir / "apt-get").write_text(f"#!/bin/bash\necho \"$*\" >> {log}\n{apt}\n")
        (bin_dir / "apt-get").chmod(0o755)
    fake = tmp_path / "fake-binary"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    target = str(fake) if present else str(tmp_path / "absent")
    env = {"PATH": str(bin_dir), "FOLEYSERVE_CHROMIUM_BIN": target, "FOLEYSERVE_REDIS_SERVER_BIN": str(fake),
           "FOLEYSERVE_POSTGRES_GLOB": str(fake)}
    proc = subprocess.run([shutil.which("bash"), str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


def test_install_system_does_nothing_when_both_exist(tmp_path):
    proc, calls = run_script(tmp_path, present=True, apt="exit 0")
    assert proc.returncode == 0 and calls == [] and proc.stderr == ""


def test_install_system_without_apt_get_warns_and_succeeds(tmp_path):
    proc, calls = run_script(tmp_path, present=False, apt=None)
    assert proc.returncode == 0 and "apt-get is not available" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the install path runs apt-get as root; as a user the script only warns")
def test_install_system_updates_only_after_a_failed_install(tmp_path):
    # The fake apt-get fails the first install, as with stale package lists, then succeeds.
    apt = f'if [ "$1" = install ] && [ ! -e {tmp_path}/updated ]; then exit 100; fi\n[ "$1" = update ] && touch {tmp_path}/updated\nexit 0'
    proc, calls = run_script(tmp_path, present=False, apt=apt)
    assert proc.returncode == 0, proc.stderr
    assert [c.split()[0] for c in calls] == ["install", "update", "install"]
    assert calls[0].endswith("chromium") and "redis-server" not in calls[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="the install path runs apt-get as root; as a user the script only warns")
def test_install_system_reports_a_failed_install(tmp_path):
    proc, calls = run_script(tmp_path, present=False, apt="exit 100")
    assert proc.returncode == 1 and "could not install chromium" in proc.stderr


# ---------------------------------------------------------------------------------------------
# with the engine


@pytest.mark.slow  # two demo-engine generations: a few seconds, more on a busy machine
def test_cached_features_and_results_reproduce_the_engine_exactly(tmp_path):
    from foleyserve import Engine, GenerationRequest

    engine = Engine.demo()
    namespace = f"{engine.components.name}/{engine.precision}"
    req = GenerationRequest(video=sample_clip_path(), prompt="a door  slams", steps=3, seed=7)
    fresh = engine.generate(req)

    writer = FoleyCache("disk", directory=tmp_path / "c", namespace=namespace)
    decoded = engine.decode(req.video)
    fkey, tkey = frames_key(decoded), text_key(req.prompt, req.negative_prompt)
    writer.put_visual(fkey, engine.encode_visual(decoded))
    writer.put_text(tkey, engine.extract_text(req.prompt, req.negative_prompt))
    rkey = result_key(fkey, req.prompt, req.negative_prompt, req.seed, req.steps, req.guidance, engine.components.name, engine.precision)
    writer.put_result(rkey, CachedResult(waveform=fresh.waveform, sample_rate=fresh.sample_rate, meta={"seed": fresh.seed}))
    writer.close()

    # Another process: same clip decoded again, features and result read back from disk.
    reader = FoleyCache("disk", directory=tmp_path / "c", namespace=namespace, memory_bytes=0)
    decoded = engine.decode(req.video)
    assert frames_key(decoded) == fkey
    job = engine.prepare(req, decoded=decoded, visual=reader.get_visual(fkey), text=reader.get_text(tkey))
    again = engine.finish(job, engine.sample_jobs([job])[0])
    assert torch.equal(again.waveform, fresh.waveform)
    hit = reader.get_result(rkey)
    out = engine.write_result(GenerationRequest(video=req.video, output=tmp_path / "hit.wav"), hit.waveform, decoded)
    assert torch.equal(out.waveform, fresh.waveform) and (tmp_path / "hit.wav").stat().st_size > 0
    s = reader.stats()
    assert s["visual"]["hits"] == s["text"]["hits"] == s["result"]["hits"] == 1
