"""Uncertainty and grouping for per-record metric values.

Why bootstrap: edit metrics are means of bounded, often binary per-record values over a
few hundred records; a percentile bootstrap gives a CI without assuming normality, and a
fixed seed makes reported intervals reproducible bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from dlmedit.evaluate.metrics import LENGTH_BUCKETS, length_bucket

__all__ = [
    "MeanCI",
    "bootstrap_ci",
    "bootstrap_ratio_ci",
    "change_phrase",
    "compare_phrase",
    "estimate_text",
    "group_by_length",
    "interval_order",
    "n_text",
    "paired_change",
    "pooled_ci",
    "sign_phrase",
    "summarize_by_length",
    "top_phrase",
    "wilson_ci",
]

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


# ----------------------------------------------------------------------------- pooled intervals
def wilson_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``."""
    from scipy import stats

    if n < 1:
        raise ValueError("Wilson interval of no trials")
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pooled_ci(value_lists: Sequence[Sequence[float] | None], *, unit: str, seed: int = 0,
              n_resamples: int = 1000) -> dict[str, object]:
    """Mean and 95 % CI of all values of several runs pooled (e.g. the facts of every seed).

    Returns a summary entry ``{"mean", "low", "high", "n", "unit", "interval"}``; ``n`` counts
    the pooled values, ``unit`` names them ("facts", "answers", …).  Values that are all 0 or 1
    (exact match, efficacy success, …) get the Wilson score interval: a percentile bootstrap of
    ten zeros is [0, 0], a certainty ten facts cannot give (Wilson: [0, 0.28]).  Other values
    get the seeded percentile bootstrap.  No values: mean None and n 0.
    """
    values = [float(v) for vals in value_lists if vals for v in vals if v is not None and np.isfinite(v)]
    if not values:
        return {"mean": None, "low": None, "high": None, "n": 0, "unit": unit}
    if all(v in (0.0, 1.0) for v in values):
        low, high = wilson_ci(int(sum(values)), len(values))
        return {"mean": float(np.mean(values)), "low": low, "high": high, "n": len(values), "unit": unit,
                "interval": "wilson"}
    ci = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
    return {"mean": ci.mean, "low": ci.low, "high": ci.high, "n": ci.n, "unit": unit, "interval": "bootstrap"}


def paired_change(after: Sequence[float], before: Sequence[float], *, unit: str, seed: int = 0,
                  n_resamples: int = 1000) -> dict[str, object]:
    """Mean per-item change ``after − before`` over the same items, with its 95 % bootstrap interval.

    Why: two runs on the same records (an edit fitted on the final state vs on the
    trajectory, say) differ record by record.  Their marginal intervals can overlap while
    every record that changed moved the same way; the interval of the paired difference
    is the one that answers "did it change?".  Also returned: how many items rose / fell
    and the exact two-sided sign test on those (McNemar's exact test for 0/1 values).
    """
    from scipy import stats

    a, b = np.asarray(after, dtype=float), np.asarray(before, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired change needs two equally long lists of values, got {a.shape} and {b.shape}")
    if not len(a):
        return {"mean": None, "low": None, "high": None, "n": 0, "unit": unit, "rose": 0, "fell": 0, "sign_test_p": None}
    diff = a - b
    ci = bootstrap_ci(diff, n_resamples=n_resamples, seed=seed)
    rose, fell = int((diff > 0).sum()), int((diff < 0).sum())
    p = float(stats.binomtest(min(rose, fell), rose + fell, 0.5).pvalue) if rose + fell else 1.0
    return {"mean": ci.mean, "low": ci.low, "high": ci.high, "n": ci.n, "unit": unit, "interval": "bootstrap",
            "rose": rose, "fell": fell, "sign_test_p": p}


def bootstrap_ratio_ci(numerator: ArrayLike, denominator: ArrayLike, *, unit: str, confidence: float = 0.95,
                       n_resamples: int = 1000, seed: int = 0) -> dict[str, object]:
    """Ratio of two means, ``mean(numerator) / mean(denominator)``, with a percentile-bootstrap CI.

    The two samples are resampled independently (e.g. retain-set and forget-set answers).
    Resamples whose denominator mean is 0 are dropped.  ``n`` is the smaller sample size.
    """
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    if num.size == 0 or den.size == 0 or den.mean() == 0:
        return {"mean": None, "low": None, "high": None, "n": int(min(num.size, den.size)), "unit": unit}
    rng = np.random.default_rng(seed)
    num_means = num[rng.integers(0, num.size, size=(n_resamples, num.size))].mean(axis=1)
    den_means = den[rng.integers(0, den.size, size=(n_resamples, den.size))].mean(axis=1)
    ok = den_means != 0
    ratios = num_means[ok] / den_means[ok]
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha])
    return {"mean": float(num.mean() / den.mean()), "low": float(low), "high": float(high),
            "n": int(min(num.size, den.size)), "unit": unit}


# ----------------------------------------------------------------------------- wording
# Every generated statement that reports a number or compares two goes through these
# helpers, so the rule is the same everywhere: give the estimate with its 95 % interval
# and n, and name a direction ("drops", "higher", …) only when the two intervals do not
# overlap; otherwise say "no measurable difference (n = …)".
Entry = Mapping[str, Any]


def _has_interval(e: Entry | None) -> bool:
    return bool(e) and e.get("mean") is not None and e.get("low") is not None and e.get("high") is not None


def _n_text(e: Entry | None) -> str:
    if not e or e.get("n") is None:
        return "?"
    n = int(e["n"])
    unit = str(e.get("unit", "seeds"))
    if n == 1 and unit.endswith("s"):
        unit = unit[:-1]
    return f"{n} {unit}"


def estimate_text(e: Entry | None, digits: int = 2, *, with_n: bool = True) -> str:
    """``"0.42 [0.30, 0.55] (n = 40 facts)"``; without an interval ``"0.42 (n = 1 seed, no interval)"``.

    ``with_n=False`` leaves the n out (for a list of numbers whose common n the sentence states once).
    """
    if not e or e.get("mean") is None:
        return f"– (n = {_n_text(e) if e else '0'})" if with_n else "–"
    if not _has_interval(e):
        return f"{e['mean']:.{digits}f} (n = {_n_text(e)}, no interval)" if with_n else f"{e['mean']:.{digits}f} (no interval)"
    text = f"{e['mean']:.{digits}f} [{e['low']:.{digits}f}, {e['high']:.{digits}f}]"
    return f"{text} (n = {_n_text(e)})" if with_n else text


def n_text(e: Entry | None) -> str:
    """``"40 facts"``, ``"1 seed"``: the n of an entry with its unit."""
    return _n_text(e)


def interval_order(a: Entry | None, b: Entry | None) -> int:
    """+1 if ``a``'s 95 % interval lies wholly above ``b``'s, −1 if wholly below, 0 if they overlap or one is missing."""
    if not (_has_interval(a) and _has_interval(b)):
        return 0
    assert a is not None and b is not None
    if a["low"] > b["high"]:
        return 1
    if a["high"] < b["low"]:
        return -1
    return 0


def _no_difference(*entries: Entry | None) -> str:
    ns = [e for e in entries if e is not None]
    units = {str(e.get("unit", "seeds")) for e in ns}
    if len(units) == 1 and all(e.get("n") is not None for e in ns):
        unit = units.pop()
        counts = " vs ".join(str(int(e["n"])) for e in ns)
        return f"no measurable difference (n = {counts} {unit})"
    return "no measurable difference (n = " + " vs ".join(_n_text(e) for e in ns) + ")"


def change_phrase(before: Entry | None, after: Entry | None, *, what: str, before_label: str, after_label: str,
                  up: str = "rises", down: str = "drops", digits: int = 2) -> str:
    """How ``what`` changes from ``before`` to ``after``: a direction only when the intervals do not overlap.

    ``"ROME GenEM drops from 0.90 [0.70, 1.00] (n = 10 facts) for 1-token targets to
    0.10 [0.00, 0.30] (n = 10 facts) for 4+ tokens"``, or ``"ROME GenEM: no measurable
    difference (n = 10 vs 10 facts) between 1-token targets, 0.00 […] and 4+ tokens, 0.00 […]"``.
    """
    order = interval_order(after, before)
    if order:
        verb = up if order > 0 else down
        return (f"{what} {verb} from {estimate_text(before, digits)} for {before_label} to "
                f"{estimate_text(after, digits)} for {after_label}")
    return (f"{what}: {_no_difference(before, after)} between {before_label}, {estimate_text(before, digits)}, "
            f"and {after_label}, {estimate_text(after, digits)}")


def compare_phrase(a: Entry | None, b: Entry | None, *, what: str, a_label: str, b_label: str,
                   higher: str = "higher", lower: str = "lower", digits: int = 2) -> str:
    """``"{what} is higher for {a_label}, A, than for {b_label}, B"`` only when the intervals do not overlap;
    otherwise ``"{what}: no measurable difference (n = … vs …) between {a_label}, A, and {b_label}, B"``."""
    order = interval_order(a, b)
    if order:
        verb = higher if order > 0 else lower
        return (f"{what} is {verb} for {a_label}, {estimate_text(a, digits)}, than for {b_label}, "
                f"{estimate_text(b, digits)}")
    return (f"{what}: {_no_difference(a, b)} between {a_label}, {estimate_text(a, digits)}, "
            f"and {b_label}, {estimate_text(b, digits)}")


def sign_phrase(e: Entry | None, *, what: str, positive: str, negative: str, digits: int = 2) -> str:
    """``what`` is above / below 0: ``"{what} {positive} 3.5 [2.9, 4.1] (n = 15 answers)"`` only when the interval
    excludes 0 (the negative phrase is given the magnitude); otherwise "no measurable difference from 0 (n = …)"."""
    zero = {"mean": 0.0, "low": 0.0, "high": 0.0}
    order = interval_order(e, zero)
    if order > 0:
        return f"{what} {positive} {estimate_text(e, digits)}"
    if order < 0:
        assert e is not None
        flipped = {**e, "mean": -e["mean"], "low": -e["high"], "high": -e["low"]}
        return f"{what} {negative} {estimate_text(flipped, digits)}"
    return f"{what}: no measurable difference from 0 (n = {_n_text(e)}; {estimate_text(e, digits)})"


def top_phrase(entries: Mapping[str, Entry | None], *, what: str, largest: bool = True, digits: int = 2) -> str:
    """Name the largest (or smallest) of ``entries`` only if its interval separates it from every other one;
    otherwise list the ones it cannot be told apart from as "no measurable difference (n = …)"."""
    have = {k: e for k, e in entries.items() if e and e.get("mean") is not None}
    if not have:
        return f"{what}: no numbers"
    sign = 1 if largest else -1
    best = max(sorted(have), key=lambda k: sign * have[k]["mean"])
    ties = [k for k in sorted(have) if k != best and interval_order(have[best], have[k]) != sign]
    if not ties:
        return f"{what} is {best}'s {estimate_text(have[best], digits)}"
    group = [best, *ties]
    listed = "; ".join(f"{k} {estimate_text(have[k], digits)}" for k in group)
    return f"{what}: {_no_difference(*(have[k] for k in group))} between {listed}"
