"""What an HTTP inference request may be before it reaches tritonserver: the request front's checks.

tritonserver 2.51's HTTP endpoint allocates a JSON input from its declared ``shape`` before it compares the shape
with the data (``"shape": [1, 99999999999]`` with 3 values: ``std::bad_alloc``, abort) and dies with SIGSEGV on
bodies of ~5 MB or more; Triton added ``--http-max-input-size`` (server PR 8174), a JSON size check (PR 8432) and
the shape check before allocation (PR 8676) only in later releases. So ``speeder_rt.serve`` puts a small front on
the public HTTP port (``front``) that reads at most ``max_body_bytes`` (by default a JSON request of the export's
largest batch at its widest, ``ServedModel.default_max_body_bytes``) and checks each infer body here before it is
forwarded: JSON syntax, the served model's inputs and datatypes, 1..max_batch rows, element counts equal to the
data given (so no declared shape allocates more than the bounded body holds), int64 ids, true / false masks.
Whatever passes is a request tritonserver handles; the runtime still checks the values (ids in the catalog,
history lengths, candidate counts) with its own messages (``batch``).

A refusal is a ``Refused`` with the HTTP status and a message naming the input, the field and the value.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from speeder_rt.export.format import read_export_json

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The export range of each input's second dimension (the first is the batch): it sizes the default body limit;
# the runtime enforces it, with messages that name the row.
WIDTH_RANGES = {"history_ids": "max_history", "history_mask": "max_history", "candidate_ids": "max_candidates"}
BYTES_PER_VALUE = 24  # an int64 in JSON with its separator ("-9223372036854775808, ")
MAX_BODY_CEILING = 2 * 2**20  # tritonserver 2.51 survives 3 MB bodies and dies on 5 MB (SIGSEGV): stay well below
ITEMSIZE = {"INT64": 8, "BOOL": 1}


class Refused(Exception):
    """A request the front answers itself: ``status`` (4xx) and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str  # KServe's name: INT64, BOOL
    max_width: int  # the export's range for the dimension after the batch (sizes the default body limit)


@dataclass(frozen=True)
class ServedModel:
    """One served model: its inputs, its largest batch and its instance count (stub processes)."""

    name: str
    max_batch: int
    inputs: tuple[InputSpec, ...]
    instances: int

    def default_max_body_bytes(self) -> int:
        """A generous bound on a JSON body of ``max_batch`` rows at the widest inputs (pretty-printing allowed)."""
        values = self.max_batch * sum(spec.max_width for spec in self.inputs)
        return 4 * BYTES_PER_VALUE * values + 64 * 1024


def served_models(repository: Path) -> dict[str, ServedModel]:
    """Each model of a Python-backend repository: its inputs from ``config.pbtxt`` and its widths from the
    ``export.json`` of the export its ``export_dir`` parameter names (relative to the model's directory)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    limits = {}
    for model in sorted(p for p in repository.iterdir() if (p / "config.pbtxt").is_file()):
        config = text_format.Parse((model / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
        export_dir = model / config.parameters["export_dir"].string_value
        ranges = read_export_json(export_dir)["ranges"]
        inputs = tuple(InputSpec(i.name, model_config_pb2.DataType.Name(i.data_type).removeprefix("TYPE_"),
                                 ranges[WIDTH_RANGES[i.name]]) for i in config.input)
        limits[config.name] = ServedModel(config.name, config.max_batch_size, inputs,
                                          sum(g.count for g in config.instance_group) or 1)
    return limits


def _shape(spec: InputSpec, shape: object, max_batch: int) -> tuple[int, int]:
    """(rows, width) of a declared shape, or Refused when it is not two sizes with 1..max_batch rows. The width is
    bounded by the data that must match it (``_inputs``), and the data by the body size; a width past the export's
    range is the runtime's to refuse (its message names the row)."""
    where = f"input {spec.name}: shape"
    if not isinstance(shape, list) or len(shape) != 2 or not all(type(d) is int for d in shape):
        raise Refused(400, f"{where} must be [rows, width] (two integers), got {json.dumps(shape)}")
    rows, width = shape
    if rows == 0:
        raise Refused(400, f"input {spec.name}: empty batch (shape {shape}: at least one row is needed)")
    if not 1 <= rows <= max_batch:
        raise Refused(400, f"{where} {shape}: {rows} rows, outside 1..max_batch={max_batch}")
    if width < 0:
        raise Refused(400, f"{where} {shape}: a negative width")
    return rows, width


def _flat(data: list) -> list:
    """KServe allows the data flat or nested row by row."""
    if all(not isinstance(row, list) for row in data):
        return data
    return [value for row in data for value in (_flat(row) if isinstance(row, list) else [row])]


def _values(spec: InputSpec, data: list) -> None:
    if spec.datatype == "BOOL":
        bad = next((v for v in data if type(v) is not bool), None)
        if bad is not None:
            raise Refused(400, f"input {spec.name}: values must be true or false, got {json.dumps(bad)}")
        return
    bad = next((v for v in data if type(v) is not int), None)
    if bad is not None:
        raise Refused(400, f"input {spec.name}: item ids must be integers, got {json.dumps(bad)}")
    if data and (min(data) < INT64_MIN or max(data) > INT64_MAX):
        out = next(v for v in data if not INT64_MIN <= v <= INT64_MAX)
        raise Refused(400, f"input {spec.name}: item id {out} does not fit in int64")


def _inputs(model: ServedModel, header: object, binary_bytes: int | None) -> None:
    """The inputs of a parsed request header; ``binary_bytes`` is the size of the binary part (None: JSON only)."""
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise Refused(400, 'the request must be a JSON object with an "inputs" list')
    specs = {spec.name: spec for spec in model.inputs}
    seen: dict[str, int] = {}
    binary_total = 0
    for position, tensor in enumerate(header["inputs"]):
        if not isinstance(tensor, dict) or tensor.get("name") not in specs:
            name = tensor.get("name") if isinstance(tensor, dict) else tensor
            raise Refused(400, f"inputs[{position}]: unknown input {json.dumps(name)} for model {model.name} "
                               f"(inputs: {', '.join(specs)})")
        spec = specs[tensor["name"]]
        if spec.name in seen:
            raise Refused(400, f"input {spec.name}: given twice")
        if tensor.get("datatype") != spec.datatype:
            raise Refused(400, f"input {spec.name}: datatype must be {spec.datatype}, got "
                               f"{json.dumps(tensor.get('datatype'))}")
        rows, width = _shape(spec, tensor.get("shape"), model.max_batch)
        seen[spec.name] = rows
        parameters = tensor.get("parameters") or {}
        if isinstance(parameters, dict) and "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if binary_bytes is None or type(size) is not int or size != rows * width * ITEMSIZE[spec.datatype]:
                raise Refused(400, f"input {spec.name}: binary_data_size {json.dumps(size)} does not match shape "
                                   f"{[rows, width]} of {spec.datatype}")
            binary_total += size
            continue
        data = tensor.get("data")
        if not isinstance(data, list):
            raise Refused(400, f"input {spec.name}: \"data\" must be a list of values, got {json.dumps(data)[:80]}")
        data = _flat(data)
        if len(data) != rows * width:
            raise Refused(400, f"input {spec.name}: shape {[rows, width]} needs {rows * width} values, got "
                               f"{len(data)}")
        _values(spec, data)
    if binary_bytes is not None and binary_total != binary_bytes:
        raise Refused(400, f"the binary part has {binary_bytes} bytes where the inputs' binary_data_size add up to "
                           f"{binary_total}")
    missing = [name for name in specs if name not in seen]
    if missing:
        raise Refused(400, f"model {model.name} needs the inputs {', '.join(specs)}; missing {', '.join(missing)}")
    first = model.inputs[0].name
    for name, rows in seen.items():
        if rows != seen[first]:
            raise Refused(400, f"input {name}: {rows} rows where {first} has {seen[first]}")


def check_infer_body(model: ServedModel, body: bytes, json_header_length: int | None) -> None:
    """Refused unless ``body`` is an infer request ``model`` can take: JSON (``json_header_length`` None) or a JSON
    header of that many bytes followed by binary tensors (the ``Inference-Header-Content-Length`` header)."""
    if json_header_length is not None and not 0 < json_header_length <= len(body):
        raise Refused(400, f"Inference-Header-Content-Length {json_header_length} is outside 1..{len(body)} (the body)")
    text = body if json_header_length is None else body[:json_header_length]
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise Refused(400, f"the request body is not valid JSON: {e}") from None
    _inputs(model, header, None if json_header_length is None else len(body) - json_header_length)
