"""Read, replace or add to activations at (layer, site, positions) — the only place hooks live.

Why one module: tracing, editing, the edit memory and steering all need to look at or
change a hidden state in the middle of a forward pass.  Doing it through one context
manager guarantees hooks are removed on exit (even on exceptions) and that every
family's module tree is reached through its adapter's canonical sites.

Positions are given as a boolean mask ``[B, T]`` (or ``[T]``, broadcast over the
batch) selecting which (row, position) pairs are touched; ``None`` means all.  This
one form covers "the subject tokens", "token t of row b only" (batched causal
tracing) and "everywhere" (edit memory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from dlmedit.models.adapters import ArchitectureAdapter

Site = Literal["resid", "attn_out", "mlp_out", "mlp_key", "embed"]
SITES: tuple[str, ...] = ("resid", "attn_out", "mlp_out", "mlp_key", "embed")


@dataclass
class Intervention:
    """One operation at one site.

    kind:
      * ``read``    — record the activation (detached unless ``keep_grad``).
      * ``replace`` — set the masked positions to ``value`` ([B,T,D], [T,D] or [D]).
      * ``add``     — add ``value`` at the masked positions (differentiable: δ-optimisation).
      * ``fn``      — ``output = fn(output)``; the function sees the whole [B,T,D] tensor.
    """

    layer: int
    site: str
    kind: Literal["read", "replace", "add", "fn"] = "read"
    mask: torch.Tensor | None = None
    value: torch.Tensor | None = None
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    keep_grad: bool = False
    name: str | None = None

    @property
    def key(self) -> str:
        return self.name or f"{self.site}.{self.layer}"


@dataclass
class Recording:
    """Activations captured by ``read`` interventions, keyed by ``Intervention.key``."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors


def _expand_mask(mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = mask.to(device=hidden.device, dtype=torch.bool)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0).expand(hidden.shape[0], -1)
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"intervention mask shape {tuple(mask.shape)} does not match activations {tuple(hidden.shape[:2])}")
    return mask.unsqueeze(-1)


def _apply(op: Intervention, hidden: torch.Tensor, recording: Recording) -> torch.Tensor:
    if op.kind == "read":
        recording.tensors[op.key] = hidden if op.keep_grad else hidden.detach().clone()
        return hidden
    if op.kind == "fn":
        assert op.fn is not None, "fn intervention needs fn"
        return op.fn(hidden)
    assert op.value is not None, f"{op.kind} intervention needs a value"
    value = op.value.to(device=hidden.device, dtype=hidden.dtype)
    mask = _expand_mask(op.mask, hidden)
    if op.kind == "replace":
        value = value.expand_as(hidden) if value.dim() < hidden.dim() else value
        return value if mask is None else torch.where(mask, value, hidden)
    if op.kind == "add":
        return hidden + (value if mask is None else mask.to(hidden.dtype) * value)
    raise ValueError(f"unknown intervention kind {op.kind!r}")


def _run_ops(ops: Sequence[Intervention], hidden: torch.Tensor, recording: Recording) -> torch.Tensor:
    for op in ops:
        hidden = _apply(op, hidden, recording)
    return hidden


@contextmanager
def intervene(adapter: ArchitectureAdapter, interventions: Sequence[Intervention]) -> Iterator[Recording]:
    """Install ``interventions`` for the duration of the ``with`` block; always removes the hooks.

    Operations at the same module run in the order given.  Yields a `Recording` with
    the tensors of every ``read``.
    """
    recording = Recording()
    grouped: dict[tuple[int, str], tuple[nn.Module, str, list[Intervention]]] = {}
    for op in interventions:
        module, where = adapter.site_module(op.layer, op.site)
        grouped.setdefault((id(module), where), (module, where, []))[2].append(op)

    handles = []
    try:
        for module, where, ops in grouped.values():
            if where == "output":

                def out_hook(_m, _inp, output, ops=ops):
                    if isinstance(output, tuple):
                        return (_run_ops(ops, output[0], recording), *output[1:])
                    return _run_ops(ops, output, recording)

                handles.append(module.register_forward_hook(out_hook))
            else:

                def pre_hook(_m, args, kwargs, ops=ops):
                    if args:
                        return (_run_ops(ops, args[0], recording), *args[1:]), kwargs
                    key = next(iter(kwargs))
                    kwargs = dict(kwargs)
                    kwargs[key] = _run_ops(ops, kwargs[key], recording)
                    return args, kwargs

                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield recording
    finally:
        for handle in handles:
            handle.remove()


class ForwardStopped(Exception):
    """Raised by :func:`stop_after` to end a forward early; carries the residual stream there."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("forward stopped early")
        self.hidden = hidden


def stop_after(layer: int) -> Intervention:
    """An intervention that ends the forward at ``layer``'s output by raising `ForwardStopped`.

    Why: reading a site at layer l needs nothing above it; for an early edit layer this
    skips most of the model.  List it after every other operation of the same layer.
    """

    def stop(hidden: torch.Tensor) -> torch.Tensor:
        raise ForwardStopped(hidden)

    return Intervention(layer, "resid", "fn", fn=stop, name=f"stop.{layer}")


def count_hooks(module: nn.Module) -> int:
    """Number of forward (pre-)hooks installed anywhere in ``module`` — tests use it to prove cleanup."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
