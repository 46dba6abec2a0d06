"""The Ray executor: same cells and summary as the local executor, retries, failures, quiet output.

One local Ray cluster (``ray.init(num_cpus=2)``) serves the module; the CLI subprocess test
starts its own, as a user's command does.  Fault-injection stages are module functions
pickled *by value* so Ray workers need not import this test module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from dlmedit.cli.main import app  # noqa: E402
from dlmedit.executors import RayExecutor, run_cells  # noqa: E402
from dlmedit.study import runner  # noqa: E402
from dlmedit.study.runner import StudyConfig  # noqa: E402
from dlmedit.study.session import run_study_and_report  # noqa: E402

cli = CliRunner()
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this module
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024, log_to_driver=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# ----------------------------------------------------------------------------- fault-injection stages
def dies_once(ctx: runner.StageContext) -> dict:
    """Seed 1's first attempt kills its own worker process mid-cell (SIGKILL: no cleanup, no exception)."""
    marker = ctx.out_dir / f"killed-seed{ctx.seed}"
    if ctx.seed == 1 and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # not reached
    return {"seed": ctx.seed, "pid": os.getpid()}


def fails_for_seed_1(ctx: runner.StageContext) -> dict:
    """Seed 1 raises on every attempt until ``fixed`` exists; every attempt is counted in a file."""
    with open(ctx.out_dir / f"attempts-seed{ctx.seed}", "a") as fh:
        fh.write("x")
    if ctx.seed == 1 and not (ctx.out_dir / "fixed").exists():
        raise ValueError("seed 1 always fails")
    return {"seed": ctx.seed}


# ----------------------------------------------------------------------------- tests
def test_reduced_quick_study_on_ray_is_byte_identical_to_local(tmp_path) -> None:
    """`study --quick` (tracing stage, ARM twin, 2 seeds) from a fresh `dlmedit` process with
    --executor ray gives the local executor's summary.json byte for byte — and prints only
    our own lines (no Ray start-up / worker output)."""
    args = ["study", "--quick", "--stages", "trace", "--models", "builtin:arm", "--seeds", "2", "--seed", "3"]
    local = cli.invoke(app, [*args, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([str(VENV_BIN / "dlmedit"), *args, "--out", str(tmp_path / "ray"), "--executor", "ray"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == "", proc.stderr  # nothing from Ray (or anyone else) on stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines and all(ln.startswith(("wrote ", "done ")) or "trace" in ln for ln in lines), proc.stdout
    assert (tmp_path / "ray" / "summary.json").read_bytes() == (tmp_path / "local" / "summary.json").read_bytes()
    for name in ("builtin_arm__seed3.json", "builtin_arm__seed4.json"):
        cells = [json.loads((tmp_path / d / "cells" / "trace" / name).read_text()) for d in ("local", "ray")]
        assert cells[0]["numbers"] == cells[1]["numbers"]
    assert json.loads((tmp_path / "ray" / "timings.json").read_text())["executor"] == "ray"
    assert not list((tmp_path / "ray").rglob("*.lock")) and not (tmp_path / "ray" / "failed.json").exists()


def test_worker_killed_mid_cell_is_retried_and_the_study_completes(ray_cluster, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(runner._STAGES, "dies_once", dies_once)
    config = StudyConfig(models=["m"], seeds=[0, 1, 2], stages=["dies_once"], real_model=None)
    out = tmp_path / "study"
    outcome = run_study_and_report(config, out, executor=RayExecutor(), executor_name="ray", log=lambda _m: None)
    marker = out / "stages" / "dies_once" / "killed-seed1"
    assert marker.exists()  # the first attempt did kill its worker…
    cell = json.loads(runner.cell_path(out, "dies_once", "m", 1).read_text())
    assert cell["numbers"]["pid"] != int(marker.read_text())  # …and the retry ran in another worker
    assert outcome.failed == {} and "missing_cells" not in outcome.summary and not (out / "failed.json").exists()
    assert sorted(outcome.summary["config"]["seeds"]) == [0, 1, 2]
    for seed in (0, 1, 2):
        assert json.loads(runner.cell_path(out, "dies_once", "m", seed).read_text())["numbers"]["seed"] == seed
    assert not list(out.rglob("*.lock"))


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_cell_failing_twice_is_reported_and_the_others_complete(request, tmp_path, monkeypatch, executor) -> None:
    from dlmedit.executors import make_executor

    if executor == "ray":
        request.getfixturevalue("ray_cluster")

    monkeypatch.setitem(runner._STAGES, "fails", fails_for_seed_1)
    config = StudyConfig(models=["m"], seeds=[0, 1, 2], stages=["fails"], real_model=None)
    out = tmp_path / "study"
    outcome = run_study_and_report(config, out, executor=make_executor(executor), executor_name=executor,
                                   log=lambda _m: None)
    stage_dir = out / "stages" / "fails"
    assert (stage_dir / "attempts-seed1").read_text() == "xx"  # tried, retried once, then given up
    assert set(outcome.failed) == {"fails|m|1"}
    failure = outcome.failed["fails|m|1"]
    assert failure["error"] == "ValueError: seed 1 always fails" and failure["attempts"] == 2
    assert "fails_for_seed_1" in failure["detail"]  # the traceback names the stage function
    assert outcome.summary["missing_cells"] == {"fails|m|1": "ValueError: seed 1 always fails"}
    assert json.loads((out / "failed.json").read_text())["fails|m|1"]["error"] == failure["error"]
    for seed in (0, 2):
        assert runner.cell_path(out, "fails", "m", seed).exists()
        assert (stage_dir / f"attempts-seed{seed}").read_text() == "x"
    assert not runner.cell_path(out, "fails", "m", 1).exists() and not list(out.rglob("*.lock"))
    # the next run retries only the missing cell and, once it succeeds, the study is complete
    (stage_dir / "fixed").write_text("")
    again = run_study_and_report(config, out, executor=make_executor(executor), executor_name=executor,
                                 log=lambda _m: None)
    assert again.failed == {} and "missing_cells" not in again.summary and not (out / "failed.json").exists()
    assert (stage_dir / "attempts-seed0").read_text() == "x"


def test_ray_executor_claims_no_more_cells_than_the_cluster_runs(ray_cluster, tmp_path) -> None:
    """With 2 CPUs and 1 CPU per cell at most 2 cells are locked at once, so other drivers sharing
    the folder can take the rest; with 2 CPUs per cell only one."""
    from dlmedit.executors import Job

    seen: list[int] = []

    def progress(_label: str, _done: int, _total: int) -> None:
        seen.append(len(list(tmp_path.rglob("*.lock"))))

    for cpus, most in ((1, 2), (2, 1)):
        seen.clear()
        jobs = [Job(f"j{cpus}-{i}", tmp_path / f"c{cpus}" / f"{i}.json", _sleep_then_return, (0.3, f"j{cpus}-{i}"))
                for i in range(4)]
        with RayExecutor(cpus_per_task=cpus) as ex:
            assert ex.slots() == most
            result = run_cells(jobs, ex, progress)
        assert sorted(result.computed) == sorted(j.key for j in jobs) and not result.failures
        assert result.results[jobs[3].key] == {"key": jobs[3].key}
        assert max(seen) == most


def _sleep_then_return(seconds: float, key: str) -> dict:
    time.sleep(seconds)
    return {"key": key}


def test_sweep_on_ray_gives_the_local_numbers(ray_cluster, tmp_path) -> None:
    """`dlmedit sweep` on a 2 × 2 grid of the ARM twin: same summary.csv with both executors."""
    from test_sweep import ARM_GRID

    config = tmp_path / "sweep.yaml"
    config.write_text(ARM_GRID)
    csv = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        result = cli.invoke(app, ["sweep", str(config), "--out", str(out), "--executor", executor, "--seed", "0"])
        assert result.exit_code == 0, result.output
        csv[executor] = (out / "summary.csv").read_bytes()
        assert json.loads((out / "timings.json").read_text())["executor"] == executor
    assert csv["ray"] == csv["local"]
    assert len(csv["local"].decode().strip().splitlines()) == 5  # header + 4 runs


@pytest.mark.slow
def test_full_quick_study_on_ray_is_byte_identical_to_local(ray_cluster, tmp_path) -> None:
    """The literal acceptance run: `study --quick` with the local executor and with --executor ray
    (on the module's `ray.init(num_cpus=2)` cluster), same seed → the same summary.json bytes."""
    for executor in ("local", "ray"):
        result = cli.invoke(app, ["study", "--quick", "--seed", "0", "--out", str(tmp_path / executor),
                                  "--executor", executor])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "ray" / "summary.json").read_bytes() == (tmp_path / "local" / "summary.json").read_bytes()


@pytest.mark.slow
def test_sweep_on_both_twins_same_numbers_with_both_executors(ray_cluster, tmp_path) -> None:
    """2 × 2 grid on the twins (ARM, MDM × two value learning rates) with both executors."""
    from test_sweep import TWIN_GRID

    config = tmp_path / "sweep.yaml"
    config.write_text(TWIN_GRID)
    csv = {}
    for executor in ("local", "ray"):
        result = cli.invoke(app, ["sweep", str(config), "--out", str(tmp_path / executor), "--executor", executor])
        assert result.exit_code == 0, result.output
        csv[executor] = (tmp_path / executor / "summary.csv").read_bytes()
    assert csv["ray"] == csv["local"] and len(csv["local"].decode().strip().splitlines()) == 5
