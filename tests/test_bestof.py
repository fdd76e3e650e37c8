"""Best-of-N (pipeline/bestof.py, `generate --best-of`): one batch of variations, scored with the
run's own sync features, ranked, and only the best written; on the demo model."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from foleyserve import media
from foleyserve.cli import main
from foleyserve.commands.score import read_audio
from foleyserve.pipeline.bestof import best_of
from foleyserve.pipeline.demo import demo_scorers, sample_clip_path
from foleyserve.pipeline.pipeline import Engine
from foleyserve.pipeline.requests import GenerationRequest, RequestError
from foleyserve.scoring import parse_measures, score_candidates, usable_measures

PROMPT = "footsteps on gravel"
FAST = ["--demo", "--steps", "2", "--precision", "fp32"]


def _make_clip(path: Path, seconds: float, fps: int = 25) -> Path:
    """A small moving-stripes clip, long enough for DeSync's 4.8 s windows when asked."""
    h, w = 32, 48
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "18", "preset": "ultrafast"}
        for i in range(int(round(seconds * fps))):
            img = 120 + 60 * np.sin((xx + 3 * i) / 6.0)[..., None] + 40 * np.cos((yy - 2 * i) / 5.0)[..., None]
            frame = av.VideoFrame.from_ndarray(np.repeat(np.clip(img, 0, 255).astype(np.uint8), 3, axis=2), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for pkt in s.encode(frame):
                c.mux(pkt)
        for pkt in s.encode(None):
            c.mux(pkt)
    return path


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.demo()


@pytest.fixture(scope="module")
def clip6(tmp_path_factory) -> Path:
    return _make_clip(tmp_path_factory.mktemp("bestof") / "clip6.mp4", 5.6)


def _expected_order(scores: list[dict], by: tuple[str, ...]) -> list[int]:
    """Indices best first: DeSync ascending, CLAP descending, ties in input order."""
    sign = {"desync": 1.0, "clap": -1.0}
    return sorted(range(len(scores)), key=lambda i: tuple(sign[k] * scores[i][k] for k in by))


def test_best_of_keeps_the_best_by_desync_then_clap(engine: Engine, clip6: Path, tmp_path: Path, monkeypatch) -> None:
    import foleyserve.pipeline.features as features

    def no_second_visual_pass(*_a, **_k):
        raise AssertionError("scoring ran the Synchformer visual branch again")

    out = tmp_path / "best.wav"
    request = GenerationRequest(video=clip6, prompt=PROMPT, steps=2, seed=10, output=out)
    # The engine bound its own sync_features at import; only the scorer's lazy path sees this.
    monkeypatch.setattr(features, "sync_features", no_second_visual_pass)
    result, cands = best_of(engine, request, 3, rank="desync,clap", keep_all=True)
    monkeypatch.undo()

    assert [c["seed"] for c in cands] == [10, 11, 12] and result.candidates == cands
    assert result.ranked_by == ["desync", "clap"] and "score" in result.timings
    assert all(c["desync"] is not None and len(c["offsets_sec"]) == 2 for c in cands)
    assert sorted(c["rank"] for c in cands) == [0, 1, 2] and sum(c["kept"] for c in cands) == 1

    # Independently: score the written candidates from the video's frames (the scorer's own
    # visual pass, with freshly built scorers) and rank by the stated measures.
    files = [Path(c["file"]) for c in cands]
    assert [f.name for f in files] == ["best_seed10.wav", "best_seed11.wav", "best_seed12.wav"]
    frames = media.decode_frames(clip6, fps_list=(25,))[25]
    waves = [read_audio(f) for f in files]
    again = score_candidates(demo_scorers(engine.components), frames, waves, PROMPT)
    for c, s in zip(cands, again):
        assert c["desync"] == pytest.approx(s["desync"]) and c["offsets_sec"] == pytest.approx(s["offsets_sec"])
        assert c["clap"] == pytest.approx(s["clap"], abs=1e-4)
    order = _expected_order(again, ("desync", "clap"))
    assert [cands[i]["rank"] for i in order] == [0, 1, 2]
    winner = cands[order[0]]
    assert winner["kept"] and result.seed == winner["seed"]
    # What is written at --out is the winner's audio.
    assert np.array_equal(read_audio(out), read_audio(Path(winner["file"])))
    assert result.files == [out]


def test_best_of_short_clip_ranks_by_clap_and_writes_only_the_best(engine: Engine, tmp_path: Path) -> None:
    out = tmp_path / "short.wav"
    request = GenerationRequest(video=sample_clip_path(), prompt=PROMPT, steps=2, output=out)  # 3.96 s < 4.8 s
    result, cands = best_of(engine, request, 3, rank=("desync",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.wav"]
    assert all(c["desync"] is None and c["offsets_sec"] is None and c["file"] is None for c in cands)
    assert result.ranked_by == ["clap"]
    assert any("ranked by clap alone" in w and "4.8 s" in w for w in result.warnings)
    best = max(cands, key=lambda c: c["clap"])
    assert best["kept"] and best["rank"] == 0 and result.seed == best["seed"]
    waves = [read_audio(out)]
    (again,) = score_candidates(demo_scorers(engine.components), None, waves, PROMPT)
    assert again["clap"] == pytest.approx(best["clap"], abs=1e-4)


def test_best_of_refusals_and_scorer_cache(engine: Engine, monkeypatch) -> None:
    import foleyserve.pipeline.demo as demo
    from foleyserve.pipeline import bestof

    request = GenerationRequest(video=sample_clip_path(), prompt=PROMPT, steps=2)
    with pytest.raises(RequestError, match="rank by"):
        best_of(engine, request, 2, rank="loudness")
    with pytest.raises(RequestError, match="1 to 16"):
        best_of(engine, request, 0)
    loaded = bestof.engine_scorers(engine)
    assert engine.scorers is loaded and bestof.engine_scorers(engine) is loaded

    def no_reload(*_a, **_k):
        raise AssertionError("the scorers loaded twice")

    monkeypatch.setattr(demo, "demo_scorers", no_reload)
    result, _ = best_of(engine, request, 1, rank="clap")
    assert "scorers" not in result.timings  # only the first best-of of an engine loads them


def test_rank_results_for_text_to_audio_is_json_and_clap_only(engine: Engine) -> None:
    import json

    from foleyserve.pipeline.bestof import rank_results
    from foleyserve.pipeline.variations import generate_variations

    request = GenerationRequest(video=None, prompt=PROMPT, steps=2, duration=1.0)
    results = generate_variations(engine, request, [3, 8])
    ranking = rank_results(engine, results, prompt=PROMPT, sync_feat=None)
    payload = json.loads(json.dumps(ranking.as_dict()))
    assert payload["ranked_by"] == ["clap"] and payload["asked"] == ["desync", "clap"]
    assert [c["seed"] for c in payload["candidates"]] == [3, 8]
    assert payload["best_seed"] == max(payload["candidates"], key=lambda c: c["clap"])["seed"]
    assert any("text to audio" in n for n in payload["notes"])


def test_measures_parse_and_fall_back() -> None:
    assert parse_measures("desync,clap") == ("desync", "clap") and parse_measures(" CLAP ") == ("clap",)
    for bad in ("", "desync,desync", "sync"):
        with pytest.raises(ValueError):
            parse_measures(bad)
    none = [{"desync": None, "clap": 0.1}, {"desync": None, "clap": 0.2}]
    assert usable_measures(none, ("desync",)) == ("clap",)
    assert usable_measures(none, ("desync", "clap")) == ("clap",)
    assert usable_measures([{"desync": 0.2, "clap": 0.1}], ("desync", "clap")) == ("desync", "clap")


def test_cli_best_of_prints_the_table_and_writes_the_best(clip6: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.wav"
    assert main(["generate", str(clip6), "--best-of", "3", "--rank", "desync,clap", "--seed", "4", "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "best of 3, ranked by desync, then clap" in text
    rows = [line for line in text.splitlines() if line.strip().split(" ")[0] in ("4", "5", "6")]
    assert len(rows) == 3 and sum("<- kept" in r for r in rows) == 1
    assert all("n/a" not in r for r in rows)  # 5.6 s: DeSync exists
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.wav"]
    assert f"wrote {out}" in text


def test_cli_best_of_flag_refusals(clip6: Path, tmp_path: Path, capsys) -> None:
    clip = str(clip6)
    assert main(["generate", clip, "--rank", "clap", *FAST]) == 2
    assert "goes with --best-of" in capsys.readouterr().err
    assert main(["generate", clip, "--best-of", "2", "--rank", "desync,sync", *FAST]) == 2
    assert "--rank" in capsys.readouterr().err
    assert main(["generate", clip, "--best-of", "2", "--num-samples", "2", *FAST]) == 2
    assert "do not combine" in capsys.readouterr().err
