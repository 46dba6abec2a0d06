"""Hyper-parameters of the edit methods: YAML defaults per method, overridden per paradigm, family and model.

Why a file per method (``dlmedit/configs/<method>.yaml``) instead of constants in the
code: users compare against published settings and tune for their model; they should
read and change numbers in one place, and a run records the exact merged dict in its
``EditDelta``.  Layout of a config file::

    default:            # every key the method accepts, with its default
      v_lr: 0.5
    paradigm:           # by lm.paradigm.name (arm | mdm)
      mdm: {v_steps: 120}
    family:             # by lm.adapter.family (llama, qwen2, gpt2, llada, dream, ...)
      llama: {layers: [4]}
    model:              # by model identity: "twin:<role>" for the built-in twins
      twin:mdm: {...}   # (role from the checkpoint's dlmedit_twin), or lm.name

Sections are applied in that order (later wins), then the caller's overrides.  A key
that is not in ``default`` is rejected with the list of known keys, so a typo in
``--hparam`` never silently does nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dlmedit.errors import DlmeditError

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel

__all__ = [
    "CONFIG_DIR",
    "EditConfigError",
    "LayerOutOfRangeError",
    "load_hparams",
    "model_keys",
    "parse_hparam_overrides",
    "resolve_layers",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
_SECTIONS = ("default", "paradigm", "family", "model")


class EditConfigError(DlmeditError, ValueError):
    """An edit hyper-parameter is unknown, malformed or out of its valid range."""


class LayerOutOfRangeError(DlmeditError, IndexError):
    """A requested edit layer does not exist in the model."""


@cache
def _read_config(method: str) -> dict[str, Any]:
    path = CONFIG_DIR / f"{method}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise EditConfigError(f"no hyper-parameter file for method {method!r} at {path} (known: {known})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not isinstance(data.get("default"), dict):
        raise EditConfigError(f"{path} must be a mapping with a 'default:' section")
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise EditConfigError(f"{path}: unknown sections {sorted(unknown)}; use {', '.join(_SECTIONS)}")
    return data


def model_keys(lm: LanguageModel) -> list[str]:
    """Names under which a model's ``model:`` overrides are looked up (most generic first)."""
    keys = []
    twin = getattr(getattr(lm.module, "config", None), "dlmedit_twin", None)
    if isinstance(twin, Mapping) and twin.get("role"):
        keys.append(f"twin:{twin['role']}")
    if lm.name:
        keys.append(lm.name)
    return keys


def load_hparams(method: str, lm: LanguageModel | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merged hyper-parameters of ``method`` for ``lm`` (defaults → paradigm → family → model → overrides)."""
    data = _read_config(method)
    merged = dict(data["default"])
    if lm is not None:
        lookups = [("paradigm", [lm.paradigm.name]), ("family", [lm.adapter.family]), ("model", model_keys(lm))]
        for section, names in lookups:
            table = data.get(section) or {}
            for name in names:
                if name in table:
                    merged.update(_check_keys(method, table[name] or {}, merged, f"{section}.{name}"))
    if overrides:
        merged.update(_check_keys(method, dict(overrides), merged, "overrides"))
    return merged


def _check_keys(method: str, values: Mapping[str, Any], known: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise EditConfigError(
            f"unknown {method} hyper-parameter(s) {unknown} in {where}; known: {', '.join(sorted(known))}"
        )
    return dict(values)


def parse_hparam_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["v_lr=0.1", "layers=[3,4]"]`` → ``{"v_lr": 0.1, "layers": [3, 4]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EditConfigError(f"--hparam expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise EditConfigError(f"cannot parse the value of --hparam {item!r}: {exc}") from None
    return out


def resolve_layers(lm: LanguageModel, layers: int | float | Sequence[int | float] | None, what: str = "layers") -> list[int]:
    """Absolute layer indices from ints (negative counts from the end) or depth fractions in (0, 1).

    Fractions let one family default (``0.2`` = a fifth of the way up) serve models of
    different depths — SmolLM2's 30 layers and a 6-layer twin alike.
    """
    if layers is None:
        raise EditConfigError(f"no {what} given and no default could be determined")
    items = [layers] if isinstance(layers, (int, float)) and not isinstance(layers, bool) else list(layers)
    if not items:
        raise EditConfigError(f"{what} is empty")
    n = lm.n_layers
    out: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise EditConfigError(f"{what} entries must be layer indices or depth fractions, got {item!r}")
        if isinstance(item, float) and not item.is_integer():
            if not 0.0 < item < 1.0 or not math.isfinite(item):
                raise EditConfigError(f"a fractional layer must be in (0, 1), got {item}")
            index = round(item * (n - 1))
        else:
            index = int(item)
            if not -n <= index < n:
                raise LayerOutOfRangeError(
                    f"layer index {index} out of range for a model with {n} layers (valid: 0..{n - 1}, or -1..-{n})"
                )
            index %= n
        out.append(index)
    if len(set(out)) != len(out):
        raise EditConfigError(f"{what} {items} name the same layer twice (resolved: {out})")
    return out
