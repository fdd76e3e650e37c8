"""ONNX export of the pipeline's stages, its manifest, and a torch-free ONNX Runtime wrapper.

Deliberately empty: ``foleyserve.export.ort_runtime`` must import without torch or the model
code, so nothing here may import :mod:`foleyserve.export.onnx_export` eagerly.
"""
