"""Trace results: per-fact arrays with their axis labels, token categories, averages, JSON.

Why categories: facts differ in length, so ROME averages over facts by *token role*
(first / middle / last subject token, the token after the subject, further tokens,
the last token).  We add "before subject" and "answer slots" (columns after the
prompt: an ARM's teacher-forced target tokens, an MDM's mask slots — where an MDM
reads its answer), so every column belongs somewhere and nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel
    from dlmedit.trace.core import PlanResult
    from dlmedit.trace.plan import TracePlan

CATEGORIES: tuple[str, ...] = (
    "before subject",
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last prompt token",
    "answer slots",
)


def token_categories(n_columns: int, prompt_columns: tuple[int, int], subject_columns: Sequence[int]) -> dict[str, list[int]]:
    """Columns of each category (a column may be in two, e.g. a one-token subject is first and last)."""
    p0, p1 = prompt_columns
    b, e = min(subject_columns), max(subject_columns) + 1
    cats: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    for col in range(n_columns):
        if col >= p1:
            cats["answer slots"].append(col)
            continue
        if col == p1 - 1:
            cats["last prompt token"].append(col)
        if p0 <= col < b:
            cats["before subject"].append(col)
        elif b <= col < e:
            if col == b:
                cats["first subject token"].append(col)
            if col == e - 1:
                cats["last subject token"].append(col)
            if b < col < e - 1:
                cats["middle subject tokens"].append(col)
        elif col != p1 - 1:
            cats["first subsequent token" if col == e else "further tokens"].append(col)
    return cats


def primary_labels(n_columns: int, cats: dict[str, list[int]]) -> list[str]:
    """One category name per column (the first in `CATEGORIES` order it belongs to)."""
    out = [""] * n_columns
    for name in CATEGORIES:
        for col in cats[name]:
            if not out[col]:
                out[col] = name
    return out


def by_category(effect: np.ndarray, cats: dict[str, list[int]]) -> np.ndarray:
    """[T, L] → [n_categories, L]: mean over the category's columns; NaN where it has none."""
    out = np.full((len(CATEGORIES), effect.shape[1]), np.nan)
    for i, name in enumerate(CATEGORIES):
        if cats[name]:
            out[i] = effect[cats[name]].mean(0)
    return out


@dataclass
class StepTrace:
    """Temporal tracing at one denoising step: restored readout per (site, token, layer)."""

    step: int
    revealed: list[bool]
    clean: float
    corrupted: float
    scores: dict[str, np.ndarray]

    def indirect_effect(self, site: str) -> np.ndarray:
        return self.scores[site] - self.corrupted


@dataclass
class FactTrace:
    """One fact's trace.  ``scores[site]`` is [tokens, layers]: the readout with that cell restored."""

    prompt: str
    subject: str
    target: str
    target_tokens: list[str]
    tokens: list[str]
    categories: dict[str, list[int]]
    subject_columns: list[int]
    prompt_columns: tuple[int, int]
    sites: tuple[str, ...]
    n_layers: int
    window: int
    samples: int
    noise_std: float
    seed: int
    readout: str
    clean: float
    corrupted: float
    scores: dict[str, np.ndarray]
    correct: bool
    temporal: list[StepTrace] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    index: int = 0

    @property
    def labels(self) -> list[str]:
        return primary_labels(len(self.tokens), self.categories)

    def indirect_effect(self, site: str) -> np.ndarray:
        """Restored minus corrupted readout, [tokens, layers]."""
        return self.scores[site] - self.corrupted

    def category_effects(self) -> dict[str, np.ndarray]:
        return {s: by_category(self.indirect_effect(s), self.categories) for s in self.sites}

    def peak(self, site: str) -> dict[str, Any]:
        ie = self.indirect_effect(site)
        t, layer = np.unravel_index(int(np.argmax(ie)), ie.shape)
        return {"token_index": int(t), "token": self.tokens[t], "category": self.labels[t], "layer": int(layer),
                "effect": float(ie[t, layer])}

    def temporal_peak(self) -> dict[str, Any] | None:
        """(step, site, token, layer) of the largest temporal indirect effect."""
        if not self.temporal:
            return None
        best: dict[str, Any] | None = None
        for step in self.temporal:
            for site in self.sites:
                ie = step.indirect_effect(site)
                t, layer = np.unravel_index(int(np.argmax(ie)), ie.shape)
                if best is None or ie[t, layer] > best["effect"]:
                    best = {"step": step.step, "site": site, "token_index": int(t), "token": self.tokens[t],
                            "category": self.labels[t], "layer": int(layer), "effect": float(ie[t, layer])}
        return best

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index, "prompt": self.prompt, "subject": self.subject, "target": self.target,
            "target_tokens": self.target_tokens, "correct": self.correct, "tokens": self.tokens,
            "token_category": self.labels, "subject_columns": self.subject_columns,
            "prompt_columns": list(self.prompt_columns), "clean": self.clean, "corrupted": self.corrupted,
            "noise_std": self.noise_std,
            "axes": {"scores": ["token", "layer"]},
            "scores": {s: np.round(v, 7).tolist() for s, v in self.scores.items()},
            "indirect_effect": {s: np.round(self.indirect_effect(s), 7).tolist() for s in self.sites},
            "peak": {s: self.peak(s) for s in self.sites},
            "stats": self.stats,
        }
        if self.temporal:
            out["temporal"] = {
                "axes": {"scores": ["step", "token", "layer"]},
                "revealed": [s.revealed for s in self.temporal],
                "clean": [s.clean for s in self.temporal],
                "corrupted": [s.corrupted for s in self.temporal],
                "scores": {site: np.round(np.stack([s.scores[site] for s in self.temporal]), 7).tolist()
                           for site in self.sites},
                "peak": self.temporal_peak(),
            }
        return out


def _token_text(lm: LanguageModel, token_id: int) -> str:
    if token_id == lm.mask_token_id:
        return "[MASK]"
    text = lm.tokenizer.decode([int(token_id)])
    return text if text.strip() else repr(text)


def make_fact_trace(lm: LanguageModel, plan: TracePlan, result: PlanResult) -> FactTrace:
    """Attach labels to a plan's raw numbers."""
    first = plan.states[0]
    row = plan.batch.input_ids[0].tolist()
    cats = token_categories(len(row), plan.prompt_columns, plan.subject_columns)
    main = plan.readouts[0]
    correct = all(bool(result.clean_top[k, j]) for k, j in main.terms)
    scores = {site: result.scores[0, i] for i, site in enumerate(plan.sites)}
    temporal = None
    if plan.step_states:
        temporal = []
        for step, r in enumerate(range(1, len(plan.readouts))):
            state = plan.states[plan.step_states[step]]
            temporal.append(StepTrace(
                step=step, revealed=list(state.revealed), clean=float(result.clean[r]),
                corrupted=float(result.corrupted[r]),
                scores={site: result.scores[r, i] for i, site in enumerate(plan.sites)},
            ))
    stats = result.stats.as_dict()
    stats["forward_equivalents"] = result.stats.forward_equivalents(plan.n_layers, len(plan.states) * plan.samples)
    return FactTrace(
        prompt=plan.prompt, subject=plan.subject, target=plan.target,
        target_tokens=[_token_text(lm, i) for i in first.target_ids],
        tokens=[_token_text(lm, i) for i in row], categories=cats, subject_columns=list(plan.subject_columns),
        prompt_columns=plan.prompt_columns, sites=plan.sites, n_layers=plan.n_layers, window=plan.window,
        samples=plan.samples, noise_std=plan.noise_std, seed=plan.seed, readout=plan.readout_mode,
        clean=float(result.clean[0]), corrupted=float(result.corrupted[0]), scores=scores, correct=correct,
        temporal=temporal, stats=stats,
    )


# ------------------------------------------------------------------------------- averages


def _nanmean(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = (~np.isnan(stack)).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, np.nansum(stack, 0) / np.maximum(counts, 1), np.nan)
    return mean, counts


def _grid_peak(grid: np.ndarray) -> tuple[int, int, float]:
    if np.all(np.isnan(grid)):
        return -1, -1, float("nan")
    i, j = np.unravel_index(int(np.nanargmax(grid)), grid.shape)
    return int(i), int(j), float(grid[i, j])


def average_traces(traces: Sequence[FactTrace]) -> dict[str, Any]:
    """Mean indirect effect per (site, category, layer) over facts, with its peak.

    Facts must share sites and layer count.  Categories a fact lacks (e.g. middle
    subject tokens of a one-token subject) do not count towards that category's mean.
    """
    if not traces:
        return {"n_facts": 0}
    sites, n_layers = traces[0].sites, traces[0].n_layers
    for tr in traces:
        if tr.sites != sites or tr.n_layers != n_layers:
            raise ValueError("cannot average traces with different sites or layer counts")
    out: dict[str, Any] = {
        "n_facts": len(traces),
        "clean": float(np.mean([t.clean for t in traces])),
        "corrupted": float(np.mean([t.corrupted for t in traces])),
        "axes": {"effect": ["category", "layer"], "category": list(CATEGORIES)},
        "effect": {}, "counts": {}, "peak": {},
    }
    windows = {t.window for t in traces}
    out["window"] = windows.pop() if len(windows) == 1 else None  # plots label the MLP/attn axis with it
    per = [t.category_effects() for t in traces]
    for site in sites:
        mean, counts = _nanmean(np.stack([p[site] for p in per]))
        ci, layer, value = _grid_peak(mean)
        out["effect"][site] = mean
        out["counts"][site] = counts[:, 0].tolist()
        out["peak"][site] = {"category": CATEGORIES[ci] if ci >= 0 else None, "layer": layer, "effect": value}
    temporal = [t for t in traces if t.temporal]
    if temporal:
        out["temporal"] = average_temporal(temporal)
    return out


def average_temporal(traces: Sequence[FactTrace]) -> dict[str, Any]:
    """Mean temporal indirect effect per (site, step, category, layer), steps aligned from the first (all masked)."""
    sites, n_layers = traces[0].sites, traces[0].n_layers
    n_steps = max(len(t.temporal or []) for t in traces)
    stacks = {s: np.full((len(traces), n_steps, len(CATEGORIES), n_layers), np.nan) for s in sites}
    for f, tr in enumerate(traces):
        for step in tr.temporal or []:
            for site in sites:
                stacks[site][f, step.step] = by_category(step.indirect_effect(site), tr.categories)
    out: dict[str, Any] = {"n_facts": len(traces), "axes": {"effect": ["step", "category", "layer"]},
                           "effect": {}, "facts_per_step": [], "peak": None}
    best: dict[str, Any] | None = None
    # the peak is looked for only at steps at least half the facts reach: with targets of mixed
    # length, a late step averages the few longest targets, and its maximum would be one fact's
    covered = np.array([sum(len(t.temporal or []) > k for t in traces) for k in range(n_steps)])
    eligible = covered >= max(1, -(-len(traces) // 2))
    out["peak_steps"] = np.flatnonzero(eligible).tolist()
    for site in sites:
        mean, counts = _nanmean(stacks[site])
        out["effect"][site] = mean
        out["facts_per_step"] = counts.max(axis=(1, 2)).tolist()
        masked = np.where(eligible[:, None, None], mean, np.nan)
        if not np.all(np.isnan(masked)):
            k, c, layer = np.unravel_index(int(np.nanargmax(masked)), masked.shape)
            if best is None or mean[k, c, layer] > best["effect"]:
                best = {"site": site, "step": int(k), "category": CATEGORIES[c], "layer": int(layer),
                        "effect": float(mean[k, c, layer])}
    out["peak"] = best
    return out


def average_to_json(avg: dict[str, Any]) -> dict[str, Any]:
    """Arrays → nested lists (NaN → None) so the average can go into trace.json."""

    def conv(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return [conv(x) for x in v.tolist()] if v.ndim else conv(v.item())
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, float) and np.isnan(v):
            return None
        return v

    return conv(avg)
