"""Train and save the small BPE tokenizer shared by all built-in twins.

Why a tokenizer of our own: the twins must be tiny and train in minutes on a CPU,
so the vocabulary is the world's own (≈1–2k entries) rather than a 50k GPT
vocabulary.  It is a byte-level BPE (any text round-trips, spaces are part of the
following token, so a target is tokenised with its leading space: " Tesk Harbor"),
saved as an ordinary HF fast tokenizer so the same loader reads it and real models.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "build_world_tokenizer", "save_tokenizer", "train_tokenizer"]

SPECIAL_TOKENS = {
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "pad_token": "<|pad|>",
    "mask_token": "<|mdm_mask|>",
    "unk_token": "<|unk|>",
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1536) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; special tokens get ids 0..4.

    No BOS is added automatically: the twins' data code places ``<|bos|>``
    explicitly, so ``tok(text)`` returns exactly the tokens of ``text``.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE (needs ≥ 300)")
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [
        SPECIAL_TOKENS[k] for k in ("bos_token", "eos_token", "pad_token", "mask_token", "unk_token")
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.padding_side = "right"
    return fast


def build_world_tokenizer(world_seed: int = 0, vocab_size: int = 1536) -> PreTrainedTokenizerFast:
    """The built-in tokenizer: BPE trained on the corpus of ``build_world(world_seed)``."""
    from dlmedit.data.world import build_world

    return train_tokenizer(build_world(world_seed).tokenizer_corpus(), vocab_size=vocab_size)


def save_tokenizer(tok: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """Save as tokenizer.json + tokenizer_config.json (+ special tokens map)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out
