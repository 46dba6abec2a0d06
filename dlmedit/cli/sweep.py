"""`dlmedit sweep CONFIG.yaml`: a grid of `dlmedit eval` runs on one executor, then one summary table."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from dlmedit.cli.app import app, check_cli_inputs, echo_error, echo_json, friendly_errors

if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console


@app.command("sweep")
@friendly_errors
def sweep_command(
    config_file: Path = typer.Argument(..., help="sweep YAML: grid (model, method, dataset, seed, hparams) and eval "
                                                 "options; see dlmedit/configs/sweep-example.yaml"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (finished runs are reused when re-run)"),
    seed: int = typer.Option(None, "--seed", help="seed of every run when the grid lists no seeds (default 0)"),
    executor: str = typer.Option("local", "--executor",
                                 help="local (runs one after another in this process) | ray (each run a Ray task)"),
    address: str = typer.Option(None, "--address",
                                help="ray: join a running cluster (auto | HOST:PORT); default: start one on this machine"),
    cpus_per_cell: float = typer.Option(1.0, "--cpus-per-cell", help="torch threads per run (ray: also the CPUs it reserves)"),
    gpus_per_cell: float = typer.Option(0.0, "--gpus-per-cell", help="ray: GPUs reserved per run"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete an existing sweep in --out first"),
    json_out: bool = typer.Option(False, "--json", help="print the summary rows as JSON instead of the table"),
) -> None:
    """Run (or resume) every evaluation of the grid and write summary.csv / summary.json (one row per run).

    Each run is a resumable `dlmedit eval` folder under OUT/runs; a run that fails is
    retried once, then reported (failed.json, exit status 1) while the others go on.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from dlmedit.executors import make_executor
    from dlmedit.quiet import verbose
    from dlmedit.seeding import seed_everything
    from dlmedit.sweep import load_sweep, run_sweep

    check_cli_inputs(outs={"--out": out})
    config, runs = load_sweep(config_file, seed)
    seed_everything(0 if seed is None else seed)
    if overwrite and out.exists():
        shutil.rmtree(out)
    runner = make_executor(executor, address=address, cpus_per_cell=cpus_per_cell, gpus_per_cell=gpus_per_cell,
                           verbose=verbose())
    console = Console(stderr=json_out)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("sweep", total=len(runs))

        def progress(label: str, done: int, total: int) -> None:
            bar.update(task, description=label, completed=done, total=total)

        with runner:
            outcome = run_sweep(runs, out, executor=runner, config=config, executor_name=executor, progress=progress)
    if json_out:
        import json

        echo_json(json.loads((out / "summary.json").read_text()))
    else:
        _print_table(outcome.table, console)
        console.print(f"{len(outcome.table)} of {len(runs)} runs · {outcome.csv} · {outcome.wall_time_s:.0f} s")
    if outcome.failed:
        for key, f in sorted(outcome.failed.items()):
            typer.secho(f"run {key} failed after {f['attempts']} attempts: {f['error']}", fg="red", err=True)
        echo_error(f"{len(outcome.failed)} run(s) missing from the summary (tracebacks in {out / 'failed.json'}); "
                   "run the same command again to retry them")
        raise typer.Exit(1)


def _print_table(table: pd.DataFrame, console: Console) -> None:
    """The grid values and the headline metrics (all columns are in summary.csv)."""
    import pandas as pd
    from rich.table import Table

    keys = [c for c in table.columns if c in ("model", "method", "dataset", "seed") or c.startswith("hp.")]
    metrics = [c for c in ("n_records", "Score", "ES", "PS", "NS", "GenEM", "Score pre") if c in table.columns]
    out = Table(title="sweep: post-edit means over all records")
    for col in (*keys, *metrics):
        out.add_column(col, justify="left" if col in keys else "right", no_wrap=True)
    for _, row in table.iterrows():
        out.add_row(*(str(row[c]) for c in keys),
                    *("–" if pd.isna(row[c]) else (f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]))
                      for c in metrics))
    console.print(out)
