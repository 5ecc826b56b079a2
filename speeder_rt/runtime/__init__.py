"""Serving: ``Recommender`` over an exported artifact (ONNX Runtime, AOTInductor, TensorRT) or a checkpoint,
``CppRecommender`` (the C++ runtime through its pybind11 binding; needs the built extension) and
``OptimizedSpeeder``, the in-process fast path (item-token table, fused kernels, shape buckets, CUDA graphs). All of
them take requests by one contract (``speeder_rt.runtime.validation``) and refuse bad ones with ``RequestError``.

``Recommender`` and the contract import neither PyTorch nor the model; the others load on first use (PEP 562), so
``from speeder_rt.runtime import Recommender`` + ``Recommender.load(onnx export)`` stays light."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from speeder_rt.runtime.recommender import Recommender
from speeder_rt.runtime.validation import RequestContract, RequestError

if TYPE_CHECKING:
    from speeder_rt.runtime.cpp import CppRecommender
    from speeder_rt.runtime.optimized import OptimizedSpeeder
    from speeder_rt.runtime.torch_runner import TorchRunner

_LAZY = {"CppRecommender": "speeder_rt.runtime.cpp", "OptimizedSpeeder": "speeder_rt.runtime.optimized",
         "TorchRunner": "speeder_rt.runtime.torch_runner"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["CppRecommender", "OptimizedSpeeder", "Recommender", "RequestContract", "RequestError", "TorchRunner"]
