"""Study summary + report for the unlearning and real-model stages: numbers in, generated statements out."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from tiny_models import WORDS

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


def _real_cell(seed: int) -> dict:
    run = {"ES": 0.9, "PS": 0.7, "NS": 0.8 + seed / 100, "GenEM": 0.6,
           "pre": {"ES": 0.0, "PS": 0.05, "NS": 1.0, "GenEM": 0.0}, "seconds_per_edit": 3.0 + seed}
    return {"n_facts": 20, "known_only": True, "facts": [["France", "Paris", "Tokyo"]],
            "trace": {"n_facts": 20, "n_correct": 20, "n_failed": 0,
                      "peak": {"mlp_out": {"layer": 4 + seed, "category": "last subject token", "effect": 0.2},
                               "resid": {"layer": 0, "category": "last subject token", "effect": 0.5}},
                      "mlp_last_subject": {"layer": 4 + seed, "effect": 0.2}},
            "runs": {"rome/single": run, "memit/batch": {**run, "ES": 0.95}}}


def _collected(memory_drop: float = 3.0, ga_drop: float = 1.0) -> dict:
    results = {"unlearning": {"builtin:arm": {str(s): _unlearning_cell(s, memory_drop, ga_drop) for s in (0, 1)}},
               "real_model": {"smollm2": {str(s): _real_cell(s) for s in (0, 1)}}}
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
    real = summary["real_model"]["smollm2"]
    assert real["trace"]["mlp_out"]["peak_layer"]["mean"] == pytest.approx(4.5)
    assert real["runs"]["memit/batch"]["ES"]["mean"] == pytest.approx(0.95)
    assert real["runs"]["rome/single"]["pre"]["NS"]["mean"] == pytest.approx(1.0)
    assert not {k for k in _keys(summary) if "time" in k or "seconds" in k}
    assert json.dumps(summary, sort_keys=True) == json.dumps(build_summary(_collected(), CONFIG), sort_keys=True)


def test_statements_follow_the_numbers() -> None:
    text = " ".join(statements(build_summary(_collected(3.0, 1.0), CONFIG)))
    assert "memory lowers ForgetLP by 3.00 nats/answer with a RetainLP change of -0.50" in text
    assert "largest baseline drop is ga's 1.00" in text
    assert "removing ≥ 0.10 nats/answer: ga -0.100, memory -0.167; the least damaging is ga." in text
    assert "drop grows from 1.00 at α=0.5 to 4.50 at α=2" in text
    assert "after 10 one-at-a-time insertions" in text and "dropped by 2.50" in text
    assert "drop (3.00) is larger than its mean over 4 random coordinates (1.00)" in text
    assert "MLP indirect effect peaks at layer 4.5" in text and "rewriting 40 known capitals" in text
    flipped = " ".join(statements(build_summary(_collected(10.0, 1.0), CONFIG)))  # 0.5/10 < 0.1/1.0
    assert "ga -0.100, memory -0.050; the least damaging is memory." in flipped
    assert "removing ≥ 0.10" not in " ".join(statements(build_summary(_collected(3.0, 0.05), CONFIG)))
    assert "largest baseline drop is ga's 1.00" in flipped and "ForgetLP by 10.00" in flipped


def test_report_has_unlearning_and_real_model_sections(tmp_path) -> None:
    collected = _collected()
    summary = build_summary(collected, CONFIG)
    _, md_path = write_report(tmp_path, summary, collected, versions(), 1.0)
    md = md_path.read_text()
    assert "4. Residual edit memory vs unlearning baselines" in md and "5. A real pretrained model" in md
    assert "| builtin:arm | memory | 3.000 [" in md  # a table row with the mean and its interval
    assert "| 1.500 |" in md  # memory wall time: mean of the cells' 1.0 and 2.0, from the cells not the summary
    assert "rome/single" in md and "memit/batch" in md


def test_study_runs_unlearning_and_real_model_end_to_end(tiny_checkpoints, tmp_path, monkeypatch) -> None:
    from dlmedit.data import capitals

    monkeypatch.setenv("DLMEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(capitals, "capital_pairs", lambda seed=0: [("france", "paris"), ("north", "london"),
                                                                     ("south", "rome"), ("east", "berlin")])
    corpus = tmp_path / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(14)) for _ in range(120)), encoding="utf-8")
    fast = {"stats_corpus": str(corpus), "stats_tokens": 1200, "stats_max_length": 16, "context_n": 2,
            "context_length": 3, "v_steps": 4}
    model = str(tiny_checkpoints["llama"])
    config = StudyConfig.preset(
        True, models=[model], stages=["unlearning", "real_model"], n_forget_subjects=1, n_real_facts=2,
        options={"unlearning": {"methods": ["memory", "ga"], "n_retain": 3, "n_background": 10, "max_steps": 1,
                                "sequential": 2, "eval_every": 2},
                 "real_model": {"known_only": False, "n_neighbours": 1, "trace_samples": 2,
                                "hparams": {"rome": {"layers": [1], **fast}, "memit": {"layers": [0, 1], **fast}}}})
    config.real_model = model
    out = tmp_path / "study"
    # stage by stage into one folder (the stage list is not part of the configuration's digest)
    first = run_study(dataclasses.replace(config, stages=["unlearning"]), out, log=lambda _m: None)
    assert set(first["results"]) == {"unlearning"}
    collected = run_study(config, out, log=lambda _m: None)
    assert collected["results"]["unlearning"] == first["results"]["unlearning"]
    summary = build_summary(collected, config.__dict__)
    save_summary(out, summary)
    assert set(summary["unlearning"][model]["methods"]) == {"memory", "ga", "memory gate 0.85"}
    assert summary["real_model"][model]["runs"]["rome/single"]["ES"]["n"] == 1
    again = build_summary(run_study(config, out, log=lambda _m: None), config.__dict__)  # resumed from the cells
    assert again == summary
    _, md = write_report(out, summary, collected, versions(), 1.0)
    text = md.read_text()
    assert "residual edit memory lowers ForgetLP" in text and "rewriting 2 capitals" in text
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
