"""Checked readers for the safetensors files the package loads (the JSON ones: ``utils.io.read_json`` /
``read_json_fields``, torch-free). Nothing here runs code from a file.

``read_safetensors`` validates the whole header before touching the body, as the safetensors format
defines it: an 8-byte little-endian header length, a JSON header mapping each tensor name to its dtype,
shape and ``data_offsets`` into the body, and a body the tensors tile exactly (no gap, overlap or trailing
byte). With ``expected`` it also checks the set of tensors, their dtypes and shapes. Every error is a
``ValueError`` naming the file and the tensor.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAX_HEADER_BYTES = 100_000_000  # the safetensors reference implementation's limit
# safetensors dtype -> (torch dtype, the numpy dtype the bytes are read as)
DTYPES: dict[str, tuple[torch.dtype, Any]] = {
    "F64": (torch.float64, np.float64), "F32": (torch.float32, np.float32), "F16": (torch.float16, np.float16),
    "BF16": (torch.bfloat16, np.int16), "I64": (torch.int64, np.int64), "I32": (torch.int32, np.int32),
    "I16": (torch.int16, np.int16), "I8": (torch.int8, np.int8), "U8": (torch.uint8, np.uint8),
    "BOOL": (torch.bool, np.bool_),
}
_NAMES = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}

# name -> (dtype, shape); a shape entry of None matches any size, a shape of None any shape
Expected = Mapping[str, tuple[torch.dtype, tuple[int | None, ...] | None]]


def differences(a: Any, b: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) of every place two JSON values differ (lists of equal length item by
    item: ``mpo[1].lr``), in the order of ``a``'s keys, then ``b``'s new ones."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in [*a, *(k for k in b if k not in a)]
                for d in differences(a.get(k), b.get(k), f"{key}.{k}" if key else k)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{key}[{i}]")]
    return [] if a == b else [(key, a, b)]


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``F32``, ``BF16``, ...)."""
    return _NAMES.get(dtype, str(dtype))


def read_safetensors(file: str | Path, expected: Expected | None = None, mmap: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked (see the module docstring).

    With ``mmap`` each tensor is a copy-on-write memory map of the file's pages (nothing is read until it is
    touched; writes stay private); without, a copy in memory. ``expected``: the exact set of tensors with
    their dtypes and shapes; a missing, extra, wrongly typed or wrongly shaped tensor is an error naming it.
    """
    file = Path(file)
    header, base = _header(file)
    if expected is not None:
        _check_expected(file, header, expected)
    out: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, start, end) in header.items():
        torch_dtype, np_dtype = DTYPES[dtype]
        if mmap and end > start:
            array = np.memmap(file, dtype=np_dtype, mode="c", offset=base + start, shape=shape)
        else:
            with open(file, "rb") as f:
                f.seek(base + start)
                array = np.frombuffer(f.read(end - start), dtype=np_dtype).reshape(shape).copy()
        tensor = torch.from_numpy(array)
        out[name] = tensor.view(torch.bfloat16) if dtype == "BF16" else tensor
    return out


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> tuple[str, tuple[int, ...], float] | None:
    """(name, index, value) of the first NaN or infinity in the floating tensors of ``tensors``, or None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = ~torch.isfinite(tensor)
            if bool(bad.any()):
                index = tuple(int(i) for i in bad.nonzero()[0])
                return name, index, float(tensor[index])
    return None


def check_finite(file: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """A ``ValueError`` naming the file, the tensor and the element when a floating tensor holds a NaN or an
    infinity (a diverged training's weights, a corrupt feature): nothing computed from it would mean anything."""
    found = first_non_finite(tensors)
    if found:
        name, index, value = found
        raise ValueError(f"{file}: tensor {name!r} holds a non-finite value ({value} at index {list(index)}); "
                         "refusing to load it")


def _header(file: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], int]:
    """({name: (dtype, shape, start, end)}, offset of the body), every entry checked against the file."""
    if not file.is_file():
        raise ValueError(f"{file}: missing")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{file}: truncated ({size} bytes; a safetensors file starts with an 8-byte header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{file}: header length {header_len} exceeds the file's {size} bytes (truncated, or not "
                             "a safetensors file)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: corrupt safetensors header (a JSON object expected, got {type(header).__name__})")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{file}: corrupt safetensors header ('__metadata__' must map strings to strings)")
    entries = {}
    for name, info in header.items():
        entries[name] = _entry(file, name, info)
    body = size - 8 - header_len
    offset, previous = 0, None
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if start != offset:
            where = f"after tensor {previous!r}" if previous else "at the start of the body"
            kind = "overlaps the tensor before it" if start < offset else "leaves a gap"
            raise ValueError(f"{file}: tensor {name!r} (data_offsets {start}..{end}) {kind} {where} "
                             "(the header does not describe the body)")
        if end > body:
            raise ValueError(f"{file}: tensor {name!r} ends at byte {end} of a {body}-byte body (file truncated)")
        offset, previous = end, name
    if offset != body:
        raise ValueError(f"{file}: {body - offset} bytes after the last tensor (the header does not describe the body)")
    return entries, 8 + header_len


def _entry(file: Path, name: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"{file}: tensor {name!r}: header entry needs dtype, shape and data_offsets, got {info!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPES:
        raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {dtype!r} (supported: {sorted(DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"{file}: tensor {name!r} has invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{file}: tensor {name!r} has invalid data_offsets {offsets!r}")
    start, end = offsets
    nbytes = math.prod(shape) * np.dtype(DTYPES[dtype][1]).itemsize
    if end - start != nbytes:
        raise ValueError(f"{file}: tensor {name!r}: shape {shape} of {dtype} is {nbytes} bytes but its data_offsets "
                         f"{start}..{end} span {end - start}")
    return dtype, tuple(shape), start, end


def _check_expected(file: Path, header: dict[str, tuple[str, tuple[int, ...], int, int]], expected: Expected) -> None:
    missing = [n for n in expected if n not in header]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{file}: tensor {missing[0]!r} missing{more}")
    extra = [n for n in header if n not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"{file}: unexpected tensor {extra[0]!r}{more}")
    for name, (dtype, shape) in expected.items():
        have_dtype, have_shape = header[name][0], header[name][1]
        if have_dtype != dtype_name(dtype):
            raise ValueError(f"{file}: tensor {name!r} has dtype {have_dtype}, expected {dtype_name(dtype)}")
        if shape is not None and (len(shape) != len(have_shape)
                                  or any(want is not None and want != got for want, got in zip(shape, have_shape))):
            want = ", ".join("*" if d is None else str(d) for d in shape)
            raise ValueError(f"{file}: tensor {name!r} has shape {list(have_shape)}, expected [{want}]")
