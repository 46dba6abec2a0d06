"""The pieces of the ARM → masked-diffusion adaptation objective: annealed attention, noise, losses.

Why these choices (measured before this module existed, see the README's adaptation
section): switching a pretrained ARM straight to full bidirectional attention and
training it with the masked-diffusion loss on a CPU budget forgets its facts; starting
from an attention pattern under which the MDM *equals* the ARM keeps them.  So:

* **Annealed attention.**  Position i attends to j with an additive logit penalty that
  is 0 where the ARM-equivalent pattern allows it (j ≤ i and j is not a mask token,
  or j = i) and ``log(openness)`` elsewhere.  ``openness`` = 0 is the ARM-equivalent
  pattern (masks invisible to other positions, no look-ahead): with Dream's logit shift
  the model then *is* the ARM on visible context.  ``openness`` = 1 is full
  bidirectional attention, the shipped model.  Between, every forbidden entry is let in
  with weight ``openness`` — a deterministic schedule (unlike DiffuLLaMA's random
  unmasking of mask entries), so any point of the anneal is a well-defined model that
  can be evaluated.
* **Noise.**  Per row a number k of masked positions, uniform in 1..L−1 (the first
  token is never masked), weighted 1/k (the 1/t weight of the twins' and LLaDA's loss);
  a share of rows masks only a suffix span (the prompt → answer layout generation uses).
* **Loss.**  Masked cross-entropy with Dream's shift (logits at j−1 predict token j)
  plus self-distillation: KL(frozen base ARM ‖ student) of the next-token distribution
  at every visible position, which holds the base model's knowledge while the masked
  slots learn to answer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AnnealedAttention", "attention_bias", "diffusion_losses", "sample_noise"]


def attention_bias(input_ids: torch.Tensor, mask_token_id: int, openness: float,
                   padding_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                   masks_see_all: bool = False) -> torch.Tensor:
    """Additive attention bias [B, 1, T, T] of the annealed pattern (0 allowed, log(openness) penalised, −inf padding).

    ``masks_see_all``: mask positions attend to every position (the denoiser's unknowns
    get full bidirectional context) while visible positions keep the ARM-equivalent
    pattern, so everything the base model computes at visible tokens is unchanged.
    """
    if not 0.0 <= openness <= 1.0:
        raise ValueError(f"openness must be in [0, 1], got {openness}")
    _b, t = input_ids.shape
    device = input_ids.device
    rows = torch.arange(t, device=device)
    causal = rows[None, :] <= rows[:, None]  # [T(query), T(key)]
    visible = input_ids != mask_token_id  # [B, T]
    allowed = causal[None] & (visible[:, None, :] | torch.eye(t, dtype=torch.bool, device=device)[None])
    if masks_see_all:
        allowed = allowed | (~visible)[:, :, None]
    neg_inf = torch.finfo(dtype).min
    penalty = math.log(openness) if openness > 0 else neg_inf
    bias = torch.where(allowed, torch.zeros((), dtype=dtype, device=device),
                       torch.full((), max(penalty, neg_inf), dtype=dtype, device=device))
    if padding_mask is not None:
        keep = padding_mask.bool()[:, None, :] & torch.ones(t, 1, dtype=torch.bool, device=device)[None]
        bias = torch.where(keep, bias, torch.full((), neg_inf, dtype=dtype, device=device))
        eye = torch.eye(t, dtype=torch.bool, device=device)[None]
        bias = torch.where(eye, torch.zeros((), dtype=dtype, device=device), bias)  # padded rows see themselves
    return bias[:, None]


class AnnealedAttention:
    """Serve a decoder at a given openness: a forward pre-hook turns its (2-D or absent) mask into the bias.

    Why a hook on the top module: every caller (the trainer, the paradigm's sampler, the
    recall check) passes ``input_ids`` and a padding mask as usual, and the model sees
    the annealed pattern without any caller knowing about it.  At openness 1 no hook is
    needed — the module is simply made bidirectional.
    """

    def __init__(self, module: nn.Module, mask_token_id: int, masks_see_all: bool = False) -> None:
        self.module = module
        self.mask_token_id = int(mask_token_id)
        self.masks_see_all = bool(masks_see_all)
        self.openness = 0.0

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("annealed attention needs input_ids (inputs_embeds carry no mask positions)")
        padding = kwargs.get("attention_mask")
        if padding is not None and padding.dim() != 2:
            return args, kwargs
        dtype = next(module.parameters()).dtype
        kwargs["attention_mask"] = attention_bias(ids, self.mask_token_id, self.openness, padding, dtype,
                                                  self.masks_see_all)
        return args, kwargs

    def install(self, openness: float) -> None:
        """Serve the module at ``openness`` for good (a shipped, partially annealed model)."""
        self.openness = float(openness)
        self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        self.module._dlmedit_attention = self  # keeps the pattern inspectable: module._dlmedit_attention.openness

    @contextmanager
    def at(self, openness: float) -> Iterator[None]:
        """Run the module at ``openness`` inside the block (hook removed afterwards)."""
        self.openness = float(openness)
        handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def sample_noise(input_ids: torch.Tensor, mask_token_id: int, generator: torch.Generator,
                 suffix_share: float = 0.4, max_suffix: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked inputs, the boolean mask of masked positions and each row's masked count k.

    Column 0 is never masked (the first token is context, as the eval prompt is).
    Suffix rows mask at most ``max_suffix`` columns when given: answers are short spans
    after a prompt, and long suffixes are already covered by the random rows.
    """
    b, t = input_ids.shape
    if t < 2:
        raise ValueError(f"windows need at least 2 tokens to mask one, got {t}")
    maskable = t - 1
    k = torch.randint(1, maskable + 1, (b,), generator=generator)
    suffix = torch.rand(b, generator=generator) < suffix_share
    if max_suffix is not None:
        short = torch.randint(1, min(max_suffix, maskable) + 1, (b,), generator=generator)
        k = torch.where(suffix, short, k)
    scores = torch.rand(b, maskable, generator=generator)
    # suffix rows: the last k columns; other rows: k random columns (the k smallest scores)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    random_rows = ranks < k[:, None]
    positions = torch.arange(maskable)[None, :]
    suffix_rows = positions >= (maskable - k)[:, None]
    masked = torch.zeros(b, t, dtype=torch.bool)
    masked[:, 1:] = torch.where(suffix[:, None], suffix_rows, random_rows)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, masked, k


def diffusion_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, clean_ids: torch.Tensor,
                     masked: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked CE with Dream's shift and 1/k weight, mean KL(teacher ‖ student) at visible positions).

    Position j−1's logits predict token j.  CE is summed over a row's masked tokens,
    divided by k, averaged over rows.  KL is averaged over visible positions that have a
    next token (all but the last column).
    """
    pred = student_logits[:, :-1].float()  # predicts columns 1..T-1
    target_mask = masked[:, 1:]
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), clean_ids[:, 1:].reshape(-1), reduction="none")
    ce = (ce.view_as(target_mask) * target_mask).sum(1) / k.to(ce.dtype)
    mdm = ce.mean()
    if teacher_logits is None:
        return mdm, torch.zeros((), dtype=mdm.dtype)
    visible = ~masked[:, :-1]
    logp_s = F.log_softmax(pred, dim=-1)
    logp_t = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    kl = (kl * visible).sum() / visible.sum().clamp(min=1)
    return mdm, kl
