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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

INVERSION_SEED = 10500
"""Seed of the fixed inversion noise (the authors' ``G.train`` hard-codes it)."""


def compose_consistency_noise(
    eps_trg: torch.Tensor, gamma: torch.Tensor, guider_grad: torch.Tensor | None
) -> torch.Tensor:
    """ε = ε_trg + γ · ∂E/∂z (no Δcfg term: w is inside ε_trg); the rescaling reference is ε_trg − ε_inv."""
    return eps_trg if guider_grad is None else 1.0 * eps_trg + gamma * guider_grad


@dataclass(frozen=True)
class ConsistencySampler:
    """Boundaries, timesteps and the jump of a multi-boundary consistency model."""

    alphas_cumprod: torch.Tensor  # [T] float32
    boundaries: tuple[int, ...] = (259, 519, 779, 999)
    inversion_seed: int = INVERSION_SEED
    name = "consistency"

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


ForwardModel = Callable[[torch.Tensor, int], torch.Tensor]
"""model(x [B, 4, h, w], t) → ε of the forward consistency model (w = 0, source prompt)."""
GuidedNoise = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""noise(z [B, 4, h, w], z* [B, 4, h, w], step) → the final noise ε of editing step ``step``."""


@torch.no_grad()
def invert_consistency(
    model: ForwardModel, z0: torch.Tensor, sampler: ConsistencySampler, progress: bool = False
) -> torch.Tensor:
    """The source trajectory [K + 1, B, 4, h, w]: [z_0 (clean), x after each forward jump]."""
    x = sampler.noised_start(z0, sampler.inversion_noise(z0.shape))
    trajectory = [z0]
    pairs = list(zip(sampler.forward_timesteps, sampler.forward_boundaries))
    for t, s in tqdm(pairs, desc="Inverting", disable=not progress, leave=False):
        eps = model(x, t)  # consistency inversion
        x = sampler.jump(x, eps, t, s)
        trajectory.append(x)
    return torch.stack(trajectory)


def sample_consistency(
    noise: GuidedNoise,
    trajectory: torch.Tensor,
    sampler: ConsistencySampler,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Guided consistency editing from the trajectory's last latent; step i pairs z with z* = inv[K − i]."""
    z = trajectory[-1]
    num = sampler.num_steps
    for i in tqdm(range(num), desc="Editing", disable=not progress, leave=False):
        eps = noise(z, trajectory[num - i], i)
        with torch.no_grad():
            z = sampler.step(z.detach(), eps, i)  # consistency jump to the next boundary
        if callback is not None:
            callback(i, sampler.timesteps[i], z)
    return z
