"""`dlmedit study`: the cross-paradigm study on the built-in twins (and any checkpoint passed in)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import typer

from dlmedit.cli.app import app, friendly_errors, seed_everything


def parse_stage_options(items: list[str]) -> dict[str, dict[str, object]]:
    """``["unlearning.alpha=0.5"]`` → ``{"unlearning": {"alpha": 0.5}}`` (values parsed as YAML).

    Unknown keys are rejected by the stage itself when it runs (it knows its settings);
    here only the shape is checked, so a typo in the stage name fails at once.
    """
    import yaml

    from dlmedit.study import stages as _stages  # noqa: F401  (registers the stages)
    from dlmedit.study.runner import stage_names

    out: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        stage_name, dot, name = key.strip().partition(".")
        if not sep or not dot or not stage_name or not name:
            raise typer.BadParameter(f"--option expects STAGE.KEY=VALUE, got {item!r}")
        if stage_name not in stage_names():
            raise typer.BadParameter(f"--option {item!r}: unknown stage {stage_name!r}; known: {', '.join(stage_names())}")
        try:
            out.setdefault(stage_name, {})[name] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise typer.BadParameter(f"cannot parse the value of --option {item!r}: {exc}") from None
    return out


@app.command("study")
@friendly_errors
def study_command(
    out: Path = typer.Option(..., "--out", "-o", help="output folder (results resume from here)"),
    quick: bool = typer.Option(False, "--quick", help="small sample sizes and one seed (≈ minutes on 2 CPU cores)"),
    seeds: int = typer.Option(None, "--seeds", help="number of seeds (default: 1 quick, 3 full)"),
    seed: int = typer.Option(0, "--seed", help="first seed; seeds are seed, seed+1, …"),
    models: str = typer.Option("builtin:arm,builtin:mdm", "--models", help="comma-separated aliases or checkpoint paths"),
    stages: str = typer.Option("", "--stages", help="comma-separated subset of stages (default: all)"),
    real_model: str = typer.Option(None, "--real-model", help="real model for the real-model section ('' to skip)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete an existing study in --out first"),
    option: list[str] = typer.Option(None, "--option",
                                     help="stage setting STAGE.KEY=VALUE (YAML value, repeatable), "
                                          "e.g. unlearning.alpha=0.5 or real_model.trace_samples=5"),
) -> None:
    """Run (or resume) the study and write summary.json, report.html and report.md."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from dlmedit.study import stages as _stages  # noqa: F401  (registers the stages)
    from dlmedit.study.report import build_summary, save_summary, versions, write_report
    from dlmedit.study.runner import StudyConfig, run_study, stage_names

    seed_everything(seed)
    if overwrite and out.exists():
        shutil.rmtree(out)
    n_seeds = seeds or (1 if quick else 3)
    config = StudyConfig.preset(
        quick,
        models=[m.strip() for m in models.split(",") if m.strip()],
        seeds=list(range(seed, seed + n_seeds)),
        stages=[s.strip() for s in stages.split(",") if s.strip()] or stage_names(),
    )
    if real_model is not None:
        config.real_model = real_model or None
    config.options = parse_stage_options(option or [])
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("study", total=1)

        def progress(label: str, done: int, total: int) -> None:
            bar.update(task, description=label, completed=done, total=total)

        collected = run_study(config, out, log=bar.console.print, progress=progress)
    wall = time.perf_counter() - start
    from dataclasses import asdict

    summary = build_summary(collected, asdict(config))
    save_summary(out, summary)
    from dlmedit.cache import atomic_write_json

    atomic_write_json(out / "timings.json", {"wall_time_s": wall, "cells_total_s": sum(collected["timings"].values()),
                                             "cells": collected["timings"]})
    html, md = write_report(out, summary, collected, versions(), wall)
    typer.echo(f"wrote {out / 'summary.json'}, {html}, {md} in {wall:.0f} s")
