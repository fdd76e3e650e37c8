"""Run a prebuilt TensorRT engine (``foleyserve export --tensorrt``) with torch CUDA tensors.

The same call interface as :class:`foleyserve.export.backend.TorchStage`, so the backend's stage
adapters run on either. Inputs are bound by address and outputs allocated as torch tensors on
the device, all on torch's current stream: nothing crosses the host.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from foleyserve.export.manifest import StageEntry
from foleyserve.export.tensorrt_build import input_profiles

_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
           "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8}


class TrtStage:
    """One engine with its optimisation profiles; picks the profile that fits each call's shapes."""

    def __init__(self, plan: Path, entry: StageEntry, ranges: list[dict], device: torch.device) -> None:
        import tensorrt as trt

        self.device = device
        self.runtime = SimpleNamespace(entry=entry, session=None)  # what the adapters read
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan} is not an engine this TensorRT can load: rebuild with foleyserve export --tensorrt")
        self.context = self.engine.create_execution_context()
        self._profiles = [input_profiles(entry, r) for r in ranges]
        self._profile = -1
        self._inputs = [t.name for t in entry.inputs]
        self._outputs = [t.name for t in entry.outputs]

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    def _pick_profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for i, profile in enumerate(self._profiles):
            if all(all(lo <= s <= hi for s, lo, hi in zip(shapes[n], *profile[n][::2])) for n in self._inputs):
                return i
        raise ValueError(f"{self.runtime.entry.stage}: input shapes {shapes} are outside every TensorRT profile; "
                         f"rebuild with --buckets covering this clip length")

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        stream = torch.cuda.current_stream(self.device)
        tensors = {}
        for name in self._inputs:
            want = _DTYPES[self.engine.get_tensor_dtype(name).name]
            tensors[name] = inputs[name].to(self.device, want).contiguous()
        profile = self._pick_profile({n: tuple(t.shape) for n, t in tensors.items()})
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, stream.cuda_stream)
            self._profile = profile
        for name, t in tensors.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=_DTYPES[self.engine.get_tensor_dtype(name).name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.runtime.entry.stage}")
        return outputs
