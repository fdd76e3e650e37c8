"""The turbo tier (issue 12): a distilled few-step, guidance-free student denoiser and a light DAC
decoder, and the pipeline that makes them (``foleyserve distill prepare|train|eval``).

* :mod:`.data`: the teacher's features, samples and trajectory states in safetensors shards;
* :mod:`.student`: the student checkpoint (official keys + ``student.`` keys + recipe) and loader;
* :mod:`.train_student`: PeRFlow (piecewise rectified flow) on the teacher's CFG trajectories;
* :mod:`.light_decoder`, :mod:`.losses`, :mod:`.train_decoder`: the light DAC decoder;
* :mod:`.evaluate`: student vs teacher measures; :mod:`.turbo`: the engine hook.

See docs/turbo.md for the method, its reasons and the real-weights recipe.
"""

from foleyserve.distill.light_decoder import LightDecoderConfig, build_light_dac, load_light_decoder, save_light_decoder
from foleyserve.distill.student import StudentRecipe, load_student, read_recipe, save_student

__all__ = [
    "LightDecoderConfig", "StudentRecipe", "build_light_dac", "load_light_decoder", "load_student", "read_recipe",
    "save_light_decoder", "save_student",
]
