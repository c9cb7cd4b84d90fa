"""Capturing calls return the right internals as outputs and leave the UNet output unchanged."""

import pytest
import torch

from gnr_fast.attention import CaptureMode, CaptureSpec, PassCapture, select_layers
from gnr_fast.config import FeatureSite
from gnr_fast.errors import ConfigError, UnsupportedArchitectureError
from gnr_fast.reference.recording import RecordingUNet


@pytest.fixture(scope="module")
def setup(tiny_editor):
    torch.manual_seed(0)
    z = torch.randn(3, 4, 8, 8)
    ctx = tiny_editor.embed("a red circle")
    t = torch.tensor(300)
    return tiny_editor, z, ctx, t


def test_layers_in_forward_order(tiny_editor):
    layers = tiny_editor.self_attn_layers
    assert [layer.group for layer in layers] == ["down"] * 6 + ["mid"] + ["up"] * 9
    assert [layer.group_index for layer in layers[:7]] == [0, 1, 2, 3, 4, 5, 0]
    assert all(layer.name.endswith("attn1") for layer in layers)
    assert select_layers(layers, ((1, 3), (0, 0), (8, 9))) == frozenset({1, 2, 15})
    with pytest.raises(ConfigError, match="exceeds"):
        select_layers(layers, ((0, 7), (0, 1), (0, 9)))


def _module_io(editor, names):
    """Record inputs/outputs of named modules with plain forward hooks (test-side, independent)."""
    modules = dict(editor.components.unet.named_modules())
    seen, handles = {}, []

    def keep(key, value) -> None:
        seen.setdefault(key, value)

    for name in names:
        handles.append(modules[name].register_forward_pre_hook(lambda m, a, n=name: keep(("in", n), a[0]) if a else None))
        handles.append(modules[name].register_forward_hook(lambda m, a, o, n=name: keep(("out", n), o)))
    return seen, handles


def test_captured_maps_equal_hand_computed_softmax(setup):
    editor, z, ctx, _ = setup
    name = editor.self_attn_layers[3].name
    seen, handles = _module_io(editor, [name])
    capture = PassCapture(layers=frozenset({3}), mode=CaptureMode.MAPS)
    with torch.no_grad():
        RecordingUNet(editor.runner)(z[:1], 500, ctx, (capture,))  # the reference step's recording convention
    for h in handles:
        h.remove()
    attn_module = dict(editor.components.unet.named_modules())[name]
    h = seen[("in", name)]  # [1, N, C]
    heads = attn_module.heads
    q = attn_module.to_q(h).view(1, h.shape[1], heads, -1).transpose(1, 2)
    k = attn_module.to_k(h).view(1, h.shape[1], heads, -1).transpose(1, 2)
    expected = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # [1, H, N, N]
    assert set(capture.maps) == {3}
    torch.testing.assert_close(capture.maps[3], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(capture.maps[3].sum(-1), torch.ones(1, heads, h.shape[1]))


def test_capture_does_not_change_output(setup):
    editor, z, ctx, t = setup
    run = editor.runner
    with torch.no_grad():
        plain = run.plain(z, t, ctx)
        qk, _ = run.capture(z, t, ctx, CaptureSpec(frozenset(range(16)), frozenset(FeatureSite), rows=(1, 2), with_lse=True))
        maps = RecordingUNet(run)(z, 300, ctx, (PassCapture(layers=frozenset(range(16)), mode=CaptureMode.MAPS),))
    assert plain.dtype == torch.float32
    torch.testing.assert_close(maps, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qk, plain)


def test_capture_returns_rows_and_features(setup):
    editor, z, ctx, t = setup
    unet = editor.components.unet
    layer = editor.self_attn_layers[15]
    sites = {FeatureSite.UP_LAST: "up_blocks.3", FeatureSite.MID: "mid_block",
             FeatureSite.UP: "up_blocks.1.resnets.1", FeatureSite.DOWN: "down_blocks.1.resnets.1"}
    seen, handles = _module_io(editor, [layer.name, *sites.values()])
    spec = CaptureSpec(frozenset({0, 15}), frozenset(FeatureSite), rows=(1, 2), with_lse=True)
    with torch.no_grad():
        _, rows = editor.runner.capture(z, t, ctx, spec)
    for h in handles:
        h.remove()
    assert len(rows) == 2 and set(rows[0].queries) == {0, 15} and not rows[0].maps
    # [1, H, N, D]: SD 1.x configs name the head *count* attention_head_dim (4), 8 channels / 4 = dim 2
    assert rows[0].queries[0].shape == (1, 4, 64, 2) and rows[0].lse[0].shape == (1, 4, 64)
    # queries, lse and features are those of batch rows 1 and 2
    attn_module = dict(unet.named_modules())[layer.name]
    h = seen[("in", layer.name)]
    q = attn_module.to_q(h).view(3, h.shape[1], attn_module.heads, -1).transpose(1, 2)
    k = attn_module.to_k(h).view(3, h.shape[1], attn_module.heads, -1).transpose(1, 2)
    for j, b in enumerate((1, 2)):
        torch.testing.assert_close(rows[j].queries[15], q[b : b + 1])
        lse = torch.logsumexp(q[b : b + 1] @ k[b : b + 1].transpose(-1, -2) * layer.scale, dim=-1)
        torch.testing.assert_close(rows[j].lse[15], lse, rtol=1e-5, atol=1e-5)
        for site, name in sites.items():
            torch.testing.assert_close(rows[j].features[site], seen[("out", name)][b : b + 1])
        torch.testing.assert_close(rows[j].features[FeatureSite.CONV_NORM_OUT],
                                   unet.conv_norm_out(seen[("out", "up_blocks.3")][b : b + 1]))
    assert rows[0].scales[15] == layer.scale


def test_grad_call_differentiates_captures(setup):
    editor, z, ctx, t = setup
    spec = CaptureSpec(frozenset({4}), frozenset({FeatureSite.UP_LAST}), rows=(0, 1))
    latents = z[:2].clone().requires_grad_(True)
    with torch.enable_grad():
        _, rows = editor.runner.capture(latents, t, ctx, spec)
        energy = rows[1].queries[4].square().mean() + rows[1].features[FeatureSite.UP_LAST].abs().mean()
        (grad,) = torch.autograd.grad(energy, latents)
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0  # rows do not interact


def test_calls_on_two_threads_record_only_their_own(setup):
    """Each capturing call returns its own tensors, even with another call running at once."""
    from concurrent.futures import ThreadPoolExecutor

    editor, z, ctx, t = setup
    spec = CaptureSpec(frozenset({2}), frozenset({FeatureSite.UP_LAST}), rows=(0,))
    with torch.no_grad():
        alone = [editor.runner.capture(z[i : i + 1], t, ctx, spec)[1][0] for i in range(2)]
        with ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda i: editor.runner.capture(z[i : i + 1], t, ctx, spec)[1][0], range(2)))
    for a, b in zip(alone, both):
        torch.testing.assert_close(a.features[FeatureSite.UP_LAST], b.features[FeatureSite.UP_LAST])
        torch.testing.assert_close(a.queries[2], b.queries[2])


def test_spec_is_frozen_hashable_and_validated():
    spec = CaptureSpec(frozenset({1}), frozenset({FeatureSite.UP}), rows=(2, 3), with_lse=True)
    assert hash(spec) == hash(CaptureSpec({1}, {FeatureSite.UP}, (2, 3), True)) and spec.row_slice == slice(2, 4)
    with pytest.raises(ValueError, match="contiguous"):
        CaptureSpec(rows=(0, 2))
    with pytest.raises(AttributeError):
        spec.rows = (0,)


def test_unet_without_a_feature_site_is_refused_clearly(setup):
    from gnr_fast.attention.capture import check_sites

    with pytest.raises(UnsupportedArchitectureError, match="feature site"):
        check_sites(CaptureSpec(feature_sites={FeatureSite.UP_LAST}), frozenset())


def test_unet_with_feature_taps_still_pickles(tiny_editor):
    import copy
    import io

    unet = tiny_editor.components.unet
    buffer = io.BytesIO()
    torch.save(unet, buffer)  # whole-module pickling, as some users save models
    assert copy.deepcopy(unet) is not unet
