"""Unlearning baselines, forget/retain evaluation and the `dlmedit unlearn` command on tiny models."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from dlmedit.unlearn.baselines import PeakMemory, TrainConfig, WeightSnapshot, run_training_baseline, steer
from dlmedit.unlearn.evaluate import FORGET_QUALITY_NOTE, EvalSets, QAItem, evaluate_unlearning, summary_delta

FORGET = [
    QAItem("alpha was born in", "paris", "alpha", perturbed_answers=("rome", "london")),
    QAItem("beta works as a", "teacher", "beta", perturbed_answers=("doctor", "painter")),
    QAItem("the capital of gamma is", "berlin red", "gamma", perturbed_answers=("rome blue", "paris green")),
]
RETAIN = [
    QAItem("delta speaks", "blue", "delta", perturbed_answers=("red",)),
    QAItem("one was born in", "rome", "one", perturbed_answers=("paris",)),
    QAItem("two works as a", "doctor", "two", perturbed_answers=("teacher",)),
]
UTILITY = [QAItem("the capital of france is", "paris"), QAItem("a city in north", "france")]


pytestmark = pytest.mark.usefixtures("one_thread")


def _forget_lp(lm) -> float:
    return float(np.mean([r.total for r in lm.score([i.prompt for i in FORGET], [i.answer for i in FORGET])]))


@pytest.mark.parametrize("family", ["llama", "llada"])
@pytest.mark.parametrize("method", ["ga", "graddiff", "npo", "rmu"])
def test_training_baselines_lower_forget_logprob_and_restore(tiny_models, family: str, method: str) -> None:
    lm = tiny_models[family]
    before = _forget_lp(lm)
    fingerprint = lm.fingerprint()
    cfg = TrainConfig(steps=4, lr=1e-2, batch_size=3, n_states=2, seed=0)
    if method == "rmu":  # an activation-matching loss: smaller steps, steering target 20× the activation norm
        cfg = TrainConfig(steps=6, lr=1e-3, batch_size=3, n_states=2, rmu_layer=1, rmu_coeff=20.0, seed=0)
    with WeightSnapshot(lm.module) as snap:
        result = run_training_baseline(lm, method, FORGET, RETAIN, cfg)
        after = _forget_lp(lm)
        assert snap.changed()
    assert after < before
    assert lm.fingerprint() == fingerprint
    assert _forget_lp(lm) == before  # restored bit-exactly
    assert len(result.losses) == cfg.steps and result.wall_time_s > 0 and result.peak_rss_mb > 0
    assert all(p.grad is None for p in lm.module.parameters())
    if method == "rmu":
        assert all(".layers.0." in n or ".layers.1." in n for n in result.trained_params)


def test_baseline_input_errors(tiny_models) -> None:
    lm = tiny_models["llama"]
    with pytest.raises(ValueError, match="unknown training baseline"):
        run_training_baseline(lm, "sgd", FORGET, RETAIN)
    with pytest.raises(ValueError, match="needs retain"):
        run_training_baseline(lm, "graddiff", FORGET, [])
    with pytest.raises(ValueError, match="β"):
        TrainConfig(beta=0)


@pytest.mark.parametrize("family", ["llama", "dream"])
def test_steering_adds_a_fixed_vector_and_detaches(tiny_models, family: str) -> None:
    from dlmedit.memory.targets import MemoryFact
    from dlmedit.unlearn.baselines import steering_vector

    lm = tiny_models[family]
    before = _forget_lp(lm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vector = steering_vector(lm, [MemoryFact(i.prompt, i.subject, i.answer) for i in FORGET], 1)
    with steer(lm, 1, "resid", vector, alpha=0.5):
        during = _forget_lp(lm)
    assert during != before
    assert _forget_lp(lm) == before


def test_evaluation_reports_all_blocks_and_forget_quality(tiny_models) -> None:
    lm = tiny_models["llada"]
    sets = EvalSets(FORGET, RETAIN, UTILITY)
    ev = evaluate_unlearning(lm, sets, keep_items=True)
    for key in ("forget_lp", "forget_lp_sum", "retain_lp", "utility_lp", "forget_icl_lp", "forget_truth_ratio",
                "retain_truth_ratio", "model_utility"):
        assert ev[key] is not None, key
    assert ev["forget_quality"] is None and ev["forget_quality_note"] == FORGET_QUALITY_NOTE
    assert ev["forget_lp_sum"] == pytest.approx(sum(ev["per_item"]["forget"]))
    assert set(ev["protocol"]["estimators_used"]) <= {"exact", "chain:l2r"}
    assert ev["model_utility_components"] == ["retain_prob", "retain_truth_ratio", "utility_prob"]
    ref = evaluate_unlearning(lm, sets, reference_ratios=ev["forget_truth_ratios"])
    assert ref["forget_quality"] == pytest.approx(1.0)  # identical distributions
    delta = summary_delta(ev, {**ev, "forget_lp": ev["forget_lp"] + 1.0})
    assert delta["forget_lp_drop"] == pytest.approx(1.0) and delta["d_retain_lp"] == 0.0


def test_peak_memory_sees_torch_allocations() -> None:
    with PeakMemory() as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB
        block += 1
    del block
    assert mem.increase_mb > 40


def _tofu_file(path) -> str:
    extra = [QAItem(f"{s} {t}", a, s, perturbed_answers=(b,))
             for s in ("three", "four", "five", "six", "seven", "eight")
             for t, a, b in (("was born in", "paris", "rome"), ("works as a", "doctor", "painter"),
                             ("speaks", "red", "green"))]
    rows = [
        {"question": q.prompt, "answer": q.answer, "subject": q.subject, "prompt": q.prompt,
         "perturbed_answer": list(q.perturbed_answers), "paraphrased_answer": q.answer}
        for q in FORGET + RETAIN + extra
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_unlearn_cli_end_to_end(tiny_checkpoints, tmp_path) -> None:
    from typer.testing import CliRunner

    import dlmedit.cli.main  # registers the other commands, so `unlearn` is a sub-command
    import dlmedit.cli.unlearn  # noqa: F401  (registers the command)
    from dlmedit.cli.app import app

    data = _tofu_file(tmp_path / "facts.jsonl")
    forget_file = tmp_path / "forget.jsonl"
    forget_file.write_text("\n".join((tmp_path / "facts.jsonl").read_text().splitlines()[:3]) + "\n")
    out = tmp_path / "run"
    args = ["unlearn", "--model", str(tiny_checkpoints["llada"]), "--method", "memory,ga,steer",
            "--forget", f"tofu:{forget_file}", "--retain", f"tofu:{data}", "--utility", "", "--n-retain", "3",
            "--steps", "2", "--layer", "1", "--lambda", "0.1", "--sweep", "alpha=0.5,1",
            "--sequential", "3", "--eval-every", "2", "--scaling", "1,2", "--ablation", "random-coordinate",
            "--draws", "1", "--save-memory", str(tmp_path / "mem"), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["methods"]] == ["memory", "ga", "steer"]
    assert [r["alpha"] for r in results["alpha_sweep"]] == [0.5, 1.0]
    assert results["alpha_sweep"][0]["knob"] == "alpha"
    assert [c["n_inserted"] for c in results["sequential"]["curve"]] == [1, 2, 3]
    assert results["sequential"]["incremental_vs_scratch_max_abs"] < 1e-8
    assert [r["n_facts"] for r in results["scaling"]] == [1, 2]
    assert len(results["ablation_random_coordinate"]) == 2
    for png in ("pareto_alpha.png", "sequential.png", "scaling.png"):
        assert (out / png).stat().st_size > 1000
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert rows[0]["method"] == "base" and len(rows) == 1 + 3 + 2 + 2 + 2
    assert (tmp_path / "mem" / "memory.json").is_file()
    bad = CliRunner().invoke(app, ["unlearn", "--model", str(tiny_checkpoints["llada"]), "--method", "magic",
                                   "--out", str(out)])
    assert bad.exit_code != 0 and "unknown method" in bad.output
