"""Every network of the pipeline at its REAL size, with seeded random weights.

These give true timings and memory figures without the official files: the denoiser (XXL or XL,
from the official yaml's model_kwargs), SigLIP2 base patch16-512 (vision tower), CLAP text
(RoBERTa-base), the Synchformer visual branch (ViT-B) and the DAC-VAE at the official kwargs. The
audio they produce is noise.

Large modules are built on the meta device and then materialised directly on the target device
(``to_empty``) before being filled with random values, so nothing is allocated twice and an XXL
denoiser fits where its weights fit. The denoiser is built in the requested dtype (bf16 halves
XL's 11.6 GB in fp32); the encoders and the DAC stay in fp32, as the official pipeline runs them.

Weights depend only on ``seed``, not on the device. Drawing billions of normal values one by one
takes minutes on a small CPU, so the real-size networks take their values from a seeded pool of
2^24 standard normal draws, each tensor starting at its own random offset and scaled to its layer's
standard deviation (the same per-layer scheme as the demo and the conformance fixtures): every
weight is still a N(0, sigma^2) sample, at the speed of a memory copy. The tiny size is the demo
model itself, built exactly as :func:`~foleyserve.pipeline.demo.demo_components` builds it.

The tokenizer is the demo's small byte-level BPE (the real RoBERTa vocabulary cannot be downloaded
here); CLAP keeps its real 50,265-token embedding table. Prompts therefore tokenize to a different
number of tokens than with the real tokenizer, which changes only the text length the DiT's
cross-attention sees (a fraction of a percent of its cost).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from foleyserve.models.dit import FoleyDiT, build_dit, xl_config, xxl_config
from foleyserve.models.encoders import build_clap_text, build_siglip_vision
from foleyserve.models.synchformer import build_synchformer_visual
from foleyserve.models.vae import build_dac
from foleyserve.pipeline.demo import demo_components, demo_dit_config, demo_tokenizer

MODEL_SIZES = ("tiny", "xl", "xxl")

# The DAC-VAE constructor kwargs stored in the official vae_128d_48k.pth metadata (see
# shared/reference/manifest-dac-vae.json; quantizer-only kwargs omitted, they build nothing).
OFFICIAL_DAC_KWARGS: dict = {
    "encoder_dim": 128,
    "encoder_rates": [2, 3, 4, 5, 8],
    "latent_dim": 128,
    "decoder_dim": 2048,
    "decoder_rates": [8, 5, 4, 3, 2],
    "sample_rate": 48000,
    "continuous": True,
}

_DIT_CONFIGS: dict[str, Callable[[], dict]] = {"xxl": xxl_config, "xl": xl_config, "tiny": demo_dit_config}


def _check_size(model: str) -> None:
    if model not in MODEL_SIZES:
        raise ValueError(f"unknown model size {model!r}: choose one of {', '.join(MODEL_SIZES)}")


def dit_config(model: str) -> dict:
    """The model_kwargs of a size: the official yaml's for xxl/xl, the demo DiT's for tiny."""
    _check_size(model)
    return _DIT_CONFIGS[model]()


def random_dit(
    model: str = "xl",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> FoleyDiT:
    """Only the denoiser of :func:`random_components`, with the same weights for the same seed."""
    _check_size(model)
    if model == "tiny":
        # Built exactly as demo_components builds its DiT, so the weights match the demo engine's.
        return build_dit(demo_dit_config(), seed=seed).to(device=device, dtype=dtype).eval()
    config = dit_config(model)
    return _materialise(lambda: build_dit(config, device="meta"), device, dtype, _dit_scale, seed)  # type: ignore[return-value]


POOL_SIZE = 1 << 24


def _dit_scale(name: str, p: torch.Tensor) -> tuple[float, float]:
    # (mean, std) per tensor, as foleyserve.models.dit.init_dit_weights chooses them.
    if name.endswith("norm.weight"):
        return 1.0, 0.0
    if p.ndim >= 2 and "sync_pos_emb" not in name:
        return 0.0, p[0].numel() ** -0.5
    return 0.0, 0.02


def _fixture_scale(name: str, p: torch.Tensor) -> tuple[float, float]:
    # (mean, std) per tensor, as foleyserve.pipeline.demo.randomize_ (the fixtures' scheme) chooses them.
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("weight_g", "alpha") or (leaf == "weight" and p.ndim == 1):
        return 1.0, 0.1
    if leaf == "bias":
        return 0.0, 0.05
    if p.ndim >= 2 and leaf in ("weight", "weight_v"):
        return 0.0, p[0].numel() ** -0.5
    return 0.0, 0.5


@torch.no_grad()
def pool_fill_(module: torch.nn.Module, scale: Callable[[str, torch.Tensor], tuple[float, float]], seed: int) -> torch.nn.Module:
    """Fill every parameter with ``mean + std * z``, z read from a seeded pool of normal draws."""
    gen = torch.Generator().manual_seed(seed)
    params = list(module.named_parameters())
    if not params:
        return module
    device = params[0][1].device
    pool = torch.randn(POOL_SIZE, generator=gen, dtype=torch.float32).to(device)
    for name, p in params:
        mean, std = scale(name, p)
        flat = p.view(-1)
        if std == 0.0:
            flat.fill_(mean)
            continue
        start = int(torch.randint(POOL_SIZE, (1,), generator=gen))
        done = 0
        while done < flat.numel():
            take = min(POOL_SIZE - start, flat.numel() - done)
            chunk = flat[done : done + take]
            # One pass over the parameter: scale while casting into it.
            torch.mul(pool[start : start + take], std, out=chunk)
            if mean:
                chunk.add_(mean)
            done += take
            start = 0
    return module


def _materialise(
    build: Callable[[], torch.nn.Module],
    device: torch.device | str,
    dtype: torch.dtype,
    scale: Callable[[str, torch.Tensor], tuple[float, float]],
    seed: int,
) -> torch.nn.Module:
    with torch.device("meta"):
        module = build()
    module = module.to(dtype=dtype).to_empty(device=device)
    return pool_fill_(module, scale, seed).eval()


def random_dac(*, device: torch.device | str = "cpu", seed: int = 0, decoder_only: bool = True) -> torch.nn.Module:
    """The DAC-VAE at the official kwargs; decoder-only by default, as inference loads it
    (``decoder_only=False``: with the encoder, as the official file has it)."""
    dac = _materialise(
        lambda: build_dac(OFFICIAL_DAC_KWARGS, decoder_only=decoder_only), device, torch.float32, _fixture_scale, seed + 2
    )
    # As in the demo: scale down each residual unit's last conv so random weights do not saturate
    # the output tanh (a saturated decoder would hide precision differences).
    with torch.no_grad():
        for name, p in dac.named_parameters():
            if name.endswith("block.3.weight_g"):
                p.mul_(0.25)
    return dac


def random_synchformer(*, device: torch.device | str = "cpu", seed: int = 0) -> torch.nn.Module:
    """Synchformer's visual branch at the released size (ViT-B: 768 wide, 12 heads, 12 blocks)."""
    return _materialise(build_synchformer_visual, device, torch.float32, _fixture_scale, seed + 3)


def random_components(
    model: str = "xl",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    dit: FoleyDiT | None = None,
):
    """:class:`~foleyserve.pipeline.pipeline.Components` of the real architecture with random weights.

    ``model``: ``"xxl"`` or ``"xl"`` for the real sizes, ``"tiny"`` for the demo components.
    ``dtype`` is the denoiser's dtype; the other networks stay fp32. ``log`` receives one line per
    network built, with the seconds it took (building XL takes tens of seconds on two cores).
    ``dit``: use this denoiser instead of building one (benchmarks swap denoisers over shared
    encoders; the encoders and the DAC do not depend on the denoiser's size).
    """
    from foleyserve.pipeline.pipeline import Components

    _check_size(model)
    dev = torch.device(device)
    if model == "tiny":
        comps = demo_components(dev, seed=seed)
        if dit is not None:
            comps.dit = dit
        elif dtype != torch.float32:
            comps.dit = comps.dit.to(dtype=dtype)
        return comps

    say = log or (lambda _line: None)

    def timed(what: str, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        start = time.perf_counter()
        module = build()
        n = sum(p.numel() for p in module.parameters())
        say(f"built {what}: {n / 1e6:,.1f} M parameters in {time.perf_counter() - start:.1f} s")
        return module

    if dit is None:
        dit = timed(f"DiT {model.upper()} ({str(dtype).replace('torch.', '')})", lambda: random_dit(model, device=dev, dtype=dtype, seed=seed))
    dac = timed("DAC-VAE", lambda: random_dac(device=dev, seed=seed))
    synchformer = timed("Synchformer visual", lambda: random_synchformer(device=dev, seed=seed))
    siglip = timed("SigLIP2 vision", lambda: build_siglip_vision(seed=seed, device=dev))
    tokenizer = demo_tokenizer()
    clap = timed("CLAP text", lambda: build_clap_text(seed=seed + 1, device=dev))
    return Components(
        dit=dit,
        dac=dac,
        synchformer=synchformer,
        siglip=siglip,
        clap=clap,
        tokenizer=tokenizer,
        name=f"random-weights {model} (real sizes; output is noise)",
        device=dev,
        is_demo=True,
    )
