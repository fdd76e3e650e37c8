"""`foleyserve batch`, the one CSV path: outputs keyed by id or input hash, a manifest, resuming
by inputs (reordered rows reuse results, edited rows regenerate), failures per row, usage errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from foleyserve.cli import main
from foleyserve.pipeline.demo import sample_clip_path

HEADER = "id,video,prompt,seed,steps\n"
BALL = "ball,clips/ball.mp4,a ball bouncing,1,2\n"
BROKEN = "broken,clips/broken.mp4,glass breaking,2,2\n"
RAIN = 'rain,clips/ball.mp4,"rain, then thunder",3,2\n'


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Path:
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(sample_clip_path(), clips / "ball.mp4")
    (clips / "broken.mp4").write_bytes(b"\x00\x00\x00\x00not a video, just bytes")
    # Relative paths resolve against the CSV's folder; a prompt with a comma is quoted.
    (tmp_path / "jobs.csv").write_text(HEADER + BALL + BROKEN + RAIN)
    return tmp_path


def _run(jobs_dir: Path, *extra: str) -> int:
    return main(["batch", str(jobs_dir / "jobs.csv"), "--out-dir", str(jobs_dir / "out"), "--demo", "--format", "wav", *extra])


@pytest.fixture
def submitted(monkeypatch) -> list[str]:
    from foleyserve.runtime.batcher import Batcher

    seen: list[str] = []
    original = Batcher.submit

    def spy(self, request, **kw):
        seen.append(request.prompt)
        return original(self, request, **kw)

    monkeypatch.setattr(Batcher, "submit", spy)
    return seen


def _manifest(jobs_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (jobs_dir / "out" / "manifest.jsonl").read_text().splitlines()]


def test_ids_name_outputs_failures_are_recorded_and_a_rerun_redoes_only_them(jobs_dir, capsys, submitted):
    assert _run(jobs_dir) == 1
    out = capsys.readouterr()
    files = sorted(p.name for p in (jobs_dir / "out").iterdir())
    assert files == ["ball.wav", "manifest.jsonl", "rain.wav"]  # no partial files left behind
    assert "row broken (line 3): failed" in out.err and "broken.mp4" in out.err
    assert "2 generated, 0 already done, 1 failed, of 3 rows" in out.out
    records = {r["id"]: r for r in _manifest(jobs_dir)}
    assert records["ball"]["status"] == "succeeded" and records["ball"]["output"].endswith("ball.wav")
    assert records["broken"]["status"] == "failed" and "broken.mp4" in records["broken"]["error"]
    assert records["rain"]["inputs"]["prompt"] == "rain, then thunder" and records["rain"]["seconds"] > 0
    first = {n: (jobs_dir / "out" / n).stat().st_mtime_ns for n in ("ball.wav", "rain.wav")}

    # Reordered rows: every finished output is reused (matched by id and inputs, not position).
    submitted.clear()
    (jobs_dir / "jobs.csv").write_text(HEADER + RAIN + BROKEN + BALL)
    assert _run(jobs_dir) == 1
    assert "0 generated, 2 already done, 1 failed, of 3 rows" in capsys.readouterr().out
    assert submitted == []  # the broken row fails its check before anything is submitted
    assert {n: (jobs_dir / "out" / n).stat().st_mtime_ns for n in first} == first


def test_an_edited_row_is_regenerated(jobs_dir, capsys, submitted):
    (jobs_dir / "jobs.csv").write_text(HEADER + BALL + RAIN)
    assert _run(jobs_dir) == 0
    capsys.readouterr()
    submitted.clear()
    (jobs_dir / "jobs.csv").write_text(HEADER + BALL + RAIN.replace("rain, then thunder", "hail on a car"))
    assert _run(jobs_dir) == 0
    assert "1 generated, 1 already done, 0 failed, of 2 rows" in capsys.readouterr().out
    assert submitted == ["hail on a car"]
    assert _manifest(jobs_dir)[-1]["inputs"]["prompt"] == "hail on a car"


def test_without_ids_outputs_are_named_by_a_hash_of_the_inputs(jobs_dir, capsys, submitted):
    body = "video,prompt,seed,steps\nclips/ball.mp4,a ball bouncing,1,2\nclips/ball.mp4,rain,3,2\n"
    (jobs_dir / "jobs.csv").write_text(body)
    assert _run(jobs_dir) == 0
    names = sorted(p.stem for p in (jobs_dir / "out").glob("*.wav"))
    assert len(names) == 2 and all(len(n) == 12 for n in names)
    capsys.readouterr()
    submitted.clear()
    lines = body.splitlines()
    (jobs_dir / "jobs.csv").write_text("\n".join([lines[0], lines[2], lines[1]]) + "\n")  # swapped rows
    assert _run(jobs_dir) == 0
    assert "0 generated, 2 already done" in capsys.readouterr().out and submitted == []
    (jobs_dir / "jobs.csv").write_text("\n".join([lines[0], lines[1], lines[2].replace(",3,", ",4,")]) + "\n")  # new seed
    assert _run(jobs_dir) == 0
    assert "1 generated, 1 already done" in capsys.readouterr().out and submitted == ["rain"]


def test_duplicate_ids_are_a_usage_error(jobs_dir, capsys):
    (jobs_dir / "jobs.csv").write_text(HEADER + BALL + BALL.replace("a ball bouncing", "other"))
    assert _run(jobs_dir) == 2
    assert "duplicate id 'ball' on lines 2 and 3" in capsys.readouterr().err
    (jobs_dir / "jobs.csv").write_text(HEADER + BALL.replace("ball,", "../up,", 1))
    assert _run(jobs_dir) == 2
    assert "cannot name a file" in capsys.readouterr().err


def test_batch_outputs_are_complete_audio(jobs_dir, capsys):
    (jobs_dir / "jobs.csv").write_text("video,prompt,seed,steps,guidance\nclips/ball.mp4,rain,5,2,3.0\n")
    assert _run(jobs_dir, "--max-batch-size", "2") == 0
    (wav,) = (jobs_dir / "out").glob("*.wav")
    with av.open(str(wav)) as f:
        rate = f.streams.audio[0].sample_rate
        audio = np.concatenate([frame.to_ndarray() for frame in f.decode(audio=0)], axis=-1)
    assert rate == 48000 and audio.shape[-1] == 198 * 960  # 3.96 s: the whole sample clip
    assert np.abs(audio).max() > 0
    assert "1 generated, 0 already done, 0 failed, of 1 rows" in capsys.readouterr().out


def test_bad_rows_fail_before_any_model_loads(jobs_dir, capsys, monkeypatch):
    import foleyserve.commands.batch as batch_command

    def no_engine(_config):
        raise AssertionError("no row can run, so no model should load")

    monkeypatch.setattr(batch_command, "load_engine", no_engine)
    long_prompt = "footsteps on gravel " * 60
    (jobs_dir / "jobs.csv").write_text(
        "video,prompt,seed,steps\nclips/ball.mp4,rain,abc,2\n,empty video,1,2\nclips/nope.mp4,x,1,2\n"
        f"clips/ball.mp4,{long_prompt},1,2\nclips/ball.mp4,rain,1,0\nclips/broken.mp4,x,1,2\n"
    )
    assert _run(jobs_dir) == 1
    err = capsys.readouterr().err
    assert "(line 2): failed: seed 'abc' is not an integer" in err
    assert "(line 3): failed: the 'video' column is empty" in err
    assert "(line 4): failed: video" in err and "nope.mp4 does not exist" in err
    assert "(line 5): failed: positive prompt has" in err and "at most 128" in err
    assert "(line 6): failed: steps must be an integer from 1 to 1000" in err
    assert "(line 7): failed:" in err and "broken.mp4" in err


def test_usage_errors_exit_2(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["batch", str(tmp_path / "missing.csv"), "--out-dir", out, "--demo"]) == 2
    assert "jobs file" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("file,text\na.mp4,rain\n")
    assert main(["batch", str(bad), "--out-dir", out, "--demo"]) == 2
    assert "needs a header with columns video,prompt" in capsys.readouterr().err
    ok = tmp_path / "ok.csv"
    ok.write_text("video,prompt\na.mp4,rain\n")
    assert main(["batch", str(ok), "--out-dir", out, "--demo", "--max-batch-size", "0"]) == 2
    assert main(["batch", str(ok), "--out-dir", out, "--demo", "--format", "ogg"]) == 2  # argparse refuses it
    assert main(["batch", str(ok), "--out-dir", out, "--demo", "--precision", "fp7"]) == 2
    assert main(["batch", str(ok), "--out-dir", out, "--demo", "--cache", "ftp://somewhere"]) == 2
    assert "--cache ftp://somewhere" in capsys.readouterr().err
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00video")
    assert main(["batch", str(tmp_path / "bin.csv"), "--out-dir", out, "--demo"]) == 2
    assert "not a UTF-8 text CSV" in capsys.readouterr().err
