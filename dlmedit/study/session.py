"""One study as `dlmedit study` and `dlmedit.study(...)` run it: cells, summary, timings, report.

Why a module: the command line and the Python API must write the same ``summary.json``,
``timings.json``, ``failed.json`` and report for the same configuration; the CLI adds
only the progress bar and its exit status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlmedit.errors import UsageError

if TYPE_CHECKING:
    from dlmedit.executors import Executor
    from dlmedit.study.runner import StudyConfig

__all__ = ["StudyOutcome", "check_stage_options", "run_study_and_report"]


def check_stage_options(options: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """``{"unlearning": {"alpha": 0.5}}``: every stage name known, every value a dict of settings.

    The stages check their own keys when they run; here a typo in a stage name fails at once.
    """
    from dlmedit.study import stages as _stages  # noqa: F401  (registers the stages)
    from dlmedit.study.runner import stage_names

    out: dict[str, dict[str, Any]] = {}
    for stage, settings in (options or {}).items():
        if stage not in stage_names():
            raise UsageError(f"options: unknown stage {stage!r}; known: {', '.join(stage_names())}")
        if not isinstance(settings, dict):
            raise UsageError(f"options[{stage!r}] must be a dict of settings, got {type(settings).__name__}")
        out[stage] = dict(settings)
    return out


@dataclass
class StudyOutcome:
    """What one run of the study wrote: the summary, the report files, failed cells, wall time."""

    summary: dict[str, Any]
    html: Path
    markdown: Path
    failed: dict[str, Any]
    wall_time_s: float


def run_study_and_report(
    config: StudyConfig,
    out: str | Path,
    *,
    executor: Executor | None = None,
    executor_name: str = "local",
    log: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
) -> StudyOutcome:
    """Run (or resume) every cell into ``out``, then write summary.json, timings.json, failed.json and the report.

    Cells that failed on every attempt are left out of the summary and listed in it
    (``missing_cells``) and in ``failed.json``; the caller decides what a failure means
    (the CLI exits with status 1).
    """
    from dlmedit.cache import atomic_write_json
    from dlmedit.study import stages as _stages  # noqa: F401  (registers the stages)
    from dlmedit.study.report import build_summary, save_summary, versions, write_report
    from dlmedit.study.runner import run_study

    out = Path(out)
    start = time.perf_counter()
    if executor is None:
        collected = run_study(config, out, log=log, progress=progress)
    else:
        with executor:
            collected = run_study(config, out, log=log, progress=progress, executor=executor)
    wall = time.perf_counter() - start
    summary = build_summary(collected, asdict(config))
    failed = collected.get("failed") or {}
    if failed:  # only then: a complete study's summary.json is the same whichever executor ran it
        summary["missing_cells"] = {key: f["error"] for key, f in sorted(failed.items())}
    save_summary(out, summary)
    failed_file = out / "failed.json"
    if failed:
        atomic_write_json(failed_file, failed)
    else:
        failed_file.unlink(missing_ok=True)
    atomic_write_json(out / "timings.json", {"wall_time_s": wall, "cells_total_s": sum(collected["timings"].values()),
                                             "cells": collected["timings"], "executor": executor_name})
    html, md = write_report(out, summary, collected, versions(), wall)
    return StudyOutcome(summary, Path(html), Path(md), dict(failed), wall)
