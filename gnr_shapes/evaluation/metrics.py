"""Preservation metrics over a region: masked PSNR, masked SSIM, and a judge-feature perceptual distance."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB) of uint8 images ``a`` and ``b`` over the pixels where ``mask`` is true (inf if equal)."""
    if not mask.any():
        return math.nan
    diff = (a.astype(np.float64) - b.astype(np.float64))[mask]
    mse = float(np.mean(diff**2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def finite_mean(values: list[float]) -> float:
    """Mean of the finite values (PSNR is inf for identical images); NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # [1, 1, k, k]


def masked_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004; 7×7 Gaussian window σ 1.5, per channel) over ``mask``'s pixels."""
    if not mask.any():
        return math.nan
    x = torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[:, None]  # [3, 1, H, W]
    y = torch.from_numpy(b.astype(np.float64)).permute(2, 0, 1)[:, None]
    w = _gaussian_window()
    pad = w.shape[-1] // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad,) * 4, mode="reflect"), w)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim.mean(dim=0)[0][torch.from_numpy(mask)].mean())


@torch.no_grad()
def feature_distance(judge, a: np.ndarray, b: np.ndarray) -> float:
    """LPIPS-style distance: mean over the judge CNN's blocks of the squared difference of
    channel-normalised activations (no downloaded weights: the judge is trained in this repo)."""
    from ..world.judge import prepare_images

    x = prepare_images(np.stack([a, b]), judge.net.config.input_size)
    total, blocks = 0.0, 0
    for block in judge.net.features:
        x = block(x)
        unit = x / (x.norm(dim=1, keepdim=True) + 1e-10)
        total += float(((unit[0] - unit[1]) ** 2).sum(dim=0).mean())
        blocks += 1
    return total / blocks
