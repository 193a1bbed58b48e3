"""ONNX metadata_props read without the `onnx` package and without reading the weights.

ModelProto field 14 = repeated StringStringEntryProto {1: key, 2: value}; protobuf fields may come in any
order and repeat. Neither kept library does this cheaply: ONNX Runtime shows custom_metadata_map only on a
created session (weights loaded, graph optimized), and `onnx.load` parses every weight while holding the
GIL; both would cost a running node's control loop on a swap, and `onnx` is not a run-time dependency.
Writing uses `onnx` (ModelCard.to_onnx).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

_METADATA_FIELD = 14


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated protobuf (varint runs past the end)")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("malformed protobuf varint")


def _fields(buf: bytes):
    """Yield (field_number, wire_type, start, end, value_start, value_end) for top-level fields."""
    i, n = 0, len(buf)
    while i < n:
        start = i
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise ValueError("not an ONNX model (protobuf field number 0)")
        if wt == 0:
            _, i = _varint(buf, i)
            vs = ve = i
        elif wt == 1:
            vs, i = i, i + 8
            ve = i
        elif wt == 2:
            length, vs = _varint(buf, i)
            i = ve = vs + length
        elif wt == 5:
            vs, i = i, i + 4
            ve = i
        else:
            raise ValueError(f"not an ONNX model (unsupported protobuf wire type {wt})")
        if i > n:
            raise ValueError("truncated file (a protobuf field runs past the end)")
        yield num, wt, start, i, vs, ve


def _entry(buf: bytes) -> tuple[str, str]:
    kv = {1: "", 2: ""}
    for num, wt, _, _, vs, ve in _fields(buf):
        if wt == 2 and num in kv:
            kv[num] = buf[vs:ve].decode("utf-8")
    return kv[1], kv[2]


def _read_varint(f: BinaryIO) -> int | None:
    """A varint from a file; None at a clean end of file."""
    shift = result = 0
    while True:
        byte = f.read(1)
        if not byte:
            if shift:
                raise ValueError("truncated protobuf (varint runs past the end)")
            return None
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("malformed protobuf varint")


def read_onnx_metadata(model: bytes | str | Path | BinaryIO) -> dict[str, str]:
    """metadata_props of a serialized ONNX ModelProto (bytes, a path, or a seekable binary file);
    ValueError on a truncated or non-ONNX model.

    Reads the top-level field headers and seeks past everything else, so a 30 MB model costs a few
    small reads: copying it into a bytes object held the GIL for ~7 ms, which a model swap on a running
    node must not do to its control loop.
    """
    if isinstance(model, (bytes, bytearray, memoryview)):
        return read_onnx_metadata(io.BytesIO(model))
    if isinstance(model, (str, Path)):
        with open(model, "rb") as f:
            return read_onnx_metadata(f)
    f = model
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    props: dict[str, str] = {}
    seen_graph = False
    while (key := _read_varint(f)) is not None:
        num, wt = key >> 3, key & 7
        if num == 0:
            raise ValueError("not an ONNX model (protobuf field number 0)")
        if wt == 0:
            if _read_varint(f) is None:
                raise ValueError("truncated protobuf (varint runs past the end)")
            continue
        if wt in (1, 5):
            length = 8 if wt == 1 else 4
        elif wt == 2:
            length = _read_varint(f)
            if length is None:
                raise ValueError("truncated protobuf (varint runs past the end)")
        else:
            raise ValueError(f"not an ONNX model (unsupported protobuf wire type {wt})")
        if f.tell() + length > size:
            raise ValueError("truncated file (a protobuf field runs past the end)")
        if num == _METADATA_FIELD and wt == 2:
            k, v = _entry(f.read(length))
            props[k] = v
            continue
        seen_graph = seen_graph or (num == 7 and wt == 2)
        f.seek(length, io.SEEK_CUR)
    if not seen_graph:
        raise ValueError("not an ONNX model (no graph)")
    return props
