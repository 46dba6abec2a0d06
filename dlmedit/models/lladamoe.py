"""LLaDA-MoE checkpoints on native transformers modules — no remote code.

Published layout (inclusionAI/LLaDA-MoE-7B-A1B-{Base,Instruct}; the reference is their
``modeling_lladamoe.py`` / ``configuration_lladamoe.py``, vendored in ZHZisZZ/dllm):

* config.json: ``model_type: "llada"`` (the same string as dense LLaDA — the checkpoint is
  told apart by ``architectures: ["LLaDAMoEModelLM"]``; dllm's copy renames it "lladamoe",
  which is accepted too) with OLMoE-style fields ``hidden_size``, ``num_hidden_layers``,
  ``num_attention_heads``, ``num_key_value_heads``, ``dense_intermediate_size``,
  ``expert_intermediate_size``, ``shared_expert_intermediate_size``, ``num_experts``,
  ``num_experts_per_tok``, ``moe_layer_freq`` (1 = MoE layer, 0 = dense), ``qk_layernorm``,
  ``moe_router_enable_expert_bias``, ``partial_rotary_factor``, ``clip_qkv``,
  ``rope_theta``, ``rms_norm_eps``, ``attention_bias``, ``tie_word_embeddings``.
* keys: ``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
  ``self_attn.{q,k}_norm`` (RMSNorm over each head's ``head_dim``, before RoPE),
  ``input_layernorm``, ``post_attention_layernorm``, an MoE ``mlp`` with ``gate`` (router)
  and ``experts.{j}.{gate,up,down}_proj`` (or a dense ``mlp.{gate,up,down}_proj``), an
  optional *layer-level* ``shared_expert.{gate,up,down}_proj`` added ungated to the MoE
  output, ``model.norm``, ``lm_head``.
* routing: softmax of the router logits in float32, (+ ``expert_bias`` if enabled — the
  biased scores are also the weights), top-k, **no renormalisation** (the published
  block hard-codes ``norm_topk_prob = False`` whatever the config says), output
  Σ_j w_j · down_j(silu(gate_j h) · up_j h).
* attention is bidirectional; logits are not shifted; the mask token is ``<|mask|>``
  (id 156895 in the published tokenizer — asked of the tokenizer, never hard-coded).

Why transformers' Qwen3 modules: their attention is exactly LLaDA-MoE's (per-head q/k
RMSNorm before RoPE, GQA, no sliding window by default).  Its MoE siblings do not fit:
Qwen3-MoE / OLMoE have no ungated layer-level shared expert and no expert bias, OLMoE's
q/k norm spans all heads, and transformers 5 fuses their experts into 3-D tensors with no
per-expert module to hook.  So each MLP is replaced by :class:`LLaDAMoEBlock`, whose
forward is the published one with the experts' down projections laid side by side in
one matrix (see the class docstring: that is what makes the MoE layer editable).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.activations import ACT2FN

from dlmedit.errors import CheckpointNotFoundError, DlmeditError

LLADAMOE_ARCHITECTURES = ("LLaDAMoEModelLM", "LLaDAMoEModel")
LLADAMOE_MODEL_TYPES = ("lladamoe",)


class MissingExpertsError(CheckpointNotFoundError):
    """An MoE checkpoint lacks some experts' (or the router's) weights its config declares."""


class UnsupportedMoEConfigError(DlmeditError, ValueError):
    """A LLaDA-MoE config option the native modules do not reproduce (refused rather than approximated)."""


def is_lladamoe_config(cfg: dict[str, Any]) -> bool:
    """Whether a config.json describes LLaDA-MoE: by its architecture class or model_type — not by field guessing."""
    return cfg.get("model_type") in LLADAMOE_MODEL_TYPES or any(
        a in LLADAMOE_ARCHITECTURES for a in cfg.get("architectures") or ())


def moe_layers(cfg: dict[str, Any] | Any) -> list[bool]:
    """Per layer: True for a sparse MoE MLP.  ``moe_layer_freq`` is a per-layer 0/1 list in the
    published config (an int n means every n-th layer, as in OLMoE-style configs)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    n = int(get("num_hidden_layers"))
    freq = get("moe_layer_freq", None)
    if freq is None or freq == []:
        return [True] * n
    if isinstance(freq, int):
        return [freq > 0 and (i + 1) % freq == 0 for i in range(n)]
    if len(freq) != n:
        raise UnsupportedMoEConfigError(f"moe_layer_freq has {len(freq)} entries for {n} layers")
    return [bool(f) for f in freq]


def lladamoe_config_to_hf(cfg: dict[str, Any]) -> Qwen3Config:
    """A Qwen3 config carrying LLaDA-MoE's attention settings plus the MoE fields the blocks read."""
    if cfg.get("clip_qkv") is not None:
        raise UnsupportedMoEConfigError("LLaDA-MoE configs with clip_qkv are not supported (the published model has none)")
    partial = cfg.get("partial_rotary_factor")
    if partial not in (None, -1, 1, 1.0):
        raise UnsupportedMoEConfigError(f"partial_rotary_factor {partial} is not supported (RoPE on the whole head expected)")
    if cfg.get("rope_scaling"):
        raise UnsupportedMoEConfigError(f"rope_scaling {cfg['rope_scaling']!r} is not supported")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if int(cfg.get("num_experts", 0)) < 1 or int(cfg.get("num_experts_per_tok", 0)) < 1:
        raise UnsupportedMoEConfigError("a LLaDA-MoE config needs num_experts ≥ 1 and num_experts_per_tok ≥ 1")
    if int(cfg["num_experts_per_tok"]) > int(cfg["num_experts"]):
        raise UnsupportedMoEConfigError("num_experts_per_tok exceeds num_experts")
    layers = moe_layers(cfg)
    dense = cfg.get("dense_intermediate_size")
    if not all(layers) and (dense is None or int(dense) < 1):
        raise UnsupportedMoEConfigError("dense layers (moe_layer_freq 0) need dense_intermediate_size")
    config = Qwen3Config(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(dense) if dense and int(dense) > 0 else int(cfg["expert_intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=hidden // heads,
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        pad_token_id=cfg.get("pad_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
    )
    config.rope_parameters = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    shared = cfg.get("shared_expert_intermediate_size")
    config.lladamoe = {
        "num_experts": int(cfg["num_experts"]),
        "num_experts_per_tok": int(cfg["num_experts_per_tok"]),
        "expert_intermediate_size": int(cfg["expert_intermediate_size"]),
        "shared_expert_intermediate_size": int(shared) if shared is not None and int(shared) > 0 else None,
        "moe_layers": layers,
        "qk_layernorm": bool(cfg.get("qk_layernorm", False)),
        "expert_bias": bool(cfg.get("moe_router_enable_expert_bias", False)),
        "norm_topk_prob_in_config": cfg.get("norm_topk_prob"),
    }
    return config


class GatedMLP(nn.Module):
    """``down(act(gate(h)) · up(h))`` — a dense layer's MLP and the shared expert."""

    def __init__(self, hidden: int, width: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertInput(nn.Module):
    """One routed expert's input half: ``act(gate_proj(h)) · up_proj(h)`` (its down projection
    lives in :attr:`LLaDAMoEBlock.experts_down`)."""

    def __init__(self, hidden: int, width: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)


class LLaDAMoEBlock(nn.Module):
    """LLaDA-MoE's sparse MLP (router + experts + optional ungated shared expert) as one module.

    The routed part is computed as ``experts_down(K)`` where ``K = [w_1 a_1, …, w_E a_E]``
    concatenates every expert's activation ``a_j`` scaled by its routing weight ``w_j``
    (0 for experts not in the token's top-k) and ``experts_down.weight = [W_1 … W_E]`` lays
    the experts' down projections side by side: ``experts_down(K) = Σ_j w_j W_j a_j`` is the
    published output exactly.  Why: it makes the MoE layer's edit site one linear map, so
    ROME / MEMIT / AlphaEdit need no MoE-specific code — the key is the routing-weighted
    expert activations (``mlp_key``), the matrix is ``experts_down``, and because the
    router reads the layer's input, which an edit of this layer cannot change, the routing
    of every token is the same before and after the edit.  A rank-one update along k*
    touches only the blocks of the experts k* routes to (unless the key covariance mixes
    blocks in); :meth:`routing` reports them for the delta.
    """

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        moe = config.lladamoe
        hidden, act = config.hidden_size, config.hidden_act
        self.num_experts = moe["num_experts"]
        self.top_k = moe["num_experts_per_tok"]
        self.width = moe["expert_intermediate_size"]
        self.gate = nn.Linear(hidden, self.num_experts, bias=False)
        self.experts = nn.ModuleList(ExpertInput(hidden, self.width, act) for _ in range(self.num_experts))
        self.experts_down = nn.Linear(self.num_experts * self.width, hidden, bias=False)
        shared = moe["shared_expert_intermediate_size"]
        self.shared_expert = GatedMLP(hidden, shared, act) if shared else None
        if moe["expert_bias"]:
            self.register_buffer("expert_bias", torch.zeros(self.num_experts))
        else:
            self.expert_bias = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (weights [N, k] in x's dtype, expert indices [N, k]) for flat hidden states [N, H]."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        if self.expert_bias is not None:
            probs = probs + self.expert_bias.float()
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        return weights.to(x.dtype), chosen

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        weights, chosen = self.route(x)
        blocks = []
        for e, expert in enumerate(self.experts):
            hit = chosen == e
            rows = hit.any(-1).nonzero().squeeze(-1)
            block = x.new_zeros(x.shape[0], self.width)
            if rows.numel():
                w = (weights * hit).sum(-1)[rows].unsqueeze(-1)
                block = block.index_copy(0, rows, expert(x[rows]) * w)
            blocks.append(block)
        # keys keep the [B, T, ·] shape so the edit site's hooks see per-position activations
        out = self.experts_down(torch.cat(blocks, dim=-1).reshape(*shape[:-1], -1))
        if self.shared_expert is not None:
            out = out + self.shared_expert(hidden)
        return out

    def expert_blocks(self, vector: torch.Tensor) -> torch.Tensor:
        """A key-space vector [E·width] as per-expert blocks [E, width]."""
        return vector.reshape(self.num_experts, self.width)


class LLaDAMoEForMaskedDiffusion(Qwen3ForCausalLM):
    """Qwen3 attention stack whose MLPs are LLaDA-MoE's (see the module docstring).

    Built from a config made by :func:`lladamoe_config_to_hf`; q/k norms become identities
    when the checkpoint has ``qk_layernorm: false``.
    """

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__(config)
        moe = config.lladamoe
        for i, layer in enumerate(self.model.layers):
            if moe["moe_layers"][i]:
                layer.mlp = LLaDAMoEBlock(config)
            else:
                layer.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
            if not moe["qk_layernorm"]:
                layer.self_attn.q_norm = nn.Identity()
                layer.self_attn.k_norm = nn.Identity()


_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_SHARED_RE = re.compile(r"^model\.layers\.(\d+)\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight$")


def lladamoe_state_dict(tensors: dict[str, torch.Tensor], config: Qwen3Config) -> dict[str, torch.Tensor]:
    """Published keys → :class:`LLaDAMoEForMaskedDiffusion` keys.

    Experts' down projections are concatenated in expert order into
    ``mlp.experts_down.weight``; the layer-level ``shared_expert`` moves under ``mlp``.
    Raises :class:`MissingExpertsError` naming what is absent (router, experts, shared expert).
    """
    moe = config.lladamoe
    n_exp = moe["num_experts"]
    out: dict[str, torch.Tensor] = {}
    downs: dict[int, dict[int, torch.Tensor]] = {}
    seen: dict[int, set[tuple[int, str]]] = {}
    for key, value in tensors.items():
        match = _EXPERT_RE.match(key)
        if match:
            layer, expert, name = int(match.group(1)), int(match.group(2)), match.group(3)
            if expert >= n_exp or layer >= len(moe["moe_layers"]) or not moe["moe_layers"][layer]:
                raise CheckpointNotFoundError(f"unexpected expert weight {key!r} for the config "
                                              f"({n_exp} experts, moe layers {moe['moe_layers']})")
            seen.setdefault(layer, set()).add((expert, name))
            if name == "down_proj":
                downs.setdefault(layer, {})[expert] = value
            else:
                out[key] = value
            continue
        match = _SHARED_RE.match(key)
        if match:
            out[f"model.layers.{match.group(1)}.mlp.shared_expert.{match.group(2)}.weight"] = value
            continue
        out[key] = value
    for layer, is_moe in enumerate(moe["moe_layers"]):
        if not is_moe:
            continue
        present = seen.get(layer, set())
        missing = sorted({e for e in range(n_exp) for name in ("gate_proj", "up_proj", "down_proj")
                          if (e, name) not in present})
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" …" if len(missing) > 8 else "")
            raise MissingExpertsError(
                f"MoE layer {layer} lacks the weights of {len(missing)} of its {n_exp} experts (experts {shown}); "
                "the checkpoint is incomplete or its config declares more experts than it holds")
        if f"model.layers.{layer}.mlp.gate.weight" not in out:
            raise MissingExpertsError(f"MoE layer {layer} lacks its router weight model.layers.{layer}.mlp.gate.weight")
        if moe["shared_expert_intermediate_size"] and f"model.layers.{layer}.mlp.shared_expert.down_proj.weight" not in out:
            raise MissingExpertsError(f"MoE layer {layer} lacks its shared expert (shared_expert_intermediate_size is set)")
        out[f"model.layers.{layer}.mlp.experts_down.weight"] = torch.cat([downs[layer][e] for e in range(n_exp)], dim=1)
    return out


def instantiate_lladamoe(config: Qwen3Config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """Build the native module on the meta device and assign the converted weights (strict)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = LLaDAMoEForMaskedDiffusion(config)
    if config.tie_word_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointNotFoundError(f"LLaDA-MoE checkpoint does not match its config: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype)
