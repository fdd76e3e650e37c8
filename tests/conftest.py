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
