"""Model layer: load checkpoints, adapt their module trees, attach the paradigm."""

from dlmedit.models.adapters import ArchitectureAdapter, register_adapter
from dlmedit.models.language_model import LanguageModel
from dlmedit.models.loading import aliases, load_model, wrap_model

__all__ = ["ArchitectureAdapter", "LanguageModel", "aliases", "load_model", "register_adapter", "wrap_model"]
