"""The console commands registered in dlmedit.cli.main run end to end on the built-in models."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dlmedit.cli.main import app

runner = CliRunner()


def test_all_command_groups_registered():
    out = runner.invoke(app, ["--help"]).output
    for command in ("models", "generate", "score", "trace", "edit", "apply", "eval", "unlearn", "world", "study"):
        assert command in out


@pytest.mark.parametrize("twin", ["arm", "mdm", "dream"])
def test_shipped_twins_recall_their_facts(twin):
    """The shipped checkpoints pass their recall bars on a seeded sample (15 facts: 60 training, 30 held-out items).

    The bars (ARM ≥ 95 % / 85 %, MDMs ≥ 90 % / 80 % on all facts) are checked with a margin
    for the sample's noise; the full measurement is `dlmedit world recall`.
    """
    result = runner.invoke(app, ["world", "recall", "-m", f"builtin:{twin}", "--limit", "15", "--seed", "3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    assert payload["paradigm"] == ("arm" if twin == "arm" else "mdm")
    recall = payload["recall"]
    assert recall["train/all"]["n"] == 60 and recall["heldout/all"]["n"] == 30
    assert recall["train/all"]["recall"] >= 0.85, recall
    assert recall["heldout/all"]["recall"] >= 0.65, recall


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


def test_study_stage_options_parse():
    import typer

    from dlmedit.cli.study import parse_stage_options

    assert parse_stage_options(["unlearning.alpha=0.5", "unlearning.methods=[memory, ga]"]) == {
        "unlearning": {"alpha": 0.5, "methods": ["memory", "ga"]}}
    for bad in ("alpha=0.5", "nostage.alpha=1", "unlearning.alpha"):
        with pytest.raises(typer.BadParameter):
            parse_stage_options([bad])
