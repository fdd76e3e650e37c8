"""The loaded networks of one model: what the loaders build and the engine runs.

Kept apart from :mod:`foleyserve.pipeline.pipeline` so that the loaders (``model_dir``,
``demo``, ``random_models``) can import it at module level without importing the engine, which
imports them in turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from foleyserve.models.dit import FoleyDiT


@dataclass
class Components:
    """The loaded networks of one model, ready to run.

    ``tokenizer`` is CLAP's tokenizer (a Hugging Face ``PreTrainedTokenizerBase``); ``name`` is
    what results report as their model; ``is_demo`` marks random weights, whose results say so.
    """

    dit: FoleyDiT
    dac: torch.nn.Module
    synchformer: torch.nn.Module
    siglip: torch.nn.Module
    clap: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    is_demo: bool = False
