"""MEMIT (Meng et al., 2023): many facts at once, spread over several MLP layers.

1. For all requests jointly: δ at the residual stream of the *last* edited layer
   (shared value optimisation, site ``resid``), so the target z = h + δ.
2. For each edited layer l, lowest first, on the model carrying the updates of the
   layers below: keys K (mean ``mlp_key`` at the last subject token over contexts),
   the current residual h at the last layer (bare prompt), R = z − h spread over the
   layers left (:func:`~dlmedit.edit.solves.spread_residual`) and
   Δ_l = R Kᵀ(λC_l + KKᵀ)⁻¹ (:func:`~dlmedit.edit.solves.memit_update`).

Each layer's keys and the residual are read in one batched forward.  AlphaEdit reuses
all of this and only replaces the per-layer solve (:meth:`MEMITEditor.solve_layer`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dlmedit.data.records import EditRequest
from dlmedit.edit.delta import EditDelta, to_param_layout
from dlmedit.edit.editor import register_editor
from dlmedit.edit.keys import EditContext, mean_keys
from dlmedit.edit.locate import LocateEditor, as_requests
from dlmedit.edit.solves import memit_update, spread_residual
from dlmedit.edit.values import optimise_values

__all__ = ["MEMITEditor", "MEMITTargets", "layer_keys_and_residual"]


@dataclass
class MEMITTargets:
    """Result of MEMIT's first step: the layers, the contexts and the residual targets z ``[n, d_model]``."""

    layers: list[int]
    contexts: list[list[EditContext]]
    z: torch.Tensor
    values: dict[str, Any]


def layer_keys_and_residual(
    lm: Any, contexts: Sequence[Sequence[EditContext]], layer: int, z_layer: int, batch_size: int = 64,
    key_states: str = "final", n_states: int = 4, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K ``[d_mlp, n]`` (keys at ``layer`` averaged over each request's contexts × ``key_states``
    target states, :func:`~dlmedit.edit.keys.mean_keys`) and the current residual ``[n, d_model]``
    at ``z_layer`` in each request's bare prompt (final state) — one batched read."""
    K, resid = mean_keys(lm, contexts, layer, key_states, n_states, seed, batch_size, bare_site=(z_layer, "resid"))
    assert resid is not None
    return K.T.contiguous(), resid


@register_editor
class MEMITEditor(LocateEditor):
    """Mass-Editing Memory in a Transformer; see the module docstring."""

    name = "memit"
    config_name = "memit"
    #: per layer of the last ``compute``: keys K, spread residual R, ΔW (diagnostics and tests).
    last_solves: list[dict[str, Any]]

    def solve_layer(self, index: int, layer: int, K: torch.Tensor, R: torch.Tensor, C: torch.Tensor | None) -> torch.Tensor:
        """Update ``[d_out, d_in]`` of one layer from its keys and (already spread) residuals."""
        return memit_update(K, R, C, float(self.hparams["mom2_update_weight"]))

    def layer_keys(self, contexts: Sequence[Sequence[EditContext]], layer: int, z_layer: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`layer_keys_and_residual` with this editor's ``key_states`` settings."""
        return layer_keys_and_residual(self.lm, contexts, layer, z_layer, int(self.hparams["batch_size"]),
                                       str(self.hparams["key_states"]), int(self.hparams["n_states"]), self.seed)

    def after_compute(self, keys: dict[int, torch.Tensor]) -> None:
        """Hook for stateful methods (AlphaEdit remembers the keys of earlier edits)."""

    def compute(self, requests: Sequence[EditRequest], progress: Callable[[str], None] | None = None) -> EditDelta:
        requests = as_requests(requests)
        self.validate(requests)
        targets = self.fit_targets(requests, progress)
        return self.distribute(requests, targets, progress)

    def fit_targets(self, requests: Sequence[EditRequest], progress: Callable[[str], None] | None = None) -> MEMITTargets:
        """Step 1: the residual target z of every request at the last edited layer (value optimisation)."""
        layers = self.layers(requests)
        settings = self.value_settings(layers[-1], "resid")
        contexts = self.contexts(requests)
        result = optimise_values(self.lm, contexts, [r.subject for r in requests], settings, progress=progress)
        return MEMITTargets(layers, contexts, (result.init + result.delta).double(), result.describe())

    def distribute(
        self, requests: Sequence[EditRequest], targets: MEMITTargets, progress: Callable[[str], None] | None = None
    ) -> EditDelta:
        """Step 2: spread z − h over the layers, lowest first, each solve on the model carrying the ones below."""
        layers, contexts, z = targets.layers, targets.contexts, targets.z
        z_layer = layers[-1]
        moments = self.second_moments(layers) if self.hparams["use_stats"] else dict.fromkeys(layers)
        batch_size = int(self.hparams["batch_size"])
        delta = self.new_delta(requests, extra={"layers": layers, "values": targets.values})
        used_keys: dict[int, torch.Tensor] = {}
        self.last_solves = []
        residual_norms = []
        with self.applied_while_computing() as push:
            for index, layer in enumerate(layers):
                K, h = self.layer_keys(contexts, layer, z_layer)
                R = spread_residual((z - h.double()).T, len(layers) - index)
                residual_norms.append(float((z - h.double()).norm(dim=-1).mean()))
                param, transposed, pname = self.down_weight(layer)
                update = self.solve_layer(index, layer, K.double(), R, moments[layer])
                update = update.to(param.dtype)
                delta.add_matrix(pname, update, transposed=transposed)
                push({pname: to_param_layout(update, transposed)})
                used_keys[layer] = K
                self.record_routing(delta, layer, K)
                self.last_solves.append({"layer": layer, "param": pname, "K": K, "R": R, "update": update})
                if progress is not None:
                    progress(f"layer {layer}: residual {residual_norms[-1]:.4f}, ‖Δ‖ {float(update.norm()):.4f}")
            # what is left after all layers (0 = the targets are met exactly at the bare prompts)
            _, h = layer_keys_and_residual(self.lm, contexts, layers[0], z_layer, batch_size)
            residual_norms.append(float((z - h.double()).norm(dim=-1).mean()))
        delta.extra["residual_norms"] = residual_norms
        self.after_compute(used_keys)
        return delta
