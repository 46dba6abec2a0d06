"""Plumbing shared by the locate-then-edit methods (ROME, MEMIT, AlphaEdit, FT-L).

Why a base class: the methods differ only in the solve at the end.  Everything
before it — merging hyper-parameters, validating requests, context prefixes, locating
the subject, key statistics per layer, the value-optimisation settings, choosing the
layer (explicitly, as a depth fraction, or from causal tracing) and applying earlier
updates while the next ones are computed — is done here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from dlmedit.data.records import EditRecord, EditRequest, InvalidRecordError
from dlmedit.edit.delta import AppliedDelta, EditDelta
from dlmedit.edit.editor import Editor
from dlmedit.edit.errors import StatisticsError
from dlmedit.edit.hparams import EditConfigError, load_hparams, resolve_layers
from dlmedit.edit.keys import EditContext, build_contexts, context_prefixes
from dlmedit.edit.solves import check_well_conditioned
from dlmedit.edit.statistics import StatsSettings, key_second_moments
from dlmedit.edit.values import TARGET_STATE_KINDS, ValueSettings

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel

__all__ = ["LocateEditor", "as_requests", "trace_peak_layer"]


def as_requests(items: Sequence[EditRequest | EditRecord]) -> list[EditRequest]:
    """Accept requests or records (their ``.request``); reject anything else clearly."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, EditRecord):
            item = item.request
        if not isinstance(item, EditRequest):
            raise TypeError(f"request {i} is a {type(item).__name__}, expected EditRequest or EditRecord")
        out.append(item)
    if not out:
        raise InvalidRecordError("no edit requests given")
    return out


def trace_peak_layer(lm: LanguageModel, requests: Sequence[EditRequest], site: str = "mlp_out") -> int:
    """Layer where restoring ``site`` at the last subject token recovers the most (ROME's choice).

    Traces each request's *true* fact (``target_true``, else the model's own
    prediction) with the published settings and averages the indirect effects.
    """
    from dlmedit.trace import TraceConfig, average_traces, trace_facts

    facts = [(r.prompt, r.subject, r.target_true) for r in requests]
    traces, failures = trace_facts(lm, facts, TraceConfig(sites=(site,)))
    if not traces:
        raise EditConfigError(f"causal tracing failed for every request ({failures[:1]}); give layers explicitly")
    avg = average_traces(traces)
    effect = avg["effect"][site]
    from dlmedit.trace import CATEGORIES

    row = effect[CATEGORIES.index("last subject token")]
    return int(torch.as_tensor(row).nan_to_num(float("-inf")).argmax())


class LocateEditor(Editor):
    """Base of the weight editors: hyper-parameters from ``configs/<config_name>.yaml``.

    Keyword hyper-parameters override the YAML (unknown names are rejected).  The
    merged dict is ``self.hparams`` and is stored in every delta.
    """

    config_name: ClassVar[str] = ""

    def __init__(self, lm: LanguageModel, seed: int = 0, **overrides: Any) -> None:
        hparams = load_hparams(self.config_name or self.name, lm, overrides)
        super().__init__(lm, seed=seed, **hparams)
        self._prefixes: list[str] | None = None
        self._moments: dict[int, torch.Tensor] = {}
        self._traced_layers: list[int] | None = None
        self.stats_info: dict[str, Any] = {}

    # -- hyper-parameters ---------------------------------------------------------------
    def hp(self, key: str) -> Any:
        return self.hparams[key]

    def layers(self, requests: Sequence[EditRequest] | None = None) -> list[int]:
        """Edit layers: explicit indices / depth fractions, or ``"trace"`` (causal-tracing peak, once)."""
        spec = self.hparams.get("layers")
        if spec == "trace":
            if self._traced_layers is None:
                if not requests:
                    raise EditConfigError("layers: trace needs requests to trace")
                peak = trace_peak_layer(self.lm, requests)
                width = max(1, min(int(self.hparams.get("trace_span", 1)), self.lm.n_layers))
                start = min(peak, self.lm.n_layers - width)  # the span starts at the peak, kept inside the model
                self._traced_layers = list(range(start, start + width))
            return list(self._traced_layers)
        if isinstance(spec, str):
            raise EditConfigError(f"layers must be indices, depth fractions or 'trace', got {spec!r}")
        return sorted(resolve_layers(self.lm, spec))

    def single_layer(self, requests: Sequence[EditRequest] | None = None) -> int:
        """The edit layer of a one-layer method (ROME, FT-L): several layers are an error, never a silent pick."""
        layers = self.layers(requests)
        if len(layers) != 1:
            raise EditConfigError(f"{self.name} edits exactly one layer, got layers {layers}; use memit for several")
        return layers[0]

    def value_settings(self, layer: int, site: str, **changes: Any) -> ValueSettings:
        h = self.hparams
        if h.get("key_states", "final") not in TARGET_STATE_KINDS:
            raise EditConfigError(f"{self.name}: key_states must be one of {', '.join(TARGET_STATE_KINDS)}, "
                                  f"got {h['key_states']!r}")
        base = dict(
            layer=layer, site=site, steps=int(h["v_steps"]), lr=float(h["v_lr"]), kl_factor=float(h["kl_factor"]),
            weight_decay=float(h["v_weight_decay"]), clamp_norm_factor=float(h["clamp_norm_factor"]),
            target_states=str(h["target_states"]), n_states=int(h["n_states"]), refresh_every=int(h["refresh_every"]),
            value_mode=str(h["value_mode"]), early_stop_nll=float(h["early_stop_nll"]),
            essence_template=str(h["essence_template"]), fact_token=str(h["fact_token"]),
            batch_size=int(h["batch_size"]), seed=self.seed, reuse_prefix=bool(h.get("reuse_prefix", True)),
        )
        base.update(changes)
        try:
            return ValueSettings(**base)
        except ValueError as exc:
            raise EditConfigError(f"{self.name}: {exc}") from None

    # -- requests -------------------------------------------------------------------------
    def validate(self, requests: Sequence[EditRequest]) -> None:
        """Tokenise every request once so bad input fails before any optimisation."""
        from dlmedit.subject import find_subject_tokens

        lm = self.lm
        for i, r in enumerate(requests):
            find_subject_tokens(lm, r.prompt, r.subject)
            new = lm.encode_target(r.prompt, r.target_new)
            if r.target_true is not None and lm.encode_target(r.prompt, r.target_true) == new:
                raise InvalidRecordError(
                    f"request {i}: target_new {r.target_new!r} tokenises exactly like target_true {r.target_true!r}; "
                    "nothing to edit"
                )

    def prefixes(self) -> list[str]:
        """Context prefixes, generated once per editor (seeded) and reused for every request."""
        if self._prefixes is None:
            h = self.hparams
            corpus = None
            if h["context_source"] == "corpus":
                from dlmedit.data.corpus import load_corpus
                from dlmedit.edit.statistics import default_corpus_spec

                spec = h["stats_corpus"] if h["stats_corpus"] != "auto" else default_corpus_spec(self.lm)
                corpus = load_corpus(spec, seed=self.seed)
            try:
                self._prefixes = context_prefixes(self.lm, int(h["context_n"]), int(h["context_length"]), self.seed,
                                                  str(h["context_source"]), corpus)
            except ValueError as exc:
                raise EditConfigError(str(exc)) from None
        return list(self._prefixes)

    def contexts(self, requests: Sequence[EditRequest]) -> list[list[EditContext]]:
        return build_contexts(self.lm, requests, self.prefixes(), fact_token=str(self.hparams["fact_token"]))

    # -- statistics -------------------------------------------------------------------------
    def stats_settings(self) -> StatsSettings:
        h = self.hparams
        try:
            return StatsSettings(corpus=str(h["stats_corpus"]), n_tokens=int(h["stats_tokens"]),
                                 max_length=int(h["stats_max_length"]), batch_tokens=int(h["stats_batch_tokens"]))
        except ValueError as exc:
            raise EditConfigError(str(exc)) from None

    def second_moments(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """C per layer (one pass over the corpus for all missing layers, cached on disk), checked once."""
        missing = [i for i in layers if i not in self._moments]
        if missing:
            info: dict[str, Any] = {}
            found = key_second_moments(self.lm, missing, self.stats_settings(), info=info)
            self.stats_info = info
            for layer, C in found.items():
                try:
                    check_well_conditioned(C, f"key second moment of layer {layer}",
                                           max_condition=float(self.hparams.get("max_condition", 1e12)))
                except StatisticsError as exc:
                    raise StatisticsError(
                        f"{exc} (statistics: {self.stats_info.get('corpus')}, {self.hparams['stats_tokens']} tokens; "
                        "raise stats_tokens, or for MEMIT/AlphaEdit raise the regularisation)"
                    ) from None
                self._moments[layer] = C
        return {i: self._moments[i] for i in layers}

    # -- deltas -----------------------------------------------------------------------------
    def new_delta(self, requests: Sequence[EditRequest], extra: dict[str, Any] | None = None) -> EditDelta:
        return EditDelta.for_model(self.lm.module, method=self.name, hparams={**self.hparams, "seed": self.seed},
                                   requests=[vars(r) for r in requests], extra=extra or {})

    def down_weight(self, layer: int) -> tuple[torch.nn.Parameter, bool, str]:
        param, transposed = self.lm.adapter.down_weight(layer)
        return param, transposed, self.lm.adapter.parameter_name(param)

    def record_routing(self, delta: EditDelta, layer: int, keys: torch.Tensor, first: int = 0) -> None:
        """In a sparse-MoE layer, note in ``delta.extra["routing"]`` which experts each key
        (``[d]`` or ``[d, n]``, one column per request) routes to — the update acts there.
        Nothing is recorded for dense MLPs (the adapter returns ``None``)."""
        columns = keys.unsqueeze(1) if keys.dim() == 1 else keys
        for j in range(columns.shape[1]):
            info = self.lm.adapter.key_routing(layer, columns[:, j])
            if info is not None:
                delta.extra.setdefault("routing", []).append({"layer": int(layer), "request": first + j, **info})

    @contextmanager
    def applied_while_computing(self) -> Iterator[Callable[[dict[str, torch.Tensor]], None]]:
        """Yields ``push(deltas)``: applies partial updates now, reverts them all bit-exactly on exit.

        Sequential ROME and MEMIT's layer-by-layer solve must see the model with the
        updates computed so far; the caller still receives an unapplied delta.
        """
        handles: list[AppliedDelta] = []

        def push(deltas: dict[str, torch.Tensor]) -> None:
            handles.append(EditDelta(dict(deltas), method=f"{self.name}-partial").apply(self.lm.module, check_model=False))

        try:
            yield push
        finally:
            for handle in reversed(handles):
                handle.revert()
