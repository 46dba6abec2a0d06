"""The Python API (`dlmedit.trace/edit/evaluate/unlearn/study`): same results as the CLI, every request shape, errors.

The functions are the subpackages made callable, so the first test pins down that the
usual ways of importing submodules still work next to the calls.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dlmedit
from dlmedit.data.loaders import DatasetError
from dlmedit.data.records import EditRecord, EditRequest
from dlmedit.edit.hparams import EditConfigError
from dlmedit.errors import DlmeditError, SubjectNotFoundError, UsageError

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")

REQUEST = EditRequest("the capital of {} is", "france", "london", "paris", case_id=0)
COUNTERFACT = {"case_id": 0, "requested_rewrite": {"prompt": "the capital of {} is", "subject": "france",
                                                   "target_new": {"str": "london"}, "target_true": {"str": "paris"}},
               "paraphrase_prompts": ["a city in france is"], "neighborhood_prompts": ["the capital of delta is"]}


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _cli(*args: str):
    from dlmedit.cli.main import app

    return CliRunner().invoke(app, list(args))


# ----------------------------------------------------------------------------- names


def test_api_names_are_callable_packages_and_submodule_imports_still_work():
    import inspect
    import types

    import dlmedit.edit.delta as delta_module  # resolved through the package attribute: must stay a module
    import dlmedit.edit.rome
    from dlmedit import edit
    from dlmedit.edit.editor import get_editor

    assert delta_module.EditDelta is dlmedit.edit.delta.EditDelta
    assert dlmedit.edit.rome.__name__ == "dlmedit.edit.rome"
    assert callable(get_editor)
    for name in ("trace", "edit", "evaluate", "unlearn", "study"):
        package = getattr(dlmedit, name)
        assert isinstance(package, types.ModuleType) and callable(package), name
        assert package.__name__ == f"dlmedit.{name}"
        assert inspect.signature(package) == inspect.signature(getattr(dlmedit.api, name))
        assert "Example::" in (package.__doc__ or "") and "Example::" in getattr(dlmedit.api, name).__doc__
    assert edit is dlmedit.edit and "method" in inspect.signature(edit).parameters


def test_fresh_interpreter_help_and_late_submodule_imports():
    """In a new process: importing submodules first or later never replaces the callable packages."""
    code = (
        "import dlmedit.unlearn.experiments, dlmedit\n"
        "import dlmedit.study.report, dlmedit.evaluate.metrics, dlmedit.trace.reference\n"
        "from dlmedit.edit.editor import get_editor\n"
        "assert all(callable(getattr(dlmedit, n)) for n in ('trace', 'edit', 'evaluate', 'unlearn', 'study'))\n"
        "help(dlmedit.edit)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**_env(), "PAGER": "cat"},
                         timeout=1200)
    assert out.returncode == 0, out.stderr
    assert "Calling this package runs dlmedit.api.edit" in out.stdout
    assert "Example::" in out.stdout and "dlmedit.edit(lm," in out.stdout


# ----------------------------------------------------------------------------- edit


def _same_delta(a, b) -> bool:
    return a.param_names == b.param_names and all(torch.equal(a.deltas[n], b.deltas[n]) for n in a.param_names)


def test_edit_accepts_every_request_shape_and_matches_the_editor(tiny_models, fast):
    from dlmedit.edit.editor import get_editor

    lm = tiny_models["llama"]
    hp = {"layers": [1], **fast}
    reference = get_editor("rome", lm, seed=0, **hp).compute([REQUEST])
    shapes = {
        "easyedit": {"prompts": ["the capital of france is"], "subject": ["france"], "target_new": ["london"],
                     "ground_truth": ["paris"]},
        "easyedit strings": {"prompts": "the capital of france is", "subject": "france", "target_new": "london",
                             "ground_truth": "paris"},
        "counterfact": {"requests": [COUNTERFACT]},
        "flat dict": {"requests": {"prompt": "the capital of {} is", "subject": "france",
                                   "target_new": {"str": "london"}, "target_true": "paris"}},
        "request object": {"requests": REQUEST},
    }
    before = {k: v.clone() for k, v in lm.module.state_dict().items()}
    for name, kwargs in shapes.items():
        delta = dlmedit.edit(lm, method="rome", seed=0, **kwargs, **hp)
        assert _same_delta(delta, reference), name
        assert delta.requests[0]["template"] == "the capital of {} is", name
    assert all(torch.equal(v, before[k]) for k, v in lm.module.state_dict().items())  # returned unapplied


def test_edit_from_a_path_saves_and_matches_the_cli(tiny_checkpoints, tmp_path, fast):
    from dlmedit.edit.delta import EditDelta

    path = str(tiny_checkpoints["llama"])
    hp = {"layers": [1], **fast}
    delta = dlmedit.edit(path, prompts="the capital of france is", subject="france", target_new="london",
                         out=tmp_path / "api", **hp)
    assert (tmp_path / "api" / "delta.json").is_file()
    flags = [f"--hparam={k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in hp.items()]
    result = _cli("edit", "-m", path, "--prompt", "the capital of france is", "--subject", "france",
                  "--target-new", "london", "--out", str(tmp_path / "cli"), *flags)
    assert result.exit_code == 0, result.output
    assert _same_delta(EditDelta.load(tmp_path / "cli"), delta)


def test_edit_errors_name_the_field_and_the_record(tiny_models):
    lm = tiny_models["llama"]
    broken = json.loads(json.dumps(COUNTERFACT))
    del broken["requested_rewrite"]["subject"]
    with pytest.raises(DatasetError, match=r"record 1: missing key 'subject'"):
        dlmedit.edit(lm, requests=[COUNTERFACT, broken])
    with pytest.raises(DatasetError, match=r"record 0: missing key 'target_new'"):
        dlmedit.edit(lm, requests=[{"prompt": "the capital of france is", "subject": "france"}])
    with pytest.raises(SubjectNotFoundError, match="request 1: subject 'spain'"):
        dlmedit.edit(lm, prompts=["the capital of france is", "the capital of france is"],
                     subject=["france", "spain"], target_new=["london", "rome"])
    with pytest.raises(UsageError, match="same length"):
        dlmedit.edit(lm, prompts=["a", "b"], subject=["a"], target_new=["c", "d"])
    with pytest.raises(UsageError, match="not both"):
        dlmedit.edit(lm, requests=[COUNTERFACT], prompts=["the capital of france is"])
    with pytest.raises(UsageError, match="nothing to edit"):
        dlmedit.edit(lm)
    with pytest.raises(UsageError, match="subjects → subject"):
        dlmedit.edit(lm, prompts=["the capital of france is"], subjects=["france"], target_new=["london"])
    with pytest.raises(EditConfigError, match="unknown edit method 'romeo'"):
        dlmedit.edit(lm, requests=REQUEST, method="romeo")
    with pytest.raises(UsageError, match="record 0 is a int"):
        dlmedit.edit(lm, requests=[3])
    with pytest.raises(UsageError, match="LanguageModel or an alias"):
        dlmedit.edit(3.5, requests=REQUEST)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="holds no edit records"):
        dlmedit.edit(lm, requests="world:forget01")


def test_edit_records_from_a_dataset_spec_and_objects():
    from dlmedit.data.requests import edit_records

    records = edit_records("world", limit=3)
    assert len(records) == 3 and all(isinstance(r, EditRecord) for r in records)
    assert edit_records(records) == records
    cf = edit_records([COUNTERFACT])[0]
    assert cf.paraphrase_prompts == ("a city in france is",) and cf.neighborhood[0].answer == "paris"
    assert isinstance(DatasetError("x"), DlmeditError)


# ----------------------------------------------------------------------------- trace


def test_trace_returns_the_document_the_cli_writes(tiny_checkpoints, tmp_path):
    path = str(tiny_checkpoints["llada"])
    result = dlmedit.trace(path, "the capital of france is", "france", "paris", samples=2, seed=1,
                           out=tmp_path / "api")
    assert len(result.traces) == 1 and result.traces[0].sites == ("resid", "mlp_out", "attn_out")
    cli = _cli("trace", "-m", path, "-p", "the capital of france is", "-s", "france", "-t", "paris",
               "--samples", "2", "--seed", "1", "--out", str(tmp_path / "cli"))
    assert cli.exit_code == 0, cli.output
    def untimed(doc: dict) -> dict:  # each fact records its own wall time; everything else must agree
        for fact in doc["facts"]:
            fact["stats"].pop("seconds")
        return doc

    written = untimed(json.loads((tmp_path / "cli" / "trace.json").read_text()))
    assert untimed(json.loads(json.dumps(result.document))) == written
    assert untimed(json.loads((tmp_path / "api" / "trace.json").read_text())) == written
    assert (tmp_path / "api" / "fact000.png").stat().st_size > 1000


def test_trace_fact_lists_and_errors(tiny_models):
    lm = tiny_models["llama"]
    facts = [("the capital of france is", "france", "paris"), {"prompt": "{} was born in", "subject": "alpha"}]
    result = dlmedit.trace(lm, facts=facts, sites="mlp", samples=2)
    assert [t.subject for t in result.traces] == ["france", "alpha"]
    assert result.document["settings"]["sites"] == ["mlp_out"] and result.document["n_facts"] == 2
    with pytest.raises(UsageError, match="not both or neither"):
        dlmedit.trace(lm, "the capital of france is", "france", facts=facts)
    with pytest.raises(UsageError, match="unknown trace site"):
        dlmedit.trace(lm, "the capital of france is", "france", sites=["mlp", "heads"])
    with pytest.raises(UsageError, match="record 0 is a str"):
        dlmedit.trace(lm, facts=["the capital of france is"])


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_returns_the_summary_it_writes(tiny_models, tmp_path):
    lm = tiny_models["llama"]
    out = tmp_path / "eval"
    summary = dlmedit.evaluate(lm, [COUNTERFACT], method="none", out=out, generation=False)
    assert summary["n_records"] == 1 and summary["protocol"] == "single"
    assert json.loads((out / "summary.json").read_text())["metrics"] == json.loads(json.dumps(summary["metrics"]))
    assert summary["config"]["dataset"] == "python"
    again = dlmedit.evaluate(lm, [COUNTERFACT], method="none", generation=False)  # temporary folder
    assert again["metrics"] == summary["metrics"]
    with pytest.raises(UsageError, match="unknown argument"):
        dlmedit.evaluate(lm, [COUNTERFACT], method="none", v_lr=0.1)
    with pytest.raises(DlmeditError, match="unknown edit method"):
        dlmedit.evaluate(lm, [COUNTERFACT], method="nope")


# ----------------------------------------------------------------------------- unlearn


def _tofu(path: Path) -> str:
    rows = [{"question": f"{s} {t}", "answer": a, "subject": s, "perturbed_answer": [b], "paraphrased_answer": a}
            for s in ("alpha", "beta", "gamma", "delta", "one", "two", "three", "four")
            for t, a, b in (("was born in", "paris", "rome"), ("works as a", "doctor", "painter"))]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_unlearn_returns_the_results_the_cli_writes(tiny_checkpoints, tmp_path):
    path = str(tiny_checkpoints["llada"])
    data = _tofu(tmp_path / "facts.jsonl")
    forget = tmp_path / "forget.jsonl"
    forget.write_text("\n".join(Path(data).read_text().splitlines()[:3]) + "\n")
    opts = {"forget": f"tofu:{forget}", "retain": f"tofu:{data}", "utility": "", "n_retain": 3, "layer": 1,
            "lam": 0.1, "steps": 2}
    results = dlmedit.unlearn(path, ["memory", "ga"], out=tmp_path / "api", **opts)
    assert [r["method"] for r in results["methods"]] == ["memory", "ga"]
    cli = _cli("unlearn", "--model", path, "--method", "memory,ga", "--forget", opts["forget"], "--retain",
               opts["retain"], "--utility", "", "--n-retain", "3", "--layer", "1", "--lambda", "0.1", "--steps", "2",
               "--out", str(tmp_path / "cli"))
    assert cli.exit_code == 0, cli.output
    written = json.loads((tmp_path / "cli" / "results.json").read_text())
    api_file = json.loads((tmp_path / "api" / "results.json").read_text())
    for doc in (written, api_file):
        assert doc["base"]["forget_lp"] == pytest.approx(results["base"]["forget_lp"], abs=1e-9)
        for got, want in zip(doc["methods"], results["methods"], strict=True):
            assert got["forget_lp"] == pytest.approx(want["forget_lp"], abs=1e-6)
            assert got["d_retain_lp"] == pytest.approx(want["d_retain_lp"], abs=1e-6)
    rows = (tmp_path / "api" / "rows.jsonl").read_text().splitlines()
    assert [json.loads(r)["method"] for r in rows] == ["base", "memory", "ga"]
    with pytest.raises(UsageError, match="unknown method"):
        dlmedit.unlearn(path, "forget-it", **opts)


# ----------------------------------------------------------------------------- study


def test_study_checks_before_running(tmp_path):
    with pytest.raises(UsageError, match="unknown stage 'tracing'"):
        dlmedit.study(tmp_path / "s", quick=True, options={"tracing": {"samples": 2}})
    with pytest.raises(UsageError, match="unknown stage"):
        dlmedit.study(tmp_path / "s", quick=True, stages=["trace", "nope"])
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_study_quick_trace_stage_writes_summary_and_report(tmp_path):
    outcome = dlmedit.study(tmp_path / "s", quick=True, models=["builtin:arm"], stages=["trace"], log=lambda _m: None)
    assert not outcome.failed and outcome.html.is_file() and outcome.markdown.is_file()
    assert json.loads((tmp_path / "s" / "summary.json").read_text()) == json.loads(json.dumps(outcome.summary))


# ----------------------------------------------------------------------------- README and examples


def _readme_python_api_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Python API section has no python code block"
    return blocks[0]


def test_readme_python_api_example_runs(tmp_path):
    script = tmp_path / "readme_api.py"
    script.write_text(_readme_python_api_block(), encoding="utf-8")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(), cwd=tmp_path,
                         timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "after the edit: The Isle of Quen" in out.stdout, out.stdout
    assert "reverted: Port of Saint Avel" in out.stdout, out.stdout


def test_quickstart_example_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True,
                         env=_env(), cwd=tmp_path, timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout
    assert re.search(r"before: .*Port of Saint Avel", lines), lines
    assert re.search(r"after: .*The Isle of Quen", lines), lines
    assert re.search(r"reverted: .*Port of Saint Avel", lines), lines
    assert "weights restored bit-exactly: True" in lines, lines
