"""TensorRT 10 engines: ONNX (fp32) -> ONNX parser -> builder with one optimization profile -> ``.plan``.

``--dtype fp16`` / ``bf16`` set the builder's FP16 / BF16 flags on the fp32 ONNX graph, so TensorRT picks
the precision per layer. The profile spans the export ranges: min 1, opt = (max batch, 10 history items,
20 candidates, clipped to the ranges), max the ranges. A plan is specific to the GPU model and the
TensorRT version that built it; the ONNX files it came from are kept in ``onnx/`` to rebuild elsewhere.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from speeder_rt.export.format import NO_QUERY, NO_TOPK, Ranges

INSTALL_HINT = ("TensorRT is not importable: on a CUDA machine run `pip install tensorrt` (NVIDIA's wheels, "
                "from pypi.nvidia.com; TensorRT 10 or newer). The engines that work without it: onnx, aoti.")


def available() -> bool:
    """Whether ``import tensorrt`` works (a wheel without its CUDA libraries counts as missing)."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


Profile = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (min, opt, max) shapes of an input


def profile_shapes(ranges: Ranges, topk: bool) -> dict[str, Profile]:
    """input name -> (min, opt, max) shapes."""
    b, n, k = ranges.max_batch, ranges.max_history, ranges.max_candidates
    hist: Profile = ((1, 1), (b, min(10, n)), (b, n))
    shapes = {"history_ids": hist, "history_mask": hist}
    if not topk:
        shapes["candidate_ids"] = ((1, 1), (b, min(20, k)), (b, k))
    return shapes


def build_plan(onnx_path: Path, plan_path: Path, ranges: Ranges, topk: bool, dtype: str) -> None:
    """Parse ``onnx_path``, build a serialized engine for ``ranges`` and write it to ``plan_path``."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if dtype == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif dtype == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(ranges, topk).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))


class _Engine:
    """One deserialized engine and its execution context; I/O through torch CUDA tensors."""

    def __init__(self, runtime, path: Path) -> None:
        import tensorrt as trt
        import torch

        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ValueError(f"{path}: TensorRT could not deserialize this plan (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                            trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        import torch

        keep = {}
        for name, array in inputs.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
            keep[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.torch_dtype[self.engine.get_tensor_dtype(name)], device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return [o.cpu().numpy() for o in outs]


class TrtRunner:
    """The TensorRT plans of the scoring and (optionally) top-k graphs."""

    def __init__(self, scores_path: Path, topk_path: Path | None, topk_k: int, device: str = "cuda") -> None:
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise ValueError("TensorRT plans need a CUDA device")
        self.device = device
        self.topk_k = topk_k
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._scores = _Engine(runtime, scores_path)
        self._topk = _Engine(runtime, topk_path) if topk_path is not None else None
        self.num_items: int | None = None

    def set_item_tokens(self, tokens: np.ndarray) -> None:
        """A plan keeps the export-time table (the ONNX parser builds the ``item_tokens`` default in as weights):
        a table of another size is refused, as the plan would not score its new rows."""
        if self.num_items is not None and tokens.shape[0] != self.num_items:
            raise ValueError(f"TensorRT plans keep the export-time item table ({self.num_items} items); a table of "
                             f"{tokens.shape[0]} needs a new export (ONNX and AOTInductor exports take it at run time)")
        self.num_items = int(tokens.shape[0])

    def scores(self, history_ids: np.ndarray, history_mask: np.ndarray, candidate_ids: np.ndarray) -> np.ndarray:
        return self._scores(history_ids=history_ids, history_mask=history_mask, candidate_ids=candidate_ids)[0]

    def topk(self, history_ids: np.ndarray, history_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._topk is None:
            raise ValueError(NO_TOPK)
        out = dict(zip(self._topk.outputs, self._topk(history_ids=history_ids, history_mask=history_mask)))
        return out["item_ids"], out["scores"]

    def query(self, history_ids: np.ndarray, history_mask: np.ndarray) -> np.ndarray:
        raise ValueError(NO_QUERY)  # TensorRT exports take no ANN index (the exporter refuses one)
