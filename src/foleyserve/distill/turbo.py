"""The turbo tier in the engine: swap in a student denoiser and/or a light decoder, and the teacher
models the distill commands train from.

:func:`apply_turbo` is the engine's only hook (``Engine.configure`` calls it before the precision
policy, so every policy, the step cache, offload and compile apply to the student as to the
teacher). The student replaces ``components.dit`` and is fused for inference like the teacher;
:func:`with_recipe` rewrites each request to its step count with CFG off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from foleyserve.distill.light_decoder import load_light_decoder, read_light_config
from foleyserve.distill.student import StudentRecipe, load_student, read_recipe


def check_turbo_files(student: Path | None, light_decoder: Path | None) -> None:
    """Read both files' headers (not their weights): raises StudentError / LightDecoderError."""
    if student is not None:
        read_recipe(student)
    if light_decoder is not None:
        read_light_config(light_decoder)


def apply_turbo(engine: Any, student: Path | None, light_decoder: Path | None) -> None:
    """Load the student and/or light decoder into ``engine.components`` (on its device).

    Sets ``engine.student_recipe``; the engine's name gains the files' names, so caches keyed by
    the model never mix teacher and student results.
    """
    c = engine.components
    if student is not None and getattr(engine, "student_recipe", None) is None:
        teacher_cfg = c.dit.config
        expect = {k: getattr(teacher_cfg, k) for k in ("hidden_size", "depth_triple_blocks", "depth_single_blocks",
                                                         "clip_dim", "sync_feat_dim", "condition_dim")}
        # Where the teacher's weights live: the device, or host RAM under offload.
        dit, recipe = load_student(student, device=c.dit.device, dtype=c.dit.dtype, expect_kwargs=expect)
        dit.fuse_for_inference(conv_layout=engine.device.type == "cpu")
        c.dit = dit
        engine.student_recipe = recipe
        c.name = f"{c.name} + student {Path(student).name} ({recipe.steps} steps, no CFG)"
    if light_decoder is not None and not getattr(c.dac, "light_config", None):
        c.dac = load_light_decoder(light_decoder, device=next(c.dac.parameters()).device)
        c.name = f"{c.name} + light decoder {Path(light_decoder).name}"


def teacher_components(teacher: dict, device: torch.device, dtype: torch.dtype = torch.float32):
    """The teacher's networks, unfused (the training layout): ``{"demo": True}`` or
    ``{"model_dir": ..., "model": "xxl"|"xl"}``, as recorded by ``distill prepare``."""
    if teacher.get("demo"):
        from foleyserve.pipeline.demo import demo_components

        return demo_components(device, seed=int(teacher.get("seed", 0)))
    from foleyserve.pipeline.model_dir import load_components

    return load_components(teacher["model_dir"], model=teacher.get("model", "xxl"), dtype=dtype, device=device,
                           siglip_dir=teacher.get("siglip_dir"), clap_dir=teacher.get("clap_dir"))


def recipe_of(engine: Any) -> StudentRecipe | None:
    """The student recipe an engine samples with, or None (the teacher)."""
    return getattr(engine, "student_recipe", None)
