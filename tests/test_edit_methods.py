"""ROME / MEMIT / AlphaEdit / FT-L on the tiny models of every family: algebra, deltas, errors."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import WORDS

from dlmedit.data.records import EditRequest, InvalidRecordError
from dlmedit.edit.delta import EditDelta, weight_matrix_view
from dlmedit.edit.editor import get_editor
from dlmedit.edit.errors import ModelMismatchError, StatisticsError
from dlmedit.edit.hparams import EditConfigError, LayerOutOfRangeError, load_hparams, parse_hparam_overrides
from dlmedit.errors import SubjectNotFoundError
from dlmedit.interventions import count_hooks

REQ = EditRequest("the capital of {} is", "france", "london", "paris")
REQS = [
    REQ,
    EditRequest("{} was born in", "alpha", "rome", "berlin"),
    EditRequest("the river in {} is", "north", "red", "blue"),
]


pytestmark = pytest.mark.usefixtures("one_thread")




def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(model, before) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("family", ["llama", "gpt2", "llada", "dream"])
def test_rome_rank_one_update_maps_key_to_target_value(tiny_models, fast, family):
    lm = tiny_models[family]
    before = _state(lm.module)
    editor = get_editor("rome", lm, layers=[1], **fast)
    delta = editor.compute([REQ])
    _assert_same_weights(lm.module, before)  # compute never leaves an edit applied
    solve = editor.last_solves[0]
    param, transposed = lm.adapter.down_weight(1)
    assert delta.param_names == [solve["param"]] and solve["param"] == lm.adapter.parameter_name(param)
    with delta.apply(lm.module):
        W_new = weight_matrix_view(param.detach(), transposed).double()
        torch.testing.assert_close(W_new @ solve["k_star"], solve["v_star"], rtol=1e-4, atol=1e-5)
    sv = torch.linalg.svdvals(solve["update"].double())
    assert float(sv[1] / sv[0]) < 1e-5  # rank one (up to float32 rounding)
    assert delta.method == "rome" and delta.requests[0]["subject"] == "france"
    assert delta.model_hash == lm.fingerprint() and delta.hparams["layers"] == [1]
    assert count_hooks(lm.module) == 0


@pytest.mark.parametrize("family", ["llama", "llada"])
def test_weight_update_mode_optimises_exactly_what_the_update_does(tiny_models, fast, family):
    """In weight_update mode the forward used for δ equals the forward with W + ΔW applied."""
    from dlmedit.edit.keys import KeyedState
    from dlmedit.edit.values import RankOneInjection, _Forward

    lm = tiny_models[family]
    editor = get_editor("rome", lm, layers=[1], value_mode="weight_update", **fast)
    delta = editor.compute([REQ])
    s = editor.last_solves[0]
    settings = editor.value_settings(1, "mlp_out")
    fwd = _Forward(lm, settings, RankOneInjection(s["u"].float()[None], s["k_star"].float()[None]))
    ctx = editor.contexts([REQ])[0]
    rows = [KeyedState(lm.paradigm.final_state(c.prompt_ids, c.target_ids), c.subject_index) for c in ctx]
    with torch.no_grad():
        injected, batch = fwd.run(rows, s["delta"][None])
        with delta.apply(lm.module):
            applied = lm.logits(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(injected, applied, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "dream"])
def test_memit_update_solves_the_normal_equations(tiny_models, fast, family):
    lm = tiny_models[family]
    lam = 3.0
    editor = get_editor("memit", lm, layers=[0, 1], mom2_update_weight=lam, **fast)
    delta = editor.compute(REQS)
    moments = editor.second_moments([0, 1])
    assert [s["layer"] for s in editor.last_solves] == [0, 1]
    for s in editor.last_solves:
        _, transposed = lm.adapter.down_weight(s["layer"])
        stored = delta.deltas[s["param"]]
        D = (stored.T if transposed else stored).double()
        K, R, C = s["K"].double(), s["R"].double(), moments[s["layer"]].double()
        lhs = D @ (lam * C + K @ K.T)
        torch.testing.assert_close(lhs, R @ K.T, rtol=1e-3, atol=1e-5)
    # residual z − h before each layer's solve and after the last: the layers absorb it
    norms = delta.extra["residual_norms"]
    assert len(norms) == 3 and norms[0] > 0 and norms[-1] < norms[0]


def test_alphaedit_leaves_preserved_keys_unchanged(tiny_models, fast):
    lm = tiny_models["llama"]
    editor = get_editor("alphaedit", lm, layers=[1], nullspace_energy=0.3, **fast)
    first = editor.compute(REQS[:2])
    C = editor.second_moments([1])[1]
    P = editor.projector(1, C)
    assert 0 < editor.null_dims[1] < lm.adapter.d_mlp
    param, transposed = lm.adapter.down_weight(1)
    D = weight_matrix_view(first.deltas[lm.adapter.parameter_name(param)], transposed).double()
    g = torch.Generator().manual_seed(0)
    preserved = (torch.eye(C.shape[0], dtype=torch.float64) - P) @ torch.randn(C.shape[0], 16, generator=g, dtype=torch.float64)
    assert float((D @ preserved).abs().max()) < 1e-6 * max(1.0, float(D.abs().max()))
    assert float(D.abs().max()) > 0
    # sequential: the editor remembers the first batch's keys
    assert editor.n_previous == 2 and 1 in editor.prev_key_moment
    with first.apply(lm.module, check_model=False):
        second = editor.compute(REQS[2:])
    assert second.extra["previous_edits"] == 2 and editor.n_previous == 3
    # a resumed run rebuilds the same memory from the saved delta without recomputing values
    fresh = get_editor("alphaedit", lm, layers=[1], nullspace_energy=0.3, **fast)
    fresh.replay(REQS[:2], first)
    K2 = editor.last_solves[-1]["K"].double()  # keys of the second batch
    torch.testing.assert_close(fresh.prev_key_moment[1], editor.prev_key_moment[1] - K2 @ K2.T)
    editor.reset()
    assert editor.n_previous == 0 and not editor.prev_key_moment


def test_alphaedit_absolute_threshold_without_null_space_fails_clearly(tiny_models, fast):
    lm = tiny_models["llama"]
    editor = get_editor("alphaedit", lm, layers=[1], nullspace_threshold=1e-30, **fast)
    with pytest.raises(StatisticsError, match="null-space threshold"):
        editor.compute([REQ])


def test_finetune_respects_linf_constraint(tiny_models, fast):
    lm = tiny_models["llama"]
    before = lm.score([REQ.prompt], [REQ.target_new])[0].total
    fast = {k: v for k, v in fast.items() if not k.startswith(("stats_tokens", "stats_max", "v_"))}
    editor = get_editor("ft", lm, layers=[1], norm_constraint=1e-3, ft_lr=1e-3, ft_steps=5, **fast)
    delta = editor.compute([REQ])
    (name,) = delta.param_names
    assert float(delta.deltas[name].abs().max()) <= 1e-3 + 1e-9
    with delta.apply(lm.module):
        after = lm.score([REQ.prompt], [REQ.target_new])[0].total
    assert after > before


@pytest.mark.parametrize("kind", ["partial", "trajectory"])
def test_mdm_target_states_run_and_reduce_the_nll(tiny_models, fast, kind):
    lm = tiny_models["llada"]
    req = EditRequest("the capital of {} is", "france", "north south", "paris")
    editor = get_editor("rome", lm, layers=[1], target_states=kind, n_states=3, refresh_every=2,
                        clamp_norm_factor=1e4, v_weight_decay=0.0, **{**fast, "v_steps": 6})
    delta = editor.compute([req])
    history = delta.extra["values"][0]
    assert history["steps"] == [6] or history["nll"][0] < 0.05
    assert delta.norms()[editor.last_solves[0]["param"]] > 0


def test_revert_is_bit_exact_after_100_sequential_edits(tiny_models, fast):
    lm = tiny_models["llama"]
    before = _state(lm.module)
    editor = get_editor("rome", lm, layers=[1], use_stats=False, context_n=0, v_steps=1, kl_factor=0.0)
    rng = random.Random(0)
    subjects = ["france", "north", "alpha", "beta", "gamma", "delta", "river", "mountain"]
    handles = []
    for i in range(100):
        subject = subjects[i % len(subjects)]
        req = EditRequest(f"{{}} {rng.choice(['is', 'was born in', 'speaks'])}", subject, rng.choice(WORDS[20:40]))
        delta = editor.compute([req])
        handles.append(delta.apply(lm.module))
    assert any(not torch.equal(v, before[k]) for k, v in lm.module.state_dict().items())
    for handle in reversed(handles):
        handle.revert()
    _assert_same_weights(lm.module, before)


def test_saved_delta_reproduces_logits_and_refuses_other_models(tiny_models, fast, tmp_path):
    from tiny_models import write_checkpoint

    from dlmedit import load_model

    lm = tiny_models["gpt2"]
    delta = get_editor("rome", lm, layers=[2], **fast).compute([REQ])
    ids = torch.tensor([lm.encode_prompt("the capital of france is")])
    with torch.no_grad(), delta.apply(lm.module):
        expected = lm.logits(ids)
    delta.save(tmp_path / "d")
    loaded = EditDelta.load(tmp_path / "d")
    assert loaded.method == "rome" and loaded.requests == delta.requests and loaded.hparams == delta.hparams
    with torch.no_grad(), loaded.apply(lm.module):
        assert torch.equal(lm.logits(ids), expected)
    other = load_model(str(write_checkpoint("gpt2", tmp_path / "other", seed=1)))
    with pytest.raises(ModelMismatchError, match="computed on model"):
        loaded.apply(other.module)
    with pytest.raises(ValueError, match="no parameter named"):
        loaded.apply(tiny_models["llama"].module, check_model=False)


def test_bad_input_errors(tiny_models, fast):
    lm = tiny_models["llama"]
    editor = get_editor("rome", lm, layers=[1], **fast)
    from dlmedit.cli.edit import _requests_from_options

    with pytest.raises(SubjectNotFoundError):
        _requests_from_options(None, "the capital of france is", "spain", "paris", None, None, 0)
    with pytest.raises(InvalidRecordError, match="nothing to edit"):
        EditRequest("the capital of {} is", "france", "paris", "paris")
    with pytest.raises(InvalidRecordError, match="tokenises exactly like"):
        editor.compute([EditRequest("the capital of {} is", "france", "zzz", "yyy")])  # both unknown words
    with pytest.raises(InvalidRecordError, match="empty"):
        EditRequest("the capital of {} is", "france", "  ")
    with pytest.raises(LayerOutOfRangeError, match="out of range"):
        get_editor("rome", lm, layers=[9], **fast).compute([REQ])
    with pytest.raises(EditConfigError, match="exactly one layer"):
        get_editor("rome", lm, layers=[0, 1], **fast).compute([REQ])
    with pytest.raises(EditConfigError, match="unknown rome hyper-parameter"):
        get_editor("rome", lm, v_lrr=1.0)
    with pytest.raises(EditConfigError, match="target_states"):
        get_editor("rome", lm, layers=[1], target_states="sometimes", **fast).compute([REQ])
    with pytest.raises(ValueError, match="unknown edit method"):
        get_editor("nope", lm)
    with pytest.raises(EditConfigError, match="key=value"):
        parse_hparam_overrides(["v_lr"])
    assert parse_hparam_overrides(["layers=[1, 2]", "v_lr=0.1"]) == {"layers": [1, 2], "v_lr": 0.1}


@pytest.mark.parametrize("bad", ["nan", "singular"])
def test_unusable_statistics_fail_with_a_remedy(tiny_models, fast, monkeypatch, bad):
    import dlmedit.edit.locate as locate

    lm = tiny_models["llama"]
    d = lm.adapter.d_mlp

    def fake(lm_, layers, settings=None, **kw):
        C = torch.zeros(d, d, dtype=torch.float64)
        C[0, 0] = float("nan") if bad == "nan" else 1.0
        return {i: C for i in layers}

    monkeypatch.setattr(locate, "key_second_moments", fake)
    with pytest.raises(StatisticsError, match=r"stats_tokens|samples"):
        get_editor("rome", lm, layers=[1], **fast).compute([REQ])


def test_hparams_layering(tiny_models):
    lm = tiny_models["llada"]
    hp = load_hparams("rome", lm)
    assert hp["value_mode"] == "weight_update"  # paradigm.mdm section
    assert load_hparams("rome", tiny_models["llama"])["value_mode"] == "subject_only"
    assert load_hparams("rome", lm, {"v_steps": 3})["v_steps"] == 3
    with pytest.raises(EditConfigError, match="no hyper-parameter file"):
        load_hparams("nonexistent", lm)


def test_cli_edit_and_apply(tiny_checkpoints, fast, tmp_path):
    import json

    from typer.testing import CliRunner

    from dlmedit.cli import edit as _edit  # noqa: F401  (registers the commands)
    from dlmedit.cli.app import app

    runner = CliRunner()
    out = tmp_path / "edit"
    hp = [f"--hparam={k}={v}" for k, v in fast.items()]
    args = ["edit", "--model", str(tiny_checkpoints["llada"]), "--method", "rome", "--prompt", "the capital of france is",
            "--subject", "france", "--target-new", "london", "--target-true", "paris", "--layers", "1",
            "--target-states", "partial", "--out", str(out), *hp]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "edit.json").read_text())
    assert report["method"] == "rome" and report["hparams"]["target_states"] == "partial"
    (row,) = report["requests"]
    assert {"logprob_new", "logprob_true", "generation"} <= set(row["before"]) and "new_beats_true" in row["after"]
    assert (out / "delta.safetensors").is_file() and (out / "delta.json").is_file()
    result = runner.invoke(app, ["apply", "--model", str(tiny_checkpoints["llada"]), "--delta", str(out),
                                 "--target", "london", "--prompt", "the capital of france is"])
    assert result.exit_code == 0, result.output
    applied = json.loads(result.stdout[result.stdout.index("{"):])
    assert applied["outputs"][0]["target"] == "london"
    result = runner.invoke(app, ["apply", "--model", str(tiny_checkpoints["dream"]), "--delta", str(out)])
    assert result.exit_code == 2 and "computed on model" in result.output
    result = runner.invoke(app, ["edit", "--model", str(tiny_checkpoints["llama"]), "--prompt", "the capital of france is",
                                 "--subject", "spain", "--target-new", "london", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "SubjectNotFoundError" in result.output


def test_null_space_threshold_is_scale_free():
    from dlmedit.edit.alphaedit import null_space_threshold

    C = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))  # trace 55
    assert null_space_threshold(C, None, 0.05) == 1.5  # 1/55 ≤ 5 % < 3/55: one direction
    assert null_space_threshold(C * 1e-4, None, 0.05) == pytest.approx(1.5e-4)  # same directions at any scale
    assert null_space_threshold(C, None, 0.2) == 4.5  # (1+2+3+4)/55 ≤ 20 % < 15/55
    assert null_space_threshold(C, 2e-2, None) == 2e-2
    with pytest.raises(StatisticsError, match="Raise nullspace_energy"):
        null_space_threshold(C, None, 0.01)


def test_fact_token_positions_follow_the_paradigm(tiny_models, fast):
    from dlmedit.edit.keys import keyed_token

    text = "the capital of france is"
    for family, readout_offset in (("llama", -1), ("dream", -1), ("llada", 0)):
        lm = tiny_models[family]
        n = len(lm.encode_prompt(text))
        subject = lm.encode_prompt(text).index(lm.tokenizer.convert_tokens_to_ids("france"))
        assert keyed_token(lm, text, "france", "subject_last") == subject
        assert keyed_token(lm, text, "france", "prompt_last") == n - 1
        assert keyed_token(lm, text, "france", "readout", [5]) == n + readout_offset
    # an MDM edit keyed on its first answer slot runs end to end and is rank one
    editor = get_editor("rome", tiny_models["llada"], layers=[1], fact_token="readout", **fast)
    editor.compute([REQ])
    sv = torch.linalg.svdvals(editor.last_solves[0]["update"].double())
    assert float(sv[1] / sv[0]) < 1e-5


def test_layers_from_causal_tracing(tiny_models, fast):
    lm = tiny_models["llama"]
    editor = get_editor("memit", lm, layers="trace", trace_span=2, **fast)
    delta = editor.compute([REQ])
    layers = delta.extra["layers"]
    assert len(layers) == 2 and layers == sorted(layers) and layers[1] == layers[0] + 1
    assert editor.layers() == layers  # traced once, reused


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_reuse_fits_the_same_values_as_whole_rows(tiny_models, fast, family):
    """δ fitted with the columns before the subject computed once equals δ fitted on whole rows."""
    from dlmedit.edit.values import optimise_values

    lm = tiny_models[family]
    editor = get_editor("rome", lm, layers=[1], **fast)
    contexts = editor.contexts(REQS[:2])
    results = {}
    for reuse in (True, False):
        settings = editor.value_settings(1, "mlp_out", reuse_prefix=reuse, steps=6, early_stop_nll=0.0)
        results[reuse] = optimise_values(lm, contexts, [r.subject for r in REQS[:2]], settings)
    torch.testing.assert_close(results[True].delta, results[False].delta, rtol=1e-3, atol=1e-4)
    assert results[True].nll == pytest.approx(results[False].nll, rel=1e-3, abs=1e-5)
    assert results[True].kl == pytest.approx(results[False].kl, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "llada"])
def test_key_states_average_the_key_over_target_states(tiny_models, fast, family):
    """k* over ``trajectory`` states = the mean key over those states; an ARM has one state, so the same key."""
    from dlmedit.edit.keys import KeyedState, read_at_subject
    from dlmedit.edit.rome import subject_key

    lm = tiny_models[family]
    editor = get_editor("rome", lm, layers=[1], **fast)
    req = EditRequest("the capital of {} is", "france", "north south east", "paris")  # a multi-token answer
    contexts = editor.contexts([req])[0]
    final = subject_key(lm, contexts, 1)
    averaged = subject_key(lm, contexts, 1, key_states="trajectory")
    rows = [KeyedState(st, c.subject_index) for c in contexts
            for st in lm.paradigm.target_states(lm, c.prompt_ids, c.target_ids, "trajectory")]
    manual = read_at_subject(lm, rows, [(1, "mlp_key")])[(1, "mlp_key")].mean(0)
    torch.testing.assert_close(averaged, manual, rtol=1e-5, atol=1e-6)
    if lm.paradigm.has_intermediate_states:
        assert len(rows) > len(contexts) and not torch.allclose(averaged, final)
        delta = get_editor("rome", lm, layers=[1], key_states="trajectory", **fast).compute([req])
        assert delta.method == "rome"
    else:
        torch.testing.assert_close(averaged, final)
    with pytest.raises(EditConfigError, match="key_states"):
        get_editor("rome", lm, layers=[1], key_states="sideways", **fast).compute([REQ])
