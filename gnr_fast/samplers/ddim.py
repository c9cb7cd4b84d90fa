"""The DDIM sampler of Guide-and-Rescale (DESIGN.md §1–3): 'leading' timesteps, DDIM inversion
upward, the deterministic DDIM step downward. The formulas are the pure functions of
:mod:`gnr_fast.schedules`; this is the sampler seam's view of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedules import NoiseSchedule, ddim_step_down, ddim_step_up, ddim_timesteps


def compose_ddim_noise(
    eps_u: torch.Tensor, delta_cfg: torch.Tensor, gamma: torch.Tensor, guider_grad: torch.Tensor | None
) -> torch.Tensor:
    """ε_final = ε_u + Δcfg + γ · ∂E/∂z (DESIGN.md §3 step 7); the rescaling reference is Δcfg."""
    eps = eps_u + delta_cfg
    return eps if guider_grad is None else eps + gamma * guider_grad


@dataclass(frozen=True)
class DDIMSampler:
    """DDIM with ``num_steps`` steps on ``schedule`` (paper: 50)."""

    schedule: NoiseSchedule
    num_steps: int = 50
    name = "ddim"

    @property
    def timesteps(self) -> list[int]:
        """Editing timesteps, descending ([980, …, 0] for 50 steps)."""
        return ddim_timesteps(self.num_steps, self.schedule.num_train_timesteps)

    def step(self, z: torch.Tensor, eps: torch.Tensor, step: int) -> torch.Tensor:
        """The latent after editing step ``step`` with final noise ``eps`` (DESIGN.md §3 step 8)."""
        return ddim_step_down(self.schedule, eps, self.timesteps[step], z, self.num_steps)

    def invert_step(self, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """The inversion latent one level above ``t`` (DESIGN.md §2)."""
        return ddim_step_up(self.schedule, eps, t, z, self.num_steps)
