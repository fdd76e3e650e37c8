"""bench/device_check.py, the one-shot GPU check, run end to end in --smoke mode on the CPU.

The device machine is lent for minutes per issue, so the script must not fail there on a Python
error: this runs every phase at tiny sizes (a subprocess, as the device command runs it) and checks
that the results file parses, that every phase ran (or says why it was skipped on a CPU), and that
no measurement inside a phase raised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PHASES = ("env", "kernels", "dit_correctness", "step_times", "end_to_end", "offload", "peak_vram", "encoders", "compile")
CPU_SKIPS = ("skipped: no cuda",)


def _errors(tree, path=""):
    """Every measurement that recorded an error (a dict with "error" and "traceback")."""
    if isinstance(tree, dict):
        here = [f"{path}: {tree['error']}"] if "error" in tree and "traceback" in tree else []
        return here + [e for k, v in tree.items() for e in _errors(v, f"{path}/{k}")]
    if isinstance(tree, list):
        return [e for i, v in enumerate(tree) for e in _errors(v, f"{path}[{i}]")]
    return []


@pytest.mark.slow  # about 30 s on two busy cores
def test_smoke_run_writes_every_phase(tmp_path):
    out = tmp_path / "dc.json"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "device_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["smoke"] and data["finished"]
    assert list(data["phases"]) == list(PHASES)
    for name in PHASES:
        status = data["phases"][name]["status"]
        assert status == "ok" or status in CPU_SKIPS, f"{name}: {status}: {data['phases'][name].get('error')}"
    assert _errors(data["phases"]) == []
    # Every goal is stated and judged from whatever was measured.
    assert set(data["goals"]) == set(data["verdicts"]) - {"note"}
    r = data["phases"]
    assert r["env"]["results"]["bf16_matmul"]["tflops"] > 0
    assert r["dit_correctness"]["results"]["fp32_tf32_off"]["rel_l2_vs_cpu_fp32"] == 0.0
    assert r["step_times"]["results"]["tiny/bf16"]["sync_debug_loop"]["loop_raised"] is False
    for mode in ("stage", "sequential"):
        for rows in (2, 4):
            assert r["offload"]["results"][mode][f"rows={rows}"]["bit_equal"] is True
    child = r["compile"]["results"]["child"]
    assert child["graph_breaks"] == 0 and child["progress"] == "done"
    assert not list(tmp_path.glob("*.tmp*")), "a temporary JSON was left behind"
    # The smoke run must stay cheap: it guards a script whose real run costs GPU minutes.
    assert took < 90, f"the smoke run took {took:.0f} s"


def test_budget_skips_phases_and_still_writes(tmp_path):
    out = tmp_path / "dc.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "device_check.py"), "--smoke", "--out", str(out),
                           "--phases", "env,compile", "--budget-s", "8"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    phases = json.loads(out.read_text())["phases"]
    assert phases["env"]["status"] == "ok"
    assert phases["kernels"]["status"].startswith("skipped: not selected")
    # The compile phase's estimate (10 s in --smoke) does not fit in what is left of 8 s.
    assert phases["compile"]["status"] == "skipped: budget"


def test_lost_cuda_context_restarts_with_the_remaining_phases(tmp_path):
    # On a GPU an illegal memory access poisons the context for good; the check then re-executes
    # itself for the phases left. Here the loss is simulated after "kernels".
    out = tmp_path / "dc.json"
    env = {**os.environ, "DEVICE_CHECK_TEST_LOSE_CONTEXT_AFTER": "kernels"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "device_check.py"), "--smoke", "--out", str(out),
                           "--phases", "env,kernels,offload"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["after_phase"] for r in data["restarts"]] == ["kernels"] and data["restarts"][0]["then"] == ["offload"]
    statuses = {name: p["status"] for name, p in data["phases"].items()}
    assert statuses["env"] == statuses["kernels"] == statuses["offload"] == "ok"
    assert statuses["compile"].startswith("skipped: not selected")
    assert data["finished"] and "--resume" in data["argv"]
