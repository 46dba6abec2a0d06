"""One tracing run as `dlmedit trace` and `dlmedit.trace(...)` do it: check options, trace, average, save.

Why a module: the command line and the Python API must trace with the same checks and
produce the same ``trace.json`` document; the CLI only adds the progress bar and the
printed tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlmedit.errors import UsageError
from dlmedit.trace.core import TraceConfig, TraceFailure, trace_fact, trace_facts
from dlmedit.trace.plan import normalise_sites
from dlmedit.trace.results import CATEGORIES, FactTrace, average_to_json, average_traces

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel
    from dlmedit.trace.facts import TraceFact

__all__ = ["TraceResult", "check_trace_options", "run_trace"]

READOUTS = ("first", "target")


def check_trace_options(*, prompt: str | None, subject: str | None, facts: object, limit: int | None,
                        sites: str | Sequence[str], window: int | None, samples: int, noise: float,
                        noise_std: float | None, readout: str) -> tuple[str, ...]:
    """Reject impossible combinations before any model work; return the normalised site list."""
    if (facts is None) == (prompt is None):
        raise UsageError("give either a prompt and subject (one fact) or facts (a fact set), not both or neither")
    if prompt is not None and subject is None:
        raise UsageError("a subject is required with a prompt")
    if facts is None and limit is not None:
        raise UsageError("limit applies to a fact set only")
    for name, value in (("window", window), ("samples", samples)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    if noise <= 0 or (noise_std is not None and noise_std <= 0):
        raise UsageError("noise must be positive")
    if readout not in READOUTS:
        raise UsageError(f"readout is first or target, got {readout!r}")
    try:
        return tuple(normalise_sites(sites))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


@dataclass
class TraceResult:
    """Traced facts, the facts that could not be traced, and the averages: what ``trace.json`` holds.

    ``document`` is that JSON document; :meth:`save` writes it and the heatmaps.
    """

    model: str
    traces: list[FactTrace]
    failures: list[TraceFailure]
    document: dict[str, Any]
    mean: dict[str, Any] = field(repr=False)
    mean_correct: dict[str, Any] = field(repr=False)

    @property
    def correct(self) -> list[FactTrace]:
        return [t for t in self.traces if t.correct]

    def save(self, out: str | Path, plot_facts: int = 5) -> list[Path]:
        """Write ``trace.json``, heatmaps of the first ``plot_facts`` facts and the averages; return the paths."""
        from dlmedit.trace.plots import plot_average, plot_fact, plot_temporal, plot_temporal_average

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "trace.json").write_text(json.dumps(self.document, indent=1))
        written = [out / "trace.json"]
        for trace in self.traces[:plot_facts]:
            written.append(plot_fact(trace, out / f"fact{trace.index:03d}.png", model_name=self.model))
            if trace.temporal:
                written.append(plot_temporal(trace, out / f"fact{trace.index:03d}_temporal.png"))
        if len(self.traces) > 1:
            written.append(plot_average(self.mean, out / "average.png", title=f"{self.model}:"))
            if self.correct and len(self.correct) != len(self.traces):
                written.append(plot_average(self.mean_correct, out / "average_correct.png",
                                            title=f"{self.model} (correct facts):"))
            if "temporal" in self.mean:
                written.append(plot_temporal_average(self.mean["temporal"], out / "temporal_average.png",
                                                     title=f"{self.model}:"))
        return written


def run_trace(
    lm: LanguageModel,
    *,
    model: str,
    prompt: str | None = None,
    subject: str | None = None,
    target: str | None = None,
    facts: str | None = None,
    fact_list: Sequence[TraceFact] | None = None,
    limit: int | None = None,
    sites: str | Sequence[str] = "resid,mlp,attn",
    temporal: bool = False,
    readout: str = "first",
    window: int | None = None,
    samples: int = 10,
    noise: float = 3.0,
    noise_std: float | None = None,
    seed: int = 0,
    autocast: str | None = None,
    target_window: bool = False,
    progress: Callable[[], None] | None = None,
) -> TraceResult:
    """Trace one fact (``prompt``/``subject``/``target``) or a fact set and build the ``trace.json`` document.

    ``facts`` is the spec recorded in the document; ``fact_list`` the loaded facts (from
    :func:`dlmedit.trace.facts.load_trace_facts`, loaded by the caller so it can fail
    before the model loads).  ``model`` names the model in the document and plots.
    """
    from dlmedit.trace.facts import load_trace_facts

    site_list = check_trace_options(prompt=prompt, subject=subject, facts=facts if facts is not None else fact_list,
                                    limit=limit, sites=sites, window=window, samples=samples, noise=noise,
                                    noise_std=noise_std, readout=readout)
    config = TraceConfig(sites=site_list, window=window, samples=samples, noise=noise, noise_std=noise_std,
                         seed=seed, readout=readout, temporal=temporal, autocast=autocast, target_window=target_window)
    if prompt is not None:
        assert subject is not None
        traces, failures = [trace_fact(lm, prompt, subject, target, config)], []
    else:
        if fact_list is None:
            assert facts is not None
            fact_list = load_trace_facts(facts, limit, seed)
        traces, failures = trace_facts(lm, [f.as_tuple() for f in fact_list], config, progress=progress)
    if not traces:
        raise UsageError("no fact could be traced: " + "; ".join(f.error for f in failures[:3]))

    window = traces[0].window  # resolved (the default depends on the model's depth)
    avg = average_traces(traces)
    avg["window"] = window
    correct = [t for t in traces if t.correct]
    avg_correct = average_traces(correct) if correct else {"n_facts": 0}
    avg_correct["window"] = window
    doc = {
        "model": model,
        "paradigm": lm.paradigm.describe(),
        "n_layers": lm.n_layers,
        "settings": {"sites": list(site_list), "window": window, "samples": samples, "noise": noise,
                     "noise_std": traces[0].noise_std, "seed": seed, "readout": readout, "temporal": temporal,
                     "autocast": autocast, "target_window": target_window, "facts": facts, "limit": limit,
                     "noise_std_source": "given" if noise_std is not None else
                     f"{noise} x std of the embeddings of all traced subjects' tokens"},
        "axes": {"site": list(site_list), "layer": list(range(lm.n_layers)), "category": list(CATEGORIES),
                 "facts[].scores": ["token", "layer"], "mean.effect": ["category", "layer"],
                 "mean.temporal.effect": ["step", "category", "layer"]},
        "n_facts": len(traces), "n_correct": len(correct),
        "facts": [t.to_json() for t in traces],
        "skipped": [f.__dict__ for f in failures],
        "mean": average_to_json(avg),
        "mean_correct": average_to_json(avg_correct),
    }
    return TraceResult(model, traces, failures, doc, avg, avg_correct)
