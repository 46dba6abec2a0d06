"""`dlmedit trace`: causal (and temporal) tracing of one fact or a fact set, to JSON + heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dlmedit.cli.app import app, check_cli_inputs, friendly_errors, seed_everything, tokenizer_option


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
    autocast: str = typer.Option(None, "--autocast", help="bf16: every forward under bfloat16 autocast (faster on "
                                 "CPUs with AMX; effects move in the 3rd decimal)"),
    target_window: bool = typer.Option(False, "--target-window", help="MDMs with a fixed answer window: trace only "
                                       "the target's slots, without the window's padding masks (much faster)"),
    plot_facts: int = typer.Option(5, "--plot-facts", help="per-fact heatmaps for the first N facts"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    tokenizer: str = tokenizer_option(),
) -> None:
    """Corrupt the subject, restore one (token, layer, site) at a time, and map where the fact is recalled."""
    from dlmedit import load_model
    from dlmedit.trace.facts import load_trace_facts
    from dlmedit.trace.run import check_trace_options, run_trace

    check_cli_inputs(outs={"--out": out}, models=[model], tokenizer=tokenizer,
                     texts={"--prompt": prompt, "--subject": subject, "--target": target, "--facts": facts})
    if plot_facts < 0:
        raise typer.BadParameter(f"--plot-facts must be ≥ 0, got {plot_facts}")
    if autocast not in (None, "bf16", "fp16"):
        raise typer.BadParameter(f"--autocast must be bf16 or fp16, got {autocast!r}")
    check_trace_options(prompt=prompt, subject=subject, facts=facts, limit=limit, sites=sites, window=window,
                        samples=samples, noise=noise, noise_std=noise_std, readout=readout)
    seed_everything(seed)
    fact_list = None if facts is None else load_trace_facts(facts, limit, seed)
    lm = load_model(model, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
    options = {"model": model, "prompt": prompt, "subject": subject, "target": target, "facts": facts,
               "fact_list": fact_list, "limit": limit, "sites": sites, "temporal": temporal, "readout": readout,
               "window": window, "samples": samples, "noise": noise, "noise_std": noise_std, "seed": seed,
               "autocast": autocast, "target_window": target_window}
    if fact_list is None:
        result = run_trace(lm, **options)
    else:
        with Progress(TextColumn("tracing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True)) as bar:
            task = bar.add_task("facts", total=len(fact_list))
            result = run_trace(lm, **options, progress=lambda: bar.advance(task))
    written = result.save(out, plot_facts)
    traces, failures, correct, avg, avg_correct = (result.traces, result.failures, result.correct, result.mean,
                                                   result.mean_correct)

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
