"""Memory policies: where each model's weights live between and during the stages.

- ``none``: every model stays on the device.
- ``stage``: every model lives in host RAM (page-locked when CUDA is present, so copies are
  asynchronous and fast); only the running stage's model is on the device. Weights are copied
  host -> device when a stage starts, and dropped (not copied back: they did not change) when it
  ends. No disk reads after start-up, unlike the official offload, which deletes and re-reads the
  checkpoints for every video.
- ``sequential``: like ``stage``, and the denoiser's blocks are streamed too: the small parts of
  the DiT stay resident while each block is copied in just before it runs, the next block's copy
  already in flight on a side stream, and dropped after. Peak device memory is then about two blocks
  plus activations; the price is one host->device copy of the block weights per step.

The host copy is the source of truth. It is one :class:`HostSlab` per group of modules: a single
host allocation that every weight is a typed view of. A module's parameters and buffers are
re-pointed (``tensor.data``) at the host view or at a device copy of it. Modules, parameter names
and outputs are unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import mmap
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

# Every view in a slab starts on a multiple of this many bytes: a multiple of every dtype's size
# (so the uint8 -> dtype view is legal) and of a cache line, so no two tensors share one.
ALIGN = 64

# cudaHostRegisterPortable: the pages count as pinned for every CUDA context (what torch uses).
_REGISTER_PORTABLE = 1


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters()] + [b for b in module.buffers()]


def _align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _dense_strides(t: torch.Tensor) -> tuple[int, ...] | None:
    """``t``'s strides if they lay it out without gaps in some dimension order (a transpose, a
    channels-last weight), else None (then the slab holds it contiguous).

    Keeping such layouts matters for kernels that want a given major order (e.g. ``_scaled_mm``'s
    column-major operand) and costs nothing: a dense layout spans exactly ``numel`` elements.
    """
    if t.is_contiguous():
        return None
    expect = 1
    for d in sorted(range(t.dim()), key=lambda d: t.stride(d)):
        if t.size(d) != 1 and t.stride(d) != expect:
            return None
        expect *= t.size(d)
    return tuple(t.stride())


# ----------------------------------------------------------------------------- page-locking


def _cuda_host_register(ptr: int, nbytes: int) -> int:
    """cudaHostRegister; returns the CUDA error code (0 = pinned). Tests replace this."""
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _REGISTER_PORTABLE))


def _cuda_host_unregister(ptr: int) -> int:
    """cudaHostUnregister; returns the CUDA error code. Tests replace this."""
    return int(torch.cuda.cudart().cudaHostUnregister(ptr))


class _Mapping(mmap.mmap):
    """Anonymous memory that is page-locked in place once filled, and unlocked before it is unmapped.

    ``torch.frombuffer`` keeps this object alive for as long as any view of the slab lives, so
    ``__del__`` runs exactly when the last weight using the memory is gone, before the base class
    unmaps the pages (the driver must not keep a registration of unmapped memory).
    """

    registered: int | None = None  # the registered address while pinned

    def __del__(self) -> None:
        ptr, self.registered = self.registered, None
        if ptr is None:
            return
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                # No copy may still be reading these pages. (The current device: this engine
                # runs on one device; a multi-device user would need each device synchronised.)
                torch.cuda.synchronize()
            _cuda_host_unregister(ptr)
        except Exception:  # interpreter shutdown: the process is going anyway
            pass


class HostSlab:
    """One host allocation holding many tensors back to back, each a typed view of it.

    Why one allocation: PyTorch's pinned (caching host) allocator rounds every request up to a
    power of two, so pinning each tensor separately cost 16.4 GB for the 10.3 GB XXL DiT. Asking the
    same allocator for one big buffer would round too (10.3 GB -> 16 GiB). So a pinned slab is plain
    anonymous memory, filled first and then page-locked in place with ``cudaHostRegister``: exactly
    its own pages are locked. Unpinned (no CUDA, or ``pin=False``) it is an ordinary CPU tensor;
    the carving is the same either way, which is what lets CPU tests check it.

    Build it with :meth:`adopt`. ``host_bytes`` is the slab's size: the tensors' bytes
    (``tensor_bytes``) plus under ``ALIGN`` bytes of padding before each tensor.
    """

    def __init__(self, storage: torch.Tensor, views: list[torch.Tensor], tensor_bytes: int, mapping: _Mapping | None) -> None:
        self.storage = storage  # uint8 [host_bytes]
        self.views = views  # one per tensor given to adopt, in that order
        self.tensor_bytes = tensor_bytes
        self._mapping = mapping
        self.pinned = False

    @property
    def host_bytes(self) -> int:
        return self.storage.numel()

    @classmethod
    def adopt(cls, tensors: Sequence[torch.Tensor], *, pin: bool, align: int = ALIGN) -> "HostSlab":
        """Copy ``tensors`` into one new slab and re-point each at its view there.

        Each tensor is re-pointed (``t.data = view``) right after its copy, so its old storage is
        freed as soon as nothing else holds it: weights already on the host are not kept twice,
        and host memory grows by about one tensor at a time rather than by the whole slab. A tensor
        object listed twice gets one view. ``pin``: page-lock the slab for fast asynchronous
        host->device copies (needs CUDA; if the driver refuses, the slab stays pageable and a
        warning is logged, which keeps copies correct but synchronous).
        """
        if align < 1 or any(align % t.element_size() for t in tensors):
            raise ValueError(f"align={align} is not a multiple of every tensor's element size")
        offsets: dict[int, int] = {}
        unique: list[torch.Tensor] = []
        end = 0
        for t in tensors:
            if id(t) in offsets:
                continue
            offsets[id(t)] = off = _align_up(end, align)
            unique.append(t)
            end = off + _nbytes(t)
        # Private anonymous pages: ordinary process memory (as malloc's), page-aligned, so no locked
        # page is shared with another allocation. mmap refuses length 0.
        mapping = _Mapping(-1, end, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) if pin and end else None
        storage = torch.frombuffer(mapping, dtype=torch.uint8) if mapping is not None else torch.empty(end, dtype=torch.uint8)
        made: dict[int, torch.Tensor] = {}
        for t in unique:
            off, n = offsets[id(t)], _nbytes(t)
            typed = storage[off : off + n].view(t.dtype)
            strides = _dense_strides(t)
            view = typed.view(t.shape) if strides is None else typed.as_strided(t.shape, strides)
            view.copy_(t.detach())
            t.data = view
            made[id(t)] = view
        slab = cls(storage, [made[id(t)] for t in tensors], sum(_nbytes(t) for t in unique), mapping)
        if mapping is not None:
            slab._pin()
        return slab

    def _pin(self) -> None:
        # Registered after filling: the copies above already faulted every page in, which is much
        # cheaper than having the driver fault them in while it locks them.
        assert self._mapping is not None
        ptr = self.storage.data_ptr()
        try:
            err: object = _cuda_host_register(ptr, self.host_bytes)
        except Exception as exc:  # no CUDA in this build or on this machine
            err = exc
        if err != 0:
            log.warning(
                "could not page-lock the %.2f GiB host copy of the weights (%s); "
                "host->device copies will be slower and synchronous", self.host_bytes / 2**30,
                f"CUDA error {err}" if isinstance(err, int) else err,
            )
            return
        self._mapping.registered = ptr
        self.pinned = True


def _default_pin(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


@dataclass(eq=False)
class HostCopy:
    """The host-resident weights of one module and a way to put them on the device and back.

    ``tensors`` are the module's parameters and buffers; ``host`` their homes in a slab. Loading
    re-points each tensor at a device copy of its home, releasing re-points it back (the device
    copy is dropped, not copied back: weights do not change). ``copy_on_cpu``: on a CPU target,
    make real copies anyway, so that tests can see the weights move.
    """

    module: nn.Module
    device: torch.device
    tensors: list[torch.Tensor]
    host: list[torch.Tensor]
    slab: HostSlab | None = None
    copy_on_cpu: bool = False
    on_device: bool = False
    loads: int = 0  # how many times the weights were copied in (for tests and benchmarks)
    releases: int = 0
    _ready: "torch.cuda.Event | None" = field(default=None, repr=False)
    _alloc_stream: "torch.cuda.Stream | None" = field(default=None, repr=False)

    @classmethod
    def of(cls, module: nn.Module, device: torch.device, *, pin: bool | None = None, copy_on_cpu: bool = False) -> "HostCopy":
        """One module's weights in a slab of their own (page-locked when ``device`` is CUDA)."""
        return cls.group([module], device, pin=pin, copy_on_cpu=copy_on_cpu)[0]

    @classmethod
    def group(
        cls, modules: Sequence[nn.Module], device: torch.device, *, pin: bool | None = None, copy_on_cpu: bool = False
    ) -> list["HostCopy"]:
        """One :class:`HostCopy` per module, all of them carved out of one shared slab."""
        per = [_tensors(m) for m in modules]
        slab = HostSlab.adopt([t for ts in per for t in ts], pin=_default_pin(device) if pin is None else pin)
        out, k = [], 0
        for module, ts in zip(modules, per):
            out.append(cls(module, device, ts, slab.views[k : k + len(ts)], slab, copy_on_cpu))
            k += len(ts)
        return out

    @property
    def host_bytes(self) -> int:
        """Bytes of the slab this copy lives in (shared with the rest of its group)."""
        return self.slab.host_bytes if self.slab is not None else 0

    def load(self, stream: "torch.cuda.Stream | None" = None) -> None:
        """Copy the weights to the device (asynchronously on ``stream`` when given; then the
        consumer must call :meth:`wait` before using them)."""
        if self.on_device:
            return
        self.on_device = True
        self.loads += 1
        if self.device.type != "cuda":
            if self.copy_on_cpu:
                for t, h in zip(self.tensors, self.host):
                    t.data = h.clone()
            return
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            # The copies are allocated on this stream: the allocator ties their memory to it.
            self._alloc_stream = torch.cuda.current_stream(self.device)
            for t, h in zip(self.tensors, self.host):
                t.data = h.to(self.device, non_blocking=True)
            if stream is not None:
                self._ready = torch.cuda.Event()
                self._ready.record(stream)

    def wait(self) -> None:
        """Make the current stream wait for a side-stream :meth:`load`, and mark the copies as used
        by it. A no-op after a load on the current stream, or on a CPU target."""
        if self._ready is None:
            return
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(self._ready)
        self._ready = None
        if consumer != self._alloc_stream:
            # The copies were allocated on the side stream, and the caching allocator only tracks
            # that stream: once release() drops them, it would hand their memory to the side
            # stream's next allocation (the next prefetch) at once, and that copy could overwrite
            # the weights while kernels queued on this stream still read them (silent corruption
            # once a block's compute outlasts a block's copy). record_stream makes the allocator
            # wait, at free time, for the work queued on this stream to finish.
            for t in self.tensors:
                t.data.record_stream(consumer)

    def release(self) -> None:
        """Point the module back at its host weights; the device copies are freed."""
        if not self.on_device:
            return
        for t, h in zip(self.tensors, self.host):
            t.data = h
        self.on_device = False
        self.releases += 1
        self._ready = None
        self._alloc_stream = None


class StageOffload:
    """Keeps models in host RAM and lends each to the device for the length of a stage."""

    def __init__(self, device: torch.device, *, pin: bool | None = None) -> None:
        self.device = device
        self.pin = pin
        self._copies: dict[int, HostCopy] = {}
        self._after: dict[int, Callable[[], None]] = {}
        self.streamers: list["SequentialBlocks"] = []

    def register(self, module: nn.Module) -> None:
        """Move ``module``'s weights into a host slab of their own; lend them per stage from now on."""
        self._copies[id(module)] = HostCopy.of(module, self.device, pin=self.pin)

    def after_stage(self, module: nn.Module, fn: Callable[[], None]) -> None:
        """Call ``fn`` whenever a stage that borrowed ``module`` ends (even if it failed)."""
        self._after[id(module)] = fn

    @property
    def host_bytes(self) -> int:
        """Host bytes of every slab this lender manages, the streamed blocks' included."""
        slabs = {id(c.slab): c.slab for c in self._copies.values() if c.slab is not None}
        return sum(s.host_bytes for s in slabs.values()) + sum(s.host_bytes for s in self.streamers)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the weights themselves (``host_bytes`` minus alignment padding)."""
        slabs = {id(c.slab): c.slab for c in self._copies.values() if c.slab is not None}
        return sum(s.tensor_bytes for s in slabs.values()) + sum(s.tensor_bytes for s in self.streamers)

    @contextlib.contextmanager
    def on_device(self, module: nn.Module) -> Iterator[nn.Module]:
        copy = self._copies.get(id(module))
        after = self._after.get(id(module))
        if copy is not None:
            copy.load()
        try:
            yield module
        finally:
            if copy is not None:
                copy.release()
            if after is not None:
                after()


_MISSING = object()


def entry_points(block: nn.Module) -> tuple[str, ...]:
    """The methods through which ``block`` is called from outside: ``forward`` plus the names in its
    ``offload_entry_points`` attribute (``("text_kv",)`` for a block that has a ``text_kv`` method
    but does not declare any)."""
    declared = getattr(block, "offload_entry_points", None)
    if declared is None:
        declared = ("text_kv",) if callable(getattr(block, "text_kv", None)) else ()
    names = ("forward",) + tuple(n for n in declared if n != "forward")
    for name in names:
        if not callable(getattr(block, name, None)):
            raise TypeError(f"{type(block).__name__} declares offload entry point {name!r} but has no such method")
    return names


class SequentialBlocks:
    """Streams a model's block list through the device with one block of prefetch.

    ``blocks`` run in this order (the DiT's triple blocks, then single blocks). Every entry point of
    a block (``forward`` and the methods :func:`entry_points` names, e.g. the triple blocks'
    ``text_kv``, which the DiT calls directly) is wrapped: a call makes sure the block's weights are
    on the device (loads them or waits for their prefetch), starts copying the next block that has
    the same entry point on a side stream, runs, and releases the block. A call nested inside
    another call of the same block (an entry point calling ``forward``) neither loads nor releases:
    a per-block depth counter keeps the weights until the outermost call returns.

    All block weights share one host slab (``host_bytes``). ``copy_on_cpu`` makes real copies on a
    CPU target (for tests).
    """

    def __init__(
        self, blocks: Sequence[nn.Module], device: torch.device, *, pin: bool | None = None, copy_on_cpu: bool = False
    ) -> None:
        self.device = device
        self.blocks = list(blocks)
        self.copies = HostCopy.group(self.blocks, device, pin=pin, copy_on_cpu=copy_on_cpu) if self.blocks else []
        self.slab = self.copies[0].slab if self.copies else None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.depth = [0] * len(self.blocks)
        self._patched: list[tuple[nn.Module, str, Any]] = []
        names = [entry_points(b) for b in self.blocks]
        for i, block in enumerate(self.blocks):
            for name in names[i]:
                nxt = i + 1 if i + 1 < len(self.blocks) and name in names[i + 1] else None
                self._wrap(i, block, name, nxt)

    @property
    def host_bytes(self) -> int:
        return self.slab.host_bytes if self.slab is not None else 0

    @property
    def tensor_bytes(self) -> int:
        return self.slab.tensor_bytes if self.slab is not None else 0

    def _wrap(self, i: int, block: nn.Module, name: str, nxt: int | None) -> None:
        original = getattr(block, name)
        self._patched.append((block, name, block.__dict__.get(name, _MISSING)))

        @functools.wraps(original)
        def streamed(*args: Any, **kwargs: Any) -> Any:
            self._enter(i, nxt)
            try:
                return original(*args, **kwargs)
            finally:
                self._exit(i)

        # An instance attribute shadows the class's method; nn.Module.__call__ looks up
        # self.forward, so the module's own hooks still run around the streamed forward.
        setattr(block, name, streamed)

    def _enter(self, i: int, nxt: int | None) -> None:
        self.depth[i] += 1
        if self.depth[i] > 1:  # nested: the outer call already holds the weights
            return
        try:
            copy = self.copies[i]
            copy.load()  # a no-op when the prefetch already started it
            copy.wait()
            if nxt is not None:
                self.copies[nxt].load(self.stream)
        except BaseException:
            self._exit(i)
            raise

    def _exit(self, i: int) -> None:
        self.depth[i] -= 1
        if self.depth[i] == 0:
            self.copies[i].release()

    def release_all(self) -> None:
        """Drop prefetched blocks that were never run (e.g. the step cache skipped the rest of the
        blocks); the pipeline calls this when the denoising stage ends."""
        for copy, depth in zip(self.copies, self.depth):
            if depth == 0:
                copy.release()

    def remove(self) -> None:
        """Undo the wrapping and leave every block on the host."""
        for block, name, previous in reversed(self._patched):
            if previous is _MISSING:
                delattr(block, name)
            else:
                setattr(block, name, previous)
        self._patched.clear()
        for c in self.copies:
            c.release()


def apply_offload(
    mode: str, device: torch.device, models: dict[str, nn.Module], dit: nn.Module | None = None, *, pin: bool | None = None
) -> StageOffload | None:
    """Set up ``mode`` for the named models; returns the stage lender (None for ``none``).

    With ``sequential`` the DiT's blocks are streamed and the rest of the DiT is resident; the other
    models are lent per stage. ``pin`` overrides page-locking the host copies (default: when
    ``device`` is CUDA). The lender's ``host_bytes`` is the host memory the weights occupy.
    """
    if mode == "none":
        return None
    if mode not in ("stage", "sequential"):
        raise ValueError(f"unknown offload mode {mode!r}: choose none, stage or sequential")
    lender = StageOffload(device, pin=pin)
    for name, module in models.items():
        if mode == "sequential" and module is dit:
            continue
        lender.register(module)
    if mode == "sequential" and dit is not None:
        blocks = list(dit.triple_blocks) + list(dit.single_blocks)
        streamer = SequentialBlocks(blocks, device, pin=pin)
        dit._foleyserve_stream = streamer  # type: ignore[attr-defined]
        lender.streamers.append(streamer)
        # A block prefetched but never run (the step cache skipped it) is dropped with the stage.
        lender.after_stage(dit, streamer.release_all)
        # Everything else of the DiT (embedders, final layer, learned empties) is small: resident.
        for name, child in dit.named_children():
            if name not in ("triple_blocks", "single_blocks"):
                child.to(device)
        for t in list(dit.parameters(recurse=False)) + list(dit.buffers(recurse=False)):
            t.data = t.data.to(device)
    log.info("offload %s: weights in %.2f GiB of host memory", mode, lender.host_bytes / 2**30)
    return lender
