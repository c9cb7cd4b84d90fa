"""Prompt → CLIP embedding (DESIGN.md §1: padded to the tokenizer's 77 tokens)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .errors import InputError
from .loading import Components
from .model_defaults import CaptionGrammar


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


class PromptGrammarWarning(UserWarning):
    """A prompt is outside the caption language the model declares (``gnr_fast.json``)."""


def _reads_shapes_world(prompt: str) -> bool:
    from .world.captions import parse_prompt

    return parse_prompt(prompt) is not None


# Grammar name (``caption_grammar.name`` in gnr_fast.json) -> "can this model read the prompt".
GRAMMAR_READERS: dict[str, Callable[[str], bool]] = {"shapes-world": _reads_shapes_world}


def warn_if_outside_grammar(grammar: CaptionGrammar | None, prompt: str, name: str = "prompt") -> bool:
    """Warn (one line, :class:`PromptGrammarWarning`) when the model declares a caption grammar
    and ``prompt`` is not in it; returns whether it warned.

    Nothing is checked for a model without a grammar, a grammar this version has no reader for
    (see :data:`GRAMMAR_READERS`), or an empty prompt (the unconditional embedding).
    """
    if grammar is None or not prompt.strip():
        return False
    reader = GRAMMAR_READERS.get(grammar.name)
    if reader is None or reader(prompt):
        return False
    warnings.warn(
        f"{name} {prompt!r} is outside what this model was trained on ({grammar.summary}), so the edit may "
        f"ignore or misread it; write prompts like {grammar.examples[0]!r}",
        PromptGrammarWarning,
        stacklevel=3,
    )
    return True
