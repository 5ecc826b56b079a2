"""The tiny random-init Speeder that the export and serving tests build from a model object (not a checkpoint)."""
import torch

from speeder_rt.data import SyntheticConfig, generate_synthetic
from speeder_rt.model import BackboneConfig, SpeederConfig, SpeederModel


def tiny_speeder(n_items: int = 120, max_history: int = 12) -> SpeederModel:
    """Tiny backbone, text + image features, SPAE slopes and the candidate embedding drawn so that they matter."""
    _, table = generate_synthetic(SyntheticConfig(n_items=n_items, n_users=20, seed=3))
    torch.manual_seed(0)
    model = SpeederModel(SpeederConfig(backbone=BackboneConfig(shape="tiny"), d_expert=32, max_history=max_history,
                                       modalities=["text", "image"]), table).eval()
    with torch.no_grad():
        model.slopes.uniform_(0.1, 1.0)
        model.candidate_embedding.normal_(std=0.02)
    return model
