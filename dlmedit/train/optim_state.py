"""An optimizer's state as safetensors + JSON (never pickle), for resumable training runs.

Why one module: the twin trainer and the ARM → MDM adaptation both checkpoint AdamW
state so a killed run resumes bit-exactly; ``torch.save`` would pickle it, which a user
must never be asked to load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["load_optimizer_state", "save_optimizer_state"]


def save_optimizer_state(opt: torch.optim.Optimizer, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``optimizer.safetensors`` (tensors) and ``state.json`` (param groups, scalars, ``extra``) into ``folder``."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    save_file(tensors, str(Path(folder) / "optimizer.safetensors"))
    meta = {**(extra or {}), "opt_param_groups": sd["param_groups"], "opt_scalars": scalars}
    (Path(folder) / "state.json").write_text(json.dumps(meta, indent=1))


def load_optimizer_state(opt: torch.optim.Optimizer, folder: Path) -> dict[str, Any]:
    """Restore ``opt`` from :func:`save_optimizer_state`'s files; returns the ``state.json`` contents."""
    meta = json.loads((Path(folder) / "state.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for k, v in load_file(str(Path(folder) / "optimizer.safetensors")).items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for k, v in meta["opt_scalars"].items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["opt_param_groups"]})
    return meta
