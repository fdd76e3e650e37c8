"""Networks of HunyuanVideo-Foley, state-dict compatible with the official checkpoints."""

from foleyserve.models.dit import FoleyDiT, build_dit, xl_config, xxl_config
from foleyserve.models.synchformer import build_synchformer_visual
from foleyserve.models.vae import build_dac

__all__ = ["FoleyDiT", "build_dit", "build_dac", "build_synchformer_visual", "xl_config", "xxl_config"]
