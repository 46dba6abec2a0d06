"""The study's unlearning and real-model stages on the tiny models (quick-like knobs, seconds each)."""

from __future__ import annotations

import json
import math

import pytest

from dlmedit.data import capitals
from dlmedit.study import stages
from dlmedit.study.runner import StageContext, StudyConfig

TINY_UNLEARN = {"n_retain": 4, "n_background": 20, "max_steps": 1, "alphas": [0.5, 1.0], "sequential": 2,
                "eval_every": 1, "ablation_draws": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def _ctx(tmp_path, lm, name: str, seed: int = 0, **config) -> StageContext:
    cfg = StudyConfig.preset(True, **config)
    out = tmp_path / "stage"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(cfg, name, seed, out, log=lambda _m: None, cache={f"model:{name}": lm})


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


@pytest.mark.parametrize("family", ["llama", "llada"])
def test_unlearning_stage_reports_every_method(tiny_models, tmp_path, family) -> None:
    from dlmedit.unlearn.experiments import METHODS

    lm = tiny_models[family]
    fingerprint = lm.fingerprint()
    ctx = _ctx(tmp_path, lm, f"tiny:{family}", n_forget_subjects=1, options={"unlearning": TINY_UNLEARN})
    out = stages.unlearning_stage(ctx)
    json.dumps(out, allow_nan=False)  # plain JSON numbers
    assert lm.fingerprint() == fingerprint
    assert out["split"] == "forget01" and len(out["subjects"]) == 1 and out["n_forget"] == 5
    assert out["n_retain"] == 4 and out["train_config"]["steps"] == 1
    assert list(out["methods"]) == [*METHODS, "memory gate 0.85"]
    base = out["base"]["forget_lp"]
    for method, row in out["methods"].items():
        for key in ("forget_lp_drop", "d_retain_lp", "d_utility_lp", "d_model_utility", "wall_time_s", "fit_time_s"):
            assert _finite(row[key]), (method, key, row[key])
        assert row["forget_lp_drop"] == pytest.approx(base - row["forget_lp"])
    assert [r["alpha"] for r in out["alpha_sweep"]] == [0.5, 1.0]
    assert all(_finite(r["forget_lp_drop"]) for r in out["alpha_sweep"])
    # α = 1 in the sweep is the same memory as the `memory` method row
    assert out["alpha_sweep"][1]["forget_lp_drop"] == pytest.approx(out["methods"]["memory"]["forget_lp_drop"], abs=1e-5)
    assert [c["n_inserted"] for c in out["sequential"]["curve"]] == [1, 2]
    assert out["sequential"]["incremental_vs_scratch_max_abs"] < 1e-6
    assert [r["source"] for r in out["ablation"]] == ["configured", "random"]
    assert out["ablation"][0]["layer"] == out["memory_settings"]["layer"]
    for plot in out["plots"].values():
        assert (ctx.out_dir / plot).stat().st_size > 1000


def test_forget_sets_pick_a_large_enough_split_and_sample_subjects_by_seed(tmp_path) -> None:
    ctx0 = _ctx(tmp_path, None, "x", seed=0)
    ctx1 = _ctx(tmp_path, None, "x", seed=1)
    sets0, split = stages.forget_sets(ctx0, 10, n_retain=5)
    sets1, _ = stages.forget_sets(ctx1, 10, n_retain=5)
    assert split == "forget05"
    subjects0 = {it.subject for it in sets0.forget}
    assert len(subjects0) == 10 and subjects0 == set(sets0.info["forget_subjects"])
    assert subjects0 != {it.subject for it in sets1.forget}
    assert not subjects0 & {it.subject for it in sets0.retain}
    assert len(sets0.retain) == 5 and sets0.utility
    with pytest.raises(ValueError, match="too many"):
        stages.forget_sets(ctx0, 31, n_retain=5)


def test_stage_options_refuse_unknown_knobs(tiny_models, tmp_path) -> None:
    ctx = _ctx(tmp_path, tiny_models["llama"], "tiny:llama", options={"unlearning": {"stepz": 3}})
    with pytest.raises(ValueError, match=r"unknown unlearning option\(s\) \['stepz'\]"):
        stages.unlearning_stage(ctx)


VOCAB_PAIRS = [("france", "paris"), ("north", "london"), ("south", "rome"), ("east", "berlin"), ("west", "red")]


@pytest.fixture()
def fast_edits(fast):
    return {"rome": {"layers": [1], **fast}, "memit": {"layers": [0, 1], **fast}}


def test_real_model_stage_traces_and_edits_capitals(tiny_models, tmp_path, monkeypatch, fast_edits) -> None:
    asked = []

    def vocab_pairs(seed=0):
        asked.append(seed)
        return list(VOCAB_PAIRS)

    monkeypatch.setattr(capitals, "capital_pairs", vocab_pairs)
    lm = tiny_models["llama"]
    fingerprint = lm.fingerprint()
    options = {"real_model": {"known_only": False, "n_neighbours": 1, "trace_samples": 2, "hparams": fast_edits}}
    ctx = _ctx(tmp_path, lm, "tiny:llama", seed=3, n_real_facts=2, options=options)
    out = stages.real_model_stage(ctx)
    json.dumps(out, allow_nan=False)
    assert asked == [3] and lm.fingerprint() == fingerprint
    assert out["n_facts"] == 2 and out["facts"] == [["france", "paris", "london"], ["north", "london", "paris"]]
    trace = out["trace"]
    assert trace["n_facts"] + trace["n_failed"] == 2 and trace["n_facts"] >= 1
    assert set(trace["peak"]) == {"resid", "mlp_out", "attn_out"}
    assert 0 <= trace["mlp_last_subject"]["layer"] < lm.n_layers
    assert (ctx.out_dir / trace["plot"]).stat().st_size > 1000
    assert set(out["runs"]) == {"rome/single", "memit/batch"}
    for run in out["runs"].values():
        for metric in ("ES", "PS", "NS"):
            assert 0.0 <= run[metric] <= 1.0 and 0.0 <= run["pre"][metric] <= 1.0
        assert run["seconds_per_edit"] > 0
    assert out["runs"]["rome/single"]["ES"] >= out["runs"]["rome/single"]["pre"]["ES"]
    run_file = next((ctx.out_dir / "tiny_llama__seed3" / "memit_batch").glob("run.json"))
    identity = json.loads(run_file.read_text())["identity"]
    assert identity["dataset"].startswith("countryinfo:capitals(seed=3") and identity["protocol"] == "batch"
    assert identity["hparams"]["layers"] == [0, 1]


def test_real_model_stage_keeps_only_known_facts_by_default(tiny_models, tmp_path, monkeypatch) -> None:
    """A random tiny model knows none of the capitals, so the default (known facts only) finds too few."""
    monkeypatch.setattr(capitals, "capital_pairs", lambda seed=0: list(VOCAB_PAIRS))
    ctx = _ctx(tmp_path, tiny_models["llama"], "tiny:llama", n_real_facts=2,
               options={"real_model": {"n_neighbours": 1}})
    with pytest.raises(ValueError, match="known to the model"):
        stages.real_model_stage(ctx)
    ctx = _ctx(tmp_path, tiny_models["llama"], "tiny:llama", options={"real_model": {"hparams": {"ft": {}}}})
    with pytest.raises(ValueError, match="unknown method"):
        stages.real_model_stage(ctx)
