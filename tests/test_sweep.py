"""`dlmedit sweep`: grid expansion, checks before any model work, resume, the summary table.

The Ray side (same numbers with both executors) is in test_ray.py, which imports the grids below.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dlmedit.cli.main import app
from dlmedit.errors import UsageError
from dlmedit.evaluate.measure import EvalConfigError
from dlmedit.sweep import expand_grid, load_sweep, run_sweep

cli = CliRunner()

#: 2 × 2 on the ARM twin (value learning rate × value steps); ROME without key statistics or context
#: prefixes keeps each run to about a second on an idle core
ARM_GRID = """
grid:
  model: builtin:arm
  method: rome
  dataset: world
  hparams:
    v_lr: [0.5, 1.0]
    v_steps: [3, 6]
    use_stats: false
    context_source: none
eval:
  limit: 2
  generation: false
"""

#: 2 × 2 on the twins (ARM, MDM × value learning rate), ROME with its defaults (slow test)
TWIN_GRID = """
grid:
  model: [builtin:arm, builtin:mdm]
  method: rome
  dataset: world
  seed: [0]
  hparams:
    v_lr: [0.5, 1.0]
eval:
  limit: 2
  generation: false
"""


def test_grid_expands_to_every_combination_with_stable_distinct_ids() -> None:
    runs = expand_grid(yaml.safe_load(ARM_GRID), seed=4)
    assert [(r.hparams["v_lr"], r.hparams["v_steps"]) for r in runs] == [(0.5, 3), (0.5, 6), (1.0, 3), (1.0, 6)]
    assert {r.seed for r in runs} == {4} and all(r.hparams["use_stats"] is False for r in runs)
    assert all(r.eval == {"limit": 2, "generation": False} for r in runs)
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == 4 and ids == [r.run_id for r in expand_grid(yaml.safe_load(ARM_GRID), seed=4)]
    assert ids[0].startswith("builtin_arm__rome__world__seed4__context_source=") and "v_lr=0.5" in ids[0]
    # the id hashes the whole specification: another eval setting is another run
    other = yaml.safe_load(ARM_GRID)
    other["eval"]["limit"] = 3
    assert not set(ids) & {r.run_id for r in expand_grid(other, seed=4)}
    twins = expand_grid(yaml.safe_load(TWIN_GRID))
    assert [(r.model, r.hparams["v_lr"]) for r in twins] == [
        ("builtin:arm", 0.5), ("builtin:arm", 1.0), ("builtin:mdm", 0.5), ("builtin:mdm", 1.0)]


@pytest.mark.parametrize(("change", "message"), [
    ({"grid": {"model": "builtin:arm", "method": "rome"}}, "dataset missing"),
    ({"grid": {"model": "builtin:arm", "method": "rome", "dataset": "world", "layers": [1]}}, r"unknown key\(s\) \['layers'\]"),
    ({"eval": {"limt": 2}}, r"unknown option\(s\) \['limt'\]"),
    ({"grid": {"model": "builtin:arm", "method": "romee", "dataset": "world"}}, "unknown method 'romee'"),
    ({"grid": {"model": [], "method": "rome", "dataset": "world"}}, "model has an empty list"),
    ({"grid": {"model": "builtin:arm", "method": "rome", "dataset": "world", "seed": [0, 0]}}, "repeats a run"),
    ({"grid": {"model": "builtin:arm", "method": "rome", "dataset": "world", "seed": ["a"]}}, "seeds must be integers"),
    ({"outt": 1}, r"unknown key\(s\) \['outt'\]"),
])
def test_bad_sweep_configurations_are_refused_before_any_model_work(change, message) -> None:
    config = {**yaml.safe_load(ARM_GRID), **change}
    with pytest.raises(UsageError, match=message):
        expand_grid(config)


def test_seed_in_one_place_and_eval_settings_checked() -> None:
    config = {**yaml.safe_load(ARM_GRID)}
    config["grid"] = {**config["grid"], "seed": [1, 2]}
    runs = expand_grid(config)
    assert len(runs) == 8 and [r.seed for r in runs] == [1, 1, 1, 1, 2, 2, 2, 2]  # seeds outside the hparams
    with pytest.raises(UsageError, match="one place"):
        expand_grid(config, seed=3)
    bad = {**yaml.safe_load(ARM_GRID), "eval": {"protocol": "sometimes"}}
    with pytest.raises(EvalConfigError, match="unknown protocol"):
        expand_grid(bad)


def test_cli_refuses_a_bad_config_in_one_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("grid:\n  model: builtin:arm\n  method: rome\n  dataset: world\n  seeds: [0]\n")
    result = cli.invoke(app, ["sweep", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "unknown key(s) ['seeds']" in result.output
    assert not (tmp_path / "out" / "sweep.json").exists()


NONE_GRID = """
grid:
  model: builtin:arm
  method: none
  dataset: world
  seed: {seeds}
eval:
  limit: 1
  generation: false
"""


def _config(tmp_path: Path, seeds: list[int]) -> Path:
    path = tmp_path / f"sweep{len(seeds)}.yaml"
    path.write_text(NONE_GRID.format(seeds=seeds))
    return path


def test_sweep_resumes_finished_runs_and_extends_the_grid(tmp_path) -> None:
    out = tmp_path / "sweep"
    config, runs = load_sweep(_config(tmp_path, [0]))
    first = run_sweep(runs, out, config=config)
    assert list(first.table["seed"]) == [0] and first.failed == {}
    cell = out / "cells" / f"{runs[0].run_id}.json"
    stamp = cell.stat().st_mtime_ns
    assert (out / "runs" / runs[0].run_id / "results.jsonl").exists()  # the run's own `dlmedit eval` folder

    config2, runs2 = load_sweep(_config(tmp_path, [0, 1]))
    assert runs2[0].run_id == runs[0].run_id
    second = run_sweep(runs2, out, config=config2)
    assert cell.stat().st_mtime_ns == stamp  # the finished run was loaded, not recomputed
    assert list(second.table["seed"]) == [0, 1] and second.failed == {}
    rows = json.loads((out / "summary.json").read_text())
    assert [r["run"] for r in rows] == [r.run_id for r in runs2]
    assert rows[0]["n_records"] == 1 and 0.0 <= rows[0]["NS"] <= 1.0
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["run", "model", "method", "dataset", "seed", "n_records", "Score"]
    assert "timings" not in header and "wall_time_s" not in header  # timings live in timings.json only
    assert set(json.loads((out / "timings.json").read_text())["runs"]) == {r.run_id for r in runs2}


def test_sweep_command_prints_the_table_and_json(tmp_path) -> None:
    config = _config(tmp_path, [0])
    result = cli.invoke(app, ["sweep", str(config), "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("["):])
    assert len(rows) == 1 and rows[0]["method"] == "none"
    table = cli.invoke(app, ["sweep", str(config), "--out", str(tmp_path / "out")])
    assert table.exit_code == 0 and "1 of 1 runs" in table.output
