"""Scores for generated Foley: DeSync (Synchformer) and CLAP audio-text similarity, and best-of-N.

* **DeSync** (seconds, lower is better): the metric HunyuanVideo-Foley reports, as MMAudio's
  av-benchmark computes it. Visual tokens of 16-frame segments (stride 8, 25 fps) and audio tokens
  of 0.64 s segments (stride 0.32 s, 16 kHz) go through Synchformer's sync head twice: on the
  first 14 segments of each stream and on the last 14 (4.8 s each). Each call's arg-max over 21
  classes is an offset on the grid -2 s .. +2 s (0.2 s steps); DeSync is the mean of the two
  absolute offsets. A clip shorter than 4.8 s (fewer than 14 segments) has no DeSync (None).
* **CLAP** (cosine, higher is better): CLAP's projected audio embedding of the 48 kHz waveform
  against its projected text embedding of the prompt. Audio longer than the feature extractor's
  10 s is scored as the mean of the (normalised) embeddings of its first and last 10 s, instead
  of the extractor's random crop, so a score never depends on a random draw.

:func:`score_candidates` scores N waveforms generated for one video (its visual features computed
once, or passed in from the generation run) and :func:`rank` picks the best.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from foleyserve.models.sync_scorer import (
    SAMPLE_RATE as SYNC_RATE,
    SyncMelFrontEnd,
    SyncScorer,
    offset_grid,
    resample,
)

__all__ = [
    "Scorers", "as_scorers", "clap_audio_text_score", "desync_from_features", "desync_score", "parse_measures", "rank",
    "score_candidates", "usable_measures",
]

FOLEY_RATE = 48000
SYNC_FRAMES_PER_SEGMENT = 8  # visual tokens per 16-frame segment


@dataclass
class Scorers:
    """The networks scoring needs. ``sync_visual`` is the Foley pipeline's own Synchformer visual
    branch (share the engine's); ``tokenizer``/``clap_text`` likewise are its CLAP text side."""

    sync_visual: torch.nn.Module
    sync_scorer: SyncScorer
    clap_text: torch.nn.Module
    tokenizer: Any
    clap_audio: torch.nn.Module
    clap_features: Any  # transformers.ClapFeatureExtractor
    device: torch.device = torch.device("cpu")
    is_demo: bool = False


def as_scorers(obj: Any) -> Scorers:
    """A :class:`Scorers`, or anything carrying one as ``.scorers`` (e.g. an engine given one)."""
    if isinstance(obj, Scorers):
        return obj
    found = getattr(obj, "scorers", None)
    if isinstance(found, Scorers):
        return found
    raise TypeError(
        f"{type(obj).__name__} holds no scorers: build them with foleyserve.scoring.load_scorers(model_dir, components=...) "
        "or foleyserve.pipeline.demo.demo_scorers(...) and pass them (or set them as its .scorers)"
    )


def _as_batch(waveforms: Any) -> torch.Tensor:
    """[N, n] float32 mono. A 1-D array is one waveform, a 2-D one is N mono waveforms [N, n], a
    3-D one is [N, C, n]; a list holds [n] or [C, n] items. Channels are averaged, as the
    official scorer does; lengths are cut to the shortest."""
    if isinstance(waveforms, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(waveforms, dtype=torch.float32)
        items = [t] if t.ndim == 1 else list(t)
    else:
        items = [torch.as_tensor(w, dtype=torch.float32) for w in waveforms]
    if not items:
        raise ValueError("no waveforms to score")
    out = []
    for t in items:
        t = t.mean(0) if t.ndim == 2 else t
        if t.ndim != 1:
            raise ValueError(f"a waveform must be [samples] or [channels, samples], got shape {tuple(t.shape)}")
        out.append(t)
    n = min(t.shape[0] for t in out)
    return torch.stack([t[:n] for t in out])


def _segment_view(sync_feat: torch.Tensor) -> torch.Tensor:
    """Engine sync features [1, 8*S, D] (or [S, 8, D], [1, S, 8, D]) -> [1, S, 8, D]."""
    f = sync_feat.float()
    if f.ndim == 3 and f.shape[1] % SYNC_FRAMES_PER_SEGMENT == 0 and f.shape[0] == 1:
        return f.view(1, -1, SYNC_FRAMES_PER_SEGMENT, f.shape[-1])
    if f.ndim == 3 and f.shape[1] == SYNC_FRAMES_PER_SEGMENT:
        return f.unsqueeze(0)
    if f.ndim == 4 and f.shape[0] == 1:
        return f
    raise ValueError(f"sync features must be [1, 8*S, D], [S, 8, D] or [1, S, 8, D], got {tuple(f.shape)}")


@torch.no_grad()
def desync_from_features(scorer: SyncScorer, vfeat: torch.Tensor, afeat: torch.Tensor) -> dict[str, Any]:
    """Offset logits and DeSync from segment tokens: vfeat [B, Sv, 8, D], afeat [B, Sa, 6, D].

    Returns ``logits`` [B, 2, 21] (first and last 14-segment windows), ``offsets_sec`` [B, 2] and
    ``desync`` [B] (float64), or ``desync`` None when either stream has under 14 segments.
    """
    w = scorer.cfg.segments
    if min(vfeat.shape[1], afeat.shape[1]) < w:
        return {"logits": None, "offsets_sec": None, "desync": None}
    first = scorer.offset_logits(vfeat[:, :w], afeat[:, :w])
    last = scorer.offset_logits(vfeat[:, -w:], afeat[:, -w:])
    logits = torch.stack([first, last], dim=1).float()
    grid = offset_grid(scorer.cfg.classes).to(logits.device)
    offsets = grid[logits.argmax(-1)]
    # av-benchmark averages the Python floats of the float32 grid values: same here, in float64.
    desync = offsets.double().abs().mean(-1)
    return {"logits": logits.cpu(), "offsets_sec": offsets.cpu(), "desync": desync.cpu()}


@torch.no_grad()
def _visual_tokens(scorers: Scorers, frames_25fps: Any | None, sync_feat: torch.Tensor | None) -> torch.Tensor:
    if sync_feat is not None:
        return _segment_view(sync_feat).to(scorers.device)
    if frames_25fps is None:
        raise ValueError("give the video's 25 fps frames or its Synchformer features (sync_feat)")
    from foleyserve.pipeline.features import sync_features

    return _segment_view(sync_features(scorers.sync_visual, frames_25fps, device=scorers.device))


@torch.no_grad()
def desync_score(
    scorers: Scorers,
    frames_25fps: Any | None,
    waveforms: Any,
    *,
    sample_rate: int = FOLEY_RATE,
    sync_feat: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """DeSync of each waveform against one video: a list of dicts ``desync`` (float s or None),
    ``offsets_sec`` ([first, last] window offsets, s) and ``logits`` ([2, 21] tensor).

    ``frames_25fps``: uint8 [T, H, W, 3] at 25 fps (the engine's decode); or pass ``sync_feat``
    (the engine's [1, 8*S, D] visual sync features, the same numbers) and None here.
    """
    batch = _as_batch(waveforms)
    none = [{"desync": None, "offsets_sec": None, "logits": None} for _ in range(batch.shape[0])]
    wav16 = resample(batch, sample_rate, SYNC_RATE).to(scorers.device)
    # Too short for one 14-segment window: skip both branches (seconds of work on a long video).
    if SyncMelFrontEnd.num_segments(wav16.shape[-1]) < scorers.sync_scorer.cfg.segments:
        return none
    vfeat = _visual_tokens(scorers, frames_25fps, sync_feat)
    afeat = scorers.sync_scorer.audio_features(wav16)
    res = desync_from_features(scorers.sync_scorer, vfeat.expand(batch.shape[0], -1, -1, -1), afeat)
    if res["desync"] is None:
        return none
    return [
        {"desync": float(res["desync"][i]), "offsets_sec": [float(x) for x in res["offsets_sec"][i]], "logits": res["logits"][i]}
        for i in range(batch.shape[0])
    ]


def _clap_audio_embeds(scorers: Scorers, batch48: torch.Tensor) -> torch.Tensor:
    fe = scorers.clap_features
    limit = int(fe.nb_max_samples)
    n = batch48.shape[-1]
    # Deterministic views instead of the extractor's random crop of long audio.
    views = [batch48] if n <= limit else [batch48[:, :limit], batch48[:, n - limit :]]
    total = None
    for view in views:
        feats = fe([w.numpy() for w in view], sampling_rate=fe.sampling_rate, return_tensors="pt")
        feats = {k: v.to(scorers.device) for k, v in feats.items()}
        dtype = next(scorers.clap_audio.parameters()).dtype
        feats["input_features"] = feats["input_features"].to(dtype)
        emb = F.normalize(scorers.clap_audio(**feats).audio_embeds.float(), dim=-1)
        total = emb if total is None else total + emb
    return total / len(views)


@torch.no_grad()
def clap_audio_text_score(scorers: Scorers, waveforms: Any, prompt: str, *, sample_rate: int = FOLEY_RATE) -> list[float]:
    """Cosine similarity between CLAP's audio embedding of each waveform and its text embedding of ``prompt``."""
    batch = _as_batch(waveforms)
    rate = int(scorers.clap_features.sampling_rate)
    batch = resample(batch, sample_rate, rate)
    audio = _clap_audio_embeds(scorers, batch)
    tok = scorers.tokenizer([prompt], padding=True, return_tensors="pt")
    tok = {k: v.to(scorers.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
    text = scorers.clap_text(**tok).text_embeds.float()
    return F.cosine_similarity(audio, text, dim=-1).cpu().tolist()


def score_candidates(
    engine_or_scorers: Any,
    video_frames_25fps: Any | None,
    waveforms: Any,
    prompt: str,
    *,
    sample_rate: int = FOLEY_RATE,
    sync_feat: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Score N candidate soundtracks of one video: one dict per candidate, in input order,
    ``{"index", "desync", "offsets_sec", "clap"}`` (``desync`` None for clips under 4.8 s).

    ``waveforms``: a list of N mono (or [C, n]) waveforms at ``sample_rate`` (48 kHz, the DAC's),
    or an [N, n] / [N, C, n] tensor (what ``dac.decode`` returns for a batch is [N, 1, n]). Pass the generation run's visual sync features as
    ``sync_feat`` to skip the visual branch entirely.
    """
    scorers = as_scorers(engine_or_scorers)
    sync = desync_score(scorers, video_frames_25fps, waveforms, sample_rate=sample_rate, sync_feat=sync_feat)
    clap = clap_audio_text_score(scorers, waveforms, prompt, sample_rate=sample_rate)
    return [
        {"index": i, "desync": s["desync"], "offsets_sec": s["offsets_sec"], "clap": c}
        for i, (s, c) in enumerate(zip(sync, clap))
    ]


_DIRECTION = {"desync": 1.0, "clap": -1.0}  # desync: lower is better; clap: higher is better


def rank(candidates: Sequence[dict[str, Any]], by: Sequence[str] = ("desync", "clap")) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The best candidate and all of them in rank order (each gains a ``rank``, 0 = best).

    Keys of ``by`` compare in turn (DeSync moves in 0.2 s steps, so CLAP breaks its ties); a
    missing score (None) sorts after every present one; ties keep the input order.
    """
    if not candidates:
        raise ValueError("rank needs at least one candidate")
    for key in by:
        if key not in _DIRECTION:
            raise ValueError(f"unknown score {key!r}: choose from {', '.join(_DIRECTION)}")

    def sort_key(c: dict[str, Any]) -> tuple:
        parts: list[Any] = []
        for key in by:
            v = c.get(key)
            parts += [1, 0.0] if v is None else [0, _DIRECTION[key] * float(v)]
        return tuple(parts)

    ordered = sorted(candidates, key=sort_key)
    ranked = [{**c, "rank": r} for r, c in enumerate(ordered)]
    return ranked[0], ranked


def parse_measures(by: str | Sequence[str]) -> tuple[str, ...]:
    """``"desync,clap"`` (or a sequence) -> ``("desync", "clap")``: known measures, each once, in order."""
    parts = [p.strip().lower() for p in (by.split(",") if isinstance(by, str) else by)]
    parts = [p for p in parts if p]
    if not parts or len(set(parts)) != len(parts) or any(p not in _DIRECTION for p in parts):
        raise ValueError(f"rank by {', '.join(_DIRECTION)} or both, in order, each once (e.g. desync,clap); got {by!r}")
    return tuple(parts)


def usable_measures(candidates: Sequence[dict[str, Any]], by: Sequence[str]) -> tuple[str, ...]:
    """The measures of ``by`` that some candidate has, or ``("clap",)`` when none has any.

    DeSync is None for clips under 4.8 s (and for text to audio); ranking by it alone would then
    keep the first candidate for no reason, so CLAP, which every clip has, decides instead."""
    have = tuple(k for k in by if any(c.get(k) is not None for c in candidates))
    return have or ("clap",)


def load_scorers(
    model_dir: Any,
    *,
    device: torch.device | str = "cpu",
    components: Any | None = None,
    clap_dir: Any | None = None,
) -> Scorers:
    """Scorers from an official model folder (``synchformer_state_dict`` + the CLAP folder), fp32.

    With ``components`` (an engine's loaded networks) its Synchformer visual branch and CLAP text
    tower are shared, so only the audio branch + sync head (115 M) and CLAP's audio tower load.
    """
    from pathlib import Path

    from foleyserve.models.clap_audio import load_clap_audio
    from foleyserve.models.encoders import load_clap_text
    from foleyserve.models.loading import read_state_dict
    from foleyserve.models.sync_scorer import load_sync_scorer
    from foleyserve.models.synchformer import build_synchformer_visual, split_synchformer_state_dict
    from foleyserve.pipeline.model_dir import CLAP_REPO, SYNCHFORMER_FILE, _weights_files, find_hf_model

    dev = torch.device(device)
    root = Path(model_dir)
    (sync_path,) = _weights_files(root, [SYNCHFORMER_FILE])
    clap_path = find_hf_model(CLAP_REPO, root, clap_dir)
    sd = read_state_dict(sync_path)
    scorer = load_sync_scorer(sd, device=dev)
    # Scoring needs the torch networks (CLAP's projection is not in the exported text graph); an
    # engine whose stages run exported graphs has none, so they are loaded here as without one.
    if components is not None and isinstance(components.synchformer, torch.nn.Module) and isinstance(components.clap, torch.nn.Module):
        visual, tokenizer, clap_text = components.synchformer, components.tokenizer, components.clap
    else:
        visual = build_synchformer_visual()
        visual.load_state_dict(split_synchformer_state_dict(sd)[0], strict=True)
        visual = visual.to(dev).eval()
        tokenizer, clap_text = load_clap_text(clap_path, device=dev)
    del sd
    features, clap_audio = load_clap_audio(clap_path, device=dev)
    return Scorers(
        sync_visual=visual, sync_scorer=scorer, clap_text=clap_text, tokenizer=tokenizer,
        clap_audio=clap_audio, clap_features=features, device=dev,
    )
