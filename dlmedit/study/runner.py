"""The study runner: resumable stages × models × seeds, then summary.json and the report.

Why this shape: the cross-paradigm study is many independent measurements (trace a
model, sweep a layer, edit a batch, unlearn a set) repeated over seeds.  Each
(stage, model, seed) cell writes one JSON file atomically when it finishes, so an
interrupted study resumes by skipping finished cells (and several processes can share one
folder: a cell being computed is locked, see `CellLock`), and re-running with the same
configuration reproduces ``summary.json`` exactly (timings are kept apart from the
numbers for that reason).  Stages are plain functions registered by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dlmedit.cache import atomic_write_json

StageFn = Callable[["StageContext"], dict[str, Any]]
_STAGES: dict[str, StageFn] = {}
_STAGE_ORDER: list[str] = []


def stage(name: str) -> Callable[[StageFn], StageFn]:
    """Register a study stage under ``name`` (run in registration order)."""

    def wrap(fn: StageFn) -> StageFn:
        _STAGES[name] = fn
        if name not in _STAGE_ORDER:
            _STAGE_ORDER.append(name)
        return fn

    return wrap


def stage_names() -> list[str]:
    return list(_STAGE_ORDER)


@dataclass
class StudyConfig:
    """Everything that determines the study's numbers (hashed to guard resumed runs)."""

    models: list[str] = field(default_factory=lambda: ["builtin:arm", "builtin:mdm"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    quick: bool = False
    stages: list[str] = field(default_factory=list)
    n_trace_facts: int = 100
    n_edit_facts: int = 50
    n_sweep_facts: int = 20
    n_forget_subjects: int = 10
    real_model: str | None = "smollm2"
    n_real_facts: int = 20
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def preset(cls, quick: bool, **overrides: Any) -> StudyConfig:
        if quick:
            base = cls(seeds=[0], quick=True, n_trace_facts=12, n_edit_facts=4, n_sweep_facts=2,
                       n_forget_subjects=3, n_real_facts=4, real_model=None)
        else:
            base = cls()
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base

    def digest(self) -> str:
        """Hash of what determines the numbers.  ``stages`` is left out: it only selects which cells
        run, so a study can be run stage by stage (or in parallel processes) into one folder."""
        numbers = {k: v for k, v in asdict(self).items() if k != "stages"}
        return hashlib.sha256(json.dumps(numbers, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageContext:
    """What a stage sees: the config, one model alias, one seed, its output folder, a logger."""

    config: StudyConfig
    model: str
    seed: int
    out_dir: Path
    log: Callable[[str], None] = print
    cache: dict[str, Any] = field(default_factory=dict)


def cell_path(out: Path, stage_name: str, model: str, seed: int) -> Path:
    safe = model.replace(":", "_").replace("/", "_")
    return out / "cells" / stage_name / f"{safe}__seed{seed}.json"


def run_study(config: StudyConfig, out: str | Path, log: Callable[[str], None] = print,
              progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run every (stage, model, seed) cell not yet done; return the collected results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "study.json"
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous.get("digest") != config.digest():
            raise ValueError(
                f"{out} holds a study with a different configuration (digest {previous.get('digest')} vs "
                f"{config.digest()}); use another --out or pass --overwrite to start anew"
            )
    atomic_write_json(run_file, {"digest": config.digest(), "config": asdict(config)})
    names = config.stages or stage_names()
    unknown = [n for n in names if n not in _STAGES]
    if unknown:
        raise ValueError(f"unknown study stage(s) {unknown}; known: {stage_names()}")
    cells = [(n, m, s) for n in names for m in _models_for(n, config) for s in config.seeds]
    shared_cache: dict[str, Any] = {}
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    waiting: list[tuple[str, str, int]] = []

    def compute(name: str, model: str, seed: int) -> dict[str, Any]:
        ctx = StageContext(config, model, seed, out / "stages" / name, log=log, cache=shared_cache)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        numbers = _STAGES[name](ctx)
        cell = {"stage": name, "model": model, "seed": seed, "numbers": numbers,
                "wall_time_s": round(time.perf_counter() - start, 3)}
        atomic_write_json(cell_path(out, name, model, seed), cell)
        return cell

    def try_cell(key: tuple[str, str, int]) -> bool:
        """Load the cell, or compute it if no other process is at it; False if one is."""
        path = cell_path(out, *key)
        if not path.exists():
            with CellLock(path) as lock:
                if not lock.held:
                    return False
                if not path.exists():
                    done[key] = compute(*key)
                    return True
        done[key] = json.loads(path.read_text())
        return True

    for i, key in enumerate(cells):
        if progress:
            progress(f"{key[0]} · {key[1]} · seed {key[2]}", i, len(cells))
        if not try_cell(key):
            waiting.append(key)  # another process is computing it; collect it at the end
    for key in waiting:  # cells of other processes: wait for them, or take over from one that died
        while not try_cell(key):
            if progress:
                progress(f"waiting for {key[0]} · {key[1]} · seed {key[2]} (another process)", len(done), len(cells))
            time.sleep(CellLock.poll_seconds)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for key in cells:
        cell = done[key]
        results.setdefault(key[0], {}).setdefault(key[1], {})[str(key[2])] = cell["numbers"]
        timings[f"{key[0]}|{key[1]}|{key[2]}"] = cell["wall_time_s"]
    if progress:
        progress("done", len(cells), len(cells))
    return {"results": results, "timings": timings}


class CellLock:
    """``cell.json.lock`` while a process computes a cell, so several ``dlmedit study`` processes can
    share one folder (e.g. one per CPU core) without computing a cell twice.

    The lock appears atomically (a hard link) and holds the owner's pid; a lock whose
    process no longer runs on this machine is stale and taken over.  ``held`` says
    whether this process got it.
    """

    poll_seconds: float = 5.0

    def __init__(self, cell: Path) -> None:
        self.path = cell.with_name(cell.name + ".lock")
        self.held = False

    def __enter__(self) -> CellLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the pid is written first and the lock appears by a hard link, so nobody reads a half-made lock
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(str(os.getpid()))
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    if self._owner_alive():
                        return self
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                self.held = True
                return self
            return self
        finally:
            tmp.unlink(missing_ok=True)

    def _owner_alive(self) -> bool:
        try:
            pid = int(self.path.read_text().strip() or "0")
        except (OSError, ValueError):
            return False
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _models_for(stage_name: str, config: StudyConfig) -> list[str]:
    """The real-model stage runs on the real model only; every other stage on the study's models."""
    if stage_name == "real_model":
        return [config.real_model] if config.real_model else []
    return list(config.models)
