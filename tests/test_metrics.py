"""Metrics and stats on hand-computed cases, including the exact 0 and exact 1 ends of each."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dlmedit.evaluate import stats
from dlmedit.evaluate.metrics import (
    TfidfModel,
    answer_probability,
    counterfact_record_metrics,
    counterfact_summary,
    exact_match,
    forget_quality,
    generation_entropy,
    harmonic_mean,
    length_bucket,
    locality_agreement,
    magnitude,
    model_utility,
    ngram_entropy,
    normalized_answer_probability,
    reference_score,
    rouge_l_recall,
    success,
    tfidf_similarity,
    token_accuracy,
    truth_ratio,
    truth_ratio_score,
)
from dlmedit.evaluate.stats import bootstrap_ci, group_by_length, summarize_by_length

e = math.exp


# ----------------------------------------------------------------------------- CounterFact


def test_success_and_magnitude_hand_computed():
    # lower NLL = more probable; ties fail (strict comparison as in ROME)
    assert success([0.5], [1.0]) == 1.0
    assert success([1.0], [1.0]) == 0.0
    assert success([0.2, 2.0], [1.0, 1.0]) == 0.5
    assert success([3.0, 3.0], [1.0, 4.0], neighborhood=True) == 0.5
    assert success([3.0, 3.0], [1.0, 2.0], neighborhood=True) == 1.0
    assert success([1.0], [3.0], neighborhood=True) == 0.0
    assert magnitude([0.5], [1.0]) == pytest.approx(e(-0.5) - e(-1.0))
    assert magnitude([3.0, 3.0], [1.0, 4.0], neighborhood=True) == pytest.approx(
        ((e(-1) - e(-3)) + (e(-4) - e(-3))) / 2
    )
    assert magnitude([2.0], [2.0]) == 0.0
    assert math.isnan(success([], []))
    with pytest.raises(ValueError, match="differ in length"):
        success([1.0, 2.0], [1.0])


def test_counterfact_record_and_summary():
    a = counterfact_record_metrics(
        rewrite_new=[0.5],
        rewrite_true=[1.0],
        paraphrase_new=[0.2, 2.0],
        paraphrase_true=[1.0, 1.0],
        neighborhood_new=[3.0, 3.0],
        neighborhood_true=[1.0, 4.0],
    )
    assert (a["ES"], a["PS"], a["NS"]) == (1.0, 0.5, 0.5)
    assert a["PM"] == pytest.approx(((e(-0.2) - e(-1)) + (e(-2) - e(-1))) / 2)
    b = counterfact_record_metrics(
        rewrite_new=[1.0],
        rewrite_true=[1.0],  # tie: fails
        neighborhood_new=[0.1, 0.1],
        neighborhood_true=[1.0, 2.0],  # both neighbours flipped
    )
    assert b["ES"] == 0.0 and b["NS"] == 0.0 and math.isnan(b["PS"])
    summary = counterfact_summary([a, b])
    assert summary["ES"] == 0.5
    assert summary["PS"] == 0.5  # record b has no paraphrases and drops out
    assert summary["NS"] == 0.25
    # per-record mean first, then mean over records
    assert summary["NM"] == pytest.approx((a["NM"] + b["NM"]) / 2)
    assert summary["Score"] == pytest.approx(3 / (1 / 0.5 + 1 / 0.5 + 1 / 0.25))


def test_counterfact_score_exact_ends():
    perfect = counterfact_record_metrics(
        rewrite_new=[0.1],
        rewrite_true=[2.0],
        paraphrase_new=[0.1],
        paraphrase_true=[2.0],
        neighborhood_new=[2.0],
        neighborhood_true=[0.1],
    )
    assert counterfact_summary([perfect])["Score"] == 1.0
    broken = counterfact_record_metrics(
        rewrite_new=[0.1],
        rewrite_true=[2.0],
        paraphrase_new=[0.1],
        paraphrase_true=[2.0],
        neighborhood_new=[0.1],
        neighborhood_true=[2.0],
    )
    assert counterfact_summary([broken])["Score"] == 0.0  # NS = 0 collapses the harmonic mean
    with pytest.raises(ValueError, match="no records"):
        counterfact_summary([])


def test_harmonic_mean():
    assert harmonic_mean([1.0, 1.0, 1.0]) == 1.0
    assert harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.0, 1.0]) == 0.0
    assert math.isnan(harmonic_mean([math.nan, 1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean([-1.0, 1.0])


# ----------------------------------------------------------------------------- fluency


def test_ngram_entropy_hand_computed():
    assert ngram_entropy("the the the the the") == 0.0  # one repeated bigram and trigram
    assert ngram_entropy("a b c") == pytest.approx(1 / 3)  # H2 = 1 bit ×2/3, H3 = 0; mean
    assert ngram_entropy("a b c d") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("a b", ns=(1,), weights=(1.0,)) == 1.0
    assert ngram_entropy("word") == 0.0  # shorter than every n
    # punctuation marks are tokens
    assert ngram_entropy("a , a .", ns=(1,), weights=(1.0,)) == pytest.approx(1.5)
    assert generation_entropy(["a b c", "x x x x"]) == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        generation_entropy("a b c")


def test_tfidf_reference_score():
    model = TfidfModel.fit(["paris france", "rome italy", "paris rome"])
    idf_paris, idf_france = math.log(4 / 3) + 1, math.log(4 / 2) + 1
    assert model.idf[model.vocabulary["paris"]] == pytest.approx(idf_paris)
    assert model.idf[model.vocabulary["france"]] == pytest.approx(idf_france)
    expected = idf_paris / math.hypot(idf_paris, idf_france)
    assert tfidf_similarity("Paris", "paris France", model) == pytest.approx(expected)
    assert tfidf_similarity("rome italy", "Rome, Italy!", model) == pytest.approx(1.0, abs=1e-12)
    assert tfidf_similarity("france", "italy", model) == 0.0
    assert tfidf_similarity("unknown words", "paris", model) == 0.0  # out of vocabulary
    assert reference_score(["paris", "france"], ["paris france"], model) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(TypeError):
        reference_score("paris", ["paris"], model)
    with pytest.raises(ValueError, match="empty corpus"):
        TfidfModel.fit([])


# ----------------------------------------------------------------------------- zsRE, exact match, buckets


def test_token_accuracy_and_locality():
    assert token_accuracy([1, 2, 3], [1, 5, 3]) == pytest.approx(2 / 3)
    assert token_accuracy(np.array([7, 8]), [7, 8]) == 1.0
    assert token_accuracy([1, 2], [3, 4]) == 0.0
    assert locality_agreement([4, 4, 9], [4, 4, 9]) == 1.0
    assert locality_agreement([4, 5], [6, 7]) == 0.0
    with pytest.raises(ValueError, match="differ"):
        token_accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        token_accuracy([], [])


def test_exact_match_normalisation():
    assert exact_match(" Paris\n", "Paris") == 1.0
    assert exact_match("Toyota City", " Toyota City ") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert exact_match("Paris.", "Paris") == 0.0
    with pytest.raises(ValueError, match="empty target"):
        exact_match("x", " ")


def test_length_bucket():
    assert [length_bucket(n) for n in (1, 2, 3, 4, 17)] == ["1", "2", "3", "4+", "4+"]
    assert length_bucket(np.int64(2)) == "2"
    with pytest.raises(ValueError, match="at least one token"):
        length_bucket(0)
    with pytest.raises(TypeError):
        length_bucket(1.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- TOFU


def test_truth_ratio_formula():
    r = truth_ratio([1.0, 0.5], [[1.0, 1.0], [1.0, 2.0]])
    assert r[0] == 1.0
    assert r[1] == pytest.approx(e(-1.0))  # exp(0.5 - mean(1, 2))
    # the mean over perturbed answers is taken on NLLs (geometric mean of probabilities)
    assert truth_ratio([1.0], [[0.0, 2.0]])[0] == 1.0
    with pytest.raises(ValueError, match="shape"):
        truth_ratio([1.0], [1.0])


def test_truth_ratio_scores_exact_ends():
    assert truth_ratio_score([1.0, 1.0], forget=True) == 1.0  # indistinguishable
    assert truth_ratio_score([1.0, 2.0], forget=False) == 0.0  # false answers as likely
    assert truth_ratio_score([e(-1.0)], forget=True) == pytest.approx(e(-1.0))
    assert truth_ratio_score([4.0], forget=True) == pytest.approx(0.25)
    assert truth_ratio_score([0.25, 1.5], forget=False) == pytest.approx(0.75 / 2)
    with pytest.raises(ValueError, match="positive"):
        truth_ratio_score([0.0], forget=True)


def test_forget_quality_ks_pvalue():
    rng = np.random.default_rng(0)
    sample = rng.uniform(0.2, 1.0, size=50)
    assert forget_quality(sample, sample) == 1.0
    assert forget_quality(np.zeros(5), np.ones(5)) == pytest.approx(2 / math.comb(10, 5))
    assert forget_quality(np.zeros(700), np.ones(700)) == 0.0  # underflows: fully separated
    with pytest.raises(ValueError):
        forget_quality([], [1.0])


def test_tofu_probabilities_rouge_and_utility():
    assert answer_probability([0.0, math.log(2)]) == pytest.approx(0.75)
    assert answer_probability([0.0]) == 1.0
    assert normalized_answer_probability([math.log(2)], [[math.log(2), math.log(4)]]) == pytest.approx(0.4)
    assert rouge_l_recall("the cat sat on the mat", "The cat on a mat") == pytest.approx(0.8)
    assert rouge_l_recall("He wrote: the Lantern Prize!", "the lantern prize") == 1.0
    assert rouge_l_recall("nothing shared", "the lantern prize") == 0.0
    assert model_utility({"prob": 0.5, "rouge": 1.0}) == pytest.approx(2 / 3)
    assert model_utility([1.0, 1.0, 1.0]) == 1.0
    assert model_utility([0.0, 0.9]) == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model_utility([1.5])


# ----------------------------------------------------------------------------- stats


def test_bootstrap_is_deterministic_and_sane():
    values = np.random.default_rng(1).integers(0, 2, size=400).astype(float)
    a = bootstrap_ci(values, seed=7)
    b = bootstrap_ci(values, seed=7)
    assert a == b
    assert bootstrap_ci(values, seed=8) != a
    assert a.mean == pytest.approx(values.mean()) and a.n == 400 and a.confidence == 0.95
    assert a.low < a.mean < a.high
    assert 0.08 < a.high - a.low < 0.12  # ≈ 2 × 1.96 × sqrt(0.25 / 400) = 0.098
    const = bootstrap_ci([0.5, 0.5, 0.5])
    assert (const.low, const.mean, const.high) == (0.5, 0.5, 0.5)
    assert bootstrap_ci([1.0]).as_dict()["high"] == 1.0
    for bad in ([], [1.0, math.nan]):
        with pytest.raises(ValueError):
            bootstrap_ci(bad)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.0)


def test_bootstrap_does_not_depend_on_chunking(monkeypatch):
    values = np.linspace(0, 1, 37)
    whole = bootstrap_ci(values, n_resamples=200, seed=3)
    monkeypatch.setattr(stats, "_MAX_CHUNK_ENTRIES", 37 * 7)
    assert bootstrap_ci(values, n_resamples=200, seed=3) == whole


def test_group_and_summarize_by_length():
    groups = group_by_length([1, 2, 5, 1, 4], [1.0, 0.0, 1.0, 0.0, 1.0])
    assert list(groups) == ["1", "2", "4+"]
    assert groups["1"].tolist() == [1.0, 0.0] and groups["4+"].tolist() == [1.0, 1.0]
    summary = summarize_by_length([1, 2, 5, 1, 4], [1.0, 0.0, 1.0, 0.0, 1.0], n_resamples=100)
    assert summary["4+"].mean == 1.0 and summary["2"].mean == 0.0
    assert summary["all"].mean == pytest.approx(0.6) and summary["all"].n == 5
    with pytest.raises(ValueError, match="equal-length"):
        group_by_length([1, 2], [1.0])
