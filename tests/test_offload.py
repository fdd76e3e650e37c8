"""Offload machinery on a CPU: the host slab's carving, streamed entry points, nesting, prefetch,
and the stage timer's whole-run peak. (Page-locking and CUDA streams need a GPU; the pinned path
is exercised here with a stand-in for cudaHostRegister.)"""

import gc
import json
import logging

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from foleyserve.models import build_dit
from foleyserve.pipeline import offload
from foleyserve.pipeline.offload import ALIGN, HostCopy, HostSlab, SequentialBlocks, apply_offload, entry_points
from foleyserve.pipeline.stages import OVERALL, StageRecord, StageTimer, overall_device_peak, split_overall


def _mixed() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 5, generator=g),  # fp32, 60 bytes: the next one must start at 64
        torch.randn(7, generator=g).to(torch.bfloat16),
        (torch.randn(5, 3, generator=g) * 4).to(torch.float8_e4m3fn),  # fp8 buffers of the fp8 policy
        torch.randint(-9, 9, (2,), generator=g),  # int64
        torch.rand(3, generator=g) > 0.5,  # bool
        torch.randn(4, 6, generator=g).t(),  # dense but transposed: the layout is kept
        torch.empty(0, 3, dtype=torch.float64),
        torch.randn(1, generator=g).to(torch.float16),
    ]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _in_slab(t: torch.Tensor, slab: HostSlab) -> bool:
    start = slab.storage.data_ptr()
    return start <= t.data_ptr() < start + max(slab.host_bytes, 1)


def test_slab_carves_mixed_dtypes_into_aligned_views():
    tensors = _mixed()
    before = [t.clone() for t in tensors]
    slab = HostSlab.adopt(tensors, pin=False)
    assert not slab.pinned and slab.storage.dtype == torch.uint8
    base = slab.storage.data_ptr()
    expected_end = 0
    for t, was, view in zip(tensors, before, slab.views):
        assert t.dtype == was.dtype and t.shape == was.shape and t.stride() == was.stride()
        assert torch.equal(_bytes(t), _bytes(was))  # bit for bit (fp8 compared as bytes)
        if t.numel() == 0:  # no bytes, no address to check
            continue
        assert t.data_ptr() == view.data_ptr()  # re-pointed at its view
        assert t.untyped_storage().data_ptr() == slab.storage.untyped_storage().data_ptr()  # aliases the slab
        off = t.data_ptr() - base
        assert off % ALIGN == 0 and off == -(-expected_end // ALIGN) * ALIGN
        expected_end = off + t.numel() * t.element_size()
    sum_bytes = sum(t.numel() * t.element_size() for t in tensors)
    assert slab.tensor_bytes == sum_bytes
    assert slab.host_bytes == expected_end
    assert sum_bytes <= slab.host_bytes < sum_bytes + ALIGN * len(tensors)


def test_slab_frees_the_original_host_storage_and_dedups():
    lin = nn.Linear(64, 32)
    weight = lin.weight.untyped_storage()
    assert torch._C._storage_Use_Count(weight._cdata) >= 2  # the parameter holds it
    tied = [lin.weight, lin.bias, lin.weight]
    slab = HostSlab.adopt(tied, pin=False)
    assert torch._C._storage_Use_Count(weight._cdata) == 1  # only this probe: the module let go
    assert slab.views[0] is slab.views[2] and slab.tensor_bytes == (64 * 32 + 32) * 4
    y = lin(torch.ones(2, 64))
    assert y.shape == (2, 32) and _in_slab(lin.weight, slab) and _in_slab(lin.bias, slab)


def test_slab_refuses_alignment_below_an_element():
    with pytest.raises(ValueError, match="align"):
        HostSlab.adopt([torch.zeros(3, dtype=torch.float64)], pin=False, align=4)


def test_pinned_slab_registers_after_filling_and_unregisters_when_the_last_view_dies(monkeypatch):
    calls = []
    monkeypatch.setattr(offload, "_cuda_host_register", lambda ptr, n: calls.append(("register", ptr, n)) or 0)
    monkeypatch.setattr(offload, "_cuda_host_unregister", lambda ptr: calls.append(("unregister", ptr)) or 0)
    module = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)).requires_grad_(False)
    ref = module(torch.ones(1, 8))
    copy = HostCopy.of(module, torch.device("cpu"), pin=True)
    slab = copy.slab
    ptr = slab.storage.data_ptr()
    assert slab.pinned and ptr % 4096 == 0  # its own pages: nothing else shares a locked page
    assert calls == [("register", ptr, slab.host_bytes)]
    assert torch.equal(module(torch.ones(1, 8)), ref)  # the values came along
    del copy, slab
    gc.collect()
    assert calls[1:] == []  # the module's weights still live in the mapping
    del module
    gc.collect()
    assert calls[1:] == [("unregister", ptr)]


def test_pinned_slab_survives_a_refused_registration(monkeypatch, caplog):
    monkeypatch.setattr(offload, "_cuda_host_register", lambda ptr, n: 2)
    unregistered = []
    monkeypatch.setattr(offload, "_cuda_host_unregister", lambda ptr: unregistered.append(ptr) or 0)
    lin = nn.Linear(4, 4)
    with caplog.at_level(logging.WARNING, logger=offload.__name__):
        copy = HostCopy.of(lin, torch.device("cpu"), pin=True)
    assert not copy.slab.pinned and "could not page-lock" in caplog.text
    del copy, lin
    gc.collect()
    assert unregistered == []


def test_host_copy_moves_weights_and_back():
    lin = nn.Linear(4, 4)
    copy = HostCopy.of(lin, torch.device("cpu"), copy_on_cpu=True)
    home = lin.weight.data_ptr()
    copy.load()
    assert copy.on_device and lin.weight.data_ptr() != home and not _in_slab(lin.weight, copy.slab)
    copy.load()  # already there: no second copy
    copy.release()
    assert lin.weight.data_ptr() == home == copy.host[0].data_ptr()
    assert (copy.loads, copy.releases) == (1, 1)


def test_stage_lender_reports_its_host_bytes():
    models = {"a": nn.Linear(10, 10), "b": nn.Linear(10, 3)}
    lender = apply_offload("stage", torch.device("cpu"), models, pin=False)
    assert lender.tensor_bytes == (110 + 33) * 4
    assert lender.tensor_bytes <= lender.host_bytes < lender.tensor_bytes + 4 * ALIGN


# ----------------------------------------------------------------------------- streaming


class _Block(nn.Module):
    """A block with a second entry point that calls forward itself, then uses its weights again."""

    offload_entry_points = ("encode",)

    def __init__(self, seen: list, name: int) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.seen, self.name = seen, name
        self.streamer: SequentialBlocks | None = None

    def _note(self, what: str) -> None:
        s = self.streamer
        self.seen.append((self.name, what, [c.on_device for c in s.copies], not _in_slab(self.lin.weight, s.slab)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._note("forward")
        return self.lin(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        y = self(x)  # nested: must not release the weights used below
        self._note("encode after forward")
        return self.lin(y)


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _streamed(n: int = 3):
    seen: list = []
    blocks = [_Block(seen, i) for i in range(n)]
    streamer = SequentialBlocks(blocks, torch.device("cpu"), pin=False, copy_on_cpu=True)
    for b in blocks:
        b.streamer = streamer
    return blocks, streamer, seen


def test_nested_entry_point_keeps_the_weights_until_the_outer_call_returns():
    blocks, streamer, seen = _streamed()
    x = torch.ones(1, 4)
    blocks[1].encode(x)
    # forward ran with block 1 loaded (a real copy) and block 2 prefetched; after the nested
    # forward returned, block 1 was still loaded.
    assert seen == [(1, "forward", [False, True, True], True), (1, "encode after forward", [False, True, True], True)]
    assert streamer.depth == [0, 0, 0]
    assert [c.loads for c in streamer.copies] == [0, 1, 1] and [c.releases for c in streamer.copies] == [0, 1, 0]
    streamer.release_all()  # the prefetched block 2 never ran
    assert not any(c.on_device for c in streamer.copies)


def test_forward_order_prefetches_one_block_ahead_and_releases_each():
    blocks, streamer, seen = _streamed()
    x = torch.ones(1, 4)
    ref = [b.lin(x) for b in blocks]  # on the host weights, before any streaming
    for b, want in zip(blocks, ref):
        assert torch.equal(b(x), want)
    assert [s[2] for s in seen] == [[True, True, False], [False, True, True], [False, False, True]]
    assert all(s[3] for s in seen)  # each ran on a loaded copy, never on the slab itself
    assert [c.loads for c in streamer.copies] == [1, 1, 1] and not any(c.on_device for c in streamer.copies)
    assert all(_in_slab(b.lin.weight, streamer.slab) for b in blocks)


def test_entry_points_and_removal():
    seen: list = []
    assert entry_points(_Block(seen, 0)) == ("forward", "encode")
    assert entry_points(_Plain()) == ("forward",)

    class WithTextKV(_Plain):
        def text_kv(self, x):
            return self.lin(x)

    assert entry_points(WithTextKV()) == ("forward", "text_kv")  # undeclared: the fallback

    class Broken(_Plain):
        offload_entry_points = ("missing",)

    with pytest.raises(TypeError, match="missing"):
        entry_points(Broken())

    blocks, streamer, _ = _streamed(2)
    assert "forward" in blocks[0].__dict__ and "encode" in blocks[0].__dict__
    streamer.remove()
    assert "forward" not in blocks[0].__dict__ and "encode" not in blocks[0].__dict__


def test_a_failing_call_still_releases():
    class Failing(_Plain):
        def forward(self, x):
            raise RuntimeError("boom")

    block = Failing()
    streamer = SequentialBlocks([block], torch.device("cpu"), pin=False, copy_on_cpu=True)
    with pytest.raises(RuntimeError, match="boom"):
        block(torch.ones(1, 4))
    assert streamer.depth == [0] and not streamer.copies[0].on_device


def test_stage_end_drops_a_prefetched_block_that_never_ran():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 4)
            self.triple_blocks = nn.ModuleList([_Plain(), _Plain()])
            self.single_blocks = nn.ModuleList([_Plain()])

    toy = Toy()
    lender = apply_offload("sequential", torch.device("cpu"), {"dit": toy}, dit=toy, pin=False)
    streamer = toy._foleyserve_stream
    with lender.on_device(toy):
        toy.triple_blocks[0](torch.ones(1, 4))  # the step cache skipped the other blocks
        assert streamer.copies[1].on_device  # prefetched
    assert not any(c.on_device for c in streamer.copies)
    assert lender.host_bytes == streamer.host_bytes and streamer.tensor_bytes == 3 * 20 * 4


@pytest.fixture(scope="module")
def fixture_dit(fixtures_dir):
    path = fixtures_dir / "tiny_foley_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    model = build_dit(config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def test_direct_text_kv_calls_are_streamed_and_outputs_are_unchanged(fixtures_dir, fixture_dit):
    d = load_file(str(fixtures_dir / "fwd_2s.safetensors"))
    dit = fixture_dit

    def call():
        with torch.no_grad():
            return dit(x=d["x"], t=d["t"], clip_feat=d["clip_feat"], sync_feat=d["sync_feat"], cond=d["cond"])

    ref = call()
    blocks = list(dit.triple_blocks) + list(dit.single_blocks)
    streamer = SequentialBlocks(blocks, torch.device("cpu"), pin=False, copy_on_cpu=True)
    try:
        used = []

        def check(i):
            def hook(module, _args):
                # text_kv runs on the block's loaded copy, not on its host home.
                assert streamer.copies[i].on_device and not _in_slab(module.weight, streamer.slab)
                used.append(i)
            return hook

        handles = [b.text_cross_kv.register_forward_pre_hook(check(i)) for i, b in enumerate(dit.triple_blocks)]
        n = len(dit.triple_blocks)
        with torch.no_grad():
            dit.prepare_conditions(clip_feat=d["clip_feat"], sync_feat=d["sync_feat"], cond=d["cond"], audio_len=d["x"].shape[-1])
        assert used == list(range(n))
        # each triple block loaded once (by its own call or its predecessor's prefetch), no single block
        assert [c.loads for c in streamer.copies] == [1] * n + [0] * (len(blocks) - n)
        assert not any(c.on_device for c in streamer.copies) and streamer.depth == [0] * len(blocks)

        out = call()
        assert torch.equal(out, ref)
        # call() prepares again (text_kv: once more) and runs every block once
        assert [c.loads for c in streamer.copies] == [3] * n + [1] * (len(blocks) - n)
        assert not any(c.on_device for c in streamer.copies)
        for h in handles:
            h.remove()
    finally:
        streamer.remove()
    assert torch.equal(call(), ref)


# ----------------------------------------------------------------------------- stage timer


def test_stage_timer_reports_the_peak_over_all_stages():
    timer = StageTimer()
    timer.records = {
        "siglip2": StageRecord(1.0, 100, 7 * 2**30),
        "dit": StageRecord(2.0, 300, 12 * 2**30),
        "dac": StageRecord(0.5, 200, 3 * 2**30),  # the last stage is not the peak
    }
    assert timer.device_peak_bytes() == 12 * 2**30
    d = timer.as_dict()
    assert d[OVERALL] == {"seconds": 3.5, "host_peak_bytes": 300, "device_peak_bytes": 12 * 2**30}
    stages, overall = split_overall(d)
    assert list(stages) == ["siglip2", "dit", "dac"] and overall == d[OVERALL]
    assert overall_device_peak([None, None]) is None and overall_device_peak([None, 5, 3]) == 5


def test_cpu_stage_timer_overall_has_no_device_peak():
    timer = StageTimer()
    assert timer.as_dict() == {} and timer.device_peak_bytes() is None
    with timer.stage("a"):
        pass
    with timer.stage("b"):
        pass
    d = timer.as_dict()
    assert set(d) == {"a", "b", OVERALL} and d[OVERALL]["device_peak_bytes"] is None
    assert d[OVERALL]["seconds"] == pytest.approx(d["a"]["seconds"] + d["b"]["seconds"])
    assert set(timer.seconds()) == {"a", "b"}  # timings (server, batcher) list stages only


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sequential_offload_pins_one_slab_and_matches_the_resident_model(fixtures_dir, fixture_dit):
    import copy

    d = {k: v.cuda() for k, v in load_file(str(fixtures_dir / "fwd_2s.safetensors")).items()}
    device = torch.device("cuda")

    def call(model):
        with torch.no_grad():
            return model(x=d["x"], t=d["t"], clip_feat=d["clip_feat"], sync_feat=d["sync_feat"], cond=d["cond"])

    ref = call(copy.deepcopy(fixture_dit).to(device))
    dit = copy.deepcopy(fixture_dit)
    lender = apply_offload("sequential", device, {"dit": dit}, dit=dit)
    streamer = dit._foleyserve_stream
    assert streamer.slab.pinned and streamer.slab.storage.is_pinned()
    assert all(t.is_pinned() for t in streamer.slab.views if t.numel())
    assert streamer.host_bytes < streamer.tensor_bytes + ALIGN * len(streamer.slab.views)
    with lender.on_device(dit):
        out = call(dit)
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    assert not any(c.on_device for c in streamer.copies)
    assert all(t.device.type == "cpu" for b in streamer.blocks for t in b.parameters())
