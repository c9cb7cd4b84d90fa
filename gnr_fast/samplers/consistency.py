"""The multi-boundary consistency sampler of Inverse-and-Edit (iCD, arXiv 2406.14539).

Symbols: ᾱ = ``alphas_cumprod`` (float32), α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t). With the boundary
timesteps b_1 < … < b_K (K = 4: 259, 519, 779, 999):

* **inversion** (forward model): x ← √ᾱ_0 z_0 + √(1 − ᾱ_0) n (fixed noise n, seed 10500), then
  for (t, s) in (0, b_1), (b_1, b_2), …, (b_{K−1}, b_K): x ← jump(x, ε_fwd(x, t), t, s). The source
  trajectory is [z_0 (clean), x after each jump]; the last one starts the edit.
* **editing** (reverse model): for (t, s) in (b_K, b_{K−1}), …, (b_1, 0): z ← jump(z, ε, t, s)
  with the guided noise ε = ε_trg + γ · ∂E/∂z (:func:`compose_consistency_noise`).
* **jump** (the consistency model's boundary step): z' = α_s · (z − σ_t ε) / α_t + σ_s ε, with
  (α_s, σ_s) := (1, 0) when s = 0 (a hard boundary applies to s only, never to t).

Classifier-free guidance is the guidance-scale embedding w of the target call; there is no
unconditional pass, and the rescaling reference is ε_trg(z) − ε_inv(z*) (README_consistency.md §6–7).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..config import EditConfig
from ..errors import ConfigError
from ..guiders import GuiderKind, cfg_guider, scale_at
from ..noise_terms import Eps, NoiseRows, StepTerms
from ..rescaling import rescale_gamma

INVERSION_SEED = 10500
"""Seed of the fixed inversion noise (the authors' ``G.train`` hard-codes it)."""


def compose_consistency_noise(
    eps_trg: torch.Tensor, gamma: torch.Tensor, guider_grad: torch.Tensor | None
) -> torch.Tensor:
    """ε = ε_trg + γ · ∂E/∂z (no Δcfg term: w is inside ε_trg); the rescaling reference is ε_trg − ε_inv."""
    return eps_trg if guider_grad is None else 1.0 * eps_trg + gamma * guider_grad


def match_color_stats(image: np.ndarray, mean: float, std: float) -> np.ndarray:
    """(img − m) · S / s + M clipped to [0, 255] and truncated to uint8, with (m, s) the image's
    mean and population std over all pixels and channels, (M, S) the input's; unchanged when
    s < 1e-7 (the authors' ``match_stats_255``)."""
    img_mean, img_std = image.mean(), image.std()
    if img_std < 1e-7:
        return image
    return np.clip((image - img_mean) * (std / img_std) + mean, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ConsistencySampler:
    """Boundaries, timesteps and the jump of a multi-boundary consistency model."""

    alphas_cumprod: torch.Tensor  # [T] float32
    boundaries: tuple[int, ...] = (259, 519, 779, 999)
    inversion_seed: int = INVERSION_SEED
    name = "consistency"
    noise_rows = NoiseRows(base=Eps.TRG, cfg_row=False, source_noise=True)
    """ε_trg every step (w in its embedding, no ε_u); ε_inv of the source pass while an energy is active."""

    def __post_init__(self) -> None:
        b = tuple(int(x) for x in self.boundaries)
        if not b or sorted(set(b)) != list(b) or b[0] <= 0 or b[-1] >= self.alphas_cumprod.shape[0]:
            raise ValueError(f"consistency boundaries must be ascending timesteps in (0, "
                             f"{self.alphas_cumprod.shape[0]}), got {self.boundaries!r}")
        object.__setattr__(self, "boundaries", b)

    @property
    def num_steps(self) -> int:
        return len(self.boundaries)

    @property
    def forward_timesteps(self) -> tuple[int, ...]:
        """Inversion jumps start at 0, b_1, …, b_{K−1} …"""
        return (0, *self.boundaries[:-1])

    @property
    def forward_boundaries(self) -> tuple[int, ...]:
        """… and land on b_1, …, b_K."""
        return self.boundaries

    @property
    def timesteps(self) -> tuple[int, ...]:
        """Editing jumps start at b_K, …, b_1 …"""
        return tuple(reversed(self.boundaries))

    @property
    def reverse_boundaries(self) -> tuple[int, ...]:
        """… and land on b_{K−1}, …, b_1, 0."""
        return (*reversed(self.boundaries[:-1]), 0)

    @property
    def inversion_timesteps(self) -> tuple[int, ...]:
        """The inversion's jumps in the order they run (their starts: 0, b_1, …, b_{K−1})."""
        return self.forward_timesteps

    def check_config(self, config: EditConfig) -> None:
        """Raise :class:`ConfigError` for a config this sampler cannot run (step count, guiders, pairing)."""
        if config.num_steps != self.num_steps:
            raise ConfigError(f"this consistency model edits in {self.num_steps} steps (its boundaries "
                              f"{list(self.boundaries)}), but the config has num_steps={config.num_steps}; "
                              "use preset 'consistency'")
        if any(g.kind is GuiderKind.DIRECT for g in config.guiders):
            raise ConfigError("direct-noise guiders (latents_diff) are not supported by the consistency sampler")
        if cfg_guider(config.guiders).is_source_guidance:
            raise ConfigError("is_source_guidance is not supported by the consistency sampler (w guides the target row)")
        if config.align_inversion != "reference":
            raise ConfigError("the consistency sampler pairs step i with inv[K - i] (align_inversion='reference'), "
                              f"got align_inversion={config.align_inversion!r}")

    def guidance_scales(self, config: EditConfig | None, step: int, target_rows: Sequence[bool]) -> list[float]:
        """w of each row: the cfg guider's scale at ``step`` for target-prompt rows, 0 for the others
        (and for every row of the inversion, ``config`` None)."""
        w = scale_at(cfg_guider(config.guiders).scale, step) if config is not None else 0.0
        return [float(w) if target else 0.0 for target in target_rows]

    def terms(
        self,
        config: EditConfig,
        step: int,
        eps: Mapping[Eps, torch.Tensor],
        guider_grad: torch.Tensor | None,
        direct: torch.Tensor | None,
        energy: torch.Tensor | float,
    ) -> StepTerms:
        """γ against ε_trg − ε_inv, then ε = ε_trg + γ · ∂E/∂z (README_consistency.md §6 steps 7–8);
        ``direct`` is always None (:meth:`check_config`)."""
        eps_trg = eps[Eps.TRG]
        if guider_grad is None:
            gamma = torch.ones((), device=eps_trg.device)
        else:
            gamma = rescale_gamma(config.rescale, eps_trg - eps[Eps.INV], guider_grad)
        eps_final = compose_consistency_noise(eps_trg, gamma, guider_grad)
        return StepTerms(eps_trg, torch.zeros_like(eps_trg), guider_grad, gamma, None, eps_final.detach(), energy,
                         dict(eps))

    def finish_image(self, image: np.ndarray, pixel_stats: tuple[float, float] | None) -> np.ndarray:
        """The decoded uint8 image colour-matched to the input's (mean, std) (README_consistency.md §8)."""
        if pixel_stats is None:
            return image
        return match_color_stats(image, *pixel_stats)

    def inversion_start(self, z0: torch.Tensor) -> torch.Tensor:
        """The clean latents noised to t = 0 with the fixed noise, the same for every row."""
        noise = self.inversion_noise((1, *z0.shape[1:])).expand(z0.shape[0], -1, -1, -1)
        return self.noised_start(z0, noise)

    def invert_step(self, x: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """The forward jump from ``t`` to the next boundary."""
        return self.jump(x, eps, t, self.forward_boundaries[self.forward_timesteps.index(int(t))])

    def alpha_sigma(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t)) as float32 0-dim tensors."""
        alpha_bar = self.alphas_cumprod[int(t)]
        return torch.sqrt(alpha_bar), torch.sqrt(1 - alpha_bar)

    def jump(self, z: torch.Tensor, eps: torch.Tensor, t: int, s: int) -> torch.Tensor:
        """z' = α_s (z − σ_t ε) / α_t + σ_s ε, with the hard boundary (α_s, σ_s) = (1, 0) at s = 0."""
        alpha_t, sigma_t = self.alpha_sigma(t)
        alpha_s, sigma_s = self.alpha_sigma(s)
        if s == 0:
            alpha_s, sigma_s = torch.ones_like(alpha_s), torch.zeros_like(sigma_s)
        x0 = (z - sigma_t.to(z.device) * eps) / alpha_t.to(z.device)
        return alpha_s.to(z.device) * x0 + sigma_s.to(z.device) * eps

    def step(self, z: torch.Tensor, eps: torch.Tensor, step: int) -> torch.Tensor:
        """The latent after editing step ``step`` with final noise ``eps``."""
        return self.jump(z, eps, self.timesteps[step], self.reverse_boundaries[step])

    def inversion_noise(self, shape: Sequence[int]) -> torch.Tensor:
        """The fixed noise n of the inversion's start (CPU generator seeded with :attr:`inversion_seed`)."""
        return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(self.inversion_seed))

    def noised_start(self, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """√ᾱ_0 z_0 + √(1 − ᾱ_0) n: the clean latent noised to t = 0 (DDPM ``add_noise``)."""
        alpha_bar = self.alphas_cumprod[0]
        return (alpha_bar**0.5).to(z0.device) * z0 + ((1 - alpha_bar) ** 0.5).to(z0.device) * noise.to(z0.device)
