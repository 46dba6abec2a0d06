"""The study's measurements, one registered stage each (see `dlmedit.study.runner`).

Every stage returns plain JSON numbers; plots go to its stage folder.  Stages call
the public layers (trace, edit, evaluate, memory, unlearn) exactly as a user would,
so the study doubles as an end-to-end check of the toolkit.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from dlmedit.study.runner import StageContext, stage

LENGTH_BUCKETS = ("1", "2", "3", "4+")


# ----------------------------------------------------------------------------- helpers
def load_cached(ctx: StageContext, name: str) -> Any:
    """Load each model once per study process (editors always revert their weights)."""
    from dlmedit import load_model

    key = f"model:{name}"
    if key not in ctx.cache:
        ctx.cache[key] = load_model(name)
    return ctx.cache[key]


def world_records(ctx: StageContext) -> list[Any]:
    from dlmedit.data.loaders import load_dataset

    if "world_records" not in ctx.cache:
        ctx.cache["world_records"] = load_dataset("world")
    return ctx.cache["world_records"]


def bucket_of(lm: Any, record: Any) -> str:
    n = len(lm.encode_target(record.request.prompt, record.request.target_new))
    return str(n) if n < 4 else "4+"


def sample_records(ctx: StageContext, lm: Any, n: int, stratify: bool = True, salt: str = "") -> list[Any]:
    """``n`` world records drawn with the study seed, equally from each target-length bucket when ``stratify``."""
    records = list(world_records(ctx))
    rng = random.Random(f"{ctx.seed}:{salt}")
    rng.shuffle(records)
    if not stratify:
        return records[:n]
    per = max(1, math.ceil(n / len(LENGTH_BUCKETS)))
    chosen: dict[str, list[Any]] = {b: [] for b in LENGTH_BUCKETS}
    for record in records:
        b = bucket_of(lm, record)
        if len(chosen[b]) < per:
            chosen[b].append(record)
        if all(len(v) >= per for v in chosen.values()):
            break
    return [r for b in LENGTH_BUCKETS for r in chosen[b]]


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def summary_means(summary: dict[str, Any], state: str = "post") -> dict[str, Any]:
    """Flatten an evaluation summary to {metric: {bucket: mean, ..., "all": mean, "ci": [lo, hi]}}."""
    out: dict[str, Any] = {}
    for metric, entry in summary.get("metrics", {}).get(state, {}).items():
        out[metric] = {group: _finite(v["mean"]) for group, v in entry.items()}
        out[metric]["ci"] = [_finite(entry["all"]["low"]), _finite(entry["all"]["high"])]
    score = summary.get("Score", {}).get(state)
    if score:
        out["Score"] = {k: _finite(v) for k, v in score.items()}
    return out


#: metrics whose per-record values a cell keeps, so the summary can pool the records of every seed
#: into one interval (n = facts, not seeds)
VALUE_METRICS = ("ES", "PS", "NS", "GenEM")


def record_values(run_dir: Any, protocol: str, state: str = "post",
                  metrics: tuple[str, ...] = VALUE_METRICS) -> dict[str, dict[str, list[float]]]:
    """Per-record values of ``metrics`` in an evaluation folder, by target-length bucket and "all"."""
    from dlmedit.evaluate.runner import RESULTS_FILE, ResultsLog

    rows = [r for r in ResultsLog(run_dir / RESULTS_FILE).read()
            if r.get("kind") == "record" and r.get("protocol") == protocol]
    rows.sort(key=lambda r: str(r.get("case_id")))
    out: dict[str, dict[str, list[float]]] = {}
    for metric in metrics:
        groups: dict[str, list[float]] = {}
        for row in rows:
            v = _finite((row.get(state) or {}).get(metric))
            if v is None:
                continue
            n = int(row["n_tokens"])
            groups.setdefault("all", []).append(v)
            groups.setdefault(str(n) if n < 4 else "4+", []).append(v)
        if groups:
            out[metric] = groups
    return out


def per_fact_ci(values: list[float], unit: str, seed: int) -> dict[str, Any]:
    """Mean, 95 % bootstrap interval and n of per-fact values, plus the values (pooled over seeds in the summary)."""
    from dlmedit.evaluate.stats import pooled_ci

    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return {**pooled_ci([vals], unit=unit, seed=seed), "values": vals}


def evaluate_method(ctx: StageContext, lm: Any, records: list[Any], method: str, protocol: str, tag: str,
                    target_states: str = "final", dataset: str = "world", every: int | None = None,
                    **hparams: Any) -> dict[str, Any]:
    """One resumable `run_evaluation` under the stage folder; returns flattened post-edit means.

    ``dataset`` is the label recorded in the run's identity (``run_evaluation`` refuses
    to resume a folder written for another label), e.g. ``"world"`` or a capitals spec.
    ``every`` (sequential protocol only): re-measure the earlier edits after every ``every`` edits
    (None: the evaluation's default, ten points).
    """
    from dlmedit.evaluate.runner import EvalConfig, run_evaluation

    config = EvalConfig(model=ctx.model, method=method, dataset=dataset, protocol=protocol,
                        target_states=target_states, hparams=hparams, seed=ctx.seed, every=every)
    out = ctx.out_dir / f"{ctx.model.replace(':', '_')}__seed{ctx.seed}" / tag
    summary = run_evaluation(lm, records, config, out)
    result = summary_means(summary, "post")
    result["pre"] = summary_means(summary, "pre")
    result["timing"] = summary.get("timing", summary.get("timings"))
    result["values"] = record_values(out, protocol)
    return result


# ----------------------------------------------------------------------------- 1. where facts live
@stage("trace")
def trace_stage(ctx: StageContext) -> dict[str, Any]:
    """Averaged causal traces (resid / MLP / attn) and, where the paradigm has intermediate states, temporal traces."""
    from dlmedit.trace import TraceConfig, average_traces, trace_facts
    from dlmedit.trace.plots import plot_average
    from dlmedit.trace.results import average_to_json

    lm = load_cached(ctx, ctx.model)
    records = sample_records(ctx, lm, ctx.config.n_trace_facts, stratify=False, salt="trace")
    facts = [(r.request.prompt, r.request.subject, r.request.target_true) for r in records]
    traces, failures = trace_facts(lm, facts, TraceConfig(seed=ctx.seed, samples=5 if ctx.config.quick else 10))
    correct = [t for t in traces if t.correct]
    avg = average_traces(correct or traces)
    tag = f"{ctx.model.replace(':', '_')}__seed{ctx.seed}"
    peak_values = trace_peak_values(correct or traces, avg.get("peak") or {}, ctx.seed)
    plot_average(avg, ctx.out_dir / f"{tag}_average.png", title=f"{ctx.model}:")
    result: dict[str, Any] = {
        "n_facts": len(traces), "n_correct": len(correct), "n_failed": len(failures),
        "clean": avg.get("clean"), "corrupted": avg.get("corrupted"), "peak": avg.get("peak"),
        "peak_effect": peak_values,
        "effect": average_to_json({"e": avg.get("effect", {})})["e"],
        "plot": f"{tag}_average.png",
    }
    if lm.paradigm.has_intermediate_states:
        n_temporal = max(2, len(facts) // 4)
        temporal, _ = trace_facts(lm, facts[:n_temporal], TraceConfig(seed=ctx.seed, temporal=True,
                                                                    samples=5 if ctx.config.quick else 10))
        tavg = average_traces([t for t in temporal if t.correct] or temporal).get("temporal")
        if tavg:
            from dlmedit.trace.plots import plot_temporal_average

            plot_temporal_average(tavg, ctx.out_dir / f"{tag}_temporal.png", title=f"{ctx.model}: temporal indirect effect")
            result["temporal"] = {"n_facts": tavg["n_facts"], "peak": tavg["peak"], "plot": f"{tag}_temporal.png",
                                  "peak_effect": temporal_peak_values([t for t in temporal if t.correct] or temporal,
                                                                      tavg["peak"], ctx.seed)}
    return result


def trace_peak_values(traces: list[Any], peaks: dict[str, Any], seed: int) -> dict[str, Any]:
    """Each fact's indirect effect at each site's averaged peak (category, layer): mean, 95 % interval, n facts."""
    from dlmedit.trace.results import CATEGORIES

    out: dict[str, Any] = {}
    per = [t.category_effects() for t in traces]
    for site, peak in peaks.items():
        if peak.get("category") not in CATEGORIES or peak.get("layer") is None or peak.get("layer") < 0:
            continue
        c, layer = CATEGORIES.index(peak["category"]), int(peak["layer"])
        out[site] = per_fact_ci([float(p[site][c, layer]) for p in per if site in p], "facts", seed)
    return out


def temporal_peak_values(traces: list[Any], peak: dict[str, Any] | None, seed: int) -> dict[str, Any] | None:
    """Each fact's temporal indirect effect at the averaged temporal peak (site, step, category, layer)."""
    from dlmedit.trace.results import CATEGORIES, by_category

    if not peak:
        return None
    c, layer = CATEGORIES.index(peak["category"]), int(peak["layer"])
    vals = []
    for tr in traces:
        for step in tr.temporal or []:
            if step.step == peak["step"]:
                vals.append(float(by_category(step.indirect_effect(peak["site"]), tr.categories)[c, layer]))
    return per_fact_ci(vals, "facts", seed)


# ----------------------------------------------------------------------------- 2. does the location transfer?
@stage("layer_sweep")
def layer_sweep_stage(ctx: StageContext) -> dict[str, Any]:
    """ROME efficacy as a function of the edited layer."""
    lm = load_cached(ctx, ctx.model)
    records = sample_records(ctx, lm, ctx.config.n_sweep_facts, salt="sweep")
    rows = []
    layers = range(0, lm.n_layers, 2) if ctx.config.quick else range(lm.n_layers)
    for layer in layers:
        means = evaluate_method(ctx, lm, records, "rome", "single", f"layer{layer}", layers=[layer])
        rows.append({"layer": layer, "ES": (means.get("ES") or {}).get("all"),
                     "GenEM": (means.get("GenEM") or {}).get("all"), "NS": (means.get("NS") or {}).get("all"),
                     "values": {m: (means["values"].get(m) or {}).get("all", []) for m in ("ES", "GenEM", "NS")}})
    return {"n_facts": len(records), "rows": rows}


# ----------------------------------------------------------------------------- 3. single vs multi-token
def _state_kinds(lm: Any) -> list[str]:
    return ["final", "partial", "trajectory"] if lm.paradigm.has_intermediate_states else ["final"]


@stage("edits")
def edits_stage(ctx: StageContext) -> dict[str, Any]:
    """ROME (single), MEMIT (batch) and AlphaEdit (sequential) by target length, per target-state choice."""
    lm = load_cached(ctx, ctx.model)
    records = sample_records(ctx, lm, ctx.config.n_edit_facts, salt="edits")
    out: dict[str, Any] = {"n_facts": len(records), "runs": {}}
    plan = [("rome", "single"), ("memit", "batch"), ("alphaedit", "sequential")]
    for method, protocol in plan:
        for states in _state_kinds(lm):
            if ctx.config.quick and (states == "trajectory" or (method != "rome" and states != "final")):
                continue
            # the study reports the metrics after the last sequential edit, not the curve: quick skips the
            # intermediate curve points (each re-measures every earlier edit)
            every = len(records) if ctx.config.quick and protocol == "sequential" else None
            out["runs"][f"{method}/{states}"] = evaluate_method(
                ctx, lm, records, method, protocol, f"{method}_{states}", target_states=states, every=every)
    return out


@stage("diagnosis")
def diagnosis_stage(ctx: StageContext) -> dict[str, Any]:
    """P(still-masked new-target tokens) along the edited model's own denoising path and at random partial states.

    For each edit fitted on ``final`` vs corrected (``partial``/``trajectory``) states,
    apply it, walk the path the edited model takes while producing the new target
    (paradigm ``trajectory`` states: one token revealed per step, in the model's
    confidence order) and random partially-unmasked states, and record the mean
    probability of the target tokens that are still masked at each step.
    """
    from dlmedit.edit.editor import get_editor

    lm = load_cached(ctx, ctx.model)
    if not lm.paradigm.has_intermediate_states:
        return {"skipped": f"{ctx.model} ({lm.paradigm.name}) has a single target state: nothing to diagnose"}
    records = [r for r in sample_records(ctx, lm, 4 * ctx.config.n_edit_facts, salt="diag")
               if bucket_of(lm, r) in ("3", "4+")][: ctx.config.n_edit_facts]
    generator = torch.Generator().manual_seed(ctx.seed)
    result: dict[str, Any] = {"n_facts": len(records), "by_states": {}}
    for states in _state_kinds(lm):
        editor = get_editor("rome", lm, seed=ctx.seed, target_states=states)
        per_step: dict[int, list[float]] = {}
        partial_probs: list[float] = []
        for record in records:
            req = record.request
            delta = editor.compute([req])
            with delta.apply(lm.module):
                p_ids, t_ids = lm.encode_pair(req.prompt, req.target_new)
                path = lm.paradigm.target_states(lm, p_ids, t_ids, "trajectory")
                partial = lm.paradigm.target_states(lm, p_ids, t_ids, "partial", n=8, generator=generator)
                with torch.no_grad():
                    for step, lp in enumerate(_mean_masked_prob(lm, path)):
                        per_step.setdefault(step, []).append(lp)
                    partial_probs.extend(_mean_masked_prob(lm, partial))
        result["by_states"][states] = {
            "trajectory_step_prob": [float(np.mean(per_step[s])) for s in sorted(per_step)],
            "trajectory_step_n": [len(per_step[s]) for s in sorted(per_step)],
            "trajectory_step_values": [per_step[s] for s in sorted(per_step)],
            "partial_prob": float(np.mean(partial_probs)) if partial_probs else None,
        }
    return result


def _mean_masked_prob(lm: Any, states: list[Any]) -> list[float]:
    """Mean probability of each state's scored (still-masked) target tokens."""
    batch = lm.paradigm.layout(lm, states).to(lm.device)
    logprobs = batch.target_logprobs(lm.logits(batch.input_ids, batch.attention_mask))
    probs = torch.where(batch.scored, logprobs.exp(), torch.zeros_like(logprobs))
    return (probs.sum(1) / batch.scored.sum(1).clamp(min=1)).tolist()


# ----------------------------------------------------------------------------- options
def stage_options(ctx: StageContext, name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The stage's knobs: its preset defaults updated with ``config.options[name]`` (unknown keys refused).

    Options are part of the study configuration (and so of its digest): a resumed study
    cannot silently mix cells run with different knobs.
    """
    given = ctx.config.options.get(name) or {}
    if not isinstance(given, dict):
        raise ValueError(f"study option {name!r} must be a mapping of knobs, got {type(given).__name__}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {name} option(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


# ----------------------------------------------------------------------------- 4. edit memory vs unlearning baselines
WORLD_FORGET_SPLITS = ("forget01", "forget05", "forget10")
UNLEARN_KEYS = ("forget_lp", "retain_lp", "utility_lp", "model_utility", "forget_lp_drop", "d_retain_lp",
                "d_utility_lp", "d_model_utility", "d_forget_para_lp", "d_forget_icl_lp")
UNLEARN_LEVELS = ("forget_lp", "retain_lp", "utility_lp", "model_utility")


def unlearning_defaults(quick: bool) -> dict[str, Any]:
    """Preset knobs of the unlearning stage (the training recipe is the unlearn CLI's: 5 epochs, lr 1e-4, batch 16).

    Quick keeps every part cheap: few training steps, few retain rows, a short
    sequential curve and no α sweep / ablation.
    """
    from dlmedit.unlearn.experiments import METHODS

    return {
        "methods": list(METHODS),
        # memory variants with a key gate (cosine threshold); 0.85 measured selective on both twins
        "gates": [0.85],
        "n_retain": 20 if quick else 100,
        "n_background": 600,
        "epochs": 5.0,
        "max_steps": 3 if quick else None,
        "lr": 1e-4,
        "batch_size": 16,
        "alphas": [] if quick else [0.25, 0.5, 1.0, 2.0, 4.0],
        "sequential": 4 if quick else 50,
        "eval_every": 2 if quick else 5,
        "ablation_draws": 0 if quick else 3,
        "trace_coordinate": False,
    }


def forget_sets(ctx: StageContext, n_subjects: int, n_retain: int) -> tuple[Any, str]:
    """Forget / retain / utility sets with ``n_subjects`` forget subjects sampled with the study seed.

    The smallest world forget split holding enough subjects is loaded (retain rows of
    all its subjects are excluded, as the unlearn CLI does), then its subjects are
    sampled, so each seed forgets a different set.
    """
    from dlmedit.data.loaders import load_dataset
    from dlmedit.unlearn.evaluate import EvalSets

    if n_subjects < 1:
        raise ValueError(f"n_forget_subjects must be ≥ 1, got {n_subjects}")
    subjects: list[str] = []
    for split in WORLD_FORGET_SPLITS:
        subjects = sorted({r.subject for r in load_dataset(f"world:{split}") if r.subject})
        if len(subjects) >= n_subjects:
            break
    else:
        raise ValueError(f"the largest world forget split has {len(subjects)} subjects; "
                         f"n_forget_subjects={n_subjects} is too many")
    sets = EvalSets.from_specs(f"world:{split}", "world:retain", "world:utility", n_retain=n_retain, seed=ctx.seed)
    chosen = sorted(random.Random(f"{ctx.seed}:unlearning").sample(subjects, n_subjects))
    forget = [it for it in sets.forget if it.subject in set(chosen)]
    info = {**sets.info, "forget": f"world:{split}", "forget_subjects": chosen}
    return EvalSets(forget, sets.retain, sets.utility, info, sets.spare), split


def _unlearn_numbers(row: dict[str, Any]) -> dict[str, Any]:
    from dlmedit.unlearn.experiments import finite_or_none

    return finite_or_none({k: row.get(k) for k in UNLEARN_KEYS})


def _per_answer(row: dict[str, Any], base: dict[str, Any], seed: int) -> dict[str, Any]:
    """Per-answer ForgetLP drop (forget set) and RetainLP change (retain set), paired with the unedited model,
    with their means, 95 % bootstrap intervals and n (answers); the values let the summary pool seeds."""
    out: dict[str, Any] = {}
    for key, split, sign in (("forget_lp_drop", "forget", -1.0), ("d_retain_lp", "retain", 1.0)):
        after, before = (row.get("per_item") or {}).get(split), (base.get("per_item") or {}).get(split)
        if after is not None and before is not None and len(after) == len(before):
            out[key] = per_fact_ci([sign * (a - b) for a, b in zip(after, before, strict=True)], "answers", seed)
    return out


@stage("unlearning")
def unlearning_stage(ctx: StageContext) -> dict[str, Any]:
    """Forget world subjects with the residual edit memory and every baseline; α sweep, sequential curve, ablation."""
    import time
    from dataclasses import asdict, replace

    from dlmedit.unlearn import experiments as ex
    from dlmedit.unlearn.baselines import TrainConfig
    from dlmedit.unlearn.evaluate import evaluate_unlearning

    opts = stage_options(ctx, "unlearning", unlearning_defaults(ctx.config.quick))
    lm = load_cached(ctx, ctx.model)
    sets, split = forget_sets(ctx, ctx.config.n_forget_subjects, opts["n_retain"])
    background = [(it.prompt, it.answer) for it in sets.spare[: opts["n_background"]]]
    tag = f"{ctx.model.replace(':', '_').replace('/', '_')}__seed{ctx.seed}"
    result: dict[str, Any] = {"split": split, "subjects": sets.info["forget_subjects"], "n_forget": len(sets.forget),
                              "n_retain": len(sets.retain), "n_utility": len(sets.utility), "plots": {}}
    settings = ex.MemorySettings(seed=ctx.seed)
    if opts["trace_coordinate"]:
        coord = ex.traced_coordinate(lm, sets.forget, seed=ctx.seed, samples=5 if ctx.config.quick else 10)
        settings = replace(settings, layer=coord["layer"], site=coord["site"], coordinate_source="trace")
        result["traced_coordinate"] = {k: coord[k] for k in ("layer", "site", "step", "effect")}
    settings = settings.resolved(lm)
    steps = max(1, math.ceil(opts["epochs"] * len(sets.forget) / opts["batch_size"]))
    if opts["max_steps"] is not None:
        steps = min(steps, int(opts["max_steps"]))
    train = TrainConfig(steps=steps, lr=opts["lr"], batch_size=opts["batch_size"], seed=ctx.seed)
    result["memory_settings"] = asdict(settings)
    result["train_config"] = asdict(train)

    base = evaluate_unlearning(lm, sets, keep_items=True)
    result["base"] = {k: v for k, v in _unlearn_numbers(base).items() if k in UNLEARN_LEVELS}
    rows: dict[str, dict[str, Any]] = {}
    result["methods"] = {}
    for method in opts["methods"]:
        ctx.log(f"unlearning · {ctx.model} · {method}")
        start = time.perf_counter()
        rows[method] = ex.run_method(lm, method, sets, base, memory=settings, train=train, background=background,
                                     eval_kwargs={"keep_items": True})
        result["methods"][method] = {**_unlearn_numbers(rows[method]), "fit_time_s": rows[method].get("fit_time_s"),
                                     "wall_time_s": time.perf_counter() - start,
                                     "per_answer": _per_answer(rows[method], base, ctx.seed)}
    for gate in opts["gates"]:  # the memory with its key gate: writes only where a stored key recurs
        name = f"memory gate {float(gate):g}"
        ctx.log(f"unlearning · {ctx.model} · {name}")
        start = time.perf_counter()
        rows[name] = ex.run_method(lm, "memory", sets, base, memory=replace(settings, gate=float(gate)), train=train,
                                   background=background, eval_kwargs={"keep_items": True})
        result["methods"][name] = {**_unlearn_numbers(rows[name]), "fit_time_s": rows[name].get("fit_time_s"),
                                   "wall_time_s": time.perf_counter() - start,
                                   "per_answer": _per_answer(rows[name], base, ctx.seed)}

    sweep_rows = []
    if opts["alphas"]:
        sweep_rows = ex.alpha_sweep(lm, sets, base, [float(a) for a in opts["alphas"]], memory=settings,
                                    background=background)
        result["alpha_sweep"] = [{"alpha": r["alpha"], **_unlearn_numbers(r)} for r in sweep_rows]
    frontier = sweep_rows or ([{**rows["memory"], "knob": "alpha", "value": settings.alpha}] if "memory" in rows else [])
    if frontier or rows:
        ex.plot_pareto(frontier, base, ctx.out_dir / f"{tag}_pareto.png",
                       others=[r for m, r in rows.items() if m != "memory"])
        result["plots"]["pareto"] = f"{tag}_pareto.png"

    n_seq = min(int(opts["sequential"]), len(sets.forget))
    if n_seq >= 1:
        seq = ex.sequential(lm, sets, n_seq, memory=settings, background=background, eval_every=int(opts["eval_every"]))
        ex.plot_sequential(seq, ctx.out_dir / f"{tag}_sequential.png")
        result["plots"]["sequential"] = f"{tag}_sequential.png"
        keys = ("n_inserted", "forget_lp_inserted", "forget_lp_inserted_base", "forget_lp_drop_inserted",
                "d_forget_lp_not_inserted", "retain_lp", "d_retain_lp", "d_utility_lp")
        result["sequential"] = ex.finite_or_none({
            "n_facts": seq["n_facts"], "eval_every": seq["eval_every"],
            "curve": [{k: c.get(k) for k in keys} for c in seq["curve"]],
            "incremental_vs_scratch_max_abs": seq["incremental_vs_scratch_max_abs"],
        })

    if int(opts["ablation_draws"]) > 0:
        abl = ex.random_coordinate_ablation(lm, sets, base, int(opts["ablation_draws"]), memory=settings,
                                            background=background, seed=ctx.seed)
        result["ablation"] = [{**r["coordinate"], **_unlearn_numbers(r)} for r in abl]
    return result


# ----------------------------------------------------------------------------- 5. real pretrained models
def trace_peaks(avg: dict[str, Any]) -> dict[str, Any]:
    """Peak (layer, token category, effect) of each site's averaged trace, plus the MLP's at the last subject token."""
    from dlmedit.trace.results import CATEGORIES

    out: dict[str, Any] = {"peak": {site: {"layer": p.get("layer"), "category": p.get("category"),
                                           "effect": _finite(p.get("effect"))}
                                    for site, p in (avg.get("peak") or {}).items()}}
    mlp = avg.get("effect", {}).get("mlp_out")
    if mlp is not None:
        row = np.asarray(mlp, dtype=float)[CATEGORIES.index("last subject token")]
        if np.isfinite(row).any():
            layer = int(np.nanargmax(row))
            out["mlp_last_subject"] = {"layer": layer, "effect": float(row[layer])}
    return out


@stage("real_model")
def real_model_stage(ctx: StageContext) -> dict[str, Any]:
    """Real models (e.g. the SmolLM2 ARM / MDM pair) on known country facts: tracing, single- vs multi-token
    ROME / MEMIT edits over target states, edit memory vs GradDiff / NPO forgetting (`dlmedit.study.real_pair`)."""
    from dlmedit.study.real_pair import real_pair_stage

    return real_pair_stage(ctx)
