"""Forget / retain evaluation of an unlearned model, through ``lm.score`` (either paradigm).

Protocol (recorded in every result under ``"protocol"``):

* **ForgetLP / RetainLP / UtilityLP** — the total log-probability (nats) of each answer
  after its prompt, ``ScoreResult.total`` from ``lm.score`` (ARM: teacher forcing; MDM:
  by default ``exact`` for one-token answers and the ``chain:l2r`` chain rule otherwise,
  or the estimator asked for — the estimator strings actually returned are recorded).
  Reported as the mean over answers (``*_lp``, nats per answer) and the sum over the set
  (``*_lp_sum``); TimeROME-style papers report the latter for forget01.
* **Prob.** (``*_prob``) — TOFU's mean exp(−mean token NLL) of the answers.
* **Truth ratio** — over the questions that have perturbed answers (count in
  ``forget_truth_ratio_n``), per question R = exp(L_para − mean_j L_pert_j) from length-normalised
  NLLs (:func:`dlmedit.evaluate.metrics.truth_ratio`); reported as TOFU does:
  mean min(R, 1/R) on the forget set, mean max(0, 1 − R) on the retain set.
* **Forget quality** — KS-test p-value between the forget-set truth ratios and those of
  a reference model never trained on the forget subjects (pass ``reference_ratios``);
  ``None`` with ``forget_quality_note`` when no reference model is available.
* **Model utility** — harmonic mean of the components computed here (names listed in
  ``model_utility_components``): retain Prob., retain truth-ratio score, utility Prob.,
  plus ROUGE-L recall of generated answers on retain and utility when ``generation``.
* **Robustness** — ``forget_para_lp``: ForgetLP on held-out paraphrase prompts of the
  forgotten facts; ``forget_icl_lp``: ForgetLP when the fact is first stated in the
  prompt (in-context relearning).

Everything is batched into one ``lm.score`` call per evaluation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dlmedit.evaluate.metrics import (
    answer_probability,
    forget_quality,
    harmonic_mean,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_score,
)
from dlmedit.memory.targets import qa_prompt

if TYPE_CHECKING:
    from dlmedit.data.records import ForgetRecord
    from dlmedit.models.language_model import LanguageModel

__all__ = ["EvalSets", "QAItem", "evaluate_unlearning", "forget_truth_ratios", "items_from_records", "summary_delta"]

FORGET_QUALITY_NOTE = (
    "not computed: no reference model trained without the forget subjects was given "
    "(train one with `dlmedit world train --exclude-forget` and pass --reference)"
)


@dataclass(frozen=True)
class QAItem:
    """One question/answer fact with everything the evaluation probes need."""

    prompt: str
    answer: str
    subject: str | None = None
    relation_id: str | None = None
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()
    paraphrase_prompts: tuple[str, ...] = ()
    statement: str | None = None

    @property
    def icl_prompt(self) -> str:
        """The prompt with the fact stated first (in-context relearning probe)."""
        statement = self.statement or f"{self.prompt} {self.answer}."
        return f"{statement} {self.prompt}"


def _world_relations() -> dict[str, Any]:
    from dlmedit.data.world import RELATIONS

    return {r.relation_id: r for r in RELATIONS}


def items_from_records(records: Sequence[ForgetRecord]) -> list[QAItem]:
    """QA items from forget/retain/utility rows.

    Paraphrase prompts: the built-in world's held-out templates of the row's relation
    (never trained on); for TOFU rows the ``paraphrased_question``.  The in-context
    statement: the world relation's first training template with the answer filled in,
    else the QA prompt followed by its answer.
    """
    relations = _world_relations()
    out = []
    for r in records:
        prompt = qa_prompt(r)
        rid = r.meta.get("relation_id") if r.meta else None
        rel = relations.get(rid) if rid else None
        paraphrases: tuple[str, ...] = ()
        statement = None
        if rel is not None and r.subject:
            paraphrases = tuple(t.format(r.subject) for t in rel.heldout_templates)
            statement = f"{rel.train_templates[0].format(r.subject)} {r.answer}."
        elif r.paraphrased_question:
            paraphrases = (f"Question: {r.paraphrased_question} Answer:",)
        out.append(QAItem(prompt, r.answer, r.subject, rid, r.paraphrased_answer, tuple(r.perturbed_answers),
                          paraphrases, statement))
    return out


@dataclass
class EvalSets:
    """The item sets one evaluation scores: forget, retain (a fixed sample) and utility."""

    forget: list[QAItem]
    retain: list[QAItem]
    utility: list[QAItem]
    info: dict[str, Any] = field(default_factory=dict)
    #: retain-split rows *not* in the evaluation sample: background text for key statistics
    #: and extra facts for scaling runs, never scored as RetainLP.
    spare: list[QAItem] = field(default_factory=list)

    @classmethod
    def from_specs(
        cls,
        forget: str,
        retain: str | None = "world:retain",
        utility: str | None = "world:utility",
        *,
        n_retain: int = 100,
        seed: int = 0,
        world_seed: int = 0,
    ) -> EvalSets:
        """Load the splits (``load_dataset`` specs); the retain set is a seeded sample of ``n_retain`` rows."""
        from dlmedit.data.loaders import load_dataset

        f_rows = _forget_rows(load_dataset(forget, seed=world_seed), forget)
        r_rows = _forget_rows(load_dataset(retain, seed=world_seed), retain) if retain else []
        u_rows = _forget_rows(load_dataset(utility, seed=world_seed), utility) if utility else []
        forget_subjects = {r.subject for r in f_rows if r.subject}
        r_rows = [r for r in r_rows if r.subject not in forget_subjects]
        spare: list[ForgetRecord] = []
        if n_retain and len(r_rows) > n_retain:
            chosen = set(random.Random(seed).sample(range(len(r_rows)), n_retain))
            spare = [r for i, r in enumerate(r_rows) if i not in chosen]
            r_rows = [r for i, r in enumerate(r_rows) if i in chosen]
        return cls(items_from_records(f_rows), items_from_records(r_rows), items_from_records(u_rows),
                   {"forget": forget, "retain": retain, "utility": utility, "n_retain": len(r_rows),
                    "retain_sample_seed": seed, "world_seed": world_seed}, items_from_records(spare))


def _forget_rows(records: list, spec: str) -> list[ForgetRecord]:
    from dlmedit.data.records import ForgetRecord

    if not records:
        raise ValueError(f"dataset {spec!r} is empty")
    if not isinstance(records[0], ForgetRecord):
        raise ValueError(f"{spec!r} holds edit records, not question/answer rows; use a TOFU file or world:<split>")
    return list(records)


# ----------------------------------------------------------------------------- scoring


class _Requests:
    """Collects (prompt, target) pairs, de-duplicated, and hands back their scores."""

    def __init__(self) -> None:
        self.index: dict[tuple[str, str], int] = {}

    def add(self, prompt: str, target: str) -> int:
        return self.index.setdefault((prompt, target), len(self.index))


def _score_all(lm: LanguageModel, requests: _Requests, estimator: str | None, options: dict[str, Any]) -> tuple[
        np.ndarray, np.ndarray, list[str]]:
    pairs = list(requests.index)
    results = lm.score([p for p, _ in pairs], [t for _, t in pairs], estimator=estimator, **options)
    totals = np.array([r.total for r in results], dtype=np.float64)
    lengths = np.array([len(r.token_logprobs) for r in results], dtype=np.float64)
    return totals, lengths, [r.estimator for r in results]


def _lp_block(totals: np.ndarray, lengths: np.ndarray, idx: list[int]) -> dict[str, Any]:
    if not idx:
        return {"lp": None, "lp_sum": None, "prob": None, "n": 0}
    t, n = totals[idx], lengths[idx]
    return {"lp": float(t.mean()), "lp_sum": float(t.sum()), "prob": answer_probability(-t / n), "n": len(idx),
            "per_item": t.tolist()}


def _truth_ratios(items: Sequence[QAItem], req: _Requests) -> list[tuple[int, list[int]]] | None:
    """Score requests of the items that have perturbed answers (others are skipped; None if none has)."""
    pairs = []
    for it in items:
        if not it.perturbed_answers:
            continue
        para = it.paraphrased_answer or it.answer
        pairs.append((req.add(it.prompt, para), [req.add(it.prompt, a) for a in it.perturbed_answers]))
    return pairs or None


def _ratios(pairs: list[tuple[int, list[int]]], totals: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    nll = -totals / lengths
    return np.array([truth_ratio([nll[p]], [nll[q]])[0] for p, q in pairs], dtype=np.float64)


def forget_truth_ratios(lm: LanguageModel, items: Sequence[QAItem], *, estimator: str | None = None,
                        score_options: dict[str, Any] | None = None) -> np.ndarray:
    """Per-question truth ratios of ``items`` (for forget quality against a reference model)."""
    req = _Requests()
    pairs = _truth_ratios(items, req)
    if pairs is None:
        raise ValueError("truth ratios need perturbed answers; no item has any")
    totals, lengths, _ = _score_all(lm, req, estimator, score_options or {})
    return _ratios(pairs, totals, lengths)


def evaluate_unlearning(
    lm: LanguageModel,
    sets: EvalSets,
    *,
    estimator: str | None = None,
    score_options: dict[str, Any] | None = None,
    robustness: bool = True,
    truth_ratios: bool = True,
    reference_ratios: Sequence[float] | None = None,
    generation: bool = False,
    keep_items: bool = False,
) -> dict[str, Any]:
    """Score the model as it is now (attach memories / apply edits before calling)."""
    options = dict(score_options or {})
    req = _Requests()
    idx = {
        "forget": [req.add(it.prompt, it.answer) for it in sets.forget],
        "retain": [req.add(it.prompt, it.answer) for it in sets.retain],
        "utility": [req.add(it.prompt, it.answer) for it in sets.utility],
    }
    if robustness:
        idx["forget_para"] = [req.add(p, it.answer) for it in sets.forget for p in it.paraphrase_prompts]
        idx["forget_icl"] = [req.add(it.icl_prompt, it.answer) for it in sets.forget]
    tr_forget = _truth_ratios(sets.forget, req) if truth_ratios else None
    tr_retain = _truth_ratios(sets.retain, req) if truth_ratios and sets.retain else None
    totals, lengths, estimators = _score_all(lm, req, estimator, options)

    out: dict[str, Any] = {"protocol": {
        "lp": "total log-prob of the answer (nats) via lm.score; *_lp = mean over answers, *_lp_sum = sum",
        "estimator_requested": estimator, "score_options": options,
        "estimators_used": sorted(set(estimators)),
    }}
    per_item: dict[str, list[float]] = {}
    for name, ids in idx.items():
        block = _lp_block(totals, lengths, ids)
        items = block.pop("per_item", None)
        if items is not None:
            per_item[name] = items
        for key, value in block.items():
            out[f"{name}_{key}"] = value
    if tr_forget is not None:
        ratios = _ratios(tr_forget, totals, lengths)
        out["forget_truth_ratio"] = truth_ratio_score(ratios, forget=True)
        out["forget_truth_ratios"] = ratios.tolist()
        out["forget_truth_ratio_n"] = len(ratios)
        if reference_ratios is not None:
            out["forget_quality"] = forget_quality(ratios, np.asarray(reference_ratios, dtype=np.float64))
        else:
            out["forget_quality"], out["forget_quality_note"] = None, FORGET_QUALITY_NOTE
    if tr_retain is not None:
        out["retain_truth_ratio"] = truth_ratio_score(_ratios(tr_retain, totals, lengths), forget=False)
    if generation:
        out.update(_generation_scores(lm, sets))
    components = {}
    for key in ("retain_prob", "retain_truth_ratio", "utility_prob", "retain_rouge", "utility_rouge"):
        value = out.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            components[key] = float(value)
    out["model_utility"] = harmonic_mean(list(components.values())) if components else None
    out["model_utility_components"] = sorted(components)
    if keep_items:
        out["per_item"] = per_item
    return out


def _generation_scores(lm: LanguageModel, sets: EvalSets) -> dict[str, Any]:
    """ROUGE-L recall of generated answers (greedy / iterative denoising at the paradigm's defaults)."""
    window = getattr(lm.paradigm, "default_new_tokens", None) or 8
    out: dict[str, Any] = {}
    for name, items in (("forget", sets.forget), ("retain", sets.retain), ("utility", sets.utility)):
        if not items:
            continue
        gen = lm.generate([it.prompt for it in items], window)
        out[f"{name}_rouge"] = float(np.mean([rouge_l_recall(t, it.answer) for t, it in
                                              zip(gen.texts, items, strict=True)]))
    return out


SUMMARY_KEYS = ("forget_lp", "retain_lp", "utility_lp", "forget_para_lp", "forget_icl_lp", "forget_truth_ratio",
                "retain_truth_ratio", "model_utility", "forget_rouge", "retain_rouge", "utility_rouge")


def summary_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, float | None]:
    """``after − before`` for the headline numbers (``forget_lp_drop`` = before − after, > 0 = forgotten)."""
    out: dict[str, float | None] = {}
    for key in SUMMARY_KEYS:
        a, b = after.get(key), before.get(key)
        out[f"d_{key}"] = None if a is None or b is None else float(a) - float(b)
    fa, fb = after.get("forget_lp"), before.get("forget_lp")
    out["forget_lp_drop"] = None if fa is None or fb is None else float(fb) - float(fa)
    return out
