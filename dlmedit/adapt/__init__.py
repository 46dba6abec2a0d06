"""Adapting a pretrained ARM to masked diffusion (the Dream recipe) and shipping the result as a small adapter."""

from dlmedit.adapt.trainer import AdaptConfig, AdaptError, adapt

__all__ = ["AdaptConfig", "AdaptError", "adapt"]
