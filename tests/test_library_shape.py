"""The package as a library: its public API is visible, it installs typed and licensed, and the
server's optional dependencies (the ``serve`` extra) are needed only by what serves."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import foleyserve

REPO = Path(__file__).resolve().parents[1]
SRC = str(REPO / "src")
SERVE_MODULES = ("fastapi", "uvicorn", "python_multipart", "multipart", "diskcache", "redis", "prometheus_client", "starlette")


def test_public_api_is_listed_and_documented():
    public = {"Engine", "EngineConfig", "ConfigError", "GenerationRequest", "GenerationResult", "RequestError", "generate", "__version__"}
    assert public <= set(foleyserve.__all__)
    assert public <= set(dir(foleyserve))
    for name in public - {"__version__"}:
        obj = getattr(foleyserve, name)
        assert obj.__doc__ and obj.__doc__.strip(), name
        assert name in foleyserve.__doc__
    for method in ("from_pretrained", "from_config", "demo", "generate", "generate_batch"):
        assert getattr(foleyserve.Engine, method).__doc__, method


def test_typed_and_licensed():
    assert (REPO / "src" / "foleyserve" / "py.typed").exists()
    assert '"py.typed"' in (REPO / "pyproject.toml").read_text()
    assert "Apache License" in (REPO / "LICENSE").read_text()
    assert "TENCENT HUNYUAN COMMUNITY LICENSE" in (REPO / "NOTICE").read_text()


def test_components_live_apart_from_the_engine():
    from foleyserve.pipeline import components, demo, model_dir, pipeline

    assert demo.Components is components.Components is model_dir.Components is pipeline.Components


def _without_serve_extra(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where the serve extra's modules cannot be imported."""
    prelude = f"import sys\nsys.path.insert(0, {SRC!r})\nfor name in {SERVE_MODULES!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_library_and_cli_work_without_the_serve_extra(tmp_path):
    proc = _without_serve_extra(f"""
        import foleyserve
        from foleyserve import Engine, EngineConfig, GenerationRequest
        from foleyserve.cli import main
        from foleyserve.pipeline.demo import sample_clip_path
        result = foleyserve.generate(sample_clip_path(), "rain", steps=1, output={str(tmp_path / "a.wav")!r})
        assert result.files and result.audio_seconds > 3
        assert main(["demo", "--steps", "1", "--out", {str(tmp_path / "b.wav")!r}]) == 0
        assert main(["generate", str(sample_clip_path()), "--demo", "--steps", "1", "--out", {str(tmp_path / "c.wav")!r}]) == 0
        print("OK")
    """)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_serve_and_batch_caches_name_the_extra_without_it(tmp_path):
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("video,prompt\nnope.mp4,rain\n")
    proc = _without_serve_extra(f"""
        from foleyserve.cli import main
        code = main(["serve", "--demo"])
        print("serve", code)
        code = main(["batch", {str(jobs)!r}, "--out-dir", {str(tmp_path / "out")!r}, "--demo", "--cache", "disk"])
        print("batch-disk", code)
    """)
    assert "serve 2" in proc.stdout and "batch-disk 2" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.count("pip install 'foleyserve[serve]'") == 2, proc.stderr
    assert "Traceback" not in proc.stderr
