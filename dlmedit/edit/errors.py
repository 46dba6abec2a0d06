"""Exception types of the editing primitives.

Why separate classes: callers (the CLI, study runners) need to tell "your statistics
are unusable, collect more samples" and "this delta belongs to another model" apart
from programming errors, and print the remedy carried in the message.  The input
errors derive from ValueError; RevertError is a RuntimeError because it describes the
state of a live model, not a bad argument.  All derive from the project-wide
``DlmeditError`` so the CLI reports them as one-line messages.
"""

from __future__ import annotations

from dlmedit.errors import DlmeditError

__all__ = ["DeltaFormatError", "ModelMismatchError", "RevertError", "StatisticsError"]


class StatisticsError(DlmeditError, ValueError):
    """Key statistics (second moments, keys, residuals) are non-finite or singular."""


class ModelMismatchError(DlmeditError, ValueError):
    """An EditDelta is being applied to a model other than the one it was computed on."""


class DeltaFormatError(DlmeditError, ValueError):
    """A saved EditDelta directory is missing, truncated or inconsistent."""


class RevertError(DlmeditError, RuntimeError):
    """An applied EditDelta cannot be reverted bit-exactly (weights changed since, or already reverted)."""
