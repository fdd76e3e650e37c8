"""Decoding a long high-resolution clip holds preprocessed frames, not the clip's full-resolution ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

# What a 16 s 1080p clip may add to the decoding process's peak RSS: the stored frames are 121 x
# 512x512x3 + 376 x 224x224x3 = 152 MB; full-resolution frames would be 497 x 6.2 MB = 3.1 GB.
PEAK_BOUND_MB = 600

_MEASURE = """
import json, resource, sys
import psutil
from foleyserve import media
media.decode_frames(sys.argv[1], max_seconds=0.2)  # warm up: codec and torch kernels loaded, weights cached
# The lifetime peak so far, not the current RSS: pages the kernel reclaims from an idle process
# (a busy CI box) would come back during the decode and read as growth.
before = max(psutil.Process().memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
decoded = media.decode_frames(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "n8": len(decoded[8]), "n25": len(decoded[25]),
                  "shapes": [list(decoded[8].shape), list(decoded[25].shape)]}))
"""


def _long_1080p_clip(path: Path, seconds: int = 16) -> Path:
    # A moving gradient, coded at a low bitrate: small on disk, full-size once decoded.
    yy, xx = np.mgrid[0:1080, 0:1920]
    base = ((xx + yy) % 256).astype(np.uint8)
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=25)
        v.width, v.height, v.pix_fmt = 1920, 1080, "yuv420p"
        v.options = {"preset": "ultrafast", "crf": "40"}
        for i in range(seconds * 25):
            img = np.repeat(np.roll(base, 8 * i, axis=1)[..., None], 3, axis=2)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            for p in v.encode(f):
                out.mux(p)
        for p in v.encode(None):
            out.mux(p)
    return path


def test_peak_memory_of_a_16s_1080p_clip_is_bounded(tmp_path):
    pytest.importorskip("psutil")
    clip = _long_1080p_clip(tmp_path / "long.mp4")
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(clip)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    m = json.loads(run.stdout.strip().splitlines()[-1])
    assert (m["n8"], m["n25"]) == (121, 376)  # 15 s are used
    assert m["shapes"] == [[121, 512, 512, 3], [376, 224, 224, 3]]
    grown_mb = (m["peak"] - m["before"]) / 2**20
    print(f"decode + preprocess of 16 s 1080p: peak RSS {grown_mb:.0f} MB over the pre-decode RSS")
    assert grown_mb < PEAK_BOUND_MB
