"""best_of over HTTP: the batcher's multi-sample job, scored and ranked, against the demo engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from foleyserve import Engine
from foleyserve.server.app import create_app
from foleyserve.server.settings import ServerConfig
from test_server import error_of, make_clip
from test_server_samples import post, samples_of


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.demo()


@pytest.fixture()
def client(engine: Engine, tmp_path: Path):
    with TestClient(create_app(ServerConfig(data_dir=tmp_path / "data", cache="memory"), engine=engine),
                    raise_server_exceptions=False) as c:
        yield c


def test_best_of_three_scores_every_candidate_and_serves_the_kept_one(client: TestClient) -> None:
    r = post(client, make_clip(5.6), prompt="footsteps", seed="20", best_of="3", output="mp4")
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "succeeded" and job["best_of"] == 3 and job["num_samples"] == 3
    assert job["rank"] == "desync,clap" and job["ranked_by"] == ["desync", "clap"]
    cands = job["candidates"]
    assert sorted(c["seed"] for c in cands) == [20, 21, 22] and [c["rank"] for c in cands] == [1, 2, 3]
    assert all(c["desync"] is not None and len(c["offsets_sec"]) == 2 and isinstance(c["clap"], float) for c in cands)
    # best first: DeSync ascending, then CLAP descending
    assert [(c["desync"], -c["clap"]) for c in cands] == sorted((c["desync"], -c["clap"]) for c in cands)
    kept = [c for c in cands if c["kept"]]
    assert kept == [cands[0]]
    assert "score" in job["timings"]
    # audio_url/video_url are the kept candidate's; every candidate stays downloadable
    best = client.get(kept[0]["audio_url"])
    assert best.status_code == 200 and f"seed{kept[0]['seed']}" in best.headers["content-disposition"]
    plain = client.get(job["audio_url"])
    assert plain.status_code == 200 and (samples_of(plain.content) == samples_of(best.content)).all()
    kept_video = next(s["video_url"] for s in job["results"] if s["seed"] == kept[0]["seed"])
    assert client.get(job["video_url"]).content == client.get(kept_video).content
    assert all(client.get(c["audio_url"]).status_code == 200 for c in cands)
    # the record survives a re-read from the store (the ranking is persisted, not only in memory)
    again = client.get(f"/v1/generations/{job['id']}").json()
    assert again["candidates"] == cands and again["ranked_by"] == ["desync", "clap"]


def test_a_short_clip_is_ranked_by_clap_and_says_so(client: TestClient) -> None:
    r = post(client, make_clip(1.2), prompt="rain", best_of="2", output="wav")
    job = r.json()
    assert r.status_code == 200 and job["status"] == "succeeded", r.text
    assert job["ranked_by"] == ["clap"]
    assert any("ranked by clap alone" in w and "4.8 s" in w for w in job["warnings"])
    cands = job["candidates"]
    assert all(c["desync"] is None and c["offsets_sec"] is None for c in cands)
    assert cands[0]["kept"] and cands[0]["clap"] >= cands[1]["clap"]
    # text to audio: CLAP alone too, and rank=clap is taken as asked
    job = post(client, prompt="wind", duration="1", best_of="2", rank="clap").json()
    assert job["status"] == "succeeded" and job["rank"] == "clap" and job["ranked_by"] == ["clap"]
    assert len(job["candidates"]) == 2


@pytest.mark.parametrize("fields, words", [
    ({"best_of": "1"}, "best_of"),
    ({"best_of": "9"}, "best_of"),
    ({"best_of": "x"}, "best_of"),
    ({"best_of": "2", "rank": "loudness"}, "rank"),
    ({"best_of": "2", "rank": "clap,clap"}, "rank"),
    ({"best_of": "2", "num_samples": "2"}, "not both"),
    ({"rank": "clap"}, "send best_of too"),
])
def test_bad_best_of_or_rank_is_422(client: TestClient, fields, words) -> None:
    r = post(client, make_clip(1.2), **fields)
    assert r.status_code == 422, r.text
    assert words in error_of(r)["message"]
    assert client.get("/v1/generations").json()["items"] == []


def test_info_and_openapi_describe_best_of(client: TestClient) -> None:
    info = client.get("/v1/info").json()
    assert info["limits"]["best_of"] == [2, 8] and info["limits"]["rank_measures"] == ["desync", "clap"]
    assert info["defaults"]["rank"] == "desync,clap" and info["defaults"]["best_of"] is None
    props = client.get("/openapi.json").json()["paths"]["/v1/generations"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["properties"]
    assert "best_of" in props and "rank" in props


def test_a_best_of_job_is_still_ranked_after_a_restart(engine: Engine, tmp_path: Path) -> None:
    import time

    from foleyserve.server.jobs import JobRecord, JobStore

    data = tmp_path / "crashed"
    store = JobStore(data)
    params = {"prompt": "hail", "negative_prompt": "noisy, harsh", "steps": 2, "guidance": 4.5, "seed": 7, "output": "wav",
              "keep_original_audio": None, "start": 0.0, "duration": 1.0, "text_only": True, "num_samples": 2,
              "best_of": 2, "rank": "clap"}
    store.add(JobRecord(id="e" * 32, status="running", priority="interactive", params=params, created=time.time()))
    store.close()
    with TestClient(create_app(ServerConfig(data_dir=data, cache="memory"), engine=engine)) as c:
        deadline = time.monotonic() + 60
        while (job := c.get(f"/v1/generations/{'e' * 32}").json())["status"] != "succeeded":
            assert job["status"] in ("queued", "preparing", "running") and time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job["ranked_by"] == ["clap"] and [c["rank"] for c in job["candidates"]] == [1, 2]
        assert job["audio_url"].endswith("/audio") and job["candidates"][0]["kept"]


def test_preload_scorers_loads_them_before_the_server_is_ready(engine: Engine, tmp_path: Path) -> None:
    engine.scorers = None
    with TestClient(create_app(ServerConfig(data_dir=tmp_path / "d", cache="memory", preload_scorers=True), engine=engine)) as c:
        assert c.get("/readyz").status_code == 200
        assert engine.scorers is not None
