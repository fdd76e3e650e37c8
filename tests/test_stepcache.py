"""The step cache: exactness at threshold 0, skipping on slow change, per-row decisions."""


import pytest
import torch
from safetensors.torch import load_file

from conftest import load_fixture_model
from foleyserve.fidelity_measures import rel_l2
from foleyserve.models import build_dit
from foleyserve.pipeline.sampler import sample_latents
from foleyserve.pipeline.stepcache import StepCache


@pytest.fixture(scope="module")
def dit(fixtures_dir):
    return load_fixture_model(fixtures_dir / "tiny_foley_weights.safetensors", build_dit)


@pytest.fixture(scope="module")
def run(fixtures_dir):
    return load_file(str(fixtures_dir / "sampling_2s_cfg4.5_4steps.safetensors"))


def _sample(dit, run, steps, cache=None, noise=None):
    return sample_latents(
        dit,
        noise=run["initial_noise"] if noise is None else noise,
        clip_feat=run["siglip2_feat"],
        sync_feat=run["syncformer_feat"],
        text_feat=run["text_feat"],
        uncond_text_feat=run["uncond_text_feat"],
        steps=steps,
        guidance_scale=4.5,
        step_cache=cache,
    )


def test_threshold_zero_equals_no_cache_exactly(dit, run):
    cache = StepCache(0.0)
    assert torch.equal(_sample(dit, run, 12, cache), _sample(dit, run, 12))
    assert cache.rows_skipped == 0 and cache.row_forwards == 12 * 2


def test_positive_threshold_skips_on_a_slowly_varying_input(dit, run):
    steps = 40
    ref = _sample(dit, run, steps)
    cache = StepCache(0.2)
    out = _sample(dit, run, steps, cache)
    report = cache.report()
    assert report["rows_skipped"] > 0 and 0 < report["saved_fraction"] < 1
    assert report["row_forwards"] == steps * 2
    assert rel_l2(out, ref) < 0.1  # an approximation, but a close one
    tighter = StepCache(0.05)
    _sample(dit, run, steps, tighter)
    assert tighter.rows_skipped < cache.rows_skipped


def test_decisions_are_per_row():
    cache = StepCache(0.1, warmup=1)
    a = torch.ones(2, 5, 4)
    assert cache.rows_to_compute(a) is None
    cache.store(a, a * 3)
    b = a.clone()
    b[1] *= 2  # row 1 moves a lot, row 0 not at all
    rows = cache.rows_to_compute(b)
    assert rows == [1]
    hidden = b + cache.residual
    hidden[1] = 7.0
    cache.store(b, hidden)
    torch.testing.assert_close(cache.residual[0], torch.full((5, 4), 2.0))  # reused, still hidden - first of step 1
    torch.testing.assert_close(cache.residual[1], torch.full((5, 4), 5.0))  # refreshed
    # small changes accumulate until they cross the threshold
    c = b.clone()
    c[0] *= 1.06  # 6 % change, under the threshold; row 1 unchanged
    assert cache.rows_to_compute(c) == []
    assert cache.calls_skipped == 1
    cache.store(c, c + cache.residual)
    d = c.clone()
    d[0] *= 1.06  # another ~6 %: the sum crosses 10 %
    assert cache.rows_to_compute(d) == [0]


def test_select_keeps_rows_state():
    cache = StepCache(0.5)
    a = torch.randn(3, 4, 2)
    cache.rows_to_compute(a)
    cache.store(a, a + 1)
    cache.select(torch.tensor([0, 2]))
    assert cache.residual.shape[0] == 2 and cache._previous.shape[0] == 2


def test_negative_threshold_is_refused():
    with pytest.raises(ValueError, match=">= 0"):
        StepCache(-0.1)


def test_a_non_finite_change_recomputes():
    cache = StepCache(0.5)
    a = torch.ones(1, 3, 2)
    cache.rows_to_compute(a)
    cache.store(a, a + 1)
    assert cache.rows_to_compute(torch.full_like(a, float("nan"))) is None
