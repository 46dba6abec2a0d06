"""FT-L: constrained fine-tuning of one MLP down projection (the baseline of ROME/MEMIT/EasyEdit).

ΔW (``[d_out, d_in]``) is trained with Adam on the NLL of target_new over the same
target-state rows as the value optimisation (so the MDM correction applies here too),
and clamped element-wise to |ΔW| ≤ ``norm_constraint`` after every step (the L∞
constraint of FT-L).  The model's weights are never touched during training: ΔW
enters the forward pass through interventions (out += ΔW k_t at every position), and
the result is returned as an `EditDelta` like every other method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dlmedit.data.records import EditRequest
from dlmedit.edit.delta import EditDelta
from dlmedit.edit.editor import register_editor
from dlmedit.edit.hparams import EditConfigError
from dlmedit.edit.keys import KeyedState
from dlmedit.edit.locate import LocateEditor, as_requests
from dlmedit.edit.values import build_state_rows, frozen_parameters, mlp_key_injection, rows_nll
from dlmedit.interventions import Intervention, intervene

__all__ = ["FTEditor"]


def _weight_ops(layer: int, update: torch.Tensor) -> list[Intervention]:
    """ΔW enters the forward pass as out += ΔW k_t (the weights themselves stay untouched)."""
    return mlp_key_injection(layer, lambda keys: keys @ update.T)


@register_editor
class FTEditor(LocateEditor):
    """Fine-tuning with an L∞ norm constraint on one layer's down projection."""

    name = "ft"
    config_name = "ft"

    def compute(self, requests: Sequence[EditRequest], progress: Callable[[str], None] | None = None) -> EditDelta:
        start = time.perf_counter()
        requests = as_requests(requests)
        self.validate(requests)
        layer = self.single_layer(requests)
        h = self.hparams
        eps = float(h["norm_constraint"])
        if not eps > 0:
            raise EditConfigError(f"norm_constraint must be > 0, got {eps}")
        param, transposed, pname = self.down_weight(layer)
        d_out, d_in = (param.shape[1], param.shape[0]) if transposed else tuple(param.shape)
        update = torch.zeros(d_out, d_in, device=self.lm.device, requires_grad=True)
        optimizer = torch.optim.Adam([update], lr=float(h["ft_lr"]))
        contexts = self.contexts(requests)
        n = len(requests)
        kind, n_states, refresh = str(h["target_states"]), int(h["n_states"]), int(h["refresh_every"])
        generator = torch.Generator().manual_seed(self.seed)
        batch_size = int(h["batch_size"])
        steps = int(h["ft_steps"])
        history: list[float] = []
        rows: list[KeyedState] = []

        def run(chunk: Sequence[KeyedState]) -> tuple[torch.Tensor, Any]:
            batch = self.lm.paradigm.layout(self.lm, [r.state for r in chunk]).to(self.lm.device)
            with intervene(self.lm.adapter, _weight_ops(layer, update)):
                return self.lm.logits(batch.input_ids, batch.attention_mask), batch

        def edit_ops(owner: int, subject_index: int) -> list[Intervention]:
            return _weight_ops(layer, update.detach())

        used = steps
        with frozen_parameters(self.lm):
            for step in range(steps + 1):
                if step == 0 or (kind != "final" and step % refresh == 0):
                    rows = build_state_rows(self.lm, contexts, kind, n_states, range(n), generator, edit_ops)
                optimizer.zero_grad(set_to_none=True)
                train = step < steps
                nll = rows_nll(self.lm, rows, n, run, batch_size, train)
                history.append(float(nll.mean()))
                if progress is not None:
                    progress(f"step {step}: nll {history[-1]:.4f}")
                if float(nll.max()) < float(h["early_stop_nll"]) or not train:
                    used = step
                    break
                optimizer.step()
                with torch.no_grad():
                    update.clamp_(-eps, eps)
        delta = self.new_delta(requests, extra={"layers": [layer], "nll_history": history, "steps": used,
                                                "seconds": time.perf_counter() - start})
        delta.add_matrix(pname, update.detach().to(param.dtype), transposed=transposed)
        return delta
