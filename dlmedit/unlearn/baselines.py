"""Unlearning baselines the residual edit memory is compared with.

Training-time (they change the weights; :class:`WeightSnapshot` restores them bit-exactly):

* **GradAscent** — maximise the NLL of the forget answers.
* **GradDiff** — GradAscent + ``retain_weight`` × NLL of retain answers.
* **NPO** (Zhang et al. 2024) — ``−(2/β) E log σ(−β (log π(y|x) − log π_ref(y|x)))`` on forget
  answers, with a frozen copy of the model as π_ref, plus ``retain_weight`` × retain NLL
  (open-unlearning's default NPO recipe).  β = 0.1.
* **RMU** (Li et al. 2024, WMDP) — push the residual stream at layer ``l`` on forget rows
  towards ``c·u`` (a fixed random unit vector ``u``, ``c`` = ``rmu_coeff`` × the mean
  activation norm there) and keep it equal to the frozen model's on retain rows (MSE,
  weight ``rmu_retain_weight``).  Only the parameters of blocks ``l−2 … l`` are trained
  (WMDP trains their MLPs; here the whole blocks — documented deviation).

Inference-time: **activation steering** — add one fixed vector at a layer, at every
position.  The vector is the mean of the memory's own target deltas for the forget
facts (:mod:`dlmedit.memory.targets`), so steering and the memory differ only in
whether the write is conditioned on the key.

The loss on an answer is the paradigm's: −mean of target log-probs over target states
(``paradigm.target_states(..., "partial")`` — for MDMs the all-masked state plus
LLaDA-style partially revealed ones, for ARMs the teacher-forced state), laid out with
``paradigm.layout`` and read with ``TargetBatch.target_logprobs``.  States are redrawn
every step from a generator seeded by (seed, step).  No code here asks which paradigm
the model has.

Each run records wall time and peak resident memory (:class:`PeakMemory`).
"""

from __future__ import annotations

import copy
import ctypes
import math
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Self

import torch
import torch.nn.functional as F

from dlmedit.interventions import Intervention, intervene
from dlmedit.unlearn.evaluate import QAItem

if TYPE_CHECKING:
    from dlmedit.models.language_model import LanguageModel
    from dlmedit.paradigm.base import TargetState

__all__ = [
    "TRAINING_METHODS",
    "BaselineResult",
    "PeakMemory",
    "TrainConfig",
    "WeightSnapshot",
    "answer_logprobs",
    "frozen_copy",
    "run_training_baseline",
    "steer",
    "steering_vector",
]

TRAINING_METHODS = ("ga", "graddiff", "npo", "rmu")


# ----------------------------------------------------------------------------- resources


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; falls back to the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release_free_heap() -> None:
    """Give freed-but-resident heap pages back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    Without it, memory freed by earlier work stays in the RSS and a new allocation can
    reuse it without the RSS growing, so a peak measured from the entry RSS reads ~0.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


class PeakMemory:
    """Peak resident memory while the block runs, sampled every ``interval`` seconds.

    ``tracemalloc`` does not see torch's allocations and ``ru_maxrss`` is a process-wide
    high-water mark, so a sampler thread reads the RSS instead.  ``peak_mb`` is the
    highest RSS seen, ``increase_mb`` that minus the RSS at entry (taken after freed heap
    pages are returned to the OS, so reused memory is not mistaken for no allocation).
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        _release_free_heap()
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.start) / 2**20


# ----------------------------------------------------------------------------- weights


class WeightSnapshot:
    """Copies of parameters taken before training; ``restore()`` puts them back bit-exactly."""

    def __init__(self, module: torch.nn.Module, names: Sequence[str] | None = None) -> None:
        params = dict(module.named_parameters())
        chosen = list(params) if names is None else list(names)
        self._params = {n: params[n] for n in chosen}
        self._saved = {n: p.detach().clone() for n, p in self._params.items()}

    def restore(self) -> None:
        with torch.no_grad():
            for name, p in self._params.items():
                p.copy_(self._saved[name])

    def changed(self) -> list[str]:
        return [n for n, p in self._params.items() if not torch.equal(p.detach(), self._saved[n])]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def frozen_copy(lm: LanguageModel) -> LanguageModel:
    """An independent frozen copy of ``lm`` (same tokenizer and paradigm; weights deep-copied)."""
    from dlmedit.models.language_model import LanguageModel

    module = copy.deepcopy(lm.module).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    adapter = type(lm.adapter)(module)
    return LanguageModel(module, lm.tokenizer, adapter, lm.paradigm, name=f"{lm.name} (frozen reference)",
                         prepend_bos=lm.prepend_bos, source=lm.source)


# ----------------------------------------------------------------------------- losses


@dataclass
class _Encoded:
    prompt_ids: list[int]
    answer_ids: list[int]


def _encode_items(lm: LanguageModel, items: Sequence[QAItem]) -> list[_Encoded]:
    return [_Encoded(*lm.encode_pair(it.prompt, it.answer)) for it in items]


def _states(lm: LanguageModel, enc: Sequence[_Encoded], n_states: int, gen: torch.Generator) -> tuple[
        list[TargetState], torch.Tensor]:
    states, owner = [], []
    for i, e in enumerate(enc):
        s = lm.paradigm.target_states(lm, e.prompt_ids, e.answer_ids, kind="partial", n=n_states, generator=gen)
        states.extend(s)
        owner.extend([i] * len(s))
    return states, torch.tensor(owner)


def answer_logprobs(lm: LanguageModel, states: Sequence[TargetState]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence log-prob [R], mean token log-prob [R]) of each state's scored target tokens (differentiable)."""
    batch = lm.paradigm.layout(lm, states).to(lm.device)
    lp = batch.target_logprobs(lm.logits(batch.input_ids, batch.attention_mask))
    n = batch.scored.to(lp.device).sum(1).clamp(min=1)
    seq = lp.sum(1)
    return seq, seq / n


def _per_fact(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    owner = owner.to(values.device)
    counts = torch.bincount(owner, minlength=n).to(values.dtype)
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, owner, values) / counts


# ----------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Hyper-parameters shared by the training baselines (one fixed recipe for all of them)."""

    steps: int = 30
    lr: float = 1e-4
    batch_size: int = 16
    n_states: int = 4
    retain_weight: float = 1.0
    beta: float = 0.1
    rmu_layer: int | None = None
    rmu_coeff: float = 1.0
    rmu_retain_weight: float = 100.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.batch_size < 1 or self.n_states < 1:
            raise ValueError("batch_size and n_states must be ≥ 1")
        if self.beta <= 0:
            raise ValueError(f"NPO β must be > 0, got {self.beta}")


@dataclass
class BaselineResult:
    """What a training baseline did: losses per step, time, memory, which parameters moved."""

    method: str
    config: dict[str, Any]
    wall_time_s: float
    peak_rss_mb: float
    rss_increase_mb: float
    losses: list[float] = field(default_factory=list)
    forget_lp_trace: list[float] = field(default_factory=list)
    trained_params: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(n: int, size: int, seed: int) -> Iterator[list[int]]:
    """Endless seeded epochs of index batches (every item once per epoch)."""
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1009 + epoch)).tolist()
        for start in range(0, n, size):
            yield perm[start : start + size]
        epoch += 1


def _rmu_layer(lm: LanguageModel, cfg: TrainConfig) -> int:
    from dlmedit.memory.residual import default_layer

    return lm.adapter.check_layer(cfg.rmu_layer if cfg.rmu_layer is not None else default_layer(lm.n_layers))


def _trainable(lm: LanguageModel, method: str, cfg: TrainConfig) -> list[tuple[str, torch.nn.Parameter]]:
    if method != "rmu":
        return [(n, p) for n, p in lm.module.named_parameters() if p.is_floating_point()]
    layer = _rmu_layer(lm, cfg)
    chosen = {id(p) for i in range(max(0, layer - 2), layer + 1) for p in lm.adapter.layer(i).parameters()}
    return [(n, p) for n, p in lm.module.named_parameters() if id(p) in chosen]


def _row_mask(lm: LanguageModel, states: Sequence[TargetState]) -> tuple[Any, torch.Tensor]:
    batch = lm.paradigm.layout(lm, states).to(lm.device)
    return batch, batch.attention_mask.bool()


def run_training_baseline(
    lm: LanguageModel,
    method: str,
    forget: Sequence[QAItem],
    retain: Sequence[QAItem],
    cfg: TrainConfig | None = None,
    *,
    progress: Callable[[int, float], None] | None = None,
) -> BaselineResult:
    """Train ``lm`` in place with ``method`` ∈ ga / graddiff / npo / rmu.

    The caller restores the weights (``WeightSnapshot``) after evaluating.  Returns the
    per-step losses, the forget answers' mean token log-prob per step (on the states
    of that step's batch), time, peak memory and the names of the trained parameters.
    """
    if method not in TRAINING_METHODS:
        raise ValueError(f"unknown training baseline {method!r}; use one of {', '.join(TRAINING_METHODS)}")
    if not forget:
        raise ValueError("no forget items")
    needs_retain = (method in ("graddiff", "rmu")) or (method == "npo" and (cfg or TrainConfig()).retain_weight > 0)
    if needs_retain and not retain:
        raise ValueError(f"{method} needs retain items")
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    f_enc, r_enc = _encode_items(lm, forget), _encode_items(lm, retain)
    named = _trainable(lm, method, cfg)
    trainable_ids = {id(p) for _, p in named}
    grad_flags = {n: p.requires_grad for n, p in lm.module.named_parameters()}
    for _, p in lm.module.named_parameters():
        p.requires_grad_(id(p) in trainable_ids)
    result = BaselineResult(method, asdict(cfg), 0.0, 0.0, 0.0, trained_params=[n for n, _ in named])
    was_training = lm.module.training
    with PeakMemory() as mem:
        start = time.perf_counter()
        ref = frozen_copy(lm) if method in ("npo", "rmu") else None
        rmu_target = _rmu_setup(lm, ref, f_enc, cfg) if method == "rmu" else None
        opt = torch.optim.Adam([p for _, p in named], lr=cfg.lr)
        f_batches = _batches(len(f_enc), cfg.batch_size, cfg.seed)
        r_batches = _batches(len(r_enc), cfg.batch_size, cfg.seed + 1) if r_enc else None
        try:
            for step in range(cfg.steps):
                gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
                fb = [f_enc[i] for i in next(f_batches)]
                rb = [r_enc[i] for i in next(r_batches)] if r_batches is not None else []
                with torch.enable_grad():
                    loss, f_lp = _step_loss(lm, method, fb, rb, cfg, gen, ref, rmu_target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm)
                opt.step()
                result.losses.append(float(loss.detach()))
                result.forget_lp_trace.append(f_lp)
                if progress is not None:
                    progress(step, result.losses[-1])
        finally:
            for n, p in lm.module.named_parameters():
                p.requires_grad_(grad_flags[n])
                p.grad = None
            lm.module.train(was_training)
            del ref
        result.wall_time_s = time.perf_counter() - start
    result.peak_rss_mb, result.rss_increase_mb = mem.peak_mb, mem.increase_mb
    return result


def _nll(lm: LanguageModel, enc: Sequence[_Encoded], n_states: int, gen: torch.Generator) -> tuple[
        torch.Tensor, torch.Tensor, list[TargetState], torch.Tensor]:
    """Per-fact mean token log-prob (mean over states) plus the states used."""
    states, owner = _states(lm, enc, n_states, gen)
    seq, mean = answer_logprobs(lm, states)
    return _per_fact(mean, owner, len(enc)), seq, states, owner


def _step_loss(
    lm: LanguageModel,
    method: str,
    fb: Sequence[_Encoded],
    rb: Sequence[_Encoded],
    cfg: TrainConfig,
    gen: torch.Generator,
    ref: LanguageModel | None,
    rmu_target: torch.Tensor | None,
) -> tuple[torch.Tensor, float]:
    if method == "rmu":
        assert ref is not None and rmu_target is not None
        return _rmu_loss(lm, ref, fb, rb, cfg, gen, rmu_target)
    f_lp, f_seq, f_states, _ = _nll(lm, fb, cfg.n_states, gen)
    if method in ("ga", "graddiff"):
        loss = f_lp.mean()  # ascent on the NLL = descent on the log-prob
    else:  # npo
        assert ref is not None
        with torch.no_grad():
            ref_seq, _ = answer_logprobs(ref, f_states)
        ratio = f_seq - ref_seq.to(f_seq)
        loss = -(2.0 / cfg.beta) * F.logsigmoid(-cfg.beta * ratio).mean()
    if method in ("graddiff", "npo") and cfg.retain_weight > 0 and rb:
        r_lp, _, _, _ = _nll(lm, rb, cfg.n_states, gen)
        loss = loss - cfg.retain_weight * r_lp.mean()
    return loss, float(f_lp.detach().mean())


def _site_rows(lm: LanguageModel, layer: int, states: Sequence[TargetState], keep_grad: bool) -> tuple[
        torch.Tensor, torch.Tensor]:
    batch, mask = _row_mask(lm, states)
    with intervene(lm.adapter, [Intervention(layer, "resid", "read", keep_grad=keep_grad, name="h")]) as rec:
        lm.logits(batch.input_ids, batch.attention_mask)
    return rec["h"], mask


def _rmu_setup(lm: LanguageModel, ref: LanguageModel | None, f_enc: Sequence[_Encoded], cfg: TrainConfig) -> torch.Tensor:
    """The RMU control vector c·u: a seeded random unit vector scaled to ``rmu_coeff`` × mean ‖h‖."""
    assert ref is not None
    layer = _rmu_layer(lm, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    states, _ = _states(ref, f_enc, 1, gen)
    with torch.no_grad():
        h, mask = _site_rows(ref, layer, states, keep_grad=False)
    scale = float(h[mask].float().norm(dim=-1).mean())
    u = torch.rand(h.shape[-1], generator=gen)
    return (cfg.rmu_coeff * scale * u / u.norm()).to(device=lm.device, dtype=h.dtype)


def _rmu_loss(
    lm: LanguageModel,
    ref: LanguageModel,
    fb: Sequence[_Encoded],
    rb: Sequence[_Encoded],
    cfg: TrainConfig,
    gen: torch.Generator,
    target: torch.Tensor,
) -> tuple[torch.Tensor, float]:
    layer = _rmu_layer(lm, cfg)
    f_states, _ = _states(lm, fb, cfg.n_states, gen)
    h_f, m_f = _site_rows(lm, layer, f_states, keep_grad=True)
    loss = ((h_f[m_f] - target) ** 2).mean()
    if rb:
        r_states, _ = _states(lm, rb, cfg.n_states, gen)
        h_r, m_r = _site_rows(lm, layer, r_states, keep_grad=True)
        with torch.no_grad():
            h_ref, _ = _site_rows(ref, layer, r_states, keep_grad=False)
        loss = loss + cfg.rmu_retain_weight * ((h_r[m_r] - h_ref[m_r]) ** 2).mean()
    with torch.no_grad():
        _, mean = answer_logprobs(lm, f_states)
    return loss, float(mean.mean())


# ----------------------------------------------------------------------------- steering


def steering_vector(lm: LanguageModel, facts: Sequence[Any], layer: int, site: str = "resid", *,
                    n_states: int = 8, seed: int = 0) -> torch.Tensor:
    """Mean of the memory's target deltas of ``facts`` (``MemoryFact``) at (layer, site), float64 [D]."""
    from dlmedit.memory.targets import compute_fact_targets

    targets = compute_fact_targets(lm, facts, layer, site, n_states=n_states, seed=seed)
    return targets.deltas.mean(0)


@contextmanager
def steer(lm: LanguageModel, layer: int, site: str, vector: torch.Tensor, alpha: float = 1.0) -> Iterator[None]:
    """Add ``alpha · vector`` at (layer, site) at every position while the block runs."""
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"steering α must be a finite number > 0, got {alpha}")
    value = (alpha * vector.to(torch.float64)).to(device=lm.device, dtype=lm.dtype)
    with intervene(lm.adapter, [Intervention(layer, site, "add", value=value, name="steering")]):
        yield
