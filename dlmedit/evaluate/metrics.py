"""Metrics of knowledge editing and unlearning, as pure functions of numbers and strings.

Why pure: the model-facing part (scoring targets with a Paradigm, generating text) lives
elsewhere and produces per-prompt numbers; these functions turn those numbers into the
metrics papers print.  Keeping them free of models makes every definition testable on
hand-computed cases and lets results be recomputed from saved JSONL rows.

Names and definitions follow the reference implementations so numbers are comparable:

CounterFact (ROME `experiments/py/eval_utils_counterfact.py` + `summarize.py`)
    Inputs are the *mean per-token NLL* (nats) of target_new and target_true after each
    prompt; P(x) = exp(-NLL(x)) is the length-normalised probability.
    - ES  = [P(new) > P(true)] on the rewrite prompt
    - EM  = P(new) − P(true) on the rewrite prompt
    - PS / PM: the same, averaged over the record's paraphrase prompts
    - NS  = [P(true) > P(new)] averaged over the record's neighbourhood prompts (reversed)
    - NM  = P(true) − P(new) on neighbourhood prompts
    Each is computed per record (mean over that record's prompts of one kind), then
    averaged over records; Score = harmonic mean of the dataset-level ES, PS, NS.
    Ties count as failures (ROME uses strict comparisons).  Values here are fractions in
    [0, 1]; ROME's summaries print them ×100 (Score scales the same way).
    Generation entropy: ROME's weighted n-gram entropy of generated text, mean over
    (2/3 · H₂, 4/3 · H₃) in bits, then mean over texts.  Reference score: TF-IDF cosine
    between all generated texts joined and all reference texts about target_new joined.

zsRE (MEND / EasyEdit `evaluate/`)
    Token-level top-1 accuracy under teacher forcing: the fraction of target positions
    whose argmax prediction equals the gold token.  Reliability (edit prompt),
    Generalization (rephrase) and Portability use the gold target; Locality, as in
    EasyEdit, is the agreement of post-edit with pre-edit predictions on the unrelated
    prompt's answer positions.

TOFU (locuslab/tofu `aggregate_eval_stat.py`, open-unlearning `memorization.py`)
    Inputs are length-normalised NLLs (mean per answer token).
    - Truth ratio  R = mean_j P̃(perturbed_j) / P̃(paraphrased), with P̃ = exp(−mean NLL) and
      the mean over perturbed answers taken on NLLs (a geometric mean of P̃), exactly as
      the reference code: R = exp(L_para − mean_j L_pert_j).
    - Reported score on the forget set: mean min(R, 1/R) ∈ (0, 1] (1 = the model cannot
      tell true from false answers, the ideal after unlearning).  Some papers report the
      complement 1 − min(R, 1/R) as a "distance from indistinguishable"; compute it as
      1 − truth_ratio_score(..., forget=True).
    - Reported score on retain / real authors / world facts: mean max(0, 1 − R).
    - Forget quality: p-value of the two-sample KS test between the unlearned model's
      forget-set truth ratios and those of a model never trained on the forget set.
    - Model utility: harmonic mean of the nine (probability, ROUGE-L recall, truth-ratio
      score) × (retain, real authors, world facts) values.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import ks_2samp

from dlmedit.data.records import LENGTH_BUCKETS, length_bucket

__all__ = [
    "LENGTH_BUCKETS",
    "TfidfModel",
    "answer_probability",
    "counterfact_record_metrics",
    "counterfact_summary",
    "exact_match",
    "forget_quality",
    "generation_entropy",
    "harmonic_mean",
    "length_bucket",
    "locality_agreement",
    "magnitude",
    "model_utility",
    "ngram_entropy",
    "normalized_answer_probability",
    "reference_score",
    "rouge_l_recall",
    "success",
    "tfidf_similarity",
    "token_accuracy",
    "truth_ratio",
    "truth_ratio_score",
]


def _vector(values: ArrayLike, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    return arr


def _pair(nll_new: ArrayLike, nll_true: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    new, true = _vector(nll_new, "nll_new"), _vector(nll_true, "nll_true")
    if new.shape != true.shape:
        raise ValueError(f"nll_new and nll_true differ in length ({new.size} vs {true.size})")
    if np.isnan(new).any() or np.isnan(true).any():
        raise ValueError("NLL values contain NaN")
    return new, true


def harmonic_mean(values: ArrayLike) -> float:
    """Harmonic mean of non-negative values; 0 if any value is 0, NaN if any is NaN.

    A zero is absorbing on purpose: Score (ES, PS, NS) and model utility are meant to
    collapse when any component fails completely.
    """
    arr = _vector(values, "values")
    if arr.size == 0:
        raise ValueError("harmonic mean of no values")
    if np.isnan(arr).any():
        return math.nan
    if (arr < 0).any():
        raise ValueError(f"harmonic mean needs non-negative values, got {arr.tolist()}")
    if (arr == 0).any():
        return 0.0
    return float(arr.size / np.sum(1.0 / arr))


# ----------------------------------------------------------------------------- CounterFact


def success(nll_new: ArrayLike, nll_true: ArrayLike, *, neighborhood: bool = False) -> float:
    """Fraction of prompts where P(new) > P(true) (or P(true) > P(new) for neighbourhood).

    NaN when there are no prompts, so a record without paraphrases drops out of PS
    instead of counting as a failure.
    """
    new, true = _pair(nll_new, nll_true)
    if new.size == 0:
        return math.nan
    wins = (true < new) if neighborhood else (new < true)  # lower NLL = more probable
    return float(np.mean(wins))


def magnitude(nll_new: ArrayLike, nll_true: ArrayLike, *, neighborhood: bool = False) -> float:
    """Mean of P(new) − P(true) over prompts (reversed for neighbourhood); P = exp(−NLL)."""
    new, true = _pair(nll_new, nll_true)
    if new.size == 0:
        return math.nan
    diff = np.exp(-new) - np.exp(-true)
    return float(np.mean(-diff if neighborhood else diff))


def counterfact_record_metrics(
    *,
    rewrite_new: ArrayLike,
    rewrite_true: ArrayLike,
    paraphrase_new: ArrayLike = (),
    paraphrase_true: ArrayLike = (),
    neighborhood_new: ArrayLike = (),
    neighborhood_true: ArrayLike = (),
) -> dict[str, float]:
    """ES, EM, PS, PM, NS, NM of one record from per-prompt mean NLLs (NaN = no prompts)."""
    return {
        "ES": success(rewrite_new, rewrite_true),
        "EM": magnitude(rewrite_new, rewrite_true),
        "PS": success(paraphrase_new, paraphrase_true),
        "PM": magnitude(paraphrase_new, paraphrase_true),
        "NS": success(neighborhood_new, neighborhood_true, neighborhood=True),
        "NM": magnitude(neighborhood_new, neighborhood_true, neighborhood=True),
    }


_CF_KEYS = ("ES", "EM", "PS", "PM", "NS", "NM")


def counterfact_summary(records: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Average per-record metrics over records (NaNs skipped) and add Score = H(ES, PS, NS).

    A metric no record has (all NaN) is NaN, and so is Score if it needs it.
    """
    rows = list(records)
    if not rows:
        raise ValueError("no records to summarise")
    out: dict[str, float] = {}
    for key in _CF_KEYS:
        values = np.array([float(r[key]) for r in rows if key in r], dtype=np.float64)
        values = values[~np.isnan(values)]
        out[key] = float(values.mean()) if values.size else math.nan
    out["Score"] = harmonic_mean([out["ES"], out["PS"], out["NS"]])
    return out


# ----------------------------------------------------------------------------- fluency


# Words and single punctuation marks: close to nltk.word_tokenize (which ROME uses) for
# plain English; contractions split differently ("don't" -> don ' t vs do n't).
_WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]")


def _words(text: str) -> list[str]:
    return _WORD_OR_PUNCT.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's n-gram entropy of one text: mean over n of weight_n · H_n (bits).

    H_n is the entropy of the n-gram frequency distribution; a text with fewer than n
    tokens contributes H_n = 0 (as ROME's code does).  Repetitive text scores low.
    """
    if len(ns) != len(weights) or not ns:
        raise ValueError("ns and weights must be non-empty and of equal length")
    tokens = _words(text)
    parts = []
    for n, w in zip(ns, weights, strict=True):
        if n < 1:
            raise ValueError(f"n-gram order must be ≥ 1, got {n}")
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        counts = np.fromiter(grams.values(), dtype=np.float64, count=len(grams))
        if counts.size == 0:
            parts.append(0.0)
            continue
        p = counts / counts.sum()
        parts.append(w * float(-(p * np.log2(p)).sum()))
    return float(np.mean(parts))


def generation_entropy(texts: Sequence[str]) -> float:
    """Mean n-gram entropy over generated texts (ROME's `n_gram_entropy`, arithmetic mean)."""
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty sequence of strings")
    return float(np.mean([ngram_entropy(t) for t in texts]))


# sklearn TfidfVectorizer's defaults, which ROME's fitted vectoriser used.
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def _tfidf_terms(text: str) -> list[str]:
    return _TFIDF_TOKEN.findall(text.lower())


@dataclass(frozen=True)
class TfidfModel:
    """Vocabulary and inverse document frequencies fitted on a reference corpus.

    Matches sklearn's TfidfVectorizer defaults (lower-casing, tokens of ≥ 2 word chars,
    smooth idf = ln((1 + N) / (1 + df)) + 1, raw term counts, L2 normalisation), which is
    what ROME fitted on Wikipedia for its reference score.  Terms outside the vocabulary
    are ignored, as sklearn does.
    """

    vocabulary: Mapping[str, int]
    idf: np.ndarray

    @classmethod
    def fit(cls, corpus: Iterable[str]) -> TfidfModel:
        vocab: dict[str, int] = {}
        doc_ids: list[np.ndarray] = []
        n_docs = 0
        for doc in corpus:
            n_docs += 1
            ids = {vocab.setdefault(term, len(vocab)) for term in _tfidf_terms(doc)}
            doc_ids.append(np.fromiter(ids, dtype=np.int64, count=len(ids)))
        if n_docs == 0:
            raise ValueError("cannot fit TF-IDF on an empty corpus")
        if not vocab:
            raise ValueError("the TF-IDF corpus has no terms of two or more word characters")
        df = np.bincount(np.concatenate(doc_ids), minlength=len(vocab))
        idf = np.log((1.0 + n_docs) / (1.0 + df)) + 1.0
        return cls(vocabulary=vocab, idf=idf)

    def vector(self, text: str) -> dict[int, float]:
        """Sparse L2-normalised TF-IDF vector of `text` ({term index: weight})."""
        counts = Counter(self.vocabulary[t] for t in _tfidf_terms(text) if t in self.vocabulary)
        if not counts:
            return {}
        ids = np.fromiter(counts.keys(), dtype=np.int64)
        weights = np.fromiter(counts.values(), dtype=np.float64) * self.idf[ids]
        weights /= np.linalg.norm(weights)
        return dict(zip(ids.tolist(), weights.tolist(), strict=True))


def tfidf_similarity(text_a: str, text_b: str, model: TfidfModel) -> float:
    """Cosine of the TF-IDF vectors; 0 when either text has no in-vocabulary term."""
    a, b = model.vector(text_a), model.vector(text_b)
    if len(a) > len(b):
        a, b = b, a
    return float(sum(w * b.get(i, 0.0) for i, w in a.items()))


def reference_score(generated: Sequence[str], references: Sequence[str], model: TfidfModel) -> float:
    """ROME's reference score: TF-IDF cosine of all generations vs all reference texts, each joined."""
    if isinstance(generated, str) or isinstance(references, str):
        raise TypeError("generated and references must be sequences of strings, not a string")
    if not generated or not references:
        raise ValueError("reference score needs at least one generated and one reference text")
    return tfidf_similarity(" ".join(generated), " ".join(references), model)


# ----------------------------------------------------------------------------- zsRE, exact match


def token_accuracy(predicted_ids: ArrayLike, gold_ids: ArrayLike) -> float:
    """Fraction of target positions whose top-1 prediction equals the gold token.

    zsRE Reliability / Generalization / Portability of one prompt: predictions under
    teacher forcing at the target positions, gold = the target's token ids.
    """
    pred, gold = np.asarray(predicted_ids), np.asarray(gold_ids)
    if pred.ndim != 1 or gold.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got shapes {pred.shape} and {gold.shape}")
    if pred.size != gold.size:
        raise ValueError(f"predicted and gold token counts differ ({pred.size} vs {gold.size})")
    if gold.size == 0:
        raise ValueError("token accuracy of an empty target")
    return float(np.mean(pred == gold))


def locality_agreement(post_ids: ArrayLike, pre_ids: ArrayLike) -> float:
    """zsRE Locality (EasyEdit): agreement of post-edit with pre-edit top-1 predictions.

    ROME's zsRE code instead compares post-edit predictions with the gold `loc_ans`
    tokens; that variant is `token_accuracy(post_ids, gold_ids)`.
    """
    return token_accuracy(post_ids, pre_ids)


def exact_match(generated: str, target: str) -> float:
    """1.0 if the generated text equals the target after stripping surrounding whitespace.

    Only leading/trailing whitespace is normalised (decoders differ in the leading
    space of a continuation); case and punctuation count, because an edit that produces
    "paris" or "Paris." for "Paris" has not reproduced the target exactly.
    """
    if not isinstance(generated, str) or not isinstance(target, str):
        raise TypeError("exact_match compares strings")
    if not target.strip():
        raise ValueError("exact match against an empty target")
    return float(generated.strip() == target.strip())


# ----------------------------------------------------------------------------- TOFU


def truth_ratio(paraphrased_nll: ArrayLike, perturbed_nll: ArrayLike) -> np.ndarray:
    """Per-question truth ratio R = exp(L_para − mean_j L_pert_j) from length-normalised NLLs.

    `paraphrased_nll`: shape (n,); `perturbed_nll`: shape (n, k), k ≥ 1 perturbed answers.
    R < 1: the paraphrased (true) answer is more likely than the perturbed ones.
    """
    para = _vector(paraphrased_nll, "paraphrased_nll")
    pert = np.asarray(perturbed_nll, dtype=np.float64)
    if pert.ndim != 2 or pert.shape[0] != para.size or pert.shape[1] == 0:
        raise ValueError(f"perturbed_nll must have shape (n, k≥1) with n = {para.size}, got {pert.shape}")
    if para.size == 0:
        raise ValueError("truth ratio of no questions")
    return np.exp(para - pert.mean(axis=1))


def truth_ratio_score(ratios: ArrayLike, *, forget: bool) -> float:
    """TOFU's reported truth-ratio statistic: mean min(R, 1/R) on forget sets, else mean max(0, 1 − R)."""
    r = _vector(ratios, "ratios")
    if r.size == 0:
        raise ValueError("truth ratio score of no questions")
    if (r <= 0).any() or np.isnan(r).any():
        raise ValueError("truth ratios must be positive numbers")
    if forget:
        return float(np.mean(np.minimum(r, 1.0 / r)))
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def forget_quality(unlearned_ratios: ArrayLike, reference_ratios: ArrayLike) -> float:
    """KS-test p-value between forget-set truth ratios of the unlearned and a never-trained model.

    High (→ 1) = indistinguishable from a model that never saw the forget set.
    """
    a, b = _vector(unlearned_ratios, "unlearned_ratios"), _vector(reference_ratios, "reference_ratios")
    if a.size == 0 or b.size == 0:
        raise ValueError("forget quality needs truth ratios from both models")
    return float(ks_2samp(a, b).pvalue)


def answer_probability(nll: ArrayLike) -> float:
    """TOFU "Prob." on the retain / forget sets: mean of exp(−mean NLL) of the true answers."""
    arr = _vector(nll, "nll")
    if arr.size == 0:
        raise ValueError("answer probability of no answers")
    return float(np.mean(np.exp(-arr)))


def normalized_answer_probability(true_nll: ArrayLike, perturbed_nll: ArrayLike) -> float:
    """TOFU "Prob." on real authors / world facts: mean P(true) / (P(true) + Σ_j P(perturbed_j))."""
    true = _vector(true_nll, "true_nll")
    pert = np.asarray(perturbed_nll, dtype=np.float64)
    if pert.ndim != 2 or pert.shape[0] != true.size:
        raise ValueError(f"perturbed_nll must have shape (n, k) with n = {true.size}, got {pert.shape}")
    if true.size == 0:
        raise ValueError("answer probability of no answers")
    p_true = np.exp(-true)
    return float(np.mean(p_true / (p_true + np.exp(-pert).sum(axis=1))))


_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: LCS(prediction, reference) / len(reference), over lower-cased alphanumeric words.

    TOFU uses the `rouge_score` package with its Porter stemmer; this implementation does
    not stem, so inflected forms ("writes" vs "write") count as different words.
    """
    ref = _ROUGE_TOKEN.findall(reference.lower())
    pred = _ROUGE_TOKEN.findall(prediction.lower())
    if not ref:
        raise ValueError(f"ROUGE-L recall against a reference with no words: {reference!r}")
    previous = [0] * (len(ref) + 1)
    for word in pred:
        current = [0]
        for j, ref_word in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if word == ref_word else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1] / len(ref)


def model_utility(scores: Mapping[str, float] | Sequence[float]) -> float:
    """TOFU model utility: harmonic mean of the (Prob., ROUGE, truth-ratio) scores on non-forget sets.

    Pass the nine named values (or any subset you computed; the report should say which).
    """
    values = list(scores.values()) if isinstance(scores, Mapping) else list(scores)
    if not values:
        raise ValueError("model utility of no scores")
    arr = np.asarray(values, dtype=np.float64)
    if np.isnan(arr).any() or (arr < 0).any() or (arr > 1).any():
        raise ValueError(f"model-utility components must lie in [0, 1], got {values}")
    return harmonic_mean(arr)
