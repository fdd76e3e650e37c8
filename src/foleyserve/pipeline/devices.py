"""Which device and which load dtype a device string and a precision policy mean.

Apart from the engine so that the CLI's checks before loading can use them without importing it.
"""

from __future__ import annotations

import torch

from foleyserve.pipeline.requests import RequestError

# Precision policy -> the dtype the checkpoints are loaded in before the policy converts the DiT.
PRECISIONS = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.bfloat16,
    "fp8-weight-only": torch.bfloat16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise RequestError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RequestError(f"device {device!r} asked for, but this machine has no usable CUDA GPU; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise RequestError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return dev


def resolve_precision(precision: str) -> torch.dtype:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise RequestError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}") from None
