"""Error measures shared by the conformance tests and the fidelity tool."""

from __future__ import annotations

import math

import torch


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, computed in float64 so the measure itself adds no error."""
    b64 = b.double()
    return ((a.double() - b64).norm() / b64.norm()).item()


def snr_db(a: torch.Tensor, reference: torch.Tensor) -> float:
    err = rel_l2(a, reference)
    return math.inf if err == 0 else -20.0 * math.log10(err)
