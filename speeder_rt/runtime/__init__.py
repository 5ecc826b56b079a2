"""Serving: ``Recommender`` over an exported artifact (ONNX Runtime, AOTInductor, TensorRT) or a checkpoint."""
from speeder_rt.runtime.recommender import Recommender, TorchRunner

__all__ = ["Recommender", "TorchRunner"]
