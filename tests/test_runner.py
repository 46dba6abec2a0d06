"""Evaluation runs: protocols, bit-exact reverts, resume after interruption, refusing mixed configs, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dlmedit.cli.eval  # registers `dlmedit eval`
import dlmedit.cli.main  # noqa: F401  (the other commands: with one command typer would drop its name)
from dlmedit.cli.app import app
from dlmedit.data.loaders import DatasetError, load_dataset
from dlmedit.edit.delta import EditDelta
from dlmedit.edit.editor import Editor, register_editor
from dlmedit.evaluate.measure import EvalConfigError, MeasureSettings
from dlmedit.evaluate.runner import (
    EvalConfig,
    ResultsLog,
    RunConfigMismatchError,
    run_evaluation,
    summarize_rows,
)

FAST = MeasureSettings(generation=False, token_accuracy=False)


pytestmark = pytest.mark.usefixtures("one_thread")

# (subject, template, new, true) in the tiny models' word-level vocabulary; targets of 1-4 tokens
FACTS = [
    ("france", "the capital of {} is", "rome", "paris"),
    ("alpha", "{} was born in", "north river", "south city"),
    ("beta", "{} works as", "red blue green", "teacher"),
    ("gamma", "{} speaks", "one two three four", "five"),
]


def write_counterfact(path: Path, facts=FACTS) -> Path:
    rows = []
    for i, (subject, template, new, true) in enumerate(facts):
        rows.append({
            "case_id": i,
            "requested_rewrite": {"prompt": template, "subject": subject, "relation_id": f"P{i}",
                                  "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": [f"a city in {subject} is"],
            "neighborhood_prompts": [template.replace("{}", "delta")],
            "attribute_prompts": [],
            "generation_prompts": [f"{subject} is"],
        })
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture()
def dataset(tmp_path) -> tuple[str, list]:
    spec = f"counterfact:{write_counterfact(tmp_path / 'cf.json')}"
    return spec, load_dataset(spec)


@register_editor
class RankOneEditor(Editor):
    """A fake method: a random rank-one delta on layer 1's MLP down projection (torch's global RNG)."""

    name = "test_rank_one"

    def __init__(self, lm, seed=0, **hparams):
        super().__init__(lm, seed=seed, **hparams)
        self.calls = 0
        self.resets = 0
        self.replayed: list = []
        self.fail_at: int | None = None

    def reset(self):
        self.resets += 1

    def replay(self, requests, delta):
        self.replayed.append((requests[0].case_id, delta.method))

    def compute(self, requests, progress=None):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt
        param, transposed = self.lm.adapter.down_weight(1)
        d_out, d_in = (param.shape[1], param.shape[0]) if transposed else tuple(param.shape)
        delta = EditDelta.for_model(self.lm.module, method=self.name, requests=[vars(r) for r in requests])
        update = float(self.hparams.get("scale", 2.0)) * torch.outer(torch.randn(d_out), torch.randn(d_in))
        delta.add_matrix(self.lm.adapter.parameter_name(param), update, transposed=transposed)
        return delta


def _weights(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.module.state_dict().items()}


def _same_weights(lm, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in lm.module.state_dict().items())


def _rows(out: Path, kind: str = "record") -> list[dict]:
    return [r for r in ResultsLog(out / "results.jsonl").read() if r["kind"] == kind]


def _config(spec, protocol="single", method="test_rank_one", **kw) -> EvalConfig:
    return EvalConfig(model="tiny", method=method, dataset=spec, protocol=protocol, measure=kw.pop("measure", FAST),
                      **kw)


def _comparable(rows):
    return {r["case_id"]: (r["pre"], r["post"], r["n_tokens"], r["bucket"]) for r in rows}


# ----------------------------------------------------------------------------- protocols


def test_single_protocol_edits_measures_and_reverts(tiny_models, dataset, tmp_path):
    lm = tiny_models["llama"]
    spec, records = dataset
    before = _weights(lm)
    summary = run_evaluation(lm, records, _config(spec, measure=MeasureSettings()), tmp_path / "out")
    assert _same_weights(lm, before)
    rows = _rows(tmp_path / "out")
    assert [r["case_id"] for r in rows] == [0, 1, 2, 3]
    assert {r["protocol"] for r in rows} == {"single"}
    assert [r["bucket"] for r in rows] == ["1", "2", "3", "4+"]
    assert all(r["n_edits"] == 1 and r["delta_norm"] > 0 for r in rows)
    assert all(r["change"]["NLL_new"] != 0 for r in rows)  # the edit was really applied while measuring
    assert all(r["post_detail"]["generation"]["mode"] == "prefix" for r in rows)
    assert summary["protocol"] == "single" and summary["n_records"] == 4
    post = summary["metrics"]["post"]
    assert post["ES"]["all"]["n"] == 4 and set(post["ES"]) == {"all", "1", "2", "3", "4+"}
    assert summary["timings"]["seconds_per_edit"] > 0
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["metrics"]["post"]["ES"]["all"]["mean"] == post["ES"]["all"]["mean"]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["identity"]["protocol"] == "single" and run["identity"]["hparams"] == {"target_states": "final"}
    assert run["identity"]["model_fingerprint"] == lm.fingerprint()


def test_batch_protocol_one_delta_for_all(tiny_models, dataset, tmp_path):
    lm = tiny_models["gpt2"]  # Conv1D weights: the delta is stored transposed
    spec, records = dataset
    editor = RankOneEditor(lm, target_states="final")
    before = _weights(lm)
    run_evaluation(lm, records, _config(spec, "batch"), tmp_path / "out", editor=editor)
    assert editor.calls == 1 and _same_weights(lm, before)
    rows = _rows(tmp_path / "out")
    assert len(rows) == 4 and all(r["n_edits"] == 4 and r["protocol"] == "batch" for r in rows)
    assert len({r["delta_norm"] for r in rows}) == 1
    assert (tmp_path / "out" / "deltas" / "batch" / "delta.safetensors").is_file()


def test_none_method_changes_nothing(tiny_models, dataset, tmp_path):
    lm = tiny_models["llada"]
    spec, records = dataset
    run_evaluation(lm, records[:2], _config(spec, "batch", method="none", limit=2), tmp_path / "out")
    for row in _rows(tmp_path / "out"):
        assert row["pre"] == row["post"]
        assert row["post_detail"]["scores"]["rewrite"][0]["estimator_new"] in ("exact", "chain:l2r")


# ----------------------------------------------------------------------------- resume


def test_resume_single_after_interruption_equals_uninterrupted(tiny_models, dataset, tmp_path):
    lm = tiny_models["llama"]
    spec, records = dataset
    before = _weights(lm)
    run_evaluation(lm, records, _config(spec), tmp_path / "full")

    def crash_after_two(row):
        if len(_rows(tmp_path / "part")) == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_evaluation(lm, records, _config(spec), tmp_path / "part", on_row=crash_after_two)
    assert _same_weights(lm, before)
    assert len(_rows(tmp_path / "part")) == 2
    editor = RankOneEditor(lm, target_states="final")
    run_evaluation(lm, records, _config(spec), tmp_path / "part", editor=editor)
    assert editor.calls == 2 and editor.resets == 2  # done records are skipped; each single edit starts fresh
    rows = _rows(tmp_path / "part")
    assert [r["case_id"] for r in rows] == [0, 1, 2, 3]  # none lost, none duplicated
    assert _comparable(rows) == _comparable(_rows(tmp_path / "full"))


def test_truncated_last_line_is_discarded(tiny_models, dataset, tmp_path):
    lm = tiny_models["llama"]
    spec, records = dataset
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        run_evaluation(lm, records, _config(spec), out,
                       on_row=lambda row: (_ for _ in ()).throw(RuntimeError("stop")) if row["case_id"] == 2 else None)
    with open(out / "results.jsonl", "a") as fh:
        fh.write('{"protocol": "single", "kind": "record", "case_id": 3, "pre": {"ES"')  # crash mid-write
    run_evaluation(lm, records, _config(spec), out)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["case_id"] for line in lines] == [0, 1, 2, 3]


def test_damaged_middle_line_is_reported(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(Exception, match="line 2"):
        ResultsLog(path).read()


def test_resume_sequential_replays_saved_deltas(tiny_models, dataset, tmp_path):
    lm = tiny_models["llama"]
    spec, records = dataset
    before = _weights(lm)
    config = _config(spec, "sequential", every=1)
    run_evaluation(lm, records, config, tmp_path / "full")
    editor = RankOneEditor(lm, target_states="final")
    editor.fail_at = 3  # interrupted while computing the third edit
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(lm, records, config, tmp_path / "part", editor=editor)
    assert _same_weights(lm, before)  # the two applied edits were reverted
    assert [r["step"] for r in _rows(tmp_path / "part", "edit")] == [0, 1]
    assert _rows(tmp_path / "part") == []
    editor = RankOneEditor(lm, target_states="final")
    run_evaluation(lm, records, config, tmp_path / "part", editor=editor)
    assert editor.calls == 2  # edits 0 and 1 were replayed from deltas/, not recomputed
    assert editor.replayed == [(0, "test_rank_one"), (1, "test_rank_one")]  # stateful editors can rebuild
    assert _same_weights(lm, before)
    assert [r["step"] for r in _rows(tmp_path / "part", "edit")] == [0, 1, 2, 3]
    curves = _rows(tmp_path / "part", "curve")
    assert [c["n_edits"] for c in curves] == [1, 2, 3, 4]
    full_curves = _rows(tmp_path / "full", "curve")
    assert [c["means"] for c in curves] == [c["means"] for c in full_curves]
    rows = _rows(tmp_path / "part")
    assert [r["case_id"] for r in rows] == [0, 1, 2, 3] and all(r["n_edits"] == 4 for r in rows)
    assert _comparable(rows) == _comparable(_rows(tmp_path / "full"))
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert [c["n_edits"] for c in summary["curve"]] == [1, 2, 3, 4]


@register_editor
class StatefulEditor(RankOneEditor):
    """Has state across edits (``reset``) but no ``replay`` hook: resume must recompute to rebuild it."""

    name = "test_stateful"
    replay = None

    def compute(self, requests, progress=None):
        self.history = [*getattr(self, "history", []), requests[0].case_id]
        return super().compute(requests, progress)


def test_resume_sequential_rebuilds_state_of_editors_without_replay(tiny_models, dataset, tmp_path):
    lm = tiny_models["llama"]
    spec, records = dataset
    config = _config(spec, "sequential", method="test_stateful", every=2, limit=3)
    run_evaluation(lm, records[:3], config, tmp_path / "full")
    editor = StatefulEditor(lm, target_states="final")
    editor.fail_at = 3
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(lm, records[:3], config, tmp_path / "part", editor=editor)
    editor = StatefulEditor(lm, target_states="final")
    run_evaluation(lm, records[:3], config, tmp_path / "part", editor=editor)
    assert editor.history == [0, 1, 2]  # edits 0 and 1 recomputed for the state, then edit 2
    assert _comparable(_rows(tmp_path / "part")) == _comparable(_rows(tmp_path / "full"))
    assert [c["n_edits"] for c in _rows(tmp_path / "part", "curve")] == [2, 3]


def test_sequential_default_every_gives_final_curve_point(tiny_models, dataset, tmp_path):
    lm = tiny_models["llada"]
    spec, records = dataset
    run_evaluation(lm, records[:3], _config(spec, "sequential", limit=3), tmp_path / "out")
    assert [c["n_edits"] for c in _rows(tmp_path / "out", "curve")] == [1, 2, 3]  # every = max(1, 3 // 10)
    assert all(c["means"]["ES"] is not None and "pre_means" in c for c in _rows(tmp_path / "out", "curve"))


# ----------------------------------------------------------------------------- refusing bad input


def test_refuses_to_mix_configurations(tiny_models, dataset, tmp_path):
    lm = tiny_models["llama"]
    spec, records = dataset
    out = tmp_path / "out"
    run_evaluation(lm, records[:2], _config(spec, limit=2), out)
    with pytest.raises(RunConfigMismatchError, match="--overwrite") as info:
        run_evaluation(lm, records[:2], _config(spec, limit=2, seed=1), out)
    assert "seed" in str(info.value)
    with pytest.raises(RunConfigMismatchError, match="protocol"):
        run_evaluation(lm, records[:2], _config(spec, "batch", limit=2), out)
    run_evaluation(lm, records[:2], _config(spec, "batch", limit=2), out, overwrite=True)
    assert {r["protocol"] for r in _rows(out)} == {"batch"}
    (out / "run.json").unlink()
    with pytest.raises(RunConfigMismatchError, match="configuration is unknown"):
        run_evaluation(lm, records[:2], _config(spec, "batch", limit=2), out)


def test_invalid_options_and_empty_records(tiny_models, dataset, tmp_path):
    spec, _ = dataset
    with pytest.raises(EvalConfigError, match="limit"):
        _config(spec, limit=0)
    with pytest.raises(EvalConfigError, match="protocol"):
        _config(spec, "parallel")
    with pytest.raises(EvalConfigError, match="sequential"):
        _config(spec, "single", every=2)
    with pytest.raises(DatasetError, match="no records"):
        run_evaluation(tiny_models["llama"], [], _config(spec), tmp_path / "out")


def test_summary_by_bucket_and_score():
    rows = [
        {"kind": "record", "n_tokens": 1, "pre": {"ES": 0.0, "PS": 0.0, "NS": 1.0}, "post": {"ES": 1.0, "PS": 1.0, "NS": 0.5},
         "change": {"ES": 1.0}},
        {"kind": "record", "n_tokens": 5, "pre": {"ES": 0.0, "PS": None, "NS": 1.0}, "post": {"ES": 0.0, "PS": None, "NS": 1.0},
         "change": {"ES": 0.0}},
        {"kind": "curve", "n_edits": 1},
    ]
    s = summarize_rows(rows, seed=0, n_resamples=200)
    assert s["n_records"] == 2
    assert s["metrics"]["post"]["ES"]["all"]["mean"] == 0.5
    assert s["metrics"]["post"]["ES"]["4+"]["mean"] == 0.0 and "2" not in s["metrics"]["post"]["ES"]
    assert s["metrics"]["post"]["PS"]["all"]["n"] == 1  # undefined PS left out, not counted as failure
    assert s["Score"]["post"]["all"] == pytest.approx(3 / (1 / 0.5 + 1 / 1.0 + 1 / 0.75))


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


def test_cli_runs_and_resumes(tiny_checkpoints, tmp_path):
    data = write_counterfact(tmp_path / "cf.json")
    out = tmp_path / "out"
    args = ["--model", str(tiny_checkpoints["llama"]), "--method", "none", "--dataset", f"counterfact:{data}",
            "--limit", "2", "--no-progress", "--out", str(out), "--hparam", "layers=[1]"]
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_records"] == 2 and summary["protocol"] == "single"
    assert summary["config"]["hparams"] == {"layers": [1], "target_states": "final"}
    assert "ES" in result.output
    assert _cli(*args).exit_code == 0  # everything done: resumes to the same summary
    assert len(_rows(out)) == 2
    mixed = _cli(*args, "--protocol", "batch")
    assert mixed.exit_code == 2 and "different configuration" in mixed.output


@pytest.mark.parametrize(
    ("dataset", "limit", "message"),
    [
        ("counterfact:{tmp}/missing.json", "2", "not found"),
        ("zsre:{tmp}/cf.json", "2", "looks like a counterfact file"),
        ("counterfact:{tmp}/empty.json", "2", "empty"),
        ("counterfact:{tmp}/cf.json", "0", "limit"),
        ("world:forget01", "2", "unlearning"),
    ],
)
def test_cli_bad_input(tiny_checkpoints, tmp_path, dataset, limit, message):
    write_counterfact(tmp_path / "cf.json")
    (tmp_path / "empty.json").write_text("[]")
    result = _cli("--model", str(tiny_checkpoints["llama"]), "--method", "none", "--dataset",
                  dataset.format(tmp=tmp_path), "--limit", limit, "--no-progress", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_cli_unknown_method(tiny_checkpoints, tmp_path):
    data = write_counterfact(tmp_path / "cf.json")
    result = _cli("--method", "nope", "--dataset", f"counterfact:{data}", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "unknown edit method" in result.output


def test_eval_lengths_filter(tiny_checkpoints, tmp_path):
    """--lengths keeps only records whose target_new falls in the buckets; bad buckets are refused."""
    from typer.testing import CliRunner

    from dlmedit.cli.eval import parse_lengths
    from dlmedit.cli.main import app
    from dlmedit.evaluate.measure import EvalConfigError

    assert parse_lengths("3, 4+") == {"3", "4+"}
    assert parse_lengths(None) == set()
    with pytest.raises(EvalConfigError, match="unknown bucket"):
        parse_lengths("5")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "--method", "none", "-d", "world", "-m", str(tiny_checkpoints["llama"]),
                                      "--lengths", "1", "--limit", "3", "--no-generation", "--no-progress",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 3
    run = json.loads((out / "run.json").read_text())
    assert run["identity"]["lengths"] == ["1"]
