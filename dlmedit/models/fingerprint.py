"""A stable, fast fingerprint of a model's weights.

Why: caches (statistics) and saved edits are only valid for the exact weights they
were computed on.  Hashing every byte of a 100M-parameter model on each load is slow,
so names, shapes, dtypes and a strided sample of each tensor's values are hashed —
enough to tell different checkpoints (or an edited model) apart.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def model_fingerprint(module: nn.Module, samples_per_tensor: int = 4096) -> str:
    """sha256 hex digest over parameter names, shapes, dtypes and strided value samples."""
    digest = hashlib.sha256()
    for name, param in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(str(param.dtype).encode())
        flat = param.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step].to(torch.float64).cpu().contiguous()
        digest.update(sample.numpy().tobytes())
        digest.update(flat.to(torch.float64).sum().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]
