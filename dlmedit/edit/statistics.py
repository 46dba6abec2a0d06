"""Key second moments C = E[k kᵀ] of the MLP down projection, for every requested layer in ONE pass.

Why: ROME's u = C⁻¹k, MEMIT's λC regulariser and AlphaEdit's null space all need C at
each edited layer.  The reference tools run one pass over the corpus per layer and
keep all keys in memory; here one forward per token batch feeds every requested
layer's accumulator through an ``fn`` intervention at its ``mlp_key`` site, so

* the corpus is read and run once, whatever the number of layers;
* memory is bounded: one batch of keys of one layer is alive at a time (an ``fn``
  intervention consumes it in flight instead of recording 30 layers' keys), plus one
  d×d float64 sum per layer;
* the forward stops right after the deepest requested layer's keys are consumed — the
  layers above it, the final norm and the LM head (a fifth of SmolLM2's compute) are
  never run.  Stopping is done by raising from inside the last hook; ``intervene``
  removes its hooks on the way out.

Results are cached per layer with :func:`~dlmedit.edit.covariance.load_or_compute_stats`
keyed by (model fingerprint, layer, corpus hash, token count, max length), so a later
request for any subset of layers is served from disk, only the missing layers are
recomputed (still in one pass), and a corrupt cache file is recomputed, never loaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dlmedit.data.corpus import Corpus, load_corpus
from dlmedit.edit.covariance import SecondMomentAccumulator, load_or_compute_stats
from dlmedit.edit.errors import StatisticsError
from dlmedit.edit.solves import check_finite
from dlmedit.interventions import Intervention, intervene

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel

__all__ = [
    "BlockSymmetricAccumulator",
    "StatsSettings",
    "collect_key_moments",
    "default_corpus_spec",
    "key_second_moments",
    "token_rows",
]


@dataclass(frozen=True)
class StatsSettings:
    """What the statistics are computed from.  Every field is part of the cache key.

    ``n_tokens`` real (non-padding) tokens are read — ROME uses 100k Wikipedia
    documents; the estimate needs many more samples than the key dimension (d_mlp) or C
    is singular.  Texts are truncated to ``max_length`` tokens.  ``batch_tokens`` only
    trades speed for memory and is not part of the key.
    """

    corpus: str = "auto"
    n_tokens: int = 100_000
    max_length: int = 128
    batch_tokens: int = 4096
    corpus_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_tokens", "max_length", "batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def default_corpus_spec(lm: LanguageModel) -> str:
    """``world`` for the built-in twins (the text they were trained on), ``wiki`` otherwise."""
    twin = getattr(getattr(lm.module, "config", None), "dlmedit_twin", None)
    return "world" if twin else "wiki"


def token_rows(lm: LanguageModel, texts: Iterable[str], n_tokens: int, max_length: int) -> Iterator[list[int]]:
    """Token rows (BOS as the model expects, truncated to ``max_length``) totalling exactly ``n_tokens``.

    Tokenises lazily, so a 10k-document corpus is only read as far as needed.  The
    last row is cut so the total is exact: the count is part of the cache key.
    """
    bos = lm.tokenizer.bos_token_id
    mask_id = lm.mask_token_id
    remaining = n_tokens
    for text in texts:
        ids = list(lm.tokenizer(text, add_special_tokens=True)["input_ids"])
        if lm.prepend_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        if mask_id is not None:
            ids = [t for t in ids if t != mask_id]
        if len(ids) < 2:  # a text of one token (e.g. only BOS) has no context to speak of
            continue
        ids = ids[: min(max_length, remaining)]
        remaining -= len(ids)
        yield ids
        if remaining <= 0:
            return


class BlockSymmetricAccumulator(SecondMomentAccumulator):
    """`SecondMomentAccumulator` that computes only the upper block triangle of each Kᵀ K.

    Kᵀ K is symmetric, so with the key dimension cut into ``blocks`` column blocks
    only the ``b(b+1)/2`` blocks on and above the diagonal are multiplied — 10/16 of
    the work for 4 blocks — and the lower triangle is mirrored once, when the result
    is read.  On SmolLM2 (d_mlp 1536, 30 layers) the Gram products are a third of the
    cost of a forward pass; this is what keeps all-layer statistics near the cost of
    a plain forward.  Results equal the parent's up to float32 summation order.
    """

    def __init__(self, dims: dict[str, int], blocks: int = 4, **kwargs: Any) -> None:
        super().__init__(dims, **kwargs)
        self.blocks = max(1, int(blocks))

    def _edges(self, d: int) -> list[int]:
        b = min(self.blocks, d)
        return [round(i * d / b) for i in range(b + 1)]

    def update(self, name: str, keys: torch.Tensor) -> None:
        self._check_name(name)
        d = self.dims[name]
        if self.blocks == 1 or keys.shape[-1] != d:
            super().update(name, keys)
            return
        k = keys.detach().reshape(-1, d).to(device=self.device, dtype=self.product_dtype)
        if k.shape[0] == 0:
            return
        check_finite(f"keys at site {name!r}", k)
        edges = self._edges(d)
        total = self._sums[name]
        for i in range(len(edges) - 1):
            a0, a1 = edges[i], edges[i + 1]
            left = k[:, a0:a1].T
            for j in range(i, len(edges) - 1):
                b0, b1 = edges[j], edges[j + 1]
                total[a0:a1, b0:b1].add_((left @ k[:, b0:b1]).to(self.dtype))
        self._lin[name].add_(k.sum(dim=0, dtype=self.dtype))
        self._counts[name] += k.shape[0]

    def result(self, name: str) -> torch.Tensor:
        n = self._require_samples(name)
        S = self._sums[name]
        if self.blocks == 1:
            return S / n
        edges = self._edges(self.dims[name])
        out = S.clone()
        for i in range(len(edges) - 1):
            a0, a1 = edges[i], edges[i + 1]
            diag = out[a0:a1, a0:a1]
            out[a0:a1, a0:a1] = torch.triu(diag) + torch.triu(diag, 1).T
            for j in range(i + 1, len(edges) - 1):
                b0, b1 = edges[j], edges[j + 1]
                out[b0:b1, a0:a1] = out[a0:a1, b0:b1].T
        return out / n


class _StopForward(Exception):
    """Raised by the deepest layer's hook: nothing above it is needed."""


def _batches(rows: Iterable[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    width = 0
    for row in rows:
        new_width = max(width, len(row))
        if batch and new_width * (len(batch) + 1) > batch_tokens:
            yield batch
            batch, new_width = [], len(row)
        batch.append(row)
        width = new_width
    if batch:
        yield batch


def collect_key_moments(
    lm: LanguageModel,
    layers: Sequence[int],
    texts: Iterable[str],
    n_tokens: int,
    max_length: int = 128,
    batch_tokens: int = 4096,
    progress: Callable[[int, int], None] | None = None,
    blocks: int = 4,
    rows: Iterable[list[int]] | None = None,
) -> tuple[dict[int, torch.Tensor], int]:
    """E[k kᵀ] at ``mlp_key`` of every layer in ``layers`` from one pass over ``texts``; returns (C per layer, count).

    No caching here (see :func:`key_second_moments`).  ``progress(done, total)`` is
    called after each batch with token counts.  ``blocks`` > 1 multiplies only the
    upper block triangle of each Kᵀ K (:class:`BlockSymmetricAccumulator`).  ``rows``:
    already tokenised rows (from :func:`token_rows`) to use instead of ``texts``.
    """
    layers = sorted({lm.adapter.check_layer(i) for i in layers})
    if not layers:
        raise ValueError("no layers requested")
    acc = BlockSymmetricAccumulator({str(i): lm.adapter.key_width(i) for i in layers}, blocks=blocks,
                                    product_dtype=torch.float32)
    deepest = layers[-1]
    current: dict[str, torch.Tensor] = {}

    def consumer(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(keys: torch.Tensor) -> torch.Tensor:
            acc.update(str(layer), keys[current["mask"]])
            if layer == deepest:
                raise _StopForward
            return keys

        return fn

    ops = [Intervention(i, "mlp_key", "fn", fn=consumer(i)) for i in layers]
    pad = lm.pad_token_id
    done = 0
    with torch.no_grad(), intervene(lm.adapter, ops):
        source = rows if rows is not None else token_rows(lm, texts, n_tokens, max_length)
        for batch in _batches(source, batch_tokens):
            width = max(len(r) for r in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, row in enumerate(batch):
                ids[b, width - len(row):] = torch.tensor(row)
                mask[b, width - len(row):] = 1
            current["mask"] = mask.bool().to(lm.device)
            try:
                lm.logits(ids.to(lm.device), mask.to(lm.device))
            except _StopForward:
                pass
            done += int(mask.sum())
            if progress is not None:
                progress(done, n_tokens)
    if done == 0:
        raise StatisticsError("the corpus yielded no tokens; statistics need text")
    return {i: acc.result(str(i)) for i in layers}, done


def _cache_key(lm: LanguageModel, fingerprint: str, layer: int, corpus: Corpus, settings: StatsSettings) -> dict[str, Any]:
    return {
        "kind": "mlp_key_second_moment",
        "model": fingerprint,
        "layer": int(layer),
        "d": int(lm.adapter.key_width(layer)),
        "corpus": corpus.hash,
        "n_tokens": settings.n_tokens,
        "max_length": settings.max_length,
    }


class _NotCached(Exception):
    pass


def key_second_moments(
    lm: LanguageModel,
    layers: Sequence[int],
    settings: StatsSettings | None = None,
    *,
    corpus: Corpus | None = None,
    use_cache: bool = True,
    refresh: bool = False,
    cache_directory: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    info: dict[str, Any] | None = None,
) -> dict[int, torch.Tensor]:
    """C = E[k kᵀ] (float64, ``[d_mlp, d_mlp]``) at each layer, from the cache or one pass for the missing ones.

    ``settings.corpus`` ``auto`` picks :func:`default_corpus_spec`.  A prepared
    ``corpus`` can be passed instead (its hash keys the cache).  ``info``, if given, is
    filled with what happened (cached / computed layers, tokens, seconds).
    """
    settings = settings or StatsSettings()
    layers = [lm.adapter.check_layer(i) for i in layers]
    if corpus is None:
        spec = default_corpus_spec(lm) if settings.corpus == "auto" else settings.corpus
        corpus = load_corpus(spec, seed=settings.corpus_seed)
    d = max(lm.adapter.key_width(layer) for layer in layers)
    if settings.n_tokens < d:
        raise StatisticsError(
            f"n_tokens={settings.n_tokens} is below the key dimension {d}: the second moment would be singular. "
            f"Use at least ~{20 * d} tokens (hparam stats_tokens)."
        )
    fingerprint = lm.fingerprint()
    found: dict[int, torch.Tensor] = {}
    missing: list[int] = []
    for layer in dict.fromkeys(layers):
        if not use_cache or refresh:
            missing.append(layer)
            continue

        def not_cached() -> dict[str, torch.Tensor]:
            raise _NotCached

        try:
            found[layer] = load_or_compute_stats(
                _cache_key(lm, fingerprint, layer, corpus, settings), not_cached,
                directory=cache_directory, expected_shapes={"C": (lm.adapter.key_width(layer),) * 2},
            )["C"]
        except _NotCached:
            missing.append(layer)
    start = time.perf_counter()
    count = 0
    if missing:
        # Tokenise first (cheap): a corpus that is too small fails before the expensive pass.
        rows = list(token_rows(lm, corpus.texts, settings.n_tokens, settings.max_length))
        available = sum(len(r) for r in rows)
        if available < settings.n_tokens:
            raise StatisticsError(
                f"corpus {corpus.spec!r} has only {available} tokens (rows of ≤ {settings.max_length}) but "
                f"{settings.n_tokens} were requested; lower stats_tokens or use a larger corpus"
            )
        computed, count = collect_key_moments(lm, missing, (), settings.n_tokens, settings.max_length,
                                              settings.batch_tokens, progress, rows=rows)
        for layer, C in computed.items():
            if use_cache:
                C = load_or_compute_stats(
                    _cache_key(lm, fingerprint, layer, corpus, settings), lambda C=C: {"C": C},
                    directory=cache_directory, expected_shapes={"C": (lm.adapter.key_width(layer),) * 2}, refresh=True,
                )["C"]
            found[layer] = C
    if info is not None:
        info.update(cached=[i for i in found if i not in missing], computed=missing, tokens=count,
                    seconds=time.perf_counter() - start, corpus=corpus.spec, corpus_hash=corpus.hash)
    return {layer: found[layer] for layer in layers}
