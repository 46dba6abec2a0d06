"""One function that seeds every global random number generator dlmedit's code paths draw from.

Why a library module: the CLI seeds python / numpy / torch before loading a model and
the Python API (`dlmedit.api`) must do the same, or `dlmedit.edit(...)` and
`dlmedit edit ...` with the same seed would give different deltas.
"""

from __future__ import annotations

__all__ = ["seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy's global RNG and torch's default generator with ``seed``."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
