"""Per-step random streams and the latent-pool batch draw shared by the training scripts.

Every training step draws from two streams seeded by the run seed and the step alone, so a resumed
run draws exactly what an uninterrupted one would: a NumPy generator (``default_rng([seed, step])``)
for scene indices and other host-side choices, and a torch generator (``seed * 1_000_003 + step``)
for noise and timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The NumPy stream of step ``step`` of a run seeded ``seed``."""
    return np.random.default_rng([seed, step])


def step_generator(seed: int, step: int) -> torch.Generator:
    """The torch stream of step ``step`` of a run seeded ``seed``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def step_streams(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Both streams of one step: ``(step_rng(seed, step), step_generator(seed, step))``."""
    return step_rng(seed, step), step_generator(seed, step)


def draw_indices(rng: np.random.Generator, count: int, batch: int) -> torch.Tensor:
    """``batch`` pool indices below ``count``, drawn with replacement from ``rng``."""
    return torch.from_numpy(rng.integers(count, size=batch))


@dataclass(frozen=True)
class PoolBatch:
    """One training batch from a pre-encoded latent pool."""

    idx: torch.Tensor  # [B] pool indices
    z0: torch.Tensor  # [B, 4, h, w] scaled posterior means
    context: torch.Tensor  # [B, 77, D] text-encoder states of the captions


def draw_pool_batch(pool: dict, tokens: torch.Tensor, text_encoder: torch.nn.Module, scaling: float,
                    batch: int, rng: np.random.Generator) -> PoolBatch:
    """Draw ``batch`` scenes of ``pool`` (``mean`` latents, caption ``tokens``) with ``rng``: their
    latents times ``scaling`` and their (gradient-free) text-encoder context. Uses ``rng`` for the
    indices only."""
    idx = draw_indices(rng, len(tokens), batch)
    z0 = pool["mean"][idx] * scaling
    with torch.no_grad():
        context = text_encoder(tokens[idx]).last_hidden_state
    return PoolBatch(idx, z0, context)
