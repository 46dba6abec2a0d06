"""Batched causal tracing (Meng et al. 2022) for autoregressive and masked-diffusion LMs.

Why not ROME's loop: ROME runs one forward per (token, layer, site) cell — 3·T·L
forwards per fact.  Here every cell × noise sample is one *row* and many rows share a
forward, and three kinds of work that a per-cell loop repeats are done once:

1. **Shared prefix of the corrupted run.**  A row that restores layer ``l`` (or a
   window starting at ``l``) is identical to the corrupted run below that layer.  So
   each forward starts with only the corrupted rows (one per state × noise sample) and
   *grows the batch* at the output of layer ``l − 1``: new rows are copies of the
   corrupted rows, with the clean value written in where the restore happens.  A
   row restoring layer 25 of 30 costs 5 layers, not 30.  (This works because the
   forward runs without an attention mask on unpadded rows, so nothing inside the
   model is batch-shaped; if a model ever refuses, we fall back to full-height rows
   with per-row masks — same numbers, more work.)
2. **Cells that need no forward.**  Where a site's clean activation equals the
   corrupted one bit for bit in every noise sample (e.g. tokens before the subject of
   a causal model), restoring it cannot change anything: the cell's value *is* the
   corrupted run's.  The same holds for restoring only the last layer at a column
   no readout reads (the final norm and unembedding act per column).  And cells whose
   windows clip to the same layers (e.g. every MLP window of a 6-layer model with
   window 10 is layers 0–5 or 0–4) are one computation, done once; and a window
   nested in a shorter one with the same start (clipped at the bottom: [0, 6) ⊃
   [0, 5)) is copied from that row where they part, instead of from the corrupted run.
3. **Readout-only head.**  Forwards stop after the last layer; the final norm and the
   unembedding run only at the readout columns (checked once per fact against the
   model's own logits; if they differ — e.g. a logit soft-cap — full logits are used).

4. **Earlier columns of a causal model.**  Under causal attention, restoring column c
   changes nothing at columns before c, in any layer.  The recording forward keeps every
   layer's keys and values, and the rows restoring column c run as one forward over
   columns c… only, on top of the corrupted run's keys/values for the columns before
   (gathered per layer for the rows present there, since the batch grows mid-forward).

The numbers equal `dlmedit.trace.reference` (one forward per cell) to float rounding.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dlmedit.interventions import Intervention, intervene
from dlmedit.trace.plan import TRACE_SITES, TracePlan, build_plan, combine, subject_embedding_std
from dlmedit.trace.results import FactTrace, StepTrace, make_fact_trace

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel

__all__ = ["PlanResult", "StepTrace", "TraceConfig", "TraceFailure", "TraceStats", "predict_target", "run_plan",
           "trace_fact", "trace_facts"]


@dataclass(frozen=True)
class TraceConfig:
    """Settings of a trace; defaults follow ROME (10 samples, noise 3×std, window 10 of 48 layers).

    ``window`` None = :func:`~dlmedit.trace.plan.default_window` (a fifth of the depth).
    """

    sites: tuple[str, ...] = TRACE_SITES
    window: int | None = None
    samples: int = 10
    noise: float = 3.0
    noise_std: float | None = None
    seed: int = 0
    readout: str = "first"
    temporal: bool = False
    #: activation elements (rows × columns × width) one forward may hold; bounds memory.
    max_elements: int = 2**25
    #: "bf16": run every forward of the trace under bfloat16 autocast (clean, corrupted and restored
    #: alike).  Why: a trace is thousands of forwards; on CPUs with AMX bf16 matmuls are ≈ 8× faster,
    #: and an indirect effect averaged over facts does not need fp32's last digits.  None: fp32.
    autocast: str | None = None
    #: trace the state with only the target's own slots masked, without a model's fixed answer
    #: window of padding masks (``answer_window``, e.g. the twins' 7).  Why: the cost grows with the
    #: columns traced and the row length (a 16-slot window made one smollm2 fact 13× slower to
    #: trace, with the same peak); the price is not seeing what the padding slots do.
    target_window: bool = False


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(lm: LanguageModel, name: str | None) -> Any:
    """The autocast context of ``TraceConfig.autocast`` on the model's device (a no-op for None)."""
    if name is None:
        return contextlib.nullcontext()
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"trace autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, got {name!r}")
    return torch.autocast(device_type=torch.device(lm.device).type, dtype=AUTOCAST_DTYPES[name])


def _target_window_view(lm: LanguageModel) -> LanguageModel:
    """``lm`` served with a copy of its paradigm that has no answer-window padding (same module, tokenizer)."""
    if not getattr(lm.paradigm, "answer_window", None):
        return lm
    paradigm = copy.copy(lm.paradigm)
    paradigm.answer_window = None
    view = copy.copy(lm)
    view.paradigm = paradigm
    return view


@dataclass
class TraceStats:
    """Work done, in units comparable with a per-cell loop."""

    cells: int = 0
    noop_cells: int = 0
    duplicate_cells: int = 0
    rows: int = 0
    forwards: int = 0
    layer_rows: float = 0.0
    seconds: float = 0.0
    grow: bool = True
    head_shortcut: bool = True
    skip_columns: bool = False

    def forward_equivalents(self, n_layers: int, rows_per_forward: int) -> float:
        """Layer-rows processed / layer-rows of one full forward of ``rows_per_forward`` rows."""
        return self.layer_rows / float(n_layers * rows_per_forward)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PlanResult:
    """Raw numbers of a plan: per readout, clean / corrupted values and restored values per cell."""

    clean: np.ndarray  # [R]
    corrupted: np.ndarray  # [R]
    scores: np.ndarray  # [R, n_sites, T, L]
    clean_top: np.ndarray  # [K, Lt] bool: target token is the argmax at its readout in the clean state
    stats: TraceStats = field(default_factory=TraceStats)


class _Stop(Exception):
    """Raised from the last layer's hook to end a forward early, carrying the hidden states."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("forward stopped after the last layer")
        self.hidden = hidden


def _gather_logprobs(
    lm: LanguageModel, hidden_or_logits: torch.Tensor, states: torch.Tensor, plan: TracePlan, from_hidden: bool,
    max_elements: int, start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and argmax-match of every target token at its readout column, rows × Lt
    (``start``: the tensor holds the columns from ``start`` on)."""
    readout = (plan.batch.readout - start).to(hidden_or_logits.device)
    target = plan.batch.target.to(hidden_or_logits.device)
    n_tok = readout.shape[1]
    vocab = int(lm.adapter.head().weight.shape[0]) if from_hidden else int(hidden_or_logits.shape[-1])
    step = max(1, max_elements // max(1, n_tok * vocab))
    lps, tops = [], []
    for start in range(0, hidden_or_logits.shape[0], step):
        sl = slice(start, start + step)
        rows = torch.arange(start, min(start + step, hidden_or_logits.shape[0]), device=hidden_or_logits.device)
        st = states[sl]
        picked = hidden_or_logits[rows.unsqueeze(1), readout[st]]
        if from_hidden:
            picked = lm.adapter.head()(lm.adapter.final_norm()(picked))
        logprobs = torch.log_softmax(picked.float(), dim=-1)
        tgt = target[st].clamp(min=0)
        lps.append(logprobs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1))
        tops.append(logprobs.argmax(-1) == tgt)
    return torch.cat(lps), torch.cat(tops)


@dataclass
class _Rows:
    """Row specs: which cell (site index, layer, column), state and sample each row computes."""

    site: np.ndarray
    layer: np.ndarray
    col: np.ndarray
    state: np.ndarray
    sample: np.ndarray
    branch: np.ndarray  # resid output of this layer is where the row joins; −1 = from the input
    parent: np.ndarray  # layer of the nested-window row this one can be copied from (same site/col/state/sample), −1
    pbranch: np.ndarray  # where it joins when copied from that parent

    FIELDS = ("site", "layer", "col", "state", "sample", "branch", "parent", "pbranch")

    def __len__(self) -> int:
        return len(self.site)

    def take(self, idx: np.ndarray) -> _Rows:
        return _Rows(*(getattr(self, f)[idx] for f in self.FIELDS))


class _Context:
    def __init__(self, lm: LanguageModel, plan: TracePlan, clean: dict[str, torch.Tensor], shortcut: bool,
                 max_elements: int) -> None:
        self.lm, self.plan, self.clean, self.shortcut, self.max_elements = lm, plan, clean, shortcut, max_elements
        self.ids = plan.batch.input_ids.to(lm.device)
        self.K, self.T = self.ids.shape
        self.S = plan.samples
        self.L = lm.n_layers
        self.subject = torch.tensor(plan.subject_columns, device=lm.device)
        self.noise = plan.noise.to(device=lm.device, dtype=lm.dtype)
        self.window_lo = {s: np.array([plan.restored_layers(s, j).start for j in range(self.L)]) for s in plan.sites}
        self.window_hi = {s: np.array([plan.restored_layers(s, j).stop for j in range(self.L)]) for s in plan.sites}
        #: causal models: every layer's keys/values of the recording forward's rows (clean K, then K × S
        #: corrupted), so a forward restoring column c runs only columns ≥ c (see ``_run_chunk``)
        self.past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        read = plan.batch.readout[plan.batch.readout >= 0]
        self.first_read_col = int(read.min()) if read.numel() else 0


def _embed_noise_op(ctx: _Context, samples: torch.Tensor, noisy: torch.Tensor, start: int = 0) -> Intervention:
    """Noise on the subject columns of the rows marked ``noisy`` (for inputs holding columns ``start:``)."""
    rows = samples.shape[0]
    value = torch.zeros(rows, ctx.T - start, ctx.lm.adapter.d_model, dtype=ctx.lm.dtype, device=ctx.lm.device)
    mask = torch.zeros(rows, ctx.T - start, dtype=torch.bool, device=ctx.lm.device)
    sel = torch.nonzero(noisy).squeeze(1)
    keep = ctx.subject >= start
    value[sel.unsqueeze(1), (ctx.subject[keep] - start).unsqueeze(0)] = ctx.noise[samples[sel]][:, keep]
    mask[sel.unsqueeze(1), (ctx.subject[keep] - start).unsqueeze(0)] = True
    return Intervention(0, "embed", "add", mask=mask, value=value, name="trace.noise")


def _run_chunk(ctx: _Context, rows: _Rows, grow: bool, start: int = 0) -> tuple[torch.Tensor, float]:
    """Log-probs [len(rows), Lt] of the rows of one forward, and the layer-rows it processed.

    ``start`` > 0 (causal models, every row restoring a column ≥ ``start``): columns before
    ``start`` equal the corrupted run's in every layer, so only columns ``start:`` are run,
    on top of the recorded corrupted keys/values (layer-rows are counted pro rata)."""
    lm, plan, K, S, L, dev = ctx.lm, ctx.plan, ctx.K, ctx.S, ctx.L, ctx.lm.device
    keys = list(zip(rows.site.tolist(), rows.layer.tolist(), rows.col.tolist(), rows.state.tolist(),
                    rows.sample.tolist(), strict=True))
    in_chunk = set(keys)
    use_parent = np.array([p >= 0 and (si, p, c, k, smp) in in_chunk for (si, _, c, k, smp), p in
                           zip(keys, rows.parent.tolist(), strict=True)], dtype=bool)
    branch = np.where(use_parent, rows.pbranch, rows.branch) if grow else np.full(len(rows), -1)
    use_parent &= grow
    order = np.argsort(branch, kind="stable")
    rows, branch, use_parent = rows.take(order), branch[order], use_parent[order]
    n_base = K * S
    base_state = np.repeat(np.arange(K), S)
    base_sample = np.tile(np.arange(S), K)
    all_state = np.concatenate([base_state, rows.state])
    all_sample = np.concatenate([base_sample, rows.sample])
    all_branch = np.concatenate([np.full(n_base, -1), branch])
    site_of = np.concatenate([np.full(n_base, -1), rows.site])
    layer_of = np.concatenate([np.full(n_base, -1), rows.layer])
    col_of = np.concatenate([np.zeros(n_base, int), rows.col])
    n_init = int((all_branch == -1).sum())
    # batch position each joining row is copied from: its corrupted base row, or its nested-window parent
    source = all_state * S + all_sample
    if use_parent.any():
        position = {key: n_base + i for i, key in enumerate(zip(
            rows.site.tolist(), rows.layer.tolist(), rows.col.tolist(), rows.state.tolist(), rows.sample.tolist(),
            strict=True))}
        for i in np.nonzero(use_parent)[0]:
            source[n_base + i] = position[(int(rows.site[i]), int(rows.parent[i]), int(rows.col[i]),
                                           int(rows.state[i]), int(rows.sample[i]))]
    # batch size present at the input of each layer j: rows joined at the output of layers < j
    present = np.array([n_init + int(((all_branch >= 0) & (all_branch < j)).sum()) for j in range(L + 1)])

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.long, device=dev)

    ops: list[Intervention] = [_embed_noise_op(ctx, t(all_sample[:n_init]), torch.ones(n_init, dtype=torch.bool, device=dev),
                                               start)]
    for si, site in enumerate(plan.sites):
        if site == "resid":
            continue
        lo, hi = ctx.window_lo[site], ctx.window_hi[site]
        for j in range(L):
            n = present[j]
            sel = np.nonzero((site_of[:n] == si) & (lo[layer_of[:n].clip(0)] <= j) & (hi[layer_of[:n].clip(0)] > j))[0]
            if not len(sel):
                continue
            r, c, k = t(sel), t(col_of[sel]), t(all_state[sel])
            value = ctx.clean[site][j][k, c]
            c = c - start

            def restore(h: torch.Tensor, r=r, c=c, value=value) -> torch.Tensor:
                out = h.clone()
                out[r, c] = value
                return out

            ops.append(Intervention(j, site, "fn", fn=restore, name=f"trace.{site}.{j}"))
    resid_si = plan.sites.index("resid") if "resid" in plan.sites else -2
    for j in range(L):
        n = present[j]
        fix = np.nonzero((site_of[:n] == resid_si) & (layer_of[:n] == j))[0]
        join = np.nonzero(all_branch == j)[0]
        last = j == L - 1
        if not len(fix) and not len(join) and not (last and ctx.shortcut):
            continue
        fix_r, fix_c, fix_k = t(fix), t(col_of[fix]), t(all_state[fix])
        src = t(source[join])
        jfix = np.nonzero((site_of[join] == resid_si) & (layer_of[join] == j))[0]
        jfix_r, jfix_c, jfix_k = t(jfix), t(col_of[join][jfix]), t(all_state[join][jfix])
        clean_j = ctx.clean["resid"][j] if "resid" in ctx.clean else None

        def at_resid(h: torch.Tensor, fix_r=fix_r, fix_c=fix_c, fix_k=fix_k, src=src, jfix_r=jfix_r, jfix_c=jfix_c,
                     jfix_k=jfix_k, clean_j=clean_j, last=last) -> torch.Tensor:
            if len(fix_r):
                h = h.clone()
                h[fix_r, fix_c - start] = clean_j[fix_k, fix_c]
            if len(src):
                new = h[src]
                if len(jfix_r):
                    new[jfix_r, jfix_c - start] = clean_j[jfix_k, jfix_c]
                h = torch.cat([h, new], 0)
            if last and ctx.shortcut:
                raise _Stop(h)
            return h

        ops.append(Intervention(j, "resid", "fn", fn=at_resid, name=f"trace.resid.{j}"))

    x = ctx.ids[t(all_state[:n_init]), start:]
    past = None
    if start > 0:
        assert ctx.past is not None, "column skipping needs the recorded keys/values"
        recorded = t(K + all_state * S + all_sample)  # each row's corrupted row in the recording forward
        past = [(keys[recorded[: present[j]], :, :start], values[recorded[: present[j]], :, :start])
                for j, (keys, values) in enumerate(ctx.past)]
    with intervene(lm.adapter, ops):
        try:
            if past is None:
                out = lm.logits(x, None)
            else:
                out = lm.adapter.forward_logits_with_past(x, past)
            from_hidden = False
        except _Stop as stop:
            out, from_hidden = stop.hidden, True
    if out.shape[0] != len(all_state):
        raise RuntimeError(f"grown forward returned {out.shape[0]} rows, expected {len(all_state)}")
    lp, _ = _gather_logprobs(lm, out[n_base:], t(all_state[n_base:]), plan, from_hidden, ctx.max_elements, start)
    layer_rows = (n_init * L + int(sum(L - 1 - b for b in all_branch if b >= 0))) * (ctx.T - start) / ctx.T
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return lp[t(inverse)], layer_rows


def _build_rows(ctx: _Context, noop: dict[str, torch.Tensor]) -> tuple[_Rows, np.ndarray, int, int]:
    """Rows of every (cell, state) whose value needs a forward, × samples.

    A (cell, state) needs none when
      * restoring is a no-op: clean == corrupted bit for bit at every restored layer;
      * only the last layer is restored and no readout term reads the column: the final
        norm and unembedding act per column (checked: ``ctx.shortcut``), so nothing
        reaches the readout;
      * another cell of the same site restores the *same* layers (windows clipped at
        the ends of the stack) at the same column: it is the same computation.
    Returns the rows, the duplicates ``[n, 5]`` (site, layer, column, state, layer
    of the computed twin), the number of skipped (cell, state) pairs and of duplicates.
    """
    plan, K, S, L, T = ctx.plan, ctx.K, ctx.S, ctx.L, ctx.T
    read_cols = np.zeros((K, T), dtype=bool)  # columns some readout term reads, per state
    for readout in plan.readouts:
        for k, j in readout.terms:
            read_cols[k, int(plan.batch.readout[k, j])] = True
    parts, dupes = [], []
    n_noop = 0
    layer, state, col = np.meshgrid(np.arange(L), np.arange(K), np.arange(T), indexing="ij")
    for si, site in enumerate(plan.sites):
        eq = noop[site].cpu()  # [L, K, T]
        lo, hi = ctx.window_lo[site], ctx.window_hi[site]
        cum = torch.cat([torch.zeros(1, K, T, dtype=torch.long), (~eq).long().cumsum(0)])
        skip = ((cum[torch.as_tensor(hi)] - cum[torch.as_tensor(lo)]) == 0).numpy()  # no restored layer differs
        if ctx.shortcut:
            last_only = (lo[layer] == L - 1) & (hi[layer] == L)
            skip |= last_only & ~read_cols[state, col]
        rep = np.array([int(np.nonzero((lo == lo[j]) & (hi == hi[j]))[0][0]) for j in range(L)])
        dup = (rep[layer] != layer) & ~skip
        if dup.any():
            dupes.append(np.stack([np.full(int(dup.sum()), si), layer[dup], col[dup], state[dup], rep[layer[dup]]], 1))
        keep = ~skip & ~dup
        branch = layer if site == "resid" else lo[layer] - 1
        # Nested windows (same start, clipped at the bottom of the stack): [lo, hi) equals its nearest
        # shorter sibling [lo, h') up to layer h' − 1, so it is copied from that row there — or from the
        # corrupted row if the sibling is a no-op (then it *is* the corrupted row).
        parent = np.full(L, -1)
        if site != "resid":
            for j in range(L):
                shorter = [q for q in range(L) if rep[q] == q and lo[q] == lo[j] and hi[q] < hi[j]]
                if shorter:
                    parent[j] = max(shorter, key=lambda q: hi[q])
        par = parent[layer]
        has_parent = par >= 0
        pbranch = np.where(has_parent, hi[par.clip(0)] - 1, -1)
        parent_skipped = has_parent & skip[par.clip(0), state, col]
        branch = np.where(parent_skipped, pbranch, branch)
        par = np.where(parent_skipped, -1, par)
        n_noop += int(skip.sum())
        n = int(keep.sum())
        parts.append(_Rows(
            site=np.repeat(np.full(n, si), S), layer=np.repeat(layer[keep], S), col=np.repeat(col[keep], S),
            state=np.repeat(state[keep], S), sample=np.tile(np.arange(S), n), branch=np.repeat(branch[keep], S),
            parent=np.repeat(par[keep], S), pbranch=np.repeat(pbranch[keep], S),
        ))
    rows = _Rows(*(np.concatenate([getattr(p, f) for p in parts]) for f in _Rows.FIELDS))
    dup_arr = np.concatenate(dupes) if dupes else np.zeros((0, 5), dtype=int)
    return rows, dup_arr, n_noop, len(dup_arr)


@torch.no_grad()
def run_plan(lm: LanguageModel, plan: TracePlan, max_elements: int = 2**25, grow: bool = True) -> PlanResult:
    """Trace a plan with batched rows (see module docstring); returns raw per-readout numbers."""
    started = time.perf_counter()
    stats = TraceStats(grow=grow)
    K, T = plan.batch.input_ids.shape
    S, L, dev = plan.samples, lm.n_layers, lm.device
    ids = plan.batch.input_ids.to(dev)
    # 1. One forward with the clean rows and the corrupted rows, recording every site.
    rec_ids = torch.cat([ids, ids.repeat_interleave(S, 0)])
    ctx0 = _Context(lm, plan, {}, False, max_elements)
    samples = torch.cat([torch.zeros(K, dtype=torch.long), torch.arange(S).repeat(K)]).to(dev)
    noisy = torch.cat([torch.zeros(K, dtype=torch.bool), torch.ones(K * S, dtype=torch.bool)]).to(dev)
    ops = [_embed_noise_op(ctx0, samples, noisy)]
    record_sites = list(dict.fromkeys([*plan.sites, "resid"]))
    ops += [Intervention(j, s, "read") for s in record_sites for j in range(L)]
    skip_columns = stats.skip_columns = grow and lm.prefix_reusable
    past = None
    with intervene(lm.adapter, ops) as rec:
        if skip_columns:
            logits, past = lm.adapter.forward_logits_cached(rec_ids)
        else:
            logits = lm.logits(rec_ids, None)
    stats.forwards += 1
    stats.layer_rows += rec_ids.shape[0] * L
    row_states = torch.cat([torch.arange(K), torch.arange(K).repeat_interleave(S)]).to(dev)
    lp_full, top = _gather_logprobs(lm, logits, row_states, plan, False, max_elements)
    del logits
    lp_short, _ = _gather_logprobs(lm, rec[f"resid.{L - 1}"], row_states, plan, True, max_elements)
    shortcut = bool((lp_short - lp_full).abs().max() <= 1e-5)
    stats.head_shortcut = shortcut
    clean_lp = lp_full[:K]
    corr_lp = lp_full[K:].view(K, S, -1)
    clean: dict[str, torch.Tensor] = {}
    noop: dict[str, torch.Tensor] = {}
    for site in record_sites:
        acts = torch.stack([rec[f"{site}.{j}"] for j in range(L)])  # [L, rows, T, D]
        clean[site] = acts[:, :K]
        corr = acts[:, K:].view(L, K, S, T, -1)
        noop[site] = (corr == clean[site].unsqueeze(2)).all(-1).all(2)  # [L, K, T]
    del rec

    # 2. Rows of the cells that can change anything, in grown forwards.
    ctx = _Context(lm, plan, clean, shortcut, max_elements)
    ctx.past = past
    rows, dupes, stats.noop_cells, stats.duplicate_cells = _build_rows(ctx, noop)
    stats.cells = len(plan.sites) * L * T * K
    stats.rows = len(rows)
    width = max(lm.adapter.d_mlp, lm.adapter.d_model) if shortcut else int(lm.adapter.head().weight.shape[0])
    per_chunk = max(1, max_elements // (T * width) - K * S)
    cell_lp = corr_lp.unsqueeze(0).unsqueeze(0).unsqueeze(0).repeat(len(plan.sites), L, T, 1, 1, 1).clone()
    if skip_columns:  # one column per forward, so each runs only from its column on
        order = np.lexsort((rows.layer, rows.sample, rows.state, rows.site, rows.col))
    else:
        order = np.lexsort((rows.layer, rows.sample, rows.state, rows.col, rows.site))  # nested windows stay together
    rows = rows.take(order)
    chunks: list[tuple[np.ndarray, int]] = []
    if skip_columns:
        for col in np.unique(rows.col):
            idx = np.nonzero(rows.col == col)[0]
            chunks += [(idx[i : i + per_chunk], min(int(col), ctx.first_read_col)) for i in range(0, len(idx), per_chunk)]
    else:
        chunks = [(np.arange(i, min(i + per_chunk, len(rows))), 0) for i in range(0, len(rows), per_chunk)]
    for idx, first_col in chunks:
        chunk = rows.take(idx)
        try:
            lp, work = _run_chunk(ctx, chunk, grow, first_col if grow else 0)
        except RuntimeError as exc:
            if not grow:
                raise
            warnings.warn(f"growing the batch inside the forward failed ({exc}); using full-height rows", stacklevel=2)
            grow = stats.grow = False
            lp, work = _run_chunk(ctx, chunk, grow)
        stats.forwards += 1
        stats.layer_rows += work
        idx = tuple(torch.as_tensor(a) for a in (chunk.site, chunk.layer, chunk.col, chunk.state, chunk.sample))
        cell_lp[idx] = lp.to(cell_lp)
    if len(dupes):
        si, layer, col, state, rep = (torch.as_tensor(dupes[:, i]) for i in range(5))
        cell_lp[si, layer, col, state] = cell_lp[si, rep, col, state]

    # 3. Readouts.
    R = len(plan.readouts)
    clean_v = np.zeros(R)
    corr_v = np.zeros(R)
    scores = np.zeros((R, len(plan.sites), T, L))
    for r, readout in enumerate(plan.readouts):
        clean_v[r] = float(combine(clean_lp.unsqueeze(1), readout).mean(-1))
        corr_v[r] = float(combine(corr_lp, readout).mean(-1))
        scores[r] = combine(cell_lp, readout).mean(-1).permute(0, 2, 1).cpu().double().numpy()
    stats.seconds = time.perf_counter() - started
    return PlanResult(clean=clean_v, corrupted=corr_v, scores=scores, clean_top=top[:K].cpu().numpy(), stats=stats)


# ----------------------------------------------------------------------------------- facts


def predict_target(lm: LanguageModel, prompt: str, max_new_tokens: int | None = None) -> str:
    """The model's own answer (greedy / denoised), cut at the first line or sentence end.

    Used when a fact has no target: tracing then explains what the model actually says.
    """
    n = max_new_tokens or getattr(lm.paradigm, "default_new_tokens", None) or 8
    text = lm.generate([prompt], n).texts[0]
    text = text.split("\n")[0]
    for stop in (". ", ", ", "; "):
        text = text.split(stop)[0]
    text = text.rstrip(" .,;")
    if not text.strip():
        from dlmedit.errors import EmptyTargetError

        raise EmptyTargetError(f"the model predicts an empty answer after {prompt!r}; pass a target explicitly")
    return text


def trace_fact(
    lm: LanguageModel,
    prompt: str,
    subject: str,
    target: str | None = None,
    config: TraceConfig = TraceConfig(),
    *,
    subject_tokens: Sequence[int] | None = None,
    grow: bool = True,
) -> FactTrace:
    """Causal trace of one fact; ``target=None`` traces the model's own prediction.

    Warns (and sets ``correct=False``) when the clean model does not put the target's
    token(s) first at the readout — ROME skips such facts; we keep and flag them.
    """
    if target is None:
        target = predict_target(lm, prompt)
    if config.target_window:
        lm = _target_window_view(lm)
    with _autocast(lm, config.autocast):
        plan = build_plan(
            lm, prompt, subject, target, sites=config.sites, window=config.window, samples=config.samples,
            noise_std=config.noise_std, noise=config.noise, seed=config.seed, readout=config.readout,
            temporal=config.temporal, subject_tokens=subject_tokens,
        )
        result = run_plan(lm, plan, max_elements=config.max_elements, grow=grow)
    trace = make_fact_trace(lm, plan, result)
    if not trace.correct:
        warnings.warn(
            f"the model does not predict {target!r} after {prompt!r} (clean p={trace.clean:.3g}); "
            "kept with correct=False (ROME skips such facts)", stacklevel=2,
        )
    return trace


@dataclass
class TraceFailure:
    """A fact that could not be traced (bad subject, empty target …), kept so a run reports it."""

    index: int
    prompt: str
    subject: str
    error: str


def trace_facts(
    lm: LanguageModel,
    facts: Iterable[tuple[str, str, str | None]],
    config: TraceConfig = TraceConfig(),
    progress: Any = None,
) -> tuple[list[FactTrace], list[TraceFailure]]:
    """Trace (prompt, subject, target-or-None) facts with one shared noise scale.

    As ROME does, the noise std is ``config.noise`` × the std of the embeddings of all
    subjects' tokens (unless ``config.noise_std`` is set).  Facts whose input is bad
    (a `DlmeditError`) are collected as failures, not raised.  ``progress`` is an
    optional callable invoked after each fact (e.g. a progress-bar update).
    """
    from dlmedit.errors import DlmeditError
    from dlmedit.subject import find_subject_tokens

    facts = list(facts)
    located: list[list[int] | None] = []
    failures: list[TraceFailure] = []
    for i, (prompt, subject, _) in enumerate(facts):
        try:
            located.append(find_subject_tokens(lm, prompt, subject))
        except DlmeditError as exc:
            located.append(None)
            failures.append(TraceFailure(i, prompt, subject, f"{type(exc).__name__}: {exc}"))
    noise_std = config.noise_std
    if noise_std is None:
        lists = [[lm.encode_prompt(p)[j] for j in loc] for (p, _, _), loc in zip(facts, located, strict=True) if loc]
        if not lists:
            return [], failures
        noise_std = config.noise * subject_embedding_std(lm, lists)
    cfg = TraceConfig(**{**config.__dict__, "noise_std": noise_std})
    traces: list[FactTrace] = []
    for i, ((prompt, subject, target), loc) in enumerate(zip(facts, located, strict=True)):
        if loc is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    trace = trace_fact(lm, prompt, subject, target, cfg, subject_tokens=loc)
                trace.index = i
                traces.append(trace)
            except DlmeditError as exc:
                failures.append(TraceFailure(i, prompt, subject, f"{type(exc).__name__}: {exc}"))
        if progress is not None:
            progress()
    failures.sort(key=lambda f: f.index)
    return traces, failures

