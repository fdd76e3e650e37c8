"""The stages an export folder can hold, by the names users give them (``--stages``, ``backend_stages``).

A user-facing stage is one network of the pipeline; the DiT is three graphs (see
:mod:`foleyserve.export.dit_onnx`). Plain data, importable without torch.
"""

from __future__ import annotations

from foleyserve.config import BACKEND_STAGES

# Pipeline order. Stage -> the graph files (manifest stage names) that make it.
GROUPS: dict[str, tuple[str, ...]] = {
    "siglip": ("siglip_vision",),
    "synchformer": ("synchformer",),
    "clap": ("clap_text",),
    "dit": ("dit_first_block", "dit_rest_blocks", "dit_head"),
    "dac": ("dac_decoder",),
}
assert tuple(GROUPS) == BACKEND_STAGES


class BackendError(RuntimeError):
    """An export folder that cannot serve this engine; the message names the stage and the fix."""


def group_of(graph: str) -> str:
    """The user-facing stage a manifest graph belongs to."""
    for group, graphs in GROUPS.items():
        if graph in graphs:
            return group
    raise KeyError(graph)


def parse_stages(text: str | None) -> list[str]:
    """``"dit,dac"`` -> ``["dit", "dac"]`` in pipeline order; None or ``"all"`` -> every stage.

    Raises ValueError naming an unknown stage and the choices.
    """
    if text is None or text.strip() in ("", "all"):
        return list(GROUPS)
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in GROUPS]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(GROUPS)} (comma-separated) or all")
    return [g for g in GROUPS if g in wanted]
