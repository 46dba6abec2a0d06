"""Load LLaDA and Dream checkpoints onto transformers' Llama / Qwen2 modules — no remote code.

Why: LLaDA is a Llama decoder stack with bidirectional attention and Dream is a
Qwen2 stack with bidirectional attention and a one-position logit shift.  Mapping
their published weights onto the native modules means the same adapter, hooks and
editors serve them as serve LLaMA and Qwen, and nobody has to enable
``trust_remote_code`` to edit them.  Key layouts follow shared/model-facts.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import LlamaConfig, Qwen2Config

from dlmedit.errors import CheckpointNotFoundError

LLADA_BLOCK_KEYS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^model\.transformer\.blocks\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded with an index)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise CheckpointNotFoundError(
                f"{path} holds only pickle weights (*.bin/*.pt); dlmedit loads safetensors only — "
                "convert them once with transformers' save_pretrained(safe_serialization=True)"
            )
        raise CheckpointNotFoundError(f"no *.safetensors weights in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def llada_config_to_hf(cfg: dict[str, Any]) -> LlamaConfig | Qwen2Config:
    """Translate LLaDA's OLMo-style config fields into a Llama (or Qwen2, for q/k/v-only biases) config."""
    if cfg.get("alibi"):
        raise ValueError("LLaDA checkpoints with ALiBi positions are not supported (rope expected)")
    n_heads = int(cfg["n_heads"])
    common = dict(
        vocab_size=int(cfg.get("embedding_size") or cfg["vocab_size"]),
        hidden_size=int(cfg["d_model"]),
        intermediate_size=int(cfg.get("mlp_hidden_size") or cfg["mlp_ratio"] * cfg["d_model"]),
        num_hidden_layers=int(cfg["n_layers"]),
        num_attention_heads=n_heads,
        num_key_value_heads=int(cfg.get("n_kv_heads") or n_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        max_position_embeddings=int(cfg.get("max_sequence_length", 4096)),
        tie_word_embeddings=bool(cfg.get("weight_tying", False)),
        hidden_act="silu",
        pad_token_id=cfg.get("pad_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
    )
    if cfg.get("include_qkv_bias") and not cfg.get("include_bias"):
        config: LlamaConfig | Qwen2Config = Qwen2Config(**common)
    else:
        config = LlamaConfig(attention_bias=bool(cfg.get("include_bias", False)), mlp_bias=bool(cfg.get("include_bias", False)), **common)
    config.rope_parameters = {"rope_type": "default", "rope_theta": common["rope_theta"]}
    return config


def llada_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename LLaDA's `model.transformer.*` keys to the Llama module layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        match = _BLOCK_RE.match(key)
        if match:
            layer, name, kind = match.groups()
            if name not in LLADA_BLOCK_KEYS:
                raise ValueError(f"unexpected LLaDA block parameter {key!r}")
            out[f"model.layers.{layer}.{LLADA_BLOCK_KEYS[name]}.{kind}"] = value
        elif key == "model.transformer.wte.weight":
            out["model.embed_tokens.weight"] = value
        elif key == "model.transformer.ln_f.weight":
            out["model.norm.weight"] = value
        elif key == "model.transformer.ff_out.weight":
            out["lm_head.weight"] = value
        else:
            raise ValueError(f"unexpected LLaDA checkpoint key {key!r}")
    return out


def dream_config_to_hf(cfg: dict[str, Any]) -> Qwen2Config:
    """Dream uses Qwen2 field names; drop its remote-code fields and build a native Qwen2 config."""
    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
    config = Qwen2Config(**fields)
    return config


def dream_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dream's keys already follow the Qwen2 layout (model.layers.i.self_attn.q_proj …)."""
    return dict(tensors)


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointNotFoundError(f"{path} has no config.json — not a checkpoint directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointNotFoundError(f"{config_file} is not valid JSON: {exc}") from exc


#: Top-level key prefixes of multimodal parts a MMaDA checkpoint may carry next to its text
#: backbone; text-only use drops them (the image tokenizer, MAGVIT-v2, is a separate model).
MMADA_VISION_PREFIXES = ("vision_tower.", "vision_model.", "mm_projector.", "vq_model.", "model.vision_tower.",
                         "model.mm_projector.")


def mmada_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MMaDA (Gen-Verse/MMaDA, ``model_type: "mmada"``, ``MMadaModelLM``) is LLaDA's module tree
    (``model.transformer.*``) with the embedding and head grown to ``new_vocab_size`` for image
    tokens.  Why keep those rows: the published forward normalises over them too, so keeping
    them keeps the text logits identical to it; a text prompt never contains image ids.
    Vision-side weights, if any are bundled, are dropped (and logged); anything else unknown
    is an error, as for LLaDA."""
    import logging

    dropped = [k for k in tensors if k.startswith(MMADA_VISION_PREFIXES)]
    if dropped:
        logging.getLogger(__name__).info("MMaDA: ignoring %d vision weights (text-only use), e.g. %s",
                                         len(dropped), dropped[0])
    return llada_state_dict({k: v for k, v in tensors.items() if not k.startswith(MMADA_VISION_PREFIXES)})
