"""The paper-literal editing step (DESIGN.md §3): four UNet passes, materialised attention maps.

This mirrors the authors' reference implementation pass for pass — including the passes and
autograd graphs nobody needs — so that it can serve as the numerical and performance baseline
for the fast path. Fast code never imports this module.
"""

from __future__ import annotations

import torch

from ..attention.capture import CaptureMode, PassCapture
from ..editing import EditContext, StepTerms
from ..guiders import GuiderKind, Role, capture_need, scale_at
from ..samplers.ddim import combine_terms
from .recording import RecordingUNet


def _capture_for(ctx: EditContext, role: Role | None) -> PassCapture:
    """A capture recording what the config's guiders read from the pass of ``role``.

    Every reference-mode pass gets one (possibly empty) so that all attention runs with the
    reference's explicit arithmetic, as the authors' patched UNet does during editing.
    """
    need = capture_need(ctx.config.guiders, {role})
    return PassCapture(
        layers=ctx.layers if need.attention else frozenset(),
        mode=CaptureMode.MAPS,
        feature_sites=need.feature_sites,
    )


def reference_step(ctx: EditContext, z: torch.Tensor, z_star: torch.Tensor, step: int) -> StepTerms:
    """Compute the noise terms of step ``step`` for latent ``z`` paired with inversion latent ``z_star``."""
    t = ctx.timesteps[step]
    run = RecordingUNet(ctx.runner)  # the recording convention: captures filled in place
    # 1. ε_u = ε(z, t, c_∅), no grad
    with torch.no_grad():
        eps_u = run(z, t, ctx.c_uncond, (_capture_for(ctx, None),))
    # 2. source-trajectory pass ε(z*, t, c_src), recording guider inputs ("inv_inv"), no grad
    inv_capture = _capture_for(ctx, Role.INV_INV)
    with torch.no_grad():
        run(z_star, t, ctx.c_src, (inv_capture,))
    # 3. ε(z, t, c_src) with grad w.r.t. z, recording guider inputs ("cur_inv")
    z = z.detach().requires_grad_(True)
    cur_capture = _capture_for(ctx, Role.CUR_INV)
    with torch.enable_grad():
        eps_src = run(z, t, ctx.c_src, (cur_capture,))
        # 4. ε_trg = ε(z, t, c_trg), graph alive; recording "cur_trg" if a guider reads it
        trg_capture = _capture_for(ctx, Role.CUR_TRG)
        eps_trg = run(z, t, ctx.c_trg, (trg_capture,))
        captures = {Role.INV_INV: inv_capture, Role.CUR_INV: cur_capture, Role.CUR_TRG: trg_capture}
        # 5.–6. CFG term, direct terms, and the weighted energy of every energy guider
        delta_cfg = torch.zeros_like(eps_u)
        direct = None
        energy = None
        for guider in ctx.config.guiders:
            if guider.kind is GuiderKind.CFG:
                prompt_eps = eps_src if guider.is_source_guidance else eps_trg
                delta_cfg = scale_at(guider.scale, step) * (prompt_eps.detach() - eps_u)
            elif guider.kind is GuiderKind.DIRECT:
                term = guider.noise(step, z, z_star)
                direct = term if direct is None else direct + term
            else:
                value = guider.energy(step, captures, ctx.layers)
                # The reference drops an energy that torch.allclose(E, 0) accepts, i.e. |E| ≤ atol.
                if abs(float(value.detach())) > ctx.config.energy_atol:
                    energy = value if energy is None else energy + value
        guider_grad = None
        if energy is not None:
            (guider_grad,) = torch.autograd.grad(energy, z)
    # 7. noise rescaling and the final noise
    return combine_terms(
        ctx.config, eps_u, delta_cfg, guider_grad, direct, 0.0 if energy is None else float(energy.detach())
    )
