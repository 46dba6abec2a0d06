"""Uncertainty and grouping for per-record metric values.

Why bootstrap: edit metrics are means of bounded, often binary per-record values over a
few hundred records; a percentile bootstrap gives a CI without assuming normality, and a
fixed seed makes reported intervals reproducible bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from dlmedit.evaluate.metrics import LENGTH_BUCKETS, length_bucket

__all__ = ["MeanCI", "bootstrap_ci", "group_by_length", "summarize_by_length"]

# Resampled index matrices are drawn in chunks of at most this many entries, so a
# 1000-resample CI over 100k records needs ~16 MB instead of 800 MB.
_MAX_CHUNK_ENTRIES = 2_000_000


@dataclass(frozen=True)
class MeanCI:
    """A mean with its bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "confidence": self.confidence}


def bootstrap_ci(values: ArrayLike, *, confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0) -> MeanCI:
    """Percentile-bootstrap CI of the mean of `values` (same seed, same interval).

    NaN values are rejected rather than dropped: a NaN means "metric undefined for this
    record" and the caller should decide (e.g. filter records without paraphrases).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {x.shape}")
    if x.size == 0:
        raise ValueError("bootstrap CI of no values")
    if np.isnan(x).any():
        raise ValueError("values contain NaN; filter undefined per-record metrics first")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    rng = np.random.default_rng(seed)
    n = x.size
    chunk = max(1, _MAX_CHUNK_ENTRIES // n)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return MeanCI(float(x.mean()), float(low), float(high), int(n), float(confidence))


def group_by_length(n_tokens: Sequence[int], values: ArrayLike) -> dict[str, np.ndarray]:
    """Split per-record values by target length bucket ("1", "2", "3", "4+"); empty buckets omitted."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(n_tokens) != v.size:
        raise ValueError(f"n_tokens ({len(n_tokens)}) and values ({v.size}) must be equal-length sequences")
    labels = np.array([length_bucket(int(n)) for n in n_tokens], dtype=object)
    return {b: v[labels == b] for b in LENGTH_BUCKETS if (labels == b).any()}


def summarize_by_length(
    n_tokens: Sequence[int],
    values: ArrayLike,
    *,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, MeanCI]:
    """Mean and bootstrap CI per length bucket, plus "all"; each bucket uses the same seed."""
    groups = group_by_length(n_tokens, values)
    out = {b: bootstrap_ci(g, confidence=confidence, n_resamples=n_resamples, seed=seed) for b, g in groups.items()}
    out["all"] = bootstrap_ci(values, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return out
