"""``foleyserve fidelity``: how far each precision policy and step-cache setting moves the output.

Every setting is compared with the fp32, no-cache path on the SAME weights and inputs: the features
are computed once, every run starts from the same seeded noise, and only the denoiser's precision
policy and the step cache change. Reported per setting: rel_l2 and SNR (dB) of the final latents
and of the decoded waveform, the log-mel spectral distance (dB) of the waveform, the fraction of
DiT row-forwards the step cache skipped, and the sampling wall time.

Sources: ``--demo`` (tiny random model, the default), ``--fixture`` (the tiny conformance model and
the inputs of the recorded official 4-step sampling run in ``shared/reference/fixtures``), or
``--random-weights xl`` (the real XL architecture with seeded random weights; on a CPU keep the clip
short and the steps few). A setting this machine or checkout cannot run is reported as
"unavailable: <reason>" in its row; the others still run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from foleyserve.commands.profile import (
    _usage_error,
    add_source_args,
    check_output_file,
    check_video,
    describe_machine,
    machine_info,
    non_negative_int,
    positive_int,
    seconds_arg,
    write_json,
)

DEFAULT_CACHES = (0.0, 0.05, 0.1)
# Above this many parameter bytes a second copy of the DiT is rebuilt from its seed instead of
# deep-copied, and the fp32 reference is dropped before the variants run (XL fp32 is 11.6 GB).
COPY_LIMIT_BYTES = 2 << 30


class Unavailable(Exception):
    """A setting that cannot run here; the message says why."""


# ----------------------------------------------------------------------------- precision


def apply_precision(dit: torch.nn.Module, precision: str) -> str:
    """Put ``dit`` (fp32) under ``precision`` in place, as the engine does; returns a note on what
    the policy did. Raises Unavailable with the reason when it cannot."""
    if precision == "fp32":
        return ""
    try:
        from foleyserve.precision import POLICIES, apply_policy
    except ImportError as e:
        raise Unavailable(f"foleyserve.precision does not import: {e}") from None
    if precision not in POLICIES:
        raise Unavailable(f"no policy {precision!r} in foleyserve.precision (has {', '.join(POLICIES)})")
    try:
        report = apply_policy(dit, precision)
    except (NotImplementedError, RuntimeError, ValueError, TypeError, ImportError) as e:
        raise Unavailable(_first_line(e)) from None
    return _policy_note(report)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _policy_note(report: Any) -> str:
    try:
        d = report.as_dict()
    except AttributeError:
        return ""
    parts = []
    if d.get("fp8_layers"):
        parts.append(f"{d['fp8_layers']} fp8 layers")
    if d.get("kept_fp32"):
        parts.append(f"fp32: {', '.join(d['kept_fp32'])}")
    if isinstance(d.get("weight_bytes_after"), int):
        parts.append(f"weights {d['weight_bytes_after'] / 2**20:,.1f} MiB")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- subject


@dataclass
class Subject:
    """The fixed weights and inputs every setting is run on."""

    name: str
    reference_dit: torch.nn.Module | None  # fp32; dropped after the reference run when large
    fresh_dit: Callable[[], torch.nn.Module]  # a new fp32 DiT with the same weights
    dac: torch.nn.Module
    features: dict[str, torch.Tensor]  # clip_feat, sync_feat, text_feat, uncond_text_feat
    noise: torch.Tensor  # [1, 128, La] float32
    sample_rate: int
    notes: list[str] = field(default_factory=list)
    official: dict[str, torch.Tensor] | None = None  # the fixture's recorded official outputs


def _dit_bytes(dit: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in dit.parameters())


def _copier(dit: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    if _dit_bytes(dit) <= COPY_LIMIT_BYTES:
        return lambda: copy.deepcopy(dit)
    return rebuild


def _engine_features(engine, video: Path, seconds: float, prompt: str, negative: str) -> tuple[dict[str, torch.Tensor], int, float]:
    decoded = engine.decode(video, max_seconds=seconds)
    visual = engine.encode_visual(decoded)
    text = engine.extract_text(prompt, negative)
    feats = {"clip_feat": visual.siglip, "sync_feat": visual.sync, "text_feat": text.text, "uncond_text_feat": text.uncond}
    return feats, visual.latent_length, decoded.duration


def demo_subject(*, video: Path, seconds: float, seed: int, prompt: str, negative: str, device: torch.device) -> Subject:
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.random_models import random_dit
    from foleyserve.pipeline.sampler import initial_noise

    engine = Engine.demo(device=device)
    feats, length, duration = _engine_features(engine, video, seconds, prompt, negative)
    dit = engine.components.dit
    return Subject(
        name="demo (tiny random weights)",
        reference_dit=dit,
        fresh_dit=_copier(dit, lambda: random_dit("tiny", device=device)),
        dac=engine.components.dac,
        features=feats,
        noise=initial_noise(1, length, seed=seed),
        sample_rate=engine.sample_rate,
        notes=[f"features of {video.name} ({duration:.2f} s video, latent length {length})"],
    )


def random_subject(
    size: str, *, video: Path, seconds: float, seed: int, prompt: str, negative: str, device: torch.device, log: Callable[[str], None]
) -> Subject:
    from foleyserve.pipeline.pipeline import Engine
    from foleyserve.pipeline.random_models import random_components, random_dit
    from foleyserve.pipeline.sampler import initial_noise

    comps = random_components(size, device=device, dtype=torch.float32, seed=0, log=log)
    engine = Engine(components=comps, precision="fp32")
    log(f"computing features of the first {seconds:g} s of {video.name} with the real-size encoders")
    feats, length, duration = _engine_features(engine, video, seconds, prompt, negative)
    dit = comps.dit
    comps.dit = None  # type: ignore[assignment]  # the Subject owns it now, so it can be freed
    return Subject(
        name=f"random-weights {size} (real sizes)",
        reference_dit=dit,
        fresh_dit=_copier(dit, lambda: random_dit(size, device=device, dtype=torch.float32, seed=0)),
        dac=comps.dac,
        features=feats,
        noise=initial_noise(1, length, seed=seed),
        sample_rate=engine.sample_rate,
        notes=[f"features of the first {seconds:g} s of {video.name} ({duration:.2f} s decoded, latent length {length})"],
    )


def fixture_dir() -> Path:
    """The conformance fixtures: $FOLEYSERVE_SHARED/reference/fixtures, else ../shared beside the checkout."""
    env = os.environ.get("FOLEYSERVE_SHARED")
    if env:
        return Path(env) / "reference" / "fixtures"
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "reference" / "fixtures"
        if (parent / "pyproject.toml").is_file() and candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "reference" / "fixtures"


def _load_fixture_model(path: Path, builder: Callable[..., torch.nn.Module]) -> torch.nn.Module:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    model = builder(config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def fixture_subject(device: torch.device) -> Subject:
    from safetensors.torch import load_file

    from foleyserve.models import build_dac, build_dit

    UsageError = _usage_error()
    root = fixture_dir()
    files = [root / n for n in ("tiny_foley_weights.safetensors", "tiny_dac_weights.safetensors", "sampling_2s_cfg4.5_4steps.safetensors")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"conformance fixtures not found ({', '.join(missing)}); set FOLEYSERVE_SHARED to the shared/ folder")
    dit = _load_fixture_model(files[0], build_dit).to(device)
    dac = _load_fixture_model(files[1], build_dac).to(device)
    run = load_file(str(files[2]))
    feats = {
        "clip_feat": run["siglip2_feat"],
        "sync_feat": run["syncformer_feat"],
        "text_feat": run["text_feat"],
        "uncond_text_feat": run["uncond_text_feat"],
    }
    return Subject(
        name="conformance fixture (tiny official-layout weights)",
        reference_dit=dit,
        fresh_dit=lambda: copy.deepcopy(dit),
        dac=dac,
        features=feats,
        noise=run["initial_noise"],
        sample_rate=int(dac.sample_rate),
        notes=["inputs and initial noise of the recorded official 4-step CFG 4.5 sampling run (2 s)"],
        official={"final_latents_fp64": run["final_latents_fp64"], "audio_fp64": run["audio_fp64"]},
    )


# ----------------------------------------------------------------------------- running


@dataclass
class Row:
    precision: str
    step_cache: float
    latents_rel_l2: float | None = None
    latents_snr_db: float | None = None
    audio_rel_l2: float | None = None
    audio_snr_db: float | None = None
    log_mel_db: float | None = None
    saved_fraction: float | None = None
    sampling_s: float | None = None
    note: str = ""
    unavailable: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        # JSON has no infinity: an exact match is reported as null SNR with rel_l2 0.
        for k in ("latents_snr_db", "audio_snr_db"):
            if d[k] is not None and math.isinf(d[k]):
                d[k] = None if d[k] > 0 else "-inf"
        return d


def sample(subject: Subject, dit: torch.nn.Module, *, steps: int, guidance: float, cache: float) -> tuple[torch.Tensor, torch.Tensor, dict | None, float]:
    """(latents, waveform, step-cache report, seconds) of one run on the subject's inputs."""
    from foleyserve.pipeline.sampler import sample_latents
    from foleyserve.pipeline.stepcache import StepCache

    step_cache = StepCache(cache) if cache > 0 else None
    start = time.perf_counter()
    latents = sample_latents(dit, noise=subject.noise, steps=steps, guidance_scale=guidance, step_cache=step_cache, **subject.features)
    if latents.device.type == "cuda":
        torch.cuda.synchronize(latents.device)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        wave = subject.dac.decode(latents.float().to(next(subject.dac.parameters()).device)).float().cpu()
    return latents.float().cpu(), wave, (step_cache.report() if step_cache is not None else None), seconds


def compare(
    subject: Subject,
    *,
    precisions: list[str],
    caches: list[float],
    steps: int,
    guidance: float,
    log: Callable[[str], None] | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """Every precision x cache setting against the fp32 no-cache reference."""
    from foleyserve.fidelity_measures import log_mel_distance, rel_l2, snr_db

    say = log or (lambda _line: None)
    if subject.reference_dit is None:
        raise ValueError("the subject's reference DiT was already released")
    ref_latents, ref_wave, _, ref_seconds = sample(subject, subject.reference_dit, steps=steps, guidance=guidance, cache=0.0)
    say(f"reference (fp32, no cache): {ref_seconds:.2f} s")
    extra: dict[str, Any] = {"reference_sampling_s": ref_seconds}
    if subject.official is not None and steps == 4 and guidance == 4.5:
        extra["reference_vs_official_fp64"] = {
            "latents_rel_l2": rel_l2(ref_latents, subject.official["final_latents_fp64"]),
            "audio_rel_l2": rel_l2(ref_wave, subject.official["audio_fp64"].float()),
        }
    if _dit_bytes(subject.reference_dit) > COPY_LIMIT_BYTES:
        subject.reference_dit = None
        gc.collect()

    rows: list[Row] = []
    for precision in precisions:
        dit = None
        note = ""
        reason = None
        try:
            dit = subject.fresh_dit()
            note = apply_precision(dit, precision)
        except Unavailable as e:
            reason = str(e)
        for cache in caches:
            row = Row(precision=precision, step_cache=cache, note=note)
            rows.append(row)
            if reason is not None:
                row.unavailable = reason
                say(f"{precision} cache {cache:g}: unavailable: {reason}")
                continue
            try:
                latents, wave, report, seconds = sample(subject, dit, steps=steps, guidance=guidance, cache=cache)
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
                row.unavailable = f"failed while sampling: {_first_line(e)}"
                say(f"{precision} cache {cache:g}: {row.unavailable}")
                continue
            if not bool(latents.isfinite().all()):
                row.unavailable = "non-finite output: the latents overflowed this precision (NaN/inf)"
                say(f"{precision} cache {cache:g}: {row.unavailable}")
                continue
            row.latents_rel_l2 = rel_l2(latents, ref_latents)
            row.latents_snr_db = snr_db(latents, ref_latents)
            row.audio_rel_l2 = rel_l2(wave, ref_wave)
            row.audio_snr_db = snr_db(wave, ref_wave)
            row.log_mel_db = log_mel_distance(wave, ref_wave, subject.sample_rate)
            row.saved_fraction = float(report["saved_fraction"]) if report else 0.0
            row.sampling_s = seconds
            say(f"{precision} cache {cache:g}: latents rel_l2 {row.latents_rel_l2:.3g}, {seconds:.2f} s")
        del dit
        gc.collect()
    return rows, extra


# ----------------------------------------------------------------------------- output


def _num(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, fmt)


def format_table(subject: Subject, rows: list[Row], settings: dict[str, Any], extra: dict[str, Any], machine: dict[str, Any]) -> str:
    lines = [
        f"# foleyserve fidelity: {subject.name}; {settings['steps']} steps, CFG {settings['guidance']}, seed {settings['seed']}, {settings['device']}",
        "# every row vs the fp32 no-cache run on the same weights, features and seeded noise",
    ]
    lines += [f"# {n}" for n in subject.notes]
    lines.append(f"# {describe_machine(machine)}")
    lines += [
        "",
        "| precision | step cache | latents rel_l2 | latents SNR dB | audio rel_l2 | audio SNR dB | log-mel dist dB | cache saved | sampling s | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.unavailable is not None:
            lines.append(f"| {r.precision} | {r.step_cache:g} | unavailable: {r.unavailable} | | | | | | | |")
            continue
        lines.append(
            f"| {r.precision} | {r.step_cache:g} | {_num(r.latents_rel_l2, '.3e')} | {_num(r.latents_snr_db, '.1f')} | "
            f"{_num(r.audio_rel_l2, '.3e')} | {_num(r.audio_snr_db, '.1f')} | {_num(r.log_mel_db, '.3f')} | "
            f"{_num(r.saved_fraction, '.0%')} | {_num(r.sampling_s, '.2f')} | {r.note} |"
        )
    official = extra.get("reference_vs_official_fp64")
    if official:
        lines.append("")
        lines.append(
            f"sanity: the fp32 reference vs the official run's float64 result: latents rel_l2 {official['latents_rel_l2']:.2e}, "
            f"audio rel_l2 {official['audio_rel_l2']:.2e}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _parse_list(text: str, what: str, convert: Callable[[str], Any]) -> list[Any]:
    UsageError = _usage_error()
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"{what} is empty; give a comma-separated list")
    out = []
    for item in items:
        try:
            out.append(convert(item))
        except ValueError as e:
            raise UsageError(f"{what}: {e}") from None
    return out


def _precision(name: str) -> str:
    from foleyserve.config import PRECISION_NAMES

    if name not in PRECISION_NAMES:
        raise ValueError(f"unknown precision {name!r}; choose from {', '.join(PRECISION_NAMES)}")
    return name


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"thresholds must be finite numbers >= 0, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fidelity",
        help="measure how far each precision policy and step-cache setting moves latents and audio",
        description=(
            "Compare every precision x step-cache setting with the fp32, no-cache path on the same weights, features "
            "and seeded noise: rel_l2 and SNR of the final latents and of the waveform, log-mel spectral distance, "
            "and the step cache's saved fraction."
        ),
    )
    src = add_source_args(p, random_sizes=("tiny", "xl"))
    src.add_argument("--fixture", action="store_true", help="the tiny conformance model and recorded official inputs")
    p.add_argument("--precisions", default="fp32,bf16,fp16,fp8,fp8-weight-only", help="comma-separated policies")
    caches = ",".join(f"{c:g}" for c in DEFAULT_CACHES)
    p.add_argument("--step-cache", default=caches, help=f"comma-separated thresholds; 0 = off (default {caches})")
    p.add_argument("--steps", type=positive_int, help="denoising steps (default 10; 4 with --fixture and --random-weights xl)")
    p.add_argument("--guidance", type=float, default=4.5, help="CFG scale (default 4.5)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="noise seed (ignored with --fixture, which has its own noise)")
    p.add_argument("--video", type=Path, help="input video (default: the bundled sample clip)")
    p.add_argument("--seconds", type=seconds_arg, help="use at most this many seconds of the video (default 15; 2 with --random-weights xl)")
    p.add_argument("--prompt", default="a ball bouncing on a wooden floor", help="text prompt")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows and settings as JSON")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from foleyserve.pipeline.pipeline import resolve_device
    from foleyserve.pipeline.requests import DEFAULT_NEGATIVE_PROMPT

    UsageError = _usage_error()
    precisions = _parse_list(args.precisions, "--precisions", _precision)
    caches = _parse_list(args.step_cache, "--step-cache", _threshold)
    check_output_file(args.json, "--json")
    video = check_video(args.video)
    if not 0 <= args.guidance <= 100:
        raise UsageError(f"--guidance must be between 0 and 100, got {args.guidance}")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None

    def log(line: str) -> None:
        print(f"foleyserve fidelity: {line}", file=sys.stderr, flush=True)

    big = args.random_weights == "xl"
    steps = args.steps or (4 if (args.fixture or big) else 10)
    seconds = args.seconds or (2.0 if big else 15.0)
    from foleyserve.media import MediaError

    try:
        if args.fixture:
            subject = fixture_subject(device)
        elif args.random_weights and args.random_weights != "tiny":
            subject = random_subject(args.random_weights, video=video, seconds=seconds, seed=args.seed, prompt=args.prompt,
                                     negative=DEFAULT_NEGATIVE_PROMPT, device=device, log=log)
            subject.notes.append(f"real-size XL on {device}: a {seconds:g} s clip and {steps} steps keep it feasible")
        else:
            subject = demo_subject(video=video, seconds=seconds, seed=args.seed, prompt=args.prompt,
                                   negative=DEFAULT_NEGATIVE_PROMPT, device=device)
    except MediaError as e:
        raise UsageError(str(e)) from None
    rows, extra = compare(subject, precisions=precisions, caches=caches, steps=steps, guidance=args.guidance, log=log)
    settings = {"source": subject.name, "steps": steps, "guidance": args.guidance, "seed": args.seed,
                "device": str(device), "precisions": precisions, "step_cache": caches}
    machine = machine_info()
    print(format_table(subject, rows, settings, extra, machine))
    if args.json is not None:
        write_json(args.json, {"tool": "foleyserve fidelity", "machine": machine, "settings": settings,
                               "notes": subject.notes, "rows": [r.as_dict() for r in rows], **extra})
        print(f"wrote {args.json}")
    return 0
