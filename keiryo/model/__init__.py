"""Models: the :class:`ModelHandle` every layer passes around, its I/O description, and how user models are loaded."""

from keiryo.model.handle import ModelHandle, ModelSpec
from keiryo.model.io import IOSpec, TensorSpec
from keiryo.model.loading import load_model, load_weights, save_weights

__all__ = ["IOSpec", "ModelHandle", "ModelSpec", "TensorSpec", "load_model", "load_weights", "save_weights"]
