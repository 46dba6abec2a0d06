"""`dlmedit eval` locks its --out: concurrent runs never duplicate rows or cut a live writer's line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dlmedit.cli.main import app
from dlmedit.evaluate.runner import RESULTS_FILE
from dlmedit.study.runner import CellLock

N_RECORDS = 12


def _eval_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--method", "none", "--dataset", "world", "--limit", str(N_RECORDS), "-m", str(model),
            "--no-generation", "--no-progress", "--json", "--out", str(out), *extra]


def _record_ids(out: Path) -> list:
    rows = [json.loads(line) for line in (out / RESULTS_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["case_id"] for r in rows if r.get("kind") == "record"]


def _script() -> Path:
    script = Path(sys.executable).with_name("dlmedit")
    if not script.exists():
        pytest.skip("the dlmedit console script is not installed next to this python")
    return script


def test_two_concurrent_eval_processes_write_each_record_once(tiny_checkpoints, tmp_path):
    """Both processes start while the folder is locked, so they are released together and race for it.

    Without the lock both would compute all records and write every row twice.
    """
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLMEDIT_DEBUG": ""}
    holder = CellLock(out / RESULTS_FILE).__enter__()  # this test process is "another writer" for a moment
    assert holder.held
    procs = [subprocess.Popen([str(_script()), *_eval_args(tiny_checkpoints["llama"], out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    stderr: list[list[bytes]] = [[], []]
    readers = [threading.Thread(target=lambda f=p.stderr, buf=buf: buf.extend(iter(f.readline, b"")), daemon=True)
               for p, buf in zip(procs, stderr, strict=True)]
    for reader in readers:
        reader.start()
    try:
        deadline = time.time() + 900  # generous: on a loaded machine importing torch alone can take minutes
        while time.time() < deadline and not all(any(b"waiting" in line for line in buf) for buf in stderr):
            assert all(p.poll() is None for p in procs), b"".join(stderr[0] + stderr[1]).decode()
            time.sleep(0.2)
        assert all(any(str(os.getpid()).encode() in line for line in buf) for buf in stderr), stderr
        assert not (out / "run.json").exists(), "a process wrote into a locked folder"
    finally:
        holder.__exit__()
    stdouts = [p.communicate(timeout=300)[0] for p in procs]
    for reader in readers:
        reader.join(timeout=10)
    for proc, stdout, err in zip(procs, stdouts, stderr, strict=True):
        assert proc.returncode == 0, b"".join(err).decode()
        assert json.loads(stdout[stdout.index(b"{"):])["n_records"] == N_RECORDS
    ids = _record_ids(out)
    assert len(ids) == N_RECORDS and len(set(map(json.dumps, ids))) == N_RECORDS
    assert not (out / (RESULTS_FILE + ".lock")).exists()


def test_no_wait_stops_with_a_clear_message_and_leaves_a_live_writers_line(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    partial = b'{"kind": "record", "case_id": 0, "protocol": "single", "pre": {'
    (out / RESULTS_FILE).write_bytes(partial)  # a live writer is half-way through a row
    with CellLock(out / RESULTS_FILE) as lock:
        assert lock.held
        result = CliRunner().invoke(app, _eval_args(tiny_checkpoints["llama"], out, "--no-wait"))
        assert result.exit_code == 2, result.output
        assert "being written by another dlmedit process" in result.output and str(os.getpid()) in result.output
        assert "Traceback" not in result.output
        assert (out / RESULTS_FILE).read_bytes() == partial  # not truncated


def test_python_api_waits_for_the_lock(tiny_models, tmp_path):
    """run_evaluation(wait=False) refuses a locked folder; a lock whose process died is taken over."""
    from dlmedit.data.loaders import load_dataset
    from dlmedit.errors import OutputLockedError
    from dlmedit.evaluate.measure import MeasureSettings
    from dlmedit.evaluate.runner import EvalConfig, run_evaluation

    records = load_dataset("world", limit=3)
    config = EvalConfig(model="tiny", method="none", dataset="world", limit=3,
                        measure=MeasureSettings(generation=False, token_accuracy=False))
    out = tmp_path / "api"
    with CellLock(out / RESULTS_FILE):
        with pytest.raises(OutputLockedError, match="another dlmedit process"):
            run_evaluation(tiny_models["llama"], records, config, out, wait=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / (RESULTS_FILE + ".lock")).write_text(str(dead.pid))  # left behind by a process that is gone
    summary = run_evaluation(tiny_models["llama"], records, config, out, wait=False)
    assert summary["n_records"] == 3 and len(_record_ids(out)) == 3
    assert not (out / (RESULTS_FILE + ".lock")).exists()
