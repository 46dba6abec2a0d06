"""Heatmaps of causal traces, styled after ROME's figures (PNG, no display needed).

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly — no
pyplot, so plotting never changes a user's global backend and works headless.

* `plot_fact`: token × layer per site; subject tokens marked with ``*``, a dashed line
  before the answer slots; colour = the readout with that cell restored (ROME's
  convention), starting at the corrupted value.
* `plot_average`: token category × layer per site, mean indirect effect over facts.
* `plot_temporal` / `plot_temporal_average`: denoising step × layer per site for one
  token category (default the last subject token).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dlmedit.trace.results import CATEGORIES, FactTrace
from dlmedit.trace.temporal import temporal_grid

__all__ = ["plot_average", "plot_fact", "plot_temporal", "plot_temporal_average"]

CMAPS = {"resid": "Purples", "mlp_out": "Greens", "attn_out": "Reds"}
TITLES = {"resid": "hidden state", "mlp_out": "MLP output", "attn_out": "attention output"}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _xlabel(site: str, window: int | None) -> str:
    if site == "resid":
        return "restored layer"
    return f"centre of {window} restored layers" if window else "centre of the restored window"


def _layer_ticks(ax: Any, n_layers: int) -> None:
    step = max(1, n_layers // 10)
    ax.set_xticks(range(0, n_layers, step))


def plot_fact(trace: FactTrace, path: str | Path, sites: Sequence[str] | None = None, model_name: str = "") -> Path:
    """Token × layer heatmaps of one fact, one panel per site, into one PNG."""
    sites = list(sites or trace.sites)
    n_tok = len(trace.tokens)
    fig = Figure(figsize=(3.4 * len(sites) + 0.6, 0.32 * n_tok + 1.6))
    labels = [f"{tok}*" if i in trace.subject_columns else tok for i, tok in enumerate(trace.tokens)]
    for i, site in enumerate(sites):
        ax = fig.add_subplot(1, len(sites), i + 1)
        data = trace.scores[site]
        im = ax.imshow(data, cmap=CMAPS.get(site, "Blues"), vmin=min(trace.corrupted, float(data.min())),
                       aspect="auto", interpolation="nearest")
        ax.set_yticks(range(n_tok))
        ax.set_yticklabels(labels if i == 0 else [""] * n_tok, fontsize=8)
        if trace.prompt_columns[1] < n_tok:  # answer slots follow: teacher-forced tokens (ARM) / masks (MDM)
            ax.axhline(trace.prompt_columns[1] - 0.5, color="grey", lw=0.8, ls="--")
        _layer_ticks(ax, trace.n_layers)
        ax.set_xlabel(_xlabel(site, trace.window), fontsize=8)
        ax.set_title(f"restoring {TITLES.get(site, site)}", fontsize=9, y=1.02)
        cb = fig.colorbar(im, ax=ax, fraction=0.05)
        cb.ax.tick_params(labelsize=7)
        if i == len(sites) - 1:
            what = "p(first target token)" if trace.readout == "first" else "p(target)"
            cb.set_label(f"{what}  [{trace.target!r}]", fontsize=8)
    flag = "" if trace.correct else "  (model does not predict the target)"
    fig.suptitle(f"{model_name} {trace.prompt!r} → {trace.target!r}: clean {trace.clean:.3f}, "
                 f"corrupted {trace.corrupted:.3f}{flag}".strip(), fontsize=9, y=1.02)
    return _save(fig, path)


def plot_average(avg: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Category × layer heatmaps of the mean indirect effect (output of `average_traces`)."""
    sites = list(avg["effect"])
    fig = Figure(figsize=(3.6 * len(sites) + 1.2, 3.6))
    for i, site in enumerate(sites):
        ax = fig.add_subplot(1, len(sites), i + 1)
        data = np.asarray(avg["effect"][site], dtype=float)
        im = ax.imshow(np.ma.masked_invalid(data), cmap=CMAPS.get(site, "Blues"), aspect="auto",
                       interpolation="nearest")
        counts = avg["counts"][site]
        ax.set_yticks(range(len(CATEGORIES)))
        ax.set_yticklabels([f"{c} ({n})" for c, n in zip(CATEGORIES, counts, strict=True)] if i == 0
                           else [""] * len(CATEGORIES), fontsize=7)
        _layer_ticks(ax, data.shape[1])
        ax.set_xlabel(_xlabel(site, avg.get("window")), fontsize=8)
        ax.set_title(f"mean effect of restoring {TITLES.get(site, site)}", fontsize=8)
        cb = fig.colorbar(im, ax=ax, fraction=0.05)
        cb.ax.tick_params(labelsize=7)
    fig.suptitle(f"{title} average indirect effect over {avg['n_facts']} facts".strip(), fontsize=9, y=1.02)
    return _save(fig, path)


def _temporal_panels(grids: dict[str, np.ndarray], path: str | Path, title: str, steps_label: Sequence[str]) -> Path:
    sites = list(grids)
    n_steps = len(steps_label)
    fig = Figure(figsize=(3.4 * len(sites) + 1.0, 0.35 * n_steps + 1.8))
    for i, site in enumerate(sites):
        ax = fig.add_subplot(1, len(sites), i + 1)
        im = ax.imshow(np.ma.masked_invalid(grids[site]), cmap=CMAPS.get(site, "Blues"), aspect="auto",
                       interpolation="nearest")
        ax.set_yticks(range(n_steps))
        ax.set_yticklabels(steps_label if i == 0 else [""] * n_steps, fontsize=7)
        _layer_ticks(ax, grids[site].shape[1])
        ax.set_xlabel("layer", fontsize=8)
        ax.set_title(f"TIE, {TITLES.get(site, site)}", fontsize=9, y=1.02)
        cb = fig.colorbar(im, ax=ax, fraction=0.05)
        cb.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9, y=1.02)
    return _save(fig, path)


def plot_temporal(trace: FactTrace, path: str | Path, category: str = "last subject token") -> Path:
    """Step × layer temporal indirect effect of one fact at the columns of ``category``."""
    grids = {site: temporal_grid(trace, site, category) for site in trace.sites}
    labels = [f"step {s.step} ({sum(not r for r in s.revealed)} masked)" for s in trace.temporal or []]
    return _temporal_panels(grids, path, f"{trace.prompt!r} → {trace.target!r}: restoring at {category}", labels)


def plot_temporal_average(avg_temporal: dict[str, Any], path: str | Path, category: str | None = None,
                          title: str = "") -> Path:
    """Step × layer mean TIE over facts (output of `average_temporal`) at ``category``.

    ``category`` None = the token category of the temporal peak (where the effect is), falling
    back to the last subject token (ROME's locus) when no peak was found.
    """
    if category is None:
        category = (avg_temporal.get("peak") or {}).get("category") or "last subject token"
    c = CATEGORIES.index(category)
    grids = {site: np.asarray(v, dtype=float)[:, c, :] for site, v in avg_temporal["effect"].items()}
    labels = [f"step {k} (n={n})" for k, n in enumerate(avg_temporal["facts_per_step"])]
    return _temporal_panels(grids, path, f"{title} mean TIE over {avg_temporal['n_facts']} facts at {category}".strip(),
                            labels)
