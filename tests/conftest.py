import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Test this checkout's code even when another checkout holds the editable install.
sys.path.insert(0, str(REPO / "src"))


def shared_dir() -> Path:
    env = os.environ.get("FOLEYSERVE_SHARED")
    return Path(env) if env else REPO.parent / "shared"


REFERENCE = shared_dir() / "reference"
FIXTURES = REFERENCE / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"conformance fixtures not found at {FIXTURES}; set FOLEYSERVE_SHARED to the shared/ folder")
    return FIXTURES


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE


def load_fixture_model(path: Path, builder, **kw):
    """Build a model from a fixture's embedded config and load its weights strictly."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    model = builder(config, **kw)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory):
    """Every stage of the demo model exported to ONNX once per test session (about a minute)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from foleyserve.export.exporter import export_demo

    out = tmp_path_factory.mktemp("demo_export")
    return out, export_demo(out)
