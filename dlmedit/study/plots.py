"""Study-level plots (matplotlib, Agg): layer sweep, exact match by length, diagnosis curves.

Every line carries its 95 % interval (error bars, or a band for a curve) and its n in the
legend, and lines that would lie on top of each other stay distinguishable: each series
gets a small x offset (dodge) and its own marker / line style.  The ``*_figure``
functions return the open figure so tests can inspect what is drawn; the ``plot_*``
functions save it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

BUCKETS = ("1", "2", "3", "4+")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dodge(n_series: int, width: float = 0.3) -> list[float]:
    """x offsets of ``n_series`` series, centred on 0 and spread over ``width`` (0 for a single series)."""
    if n_series <= 1:
        return [0.0] * n_series
    return [float(v) for v in np.linspace(-width / 2, width / 2, n_series)]


def _mean(e: dict[str, Any] | None) -> float:
    v = (e or {}).get("mean")
    return float(v) if v is not None else float("nan")


def _errors(entries: Sequence[dict[str, Any] | None]) -> np.ndarray:
    """[2, k] distances below / above each mean to its interval (0 where there is no interval).

    Clamped at 0: a bootstrap percentile interval can exclude its own mean by rounding (or
    for a skewed sample), and matplotlib refuses negative error lengths.
    """
    lows, highs = [], []
    for e in entries:
        m = _mean(e)
        lo, hi = (e or {}).get("low"), (e or {}).get("high")
        lows.append(max(0.0, m - lo) if lo is not None and not np.isnan(m) else 0.0)
        highs.append(max(0.0, hi - m) if hi is not None and not np.isnan(m) else 0.0)
    return np.array([lows, highs])


def n_label(entries: Sequence[dict[str, Any] | None]) -> str:
    """``"n = 10"`` when every point has the same n, else ``"n = 10/9/10/12"``; the unit when known."""
    ns = [int((e or {}).get("n") or 0) for e in entries]
    units = {(e or {}).get("unit", "seeds") for e in entries if e}
    unit = f" {units.pop()}" if len(units) == 1 else ""
    if ns and all(n == ns[0] for n in ns):
        return f"n = {ns[0]}{unit}"
    return f"n = {'/'.join(str(n) for n in ns)}{unit}"


def _legend_outside(ax: Any, fontsize: float = 7) -> None:
    """Legend to the right of the axes, so it never hides a point or an error bar."""
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _style(i: int, group: int) -> dict[str, Any]:
    return {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[group % len(LINESTYLES)],
            "capsize": 3, "markersize": 5, "linewidth": 1.2, "elinewidth": 1.0}


def layer_sweep_figure(summary: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(9.5, 3.8))
    series = [(model, metric, rows) for model, rows in summary["layer_sweep"].items() for metric in ("ES", "GenEM")]
    offsets = dodge(len(series), 0.4)
    for i, (model, metric, rows) in enumerate(series):
        layers = np.array([r["layer"] for r in rows], dtype=float)
        entries = [r[metric] for r in rows]
        ax.errorbar(layers + offsets[i], [_mean(e) for e in entries], yerr=_errors(entries),
                    label=f"{model} {metric} ({n_label(entries)})", **_style(i, i % 2))
    ax.set_xticks(sorted({r["layer"] for rows in summary["layer_sweep"].values() for r in rows}))
    for model in summary["layer_sweep"]:
        peak = summary["trace"].get(model, {}).get("mlp_out", {}).get("peak_layer", {}).get("mean")
        if peak is not None:
            ax.axvline(peak, linestyle=":", color="grey", linewidth=1)
            ax.annotate(f"{model} MLP peak", (peak, 1.0), fontsize=6, rotation=90, va="top", ha="right")
    ax.set_xlabel("edited layer")
    ax.set_ylabel("efficacy (mean, 95% CI)")
    ax.set_ylim(-0.05, 1.05)
    _legend_outside(ax)
    return fig


def plot_layer_sweep(summary: dict[str, Any], path: Path) -> Path:
    return _save(layer_sweep_figure(summary), path)


def em_by_length_figure(summary: dict[str, Any]) -> Any:
    """Exact match by generation per target-length bucket: one dodged, error-barred series per (model, run)."""
    fig, ax = plt.subplots(figsize=(10.5, 4.2))
    series = [(model, run, entry) for model, runs in summary["edits"].items() for run, entry in runs.items()]
    models = list(summary["edits"])
    offsets = dodge(len(series), 0.5)
    x = np.arange(len(BUCKETS), dtype=float)
    for i, (model, run, entry) in enumerate(series):
        entries = [entry["GenEM"].get(b) for b in BUCKETS]
        ax.errorbar(x + offsets[i], [_mean(e) for e in entries], yerr=_errors(entries),
                    label=f"{model} {run} ({n_label(entries)})", **_style(i, models.index(model)))
    ax.set_xticks(x, BUCKETS)
    ax.set_xlabel("new-target length (tokens)")
    ax.set_ylabel("exact match by generation (mean, 95% CI)")
    ax.set_ylim(-0.05, 1.05)
    _legend_outside(ax)
    return fig


def plot_em_by_length(summary: dict[str, Any], path: Path) -> Path:
    return _save(em_by_length_figure(summary), path)


def diagnosis_figure(summary: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(9.5, 3.8))
    series = [(model, states, entry) for model, by in summary["diagnosis"].items() for states, entry in by.items()]
    offsets = dodge(len(series), 0.2)
    for i, (model, states, entry) in enumerate(series):
        entries = entry["trajectory_step_prob"]
        steps = np.arange(len(entries), dtype=float) + offsets[i]
        ys = np.array([_mean(e) for e in entries])
        err = _errors(entries)
        bars = ax.errorbar(steps, ys, yerr=err, label=f"{model} fitted on {states} ({n_label(entries)})",
                           **_style(i, i))
        ax.fill_between(steps, ys - err[0], ys + err[1], alpha=0.12, color=bars.lines[0].get_color())
    ax.set_xlabel("denoising step along the edited model's path (tokens revealed)")
    ax.set_ylabel("p(still-masked new-target tokens)")
    ax.set_ylim(-0.05, 1.05)
    _legend_outside(ax)
    return fig


def plot_diagnosis(summary: dict[str, Any], path: Path) -> Path:
    return _save(diagnosis_figure(summary), path)
