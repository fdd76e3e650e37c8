"""Settings for the machine: model size, precision, offload, batch size and step cache from device facts.

``foleyserve generate --auto`` and ``serve --auto`` (or ``--profile auto``) call
:func:`gather_facts` once, hand the facts to :func:`choose` (a pure function, so tests fake the
machine) and print the :class:`AutoDecision` with its reasons; flags given explicitly win.

The rule is *quality first, then speed*: the largest model at the most exact precision that fits in
free device memory, with no offload if possible; precision drops (bf16 -> fp8) and offload comes in
only when memory demands it, then the smaller model. The memory model below uses measured numbers
(cited at each constant); where no GPU measurement exists yet the CPU figure is used with a margin.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from foleyserve.config import EngineConfig

GIB = 2**30
MAX_CLIP_SECONDS = 15.04  # the longest audio the model makes (pipeline.MAX_SECONDS + one frame)

# DiT weight bytes on the device (bf16-class policies keep time_in/final_layer in fp32: included).
# XXL bf16: BENCHMARKS.md "FP8 weight bytes and placement" (10,283,380,736 B); XXL fp8: 0.555x of
# that (same table, the default placement); XL bf16: "Checkpoint loading" (the bf16 weights,
# 5,825,925,376 B); XL fp8: bench/results/policies_xl_cpu.md (resident DiT weights 3.423 GiB).
# fp32 is twice bf16 (XL fp32 measured 10.852 GiB in policies_xl_cpu.md, 2.0x its bf16).
_DIT_BYTES = {
    ("xxl", "bf16"): 10_283_380_736,
    ("xxl", "fp8"): int(0.555 * 10_283_380_736),
    ("xl", "bf16"): 5_825_925_376,
    ("xl", "fp8"): int(3.423 * GIB),
}
# Blocks per denoiser (xxl_config / xl_config): sequential offload holds about two at a time.
_DIT_BLOCKS = {"xxl": 18 + 36, "xl": 12 + 24}
# The other networks, fp32 at every policy: DAC decoder 75.5 M, Synchformer 122.4 M, SigLIP2 93.5 M
# and CLAP text 125.3 M parameters (counted on the meta device at the official sizes).
ENCODER_BYTES = (75_498_690 + 122_440_704 + 93_520_128 + 125_302_016) * 4
LARGEST_ENCODER_BYTES = 125_302_016 * 4  # CLAP: what stage offload holds while an encoder runs
# Activations, bench/results/activation_memory_cpu.json (bench/activation_memory.py): peak bytes
# added by one CFG step of an XXL-width DiT grow 13.7 MB per second of audio; the DAC decode adds
# 222 MB at 2 s and 594 MB at 8 s (98 MB + 62.1 MB/s). These are CPU allocations: the CUDA caching
# allocator rounds up and cuBLAS/attention take workspaces, so they are doubled for a GPU.
DIT_ACT_PER_S = 13_744_811
DAC_ACT_FIXED, DAC_ACT_PER_S = 98_000_000, 62_061_227
GPU_ACT_FACTOR = 2.0
# Kept free on the device for fragmentation and what the estimate misses; host RAM kept for decoding
# (a 16 s 1080p clip costs ~150 MB, BENCHMARKS "Preprocessing"), Python, torch and the page cache.
DEVICE_HEADROOM = 1 * GIB
HOST_HEADROOM = 3 * GIB
# Server batch sizes beyond this gain little throughput and cost latency for everyone in the batch.
MAX_AUTO_BATCH = 8
# Step cache threshold used where steps are slow (CPU, sequential offload): it saved 25 % of
# row-forwards at latents rel_l2 1.1e-2 on random XL (BENCHMARKS "Fidelity"), below bf16's own 2.3e-2.
SLOW_STEP_CACHE = 0.05


@dataclass(frozen=True)
class MachineFacts:
    """What the decision depends on. ``gather_facts`` reads them; tests build them by hand."""

    gpu_name: str | None = None  # None: no usable CUDA GPU
    gpu_total_bytes: int = 0
    gpu_free_bytes: int = 0
    compute_capability: tuple[int, int] | None = None
    cpu_flags: frozenset[str] | None = None  # /proc/cpuinfo flags; None when unreadable
    host_total_bytes: int = 0
    host_available_bytes: int = 0


@dataclass
class AutoDecision:
    """The chosen settings and, one line each, why."""

    device: str
    model: str
    precision: str
    offload: str
    batch_size: int
    step_cache: float | None
    reasons: list[str] = field(default_factory=list)
    estimated_peak_bytes: int = 0

    def engine_values(self) -> dict[str, Any]:
        """The EngineConfig fields this decision sets."""
        return {"device": self.device, "model": self.model, "precision": self.precision,
                "offload": self.offload, "step_cache": self.step_cache}

    def apply(self, config: EngineConfig, keep: set[str] = frozenset()) -> EngineConfig:  # type: ignore[assignment]
        """``config`` with the decision's fields, except those named in ``keep`` (explicit flags)."""
        return replace(config, **{k: v for k, v in self.engine_values().items() if k not in keep})

    def describe(self) -> str:
        """Several lines for stderr: the settings, then the reasons."""
        cache = "off" if self.step_cache is None else f"{self.step_cache:g}"
        head = (f"auto: model {self.model}, precision {self.precision}, offload {self.offload}, device {self.device}, "
                f"batch {self.batch_size}, step cache {cache} (estimated peak {self.estimated_peak_bytes / GIB:.1f} GiB)")
        return "\n".join([head, *(f"  - {r}" for r in self.reasons)])


def gather_facts(device: str = "auto") -> MachineFacts:
    """Read this machine's facts (GPU memory and compute capability, CPU flags, host RAM)."""
    from foleyserve.pipeline.demo import _cpu_flags

    flags = _cpu_flags()
    total, available = _host_memory()
    facts = MachineFacts(cpu_flags=frozenset(flags) if flags is not None else None,
                         host_total_bytes=total, host_available_bytes=available)
    if device == "cpu":
        return facts
    import torch

    if not torch.cuda.is_available():
        return facts
    index = torch.device(device).index if device.startswith("cuda:") else 0
    free, whole = torch.cuda.mem_get_info(index)
    return replace(facts, gpu_name=torch.cuda.get_device_name(index), gpu_total_bytes=int(whole),
                   gpu_free_bytes=int(free), compute_capability=tuple(torch.cuda.get_device_capability(index)))  # type: ignore[arg-type]


def _host_memory(meminfo: Path = Path("/proc/meminfo")) -> tuple[int, int]:
    try:
        values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines() if line.split()[1:]}
        return values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0))
    except (OSError, ValueError, IndexError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


def dit_bytes(model: str, precision: str) -> int:
    """Device bytes of the denoiser's weights under a precision policy."""
    if precision in ("fp8", "fp8-weight-only"):
        return _DIT_BYTES[(model, "fp8")]
    return _DIT_BYTES[(model, "bf16")] * (2 if precision == "fp32" else 1)


def device_peak(model: str, precision: str, offload: str, seconds: float, batch: int, *, gpu: bool = True) -> int:
    """Estimated peak bytes on the device for ``batch`` requests of ``seconds`` each (max over stages)."""
    factor = GPU_ACT_FACTOR if gpu else 1.0
    dit_act = int(factor * DIT_ACT_PER_S * seconds * batch)
    # The DAC decodes one request at a time.
    dac_act = int(factor * (DAC_ACT_FIXED + DAC_ACT_PER_S * seconds))
    weights = dit_bytes(model, precision)
    if offload == "none":
        return weights + ENCODER_BYTES + max(dit_act, dac_act)
    if offload == "stage":
        return max(weights + dit_act, LARGEST_ENCODER_BYTES + dac_act)
    # sequential: two blocks in flight (the next one prefetched), plus the embedders' share.
    streamed = int(weights * 3 / _DIT_BLOCKS[model])
    return max(streamed + dit_act, LARGEST_ENCODER_BYTES + dac_act)


def _gpu_candidates(cc: tuple[int, int], models: tuple[str, ...]) -> list[tuple[str, str, str]]:
    exact = "bf16" if cc >= (8, 0) else "fp16"
    # FP8 tensor cores (sm_89+) run fp8 GEMMs; elsewhere fp8-weight-only saves the same memory.
    # Before Ampere there is no bf16 for its dequantised buffer, so no fp8 at all.
    small = "fp8" if cc >= (8, 9) else "fp8-weight-only" if cc >= (8, 0) else None
    out = []
    for model in models:
        for precision in (exact, small):
            if precision is not None:
                out += [(model, precision, "none"), (model, precision, "stage")]
    out += [(m, small or exact, "sequential") for m in reversed(models)]
    return out


def choose(facts: MachineFacts, *, clip_seconds: float = MAX_CLIP_SECONDS, models: tuple[str, ...] = ("xxl", "xl"),
           device: str = "auto") -> AutoDecision:
    """The settings for this machine and a clip of ``clip_seconds`` (the longest the model makes by
    default, as a server must plan for), among the denoisers in ``models`` (those the model folder has)."""
    seconds = min(max(float(clip_seconds), 0.64), MAX_CLIP_SECONDS)
    models = tuple(m for m in ("xxl", "xl") if m in models) or ("xxl",)
    reasons: list[str] = []
    if facts.gpu_name is not None and facts.compute_capability is not None and device != "cpu":
        gpu = _choose_gpu(facts, seconds, models, reasons)
        if gpu is not None:
            return gpu
    return _choose_cpu(facts, seconds, models, reasons)


def _choose_gpu(facts: MachineFacts, seconds: float, models: tuple[str, ...], reasons: list[str]) -> AutoDecision | None:
    cc = facts.compute_capability
    assert cc is not None
    budget = facts.gpu_free_bytes - DEVICE_HEADROOM
    host_budget = facts.host_available_bytes - HOST_HEADROOM
    free = f"{facts.gpu_free_bytes / GIB:.1f} of {facts.gpu_total_bytes / GIB:.1f} GiB free"
    rejected: list[str] = []
    for model, precision, offload in _gpu_candidates(cc, models):
        peak = device_peak(model, precision, offload, seconds, 1)
        if peak > budget:
            rejected.append(f"{model} {precision} offload={offload} needs ~{peak / GIB:.1f} GiB")
            continue
        if offload != "none" and dit_bytes(model, precision) + ENCODER_BYTES > host_budget:
            rejected.append(f"{model} {precision} offload={offload} needs the weights in host RAM")
            continue
        batch = 1
        while batch < MAX_AUTO_BATCH and device_peak(model, precision, offload, seconds, batch + 1) <= budget:
            batch += 1
        reasons.append(f"GPU {facts.gpu_name} (sm_{cc[0]}{cc[1]}), {free}; {DEVICE_HEADROOM // GIB} GiB kept as headroom")
        if rejected:
            reasons.append("does not fit: " + "; ".join(rejected))
        reasons.append(_precision_reason(precision, cc))
        if model == "xl" and "xxl" in models:
            reasons.append("the XL denoiser (2.9 B parameters) because XXL (5.1 B) does not fit even at fp8 with stage offload")
        reasons.append({
            "none": "no offload: every model stays on the GPU (no host-to-device copies per request)",
            "stage": "stage offload: models live in host RAM and only the running stage is on the GPU "
                     "(one copy of each model per request)",
            "sequential": "sequential offload: the denoiser's blocks stream through the GPU every step (slow, smallest)",
        }[offload])
        reasons.append(f"batch {batch}: {'room for' if batch < MAX_AUTO_BATCH else 'capped at'} {batch} "
                       f"{seconds:.2f} s request(s) per denoising loop (activations ~{GPU_ACT_FACTOR * DIT_ACT_PER_S * seconds / 2**20:.0f} MiB each)")
        cache = SLOW_STEP_CACHE if offload == "sequential" else None
        reasons.append("step cache off (exact)" if cache is None else
                       f"step cache {cache}: each streamed step is slow; skips ~25 % of block passes at rel_l2 ~1e-2")
        return AutoDecision("cuda", model, precision, offload, batch, cache, reasons,
                            device_peak(model, precision, offload, seconds, batch))
    reasons.append(f"GPU {facts.gpu_name}: {free} fits no configuration ({'; '.join(rejected[-2:])}); running on the CPU")
    return None


def _precision_reason(precision: str, cc: tuple[int, int]) -> str:
    if precision == "bf16":
        fp8 = "; fp8 would be faster here (FP8 tensor cores) at lower fidelity (fixture audio SNR 22.3 vs 30.7 dB): --precision fp8" if cc >= (8, 9) else ""
        return f"bf16: tensor-core speed at ~1e-2 rel_l2 from fp32, which would double the weights{fp8}"
    if precision == "fp16":
        return "fp16: this GPU has no bf16 (pre-Ampere); the engine stops a run that overflows (then use --precision fp32)"
    if precision == "fp8":
        return "fp8: bf16 does not fit; this GPU has FP8 tensor cores (sm_89+), 0.555x the bf16 weight bytes"
    return "fp8-weight-only: bf16 does not fit and this GPU has no FP8 tensor cores (sm_89+); float8 weights dequantised per layer"


def _choose_cpu(facts: MachineFacts, seconds: float, models: tuple[str, ...], reasons: list[str]) -> AutoDecision:
    flags = facts.cpu_flags or frozenset()
    units = next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)
    model = "xl" if "xl" in models else models[0]
    budget = facts.host_available_bytes - HOST_HEADROOM
    precision = "bf16" if units else "fp32"
    if units:
        reasons.append(f"CPU with {units}: bf16 (XL step 2.70 s vs fp32 11.09 s on an avx512_bf16 CPU, bench/results/policies_xl_cpu.md)")
    elif facts.cpu_flags is None:
        reasons.append("CPU flags unreadable: fp32 (emulated bf16 is slower than fp32)")
    else:
        reasons.append("CPU without bf16 matrix units (no amx_bf16/avx512_bf16): fp32, because emulated bf16 is slower")
    peak = device_peak(model, precision, "none", seconds, 1, gpu=False)
    if peak > budget and precision == "fp32":
        precision = "bf16"
        reasons.append(f"fp32 needs ~{peak / GIB:.1f} GiB of the {facts.host_available_bytes / GIB:.1f} GiB available: bf16 for memory (slower here)")
        peak = device_peak(model, precision, "none", seconds, 1, gpu=False)
    if peak > budget:
        precision = "fp8-weight-only"
        reasons.append(f"bf16 needs ~{peak / GIB:.1f} GiB: fp8-weight-only (0.555x the bf16 weights)")
        peak = device_peak(model, precision, "none", seconds, 1, gpu=False)
    if peak > budget:
        reasons.append(f"warning: even this needs ~{peak / GIB:.1f} GiB and {facts.host_available_bytes / GIB:.1f} GiB are available; expect swapping")
    if model == "xl" and "xxl" in models:
        reasons.append("the XL denoiser: on a CPU XXL costs ~1.8x the time (5.1 B vs 2.9 B parameters); XL bf16 takes 12.7 s per step for 10 s of audio on 2 cores")
    reasons.append("batch 1: a CPU is compute-bound, batching adds latency without throughput")
    reasons.append(f"step cache {SLOW_STEP_CACHE}: CPU steps are slow; it skips ~25 % of block passes at latents rel_l2 1.1e-2 (random XL), below bf16's own 2.3e-2")
    reasons.append("no offload: offload moves weights between host and GPU memory; on a CPU there is only one")
    return AutoDecision("cpu", model, precision, "none", 1, SLOW_STEP_CACHE, reasons, peak)


def available_models(model_dir: str | Path | None) -> tuple[str, ...]:
    """The denoisers whose weights the model folder holds (both when there is no folder to look in)."""
    from foleyserve.pipeline.model_dir import DIT_FILES

    if model_dir is None or not Path(model_dir).is_dir():
        return ("xxl", "xl")
    found = tuple(m for m, stem in DIT_FILES.items()
                  if any((Path(model_dir) / f"{stem}{s}").is_file() for s in (".safetensors", ".pth")))
    return found or ("xxl", "xl")
