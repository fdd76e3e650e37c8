"""Deployment profiles and `foleyserve serve`: loading, checking, flag overrides, bad flags."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from foleyserve.cli import UsageError, build_parser, main
from foleyserve.commands.serve import _listen, configs_from_args
from foleyserve.config import ConfigError, EngineConfig
from foleyserve.server.settings import ServerConfig, load_profile, profile_dirs, profile_names

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("realtime", "batch", "edge", "edge-cpu", "cloud", "turbo")


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "custom.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------- shipped


def test_every_shipped_profile_loads_and_validates() -> None:
    assert set(SHIPPED) <= set(profile_names())
    for name in SHIPPED:
        engine, server = load_profile(name)
        assert isinstance(engine, EngineConfig) and isinstance(server, ServerConfig)
        server.validate()
        EngineConfig(**{**engine.__dict__, "demo": True}).validate()
        text = (REPO / "profiles" / f"{name}.yaml").read_text()
        assert text.count("#") >= 5, f"{name}.yaml should say why it chooses what it does"


def test_profiles_choose_what_their_names_promise() -> None:
    _, realtime = load_profile("realtime")
    assert realtime.max_batch_size == 1 and realtime.max_wait_ms == 0 and realtime.default_priority == "interactive"
    _, batch = load_profile("batch")
    assert batch.max_batch_size > 1 and 100 <= batch.max_wait_ms <= 500 and batch.default_priority == "bulk"
    edge_engine, edge = load_profile("edge")
    assert (edge_engine.model, edge_engine.precision, edge_engine.offload) == ("xl", "fp8-weight-only", "sequential")
    assert edge.default_steps < 50
    cloud_engine, cloud = load_profile("cloud")
    assert cloud_engine.precision == "fp8" and cloud_engine.compile is True
    assert cloud.cache != "off" and cloud.max_batch_size == 4 and cloud.api_key is None  # keys come from the environment
    cpu_engine, _ = load_profile("edge-cpu")
    assert (cpu_engine.backend, cpu_engine.device, cpu_engine.precision) == ("onnxruntime", "cpu", "fp32")
    assert "dac" not in cpu_engine.backend_stages and "dit" in cpu_engine.backend_stages
    turbo_engine, turbo = load_profile("turbo")
    assert turbo_engine.student is not None and turbo_engine.light_decoder is not None and turbo.default_steps <= 8
    assert turbo_engine.encoder_precision == "bf16"


def test_packaged_profiles_match_the_repository_copies() -> None:
    # The package copy is what `pip install` ships; the root copy is what people read.
    package = REPO / "src" / "foleyserve" / "profiles"
    for name in SHIPPED:
        assert (package / f"{name}.yaml").read_bytes() == (REPO / "profiles" / f"{name}.yaml").read_bytes(), name
    assert package in profile_dirs()


def test_every_profile_runs_a_server(tmp_path: Path) -> None:
    # The values must also suit the batcher and the cache, not only pass our own checks.
    from fastapi.testclient import TestClient

    from foleyserve import Engine
    from foleyserve.server.app import create_app

    engine = Engine.demo()
    for name in SHIPPED:
        _, server = load_profile(name)
        server.data_dir = tmp_path / name
        with TestClient(create_app(server, engine=engine)) as c:
            assert c.get("/readyz").status_code == 200, name
            info = c.get("/v1/info").json()
            assert info["defaults"]["steps"] == server.default_steps and info["defaults"]["priority"] == server.default_priority


# -------------------------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("engine: {}\nservr: {}\n", r"unknown top-level key\(s\) servr; known: engine, server"),
        ("engine:\n  precison: bf16\n", r"unknown engine option\(s\) precison; known: .*precision"),
        ("server:\n  max_batch: 4\n", r"unknown server option\(s\) max_batch; known: .*max_batch_size"),
        ("server:\n  port: http\n", r"port must be an integer from 0 to 65535, got 'http'"),
        ("server:\n  max_batch_size: 0\n", r"max_batch_size must be an integer from 1 to 256"),
        ("server:\n  cache: memcached\n", r"cache must be one of off, memory, disk or a redis://"),
        ("server:\n  default_priority: urgent\n", r"default_priority must be one of interactive, bulk"),
        ("server:\n  default_steps: 80\n  max_steps: 60\n", r"default_steps must be an integer from 1 to 60"),
        ("engine:\n  precision: fp7\n", r"unknown precision 'fp7'"),
        ("engine:\n  offload: always\n", r"unknown offload mode 'always'"),
        ("engine: [1, 2]\n", r"'engine' must be a mapping"),
        ("- just\n- a list\n", r"must be a mapping with the sections engine, server"),
        ("server: {port: [unclosed\n", r"not valid YAML"),
    ],
)
def test_bad_profiles_name_the_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_unknown_profile_name_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown profile 'fast'; choose one of auto, batch, cloud, cluster, edge, edge-cpu, realtime, turbo"):
        load_profile("fast")
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "nope.yaml")


def test_an_empty_profile_is_all_defaults(tmp_path: Path) -> None:
    engine, server = load_profile(write(tmp_path, "# nothing set\n"))
    assert engine == EngineConfig() and server == ServerConfig()


# ------------------------------------------------------------------------- flags and profile


def test_flags_override_the_profile() -> None:
    engine, server = configs_from_args(
        parse("--profile", "edge", "--demo", "--max-batch-size", "2", "--port", "9000", "--precision", "bf16",
              "--cache", "off", "--cors-origin", "https://a.example", "--cors-origin", "https://b.example"),
        environ={},
    )
    assert engine.demo and engine.precision == "bf16"
    assert engine.model == "xl" and engine.offload == "sequential"  # kept from the profile
    assert server.max_batch_size == 2 and server.port == 9000 and server.cache == "off"
    assert server.cors_origins == ["https://a.example", "https://b.example"]
    assert server.default_steps == 25 and server.max_queue == 8  # kept from the profile


def test_model_dir_flag_replaces_demo(tmp_path: Path) -> None:
    path = write(tmp_path, "engine:\n  demo: true\n")
    engine, _ = configs_from_args(parse("--profile", str(path), "--model-dir", str(tmp_path)), environ={})
    assert engine.model_dir == tmp_path and engine.demo is False


def test_api_key_from_flag_or_environment() -> None:
    _, server = configs_from_args(parse("--demo"), environ={"FOLEYSERVE_API_KEY": "from-env"})
    assert server.api_key == "from-env"
    _, server = configs_from_args(parse("--demo", "--api-key", "from-flag"), environ={"FOLEYSERVE_API_KEY": "from-env"})
    assert server.api_key == "from-flag"
    _, server = configs_from_args(parse("--demo"), environ={"FOLEYSERVE_API_KEY": ""})
    assert server.api_key is None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "no model given: pass --model-dir DIR"),
        (["--model-dir", "/no/such/folder"], "model folder /no/such/folder does not exist"),
        (["--demo", "--max-batch-size", "0"], "--max-batch-size must be an integer from 1 to 256, got 0"),
        (["--demo", "--port", "70000"], "--port must be an integer from 0 to 65535"),
        (["--demo", "--precision", "fp7"], "unknown precision 'fp7'"),
        (["--demo", "--cache", "memcached"], "--cache must be one of off, memory, disk"),
        (["--demo", "--profile", "fast"], "unknown profile 'fast'"),
        (["--demo", "--api-key", "  "], "api_key must be a non-empty string"),
    ],
)
def test_bad_flags_are_usage_errors(argv: list[str], expected: str) -> None:
    with pytest.raises(UsageError) as info:
        configs_from_args(parse(*argv), environ={})
    assert expected in str(info.value)


def test_bad_flag_through_main_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--demo", "--max-queue", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("foleyserve serve: error: --max-queue must be") and "\n" not in err


def test_a_taken_port_is_a_usage_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port}"):
            _listen("127.0.0.1", port)


# -------------------------------------------------------------------------- the real command


def short_clip(seconds: float = 1.2) -> bytes:
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(round(seconds * 25)):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 9 % 256, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("FOLEYSERVE_API_KEY", None)
    return env


@pytest.mark.slow
def test_serve_command_runs_uvicorn_and_stops_cleanly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "foleyserve", "serve", "--demo", "--profile", "realtime", "--port", "0",
         "--data-dir", str(tmp_path / "data"), "--log-level", "warning", "--api-key", "k"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_env(),
    )
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None:
            assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
            line = proc.stderr.readline()
            m = re.search(r"listening on (http://\S+)", line)
            url = m.group(1) if m else None
        while True:
            assert proc.poll() is None, f"serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}"
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass  # a loaded box: uvicorn may not be accepting yet
            assert time.monotonic() < deadline, "the model never became ready"
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/generations?wait=60", files={"video": ("s.mp4", short_clip(), "video/mp4")},
                       data={"steps": "2", "output": "wav"}, headers={"Authorization": "Bearer k"}, timeout=90)
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cost_flags_override_the_profile() -> None:
    engine, _ = configs_from_args(parse("--profile", "cloud", "--demo", "--offload", "stage", "--step-cache", "0.05"), environ={})
    assert (engine.precision, engine.compile, engine.offload, engine.step_cache) == ("fp8", True, "stage", 0.05)
    engine, _ = configs_from_args(parse("--demo", "--compile"), environ={})
    assert engine.compile is True and engine.offload == "none"


def test_listening_socket_is_tcp_so_connections_get_nodelay() -> None:
    """asyncio turns on TCP_NODELAY for accepted connections only when the listener is IPPROTO_TCP."""
    import asyncio
    import socket as s

    sock = _listen("127.0.0.1", 0)
    try:
        assert sock.proto == s.IPPROTO_TCP
        flags: list[int] = []

        async def main() -> None:
            def on_connect(reader, writer):
                flags.append(writer.get_extra_info("socket").getsockopt(s.IPPROTO_TCP, s.TCP_NODELAY))
                writer.close()

            server = await asyncio.start_server(on_connect, sock=sock)
            port = sock.getsockname()[1]
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(100):
                if flags:
                    break
                await asyncio.sleep(0.01)
            writer.close()
            server.close()

        asyncio.run(main())
        assert flags and flags[0] != 0
    finally:
        sock.close()


def test_a_demo_server_runs_the_demo_precision_unless_told_otherwise() -> None:
    from foleyserve.pipeline.demo import demo_precision

    engine, _ = configs_from_args(parse("--demo"), environ={})
    assert engine.precision == demo_precision("auto")[0]  # the CLI's demo runs the same one
    engine, _ = configs_from_args(parse("--demo", "--precision", "fp16"), environ={})
    assert engine.precision == "fp16"
    engine, _ = configs_from_args(parse("--demo", "--profile", "cloud"), environ={})
    assert engine.precision == "fp8"  # the profile names its precision
