"""Where independent, resumable work units run: in this process (local) or as Ray tasks (ray).

Why one module for both the study and the evaluation sweep: both cut their work into
*cells* — one function call whose JSON result is stored in one file — and need the same
guarantees whatever runs them:

* **resume**: a cell whose result file exists is loaded, not recomputed;
* **locking**: a cell is claimed by a ``CellLock`` (a ``.lock`` file holding the claiming
  process's pid) right before it is handed to the executor and released once its
  result is written, so several drivers — local processes, Ray drivers, or a mix — can
  share one output folder without computing a cell twice;
* **failures**: a failed cell is retried once; if it fails again it is reported with its
  error and every other cell still runs (the next run of the same command retries it,
  since it has no result file);
* **determinism**: a cell is computed by the same function in either executor; its
  numbers depend only on its arguments (per-cell seeds), never on which process ran it
  or what that process ran before.

Results travel back to the driver: the cell function *returns* its JSON result and the
driver writes the result file (atomically) and releases the lock.  Side artefacts a
cell writes itself (plots, per-run evaluation folders) go under the output folder from
the worker, so on a multi-node Ray cluster that folder must be on storage every node
mounts at the same path (checked by the study's cell function, see
``dlmedit.study.runner.compute_cell``).

``run_cells`` is the one driver loop; an executor only says how many cells may run at
once (``slots``), accepts cells (``submit``) and hands back finished ones (``wait``).
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlmedit.cache import atomic_write_json
from dlmedit.errors import DlmeditError, MissingPackageError

__all__ = [
    "EXECUTORS",
    "CellLock",
    "Executor",
    "ExecutorError",
    "Job",
    "JobFailure",
    "LocalExecutor",
    "Outcome",
    "RayExecutor",
    "RunResult",
    "make_executor",
    "run_cells",
]

EXECUTORS = ("local", "ray")
#: object store of a Ray cluster this module starts itself: cells return small JSON results, so
#: the store needs little (Ray's minimum is 75 MiB); the default (30 % of RAM) would be wasted.
RAY_OBJECT_STORE_BYTES = 100 * 1024 * 1024


class ExecutorError(DlmeditError, ValueError):
    """A bad executor setting (unknown name, non-positive resources, unreachable Ray address)."""


@dataclass(frozen=True)
class Job:
    """One cell: ``fn(*args)`` returns a JSON-serialisable dict that is stored at ``path``.

    ``fn`` must be importable by the worker (a module-level function) or picklable by
    value; ``key`` names the cell in progress lines and failure reports.
    """

    key: str
    path: Path
    fn: Callable[..., dict[str, Any]]
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """A finished job: its result, or the error of its last attempt (with the traceback)."""

    job: Job
    result: dict[str, Any] | None = None
    error: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class JobFailure:
    """A cell that failed on every attempt."""

    key: str
    error: str
    attempts: int
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "error": self.error, "attempts": self.attempts, "detail": self.detail}


@dataclass
class RunResult:
    """What ``run_cells`` collected: results by job key (loaded or computed) and the failures."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, JobFailure] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


class Executor(ABC):
    """Runs jobs; ``retries`` is how many times a failed job is tried again before it is reported."""

    name: str = ""

    def __init__(self, retries: int = 1) -> None:
        if retries < 0:
            raise ExecutorError(f"retries must be ≥ 0, got {retries}")
        self.retries = retries

    @abstractmethod
    def slots(self) -> int:
        """How many jobs may be in flight at once (the driver claims no more cells than this)."""

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Start ``job`` (or queue it); its outcome comes back from ``wait``."""

    @abstractmethod
    def wait(self) -> list[Outcome]:
        """Block until at least one submitted job has finished; return the finished ones."""

    def close(self) -> None:  # noqa: B027  (optional hook: most executors hold nothing)
        """Release what the executor started (a Ray cluster it started itself)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """One job at a time, in this process (what ``dlmedit study`` always did).

    Runs nothing until ``wait``, so the driver holds at most one cell lock at a time
    and other processes sharing the folder can take the remaining cells.
    """

    name = "local"

    def __init__(self, retries: int = 1, threads: int | None = None) -> None:
        super().__init__(retries)
        self._queue: list[Job] = []
        self.threads = threads

    def slots(self) -> int:
        return 1

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def wait(self) -> list[Outcome]:
        job = self._queue.pop(0)
        outcome = Outcome(job, error="not run")
        for _ in range(self.retries + 1):
            try:
                return [Outcome(job, result=call_with_threads(self.threads, job.fn, job.args))]
            except Exception as exc:  # a cell's failure is reported, not fatal (KeyboardInterrupt still is)
                outcome = Outcome(job, error=_describe(exc), detail=traceback.format_exc())
        return [outcome]


def call_with_threads(threads: int | None, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> dict[str, Any]:
    """Run ``fn(*args)`` on ``threads`` torch threads (restored afterwards); ``None`` leaves them alone.

    Why: float sums depend on how a matmul is split over threads, so a cell computed on
    two threads differs from one computed on one in the 7th digit; both executors run a
    cell on ``--cpus-per-cell`` threads so their numbers are byte-identical.
    """
    if threads is None:
        return fn(*args)
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(previous)


def _run_job(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], threads: int | None = None) -> dict[str, Any]:
    """The Ray task: the same call the local executor makes, in a worker process."""
    return call_with_threads(threads, fn, args)


class RayExecutor(Executor):
    """Each job is a Ray task (``num_cpus`` / ``num_gpus`` per task, retried ``retries`` times
    on an exception *or* a dead worker — Ray's ``max_retries`` + ``retry_exceptions``).

    ``address=None`` (and no ``RAY_ADDRESS`` in the environment) starts a private
    single-machine cluster (``num_cpus`` cores, no dashboard, a 100 MiB object store)
    that ``close`` shuts down; ``"auto"`` or ``HOST:PORT`` joins a running cluster
    (``ray start``).  If Ray is already initialised
    in this process (a test, a notebook) that connection is used and left open.  Ray's
    own output (worker logs, start-up lines) is kept out of the terminal unless
    ``verbose``; the worker logs stay in Ray's session folder.
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_task: float = 1.0, gpus_per_task: float = 0.0,
                 retries: int = 1, verbose: bool = False, num_cpus: int | None = None) -> None:
        super().__init__(retries)
        if cpus_per_task <= 0:
            raise ExecutorError(f"--cpus-per-cell must be positive, got {cpus_per_task}")
        if gpus_per_task < 0:
            raise ExecutorError(f"--gpus-per-cell must be ≥ 0, got {gpus_per_task}")
        try:
            import ray
        except ImportError as exc:
            raise MissingPackageError(
                "the Ray executor needs the `ray` package: pip install 'dlmedit[ray]' (or use --executor local)"
            ) from exc
        self._ray = ray
        self.cpus_per_task = float(cpus_per_task)
        self.gpus_per_task = float(gpus_per_task)
        self._owns_cluster = False
        address = address or os.environ.get("RAY_ADDRESS") or None  # as `ray.init` itself reads it
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats banner / network call
            kwargs: dict[str, Any] = {"log_to_driver": verbose,
                                      "logging_level": logging.INFO if verbose else logging.ERROR}
            if address in (None, "", "local"):
                kwargs.update(num_cpus=num_cpus, include_dashboard=False, object_store_memory=RAY_OBJECT_STORE_BYTES)
            else:
                kwargs["address"] = address
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise ExecutorError(f"cannot reach a Ray cluster at --address {address}: {exc}") from exc
            except Exception as exc:  # Ray raises a bare Exception when its raylet misses its 30 s start-up window
                if address is not None:
                    raise
                raise ExecutorError(f"could not start a local Ray instance ({_describe(exc)}); on a machine this "
                                    "busy use --executor local, or start Ray yourself (ray start --head) and pass "
                                    "--address auto") from exc
            self._owns_cluster = address in (None, "", "local")
        self._task = ray.remote(_run_job).options(
            num_cpus=self.cpus_per_task, num_gpus=self.gpus_per_task, max_retries=retries, retry_exceptions=True)
        self._pending: dict[Any, Job] = {}

    def slots(self) -> int:
        """Tasks the cluster can run at once with the per-task resources (at least 1; re-read each
        time, so nodes that join a running study are used for the cells not yet claimed)."""
        total = self._ray.cluster_resources()
        n = int(total.get("CPU", 0) // self.cpus_per_task)
        if self.gpus_per_task > 0:
            n = min(n, int(total.get("GPU", 0) // self.gpus_per_task))
        return max(1, n)

    def submit(self, job: Job) -> None:
        threads = max(1, int(self.cpus_per_task))
        self._pending[self._task.remote(job.fn, job.args, threads)] = job

    def wait(self) -> list[Outcome]:
        ray = self._ray
        ray.wait(list(self._pending), num_returns=1)  # block until one is done…
        # …then collect every task that has finished by now, not only that one
        ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
        out = []
        for ref in ready:
            job = self._pending.pop(ref)
            try:
                out.append(Outcome(job, result=ray.get(ref)))
            except ray.exceptions.RayTaskError as exc:  # the cell raised on every attempt
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                out.append(Outcome(job, error=_describe(cause), detail=str(exc)))
            except ray.exceptions.RayError as exc:  # its worker died on every attempt, or the task was lost
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                out.append(Outcome(job, error=f"{type(exc).__name__}: {first}", detail=str(exc)))
        return out

    def close(self) -> None:
        for ref in list(self._pending):
            self._ray.cancel(ref, force=True)
        self._pending.clear()
        if self._owns_cluster and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns_cluster = False


def make_executor(name: str, *, address: str | None = None, cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0,
                  verbose: bool = False) -> Executor:
    """The executor named on the command line (``--executor local|ray``)."""
    if name == "local":
        if address or gpus_per_cell:
            raise ExecutorError("--address and --gpus-per-cell apply to --executor ray only")
        return LocalExecutor(threads=max(1, int(cpus_per_cell)))
    if name == "ray":
        return RayExecutor(address=address, cpus_per_task=cpus_per_cell, gpus_per_task=gpus_per_cell, verbose=verbose)
    raise ExecutorError(f"unknown executor {name!r}; use one of {', '.join(EXECUTORS)}")


def run_cells_on(jobs: Iterable[Job], executor: Executor | None, progress: Any = None) -> RunResult:
    """:func:`run_cells` on ``executor``, or on a fresh :class:`LocalExecutor` when it is ``None``."""
    if executor is not None:
        return run_cells(jobs, executor, progress)
    with LocalExecutor() as local:
        return run_cells(jobs, local, progress)


def run_cells(jobs: Iterable[Job], executor: Executor,
              progress: Callable[[str, int, int], None] | None = None) -> RunResult:
    """Load finished cells, claim and run the others on ``executor``, write their results.

    Cells locked by another live process are waited for (polling every
    ``CellLock.poll_seconds``) and loaded when that process writes them, or taken over
    if it died.  Locks of cells still in flight are released if the driver is stopped.
    """
    jobs = list(jobs)
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("run_cells needs distinct job keys")
    out = RunResult()
    todo = list(jobs)
    in_flight: dict[str, CellLock] = {}

    def note(label: str) -> None:
        if progress:
            progress(label, len(out.results) + len(out.failures), len(jobs))

    try:
        while todo or in_flight:
            blocked: list[Job] = []
            slots = executor.slots()  # once per pass: a Ray cluster may have grown since the last one
            for job in todo:
                if job.path.exists():
                    out.results[job.key] = json.loads(job.path.read_text())
                    continue
                if len(in_flight) >= slots:
                    blocked.append(job)
                    continue
                lock = CellLock(job.path).__enter__()
                if not lock.held:
                    blocked.append(job)  # another process is computing it
                    continue
                if job.path.exists():  # finished between the check and the lock
                    lock.__exit__()
                    out.results[job.key] = json.loads(job.path.read_text())
                    continue
                executor.submit(job)
                in_flight[job.key] = lock
                note(job.key)
            todo = blocked
            if in_flight:
                for outcome in executor.wait():
                    key = outcome.job.key
                    try:
                        if outcome.error is None:
                            atomic_write_json(outcome.job.path, outcome.result)
                            out.results[key] = outcome.result  # type: ignore[assignment]
                            out.computed.append(key)
                        else:
                            out.failures[key] = JobFailure(key, outcome.error, executor.retries + 1, outcome.detail)
                    finally:
                        in_flight.pop(key).__exit__()
                    note(f"{key} {'done' if outcome.error is None else 'FAILED'}")
            elif todo:
                note(f"waiting for {todo[0].key} (another process)")
                time.sleep(CellLock.poll_seconds)
    finally:
        for lock in in_flight.values():
            lock.__exit__()
    note("done")
    return out


class CellLock:
    """``cell.json.lock`` while a process computes a cell, so several drivers can share one folder
    (e.g. one ``dlmedit study`` per CPU core, or a Ray driver) without computing a cell twice.

    The lock appears atomically (a hard link) and holds the owner's pid; a lock whose
    process no longer runs on this machine is stale and taken over.  ``held`` says
    whether this process got it.  With the Ray executor the *driver* holds the locks of
    the cells it has handed to the cluster.
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
