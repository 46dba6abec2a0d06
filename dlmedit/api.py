"""The Python API: one function per CLI command, returning what that command writes.

Why: notebooks and scripts should not shell out to ``dlmedit edit …`` and parse JSON.
Each function here calls the same library entry points as its command
(`dlmedit.trace.run`, `dlmedit.edit.editor`, `dlmedit.evaluate.session`,
`dlmedit.unlearn.session`, `dlmedit.study.session`), so a call and the command with the
same options and seed give the same numbers.

The functions are reachable as ``dlmedit.trace(...)``, ``dlmedit.edit(...)``,
``dlmedit.evaluate(...)``, ``dlmedit.unlearn(...)`` and ``dlmedit.study(...)``: those
names are the subpackages, made callable (see `dlmedit/__init__.py`), so
``import dlmedit.edit.rome`` and ``from dlmedit.edit.delta import EditDelta`` keep working.

Every ``lm`` argument takes a loaded `LanguageModel` or an alias / checkpoint path
(``"builtin:mdm"``, ``"smollm2"``, ``"path/to/checkpoint"``), which is loaded first.
Heavy imports happen inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlmedit.errors import UsageError

if TYPE_CHECKING:
    from dlmedit.data.requests import RequestsInput
    from dlmedit.edit.delta import EditDelta
    from dlmedit.models.language_model import LanguageModel
    from dlmedit.study.session import StudyOutcome
    from dlmedit.trace.facts import TraceFact
    from dlmedit.trace.run import TraceResult

__all__ = ["edit", "evaluate", "study", "trace", "unlearn"]

# keyword arguments people pass by habit (EasyEdit / CLI spellings) that are not editor hyper-parameters
_REQUEST_WORDS = {"subjects": "subject", "prompt": "prompts", "target_true": "ground_truth",
                  "targets_new": "target_new", "ground_truths": "ground_truth", "target": "target_new"}

_MEASURE_OPTIONS = {"order", "mc_samples", "sampler", "remasking", "alg", "steps", "block_length", "fluency",
                    "fluency_tokens"}


def _model(lm: LanguageModel | str | os.PathLike[str], trust_remote_code: bool = False) -> tuple[LanguageModel, str]:
    """A loaded model and the name it is recorded under (the alias/path given, else the model's own name)."""
    from dlmedit.models import LanguageModel, load_model

    if isinstance(lm, LanguageModel):
        return lm, lm.name
    if isinstance(lm, str | os.PathLike):
        return load_model(lm, trust_remote_code=trust_remote_code), os.fspath(lm)
    raise UsageError(f"lm must be a LanguageModel or an alias / checkpoint path, got {type(lm).__name__}")


def trace(
    lm: LanguageModel | str | os.PathLike[str],
    prompt: str | None = None,
    subject: str | None = None,
    target: str | None = None,
    *,
    facts: str | Sequence[TraceFact | tuple[str, str, str | None] | Mapping[str, Any]] | None = None,
    limit: int | None = None,
    sites: str | Sequence[str] = ("resid", "mlp", "attn"),
    temporal: bool = False,
    readout: str = "first",
    window: int | None = None,
    samples: int = 10,
    noise: float = 3.0,
    noise_std: float | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    plot_facts: int = 5,
    trust_remote_code: bool = False,
) -> TraceResult:
    """Causal tracing: where in the network is a fact recalled?  (``dlmedit trace``)

    Corrupts the subject's embeddings with noise, restores one (token, layer, site) at a
    time and reads how much of the answer's probability comes back (ROME's indirect
    effect), on ARMs and MDMs alike.  Trace one fact (``prompt`` containing ``subject``;
    ``target`` defaults to the model's own prediction) or a fact set (``facts``: a spec
    such as ``"world"`` / ``"counterfact:FILE"``, or a list of ``(prompt, subject,
    target)`` tuples / ``{"prompt", "subject", "target"}`` dicts; ``limit`` keeps the
    first N).  ``temporal=True`` also traces every denoising step of an MDM.

    Returns a `TraceResult`: ``.traces`` (one `FactTrace` per fact, with ``.peak(site)``
    and ``.scores``), ``.failures``, ``.mean`` and ``.document`` — the ``trace.json`` the
    command writes.  With ``out`` the document and heatmaps are written there too.

    Example::

        import dlmedit
        result = dlmedit.trace("builtin:arm", "Jumar Nylozar was born in", "Jumar Nylozar", samples=2)
        print(result.traces[0].peak("mlp"))   # {'token': ..., 'layer': ..., 'effect': ...}
    """
    from dlmedit.seeding import seed_everything
    from dlmedit.trace.facts import TraceFact, load_trace_facts, parse_trace_rows
    from dlmedit.trace.run import check_trace_options, run_trace

    check_trace_options(prompt=prompt, subject=subject, facts=facts, limit=limit, sites=sites, window=window,
                        samples=samples, noise=noise, noise_std=noise_std, readout=readout)
    seed_everything(seed)
    fact_list: list[TraceFact] | None = None
    spec: str | None = None
    if isinstance(facts, str):
        spec = facts
        fact_list = load_trace_facts(facts, limit, seed)
    elif facts is not None:
        fact_list = []
        for i, item in enumerate(facts):
            if isinstance(item, TraceFact):
                fact_list.append(item)
            elif isinstance(item, Mapping):
                fact_list.extend(parse_trace_rows([(f"record {i}", item)], "facts"))
            elif isinstance(item, tuple) and len(item) in (2, 3):
                fact_list.append(TraceFact(*item, case_id=i))
            else:
                raise UsageError(f"facts: record {i} is a {type(item).__name__}; give (prompt, subject, target) "
                                 "tuples, {prompt, subject, target} dicts, TraceFacts or a dataset spec")
        fact_list = fact_list[:limit] if limit is not None else fact_list
        spec = "python"
    model, name = _model(lm, trust_remote_code)
    result = run_trace(model, model=name, prompt=prompt, subject=subject, target=target, facts=spec,
                       fact_list=fact_list, limit=limit, sites=sites, temporal=temporal, readout=readout,
                       window=window, samples=samples, noise=noise, noise_std=noise_std, seed=seed)
    if out is not None:
        result.save(out, plot_facts)
    return result


def edit(
    lm: LanguageModel | str | os.PathLike[str],
    requests: RequestsInput | None = None,
    *,
    prompts: str | Sequence[str] | None = None,
    subject: str | Sequence[str] | None = None,
    target_new: str | Sequence[str] | None = None,
    ground_truth: str | Sequence[str] | None = None,
    method: str = "rome",
    limit: int | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    trust_remote_code: bool = False,
    **hparams: Any,
) -> EditDelta:
    """Compute a weight edit that makes the model give ``target_new``; return it unapplied.  (``dlmedit edit``)

    Why unapplied: the caller decides — ``delta.apply(model.module)`` returns a handle
    whose ``revert()`` restores the weights bit-exactly, ``with delta.apply(...):`` edits
    for a block, ``delta.save(dir)`` stores it (safetensors) for ``dlmedit apply``.

    The requests come in any of these shapes:

    * EasyEdit lists: ``prompts=[...]`` (the subject inside the prompt), ``subject=[...]``,
      ``target_new=[...]``, optional ``ground_truth=[...]`` (one string = a list of one);
    * ``requests=`` CounterFact dicts ``{"case_id", "requested_rewrite": {"prompt": "{} was
      born in", "subject", "target_new": {"str"}, "target_true": {"str"}}, …}``, flat dicts
      ``{"prompt", "subject", "target_new", "target_true"}``, `EditRequest` / `EditRecord`
      objects (or a list of any of these), or a dataset spec (``"world"``,
      ``"counterfact:FILE"``; ``limit`` keeps the first N).

    ``method`` is ``rome``, ``memit``, ``alphaedit`` or ``ft``; ``**hparams`` override the
    method's defaults (``dlmedit/configs/<method>.yaml``), e.g. ``layers=[2]``,
    ``target_states="partial"`` (the MDM correction), ``v_steps=10``.  ``out`` also saves
    the delta there.  ``progress`` receives the editor's progress messages.

    Example::

        import dlmedit
        lm = dlmedit.load_model("builtin:arm")
        delta = dlmedit.edit(lm, prompts=["Jumar Nylozar was born in"], subject=["Jumar Nylozar"],
                             target_new=["The Isle of Quen"], method="rome")
        with delta.apply(lm.module):
            print(lm.generate(["Jumar Nylozar was born in"], 6).texts[0])   # ' The Isle of Quen'
    """
    from dlmedit.data.requests import edit_records
    from dlmedit.edit.editor import editor_names, get_editor
    from dlmedit.edit.hparams import EditConfigError
    from dlmedit.seeding import seed_everything

    misspelt = sorted(set(hparams) & set(_REQUEST_WORDS))
    if misspelt:
        hints = ", ".join(f"{w} → {_REQUEST_WORDS[w]}" for w in misspelt)
        raise UsageError(f"unknown argument(s) {misspelt} (not hyper-parameters of {method}); did you mean: {hints}")
    names = [n for n in editor_names() if n != "none"]
    if method not in names:
        raise EditConfigError(f"unknown edit method {method!r}; choose one of {', '.join(names)}")
    seed_everything(seed)
    records = edit_records(requests, prompts=prompts, subject=subject, target_new=target_new,
                           ground_truth=ground_truth, limit=limit, seed=seed)
    model, _ = _model(lm, trust_remote_code)
    editor = get_editor(method, model, seed=seed, **hparams)
    delta = editor.compute([r.request for r in records], progress=progress)
    if out is not None:
        delta.save(out)
    return delta


def evaluate(
    lm: LanguageModel | str | os.PathLike[str],
    dataset: str | RequestsInput = "world",
    *,
    method: str = "rome",
    out: str | os.PathLike[str] | None = None,
    protocol: str = "single",
    limit: int | None = None,
    lengths: str | Sequence[str] | None = None,
    every: int | None = None,
    target_states: str = "final",
    hparams: Mapping[str, Any] | None = None,
    seed: int = 0,
    estimator: str | None = None,
    generation: bool = True,
    gen_window: int | None = None,
    batch_size: int = 64,
    chunk_size: int = 32,
    overwrite: bool = False,
    progress: bool = False,
    trust_remote_code: bool = False,
    **measure: Any,
) -> dict[str, Any]:
    """Edit with a method under a protocol and measure ES / PS / NS, exact match, by target length.  (``dlmedit eval``)

    Why a protocol: "ES = 0.97" means nothing without saying when it was measured —
    ``single`` (each record edited alone and measured right after, EasyEdit style),
    ``batch`` (one edit of all records, ROME/MEMIT style) or ``sequential``.
    ``dataset`` is a spec (``"world"``, ``"counterfact:FILE"``, ``"zsre:FILE"``, …) or
    request records in any shape `dlmedit.edit` accepts; ``lengths`` keeps records whose
    ``target_new`` has these token lengths (``"3,4+"``); ``method="none"`` measures the
    unedited model.  Further measurement options (``order``, ``mc_samples``, ``sampler``,
    ``remasking``, ``alg``, ``steps``, ``block_length``, ``fluency``,
    ``fluency_tokens``) are the ``dlmedit eval`` flags of the same names.

    Returns the summary (``summary.json``): means with 95 % bootstrap intervals overall
    and per length bucket.  Results go to ``out`` (resumable: ``results.jsonl``,
    ``run.json``, ``deltas/``); without ``out`` they go to a temporary folder that is
    deleted afterwards.  The model's weights are unchanged afterwards.

    Example::

        import dlmedit
        summary = dlmedit.evaluate("builtin:arm", "world", method="rome", limit=2, generation=False)
        print(summary["metrics"]["post"]["ES"]["all"])   # mean, 95 % interval and n over the 2 records
    """
    from dlmedit.data.requests import edit_records
    from dlmedit.evaluate.runner import EvalConfig
    from dlmedit.evaluate.session import evaluate_dataset, measure_settings, parse_lengths

    unknown = sorted(set(measure) - _MEASURE_OPTIONS)
    if unknown:
        raise UsageError(f"evaluate: unknown argument(s) {unknown}; measurement options are "
                         f"{', '.join(sorted(_MEASURE_OPTIONS))} (editor hyper-parameters go in hparams={{...}})")
    settings = measure_settings(estimator=estimator, generation=generation, gen_window=gen_window,
                                batch_size=batch_size, seed=seed, **measure)
    records = None
    spec = dataset if isinstance(dataset, str) else "python"
    if not isinstance(dataset, str):
        records = edit_records(dataset)
    name = lm.name if not isinstance(lm, str | os.PathLike) else os.fspath(lm)
    config = EvalConfig(model=name, method=method, dataset=spec, protocol=protocol, limit=limit, every=every,
                        target_states=target_states, hparams=dict(hparams or {}), seed=seed, measure=settings,
                        chunk_size=chunk_size, lengths=sorted(parse_lengths(lengths)) or None)

    def load() -> LanguageModel:
        return _model(lm, trust_remote_code)[0]

    if out is not None:
        return evaluate_dataset(config, out, load, records=records, overwrite=overwrite, progress=progress)
    with tempfile.TemporaryDirectory(prefix="dlmedit-eval-") as tmp:
        return evaluate_dataset(config, tmp, load, records=records, progress=progress)


def unlearn(
    lm: LanguageModel | str | os.PathLike[str],
    method: str | Sequence[str] = "memory",
    *,
    forget: str = "world:forget01",
    retain: str | None = "world:retain",
    utility: str | None = "world:utility",
    out: str | os.PathLike[str] | None = None,
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
    save_memory: str | os.PathLike[str] | None = None,
    seed: int = 0,
    world_seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Forget a split with the residual edit memory or a baseline, and measure forget / retain.  (``dlmedit unlearn``)

    Why: to compare the inference-time memory (weights frozen, ridge map at a traced
    coordinate) with training baselines on the same splits and metrics.  ``method`` is
    one or several of ``memory``, ``ga``, ``graddiff``, ``npo``, ``rmu``, ``steer``
    (a list or ``"memory,ga"``); every method is undone after it is measured, so the
    model is unchanged afterwards.  The knobs are the ``dlmedit unlearn`` flags of the
    same names (``lam`` is ``--lambda``; ``trace=True`` chooses the memory layer by
    tracing forget facts).

    Returns the ``results.json`` document: ``base`` (the unedited model's ForgetLP,
    RetainLP, …), ``methods`` (one row per method, with ``forget_lp_drop``,
    ``d_retain_lp``, …), the resolved ``memory_settings`` and ``train_config``.  With
    ``out``, ``results.json`` and ``rows.jsonl`` are written there as the command does.

    Example::

        import dlmedit
        results = dlmedit.unlearn("builtin:arm", "memory", forget="world:forget01", n_retain=20,
                                  n_background=50, utility=None)
        print(results["methods"][0]["forget_lp_drop"], results["methods"][0]["d_retain_lp"])
    """
    from dlmedit.seeding import seed_everything
    from dlmedit.unlearn.session import append_rows, check_methods, prepare_unlearning, run_unlearning, save_results

    methods = check_methods(method)
    seed_everything(seed)
    started = time.time()
    model, name = _model(lm)
    rows_path = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        rows_path = Path(out) / "rows.jsonl"
        rows_path.unlink(missing_ok=True)
    setup = prepare_unlearning(
        model, model=name, forget=forget, retain=retain, utility=utility, n_retain=n_retain, alpha=alpha, lam=lam,
        q=q, gate=gate, layer=layer, site=site, trace=trace, key_stats=key_stats, n_background=n_background,
        n_states=n_states, epochs=epochs, steps=steps, lr=lr, batch_size=batch_size, estimator=estimator,
        reference=reference, generation=generation, seed=seed, world_seed=world_seed, log=log)
    results = run_unlearning(setup, methods, save_memory=save_memory, log=log,
                             on_row=(lambda row: append_rows(rows_path, [row])) if rows_path else None)
    if out is not None:
        save_results(out, results, time.time() - started)
    return results


def study(
    out: str | os.PathLike[str],
    *,
    quick: bool = False,
    models: Sequence[str] = ("builtin:arm", "builtin:mdm"),
    seeds: int | None = None,
    seed: int = 0,
    stages: Sequence[str] | None = None,
    real_model: str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
    executor: str = "local",
    executor_options: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
) -> StudyOutcome:
    """Run (or resume) the cross-paradigm study and write its summary and report.  (``dlmedit study``)

    Why: one call reproduces the README's numbers — tracing, editing (ROME / MEMIT /
    AlphaEdit with the MDM corrections) and unlearning on the twins, several seeds — in a
    folder that resumes when re-run.  ``quick=True`` is ``dlmedit study --quick`` (small
    samples, one seed); ``stages`` picks a subset; ``seeds`` is the number of seeds
    starting at ``seed``; ``real_model`` names the real model of the real-model section
    (``None``: the preset's choice — SmolLM2 for the full study, none for ``quick``;
    ``""``: skip it); ``options`` are stage settings,
    ``{"unlearning": {"alpha": 0.5}}`` (``--option unlearning.alpha=0.5``).  The models
    are aliases or paths: each cell loads its own.  ``executor`` is ``local`` (cells one
    after another in this process) or ``ray``; ``executor_options`` are
    `dlmedit.executors.make_executor`'s (``address``, ``cpus_per_cell``, ``gpus_per_cell``).

    Returns a `StudyOutcome`: ``.summary`` (``summary.json``), ``.html`` / ``.markdown``
    (the report files), ``.failed`` (cells that failed twice; also in ``failed.json``)
    and ``.wall_time_s``.

    Example::

        import dlmedit
        outcome = dlmedit.study("runs/quick", quick=True, stages=["tracing"])
        print(outcome.html)
    """
    import shutil

    from dlmedit.executors import make_executor
    from dlmedit.seeding import seed_everything
    from dlmedit.study.runner import StudyConfig, stage_names
    from dlmedit.study.session import check_stage_options, run_study_and_report

    stage_options = check_stage_options({k: dict(v) for k, v in (options or {}).items()})
    chosen = list(stages) if stages else stage_names()
    unknown = [s for s in chosen if s not in stage_names()]
    if unknown:
        raise UsageError(f"unknown stage(s) {unknown}; known: {', '.join(stage_names())}")
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    runner = make_executor(executor, **dict(executor_options or {}))  # a wrong name fails before anything is deleted
    seed_everything(seed)
    out = Path(out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    n_seeds = seeds or (1 if quick else 3)
    config = StudyConfig.preset(quick, models=list(models), seeds=list(range(seed, seed + n_seeds)), stages=chosen)
    if real_model is not None:
        config.real_model = real_model or None
    config.options = stage_options
    return run_study_and_report(config, out, executor=runner, executor_name=executor, log=log, progress=progress)
