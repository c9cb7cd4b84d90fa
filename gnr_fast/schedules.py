"""DDIM noise schedule and update rules as pure functions (DESIGN.md §1, §2, §3.8).

Symbols follow the DDIM paper (Song et al., 2021, eq. 12 with η = 0):
``alpha_bar_t`` is ᾱ_t, ``x0`` the predicted clean latent, ``eps`` the predicted noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .errors import ConfigError, InputError

PredictionType = Literal["epsilon", "v_prediction"]


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a Stable Diffusion checkpoint.

    ``alphas_cumprod[t]`` is ᾱ_t for t = 0 … num_train_timesteps − 1, float32 as in the
    reference implementation.
    """

    alphas_cumprod: torch.Tensor  # [num_train_timesteps] float32
    prediction_type: PredictionType = "epsilon"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_betas(
        cls,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "epsilon",
    ) -> "NoiseSchedule":
        """Build ᾱ from the scheduler config of a checkpoint (SD 1.x defaults, DESIGN.md §1)."""
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        else:
            raise ConfigError(
                f"beta_schedule={beta_schedule!r} is not supported; Stable Diffusion 1.x/2.x use 'scaled_linear'"
            )
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"prediction_type={prediction_type!r} is not supported; use 'epsilon' (SD 1.x, SD 2.x-base) "
                "or 'v_prediction' (SD 2.x 768)"
            )
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(alphas_cumprod=alphas_cumprod, prediction_type=prediction_type)  # type: ignore[arg-type]

    def alpha_bar(self, t: int) -> torch.Tensor:
        """ᾱ_t as a 0-dim float32 tensor; t beyond the last train step clamps to ᾱ[T−1] (inversion)."""
        return self.alphas_cumprod[min(int(t), self.num_train_timesteps - 1)]

    def alpha_bar_prev(self, t_prev: int) -> torch.Tensor:
        """ᾱ of the level a downward step lands on; t_prev < 0 gives ᾱ[0] (set_alpha_to_one=False)."""
        return self.alphas_cumprod[0] if t_prev < 0 else self.alphas_cumprod[int(t_prev)]


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """'leading' spacing without offset, descending: [980, 960, …, 0] for 50 steps (DESIGN.md §1)."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise InputError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > num_train_timesteps:
        raise InputError(
            f"num_steps={num_steps} exceeds the model's {num_train_timesteps} training timesteps; use at most "
            f"{num_train_timesteps}"
        )
    step_ratio = num_train_timesteps // num_steps
    return [i * step_ratio for i in reversed(range(num_steps))]


def step_size(num_steps: int, num_train_timesteps: int = 1000) -> int:
    """The timestep stride between consecutive DDIM levels (20 for 50 steps)."""
    return num_train_timesteps // num_steps


def predict_x0_eps(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_bar_t: torch.Tensor, prediction_type: PredictionType
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a UNet output at level ᾱ_t into (x0, ε) (DDIM eq. 12; v-prediction per Salimans & Ho)."""
    beta_bar_t = 1 - alpha_bar_t
    if prediction_type == "epsilon":
        x0 = (sample - beta_bar_t**0.5 * model_output) / alpha_bar_t**0.5
        return x0, model_output
    x0 = alpha_bar_t**0.5 * sample - beta_bar_t**0.5 * model_output
    eps = alpha_bar_t**0.5 * model_output + beta_bar_t**0.5 * sample
    return x0, eps


def ddim_move(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    alpha_bar_next: torch.Tensor,
    prediction_type: PredictionType = "epsilon",
) -> torch.Tensor:
    """Deterministic DDIM move of ``sample`` from level ᾱ_t to level ᾱ_next (either direction).

    z' = √ᾱ_next · x0 + √(1 − ᾱ_next) · ε, with (x0, ε) from :func:`predict_x0_eps`.
    """
    x0, eps = predict_x0_eps(model_output, sample, alpha_bar_t, prediction_type)
    return alpha_bar_next**0.5 * x0 + (1 - alpha_bar_next) ** 0.5 * eps


def ddim_step_down(
    schedule: NoiseSchedule, model_output: torch.Tensor, t: int, sample: torch.Tensor, num_steps: int
) -> torch.Tensor:
    """One denoising step from level t to t − stride (DESIGN.md §3 step 8)."""
    t_prev = t - step_size(num_steps, schedule.num_train_timesteps)
    return ddim_move(
        model_output, sample, schedule.alpha_bar(t), schedule.alpha_bar_prev(t_prev), schedule.prediction_type
    )


def ddim_step_up(
    schedule: NoiseSchedule, model_output: torch.Tensor, t: int, sample: torch.Tensor, num_steps: int
) -> torch.Tensor:
    """One inversion step from level t to t + stride; beyond the last train step uses ᾱ[T−1] (DESIGN.md §2)."""
    t_next = t + step_size(num_steps, schedule.num_train_timesteps)
    return ddim_move(model_output, sample, schedule.alpha_bar(t), schedule.alpha_bar(t_next), schedule.prediction_type)


def timestep_tensors(timesteps: list[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Each timestep as a 0-dim long tensor on ``device``, made with one host-to-device copy, so
    UNet calls take tensors (no per-call copy; a compiled graph never depends on the value)."""
    return torch.tensor(timesteps, dtype=torch.long, device=device).unbind()
