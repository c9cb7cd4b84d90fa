"""The guidance-scale embedding of a guidance-distilled UNet (``time_cond_proj_dim``).

A guidance-distilled UNet takes the classifier-free-guidance scale w as ``timestep_cond``: a
512-wide sinusoidal embedding of 1000·w that ``time_embedding.cond_proj`` (Linear, no bias) adds to
the timestep features. The w convention is the LCM/iCD one: the model at w predicts
ε_c + w · (ε_c − ε_u), so w = 0 is the plain conditional prediction (inversion and source calls).
The exact float32 operation order below is the one the Inverse-and-Edit golden records
(``../shared/golden/README_consistency.md`` §3): sin first, no flip; w = 0 gives 256 zeros then 256
ones, not a zero vector.
"""

from __future__ import annotations

import torch

W_EMBEDDING_DIM = 512
"""Width of the embedding; hard-coded in the authors' editing code, so every file we ship uses it."""


def guidance_scale_embedding(w: torch.Tensor, dim: int = W_EMBEDDING_DIM) -> torch.Tensor:
    """Embeddings [N, dim] (float32) of the guidance scales ``w`` [N]: for v = 1000·w and
    f_j = exp(−j · ln(10000) / (dim/2 − 1)), [sin(v·f_0 … v·f_{dim/2−1}), cos(…)]."""
    if w.ndim != 1:
        raise ValueError(f"w must be a 1-D tensor of guidance scales, got shape {tuple(w.shape)}")
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    angles = (w.to(torch.float32) * 1000.0)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def cfg_target(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The classifier-free-guidance prediction ε_c + w · (ε_c − ε_u) for per-row scales ``w`` [B]
    (the prediction a guidance-distilled UNet learns to give at w)."""
    return eps_cond + w.view(-1, *([1] * (eps_cond.ndim - 1))) * (eps_cond - eps_uncond)
