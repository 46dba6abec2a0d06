"""Evaluation sweeps: a grid of `dlmedit eval` runs (model × method × dataset × seed × hyper-parameters).

Why a module: comparing methods or hyper-parameters means many independent evaluation
runs; each is one *cell* of `dlmedit.executors` (resumable, locked, retried once, run
in this process or as a Ray task), and the sweep ends with one table of the runs'
post-edit means (``summary.csv`` / ``summary.json``).

The configuration (YAML)::

    grid:                        # every combination of these is one run
      model: [builtin:arm, builtin:mdm]   # a value or a list of values
      method: rome
      dataset: world
      seed: [0, 1]               # optional; default: the command's --seed
      hparams:                   # editor hyper-parameters: name → list of alternatives
        v_lr: [0.5, 1.0]
        layers: [[1], [3]]       # a list-valued setting is a list of lists
    eval:                        # settings shared by every run: the `dlmedit eval` options
      protocol: single
      limit: 10
      generation: true

Files in ``OUT``: ``sweep.json`` (the configuration and the runs), ``runs/RUN/`` (each
run's ``dlmedit eval`` folder: ``run.json``, ``results.jsonl``, ``summary.json``),
``cells/RUN.json`` (a finished run's numbers), ``summary.csv`` and ``summary.json``
(one row per run, no timings, so both executors write the same bytes),
``timings.json`` and, if runs failed twice, ``failed.json``.  A run's folder name is
readable (model, method, dataset, seed, hyper-parameters) plus a hash of its whole
specification, so adding values to the grid reuses every finished run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlmedit.cache import atomic_write_bytes, atomic_write_json
from dlmedit.errors import UsageError
from dlmedit.executors import Executor, Job, run_cells_on

if TYPE_CHECKING:
    import pandas as pd

    from dlmedit.evaluate.runner import EvalConfig
    from dlmedit.models.language_model import LanguageModel

__all__ = ["EVAL_OPTIONS", "GRID_KEYS", "SweepOutcome", "SweepRun", "expand_grid", "load_sweep", "run_sweep",
           "run_sweep_cell", "summary_rows", "summary_table"]

GRID_KEYS = ("model", "method", "dataset", "seed", "hparams")
#: `dlmedit eval` options a sweep may set for every run (names as in `dlmedit.evaluate(...)`)
RUN_OPTIONS = ("protocol", "limit", "lengths", "every", "target_states", "chunk_size")
MEASURE_OPTIONS = ("estimator", "order", "mc_samples", "generation", "gen_window", "sampler", "remasking", "alg",
                   "steps", "block_length", "fluency", "fluency_tokens", "batch_size")
EVAL_OPTIONS = RUN_OPTIONS + MEASURE_OPTIONS


@dataclass(frozen=True)
class SweepRun:
    """One grid point: what `dlmedit eval` would be called with."""

    model: str
    method: str
    dataset: str
    seed: int
    hparams: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        return {"model": self.model, "method": self.method, "dataset": self.dataset, "seed": self.seed,
                "hparams": dict(self.hparams), "eval": dict(self.eval)}

    @property
    def run_id(self) -> str:
        """Readable and unique: the varying values, then 8 hex digits of the whole specification."""
        digest = hashlib.sha256(json.dumps(self.spec(), sort_keys=True, default=str).encode()).hexdigest()[:8]
        parts = [self.model, self.method, self.dataset, f"seed{self.seed}",
                 *(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(self.hparams.items()))]
        slug = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", "__".join(parts)).strip("_")[:100]
        return f"{slug}__{digest}"


def _values(name: str, value: Any) -> list[Any]:
    """A grid entry: a list of alternatives, or one value."""
    if isinstance(value, list):
        if not value:
            raise UsageError(f"sweep grid: {name} has an empty list of values")
        return value
    return [value]


def expand_grid(config: Mapping[str, Any], seed: int | None = None) -> list[SweepRun]:
    """Every combination of the grid, in the order of the lists (models outermost).

    ``seed`` (the command's ``--seed``) is every run's seed when the grid lists none;
    giving both is refused, so there is one place a run's seed comes from.
    """
    if not isinstance(config, Mapping):
        raise UsageError("a sweep configuration is a mapping with `grid:` (and optionally `eval:`)")
    unknown = sorted(set(config) - {"grid", "eval"})
    if unknown:
        raise UsageError(f"sweep configuration: unknown key(s) {unknown}; use grid and eval")
    grid = config.get("grid")
    if not isinstance(grid, Mapping):
        raise UsageError("sweep configuration: `grid:` must be a mapping of model, method, dataset[, seed, hparams]")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise UsageError(f"sweep grid: unknown key(s) {unknown}; use {', '.join(GRID_KEYS)} "
                         "(editor settings go under hparams, eval options under eval)")
    missing = [k for k in ("model", "method", "dataset") if k not in grid]
    if missing:
        raise UsageError(f"sweep grid: {', '.join(missing)} missing")
    if "seed" in grid and seed is not None:
        raise UsageError("the sweep grid lists seeds and --seed was given too; give the seeds in one place")
    seeds = _values("seed", grid["seed"]) if "seed" in grid else [0 if seed is None else seed]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UsageError(f"sweep grid: seeds must be integers, got {seeds}")
    hparams = grid.get("hparams") or {}
    if not isinstance(hparams, Mapping):
        raise UsageError("sweep grid: hparams must map each editor setting to a list of values")
    eval_options = dict(config.get("eval") or {})
    unknown = sorted(set(eval_options) - set(EVAL_OPTIONS))
    if unknown:
        raise UsageError(f"sweep eval: unknown option(s) {unknown}; known: {', '.join(EVAL_OPTIONS)}")
    names = sorted(hparams)
    runs = []
    for model, method, dataset, run_seed, *values in itertools.product(
            _values("model", grid["model"]), _values("method", grid["method"]), _values("dataset", grid["dataset"]),
            seeds, *(_values(f"hparams.{n}", hparams[n]) for n in names)):
        run = SweepRun(str(model), str(method), str(dataset), int(run_seed), dict(zip(names, values, strict=True)),
                       eval_options)
        eval_config(run)  # bad protocol / limit / target states fail now, not in the middle of the sweep
        runs.append(run)
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise UsageError("the sweep grid repeats a run (the same value listed twice?)")
    return runs


def load_sweep(path: str | Path, seed: int | None = None) -> tuple[dict[str, Any], list[SweepRun]]:
    """Read a sweep YAML file; return it and its runs."""
    import yaml

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML: {exc}") from None
    return config, expand_grid(config, seed)


def eval_config(run: SweepRun) -> EvalConfig:
    """The `EvalConfig` `dlmedit eval` builds from the same options (shared `measure_settings`)."""
    from dlmedit.edit.editor import editor_names
    from dlmedit.evaluate.runner import EvalConfig
    from dlmedit.evaluate.session import measure_settings, parse_lengths

    if run.method not in editor_names():
        raise UsageError(f"sweep grid: unknown method {run.method!r}; choose from {', '.join(editor_names())}")
    options = run.eval
    measure = {k: options[k] for k in MEASURE_OPTIONS if k in options}
    lengths = sorted(parse_lengths(options.get("lengths"))) or None
    return EvalConfig(model=run.model, method=run.method, dataset=run.dataset, protocol=options.get("protocol", "single"),
                      limit=options.get("limit"), every=options.get("every"),
                      target_states=options.get("target_states", "final"), hparams=dict(run.hparams), seed=run.seed,
                      measure=measure_settings(seed=run.seed, **measure), chunk_size=options.get("chunk_size", 32),
                      lengths=lengths)


#: the last model a process loaded (a Ray worker or the local driver evaluating runs of one model in a
#: row loads it once; evaluation reverts every edit and checks the weights, so reuse is safe)
_LAST_MODEL: dict[str, LanguageModel] = {}


def _model(name: str) -> LanguageModel:
    from dlmedit import load_model

    if name not in _LAST_MODEL:
        _LAST_MODEL.clear()
        _LAST_MODEL[name] = load_model(name)
    return _LAST_MODEL[name]


def run_sweep_cell(spec: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Run (or resume) one evaluation into ``run_dir``; return its post-edit means.

    The same function for both executors; the evaluation seeds every edit from
    (seed, record index), so the numbers do not depend on the process that runs it.
    """
    from dlmedit.evaluate.session import evaluate_dataset

    run = SweepRun(**spec)
    start = time.perf_counter()
    summary = evaluate_dataset(eval_config(run), run_dir, lambda: _model(run.model))
    numbers: dict[str, Any] = {"n_records": summary["n_records"]}
    for state in ("post", "pre"):
        for metric, entry in summary["metrics"].get(state, {}).items():
            numbers[metric if state == "post" else f"{metric} pre"] = entry["all"]["mean"]
        score = summary.get("Score", {}).get(state, {}).get("all")
        numbers["Score" if state == "post" else "Score pre"] = score
    return {"run": run.run_id, "spec": spec, "numbers": numbers,
            "seconds_per_edit": (summary.get("timings") or {}).get("seconds_per_edit"),
            "wall_time_s": round(time.perf_counter() - start, 3)}


def summary_rows(runs: list[SweepRun], results: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per finished run: its grid values, then Score and every metric's post-edit mean
    (``METRIC pre``: before the edit), over all records; columns in table order."""
    from dlmedit.evaluate.measure import METRICS

    hp_names = sorted({k for r in runs for k in r.hparams})
    rows = []
    for run in runs:
        cell = results.get(run.run_id)
        if cell is None:
            continue
        row: dict[str, Any] = {"run": run.run_id, "model": run.model, "method": run.method, "dataset": run.dataset,
                               "seed": run.seed}
        row.update({f"hp.{k}": json.dumps(run.hparams[k]) if k in run.hparams else None for k in hp_names})
        row.update(cell["numbers"])
        rows.append(row)
    head = ["run", "model", "method", "dataset", "seed", *(f"hp.{k}" for k in hp_names), "n_records"]
    present = {k for r in rows for k in r}
    order = [*head, "Score", *METRICS, "Score pre", *(f"{m} pre" for m in METRICS)]
    columns = [c for c in order if c in present or c in head]
    return [{c: row.get(c) for c in columns} for row in rows]


def summary_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The summary rows as a pandas table (what ``summary.csv`` holds)."""
    import pandas as pd

    return pd.DataFrame(rows, columns=list(rows[0]) if rows else None)


@dataclass
class SweepOutcome:
    """A finished sweep: the table (also in summary.csv), failed runs (key → failure), wall time."""

    table: pd.DataFrame
    failed: dict[str, Any]
    wall_time_s: float
    csv: Path


def run_sweep(runs: list[SweepRun], out: str | Path, *, executor: Executor | None = None,
              config: Mapping[str, Any] | None = None, executor_name: str = "local",
              progress: Callable[[str, int, int], None] | None = None) -> SweepOutcome:
    """Run every run not yet finished (``executor`` default: local), then write the summary table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", {"config": dict(config or {}), "runs": {r.run_id: r.spec() for r in runs}})
    jobs = [Job(r.run_id, out / "cells" / f"{r.run_id}.json", run_sweep_cell, (r.spec(), str(out / "runs" / r.run_id)))
            for r in runs]
    start = time.perf_counter()
    try:
        ran = run_cells_on(jobs, executor, progress)
    finally:
        _LAST_MODEL.clear()
    wall = time.perf_counter() - start
    rows = summary_rows(runs, ran.results)
    table = summary_table(rows)
    csv_path = out / "summary.csv"
    atomic_write_bytes(csv_path, table.to_csv(index=False).encode("utf-8"))
    atomic_write_json(out / "summary.json", rows)
    failed = {k: f.to_json() for k, f in ran.failures.items()}
    if failed:
        atomic_write_json(out / "failed.json", failed)
    else:
        (out / "failed.json").unlink(missing_ok=True)
    atomic_write_json(out / "timings.json", {
        "wall_time_s": wall, "executor": executor_name,
        "runs": {k: {"wall_time_s": c.get("wall_time_s"), "seconds_per_edit": c.get("seconds_per_edit")}
                 for k, c in ran.results.items()}})
    return SweepOutcome(table, failed, wall, csv_path)
