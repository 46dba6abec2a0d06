"""Instruct models' chat templates, applied through the tokenizer when the user asks (``--chat``).

Why through the tokenizer: LLaDA-8B-Instruct (Llama-3 style headers, ``<|eot_id|>``) and
Dream-v0-Instruct (Qwen2.5 ChatML, ``<|im_start|>`` … ``<|im_end|>``) ship their template
in ``tokenizer_config.json``; rendering it with ``apply_chat_template`` keeps dlmedit from
hard-coding either format, and a base model without a template is refused instead of
being fed a made-up one.  Nothing is applied unless asked: facts are edited and scored as
plain text by default.
"""

from __future__ import annotations

from typing import Any

from dlmedit.errors import DlmeditError


class ChatTemplateError(DlmeditError, ValueError):
    """``--chat`` was asked of a tokenizer that has no chat template (e.g. a base model)."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: Any, user: str, system: str | None = None) -> str:
    """``user`` (and an optional ``system`` message) rendered as the start of an assistant turn.

    The template's leading BOS text is removed when the tokenizer adds BOS by itself, so
    encoding the result (``add_special_tokens=True``) does not give two BOS tokens.
    """
    if not isinstance(user, str):
        raise TypeError(f"chat message must be a string, got {type(user).__name__}")
    if not has_chat_template(tokenizer):
        raise ChatTemplateError(
            "this model's tokenizer has no chat template (a base model?); drop --chat, or use the Instruct "
            "checkpoint whose tokenizer_config.json carries one")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        adds_bos = tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
        if adds_bos:
            text = text[len(bos):]
    return text
