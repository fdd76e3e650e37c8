"""ONNX export of the denoiser's per-step work: three graphs over prepared conditions.

What is exported and what stays in PyTorch
------------------------------------------
``FoleyDiT.prepare_conditions`` (text K/V of every block, the sync and visual embeddings, RoPE
tables, index maps) runs once per job and stays in PyTorch. It is ~1 % of a 50-step job's FLOPs,
it makes data-dependent choices in Python (whether the visual round trip is the identity, whether
a batch mixes prompt lengths) and it builds its RoPE tables and index maps from lengths, which
an ONNX graph would have to recompute every step or take as inputs anyway. Only the conditioning
weights stay resident in torch (:func:`conditioning_parameter_names`: 2.5 % of XL, 2.2 % of XXL);
the backend frees the rest.

The step itself is exported as the three parts ``FoleyDiT.predict_flow`` is made of:

- ``dit_first_block``: ``(x, t, conditions) -> (audio_stream, visual_stream, vec)``, the
  embeddings and block 0;
- ``dit_rest_blocks``: ``(audio_stream, visual_stream, vec, conditions) -> hidden``, every later block;
- ``dit_head``: ``hidden -> velocity``, the final layer.

Three graphs rather than one because the step cache decides between the first block and the rest,
per row, from the first block's output; with one graph it could not skip anything. They partition
the weights, so nothing is stored twice. Every condition tensor is an input, batch and every
length axis dynamic; the optional ones are always present (an identity ``visual_gather``, an
all-true ``text_mask``), which gives one graph for every batch the sampler can form.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from foleyserve.export.manifest import Manifest, StageEntry
from foleyserve.export.onnx_export import DEFAULT_OPSET, _export, stage_entry
from foleyserve.export.ort_runtime import StageRuntime, rel_l2
from foleyserve.models.dit import DiTConditions, FoleyDiT

FIRST_STAGE = "dit_first_block"
REST_STAGE = "dit_rest_blocks"
HEAD_STAGE = "dit_head"
DIT_STAGES = (FIRST_STAGE, REST_STAGE, HEAD_STAGE)
# Export at 2 s with batch 2 (a CFG pair); parity at other lengths, batches and token counts.
DIT_EXPORT_SECONDS = 2.0
DIT_EXPORT_TEXT = 9
DIT_PARITY_CASES: tuple[tuple[int, float, int], ...] = ((1, 1.6, 5), (4, 3.2, 13))  # (batch, seconds, tokens)
_MAX_BATCH = 256
_MAX_TOKENS = 1 << 16
_TABLES = ("rope_audio_self", "rope_visual_self", "rope_audio", "rope_visual")


def condition_names(n_blocks: int) -> list[str]:
    """Graph input names of :func:`condition_tensors`, in order."""
    names = ["visual", "add_sync"]
    for i in range(n_blocks):
        names += [f"text_k{i}", f"text_v{i}"]
    for table in _TABLES:
        names += [f"{table}_cos", f"{table}_sin"]
    return names + ["visual_gather", "sync_tokens", "sync_index", "text_mask"]


def condition_tensors(c: DiTConditions) -> list[torch.Tensor]:
    """Conditions in the exported graphs' fixed layout: every optional tensor present.

    The layout the sampler builds leaves out an identity visual gather and a mask when every row
    has the full prompt; the graphs take them always (an identity index, an all-true mask).
    """
    if c.sync_tokens is None or c.sync_index is None:
        raise ValueError("conditions without sync_tokens/sync_index (not from prepare_conditions) cannot run exported")
    dev = c.visual.device
    n_vis = c.visual.shape[1]
    gather = c.visual_gather if c.visual_gather is not None else torch.arange(n_vis, device=dev)
    mask = c.text_mask
    if mask is None:
        mask = torch.ones(c.batch_size, 1, 1, c.text_kv[0][0].shape[1], dtype=torch.bool, device=dev)
    out = [c.visual, c.add_sync]
    for k, v in c.text_kv:
        out += [k, v]
    for table in _TABLES:
        out += list(getattr(c, table))
    return out + [gather, c.sync_tokens, c.sync_index, mask]


def _conditions(n_blocks: int, tensors: Sequence[torch.Tensor]) -> DiTConditions:
    return DiTConditions.from_tensors((n_blocks, True, True, True, True), list(tensors))


def _condition_axes(n_blocks: int) -> dict[str, dict[int, tuple[str, int, int]]]:
    batch, la = ("batch", 1, _MAX_BATCH), ("audio_len", 8, 1 << 20)
    lv, ls, lt = ("visual_len", 2, 1 << 18), ("sync_len", 8, 1 << 20), ("text_len", 1, _MAX_TOKENS)
    axes: dict[str, dict[int, tuple[str, int, int]]] = {
        "visual": {0: batch, 1: lv}, "add_sync": {0: batch, 1: la},
        "visual_gather": {0: lv}, "sync_tokens": {0: batch, 1: ls}, "sync_index": {0: la}, "text_mask": {0: batch, 3: lt},
    }
    for i in range(n_blocks):
        axes[f"text_k{i}"] = axes[f"text_v{i}"] = {0: batch, 1: lt}
    for table, length in zip(_TABLES, (la, lv, la, lv)):
        axes[f"{table}_cos"] = axes[f"{table}_sin"] = {0: length}
    return axes


class _FirstBlockGraph(nn.Module):
    def __init__(self, dit: FoleyDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, t: torch.Tensor, *conditions: torch.Tensor):
        return self.dit.first_block(x, t, _conditions(len(self.dit.triple_blocks), conditions))


class _RestBlocksGraph(nn.Module):
    def __init__(self, dit: FoleyDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, audio: torch.Tensor, visual: torch.Tensor, vec: torch.Tensor, *conditions: torch.Tensor):
        return self.dit.rest_blocks(audio, visual, vec, _conditions(len(self.dit.triple_blocks), conditions))


class _HeadGraph(nn.Module):
    def __init__(self, dit: FoleyDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dit.head(hidden)


# Modules prepare_conditions reads: the embeddings, the unconditional branch's empty features, and
# in each triple block the text K/V path of TripleStreamBlock.text_kv.
_CONDITIONING_PREFIXES = ("cond_in.", "visual_proj.", "sync_in.", "sync_pos_emb", "empty_clip_feat", "empty_sync_feat")
_TEXT_KV_MODULES = ("text_cross_kv.", "text_cross_k_norm.")


def conditioning_parameter_names(dit: FoleyDiT) -> set[str]:
    """Parameters ``prepare_conditions`` (and the unconditional branch's empty features) read.

    Everything else belongs to the exported step graphs and can leave torch once they run it.
    """
    keep = set()
    for name, _ in dit.named_parameters():
        if name.startswith(_CONDITIONING_PREFIXES):
            keep.add(name)
        elif name.startswith("triple_blocks.") and name.split(".", 2)[2].startswith(_TEXT_KV_MODULES):
            keep.add(name)
    return keep


def example_conditions(dit: FoleyDiT, *, batch: int, seconds: float, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, DiTConditions]:
    """Latents, timesteps and prepared conditions of random features at a clip length."""
    from foleyserve.pipeline.lengths import clip_lengths

    n = clip_lengths(seconds)
    cfg = dit.config
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = dit.prepare_conditions(
            clip_feat=torch.randn(batch, n["visual_len"], cfg.clip_dim, generator=gen),
            sync_feat=torch.randn(batch, n["sync_len"], cfg.sync_feat_dim, generator=gen),
            cond=torch.randn(batch, tokens, cfg.condition_dim, generator=gen),
            audio_len=n["audio_len"],
        )
    x = torch.randn(batch, cfg.audio_vae_latent_dim, n["audio_len"], generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    return x, t, c


def export_dit_step(
    dit: FoleyDiT,
    export_dir: str | Path,
    *,
    source: str,
    source_hashes: Mapping[str, str],
    export_seconds: float = DIT_EXPORT_SECONDS,
    export_text: int = DIT_EXPORT_TEXT,
    parity_cases: Iterable[tuple[int, float, int]] = DIT_PARITY_CASES,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    seed: int = 0,
    external_data: bool | None = None,
) -> list[StageEntry]:
    """Export the three step graphs of ``dit`` (fp32) and measure the step's ORT parity.

    Parity is the velocity of first -> rest -> head under ORT CPU vs ``predict_flow`` in torch,
    at ``parity_cases`` (batch, seconds, text tokens), none at the export length or token count.
    Graphs whose weights exceed 2 GB are written with external data (``external_data=None``).
    """
    parity_cases = [(int(b), float(s), int(n)) for b, s, n in parity_cases]
    if any(s == export_seconds or n == export_text for _, s, n in parity_cases):
        raise ValueError("parity must be measured at lengths and token counts other than the export ones")
    out_dir = Path(export_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The inference layout with plain GEMMs (not the CPU conv layout): MatMuls are what ONNX
    # Runtime's quantiser and TensorRT handle best, and the numbers are the same to ~1e-7.
    model = copy.deepcopy(dit).float().cpu().eval().fuse_for_inference(conv_layout=False)
    n_blocks = len(model.triple_blocks)
    names = condition_names(n_blocks)
    axes = _condition_axes(n_blocks)
    batch, la = ("batch", 1, _MAX_BATCH), ("audio_len", 8, 1 << 20)
    x, t, c = example_conditions(model, batch=2, seconds=export_seconds, tokens=export_text, seed=seed)
    cond = condition_tensors(c)
    with torch.no_grad():
        audio, visual, vec = model.first_block(x, t, c)
        hidden = model.rest_blocks(audio, visual, vec, c)
    big = external_data
    if big is None:
        big = sum(p.numel() * p.element_size() for p in model.parameters()) > (1 << 31) - (1 << 27)
    d = {0: batch, 1: la}
    specs = [
        (FIRST_STAGE, _FirstBlockGraph(model), (x, t, *cond), ["x", "t", *names], ["audio_stream", "visual_stream", "vec"],
         {"x": {0: batch, 2: la}, "t": {0: batch}, **axes}),
        (REST_STAGE, _RestBlocksGraph(model), (audio, visual, vec, *cond), ["audio_stream", "visual_stream", "vec", *names], ["hidden"],
         {"audio_stream": d, "visual_stream": {0: batch, 1: axes["visual"][1]}, "vec": {0: batch}, **axes}),
        (HEAD_STAGE, _HeadGraph(model), (hidden,), ["hidden"], ["velocity"], {"hidden": d}),
    ]
    entries = []
    for stage, graph, example, inputs, outputs, dynamic in specs:
        graph.eval()
        path = out_dir / f"{stage}.onnx"
        t0 = time.perf_counter()
        _export(graph, example, path, input_names=inputs, output_names=outputs, dynamic=dynamic,
                opset=opset, exporter=exporter, external_data=big)
        entries.append(stage_entry(
            stage, path, opset=opset, exporter=exporter, source=source, source_hashes=source_hashes,
            export_seconds=time.perf_counter() - t0,
            extra={**_external_data_facts(path), "n_triple_blocks": n_blocks, "hidden_size": int(model.config.hidden_size),
                   "latent_dim": int(model.config.audio_vae_latent_dim), "external_data": bool(big),
                   "export_seconds_of_audio": export_seconds, "export_text_tokens": export_text},
        ))
    manifest = Manifest(stages={e.stage: e for e in entries})
    step = load_step(out_dir, manifest=manifest)
    parity = {}
    for b, seconds, tokens in parity_cases:
        x, t, c = example_conditions(model, batch=b, seconds=seconds, tokens=tokens, seed=seed + b)
        with torch.no_grad():
            ref = model.predict_flow(x, t, c).numpy()
        parity[f"{b}x{seconds:g}s_{tokens}tok"] = rel_l2(step(x, t, c), ref)
    return [StageEntry(**{**e.__dict__, "parity": parity}) for e in entries]


def _external_data_facts(path: Path) -> dict:
    """The weights file beside a graph written with external data: its name and size (checked at
    load; hashing many GB at every start would cost more than the check is worth)."""
    data = path.with_name(path.name + ".data")
    return {"data_file": data.name, "data_bytes": data.stat().st_size} if data.is_file() else {}


def load_step(export_dir: str | Path, *, manifest: Manifest | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """The exported step as a numpy function ``(x, t, conditions) -> velocity`` (for parity checks)."""
    first, rest, head = (StageRuntime.load(export_dir, s, manifest=manifest, providers=providers) for s in DIT_STAGES)
    n_blocks = int(first.entry.extra["n_triple_blocks"])
    names = condition_names(n_blocks)

    def step(x: torch.Tensor, t: torch.Tensor, c: DiTConditions):
        cond = {n: v.detach().cpu().numpy() for n, v in zip(names, condition_tensors(c))}
        a = first.run(x=x.numpy(), t=t.float().numpy(), **_pick(first, cond))
        h = rest.run(audio_stream=a["audio_stream"], visual_stream=a["visual_stream"], vec=a["vec"], **_pick(rest, cond))
        return head.run(hidden=h["hidden"])["velocity"]

    return step


def _pick(runtime: StageRuntime, values: Mapping) -> dict:
    """The inputs a graph declares (the exporter drops condition inputs a part never reads)."""
    return {t.name: values[t.name] for t in runtime.entry.inputs if t.name in values}


__all__ = [
    "DIT_STAGES",
    "FIRST_STAGE",
    "HEAD_STAGE",
    "REST_STAGE",
    "condition_names",
    "condition_tensors",
    "conditioning_parameter_names",
    "export_dit_step",
    "load_step",
]
