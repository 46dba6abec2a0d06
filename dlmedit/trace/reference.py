"""The slow ground truth for causal tracing: one forward per cell, exactly as ROME's loop.

Why keep it in the package: the batched tracer (`dlmedit.trace.core`) takes shortcuts
(rows grown mid-forward, no-op cells, readout-only head) whose only justification is
that they do not change the numbers.  Tests and `bench/trace.py` check that against
this file, which takes none: for every (site, layer, token) cell it runs one forward
of the clean rows plus the corrupted rows (one per state × noise sample), copies the
clean rows' activation into the corrupted rows at the restored layer(s) and token, as
ROME's `trace_with_patch` does, and reads the target log-probs through the paradigm's
`TargetBatch` from full logits.  Do not optimise it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from dlmedit.interventions import Intervention, intervene
from dlmedit.trace.core import PlanResult, TraceStats
from dlmedit.trace.plan import TracePlan

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel

__all__ = ["reference_run_plan"]


def _readout_value(lp: torch.Tensor, terms: tuple[tuple[int, int], ...], how: str, K: int, S: int) -> float:
    """lp: [K*S, Lt] log-probs of the corrupted rows (state-major).  Mean over samples of the readout."""
    values = []
    for s in range(S):
        picked = [float(lp[k * S + s, j]) for k, j in terms]
        if how == "joint":
            values.append(float(np.exp(sum(picked))))
        else:
            values.append(float(np.mean(np.exp(picked))))
    return float(np.mean(values))


@torch.no_grad()
def reference_run_plan(lm: LanguageModel, plan: TracePlan) -> PlanResult:
    """Per-cell tracing of ``plan``: 3·T·L forwards (for three sites), one cell each."""
    started = time.perf_counter()
    K, T = plan.batch.input_ids.shape
    S, L = plan.samples, lm.n_layers
    states = list(plan.states) + [plan.states[k] for k in range(K) for _ in range(S)]
    batch = lm.paradigm.layout(lm, states).to(lm.device)
    n = len(states)
    noise = torch.zeros(n, T, lm.adapter.d_model, dtype=lm.dtype, device=lm.device)
    noisy = torch.zeros(n, T, dtype=torch.bool, device=lm.device)
    for k in range(K):
        for s in range(S):
            for c, col in enumerate(plan.subject_columns):
                noise[K + k * S + s, col] = plan.noise[s, c].to(lm.dtype)
                noisy[K + k * S + s, col] = True
    corrupt = Intervention(0, "embed", "add", mask=noisy, value=noise)
    stats = TraceStats(grow=False, head_shortcut=False)

    def forward(extra: list[Intervention]) -> torch.Tensor:
        with intervene(lm.adapter, [corrupt, *extra]):
            logits = lm.logits(batch.input_ids, batch.attention_mask)
        stats.forwards += 1
        stats.layer_rows += n * L
        return batch.target_logprobs(logits)

    base = forward([])
    top_logits = lm.logits(batch.input_ids[:K], batch.attention_mask[:K])
    rows = torch.arange(K, device=lm.device).unsqueeze(1)
    top = top_logits[rows, batch.readout[:K].clamp(min=0)].argmax(-1) == batch.target[:K]

    def patch(col: int):
        def fn(h: torch.Tensor) -> torch.Tensor:
            h = h.clone()
            for k in range(K):
                h[K + k * S : K + (k + 1) * S, col] = h[k, col]
            return h

        return fn

    R = len(plan.readouts)
    scores = np.zeros((R, len(plan.sites), T, L))
    clean = np.zeros(R)
    corrupted = np.zeros(R)
    for r, readout in enumerate(plan.readouts):
        clean_lp = base[:K].repeat_interleave(S, 0)  # clean rows, S copies so the same helper applies
        clean[r] = _readout_value(clean_lp, readout.terms, readout.combine, K, S)
        corrupted[r] = _readout_value(base[K:], readout.terms, readout.combine, K, S)
    for si, site in enumerate(plan.sites):
        for layer in range(L):
            for col in range(T):
                ops = [Intervention(j, site, "fn", fn=patch(col)) for j in plan.restored_layers(site, layer)]
                lp = forward(ops)
                stats.cells += 1
                for r, readout in enumerate(plan.readouts):
                    scores[r, si, col, layer] = _readout_value(lp[K:], readout.terms, readout.combine, K, S)
    stats.rows = stats.cells * n
    stats.seconds = time.perf_counter() - started
    return PlanResult(clean=clean, corrupted=corrupted, scores=scores, clean_top=top.cpu().numpy(), stats=stats)
