"""A job's result files: which it has, what they are called, and how clients reach them.

A one-sample job keeps ``{id}.{fmt}`` (and ``{id}.wav`` beside an mp4). A job of several samples
(``num_samples``) keeps ``{id}_seed{S}.{fmt}`` per seed (the engine's variation naming) and records
them in ``JobRecord.files`` as ``audio@S`` / ``video@S``, with ``audio`` / ``video`` naming the first
sample's files, so retention, deletion and the checksums cover every sample without knowing about
samples, and clients that only read ``audio_url`` get the first one.

A ``best_of`` job is a job of several samples that the batcher also ranked: ``audio`` / ``video``
name the kept candidate's files instead of the first's, and ``JobRecord.ranking`` keeps the scores
(:func:`candidate_list` turns them into the body's ``candidates``).
"""

from __future__ import annotations

from typing import Any

from foleyserve import media
from foleyserve.server.jobs import JobRecord, JobStore


def seeds_of(params: dict[str, Any]) -> list[int] | None:
    """The seeds of a multi-sample job (seed, seed + 1, ...), or None for one sample."""
    n = int(params.get("num_samples") or 1)
    return [int(params["seed"]) + k for k in range(n)] if n > 1 else None


def rank_of(params: dict[str, Any]) -> tuple[str, ...] | None:
    """The measures a best_of job ranks by (``params["rank"]``, checked at submission), or None."""
    return tuple(params["rank"].split(",")) if params.get("best_of") and params.get("rank") else None


def write_files(store: JobStore, job: Any, rec: JobRecord) -> dict[str, str]:
    """Check the batcher wrote each sample's file and add the audio-only wav beside an mp4.
    Returns ``JobRecord.files``."""
    fmt = rec.params["output"]
    results = job.results if getattr(job, "results", None) else None
    if results is None:
        return _keep_one(store, job.result, f"{rec.id}", fmt, suffix="")
    files: dict[str, str] = {}
    ranking = getattr(job, "ranking", None)
    kept = ranking["best"] if ranking else 0
    for i, result in enumerate(results):
        one = _keep_one(store, result, f"{rec.id}_seed{result.seed}", fmt, suffix=f"@{result.seed}")
        files.update(one)
        if i == kept:
            files.update({k.split("@")[0]: v for k, v in one.items()})
    return files


def _keep_one(store: JobStore, result: Any, stem: str, fmt: str, *, suffix: str) -> dict[str, str]:
    if result is None:
        raise RuntimeError("the batcher reported success without a result")
    main = store.result_path(f"{stem}.{fmt}")
    if not main.is_file():
        raise FileNotFoundError(f"the batcher did not write {main.name}")
    files = {("video" if fmt == "mp4" else "audio") + suffix: main.name}
    if fmt == "mp4":
        # Players and the web page want the audio on its own; writing it now costs a few ms
        # and spares the download route from demuxing AAC.
        wav = store.result_path(f"{stem}.wav")
        # The Foley at the job's loudness, like the mp4 (without a kept original's mix).
        audio = result.output_waveform if result.output_waveform is not None else result.waveform
        media.write_audio(wav, audio, result.sample_rate)
        files["audio" + suffix] = wav.name
    return files


def file_key(rec: JobRecord, kind: str, seed: int | None) -> str | None:
    """The ``files`` key a download of ``kind`` (audio/video) and ``seed`` reads; None: no such sample."""
    if seed is None:
        return kind
    if seeds_of(rec.params) is not None:
        return f"{kind}@{seed}"
    return kind if seed == int(rec.params["seed"]) else None


def sample_list(rec: JobRecord, base: str, ok: bool) -> list[dict[str, Any]]:
    """The body's ``results``: one entry per sample with its download links (empty until done)."""
    if not ok:
        return []
    seeds = seeds_of(rec.params)
    if seeds is None:
        return [{
            "seed": rec.params["seed"],
            "audio_url": f"{base}/audio" if "audio" in rec.files else None,
            "video_url": f"{base}/video" if "video" in rec.files else None,
        }]
    return [{
        "seed": s,
        "audio_url": f"{base}/audio?seed={s}" if f"audio@{s}" in rec.files else None,
        "video_url": f"{base}/video?seed={s}" if f"video@{s}" in rec.files else None,
    } for s in seeds]


def candidate_list(rec: JobRecord, base: str, ok: bool) -> list[dict[str, Any]]:
    """The body's ``candidates`` of a best_of job, best first, with ``rank`` from 1 (the kept one)
    and each one's audio link (null once the files are gone); empty for other jobs."""
    ranking = rec.ranking or {}
    out = []
    for c in sorted(ranking.get("candidates", ()), key=lambda c: c["rank"]):
        s = int(c["seed"])
        out.append({
            "seed": s, "desync": c["desync"], "offsets_sec": c["offsets_sec"], "clap": c["clap"],
            "rank": int(c["rank"]) + 1, "kept": c["index"] == ranking["best"],
            "audio_url": f"{base}/audio?seed={s}" if ok and f"audio@{s}" in rec.files else None,
        })
    return out
