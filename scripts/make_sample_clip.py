"""Synthesize ``src/foleyserve/assets/sample.mp4``: a rubber ball dropped onto a wooden floor, bouncing to rest.

Four seconds, 25 fps, 320x240, H.264 (yuv420p) in MP4, written with PyAV only. The scene is built
so that Foley has something obvious to do: every floor impact happens at a known time (printed,
and listed by ``impact_times()``), the bounces get shorter and softer, and the ball then rolls.

The clip is deterministic for a given FFmpeg build: pure numpy rendering, fixed x264 settings and a
single encoder thread (x264's output depends on its thread count, which would otherwise follow the
machine's core count).

    python scripts/make_sample_clip.py [--out src/foleyserve/assets/sample.mp4]
"""

from __future__ import annotations

import argparse
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

WIDTH, HEIGHT = 320, 240
FPS = 25
SECONDS = 4.0
FLOOR_Y = 196  # first floor row, in pixels
RADIUS = 16.0
GRAVITY = 1400.0  # px/s^2: a bit stronger than "real" so the bounces fit in the clip
RESTITUTION = 0.68
DROP_Y = 34.0  # ball centre at t = 0
X0, VX0, ROLL_DRAG = 52.0, 95.0, 0.35  # horizontal start, speed (px/s), exponential slow-down per second


def _bounce_schedule(max_bounces: int = 12) -> list[tuple[float, float]]:
    """(impact time, upward speed right after it) for each floor contact."""
    rest_y = FLOOR_Y - RADIUS
    t = math.sqrt(2.0 * (rest_y - DROP_Y) / GRAVITY)
    v = GRAVITY * t
    out = []
    for _ in range(max_bounces):
        v *= RESTITUTION
        out.append((t, v))
        if v < 40.0:  # below this the hops are sub-pixel: treat the ball as resting
            break
        t += 2.0 * v / GRAVITY
    return out


def impact_times() -> list[float]:
    """Seconds at which the ball hits the floor (the moments a Foley track should click)."""
    return [t for t, _ in _bounce_schedule()]


def ball_state(t: float) -> tuple[float, float]:
    """Ball centre (x, y) in pixels at time t."""
    rest_y = FLOOR_Y - RADIUS
    x = X0 + VX0 * (1.0 - math.exp(-ROLL_DRAG * t)) / ROLL_DRAG
    sched = _bounce_schedule()
    if t < sched[0][0]:
        return x, DROP_Y + 0.5 * GRAVITY * t * t
    for i, (t0, v) in enumerate(sched):
        t1 = sched[i + 1][0] if i + 1 < len(sched) else math.inf
        if t < t1:
            if t1 == math.inf:  # the last hop is sub-pixel: the ball just rolls on the floor
                return x, rest_y
            dt = t - t0
            return x, rest_y - (v * dt - 0.5 * GRAVITY * dt * dt)
    return x, rest_y


def _background() -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    img = np.empty((HEIGHT, WIDTH, 3), np.float32)
    # Wall: soft vertical gradient.
    wall = 1.0 - yy / FLOOR_Y * 0.25
    img[..., 0] = 200 * wall
    img[..., 1] = 205 * wall
    img[..., 2] = 215 * wall
    # Floor: warm planks with seams, so the surface reads as "wood".
    floor = yy >= FLOOR_Y
    plank = ((xx + 0.35 * (yy - FLOOR_Y) * (xx - WIDTH / 2) / WIDTH) // 48) % 2
    grain = 6.0 * np.sin(xx * 0.21 + 3.0 * np.sin(yy * 0.5))
    shade = 1.0 - 0.25 * (yy - FLOOR_Y) / (HEIGHT - FLOOR_Y)
    for c, base in enumerate((150.0, 100.0, 60.0)):
        img[..., c] = np.where(floor, (base + 12.0 * plank + grain) * shade, img[..., c])
    img[FLOOR_Y : FLOOR_Y + 2] *= 0.6  # skirting line where wall meets floor
    return img


def render(t: float, bg: np.ndarray) -> np.ndarray:
    cx, cy = ball_state(t)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    img = bg.copy()
    # Contact shadow: darker and tighter as the ball gets closer to the floor.
    height = (FLOOR_Y - RADIUS) - cy
    sx, sy = RADIUS * (1.0 + height / 120.0), 4.0 + height / 60.0
    d = ((xx - cx) / sx) ** 2 + ((yy - (FLOOR_Y + 3)) / sy) ** 2
    strength = 0.45 / (1.0 + height / 60.0)
    img *= 1.0 - strength * np.clip(1.0 - d, 0.0, 1.0)[..., None]
    # Ball: anti-aliased disk with simple diffuse shading and a highlight.
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    cover = np.clip(RADIUS + 0.5 - r, 0.0, 1.0)[..., None]
    nx, ny = (xx - cx) / RADIUS, (yy - cy) / RADIUS
    lambert = np.clip(0.55 - 0.45 * nx - 0.55 * ny, 0.15, 1.0)
    spec = np.exp(-(((nx + 0.35) ** 2 + (ny + 0.4) ** 2) / 0.03))
    ball = np.stack([215 * lambert + 60 * spec, 40 * lambert + 60 * spec, 35 * lambert + 60 * spec], -1)
    img = img * (1.0 - cover) + ball * cover
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_clip(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    bg = _background()
    n = int(round(SECONDS * FPS))
    with av.open(str(out), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS, 1))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "23", "preset": "medium", "threads": "1"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(render(i / FPS, bg), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src" / "foleyserve" / "assets" / "sample.mp4")
    args = ap.parse_args()
    write_clip(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {SECONDS:g} s, {FPS} fps, {WIDTH}x{HEIGHT})")
    print("floor impacts at (s):", ", ".join(f"{t:.3f}" for t in impact_times()))


if __name__ == "__main__":
    main()
