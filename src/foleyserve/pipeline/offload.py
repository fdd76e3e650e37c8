"""Memory policies: where each model's weights live between and during the stages.

- ``none``: every model stays on the device.
- ``stage``: every model lives in host RAM (pinned when CUDA is present, so copies are
  asynchronous and fast); only the running stage's model is on the device. Weights are copied
  host -> device when a stage starts, and dropped (not copied back: they did not change) when it
  ends. No disk reads after start-up, unlike the official offload, which deletes and re-reads the
  checkpoints for every video.
- ``sequential``: like ``stage``, and the denoiser's blocks are streamed too: the small parts of
  the DiT stay resident while each block is copied in just before it runs, the next block's copy
  already in flight on a side stream, and dropped after. Peak device memory is then about two blocks
  plus activations; the price is one host->device copy of the block weights per step.

The host copy is the source of truth; a module's parameters are re-pointed (``param.data``) at the
host or device tensor. Modules, parameter names and outputs are unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters()] + [b for b in module.buffers()]


@dataclass
class HostCopy:
    """The host-resident weights of one module and a way to put them on the device and back."""

    module: nn.Module
    device: torch.device
    host: list[torch.Tensor] = field(default_factory=list)
    on_device: bool = False
    _ready: "torch.cuda.Event | None" = None

    @classmethod
    def of(cls, module: nn.Module, device: torch.device) -> "HostCopy":
        pin = device.type == "cuda" and torch.cuda.is_available()
        host = []
        for t in _tensors(module):
            h = t.data.to("cpu")
            if pin:
                h = h.pin_memory()
            t.data = h
            host.append(h)
        return cls(module=module, device=device, host=host)

    def load(self, stream: "torch.cuda.Stream | None" = None) -> None:
        """Copy the weights to the device (asynchronously on ``stream`` when given)."""
        if self.on_device:
            return
        if self.device.type == "cpu":
            self.on_device = True
            return
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for t, h in zip(_tensors(self.module), self.host):
                t.data = h.to(self.device, non_blocking=True)
            if stream is not None:
                self._ready = torch.cuda.Event()
                self._ready.record(stream)
        self.on_device = True

    def wait(self) -> None:
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None

    def release(self) -> None:
        """Point the module back at its host weights; the device copies are freed."""
        if not self.on_device:
            return
        for t, h in zip(_tensors(self.module), self.host):
            t.data = h
        self.on_device = False


class StageOffload:
    """Keeps models in host RAM and lends each to the device for the length of a stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._copies: dict[int, HostCopy] = {}

    def register(self, module: nn.Module) -> None:
        self._copies[id(module)] = HostCopy.of(module, self.device)

    @contextlib.contextmanager
    def on_device(self, module: nn.Module) -> Iterator[nn.Module]:
        copy = self._copies.get(id(module))
        if copy is None:  # not managed: always resident
            yield module
            return
        copy.load()
        try:
            yield module
        finally:
            copy.release()


class SequentialBlocks:
    """Streams a model's block list through the device with one block of prefetch.

    ``blocks`` run in this order on every call (the DiT's triple blocks, then single blocks).
    Forward pre-hooks make sure a block is on the device before it runs and start copying the
    next one; forward hooks release a block when it is done.
    """

    def __init__(self, blocks: list[nn.Module], device: torch.device) -> None:
        self.device = device
        self.copies = [HostCopy.of(b, device) for b in blocks]
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._handles = []
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(i)))
            self._handles.append(block.register_forward_hook(self._post_hook(i)))

    def _pre_hook(self, i: int):
        def hook(_module, _args):
            copy = self.copies[i]
            copy.load()  # no-op when the prefetch already started it
            copy.wait()
            if i + 1 < len(self.copies):
                self.copies[i + 1].load(self.stream)
        return hook

    def _post_hook(self, i: int):
        def hook(_module, _args, _out):
            self.copies[i].release()
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for c in self.copies:
            c.release()


def apply_offload(mode: str, device: torch.device, models: dict[str, nn.Module], dit: nn.Module | None = None) -> StageOffload | None:
    """Set up ``mode`` for the named models; returns the stage lender (None for ``none``).

    With ``sequential`` the DiT's blocks are streamed and the rest of the DiT is resident; the other
    models are lent per stage.
    """
    if mode == "none":
        return None
    if mode not in ("stage", "sequential"):
        raise ValueError(f"unknown offload mode {mode!r}: choose none, stage or sequential")
    lender = StageOffload(device)
    for name, module in models.items():
        if mode == "sequential" and module is dit:
            continue
        lender.register(module)
    if mode == "sequential" and dit is not None:
        blocks = list(dit.triple_blocks) + list(dit.single_blocks)
        dit._foleyserve_stream = SequentialBlocks(blocks, device)  # type: ignore[attr-defined]
        # Everything else of the DiT (embedders, final layer, learned empties) is small: resident.
        for name, child in dit.named_children():
            if name not in ("triple_blocks", "single_blocks"):
                child.to(device)
        for p in dit.parameters(recurse=False):
            p.data = p.data.to(device)
    return lender
