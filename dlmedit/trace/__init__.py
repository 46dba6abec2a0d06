"""Causal tracing and temporal tracing for ARMs and MDMs, batched; heatmaps.

Entry points: `trace_fact`, `trace_facts`, `trace_temporal`, `average_traces`;
`dlmedit.trace.reference` is the slow per-cell ground truth; `dlmedit.trace.plots`
draws the heatmaps.
"""

from dlmedit.trace.core import TraceConfig, TraceFailure, predict_target, run_plan, trace_fact, trace_facts
from dlmedit.trace.plan import (
    TRACE_SITES,
    TraceInputError,
    TracePlan,
    build_plan,
    default_window,
    normalise_sites,
    window_layers,
)
from dlmedit.trace.results import CATEGORIES, FactTrace, StepTrace, average_temporal, average_traces
from dlmedit.trace.temporal import temporal_grid, trace_temporal

__all__ = [
    "CATEGORIES",
    "TRACE_SITES",
    "FactTrace",
    "StepTrace",
    "TraceConfig",
    "TraceFailure",
    "TraceInputError",
    "TracePlan",
    "average_temporal",
    "average_traces",
    "build_plan",
    "default_window",
    "normalise_sites",
    "predict_target",
    "run_plan",
    "temporal_grid",
    "trace_fact",
    "trace_facts",
    "trace_temporal",
    "window_layers",
]
