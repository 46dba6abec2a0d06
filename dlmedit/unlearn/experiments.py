"""Unlearning experiments: one method, the α sweep, sequential insertion, scaling, the
random-coordinate ablation — each a function returning JSON-able rows, plus the plots.

Every run scores the unedited model first (``base``) and reports each method's numbers
next to their change from it (``forget_lp_drop`` = base ForgetLP − ForgetLP, > 0 means
forgotten; ``d_retain_lp`` etc. = after − before).  Training baselines are run on the
live weights inside a :class:`~dlmedit.unlearn.baselines.WeightSnapshot` and the
model's fingerprint is checked after the restore, so runs never contaminate each other.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dlmedit.memory.residual import ResidualMemory, default_layer
from dlmedit.memory.ridge import IncrementalRidge
from dlmedit.memory.targets import KeyStatistics, MemoryFact, site_statistics
from dlmedit.unlearn.baselines import (
    PeakMemory,
    TrainConfig,
    WeightSnapshot,
    run_training_baseline,
    steer,
    steering_vector,
)
from dlmedit.unlearn.evaluate import EvalSets, QAItem, evaluate_unlearning, summary_delta

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel

__all__ = [
    "METHODS",
    "MemorySettings",
    "alpha_sweep",
    "build_memory",
    "memory_facts",
    "random_coordinate_ablation",
    "run_method",
    "scaling",
    "sequential",
    "sweep",
    "time_insertion",
    "traced_coordinate",
]

METHODS = ("memory", "ga", "graddiff", "npo", "rmu", "steer")
RANDOM_SITES = ("resid", "mlp_out", "attn_out")

Progress = Callable[[str, int], None] | None


@dataclass
class MemorySettings:
    """Coordinate and knobs of the residual memory (and of steering, which shares the coordinate)."""

    layer: int | None = None
    site: str = "resid"
    alpha: float = 1.0
    lam: float = 1.0
    q: int | None = None
    #: cosine threshold of the memory's key gate (None: write at every position)
    gate: float | None = None
    key_stats: str = "whiten"
    whiten_eps: float = 1e-2
    n_states: int = 8
    seed: int = 0
    coordinate_source: str = "default"

    def __post_init__(self) -> None:
        """Range checks that need no model, so a bad ``--q`` / ``--lambda`` / ``--alpha`` fails before any work."""
        from dlmedit.checks import check_finite
        from dlmedit.errors import InvalidSettingError
        from dlmedit.memory.residual import SITES, _check_alpha, _check_gate
        from dlmedit.memory.ridge import _check_lam
        from dlmedit.memory.sparsify import check_q
        from dlmedit.memory.targets import KEY_STATS

        _check_alpha(self.alpha)
        _check_lam(self.lam)
        _check_gate(self.gate)
        if self.q is not None:
            check_q(self.q, sys.maxsize)  # ≥ 1 here; against the site's width in `resolved`
        if self.layer is not None:
            check_finite(self.layer, "layer (--layer)", integer=True)
        if self.site not in SITES:
            raise InvalidSettingError(f"unknown site {self.site!r} (--site); use one of {', '.join(SITES)}")
        if self.key_stats not in KEY_STATS:
            raise InvalidSettingError(
                f"unknown key statistics {self.key_stats!r} (--key-stats); use one of {', '.join(KEY_STATS)}")
        check_finite(self.n_states, "n_states (--n-states)", low=1, integer=True)
        check_finite(self.whiten_eps, "whiten_eps", low=0, low_open=True)

    def resolved(self, lm: LanguageModel) -> MemorySettings:
        """The settings with the default layer filled in, checked against the model (layer range, q ≤ site width)."""
        from dlmedit.memory.sparsify import check_q
        from dlmedit.memory.targets import site_width

        out = replace(self, layer=default_layer(lm.n_layers) if self.layer is None else self.layer)
        if not -lm.n_layers <= int(out.layer) < lm.n_layers:  # type: ignore[arg-type]
            from dlmedit.errors import InvalidSettingError

            raise InvalidSettingError(f"layer (--layer) {out.layer} is out of range: the model has layers "
                                      f"0..{lm.n_layers - 1}")
        check_q(out.q, site_width(lm, out.site))
        return out


def memory_facts(items: Sequence[QAItem]) -> list[MemoryFact]:
    """The facts to forget, one per QA item (keyed on the item's subject)."""
    missing = [it.prompt for it in items if not it.subject]
    if missing:
        raise ValueError(f"the memory needs the subject of each fact; {len(missing)} items have none (e.g. {missing[0]!r})")
    return [MemoryFact(it.prompt, str(it.subject), it.answer) for it in items]


Background = Sequence[tuple[str, str]]


def key_statistics(lm: LanguageModel, settings: MemorySettings, background: Background) -> KeyStatistics | None:
    """The memory's background key statistics at its coordinate (None for ``key_stats="none"``)."""
    s = settings.resolved(lm)
    if s.key_stats != "none" and not background:
        raise ValueError(f"key statistics {s.key_stats!r} need background (prompt, answer) pairs")
    return site_statistics(lm, s.layer, s.site, list(background), kind=s.key_stats, eps=s.whiten_eps)


def new_memory(lm: LanguageModel, settings: MemorySettings, stats: KeyStatistics | None) -> ResidualMemory:
    s = settings.resolved(lm)
    return ResidualMemory(lm, s.layer, s.site, alpha=s.alpha, lam=s.lam, q=s.q, gate=s.gate, key_stats=stats,
                          n_states=s.n_states, seed=s.seed)


def build_memory(
    lm: LanguageModel,
    items: Sequence[QAItem],
    settings: MemorySettings,
    background: Background = (),
    progress: Callable[[int], None] | None = None,
) -> tuple[ResidualMemory, dict[str, float]]:
    """A memory holding ``items`` (one batched insertion), and the time spent on each part."""
    s = settings.resolved(lm)
    t0 = time.perf_counter()
    stats = key_statistics(lm, s, background)
    t1 = time.perf_counter()
    memory = new_memory(lm, s, stats)
    targets = memory.compute_targets(memory_facts(items), progress)
    t2 = time.perf_counter()
    memory.insert_targets(targets)
    t3 = time.perf_counter()
    return memory, {"key_stats_s": t1 - t0, "targets_s": t2 - t1, "solve_s": t3 - t2, "fit_time_s": t3 - t0}


def _row(method: str, ev: dict[str, Any], base: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"method": method, **extra, **summary_delta(ev, base), **ev}


def run_method(
    lm: LanguageModel,
    method: str,
    sets: EvalSets,
    base: dict[str, Any],
    *,
    memory: MemorySettings | None = None,
    train: TrainConfig | None = None,
    background: Background = (),
    eval_kwargs: dict[str, Any] | None = None,
    progress: Progress = None,
) -> dict[str, Any]:
    """Run one method on ``sets.forget``, evaluate, undo it, and return its result row."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    memory = (memory or MemorySettings()).resolved(lm)
    eval_kwargs = dict(eval_kwargs or {})
    fingerprint = lm.fingerprint()
    if method == "memory":
        with PeakMemory() as mem:
            store, times = build_memory(lm, sets.forget, memory, background,
                                        progress=(lambda n: progress("fit", n)) if progress else None)
        t0 = time.perf_counter()
        with store.attached():
            ev = evaluate_unlearning(lm, sets, **eval_kwargs)
        row = _row("memory", ev, base, settings=asdict(memory), **times, eval_time_s=time.perf_counter() - t0,
                   peak_rss_mb=mem.peak_mb, rss_increase_mb=mem.increase_mb,
                   unknown_facts=[f.id for f in store.unknown_facts], memory=store.describe())
    elif method == "steer":
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            vector = steering_vector(lm, memory_facts(sets.forget), memory.layer, memory.site,
                                     n_states=memory.n_states, seed=memory.seed)
            fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        with steer(lm, memory.layer, memory.site, vector, memory.alpha):
            ev = evaluate_unlearning(lm, sets, **eval_kwargs)
        row = _row("steer", ev, base, settings=asdict(memory), fit_time_s=fit, eval_time_s=time.perf_counter() - t0,
                   peak_rss_mb=mem.peak_mb, rss_increase_mb=mem.increase_mb,
                   steering_norm=float(vector.norm()) * memory.alpha)
    else:
        cfg = train or TrainConfig()
        if method == "rmu" and cfg.rmu_layer is None:
            cfg = replace(cfg, rmu_layer=memory.layer)
        with WeightSnapshot(lm.module):
            res = run_training_baseline(lm, method, sets.forget, sets.retain, cfg,
                                        progress=(lambda s, _l: progress("train", 1)) if progress else None)
            t0 = time.perf_counter()
            ev = evaluate_unlearning(lm, sets, **eval_kwargs)
            eval_time = time.perf_counter() - t0
        row = _row(method, ev, base, settings=asdict(cfg), fit_time_s=res.wall_time_s, eval_time_s=eval_time,
                   peak_rss_mb=res.peak_rss_mb, rss_increase_mb=res.rss_increase_mb, losses=res.losses,
                   forget_lp_trace=res.forget_lp_trace, n_trained_params=len(res.trained_params))
    if lm.fingerprint() != fingerprint:
        raise RuntimeError(f"{method} left the model's weights changed; this is a bug in the restore path")
    return row


SWEEP_KNOBS = ("alpha", "lambda", "q", "gate")


def sweep(
    lm: LanguageModel,
    sets: EvalSets,
    base: dict[str, Any],
    knob: str,
    values: Sequence[float],
    *,
    memory: MemorySettings | None = None,
    background: Background = (),
    eval_kwargs: dict[str, Any] | None = None,
    progress: Progress = None,
) -> list[dict[str, Any]]:
    """The memory evaluated at each value of one knob, keys and deltas computed once.

    ``alpha``, ``q`` and ``gate`` only change the write (set on the attached memory); ``lambda``
    changes the map, so each value re-fits W from the same keys and deltas.
    """
    if knob not in SWEEP_KNOBS:
        raise ValueError(f"cannot sweep {knob!r}; sweepable knobs: {', '.join(SWEEP_KNOBS)}")
    settings = (memory or MemorySettings()).resolved(lm)
    store, times = build_memory(lm, sets.forget, settings, background)
    targets = None
    rows = []
    for value in values:
        current = store
        if knob == "alpha":
            store.alpha = float(value)
        elif knob == "q":
            store.q = int(value)
        elif knob == "gate":
            store.gate = float(value)
        else:
            if targets is None:
                K, D = store.keys_and_deltas()
                targets = (K, D)
            current = new_memory(lm, replace(settings, lam=float(value)), store.key_stats)
            current.ridge.insert(*targets)
            current.entries = dict(store.entries)
        t0 = time.perf_counter()
        with current.attached():
            ev = evaluate_unlearning(lm, sets, **(eval_kwargs or {}))
        knobs = {"alpha": current.alpha, "lambda": current.lam, "q": current.q, "gate": current.gate}
        rows.append(_row("memory", ev, base, settings={**asdict(settings), **knobs}, knob=knob, value=value,
                         **knobs, **times, eval_time_s=time.perf_counter() - t0))
        if progress:
            progress(knob, 1)
    return rows


def alpha_sweep(
    lm: LanguageModel,
    sets: EvalSets,
    base: dict[str, Any],
    alphas: Sequence[float],
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """The α sweep (α only rescales the write, so keys/deltas are computed once)."""
    return sweep(lm, sets, base, "alpha", alphas, **kwargs)


def _checkpoints(n: int, every: int) -> list[int]:
    points = sorted({1, n, *range(every, n + 1, every)})
    return [p for p in points if 1 <= p <= n]


def sequential(
    lm: LanguageModel,
    sets: EvalSets,
    n_facts: int,
    *,
    memory: MemorySettings | None = None,
    background: Background = (),
    eval_every: int = 5,
    eval_kwargs: dict[str, Any] | None = None,
    progress: Progress = None,
) -> dict[str, Any]:
    """Insert facts one at a time (incremental Woodbury updates) and record the curve.

    At each checkpoint: mean ForgetLP of the facts inserted so far (and their base
    values), mean ForgetLP of the facts not yet inserted, RetainLP and UtilityLP.
    """
    if len(sets.forget) < n_facts:
        raise ValueError(
            f"the forget set has {len(sets.forget)} facts but {n_facts} sequential insertions were asked; "
            "use a larger split (e.g. world:forget10 has 150 facts)"
        )
    settings = (memory or MemorySettings()).resolved(lm)
    items = list(sets.forget[:n_facts])
    kwargs = {**(eval_kwargs or {}), "robustness": False, "truth_ratios": False, "keep_items": True}
    sub = EvalSets(items, sets.retain, sets.utility, sets.info)
    base = evaluate_unlearning(lm, sub, **kwargs)
    base_forget = np.array(base["per_item"]["forget"])
    store = new_memory(lm, settings, key_statistics(lm, settings, background))
    facts = memory_facts(items)
    points = _checkpoints(n_facts, eval_every)
    curve, insert_times = [], []
    for k, fact in enumerate(facts, start=1):
        t0 = time.perf_counter()
        targets = store.compute_targets([fact])
        t1 = time.perf_counter()
        store.insert_targets(targets)
        insert_times.append({"targets_s": t1 - t0, "update_s": time.perf_counter() - t1})
        if progress:
            progress("insert", 1)
        if k in points:
            with store.attached():
                ev = evaluate_unlearning(lm, sub, **kwargs)
            lp = np.array(ev["per_item"]["forget"])
            curve.append({
                "n_inserted": k,
                "forget_lp_inserted": float(lp[:k].mean()),
                "forget_lp_inserted_base": float(base_forget[:k].mean()),
                "forget_lp_drop_inserted": float((base_forget[:k] - lp[:k]).mean()),
                "forget_lp_not_inserted": float(lp[k:].mean()) if k < n_facts else None,
                "d_forget_lp_not_inserted": float((lp[k:] - base_forget[k:]).mean()) if k < n_facts else None,
                "retain_lp": ev["retain_lp"], "d_retain_lp": ev["retain_lp"] - base["retain_lp"],
                "utility_lp": ev["utility_lp"],
                "d_utility_lp": None if ev["utility_lp"] is None else ev["utility_lp"] - base["utility_lp"],
                "ridge_drift": store.ridge.drift(),
            })
    w_scratch = store.solve_from_scratch()
    return {
        "settings": asdict(settings), "n_facts": n_facts, "eval_every": eval_every,
        "base": {k: base[k] for k in ("forget_lp", "retain_lp", "utility_lp")},
        "curve": curve, "insert_times": insert_times,
        "incremental_vs_scratch_max_abs": float((store.W - w_scratch).abs().max()),
        "W_max_abs": float(w_scratch.abs().max()),
        "unknown_facts": [f.id for f in store.unknown_facts],
    }


def time_insertion(store: ResidualMemory, facts: Sequence[MemoryFact]) -> dict[str, float]:
    """Insert ``facts`` into an empty ``store`` and time each step, batched and one at a time.

    Why one function: the scaling experiment and ``bench/memory.py`` must time the same
    steps the same way, or their per-fact costs are not comparable.  Returns
    ``targets_s`` (keys+deltas: batched forwards and one backward), ``solve_s`` (one
    batched ridge update into ``store``), ``peak_rss_mb`` over those two steps,
    ``incremental_s`` (the same facts inserted one Woodbury update at a time into a
    separate ridge, from the precomputed keys) and ``incremental_vs_batch_max_abs``
    (how far the two solutions are apart: round-off only).
    """
    if not facts:
        raise ValueError("time_insertion needs at least one fact")
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        targets = store.compute_targets(facts)
        t1 = time.perf_counter()
        store.insert_targets(targets)
        t2 = time.perf_counter()
    incremental = IncrementalRidge(store.width, store.width, store.lam)
    t3 = time.perf_counter()
    for i in range(len(facts)):
        incremental.insert(targets.keys[i : i + 1], targets.deltas[i : i + 1])
    t4 = time.perf_counter()
    return {
        "targets_s": t1 - t0, "solve_s": t2 - t1, "incremental_s": t4 - t3, "peak_rss_mb": mem.peak_mb,
        "incremental_vs_batch_max_abs": float((incremental.W - store.W).abs().max()),
    }


def scaling(
    lm: LanguageModel,
    sets: EvalSets,
    pool: Sequence[QAItem],
    counts: Sequence[int],
    *,
    memory: MemorySettings | None = None,
    background: Background = (),
    max_scored: int = 100,
    eval_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    progress: Progress = None,
) -> list[dict[str, Any]]:
    """Time and ForgetLP against the number of stored facts (facts drawn from ``pool`` in order).

    Per count N: a fresh memory; ``targets_s`` (keys+deltas of N facts, batched forwards),
    ``solve_s`` (one batched ridge update), ``incremental_s`` (the same N facts inserted
    one Woodbury update at a time from precomputed keys); ForgetLP before/after on at most
    ``max_scored`` of the inserted facts (seeded sample) and RetainLP on ``sets.retain``.
    """
    settings = (memory or MemorySettings()).resolved(lm)
    if max(counts) > len(pool):
        raise ValueError(f"the fact pool has {len(pool)} facts, fewer than the largest count {max(counts)}")
    stats = key_statistics(lm, settings, background)
    kwargs = {**(eval_kwargs or {}), "robustness": False, "truth_ratios": False}
    rows = []
    for n in counts:
        items = list(pool[:n])
        scored = items if n <= max_scored else random.Random(seed).sample(items, max_scored)
        sub = EvalSets(scored, sets.retain, [], sets.info)
        before = evaluate_unlearning(lm, sub, **kwargs)
        store = new_memory(lm, settings, stats)
        timing = time_insertion(store, memory_facts(items))
        with store.attached():
            after = evaluate_unlearning(lm, sub, **kwargs)
        fit_s = timing["targets_s"] + timing["solve_s"]
        rows.append({
            "n_facts": n, "n_scored": len(scored), "targets_s": timing["targets_s"], "solve_s": timing["solve_s"],
            "incremental_s": timing["incremental_s"], "fit_time_s": fit_s, "per_fact_fit_s": fit_s / n,
            "per_fact_incremental_s": timing["incremental_s"] / n, "peak_rss_mb": timing["peak_rss_mb"],
            "forget_lp_before": before["forget_lp"], "forget_lp": after["forget_lp"],
            "forget_lp_drop": before["forget_lp"] - after["forget_lp"],
            "retain_lp_before": before["retain_lp"], "retain_lp": after["retain_lp"],
            "d_retain_lp": after["retain_lp"] - before["retain_lp"],
            "incremental_vs_batch_max_abs": timing["incremental_vs_batch_max_abs"],
        })
        if progress:
            progress("count", 1)
    return rows


def random_coordinate_ablation(
    lm: LanguageModel,
    sets: EvalSets,
    base: dict[str, Any],
    n_draws: int,
    *,
    memory: MemorySettings | None = None,
    background: Background = (),
    eval_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    progress: Progress = None,
) -> list[dict[str, Any]]:
    """The memory at ``n_draws`` random coordinates (same facts, α, λ, q — so the same rank).

    Coordinates are drawn uniformly without replacement from every (layer, site) with
    site ∈ resid / mlp_out / attn_out, excluding the configured (traced) one.  The first
    row is the configured coordinate itself, for comparison.
    """
    settings = (memory or MemorySettings()).resolved(lm)
    grid = [(layer, site) for layer in range(lm.n_layers) for site in RANDOM_SITES
            if (layer, site) != (settings.layer, settings.site)]
    draws = random.Random(seed).sample(grid, min(n_draws, len(grid)))
    rows = []
    for i, (layer, site) in enumerate([(settings.layer, settings.site), *draws]):
        s = replace(settings, layer=layer, site=site, coordinate_source="configured" if i == 0 else "random")
        row = run_method(lm, "memory", sets, base, memory=s, background=background, eval_kwargs=eval_kwargs)
        row["coordinate"] = {"layer": layer, "site": site, "source": s.coordinate_source}
        rows.append(row)
        if progress:
            progress("coordinate", 1)
    return rows


def traced_coordinate(lm: LanguageModel, items: Sequence[QAItem], *, n_facts: int = 10, samples: int = 10,
                      seed: int = 0) -> dict[str, Any]:
    """The memory coordinate from a trace of (up to ``n_facts``) forget facts.

    Runs the temporal trace (:func:`dlmedit.trace.trace_facts` with ``temporal=True``;
    for an ARM it has one step, i.e. it *is* the causal trace) on the residual stream
    and picks the layer with the largest mean indirect effect at the last subject
    token, maximised over denoising steps: the temporal peak for MDMs, the causal-trace
    peak for ARMs.
    """
    from dlmedit.trace import TraceConfig, average_temporal, trace_facts

    chosen = [it for it in items if it.subject][:n_facts]
    if not chosen:
        raise ValueError("no facts with a subject to trace")
    cfg = TraceConfig(sites=("resid",), samples=samples, seed=seed, temporal=True)
    traces, failures = trace_facts(lm, [(it.prompt, str(it.subject), it.answer) for it in chosen], cfg)
    if not traces:
        raise ValueError(f"tracing failed for every fact: {[f.error for f in failures][:3]}")
    from dlmedit.trace.results import CATEGORIES

    avg = average_temporal(traces)
    grid = np.asarray(avg["effect"]["resid"])[:, CATEGORIES.index("last subject token"), :]  # [step, layer]
    if np.all(np.isnan(grid)):
        raise ValueError("the trace has no effect values at the last subject token")
    step, layer = np.unravel_index(int(np.nanargmax(grid)), grid.shape)
    return {"layer": int(layer), "site": "resid", "step": int(step), "effect": float(grid[step, layer]),
            "n_traced": len(traces), "n_failed": len(failures),
            "effect_by_layer": np.nanmax(grid, axis=0).tolist()}


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` and free it (figures left open accumulate over a sweep)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_pareto(rows: Sequence[dict[str, Any]], base: dict[str, Any], path: str | Path,
                others: Sequence[dict[str, Any]] = ()) -> Path:
    """ForgetLP drop against RetainLP change for each swept value (and any other method rows given)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    xs = [r["d_retain_lp"] for r in rows]
    ys = [r["forget_lp_drop"] for r in rows]
    knob = rows[0].get("knob", "alpha") if rows else "alpha"
    symbol = {"alpha": "α", "lambda": "λ", "q": "q"}.get(knob, knob)
    ax.plot(xs, ys, "o-", label=f"memory ({symbol} sweep)")
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(f"{symbol}={r.get('value', r.get('alpha')):g}", (x, y), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    for r in others:
        if r.get("d_retain_lp") is not None:
            ax.plot([r["d_retain_lp"]], [r["forget_lp_drop"]], "s", label=r["method"])
    ax.axvline(0, color="grey", lw=0.5)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("RetainLP change (nats / answer, higher = better)")
    ax.set_ylabel("ForgetLP drop (nats / answer, higher = more forgotten)")
    ax.set_title(f"forget vs retain (base ForgetLP {base['forget_lp']:.2f}, RetainLP {base['retain_lp']:.2f})",
                 fontsize=9)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_sequential(result: dict[str, Any], path: str | Path) -> Path:
    plt = _plt()
    curve = result["curve"]
    n = [c["n_inserted"] for c in curve]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.plot(n, [c["forget_lp_inserted"] for c in curve], "o-", label="ForgetLP (inserted facts)")
    ax.plot(n, [c["forget_lp_inserted_base"] for c in curve], ":", label="same facts, unedited")
    ax.plot(n, [c["retain_lp"] for c in curve], "s-", label="RetainLP")
    ax.axhline(result["base"]["retain_lp"], color="C2", ls=":", lw=1, label="RetainLP, unedited")
    ax.set_xlabel("facts inserted (one Woodbury update each)")
    ax.set_ylabel("mean log-prob per answer (nats)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_scaling(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    plt = _plt()
    n = [r["n_facts"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    a.loglog(n, [r["fit_time_s"] for r in rows], "o-", label="fit (keys+deltas+solve)")
    a.loglog(n, [max(r["incremental_s"], 1e-7) for r in rows], "s-", label="incremental updates only")
    ref = rows[0]["fit_time_s"] / n[0]
    a.loglog(n, [ref * x for x in n], ":", color="grey", label="linear")
    a.set_xlabel("facts")
    a.set_ylabel("seconds")
    a.legend(fontsize=8)
    b.semilogx(n, [r["forget_lp_drop"] for r in rows], "o-", label="ForgetLP drop")
    b.semilogx(n, [r["d_retain_lp"] for r in rows], "s-", label="RetainLP change")
    b.set_xlabel("facts")
    b.set_ylabel("nats / answer")
    b.legend(fontsize=8)
    return _save(plt, fig, path)


def finite_or_none(value: Any) -> Any:
    """JSON-safe: NaN/Inf floats → None (recursively)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value
