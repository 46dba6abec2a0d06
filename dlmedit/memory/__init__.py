"""The residual edit memory (inference-time, weights frozen) and its parts.

- :mod:`dlmedit.memory.residual` — :class:`ResidualMemory`, attach/detach, save/load;
- :mod:`dlmedit.memory.targets` — facts, keys and target deltas at a coordinate;
- :mod:`dlmedit.memory.ridge` — the incrementally maintained ridge map;
- :mod:`dlmedit.memory.sparsify` — ``sparsify_q``.
"""

from dlmedit.memory.residual import MemoryFormatError, MemoryHandle, ResidualMemory, default_layer
from dlmedit.memory.ridge import IncrementalRidge, SingularKeysError, ridge_solve
from dlmedit.memory.sparsify import sparsify, sparsify_mask
from dlmedit.memory.targets import (
    KeyStatistics,
    MemoryFact,
    UnknownFactWarning,
    fact_from_record,
    qa_prompt,
    site_statistics,
)

__all__ = [
    "IncrementalRidge",
    "KeyStatistics",
    "MemoryFact",
    "MemoryFormatError",
    "MemoryHandle",
    "ResidualMemory",
    "SingularKeysError",
    "UnknownFactWarning",
    "default_layer",
    "fact_from_record",
    "qa_prompt",
    "ridge_solve",
    "site_statistics",
    "sparsify",
    "sparsify_mask",
]
