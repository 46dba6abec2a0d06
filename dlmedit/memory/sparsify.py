"""``sparsify_q``: keep the q largest-magnitude coordinates of each position's vector.

Why: the residual edit memory adds ``α · sparsify_q(W k)`` at every position of every
forward.  Restricting each write to a few coordinates bounds how much of the residual
stream one memory read can disturb (its leakage onto positions whose keys only
partly overlap a stored key), and is the third knob next to α and λ.

Definition (exact, deterministic): for a vector ``v`` of width ``D`` and ``1 ≤ q ≤ D``
the kept set is the ``q`` indices with the largest ``|v_i|``; among equal magnitudes
the *lower index* wins.  Exactly ``q`` entries are kept per position vector (some of
them may be zero when ``v`` has fewer than ``q`` non-zeros); every other entry is set
to 0.  ``q = D`` keeps everything (and is short-circuited: no cost).
"""

from __future__ import annotations

import torch

from dlmedit.errors import InvalidSettingError

__all__ = ["check_q", "sparsify", "sparsify_mask"]


def check_q(q: int | None, width: int) -> int:
    """Validate ``q`` against a vector width; ``None`` means "keep all" (returns ``width``)."""
    if q is None:
        return width
    if isinstance(q, bool) or not isinstance(q, int):
        raise TypeError(f"q must be an integer number of coordinates, got {type(q).__name__}")
    if q < 1:
        raise InvalidSettingError(f"q (--q) must be at least 1 (coordinates kept per position), got {q}")
    if q > width:
        raise InvalidSettingError(
            f"q (--q) = {q} is larger than the width of the site ({width} coordinates); use q ≤ {width}")
    return q


def sparsify_mask(v: torch.Tensor, q: int) -> torch.Tensor:
    """Boolean mask (same shape as ``v``) selecting exactly ``q`` entries along the last dim.

    Ties at the q-th magnitude are broken towards lower indices.  Fast path (one
    ``topk`` of q+1 values): when the (q+1)-th largest magnitude is strictly below the
    q-th, ``|v| ≥ q-th`` selects exactly q entries.  Only if some row has a tie
    straddling the cut are all entries above the q-th kept and the remaining slots
    given to the tied entries in index order (a ``cumsum``).
    """
    width = v.shape[-1]
    check_q(q, width)
    if q == width:
        return torch.ones_like(v, dtype=torch.bool)
    mag = v.abs()
    top = mag.topk(q + 1, dim=-1, sorted=True).values
    threshold = top[..., q - 1 : q]
    if not bool((top[..., q : q + 1] == threshold).any()):
        return mag >= threshold
    above = mag > threshold
    ties = mag == threshold
    remaining = q - above.sum(-1, keepdim=True)
    return above | (ties & (ties.cumsum(-1) <= remaining))


def sparsify(v: torch.Tensor, q: int | None) -> torch.Tensor:
    """``v`` with all but its ``q`` largest-magnitude entries per position set to zero."""
    width = v.shape[-1]
    q = check_q(q, width)
    if q == width:
        return v
    return torch.where(sparsify_mask(v, q), v, torch.zeros((), dtype=v.dtype, device=v.device))
