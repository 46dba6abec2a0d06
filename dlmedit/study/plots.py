"""Study-level plots (matplotlib, Agg): layer sweep, exact match by length, diagnosis curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

BUCKETS = ("1", "2", "3", "4+")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_sweep(summary: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for model, rows in summary["layer_sweep"].items():
        layers = [r["layer"] for r in rows]
        for metric, style in (("ES", "-o"), ("GenEM", "--s")):
            ax.plot(layers, [r[metric]["mean"] if r[metric]["mean"] is not None else float("nan") for r in rows],
                    style, label=f"{model} {metric}")
        peak = summary["trace"].get(model, {}).get("mlp_out", {}).get("peak_layer", {}).get("mean")
        if peak is not None:
            ax.axvline(peak, linestyle=":", color=ax.lines[-1].get_color())
    ax.set_xlabel("edited layer")
    ax.set_ylabel("efficacy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_em_by_length(summary: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for model, runs in summary["edits"].items():
        for run, entry in runs.items():
            ys = [entry["GenEM"].get(b, {}).get("mean") for b in BUCKETS]
            ax.plot(BUCKETS, [y if y is not None else float("nan") for y in ys], "-o", label=f"{model} {run}")
    ax.set_xlabel("new-target length (tokens)")
    ax.set_ylabel("exact match by generation")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_diagnosis(summary: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for model, by in summary["diagnosis"].items():
        for states, entry in by.items():
            ys = [s["mean"] for s in entry["trajectory_step_prob"]]
            ax.plot(range(len(ys)), ys, "-o", label=f"{model} fitted on {states}")
    ax.set_xlabel("denoising step along the edited model's path (tokens revealed)")
    ax.set_ylabel("p(still-masked new-target tokens)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    return _save(fig, path)
