"""AlphaEdit (Fang et al., ICLR 2025): MEMIT with updates confined to the null space of preserved keys.

Per edited layer, P = ÛÛᵀ projects onto the eigenvectors of C = E[k kᵀ] with small
eigenvalues (directions the preserved knowledge's keys barely use), and the update
solves (P(KKᵀ + K_pK_pᵀ) + λI) Δᵀ = P K Rᵀ (:func:`~dlmedit.edit.solves.alphaedit_update`),
so Δ = ΔP leaves keys in C's dominant subspace untouched.  K_p are the keys of the
edits this editor computed before: AlphaEdit is meant for *sequential* editing, and
the editor keeps Σ K_pK_pᵀ per layer across ``compute`` calls (apply each returned
delta before computing the next; :meth:`AlphaEditEditor.reset` forgets them).

The threshold: AlphaEdit's absolute 2e-2 assumes the key scale of GPT-J/LLaMA; on
small models every eigenvalue can be above it (no null space: every update vanishes)
or far too many below it (on SmolLM2 it files up to 60 % of the keys' energy as
"null").  The default here is scale-free — the null space is the smallest
eigen-directions carrying at most ``nullspace_energy`` of trace(C)
(:func:`null_space_threshold`); ``nullspace_threshold`` sets an absolute one.
"""

from __future__ import annotations

from typing import Any

import torch

from dlmedit.edit.editor import register_editor
from dlmedit.edit.errors import StatisticsError
from dlmedit.edit.hparams import EditConfigError
from dlmedit.edit.locate import as_requests
from dlmedit.edit.memit import MEMITEditor
from dlmedit.edit.solves import alphaedit_update, null_space_projector

__all__ = ["AlphaEditEditor", "null_space_threshold"]


def null_space_threshold(C: torch.Tensor, absolute: float | None, energy: float | None) -> float:
    """Eigenvalue threshold of C's null space.

    ``absolute`` (AlphaEdit's 2e-2) is used as is when given.  Otherwise the null space
    is the smallest eigen-directions that together carry at most ``energy`` of the keys'
    energy trace(C) = E‖k‖²: for any preserved key distribution with second moment C,
    E‖P k‖² ≤ energy · E‖k‖², so ``energy`` bounds the average relative size of the
    part of a preserved key an update can still act on — a scale-free meaning that an
    absolute threshold does not have (on SmolLM2, 2e-2 puts 6–60 % of the key energy in
    the "null" space; on small models it can find no direction at all).
    """
    if absolute is not None:
        if not absolute > 0:
            raise EditConfigError(f"nullspace_threshold must be > 0, got {absolute}")
        return float(absolute)
    if energy is None or not 0 < energy < 1:
        raise EditConfigError(f"nullspace_energy must be in (0, 1) when no absolute threshold is set, got {energy}")
    eig = torch.linalg.eigvalsh(C.double())
    cum = torch.cumsum(eig.clamp(min=0), 0) / eig.clamp(min=0).sum()
    m = int((cum <= energy).sum())
    if m == 0:
        raise StatisticsError(
            f"the smallest eigen-direction of C already carries {float(cum[0]):.3g} of the key energy, more than "
            f"nullspace_energy={energy}: there is no null space to protect. Raise nullspace_energy."
        )
    if m == eig.numel():
        return float(eig[-1]) * 2 + 1e-30
    return float((eig[m - 1] + eig[m]) / 2)


@register_editor
class AlphaEditEditor(MEMITEditor):
    """Null-space constrained, sequential MEMIT; see the module docstring."""

    name = "alphaedit"
    config_name = "alphaedit"

    def __init__(self, lm: Any, seed: int = 0, **overrides: Any) -> None:
        super().__init__(lm, seed=seed, **overrides)
        if not self.hparams["use_stats"]:
            raise EditConfigError("AlphaEdit needs key statistics for its null space (use_stats must be true)")
        self._projectors: dict[int, torch.Tensor] = {}
        self.null_dims: dict[int, int] = {}
        self.prev_key_moment: dict[int, torch.Tensor] = {}
        self.n_previous = 0

    def reset(self) -> None:
        """Forget the keys of earlier edits (start a new sequence)."""
        self.prev_key_moment.clear()
        self.n_previous = 0

    def projector(self, layer: int, C: torch.Tensor) -> torch.Tensor:
        if layer not in self._projectors:
            threshold = null_space_threshold(C, self.hparams["nullspace_threshold"], self.hparams["nullspace_energy"])
            try:
                P = null_space_projector(C.double(), threshold)
            except StatisticsError as exc:
                raise StatisticsError(f"layer {layer}: {exc} (raise nullspace_energy)") from None
            self._projectors[layer] = P
            self.null_dims[layer] = round(float(torch.diagonal(P).sum()))
        return self._projectors[layer]

    def solve_layer(self, index: int, layer: int, K: torch.Tensor, R: torch.Tensor, C: torch.Tensor | None) -> torch.Tensor:
        assert C is not None
        P = self.projector(layer, C)
        prev = self.prev_key_moment.get(layer)
        return alphaedit_update(K, R, P, prev_key_moment=prev, lam=float(self.hparams["L2"]))

    def compute(self, requests: Any, progress: Any = None) -> Any:
        previous = self.n_previous
        delta = super().compute(requests, progress)
        delta.extra["null_space_dims"] = {str(k): v for k, v in self.null_dims.items()}
        delta.extra["previous_edits"] = previous
        return delta

    def replay(self, requests: Any, delta: Any) -> None:
        """Rebuild the key memory for an edit computed earlier (resumed sequential runs).

        Call with the model as it was when ``delta`` was computed (before applying it):
        the keys are re-read layer by layer with the delta's lower layers applied, exactly
        as :meth:`compute` read them, without re-running the value optimisation.
        """
        requests = as_requests(requests)
        layers = [int(i) for i in delta.extra.get("layers", self.layers(requests))]
        contexts = self.contexts(requests)
        keys: dict[int, torch.Tensor] = {}
        with self.applied_while_computing() as push:
            for layer in layers:
                keys[layer], _ = self.layer_keys(contexts, layer, layers[-1])
                _, _, pname = self.down_weight(layer)
                if pname in delta.deltas:
                    push({pname: delta.deltas[pname]})
        self.after_compute(keys)

    def after_compute(self, keys: dict[int, torch.Tensor]) -> None:
        for layer, K in keys.items():
            moment = K.double() @ K.double().T
            self.prev_key_moment[layer] = self.prev_key_moment.get(layer, torch.zeros_like(moment)) + moment
        self.n_previous += next(iter(keys.values())).shape[1] if keys else 0
