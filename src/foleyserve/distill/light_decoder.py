"""The light DAC decoder: the teacher decoder's shape with fewer channels and residual units.

It keeps the DAC decoder's structure (1x1 ``post_quant_conv``, a k=7 input conv, one upsampling
block per rate with Snake, a weight-normed transposed conv and dilated residual units, Snake, a
k=7 output conv, tanh) and the official module classes, so it produces exactly 960 samples per
latent frame, folds its weight norm like the teacher and is a drop-in ``components.dac``. What it
changes is the width of every stage (``channels``) and how many residual units each block has
(``dilations``); the default keeps the 1 and 9 dilations (the shortest and the longest reach).

Its file is a safetensors state dict with its config as JSON under ``foleyserve.light_decoder``.
Training and losses live in :mod:`foleyserve.distill.train_decoder`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from foleyserve.config import ConfigError
from foleyserve.models.vae import DAC, DecoderBlock, Snake1d, WNConv1d

FORMAT = "foleyserve-light-decoder/1"
META_KEY = "foleyserve.light_decoder"
PARAM_BUDGET = 0.20  # the ceiling: at most 20 % of the teacher decoder's parameters


class LightDecoderError(ConfigError):
    """A light-decoder file that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class LightDecoderConfig:
    """Widths ``channels`` (input conv, then after each upsampling block: len(rates) + 1 values),
    ``rates`` (their product must be the teacher's hop, 960) and the residual units' ``dilations``."""

    channels: tuple[int, ...]
    rates: tuple[int, ...]
    dilations: tuple[int, ...] = (1, 9)
    latent_dim: int = 128
    sample_rate: int = 48000
    teacher: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "LightDecoderConfig":
        if len(self.channels) != len(self.rates) + 1:
            raise LightDecoderError(f"channels {list(self.channels)} needs len(rates) + 1 = {len(self.rates) + 1} widths")
        if any(c < 1 for c in self.channels) or any(r < 1 for r in self.rates) or not self.dilations:
            raise LightDecoderError(f"widths and rates must be positive and dilations non-empty: {self}")
        return self

    def to_json(self) -> str:
        d = asdict(self)
        for k in ("channels", "rates", "dilations"):
            d[k] = list(d[k])
        return json.dumps({"format": FORMAT, **d}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "LightDecoderConfig":
        d = json.loads(text)
        if d.pop("format", None) != FORMAT:
            raise LightDecoderError(f"{where} is not a {FORMAT} file; make one with `foleyserve distill train --target decoder`")
        for k in ("channels", "rates", "dilations"):
            d[k] = tuple(int(v) for v in d[k])
        return cls(**d).validate()


class LightDecoder(nn.Module):
    """The DAC decoder with free per-stage widths and residual units (same module names)."""

    def __init__(self, cfg: LightDecoderConfig) -> None:
        super().__init__()
        ch = cfg.channels
        layers: list[nn.Module] = [WNConv1d(cfg.latent_dim, ch[0], kernel_size=7, padding=3)]
        for i, stride in enumerate(cfg.rates):
            layers.append(DecoderBlock(ch[i], ch[i + 1], stride, cfg.dilations))
        layers += [Snake1d(ch[-1]), WNConv1d(ch[-1], 1, kernel_size=7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build_light_dac(cfg: LightDecoderConfig) -> DAC:
    """A decoder-only :class:`~foleyserve.models.vae.DAC` whose decoder is a :class:`LightDecoder`.

    The DAC shell keeps ``decode``, ``sample_rate``, ``hop_length`` and ``fold_weight_norm``, so
    the engine, offload and export code see the same interface as the teacher's.
    """
    cfg.validate()
    rates = list(cfg.rates)
    # The shell is built at its smallest legal width, then its decoder replaced.
    with torch.device("meta"):
        dac = DAC(encoder_dim=1, encoder_rates=rates, latent_dim=cfg.latent_dim, decoder_dim=2 ** len(rates),
                  decoder_rates=rates, sample_rate=cfg.sample_rate, decoder_only=True)
    dac = dac.to_empty(device="cpu")
    # The teacher's 1x1 post_quant_conv is linear and feeds a linear conv: the light decoder's
    # input conv absorbs it (for the demo's toy decoder it alone is a quarter of the parameters).
    dac.post_quant_conv = nn.Identity()  # type: ignore[assignment]
    dac.decoder = LightDecoder(cfg)  # type: ignore[assignment]
    dac.light_config = cfg  # type: ignore[attr-defined]
    return dac.eval()


def decoder_params(dac: nn.Module) -> int:
    """Parameters on the decode path (``post_quant_conv``, if any, and ``decoder``)."""
    return sum(p.numel() for m in (dac.post_quant_conv, dac.decoder) for p in m.parameters())


def teacher_widths(teacher: DAC) -> list[int]:
    """The teacher decoder's stage widths: decoder_dim, then halved after each block."""
    return [teacher.decoder_dim // 2**i for i in range(len(teacher.decoder_rates) + 1)]


def light_config_for(teacher: DAC, *, budget: float = 0.18, dilations: Sequence[int] = (1, 9), min_width: int = 1) -> LightDecoderConfig:
    """The widest light config under ``budget`` x the teacher's decode-path parameters.

    Every stage is scaled by one factor (the teacher's halving is kept), searched in 1 % steps;
    the default budget leaves a margin under the 20 % ceiling.
    """
    widths = teacher_widths(teacher)
    total = decoder_params(teacher)
    rates = tuple(teacher.decoder_rates)
    base = dict(rates=rates, dilations=tuple(dilations), latent_dim=teacher.latent_dim, sample_rate=int(teacher.sample_rate),
                teacher={"decoder_dim": teacher.decoder_dim, "decoder_rates": list(rates), "decode_params": total})
    for pct in range(100, 0, -1):
        chans = tuple(max(min_width, round(w * pct / 100)) for w in widths)
        cfg = LightDecoderConfig(channels=chans, **base)  # type: ignore[arg-type]
        with torch.device("meta"):
            n = sum(p.numel() for p in LightDecoder(cfg).parameters())
        if n <= budget * total:
            return cfg
    raise LightDecoderError(f"no light decoder fits {budget:.0%} of a {total}-parameter decoder")


def save_light_decoder(path: str | Path, dac: DAC) -> Path:
    """Write the light decoder's weights (weight-norm layout) and config."""
    from safetensors.torch import save_file

    cfg: LightDecoderConfig = dac.light_config  # type: ignore[attr-defined]
    path = Path(path)
    sd = {k: v.detach().float().contiguous().cpu() for k, v in dac.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={META_KEY: cfg.to_json()})
    tmp.replace(path)
    return path


def read_light_config(path: str | Path) -> LightDecoderConfig:
    """A light decoder file's config, without loading its weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LightDecoderError(f"light decoder {path} does not exist; make one with `foleyserve distill train --target decoder`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors' own error types
        raise LightDecoderError(f"light decoder {path} is not a safetensors file ({e})") from None
    if META_KEY not in meta:
        raise LightDecoderError(f"{path} is not a light decoder (no {META_KEY} metadata); make one with `foleyserve distill train --target decoder`")
    return LightDecoderConfig.from_json(meta[META_KEY], str(path))


def load_light_decoder(path: str | Path, *, device: torch.device | str = "cpu") -> DAC:
    """The light decoder of a file, fp32 (the DAC always runs in fp32), ready to decode."""
    from safetensors.torch import load_file

    cfg = read_light_config(path)
    dac = build_light_dac(cfg)
    try:
        dac.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise LightDecoderError(f"light decoder {path} does not fit its recorded config: {str(e).splitlines()[0]}") from None
    return dac.to(device).eval()
