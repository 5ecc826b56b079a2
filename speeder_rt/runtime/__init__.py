"""Serving: ``Recommender`` over an exported artifact (ONNX Runtime, AOTInductor, TensorRT) or a checkpoint, and
``OptimizedSpeeder``, the in-process fast path (item-token table, fused kernels, shape buckets, CUDA graphs)."""
from speeder_rt.runtime.optimized import OptimizedSpeeder
from speeder_rt.runtime.recommender import Recommender, TorchRunner

__all__ = ["OptimizedSpeeder", "Recommender", "TorchRunner"]
