"""Issue 16 families: DiffuLLaMA, MMaDA, LLaDA-MoE and the Instruct chat templates.

Each tiny checkpoint is written in its published layout (tests/tiny_models.py), loaded
without remote code, and its logits are checked against a straightforward forward written
here from the *published* tensors (not the converted ones): bidirectional attention, the
family's logit shift and mask id.  Then tracing, ROME / MEMIT and the residual edit memory
run on each, and LLaDA-MoE's edit site (the routed experts' down projections taken
together) is checked against its equations.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import (
    DIFFULLAMA_MASK_WORD,
    WORDS,
    write_checkpoint,
    write_diffullama,
    write_dream_instruct,
    write_llada_instruct,
    write_lladamoe,
    write_mmada,
)

from dlmedit import load_model
from dlmedit.data.records import EditRequest
from dlmedit.edit.delta import weight_matrix_view
from dlmedit.edit.editor import get_editor
from dlmedit.errors import DlmeditError, RemoteCodeRequiredError
from dlmedit.interventions import Intervention, count_hooks, intervene
from dlmedit.models.chat import ChatTemplateError, chat_prompt
from dlmedit.models.lladamoe import MissingExpertsError, UnsupportedMoEConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "the capital of france is"
REQ = EditRequest("the capital of {} is", "france", "london", "paris")
FAMILIES = ("diffullama", "mmada", "lladamoe")


# ----------------------------------------------------------------------------- reference forwards
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE on [B, heads, T, d] (Llama, OLMo/LLaDA and OLMoE/LLaDA-MoE all use this form)."""
    T, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def _attention(h, wq, wk, wv, wo, heads, kv_heads, theta, eps, q_norm=None, k_norm=None):
    """Full (bidirectional) multi-head attention with GQA — no causal mask anywhere."""
    B, T, _ = h.shape
    hd = wq.shape[0] // heads
    q = (h @ wq.T).view(B, T, heads, hd)
    k = (h @ wk.T).view(B, T, kv_heads, hd)
    v = (h @ wv.T).view(B, T, kv_heads, hd)
    if q_norm is not None:
        q, k = _rms(q, q_norm, eps), _rms(k, k_norm, eps)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = _rope(q, theta), _rope(k, theta)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1)
    return (att @ v).transpose(1, 2).reshape(B, T, heads * hd) @ wo.T


def _swiglu(x, gate, up, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def reference_llama(t: dict, ids: torch.Tensor, cfg: dict) -> torch.Tensor:
    """LLaMA-2 / DiffuLLaMA forward from HF Llama keys, bidirectional."""
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    x = t["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = x + _attention(_rms(x, t[p + "input_layernorm.weight"], eps), t[p + "self_attn.q_proj.weight"],
                           t[p + "self_attn.k_proj.weight"], t[p + "self_attn.v_proj.weight"],
                           t[p + "self_attn.o_proj.weight"], cfg["num_attention_heads"],
                           cfg["num_key_value_heads"], theta, eps)
        y = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
        x = x + _swiglu(y, t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"], t[p + "mlp.down_proj.weight"])
    return _rms(x, t["model.norm.weight"], eps) @ t["lm_head.weight"].T


def reference_llada(t: dict, ids: torch.Tensor, cfg: dict) -> torch.Tensor:
    """LLaDA / MMaDA forward from OLMo-style `model.transformer.*` keys (transformer.ff_out is the head)."""
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    x = t["model.transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        x = x + _attention(_rms(x, t[p + "attn_norm.weight"], eps), t[p + "q_proj.weight"], t[p + "k_proj.weight"],
                           t[p + "v_proj.weight"], t[p + "attn_out.weight"], cfg["n_heads"], cfg["n_kv_heads"],
                           theta, eps)
        y = _rms(x, t[p + "ff_norm.weight"], eps)
        x = x + _swiglu(y, t[p + "ff_proj.weight"], t[p + "up_proj.weight"], t[p + "ff_out.weight"])
    return _rms(x, t["model.transformer.ln_f.weight"], eps) @ t["model.transformer.ff_out.weight"].T


def reference_moe_mlp(t: dict, i: int, y: torch.Tensor, cfg: dict) -> torch.Tensor:
    """LLaDA-MoE's MLP at layer i, token by token: softmax router (+ expert bias), top-k, no renormalisation,
    Σ w·expert(y), plus the ungated layer-level shared expert; a dense layer is one SwiGLU."""
    p = f"model.layers.{i}."
    if not cfg["moe_layer_freq"][i]:
        return _swiglu(y, t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"], t[p + "mlp.down_proj.weight"])
    flat = y.reshape(-1, y.shape[-1])
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        probs = torch.softmax(flat[n] @ t[p + "mlp.gate.weight"].T, -1)
        if cfg["moe_router_enable_expert_bias"]:
            probs = probs + t[p + "mlp.expert_bias"]
        weights, experts = torch.topk(probs, cfg["num_experts_per_tok"])
        for w, e in zip(weights, experts.tolist(), strict=True):
            q = p + f"mlp.experts.{e}."
            out[n] += w * _swiglu(flat[n], t[q + "gate_proj.weight"], t[q + "up_proj.weight"], t[q + "down_proj.weight"])
        if cfg["shared_expert_intermediate_size"]:
            s = p + "shared_expert."
            out[n] += _swiglu(flat[n], t[s + "gate_proj.weight"], t[s + "up_proj.weight"], t[s + "down_proj.weight"])
    return out.reshape(y.shape)


def reference_lladamoe(t: dict, ids: torch.Tensor, cfg: dict) -> torch.Tensor:
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    x = t["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        qk = (t[p + "self_attn.q_norm.weight"], t[p + "self_attn.k_norm.weight"]) if cfg["qk_layernorm"] else (None, None)
        x = x + _attention(_rms(x, t[p + "input_layernorm.weight"], eps), t[p + "self_attn.q_proj.weight"],
                           t[p + "self_attn.k_proj.weight"], t[p + "self_attn.v_proj.weight"],
                           t[p + "self_attn.o_proj.weight"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                           theta, eps, *qk)
        x = x + reference_moe_mlp(t, i, _rms(x, t[p + "post_attention_layernorm.weight"], eps), cfg)
    return _rms(x, t["model.norm.weight"], eps) @ t["lm_head.weight"].T


REFERENCES = {"diffullama": reference_llama, "mmada": reference_llada, "lladamoe": reference_lladamoe,
              "lladamoe_full": reference_lladamoe, "lladamoe_noqk": reference_lladamoe}
MASK_DL = 4 + WORDS.index(DIFFULLAMA_MASK_WORD)  # the tiny LLaMA-2-like tokenizer has 4 specials, no mask token
LOAD_OPTIONS = {"diffullama": {"paradigm": "mdm", "logit_shift": 1, "mask_token_id": MASK_DL}}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {
        "diffullama": write_diffullama(root / "diffullama"),
        "mmada": write_mmada(root / "mmada"),
        "lladamoe": write_lladamoe(root / "lladamoe"),
        "lladamoe_full": write_lladamoe(root / "lladamoe_full", seed=1, shared=True, dense_layers=(1,), expert_bias=True),
        "lladamoe_noqk": write_lladamoe(root / "lladamoe_noqk", seed=2, qk_layernorm=False),
    }


@pytest.fixture(scope="module")
def family_models(family_checkpoints):
    return {name: load_model(str(path), **LOAD_OPTIONS.get(name, {})) for name, path in family_checkpoints.items()}


def _tensors(path) -> dict:
    return {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


# ---------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", list(REFERENCES))
def test_logits_equal_the_published_forward(family_checkpoints, family_models, name):
    lm, path = family_models[name], family_checkpoints[name]
    p, tgt = lm.encode_pair(PROMPT, "paris london")
    state = lm.paradigm.final_state(p, tgt)
    ids = lm.paradigm.layout(lm, [state]).input_ids
    assert (ids[0, len(p):] == lm.mask_token_id).all()
    with torch.no_grad():
        ours = lm.logits(ids)
        ref = REFERENCES[name](_tensors(path), ids, _config(path))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    # bidirectional: a later token changes the first position's logits
    changed = ids.clone()
    changed[0, -1] = lm.encode_prompt("river")[-1]
    with torch.no_grad():
        assert (lm.logits(changed)[0, 0] - ours[0, 0]).abs().max() > 1e-4
    assert lm.paradigm.name == "mdm" and lm.module.config.is_causal is False
    assert count_hooks(lm.module) == 0


def test_diffullama_shift_mask_and_recorded_overrides(family_checkpoints, family_models):
    lm = family_models["diffullama"]
    assert lm.paradigm.logit_shift == 1 and lm.adapter.family == "llama"
    mask = lm.tokenizer.convert_tokens_to_ids(DIFFULLAMA_MASK_WORD)  # an ordinary token, as id 811 is
    assert lm.mask_token_id == mask and lm.tokenizer.mask_token_id is None
    assert lm.source["overrides"] == {"paradigm": "mdm", "logit_shift": 1, "mask_token_id": mask}
    assert lm.source["paradigm"] == "mdm" and lm.source["logit_shift"] == 1 and lm.source["mask_token_id"] == mask
    p, t = lm.encode_pair(PROMPT, "paris")
    batch = lm.paradigm.layout(lm, [lm.paradigm.final_state(p, t)])
    assert batch.readout[0, 0].item() == len(p) - 1  # read one slot to the left, like Dream
    # without the flags the plain Llama config is what it says: a causal ARM
    plain = load_model(str(family_checkpoints["diffullama"]))
    assert plain.paradigm.name == "arm" and plain.module.model.layers[0].self_attn.is_causal is True
    assert "overrides" not in plain.source
    # asked to be an MDM without a mask id: neither config nor tokenizer has one — a clear error
    with pytest.raises(DlmeditError, match="needs a mask token"):
        load_model(str(family_checkpoints["diffullama"]), paradigm="mdm", logit_shift=1)
    with pytest.raises(DlmeditError, match="outside the model's vocabulary"):
        load_model(str(family_checkpoints["diffullama"]), paradigm="mdm", mask_token_id=10_000)


def test_mmada_keeps_text_backbone_and_ignores_vision(family_checkpoints, family_models, tmp_path):
    lm, cfg = family_models["mmada"], _config(family_checkpoints["mmada"])
    raw = _tensors(family_checkpoints["mmada"])
    assert lm.mask_token_id == cfg["mask_token_id"] and lm.paradigm.logit_shift == 0
    assert lm.adapter.head().weight.shape[0] == cfg["new_vocab_size"] > cfg["llm_vocab_size"]
    assert torch.equal(lm.adapter.mlp_down(2).weight, raw["model.transformer.blocks.2.ff_out.weight"])
    # bundled vision weights are dropped, anything else unknown is still an error
    shutil.copytree(family_checkpoints["mmada"], tmp_path / "m")
    extra = dict(load_file(str(tmp_path / "m" / "model.safetensors")))
    extra["vision_tower.proj.weight"] = torch.zeros(2, 2)
    from safetensors.torch import save_file

    save_file(extra, str(tmp_path / "m" / "model.safetensors"))
    assert load_model(str(tmp_path / "m")).adapter.n_layers == 3
    extra["model.transformer.blocks.0.bogus.weight"] = torch.zeros(2, 2)
    save_file(extra, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected LLaDA block parameter"):
        load_model(str(tmp_path / "m"))


def test_lladamoe_dispatch_by_architecture_and_mask(family_checkpoints, family_models):
    lm = family_models["lladamoe"]
    cfg = _config(family_checkpoints["lladamoe"])
    assert cfg["model_type"] == "llada"  # as published: only the architecture tells it from dense LLaDA
    assert lm.adapter.family == "llada-moe" and type(lm.module).__name__ == "LLaDAMoEForMaskedDiffusion"
    assert lm.mask_token_id == lm.tokenizer.convert_tokens_to_ids("<|mask|>") and lm.paradigm.logit_shift == 0
    out = lm.generate([PROMPT], max_new_tokens=3)  # LLaDA denoising through the MoE blocks
    assert len(out.sequences[0]) == len(lm.encode_prompt(PROMPT)) + 3 and lm.mask_token_id not in out.sequences[0]


# ------------------------------------------------------------------------------- MoE sites
def test_moe_sites_mean_what_the_adapter_says(family_checkpoints, family_models):
    """mlp_out = the whole MoE output (routed + shared); mlp_key @ experts_down = the routed part."""
    name = "lladamoe_full"
    lm, t, cfg = family_models[name], _tensors(family_checkpoints[name]), _config(family_checkpoints[name])
    ids = torch.tensor([lm.encode_prompt(PROMPT)])
    layer = 0
    ops = [Intervention(layer, s) for s in ("mlp_key", "mlp_out")]
    with torch.no_grad(), intervene(lm.adapter, ops) as rec:
        lm.logits(ids)
    block = lm.module.model.layers[layer]
    with torch.no_grad(), intervene(lm.adapter, [Intervention(layer, "attn_out"), Intervention(layer - 1, "resid")
                                                 if layer else Intervention(layer, "embed")]) as rec2:
        lm.logits(ids)
    h = (rec2["embed.0"] if layer == 0 else rec2[f"resid.{layer - 1}"]) + rec2[f"attn_out.{layer}"]
    y = block.post_attention_layernorm(h)
    expected = reference_moe_mlp(t, layer, y, cfg)
    torch.testing.assert_close(rec[f"mlp_out.{layer}"], expected, rtol=1e-4, atol=1e-5)
    routed = rec[f"mlp_key.{layer}"] @ lm.adapter.mlp_down(layer).weight.T
    shared = block.mlp.shared_expert(y)
    torch.testing.assert_close(routed + shared, expected, rtol=1e-4, atol=1e-5)
    # each token's key has exactly top-k non-zero expert blocks
    blocks = rec[f"mlp_key.{layer}"].reshape(-1, cfg["num_experts"], cfg["expert_intermediate_size"])
    assert ((blocks.abs().sum(-1) > 0).sum(-1) == cfg["num_experts_per_tok"]).all()
    # a dense layer keeps its own down projection and key width
    assert lm.adapter.key_width(1) == cfg["dense_intermediate_size"]
    assert lm.adapter.key_width(0) == cfg["num_experts"] * cfg["expert_intermediate_size"]


def test_moe_rome_update_satisfies_its_equations(family_models, fast):
    """ΔW on the concatenated experts' down projections: (W + ΔW) k* = v*, only the experts k* is routed to
    change (no covariance), they are the ones recorded in the delta, and the routing itself is unchanged."""
    lm = family_models["lladamoe"]
    layer = 1
    editor = get_editor("rome", lm, layers=[layer], **{**fast, "use_stats": False})
    delta = editor.compute([REQ])
    s = editor.last_solves[0]
    param, transposed = lm.adapter.down_weight(layer)
    assert s["param"] == f"model.layers.{layer}.mlp.experts_down.weight"
    mlp = lm.module.model.layers[layer].mlp
    routing = delta.extra["routing"]
    assert len(routing) == 1 and routing[0]["layer"] == layer and routing[0]["top_k"] == 2
    used = routing[0]["experts"]
    assert 2 <= len(used) <= mlp.num_experts
    changed = [e for e in range(mlp.num_experts) if s["update"][:, e * mlp.width:(e + 1) * mlp.width].abs().max() > 0]
    assert changed == used  # u = k*: only the blocks of the experts k* is routed to
    ids = torch.tensor([lm.encode_prompt(PROMPT)])
    with torch.no_grad():
        with intervene(lm.adapter, [Intervention(layer, "mlp_key")]) as before:
            lm.logits(ids)
        router_before = _router_choice(lm, layer, ids)
        with delta.apply(lm.module):
            W_new = weight_matrix_view(param.detach(), transposed).double()
            torch.testing.assert_close(W_new @ s["k_star"], s["v_star"], rtol=1e-4, atol=1e-5)
            assert torch.equal(_router_choice(lm, layer, ids), router_before)
            with intervene(lm.adapter, [Intervention(layer, "mlp_key")]) as after:
                lm.logits(ids)
        torch.testing.assert_close(after[f"mlp_key.{layer}"], before[f"mlp_key.{layer}"])
    assert count_hooks(lm.module) == 0


def _router_choice(lm, layer: int, ids: torch.Tensor) -> torch.Tensor:
    mlp = lm.module.model.layers[layer].mlp
    got = {}
    handle = mlp.register_forward_pre_hook(lambda _m, a: got.setdefault("x", a[0]))
    try:
        lm.logits(ids)
    finally:
        handle.remove()
    return mlp.route(got["x"].reshape(-1, got["x"].shape[-1]))[1]


def test_moe_memit_solves_the_normal_equations_with_statistics(family_models, fast):
    lm = family_models["lladamoe_full"]  # layer 1 is dense, layers 0 and 2 MoE: key widths differ
    lam = 3.0
    reqs = [REQ, EditRequest("{} was born in", "alpha", "rome", "berlin")]
    editor = get_editor("memit", lm, layers=[0, 1, 2], mom2_update_weight=lam, **fast)
    delta = editor.compute(reqs)
    moments = editor.second_moments([0, 1, 2])
    assert [moments[i].shape[0] for i in (0, 1, 2)] == [lm.adapter.key_width(i) for i in (0, 1, 2)]
    for s in editor.last_solves:
        D = delta.deltas[s["param"]].double()
        K, R, C = s["K"].double(), s["R"].double(), moments[s["layer"]].double()
        torch.testing.assert_close(D @ (lam * C + K @ K.T), R @ K.T, rtol=1e-3, atol=1e-5)
    assert sorted({r["layer"] for r in delta.extra["routing"]}) == [0, 2]  # dense layer 1 records none
    assert {r["request"] for r in delta.extra["routing"]} == {0, 1}


# ---------------------------------------------------------------------------- smoke: tools
@pytest.mark.parametrize("name", FAMILIES)
def test_tracing_runs_and_restoring_matters(family_models, name):
    from dlmedit.trace import TraceConfig, build_plan, run_plan, trace_fact
    from dlmedit.trace.reference import reference_run_plan

    lm = family_models[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace = trace_fact(lm, PROMPT, "france", "paris",
                           TraceConfig(sites=("resid", "mlp_out", "attn_out"), samples=2, window=1, seed=0))
    assert set(trace.scores) == {"resid", "mlp_out", "attn_out"}
    for site, scores in trace.scores.items():
        assert scores.shape == (len(trace.tokens), lm.n_layers), site
        assert np.isfinite(scores).all() and float(np.ptp(scores)) > 0, site
    assert trace.clean != trace.corrupted  # the subject's corruption moves the readout
    # the batched tracer equals the per-cell reference on this family too (MoE: mlp_out = the whole MoE output)
    plan = build_plan(lm, PROMPT, "france", "paris", sites=("resid", "mlp_out", "attn_out"), samples=2, window=2, seed=1)
    fast, ref = run_plan(lm, plan), reference_run_plan(lm, plan)
    np.testing.assert_allclose(fast.scores, ref.scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fast.corrupted, ref.corrupted, atol=1e-5, rtol=0)
    assert count_hooks(lm.module) == 0


@pytest.mark.parametrize("method", ["rome", "memit"])
@pytest.mark.parametrize("name", FAMILIES)
def test_edit_moves_the_fact_and_reverts_exactly(family_models, fast, name, method):
    lm = family_models[name]
    before_state = {k: v.clone() for k, v in lm.module.state_dict().items()}
    before = lm.score([PROMPT], ["london"])[0].total
    # random-init MLP outputs are tiny (‖v‖ ≈ 0.01), so ROME's clamp of δ at 4‖v‖ would forbid any visible change;
    # u = k* (no statistics: on a random model C⁻¹k* also fires at the answer slots, whose keys look alike);
    # MEMIT keys on the readout column as the twins' config does (a random model barely carries the subject there)
    options = {"layers": [1], "v_steps": 12, "kl_factor": 0.0, "clamp_norm_factor": 1e4, "v_weight_decay": 0.0,
               "use_stats": False}
    if method == "memit":
        options |= {"layers": [0, 1], "mom2_update_weight": 1.0, "fact_token": "readout", "use_stats": True}
    delta = get_editor(method, lm, **{**fast, **options}).compute([REQ])
    handle = delta.apply(lm.module)
    after = lm.score([PROMPT], ["london"])[0].total
    handle.revert()
    assert after > before + 0.3, (before, after)
    for k, v in lm.module.state_dict().items():
        assert torch.equal(v, before_state[k]), k


@pytest.mark.parametrize("name", FAMILIES)
def test_edit_memory_at_resid_lowers_the_fact_and_detaches_exactly(family_models, name):
    from dlmedit.memory import MemoryFact, ResidualMemory, UnknownFactWarning

    lm = family_models[name]
    facts = [MemoryFact(PROMPT, "france", "paris"), MemoryFact("alpha was born in", "alpha", "berlin")]
    ids = torch.tensor([lm.encode_prompt(PROMPT) + [lm.mask_token_id] * 2])
    with torch.no_grad():
        clean = lm.logits(ids)
    before = [r.total for r in lm.score([f.prompt for f in facts], [f.answer for f in facts])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownFactWarning)
        memory = ResidualMemory(lm, layer=1, alpha=1.0, lam=0.01)
        memory.insert(facts)
    with memory.attached():
        after = [r.total for r in lm.score([f.prompt for f in facts], [f.answer for f in facts])]
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    with torch.no_grad():
        assert torch.equal(lm.logits(ids), clean)
    assert count_hooks(lm.module) == 0


# --------------------------------------------------------------------------------- bad input
def test_moe_checkpoint_with_missing_experts(tmp_path):
    path = write_lladamoe(tmp_path / "m", drop=("model.layers.2.mlp.experts.3.down_proj.weight",
                                               "model.layers.2.mlp.experts.1.up_proj.weight"))
    with pytest.raises(MissingExpertsError, match=r"layer 2 lacks the weights of 2 of its 4 experts \(experts 1, 3\)"):
        load_model(str(path))
    path = write_lladamoe(tmp_path / "r", drop=("model.layers.0.mlp.gate.weight",))
    with pytest.raises(MissingExpertsError, match="router"):
        load_model(str(path))
    path = write_lladamoe(tmp_path / "s", shared=True, drop=("model.layers.1.shared_expert.down_proj.weight",
                                                             "model.layers.1.shared_expert.up_proj.weight",
                                                             "model.layers.1.shared_expert.gate_proj.weight"))
    with pytest.raises(MissingExpertsError, match="shared expert"):
        load_model(str(path))


def test_moe_config_the_native_modules_cannot_reproduce(tmp_path):
    path = write_lladamoe(tmp_path / "m")
    cfg = _config(path)
    cfg["clip_qkv"] = 8.0
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedMoEConfigError, match="clip_qkv"):
        load_model(str(path))


def test_unknown_model_type_with_auto_map_needs_remote_code(tmp_path):
    path = write_lladamoe(tmp_path / "m")
    cfg = _config(path)
    cfg["model_type"], cfg["architectures"] = "llada2_moe", ["LLaDA2MoeModelLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RemoteCodeRequiredError, match="trust_remote_code"):
        load_model(str(path))


# ------------------------------------------------------------------------------ chat templates
CHAT_RENDERED = {
    "llada": "<|bos|><|start_header_id|>user<|end_header_id|>\n\nthe capital of france is<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "dream": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nthe capital of france is"
             "<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize("family,writer", [("llada", write_llada_instruct), ("dream", write_dream_instruct)])
def test_instruct_chat_template_through_the_tokenizer(tmp_path, family, writer):
    lm = load_model(str(writer(tmp_path / "m")))
    text = chat_prompt(lm.tokenizer, PROMPT)
    assert text == CHAT_RENDERED[family]
    ids = lm.encode_prompt(text)
    tokens = lm.tokenizer.convert_ids_to_tokens(ids)
    assert "<|unk|>" not in tokens and tokens.count("<|bos|>") == (family == "llada")
    assert math.isfinite(lm.score([text], ["paris"])[0].total)


def test_chat_prompt_does_not_double_bos():
    """A tokenizer that adds BOS itself gets the template's leading BOS text removed."""
    from tiny_models import LLADA_INSTRUCT_TEMPLATE, build_tokenizer
    from tokenizers import processors

    tok = build_tokenizer(extra_specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                          extra_words=("user", "assistant"), chat_template=LLADA_INSTRUCT_TEMPLATE)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)])
    text = chat_prompt(tok, PROMPT)
    assert text == CHAT_RENDERED["llada"].removeprefix("<|bos|>")
    assert tok(text)["input_ids"].count(tok.bos_token_id) == 1


def test_chat_on_a_base_model_is_refused(family_models):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        chat_prompt(family_models["mmada"].tokenizer, PROMPT)


# ------------------------------------------------------------------------------------- CLI
def test_cli_models_lists_the_families():
    from typer.testing import CliRunner

    from dlmedit.cli.main import app

    out = CliRunner().invoke(app, ["models"], env={"COLUMNS": "240"})
    assert out.exit_code == 0, out.output
    for word in ("llada-moe", "mmada", "diffullama", "LLaDAMoEModelLM", "--logit-shift 1"):
        assert word in out.output


def test_cli_paradigm_logit_shift_and_chat(family_checkpoints, tmp_path):
    from typer.testing import CliRunner

    from dlmedit.cli.main import app

    runner = CliRunner()
    out = runner.invoke(app, ["score", "-m", str(family_checkpoints["diffullama"]), "-p", PROMPT, "-t", "paris",
                              "--paradigm", "mdm", "--logit-shift", "1", "--mask-token-id", str(MASK_DL), "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    assert payload["source"]["overrides"] == {"paradigm": "mdm", "logit_shift": 1, "mask_token_id": MASK_DL}
    out = runner.invoke(app, ["score", "-m", str(family_checkpoints["diffullama"]), "-p", PROMPT, "-t", "paris",
                              "--logit-shift", "2"])
    assert out.exit_code != 0 and "--logit-shift" in out.output
    instruct = write_llada_instruct(tmp_path / "li")
    out = runner.invoke(app, ["generate", "-m", str(instruct), "-p", PROMPT, "--chat", "--max-new-tokens", "2",
                              "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["chat"] is True
    out = runner.invoke(app, ["generate", "-m", str(family_checkpoints["mmada"]), "-p", PROMPT, "--chat"])
    assert out.exit_code != 0 and "chat template" in out.output
    out = runner.invoke(app, ["edit", "-m", str(family_checkpoints["diffullama"]), "--method", "rome", "--prompt", PROMPT,
                              "--subject", "france", "--target-new", "london", "--paradigm", "mdm", "--logit-shift", "1",
                              "--mask-token-id", str(MASK_DL),
                              "--hparam", "use_stats=false", "--hparam", "context_n=0", "--hparam", "v_steps=2",
                              "--layers", "1", "--out", str(tmp_path / "edit")])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "edit" / "delta.safetensors").is_file()


def test_existing_llada_checkpoint_is_not_taken_for_moe(tmp_path):
    lm = load_model(str(write_checkpoint("llada", tmp_path / "l")))
    assert lm.adapter.family == "llama" and lm.paradigm.logit_shift == 0
