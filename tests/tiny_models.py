"""Tiny random-weight checkpoints of every supported family, written in their published layouts.

Tests build these instead of downloading anything: a word-level tokenizer, and a
2-layer model per family saved exactly as the real checkpoints are laid out
(LLaDA's `model.transformer.blocks.*` keys with OLMo-style config fields, Dream's
`model_type: "Dream"` with Qwen2 keys and `auto_map`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

WORDS = (
    "the capital of france is paris london rome berlin a city in country river mountain was born works as "
    "teacher doctor painter speaks language red blue green and on at by for to with from north south east west "
    "alpha beta gamma delta one two three four five six seven eight nine ten"
).split()
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|mdm_mask|>", "<|unk|>"]
FAMILIES = ("llama", "qwen2", "gpt2", "llada", "dream")
MDM_FAMILIES = ("llada", "dream")


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>", unk_token="<|unk|>",
        additional_special_tokens=["<|mdm_mask|>"],
    )
    return fast


def _llama_config(vocab: int, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, **extra)


def write_checkpoint(family: str, out: Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of ``family`` to ``out`` and return it."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    mask_id = tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    out.mkdir(parents=True, exist_ok=True)
    if family == "llama":
        LlamaForCausalLM(_llama_config(vocab)).save_pretrained(out)
    elif family == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False)
        Qwen2ForCausalLM(cfg).save_pretrained(out)
    elif family == "gpt2":
        GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=64)).save_pretrained(out)
    elif family == "llada":
        model = LlamaForCausalLM(_llama_config(vocab))
        inverse = {
            "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
            "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
            "mlp.down_proj": "ff_out", "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm",
        }
        tensors = {}
        for key, value in model.state_dict().items():
            if key == "model.embed_tokens.weight":
                tensors["model.transformer.wte.weight"] = value
            elif key == "model.norm.weight":
                tensors["model.transformer.ln_f.weight"] = value
            elif key == "lm_head.weight":
                tensors["model.transformer.ff_out.weight"] = value
            else:
                _, _, layer, rest = key.split(".", 3)
                module, kind = rest.rsplit(".", 1)
                tensors[f"model.transformer.blocks.{layer}.{inverse[module]}.{kind}"] = value.contiguous()
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = {
            "model_type": "llada", "architectures": ["LLaDAModelLM"],
            "auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM"},
            "activation_type": "silu", "alibi": False, "block_type": "llama", "d_model": 32, "embedding_size": vocab,
            "vocab_size": vocab, "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
            "input_emb_norm": False, "layer_norm_type": "rms", "mask_token_id": mask_id, "max_sequence_length": 64,
            "mlp_hidden_size": 64, "mlp_ratio": 2, "n_heads": 4, "n_kv_heads": 2, "n_layers": 3, "rms_norm_eps": 1e-6,
            "rope": True, "rope_theta": 10000.0, "scale_logits": False, "weight_tying": False,
        }
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        # the remote-code repo ships a tokenizer_config that AutoTokenizer may not parse: tokenizer.json only
        tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
        return out
    elif family == "dream":
        qcfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False)
        model = Qwen2ForCausalLM(qcfg)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = qcfg.to_dict()
        cfg.update({"model_type": "Dream", "architectures": ["DreamModel"], "mask_token_id": mask_id,
                    "auto_map": {"AutoModel": "modeling_dream.DreamModel"}})
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
        return out
    else:
        raise ValueError(family)
    tokenizer.save_pretrained(out)
    return out
