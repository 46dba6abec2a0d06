"""`dlmedit trace`: causal (and temporal) tracing of one fact or a fact set, to JSON + heatmaps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dlmedit.cli.app import app, friendly_errors, seed_everything


def _summary_table(title: str, avg: dict[str, Any]) -> Table:
    table = Table(title=title)
    for col in ("site", "peak layer", "peak token category", "mean IE at peak"):
        table.add_column(col)
    for site, peak in avg.get("peak", {}).items():
        table.add_row(site, str(peak["layer"]), str(peak["category"]), f"{peak['effect']:.4f}")
    return table


@app.command("trace")
@friendly_errors
def trace_command(
    out: Path = typer.Option(..., "--out", "-o", help="output directory (trace.json + PNG heatmaps)"),
    model: str = typer.Option("builtin:mdm", "--model", "-m", help="alias or checkpoint directory"),
    prompt: str = typer.Option(None, "--prompt", "-p", help="prompt containing the subject"),
    subject: str = typer.Option(None, "--subject", "-s", help="subject string to corrupt"),
    target: str = typer.Option(None, "--target", "-t", help="target to read (default: the model's own prediction)"),
    facts: str = typer.Option(None, "--facts", help="world | world:PART | KIND:FILE | FILE (CounterFact or "
                              "{prompt, subject, target} rows)"),
    limit: int = typer.Option(None, "--limit", help="trace the first N facts"),
    sites: str = typer.Option("resid,mlp,attn", "--sites", help="comma list of resid, mlp, attn"),
    temporal: bool = typer.Option(False, "--temporal", help="also trace every denoising step (layer × step × site)"),
    readout: str = typer.Option("first", "--readout", help="first: p(first target token) as ROME; target: p(whole "
                                "target) by the paradigm's chain rule"),
    window: int = typer.Option(None, "--window", help="layers restored together for mlp/attn (default: a fifth of the depth, ROME's 10/48)"),
    samples: int = typer.Option(10, "--samples", help="noise samples"),
    noise: float = typer.Option(3.0, "--noise", help="noise std as a multiple of the subject-embedding std"),
    noise_std: float = typer.Option(None, "--noise-std", help="absolute noise std (overrides --noise)"),
    seed: int = typer.Option(0, "--seed"),
    plot_facts: int = typer.Option(5, "--plot-facts", help="per-fact heatmaps for the first N facts"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """Corrupt the subject, restore one (token, layer, site) at a time, and map where the fact is recalled."""
    from dlmedit import load_model
    from dlmedit.trace import CATEGORIES, TraceConfig, average_traces, normalise_sites, trace_fact, trace_facts
    from dlmedit.trace.facts import load_trace_facts
    from dlmedit.trace.plots import plot_average, plot_fact, plot_temporal, plot_temporal_average
    from dlmedit.trace.results import average_to_json

    if (facts is None) == (prompt is None):
        raise typer.BadParameter("give either --prompt/--subject (one fact) or --facts (a fact set)")
    if prompt is not None and subject is None:
        raise typer.BadParameter("--subject is required with --prompt")
    if facts is None and limit is not None:
        raise typer.BadParameter("--limit applies to --facts only")
    for name, value in (("--window", window), ("--samples", samples)):
        if value is not None and value < 1:
            raise typer.BadParameter(f"{name} must be at least 1, got {value}")
    if noise <= 0 or (noise_std is not None and noise_std <= 0):
        raise typer.BadParameter("noise must be positive")
    if readout not in ("first", "target"):
        raise typer.BadParameter("--readout is first or target")
    try:
        site_list = normalise_sites(sites)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None

    seed_everything(seed)
    fact_list = [] if facts is None else load_trace_facts(facts, limit, seed)
    lm = load_model(model, trust_remote_code=trust_remote_code)
    config = TraceConfig(sites=site_list, window=window, samples=samples, noise=noise, noise_std=noise_std,
                         seed=seed, readout=readout, temporal=temporal)
    if facts is None:
        traces, failures = [trace_fact(lm, prompt, subject, target, config)], []
    else:
        with Progress(TextColumn("tracing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True)) as bar:
            task = bar.add_task("facts", total=len(fact_list))
            traces, failures = trace_facts(lm, [f.as_tuple() for f in fact_list], config,
                                           progress=lambda: bar.advance(task))
    if not traces:
        raise typer.BadParameter("no fact could be traced: " + "; ".join(f.error for f in failures[:3]))

    out.mkdir(parents=True, exist_ok=True)
    window = traces[0].window  # resolved (the default depends on the model's depth)
    avg = average_traces(traces)
    avg["window"] = window
    correct = [t for t in traces if t.correct]
    avg_correct = average_traces(correct) if correct else {"n_facts": 0}
    avg_correct["window"] = window
    noise_used = traces[0].noise_std
    doc = {
        "model": model,
        "paradigm": lm.paradigm.describe(),
        "n_layers": lm.n_layers,
        "settings": {"sites": list(site_list), "window": window, "samples": samples, "noise": noise,
                     "noise_std": noise_used, "seed": seed, "readout": readout, "temporal": temporal,
                     "facts": facts, "limit": limit,
                     "noise_std_source": "given" if noise_std is not None else
                     f"{noise} x std of the embeddings of all traced subjects' tokens"},
        "axes": {"site": list(site_list), "layer": list(range(lm.n_layers)), "category": list(CATEGORIES),
                 "facts[].scores": ["token", "layer"], "mean.effect": ["category", "layer"],
                 "mean.temporal.effect": ["step", "category", "layer"]},
        "n_facts": len(traces), "n_correct": len(correct),
        "facts": [t.to_json() for t in traces],
        "skipped": [f.__dict__ for f in failures],
        "mean": average_to_json(avg),
        "mean_correct": average_to_json(avg_correct),
    }
    (out / "trace.json").write_text(json.dumps(doc, indent=1))
    written = [out / "trace.json"]
    for trace in traces[:plot_facts]:
        written.append(plot_fact(trace, out / f"fact{trace.index:03d}.png", model_name=model))
        if trace.temporal:
            written.append(plot_temporal(trace, out / f"fact{trace.index:03d}_temporal.png"))
    if len(traces) > 1:
        written.append(plot_average(avg, out / "average.png", title=f"{model}:"))
        if correct and len(correct) != len(traces):
            written.append(plot_average(avg_correct, out / "average_correct.png", title=f"{model} (correct facts):"))
        if "temporal" in avg:
            written.append(plot_temporal_average(avg["temporal"], out / "temporal_average.png", title=f"{model}:"))

    stdout = Console()
    if len(traces) == 1:
        t = traces[0]
        table = Table(title=f"{t.prompt!r} → {t.target!r}  clean {t.clean:.4f}  corrupted {t.corrupted:.4f}"
                      + ("" if t.correct else "  [model gets it wrong]"))
        for col in ("site", "peak token", "category", "layer", "indirect effect"):
            table.add_column(col)
        for site in t.sites:
            p = t.peak(site)
            table.add_row(site, p["token"], p["category"], str(p["layer"]), f"{p['effect']:.4f}")
        stdout.print(table)
        if t.temporal:
            tp = t.temporal_peak()
            stdout.print(f"temporal peak: step {tp['step']} {tp['site']} layer {tp['layer']} at {tp['token']!r} "
                         f"({tp['category']}), TIE {tp['effect']:.4f}")
    else:
        stdout.print(_summary_table(f"all {len(traces)} facts ({len(correct)} predicted correctly)", avg))
        if correct and len(correct) != len(traces):
            stdout.print(_summary_table(f"the {len(correct)} facts the model predicts correctly", avg_correct))
        if "temporal" in avg and avg["temporal"]["peak"]:
            tp = avg["temporal"]["peak"]
            stdout.print(f"mean temporal peak: step {tp['step']} {tp['site']} layer {tp['layer']} at "
                         f"{tp['category']}, TIE {tp['effect']:.4f}")
    if failures:
        stdout.print(f"[yellow]{len(failures)} fact(s) skipped[/yellow] (see trace.json 'skipped'): {failures[0].error}")
    stdout.print(f"wrote {', '.join(str(p) for p in written[:4])}{' …' if len(written) > 4 else ''}")
