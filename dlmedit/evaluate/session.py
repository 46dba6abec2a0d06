"""One evaluation as `dlmedit eval` and `dlmedit.evaluate(...)` run it: settings, dataset, length filter, run.

Why a module: the command line and the Python API must build the same measurement
settings from the same options, select the same records and refuse the same
``out`` folders, so both call :func:`measure_settings` and :func:`evaluate_dataset`;
the CLI only parses its flags and prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlmedit.data.records import EditRecord
    from dlmedit.evaluate.measure import MeasureSettings
    from dlmedit.evaluate.runner import EvalConfig
    from dlmedit.models.language_model import LanguageModel

__all__ = ["LENGTH_BUCKETS", "evaluate_dataset", "measure_settings", "parse_lengths", "select_lengths"]

LENGTH_BUCKETS = ("1", "2", "3", "4+")


def parse_lengths(text: str | Sequence[str] | None) -> set[str]:
    """``"3,4+"`` (or ``["3", "4+"]``) → {"3", "4+"}; None/empty → no filter.  Unknown buckets are an error."""
    from dlmedit.evaluate.measure import EvalConfigError

    if not text:
        return set()
    parts = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    items = {t.strip() for t in parts if t.strip()}
    bad = sorted(items - set(LENGTH_BUCKETS))
    if bad:
        raise EvalConfigError(f"--lengths {text!r}: unknown bucket(s) {bad}; use {', '.join(LENGTH_BUCKETS)}")
    return items


def select_lengths(lm: LanguageModel, records: Sequence[EditRecord], buckets: set[str],
                   limit: int | None) -> list[EditRecord]:
    """The first ``limit`` records (dataset order) whose target_new falls in ``buckets``.

    Why by target_new: the edit writes target_new, and the multi-token question is about
    how many tokens the edited model must now produce.
    """
    from dlmedit.data.records import length_bucket
    from dlmedit.evaluate.measure import EvalConfigError, target_length

    kept = [r for r in records if length_bucket(target_length(lm, r)) in buckets]
    if not kept:
        raise EvalConfigError(f"no record of the dataset has a target_new in length bucket(s) {sorted(buckets)}")
    return kept[:limit] if limit else kept


def measure_settings(
    *,
    estimator: str | None = None,
    order: str = "l2r",
    mc_samples: int = 128,
    generation: bool = True,
    gen_window: int | None = None,
    sampler: str = "llada",
    remasking: str = "low_confidence",
    alg: str = "maskgit_plus",
    steps: int | None = None,
    block_length: int | None = None,
    fluency: bool = False,
    fluency_tokens: int = 32,
    batch_size: int = 64,
    seed: int = 0,
) -> MeasureSettings:
    """`MeasureSettings` from the flat options of ``dlmedit eval`` (greedy sampling, the given seed)."""
    from dlmedit.evaluate.measure import MeasureSettings

    sampler_options = {"sampler": sampler, "remasking": remasking, "alg": alg, "steps": steps,
                       "block_length": block_length, "temperature": 0.0, "seed": seed}
    score_options: dict[str, Any] = {"order": order, "seed": seed}
    if estimator == "mc_elbo":
        score_options["mc_samples"] = mc_samples
    return MeasureSettings(estimator=estimator, score_options=score_options, generation=generation,
                           sampler=sampler_options, gen_window=gen_window, fluency=fluency,
                           fluency_tokens=fluency_tokens, batch_size=batch_size)


def evaluate_dataset(
    config: EvalConfig,
    out: str | os.PathLike[str],
    lm: LanguageModel | Callable[[], LanguageModel],
    *,
    records: Sequence[EditRecord] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    console: Any = None,
) -> dict[str, Any]:
    """Load ``config.dataset`` (unless ``records`` are given), filter by length, run and return the summary.

    ``lm`` may be a callable that loads the model: it is called only after the checks
    that need no model (method name, ``out`` holding another configuration) passed, so a
    typo costs a second, not a model load.  ``config.lengths`` selects target-length
    buckets (then ``config.limit`` counts the selected records).
    """
    from dlmedit.data.loaders import load_dataset
    from dlmedit.evaluate.runner import preflight, run_evaluation
    from dlmedit.models.language_model import LanguageModel
    from dlmedit.seeding import seed_everything

    buckets = parse_lengths(config.lengths)
    if records is None:
        records = list(load_dataset(config.dataset, limit=None if buckets else config.limit,  # type: ignore[arg-type]
                                    seed=config.seed))
    elif not buckets and config.limit:
        records = list(records)[:config.limit]
    if not buckets:
        preflight(config, out, len(records), overwrite=overwrite)
    seed_everything(config.seed)
    model = lm if isinstance(lm, LanguageModel) else lm()
    if buckets:
        records = select_lengths(model, records, buckets, config.limit)
        preflight(config, out, len(records), overwrite=overwrite)
    return run_evaluation(model, records, config, out, overwrite=overwrite, progress=progress, console=console)
