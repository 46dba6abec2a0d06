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
    for stage in ("unlearning", "real_model"):
        for model in results.get(stage, {}):
            summary[stage][model] = results[stage][model]
    return summary


def statements(summary: dict[str, Any]) -> list[str]:
    """Sentences generated from the numbers."""
    out: list[str] = []
    for model, entry in summary["trace"].items():
        mlp = entry.get("mlp_out")
        if mlp and mlp["peak_layer"]["mean"] is not None:
            out.append(f"{model}: the MLP indirect effect peaks at layer {mlp['peak_layer']['mean']:.1f} "
                       f"({mlp['peak_category']}), effect {fmt(mlp['peak_effect'])}.")
        if entry.get("temporal"):
            t = entry["temporal"]
            out.append(f"{model}: the temporal indirect effect peaks at layer {t['layer']['mean']:.1f}, "
                       f"denoising step {t['step']['mean']:.1f} ({t['site']}).")
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
    return out


def write_report(out: Path, summary: dict[str, Any], collected: dict[str, Any], versions: dict[str, str],
                 wall_time_s: float) -> tuple[Path, Path]:
    """Write report.html + report.md from the summary and the per-stage plots."""
    report = Report("dlmedit study: editing masked diffusion vs autoregressive models",
                    f"models: {', '.join(summary['config']['models'])}; seeds: {summary['config']['seeds']}; "
                    f"quick={summary['config']['quick']}; wall time {wall_time_s:.0f} s")
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
    if summary["unlearning"] or summary["real_model"]:
        sec = report.section("4–5. Edit memory, unlearning and the real model")
        for stage in ("unlearning", "real_model"):
            for model, cells in summary[stage].items():
                sec.code(f"{stage} · {model}\n" + _compact(cells))
    sec = report.section("Configuration and environment")
    sec.table([{"key": k, "value": str(v)} for k, v in summary["config"].items()])
    sec.table([{"package": k, "version": v} for k, v in versions.items()])
    return report.write(out)


def _compact(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1, default=str)[:4000]


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
