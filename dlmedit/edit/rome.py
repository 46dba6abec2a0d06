"""ROME (Meng et al., 2022): a rank-one update of one MLP down projection per fact.

For each request, in order (each computed on the model carrying the previous ones,
as ROME applies a list of requests):

1. k* — the down-projection input at the last subject token, averaged over the bare
   prompt and the context prefixes, read in the paradigm's target layout (``key_states``:
   in the final target state as ROME does, or averaged over ``partial`` / ``trajectory``
   states — the MDM correction applied to the key);
2. u = C⁻¹k* with C the key second moment (``use_stats: false`` → u = k*);
3. δ from the shared value optimisation at the layer's MLP output (target states and
   ``value_mode`` as configured), v* = W k* + δ;
4. ΔW = (v* − W k*) uᵀ / (uᵀk*) — :func:`~dlmedit.edit.solves.rank_one_update` — so
   (W + ΔW) k* = v*.

The layer is ``layers`` from ``configs/rome.yaml`` (one index or depth fraction, or
``trace`` for the causal-tracing peak of the requests' true facts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dlmedit.data.records import EditRequest
from dlmedit.edit.delta import EditDelta, to_param_layout, weight_matrix_view
from dlmedit.edit.editor import register_editor
from dlmedit.edit.keys import mean_keys
from dlmedit.edit.locate import LocateEditor, as_requests
from dlmedit.edit.solves import rank_one_update
from dlmedit.edit.values import RankOneInjection, optimise_values

__all__ = ["ROMEEditor", "subject_key"]


def subject_key(lm: Any, contexts: Sequence[Any], layer: int, batch_size: int = 64, key_states: str = "final",
                n_states: int = 4, seed: int = 0) -> torch.Tensor:
    """k*: mean ``mlp_key`` at the keyed token over a request's contexts × ``key_states`` target states."""
    return mean_keys(lm, [contexts], layer, key_states, n_states, seed, batch_size)[0][0]


@register_editor
class ROMEEditor(LocateEditor):
    """Rank-One Model Editing; see the module docstring."""

    name = "rome"
    config_name = "rome"
    #: per request of the last ``compute``: k*, u, δ, v*, ΔW (diagnostics and tests).
    last_solves: list[dict[str, Any]]

    def compute(self, requests: Sequence[EditRequest], progress: Callable[[str], None] | None = None) -> EditDelta:
        requests = as_requests(requests)
        self.validate(requests)
        layer = self.single_layer(requests)
        param, transposed, pname = self.down_weight(layer)
        C = self.second_moments([layer])[layer] if self.hparams["use_stats"] else None
        C_inv = torch.cholesky_inverse(torch.linalg.cholesky(C)) if C is not None else None
        settings = self.value_settings(layer, "mlp_out")
        delta = self.new_delta(requests, extra={"layers": [layer]})
        reports = []
        self.last_solves = []
        with self.applied_while_computing() as push:
            for i, request in enumerate(requests):
                contexts = self.contexts([request])
                k_star = subject_key(self.lm, contexts[0], layer, settings.batch_size, self.hparams["key_states"],
                                     settings.n_states, self.seed).double()
                self.record_routing(delta, layer, k_star, first=i)
                u = C_inv @ k_star if C_inv is not None else k_star
                injection = RankOneInjection(u.float().unsqueeze(0), k_star.float().unsqueeze(0))
                result = optimise_values(self.lm, contexts, [request.subject], settings, injection,
                                         progress=None if progress is None else lambda m, i=i: progress(f"[{i}] {m}"))
                W = weight_matrix_view(param.detach(), transposed)
                v_star = W.double() @ k_star + result.delta[0].double()
                update = rank_one_update(W, k_star, v_star, C_inv=C_inv)
                delta.add_matrix(pname, update, transposed=transposed)
                self.last_solves.append({"layer": layer, "param": pname, "k_star": k_star, "v_star": v_star,
                                         "u": u, "delta": result.delta[0], "update": update})
                push({pname: to_param_layout(update, transposed)})
                reports.append({"layer": layer, **result.describe()})
        delta.extra["values"] = reports
        return delta

