"""The study's unlearning stage on the tiny models (quick-like knobs, seconds each); the real-model stage is in
tests/test_real_pair.py."""

from __future__ import annotations

import json
import math

import pytest

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

