"""One denoising step = one graph: the compiled step runner behind ``--compile``.

The whole step — every DiT block, the CFG combine and the Euler update (``sampler.euler_cfg_step``)
— is compiled by Inductor as ONE function, without graph breaks. Blocks are unrolled inside it, so
a block's index and whether it is the last one are trace-time constants of one graph instead of
keys of 19 graphs. On CUDA that function is then captured once per shape bucket in a
``torch.cuda.CUDAGraph`` with static input buffers, and every step is a replay: three tiny copies
(latents when they come from elsewhere, the timestep, the sigma delta) and one launch.

Why not ``torch.compile(mode="reduce-overhead")`` per block: CUDA-graph trees start a new
generation at every compiled call and may overwrite block k's output while block k+1 still reads it
(PyTorch issues 152887, 160281). Capturing the step ourselves gives one graph with static buffers
whose lifetimes we own.

Buckets are the shapes of the step's inputs (batch, latent length, visual/sync/text token counts,
dtypes, guidance). A request binds its conditions by copying them into the bucket's static
buffers once; the conditions never change during a request. An LRU bound (``max_graphs``) keeps
the number of captured graphs, and the memory they pin, fixed.

With the step cache on, the row subset that runs the remaining blocks changes from step to step,
so that path runs compiled pieces (``first_block``, ``rest_blocks``, ``head``; one more graph per
subset size) with the one host sync per step the cache needs, and is not captured.

Compile artifacts (Inductor, AOTAutograd and autotuning caches) can be saved and loaded with
:func:`save_compile_artifacts` / :func:`load_compile_artifacts`, so a restarted server does not
recompile from scratch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from foleyserve.models.dit import DiTConditions, FoleyDiT
from foleyserve.pipeline.sampler import _autocast_for, euler_cfg_step
from foleyserve.pipeline.stepcache import StepCache

log = logging.getLogger("foleyserve")


def _raise_dynamo_limits() -> None:
    import torch._dynamo

    # Every bucket is one cache entry of the same code object; a server's set must fit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 1024)


def _signature(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.device.type)


@dataclass(frozen=True)
class BucketKey:
    """What makes two requests share a compiled (and captured) step."""

    guidance: bool
    cached: bool  # step cache on: the piecewise path
    inputs: tuple  # shapes/dtypes of latents, scales and every condition tensor
    structure: tuple  # which optional condition tensors exist (mask, gather, sync rows)


def bucket_key(latent_shape: tuple[int, ...], scales: torch.Tensor, conditions: DiTConditions, guidance: bool, cached: bool) -> BucketKey:
    tensors = conditions.tensors()
    return BucketKey(
        guidance=guidance,
        cached=cached,
        inputs=(tuple(latent_shape), _signature(scales), *(_signature(t) for t in tensors)),
        structure=conditions.structure(),
    )


class _CompiledStep:
    """``euler_cfg_step`` over flat tensor arguments, compiled as one graph (no CUDA graph)."""

    def __init__(self, dit: FoleyDiT, structure: tuple, guidance: bool, compile_options: dict[str, Any]) -> None:
        autocast = _autocast_for(dit)

        def step(x: torch.Tensor, t: torch.Tensor, dsigma: torch.Tensor, scales: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
            # Only plain values are closed over: a closed-over tensor would become an identity guard.
            c = DiTConditions.from_tensors(structure, list(tensors))
            with autocast:
                return euler_cfg_step(dit.predict_flow, x, t, dsigma, c, scales, guidance)

        self.fn = torch.compile(step, fullgraph=True, dynamic=False, **compile_options)
        self.scales: torch.Tensor | None = None
        self.tensors: list[torch.Tensor] = []

    def bind(self, conditions: DiTConditions, scales: torch.Tensor) -> None:
        self.scales, self.tensors = scales, conditions.tensors()

    def run(self, x: torch.Tensor, t: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        return self.fn(x, t, dsigma, self.scales, *self.tensors)

    def release(self) -> None:
        self.scales, self.tensors = None, []


class _CapturedStep:
    """A :class:`_CompiledStep` captured in one CUDA graph with static inputs.

    The graph writes its result back into its own latents buffer, so consecutive steps replay
    with no copy of the latents at all.
    """

    def __init__(self, compiled: _CompiledStep, x: torch.Tensor, t: torch.Tensor, dsigma: torch.Tensor,
                 scales: torch.Tensor, conditions: DiTConditions, pool: Any) -> None:
        self.x, self.t, self.dsigma, self.scales = x.clone(), t.clone(), dsigma.clone(), scales.clone()
        self.tensors = [c.clone() for c in conditions.tensors()]
        args = (self.x, self.t, self.dsigma, self.scales, *self.tensors)
        device = x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        # Compile, autotune and let the allocator settle outside the capture; the warm-up results
        # are discarded (the inputs are copies).
        with torch.cuda.stream(side):
            for _ in range(2):
                compiled.fn(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the batcher's prepare thread keeps running encoders on other streams
        # while a new bucket is captured; only this thread's calls are restricted.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            out = compiled.fn(*args)
            self.x.copy_(out)
        self.bind(conditions, scales)

    def bind(self, conditions: DiTConditions, scales: torch.Tensor) -> None:
        for static, new in zip(self.tensors, conditions.tensors()):
            if static.data_ptr() != new.data_ptr():
                static.copy_(new)
        self.scales.copy_(scales)

    def run(self, x: torch.Tensor, t: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        if x.data_ptr() != self.x.data_ptr():
            self.x.copy_(x)
        self.t.copy_(t)
        self.dsigma.copy_(dsigma)
        self.graph.replay()
        return self.x

    def release(self) -> None:
        pass  # the static buffers stay: they are the graph's inputs


class _PiecewiseStep:
    """The step-cache path: compiled first block, remaining blocks and head, orchestrated eagerly."""

    def __init__(self, dit: FoleyDiT, guidance: bool, parts: tuple[Callable, Callable, Callable]) -> None:
        self.dit, self.guidance, self.parts = dit, guidance, parts
        self.conditions: DiTConditions | None = None
        self.scales: torch.Tensor | None = None
        self.cache: StepCache | None = None

    def bind(self, conditions: DiTConditions, scales: torch.Tensor, cache: StepCache | None) -> None:
        self.conditions, self.scales, self.cache = conditions, scales, cache

    def run(self, x: torch.Tensor, t: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        def predict(x_in: torch.Tensor, t_in: torch.Tensor, c: DiTConditions) -> torch.Tensor:
            return self.dit.predict_flow(x_in, t_in, c, self.cache, parts=self.parts)

        with _autocast_for(self.dit):
            return euler_cfg_step(predict, x, t, dsigma, self.conditions, self.scales, self.guidance)  # type: ignore[arg-type]

    def release(self) -> None:
        self.conditions = self.scales = self.cache = None


@dataclass
class StepGraphStats:
    compiled_buckets: int = 0
    captures: int = 0
    evictions: int = 0
    replays: int = 0
    requests: int = 0


@dataclass
class StepGraphs:
    """The compiled step runner (the sampler's ``runner``): one graph per shape bucket.

    ``cuda_graphs``: capture each bucket's step in a CUDA graph (default: on for CUDA devices).
    ``max_graphs``: how many buckets keep their compiled step and captured graph (LRU).
    ``compile_options``: extra ``torch.compile`` keywords (``mode`` must not be a CUDA-graph mode:
    the capture here replaces it).
    """

    cuda_graphs: bool | None = None
    max_graphs: int = 8
    compile_options: dict[str, Any] = field(default_factory=dict)
    stats: StepGraphStats = field(default_factory=StepGraphStats)
    _entries: "OrderedDict[BucketKey, Any]" = field(default_factory=OrderedDict, repr=False)
    _current: Any = field(default=None, repr=False)
    _pool: Any = field(default=None, repr=False)
    _parts: dict[int, tuple[Callable, Callable, Callable]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {self.max_graphs}")
        if str(self.compile_options.get("mode", "")) in ("reduce-overhead", "max-autotune"):
            raise ValueError("the step is captured here; compile without a CUDA-graph mode (use max-autotune-no-cudagraphs)")
        _raise_dynamo_limits()

    def __len__(self) -> int:
        return len(self._entries)

    def buckets(self) -> list[BucketKey]:
        return list(self._entries)

    # -- the sampler's runner protocol ---------------------------------------------------------

    def begin(self, dit: FoleyDiT, conditions: DiTConditions, scales: torch.Tensor, guidance: bool, step_cache: StepCache | None) -> None:
        """Pick (or build) the bucket's step and bind this request's conditions to it."""
        self.stats.requests += 1
        batch = conditions.batch_size // (2 if guidance else 1)
        shape = (batch, dit.config.audio_vae_latent_dim, conditions.audio_len)
        key = bucket_key(shape, scales, conditions, guidance, step_cache is not None)
        entry = self._entries.get(key)
        if step_cache is not None:
            if entry is None:
                entry = self._add(key, _PiecewiseStep(dit, guidance, self._parts_of(dit)))
            entry.bind(conditions, scales, step_cache)
        elif entry is None:
            entry = self._add(key, _Pending(dit, conditions, scales, guidance, self))
        else:
            entry.bind(conditions, scales)
        self._entries.move_to_end(key)
        self._current = (key, entry)

    def step(self, x: torch.Tensor, t: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        key, entry = self._current
        if isinstance(entry, _Pending):
            entry = entry.build(x, t, dsigma)
            self._entries[key] = entry
            self._current = (key, entry)
        out = entry.run(x, t, dsigma)
        if isinstance(entry, _CapturedStep):
            self.stats.replays += 1
        return out

    # -- internals -------------------------------------------------------------------------------

    def _add(self, key: BucketKey, entry: Any) -> Any:
        self._entries[key] = entry
        while len(self._entries) > self.max_graphs:
            old_key, old = self._entries.popitem(last=False)
            old.release()
            self.stats.evictions += 1
            log.info("step graphs: evicted the least recently used bucket (%d kept)", self.max_graphs)
        return entry

    def _parts_of(self, dit: FoleyDiT) -> tuple[Callable, Callable, Callable]:
        parts = self._parts.get(id(dit))
        if parts is None:
            opts = dict(fullgraph=True, dynamic=False, **self.compile_options)
            parts = (torch.compile(dit.first_block, **opts), torch.compile(dit.rest_blocks, **opts), torch.compile(dit.head, **opts))
            self._parts[id(dit)] = parts
        return parts

    def _capture_enabled(self, device: torch.device) -> bool:
        on = self.cuda_graphs if self.cuda_graphs is not None else device.type == "cuda"
        if on and device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        return on

    def _graph_pool(self) -> Any:
        # One pool for every captured step: replays run one after another on one stream and no
        # pool memory outlives a replay (each graph copies its result into its own static
        # buffer), so graphs may share intermediates' memory.
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool


class _Pending:
    """A bucket seen for the first time: compiled (and captured) at its first step, when the
    latents, timestep and sigma delta to trace with exist."""

    def __init__(self, dit: FoleyDiT, conditions: DiTConditions, scales: torch.Tensor, guidance: bool, owner: StepGraphs) -> None:
        self.dit, self.conditions, self.scales, self.guidance, self.owner = dit, conditions, scales, guidance, owner

    def bind(self, conditions: DiTConditions, scales: torch.Tensor) -> None:
        self.conditions, self.scales = conditions, scales

    def build(self, x: torch.Tensor, t: torch.Tensor, dsigma: torch.Tensor) -> Any:
        owner = self.owner
        compiled = _CompiledStep(self.dit, self.conditions.structure(), self.guidance, owner.compile_options)
        owner.stats.compiled_buckets += 1
        if owner._capture_enabled(x.device):
            owner.stats.captures += 1
            return _CapturedStep(compiled, x, t, dsigma, self.scales, self.conditions, owner._graph_pool())
        compiled.bind(self.conditions, self.scales)
        return compiled

    def release(self) -> None:
        self.conditions = self.scales = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------
# Compile artifacts
# ---------------------------------------------------------------------------------------------


def save_compile_artifacts(path: str | Path) -> int:
    """Write the process's compile caches (Inductor, AOTAutograd, autotuning) to ``path``.

    Returns the bytes written (0 when nothing was compiled). Written atomically, so a reader never
    sees half a file.
    """
    result = torch.compiler.save_cache_artifacts()
    if result is None:
        return 0
    data, _info = result
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


def load_compile_artifacts(path: str | Path) -> bool:
    """Pre-load compile caches saved by :func:`save_compile_artifacts`; False when absent or stale.

    A file from another PyTorch/Triton version or another GPU is ignored by PyTorch's own cache
    keys (the entries simply miss), so loading is always safe.
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return torch.compiler.load_cache_artifacts(path.read_bytes()) is not None
    except Exception as e:  # a damaged file must not stop a server from starting
        log.warning("could not load compile artifacts from %s (%s); compiling from scratch", path, e)
        return False


@contextlib.contextmanager
def compile_counters() -> Any:
    """Counts what dynamo compiles inside the block: ``{"frames": n, "graph_breaks": n}``."""
    from torch._dynamo.utils import counters

    before_frames = counters["stats"]["unique_graphs"]
    before_breaks = sum(counters["graph_break"].values())
    out: dict[str, int] = {}
    try:
        yield out
    finally:
        out["graphs"] = counters["stats"]["unique_graphs"] - before_frames
        out["graph_breaks"] = sum(counters["graph_break"].values()) - before_breaks
