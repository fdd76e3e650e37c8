"""Text to audio and several samples over HTTP, against the real batcher and the demo engine."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient

from foleyserve import Engine
from foleyserve.server.app import create_app
from foleyserve.server.settings import ServerConfig
from test_server import clip, engine, error_of  # noqa: F401  (fixtures shared with test_server)


@pytest.fixture()
def client(engine: Engine, tmp_path: Path):
    with TestClient(create_app(ServerConfig(data_dir=tmp_path / "data", cache="memory"), engine=engine),
                    raise_server_exceptions=False) as c:
        yield c


def post(c: TestClient, video: bytes | None = None, **fields) -> object:
    data = {"steps": "2", **{k: str(v) for k, v in fields.items()}}
    files = {"video": ("clip.mp4", video, "video/mp4")} if video is not None else {"prompt": (None, data.pop("prompt", ""))}
    return c.post("/v1/generations?wait=60", files=files, data=data)


def samples_of(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as a:
        stream = a.streams.audio[0]
        assert stream.rate == 48000
        return np.concatenate([f.to_ndarray().ravel() for f in a.decode(stream)])


def test_text_only_job_makes_audio_of_the_duration(client: TestClient) -> None:
    r = post(client, prompt="thunder", duration="2.0", seed="3")
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "succeeded" and job["text_only"] is True and job["output"] == "wav"
    assert job["video_url"] is None and job["video_duration"] == 0.0
    assert abs(job["duration"] - 2.0) < 1e-6
    audio = client.get(job["audio_url"])
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    assert len(samples_of(audio.content)) == 2 * 48000
    assert job["results"] == [{"seed": 3, "audio_url": job["audio_url"], "video_url": None}]
    # flac is the other choice
    r = post(client, prompt="thunder", duration="1", output="flac")
    assert r.status_code == 200 and r.json()["output"] == "flac", r.text
    assert len(samples_of(client.get(r.json()["audio_url"]).content)) == 48000


@pytest.mark.parametrize("fields, words", [
    ({"duration": "2", "output": "mp4"}, "output=mp4 needs a video"),
    ({"duration": "2", "keep_original_audio": "0.5"}, "keep_original_audio"),
    ({"duration": "0.5"}, "0.64 to 15"),
    ({"duration": "15.5"}, "0.64 to 15"),
    ({"duration": "2", "start": "1"}, "start"),
    ({"prompt": "no duration"}, "video is required"),
])
def test_text_only_refusals_are_422_naming_the_rule(client: TestClient, fields, words) -> None:
    r = post(client, **fields)
    assert r.status_code == 422, r.text
    assert words in error_of(r)["message"]
    assert client.get("/v1/generations").json()["items"] == []  # nothing was queued


def test_three_samples_are_three_distinct_verified_downloads(client: TestClient, clip: bytes) -> None:
    r = post(client, clip, prompt="rain", seed="10", num_samples="3", output="mp4")
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "succeeded" and job["num_samples"] == 3 and job["batch_size"] == 1
    assert [s["seed"] for s in job["results"]] == [10, 11, 12]
    first = job["results"][0]
    assert job["audio_url"].endswith("/audio") and first["audio_url"].endswith("/audio?seed=10")
    digests = set()
    for s in job["results"]:
        audio = client.get(s["audio_url"])
        assert audio.status_code == 200 and f"seed{s['seed']}" in audio.headers["content-disposition"]
        assert client.get(s["video_url"]).status_code == 200
        digests.add(hashlib.sha256(samples_of(audio.content).tobytes()).hexdigest())
    assert len(digests) == 3
    # the plain link is the first sample
    assert client.get(job["audio_url"]).content == client.get(first["audio_url"]).content
    assert client.get(f"/v1/generations/{job['id']}/audio?seed=99").status_code == 404

    # each file is checked against the checksum recorded when it was written
    data = Path(client.app.state.service.store.results_dir)
    names = sorted(p.name for p in data.glob(f"{job['id']}*"))
    assert names == sorted(f"{job['id']}_seed{s}.{ext}" for s in (10, 11, 12) for ext in ("mp4", "wav"))
    victim = data / f"{job['id']}_seed11.wav"
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    bad = client.get(job["results"][1]["audio_url"])
    assert bad.status_code == 410 and error_of(bad)["code"] == "result_damaged"
    assert client.get(job["results"][2]["audio_url"]).status_code == 200

    # a multi-sample job is not answered from the result cache, and DELETE removes every sample
    again = post(client, clip, prompt="rain", seed="10", num_samples="3", output="mp4").json()
    assert again["cache_hit"] is False
    client.delete(f"/v1/generations/{again['id']}")
    assert not list(data.glob(f"{again['id']}*"))


def test_text_only_samples_and_a_single_sample_equals_its_seed_alone(client: TestClient) -> None:
    job = post(client, prompt="wind", duration="1", seed="4", num_samples="2").json()
    assert job["status"] == "succeeded" and [s["seed"] for s in job["results"]] == [4, 5]
    second = samples_of(client.get(job["results"][1]["audio_url"]).content)
    alone = post(client, prompt="wind", duration="1", seed="5").json()
    assert np.abs(samples_of(client.get(alone["audio_url"]).content) - second).max() < 1e-4


@pytest.mark.parametrize("n", ["0", "9", "two"])
def test_num_samples_out_of_range_is_422(client: TestClient, clip: bytes, n: str) -> None:
    r = post(client, clip, num_samples=n)
    assert r.status_code == 422 and "num_samples" in error_of(r)["message"], r.text


def test_info_and_openapi_describe_the_new_fields(client: TestClient) -> None:
    info = client.get("/v1/info").json()
    assert info["limits"]["num_samples"] == [1, 8] and info["limits"]["text_only_seconds"] == [0.64, 15.0]
    spec = client.get("/openapi.json").json()
    post_op = spec["paths"]["/v1/generations"]["post"]
    props = post_op["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert "num_samples" in props and "text to audio" in props["duration"]["description"]
    assert "duration" in post_op["description"]
    params = spec["paths"]["/v1/generations/{job_id}/audio"]["get"]["parameters"]
    assert any(p["name"] == "seed" for p in params)


def test_a_text_only_sample_job_survives_a_restart(engine: Engine, tmp_path: Path) -> None:
    # A text-only job has no upload to re-queue from: its parameters are all it needs.
    import time

    from foleyserve.server.jobs import JobRecord, JobStore

    data = tmp_path / "crashed"
    store = JobStore(data)
    params = {"prompt": "hail", "negative_prompt": "noisy, harsh", "steps": 2, "guidance": 4.5, "seed": 7, "output": "wav",
              "keep_original_audio": None, "start": 0.0, "duration": 1.0, "text_only": True, "num_samples": 2}
    store.add(JobRecord(id="d" * 32, status="running", priority="interactive", params=params, created=time.time()))
    store.close()
    with TestClient(create_app(ServerConfig(data_dir=data, cache="memory"), engine=engine)) as c:
        deadline = time.monotonic() + 60
        while (job := c.get(f"/v1/generations/{'d' * 32}").json())["status"] != "succeeded":
            assert job["status"] in ("queued", "preparing", "running") and time.monotonic() < deadline, job
            time.sleep(0.05)
        assert [s["seed"] for s in job["results"]] == [7, 8]
        assert all(c.get(s["audio_url"]).status_code == 200 for s in job["results"])


def test_cancelling_a_running_sample_job_leaves_no_files(client: TestClient, clip: bytes) -> None:
    import time

    r = client.post("/v1/generations", files={"video": ("clip.mp4", clip, "video/mp4")},
                    data={"steps": "1000", "num_samples": "3", "output": "wav"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while not ((job := client.get(f"/v1/generations/{job_id}").json())["status"] == "running" and job["progress"]["step"] > 0):
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    client.delete(f"/v1/generations/{job_id}")
    while (job := client.get(f"/v1/generations/{job_id}").json())["status"] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    assert job["status"] == "cancelled" and job["results"] == []
    assert not list(Path(client.app.state.service.store.results_dir).glob(f"{job_id}*"))
