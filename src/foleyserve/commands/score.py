"""``foleyserve score VIDEO AUDIO --prompt ...``: DeSync and CLAP score of a soundtrack for a video.

DeSync (seconds, lower is better) comes from Synchformer's audio branch and sync head, the way
HunyuanVideo-Foley's evaluation computes it; the CLAP score (cosine, higher is better) from CLAP's
audio and text towers. See :mod:`foleyserve.scoring`. AUDIO is any file with an audio track (the
.flac/.wav/.mp4 that ``generate`` writes); it is scored over the video's 25 fps span.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RATE = 48000


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``score`` on the CLI's subparsers."""
    p = sub.add_parser(
        "score",
        help="DeSync and CLAP score of an audio track for a video",
        description="Score AUDIO as the soundtrack of VIDEO: Synchformer DeSync (s, lower is better) and CLAP audio-text cosine (higher is better).",
    )
    p.add_argument("video", type=Path, help="the video (its frames are sampled at 25 fps)")
    p.add_argument("audio", type=Path, help="a file with the audio to score (wav, flac, mp4, ...)")
    p.add_argument("--prompt", required=True, help="the text the CLAP score compares against")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", type=Path, help="the official weights folder (synchformer_state_dict + larger_clap_general)")
    src.add_argument("--demo", action="store_true", help="tiny random-weight scorers (scores are noise; for trying the command)")
    p.add_argument("--clap-dir", type=Path, help="laion/larger_clap_general folder, if not inside --model-dir")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    p.set_defaults(run=run)


def read_audio(path: Path, rate: int = RATE) -> np.ndarray:
    """The first audio track of ``path`` as float32 mono at ``rate`` (channels averaged)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio track")
        resampler = av.AudioResampler(format="fltp", rate=rate)
        chunks = []
        for frame in container.decode(container.streams.audio[0]):
            chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray() for f in resampler.resample(None))
    if not chunks:
        raise ValueError(f"{path}: the audio track holds no samples")
    return np.concatenate(chunks, axis=1).mean(0).astype(np.float32)


def _load(args: argparse.Namespace) -> Any:
    import torch

    if args.demo:
        from foleyserve.pipeline.demo import demo_scorers

        return demo_scorers(device=torch.device(args.device))
    from foleyserve.scoring import load_scorers

    return load_scorers(args.model_dir, device=args.device, clap_dir=args.clap_dir)


def run(args: argparse.Namespace) -> int:
    """Decode, load, score, print; problems with the inputs are usage errors (exit 2)."""
    from foleyserve import media
    from foleyserve.cli import UsageError, check_input_file
    from foleyserve.pipeline.model_dir import ModelFolderError

    check_input_file(args.video, "video")
    check_input_file(args.audio, "audio")
    t0 = time.perf_counter()
    try:
        frames = media.decode_frames(args.video, fps_list=(media.SYNC_FPS,))[media.SYNC_FPS]
        audio = read_audio(args.audio)
    except (media.MediaError, ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    # Score the span the frames cover: generated audio is exactly that long; a longer file's tail
    # would shift the last DeSync window off the video's.
    audio = audio[: int(round(len(frames) / media.SYNC_FPS * RATE))]
    t_decode = time.perf_counter() - t0
    try:
        scorers = _load(args)
    except (ModelFolderError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    t_load = time.perf_counter() - t0 - t_decode

    from foleyserve.scoring import clap_audio_text_score, desync_score

    t1 = time.perf_counter()
    (sync,) = desync_score(scorers, frames, audio, sample_rate=RATE)
    t_desync = time.perf_counter() - t1
    (clap,) = clap_audio_text_score(scorers, audio, args.prompt, sample_rate=RATE)
    t_clap = time.perf_counter() - t1 - t_desync
    out = {
        "video": str(args.video),
        "audio": str(args.audio),
        "prompt": args.prompt,
        "desync_sec": sync["desync"],
        "offsets_sec": sync["offsets_sec"],
        "clap": clap,
        "seconds": round(len(audio) / RATE, 3),
        "demo": bool(scorers.is_demo),
        "timings_sec": {k: round(v, 3) for k, v in (("decode", t_decode), ("load", t_load), ("desync", t_desync), ("clap", t_clap))},
    }
    if args.json:
        print(json.dumps(out))
        return 0
    if sync["desync"] is None:
        print("DeSync: n/a (needs at least 4.8 s of video and audio)")
    else:
        first, last = sync["offsets_sec"]
        print(f"DeSync: {sync['desync']:.2f} s (offset of the first / last 4.8 s: {first:+.2f} / {last:+.2f} s)")
    print(f"CLAP:   {clap:.4f}")
    if scorers.is_demo:
        print("(demo scorers: random weights, the scores are noise)", file=sys.stderr)
    return 0
