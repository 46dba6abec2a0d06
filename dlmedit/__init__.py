"""dlmedit: locate-then-edit knowledge editing, causal tracing and unlearning for masked diffusion and autoregressive LMs."""

__version__ = "0.1.0"

from dlmedit.models import LanguageModel, load_model, wrap_model

__all__ = ["LanguageModel", "__version__", "load_model", "wrap_model"]
