"""fp16 graphs: weights and compute in half precision, inputs and outputs still float32.

For the CUDA provider, whose float32 graph runs float32 kernels (fp16 there is not a session flag, unlike
TensorRT's trt_fp16_enable). The conversion is ONNX Runtime's own (onnxruntime/transformers/float16.py,
shipped in the onnxruntime wheels): float32 initializers and tensors become float16, with a Cast at each
graph input and output (keep_io_types), so the node's buffers, its card's tensor types and the runtime
stay as they are. Ops ORT has no fp16 kernel for stay float32 behind Casts (the converter's block list).
The export checks the result against the float32 graph and records the error in the card
(`network.precision: fp16`, `network.fp16_max_abs_diff`).
"""

from __future__ import annotations

from typing import Any


def available() -> str | None:
    """Why the converter cannot be used here, or None."""
    try:
        from onnxruntime.transformers import float16  # noqa: F401
    except ImportError as e:  # a wheel without the transformers tools, or a missing dependency of them
        return f"onnxruntime.transformers.float16 does not import: {e}"
    return None


def to_fp16(model: Any) -> Any:
    """`model` (an onnx ModelProto, float32) as an fp16 graph with float32 inputs and outputs.

    Returns a new ModelProto (the argument is not changed); its metadata_props (the card) are kept.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    # min/max_positive_val: weights below fp16's normal range flush to +-5.96e-8 / saturate at 65504
    # (the converter's defaults, said here because they decide which weights change).
    out = convert_float_to_float16(copy, keep_io_types=True, disable_shape_infer=False)
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out
