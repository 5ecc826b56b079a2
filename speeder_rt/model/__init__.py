"""The Speeder model (MRC + SPAE + heads), its backbone, attention backends and MPO schedule."""
from speeder_rt.model.backbone import BackboneConfig, LoraSettings
from speeder_rt.model.speeder import SpeederConfig, SpeederModel

__all__ = ["BackboneConfig", "LoraSettings", "SpeederConfig", "SpeederModel"]
