"""The residual edit memory: training-free, gradient-free on the weights, attached at inference.

What it does (TimeROME-style).  At one coordinate ``(layer, site)`` it stores facts as
(key, delta) pairs (definitions in :mod:`dlmedit.memory.targets`), fits ONE linear map

    W = D Kᵀ (K Kᵀ + λ I)⁻¹            (float64, closed form; rows of K, D = facts)

and, while attached, rewrites the site's activation ``h`` at *every* position of
*every* forward pass (so every denoising step of an MDM, every decoding step of an
ARM) as

    h ← h + α · sparsify_q(W T (h − μ))

with ``T (h − μ)`` the key in the coordinates of the optional background key statistics
(μ the mean, T the whitening transform; identity / zero when absent — see
:mod:`dlmedit.memory.targets`) and ``sparsify_q`` keeping the
``q`` largest-magnitude coordinates per position (:mod:`dlmedit.memory.sparsify`).  The
backbone's weights are never touched; the write is one ``fn`` intervention through
:func:`dlmedit.interventions.intervene`, so detaching removes it completely and the
logits are bit-identical to the unattached model's.

Knobs: ``alpha`` (write strength, > 0, can change while attached), ``lam`` (ridge λ ≥ 0,
fixed at construction because the maintained inverse depends on it), ``q`` (1..width,
``None`` = width = no sparsification).

Facts are inserted and removed incrementally (:class:`~dlmedit.memory.ridge.IncrementalRidge`:
Woodbury updates of A⁻¹, never a re-solve over all stored keys).  A memory saves to a
directory (``memory.safetensors`` + ``memory.json``) and refuses to load onto a model
whose weight fingerprint differs from the one it was built on.

Default coordinate when no trace is given: ``site="resid"`` at layer ``n_layers // 3``
(an early-middle layer, where causal traces of factual recall typically peak on the
last subject token — ROME's GPT-2 XL layer 17/48, GPT-J 5/28); pass the traced peak
(temporal trace for MDMs, causal trace for ARMs) whenever one is available.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch

from dlmedit.cache import atomic_save_safetensors, atomic_write_json, sha256_file
from dlmedit.edit.errors import ModelMismatchError
from dlmedit.errors import DlmeditError, InvalidSettingError
from dlmedit.interventions import Intervention, intervene
from dlmedit.memory.ridge import IncrementalRidge, ridge_solve
from dlmedit.memory.sparsify import check_q, sparsify
from dlmedit.memory.targets import FactTargets, KeyStatistics, MemoryFact, compute_fact_targets, site_width

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel

__all__ = [
    "MEMORY_JSON",
    "MEMORY_TENSORS",
    "MemoryEntry",
    "MemoryFormatError",
    "MemoryHandle",
    "ResidualMemory",
    "default_layer",
]

MEMORY_TENSORS = "memory.safetensors"
MEMORY_JSON = "memory.json"
_FORMAT = "dlmedit.ResidualMemory"
_VERSION = 1
SITES = ("resid", "attn_out", "mlp_out", "mlp_key", "embed")


class MemoryFormatError(DlmeditError, ValueError):
    """A saved memory directory is missing, corrupt or inconsistent."""


def default_layer(n_layers: int) -> int:
    """The documented default layer of the memory when no trace is given: ``n_layers // 3``."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be ≥ 1, got {n_layers}")
    return n_layers // 3


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise InvalidSettingError(f"α (--alpha) must be a finite number > 0 (the memory's write strength), got {alpha!r}")
    return float(alpha)


def _check_gate(gate: float | None) -> float | None:
    if gate is None:
        return None
    if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not math.isfinite(gate) or not -1 < gate < 1:
        raise InvalidSettingError(
            f"gate (--gate) must be a cosine threshold in (-1, 1) or None (no gate), got {gate!r}")
    return float(gate)


@dataclass
class MemoryEntry:
    """One stored fact: its key and delta at the coordinate, and what the model knew before."""

    fact: MemoryFact
    key: torch.Tensor  # [D] float64 (offset subtracted)
    delta: torch.Tensor  # [D] float64
    known: bool
    logprob_before: float
    key_norm: float
    subject_token: int

    def meta(self) -> dict[str, Any]:
        return {**self.fact.as_dict(), "known": self.known, "logprob_before": self.logprob_before,
                "key_norm": self.key_norm, "subject_token": self.subject_token}


class MemoryHandle:
    """An attached memory.  ``detach()`` (or leaving the ``with`` block) removes its hook."""

    def __init__(self, memory: ResidualMemory) -> None:
        self.memory = memory
        op = Intervention(memory.layer, memory.site, "fn", fn=memory.apply, name="residual_memory")
        self._cm = intervene(memory.lm.adapter, [op])
        self._cm.__enter__()
        self.attached = True

    def detach(self) -> None:
        if self.attached:
            self.attached = False
            self._cm.__exit__(None, None, None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __del__(self) -> None:  # a forgotten handle must not leave a hook behind
        try:
            self.detach()
        except Exception:
            pass


class ResidualMemory:
    """Key → delta memory at one (layer, site), added to the activation on every forward."""

    def __init__(
        self,
        lm: LanguageModel,
        layer: int | None = None,
        site: str = "resid",
        *,
        alpha: float = 1.0,
        lam: float = 1.0,
        q: int | None = None,
        gate: float | None = None,
        key_stats: KeyStatistics | None = None,
        n_states: int = 8,
        seed: int = 0,
        known_threshold: float = 0.1,
        delta_method: str = "gradient",
        fingerprint: str | None = None,
    ) -> None:
        if site not in SITES:
            raise InvalidSettingError(f"unknown site {site!r} (--site); expected one of {', '.join(SITES)}")
        self.lm = lm
        self.layer = lm.adapter.check_layer(default_layer(lm.n_layers) if layer is None else layer)
        self.site = site
        self.width = site_width(lm, site)
        self._alpha = _check_alpha(alpha)
        self._q = check_q(q, self.width)
        self._gate = _check_gate(gate)
        self.ridge = IncrementalRidge(self.width, self.width, lam)
        if key_stats is not None:
            if key_stats.mean.shape != (self.width,) or (
                    key_stats.transform is not None and key_stats.transform.shape != (self.width, self.width)):
                raise ValueError(f"key statistics do not match the site's width {self.width}")
        self.key_stats = key_stats
        self.n_states = int(n_states)
        self.seed = int(seed)
        self.known_threshold = float(known_threshold)
        self.delta_method = delta_method
        self.fingerprint = fingerprint or lm.fingerprint()
        self.entries: dict[str, MemoryEntry] = {}
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._gate_cast: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}

    # -- knobs -------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = _check_alpha(value)

    @property
    def q(self) -> int:
        return self._q

    @q.setter
    def q(self, value: int | None) -> None:
        self._q = check_q(value, self.width)

    @property
    def gate(self) -> float | None:
        return self._gate

    @gate.setter
    def gate(self, value: float | None) -> None:
        self._gate = _check_gate(value)

    @property
    def lam(self) -> float:
        return self.ridge.lam

    @property
    def n_facts(self) -> int:
        return len(self.entries)

    @property
    def unknown_facts(self) -> list[MemoryFact]:
        """Facts that were inserted although the model did not know them (see ``known_threshold``)."""
        return [e.fact for e in self.entries.values() if not e.known]

    @property
    def W(self) -> torch.Tensor:
        """The current map [D, D] (float64)."""
        return self.ridge.W

    # -- insertion / removal ------------------------------------------------------------
    def compute_targets(
        self, facts: Sequence[MemoryFact], progress: Callable[[int], None] | None = None, batch_size: int = 16
    ) -> FactTargets:
        """Keys and deltas of ``facts`` at this memory's coordinate (does not insert them)."""
        return compute_fact_targets(
            self.lm, facts, self.layer, self.site, n_states=self.n_states, seed=self.seed,
            key_stats=self.key_stats, delta_method=self.delta_method, known_threshold=self.known_threshold,
            progress=progress, batch_size=batch_size,
        )

    def insert(
        self,
        facts: MemoryFact | Sequence[MemoryFact],
        progress: Callable[[int], None] | None = None,
        batch_size: int = 16,
    ) -> FactTargets:
        """Compute keys/deltas of ``facts`` on the unedited model and add them to the map (one update)."""
        facts = [facts] if isinstance(facts, MemoryFact) else list(facts)
        self._check_new(facts)
        targets = self.compute_targets(facts, progress, batch_size)
        self.insert_targets(targets)
        return targets

    def _check_new(self, facts: Sequence[MemoryFact]) -> None:
        ids = [f.id for f in facts]
        dup = sorted({i for i in ids if ids.count(i) > 1} | {i for i in ids if i in self.entries})
        if dup:
            raise ValueError(f"facts already stored or given twice: {dup[:5]}; remove them first")

    def insert_targets(self, targets: FactTargets) -> None:
        """Add precomputed keys/deltas (e.g. from :meth:`compute_targets`) with one Woodbury update."""
        self._check_new(targets.facts)
        self.ridge.insert(targets.keys, targets.deltas)
        for i, fact in enumerate(targets.facts):
            self.entries[fact.id] = MemoryEntry(
                fact, targets.keys[i].clone(), targets.deltas[i].clone(), bool(targets.known[i]),
                float(targets.logprob[i]), float(targets.key_norms[i]), int(targets.subject_token[i]),
            )
        self._cast.clear()
        self._gate_cast.clear()

    def remove(self, fact_ids: str | MemoryFact | Sequence[str | MemoryFact]) -> None:
        """Remove stored facts (downdate of the map; the others keep their exact contribution)."""
        items = [fact_ids] if isinstance(fact_ids, (str, MemoryFact)) else list(fact_ids)
        ids = [f.id if isinstance(f, MemoryFact) else str(f) for f in items]
        missing = [i for i in ids if i not in self.entries]
        if missing:
            raise KeyError(f"facts not in the memory: {missing[:5]}")
        K = torch.stack([self.entries[i].key for i in ids])
        D = torch.stack([self.entries[i].delta for i in ids])
        self.ridge.remove(K, D)
        for i in ids:
            del self.entries[i]
        self._cast.clear()
        self._gate_cast.clear()

    def keys_and_deltas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored keys and deltas, [n, D] each (float64), in insertion order."""
        if not self.entries:
            empty = torch.zeros(0, self.width, dtype=torch.float64)
            return empty, empty.clone()
        return (torch.stack([e.key for e in self.entries.values()]),
                torch.stack([e.delta for e in self.entries.values()]))

    def solve_from_scratch(self) -> torch.Tensor:
        """W re-solved from all stored keys (for checking the incremental state)."""
        K, D = self.keys_and_deltas()
        return ridge_solve(K, D, self.lam)

    # -- inference ----------------------------------------------------------------------
    def _matrices(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (dtype, device)
        if key not in self._cast:
            W = self.ridge.W
            bias = None
            if self.key_stats is not None:  # W T (h − μ) = (W T) h − W T μ: one matmul per forward
                if self.key_stats.transform is not None:
                    W = W @ self.key_stats.transform.to(W.device)
                bias = (W @ self.key_stats.mean.to(W.device)).to(device=device, dtype=dtype)
            self._cast[key] = (W.T.contiguous().to(device=device, dtype=dtype), bias)
        return self._cast[key]

    def read(self, h: torch.Tensor) -> torch.Tensor:
        """What the memory adds to activations ``h`` [..., D]: α · sparsify_q(W T (h − μ))."""
        if h.shape[-1] != self.width:
            raise ValueError(f"activations have width {h.shape[-1]}; the memory's site has width {self.width}")
        Wt, bias = self._matrices(h.dtype, h.device)
        out = h @ Wt
        if bias is not None:
            out = out - bias
        out = self._alpha * sparsify(out, self._q)
        if self._gate is not None:
            out = out * self.gate_mask(h).unsqueeze(-1).to(out.dtype)
        return out

    def gate_mask(self, h: torch.Tensor) -> torch.Tensor:
        """Positions whose key is close to a stored key: max cosine(T (h − μ), k_i) ≥ gate.

        Why: the ridge map is linear, so without a gate every position whose key overlaps
        the span of the stored keys gets a write — with a few dozen facts in a narrow
        residual stream that is nearly every position, and retained facts are damaged as
        much as forgotten ones.  The gate writes only where a stored key actually recurs.
        """
        Tt, mu, K_hat = self._gate_matrices(h.dtype, h.device)
        k = h if mu is None else h - mu
        if Tt is not None:
            k = k @ Tt
        sim = torch.nn.functional.normalize(k, dim=-1) @ K_hat.T
        return sim.max(dim=-1).values >= self._gate

    def _gate_matrices(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        key = (dtype, device)
        if key not in self._gate_cast:
            K, _ = self.keys_and_deltas()
            K_hat = torch.nn.functional.normalize(K.double(), dim=-1)
            Tt = mu = None
            if self.key_stats is not None:
                mu = self.key_stats.mean.to(device=device, dtype=dtype)
                if self.key_stats.transform is not None:
                    Tt = self.key_stats.transform.T.contiguous().to(device=device, dtype=dtype)
            self._gate_cast[key] = (Tt, mu, K_hat.to(device=device, dtype=dtype))
        return self._gate_cast[key]

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """The intervention function: ``h + read(h)`` (identity when the memory is empty)."""
        if not self.entries:
            return h
        return h + self.read(h)

    def attach(self) -> MemoryHandle:
        """Install the memory on its model; returns a handle (context manager) that detaches it."""
        return MemoryHandle(self)

    @contextmanager
    def attached(self) -> Iterator[Self]:
        handle = self.attach()
        try:
            yield self
        finally:
            handle.detach()

    # -- persistence --------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "coordinate": {"layer": self.layer, "site": self.site, "width": self.width},
            "alpha": self._alpha,
            "lambda": self.lam,
            "q": self._q,
            "gate": self._gate,
            "n_facts": self.n_facts,
            "n_unknown": len(self.unknown_facts),
            "key_stats": None if self.key_stats is None else self.key_stats.describe(),
            "n_states": self.n_states,
            "seed": self.seed,
            "delta_method": self.delta_method,
            "known_threshold": self.known_threshold,
            "definition": {
                "write": "h <- h + alpha * sparsify_q(W T (h - mu)) at every position of every forward"
                         + ("" if self._gate is None else
                            f", only where max_i cos(T (h - mu), k_i) >= {self._gate}"),
                "key": f"T (h - mu), h = {self.site} activation at layer {self.layer} at the last subject token, "
                       "mean over target states; mu, T = background mean and whitening (identity if absent)",
                "delta": "-(or +) ||h|| * unit gradient of mean token log p(answer) w.r.t. h (one step)",
                "sparsify_q": "q largest |.| coordinates per position vector, ties to the lower index",
                "map": "W = D K^T (K K^T + lambda I)^-1, float64, Woodbury-maintained",
            },
            "model_fingerprint": self.fingerprint,
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``memory.safetensors`` and ``memory.json`` (the JSON last, with the tensors' sha256)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        K, D = self.keys_and_deltas()
        tensors = {"keys": K, "deltas": D, **{f"ridge.{k}": v for k, v in self.ridge.state_tensors().items()}}
        if self.key_stats is not None:
            tensors["key_stats.mean"] = self.key_stats.mean
            if self.key_stats.transform is not None:
                tensors["key_stats.transform"] = self.key_stats.transform
        atomic_save_safetensors(out / MEMORY_TENSORS, tensors, metadata={"format": _FORMAT})
        meta = {
            "format": _FORMAT,
            "format_version": _VERSION,
            "model_name": getattr(self.lm, "name", ""),
            **self.describe(),
            "facts": [e.meta() for e in self.entries.values()],
            "tensors_sha256": sha256_file(out / MEMORY_TENSORS),
        }
        atomic_write_json(out / MEMORY_JSON, meta)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str], lm: LanguageModel) -> ResidualMemory:
        """Load a saved memory onto ``lm``; refuses a model whose weights differ from the original's."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        src = Path(directory)
        json_path, tensor_path = src / MEMORY_JSON, src / MEMORY_TENSORS
        if not json_path.is_file() or not tensor_path.is_file():
            raise MemoryFormatError(f"{src} is not a saved residual memory: expected {MEMORY_JSON} and {MEMORY_TENSORS}")
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MemoryFormatError(f"{json_path} is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("format_version") != _VERSION:
            raise MemoryFormatError(f"{json_path} is not a version-{_VERSION} {_FORMAT} file")
        if meta.get("tensors_sha256") != sha256_file(tensor_path):
            raise MemoryFormatError(f"{tensor_path} does not match the checksum in {json_path} (corrupt or mixed saves)")
        actual = lm.fingerprint()
        if meta.get("model_fingerprint") != actual:
            raise ModelMismatchError(
                f"the memory in {src} was built on model {meta.get('model_name')!r} with weight fingerprint "
                f"{str(meta.get('model_fingerprint'))[:12]}…, but this model ({getattr(lm, 'name', '?')!r}) has "
                f"fingerprint {actual[:12]}…: keys and deltas are only meaningful on the model they were read from"
            )
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise MemoryFormatError(f"cannot read {tensor_path}: {exc}") from exc
        coord = meta["coordinate"]
        memory = cls(
            lm, coord["layer"], coord["site"], alpha=meta["alpha"], lam=meta["lambda"], q=meta["q"], gate=meta.get("gate"),
            key_stats=_key_stats_from(meta.get("key_stats"), tensors), n_states=meta["n_states"], seed=meta["seed"],
            known_threshold=meta["known_threshold"], delta_method=meta["delta_method"], fingerprint=actual,
        )
        facts = meta["facts"]
        K, D = tensors["keys"], tensors["deltas"]
        if K.shape[0] != len(facts) or D.shape[0] != len(facts):
            raise MemoryFormatError(f"{tensor_path} holds {K.shape[0]} keys but {json_path} lists {len(facts)} facts")
        for i, row in enumerate(facts):
            fact = MemoryFact(row["prompt"], row["subject"], row["answer"], row["target_new"], row["fact_id"])
            memory.entries[fact.id] = MemoryEntry(fact, K[i].double(), D[i].double(), bool(row["known"]),
                                                  float(row["logprob_before"]), float(row["key_norm"]),
                                                  int(row["subject_token"]))
        ridge_state = {k.removeprefix("ridge."): v for k, v in tensors.items() if k.startswith("ridge.")}
        memory.ridge = IncrementalRidge.from_state(ridge_state, meta["lambda"], len(facts))
        return memory


def _key_stats_from(info: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> KeyStatistics | None:
    if info is None:
        return None
    if "key_stats.mean" not in tensors:
        raise MemoryFormatError("memory.json describes key statistics that memory.safetensors does not hold")
    return KeyStatistics(tensors["key_stats.mean"].double(), tensors.get("key_stats.transform"), info["kind"],
                         int(info["n_positions"]), float(info["eps"]))
