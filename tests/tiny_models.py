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


def build_tokenizer(mask: str | None = "<|mdm_mask|>", extra_specials: tuple[str, ...] = (), extra_words: tuple[str, ...] = (),
                    chat_template: str | None = None, mask_attribute: bool = False) -> PreTrainedTokenizerFast:
    """The word-level test tokenizer; the new families (tests/test_families.py) ask for their own mask
    token (LLaDA-MoE ``<|mask|>``; ``None``: none at all, like LLaMA-2's), chat specials and template."""
    specials = [mask if s == "<|mdm_mask|>" else s for s in SPECIALS if mask or s != "<|mdm_mask|>"]
    specials += list(extra_specials)
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + list(extra_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>", unk_token="<|unk|>",
        additional_special_tokens=[*([mask] if mask else []), *extra_specials],
        **({"mask_token": mask} if mask_attribute and mask else {}),
    )
    if chat_template is not None:
        fast.chat_template = chat_template
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


# ----------------------------------------------------------------------- issue 16 families
# DiffuLLaMA, MMaDA and LLaDA-MoE checkpoints in their published layouts, and the Instruct
# variants' chat templates (the published templates, minus tool-calling branches).

LLADA_INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
DREAM_INSTRUCT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHAT_WORDS = ("user", "assistant", "system", "You", "are", "helpful", ".")


def _llada_block_tensors(model: LlamaForCausalLM) -> dict:
    """A Llama module's weights under LLaDA's published `model.transformer.*` keys."""
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
    return tensors


def _llada_fields(vocab: int, mask_id: int) -> dict:
    return {
        "activation_type": "silu", "alibi": False, "block_type": "llama", "d_model": 32, "embedding_size": vocab,
        "vocab_size": vocab, "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
        "input_emb_norm": False, "layer_norm_type": "rms", "mask_token_id": mask_id, "max_sequence_length": 64,
        "mlp_hidden_size": 64, "mlp_ratio": 2, "n_heads": 4, "n_kv_heads": 2, "n_layers": 3, "rms_norm_eps": 1e-6,
        "rope": True, "rope_theta": 10000.0, "scale_logits": False, "weight_tying": False,
    }


def write_llada_instruct(out: Path, seed: int = 0) -> Path:
    """LLaDA-8B-Instruct's layout: LLaDA weights and config, and a tokenizer_config.json with its chat template."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(extra_specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                                extra_words=CHAT_WORDS, chat_template=LLADA_INSTRUCT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    mask_id = tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    save_file(_llada_block_tensors(LlamaForCausalLM(_llama_config(len(tokenizer)))), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = {"model_type": "llada", "architectures": ["LLaDAModelLM"],
           "auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM"}, **_llada_fields(len(tokenizer), mask_id)}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tokenizer.save_pretrained(out)
    return out


def write_dream_instruct(out: Path, seed: int = 0) -> Path:
    """Dream-v0-Instruct's layout: Dream weights/config and a tokenizer with the Qwen2.5 ChatML template."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(extra_specials=("<|im_start|>", "<|im_end|>"), extra_words=CHAT_WORDS,
                                chat_template=DREAM_INSTRUCT_TEMPLATE)
    out.mkdir(parents=True, exist_ok=True)
    qcfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(qcfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = qcfg.to_dict()
    cfg.update({"model_type": "Dream", "architectures": ["DreamModel"],
                "mask_token_id": tokenizer.convert_tokens_to_ids("<|mdm_mask|>"),
                "auto_map": {"AutoModel": "modeling_dream.DreamModel"}})
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tokenizer.save_pretrained(out)
    return out


DIFFULLAMA_MASK_WORD = "nine"  # stands in for id 811: DiffuLLaMA masks with an ordinary vocabulary token


def write_diffullama(out: Path, seed: int = 0) -> Path:
    """DiffuLLaMA's layout: a plain LLaMA-2 checkpoint (`model_type: "llama"`, LlamaForCausalLM keys) and
    LLaMA-2's tokenizer, which has no mask token (its training code masks with the existing id 811) —
    nothing in the checkpoint says it is a diffusion model."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(mask=None)
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(_llama_config(len(tokenizer))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


MMADA_CODEBOOK = 16


def write_mmada(out: Path, seed: int = 0) -> Path:
    """MMaDA's layout: LLaDA's `model.transformer.*` tree with the embedding and head grown by the image
    codebook (`new_vocab_size` = `llm_vocab_size` + `codebook_size`), `model_type: "mmada"`,
    `architectures: ["MMadaModelLM"]` and the MMaDA config fields next to LLaDA's."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    llm_vocab = len(tokenizer)
    new_vocab = llm_vocab + MMADA_CODEBOOK
    out.mkdir(parents=True, exist_ok=True)
    mask_id = tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    save_file(_llada_block_tensors(LlamaForCausalLM(_llama_config(new_vocab))), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = {"model_type": "mmada", "architectures": ["MMadaModelLM"],
           **_llada_fields(new_vocab, mask_id),
           "llm_vocab_size": llm_vocab, "new_vocab_size": new_vocab, "codebook_size": MMADA_CODEBOOK,
           "num_vq_tokens": 4, "num_new_special_tokens": 0, "w_clip_vit": False, "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    return out


def write_lladamoe(out: Path, seed: int = 0, *, shared: bool = False, dense_layers: tuple[int, ...] = (),
                   expert_bias: bool = False, qk_layernorm: bool = True, drop: tuple[str, ...] = ()) -> Path:
    """LLaDA-MoE's layout (inclusionAI/LLaDA-MoE-7B-A1B): `model_type: "llada"` with
    `architectures: ["LLaDAMoEModelLM"]`, OLMoE-style keys, per-expert `mlp.experts.{j}.*_proj`, a
    layer-level `shared_expert` if asked, dense `mlp.*_proj` in `dense_layers`; `drop` removes keys
    (bad-input tests).  Router weights are large so routing is decisive (no near-ties)."""
    g = torch.Generator().manual_seed(seed)
    tokenizer = build_tokenizer(mask="<|mask|>")
    vocab, hidden, layers, heads, kv_heads = len(tokenizer), 32, 3, 4, 2
    n_exp, top_k, width, shared_width, dense_width = 4, 2, 16, 24, 48
    head_dim = hidden // heads

    def w(*shape, std=0.1):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    tensors = {"model.embed_tokens.weight": w(vocab, hidden, std=0.5), "model.norm.weight": 1 + w(hidden),
               "lm_head.weight": w(vocab, hidden, std=0.3)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": w(heads * head_dim, hidden, std=0.2),
                    p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden, std=0.2),
                    p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden, std=0.2),
                    p + "self_attn.o_proj.weight": w(hidden, heads * head_dim, std=0.2),
                    p + "input_layernorm.weight": 1 + w(hidden), p + "post_attention_layernorm.weight": 1 + w(hidden)}
        if qk_layernorm:
            tensors |= {p + "self_attn.q_norm.weight": 1 + w(head_dim), p + "self_attn.k_norm.weight": 1 + w(head_dim)}
        if i in dense_layers:
            tensors |= {p + "mlp.gate_proj.weight": w(dense_width, hidden, std=0.2),
                        p + "mlp.up_proj.weight": w(dense_width, hidden, std=0.2),
                        p + "mlp.down_proj.weight": w(hidden, dense_width, std=0.2)}
            continue
        tensors[p + "mlp.gate.weight"] = w(n_exp, hidden, std=1.0)
        if expert_bias:
            tensors[p + "mlp.expert_bias"] = w(n_exp, std=0.05)
        for e in range(n_exp):
            tensors |= {p + f"mlp.experts.{e}.gate_proj.weight": w(width, hidden, std=0.2),
                        p + f"mlp.experts.{e}.up_proj.weight": w(width, hidden, std=0.2),
                        p + f"mlp.experts.{e}.down_proj.weight": w(hidden, width, std=0.2)}
        if shared:
            tensors |= {p + "shared_expert.gate_proj.weight": w(shared_width, hidden, std=0.2),
                        p + "shared_expert.up_proj.weight": w(shared_width, hidden, std=0.2),
                        p + "shared_expert.down_proj.weight": w(hidden, shared_width, std=0.2)}
    for key in drop:
        del tensors[key]
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "architectures": ["LLaDAMoEModelLM"], "model_type": "llada",
        "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig",
                     "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                     "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
        "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
        "dense_intermediate_size": dense_width, "expert_intermediate_size": width,
        "shared_expert_intermediate_size": shared_width if shared else None,
        "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02, "max_position_embeddings": 64,
        "moe_layer_freq": [0 if i in dense_layers else 1 for i in range(layers)],
        "moe_router_enable_expert_bias": expert_bias, "moe_router_score_function": "softmax",
        "norm_topk_prob": True, "num_attention_heads": heads, "num_experts": n_exp, "num_experts_per_tok": top_k,
        "num_hidden_layers": layers, "num_key_value_heads": kv_heads, "output_router_logits": False,
        "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        "partial_rotary_factor": 1, "qk_layernorm": qk_layernorm, "rms_norm_eps": 1e-6, "rope_scaling": None,
        "rope_theta": 50000, "routed_scaling_factor": 1, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
        "torch_dtype": "float32", "use_cache": False, "vocab_size": vocab,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tokenizer.save_pretrained(out)
    return out
