"""Evaluation runs: edit with a method under a stated protocol, measure, write resumable results.

Why this module: "ES = 0.97" means nothing without saying *when* it was measured.
Three protocols, each named in every result row and in ``summary.json``:

``single``      EasyEdit's "evaluate right after": for each record, compute a delta on
                the unedited model, apply it, measure that record, revert (bit-exact).
``batch``       ROME/MEMIT's "after the whole batch": one delta for all records, apply,
                measure every record, revert.
``sequential``  edits applied one after another, each computed on the model as edited
                so far; every ``every`` edits ALL earlier edits are re-measured (rows of
                kind ``curve``); per-record rows are measured after the last edit.  All
                handles are reverted last-first at the end.

Every record is also measured on the unedited model (``pre``), so rows carry
``pre``, ``post`` and ``change`` (post − pre) metrics.

Files in ``OUT``:

``run.json``       the run's configuration (model + fingerprint, method, hyper-parameters,
                   dataset spec, limit, protocol, target states, seed, measurement and
                   sampler settings).  A run only resumes into an ``OUT`` with the same
                   configuration; anything else is refused (``--overwrite`` or another
                   ``--out``).
``results.jsonl``  one JSON row per line, appended, flushed and fsynced as it goes.
                   Kinds: ``record`` (one per evaluated record — what the summary uses),
                   ``edit`` (sequential: one per applied edit) and ``curve``
                   (sequential: means after n edits).  On start, existing rows are read
                   and finished records (case_id + protocol) are skipped; a truncated
                   last line (crash mid-write) is dropped and cut from the file.
``deltas/``        every delta the run computed, as safetensors (``EditDelta.save``).
                   Sequential resume *replays* these (``deltas/00000``, ``00001``, …)
                   instead of recomputing: applying a saved delta is an exact addition of
                   the same tensor to the same weights, so the weights after replay are
                   bit-identical to an uninterrupted run's, and replay is instant.  Editors
                   with state beyond the weights (AlphaEdit's memory of earlier keys) say so
                   by defining ``reset()``; on resume their state is rebuilt by
                   ``replay(requests, delta)`` when they define it, otherwise by recomputing
                   each replayed edit on the same weights (its result is discarded and the
                   saved delta applied).  ``deltas/batch`` holds the batch protocol's delta.
``results.jsonl.lock``  present while a process runs into ``OUT`` (the study's cell lock:
                   a hard-linked file holding the pid, taken over when that process is gone).
                   A second process on the same ``OUT`` waits for it and then resumes (every
                   record it finished is skipped), or stops at once with ``wait=False``
                   (CLI ``--no-wait``) — so rows are never written twice and a live writer's
                   unfinished last line is never cut.
``summary.json``   means with 95 % bootstrap intervals (seeded) overall and per target
                   length bucket for every metric (pre, post, change), Score, timings,
                   and the sequential curve.

Determinism: before each edit the global RNGs (python, numpy, torch) are seeded from
(seed, edit index), so an edit does not depend on how many edits ran before it in this
process — a resumed run computes the same deltas as an uninterrupted one.  Editors with
state across records may define ``reset()``; the ``single`` protocol calls it before
each record (each single edit starts from the unedited model).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dlmedit.cache import atomic_write_json
from dlmedit.errors import DlmeditError, OutputLockedError
from dlmedit.evaluate.measure import (
    METRICS,
    EvalConfigError,
    MeasureSettings,
    RecordMeasurement,
    add_pre_comparison,
    answer_window_of,
    measure_records,
    record_identity,
)
from dlmedit.evaluate.metrics import LENGTH_BUCKETS, harmonic_mean
from dlmedit.evaluate.stats import bootstrap_ci

if TYPE_CHECKING:
    from dlmedit.data.records import EditRecord
    from dlmedit.edit.delta import AppliedDelta, EditDelta
    from dlmedit.edit.editor import Editor
    from dlmedit.models.language_model import LanguageModel

__all__ = [
    "PROTOCOLS",
    "RESULTS_FILE",
    "RUN_FILE",
    "SUMMARY_FILE",
    "EvalConfig",
    "EvalConfigError",
    "ResultsFileError",
    "ResultsLog",
    "RunConfigMismatchError",
    "out_lock",
    "preflight",
    "print_summary",
    "run_evaluation",
    "summarize_rows",
]

PROTOCOLS = ("single", "batch", "sequential")
TARGET_STATES = ("final", "partial", "trajectory")
RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
DELTAS_DIR = "deltas"
_RUN_FORMAT = "dlmedit.eval-run/1"


class RunConfigMismatchError(DlmeditError, ValueError):
    """``--out`` holds results of a different run configuration."""


class ResultsFileError(DlmeditError, ValueError):
    """``results.jsonl`` / ``run.json`` / saved deltas are damaged or inconsistent."""


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class EvalConfig:
    """Everything that determines a run's results (and therefore whether it may be resumed).

    ``every`` (sequential only): re-measure all earlier edits after every ``every`` edits;
    ``None`` = about ten curve points (``max(1, n // 10)``).  ``target_states`` is passed
    to the editor as the hyper-parameter ``target_states``.  ``chunk_size`` (records per
    batched measurement call) only affects speed and memory, not results.
    """

    model: str
    method: str
    dataset: str
    protocol: str = "single"
    limit: int | None = None
    every: int | None = None
    target_states: str = "final"
    hparams: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    chunk_size: int = 32
    #: target-length buckets the records were filtered to (``--lengths``); None = all
    lengths: list[str] | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise EvalConfigError(f"unknown protocol {self.protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if self.target_states not in TARGET_STATES:
            raise EvalConfigError(f"unknown target states {self.target_states!r}; use one of {', '.join(TARGET_STATES)}")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise EvalConfigError(f"--limit must be a positive number of records, got {self.limit}")
        if self.every is not None and self.every < 1:
            raise EvalConfigError(f"--every must be a positive number of edits, got {self.every}")
        if self.every is not None and self.protocol != "sequential":
            raise EvalConfigError("--every only applies to the sequential protocol")
        if self.chunk_size < 1:
            raise EvalConfigError(f"chunk_size must be positive, got {self.chunk_size}")
        if "target_states" in self.hparams and self.hparams["target_states"] != self.target_states:
            raise EvalConfigError("give the target states once (--target-states), not also as --hparam target_states")

    def editor_hparams(self) -> dict[str, Any]:
        return {**self.hparams, "target_states": self.target_states}

    def every_for(self, n_records: int) -> int:
        return self.every or max(1, n_records // 10)


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _identity(config: EvalConfig, lm: LanguageModel, fingerprint: str, n_records: int) -> dict[str, Any]:
    """The part of run.json two runs must share to write into the same results file."""
    return _canonical({"model_fingerprint": fingerprint, "paradigm": lm.paradigm.describe(),
                       **_config_identity(config, n_records)})


def _config_identity(config: EvalConfig, n_records: int) -> dict[str, Any]:
    """The model-independent part of the identity (checked before the model is loaded, too)."""
    identity = {
        "method": config.method,
        "hparams": config.editor_hparams(),
        "dataset": config.dataset,
        "limit": config.limit,
        "n_records": n_records,
        "protocol": config.protocol,
        "every": config.every_for(n_records) if config.protocol == "sequential" else None,
        "target_states": config.target_states,
        "seed": config.seed,
        "measure": config.measure.describe(),
    }
    if config.lengths:
        identity["lengths"] = sorted(config.lengths)
    return _canonical(identity)


# ----------------------------------------------------------------------------- lock of OUT

#: output folders this process holds the lock of (resolved path → nesting depth), so that the
#: CLI can take the lock before loading the model and `run_evaluation` can take it again
_HELD_OUTS: dict[Path, int] = {}


def _lock_owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


@contextlib.contextmanager
def out_lock(
    out: str | os.PathLike[str],
    *,
    wait: bool = True,
    log: Callable[[str], None] | None = None,
    poll_seconds: float | None = None,
) -> Iterator[None]:
    """Hold ``OUT/results.jsonl.lock`` (the study's `CellLock`) while evaluating into ``out``.

    Another live process holding it: wait until it is released (``wait=True``; ``log`` is
    told once), or raise `OutputLockedError` naming the folder and that process.  A lock
    left by a process that died is taken over.  Re-entrant within one process.
    """
    from dlmedit.study.runner import CellLock  # the one lock of the project (study cells use it too)

    key = Path(out).expanduser().resolve()
    if key in _HELD_OUTS:
        _HELD_OUTS[key] += 1
        try:
            yield
        finally:
            _HELD_OUTS[key] -= 1
        return
    lock = CellLock(key / RESULTS_FILE)
    told = False
    while True:
        lock.__enter__()
        if lock.held:
            break
        owner = _lock_owner(lock.path)
        if not wait:
            raise OutputLockedError(
                f"{out} is being written by another dlmedit process (pid {owner}, lock {lock.path}); wait for it "
                "to finish (or run again without --no-wait to wait), or choose another --out"
            )
        if log is not None and not told:
            log(f"{out} is being written by another process (pid {owner}); waiting for it to finish, then resuming …")
            told = True
        time.sleep(CellLock.poll_seconds if poll_seconds is None else poll_seconds)
    _HELD_OUTS[key] = 1
    try:
        yield
    finally:
        del _HELD_OUTS[key]
        lock.__exit__()


# ----------------------------------------------------------------------------- results file


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (they are not valid JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    return obj


class ResultsLog:
    """Append-only JSONL of result rows that survives being killed mid-write."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """All complete rows.  A truncated last line is dropped *and cut from the file*.

        Only the last line can be partial (rows are appended whole); damage anywhere
        else means the file was edited or corrupted, and is reported, not skipped.
        """
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        rows: list[dict[str, Any]] = []
        good_end = 0
        pos = 0
        lineno = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl + 1
            line = data[pos:end]
            lineno += 1
            last = end >= len(data)
            try:
                row = json.loads(line.decode("utf-8")) if line.strip() else None
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                if last and nl < 0:
                    break  # truncated last line: discard
                raise ResultsFileError(
                    f"{self.path}: line {lineno} is not valid JSON ({exc}); the results file is damaged. "
                    "Remove that line, or start anew with --overwrite / another --out"
                ) from exc
            if row is not None and not isinstance(row, dict):
                raise ResultsFileError(f"{self.path}: line {lineno} is not a JSON object")
            if row is not None:
                rows.append(row)
            good_end = end
            pos = end
        if good_end < len(data):
            with open(self.path, "rb+") as fh:
                fh.truncate(good_end)
        elif data and not data.endswith(b"\n"):
            with open(self.path, "ab") as fh:  # complete row whose newline was lost
                fh.write(b"\n")
        return rows

    def append(self, row: dict[str, Any]) -> None:
        text = json.dumps(_clean(row), ensure_ascii=False, allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())


# ----------------------------------------------------------------------------- summary


def _values(rows: Sequence[dict[str, Any]], state: str, metric: str) -> tuple[list[float], list[int]]:
    vals, lens = [], []
    for row in rows:
        v = (row.get(state) or {}).get(metric)
        if v is not None:
            vals.append(float(v))
            lens.append(int(row["n_tokens"]))
    return vals, lens


def summarize_rows(
    rows: Sequence[dict[str, Any]], *, seed: int = 0, n_resamples: int = 1000
) -> dict[str, Any]:
    """Means with 95 % bootstrap CIs (overall and per length bucket) of every metric of ``record`` rows.

    Records where a metric is undefined (null, e.g. PS without paraphrases) are left out
    of that metric; ``n`` says how many records each mean covers.  ``Score`` is the
    harmonic mean of the ES, PS and NS means (no interval: it is not a mean of records).
    """
    records = [r for r in rows if r.get("kind") == "record"]
    out: dict[str, Any] = {"n_records": len(records), "metrics": {}, "Score": {}}
    for state in ("pre", "post", "change"):
        per_metric: dict[str, Any] = {}
        for metric in METRICS:
            vals, lens = _values(records, state, metric)
            if not vals:
                continue
            entry = {"all": bootstrap_ci(vals, seed=seed, n_resamples=n_resamples).as_dict()}
            for bucket in LENGTH_BUCKETS:
                sub = [v for v, n in zip(vals, lens, strict=True) if _bucket(n) == bucket]
                if sub:
                    entry[bucket] = bootstrap_ci(sub, seed=seed, n_resamples=n_resamples).as_dict()
            per_metric[metric] = entry
        out["metrics"][state] = per_metric
        if state != "change" and all(k in per_metric for k in ("ES", "PS", "NS")):
            out["Score"][state] = {
                group: harmonic_mean([per_metric[k][group]["mean"] for k in ("ES", "PS", "NS")])
                for group in ("all", *LENGTH_BUCKETS)
                if all(group in per_metric[k] for k in ("ES", "PS", "NS"))
            }
    return out


def _bucket(n: int) -> str:
    return str(n) if n < 4 else "4+"


def _means(measurements: Sequence[RecordMeasurement]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for metric in METRICS:
        vals = [m.metrics[metric] for m in measurements if m.metrics.get(metric) is not None]
        out[metric] = float(np.mean(vals)) if vals else None
    if all(out.get(k) is not None for k in ("ES", "PS", "NS")):
        out["Score"] = harmonic_mean([out["ES"], out["PS"], out["NS"]])  # type: ignore[list-item]
    return out


# ----------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar with ETA, or nothing (tests, non-interactive use)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def task(self, description: str, total: int) -> Callable[[int], None]:
        if self._progress is None:
            return lambda n=1: None
        task_id = self._progress.add_task(description, total=total)
        return lambda n=1: self._progress.advance(task_id, n)


# ----------------------------------------------------------------------------- the run


def _seed_step(seed: int, step: int) -> None:
    """Seed every global RNG from (seed, step) so an edit is independent of earlier ones in-process."""
    s = (seed * 1_000_003 + step) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _delta_norm(delta: EditDelta) -> float:
    return float(math.sqrt(sum(v * v for v in delta.norms().values())))


@dataclass
class _Run:
    lm: LanguageModel
    records: list[EditRecord]
    config: EvalConfig
    out: Path
    editor: Editor
    log: ResultsLog
    progress: _Progress
    on_row: Callable[[dict[str, Any]], None] | None
    rows: list[dict[str, Any]]

    # -- helpers -----------------------------------------------------------------
    @property
    def protocol(self) -> str:
        return self.config.protocol

    def write(self, row: dict[str, Any]) -> None:
        row = _clean({"protocol": self.protocol, **row})
        self.log.append(row)
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)

    def done_records(self) -> set[str]:
        return {json.dumps(r["case_id"]) for r in self.rows if r.get("kind") == "record" and r.get("protocol") == self.protocol}

    def pending(self) -> list[tuple[int, EditRecord]]:
        done = self.done_records()
        return [(i, r) for i, r in enumerate(self.records) if json.dumps(r.case_id) not in done]

    def measure(self, records: Sequence[EditRecord]) -> tuple[list[RecordMeasurement], float]:
        """Measure ``records`` in batched calls of ``chunk_size`` records; returns results and seconds."""
        t0 = time.perf_counter()
        out: list[RecordMeasurement] = []
        for chunk in _chunks(records, self.config.chunk_size):
            out += measure_records(self.lm, chunk, self.config.measure)
        return out, time.perf_counter() - t0

    def record_row(
        self, index: int, record: EditRecord, pre: RecordMeasurement, post: RecordMeasurement,
        timing: dict[str, float], n_edits: int, delta_norm: float | None,
    ) -> dict[str, Any]:
        add_pre_comparison(post, pre)
        change = {k: (post.metrics[k] - pre.metrics[k]) for k in METRICS
                  if post.metrics.get(k) is not None and pre.metrics.get(k) is not None}
        timing = {**timing, "total": sum(timing.values())}
        return {
            "kind": "record", "index": index, **record_identity(self.lm, record),
            "n_edits": n_edits, "delta_norm": delta_norm, "gen_mode": post.generation.get("mode"),
            "pre": pre.metrics, "post": post.metrics, "change": change,
            "pre_detail": {k: v for k, v in pre.to_dict().items() if k != "metrics"},
            "post_detail": {k: v for k, v in post.to_dict().items() if k != "metrics"},
            "seconds": timing,
        }

    def compute(self, step: int, requests: list[Any]) -> tuple[EditDelta, float]:
        _seed_step(self.config.seed, step)
        t0 = time.perf_counter()
        delta = self.editor.compute(requests)
        return delta, time.perf_counter() - t0

    # -- protocols -------------------------------------------------------------------
    def single(self) -> None:
        pending = self.pending()
        advance = self.progress.task(f"single edits ({self.config.method})", len(pending))
        reset = getattr(self.editor, "reset", None)
        for chunk in _chunks(pending, self.config.chunk_size):
            pre, pre_s = self.measure([r for _, r in chunk])
            for (index, record), pre_m in zip(chunk, pre, strict=True):
                if callable(reset):
                    reset()
                delta, compute_s = self.compute(index, [record.request])
                t0 = time.perf_counter()
                handle = delta.apply(self.lm.module)
                apply_s = time.perf_counter() - t0
                try:
                    post, post_s = self.measure([record])
                finally:
                    t0 = time.perf_counter()
                    handle.revert()
                    revert_s = time.perf_counter() - t0
                self.write(self.record_row(
                    index, record, pre_m, post[0],
                    {"measure_pre": pre_s / len(chunk), "edit": compute_s + apply_s, "measure_post": post_s,
                     "revert": revert_s},
                    n_edits=1, delta_norm=_delta_norm(delta)))
                advance(1)

    def batch(self) -> None:
        from dlmedit.edit.delta import EditDelta

        pending = self.pending()
        if not pending:
            return
        delta_dir = self.out / DELTAS_DIR / "batch"
        timing_file = delta_dir / "timing.json"
        if (delta_dir / "delta.json").is_file() and timing_file.is_file():
            delta = EditDelta.load(delta_dir)
            compute_s = float(json.loads(timing_file.read_text())["compute_seconds"])
        else:
            delta, compute_s = self.compute(0, [r.request for r in self.records])
            delta.save(delta_dir)
            atomic_write_json(timing_file, {"compute_seconds": compute_s})
        n = len(self.records)
        pre: list[RecordMeasurement] = []
        pre_s = 0.0
        advance = self.progress.task("pre-edit measurement", len(pending))
        for chunk in _chunks(pending, self.config.chunk_size):
            m, s = self.measure([r for _, r in chunk])
            pre += m
            pre_s += s
            advance(len(chunk))
        t0 = time.perf_counter()
        handle = delta.apply(self.lm.module)
        apply_s = time.perf_counter() - t0
        advance = self.progress.task(f"batch edit of {n} ({self.config.method}): measuring", len(pending))
        norm = _delta_norm(delta)
        try:
            k = 0
            for chunk in _chunks(pending, self.config.chunk_size):
                post, post_s = self.measure([r for _, r in chunk])
                for (index, record), post_m in zip(chunk, post, strict=True):
                    self.write(self.record_row(
                        index, record, pre[k], post_m,
                        {"measure_pre": pre_s / len(pending), "edit": (compute_s + apply_s) / n,
                         "measure_post": post_s / len(chunk)},
                        n_edits=n, delta_norm=norm))
                    k += 1
                    advance(1)
        finally:
            handle.revert()

    def sequential(self) -> None:
        from dlmedit.edit.delta import EditDelta

        n = len(self.records)
        every = self.config.every_for(n)
        edits = sorted((r for r in self.rows if r.get("kind") == "edit"), key=lambda r: r["step"])
        steps = [r["step"] for r in edits]
        if steps != list(range(len(steps))):
            raise ResultsFileError(
                f"{self.log.path}: sequential edit rows are not the consecutive steps 0..{len(steps) - 1} "
                f"(found {steps[:10]}…); start anew with --overwrite or another --out"
            )
        curves = {r["n_edits"] for r in self.rows if r.get("kind") == "curve"}
        done = self.done_records()
        needed = {k for k in range(1, n + 1) if k % every == 0 or k == n}
        if len(edits) == n and all(json.dumps(r.case_id) in done for r in self.records) and needed <= curves:
            return
        advance_pre = self.progress.task("pre-edit measurement", n)
        pre: list[RecordMeasurement] = []
        pre_s = 0.0
        for chunk in _chunks(self.records, self.config.chunk_size):
            m, s = self.measure(chunk)
            pre += m
            pre_s += s
            advance_pre(len(chunk))
        handles: list[AppliedDelta] = []
        edit_seconds: dict[int, float] = {r["step"]: float(r.get("edit_seconds", 0.0)) for r in edits}
        norms: dict[int, float] = {r["step"]: float(r.get("delta_norm") or 0.0) for r in edits}
        final: list[RecordMeasurement] | None = None
        final_s = 0.0
        advance = self.progress.task(f"sequential edits ({self.config.method})", n)
        replay = getattr(self.editor, "replay", None)
        stateful = callable(getattr(self.editor, "reset", None))
        try:
            for row in edits:
                step = row["step"]
                path = self.out / row["delta_dir"]
                try:
                    delta = EditDelta.load(path)
                except DlmeditError as exc:
                    raise ResultsFileError(
                        f"cannot replay sequential edit {step} from {path}: {exc}; start anew with --overwrite"
                    ) from exc
                requests = [self.records[step].request]
                if callable(replay):
                    replay(requests, delta)
                elif stateful:
                    self.compute(step, requests)  # rebuilds the editor's state; the saved delta is applied
                handles.append(delta.apply(self.lm.module))
                advance(1)

            def curve(k: int) -> None:
                nonlocal final, final_s
                if k in curves or k not in needed:
                    return
                measured, seconds = self.measure(self.records[:k])
                for post_m, pre_m in zip(measured, pre[:k], strict=True):
                    add_pre_comparison(post_m, pre_m)
                self.write({"kind": "curve", "n_edits": k, "n_measured": k, "means": _means(measured),
                            "pre_means": _means(pre[:k]), "measure_seconds": seconds})
                curves.add(k)
                if k == n:
                    final, final_s = measured, seconds

            if edits:
                curve(len(edits))
            for step in range(len(edits), n):
                record = self.records[step]
                delta, compute_s = self.compute(step, [record.request])
                rel = f"{DELTAS_DIR}/{step:05d}"
                delta.save(self.out / rel)
                t0 = time.perf_counter()
                handles.append(delta.apply(self.lm.module))
                edit_seconds[step] = compute_s + time.perf_counter() - t0
                norms[step] = _delta_norm(delta)
                self.write({"kind": "edit", "step": step, "case_id": record.case_id, "delta_dir": rel,
                            "edit_seconds": edit_seconds[step], "delta_norm": norms[step]})
                advance(1)
                curve(step + 1)
            todo = [(i, r) for i, r in enumerate(self.records) if json.dumps(r.case_id) not in done]
            if todo:
                if final is None:
                    final, final_s = self.measure(self.records)
                for index, record in todo:
                    self.write(self.record_row(
                        index, record, pre[index], final[index],
                        {"measure_pre": pre_s / n, "edit": edit_seconds.get(index, 0.0), "measure_post": final_s / n},
                        n_edits=n, delta_norm=norms.get(index)))
        finally:
            for handle in reversed(handles):
                handle.revert()


_MODEL_KEYS = ("model_fingerprint", "paradigm", "editor")  # need the loaded model; compared later


def preflight(config: EvalConfig, out: str | os.PathLike[str], n_records: int, *, overwrite: bool = False) -> None:
    """Checks that need no model: the method exists and ``out`` holds no other configuration.

    The CLI calls this before loading the model, so a wrong ``--out`` or method name
    fails in a second; the model's fingerprint is compared later by :func:`run_evaluation`.
    """
    from dlmedit.edit.editor import editor_names

    names = editor_names()
    if config.method not in names:
        raise EvalConfigError(f"unknown edit method {config.method!r}; choose one of {', '.join(names)}")
    run_path = Path(out) / RUN_FILE
    if overwrite or not run_path.is_file():
        return
    try:
        old = json.loads(run_path.read_text(encoding="utf-8")).get("identity", {})
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ResultsFileError(f"{run_path} is not a valid run file ({exc}); start anew with --overwrite") from exc
    new = _config_identity(config, n_records)
    _compare({k: v for k, v in old.items() if k not in _MODEL_KEYS}, new, Path(out))


def _compare(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    if old != new:
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        detail = "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys[:6])
        raise RunConfigMismatchError(
            f"{out} holds results of a different configuration ({detail}). Refusing to mix them: "
            "pass --overwrite to discard the old results, or choose another --out"
        )


def _prepare_out(out: Path, identity: dict[str, Any], run_info: dict[str, Any], overwrite: bool) -> None:
    """Create ``out`` / check it holds the same configuration; write run.json."""
    run_path, results_path = out / RUN_FILE, out / RESULTS_FILE
    if overwrite:
        for name in (RUN_FILE, RESULTS_FILE, SUMMARY_FILE):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
        shutil.rmtree(out / DELTAS_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if run_path.exists():
        try:
            previous = json.loads(run_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ResultsFileError(f"{run_path} is not valid JSON ({exc}); start anew with --overwrite") from exc
        _compare(previous.get("identity", {}) if isinstance(previous, dict) else {}, identity, out)
        return
    if results_path.exists() and results_path.stat().st_size > 0:
        raise RunConfigMismatchError(
            f"{results_path} exists but {run_path} does not, so its configuration is unknown. Refusing to mix: "
            "pass --overwrite to discard it, or choose another --out"
        )
    atomic_write_json(run_path, _clean({"format": _RUN_FORMAT, "identity": identity, **run_info}))


def run_evaluation(
    lm: LanguageModel,
    records: Sequence[EditRecord],
    config: EvalConfig,
    out: str | os.PathLike[str],
    *,
    editor: Editor | None = None,
    overwrite: bool = False,
    progress: bool = False,
    console: Any = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    wait: bool = True,
) -> dict[str, Any]:
    """Run (or resume) an evaluation into ``out`` and return the summary (also in ``summary.json``).

    ``out`` is locked for the run (see `out_lock`): if another process is writing it, this
    one waits and then resumes (``wait=True``) or raises `OutputLockedError`.

    ``editor`` defaults to ``get_editor(config.method, lm, config.seed, **config.editor_hparams())``.
    ``on_row`` is called after each row is durably written (tests inject interruptions
    here).  ``console``: a rich Console to print the summary table on (None = no table).
    The model is returned to its exact unedited weights, even when interrupted.
    """
    from dlmedit.data.loaders import DatasetError
    from dlmedit.data.records import EditRecord
    from dlmedit.edit.delta import model_fingerprint as weights_fingerprint
    from dlmedit.edit.editor import get_editor
    from dlmedit.edit.errors import RevertError

    records = list(records)
    if not records:
        raise DatasetError("the dataset has no records to evaluate")
    bad = next((r for r in records if not isinstance(r, EditRecord)), None)
    if bad is not None:
        raise DatasetError(
            f"eval measures knowledge edits and needs edit records (counterfact, zsre, kamel, world); "
            f"got {type(bad).__name__} (TOFU / world forget splits are unlearning data)"
        )
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        key = json.dumps(r.case_id)
        if key in seen:
            raise DatasetError(
                f"case_id {r.case_id!r} occurs twice (records {seen[key]} and {i}); results are keyed by case_id, "
                "so give every record a distinct case_id"
            )
        seen[key] = i
    out_path = Path(out)
    t_start = time.perf_counter()
    fingerprint = lm.fingerprint()
    if editor is None:
        editor = get_editor(config.method, lm, seed=config.seed, **config.editor_hparams())
    elif editor.name != config.method:
        raise EvalConfigError(f"the editor given is {editor.name!r} but the configuration names {config.method!r}")
    identity = _identity(config, lm, fingerprint, len(records))
    identity["editor"] = _canonical(editor.describe())  # resolved hyper-parameters, defaults included
    run_info = {
        "model": config.model,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "answer_window": answer_window_of(lm),
        "chunk_size": config.chunk_size,
    }
    with out_lock(out_path, wait=wait):  # one writer per OUT: no duplicated rows, no cut lines
        _prepare_out(out_path, identity, run_info, overwrite)
        log = ResultsLog(out_path / RESULTS_FILE)
        rows = [r for r in log.read() if r.get("protocol") == config.protocol]
        weights_before = weights_fingerprint(lm.module)
        with _Progress(progress) as bar:
            run = _Run(lm, records, config, out_path, editor, log, bar, on_row, rows)
            getattr(run, config.protocol)()
        if weights_fingerprint(lm.module) != weights_before:
            raise RevertError("the model's weights differ from before the run although every edit was reverted")
        summary = summarize_rows(run.rows, seed=config.seed)
        summary["protocol"] = config.protocol
        summary["protocol_note"] = {
            "single": "each record edited alone on the unedited model and measured right after (EasyEdit style)",
            "batch": "one edit of all records, every record measured after the whole batch (ROME/MEMIT style)",
            "sequential": "records edited one after another; per-record metrics after the last edit; curve every "
                          f"{config.every_for(len(records))} edits",
        }[config.protocol]
        summary["config"] = {"model": config.model, **identity}
        summary["timings"] = _timings(run.rows, time.perf_counter() - t_start)
        summary["estimators"] = _estimator_counts(run.rows)
        summary["generation_modes"] = sorted({r.get("post_detail", {}).get("generation", {}).get("mode")
                                              for r in run.rows if r.get("kind") == "record"} - {None})
        if config.protocol == "sequential":
            summary["curve"] = sorted(({"n_edits": r["n_edits"], "means": r["means"]} for r in run.rows
                                       if r.get("kind") == "curve"), key=lambda c: c["n_edits"])
        atomic_write_json(out_path / SUMMARY_FILE, _clean(summary))
    if console is not None:
        print_summary(summary, console)
    return summary


def _timings(rows: Sequence[dict[str, Any]], session_seconds: float) -> dict[str, Any]:
    records = [r for r in rows if r.get("kind") == "record"]
    edits = [r for r in rows if r.get("kind") == "edit"]
    if edits:
        per_edit = [float(r["edit_seconds"]) for r in edits]
    else:
        per_edit = [float(r["seconds"]["edit"]) for r in records]
    totals = [float(r["seconds"]["total"]) for r in records]
    curve_s = sum(float(r.get("measure_seconds", 0.0)) for r in rows if r.get("kind") == "curve")
    return {
        "seconds_per_edit": float(np.mean(per_edit)) if per_edit else None,
        "seconds_per_record": (sum(totals) + curve_s) / len(records) if records else None,
        "measure_seconds_per_record": (float(np.mean([r["seconds"]["measure_post"] for r in records]))
                                       if records else None),
        "curve_measure_seconds": curve_s,
        "session_wall_seconds": session_seconds,
        "note": "batch: seconds_per_edit is the one batch edit's time divided by the number of records",
    }


def _estimator_counts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        if r.get("kind") != "record":
            continue
        for probes in (r.get("post_detail", {}).get("scores") or {}).values():
            for p in probes:
                for key in ("estimator_new", "estimator_true"):
                    est = p.get(key)
                    if est:
                        counts[est] = counts.get(est, 0) + 1
    return dict(sorted(counts.items()))


def _fmt(entry: dict[str, Any] | None, ci: bool = True, digits: int = 3) -> str:
    if not entry:
        return "–"
    if ci and entry.get("n", 0) > 1:
        return f"{entry['mean']:.3f} ({entry['low']:.2f}–{entry['high']:.2f})"
    return f"{entry['mean']:.{digits}f}"


def print_summary(summary: dict[str, Any], console: Any) -> None:
    """A short rich table: metric × (pre, post with 95 % CI, change, post by length bucket)."""
    from rich.table import Table

    metrics = summary["metrics"]
    post = metrics.get("post", {})
    table = Table(title=f"{summary['config'].get('method')} on {summary['config'].get('dataset')} — protocol "
                        f"{summary['protocol']} ({summary['n_records']} records)",
                  caption="1…4+: post-edit mean over targets of that many tokens; Δ: mean of post − pre")
    for col in ("metric", "pre", "post (95% CI)", "Δ", *LENGTH_BUCKETS):
        table.add_column(col, no_wrap=True, justify="left" if col == "metric" else "right")
    for metric in METRICS:
        if metric not in post:
            continue
        table.add_row(metric, _fmt(metrics["pre"].get(metric, {}).get("all"), ci=False),
                      _fmt(post[metric]["all"]), _fmt(metrics["change"].get(metric, {}).get("all"), ci=False),
                      *(_fmt(post[metric].get(b), ci=False, digits=2) for b in LENGTH_BUCKETS))
    score = summary.get("Score", {})
    if "post" in score:
        table.add_row("Score", f"{score.get('pre', {}).get('all', float('nan')):.3f}",
                      f"{score['post'].get('all', float('nan')):.3f}", "",
                      *(f"{score['post'][b]:.2f}" if b in score["post"] else "–" for b in LENGTH_BUCKETS))
    console.print(table)
    t = summary["timings"]
    if t.get("seconds_per_record") is not None:
        console.print(f"seconds per edit {t['seconds_per_edit']:.3f} · per record {t['seconds_per_record']:.3f} · "
                      f"estimators {summary['estimators']} · generation {summary['generation_modes']}")
