"""Tests of 06_upsampler.py: pyramid shapes for 2x / 4x / 8x, the pairing with 04's MS-I/O D,
text and z conditioning, noise augmentation (eval off, per-image sigma), anti-aliased low-res
pairs, gradients, the residual design under a few L1 steps, parameter counts, the demo."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from conftest import CountOps, load

up = load("06_upsampler")
dm = load("04_discriminator")
kernels = load("01_kernel_selection")
data = load("data")

D = 32  # text width of the random stand-in for CLIP tokens
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**changes):
    """The tiny preset (32 -> 128), narrower text, with any field changed."""
    return dataclasses.replace(up.U_PRESETS["tiny"], **changes)


# 2x, 4x and 8x configurations (name -> config); 4x is the tiny preset itself
CONFIGS = {
    "2x 16->32": small(in_resolution=16, out_resolution=32, channels=(32, 32, 16), down_blocks=(1,),
                       up_blocks=(1, 2), n_kernels=(2, 2), attn_resolutions=(16,)),
    "4x 32->128": up.U_PRESETS["tiny"],
    "4x 16->64, no halving": small(in_resolution=16, out_resolution=64, channels=(16, 16, 8), down_blocks=(),
                                   up_blocks=(1, 1), n_kernels=(1, 2), attn_resolutions=(32,)),
    "8x 8->64": small(in_resolution=8, out_resolution=64, channels=(32, 32, 32, 16, 8), down_blocks=(1,),
                      up_blocks=(1, 1, 1, 1), n_kernels=(1, 2, 2, 2), attn_resolutions=(8, 16)),
}


def inputs(cfg, B=2, seed=0):
    """Low-res images, z and random text for a config."""
    g = torch.Generator().manual_seed(seed)
    r = cfg.in_resolution
    lowres = torch.rand(B, 3, r, r, generator=g) * 2 - 1             # (B, 3, r, r) in [-1, 1]
    z = torch.randn(B, cfg.z_dim, generator=g)
    return lowres, z, up.random_text(B, D=D, seed=seed)


@pytest.fixture(scope="module")
def tiny():
    """One tiny upsampler in eval mode with visible noise strengths, shared, never mutated."""
    torch.manual_seed(0)
    U = up.Upsampler(up.U_PRESETS["tiny"], text_dim=D).eval()
    for p in U.parameters():
        p.requires_grad_(False)
    for scale in U.decoder:
        for block in scale.blocks:
            block.conv.noise.strength.fill_(0.3)
    return U


def run(U, lowres, z, text, **kw):
    with torch.no_grad():
        return U(lowres, z, *text, **kw)


# ----------------------------------------------------------------------------- shapes, D pairing

@pytest.mark.parametrize("name", list(CONFIGS))
def test_pyramid_shapes_and_discriminator_pairing(name):
    cfg = CONFIGS[name]
    U = up.Upsampler(cfg, text_dim=D).eval()
    lowres, z, text = inputs(cfg)
    pyramid = run(U, lowres, z, text)
    R = cfg.out_resolution
    assert cfg.factor == R // cfg.in_resolution
    assert [tuple(x.shape) for x in pyramid] == [(2, 3, R >> i, R >> i) for i in range(cfg.levels)]
    assert pyramid[-1].shape[-1] == 4 and all(torch.isfinite(x).all() for x in pyramid)
    # levels coarser than the first decoder scale are the blur-downsampled next finer level
    for i, x in enumerate(pyramid[:-1]):
        if x.shape[-1] <= cfg.decoder_scales[0]:
            assert torch.allclose(pyramid[i + 1], kernels.downsample2x(x), atol=1e-6)
    # the MS-I/O D built at the output resolution takes the pyramid as it is
    Dnet = dm.Discriminator(dm.DiscriminatorConfig(resolution=R), D)
    preds = Dnet(pyramid, *text)
    assert len(preds) == cfg.levels * (cfg.levels + 1) // 2 and all(p.shape == (2,) for p in preds)


def test_tiny_pairs_with_its_discriminator_preset(tiny):
    d_cfg = up.U_D_PRESETS["tiny"]
    assert d_cfg.resolution == tiny.cfg.out_resolution and d_cfg.levels == tiny.cfg.levels
    lowres, z, text = inputs(tiny.cfg)
    preds = dm.Discriminator(d_cfg, D)(run(tiny, lowres, z, text), *text)
    assert len(preds) == 21                                          # 6 levels: 6 * 7 / 2


@pytest.mark.parametrize("name,resolutions", [("full", (64, 512)), ("full1024", (128, 1024))])
def test_large_presets_on_meta(name, resolutions):
    cfg = up.U_PRESETS[name]
    assert (cfg.in_resolution, cfg.out_resolution) == resolutions
    assert len(cfg.down_blocks) == 3 and len(cfg.decoder_scales) == 6   # paper: 3 down, 6 up
    assert up.U_D_PRESETS[name].levels == cfg.levels
    with torch.device("meta"):                                       # shapes only, no memory
        U = up.Upsampler(cfg, text_dim=768)
        eot = torch.full((1,), 9)
        mask = torch.arange(77)[None, :] <= eot[:, None]
        r = cfg.in_resolution
        pyramid = U(torch.zeros(1, 3, r, r), torch.zeros(1, 128), torch.zeros(1, 77, 768), mask, eot)
    R = cfg.out_resolution
    assert [tuple(x.shape) for x in pyramid] == [(1, 3, R >> i, R >> i) for i in range(cfg.levels)]


def test_full_parameter_count_matches_paper():
    with torch.device("meta"):
        U = up.Upsampler(up.U_PRESETS["full"], text_dim=768)
    n = up.count_parameters(U)
    assert abs(n - 359.1e6) / 359.1e6 < 0.01, f"{n / 1e6:.1f}M vs 359.1M"


def test_tiny_is_small():
    # its forward + backward time at batch 8 (target < 1 s) is a figure of `python bench.py`
    U = up.Upsampler(up.U_PRESETS["tiny"], text_dim=128)
    assert up.count_parameters(U) < 1.5e6


# ----------------------------------------------------------------------------- conditioning

def test_init_output_is_the_bicubic_upsampling_plus_a_small_residual(tiny):
    lowres, z, text = inputs(tiny.cfg)
    pyramid = run(tiny, lowres, z, text, noise_mode="none")
    R, r = tiny.cfg.out_resolution, tiny.cfg.in_resolution
    assert (pyramid[0] - up.resize(lowres, R)).abs().mean() < 0.02
    assert (pyramid[2] - lowres).abs().mean() < 0.02                 # level 2 is the input's own size
    assert pyramid[2].shape[-1] == r


def test_text_and_z_change_the_output(tiny):
    lowres, z, text = inputs(tiny.cfg)
    ref = run(tiny, lowres, z, text, noise_mode="const")
    other_text = run(tiny, lowres, z, up.random_text(2, D=D, seed=7), noise_mode="const")
    other_z = run(tiny, lowres, torch.randn_like(z), text, noise_mode="const")
    again = run(tiny, lowres, z, text, noise_mode="const")
    assert torch.equal(ref[0], again[0])                             # no hidden randomness
    for other in (other_text, other_z):
        for a, b in zip(ref, other):
            assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-5    # every image, every level


def test_padding_tokens_do_not_matter(tiny):
    lowres, z, (tokens, mask, eot) = inputs(tiny.cfg)
    noisy = tokens.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), D) * 10
    a = run(tiny, lowres, z, (tokens, mask, eot), noise_mode="const")
    b = run(tiny, lowres, z, (noisy, mask, eot), noise_mode="const")
    assert torch.allclose(a[0], b[0], atol=1e-5)


def test_batch_consistency(tiny):
    lowres, z, (tokens, mask, eot) = inputs(tiny.cfg, B=3)
    batch = run(tiny, lowres, z, (tokens, mask, eot), noise_mode="const")
    alone = run(tiny, lowres[1:2], z[1:2], (tokens[1:2], mask[1:2], eot[1:2]), noise_mode="const")
    for x, y in zip(batch, alone):
        assert torch.allclose(x[1:2], y, atol=1e-5), (x[1:2] - y).abs().max()


def test_no_python_loop_over_the_batch(tiny):
    counts = []
    for B in (4, 7):  # both >= N^2 = 4 (tiny's largest bank), see test_generator's twin
        lowres, z, text = inputs(tiny.cfg, B=B)
        with CountOps() as c:
            run(tiny, lowres, z, text, noise_aug=0.1)
        counts.append(c.n)
    assert counts[0] == counts[1], counts


# ----------------------------------------------------------------------------- noise augmentation

def test_noise_augmentation_off_in_eval_unless_asked(tiny):
    lowres, z, text = inputs(tiny.cfg)
    clean = run(tiny, lowres, z, text, noise_mode="const")
    assert torch.equal(run(tiny, lowres, z, text, noise_mode="const")[0], clean[0])
    assert torch.equal(run(tiny, lowres, z, text, noise_aug=0.0, noise_mode="const")[0], clean[0])
    asked = run(tiny, lowres, z, text, noise_aug=0.1, noise_mode="const")
    assert (asked[0] - clean[0]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    # per-image sigma as a tensor: image 0 untouched, image 1 noisy
    mixed = run(tiny, lowres, z, text, noise_aug=torch.tensor([0.0, 0.2]), noise_mode="const")
    assert torch.allclose(mixed[0][0], clean[0][0], atol=1e-6)
    assert (mixed[0][1] - clean[0][1]).abs().max() > 1e-3


def test_noise_augmentation_on_in_training():
    U = up.Upsampler(up.U_PRESETS["tiny"], text_dim=D)
    lowres, z, text = inputs(U.cfg)
    clean = run(U.eval(), lowres, z, text, noise_mode="const")
    U.train()
    assert torch.allclose(run(U, lowres, z, text, noise_aug=0.0, noise_mode="const")[0], clean[0], atol=1e-6)
    noisy = run(U, lowres, z, text, noise_mode="const")              # None in training: augmented
    assert (noisy[0] - clean[0]).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_inference_sigma_is_a_quarter_of_the_training_maximum():
    """The default inference noise of sample.py (the paper augments at inference too): a quarter
    of the training law's maximum U(0, noise_aug_sigma), a strength most training draws exceed,
    above 0."""
    for name, cfg in up.U_PRESETS.items():
        assert up.inference_sigma(cfg) == cfg.noise_aug_sigma / 4 > 0, name
    assert up.inference_sigma(up.U_PRESETS["tiny"]) == 0.005


def test_decoder_scales_are_residual_blocks():
    """Each decoder scale is one residual block (paper): (blocks(x) + conv1x1(x)) / sqrt(2),
    written out here against DecoderScale's forward."""
    torch.manual_seed(0)
    U = up.Upsampler(up.U_PRESETS["tiny"], text_dim=D).eval()
    scale = U.decoder[0]                                             # 16 px, with the encoder skip
    B, s = 2, scale.resolution
    x = torch.randn(B, scale.skip.weight.shape[1], s, s)
    ws = torch.randn(B, 1, U.cfg.w_dim)
    t_local, local_mask, _ = U.text_encoder(*up.random_text(B, D=D))
    with torch.no_grad():
        feats, rgb = scale(x, ws, t_local, local_mask, "const")
        y = x
        for block in scale.blocks:
            y = block(y, ws, t_local, local_mask, "const")
        skip = torch.nn.functional.conv2d(x, scale.skip.weight * scale.skip.weight_gain)  # linear 1x1, no bias
        expected = (y + skip) / 2 ** 0.5
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(rgb, scale.torgb(expected, ws))
    assert all(isinstance(sc.skip, kernels.EqualConv2d) and sc.skip.bias is None for sc in U.decoder)


def test_augment_lowres_sigma_per_image():
    x = torch.zeros(6, 3, 64, 64)
    y, sigma = up.augment_lowres(x, 0.5, generator=torch.Generator().manual_seed(0), return_sigma=True)
    assert sigma.shape == (6,) and (sigma >= 0).all() and (sigma <= 0.5).all()
    assert sigma.unique().numel() == 6                               # one draw per image
    std = y.flatten(1).std(dim=1)                                    # (6,) empirical noise std per image
    assert torch.allclose(std, sigma, rtol=0.05, atol=1e-3), (std, sigma)
    y2 = up.augment_lowres(x, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, y2)                                        # reproducible with a generator
    with pytest.raises(AssertionError):
        up.add_input_noise(x, torch.ones(5))                         # one sigma per image


# ----------------------------------------------------------------------------- low-res pairs

def test_make_lowres_is_anti_aliased():
    i = torch.arange(128)
    checker = ((i[:, None] + i[None, :]) % 2 * 2 - 1).float().expand(2, 3, 128, 128)  # one-pixel checkerboard
    assert checker[..., ::4, ::4].abs().min() == 1                   # naive subsampling: a flat wrong colour
    for r in (64, 32, 16):
        low = up.make_lowres(checker, r)
        assert low.shape == (2, 3, r, r)
        assert low.abs().max() < 0.05, (r, low.abs().max())          # anti-aliased: ~ the mean, 0
    const = torch.full((1, 3, 128, 128), 0.3)
    assert torch.allclose(up.make_lowres(const, 32), torch.full((1, 3, 32, 32), 0.3), atol=1e-5)
    img, _ = data.ShapesDataset(128)[0]
    low = up.make_lowres(img[None], 32)
    assert low.min() >= -1 and low.max() <= 1                        # clamped: bicubic overshoots a little


# ----------------------------------------------------------------------------- training

def test_gradients_reach_every_parameter():
    U = up.Upsampler(up.U_PRESETS["tiny"], text_dim=D).train()
    lowres, z, text = inputs(U.cfg)
    U(lowres, z, *text)[0].square().mean().backward()
    missing = [n for n, p in U.named_parameters() if p.grad is None]
    assert not missing, missing
    # and none is exactly zero (a 1-kernel bank has no selection layer: its softmax is constant)
    zero = [n for n, p in U.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero


def test_residual_starts_at_bicubic_and_l1_steps_shrink_it():
    """The residual design: the default init starts within 20% of bicubic's error; from a
    deliberately large residual (rgb_init 0.05), 25 L1 steps on two images shrink the error."""
    ds = data.ShapesDataset(128)
    highres = torch.stack([ds[i][0] for i in range(2)])              # (2, 3, 128, 128)
    lowres = up.make_lowres(highres, 32)
    z, text = torch.randn(2, 128), up.random_text(2, D=D)
    bicubic = (up.resize(lowres, 128) - highres).abs().mean().item()
    U = up.Upsampler(up.U_PRESETS["tiny"], text_dim=D).eval()
    with torch.no_grad():
        start = (U(lowres, z, *text, noise_mode="const")[0] - highres).abs().mean().item()
    assert start < 1.2 * bicubic, (start, bicubic)                   # the residual starts small
    cfg = dataclasses.replace(up.U_PRESETS["tiny"], rgb_init=0.05)
    U = up.Upsampler(cfg, text_dim=D).train()
    opt = torch.optim.Adam(U.parameters(), lr=2e-3, betas=(0.9, 0.99))
    errors = []
    for _ in range(25):
        error = (U(lowres, z, *text, noise_aug=0.0, noise_mode="const")[0] - highres).abs().mean()
        opt.zero_grad()
        error.backward()
        opt.step()
        errors.append(error.item())
    assert errors[0] > 2 * bicubic, (errors[0], bicubic)             # a large residual to remove
    assert min(errors[-5:]) < 0.7 * errors[0], errors


# ----------------------------------------------------------------------------- config, errors, demo

def test_config_from_plain_dict_and_bad_inputs(tiny):
    cfg = up.UpsamplerConfig(**{**dataclasses.asdict(up.U_PRESETS["tiny"]), "channels": [64, 64, 48, 32, 16]})
    assert cfg == up.U_PRESETS["tiny"]                                # lists from a checkpoint -> tuples
    assert (cfg.factor, cfg.bottleneck, cfg.levels) == (4, 8, 6)
    assert cfg.scales == [8, 16, 32, 64, 128] and cfg.encoder_scales == [16, 32]
    with pytest.raises(AssertionError):
        up.UpsamplerConfig(out_resolution=256)                        # tuples of the wrong length
    with pytest.raises(AssertionError):
        up.UpsamplerConfig(in_resolution=48)                          # not a power of 2
    with pytest.raises(AssertionError):
        small(in_resolution=16, out_resolution=64, down_blocks=(1, 1, 1))  # 16 px halved 3 times: 2 px
    lowres, z, text = inputs(tiny.cfg)
    with pytest.raises(AssertionError):
        run(tiny, lowres[..., :16, :16], z, text)                     # wrong input size
    with pytest.raises(AssertionError):
        run(tiny, lowres, z, text, noise_aug=torch.ones(3))           # sigma per image: (B,)
    with pytest.raises(AssertionError):
        run(tiny, lowres, z, (text[0][..., :16], text[1], text[2]))   # wrong text width


def test_demo_runs():
    up.demo()


def test_script_runs():
    # how long it takes (target < 30 s) is a figure of `python bench.py`
    out = subprocess.run([sys.executable, "06_upsampler.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------- metrics

class NearestStandIn(torch.nn.Module):
    """An 'upsampler' that repeats each pixel (nearest neighbour): a known output, not bicubic."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def forward(self, lowres, z, tokens, mask, eot, noise_aug=None, noise_mode="random"):
        return [torch.nn.functional.interpolate(lowres, size=self.cfg.out_resolution, mode="nearest")]


def pil_bicubic(images, size):
    """PIL's own bicubic resize, channel by channel on float images: an independent baseline."""
    import numpy as np
    from PIL import Image
    out = [[torch.from_numpy(np.array(Image.fromarray(c.numpy(), mode="F").resize((size, size), Image.BICUBIC)))
            for c in image] for image in images]
    return torch.stack([torch.stack(channels) for channels in out])            # (B, C, size, size)


def rms_gradient(x):
    """sqrt(mean(dx^2 + dy^2)) of forward differences on the (H-1, W-1) corner both have."""
    dx, dy = x.diff(dim=-1)[..., :-1, :], x.diff(dim=-2)[..., :, :-1]
    return (dx.square() + dy.square()).mean().sqrt().item()


def shapes_pair(n=4, R=128, r=32):
    ds = data.ShapesDataset(R, seed=5)
    highres = torch.stack([ds[i][0] for i in range(n)])             # (n, 3, R, R)
    return up.make_lowres(highres, r), highres


def test_metrics_equal_independent_formulas():
    """mae: mean |U(x_lr) - x| of the clamped output; mae_bicubic: the same for PIL's bicubic
    resize of x_lr (the baseline 06 names); the sharpness terms: the RMS gradient of each. Checked for an 'upsampler' that
    is not bicubic, so a metric that read the baseline instead of U's output would fail."""
    import torch.nn.functional as F
    lowres, highres = shapes_pair()
    U = NearestStandIn(up.U_PRESETS["tiny"])
    m = up.upsampling_metrics(U, lowres, highres, *up.random_text(4, D=D))
    assert set(m) == {"mae", "mae_bicubic", "sharpness", "sharpness_bicubic", "sharpness_real"}
    nearest = F.interpolate(lowres, size=128, mode="nearest").clamp(-1, 1)
    bicubic = pil_bicubic(lowres, 128).clamp(-1, 1)
    assert m["mae"] == pytest.approx((nearest - highres).abs().mean().item(), rel=1e-5)
    assert m["mae_bicubic"] == pytest.approx((bicubic - highres).abs().mean().item(), rel=1e-5)
    assert m["sharpness"] == pytest.approx(rms_gradient(nearest), rel=1e-5)
    assert m["sharpness_bicubic"] == pytest.approx(rms_gradient(bicubic), rel=1e-5)
    assert m["sharpness_real"] == pytest.approx(rms_gradient(highres), rel=1e-5)
    assert m["mae"] > m["mae_bicubic"] and m["sharpness_bicubic"] < m["sharpness_real"]


def test_sharpness_drops_with_blur_and_is_zero_on_flat_images():
    _, sharp = shapes_pair()
    blurred = kernels.upsample2x(kernels.downsample2x(sharp))       # the same image, low-passed
    assert up.sharpness(blurred) < 0.8 * up.sharpness(sharp)
    assert up.sharpness(torch.full((1, 3, 16, 16), 0.3)) == 0.0
    ramp = torch.arange(8.0).repeat(1, 3, 8, 1)                      # x[i, j] = j: |grad| = 1 everywhere
    assert abs(up.sharpness(ramp) - 1.0) < 1e-6


def test_metrics_leave_the_mode_and_skip_the_noise_augmentation(tiny):
    lowres, highres = shapes_pair(n=2)
    U = up.Upsampler(up.U_PRESETS["tiny"], text_dim=D).train()
    text = up.random_text(2, D=D)
    a, b = up.upsampling_metrics(U, lowres, highres, *text), up.upsampling_metrics(U, lowres, highres, *text)
    assert a == b and U.training                                     # eval inside (no random noise), mode restored
    assert abs(a["mae"] - a["mae_bicubic"]) < 0.02                   # untrained: about bicubic (small residual)
