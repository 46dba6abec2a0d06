"""The console commands registered in dlmedit.cli.main run end to end on the built-in models."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dlmedit.cli.main import app

runner = CliRunner()


def test_all_command_groups_registered():
    out = runner.invoke(app, ["--help"]).output
    for command in ("models", "generate", "score", "trace", "edit", "apply", "eval", "unlearn", "world", "study"):
        assert command in out


def test_world_recall_json_on_arm_twin():
    result = runner.invoke(app, ["world", "recall", "-m", "builtin:arm", "--limit", "3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    assert payload["paradigm"] == "arm" and payload["recall"]["train/all"]["n"] > 0
    assert payload["recall"]["train/all"]["recall"] >= 0.9


def test_generate_and_score_on_mdm_twin_and_path(tmp_path):
    from dlmedit.models.loading import BUILTIN_DIR

    for model in ("builtin:dream", str(BUILTIN_DIR / "mdm")):
        gen = runner.invoke(app, ["generate", "-m", model, "-p", "The capital of France is", "--json"])
        assert gen.exit_code == 0, gen.output
        score = runner.invoke(app, ["score", "-m", model, "-p", "a b", "-t", "c d", "--estimator", "chain", "--json"])
        assert score.exit_code == 0, score.output
        assert json.loads(score.output[score.output.index("{"):])["scores"][0]["estimator"] == "chain:l2r"


def test_friendly_error_for_missing_checkpoint(tmp_path):
    result = runner.invoke(app, ["generate", "-m", str(tmp_path / "missing"), "-p", "x"])
    assert result.exit_code == 2 and "does not exist" in result.output
