"""The GPU fast path's CPU-checkable half: no host syncs in the loop, one compiled graph per step
bucket, no recompiles for a repeated bucket, and compiled == eager within fp32 noise."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from foleyserve.fidelity_measures import rel_l2
from foleyserve.models.dit import build_dit, xxl_config
from foleyserve.pipeline.sampler import sample_latents
from foleyserve.pipeline.stepcache import StepCache
from foleyserve.pipeline.stepgraph import StepGraphs, compile_counters

# aten ops that make the host wait for the device (on CUDA): reading a value, data-dependent
# output shapes, whole-tensor comparisons.
SYNC_OPS = ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "masked_select", "unique", "_unique2")


class _SyncCounter(TorchDispatchMode):
    """Counts sync ops once ``active`` is set (after the step-invariant preparation)."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active and func.overloadpacket.__name__ in SYNC_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def _model(width: int = 64, heads: int = 2, seed: int = 0):
    cfg = {**xxl_config(), "hidden_size": width, "num_heads": heads, "depth_triple_blocks": 2, "depth_single_blocks": 2}
    return build_dit(cfg, seed=seed).fuse_for_inference()


def _inputs(batch: int = 1, seconds: int = 2, text: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    la, lv, ls = 50 * seconds, 8 * seconds, 8 * ((25 * seconds - 16) // 8 + 1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(noise=r(batch, 128, la), clip_feat=r(batch, lv, 768), sync_feat=r(batch, ls, 768),
                text_feat=r(batch, text, 768), uncond_text_feat=r(batch, text, 768))


def _count_loop_syncs(dit, monkeypatch, **kw) -> tuple[list[str], int]:
    counter = _SyncCounter()
    prepare = dit.prepare_conditions

    def prepared(**a):
        out = prepare(**a)
        counter.active = True  # the loop starts here
        return out

    monkeypatch.setattr(dit, "prepare_conditions", prepared)
    tolist_calls = []
    original_tolist = torch.Tensor.tolist

    def tolist(self):
        if counter.active:
            tolist_calls.append(self.shape)
        return original_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with counter:
        sample_latents(dit, **kw)
    return counter.syncs, len(tolist_calls)


def test_sampling_loop_makes_no_host_sync(monkeypatch):
    dit = _model()
    cancelled = iter([None, [True, True], [True, False], [True, False]])
    syncs, tolists = _count_loop_syncs(
        dit, monkeypatch, **_inputs(batch=2), steps=4, guidance_scale=[4.5, 3.0], text_lengths=[9, 5],
        keep_rows=lambda: next(cancelled),
    )
    assert syncs == [] and tolists == 0


def test_step_cache_syncs_at_most_once_per_step(monkeypatch):
    dit = _model()
    syncs, tolists = _count_loop_syncs(dit, monkeypatch, **_inputs(), steps=6, step_cache=StepCache(0.5))
    assert syncs == []  # its one read-back per step is a .tolist()
    assert tolists <= 6


@pytest.mark.slow
@pytest.mark.parametrize("width,heads", [(64, 2), (1536, 12)], ids=["demo-width", "xxl-width"])
def test_compiled_step_is_one_graph_and_recompiles_nothing(width, heads):
    torch.manual_seed(0)
    dit = _model(width, heads)
    kw = dict(steps=3, guidance_scale=4.5)
    first, second = _inputs(seed=1), _inputs(seed=2)
    eager = sample_latents(dit, **first, **kw)
    runner = StepGraphs()
    with compile_counters() as c1:
        out = sample_latents(dit, **first, **kw, runner=runner)
    assert c1["graph_breaks"] == 0
    assert 1 <= c1["graphs"] <= 2
    assert rel_l2(out, eager) <= 1e-4
    # A second request of the same bucket (other noise, features and prompt) compiles nothing.
    with compile_counters() as c2:
        out2 = sample_latents(dit, **second, **kw, runner=runner)
    assert c2 == {"graphs": 0, "graph_breaks": 0}
    assert rel_l2(out2, sample_latents(dit, **second, **kw)) <= 1e-4
    assert runner.stats.compiled_buckets == 1 and runner.stats.requests == 2


@pytest.mark.slow
def test_compiled_runner_with_step_cache_cancellation_and_lru():
    dit = _model()
    runner = StepGraphs(max_graphs=1)
    inputs = _inputs(batch=2)
    # step cache: piecewise compiled path equals the eager cached path
    eager_cache, graph_cache = StepCache(0.3), StepCache(0.3)
    eager = sample_latents(dit, **inputs, steps=5, step_cache=eager_cache)
    out = sample_latents(dit, **inputs, steps=5, step_cache=graph_cache, runner=runner)
    assert rel_l2(out, eager) <= 1e-4
    assert graph_cache.rows_skipped == eager_cache.rows_skipped > 0
    # cancellation: the graph keeps its shape, the surviving row is unchanged
    solo = sample_latents(dit, **{k: v[:1] for k, v in inputs.items()}, steps=3)
    wanted = iter([None, [True, False], [True, False]])
    out = sample_latents(dit, **inputs, steps=3, runner=runner, keep_rows=lambda: next(wanted))
    assert rel_l2(out[:1], solo) <= 1e-4
    # a second bucket evicts the first (max_graphs=1)
    assert runner.stats.evictions >= 1 and len(runner) == 1


def test_runner_rejects_cuda_graph_compile_modes():
    with pytest.raises(ValueError, match="CUDA-graph mode"):
        StepGraphs(compile_options={"mode": "reduce-overhead"})
    with pytest.raises(ValueError, match="max_graphs"):
        StepGraphs(max_graphs=0)


@pytest.mark.slow
def test_compile_artifacts_round_trip(tmp_path):
    """Artifacts saved by one process are loaded by the next (a server restart)."""
    path = tmp_path / "artifacts.bin"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parents[1] / 'src')!r})
        from foleyserve.pipeline.stepgraph import StepGraphs, load_compile_artifacts, save_compile_artifacts
        from foleyserve.pipeline.sampler import sample_latents
        from foleyserve.models.dit import build_dit, tiny_config
        loaded = load_compile_artifacts({str(path)!r})
        dit = build_dit(tiny_config(), seed=0).fuse_for_inference()
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g)
        sample_latents(dit, noise=r(1, 128, 100), clip_feat=r(1, 16, 768), sync_feat=r(1, 40, 768),
                       text_feat=r(1, 5, 768), uncond_text_feat=r(1, 5, 768), steps=1, runner=StepGraphs())
        print(loaded, save_compile_artifacts({str(path)!r}))
    """)
    env = {**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    loaded, size = first.stdout.split()[-2:]
    assert loaded == "False" and int(size) > 0
    # a fresh cache dir: only the artifacts file can make the second process warm
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor2")
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.split()[-2] == "True"
