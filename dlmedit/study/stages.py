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


def evaluate_method(ctx: StageContext, lm: Any, records: list[Any], method: str, protocol: str, tag: str,
                    target_states: str = "final", **hparams: Any) -> dict[str, Any]:
    """One resumable `run_evaluation` under the stage folder; returns flattened post-edit means."""
    from dlmedit.evaluate.runner import EvalConfig, run_evaluation

    config = EvalConfig(model=ctx.model, method=method, dataset="world", protocol=protocol,
                        target_states=target_states, hparams=hparams, seed=ctx.seed)
    out = ctx.out_dir / f"{ctx.model.replace(':', '_')}__seed{ctx.seed}" / tag
    summary = run_evaluation(lm, records, config, out)
    result = summary_means(summary, "post")
    result["pre"] = summary_means(summary, "pre")
    result["timing"] = summary.get("timing", summary.get("timings"))
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
    plot_average(avg, ctx.out_dir / f"{tag}_average.png", title=f"{ctx.model}: mean indirect effect")
    result: dict[str, Any] = {
        "n_facts": len(traces), "n_correct": len(correct), "n_failed": len(failures),
        "clean": avg.get("clean"), "corrupted": avg.get("corrupted"), "peak": avg.get("peak"),
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
            result["temporal"] = {"n_facts": tavg["n_facts"], "peak": tavg["peak"], "plot": f"{tag}_temporal.png"}
    return result


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
                     "GenEM": (means.get("GenEM") or {}).get("all"), "NS": (means.get("NS") or {}).get("all")})
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
            out["runs"][f"{method}/{states}"] = evaluate_method(
                ctx, lm, records, method, protocol, f"{method}_{states}", target_states=states)
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
            "partial_prob": float(np.mean(partial_probs)) if partial_probs else None,
        }
    return result


def _mean_masked_prob(lm: Any, states: list[Any]) -> list[float]:
    """Mean probability of each state's scored (still-masked) target tokens."""
    batch = lm.paradigm.layout(lm, states).to(lm.device)
    logprobs = batch.target_logprobs(lm.logits(batch.input_ids, batch.attention_mask))
    probs = torch.where(batch.scored, logprobs.exp(), torch.zeros_like(logprobs))
    return (probs.sum(1) / batch.scored.sum(1).clamp(min=1)).tolist()
