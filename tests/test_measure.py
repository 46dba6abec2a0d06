"""Model-facing metrics: hand-checkable CounterFact numbers, batching, readouts, generation exact match."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dlmedit.data.records import EditRecord, EditRequest, Probe
from dlmedit.evaluate.measure import (
    EvalConfigError,
    MeasureSettings,
    RecordMeasurement,
    add_pre_comparison,
    answer_window_of,
    generation_plan,
    measure_records,
    record_identity,
)
from dlmedit.paradigm.base import GenerationResult, ScoreResult

SCORES_ONLY = MeasureSettings(generation=False, token_accuracy=False)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- a fake scorer


class _FakeParadigm:
    name = "fake"

    def score(self, lm, prompts, targets, estimator=None, batch_size=64):  # signature read by measure
        raise AssertionError("measure must call lm.score")


class FakeScorerLM:
    """Returns a fixed mean NLL per (prompt, target): every number below is computed by hand."""

    def __init__(self, nll: dict[tuple[str, str], float]) -> None:
        self.nll = nll
        self.paradigm = _FakeParadigm()
        self.module = SimpleNamespace()
        self.calls = 0

    def encode_target(self, prompt: str, target: str) -> list[int]:
        return list(range(len(target.split())))

    def score(self, prompts, targets, estimator=None, **options):
        self.calls += 1
        out = []
        for p, t in zip(prompts, targets, strict=True):
            n = len(t.split())
            out.append(ScoreResult(list(range(n)), [-self.nll[(p, t)]] * n, estimator or "fake:exact"))
        return out


def _record(case_id=0, new="rome", true="paris", paraphrases=("p1", "p2"), neighbours=("n1",)):
    return EditRecord(
        EditRequest("the capital of {} is", "france", new, true, case_id=case_id),
        paraphrase_prompts=tuple(paraphrases),
        neighborhood=tuple(Probe(n, true) for n in neighbours),
    )


def test_counterfact_metrics_by_hand_es_one():
    rec = _record()
    prompt = rec.request.prompt
    nll = {
        (prompt, "rome"): 0.5, (prompt, "paris"): 1.5,      # rewrite: new wins → ES 1
        ("p1", "rome"): 1.0, ("p1", "paris"): 2.0,          # paraphrase 1: new wins
        ("p2", "rome"): 3.0, ("p2", "paris"): 1.0,          # paraphrase 2: true wins → PS 0.5
        ("n1", "rome"): 2.0, ("n1", "paris"): 0.25,         # neighbour: true still wins → NS 1
    }
    lm = FakeScorerLM(nll)
    m = measure_records(lm, [rec], SCORES_ONLY)[0]
    assert lm.calls == 1  # every prompt of the record in one scoring call
    assert m.metrics["ES"] == 1.0
    assert m.metrics["EM"] == pytest.approx(math.exp(-0.5) - math.exp(-1.5))
    assert m.metrics["PS"] == 0.5
    assert m.metrics["PM"] == pytest.approx(((math.exp(-1) - math.exp(-2)) + (math.exp(-3) - math.exp(-1))) / 2)
    assert m.metrics["NS"] == 1.0
    assert m.metrics["NM"] == pytest.approx(math.exp(-0.25) - math.exp(-2.0))
    assert m.metrics["NLL_new"] == 0.5
    assert m.scores["rewrite"][0]["estimator_new"] == "fake:exact"
    assert [s["prompt"] for s in m.scores["paraphrase"]] == ["p1", "p2"]


def test_counterfact_metrics_by_hand_es_zero_and_ties_fail():
    rec = _record(paraphrases=("p1",), neighbours=("n1", "n2"))
    prompt = rec.request.prompt
    nll = {
        (prompt, "rome"): 2.0, (prompt, "paris"): 0.5,       # true wins → ES 0
        ("p1", "rome"): 1.0, ("p1", "paris"): 1.0,           # tie counts as failure
        ("n1", "rome"): 0.1, ("n1", "paris"): 0.2,           # edit leaked into a neighbour
        ("n2", "rome"): 3.0, ("n2", "paris"): 0.2,
    }
    m = measure_records(FakeScorerLM(nll), [rec], SCORES_ONLY)[0]
    assert m.metrics["ES"] == 0.0
    assert m.metrics["EM"] == pytest.approx(math.exp(-2.0) - math.exp(-0.5))
    assert m.metrics["PS"] == 0.0
    assert m.metrics["NS"] == 0.5


def test_many_records_share_one_scoring_call_and_dedupe():
    recs = [_record(case_id=i, paraphrases=(), neighbours=("n1",)) for i in range(3)]
    prompt = recs[0].request.prompt
    nll = {(prompt, "rome"): 1.0, (prompt, "paris"): 2.0, ("n1", "rome"): 1.0, ("n1", "paris"): 2.0}
    lm = FakeScorerLM(nll)
    seen: list[int] = []
    original = lm.score
    lm.score = lambda p, t, estimator=None, **o: (seen.append(len(p)), original(p, t, estimator, **o))[1]
    out = measure_records(lm, recs, SCORES_ONLY)
    assert len(out) == 3 and seen == [4]  # 3 records x 4 pairs, but only 4 distinct pairs, one call
    assert all(m.metrics["PS"] is None for m in out)  # no paraphrases: undefined, not a failure


def test_record_without_true_target_has_no_counterfact_metrics():
    rec = EditRecord(EditRequest("where is {}", "france", "rome", None), paraphrase_prompts=("p1",))
    lm = FakeScorerLM({("where is france", "rome"): 0.7, ("p1", "rome"): 0.9})
    m = measure_records(lm, [rec], SCORES_ONLY)[0]
    assert m.metrics["ES"] is None and m.metrics["NS"] is None
    assert m.metrics["NLL_new"] == pytest.approx(0.7)


# ----------------------------------------------------------------------------- tiny real models

PROMPT = "the capital of france is"


def _tiny_records():
    return [
        EditRecord(EditRequest("the capital of {} is", "france", "rome", "paris", case_id=0),
                   paraphrase_prompts=("a city in france is",),
                   neighborhood=(Probe("the capital of north is", "paris"),),
                   locality=(Probe("one two", "three four"),)),
        EditRecord(EditRequest("the capital of {} is", "france", "paris", "rome", case_id=1),  # swapped
                   paraphrase_prompts=("a city in france is",),
                   neighborhood=(Probe("the capital of north is", "rome"),)),
        EditRecord(EditRequest("{} was born in", "alpha", "north river city", "south river", case_id=2),
                   paraphrase_prompts=("alpha was born at",),
                   neighborhood=(Probe("beta was born in", "south river"),),
                   portability=(Probe("alpha speaks", "blue language"),)),
    ]


@pytest.mark.parametrize("family", ["llama", "llada"])
def test_scores_equal_one_by_one_lm_score(tiny_models, family):
    lm = tiny_models[family]
    recs = _tiny_records()
    out = measure_records(lm, recs, SCORES_ONLY)
    for rec, m in zip(recs, out, strict=True):
        req = rec.request
        new = lm.score([req.prompt], [req.target_new])[0]
        true = lm.score([req.prompt], [req.target_true])[0]
        assert m.metrics["NLL_new"] == pytest.approx(new.mean_nll, abs=1e-5)
        assert m.metrics["ES"] == float(new.mean_nll < true.mean_nll)
        assert m.scores["rewrite"][0]["estimator_new"] == new.estimator
        nb = rec.neighborhood[0]
        nb_new = lm.score([nb.prompt], [req.target_new])[0].mean_nll
        nb_true = lm.score([nb.prompt], [nb.answer])[0].mean_nll
        assert m.metrics["NS"] == float(nb_true < nb_new)
        assert m.metrics["NM"] == pytest.approx(math.exp(-nb_true) - math.exp(-nb_new), abs=1e-6)
    # swapped new/true: exactly one of the two records succeeds on the rewrite prompt
    assert {out[0].metrics["ES"], out[1].metrics["ES"]} == {0.0, 1.0}
    if family == "llada":
        assert out[0].scores["rewrite"][0]["estimator_new"] == "exact"
        assert out[2].scores["rewrite"][0]["estimator_new"] == "chain:l2r"


def test_mc_elbo_estimator_is_recorded(tiny_models):
    lm = tiny_models["llada"]
    settings = MeasureSettings(estimator="mc_elbo", score_options={"mc_samples": 4, "seed": 0},
                               generation=False, token_accuracy=False)
    m = measure_records(lm, _tiny_records()[2:], settings)[0]
    assert m.scores["rewrite"][0]["estimator_new"] == "mc_elbo:4"
    assert m.scoring["options"]["mc_samples"] == 4


@pytest.mark.parametrize("family", ["llama", "dream"])
def test_token_accuracy_is_top1_at_paradigm_readouts(tiny_models, family):
    lm = tiny_models[family]
    rec = _tiny_records()[2]
    m = measure_records(lm, [rec], MeasureSettings(generation=False))[0]
    p, t = lm.encode_pair(rec.request.prompt, rec.request.target_new)
    batch = lm.paradigm.layout(lm, [lm.paradigm.final_state(p, t)])
    with torch.no_grad():
        logits = lm.logits(batch.input_ids, batch.attention_mask)
    predicted = [int(logits[0, int(c)].argmax()) for c in batch.readout[0]]
    assert m.predictions["rewrite"] == [predicted]
    assert m.metrics["Reliability"] == pytest.approx(sum(a == b for a, b in zip(predicted, t, strict=True)) / len(t))
    assert m.metrics["Portability"] is not None and m.metrics["LocalityGold"] is None


def test_locality_compares_with_pre_edit_predictions():
    pre = RecordMeasurement(dict.fromkeys(["Locality"]), predictions={"locality": [[1, 2, 3], [4]]})
    post = RecordMeasurement(dict.fromkeys(["Locality"]), predictions={"locality": [[1, 9, 3], [4]]})
    add_pre_comparison(post, pre)
    assert post.metrics["Locality"] == pytest.approx((2 / 3 + 1) / 2)


@pytest.mark.parametrize("family", ["llama", "llada"])
def test_generation_exact_match_prefix_mode(tiny_models, family):
    lm = tiny_models[family]
    assert answer_window_of(lm) is None
    assert generation_plan(lm, 1, MeasureSettings()) == ("prefix", 3)
    # whatever the model generates first in a 3-token window becomes the one-token target: EM must be 1
    first = lm.generate([PROMPT], 3, **({"steps": 3} if lm.mask_token_id is not None else {})).token_ids[0][0]
    word = lm.decode([first]).strip()
    other = next(w for w in ("rome", "paris", "london") if w != word)
    recs = [EditRecord(EditRequest("the capital of {} is", "france", word, other, case_id=0)),
            EditRecord(EditRequest("the capital of {} is", "france", other, word, case_id=1))]
    out = measure_records(lm, recs, MeasureSettings(token_accuracy=False))
    assert [m.metrics["GenEM"] for m in out] == [1.0, 0.0]
    assert out[0].generation["mode"] == "prefix" and out[0].generation["window"] == 3
    assert out[0].metrics["GenPEM"] is None


def test_generation_exact_match_eos_mode(tiny_models, monkeypatch):
    lm = tiny_models["llama"]
    monkeypatch.setattr(lm.module.config, "dlmedit_answer_window", 4, raising=False)
    assert generation_plan(lm, 2, MeasureSettings()) == ("eos", 4)
    assert generation_plan(lm, 2, MeasureSettings(gen_window=6)) == ("eos", 6)
    texts = {PROMPT: " rome", "a city in france is": " rome city"}
    calls = []

    def fake_generate(prompts, max_new_tokens, **options):
        calls.append((list(prompts), max_new_tokens))
        return GenerationResult([texts[p] for p in prompts], [[0] for _ in prompts], torch.zeros(1), 0,
                                {"paradigm": "fake", "max_new_tokens": max_new_tokens})

    monkeypatch.setattr(lm, "generate", fake_generate)
    rec = EditRecord(EditRequest("the capital of {} is", "france", "rome", "paris"),
                     paraphrase_prompts=("a city in france is",))
    m = measure_records(lm, [rec], MeasureSettings(token_accuracy=False))[0]
    assert m.metrics["GenEM"] == 1.0  # text up to EOS, stripped, equals the target
    assert m.metrics["GenPEM"] == 0.0  # extra word before EOS: not an exact match
    assert m.generation["mode"] == "eos"
    assert calls == [([PROMPT, "a city in france is"], 4)]  # one batched call for both prompts


def test_batched_equals_one_by_one(tiny_models):
    lm = tiny_models["llada"]
    recs = _tiny_records()
    together = measure_records(lm, recs, MeasureSettings())
    alone = [measure_records(lm, [r], MeasureSettings())[0] for r in recs]
    for a, b in zip(together, alone, strict=True):
        for key, value in a.metrics.items():
            if value is None:
                assert b.metrics[key] is None
            else:
                assert b.metrics[key] == pytest.approx(value, abs=1e-4), key


def test_record_identity_carries_length_bucket(tiny_models):
    lm = tiny_models["llama"]
    rec = EditRecord(EditRequest("{} was born in", "alpha", "one two three four", "five"))
    ident = record_identity(lm, rec)
    assert ident["n_tokens"] == 4 and ident["bucket"] == "4+"
    assert record_identity(lm, _tiny_records()[0])["bucket"] == "1"


def test_bad_settings():
    with pytest.raises(EvalConfigError, match="gen_window"):
        MeasureSettings(gen_window=0)
    assert measure_records(FakeScorerLM({}), [], SCORES_ONLY) == []


def test_mdm_window_without_eos_padding_is_judged_by_prefix(tiny_models, monkeypatch):
    """An adapted ARM (smollm2-dream) has a default window but writes on after the answer: judge its first tokens."""
    lm = tiny_models["llada"]
    monkeypatch.setattr(lm.paradigm, "answer_window", 6)
    monkeypatch.setattr(lm.paradigm, "answer_eos", False)
    assert generation_plan(lm, 2, MeasureSettings()) == ("prefix", 6)
    gold = lm.encode_target("the capital of france is", " rome")
    tail = lm.encode_target("the capital of france is", " city")

    def fake_generate(prompts, max_new_tokens, **options):
        ids = [(gold + tail * max_new_tokens)[:max_new_tokens] for _ in prompts]
        return GenerationResult([lm.decode(i) for i in ids], ids, torch.zeros(1), 0,
                                {"paradigm": "fake", "max_new_tokens": max_new_tokens})

    monkeypatch.setattr(lm, "generate", fake_generate)
    rec = EditRecord(EditRequest("the capital of {} is", "france", "paris", "rome"))
    m = measure_records(lm, [rec], MeasureSettings(token_accuracy=False))[0]
    assert m.metrics["GenEM"] == 0.0  # target_new is " paris"; generated " rome city …"
    rec = EditRecord(EditRequest("the capital of {} is", "france", "rome", "paris"))
    m = measure_records(lm, [rec], MeasureSettings(token_accuracy=False))[0]
    assert m.metrics["GenEM"] == 1.0  # " rome" then more text: a prefix match
    monkeypatch.setattr(lm.paradigm, "answer_eos", True)
    assert generation_plan(lm, 2, MeasureSettings()) == ("eos", 6)
    m = measure_records(lm, [rec], MeasureSettings(token_accuracy=False))[0]
    assert m.metrics["GenEM"] == 0.0, m.generation
