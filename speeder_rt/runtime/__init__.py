"""Serving: ``Recommender`` over an exported artifact (ONNX Runtime, AOTInductor, TensorRT) or a checkpoint,
``CppRecommender`` (the C++ runtime through its pybind11 binding; needs the built extension) and
``OptimizedSpeeder``, the in-process fast path (item-token table, fused kernels, shape buckets, CUDA graphs). All of
them take requests by one contract (``speeder_rt.runtime.validation``) and refuse bad ones with ``RequestError``."""
from speeder_rt.runtime.cpp import CppRecommender
from speeder_rt.runtime.optimized import OptimizedSpeeder
from speeder_rt.runtime.recommender import Recommender, TorchRunner
from speeder_rt.runtime.validation import RequestContract, RequestError

__all__ = ["CppRecommender", "OptimizedSpeeder", "Recommender", "RequestContract", "RequestError", "TorchRunner"]
