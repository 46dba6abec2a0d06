"""Model-facing metric computation: score, read out and generate through the paradigm, batched.

Why this module: the pure definitions live in :mod:`dlmedit.evaluate.metrics`; what
remains is *asking the model* for the numbers they need — the mean per-token NLL of
target_new / target_true after every rewrite, paraphrase and neighbourhood prompt, the
top-1 prediction at each target readout, and a real generation of the answer.  All of
it goes through ``lm.score`` / ``lm.generate`` / ``paradigm.layout``, so autoregressive
and masked-diffusion models share every line here; nothing asks "is this an MDM?".

Batching: :func:`measure_records` collects every (prompt, target) pair of *all* given
records, de-duplicates them (neighbourhood prompts repeat across records of one
relation), and issues one ``lm.score`` call, a few chunked forward passes for the
readouts, and one ``lm.generate`` call per generation-window length.  Measuring 50
records therefore costs a handful of batched calls, not 50 × 26 small ones
(``bench/eval.py`` measures the difference).

Metrics of one record (``RecordMeasurement.metrics``; ``None`` = not defined for it):

CounterFact, from mean per-token NLLs (``lm.score``; every number is stored with the
estimator string the scorer returned — ARM ``teacher_forcing``; MDM by default
``exact`` for one-token targets and ``chain:l2r`` otherwise, or what
``MeasureSettings.estimator`` asks for, e.g. ``mc_elbo``):
    ``ES``/``EM`` rewrite prompt, ``PS``/``PM`` paraphrases, ``NS``/``NM`` neighbourhood
    (true must still beat new), defined only when the record has a ``target_true``;
    ``NLL_new`` — mean per-token NLL of target_new on the rewrite prompt (defined for
    every dataset, e.g. zsRE, which has no target_true).

Exact match by real generation (``GenEM`` rewrite prompt, ``GenPEM`` mean over
paraphrases).  ARM: greedy decoding; MDM: iterative denoising with the sampler
settings of ``MeasureSettings.sampler`` (default LLaDA low-confidence remasking, one
token per step, one block).  Two comparison modes, recorded in every row:
    ``eos`` — the model was trained to end its answer with EOS inside a fixed answer
    window (the built-in twins): generate the whole window, cut at the first EOS and
    compare the text with the target after stripping whitespace
    (:func:`~dlmedit.evaluate.metrics.exact_match`);
    ``prefix`` — no answer window is known (real pretrained ARMs, real LLaDA/Dream):
    generate ``len(target) + 2`` tokens and compare the first ``len(target)``
    generated token ids with the target's ids (the model may go on talking).

zsRE-style token accuracy (``Reliability`` rewrite prompt, ``Generalization``
paraphrases, ``Portability`` portability probes, ``LocalityGold`` locality probes
against their gold answer): top-1 at each target readout of the paradigm's
*final* target state — ARM: teacher forcing; MDM: the whole answer masked, every
token predicted at once.  ``Locality`` (EasyEdit's definition: post-edit top-1 agrees
with pre-edit top-1 on the locality answer positions) needs the pre-edit predictions
and is added by :func:`add_pre_comparison`.

Fluency (optional, off by default): ``GenEntropy`` — ROME's weighted 2/3-gram entropy of
texts generated from the record's ``generation_prompts``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dlmedit.errors import DlmeditError
from dlmedit.evaluate.metrics import (
    exact_match,
    generation_entropy,
    length_bucket,
    locality_agreement,
    magnitude,
    success,
    token_accuracy,
)

if TYPE_CHECKING:
    from dlmedit.data.records import EditRecord
    from dlmedit.models.language_model import LanguageModel

__all__ = [
    "METRICS",
    "EvalConfigError",
    "MeasureSettings",
    "RecordMeasurement",
    "add_pre_comparison",
    "answer_eos_of",
    "answer_window_of",
    "generation_plan",
    "measure_records",
    "record_identity",
    "target_length",
]

#: Every per-record metric this module can produce, in reporting order.
METRICS = (
    "ES", "EM", "PS", "PM", "NS", "NM", "NLL_new",
    "GenEM", "GenPEM",
    "Reliability", "Generalization", "Locality", "LocalityGold", "Portability",
    "GenEntropy",
)


class EvalConfigError(DlmeditError, ValueError):
    """An evaluation option is invalid (protocol, limit, window, target states...)."""


@dataclass(frozen=True)
class MeasureSettings:
    """What to measure and how.  Stored in ``run.json``; changing any field is a new run.

    ``score_options`` / ``sampler`` are passed to ``lm.score`` / ``lm.generate`` — only
    the options the model's paradigm accepts (by its signature), so one settings object
    serves ARMs and MDMs alike; the options actually used are recorded in each row.
    ``gen_window`` overrides the generation window (tokens) for every prompt.
    """

    estimator: str | None = None
    score_options: dict[str, Any] = field(default_factory=lambda: {"order": "l2r"})
    generation: bool = True
    sampler: dict[str, Any] = field(
        default_factory=lambda: {"sampler": "llada", "remasking": "low_confidence", "steps": None,
                                 "block_length": None, "temperature": 0.0, "seed": 0}
    )
    gen_window: int | None = None
    token_accuracy: bool = True
    fluency: bool = False
    fluency_tokens: int = 32
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.gen_window is not None and self.gen_window < 1:
            raise EvalConfigError(f"gen_window must be a positive number of tokens, got {self.gen_window}")
        if self.fluency_tokens < 1:
            raise EvalConfigError(f"fluency_tokens must be positive, got {self.fluency_tokens}")
        if self.batch_size < 1:
            raise EvalConfigError(f"batch_size must be positive, got {self.batch_size}")

    def describe(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator,
            "score_options": dict(self.score_options),
            "generation": self.generation,
            "sampler": dict(self.sampler),
            "gen_window": self.gen_window,
            "token_accuracy": self.token_accuracy,
            "fluency": self.fluency,
            "fluency_tokens": self.fluency_tokens,
        }


@dataclass
class RecordMeasurement:
    """The metrics of one record in one model state, plus the evidence behind them.

    ``scores``: per probe kind, a list of ``{"prompt", "nll_new", "nll_true",
    "estimator_new", "estimator_true"}`` (``nll_true`` None without a target_true).
    ``generation``: mode, window and per-prompt generated text / match.
    ``predictions``: top-1 token ids per probe kind (for Locality against pre-edit).
    ``scoring``: the estimator asked for and the scorer options actually passed.
    """

    metrics: dict[str, float | None]
    scores: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    predictions: dict[str, list[list[int]]] = field(default_factory=dict)
    scoring: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "scores": self.scores, "scoring": self.scoring,
                "generation": self.generation, "predictions": self.predictions}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecordMeasurement:
        return cls(dict(data["metrics"]), data.get("scores", {}), data.get("generation", {}),
                   data.get("predictions", {}), data.get("scoring", {}))


# ----------------------------------------------------------------------------- helpers


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _accepted(fn: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` that ``fn`` names as parameters (``None`` values dropped)."""
    params = inspect.signature(fn).parameters
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in options.items() if k in named and v is not None}


def answer_window_of(lm: LanguageModel) -> int | None:
    """The fixed answer window the model was trained to fill (answer + EOS padding), if known.

    Looked up on the paradigm (``answer_window``) and in the checkpoint's config
    (``dlmedit_answer_window``, or ``dlmedit_twin["answer_window"]`` written by the twin
    trainer).  ``None`` for ordinary pretrained models.
    """
    window = getattr(lm.paradigm, "answer_window", None)
    if window:
        return int(window)
    config = getattr(lm.module, "config", None)
    value = getattr(config, "dlmedit_answer_window", None)
    if value:
        return int(value)
    twin = getattr(config, "dlmedit_twin", None)
    if isinstance(twin, dict) and twin.get("answer_window"):
        return int(twin["answer_window"])
    return None


def answer_eos_of(lm: LanguageModel) -> bool:
    """Whether the model ends its answer window with EOS padding (LLaDA-SFT style, as the twins are trained).

    Only then is a generated window judged whole (text up to EOS equals the target).  A
    model with a default window but no such training — ``smollm2-dream``, adapted from an
    ARM, writes on after the answer (" Manila.\n\nThe capital …") — is judged by its
    first tokens, as an ARM is.  Read from the paradigm (``answer_eos``), else the
    checkpoint's config (``dlmedit_answer_eos``; twins: ``dlmedit_twin``), else from
    whether a window is known at all (``dlmedit_answer_window`` written by hand).
    """
    if answer_window_of(lm) is None:
        return False
    flag = getattr(lm.paradigm, "answer_eos", None)
    if flag:
        return True
    config = getattr(lm.module, "config", None)
    value = getattr(config, "dlmedit_answer_eos", None)
    if value is not None:
        return bool(value)
    if isinstance(getattr(config, "dlmedit_twin", None), dict):
        return True
    return flag is None  # a paradigm that does not say (an ARM): a configured window means an EOS-padded one


def target_length(lm: LanguageModel, record: EditRecord) -> int:
    """Length in tokens of target_new after the rewrite prompt (the by-length reporting unit)."""
    req = record.request
    return len(lm.encode_target(req.prompt, req.target_new))


def generation_plan(lm: LanguageModel, n_target_tokens: int, settings: MeasureSettings) -> tuple[str, int]:
    """(comparison mode, window in tokens) for generating a target of ``n_target_tokens``."""
    window = answer_window_of(lm)
    if window is not None:
        mode, length = ("eos" if answer_eos_of(lm) else "prefix"), max(window, n_target_tokens + 1)
    else:
        mode, length = "prefix", n_target_tokens + 2
    if settings.gen_window is not None:
        length = settings.gen_window
    return mode, length


# ----------------------------------------------------------------------------- batched primitives


def _score_pairs(
    lm: LanguageModel, pairs: Sequence[tuple[str, str]], settings: MeasureSettings
) -> tuple[dict[tuple[str, str], tuple[float, str]], dict[str, Any]]:
    """Mean NLL and estimator of each distinct (prompt, target), in one ``lm.score`` call."""
    unique = list(dict.fromkeys(pairs))
    options = _accepted(lm.paradigm.score, {**settings.score_options, "batch_size": settings.batch_size})
    if not unique:
        return {}, options
    results = lm.score([p for p, _ in unique], [t for _, t in unique], estimator=settings.estimator, **options)
    return {pair: (r.mean_nll, r.estimator) for pair, r in zip(unique, results, strict=True)}, options


@torch.no_grad()
def _readout_argmax(
    lm: LanguageModel, pairs: Sequence[tuple[str, str]], batch_size: int
) -> dict[tuple[str, str], tuple[list[int], list[int]]]:
    """Top-1 prediction at each target readout of the paradigm's final state: (predicted, gold) ids."""
    unique = list(dict.fromkeys(pairs))
    out: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    paradigm = lm.paradigm
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        states = [paradigm.final_state(*lm.encode_pair(p, t)) for p, t in chunk]
        batch = paradigm.layout(lm, states).to(lm.device)
        logits = lm.logits(batch.input_ids, batch.attention_mask)
        rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)
        predicted = logits[rows, batch.readout.clamp(min=0)].argmax(-1).cpu()
        for b, (pair, state) in enumerate(zip(chunk, states, strict=True)):
            n = len(state.target_ids)
            out[pair] = (predicted[b, :n].tolist(), list(state.target_ids))
    return out


def _generate(
    lm: LanguageModel,
    jobs: Sequence[tuple[str, int]],
    settings: MeasureSettings,
) -> tuple[dict[tuple[str, int], tuple[str, list[int]]], dict[int, dict[str, Any]]]:
    """Generate every distinct (prompt, window) — one batched call per window length and chunk.

    Returns the texts / token ids and, per window, the settings the generator reported.
    """
    unique = list(dict.fromkeys(jobs))
    by_window: dict[int, list[str]] = {}
    for prompt, window in unique:
        by_window.setdefault(window, []).append(prompt)
    options = _accepted(lm.paradigm.generate, dict(settings.sampler))
    out: dict[tuple[str, int], tuple[str, list[int]]] = {}
    used: dict[int, dict[str, Any]] = {}
    for window, prompts in sorted(by_window.items()):
        for start in range(0, len(prompts), settings.batch_size):
            chunk = prompts[start : start + settings.batch_size]
            result = lm.generate(chunk, window, **options)
            used[window] = dict(result.settings)
            for prompt, text, ids in zip(chunk, result.texts, result.token_ids, strict=True):
                out[(prompt, window)] = (text, list(ids))
    return out, used


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


# ----------------------------------------------------------------------------- records


def measure_records(
    lm: LanguageModel,
    records: Sequence[EditRecord],
    settings: MeasureSettings | None = None,
) -> list[RecordMeasurement]:
    """Measure every metric of every record in the model's current state, in few batched calls."""
    settings = settings or MeasureSettings()
    if not records:
        return []
    score_pairs: list[tuple[str, str]] = []
    acc_pairs: list[tuple[str, str]] = []
    gen_jobs: list[tuple[str, int]] = []
    plans = []
    for record in records:
        req = record.request
        prompt = req.prompt
        probes = [("rewrite", prompt)] + [("paraphrase", p) for p in record.paraphrase_prompts]
        for _, p in probes:
            score_pairs.append((p, req.target_new))
            if req.target_true is not None:
                score_pairs.append((p, req.target_true))
        if req.target_true is not None:
            for probe in record.neighborhood:
                score_pairs += [(probe.prompt, req.target_new), (probe.prompt, probe.answer)]
        if settings.token_accuracy:
            acc_pairs += [(p, req.target_new) for _, p in probes]
            acc_pairs += [(q.prompt, q.answer) for q in record.locality + record.portability]
        target_ids = lm.encode_target(prompt, req.target_new)
        plan = generation_plan(lm, len(target_ids), settings)
        para_plans = [generation_plan(lm, len(lm.encode_target(p, req.target_new)), settings)
                      for p in record.paraphrase_prompts]
        plans.append((plan, para_plans))
        if settings.generation:
            gen_jobs.append((prompt, plan[1]))
            gen_jobs += [(p, pp[1]) for p, pp in zip(record.paraphrase_prompts, para_plans, strict=True)]
        if settings.fluency:
            gen_jobs += [(p, settings.fluency_tokens) for p in record.generation_prompts]

    scores, score_options = _score_pairs(lm, score_pairs, settings)
    readouts = _readout_argmax(lm, acc_pairs, settings.batch_size) if acc_pairs else {}
    generated, gen_settings = _generate(lm, gen_jobs, settings) if gen_jobs else ({}, {})

    out = []
    for record, (plan, para_plans) in zip(records, plans, strict=True):
        out.append(_assemble(lm, record, settings, scores, score_options, readouts, generated, gen_settings,
                             plan, para_plans))
    return out


def _assemble(
    lm: LanguageModel,
    record: EditRecord,
    settings: MeasureSettings,
    scores: dict[tuple[str, str], tuple[float, str]],
    score_options: dict[str, Any],
    readouts: dict[tuple[str, str], tuple[list[int], list[int]]],
    generated: dict[tuple[str, int], tuple[str, list[int]]],
    gen_settings: dict[int, dict[str, Any]],
    plan: tuple[str, int],
    para_plans: list[tuple[str, int]],
) -> RecordMeasurement:
    req = record.request
    has_true = req.target_true is not None
    metrics: dict[str, float | None] = dict.fromkeys(METRICS)
    details: dict[str, list[dict[str, Any]]] = {}

    def probe_scores(kind: str, prompts: Sequence[str], true_targets: Sequence[str | None]) -> tuple[list, list]:
        rows, new, true = [], [], []
        for p, t in zip(prompts, true_targets, strict=True):
            nll_new, est_new = scores[(p, req.target_new)]
            nll_true, est_true = scores[(p, t)] if t is not None else (None, None)
            rows.append({"prompt": p, "nll_new": nll_new, "nll_true": nll_true,
                         "estimator_new": est_new, "estimator_true": est_true})
            new.append(nll_new)
            true.append(nll_true)
        details[kind] = rows
        return new, true

    rw_new, rw_true = probe_scores("rewrite", [req.prompt], [req.target_true])
    metrics["NLL_new"] = rw_new[0]
    pp_new, pp_true = probe_scores("paraphrase", list(record.paraphrase_prompts),
                                   [req.target_true] * len(record.paraphrase_prompts))
    if has_true:
        nb = record.neighborhood
        nb_new, nb_true = probe_scores("neighborhood", [q.prompt for q in nb], [q.answer for q in nb])
        metrics["ES"] = _nan_to_none(success(rw_new, rw_true))
        metrics["EM"] = _nan_to_none(magnitude(rw_new, rw_true))
        metrics["PS"] = _nan_to_none(success(pp_new, pp_true))
        metrics["PM"] = _nan_to_none(magnitude(pp_new, pp_true))
        metrics["NS"] = _nan_to_none(success(nb_new, nb_true, neighborhood=True))
        metrics["NM"] = _nan_to_none(magnitude(nb_new, nb_true, neighborhood=True))

    predictions: dict[str, list[list[int]]] = {}
    if settings.token_accuracy:
        def accuracies(kind: str, pairs: Sequence[tuple[str, str]]) -> list[float]:
            preds = [readouts[pair] for pair in pairs]
            predictions[kind] = [p for p, _ in preds]
            return [token_accuracy(p, g) for p, g in preds]

        metrics["Reliability"] = _mean(accuracies("rewrite", [(req.prompt, req.target_new)]))
        metrics["Generalization"] = _mean(
            accuracies("paraphrase", [(p, req.target_new) for p in record.paraphrase_prompts]))
        metrics["LocalityGold"] = _mean(accuracies("locality", [(q.prompt, q.answer) for q in record.locality]))
        metrics["Portability"] = _mean(accuracies("portability", [(q.prompt, q.answer) for q in record.portability]))

    generation: dict[str, Any] = {}
    if settings.generation:
        def judge(prompt: str, mode: str, window: int) -> dict[str, Any]:
            text, ids = generated[(prompt, window)]
            if mode == "eos":
                match = exact_match(text, req.target_new)
            else:
                gold = lm.encode_target(prompt, req.target_new)
                match = float(ids[: len(gold)] == gold)
            return {"prompt": prompt, "text": text, "match": match}

        rewrite = judge(req.prompt, *plan)
        paraphrases = [judge(p, *pp) for p, pp in zip(record.paraphrase_prompts, para_plans, strict=True)]
        metrics["GenEM"] = rewrite["match"]
        metrics["GenPEM"] = _mean([g["match"] for g in paraphrases])
        generation = {"mode": plan[0], "window": plan[1], "settings": gen_settings.get(plan[1], {}),
                      "rewrite": rewrite, "paraphrase": paraphrases}
    if settings.fluency and record.generation_prompts:
        texts = [generated[(p, settings.fluency_tokens)][0] for p in record.generation_prompts]
        metrics["GenEntropy"] = generation_entropy(texts)
        generation["fluency_texts"] = texts
    scoring = {"estimator_requested": settings.estimator, "options": score_options}
    return RecordMeasurement(metrics, details, generation, predictions, scoring)


def add_pre_comparison(post: RecordMeasurement, pre: RecordMeasurement) -> RecordMeasurement:
    """Fill the metrics that compare with the pre-edit model: ``Locality`` (EasyEdit agreement)."""
    post_loc = post.predictions.get("locality") or []
    pre_loc = pre.predictions.get("locality") or []
    if post_loc and len(post_loc) == len(pre_loc):
        post.metrics["Locality"] = _mean([locality_agreement(a, b) for a, b in zip(post_loc, pre_loc, strict=True)])
    return post


def record_identity(lm: LanguageModel, record: EditRecord) -> dict[str, Any]:
    """The descriptive fields every result row carries (ids, strings, target length and bucket)."""
    req = record.request
    n = target_length(lm, record)
    return {
        "case_id": req.case_id,
        "source": record.source,
        "subject": req.subject,
        "relation_id": req.relation_id,
        "prompt": req.prompt,
        "target_new": req.target_new,
        "target_true": req.target_true,
        "n_tokens": n,
        "bucket": length_bucket(n),
    }
