"""The math both execution modes share, against a direct computation from DESIGN.md §3–5.

Reference and fast mode call the same ``guider_energy``, ``combine_terms`` and ``rescale_factor``
(``gnr_fast/reference/step.py``), so a bug there cannot show in a fast-vs-reference test. Here the
expected values are written out from the formulas — softmax by exp/sum, means as sum/count,
norms as square roots of sums of squares in Python floats — on small float64 tensors, and compared
with what the library computes from the same inputs. Nothing from gnr_fast is used to build an
expected value.

Tolerances: every comparison is float64 against float64 of the same formula in another summation
order, so the differences are ~1e-15 relative; ``assert_close``'s float64 defaults
(rtol 1e-7, atol 1e-7) hold them with a wide margin and still catch any wrong factor, sign,
layer or step.
"""

from __future__ import annotations

import math

import pytest
import torch

from gnr_fast.attention import CaptureMode, PassCapture
from gnr_fast.config import (
    CfgGuider,
    EditConfig,
    FeatureSite,
    FeaturesMapL2,
    LatentsDiff,
    RescaleConfig,
    Role,
    SelfAttnMapL2,
    SelfAttnMapL2Appearance,
)
from gnr_fast.samplers.ddim import combine_terms
from gnr_fast.guiders import guider_energy
from gnr_fast.rescaling import rescale_factor

F64 = torch.float64
HEADS, TOKENS, DIM, CHANNELS = 2, 6, 4, 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- direct formulas (DESIGN.md §4–5), written without the library ---------------------------


def attention_map(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """A = softmax(scale · Q Kᵀ) row by row, as exp(s − max) / Σ exp(s − max): [B, H, N, N]."""
    scores = scale * torch.einsum("bhnd,bhmd->bhnm", q, k)
    shifted = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return shifted / shifted.sum(dim=-1, keepdim=True)


def log_sum_exp(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-row log Σ_j exp(scale · q_i · k_j): [B, H, N]."""
    scores = scale * torch.einsum("bhnd,bhmd->bhnm", q, k)
    top = scores.amax(dim=-1)
    return top + torch.log(torch.exp(scores - top[..., None]).sum(dim=-1))


def mean_of(x: torch.Tensor) -> torch.Tensor:
    return x.sum() / x.numel()


def l2(x: torch.Tensor) -> float:
    return math.sqrt(sum(v * v for v in x.detach().flatten().tolist()))


def expected_gamma(delta_cfg: torch.Tensor, grad: torch.Tensor | None, lo: float, hi: float) -> float:
    """§5 range_other_on_cfg_norm: ratio = ‖grad‖/‖Δcfg‖ (1 if ‖Δcfg‖ = 0), γ = clip(ratio)/ratio (1 if ‖grad‖ = 0)."""
    if grad is None or l2(grad) == 0.0:
        return 1.0
    ratio = l2(grad) / l2(delta_cfg) if l2(delta_cfg) != 0.0 else 1.0
    return min(max(ratio, lo), hi) / ratio


# --- a toy "UNet pass": the current latent drives Q, K and features of every layer ------------


class ToyPasses:
    """Queries, keys and features of three self-attention layers (different token counts) and two
    feature sites, as smooth functions of one latent ``x`` [1, N·C]; the source pass is constant."""

    sites = (FeatureSite.UP_LAST, FeatureSite.UP)

    def __init__(self, seed: int) -> None:
        g = _gen(seed)
        self.tokens = {0: TOKENS, 1: TOKENS // 2, 2: TOKENS}
        width = TOKENS * CHANNELS
        self.wq = {i: torch.randn(width, HEADS * n * DIM, generator=g, dtype=F64) / width**0.5 for i, n in self.tokens.items()}
        self.wk = {i: torch.randn(width, HEADS * n * DIM, generator=g, dtype=F64) / width**0.5 for i, n in self.tokens.items()}
        self.wf = {s: torch.randn(width, CHANNELS * 4, generator=g, dtype=F64) for s in self.sites}
        self.x_src = torch.randn(1, width, generator=g, dtype=F64)
        self.x_cur = (self.x_src + 0.3 * torch.randn(1, width, generator=g, dtype=F64)).requires_grad_(True)
        self.scale = DIM**-0.5

    def qk(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.tokens[i]
        q = torch.tanh(x @ self.wq[i]).reshape(1, HEADS, n, DIM)
        k = torch.tanh(x @ self.wk[i]).reshape(1, HEADS, n, DIM)
        return q, k

    def feature(self, x: torch.Tensor, site: FeatureSite) -> torch.Tensor:
        return torch.sin(x @ self.wf[site]).reshape(1, CHANNELS, 2, 2)

    def capture(self, x: torch.Tensor, mode: CaptureMode, with_lse: bool) -> PassCapture:
        """What a capturing UNet call records (filled here by hand, as the processors would)."""
        cap = PassCapture(layers=frozenset(self.tokens), mode=mode, feature_sites=frozenset(self.sites), with_lse=with_lse)
        for i in self.tokens:
            q, k = self.qk(x, i)
            if mode is CaptureMode.MAPS:
                cap.maps[i] = torch.softmax(self.scale * q @ k.transpose(-1, -2), dim=-1)
            else:
                cap.queries[i], cap.keys[i], cap.scales[i] = q, k, self.scale
                if with_lse:
                    cap.lse[i] = log_sum_exp(q, k, self.scale).detach()
        for site in self.sites:
            cap.features[site] = self.feature(x, site)
        return cap

    def captures(self, mode: CaptureMode) -> dict[Role, PassCapture]:
        with torch.no_grad():
            inv = self.capture(self.x_src, mode, with_lse=True)
        cur = self.capture(self.x_cur, mode, with_lse=False)
        trg = self.capture(self.x_cur, mode, with_lse=False)
        return {Role.INV_INV: inv, Role.CUR_INV: cur, Role.CUR_TRG: trg}

    # the energies of DESIGN.md §4, straight from the formulas
    def attn_l2(self, layers) -> torch.Tensor:
        total = torch.zeros((), dtype=F64)
        for i in layers:
            a_cur = attention_map(*self.qk(self.x_cur, i), self.scale)
            a_inv = attention_map(*self.qk(self.x_src, i), self.scale).detach()
            total = total + mean_of((a_cur - a_inv) ** 2)
        return total

    def appearance(self, site: FeatureSite) -> torch.Tensor:
        return mean_of((self.feature(self.x_cur, site) - self.feature(self.x_src, site).detach()).abs())

    def features_l2(self, site: FeatureSite) -> torch.Tensor:
        return mean_of((self.feature(self.x_cur, site) - self.feature(self.x_src, site).detach()) ** 2)


@pytest.fixture(params=[CaptureMode.MAPS, CaptureMode.QK], ids=["maps", "qk"])
def mode(request):
    return request.param


def _value_and_grad(energy: torch.Tensor, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    (grad,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), grad


@pytest.mark.parametrize("layers", [(0, 1, 2), (1,), (0, 2)], ids=["all", "one", "subset"])
def test_self_attn_map_l2_energy_and_gradient(mode, layers):
    toy = ToyPasses(seed=1)
    guider = SelfAttnMapL2(scale=(0.0, 7.0))  # per-step schedule: step 1 has weight 7
    got = guider_energy(guider, 1, toy.captures(mode), frozenset(layers))
    expected = 7.0 * toy.attn_l2(layers)
    got_value, got_grad = _value_and_grad(got, toy.x_cur)
    want_value, want_grad = _value_and_grad(expected, toy.x_cur)
    assert got_value == pytest.approx(want_value, rel=1e-9) and want_value > 0
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("new_features", [True, False])
def test_appearance_energy_weights_and_gradient(mode, new_features):
    toy = ToyPasses(seed=2)
    site = FeatureSite.UP_LAST if new_features else FeatureSite.UP  # toy: conv_norm_out stands in below
    guider = SelfAttnMapL2Appearance(scale=(1.0, 0.5), self_attn_scale=(3.0, 300.0), app_scale=(5.0, 50.0),
                                     new_features=new_features)
    caps = toy.captures(mode)
    if not new_features:  # the capture under the site this guider reads
        for cap in caps.values():
            cap.features[FeatureSite.CONV_NORM_OUT] = cap.features[site]
    layers = frozenset({0, 2})
    got = guider_energy(guider, 1, caps, layers)
    # v_g(i) · (s_self(i) · Σ_layers mean((A_cur − A_inv)²) + s_app(i) · mean|Φ_cur − Φ_inv|)
    expected = 0.5 * (300.0 * toy.attn_l2((0, 2)) + 50.0 * toy.appearance(site))
    got_value, got_grad = _value_and_grad(got, toy.x_cur)
    want_value, want_grad = _value_and_grad(expected, toy.x_cur)
    assert got_value == pytest.approx(want_value, rel=1e-9)
    torch.testing.assert_close(got_grad, want_grad)


def test_features_map_l2_reads_the_target_pass(mode):
    toy = ToyPasses(seed=3)
    caps = toy.captures(mode)
    # the current-latent source-prompt pass gets other features: the guider must not read them
    caps[Role.CUR_INV].features[FeatureSite.UP] = torch.zeros_like(caps[Role.CUR_INV].features[FeatureSite.UP])
    got = guider_energy(FeaturesMapL2(scale=2.5, block="up"), 0, caps, frozenset())
    expected = 2.5 * toy.features_l2(FeatureSite.UP)
    got_value, got_grad = _value_and_grad(got, toy.x_cur)
    want_value, want_grad = _value_and_grad(expected, toy.x_cur)
    assert got_value == pytest.approx(want_value, rel=1e-9)
    torch.testing.assert_close(got_grad, want_grad)


def test_attention_map_formula_matches_a_finite_difference():
    """The direct formula itself, checked without autograd: dE/dx by central differences."""
    toy = ToyPasses(seed=4)
    _, grad = _value_and_grad(toy.attn_l2((0, 1, 2)), toy.x_cur)
    h = 1e-6
    for index in (0, 5, 17):
        bump = torch.zeros_like(toy.x_cur)
        bump[0, index] = h
        with torch.no_grad():
            x = toy.x_cur.detach().clone()
            toy.x_cur = x + bump
            up = float(toy.attn_l2((0, 1, 2)))
            toy.x_cur = x - bump
            down = float(toy.attn_l2((0, 1, 2)))
            toy.x_cur = x
        assert (up - down) / (2 * h) == pytest.approx(float(grad[0, index]), rel=1e-5, abs=1e-12)


# --- noise rescaling (DESIGN.md §5) and the sum (§3 step 7) ----------------------------------


@pytest.mark.parametrize(
    "grad_scale, lo, hi",
    [(1.0, 0.33, 3.0), (100.0, 0.33, 3.0), (1e-3, 0.33, 3.0), (1.0, 1.5, 1.5), (50.0, 1.5, 1.5)],
    ids=["inside", "clipped-high", "clipped-low", "style-pinned-low", "style-pinned-high"],
)
def test_rescale_factor_matches_the_formula(grad_scale, lo, hi):
    g = _gen(5)
    delta_cfg = torch.randn(1, 4, 3, 3, generator=g, dtype=F64)
    grad = grad_scale * torch.randn(1, 4, 3, 3, generator=g, dtype=F64)
    gamma = rescale_factor(RescaleConfig("range_other_on_cfg_norm", lo, hi), delta_cfg, grad)
    assert gamma == pytest.approx(expected_gamma(delta_cfg, grad, lo, hi), rel=1e-12)
    # the promise behind the formula: ‖γ · grad‖ / ‖Δcfg‖ lies in [lo, hi]
    assert lo * (1 - 1e-12) <= l2(gamma * grad) / l2(delta_cfg) <= hi * (1 + 1e-12)


def test_rescale_factor_edge_cases():
    zeros, ones = torch.zeros(1, 4, 2, 2, dtype=F64), torch.ones(1, 4, 2, 2, dtype=F64)
    pinned = RescaleConfig("range_other_on_cfg_norm", 1.5, 1.5)
    assert rescale_factor(pinned, zeros, ones) == pytest.approx(expected_gamma(zeros, ones, 1.5, 1.5)) == pytest.approx(1.5)
    assert rescale_factor(pinned, ones, zeros) == 1.0 == expected_gamma(ones, zeros, 1.5, 1.5)
    assert rescale_factor(pinned, ones, None) == 1.0
    assert rescale_factor(RescaleConfig("identity_rescaler"), ones, 100 * ones) == 1.0


def _terms(seed: int):
    g = _gen(seed)
    return [torch.randn(1, 4, 3, 3, generator=g, dtype=F64) for _ in range(4)]


def test_combine_terms_with_an_energy_gradient():
    eps_u, delta_cfg, grad, _ = _terms(6)
    grad = 20 * grad  # far above hi = 3: γ clips
    config = EditConfig.nonstyle(4)
    terms = combine_terms(config, eps_u, delta_cfg, grad, None, 0.25)
    gamma = expected_gamma(delta_cfg, grad, 0.33, 3.0)
    assert terms.gamma == pytest.approx(gamma, rel=1e-12) and gamma < 1
    torch.testing.assert_close(terms.eps_final, eps_u + delta_cfg + gamma * grad)
    assert terms.energy == 0.25 and terms.direct is None
    assert terms.guider_grad is grad and terms.eps_u is eps_u and terms.delta_cfg is delta_cfg


def test_combine_terms_without_an_energy():
    eps_u, delta_cfg, _, _ = _terms(7)
    terms = combine_terms(EditConfig.style(4), eps_u, delta_cfg, None, None, 0.0)
    assert terms.gamma == 1.0 and terms.guider_grad is None
    torch.testing.assert_close(terms.eps_final, eps_u + delta_cfg)


def test_combine_terms_latents_diff_is_not_rescaled():
    """latents_diff adds 2 (z − z*) · v directly; the identity rescaler leaves any gradient as is."""
    eps_u, delta_cfg, z, z_star = _terms(8)
    config = EditConfig(guiders=(CfgGuider(7.5), LatentsDiff(0.5)), rescale=RescaleConfig("identity_rescaler"), num_steps=4)
    direct = 0.5 * 2 * (z - z_star)
    grad = 1e3 * torch.ones_like(z)
    terms = combine_terms(config, eps_u, delta_cfg, grad, direct, 1.0)
    assert terms.gamma == 1.0
    torch.testing.assert_close(terms.eps_final, eps_u + delta_cfg + direct + grad)


@pytest.mark.parametrize("source_guidance", [False, True])
def test_step_terms_cfg_and_latents_diff(source_guidance):
    """Δcfg = w · (ε_trg − ε_u), or ε_src with is_source_guidance (§4 cfg), plus 2 (z − z*) · v."""
    from types import SimpleNamespace

    from gnr_fast.fast.step import step_terms

    eps_u, eps_trg, z, z_star = _terms(9)
    eps_src = eps_trg.flip(-1)
    config = EditConfig(
        guiders=(CfgGuider(scale=(7.5, 3.0), is_source_guidance=source_guidance), LatentsDiff(scale=(0.0, 0.25))),
        rescale=RescaleConfig("identity_rescaler"), num_steps=2,
    )
    from gnr_fast.samplers import DDIMSampler

    # step_terms reads only the config and the sampler's composition (which needs no schedule)
    ctx = SimpleNamespace(config=config, sampler=DDIMSampler(schedule=None, num_steps=2))
    eps = {"eps_u": eps_u, "eps_trg": eps_trg, "eps_src": eps_src}
    terms = step_terms(ctx, 1, eps, z, z_star, None, 0.0)
    prompt_eps = eps_src if source_guidance else eps_trg
    torch.testing.assert_close(terms.delta_cfg, 3.0 * (prompt_eps - eps_u))
    torch.testing.assert_close(terms.direct, 0.25 * 2 * (z - z_star))
    torch.testing.assert_close(terms.eps_final, eps_u + 3.0 * (prompt_eps - eps_u) + 0.5 * (z - z_star))
