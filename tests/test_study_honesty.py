"""Honest findings: every generated statement gives n and a 95 % interval and names a direction only when
the intervals do not overlap; plots draw the intervals, put n in the legend and keep coinciding lines apart."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.container import ErrorbarContainer

from dlmedit.evaluate.stats import (
    bootstrap_ratio_ci,
    change_phrase,
    compare_phrase,
    estimate_text,
    interval_order,
    paired_change,
    pooled_ci,
    sign_phrase,
    top_phrase,
    wilson_ci,
)
from dlmedit.study.plots import diagnosis_figure, dodge, em_by_length_figure, layer_sweep_figure
from dlmedit.study.report import build_summary, statements

CONFIG = {"models": ["builtin:mdm"], "seeds": [0], "quick": True}


def _run(values: dict[str, list[float]]) -> dict:
    """An edits-stage run as the stage writes it: bucket means plus the per-record values."""
    genem = {b: float(np.mean(v)) for b, v in values.items()}
    genem["all"] = float(np.mean([x for v in values.values() for x in v]))
    return {"GenEM": genem, "values": {"GenEM": {**values, "all": [x for v in values.values() for x in v]}}}


def _edits_collected(runs_per_seed: list[dict[str, dict]]) -> dict:
    cells = {str(s): {"n_facts": 20, "runs": runs} for s, runs in enumerate(runs_per_seed)}
    return {"results": {"edits": {"builtin:mdm": cells}}, "timings": {}}


def _findings(collected: dict) -> str:
    return " ".join(statements(build_summary(collected, CONFIG)))


def test_overlapping_intervals_say_no_measurable_difference() -> None:
    mixed = [1.0, 0.0] * 5  # 10 facts per bucket, mean 0.5: the two buckets' intervals overlap
    lower = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # mean 0.3, still overlapping 0.5's interval
    text = _findings(_edits_collected([{"rome/final": _run({"1": mixed, "4+": lower})}]))
    assert "ROME exact match by generation (final-state fitting): no measurable difference (n = 10 vs 10 facts)" in text
    assert "drops" not in text and "rises" not in text
    assert "1-token targets, 0.50 [" in text and "(n = 10 facts)" in text


def test_separated_intervals_say_drops_with_n_and_interval() -> None:
    text = _findings(_edits_collected([{"rome/final": _run({"1": [1.0] * 10, "4+": [0.0] * 9 + [1.0]})}]))
    # binary values get Wilson intervals: 10/10 → [0.72, 1.00], 1/10 → [0.02, 0.40]
    assert ("ROME exact match by generation (final-state fitting) drops from 1.00 [0.72, 1.00] (n = 10 facts) "
            "for 1-token targets to 0.10 [0.02, 0.40] (n = 10 facts) for 4+-token targets") in text
    assert "no measurable difference" not in text


def test_facts_of_every_seed_are_pooled_into_one_interval() -> None:
    seeds = [{"rome/final": _run({"1": [1.0] * 10, "4+": [0.0] * 10})},
             {"rome/final": _run({"1": [1.0] * 9 + [0.0], "4+": [0.0] * 12})}]
    summary = build_summary(_edits_collected(seeds), {**CONFIG, "seeds": [0, 1]})
    one = summary["edits"]["builtin:mdm"]["rome/final"]["GenEM"]["1"]
    assert one["n"] == 20 and one["unit"] == "facts" and one["mean"] == pytest.approx(0.95)
    assert one["low"] < 0.95 <= one["high"] <= 1.0
    assert summary["edits"]["builtin:mdm"]["rome/final"]["GenEM"]["4+"]["n"] == 22
    assert "drops from 0.95 [" in " ".join(statements(summary))


def test_a_correction_is_higher_only_when_the_intervals_separate() -> None:
    runs = {"rome/final": _run({"1": [1.0] * 10, "4+": [0.0] * 10}),
            "rome/partial": _run({"1": [1.0] * 10, "4+": [1.0] * 10}),
            "rome/trajectory": _run({"1": [1.0] * 10, "4+": [0.0, 1.0] * 5})}
    text = _findings(_edits_collected([runs]))
    assert "4+-token exact match by generation is higher for fitting on partial states, 1.00 [0.72, 1.00] (n = 10 " \
           "facts), than for final-state fitting, 0.00 [0.00, 0.28] (n = 10 facts)" in text
    # trajectory: 5/10 [0.24, 0.76] vs 0/10 [0, 0.28] overlap
    assert ("4+-token exact match by generation: no measurable difference (n = 10 vs 10 facts) between fitting on "
            "trajectory states, 0.50 [0.24, 0.76]") in text


def test_one_seed_without_values_has_no_interval_and_no_direction() -> None:
    """Cells written before per-fact values were kept: one seed gives no interval, so no direction is claimed."""
    cell = {"runs": {"rome/final": {"GenEM": {"1": 1.0, "4+": 0.0, "all": 0.5}}}}
    text = _findings({"results": {"edits": {"builtin:mdm": {"0": cell}}}, "timings": {}})
    assert "no measurable difference (n = 1 vs 1 seeds)" in text
    assert "1.00 (n = 1 seed, no interval)" in text and "drops" not in text


def test_diagnosis_statement_uses_the_same_rule() -> None:
    def diag(first: list[float], last: list[float]) -> dict:
        by = {"final": {"trajectory_step_prob": [float(np.mean(first)), float(np.mean(last))],
                        "trajectory_step_values": [first, last], "partial_prob": 0.5}}
        return {"results": {"diagnosis": {"builtin:mdm": {"0": {"n_facts": 10, "by_states": by}}}}, "timings": {}}

    rises = _findings(diag([0.1, 0.2, 0.15] * 4, [0.9, 0.95, 0.97] * 4))
    assert "new-target tokens rises from 0.15 [" in rises and "(n = 12 facts) for the all-masked state" in rises
    flat = _findings(diag([0.1, 0.9] * 6, [0.2, 0.8] * 6))
    assert "new-target tokens: no measurable difference (n = 12 vs 12 facts)" in flat
    assert "rises" not in flat and "drops" not in flat


def test_unlearning_statements_use_per_answer_intervals() -> None:
    def method(drops: list[float], retain: list[float]) -> dict:
        return {"forget_lp_drop": float(np.mean(drops)), "d_retain_lp": float(np.mean(retain)),
                "per_answer": {"forget_lp_drop": {"values": drops}, "d_retain_lp": {"values": retain}}}

    cell = {"split": "forget01", "n_forget": 15, "train_config": {"steps": 3},
            "memory_settings": {"layer": 2, "site": "resid"}, "base": {},
            "methods": {"memory": method([3.0, 3.5, 4.0] * 5, [-0.1, -0.2] * 10),
                        "ga": method([0.5, 1.5, 1.0] * 5, [-0.1, 0.0] * 10),
                        "npo": method([0.6, 1.4, 1.1] * 5, [-0.3, -0.2] * 10)}}
    text = _findings({"results": {"unlearning": {"builtin:arm": {"0": cell}}}, "timings": {}})
    assert "the residual edit memory lowers ForgetLP by 3.50 [" in text and "(n = 15 answers) nats/answer" in text
    assert "the largest baseline ForgetLP drop: no measurable difference (n = 15 vs 15 answers) between npo" in text
    assert "ga " in text and "RetainLP change per nat" in text and "(n = 15 answers)" in text


def test_wording_helpers() -> None:
    a = {"mean": 0.9, "low": 0.8, "high": 1.0, "n": 10, "unit": "facts"}
    b = {"mean": 0.1, "low": 0.0, "high": 0.2, "n": 12, "unit": "facts"}
    c = {"mean": 0.7, "low": 0.5, "high": 0.85, "n": 10, "unit": "facts"}
    assert interval_order(a, b) == 1 and interval_order(b, a) == -1 and interval_order(a, c) == 0
    assert interval_order(a, {"mean": 0.1, "low": None, "high": None, "n": 1}) == 0
    assert change_phrase(a, b, what="X", before_label="p", after_label="q") == (
        "X drops from 0.90 [0.80, 1.00] (n = 10 facts) for p to 0.10 [0.00, 0.20] (n = 12 facts) for q")
    assert change_phrase(b, a, what="X", before_label="p", after_label="q").startswith("X rises from 0.10")
    assert change_phrase(a, c, what="X", before_label="p", after_label="q").startswith(
        "X: no measurable difference (n = 10 vs 10 facts) between p, 0.90")
    assert compare_phrase(c, b, what="Y", a_label="u", b_label="v", higher="larger").startswith("Y is larger for u")
    assert sign_phrase(b, what="Z", positive="up by", negative="down by").startswith("Z: no measurable difference from 0")
    assert sign_phrase({**b, "low": 0.05}, what="Z", positive="up by", negative="down by").startswith("Z up by 0.10")
    neg = {"mean": -2.0, "low": -3.0, "high": -1.0, "n": 5, "unit": "answers"}
    assert sign_phrase(neg, what="Z", positive="up by", negative="down by") == "Z down by 2.00 [1.00, 3.00] (n = 5 answers)"
    assert top_phrase({"a": a, "b": b}, what="the best") == "the best is a's 0.90 [0.80, 1.00] (n = 10 facts)"
    assert top_phrase({"a": a, "b": b, "c": c}, what="the best").startswith(
        "the best: no measurable difference (n = 10 vs 10 facts) between a 0.90")
    assert estimate_text({"mean": 0.5, "low": None, "high": None, "n": 1, "unit": "seeds"}) == "0.50 (n = 1 seed, no interval)"


def test_pooled_and_ratio_intervals() -> None:
    p = pooled_ci([[1.0, 0.0], [1.0, 1.0], None], unit="facts")
    assert p["n"] == 4 and p["mean"] == pytest.approx(0.75) and p["interval"] == "wilson"
    assert (p["low"], p["high"]) == pytest.approx(wilson_ci(3, 4)) and p["low"] < 0.75 < p["high"]
    # all zeros: Wilson's interval keeps the uncertainty a bootstrap ([0, 0]) would hide
    zeros = pooled_ci([[0.0] * 10], unit="facts")
    assert zeros["low"] == 0.0 and zeros["high"] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_ci(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    frac = pooled_ci([[0.2, 0.5], [0.4]], unit="facts")
    assert frac["interval"] == "bootstrap" and frac == pooled_ci([[0.2, 0.5], [0.4]], unit="facts")
    assert pooled_ci([[], None], unit="facts") == {"mean": None, "low": None, "high": None, "n": 0, "unit": "facts"}
    r = bootstrap_ratio_ci([-1.0, -1.2, -0.8] * 5, [2.0, 2.5, 1.5] * 5, unit="answers")
    assert r["mean"] == pytest.approx(-0.5) and r["low"] < -0.5 < r["high"] and r["n"] == 15
    assert r == bootstrap_ratio_ci([-1.0, -1.2, -0.8] * 5, [2.0, 2.5, 1.5] * 5, unit="answers")  # seeded


def _entry(mean: float, half: float, n: int) -> dict:
    return {"mean": mean, "low": max(0.0, mean - half), "high": min(1.0, mean + half), "n": n, "unit": "facts"}


def test_paired_change_separates_what_overlapping_marginal_intervals_hide() -> None:
    # 16 records: final generates 7, trajectory 14 — 8 gained, 1 lost (the smollm2-dream pattern)
    final = [1.0] * 6 + [0.0] * 8 + [1.0] + [0.0]
    traj = [1.0] * 6 + [1.0] * 8 + [0.0] + [0.0]
    marginal_a, marginal_b = pooled_ci([traj], unit="facts"), pooled_ci([final], unit="facts")
    assert marginal_a["low"] < marginal_b["high"]  # the marginal intervals overlap
    d = paired_change(traj, final, unit="facts")
    assert (d["rose"], d["fell"], d["n"]) == (8, 1, 16) and d["mean"] == pytest.approx(7 / 16)
    assert d["low"] > 0 and d["sign_test_p"] == pytest.approx(0.0390625)  # 2 * P(X <= 1), X ~ Bin(9, 1/2)
    assert "is higher by 0.44" in sign_phrase(d, what="trajectory minus final", positive="is higher by",
                                              negative="is lower by")
    same = paired_change(final, final, unit="facts")
    assert same["mean"] == 0.0 and (same["rose"], same["fell"], same["sign_test_p"]) == (0, 0, 1.0)
    assert paired_change([], [], unit="facts")["mean"] is None
    with pytest.raises(ValueError, match="equally long"):
        paired_change([1.0], [1.0, 0.0], unit="facts")


def test_em_by_length_plot_draws_intervals_n_and_keeps_coinciding_lines_apart() -> None:
    zero = {b: _entry(0.0, 0.0, 10) for b in ("1", "2", "3", "4+")}
    summary = {"edits": {
        "builtin:arm": {"rome/final": {"GenEM": zero}, "memit/final": {"GenEM": zero}},
        "builtin:mdm": {"rome/final": {"GenEM": {b: _entry(0.5, 0.3, n) for b, n in zip(("1", "2", "3", "4+"),
                                                                                      (10, 11, 10, 12), strict=True)}},
                        "rome/partial": {"GenEM": zero}}}}
    fig = em_by_length_figure(summary)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 4 and all(c.has_yerr for c in bars)
    segments = bars[2].lines[2][0].get_segments()  # the mdm rome/final error bars: 0.2 → 0.8
    assert [tuple(np.round([s[0][1], s[1][1]], 6)) for s in segments] == [(0.2, 0.8)] * 4
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "builtin:arm rome/final (n = 10 facts)" and "(n = 10/11/10/12 facts)" in labels[2]
    xs = [tuple(c.lines[0].get_xdata()) for c in bars]
    assert len(set(xs)) == 4  # the three series at 0 do not share x positions
    styles = {(c.lines[0].get_marker(), c.lines[0].get_linestyle()) for c in bars}
    assert len(styles) == 4
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_layer_sweep_and_diagnosis_plots_carry_intervals_and_n() -> None:
    import matplotlib.pyplot as plt

    rows = [{"layer": layer, "ES": _entry(0.8, 0.1, 8), "GenEM": _entry(0.2, 0.15, 8), "NS": _entry(0.9, 0.1, 8)}
            for layer in (0, 2, 4)]
    fig = layer_sweep_figure({"layer_sweep": {"builtin:arm": rows}, "trace": {}})
    ax = fig.axes[0]
    assert sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == 2
    assert all("(n = 8 facts)" in t.get_text() for t in ax.get_legend().get_texts())
    plt.close(fig)
    steps = [_entry(0.3, 0.1, 20), _entry(0.6, 0.1, 20), _entry(0.9, 0.05, 19)]
    fig = diagnosis_figure({"diagnosis": {"builtin:mdm": {"final": {"trajectory_step_prob": steps},
                                                          "partial": {"trajectory_step_prob": steps}}}})
    ax = fig.axes[0]
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2  # one band per series
    assert ax.get_legend().get_texts()[0].get_text() == "builtin:mdm fitted on final (n = 20/20/19 facts)"
    plt.close(fig)
    assert dodge(1) == [0.0] and dodge(3, 0.4) == pytest.approx([-0.2, 0.0, 0.2])


@pytest.mark.usefixtures("one_thread")
def test_unlearning_stage_keeps_per_answer_values_that_match_the_headline(tiny_models, tmp_path) -> None:
    """The per-answer values behind the intervals average to the stage's headline deltas (paired with the base)."""
    from dlmedit.study import stages
    from dlmedit.study.runner import StageContext, StudyConfig

    lm = tiny_models["llama"]
    cfg = StudyConfig.preset(True, n_forget_subjects=1, options={"unlearning": {
        "methods": ["memory", "ga"], "gates": [], "n_retain": 4, "n_background": 20, "max_steps": 1,
        "sequential": 0}})
    out = tmp_path / "stage"
    out.mkdir()
    ctx = StageContext(cfg, "tiny:llama", 0, out, log=lambda _m: None, cache={"model:tiny:llama": lm})
    result = stages.unlearning_stage(ctx)
    for method, row in result["methods"].items():
        per = row["per_answer"]
        assert per["forget_lp_drop"]["n"] == result["n_forget"] and per["d_retain_lp"]["n"] == result["n_retain"]
        assert np.mean(per["forget_lp_drop"]["values"]) == pytest.approx(row["forget_lp_drop"], abs=1e-9), method
        assert np.mean(per["d_retain_lp"]["values"]) == pytest.approx(row["d_retain_lp"], abs=1e-9), method
        assert per["forget_lp_drop"]["low"] <= row["forget_lp_drop"] <= per["forget_lp_drop"]["high"]
    # the same seed in a fresh folder gives the same numbers (timings aside), so summary.json stays byte-identical
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    again = stages.unlearning_stage(StageContext(cfg, "tiny:llama", 0, again_dir, log=lambda _m: None,
                                                 cache={"model:tiny:llama": lm}))

    def numbers(r: dict) -> dict:
        return {**r, "methods": {m: {k: v for k, v in row.items() if not k.endswith("time_s")}
                                 for m, row in r["methods"].items()}}

    assert json.dumps(numbers(again), sort_keys=True) == json.dumps(numbers(result), sort_keys=True)
    summary = build_summary({"results": {"unlearning": {"tiny:llama": {"0": result}}}, "timings": {}}, CONFIG)
    assert json.dumps(summary, sort_keys=True) == json.dumps(build_summary(
        {"results": {"unlearning": {"tiny:llama": {"0": again}}}, "timings": {}}, CONFIG), sort_keys=True)
    memory = summary["unlearning"]["tiny:llama"]["methods"]["memory"]
    assert memory["forget_lp_drop"]["unit"] == "answers" and memory["retain_per_drop"]["n"] == min(
        result["n_forget"], result["n_retain"])


def test_error_bars_never_negative_when_an_interval_excludes_its_mean() -> None:
    from dlmedit.study.plots import _errors

    err = _errors([{"mean": 0.5, "low": 0.5000001, "high": 0.7}, {"mean": 0.2, "low": 0.1, "high": 0.19}])
    assert (err >= 0).all()
    assert err[0, 0] == 0.0 and err[1, 1] == 0.0  # rows: distance below, distance above
    assert err[1, 0] == pytest.approx(0.2) and err[0, 1] == pytest.approx(0.1)
