"""Writing chosen int8 ranges into a converted LiteRT file.

The LiteRT converter sets every activation's int8 range from the minimum and maximum it
sees on the representative dataset. :func:`write_ranges` replaces the ranges of the
quantization points named by :mod:`mobilenet_jax.compression.quantization` (a
percentile or least-squared-error clip, or the ranges quantization-aware training
learned) in the converted flatbuffer:

* each point's tensor is found by position: the k-th ``CONV_2D``/``DEPTHWISE_CONV_2D``
  op's output is the table's k-th convolution, the k-th ``ADD`` the k-th residual sum,
  ``QUANTIZE`` the input, the first convolution's input (before its ``PAD``) the
  normalized input, ``SUM``/``MEAN`` the pooling, the last ``FULLY_CONNECTED`` the logits
  (and the first one a table's ``head_fc``);
  the op counts must match the table;
* its scale and zero point become the range's (nudged to an integer zero point, as
  ``fake_quant`` rounds), and ops that must keep their input's (``PAD``) follow;
* every convolution or fully connected op reading a changed tensor gets its int32 bias
  requantized, since LiteRT stores biases on the scale ``input_scale * weight_scale``.

The kernels compute their rescaling multipliers from these scales when the interpreter
prepares them, so nothing else in the file depends on them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mobilenet_jax import errors
from mobilenet_jax.compression import quantization
from mobilenet_jax.models import table

CONVS = ("CONV_2D", "DEPTHWISE_CONV_2D")
WITH_BIAS = (*CONVS, "FULLY_CONNECTED")
SAME_SCALE = ("PAD", "PADV2", "RESHAPE")


def _point_tensors(model, network: table.Network) -> dict[str, tuple[int, float]]:
    """``{point: (tensor index, factor)}``: where each point lives in the file; ``factor`` scales its range
    (a ``SUM`` pooling holds height * width times the mean)."""
    from tensorflow.lite.tools import flatbuffer_utils

    graph = model.subgraphs[0]
    names = [flatbuffer_utils.opcode_to_name(model, op.opcodeIndex) for op in graph.operators]
    by_kind: dict[str, list] = {}
    for name, op in zip(names, graph.operators, strict=True):
        by_kind.setdefault("CONV" if name in CONVS else name, []).append(op)
    points = quantization.points(network)
    dense = ("input", "normalized", "pool", "head_fc", "logits")
    conv_points = [p for p in points if p not in dense and not p.endswith("/add")]
    add_points = [p for p in points if p.endswith("/add")]
    pools = by_kind.get("SUM", []) + by_kind.get("MEAN", [])
    found = (len(by_kind.get("CONV", [])), len(by_kind.get("ADD", [])), len(pools), len(by_kind.get("QUANTIZE", [])))
    if any(block.se_channels for block in network.blocks) or found != (len(conv_points), len(add_points), 1, 1):
        raise errors.UserError(
            f"This .tflite file's ops (convolutions, adds, pools, quantizes: {found}) do not match the network table "
            f"({len(conv_points)}, {len(add_points)}, 1, 1), so int8 ranges cannot be written into it."
        )
    tensors = {p: (op.outputs[0], 1.0) for p, op in zip(conv_points, by_kind["CONV"], strict=True)}
    tensors.update({p: (op.outputs[0], 1.0) for p, op in zip(add_points, by_kind.get("ADD", []), strict=True)})
    pool = pools[0]
    factor = 1.0
    if flatbuffer_utils.opcode_to_name(model, pool.opcodeIndex) == "SUM":
        shape = graph.tensors[pool.inputs[0]].shape
        factor = float(shape[1] * shape[2])
    tensors["pool"] = (pool.outputs[0], factor)
    tensors["input"] = (by_kind["QUANTIZE"][0].outputs[0], 1.0)
    normalized = _first_conv_input(graph, names, by_kind["CONV"][0])
    if normalized != tensors["input"][0]:  # the normalization's output, unless it is folded away
        tensors["normalized"] = (normalized, 1.0)
    if "FULLY_CONNECTED" in by_kind:
        tensors["logits"] = (by_kind["FULLY_CONNECTED"][-1].outputs[0], 1.0)
    fc = network.head_fc()
    if fc is not None:  # the dense layer after the pooling: the first FULLY_CONNECTED, its activation fused
        if len(by_kind.get("FULLY_CONNECTED", [])) != 2 or fc.activation not in ("relu", "relu6", None):
            raise errors.UserError(
                f"This .tflite file's dense layers do not match the network table's head_fc ({fc.activation}), so "
                "int8 ranges cannot be written into it."
            )
        tensors["head_fc"] = (by_kind["FULLY_CONNECTED"][0].outputs[0], 1.0)
    return tensors


def _first_conv_input(graph, names: list[str], conv) -> int:
    """The tensor the first convolution reads, before its ``PAD``."""
    index = int(conv.inputs[0])
    for name, op in zip(names, graph.operators, strict=True):
        if name in SAME_SCALE and int(op.outputs[0]) == index:
            return int(op.inputs[0])
    return index


def _requantize_bias(model, op, old_scale: float, new_scale: float) -> None:
    """The op's int32 bias moved from input scale ``old_scale`` to ``new_scale`` (weight scales unchanged)."""
    if len(op.inputs) < 3 or op.inputs[2] < 0:
        return
    graph = model.subgraphs[0]
    bias = graph.tensors[op.inputs[2]]
    buffer = model.buffers[bias.buffer]
    values = np.frombuffer(bytes(bytearray(buffer.data)), np.int32).astype(np.float64)
    ratio = new_scale / old_scale  # bias scale = input scale * weight scale, per channel
    requantized = np.round(values / ratio)
    bias.quantization.scale = (np.asarray(bias.quantization.scale, np.float64) * ratio).astype(np.float32)
    limits = np.iinfo(np.int32)
    buffer.data = np.clip(requantized, limits.min, limits.max).astype("<i4").view(np.uint8)


def _set_range(model, readers: Mapping[int, list], index: int, scale: float, zero_point: int) -> None:
    from tensorflow.lite.tools import flatbuffer_utils

    graph = model.subgraphs[0]
    tensor = graph.tensors[index]
    old = float(tensor.quantization.scale[0])
    tensor.quantization.scale = np.asarray([scale], np.float32)
    tensor.quantization.zeroPoint = np.asarray([zero_point], np.int64)
    for op in readers.get(index, []):
        name = flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)
        if name in SAME_SCALE:
            _set_range(model, readers, op.outputs[0], scale, zero_point)
        elif name in WITH_BIAS and op.inputs[0] == index:
            _requantize_bias(model, op, old, float(np.float32(scale)))


def write_ranges(data: bytes, network: table.Network, ranges: Mapping[str, tuple[float, float]]) -> bytes:
    """``data`` (a full-integer ``.tflite`` of ``network``'s folded form) with the int8 range of every point in
    ``ranges`` replaced (see the module docstring)."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    tensors = _point_tensors(model, network)
    readers: dict[int, list] = {}
    for op in model.subgraphs[0].operators:
        for index in op.inputs:
            readers.setdefault(int(index), []).append(op)
    for point, (lo, hi) in ranges.items():
        if point not in tensors:
            continue
        index, factor = tensors[point]
        scale, zero_point = (float(v) for v in quantization.nudged_range(lo * factor, hi * factor))
        _set_range(model, readers, index, scale, int(zero_point))
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
