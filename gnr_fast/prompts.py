"""Prompt → CLIP embedding (DESIGN.md §1: padded to the tokenizer's 77 tokens).

A model whose caption grammar names a ``relaxed_text_encoder`` (:mod:`gnr_fast.model_defaults`)
encodes the grammar's relaxed forms with that second encoder and everything else with
``text_encoder/`` (:func:`text_encoder_for`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .caption_grammars import PromptForm, grammar_reader
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
def encode_prompt(components: Components, prompt: str, grammar: CaptionGrammar | None = None) -> torch.Tensor:
    """CLIP last hidden state of ``prompt`` padded/truncated to ``model_max_length``: [1, 77, C],
    from the text encoder :func:`text_encoder_for` picks.

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
    return text_encoder_for(components, grammar, prompt)(ids)[0]


def text_encoder_for(components: Components, grammar: CaptionGrammar | None, prompt: str) -> Any:
    """``components.relaxed_text_encoder`` for a prompt in a relaxed form of ``grammar``
    (:func:`prompt_form` is ``"relaxed"``), when both the grammar names one and it is loaded;
    ``components.text_encoder`` otherwise (the grammar's own captions, the empty prompt, prompts
    outside the grammar, models with one encoder)."""
    if (
        components.relaxed_text_encoder is not None
        and grammar is not None
        and grammar.relaxed_text_encoder is not None
        and prompt_form(grammar, prompt) == "relaxed"
    ):
        return components.relaxed_text_encoder
    return components.text_encoder


class PromptGrammarWarning(UserWarning):
    """A prompt is outside the caption language the model declares (``gnr_fast.json``)."""


def prompt_form(grammar: CaptionGrammar, prompt: str) -> PromptForm | None:
    """``prompt``'s form in ``grammar`` (its reader: :func:`gnr_fast.caption_grammars.grammar_reader`);
    None for the empty prompt."""
    if not prompt.strip():
        return None
    return grammar_reader(grammar.name)(prompt)


def warn_if_outside_grammar(grammar: CaptionGrammar | None, prompt: str, name: str = "prompt") -> bool:
    """Warn (one line, :class:`PromptGrammarWarning`) when the model declares a caption grammar
    and ``prompt`` is not in it; returns whether it warned.

    Nothing is checked for a model without a grammar or an empty prompt (the unconditional
    embedding).
    """
    if grammar is None or prompt_form(grammar, prompt) != "outside":
        return False
    warnings.warn(
        f"{name} {prompt!r} is outside what this model was trained on ({grammar.summary}), so the edit may "
        f"ignore or misread it; write prompts like {grammar.examples[0]!r}",
        PromptGrammarWarning,
        stacklevel=3,
    )
    return True
