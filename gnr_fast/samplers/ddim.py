"""The DDIM sampler of Guide-and-Rescale (DESIGN.md §1–3): 'leading' timesteps, DDIM inversion
upward, the deterministic DDIM step downward, and ε_final = ε_u + Δcfg + γ · ∂E/∂z. The formulas
are the pure functions of :mod:`gnr_fast.schedules`; this is the sampler seam's view of them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..config import EditConfig
from ..guiders import cfg_guider, scale_at
from ..noise_terms import Eps, NoiseRows, StepTerms
from ..rescaling import rescale_gamma
from ..schedules import NoiseSchedule, ddim_step_down, ddim_step_up, ddim_timesteps


def compose_ddim_noise(
    eps_u: torch.Tensor, delta_cfg: torch.Tensor, gamma: torch.Tensor, guider_grad: torch.Tensor | None
) -> torch.Tensor:
    """ε_final = ε_u + Δcfg + γ · ∂E/∂z (DESIGN.md §3 step 7); the rescaling reference is Δcfg."""
    eps = eps_u + delta_cfg
    return eps if guider_grad is None else eps + gamma * guider_grad


def combine_terms(
    config: EditConfig,
    eps_u: torch.Tensor,
    delta_cfg: torch.Tensor,
    guider_grad: torch.Tensor | None,
    direct: torch.Tensor | None,
    energy: torch.Tensor | float,
) -> StepTerms:
    """Noise rescaling + sum (DESIGN.md §3 step 7, §5); a direct term is added unscaled."""
    gamma = rescale_gamma(config.rescale, delta_cfg, guider_grad)
    eps_final = eps_u + delta_cfg
    if direct is not None:
        eps_final = eps_final + direct
    if guider_grad is not None:
        eps_final = eps_final + gamma * guider_grad
    return StepTerms(eps_u, delta_cfg, guider_grad, gamma, direct, eps_final.detach(), energy)


@dataclass(frozen=True)
class DDIMSampler:
    """DDIM with ``num_steps`` steps on ``schedule`` (paper: 50)."""

    schedule: NoiseSchedule
    num_steps: int = 50
    name = "ddim"
    noise_rows = NoiseRows(base=Eps.U, cfg_row=True, source_noise=False)
    """ε_u every step, the CFG prompt row while its scale is not 0; the source pass's ε is unused."""

    @property
    def timesteps(self) -> list[int]:
        """Editing timesteps, descending ([980, …, 0] for 50 steps)."""
        return ddim_timesteps(self.num_steps, self.schedule.num_train_timesteps)

    @property
    def inversion_timesteps(self) -> list[int]:
        """The inversion's steps in the order they run, ascending ([0, 20, …, 980])."""
        return self.timesteps[::-1]

    def check_config(self, config: EditConfig) -> None:
        """Every :class:`EditConfig` runs on DDIM (its own step count)."""

    def step(self, z: torch.Tensor, eps: torch.Tensor, step: int) -> torch.Tensor:
        """The latent after editing step ``step`` with final noise ``eps`` (DESIGN.md §3 step 8)."""
        return ddim_step_down(self.schedule, eps, self.timesteps[step], z, self.num_steps)

    def inversion_start(self, z0: torch.Tensor) -> torch.Tensor:
        """The latent the inversion's first UNet call reads: the encoded image itself."""
        return z0

    def invert_step(self, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """The inversion latent one level above ``t`` (DESIGN.md §2)."""
        return ddim_step_up(self.schedule, eps, t, z, self.num_steps)

    def guidance_scales(self, config: EditConfig | None, step: int, target_rows: Sequence[bool]) -> None:
        """No guidance-scale embedding: CFG is the Δcfg combination of two rows."""
        return None

    def terms(
        self,
        config: EditConfig,
        step: int,
        eps: Mapping[Eps, torch.Tensor],
        guider_grad: torch.Tensor | None,
        direct: torch.Tensor | None,
        energy: torch.Tensor | float,
    ) -> StepTerms:
        """Δcfg = w · (ε_prompt − ε_u), then γ against Δcfg and the sum (DESIGN.md §3 steps 5–7)."""
        cfg = cfg_guider(config.guiders)
        eps_u = eps[Eps.U]  # [1, 4, h, w]
        prompt_eps = eps.get(Eps.SRC if cfg.is_source_guidance else Eps.TRG)
        delta_cfg = scale_at(cfg.scale, step) * (prompt_eps - eps_u) if prompt_eps is not None else torch.zeros_like(eps_u)
        terms = combine_terms(config, eps_u, delta_cfg, guider_grad, direct, energy)
        terms.supplied = dict(eps)
        return terms

    def finish_image(self, image: np.ndarray, pixel_stats: tuple[float, float] | None) -> np.ndarray:
        """The decoded uint8 image as it is."""
        return image
