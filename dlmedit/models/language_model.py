"""`LanguageModel`: a torch module + tokenizer + architecture adapter + paradigm.

Why a wrapper: every layer above needs the same four things together — run the
module, tokenise consistently (BOS, leading spaces of targets, the mask token), find
sites by canonical name, and score/generate the paradigm's way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dlmedit.checks import check_text
from dlmedit.errors import EmptyTargetError, MaskTokenInPromptError, PromptTooLongError
from dlmedit.models.adapters import ArchitectureAdapter, PrefixCache, cache_has_layers
from dlmedit.paradigm.base import GenerationResult, Paradigm, ScoreResult


class LanguageModel:
    """What `load_model` returns.  Attributes: ``module``, ``tokenizer``, ``adapter``, ``paradigm``, ``name``."""

    def __init__(
        self,
        module: nn.Module,
        tokenizer: Any,
        adapter: ArchitectureAdapter,
        paradigm: Paradigm,
        name: str = "",
        prepend_bos: bool = False,
        source: dict[str, Any] | None = None,
    ) -> None:
        self.module = module.eval()
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.paradigm = paradigm
        self.name = name
        self.prepend_bos = prepend_bos
        self.source = source or {}

    def __repr__(self) -> str:
        return (f"LanguageModel({self.name!r}, family={self.adapter.family}, paradigm={self.paradigm.name}, "
                f"layers={self.n_layers}, d_model={self.adapter.d_model})")

    # -- properties --------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def context_length(self) -> int | None:
        return self.adapter.context_length

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        return int(pad if pad is not None else 0)

    @property
    def mask_token_id(self) -> int | None:
        return getattr(self.paradigm, "mask_token_id", None)

    # -- tokenisation ---------------------------------------------------------------
    def check_length(self, n_tokens: int) -> None:
        limit = self.context_length
        if limit is not None and n_tokens > limit:
            raise PromptTooLongError(f"input of {n_tokens} tokens exceeds the model's context of {limit} tokens")

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt, with BOS if the model expects it; rejects mask tokens and over-long prompts."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        check_text(prompt, "prompt", allow_empty=True)  # non-UTF-8 input (lone surrogates) fails here, by name
        ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if self.prepend_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        mask_id = self.mask_token_id
        if mask_id is not None and mask_id in ids:
            raise MaskTokenInPromptError(
                f"prompt {prompt!r} contains the mask token (id {mask_id}); it would be treated as a blank to fill"
            )
        self.check_length(len(ids))
        return ids

    def encode_target(self, prompt: str, target: str) -> list[int]:
        """Target token ids as they appear after the prompt (a leading space is added when needed)."""
        if not isinstance(target, str) or not target.strip():
            raise EmptyTargetError(f"target {target!r} is empty")
        check_text(target, "target")
        text = target if (target[:1].isspace() or prompt[-1:].isspace() or not prompt) else " " + target
        full = list(self.tokenizer(prompt + text, add_special_tokens=False)["input_ids"])
        head = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if full[: len(head)] == head:
            ids = full[len(head):]
        else:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise EmptyTargetError(f"target {target!r} tokenises to no tokens")
        return ids

    def encode_pair(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        return self.encode_prompt(prompt), self.encode_target(prompt, target)

    def truncate_at_eos(self, ids: Sequence[int]) -> list[int]:
        eos = self.eos_token_id
        out = list(ids)
        if eos is not None and eos in out:
            out = out[: out.index(eos)]
        mask_id = self.mask_token_id
        if mask_id is not None:
            out = [t for t in out if t != mask_id]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- running -----------------------------------------------------------------------
    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw logits [B, T, V] (no paradigm shift applied); grad enabled if the caller enables it."""
        return self.adapter.forward_logits(input_ids, attention_mask, inputs_embeds)

    @property
    def prefix_reusable(self) -> bool:
        """True when earlier columns' states can be computed once and reused (causal attention + a cache)."""
        return bool(self.paradigm.causal_attention and self.adapter.supports_prefix_cache and cache_has_layers())

    def run_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PrefixCache:
        """Keys/values of the first columns of a batch, for :meth:`logits_after` (causal models only)."""
        if not self.prefix_reusable:
            raise ValueError(f"{self.name}: columns cannot be reused (attention is not causal or no cache support)")
        return self.adapter.run_prefix(input_ids, attention_mask)

    def logits_after(self, prefix: PrefixCache, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw logits [B, S, V] of the columns that follow ``prefix`` — equal to the last S columns of
        :meth:`logits` on the whole rows, at the cost of S columns."""
        return self.adapter.forward_logits_after(prefix, input_ids, attention_mask)

    def score(self, prompts: Sequence[str], targets: Sequence[str], estimator: str | None = None, **options: Any) -> list[ScoreResult]:
        return self.paradigm.score(self, prompts, targets, estimator=estimator, **options)

    def generate(self, prompts: Sequence[str], max_new_tokens: int | None = None, **options: Any) -> GenerationResult:
        return self.paradigm.generate(self, prompts, max_new_tokens, **options)

    def fingerprint(self) -> str:
        """Stable hash of the weights (for caches and EditDelta checks)."""
        from dlmedit.models.fingerprint import model_fingerprint

        return model_fingerprint(self.module)
