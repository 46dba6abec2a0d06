"""Turn the study's collected numbers into summary.json and the HTML/Markdown report.

Statements in the report are generated from the numbers (nothing is written in
advance); each cites the quantity it is computed from, with its 95 % interval and n,
and names a direction only when the intervals do not overlap (the wording helpers of
`dlmedit.evaluate.stats`).  Per-fact numbers (edit metrics, traced effects, unlearning
deltas per answer) pool the facts of every seed into one interval (n = facts): Wilson for
0/1 values such as exact match, a seeded percentile bootstrap otherwise.  Numbers with one
value per seed (peak layers, sweeps, curves) get a t-interval over seeds (n = seeds; a
single seed gives no interval and says so).
"""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

import numpy as np

from dlmedit.cache import atomic_write_json
from dlmedit.evaluate.stats import (
    bootstrap_ratio_ci,
    change_phrase,
    compare_phrase,
    estimate_text,
    pooled_ci,
    sign_phrase,
    top_phrase,
)
from dlmedit.report.render import Report

BUCKETS = ("1", "2", "3", "4+")


def over_seeds(values: list[float | None]) -> dict[str, Any]:
    """Mean and 95 % t-interval over seeds (None values are skipped)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "low": None, "high": None, "n": 0, "unit": "seeds"}
    mean = float(np.mean(vals))
    if len(vals) < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1, "unit": "seeds"}
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(vals) - 1) * np.std(vals, ddof=1) / math.sqrt(len(vals)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(vals), "unit": "seeds"}


def per_fact(nodes: list[Any], means: list[float | None], unit: str = "facts") -> dict[str, Any]:
    """Pool per-fact values over seeds into one bootstrap interval (n = facts) when every seed's node has
    ``values``; otherwise (cells written before values were kept) fall back to the t-interval over seeds."""
    if nodes and all(isinstance(n, dict) and "values" in n for n in nodes):
        return pooled_ci([n["values"] for n in nodes], unit=unit)
    if nodes and all(isinstance(n, list) for n in nodes):
        return pooled_ci(nodes, unit=unit)
    return over_seeds(means)


def fmt(entry: dict[str, Any] | float | None) -> str:
    if entry is None:
        return "–"
    if isinstance(entry, dict):
        if entry.get("mean") is None:
            return "–"
        n = f" (n={entry['n']})" if entry.get("n") is not None else ""
        if entry.get("low") is None:
            return f"{entry['mean']:.3f}{n}"
        return f"{entry['mean']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]{n}"
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
                entry[site] = {"peak_layer": over_seeds(layers), "peak_category": _mode(cats),
                               "peak_effect": per_fact([(c.get("peak_effect") or {}).get(site) for c in cells],
                                                       [c["peak"][site]["effect"] for c in cells])}
        temporal = [c["temporal"]["peak"] for c in cells if c.get("temporal") and c["temporal"].get("peak")]
        if temporal:
            entry["temporal"] = {"layer": over_seeds([t["layer"] for t in temporal]),
                                 "step": over_seeds([t["step"] for t in temporal]),
                                 "site": _mode([t["site"] for t in temporal]),
                                 "effect": per_fact([c["temporal"].get("peak_effect") for c in cells
                                                     if c.get("temporal") and c["temporal"].get("peak")],
                                                    [t["effect"] for t in temporal])}
        entry["n_facts"] = sum(c.get("n_facts", 0) for c in cells)
        summary["trace"][model] = entry
    for model in results.get("layer_sweep", {}):
        cells = _seeds(results, "layer_sweep", model)
        n_rows = len(cells[0]["rows"]) if cells else 0
        summary["layer_sweep"][model] = [
            {"layer": cells[0]["rows"][i]["layer"],
             **{m: per_fact([(c["rows"][i].get("values") or {}).get(m) if "values" in c["rows"][i] else None
                             for c in cells], [c["rows"][i][m] for c in cells]) for m in ("ES", "GenEM", "NS")}}
            for i in range(n_rows)
        ]
    for model in results.get("edits", {}):
        cells = _seeds(results, "edits", model)
        runs: dict[str, Any] = {}
        for run in cells[0]["runs"] if cells else []:
            entry = {}
            per = [c["runs"].get(run) or {} for c in cells]
            for metric in ("ES", "PS", "NS", "GenEM", "Score"):
                entry[metric] = {
                    g: per_fact([(r["values"].get(metric) or {}).get(g, []) if metric in r.get("values", {}) else None
                                 for r in per], [(r.get(metric) or {}).get(g) for r in per])
                    for g in ("all", *BUCKETS)}
            runs[run] = entry
        summary["edits"][model] = runs
    for model in results.get("diagnosis", {}):
        cells = [c for c in _seeds(results, "diagnosis", model) if "by_states" in c]
        by: dict[str, Any] = {}
        for states in cells[0]["by_states"] if cells else []:
            steps = max(len(c["by_states"][states]["trajectory_step_prob"]) for c in cells)
            with_step = [[c["by_states"][states] for c in cells
                          if s < len(c["by_states"][states]["trajectory_step_prob"])] for s in range(steps)]
            by[states] = {
                "trajectory_step_prob": [
                    per_fact([b["trajectory_step_values"][s] if "trajectory_step_values" in b else None for b in bs],
                             [b["trajectory_step_prob"][s] for b in bs])
                    for s, bs in enumerate(with_step)],
                "partial_prob": over_seeds([c["by_states"][states]["partial_prob"] for c in cells]),
            }
        summary["diagnosis"][model] = by
    for model in results.get("unlearning", {}):
        summary["unlearning"][model] = summarize_unlearning(_seeds(results, "unlearning", model))
    from dlmedit.study.real_pair import summarize_real_pair  # the real-model section's own module

    summary["real_model"] = summarize_real_pair(results.get("real_model", {}))
    return summary


# Deltas of the unlearning stage the summary aggregates (timings stay out of summary.json).
UNLEARN_DELTAS = ("forget_lp_drop", "d_retain_lp", "d_utility_lp", "d_model_utility", "d_forget_para_lp",
                  "d_forget_icl_lp")
UNLEARN_LEVELS = ("forget_lp", "retain_lp", "utility_lp", "model_utility")
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
        for k in ("forget_lp_drop", "d_retain_lp"):  # per answer, pooled over seeds, where the cells kept them
            entry["methods"][method][k] = per_fact([(r.get("per_answer") or {}).get(k) for r in rows],
                                                   [r.get(k) for r in rows], unit="answers")
        # RetainLP change per nat of ForgetLP removed: a ratio of per-answer means with a bootstrap interval, or
        # (cells without per-answer values) the per-seed ratios with a t-interval over seeds
        answers = [r.get("per_answer") or {} for r in rows]
        if all("forget_lp_drop" in a and "d_retain_lp" in a for a in answers):
            ratio = bootstrap_ratio_ci([v for a in answers for v in a["d_retain_lp"]["values"]],
                                       [v for a in answers for v in a["forget_lp_drop"]["values"]], unit="answers")
        else:
            ratio = over_seeds([r["d_retain_lp"] / r["forget_lp_drop"] if r.get("forget_lp_drop") and
                                r.get("d_retain_lp") is not None else None for r in rows])
        entry["methods"][method]["retain_per_drop"] = ratio
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


def _num(x: float) -> str:
    """A layer/step mean over seeds: an integer when the seeds agree, else one decimal."""
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def statements(summary: dict[str, Any]) -> list[str]:
    """Sentences generated from the numbers: each gives its estimates with 95 % intervals and n, and names a
    direction only when the intervals do not overlap (else "no measurable difference (n = …)")."""
    out: list[str] = []
    for model, entry in summary["trace"].items():
        mlp = entry.get("mlp_out")
        if mlp and mlp["peak_layer"]["mean"] is not None:
            out.append(f"{model}: the MLP indirect effect peaks at layer {estimate_text(mlp['peak_layer'], 1)} "
                       f"({mlp['peak_category']}), effect {estimate_text(mlp['peak_effect'], 3)}.")
        if entry.get("temporal"):
            t = entry["temporal"]
            out.append(f"{model}: the temporal indirect effect peaks at layer {estimate_text(t['layer'], 1)}, "
                       f"denoising step {estimate_text(t['step'], 1)} ({t['site']}), effect "
                       f"{estimate_text(t.get('effect'), 3)}.")
    for model, runs in summary["edits"].items():
        rome = runs.get("rome/final", {}).get("GenEM", {})
        one, multi = rome.get("1"), rome.get("4+")
        if _m(one) is not None and _m(multi) is not None:
            out.append(change_phrase(one, multi, what=f"{model}: ROME exact match by generation (final-state fitting)",
                                     before_label="1-token targets", after_label="4+-token targets") + ".")
        for corrected in ("partial", "trajectory"):
            fixed = runs.get(f"rome/{corrected}", {}).get("GenEM", {}).get("4+")
            if _m(fixed) is not None and _m(multi) is not None:
                out.append(compare_phrase(fixed, multi, what=f"{model}: ROME 4+-token exact match by generation",
                                          a_label=f"fitting on {corrected} states",
                                          b_label="final-state fitting") + ".")
    for model, by in summary["diagnosis"].items():
        final = by.get("final")
        if final and final["trajectory_step_prob"]:
            first, last = final["trajectory_step_prob"][0], final["trajectory_step_prob"][-1]
            if _m(first) is not None and _m(last) is not None:
                out.append(change_phrase(first, last, what=f"{model}: after a final-state ROME edit, the probability "
                                                          "of the still-masked new-target tokens",
                                         before_label="the all-masked state",
                                         after_label="the last step of the model's own denoising path") + ".")
    out.extend(unlearning_statements(summary.get("unlearning", {})))
    from dlmedit.study.real_pair import real_pair_statements

    out.extend(real_pair_statements(summary.get("real_model", {})))
    return out


def _m(entry: dict[str, Any] | None) -> float | None:
    return (entry or {}).get("mean")


def unlearning_statements(unlearning: dict[str, Any]) -> list[str]:
    """Sentences on the edit memory vs the baselines, computed from the aggregated deltas (nats per answer)."""
    out: list[str] = []
    for model, entry in unlearning.items():
        methods = entry.get("methods") or {}
        n = _m(entry.get("n_forget"))
        facts = f"{n:.0f} facts of {entry.get('split')}" if n is not None else str(entry.get("split"))
        memory = methods.get("memory") or {}
        if _m(memory.get("forget_lp_drop")) is not None:
            text = (f"{model}: unlearning {facts}, "
                    + sign_phrase(memory["forget_lp_drop"], what="the residual edit memory",
                                  positive="lowers ForgetLP by", negative="raises ForgetLP by")
                    + f" nats/answer, RetainLP change {estimate_text(memory.get('d_retain_lp'))}")
            baselines = {m: v.get("forget_lp_drop") for m, v in methods.items()
                         if m != "memory" and _m(v.get("forget_lp_drop")) is not None}
            if baselines:
                text += ("; " + top_phrase(baselines, what="the largest baseline ForgetLP drop")
                         + f" (training baselines ran {entry.get('train_steps')} steps)")
            out.append(text + ".")
        cost = {m: v["retain_per_drop"] for m, v in methods.items()
                if _m(v.get("forget_lp_drop")) is not None and _m(v.get("forget_lp_drop")) >= MIN_DROP
                and _m(v.get("retain_per_drop")) is not None}
        if len(cost) >= 2:
            out.append(f"{model}: RetainLP change per nat of ForgetLP removed, over methods removing ≥ {MIN_DROP:.2f} "
                       "nats/answer: " + ", ".join(f"{m} {estimate_text(c, 3)}" for m, c in sorted(cost.items()))
                       + "; " + top_phrase(cost, what="the least damaging (largest value)", digits=3) + ".")
        sweep = entry.get("alpha_sweep") or []
        if len(sweep) >= 2 and _m(sweep[0]["forget_lp_drop"]) is not None and _m(sweep[-1]["forget_lp_drop"]) is not None:
            lo, hi = sweep[0], sweep[-1]
            out.append(change_phrase(lo["forget_lp_drop"], hi["forget_lp_drop"],
                                     what=f"{model}: the memory's ForgetLP drop", before_label=f"α={lo['alpha']:g}",
                                     after_label=f"α={hi['alpha']:g}", up="grows", down="shrinks")
                       + "; " + change_phrase(lo["d_retain_lp"], hi["d_retain_lp"], what="its RetainLP change",
                                              before_label=f"α={lo['alpha']:g}", after_label=f"α={hi['alpha']:g}",
                                              up="rises", down="falls") + ".")
        curve = (entry.get("sequential") or {}).get("curve") or []
        if curve and _m(curve[-1]["forget_lp_drop_inserted"]) is not None:
            last = curve[-1]
            out.append(f"{model}: after {last['n_inserted']} one-at-a-time insertions, "
                       + sign_phrase(last["forget_lp_drop_inserted"], what="the inserted facts' ForgetLP",
                                     positive="has dropped by", negative="has risen by")
                       + f" nats/answer, RetainLP change {estimate_text(last['d_retain_lp'])}.")
        abl = entry.get("ablation")
        if abl and _m(abl["configured"]["forget_lp_drop"]) is not None and _m(abl["random"]["forget_lp_drop"]) is not None:
            out.append(compare_phrase(abl["configured"]["forget_lp_drop"], abl["random"]["forget_lp_drop"],
                                      what=f"{model}: the memory's ForgetLP drop",
                                      a_label=f"the configured coordinate ({entry.get('memory_coordinate')})",
                                      b_label=f"the mean over {abl['n_random']} random coordinates",
                                      higher="larger", lower="smaller") + ".")
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
    sec.table(rows, caption="change from the unedited model in nats per answer, mean [95% CI] (n): ForgetLP drop and "
                            "ΔRetainLP bootstrap over the answers of every seed (n = answers), the other columns "
                            "t-interval over seeds (n = seeds); ForgetLP drop > 0 = forgotten, Δ < 0 = damaged; times are per-cell wall clock, mean over seeds, "
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


def _models_run(collected: dict[str, Any]) -> list[str]:
    """The models that have cells, in stage order (a ``--stages real_model`` run has only the real ones)."""
    return list(dict.fromkeys(m for stage in (collected.get("results") or {}).values() for m in stage))


def write_report(out: Path, summary: dict[str, Any], collected: dict[str, Any], versions: dict[str, str],
                 wall_time_s: float) -> tuple[Path, Path]:
    """Write report.html + report.md from the summary and the per-stage plots."""
    report = Report("dlmedit study: editing masked diffusion vs autoregressive models",
                    f"models: {', '.join(_models_run(collected) or summary['config']['models'])}; "
                    f"seeds: {summary['config']['seeds']}; "
                    f"quick={summary['config']['quick']}; wall time {wall_time_s:.0f} s (this run); "
                    f"{sum(collected['timings'].values()):.0f} s summed over the {len(collected['timings'])} cells "
                    "(all runs, if resumed)")
    report.section("Findings (generated from the numbers)").text(
        "Each number is a mean with its 95 % interval and n: per-fact numbers pool the facts (or answers) of every "
        "seed into one interval (Wilson for 0/1 values such as exact match, else a seeded bootstrap), per-seed numbers (peak layers, sweeps, curves) use a t-interval over seeds. "
        "A direction (drops, rises, higher, lower, larger, …) is named only when the two intervals do not overlap; "
        "otherwise the statement says \"no measurable difference (n = …)\"."
    ).bullets(statements(summary) or ["no stage produced numbers"])
    stages_dir = out / "stages"
    if summary["trace"]:
        sec = report.section("1. Where facts live: causal tracing")
        rows = []
        for model, entry in summary["trace"].items():
            for site in ("resid", "mlp_out", "attn_out"):
                if site in entry:
                    rows.append({"model": model, "site": site, "peak layer": fmt(entry[site]["peak_layer"]),
                                 "category": entry[site]["peak_category"], "effect": fmt(entry[site]["peak_effect"])})
        sec.table(rows, caption="peak of the mean indirect effect: layer mean [95% CI] over seeds (n = seeds), effect at "
                                "the peak mean [95% bootstrap CI] over the traced facts of every seed (n = facts)")
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
        sec.figure(path, "ROME efficacy (ES, exact match by generation) vs edited layer, mean and 95% CI over the edited "
                         "facts (n in the legend; series dodged sideways); dotted: traced MLP peak")
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
                                "CounterFact ES/PS/NS by score: mean [95% bootstrap CI] (n = facts, pooled over seeds)")
        from dlmedit.study.plots import plot_diagnosis, plot_em_by_length

        sec.figure(plot_em_by_length(summary, out / "plots" / "em_by_length.png"),
                   "exact match by target length: mean and 95% CI per bucket, n facts per bucket in the legend; series "
                   "are dodged sideways so coinciding ones stay visible")
        if summary["diagnosis"]:
            sec.figure(plot_diagnosis(summary, out / "plots" / "diagnosis.png"),
                       "probability of still-masked new-target tokens along the edited model's denoising path")
    if summary["unlearning"]:
        _unlearning_section(report, summary, collected, stages_dir)
    if summary["real_model"]:
        from dlmedit.study.real_pair import render_real_pair

        render_real_pair(report, summary, collected, stages_dir)
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
