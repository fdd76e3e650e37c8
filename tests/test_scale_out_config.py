"""Scale-out options without a cluster: the cluster profile, the serve --ray flags and their
refusals, and Idempotency-Key on a single-machine (SQLite) server."""

from __future__ import annotations

from pathlib import Path

import pytest

from foleyserve.cli import UsageError, build_parser
from foleyserve.commands.serve import configs_from_args
from foleyserve.config import ConfigError
from foleyserve.server.settings import ServerConfig, load_profile

REPO = Path(__file__).resolve().parents[1]
PG = "postgresql://foleyserve@db:5432/foleyserve"


def parse(*argv: str):
    return build_parser().parse_args(["serve", "--demo", *argv])


def test_the_cluster_profile_loads_and_matches_its_package_copy() -> None:
    engine, server = load_profile("cluster")
    assert server.database_url.startswith("postgresql://") and server.cache.startswith("redis://")
    assert server.replica_gpus == 1 and server.autoscale == [1, 4] and server.host == "0.0.0.0"
    assert server.api_key is None  # keys and passwords come from the environment
    package = REPO / "src" / "foleyserve" / "profiles" / "cluster.yaml"
    assert package.read_bytes() == (REPO / "profiles" / "cluster.yaml").read_bytes()
    assert (REPO / "profiles" / "cluster.yaml").read_text().count("#") >= 5


def test_ray_flags_reach_the_server_options() -> None:
    _, server = configs_from_args(parse("--ray", "--replicas", "3", "--database-url", PG, "--lease-seconds", "5"), environ={})
    assert (server.replicas, server.autoscale, server.database_url, server.lease_seconds) == (3, None, PG, 5.0)
    _, server = configs_from_args(parse("--ray", "--autoscale", "1,4", "--replica-gpus", "1"),
                                  environ={"FOLEYSERVE_DATABASE_URL": PG})
    assert server.autoscale == [1, 4] and server.replica_gpus == 1.0 and server.database_url == PG
    _, server = configs_from_args(parse("--ray", "--profile", "cluster", "--ray-address", "auto"), environ={})
    assert server.ray_address == "auto" and server.autoscale == [1, 4]


@pytest.mark.parametrize(("argv", "message"), [
    (("--replicas", "2"), r"--replicas only apply with --ray"),
    (("--ray-address", "auto"), r"--ray-address only apply with --ray"),
    (("--ray",), r"--ray needs the shared job database"),
    (("--ray", "--autoscale", "4,1", "--database-url", PG), r"--autoscale must be MIN,MAX with 1 <= MIN <= MAX"),
    (("--ray", "--autoscale", "0,4", "--database-url", PG), r"no replica: no job is admitted"),
    (("--ray", "--autoscale", "many", "--database-url", PG), r"--autoscale must be MIN,MAX \(two whole numbers"),
    (("--ray", "--database-url", "mysql://x"), r"--database-url must be a postgresql://"),
    (("--ray", "--replicas", "0", "--database-url", PG), r"--replicas must be an integer from 1"),
])
def test_bad_ray_flags_are_one_clear_line(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        configs_from_args(parse(*argv), environ={})


def test_replicas_and_autoscale_exclude_each_other(capsys) -> None:
    with pytest.raises(SystemExit):
        parse("--ray", "--replicas", "2", "--autoscale", "1,2")
    assert "not allowed with argument" in capsys.readouterr().err


def test_server_config_checks_the_cluster_fields() -> None:
    ServerConfig(database_url=PG, autoscale=[1, 2], lease_seconds=2).validate()
    for bad in ([3, 2], [0, 2]):
        with pytest.raises(ConfigError, match=r"autoscale must be \[min, max\] with 1 <= min <= max"):
            ServerConfig(autoscale=bad).validate()
    with pytest.raises(ConfigError, match="lease_seconds must be a number from 1 to 3600"):
        ServerConfig(lease_seconds=0.5).validate()
    assert ServerConfig(database_url="postgresql://u:pw@h/db").public_dict()["database_url"] == "postgresql://u:***@h/db"


def test_idempotency_key_on_one_machine(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from foleyserve import Engine
    from foleyserve.server.app import create_app
    from test_server import make_clip

    clip = make_clip(1.2)
    app = create_app(ServerConfig(data_dir=tmp_path, cache="memory"), engine=Engine.demo())
    with TestClient(app) as c:
        def post(key: str | None, client: str | None = None):
            headers = {k: v for k, v in (("Idempotency-Key", key), ("X-Client-Id", client)) if v}
            return c.post("/v1/generations?wait=60", files={"video": ("c.mp4", clip, "video/mp4")},
                          data={"steps": "2", "output": "wav"}, headers=headers)

        first = post("retry-me")
        assert first.status_code == 200 and "idempotent-replayed" not in first.headers
        again = post("retry-me")
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        assert again.headers["idempotent-replayed"] == "true" and again.headers["location"].endswith(first.json()["id"])
        other = post("retry-me", client="client-other-01")  # another client's key space
        assert other.json()["id"] != first.json()["id"]
        assert post(None).json()["id"] != first.json()["id"]
        bad = post("x" * 300)
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_parameter" and "Traceback" not in bad.text
        body = first.json()
        assert body["replica"] is None and body["attempt"] == 0
        assert len(list((tmp_path / "uploads").iterdir())) == 0  # the repeated uploads were not kept


def test_the_kuberay_application_builder_reads_serve_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("ray.serve")
    from foleyserve.server import ray_app

    monkeypatch.setenv("FOLEYSERVE_DATABASE_URL", PG)
    app = ray_app.app_builder({"profile": "cluster", "demo": True, "autoscale": "2,6", "data_dir": str(tmp_path)})
    ingress_args = app._bound_deployment.init_args if hasattr(app, "_bound_deployment") else None
    if ingress_args is not None:
        server, engine = ingress_args[0], ingress_args[1]
        assert server.autoscale == [2, 6] and server.database_url == PG and engine.demo
        assert Path(server.data_dir).is_absolute()
    with pytest.raises(UsageError, match="--ray needs the shared job database"):
        monkeypatch.delenv("FOLEYSERVE_DATABASE_URL")
        ray_app.app_builder({"demo": True})


def test_autoscale_becomes_the_engine_deployments_autoscaling_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("ray.serve")
    from foleyserve.server import ray_app

    server = ServerConfig(database_url=PG, data_dir=tmp_path, autoscale=[2, 5], max_batch_size=3, max_queue=10,
                          replica_gpus=1, replica_cpus=4)
    from foleyserve.config import EngineConfig

    app = ray_app.build_app(server, EngineConfig(demo=True))
    engine = app._bound_deployment.init_args[2]._bound_deployment
    auto = engine._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 5, 3)
    assert engine.max_ongoing_requests == 13 and engine.ray_actor_options["num_gpus"] == 1
    fixed = ray_app.build_app(ServerConfig(database_url=PG, data_dir=tmp_path, replicas=3), EngineConfig(demo=True))
    assert fixed._bound_deployment.init_args[2]._bound_deployment.num_replicas == 3
    with pytest.raises(ValueError, match="needs database_url"):
        ray_app.build_app(ServerConfig(data_dir=tmp_path), EngineConfig(demo=True))


def test_serve_ray_with_an_unreachable_database_is_one_line_before_ray_starts(tmp_path: Path, capsys) -> None:
    pytest.importorskip("ray.serve")
    pytest.importorskip("psycopg_pool")
    import sys

    from foleyserve.cli import main
    from redis_server import free_port

    url = f"postgresql://foleyserve:secret@127.0.0.1:{free_port()}/nothing"
    code = main(["serve", "--demo", "--ray", "--database-url", url, "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot use the job database postgresql://foleyserve:***@127.0.0.1" in err
    assert "secret" not in err and "Traceback" not in err
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()
