"""``EditDelta``: the result of every weight edit — apply, revert bit-exactly, save, load.

Why a value object instead of editing the model in place: studies apply an edit,
evaluate, and must return to the *exact* original weights before the next edit (or
keep stacking edits for sequential editing).  Subtracting a float delta does not undo
an addition exactly (``(w + d) − d ≠ w`` in floating point), so :meth:`EditDelta.apply`
keeps a copy of every parameter it touches and :meth:`AppliedDelta.revert` copies it
back.  Deltas are stored per parameter name, in the parameter's own layout, as
safetensors plus a JSON sidecar with the method, hyper-parameters, requests and a
fingerprint of the model they were computed on, so a delta is never silently applied
to a different model.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

from dlmedit.cache import atomic_save_safetensors, atomic_write_json, sha256_file
from dlmedit.edit.errors import DeltaFormatError, ModelMismatchError, RevertError
from dlmedit.models.fingerprint import model_fingerprint

__all__ = [
    "DELTA_JSON",
    "DELTA_TENSORS",
    "AppliedDelta",
    "EditDelta",
    "model_fingerprint",
    "to_param_layout",
    "weight_matrix_view",
]

DELTA_TENSORS = "delta.safetensors"
DELTA_JSON = "delta.json"
_FORMAT = "dlmedit.EditDelta"
_FORMAT_VERSION = 1
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- helpers
def _dlmedit_version() -> str:
    import dlmedit

    version = getattr(dlmedit, "__version__", None)
    if version:
        return str(version)
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _pkg_version

    try:
        return _pkg_version("dlmedit")
    except PackageNotFoundError:  # not installed as a distribution (source checkout)
        return "0+unknown"


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _to_jsonable(obj: Any, what: str) -> Any:
    """Canonicalise ``obj`` through JSON so that save → load round-trips compare equal."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    try:
        return json.loads(json.dumps(obj, allow_nan=False, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"EditDelta {what} must be JSON-serialisable: {exc}") from exc


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return _dtype_name(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise DeltaFormatError(f"unknown dtype {name!r} in {DELTA_JSON}")
    return dtype


def _get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError as exc:
        prefix = name.rsplit(".", 2)[0]
        close = [n for n, _ in model.named_parameters() if n.startswith(prefix)][:5]
        hint = f" Parameters with a similar prefix: {close}." if close else ""
        raise ValueError(
            f"the model ({type(model).__name__}) has no parameter named {name!r}: the delta was "
            f"computed for a different architecture or naming.{hint}"
        ) from exc


def weight_matrix_view(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """View a 2-D weight in the ``[d_out, d_in]`` convention the solves use.

    ``transposed=True`` for GPT-2 style ``Conv1D`` weights, stored ``[d_in, d_out]``.
    The result is a view: writing into it writes the parameter.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(weight.shape)}")
    return weight.T if transposed else weight


def to_param_layout(matrix: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Convert a ``[d_out, d_in]`` update into the parameter's own storage layout."""
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D update matrix, got shape {tuple(matrix.shape)}")
    return (matrix.T if transposed else matrix).contiguous()


# --------------------------------------------------------------------------- applied handle
# model -> its live (applied, not yet reverted) handles in application order.  Weak keys
# so the registry never keeps a model alive; handles reference the model weakly too.
_LIVE: weakref.WeakKeyDictionary[nn.Module, list[AppliedDelta]] = weakref.WeakKeyDictionary()


class AppliedDelta:
    """Handle for one application of an :class:`EditDelta`; reverts it bit-exactly.

    Holds a copy of each touched parameter as it was *before* the apply.  Reverting
    copies them back, so the weights are restored exactly, however many edits were
    stacked in between — provided edits are reverted last-applied-first.  Reverting out
    of order, or after anything else modified those weights in place, would silently
    discard the later changes, so it raises :class:`RevertError` instead (use
    ``force=True`` to restore anyway).  Usable as a context manager.
    """

    def __init__(
        self,
        model: nn.Module,
        delta: EditDelta,
        originals: dict[str, torch.Tensor],
        versions: dict[str, int],
        predecessors: dict[str, AppliedDelta | None],
    ) -> None:
        self._model_ref = weakref.ref(model)
        self.delta = delta
        self._originals = originals
        self._versions = versions
        # For each param: the handle applied just before us whose post-apply state our
        # originals equal (None if something else modified the weight in between).
        self._predecessors = predecessors
        self.reverted = False

    @property
    def param_names(self) -> list[str]:
        return list(self._versions)

    def revert(self, *, force: bool = False) -> None:
        """Restore the touched parameters to their exact values before this apply."""
        if self.reverted:
            raise RevertError("this edit has already been reverted")
        model = self._model_ref()
        if model is None:
            raise RevertError("the model this edit was applied to no longer exists")
        params = {name: _get_parameter(model, name) for name in self._originals}
        for name, p in params.items():
            orig = self._originals[name]
            if p.shape != orig.shape or p.dtype != orig.dtype:
                raise RevertError(
                    f"parameter {name!r} changed shape/dtype since the edit was applied "
                    f"({tuple(orig.shape)} {orig.dtype} → {tuple(p.shape)} {p.dtype}); "
                    "cannot restore it bit-exactly"
                )
            if not force and p._version != self._versions[name]:
                raise RevertError(
                    f"parameter {name!r} was modified after this edit was applied (a later edit "
                    "that is still applied, or an in-place update). Revert later edits first "
                    "(last applied, first reverted), or pass force=True to restore the "
                    "pre-edit weights anyway, discarding those changes."
                )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self._originals[name])
                pred = self._predecessors.get(name)
                if pred is not None and not pred.reverted:
                    # The weight is now exactly what `pred` left behind: it may revert next.
                    pred._versions[name] = p._version
        self.reverted = True
        self._originals = {}
        live = _LIVE.get(model)
        if live is not None and self in live:
            live.remove(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.reverted:
            self.revert()

    def __repr__(self) -> str:
        state = "reverted" if self.reverted else "applied"
        return f"AppliedDelta({self.delta.method!r}, {len(self.delta.deltas)} params, {state})"


# --------------------------------------------------------------------------- EditDelta
@dataclasses.dataclass(eq=False)
class EditDelta:
    """Additive per-parameter weight updates plus the metadata needed to reproduce them.

    ``deltas`` maps parameter names (as in ``model.named_parameters()``) to tensors of
    the parameter's own shape/layout.  ``requests`` / ``hparams`` / ``extra`` are stored
    in canonical JSON form (tuples become lists) so they survive save/load unchanged.
    ``model_hash`` is :func:`model_fingerprint` of the model the delta was computed on;
    :meth:`apply` refuses other models.
    """

    deltas: dict[str, torch.Tensor]
    method: str = "unknown"
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    requests: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    model_hash: str | None = None
    created: str = dataclasses.field(default_factory=_now_iso)
    dlmedit_version: str = dataclasses.field(default_factory=_dlmedit_version)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.deltas, Mapping):
            raise TypeError(f"deltas must be a dict of name → tensor, got {type(self.deltas).__name__}")
        clean: dict[str, torch.Tensor] = {}
        for name, t in self.deltas.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"delta names must be non-empty parameter names, got {name!r}")
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"delta for {name!r} must be a floating-point tensor, got {t!r:.80}")
            clean[name] = t.detach()
        self.deltas = clean
        if not isinstance(self.method, str):
            raise TypeError(f"method must be a string, got {type(self.method).__name__}")
        if not isinstance(self.hparams, Mapping):
            raise TypeError(f"hparams must be a dict, got {type(self.hparams).__name__}")
        self.hparams = _to_jsonable(dict(self.hparams), "hparams")
        self.requests = [_to_jsonable(r, "request") for r in self.requests]
        self.extra = _to_jsonable(dict(self.extra), "extra metadata")

    # ------------------------------------------------------------------ building
    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        deltas: Mapping[str, torch.Tensor] | None = None,
        **metadata: Any,
    ) -> EditDelta:
        """An (optionally empty) delta stamped with ``model``'s fingerprint."""
        return cls(dict(deltas or {}), model_hash=model_fingerprint(model), **metadata)

    def add_matrix(self, name: str, matrix: torch.Tensor, *, transposed: bool = False) -> None:
        """Add a ``[d_out, d_in]`` update for parameter ``name`` (accumulating if present).

        ``transposed=True`` stores it as ``[d_in, d_out]`` for ``Conv1D`` weights.
        """
        update = to_param_layout(matrix.detach(), transposed)
        if name in self.deltas:
            self.deltas[name] = _add(self.deltas[name], update, name)
        else:
            self.deltas[name] = update

    @property
    def param_names(self) -> list[str]:
        return list(self.deltas)

    def norms(self) -> dict[str, float]:
        """Frobenius norm of each parameter's update (for logs and sanity checks)."""
        return {name: float(t.double().norm()) for name, t in self.deltas.items()}

    # ------------------------------------------------------------------ apply / revert
    def apply(self, model: nn.Module, *, check_model: bool = True) -> AppliedDelta:
        """Add the updates to ``model``'s parameters in place; returns the revert handle.

        With ``check_model`` (default) and a recorded ``model_hash``, raises
        :class:`ModelMismatchError` when ``model`` is not the model the delta was
        computed on.  Note the fingerprint covers weight values, so a delta computed on
        the base model does not match a model already carrying other edits: apply
        sequential edits in the order they were computed, or compose them.
        """
        params: dict[str, nn.Parameter] = {}
        seen: dict[int, str] = {}
        for name, d in self.deltas.items():
            p = _get_parameter(model, name)
            if id(p) in seen:
                raise ValueError(
                    f"delta names {seen[id(p)]!r} and {name!r} refer to the same (tied) parameter; "
                    "store the update once"
                )
            seen[id(p)] = name
            if tuple(p.shape) != tuple(d.shape):
                raise ValueError(
                    f"delta for {name!r} has shape {tuple(d.shape)} but the parameter is "
                    f"{tuple(p.shape)} (a Conv1D weight needs the update transposed: "
                    "use add_matrix(..., transposed=True))"
                )
            params[name] = p
        if check_model and self.model_hash is not None:
            found = model_fingerprint(model)
            if found != self.model_hash:
                raise ModelMismatchError(
                    f"this {self.method} delta was computed on model {self.model_hash[:16]}… but is "
                    f"being applied to model {found[:16]}… (full hashes: recorded {self.model_hash}, "
                    f"found {found}). Load the checkpoint it was made for, apply earlier sequential "
                    "edits first, or pass check_model=False if you know they are compatible."
                )
        live = _LIVE.setdefault(model, [])
        originals: dict[str, torch.Tensor] = {}
        predecessors: dict[str, AppliedDelta | None] = {}
        for name, p in params.items():
            originals[name] = p.detach().clone()
            predecessors[name] = None
            for h in reversed(live):
                if name in h._versions:
                    predecessors[name] = h if h._versions[name] == p._version else None
                    break
        versions: dict[str, int] = {}
        with torch.no_grad():
            try:
                for name, p in params.items():
                    updated = _add(p.detach(), self.deltas[name].to(p.device), name, out_dtype=p.dtype)
                    p.copy_(updated)
                    versions[name] = p._version
            except BaseException:
                # e.g. out of memory half-way: never leave a partially applied edit behind.
                for name in versions:
                    params[name].copy_(originals[name])
                raise
        handle = AppliedDelta(model, self, originals, versions, predecessors)
        live.append(handle)
        return handle

    def revert(self, model: nn.Module, *, force: bool = False) -> None:
        """Revert the most recent still-applied application of this delta to ``model``."""
        for handle in reversed(_LIVE.get(model, [])):
            if handle.delta is self:
                handle.revert(force=force)
                return
        raise RevertError("this delta is not currently applied to the given model")

    # ------------------------------------------------------------------ composition
    def compose(self, other: EditDelta) -> EditDelta:
        """Sum of two deltas (``self`` first): shared parameters add, others are united.

        For sequential editing, ``a.compose(b)`` applied to the base model equals applying
        ``a`` then ``b`` (up to float rounding); it carries ``a``'s model hash.
        """
        if not isinstance(other, EditDelta):
            raise TypeError(f"can only compose with another EditDelta, got {type(other).__name__}")
        deltas = {name: t.clone() for name, t in self.deltas.items()}
        for name, t in other.deltas.items():
            deltas[name] = _add(deltas[name], t, name) if name in deltas else t.clone()
        methods = list(dict.fromkeys(self.method.split("+") + other.method.split("+")))
        return EditDelta(
            deltas,
            method="+".join(methods),
            hparams=self.hparams if self.hparams == other.hparams else {},
            requests=self.requests + other.requests,
            model_hash=self.model_hash if self.model_hash is not None else other.model_hash,
            extra={"composed_from": self._components() + other._components()},
        )

    @classmethod
    def compose_all(cls, deltas: Iterable[EditDelta]) -> EditDelta:
        """Compose a sequence of deltas in order (see :meth:`compose`)."""
        items = list(deltas)
        if not items:
            raise ValueError("compose_all needs at least one EditDelta")
        out = items[0]
        for d in items[1:]:
            out = out.compose(d)
        return out

    def __add__(self, other: EditDelta) -> EditDelta:
        return self.compose(other)

    def __radd__(self, other: object) -> EditDelta:
        if isinstance(other, int) and other == 0:  # so that sum(deltas) works
            return self
        return NotImplemented

    def _components(self) -> list[dict[str, Any]]:
        if "composed_from" in self.extra:
            return list(self.extra["composed_from"])
        return [
            {
                "method": self.method,
                "hparams": self.hparams,
                "n_requests": len(self.requests),
                "model_hash": self.model_hash,
                "created": self.created,
            }
        ]

    # ------------------------------------------------------------------ persistence
    def metadata(self) -> dict[str, Any]:
        """The JSON sidecar content (without the tensor checksum)."""
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "method": self.method,
            "hparams": self.hparams,
            "requests": self.requests,
            "model_hash": self.model_hash,
            "created": self.created,
            "dlmedit_version": self.dlmedit_version,
            "extra": self.extra,
            "tensors": {
                name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for name, t in self.deltas.items()
            },
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``delta.safetensors`` and ``delta.json`` into ``directory`` (atomically each).

        The JSON is written last and records the tensor file's sha256, so a directory
        whose save was interrupted, or whose two files come from different saves, is
        rejected by :meth:`load` instead of being half-read.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensor_path = out / DELTA_TENSORS
        atomic_save_safetensors(
            tensor_path,
            self.deltas,
            metadata={"format": _FORMAT, "method": self.method},
        )
        meta = self.metadata()
        meta["tensors_sha256"] = sha256_file(tensor_path)
        atomic_write_json(out / DELTA_JSON, meta)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> EditDelta:
        """Load a delta written by :meth:`save`, verifying it is complete and consistent."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        src = Path(directory)
        json_path, tensor_path = src / DELTA_JSON, src / DELTA_TENSORS
        if not json_path.is_file() or not tensor_path.is_file():
            raise DeltaFormatError(
                f"{src} is not a saved EditDelta: expected {DELTA_JSON} and {DELTA_TENSORS} "
                "(an interrupted save leaves no delta.json)"
            )
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DeltaFormatError(f"{json_path} is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise DeltaFormatError(f"{json_path} does not describe an EditDelta (format={meta.get('format')!r})")
        if meta.get("format_version") != _FORMAT_VERSION:
            raise DeltaFormatError(
                f"{json_path} has format version {meta.get('format_version')!r}; this dlmedit reads "
                f"version {_FORMAT_VERSION}"
            )
        expected_sha = meta.get("tensors_sha256")
        if expected_sha is not None and sha256_file(tensor_path) != expected_sha:
            raise DeltaFormatError(
                f"{tensor_path} does not match the checksum recorded in {json_path}: the file is "
                "corrupt or from a different save"
            )
        try:
            tensors = load_file(str(tensor_path), device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise DeltaFormatError(f"cannot read {tensor_path}: {exc}") from exc
        spec = meta.get("tensors", {})
        if set(spec) != set(tensors):
            raise DeltaFormatError(f"{tensor_path} holds {sorted(tensors)} but {json_path} lists {sorted(spec)}")
        for name, info in spec.items():
            t = tensors[name]
            if list(t.shape) != list(info["shape"]) or t.dtype != _dtype_from_name(info["dtype"]):
                raise DeltaFormatError(
                    f"tensor {name!r} is {tuple(t.shape)} {t.dtype} but {json_path} says "
                    f"{tuple(info['shape'])} {info['dtype']}"
                )
        return cls(
            {name: tensors[name] for name in spec},  # keep the saved order
            method=meta.get("method", "unknown"),
            hparams=meta.get("hparams", {}),
            requests=meta.get("requests", []),
            model_hash=meta.get("model_hash"),
            created=meta.get("created", ""),
            dlmedit_version=meta.get("dlmedit_version", ""),
            extra=meta.get("extra", {}),
        )

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {tuple(t.shape)}" for n, t in list(self.deltas.items())[:4])
        more = f", … (+{len(self.deltas) - 4})" if len(self.deltas) > 4 else ""
        return f"EditDelta(method={self.method!r}, {{{shapes}{more}}}, requests={len(self.requests)})"


def _add(a: torch.Tensor, b: torch.Tensor, name: str, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a + b computed in at least float32 (half-precision sums lose small updates)."""
    if a.shape != b.shape:
        raise ValueError(f"cannot add updates for {name!r}: shapes {tuple(a.shape)} and {tuple(b.shape)}")
    work = torch.promote_types(a.dtype, b.dtype)
    if work in _LOW_PRECISION:
        work = torch.float32
    total = a.to(work) + b.to(device=a.device, dtype=work)
    return total.to(out_dtype) if out_dtype is not None else total
