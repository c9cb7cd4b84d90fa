"""Prompt → CLIP embedding (DESIGN.md §1: padded to the tokenizer's 77 tokens)."""

from __future__ import annotations

import warnings

import torch

from .errors import InputError
from .loading import Components


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's context and its tail was dropped."""


def check_prompt(prompt: object, name: str, allow_empty: bool = False) -> str:
    """Return ``prompt`` if it is a usable string, else raise :class:`InputError` naming ``name``."""
    if not isinstance(prompt, str):
        raise InputError(f"{name} must be a string, got {type(prompt).__name__}")
    if not allow_empty and not prompt.strip():
        raise InputError(f"{name} is empty; describe the {'edit' if 'target' in name else 'image'} in words")
    return prompt


@torch.no_grad()
def encode_prompt(components: Components, prompt: str) -> torch.Tensor:
    """CLIP last hidden state of ``prompt`` padded/truncated to ``model_max_length``: [1, 77, C].

    Warns with :class:`PromptTruncatedWarning` when tokens beyond the limit are dropped.
    """
    tokenizer = components.tokenizer
    max_length = tokenizer.model_max_length
    n_tokens = len(tokenizer(prompt, truncation=False).input_ids)
    if n_tokens > max_length:
        warnings.warn(
            f"prompt {prompt[:40]!r}… has {n_tokens} tokens; the text encoder reads only the first {max_length} "
            "(including start/end tokens), the rest is ignored",
            PromptTruncatedWarning,
            stacklevel=3,
        )
    ids = tokenizer(
        [prompt], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(components.device)
    return components.text_encoder(ids)[0]
