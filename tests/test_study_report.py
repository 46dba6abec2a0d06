"""Study summary + report for the unlearning stage: numbers in, generated statements out.

The real-model section has its own module and tests (`dlmedit.study.real_pair`, tests/test_real_pair.py)."""

from __future__ import annotations

import json

import pytest

from dlmedit.study import stages  # noqa: F401  (registers the stages)
from dlmedit.study.report import build_summary, save_summary, statements, versions, write_report
from dlmedit.study.runner import StudyConfig, run_study

pytestmark = pytest.mark.usefixtures("one_thread")


def _method(drop: float, d_retain: float, wall: float) -> dict:
    return {"forget_lp": -1.0 - drop, "forget_lp_drop": drop, "d_retain_lp": d_retain, "d_utility_lp": -0.01,
            "d_model_utility": -0.02, "d_forget_para_lp": -drop / 2, "d_forget_icl_lp": -drop / 3,
            "fit_time_s": wall / 2, "wall_time_s": wall}


def _unlearning_cell(seed: int, memory_drop: float, ga_drop: float) -> dict:
    return {
        "split": "forget05", "subjects": [f"s{seed}"], "n_forget": 50, "n_retain": 100, "n_utility": 20,
        "memory_settings": {"layer": 2, "site": "resid"}, "train_config": {"steps": 16},
        "base": {"forget_lp": -1.0, "retain_lp": -1.2, "utility_lp": -3.0, "model_utility": 0.5},
        "methods": {"memory": _method(memory_drop, -0.5, 1.0 + seed), "ga": _method(ga_drop, -0.1, 10.0 + seed)},
        "alpha_sweep": [{"alpha": 0.5, "forget_lp_drop": 1.0, "d_retain_lp": -0.1, "d_utility_lp": 0.0},
                        {"alpha": 2.0, "forget_lp_drop": 4.0 + seed, "d_retain_lp": -1.0, "d_utility_lp": -0.2}],
        "sequential": {"n_facts": 10, "curve": [
            {"n_inserted": 5, "forget_lp_drop_inserted": 2.0, "d_forget_lp_not_inserted": 0.0, "d_retain_lp": -0.1,
             "d_utility_lp": 0.0},
            {"n_inserted": 10, "forget_lp_drop_inserted": 2.5, "d_forget_lp_not_inserted": None, "d_retain_lp": -0.3,
             "d_utility_lp": -0.1}]},
        "ablation": [{"layer": 2, "site": "resid", "source": "configured", "forget_lp_drop": 3.0, "d_retain_lp": -0.5},
                     {"layer": 4, "site": "mlp_out", "source": "random", "forget_lp_drop": 0.5, "d_retain_lp": -0.2},
                     {"layer": 0, "site": "attn_out", "source": "random", "forget_lp_drop": 1.5, "d_retain_lp": -0.1}],
        "plots": {},
    }


def _collected(memory_drop: float = 3.0, ga_drop: float = 1.0) -> dict:
    results = {"unlearning": {"builtin:arm": {str(s): _unlearning_cell(s, memory_drop, ga_drop) for s in (0, 1)}}}
    return {"results": results, "timings": {}}


CONFIG = {"models": ["builtin:arm"], "seeds": [0, 1], "quick": False}


def _keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def test_summary_aggregates_over_seeds_and_leaves_timings_out() -> None:
    summary = build_summary(_collected(), CONFIG)
    un = summary["unlearning"]["builtin:arm"]
    assert un["methods"]["memory"]["forget_lp_drop"]["mean"] == pytest.approx(3.0)
    assert un["methods"]["ga"]["d_retain_lp"]["n"] == 2
    assert un["alpha_sweep"][1]["forget_lp_drop"]["mean"] == pytest.approx(4.5)
    assert un["alpha_sweep"][1]["forget_lp_drop"]["low"] < 4.5 < un["alpha_sweep"][1]["forget_lp_drop"]["high"]
    assert un["sequential"]["n_facts"] == 10 and un["sequential"]["curve"][1]["d_forget_lp_not_inserted"]["n"] == 0
    assert un["ablation"]["random"]["forget_lp_drop"]["mean"] == pytest.approx(1.0)
    assert un["ablation"]["n_random"] == 4 and un["memory_coordinate"] == "L2 resid"
    assert not {k for k in _keys(summary) if "time" in k or "seconds" in k}
    assert json.dumps(summary, sort_keys=True) == json.dumps(build_summary(_collected(), CONFIG), sort_keys=True)


def test_statements_follow_the_numbers() -> None:
    """Cells without per-answer values: intervals over the two seeds (n = 2 seeds), directions only when they separate."""
    text = " ".join(statements(build_summary(_collected(3.0, 1.0), CONFIG)))
    assert "memory lowers ForgetLP by 3.00 [3.00, 3.00] (n = 2 seeds) nats/answer, RetainLP change -0.50 [" in text
    assert "largest baseline ForgetLP drop is ga's 1.00 [1.00, 1.00] (n = 2 seeds)" in text
    assert ("removing ≥ 0.10 nats/answer: ga -0.100 [-0.100, -0.100] (n = 2 seeds), memory -0.167 [-0.167, -0.167] "
            "(n = 2 seeds); the least damaging (largest value) is ga's -0.100") in text
    # α=2's drop differs between the seeds (4.0, 5.0): its interval covers α=0.5's, so no direction is claimed
    assert "ForgetLP drop: no measurable difference (n = 2 vs 2 seeds) between α=0.5, 1.00 [1.00, 1.00]" in text
    assert "drop grows" not in text and "RetainLP change falls from -0.10" in text
    assert "after 10 one-at-a-time insertions" in text and "has dropped by 2.50 [2.50, 2.50] (n = 2 seeds)" in text
    assert ("drop is larger for the configured coordinate (L2 resid), 3.00 [3.00, 3.00] (n = 2 seeds), than for the "
            "mean over 4 random coordinates, 1.00") in text
    flipped = " ".join(statements(build_summary(_collected(10.0, 1.0), CONFIG)))  # 0.5/10 < 0.1/1.0
    assert "ga -0.100 [-0.100, -0.100] (n = 2 seeds), memory -0.050 [" in flipped
    assert "the least damaging (largest value) is memory's -0.050" in flipped
    assert "removing ≥ 0.10" not in " ".join(statements(build_summary(_collected(3.0, 0.05), CONFIG)))
    assert "largest baseline ForgetLP drop is ga's 1.00" in flipped and "ForgetLP by 10.00" in flipped


def test_report_has_the_unlearning_section(tmp_path) -> None:
    collected = _collected()
    summary = build_summary(collected, CONFIG)
    _, md_path = write_report(tmp_path, summary, collected, versions(), 1.0)
    md = md_path.read_text()
    assert "4. Residual edit memory vs unlearning baselines" in md
    assert "| builtin:arm | memory | 3.000 [" in md  # a table row with the mean and its interval
    assert "| 1.500 |" in md  # memory wall time: mean of the cells' 1.0 and 2.0, from the cells not the summary


def test_study_runs_unlearning_end_to_end(tiny_checkpoints, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DLMEDIT_CACHE", str(tmp_path / "cache"))
    model = str(tiny_checkpoints["llama"])
    config = StudyConfig.preset(
        True, models=[model], stages=["unlearning"], n_forget_subjects=1, real_model="",
        options={"unlearning": {"methods": ["memory", "ga"], "n_retain": 3, "n_background": 10, "max_steps": 1,
                                "sequential": 2, "eval_every": 2}})
    out = tmp_path / "study"
    collected = run_study(config, out, log=lambda _m: None)
    assert set(collected["results"]) == {"unlearning"}
    summary = build_summary(collected, config.__dict__)
    save_summary(out, summary)
    methods = summary["unlearning"][model]["methods"]
    assert set(methods) == {"memory", "ga", "memory gate 0.85"}
    # per-answer intervals: n counts the forget answers (5 for one world subject), not the one seed
    assert methods["memory"]["forget_lp_drop"]["n"] == 5 and methods["memory"]["forget_lp_drop"]["unit"] == "answers"
    assert methods["memory"]["d_retain_lp"]["n"] == 3
    again = build_summary(run_study(config, out, log=lambda _m: None), config.__dict__)  # resumed from the cells
    assert again == summary
    _, md = write_report(out, summary, collected, versions(), 1.0)
    text = md.read_text()
    assert "residual edit memory" in text and "(n = 5 answers)" in text
    assert (out / "stages" / "unlearning").is_dir() and list((out / "stages" / "unlearning").glob("*_pareto.png"))


def test_cell_locks_share_a_folder_between_processes(tmp_path, monkeypatch) -> None:
    """A cell locked by a live process is waited for, not recomputed; a dead owner's lock is taken over."""
    import os
    import subprocess
    import sys
    import threading

    from dlmedit.study import runner

    calls: list[int] = []

    def fake_stage(ctx):
        calls.append(ctx.seed)
        return {"seed": ctx.seed}

    monkeypatch.setitem(runner._STAGES, "fake", fake_stage)
    monkeypatch.setattr(runner.CellLock, "poll_seconds", 0.05)
    config = StudyConfig(models=["m"], seeds=[0, 1], stages=["fake"])
    out = tmp_path / "study"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for seed, pid in ((0, os.getppid()), (1, dead.pid)):  # seed 0: a live owner; seed 1: a dead one
        lock = runner.cell_path(out, "fake", "m", seed).with_suffix(".json.lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(str(pid))
    cell0 = runner.cell_path(out, "fake", "m", 0)

    def other_process_finishes() -> None:
        runner.atomic_write_json(cell0, {"stage": "fake", "model": "m", "seed": 0, "numbers": {"seed": "theirs"},
                                         "wall_time_s": 1.0})
        cell0.with_suffix(".json.lock").unlink()

    timer = threading.Timer(0.3, other_process_finishes)
    timer.start()
    collected = run_study(config, out, log=lambda _m: None)
    timer.join()
    assert calls == [1]  # only the dead owner's cell was computed here
    assert collected["results"]["fake"]["m"] == {"0": {"seed": "theirs"}, "1": {"seed": 1}}
    assert not list(out.rglob("*.lock"))
