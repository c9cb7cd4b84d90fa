"""Each guider's energy and gradient against a direct computation on small tensors (DESIGN.md §4)."""

import torch

from gnr_fast.attention import CaptureMode, PassCapture
from gnr_fast.config import FeatureSite, FeaturesMapL2, Role, SelfAttnMapL2, SelfAttnMapL2Appearance
from gnr_fast.guiders import appearance_l1, features_map_l2, guider_energy, latents_diff, self_attn_map_l2


def _maps(seed, shape=(1, 2, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)


def _capture(maps=None, features=None):
    cap = PassCapture(layers=frozenset(maps or {}), mode=CaptureMode.MAPS)
    cap.maps.update(maps or {})
    cap.features.update(features or {})
    return cap


def test_self_attn_map_l2_value_and_gradient():
    a0, a1 = _maps(0).requires_grad_(True), _maps(1, (1, 2, 3, 3)).requires_grad_(True)
    b0, b1 = _maps(2), _maps(3, (1, 2, 3, 3))
    energy = self_attn_map_l2(_capture({0: a0, 1: a1}), _capture({0: b0, 1: b1}), frozenset({0, 1}))
    direct = sum(((a - b) ** 2).sum() / a.numel() for a, b in ((a0, b0), (a1, b1)))
    torch.testing.assert_close(energy, direct)
    g0, g1 = torch.autograd.grad(energy, (a0, a1))
    torch.testing.assert_close(g0, 2 * (a0 - b0).detach() / a0.numel())
    torch.testing.assert_close(g1, 2 * (a1 - b1).detach() / a1.numel())


def test_layer_selection_restricts_the_sum():
    a = {0: _maps(0), 1: _maps(1)}
    b = {0: _maps(2), 1: _maps(3)}
    only0 = self_attn_map_l2(_capture(a), _capture(b), frozenset({0}))
    torch.testing.assert_close(only0, ((a[0] - b[0]) ** 2).mean())


def test_appearance_l1_value_and_gradient():
    g = torch.Generator().manual_seed(4)
    cur = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    inv = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    e = appearance_l1(_capture(features={FeatureSite.UP_LAST: cur}), _capture(features={FeatureSite.UP_LAST: inv}), FeatureSite.UP_LAST)
    torch.testing.assert_close(e, (cur - inv).abs().sum() / cur.numel())
    (grad,) = torch.autograd.grad(e, cur)
    torch.testing.assert_close(grad, torch.sign(cur - inv).detach() / cur.numel())


def test_features_map_l2_value_and_gradient():
    g = torch.Generator().manual_seed(5)
    cur = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    inv = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    e = features_map_l2(_capture(features={FeatureSite.UP: cur}), _capture(features={FeatureSite.UP: inv}), FeatureSite.UP)
    (grad,) = torch.autograd.grad(e, cur)
    torch.testing.assert_close(grad, 2 * (cur - inv).detach() / cur.numel())


def test_latents_diff_is_gradient_of_squared_distance():
    z = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    z_star = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(((z - z_star) ** 2).sum(), z)
    torch.testing.assert_close(latents_diff(z.detach(), z_star), grad)


def test_guider_energy_weights_and_roles():
    a, b = {0: _maps(0)}, {0: _maps(1)}
    fc, fi = torch.ones(1, 2, 2, 2, dtype=torch.float64), torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    cur = _capture(a, {FeatureSite.UP_LAST: fc})
    inv = _capture(b, {FeatureSite.UP_LAST: fi, FeatureSite.UP: fi})
    trg = _capture(features={FeatureSite.UP: 3 * fc})
    caps = {Role.CUR_INV: cur, Role.INV_INV: inv, Role.CUR_TRG: trg}
    attn = ((a[0] - b[0]) ** 2).mean()
    app = SelfAttnMapL2Appearance(scale=2.0, self_attn_scale=10.0, app_scale=(0.0, 5.0), new_features=True)
    torch.testing.assert_close(guider_energy(app, 1, caps, frozenset({0})), 2.0 * (10.0 * attn + 5.0 * 1.0))
    torch.testing.assert_close(guider_energy(app, 0, caps, frozenset({0})), 2.0 * 10.0 * attn)
    feat = FeaturesMapL2(scale=0.5, block="up")
    torch.testing.assert_close(guider_energy(feat, 0, caps, frozenset()), torch.tensor(0.5 * 9.0, dtype=torch.float64))
    plain = SelfAttnMapL2(scale=4.0)
    torch.testing.assert_close(guider_energy(plain, 0, caps, frozenset({0})), 4.0 * attn)
