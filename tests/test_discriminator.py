"""Tests of 04_discriminator.py: MS-I/O structure, text conditioning, R1 double backward."""
import dataclasses

import pytest
import torch

from conftest import double_backward, load

dm = load("04_discriminator")
gen = load("03_generator")

TEXT_DIM = 32  # width of the random stand-in CLIP tokens


def tiny_cfg(**changes):
    """The tiny preset, made smaller still where the test does not care about width."""
    return dataclasses.replace(dm.D_PRESETS["tiny"], **changes)


def random_inputs(D, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pyramid = [torch.randn(B, 3, r, r, generator=g) for r in D.resolutions]  # finest first
    return pyramid, dm.random_text(B, L=12, D=TEXT_DIM, seed=seed)


@pytest.mark.parametrize("resolution,levels", [(32, 4), (64, 5)])
def test_number_order_and_shapes_of_predictions(resolution, levels):
    D = dm.Discriminator(tiny_cfg(resolution=resolution), TEXT_DIM)
    assert D.cfg.levels == levels
    pyramid, text = random_inputs(D, B=3)
    preds = D(pyramid, *text)
    P = levels * (levels + 1) // 2                                  # 10 or 15
    assert len(preds) == P == D.num_predictions
    assert all(p.shape == (3,) for p in preds)
    # entry-major order, every entry i predicts at every exit j >= i
    assert D.pairs == [(i, j) for i in range(levels) for j in range(i, levels)]
    assert D.pairs[levels - 1] == (0, levels - 1)                   # the classic single-D prediction


def test_text_changes_every_prediction():
    D = dm.Discriminator(tiny_cfg(), TEXT_DIM)
    pyramid, text = random_inputs(D, seed=1)
    _, other = random_inputs(D, seed=2)
    a, b = D(pyramid, *text), D(pyramid, *other)
    for (i, j), pa, pb in zip(D.pairs, a, b):
        assert (pa - pb).abs().min() > 1e-4, f"prediction {(i, j)} ignores the text"
    # the same text twice gives the same answer (no hidden randomness)
    assert all(torch.equal(p, q) for p, q in zip(a, D(pyramid, *text)))


def test_late_entry_early_exit_by_autograd():
    """d prediction(i, j) / d x_k is zero unless k == i (and nonzero for k == i)."""
    D = dm.Discriminator(tiny_cfg(), TEXT_DIM)
    pyramid, text = random_inputs(D)
    pyramid = [x.requires_grad_() for x in pyramid]
    preds = D(pyramid, *text)
    for (i, j), p in zip(D.pairs, preds):
        grads = torch.autograd.grad(p.sum(), pyramid, retain_graph=True, allow_unused=True)
        for k, g in enumerate(grads):
            if k == i:
                assert g is not None and g.abs().sum() > 0, f"prediction {(i, j)} ignores its own level"
            else:
                assert g is None or torch.count_nonzero(g) == 0, f"prediction {(i, j)} sees level {k}"


def test_samples_do_not_interact():
    """No minibatch-std or batch norm: a sample's predictions do not depend on the others."""
    D = dm.Discriminator(tiny_cfg(), TEXT_DIM)
    pyramid, text = random_inputs(D, B=3)
    full = D(pyramid, *text)
    alone = D([x[:1] for x in pyramid], *(t[:1] for t in text))
    for p, q in zip(full, alone):
        torch.testing.assert_close(p[:1], q, atol=1e-5, rtol=1e-5)


def test_single_scale_switch():
    D = dm.Discriminator(tiny_cfg(multi_scale=False), TEXT_DIM)
    pyramid, text = random_inputs(D)
    preds = D(pyramid, *text)
    assert D.pairs == [(0, 3)] and len(preds) == 1 and preds[0].shape == (2,)
    assert list(D.from_rgb.keys()) == ["0"] and list(D.predictors.keys()) == ["3"]  # no unused params
    assert torch.equal(D([pyramid[0]], *text)[0], preds[0])       # the coarse levels are not used


def test_attention_switch():
    with_attn = dm.Discriminator(tiny_cfg(attention=True), TEXT_DIM)
    without = dm.Discriminator(tiny_cfg(attention=False), TEXT_DIM)
    ImageSelfAttention = load("02_attention").ImageSelfAttention
    assert any(isinstance(m, ImageSelfAttention) for m in with_attn.modules())
    assert not any(isinstance(m, ImageSelfAttention) for m in without.modules())
    pyramid, text = random_inputs(without)
    assert len(without(pyramid, *text)) == 10


def test_modulated_1x1_equals_01_reference():
    """The channel-scaling 1x1 path equals 01's modulated_conv2d with per-sample kernels."""
    for demodulate in (True, False):
        layer = dm.ModulatedConv1x1(8, 5, cond_dim=6, demodulate=demodulate)
        x, c = torch.randn(4, 8, 3, 3), torch.randn(4, 6)
        fast = layer(x, c)
        layer.reference = True
        torch.testing.assert_close(fast, layer(x, c), atol=1e-5, rtol=1e-5)


def test_double_backward_ms_io():
    D = dm.Discriminator(tiny_cfg(), TEXT_DIM)
    pyramid, text = random_inputs(D)
    pyramid = [x.requires_grad_() for x in pyramid]
    n = double_backward(D(pyramid, *text), pyramid, list(D.parameters()))
    assert n > len(list(D.parameters())) // 2                      # most weights receive an R1 gradient


def test_vision_aided_shapes_text_and_double_backward():
    channels, E, B = [24, 24, 40], 16, 3
    VD = dm.VisionAidedDiscriminator(channels, E, hidden=32)
    features = [torch.randn(B, c, 7, 7, requires_grad=True) for c in channels]
    e1 = torch.nn.functional.normalize(torch.randn(B, E), dim=1)
    e2 = torch.nn.functional.normalize(torch.randn(B, E), dim=1)
    a, b = VD(features, e1), VD(features, e2)
    assert len(a) == 3 and all(l.shape == (B,) for l in a)
    assert all((la - lb).abs().min() > 1e-4 for la, lb in zip(a, b)), "a head ignores the text"
    double_backward(a, features, list(VD.parameters()))
    # CLIP is not a submodule: only the heads are stored
    assert all(name.startswith("heads.") for name in VD.state_dict())


def test_full_parameter_count_on_meta_device():
    with torch.device("meta"):
        D = dm.Discriminator(dm.D_PRESETS["full"], text_dim=768)    # CLIP ViT-L/14 text width
    n = sum(p.numel() for p in D.parameters())
    assert abs(n / 381.4e6 - 1) < 0.01, f"full D has {n / 1e6:.1f}M parameters, paper 381.4M"


def test_presets_build_and_match_generator_names():
    """One D preset per G preset of 03, reading G's pyramid: the same names, resolution, and one
    level per scale of G (finest first on both sides)."""
    assert set(dm.D_PRESETS) == set(gen.G_PRESETS) == {"tiny", "small", "full"}
    for name, d_cfg in dm.D_PRESETS.items():
        g_cfg = gen.G_PRESETS[name]
        assert d_cfg.resolution == g_cfg.resolution, name
        assert d_cfg.levels == len(g_cfg.scales), name
        with torch.device("meta"):
            D = dm.Discriminator(d_cfg, 128)
        assert list(D.resolutions) == sorted(g_cfg.scales, reverse=True), name
    tiny = dm.Discriminator(dm.D_PRESETS["tiny"], 128)
    assert 0.3e6 < sum(p.numel() for p in tiny.parameters()) < 1.5e6
    for cfg in dm.D_PRESETS.values():                               # vision-aided heads from the config
        with torch.device("meta"):
            dm.VisionAidedDiscriminator([768] * 3, 512, hidden=cfg.vision_hidden, psi_layers=cfg.vision_psi_layers)


def test_bad_pyramid_is_rejected():
    D = dm.Discriminator(tiny_cfg(), TEXT_DIM)
    pyramid, text = random_inputs(D)
    with pytest.raises(AssertionError):
        D(pyramid[:-1], *text)                                      # a level missing
    with pytest.raises(AssertionError):
        D(pyramid[::-1], *text)                                     # coarsest first


def test_demo_runs():
    dm.demo()


@pytest.mark.parametrize("multi_scale", [True, False])
def test_several_captions_per_image_equal_separate_calls(multi_scale):
    """k captions per image (the matching-aware pairs): the image branch runs once, and every
    prediction equals the one of a plain call with the images repeated k times."""
    torch.manual_seed(0)
    D = dm.Discriminator(tiny_cfg(multi_scale=multi_scale), TEXT_DIM).eval()
    pyramid, _ = random_inputs(D, B=3)
    tokens, mask, eot = dm.random_text(6, L=12, D=TEXT_DIM, seed=5)  # 2 captions for each of 3 images
    shared = D(pyramid, tokens, mask, eot)  # P x (6,)
    repeated = D([x.repeat(2, 1, 1, 1) for x in pyramid], tokens, mask, eot)
    assert all(a.shape == (6,) for a in shared)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(shared, repeated))
    with pytest.raises(AssertionError, match="captions for"):
        D(pyramid, tokens[:4], mask[:4], eot[:4])


def test_predictor_position_map_lets_d_see_where_features_are():
    """1x1 convs and a spatial mean cannot tell where a feature is (a shifted map gives the same
    logit); the learned position map of the MS-I/O exits can."""
    torch.manual_seed(0)
    h = torch.randn(2, 8, 4, 4)
    c = torch.randn(2, 16)
    shifted = torch.roll(h, shifts=2, dims=3)  # the same features, moved right
    blind = dm.Predictor(8, 16, psi_layers=2)
    assert torch.allclose(blind(h, c), blind(shifted, c), atol=1e-5)
    seeing = dm.Predictor(8, 16, psi_layers=2, size=4)
    assert not torch.allclose(seeing(h, c), seeing(shifted, c), atol=1e-3)
    D = dm.Discriminator(tiny_cfg(), TEXT_DIM)
    exits = list(D.predictors.values())
    assert all(p.position.shape[-1] == r // 2 for p, r in zip(exits[:-1], D.resolutions))
    assert exits[-1].position is None  # the 1x1 exit: its Flatten1x1 layer already saw positions


def _exit_feature_sides(D, pyramid, text):
    """Side of the feature map each predictor (exit) receives, recorded by forward pre-hooks."""
    sides = {}
    hooks = [p.register_forward_pre_hook(lambda m, args, j=j: sides.__setitem__(j, tuple(args[0].shape[-2:])))
             for j, p in D.predictors.items()]
    D(pyramid, *text)
    for h in hooks:
        h.remove()
    return [sides[j] for j in sorted(sides, key=int)]


def test_64px_exits_are_32_16_8_4_and_1x1():
    """Paper, Sec. 3.3: the final stage flattens the spatial extent into a 1x1 tensor, so the
    exits of the 64 px D see {32, 16, 8, 4, 1} (not 2x2 at the end)."""
    D = dm.Discriminator(tiny_cfg(resolution=64), TEXT_DIM)
    pyramid, text = random_inputs(D)
    assert D.exit_resolutions == [32, 16, 8, 4, 1]
    assert _exit_feature_sides(D, pyramid, text) == [(32, 32), (16, 16), (8, 8), (4, 4), (1, 1)]
    assert isinstance(D.scales[-1].layers[-1], dm.Flatten1x1)
    # single-scale D: its one exit is the 1x1 one
    S = dm.Discriminator(tiny_cfg(resolution=64, multi_scale=False), TEXT_DIM)
    assert _exit_feature_sides(S, pyramid, text) == [(1, 1)]


def test_flatten_1x1_sees_where_features_are():
    """Flatten1x1 is a fully connected layer on the flattened map: moving a feature changes it
    (a spatial mean would not), and it equals the matrix product written out."""
    torch.manual_seed(0)
    layer = dm.Flatten1x1(8, 5, 4)
    h = torch.randn(2, 8, 4, 4)
    out = layer(h)
    assert out.shape == (2, 5, 1, 1)
    assert not torch.allclose(out, layer(torch.roll(h, shifts=1, dims=3)), atol=1e-4)
    fc = layer.fc
    y = h.flatten(1) @ (fc.weight * fc.weight_gain).T + fc.bias * fc.lr_mul  # EqualLinear by hand
    y = torch.nn.functional.leaky_relu(y, 0.2) * 2 ** 0.5
    torch.testing.assert_close(out.flatten(1), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("downsample,projection", [("max", False), ("blur", True), ("max", True)])
def test_downsample_and_projection_options_keep_ms_io_properties(downsample, projection):
    """Max-pool downsampling and the flattened projection term keep every MS-I/O property:
    prediction (i, j) sees x_i only, it depends on the text, and R1's double backward works."""
    D = dm.Discriminator(tiny_cfg(downsample=downsample, projection=projection), TEXT_DIM)
    pyramid, text = random_inputs(D, seed=3)
    _, other = random_inputs(D, seed=4)
    pyramid = [x.requires_grad_() for x in pyramid]
    preds = D(pyramid, *text)
    assert len(preds) == 10 and all(p.shape == (2,) for p in preds)
    for (i, j), p, q in zip(D.pairs, preds, D(pyramid, *other)):
        assert (p - q).abs().min() > 1e-4, f"prediction {(i, j)} ignores the text"
        grads = torch.autograd.grad(p.sum(), pyramid, retain_graph=True, allow_unused=True)
        for k, g in enumerate(grads):
            seen = g is not None and torch.count_nonzero(g) > 0
            assert seen == (k == i), f"prediction {(i, j)}: level {k} seen={seen}"
    assert double_backward(preds, pyramid, list(D.parameters())) > len(list(D.parameters())) // 2
    if projection:
        assert all(p.project is not None for p in D.predictors.values())


def test_max_downsample_is_a_2x2_max_pool_and_bad_mode_is_rejected():
    block = dm.DownBlock(4, 4, mode="max")
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(block.halve(x), torch.nn.functional.max_pool2d(x, 2))
    with pytest.raises(AssertionError, match="downsample"):
        tiny_cfg(downsample="stride")
    with pytest.raises(AssertionError, match="mode"):
        dm.DownBlock(4, 4, mode="stride")


def test_pack_judges_m_images_of_one_caption_together():
    """--d.pack 2 (PacGAN): images 2g, 2g+1 enter as one 6-channel input with caption row 2g; the
    pack's logit comes back on both rows, reads both images and no other pack; with two caption
    groups (Eq. 8's wrong captions) the rows stay (group, image)."""
    torch.manual_seed(0)
    D = dm.Discriminator(tiny_cfg(pack=2), TEXT_DIM).eval()
    assert D.from_rgb["0"].weight.shape[1] == 6
    pyramid, text = random_inputs(D, B=4)
    leaves = [x.requires_grad_(True) for x in pyramid]
    preds = D(leaves, *text)
    assert len(preds) == D.num_predictions and all(p.shape == (4,) for p in preds)
    assert all(torch.equal(p[0], p[1]) and torch.equal(p[2], p[3]) for p in preds)
    grad = torch.autograd.grad(preds[D.pairs.index((0, 3))][0], leaves[0])[0]
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0 and grad[2:].abs().sum() == 0
    tokens, mask, eot = text
    two = D(pyramid, torch.cat([tokens, tokens.flip(0)]), torch.cat([mask, mask.flip(0)]), torch.cat([eot, eot.flip(0)]))
    assert all(p.shape == (8,) and torch.allclose(p[:4], q, atol=1e-5) for p, q in zip(two, preds))
    with pytest.raises(AssertionError, match="whole packs"):
        D([x[:3] for x in pyramid], *(t[:3] for t in text))
