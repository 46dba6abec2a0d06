"""Temporal tracing: causal tracing at every state a masked-diffusion model passes through.

Why: an MDM does not produce its answer in one state.  It starts with every answer
slot masked and reveals tokens over denoising steps, and the place where the subject's
information is needed may move with the step.  We trace (layer × step × site): at
step k the input is the k-th state of the clean denoising trajectory of the *target*
and the readout is the mean probability of the target tokens still masked at that
step — the Temporal Indirect Effect (TIE) is that readout with one cell restored
minus its corrupted value.

Which trajectory: ``paradigm.target_states(kind="trajectory")``, i.e. the paradigm's
``reveal_paths(order="confidence")`` — the low-confidence sampler's order of
commitment, but committing the true target's tokens.  We use it rather than
``generate(return_trajectory=True)`` because the sampler may produce a different
answer than the target, and a trace must read the target's probability; for a
correctly predicted target under one-token-per-step greedy denoising both orders
coincide.  An ARM has a single state, so the same code gives one step (every
target token read under teacher forcing) without any special case.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dlmedit.trace.core import TraceConfig, trace_fact
from dlmedit.trace.results import CATEGORIES, FactTrace, average_temporal, by_category

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel

__all__ = ["average_temporal", "temporal_grid", "trace_temporal"]


def trace_temporal(
    lm: LanguageModel, prompt: str, subject: str, target: str | None = None, config: TraceConfig = TraceConfig()
) -> FactTrace:
    """`trace_fact` with temporal tracing on; the result's ``temporal`` holds one `StepTrace` per step."""
    return trace_fact(lm, prompt, subject, target, TraceConfig(**{**config.__dict__, "temporal": True}))


def temporal_grid(trace: FactTrace, site: str, category: str = "last subject token") -> np.ndarray:
    """[steps, layers] TIE of one fact for the columns of ``category`` (mean over them; NaN if none)."""
    if not trace.temporal:
        raise ValueError("this trace has no temporal steps; trace with temporal=True")
    if category not in CATEGORIES:
        raise ValueError(f"unknown token category {category!r}; use one of {', '.join(CATEGORIES)}")
    c = CATEGORIES.index(category)
    return np.stack([by_category(step.indirect_effect(site), trace.categories)[c] for step in trace.temporal])
