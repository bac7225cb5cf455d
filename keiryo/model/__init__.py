"""Models: the :class:`ModelHandle` every layer passes around, and how user models are loaded."""

from keiryo.model.handle import ModelHandle, ModelSpec
from keiryo.model.loading import load_model, load_weights, save_weights

__all__ = ["ModelHandle", "ModelSpec", "load_model", "load_weights", "save_weights"]
