"""The README's quick start: scripts/install.sh picks (and if needed makes) the interpreter, and
demo.sh / test.sh run with the one it installed into.

A stub python stands in for the real one (it logs its arguments; ``-m venv`` makes a stub venv,
``-m pip``, ``-m foleyserve`` and ``-m pytest`` do nothing), so these cases take seconds and never
touch the network or the system. One slow case makes a real virtual environment.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STUB = f"""#!{sys.executable}
import json, os, shutil, stat, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps([sys.argv[0], *args]) + "\\n")
if args[:2] == ["-m", "venv"]:
    bin_dir = os.path.join(args[-1], "bin")
    os.makedirs(bin_dir, exist_ok=True)
    shutil.copy(__file__, os.path.join(bin_dir, "python"))
    sys.exit(0)
if args[:2] in (["-m", "pip"], ["-m", "foleyserve"], ["-m", "pytest"]):
    sys.exit(0)
if args[:1] == ["-c"] and "ensurepip" in args[1]:
    sys.exit(1 if os.environ.get("STUB_NO_ENSUREPIP") else 0)
if args[:1] == ["-c"] and "base_prefix" in args[1]:
    sys.exit(0 if os.environ.get("STUB_IN_VENV") else 1)
os.execv(sys.executable, [sys.executable, *args])
"""


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    path = tmp_path / "stub-python"
    path.write_text(STUB)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def run_script(tmp_path: Path, script: str, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    full = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    full.update(
        STUB_LOG=str(log),
        FOLEYSERVE_APT_GET=str(tmp_path / "no-apt-get"),
        # install-system.sh (test.sh) finds "installed" packages and does nothing.
        FOLEYSERVE_CHROMIUM_BIN="/bin/true",
        FOLEYSERVE_REDIS_SERVER_BIN="/bin/true",
        **env,
    )
    proc = subprocess.run(["bash", str(REPO / "scripts" / script)], env=full, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def pip_installs(calls: list[list[str]]) -> list[tuple[str, str]]:
    return [(c[0], c[-1]) for c in calls if c[1:3] == ["-m", "pip"]]


def test_python_given_is_used_as_is(tmp_path, stub):
    venv = tmp_path / "venv"
    proc, calls = run_script(tmp_path, "install.sh", PYTHON=str(stub), FOLEYSERVE_VENV=str(venv))
    assert proc.returncode == 0, proc.stderr
    assert pip_installs(calls) == [(str(stub), "torch==2.13.0"), (str(stub), ".[serve,test]")]
    assert not any(c[1:3] == ["-m", "venv"] for c in calls) and not venv.exists()


def test_outside_a_venv_makes_and_reuses_the_repo_venv(tmp_path, stub):
    venv = tmp_path / "venv"
    env = dict(FOLEYSERVE_BASE_PYTHON=str(stub), FOLEYSERVE_VENV=str(venv))
    proc, calls = run_script(tmp_path, "install.sh", **env)
    assert proc.returncode == 0, proc.stderr
    assert [str(stub), "-m", "venv", "--clear", str(venv)] in calls
    venv_python = str(venv / "bin" / "python")
    assert pip_installs(calls) == [(venv_python, "torch==2.13.0"), (venv_python, ".[serve,test]")]

    # Nothing changed since: the second run installs nothing and makes no venv.
    proc, calls = run_script(tmp_path, "install.sh", **env)
    assert proc.returncode == 0, proc.stderr
    assert pip_installs(calls) == [] and not any(c[1:3] == ["-m", "venv"] for c in calls)

    # demo.sh and test.sh run with the venv's python.
    for script, module in (("demo.sh", "foleyserve"), ("test.sh", "pytest")):
        proc, calls = run_script(tmp_path, script, **env)
        assert proc.returncode == 0, proc.stderr
        assert calls[-1][:3] == [venv_python, "-m", module], calls


def test_inside_a_venv_uses_it(tmp_path, stub):
    venv = tmp_path / "venv"
    proc, calls = run_script(tmp_path, "install.sh", FOLEYSERVE_BASE_PYTHON=str(stub), FOLEYSERVE_VENV=str(venv), STUB_IN_VENV="1")
    assert proc.returncode == 0, proc.stderr
    assert pip_installs(calls) == [(str(stub), "torch==2.13.0"), (str(stub), ".[serve,test]")]
    assert not venv.exists()


def test_python_without_venv_support_names_the_fix(tmp_path, stub):
    venv = tmp_path / "venv"
    proc, calls = run_script(
        tmp_path, "install.sh", FOLEYSERVE_BASE_PYTHON=str(stub), FOLEYSERVE_VENV=str(venv), STUB_NO_ENSUREPIP="1"
    )
    assert proc.returncode == 1
    assert "apt install python3-venv" in proc.stderr and "PYTHON=" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert pip_installs(calls) == [] and not venv.exists()


@pytest.mark.slow
def test_real_venv_is_made_in_the_given_place(tmp_path):
    pytest.importorskip("ensurepip")
    venv = tmp_path / "venv"
    # The interpreter below any venv the tests run in (CI runs them inside .venv, and install.sh
    # rightly uses a venv's python as it is instead of making another).
    base = getattr(sys, "_base_executable", sys.executable)
    proc, _ = run_script(tmp_path, "install.sh", FOLEYSERVE_BASE_PYTHON=base, FOLEYSERVE_VENV=str(venv),
                         FOLEYSERVE_INSTALL_DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert (venv / "bin" / "python").exists() and (venv / "pyvenv.cfg").exists()
    assert proc.stdout.splitlines() == [
        f"{venv}/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0",
        f"{venv}/bin/python -m pip install -q --disable-pip-version-check -e .[serve,test]",
    ]


def test_venv_is_ignored_by_git():
    assert ".venv/" in (REPO / ".gitignore").read_text().split()
