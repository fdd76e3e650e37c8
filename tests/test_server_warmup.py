"""A compiled server warms its profile's step buckets before /readyz says ready, and says so."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from foleyserve import Engine
from foleyserve.config import ConfigError, EngineConfig
from foleyserve.server.app import create_app
from foleyserve.server.settings import ServerConfig


def _poll(client: TestClient, pred, what: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/readyz")
        if pred(r):
            return r
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last /readyz: {r.status_code} {r.text}")
        time.sleep(0.05)


@pytest.mark.slow
def test_readyz_reports_warmup_progress_then_ready(tmp_path, monkeypatch):
    gate = threading.Event()
    real = Engine.warm_up

    def gated(self, seconds, **kw):
        kw["progress"](0, 1, "2 s x 1")
        assert gate.wait(60)
        return real(self, seconds, **kw)

    monkeypatch.setattr(Engine, "warm_up", gated)
    config = ServerConfig(data_dir=tmp_path / "data", cache="memory", warmup_seconds=[2.0], warmup_batch_sizes=[1])
    app = create_app(config, EngineConfig(demo=True, precision="fp32", compile=True))
    with TestClient(app, raise_server_exceptions=False) as client:
        r = _poll(client, lambda r: r.status_code == 503 and r.json()["error"]["code"] == "warming_up", "warming_up")
        assert "bucket 1 of 1 (2 s x 1)" in r.json()["error"]["message"]
        assert r.headers["Retry-After"] == "10"
        gate.set()
        _poll(client, lambda r: r.status_code == 200, "ready")
        warm = client.get("/v1/info").json()["warmup"]
        assert warm["done"] == warm["total"] == 1
        assert warm["buckets"][0]["seconds"] == 2.0 and warm["buckets"][0]["batch"] == 1


@pytest.mark.parametrize("bad", [{"warmup_seconds": [0.1]}, {"warmup_seconds": "8"}, {"warmup_batch_sizes": [0]}])
def test_bad_warmup_options_are_named(tmp_path, bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        ServerConfig(data_dir=tmp_path, **bad).validate()
