"""One unlearning run as `dlmedit unlearn` and `dlmedit.unlearn(...)` do it: sets, settings, base, methods.

Why a module: the command line and the Python API must load the same splits, resolve
the memory coordinate the same way (given, ``--trace`` or the default) and produce the
same ``results.json``; the CLI adds only its progress bars, tables and extra
experiments (sweep, sequential, scaling, ablation), which take the prepared
:class:`UnlearnSetup`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlmedit.errors import UsageError

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel
    from dlmedit.unlearn.baselines import TrainConfig
    from dlmedit.unlearn.evaluate import EvalSets
    from dlmedit.unlearn.experiments import MemorySettings

__all__ = ["UnlearnSetup", "append_rows", "check_methods", "prepare_unlearning", "run_unlearning", "save_results"]


def check_methods(method: str | Sequence[str]) -> list[str]:
    """``"memory,ga"`` or ``["memory", "ga"]`` → the list, every name checked against the known methods."""
    from dlmedit.unlearn.experiments import METHODS

    items = method.split(",") if isinstance(method, str) else list(method)
    methods = [m.strip() for m in items if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"unknown method(s) {bad or method!r}; use {', '.join(METHODS)}")
    return methods


@dataclass
class UnlearnSetup:
    """Everything the methods and experiments of one run share (the model, the splits, the settings)."""

    lm: LanguageModel
    sets: EvalSets
    memory: MemorySettings
    train: TrainConfig
    background: list[tuple[str, str]]
    eval_kwargs: dict[str, Any]
    results: dict[str, Any]


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def prepare_unlearning(
    lm: LanguageModel,
    *,
    model: str,
    forget: str = "world:forget01",
    retain: str | None = "world:retain",
    utility: str | None = "world:utility",
    n_retain: int = 100,
    alpha: float = 1.0,
    lam: float = 1.0,
    q: int | None = None,
    gate: float | None = None,
    layer: int | None = None,
    site: str = "resid",
    trace: bool = False,
    key_stats: str = "whiten",
    n_background: int = 600,
    n_states: int = 8,
    epochs: float = 5.0,
    steps: int | None = None,
    lr: float = 1e-4,
    batch_size: int = 16,
    estimator: str | None = None,
    reference: str | None = None,
    generation: bool = False,
    seed: int = 0,
    world_seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> UnlearnSetup:
    """Load the splits, resolve the memory coordinate and training recipe, and start ``results.json``.

    ``model`` names the model in the results; ``reference`` (an alias or path) is loaded
    to score forget quality against; ``trace`` chooses the memory layer by tracing forget
    facts when ``layer`` is None.  ``log`` receives progress messages.
    """
    from dlmedit import load_model
    from dlmedit.unlearn import experiments as ex
    from dlmedit.unlearn.baselines import TrainConfig
    from dlmedit.unlearn.evaluate import EvalSets, forget_truth_ratios

    if alpha <= 0:
        raise UsageError(f"alpha must be > 0, got {alpha}")
    say = log or (lambda _msg: None)
    sets = EvalSets.from_specs(forget, retain or None, utility or None, n_retain=n_retain, seed=seed,
                               world_seed=world_seed)
    background = [(it.prompt, it.answer) for it in sets.spare[:n_background]]
    settings = ex.MemorySettings(layer=layer, site=site, alpha=alpha, lam=lam, q=q, gate=gate, key_stats=key_stats,
                                 n_states=n_states, seed=seed,
                                 coordinate_source="given" if layer is not None else "default")
    results: dict[str, Any] = {"model": model, "model_fingerprint": lm.fingerprint(), "paradigm": lm.paradigm.describe(),
                               "sets": {**sets.info, "n_forget": len(sets.forget), "n_utility": len(sets.utility)},
                               "seed": seed, "load_avg_start": _loadavg()}
    if trace and layer is None:
        say("tracing forget facts to choose the memory coordinate …")
        coord = ex.traced_coordinate(lm, sets.forget, seed=seed)
        settings.layer, settings.site, settings.coordinate_source = coord["layer"], coord["site"], "trace"
        results["trace"] = coord
    settings = settings.resolved(lm)
    results["memory_settings"] = asdict(settings)
    n_steps = steps if steps is not None else max(1, math.ceil(epochs * len(sets.forget) / batch_size))
    train_cfg = TrainConfig(steps=n_steps, lr=lr, batch_size=batch_size, seed=seed)
    results["train_config"] = asdict(train_cfg)
    eval_kwargs: dict[str, Any] = {"estimator": estimator, "generation": generation}
    if reference:
        ref_lm = load_model(reference)
        eval_kwargs["reference_ratios"] = forget_truth_ratios(ref_lm, sets.forget, estimator=estimator).tolist()
        results["reference"] = reference
        del ref_lm
    return UnlearnSetup(lm, sets, settings, train_cfg, background, eval_kwargs, results)


def run_unlearning(
    setup: UnlearnSetup,
    methods: Sequence[str],
    *,
    save_memory: str | os.PathLike[str] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_method: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score the unedited model, then run each method (undone after it is measured); fill ``setup.results``.

    ``on_row`` gets the base row and each method's row as soon as it exists (the CLI
    appends them to ``rows.jsonl``); ``on_method`` is called before each method runs.
    Returns ``setup.results`` with ``base`` and ``methods``.
    """
    from dlmedit.unlearn import experiments as ex
    from dlmedit.unlearn.evaluate import evaluate_unlearning

    lm, sets = setup.lm, setup.sets
    if log:
        log(f"{lm!r}: scoring the unedited model on {len(sets.forget)} forget / {len(sets.retain)} retain / "
            f"{len(sets.utility)} utility facts …")
    base = evaluate_unlearning(lm, sets, **setup.eval_kwargs)
    setup.results["base"] = base
    if on_row:
        on_row({"method": "base", **base})
    rows = []
    for m in methods:
        if on_method:
            on_method(m)
        row = ex.run_method(lm, m, sets, base, memory=setup.memory, train=setup.train, background=setup.background,
                            eval_kwargs=setup.eval_kwargs)
        rows.append(row)
        if on_row:
            on_row(row)
        if m == "memory" and save_memory:
            store, _ = ex.build_memory(lm, sets.forget, setup.memory, setup.background)
            store.save(save_memory)
    setup.results["methods"] = rows
    return setup.results


def append_rows(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    """Append rows to a JSONL file (``rows.jsonl``), non-finite numbers written as null."""
    from dlmedit.unlearn.experiments import finite_or_none

    with Path(path).open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(finite_or_none(row), default=str) + "\n")


def save_results(out: str | os.PathLike[str], results: dict[str, Any], wall_time_s: float) -> Path:
    """Stamp the wall time and end load average on ``results`` and write ``OUT/results.json``."""
    from dlmedit.unlearn.experiments import finite_or_none

    results["wall_time_s"] = wall_time_s
    results["load_avg_end"] = _loadavg()
    path = Path(out) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite_or_none(results), indent=1, default=str))
    return path
