"""DAC-VAE (continuous variant, 48 kHz): the audio latent codec of HunyuanVideo-Foley.

Parameter names and shapes match the official ``vae_128d_48k.pth`` state dict, so it loads with
``strict=True``. Weight norm is stored the old way (``weight_g`` / ``weight_v``) because that is
what the checkpoint holds; new torch's parametrizations would rename the keys.

Only the continuous (VAE) variant exists here: the real checkpoint has ``quant_conv`` /
``post_quant_conv`` and no quantizer, and the pipeline only ever decodes continuous latents.

Inference only decodes, so it builds the DAC ``decoder_only``: no encoder and no ``quant_conv``
(1.18 of the 1.49 GB of the real model). Tests and tools that encode build the full model.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# Constructor defaults of the official class. The official loader builds the model from the
# checkpoint's metadata kwargs on top of these, so a kwarg absent from the metadata means this.
_OFFICIAL_DEFAULTS: dict[str, Any] = {
    "encoder_dim": 64,
    "encoder_rates": [2, 4, 8, 8],
    "latent_dim": None,
    "decoder_dim": 1536,
    "decoder_rates": [8, 8, 4, 2],
    "n_codebooks": 9,
    "codebook_size": 1024,
    "codebook_dim": 8,
    "quantizer_dropout": False,
    "sample_rate": 44100,
    "continuous": False,
}
# Only the discrete (RVQ) variant reads these; accepting them keeps real metadata loadable.
_QUANTIZER_ONLY = {"n_codebooks", "codebook_size", "codebook_dim", "quantizer_dropout"}

# The official posterior clamps log-variance to this range before anyone sees it.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0

# State-dict prefixes used only by encode(); a decoder-only model neither builds nor loads them.
ENCODER_PREFIXES = ("encoder.", "quant_conv.")

log = logging.getLogger(__name__)


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x + sin(alpha*x)^2 / (alpha + 1e-9), alpha shaped [1, C, 1]."""
    inv = (alpha + 1e-9).reciprocal()
    if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad):
        return x + inv * torch.sin(alpha * x).pow(2)
    # Inference: one buffer instead of five; these are the largest activations of the decoder.
    # Operation order equals the official expression, so results are unchanged.
    out = torch.mul(alpha, x)
    out.sin_().square_().mul_(inv)
    return out.add_(x)


class Snake1d(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return snake(x, self.alpha)


def _weight_norm(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g * v / ||v||, the norm over every dim but 0 (torch.nn.utils.weight_norm with dim=0).

    For a transposed conv dim 0 is the *input* channel, so the official checkpoint normalises per
    input channel there.
    """
    if _fused_weight_norm is not None:
        # The kernel the official module runs: its reduction order is what the reference outputs
        # were made with, so using it keeps us bit-identical instead of ~1 ulp off per weight.
        return _fused_weight_norm(v, g, 0)
    norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
    return v * (g / norm)


# Private but long-standing (old and new torch weight-norm APIs both call it); fall back if it goes.
_fused_weight_norm = getattr(torch, "_weight_norm", None)


class _WNConvBase(nn.Module):
    """Shared part of the weight-normed convs; subclasses define the weight layout and the op."""

    transposed = False

    def __init__(self, weight_shape: tuple[int, int, int], bias_channels: int) -> None:
        super().__init__()
        # Registration order bias, g, v mirrors the official state dict ordering.
        self.bias = nn.Parameter(torch.empty(bias_channels))
        self.weight_g = nn.Parameter(torch.empty(weight_shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.empty(*weight_shape))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Same as a fresh nn.Conv1d wrapped by weight_norm: g starts at ||v||, so weight == v.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        fan_in = self.weight_v.shape[0 if self.transposed else 1] * self.weight_v.shape[2]
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.bias, -bound, bound)
        self.weight_g.copy_(torch.linalg.vector_norm(self.weight_v, dim=(1, 2), keepdim=True))

    def weight(self) -> torch.Tensor:
        return _weight_norm(self.weight_v, self.weight_g)

    def _plain(self) -> nn.Module:
        raise NotImplementedError

    def folded(self) -> nn.Module:
        """The equivalent plain conv with the weight norm computed once."""
        # Built on meta so the throwaway default init costs nothing, then given the real tensors.
        conv = self._plain()
        conv.weight = nn.Parameter(self.weight().detach(), requires_grad=self.weight_v.requires_grad)
        conv.bias = self.bias
        return conv


class WNConv1d(_WNConvBase):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
    ) -> None:
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        super().__init__((out_channels, in_channels, kernel_size), out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)

    def _plain(self) -> nn.Conv1d:
        return nn.Conv1d(
            self.in_channels, self.out_channels, self.kernel_size,
            stride=self.stride, padding=self.padding, dilation=self.dilation, device="meta",
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )


class WNConvTranspose1d(_WNConvBase):
    transposed = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        output_padding: int = 0,
    ) -> None:
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        super().__init__((in_channels, out_channels, kernel_size), out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(
            x, self.weight(), self.bias, self.stride, self.padding, self.output_padding
        )

    def _plain(self) -> nn.ConvTranspose1d:
        return nn.ConvTranspose1d(
            self.in_channels, self.out_channels, self.kernel_size,
            stride=self.stride, padding=self.padding, output_padding=self.output_padding, device="meta",
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, output_padding={self.output_padding}"
        )


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            WNConv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation),
            Snake1d(dim),
            WNConv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        # "Same" padding keeps lengths equal for every config in use; the centre crop only
        # matters for unpadded variants and is kept so such a variant would still behave.
        crop = (x.shape[-1] - y.shape[-1]) // 2
        if crop > 0:
            x = x[..., crop:-crop]
        return x + y


def _strided_padding(stride: int) -> int:
    # With kernel 2*stride this makes each stage change the length by exactly `stride`.
    return math.ceil(stride / 2)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        half = dim // 2
        self.block = nn.Sequential(
            ResidualUnit(half, dilation=1),
            ResidualUnit(half, dilation=3),
            ResidualUnit(half, dilation=9),
            Snake1d(half),
            WNConv1d(half, dim, kernel_size=2 * stride, stride=stride, padding=_strided_padding(stride)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Encoder(nn.Module):
    def __init__(self, d_model: int, strides: list[int], d_latent: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [WNConv1d(1, d_model, kernel_size=7, padding=3)]
        for stride in strides:
            d_model *= 2
            layers.append(EncoderBlock(d_model, stride))
        layers += [Snake1d(d_model), WNConv1d(d_model, d_latent, kernel_size=3, padding=1)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DecoderBlock(nn.Module):
    # ``dilations``: the official three residual units, or fewer (the distilled light decoder).
    def __init__(self, input_dim: int, output_dim: int, stride: int, dilations: Sequence[int] = (1, 3, 9)) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(input_dim),
            WNConvTranspose1d(
                input_dim, output_dim, kernel_size=2 * stride, stride=stride,
                padding=_strided_padding(stride), output_padding=stride % 2,
            ),
            *(ResidualUnit(output_dim, dilation=d) for d in dilations),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Decoder(nn.Module):
    def __init__(self, input_channel: int, channels: int, rates: list[int], d_out: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [WNConv1d(input_channel, channels, kernel_size=7, padding=3)]
        out_dim = channels
        for i, stride in enumerate(rates):
            in_dim, out_dim = channels // 2**i, channels // 2 ** (i + 1)
            layers.append(DecoderBlock(in_dim, out_dim, stride))
        layers += [Snake1d(out_dim), WNConv1d(out_dim, d_out, kernel_size=7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class DAC(nn.Module):
    """Continuous DAC: encode audio to a diagonal Gaussian, decode latents to mono audio.

    ``decoder_only=True`` leaves out the encoder side (``encoder`` and ``quant_conv``, both
    ``None`` then); :meth:`encode` raises on such a model.
    """

    def __init__(
        self,
        encoder_dim: int,
        encoder_rates: list[int],
        latent_dim: int,
        decoder_dim: int,
        decoder_rates: list[int],
        sample_rate: int,
        decoder_only: bool = False,
    ) -> None:
        super().__init__()
        self.encoder_dim, self.encoder_rates = encoder_dim, list(encoder_rates)
        self.decoder_dim, self.decoder_rates = decoder_dim, list(decoder_rates)
        self.latent_dim = latent_dim
        self.sample_rate = sample_rate
        self.hop_length = math.prod(self.encoder_rates)
        self.continuous = True
        self.decoder_only = decoder_only

        self.encoder: Encoder | None = None if decoder_only else Encoder(encoder_dim, self.encoder_rates, latent_dim)
        self.quant_conv: nn.Conv1d | None = None if decoder_only else nn.Conv1d(latent_dim, 2 * latent_dim, 1)
        self.post_quant_conv = nn.Conv1d(latent_dim, latent_dim, 1)
        self.decoder = Decoder(latent_dim, decoder_dim, self.decoder_rates)

    def encode(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, 1, T] -> (mean, clamped logvar), each [B, latent_dim, T / hop_length].

        Like the official ``encode`` this does not pad: T should be a multiple of ``hop_length``
        (the official ``forward`` right-pads with zeros first; see ``pad_to_hop``).
        """
        if self.encoder is None or self.quant_conv is None:
            raise RuntimeError(
                "this DAC was built decoder_only (for inference) and has no encoder: "
                "build it with build_dac(kwargs) or dac_from_checkpoint(obj) to encode audio"
            )
        moments = self.quant_conv(self.encoder(audio))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, _LOGVAR_MIN, _LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent_dim, L] -> audio [B, 1, L * hop_length] in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def drop_encoder(self) -> "DAC":
        """Free the encoder side of a built model, making it decoder-only (for inference).

        For models whose weights were made whole (the demo's seeded ones); loaders build without
        the encoder instead (``decoder_only=True``), which never allocates it.
        """
        self.encoder = None
        self.quant_conv = None
        self.decoder_only = True
        return self

    def pad_to_hop(self, audio: torch.Tensor) -> torch.Tensor:
        """Right zero-pad the last axis to a multiple of ``hop_length`` (the official preprocess)."""
        pad = -audio.shape[-1] % self.hop_length
        return F.pad(audio, (0, pad)) if pad else audio

    @torch.no_grad()
    def fold_weight_norm(self) -> "DAC":
        """Replace every weight-normed conv by a plain conv holding g * v / ||v||.

        The folded weight is computed once instead of on every call. The state dict afterwards has
        ``weight`` keys instead of ``weight_g`` / ``weight_v``, so fold only after loading.
        """
        targets = [
            (parent, name, child)
            for parent in self.modules()
            for name, child in parent.named_children()
            if isinstance(child, _WNConvBase)
        ]
        for parent, name, child in targets:
            setattr(parent, name, child.folded())
        return self


def _resolve_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(kwargs) - set(_OFFICIAL_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown DAC kwargs {sorted(unknown)}; accepted: {sorted(_OFFICIAL_DEFAULTS)}"
        )
    cfg = {**_OFFICIAL_DEFAULTS, **kwargs}
    if not cfg["continuous"]:
        raise ValueError(
            "only the continuous DAC (VAE, continuous=True) is supported; got continuous="
            f"{cfg['continuous']!r} (the discrete RVQ codec is not used by HunyuanVideo-Foley)"
        )
    enc_rates, dec_rates = list(cfg["encoder_rates"]), list(cfg["decoder_rates"])
    if not enc_rates or not dec_rates or any(int(r) < 1 for r in enc_rates + dec_rates):
        raise ValueError(f"rates must be non-empty lists of positive ints: {enc_rates}, {dec_rates}")
    # decode() must give exactly hop_length samples per latent frame, which the pipeline relies on.
    if math.prod(enc_rates) != math.prod(dec_rates):
        raise ValueError(
            f"encoder_rates {enc_rates} and decoder_rates {dec_rates} have different products; "
            "decode would not invert encode's hop length"
        )
    decoder_dim = int(cfg["decoder_dim"])
    if decoder_dim % 2 ** len(dec_rates):
        raise ValueError(f"decoder_dim {decoder_dim} must be divisible by 2**{len(dec_rates)}")
    latent_dim = cfg["latent_dim"]
    if latent_dim is None:
        latent_dim = int(cfg["encoder_dim"]) * 2 ** len(enc_rates)
    return {
        "encoder_dim": int(cfg["encoder_dim"]),
        "encoder_rates": [int(r) for r in enc_rates],
        "latent_dim": int(latent_dim),
        "decoder_dim": decoder_dim,
        "decoder_rates": [int(r) for r in dec_rates],
        "sample_rate": int(cfg["sample_rate"]),
    }


def build_dac(kwargs: Mapping[str, Any], *, decoder_only: bool = False) -> DAC:
    """Build a DAC from the official ``metadata.kwargs``; quantizer-only kwargs are ignored.

    Missing kwargs take the official constructor defaults, as the official loader does.
    ``decoder_only``: do not build the encoder side (for inference, which only decodes).
    Raises ValueError for unknown kwargs, ``continuous=False`` or an inconsistent config.
    """
    return DAC(**_resolve_kwargs(kwargs), decoder_only=decoder_only)


def _describe_mismatch(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> str:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if not (missing or unexpected or misshaped):
        return ""

    def show(keys: list[str], fmt) -> str:
        head = ", ".join(fmt(k) for k in keys[:20])
        return head + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")

    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {show(missing, str)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {show(unexpected, str)}")
    if misshaped:
        parts.append(
            f"mis-shaped keys ({len(misshaped)}): "
            + show(misshaped, lambda k: f"{k} checkpoint {list(got[k])} vs model {list(expected[k])}")
        )
    return "; ".join(parts)


def dac_from_checkpoint(obj: Mapping[str, Any], *, decoder_only: bool = False) -> DAC:
    """Load the object stored in the official ``vae_128d_48k.pth``.

    ``obj`` is ``{"state_dict": ..., "metadata": {"kwargs": {...}}}``. Unlike the official loader
    (``strict=False``, silently skipping missing keys) every key must be present and shaped right.
    The model takes over the checkpoint's tensors (no copy, no throwaway random init).

    ``decoder_only``: build and load only the decoder side (strictly); the checkpoint's encoder
    keys (``ENCODER_PREFIXES``) are skipped, and their count logged.
    """
    try:
        sd = obj["state_dict"]
        kwargs = dict(obj["metadata"]["kwargs"])
    except (KeyError, TypeError) as exc:
        raise ValueError(
            "not a DAC checkpoint: expected a dict with 'state_dict' and 'metadata' -> 'kwargs'"
        ) from exc
    # The official loader drops kwargs that the constructor does not take; do the same, loudly.
    unknown = sorted(set(kwargs) - set(_OFFICIAL_DEFAULTS))
    if unknown:
        warnings.warn(f"ignoring DAC checkpoint kwargs not used by the model: {unknown}", stacklevel=2)
        for key in unknown:
            del kwargs[key]

    if decoder_only:
        skipped = [k for k in sd if k.startswith(ENCODER_PREFIXES)]
        sd = {k: v for k, v in sd.items() if not k.startswith(ENCODER_PREFIXES)}
        log.info("DAC decoder only: %d encoder tensors of the checkpoint not loaded", len(skipped))
    with torch.device("meta"):
        model = build_dac(kwargs, decoder_only=decoder_only)
    problem = _describe_mismatch(model, sd)
    if problem:
        raise ValueError(f"DAC checkpoint does not fit the model built from its kwargs {kwargs}: {problem}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
