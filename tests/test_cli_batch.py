"""`foleyserve batch`: a CSV through the batcher, failures per row, resuming, usage errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from foleyserve.cli import main
from foleyserve.pipeline.demo import sample_clip_path


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Path:
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(sample_clip_path(), clips / "ball.mp4")
    (clips / "broken.mp4").write_bytes(b"not a video, just text")
    # Relative paths resolve against the CSV's folder; a prompt with a comma is quoted.
    (tmp_path / "jobs.csv").write_text(
        "video,prompt,seed,steps\n"
        "clips/ball.mp4,a ball bouncing,1,2\n"
        "clips/broken.mp4,glass breaking,2,2\n"
        'clips/ball.mp4,"rain, then thunder",3,2\n'
    )
    return tmp_path


def _run(jobs_dir: Path, *extra: str) -> int:
    return main(["batch", str(jobs_dir / "jobs.csv"), "--out-dir", str(jobs_dir / "out"), "--demo", "--format", "wav", *extra])


def test_batch_writes_good_rows_fails_bad_ones_and_resumes(jobs_dir, capsys, monkeypatch):
    assert _run(jobs_dir) == 1
    out = capsys.readouterr()
    written = sorted(p.name for p in (jobs_dir / "out").iterdir())
    assert written == ["0000.wav", "0002.wav"]  # no partial files left behind
    assert "row 1: failed" in out.err and "broken.mp4" in out.err
    assert "2 generated, 0 already done, 1 failed, of 3 rows" in out.out
    first = {name: (jobs_dir / "out" / name).stat().st_mtime_ns for name in written}

    # A rerun redoes only the failed row; finished outputs are not touched.
    from foleyserve.runtime.batcher import Batcher

    submitted = []
    original = Batcher.submit

    def spy(self, request, **kw):
        submitted.append(request.video)
        return original(self, request, **kw)

    monkeypatch.setattr(Batcher, "submit", spy)
    assert _run(jobs_dir) == 1
    out = capsys.readouterr()
    assert "0 generated, 2 already done, 1 failed, of 3 rows" in out.out
    assert [Path(v).name for v in submitted] == ["broken.mp4"]
    assert {name: (jobs_dir / "out" / name).stat().st_mtime_ns for name in written} == first


def test_batch_outputs_are_complete_audio(jobs_dir, capsys):
    (jobs_dir / "jobs.csv").write_text("video,prompt,seed,steps,guidance\nclips/ball.mp4,rain,5,2,3.0\n")
    assert _run(jobs_dir, "--max-batch-size", "2") == 0
    with av.open(str(jobs_dir / "out" / "0000.wav")) as f:
        rate = f.streams.audio[0].sample_rate
        audio = np.concatenate([frame.to_ndarray() for frame in f.decode(audio=0)], axis=-1)
    assert rate == 48000 and audio.shape[-1] == 198 * 960  # 3.96 s: the whole sample clip
    assert np.abs(audio).max() > 0
    assert "1 generated, 0 already done, 0 failed, of 1 rows" in capsys.readouterr().out


def test_bad_row_values_fail_that_row_before_any_model_loads(jobs_dir, capsys, monkeypatch):
    import foleyserve.commands.batch as batch_command

    def no_engine(_args):
        raise AssertionError("no row can run, so no model should load")

    monkeypatch.setattr(batch_command, "_engine_from_args", no_engine)
    (jobs_dir / "jobs.csv").write_text("video,prompt,seed\nclips/ball.mp4,rain,abc\n,empty video,1\nclips/nope.mp4,x,1\n")
    assert _run(jobs_dir) == 1
    err = capsys.readouterr().err
    assert "row 0: failed: seed 'abc' is not an integer" in err
    assert "row 1: failed: the 'video' column is empty" in err
    assert "row 2: failed: video" in err and "nope.mp4 does not exist" in err


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
    capsys.readouterr()


def test_unknown_cache_url_is_a_usage_error(jobs_dir, capsys):
    pytest.importorskip("foleyserve.runtime.cache", reason="foleyserve.runtime.cache has not landed yet")
    assert _run(jobs_dir, "--cache", "ftp://somewhere") == 2
    assert "--cache ftp://somewhere" in capsys.readouterr().err
