"""Is the adapted MDM still a language model that knows things?  Side by side with its ARM base.

Two measurements, same prompts for both models:

* **recall by real generation** of real facts (:mod:`dlmedit.data.countries`) over the
  facts the ARM gets right greedily — the MDM by LLaDA low-confidence denoising one
  token per step — in a table by relation and by object length (1, 2, 3+ tokens);
* **likelihood of held-out text**: per-token NLL of the second half of held-out
  Wikipedia summaries given the first half — the ARM by teacher forcing, the MDM by
  the chain rule (left to right, exact for that unmasking order) and by LLaDA's
  Monte-Carlo ELBO (a bound in expectation).
"""

from __future__ import annotations

import math
from typing import Any

from dlmedit.adapt.trainer import recall_by_denoising
from dlmedit.evaluate.stats import wilson_ci

__all__ = ["heldout_nll", "pair_recall"]


def _bucket(n_tokens: int) -> str:
    return "1" if n_tokens == 1 else "2" if n_tokens == 2 else "3+"


def pair_recall(arm: Any, mdm: Any, facts: list[Any]) -> dict[str, Any]:
    """Recall of ``facts`` by both models, restricted to the facts the ARM recalls; with Wilson 95 % intervals."""
    arm_hits = recall_by_denoising(arm, facts)
    known = [f for f, h in zip(facts, arm_hits, strict=True) if h]
    mdm_hits = recall_by_denoising(mdm, known) if known else []
    cells: dict[str, list[int]] = {}
    for fact, hit in zip(known, mdm_hits, strict=True):
        n = len(arm.encode_target(fact.prompt, fact.object))
        for key in ("all", f"len {_bucket(n)}", "single" if n == 1 else "multi", fact.relation,
                    f"{fact.relation} / len {_bucket(n)}"):
            cell = cells.setdefault(key, [0, 0])
            cell[0] += int(hit)
            cell[1] += 1
    table = {key: {"mdm_hits": h, "n": n, "mdm_recall": h / n, "ci95": list(wilson_ci(h, n))}
             for key, (h, n) in sorted(cells.items())}
    return {"n_candidates": len(facts), "arm_known": len(known), "table": table,
            "examples": [{"prompt": f.prompt, "object": f.object, "mdm_correct": bool(h)}
                         for f, h in list(zip(known, mdm_hits, strict=True))[:20]]}


def _split_texts(texts: list[str], n: int, words: int) -> tuple[list[str], list[str]]:
    prompts, targets = [], []
    for text in texts:
        parts = text.split()
        if len(parts) < 2 * words:
            continue
        prompts.append(" ".join(parts[:words]))
        targets.append(" ".join(parts[words : 2 * words]))
        if len(prompts) == n:
            break
    return prompts, targets


def heldout_nll(lm: Any, texts: list[str], *, n: int = 24, words: int = 12, mc_samples: int = 32,
                seed: int = 0) -> dict[str, Any]:
    """Per-token NLL (nats) of ``words`` words after the first ``words`` words of each text.

    ARM: teacher forcing.  MDM: ``chain`` (left to right) and ``mc_elbo`` estimators.
    Returns the mean per token and its 95 % interval over texts for each estimator.
    """
    prompts, targets = _split_texts(texts, n, words)
    if not prompts:
        raise ValueError(f"no held-out text has {2 * words} words")
    estimators = ["chain", "mc_elbo"] if lm.paradigm.name == "mdm" else [None]
    out: dict[str, Any] = {"n_texts": len(prompts), "words": words}
    for estimator in estimators:
        options = {"estimator": estimator} if estimator else {}
        if estimator == "mc_elbo":
            options.update(mc_samples=mc_samples, seed=seed)
        scores = lm.paradigm.score(lm, prompts, targets, **options)
        per_text = [s.mean_nll for s in scores]
        tokens = sum(len(s.token_logprobs) for s in scores)
        mean = sum(s.mean_nll * len(s.token_logprobs) for s in scores) / tokens
        sd = math.sqrt(sum((x - sum(per_text) / len(per_text)) ** 2 for x in per_text) / max(1, len(per_text) - 1))
        half = 1.96 * sd / math.sqrt(len(per_text))
        out[estimator or "teacher_forcing"] = {"nll_per_token": mean, "ci95": [mean - half, mean + half],
                                               "tokens": tokens}
    return out


def heldout_texts_for(mdm: Any, corpus: str = "wiki", seed: int = 0) -> tuple[list[str], str]:
    """Texts the adapted model never trained on: its run's held-out split when its adapter metadata says how.

    Returns (texts, description).  A model without adapter metadata gets ``corpus``'s
    texts that name no evaluated country fact (seeded order).
    """
    from dataclasses import fields

    from dlmedit.adapt.trainer import AdaptConfig, training_texts
    from dlmedit.data.countries import country_facts

    meta = getattr(mdm.module.config, "dlmedit_adapter", None) or {}
    config = meta.get("config") if isinstance(meta, dict) else None
    if isinstance(config, dict):
        known = {f.name for f in fields(AdaptConfig)}
        cfg = AdaptConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known})
        facts = country_facts(tuple(dict.fromkeys((*cfg.relations, *cfg.exclude_relations))), seed=cfg.seed)
        _, held, _ = training_texts(cfg, facts)
        return held, f"the adaptation run's held-out split of {cfg.corpus!r} ({len(held)} texts)"
    cfg = AdaptConfig(corpus=corpus, seed=seed)
    _, held, _ = training_texts(cfg, country_facts(cfg.exclude_relations, seed=seed))
    return held, f"held-out split of {corpus!r} ({len(held)} texts)"
