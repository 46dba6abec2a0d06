"""Switch a transformers decoder stack between causal and bidirectional attention.

Why this exists: masked diffusion LMs (LLaDA, Dream, the built-in MDM twins) are
ordinary Llama / Qwen2 decoder stacks whose only architectural difference is that
every position attends to every other position.  transformers builds the mask from
``config.is_causal`` but the SDPA kernel additionally trusts each attention module's
``is_causal`` attribute when no explicit mask is passed, so both must be switched
together — flipping only the config silently keeps causal attention.
"""

from __future__ import annotations

from torch import nn


def set_bidirectional(model: nn.Module, bidirectional: bool = True) -> nn.Module:
    """Make every attention module of ``model`` (non-)causal, in place; returns it."""
    config = getattr(model, "config", None)
    if config is not None:
        config.is_causal = not bidirectional
        for sub in ("text_config",):
            if hasattr(config, sub):
                getattr(config, sub).is_causal = not bidirectional
    n = 0
    for module in model.modules():
        if hasattr(module, "is_causal") and isinstance(module, nn.Module) and module is not model:
            module.is_causal = not bidirectional
            n += 1
    if n == 0 and bidirectional:
        raise ValueError(
            f"{type(model).__name__} has no attention modules with an `is_causal` flag; "
            "cannot make it bidirectional"
        )
    return model
