"""Beyond the official model (issue 14) on the demo model: what each new feature costs.

* ``longform``: a 40 s clip with two scene cuts, full-length audio in windows (stages, peak RSS);
* ``bestof``: best-of-4 on a 6 s clip (one batch of variations, scored with DeSync and CLAP);
* ``variations``: N samples as one batch vs N single runs (seconds, and the largest difference);
* ``text``: text to audio, 5 s;
* ``loudness``: how close the written file is to the -23 LUFS target, and its true peak.

    python bench/beyond.py --out bench/results/beyond_demo_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from foleyserve import Engine, GenerationRequest, media  # noqa: E402
from foleyserve import loudness  # noqa: E402

STEPS = 25


def clip(path: Path, seconds: float, cuts: tuple[float, ...] = (), size: tuple[int, int] = (96, 64)) -> Path:
    """A small synthetic clip: a moving bar whose colours change at each cut."""
    w, h = size
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(round(seconds * 25)):
            shot = sum(i / 25 >= c for c in cuts)
            img = np.full((h, w, 3), (40 + 70 * shot) % 256, np.uint8)
            x = (i * 3) % w
            img[:, x : x + 8] = (255 - 60 * shot) % 256
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return path


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def longform(engine: Engine, tmp: Path) -> dict:
    video = clip(tmp / "long.mp4", 40.0, cuts=(13.0, 27.5))
    t0 = time.perf_counter()
    result = engine.generate(GenerationRequest(video=video, prompt="footsteps", steps=STEPS, output=tmp / "long.wav"))
    return {
        "video_seconds": 40.0, "audio_seconds": round(float(result.audio_seconds), 3), "steps": STEPS,
        "seconds": round(time.perf_counter() - t0, 1), "stages": {k: round(float(v), 2) for k, v in result.timings.items()},
        "peak_rss_mib": round(peak_mib()),
    }


def bestof(engine: Engine, tmp: Path) -> dict:
    from foleyserve.pipeline.bestof import best_of

    video = clip(tmp / "six.mp4", 6.0)
    t0 = time.perf_counter()
    best, candidates = best_of(engine, GenerationRequest(video=video, prompt="rain", steps=STEPS, output=tmp / "best.wav"), 4)
    return {
        "n": 4, "clip_seconds": 6.0, "seconds": round(time.perf_counter() - t0, 1),
        "stages": {k: round(float(v), 2) for k, v in best.timings.items()},
        "candidates": [{k: c.get(k) for k in ("seed", "desync", "clap", "rank", "kept")} for c in candidates],
    }


def variations(engine: Engine, tmp: Path, n: int = 4) -> dict:
    from foleyserve.pipeline.variations import generate_variations

    video = clip(tmp / "var.mp4", 4.0)
    request = GenerationRequest(video=video, prompt="wind", steps=STEPS)
    t0 = time.perf_counter()
    batched = generate_variations(engine, request, list(range(n)))
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [engine.generate(GenerationRequest(video=video, prompt="wind", steps=STEPS, seed=s)) for s in range(n)]
    t_single = time.perf_counter() - t0
    diff = max(float((torch.as_tensor(b.waveform) - torch.as_tensor(s.waveform)).abs().max()) for b, s in zip(batched, single))
    return {"n": n, "batched_seconds": round(t_batch, 1), "single_runs_seconds": round(t_single, 1),
            "ratio": round(t_single / t_batch, 2), "max_abs_difference": diff}


def text(engine: Engine, tmp: Path) -> dict:
    t0 = time.perf_counter()
    result = engine.generate(GenerationRequest(video=None, duration=5.0, prompt="thunder", steps=STEPS, output=tmp / "t.wav"))
    return {"duration": 5.0, "audio_seconds": round(float(result.audio_seconds), 3), "seconds": round(time.perf_counter() - t0, 1)}


def loudness_check(engine: Engine, tmp: Path) -> dict:
    video = clip(tmp / "loud.mp4", 6.0)
    out = tmp / "loud.wav"
    engine.generate(GenerationRequest(video=video, prompt="glass", steps=STEPS, output=out))
    import av as _av

    with _av.open(str(out)) as c:
        samples = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1).astype(np.float64)
    if samples.dtype.kind == "i" or np.abs(samples).max() > 1.5:
        samples = samples / 32768.0
    return {"target_lufs": -23.0, "measured_lufs": round(loudness.measure(samples, 48000), 3),
            "true_peak_dbtp": round(float(loudness.true_peak(samples, 48000)), 2)}


PHASES = {"longform": longform, "bestof": bestof, "variations": variations, "text": text, "loudness": loudness_check}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    engine = Engine.demo()
    result: dict = {"date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads(), "engine": "demo (fp32, cpu)"}
    with tempfile.TemporaryDirectory() as d:
        for name in args.phases.split(","):
            try:
                result[name] = PHASES[name](engine, Path(d))
            except Exception as e:  # report what failed, keep measuring the rest
                result[name] = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps({name: result[name]}), flush=True)
            if args.out:
                args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
