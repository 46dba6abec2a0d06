"""Turn the study's collected numbers into summary.json and the HTML/Markdown report.

Statements in the report are generated from the numbers (nothing is written in
advance); each cites the quantity it is computed from.  Numbers over seeds are
reported as mean with a 95 % interval (t-interval over seeds; a single seed gives
no interval and says so).
"""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

import numpy as np

from dlmedit.cache import atomic_write_json
from dlmedit.report.render import Report

BUCKETS = ("1", "2", "3", "4+")


def over_seeds(values: list[float | None]) -> dict[str, Any]:
    """Mean and 95 % t-interval over seeds (None values are skipped)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(np.mean(vals))
    if len(vals) < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(vals) - 1) * np.std(vals, ddof=1) / math.sqrt(len(vals)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(vals)}


def fmt(entry: dict[str, Any] | float | None) -> str:
    if entry is None:
        return "–"
    if isinstance(entry, dict):
        if entry.get("mean") is None:
            return "–"
        if entry.get("low") is None:
            return f"{entry['mean']:.3f}"
        return f"{entry['mean']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"
    return f"{entry:.3f}"


def _seeds(results: dict[str, Any], stage: str, model: str) -> list[dict[str, Any]]:
    return list(results.get(stage, {}).get(model, {}).values())


def build_summary(collected: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Aggregate per-seed cell numbers into the study summary (deterministic: no timings inside)."""
    results = collected["results"]
    summary: dict[str, Any] = {"config": config, "trace": {}, "layer_sweep": {}, "edits": {}, "diagnosis": {},
                               "unlearning": {}, "real_model": {}}
    for model in results.get("trace", {}):
        cells = _seeds(results, "trace", model)
        entry: dict[str, Any] = {}
        for site in ("resid", "mlp_out", "attn_out"):
            layers = [c["peak"][site]["layer"] for c in cells if c.get("peak") and site in c["peak"]]
            cats = [c["peak"][site]["category"] for c in cells if c.get("peak") and site in c["peak"]]
            if layers:
                entry[site] = {"peak_layer": over_seeds(layers), "peak_category": max(set(cats), key=cats.count),
                               "peak_effect": over_seeds([c["peak"][site]["effect"] for c in cells])}
        temporal = [c["temporal"]["peak"] for c in cells if c.get("temporal") and c["temporal"].get("peak")]
        if temporal:
            entry["temporal"] = {"layer": over_seeds([t["layer"] for t in temporal]),
                                 "step": over_seeds([t["step"] for t in temporal]),
                                 "site": max({t["site"] for t in temporal}, key=[t["site"] for t in temporal].count)}
        entry["n_facts"] = sum(c.get("n_facts", 0) for c in cells)
        summary["trace"][model] = entry
    for model in results.get("layer_sweep", {}):
        cells = _seeds(results, "layer_sweep", model)
        n_rows = len(cells[0]["rows"]) if cells else 0
        summary["layer_sweep"][model] = [
            {"layer": cells[0]["rows"][i]["layer"],
             **{m: over_seeds([c["rows"][i][m] for c in cells]) for m in ("ES", "GenEM", "NS")}}
            for i in range(n_rows)
        ]
    for model in results.get("edits", {}):
        cells = _seeds(results, "edits", model)
        runs: dict[str, Any] = {}
        for run in cells[0]["runs"] if cells else []:
            entry = {}
            for metric in ("ES", "PS", "NS", "GenEM", "Score"):
                entry[metric] = {g: over_seeds([((c["runs"].get(run) or {}).get(metric) or {}).get(g) for c in cells])
                                 for g in ("all", *BUCKETS)}
            runs[run] = entry
        summary["edits"][model] = runs
    for model in results.get("diagnosis", {}):
        cells = [c for c in _seeds(results, "diagnosis", model) if "by_states" in c]
        by: dict[str, Any] = {}
        for states in cells[0]["by_states"] if cells else []:
            steps = max(len(c["by_states"][states]["trajectory_step_prob"]) for c in cells)
            by[states] = {
                "trajectory_step_prob": [over_seeds([c["by_states"][states]["trajectory_step_prob"][s]
                                                     for c in cells if s < len(c["by_states"][states]["trajectory_step_prob"])])
                                         for s in range(steps)],
                "partial_prob": over_seeds([c["by_states"][states]["partial_prob"] for c in cells]),
            }
        summary["diagnosis"][model] = by
    for model in results.get("unlearning", {}):
        summary["unlearning"][model] = summarize_unlearning(_seeds(results, "unlearning", model))
    for model in results.get("real_model", {}):
        summary["real_model"][model] = summarize_real_model(_seeds(results, "real_model", model))
    return summary


# Deltas of the unlearning stage the summary aggregates (timings stay out of summary.json).
UNLEARN_DELTAS = ("forget_lp_drop", "d_retain_lp", "d_utility_lp", "d_model_utility", "d_forget_para_lp",
                  "d_forget_icl_lp")
UNLEARN_LEVELS = ("forget_lp", "retain_lp", "utility_lp", "model_utility")
REAL_METRICS = ("ES", "PS", "NS", "GenEM")
#: the selectivity statement only compares methods that forget at least this much (nats per answer):
#: a ratio over a near-zero drop is noise.
MIN_DROP = 0.1


def _mode(values: list[Any]) -> Any:
    """Most frequent value, ties broken by first occurrence (deterministic)."""
    values = [v for v in values if v is not None]
    return max(values, key=lambda v: (values.count(v), -values.index(v))) if values else None


def summarize_unlearning(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed unlearning cells → means [95 % CI] over seeds of every method's deltas, the sweep, curve, ablation."""
    if not cells:
        return {}
    entry: dict[str, Any] = {
        "split": _mode([c.get("split") for c in cells]),
        "n_forget": over_seeds([c.get("n_forget") for c in cells]),
        "train_steps": _mode([(c.get("train_config") or {}).get("steps") for c in cells]),
        "memory_coordinate": _mode([f"L{(c.get('memory_settings') or {}).get('layer')} "
                                    f"{(c.get('memory_settings') or {}).get('site')}" for c in cells]),
        "base": {k: over_seeds([(c.get("base") or {}).get(k) for c in cells]) for k in UNLEARN_LEVELS},
        "methods": {},
    }
    for method in cells[0].get("methods", {}):
        rows = [(c.get("methods") or {}).get(method) or {} for c in cells]
        entry["methods"][method] = {k: over_seeds([r.get(k) for r in rows]) for k in UNLEARN_DELTAS}
    sweeps = [c["alpha_sweep"] for c in cells if c.get("alpha_sweep")]
    if sweeps:
        entry["alpha_sweep"] = [
            {"alpha": row["alpha"], **{k: over_seeds([s[i].get(k) for s in sweeps if i < len(s)])
                                       for k in ("forget_lp_drop", "d_retain_lp", "d_utility_lp")}}
            for i, row in enumerate(sweeps[0])
        ]
    curves = [c["sequential"]["curve"] for c in cells if c.get("sequential")]
    if curves:
        entry["sequential"] = {
            "n_facts": max((cv[-1]["n_inserted"] for cv in curves if cv), default=0),
            "curve": [{"n_inserted": pt["n_inserted"],
                       **{k: over_seeds([cv[i].get(k) for cv in curves if i < len(cv)])
                          for k in ("forget_lp_drop_inserted", "d_forget_lp_not_inserted", "d_retain_lp",
                                    "d_utility_lp")}}
                      for i, pt in enumerate(curves[0])],
        }
    ablations = [c["ablation"] for c in cells if c.get("ablation")]
    if ablations:
        def by_source(source: str, key: str) -> dict[str, Any]:
            per_seed = [[r.get(key) for r in rows if r.get("source") == source] for rows in ablations]
            return over_seeds([float(np.mean([v for v in vals if v is not None])) if any(v is not None for v in vals)
                               else None for vals in per_seed])

        entry["ablation"] = {src: {k: by_source(src, k) for k in ("forget_lp_drop", "d_retain_lp")}
                             for src in ("configured", "random")}
        entry["ablation"]["n_random"] = sum(r.get("source") == "random" for rows in ablations for r in rows)
    return entry


def summarize_real_model(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed real-model cells → trace peaks and ROME/MEMIT means over seeds (seconds per edit left out)."""
    if not cells:
        return {}
    traces = [c.get("trace") or {} for c in cells]
    trace: dict[str, Any] = {"n_facts": sum(t.get("n_facts", 0) for t in traces),
                             "n_correct": sum(t.get("n_correct", 0) for t in traces)}
    sites = [s for s in ("resid", "mlp_out", "attn_out") if any(s in (t.get("peak") or {}) for t in traces)]
    for site in sites:
        peaks = [t["peak"][site] for t in traces if site in (t.get("peak") or {})]
        trace[site] = {"peak_layer": over_seeds([p.get("layer") for p in peaks]),
                       "peak_category": _mode([p.get("category") for p in peaks]),
                       "peak_effect": over_seeds([p.get("effect") for p in peaks])}
    last = [t["mlp_last_subject"] for t in traces if t.get("mlp_last_subject")]
    if last:
        trace["mlp_last_subject"] = {"layer": over_seeds([x["layer"] for x in last]),
                                     "effect": over_seeds([x["effect"] for x in last])}
    runs: dict[str, Any] = {}
    for run in cells[0].get("runs", {}):
        per = [(c.get("runs") or {}).get(run) or {} for c in cells]
        runs[run] = {m: over_seeds([r.get(m) for r in per]) for m in REAL_METRICS}
        runs[run]["pre"] = {m: over_seeds([(r.get("pre") or {}).get(m) for r in per]) for m in REAL_METRICS}
    return {"n_facts": sum(c.get("n_facts", 0) for c in cells),
            "known_only": all(c.get("known_only") for c in cells), "trace": trace, "runs": runs}


def _num(x: float) -> str:
    """A layer/step mean over seeds: an integer when the seeds agree, else one decimal."""
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def statements(summary: dict[str, Any]) -> list[str]:
    """Sentences generated from the numbers."""
    out: list[str] = []
    for model, entry in summary["trace"].items():
        mlp = entry.get("mlp_out")
        if mlp and mlp["peak_layer"]["mean"] is not None:
            out.append(f"{model}: the MLP indirect effect peaks at layer {_num(mlp['peak_layer']['mean'])} "
                       f"({mlp['peak_category']}), effect {fmt(mlp['peak_effect'])}.")
        if entry.get("temporal"):
            t = entry["temporal"]
            out.append(f"{model}: the temporal indirect effect peaks at layer {_num(t['layer']['mean'])}, "
                       f"denoising step {_num(t['step']['mean'])} ({t['site']}).")
    for model, runs in summary["edits"].items():
        rome = runs.get("rome/final", {}).get("GenEM", {})
        one, multi = rome.get("1", {}).get("mean"), rome.get("4+", {}).get("mean")
        if one is not None and multi is not None:
            out.append(f"{model}: ROME exact match by generation drops from {one:.2f} (1-token targets) to "
                       f"{multi:.2f} (4+ tokens) with final-state fitting.")
        for corrected in ("partial", "trajectory"):
            fixed = runs.get(f"rome/{corrected}", {}).get("GenEM", {}).get("4+", {}).get("mean")
            if fixed is not None and multi is not None:
                verb = "raises" if fixed > multi else "does not raise" if fixed == multi else "lowers"
                out.append(f"{model}: fitting on {corrected} states {verb} 4+-token exact match "
                           f"({multi:.2f} → {fixed:.2f}).")
    for model, by in summary["diagnosis"].items():
        final = by.get("final")
        if final and final["trajectory_step_prob"]:
            first, last = final["trajectory_step_prob"][0]["mean"], final["trajectory_step_prob"][-1]["mean"]
            if first is not None and last is not None:
                out.append(f"{model}: after a final-state ROME edit, the probability of the still-masked new-target "
                           f"tokens moves from {first:.2f} at the all-masked state to {last:.2f} at the last step of "
                           "the model's own denoising path.")
    out.extend(unlearning_statements(summary.get("unlearning", {})))
    out.extend(real_model_statements(summary.get("real_model", {})))
    return out


def _m(entry: dict[str, Any] | None) -> float | None:
    return (entry or {}).get("mean")


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def unlearning_statements(unlearning: dict[str, Any]) -> list[str]:
    """Sentences on the edit memory vs the baselines, computed from the aggregated deltas."""
    out: list[str] = []
    for model, entry in unlearning.items():
        methods = entry.get("methods") or {}
        drops = {m: _m(v.get("forget_lp_drop")) for m, v in methods.items()}
        retain = {m: _m(v.get("d_retain_lp")) for m, v in methods.items()}
        n = _m(entry.get("n_forget"))
        facts = f"{n:.0f} facts of {entry.get('split')}" if n is not None else str(entry.get("split"))
        if drops.get("memory") is not None:
            text = (f"{model}: unlearning {facts}, the residual edit memory lowers ForgetLP by "
                    f"{drops['memory']:.2f} nats/answer with a RetainLP change of {_signed(retain['memory'])}")
            baselines = {m: d for m, d in drops.items() if m != "memory" and d is not None}
            if baselines:
                best = max(baselines, key=lambda m: (baselines[m], m))
                text += (f"; the largest baseline drop is {best}'s {baselines[best]:.2f} (RetainLP change "
                         f"{_signed(retain[best])}; training baselines ran {entry.get('train_steps')} steps)")
            out.append(text + ".")
        cost = {m: retain[m] / drops[m] for m in drops
                if drops[m] is not None and drops[m] >= MIN_DROP and retain.get(m) is not None}
        if len(cost) >= 2:
            best = max(cost, key=lambda m: (cost[m], m))
            out.append(f"{model}: RetainLP change per nat of ForgetLP removed, over methods removing ≥ {MIN_DROP:.2f} "
                       "nats/answer: " + ", ".join(f"{m} {v:+.3f}" for m, v in sorted(cost.items()))
                       + f"; the least damaging is {best}.")
        sweep = entry.get("alpha_sweep") or []
        if len(sweep) >= 2 and _m(sweep[0]["forget_lp_drop"]) is not None and _m(sweep[-1]["forget_lp_drop"]) is not None:
            lo, hi = sweep[0], sweep[-1]
            verb = "grows" if _m(hi["forget_lp_drop"]) > _m(lo["forget_lp_drop"]) else "does not grow"
            out.append(f"{model}: the memory's ForgetLP drop {verb} from {_m(lo['forget_lp_drop']):.2f} at α={lo['alpha']:g} "
                       f"to {_m(hi['forget_lp_drop']):.2f} at α={hi['alpha']:g}, while the RetainLP change goes from "
                       f"{_signed(_m(lo['d_retain_lp']))} to {_signed(_m(hi['d_retain_lp']))}.")
        curve = (entry.get("sequential") or {}).get("curve") or []
        if curve and _m(curve[-1]["forget_lp_drop_inserted"]) is not None:
            last = curve[-1]
            out.append(f"{model}: after {last['n_inserted']} one-at-a-time insertions the inserted facts' ForgetLP "
                       f"has dropped by {_m(last['forget_lp_drop_inserted']):.2f} nats/answer and RetainLP changed by "
                       f"{_signed(_m(last['d_retain_lp']))}.")
        abl = entry.get("ablation")
        if abl and _m(abl["configured"]["forget_lp_drop"]) is not None and _m(abl["random"]["forget_lp_drop"]) is not None:
            conf, rand = _m(abl["configured"]["forget_lp_drop"]), _m(abl["random"]["forget_lp_drop"])
            rel = "larger than" if conf > rand else "smaller than" if conf < rand else "equal to"
            out.append(f"{model}: at the configured coordinate ({entry.get('memory_coordinate')}) the memory's ForgetLP "
                       f"drop ({conf:.2f}) is {rel} its mean over {abl['n_random']} random coordinates ({rand:.2f}).")
    return out


def real_model_statements(real: dict[str, Any]) -> list[str]:
    """Sentences on where a real model keeps capital facts and how well ROME / MEMIT rewrite them."""
    out: list[str] = []
    for model, entry in real.items():
        trace = entry.get("trace") or {}
        kind = "known " if entry.get("known_only") else ""
        mlp = trace.get("mlp_out")
        if mlp and _m(mlp["peak_layer"]) is not None:
            text = (f"{model}: over {trace.get('n_facts')} {kind}capital facts the MLP indirect effect peaks at layer "
                    f"{_m(mlp['peak_layer']):.1f} ({mlp['peak_category']}, effect {fmt(mlp['peak_effect'])})")
            last = trace.get("mlp_last_subject")
            if last and _m(last["layer"]) is not None:
                text += (f"; at the last subject token it peaks at layer {_m(last['layer']):.1f} "
                         f"(effect {fmt(last['effect'])})")
            out.append(text + ".")
        parts = []
        for run, metrics in (entry.get("runs") or {}).items():
            vals = ", ".join(f"{k} {_m(metrics.get(k)):.2f}" for k in REAL_METRICS if _m(metrics.get(k)) is not None)
            if vals:
                parts.append(f"{run}: {vals}")
        if parts:
            out.append(f"{model}: rewriting {entry.get('n_facts')} {kind}capitals — " + "; ".join(parts) + ".")
    return out


def _cell_mean(collected: dict[str, Any], stage: str, model: str, *path: str) -> float | None:
    """Mean over seeds of a number inside the raw cells (used for timings, which summary.json leaves out)."""
    vals = []
    for cell in _seeds(collected["results"], stage, model):
        node: Any = cell
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and math.isfinite(node):
            vals.append(float(node))
    return float(np.mean(vals)) if vals else None


def _first_plot(collected: dict[str, Any], stages_dir: Path, stage: str, model: str, *path: str) -> Path | None:
    for cell in _seeds(collected["results"], stage, model)[:1]:
        node: Any = cell
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, str) and (stages_dir / stage / node).exists():
            return stages_dir / stage / node
    return None


def _unlearning_section(report: Report, summary: dict[str, Any], collected: dict[str, Any], stages_dir: Path) -> None:
    sec = report.section("4. Residual edit memory vs unlearning baselines")
    rows = []
    for model, entry in summary["unlearning"].items():
        for method, v in (entry.get("methods") or {}).items():
            rows.append({"model": model, "method": method, "ForgetLP drop": fmt(v["forget_lp_drop"]),
                         "ΔRetainLP": fmt(v["d_retain_lp"]), "ΔUtilityLP": fmt(v["d_utility_lp"]),
                         "Δmodel utility": fmt(v["d_model_utility"]), "ΔParaLP": fmt(v["d_forget_para_lp"]),
                         "fit s": fmt(_cell_mean(collected, "unlearning", model, "methods", method, "fit_time_s")),
                         "wall s": fmt(_cell_mean(collected, "unlearning", model, "methods", method, "wall_time_s"))})
    sec.table(rows, caption="change from the unedited model in nats per answer (mean [95% CI] over seeds; ForgetLP "
                            "drop > 0 = forgotten, Δ < 0 = damaged); times are per-cell wall clock, mean over seeds, "
                            "kept out of summary.json")
    base_rows = [{"model": model, "split": e.get("split"), "forget facts": f"{_m(e.get('n_forget')) or 0:.0f}",
                  "memory coordinate": e.get("memory_coordinate"), "training steps": e.get("train_steps"),
                  **{k: fmt(e["base"].get(k)) for k in UNLEARN_LEVELS}}
                 for model, e in summary["unlearning"].items() if e]
    sec.table(base_rows, caption="unedited model and setup")
    for model, entry in summary["unlearning"].items():
        if entry.get("alpha_sweep"):
            sec.table([{"model": model, "α": r["alpha"], "ForgetLP drop": fmt(r["forget_lp_drop"]),
                        "ΔRetainLP": fmt(r["d_retain_lp"]), "ΔUtilityLP": fmt(r["d_utility_lp"])}
                       for r in entry["alpha_sweep"]], caption=f"{model}: α sweep of the memory")
        if entry.get("sequential"):
            sec.table([{"model": model, "inserted": r["n_inserted"],
                        "drop (inserted)": fmt(r["forget_lp_drop_inserted"]),
                        "Δ not inserted": fmt(r["d_forget_lp_not_inserted"]), "ΔRetainLP": fmt(r["d_retain_lp"]),
                        "ΔUtilityLP": fmt(r["d_utility_lp"])} for r in entry["sequential"]["curve"]],
                      caption=f"{model}: sequential insertion (one Woodbury update per fact)")
        if entry.get("ablation"):
            abl = entry["ablation"]
            sec.table([{"model": model, "coordinate": src, "ForgetLP drop": fmt(abl[src]["forget_lp_drop"]),
                        "ΔRetainLP": fmt(abl[src]["d_retain_lp"])} for src in ("configured", "random")],
                      caption=f"{model}: random-coordinate ablation ({abl['n_random']} random draws in all)")
        pareto = _first_plot(collected, stages_dir, "unlearning", model, "plots", "pareto")
        if pareto:
            sec.figure(pareto, f"{model}: ForgetLP drop vs RetainLP change (first seed)")
        seq = _first_plot(collected, stages_dir, "unlearning", model, "plots", "sequential")
        if seq:
            sec.figure(seq, f"{model}: sequential insertion curve (first seed)")


def _real_model_section(report: Report, summary: dict[str, Any], collected: dict[str, Any], stages_dir: Path) -> None:
    sec = report.section("5. A real pretrained model: capital-city facts")
    for model, entry in summary["real_model"].items():
        trace = entry.get("trace") or {}
        rows = [{"model": model, "site": site, "peak layer": fmt(trace[site]["peak_layer"]),
                 "category": trace[site]["peak_category"], "effect": fmt(trace[site]["peak_effect"])}
                for site in ("resid", "mlp_out", "attn_out") if site in trace]
        if trace.get("mlp_last_subject"):
            last = trace["mlp_last_subject"]
            rows.append({"model": model, "site": "mlp_out", "peak layer": fmt(last["layer"]),
                         "category": "last subject token (fixed)", "effect": fmt(last["effect"])})
        sec.table(rows, caption=f"{model}: peak of the mean indirect effect over {trace.get('n_facts')} capital facts "
                                f"({trace.get('n_correct')} predicted correctly)")
        plot = _first_plot(collected, stages_dir, "real_model", model, "trace", "plot")
        if plot:
            sec.figure(plot, f"{model}: mean indirect effect on capital facts (first seed)")
        sec.table([{"model": model, "method/protocol": run,
                    **{m: fmt(v[m]) for m in REAL_METRICS},
                    **{f"{m} before": fmt(v["pre"][m]) for m in ("ES", "NS")},
                    "s / edit": fmt(_cell_mean(collected, "real_model", model, "runs", run, "seconds_per_edit"))}
                   for run, v in (entry.get("runs") or {}).items()],
                  caption="ROME one edit at a time (single), MEMIT all facts in one batch (batch); s / edit from the "
                          "cells (not in summary.json)")


def write_report(out: Path, summary: dict[str, Any], collected: dict[str, Any], versions: dict[str, str],
                 wall_time_s: float) -> tuple[Path, Path]:
    """Write report.html + report.md from the summary and the per-stage plots."""
    report = Report("dlmedit study: editing masked diffusion vs autoregressive models",
                    f"models: {', '.join(summary['config']['models'])}; seeds: {summary['config']['seeds']}; "
                    f"quick={summary['config']['quick']}; wall time {wall_time_s:.0f} s (this run); "
                    f"{sum(collected['timings'].values()):.0f} s summed over the {len(collected['timings'])} cells "
                    "(all runs, if resumed)")
    report.section("Findings (generated from the numbers)").bullets(statements(summary) or ["no stage produced numbers"])
    stages_dir = out / "stages"
    if summary["trace"]:
        sec = report.section("1. Where facts live: causal tracing")
        rows = []
        for model, entry in summary["trace"].items():
            for site in ("resid", "mlp_out", "attn_out"):
                if site in entry:
                    rows.append({"model": model, "site": site, "peak layer": fmt(entry[site]["peak_layer"]),
                                 "category": entry[site]["peak_category"], "effect": fmt(entry[site]["peak_effect"])})
        sec.table(rows, caption="peak of the mean indirect effect (mean [95% CI] over seeds)")
        for model in summary["trace"]:
            for cell in _seeds(collected["results"], "trace", model)[:1]:
                if (stages_dir / "trace" / cell["plot"]).exists():
                    sec.figure(stages_dir / "trace" / cell["plot"], f"{model}: mean indirect effect by token category")
                temporal = cell.get("temporal")
                if temporal and (stages_dir / "trace" / temporal["plot"]).exists():
                    sec.figure(stages_dir / "trace" / temporal["plot"], f"{model}: temporal indirect effect (layer × step)")
    if summary["layer_sweep"]:
        sec = report.section("2. Does the location transfer? ROME efficacy by edited layer")
        from dlmedit.study.plots import plot_layer_sweep

        path = plot_layer_sweep(summary, out / "plots" / "layer_sweep.png")
        sec.figure(path, "ROME efficacy (ES, exact match by generation) vs edited layer; dashed: traced MLP peak")
        for model, rows in summary["layer_sweep"].items():
            sec.table([{"model": model, "layer": r["layer"], "ES": fmt(r["ES"]), "GenEM": fmt(r["GenEM"]),
                        "NS": fmt(r["NS"])} for r in rows])
    if summary["edits"]:
        sec = report.section("3. Single vs multi-token edits and the target-state correction")
        rows = []
        for model, runs in summary["edits"].items():
            for run, entry in runs.items():
                row = {"model": model, "method/states": run}
                for g in ("all", *BUCKETS):
                    row[f"GenEM {g}"] = fmt(entry["GenEM"].get(g))
                row["ES"] = fmt(entry["ES"]["all"])
                row["PS"] = fmt(entry["PS"]["all"])
                row["NS"] = fmt(entry["NS"]["all"])
                rows.append(row)
        sec.table(rows, caption="exact match by real generation (greedy / iterative denoising) by target length, and "
                                "CounterFact ES/PS/NS by score")
        from dlmedit.study.plots import plot_diagnosis, plot_em_by_length

        sec.figure(plot_em_by_length(summary, out / "plots" / "em_by_length.png"), "exact match by target length")
        if summary["diagnosis"]:
            sec.figure(plot_diagnosis(summary, out / "plots" / "diagnosis.png"),
                       "probability of still-masked new-target tokens along the edited model's denoising path")
    if summary["unlearning"]:
        _unlearning_section(report, summary, collected, stages_dir)
    if summary["real_model"]:
        _real_model_section(report, summary, collected, stages_dir)
    sec = report.section("Configuration and environment")
    sec.table([{"key": k, "value": str(v)} for k, v in summary["config"].items()])
    sec.table([{"package": k, "version": v} for k, v in versions.items()])
    return report.write(out)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("dlmedit", "torch", "transformers", "tokenizers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def save_summary(out: Path, summary: dict[str, Any]) -> Path:
    path = out / "summary.json"
    atomic_write_json(path, summary)
    return path
