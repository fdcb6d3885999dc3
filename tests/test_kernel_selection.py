"""Tests for 01_kernel_selection.py: each op against an independent, obviously correct version."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import double_backward, load

ks = load("01_kernel_selection")


# ---------------------------------------------------------------------------
# An independent StyleGAN2 modulated conv layer, written here from the StyleGAN2 paper's
# formulas with nothing taken from the module under test except the parameter tensors.

def stylegan2_layer_reference(layer, x, w, noise):
    """A StyleGAN2 modulated conv layer (Karras et al. 2020, Eq. 1-3), one sample at a time."""
    S = w.shape[1]
    A_weight = layer.affine_style.weight / math.sqrt(S)      # equalized LR: W / sqrt(fan_in)
    A_bias = layer.affine_style.bias                         # lr_mul = 1
    C_in, K = layer.in_channels, layer.kernel_size
    base = layer.weight[0] / math.sqrt(C_in * K * K)         # the single kernel, He-scaled
    outs = []
    for b in range(x.shape[0]):
        s = A_weight @ w[b] + A_bias                         # style per input channel
        wk = base * s[None, :, None, None]                   # modulate
        if layer.demodulate:
            norm = torch.sqrt((wk * wk).sum(dim=[1, 2, 3]) + 1e-8)
            wk = wk / norm[:, None, None, None]              # demodulate
        xb = x[b : b + 1]
        if layer.up == 2:  # bilinear 2x of x with zeros around it, conv, crop back to (2H, 2W)
            xb = F.interpolate(F.pad(xb, (1, 1, 1, 1)), scale_factor=2, mode="bilinear", align_corners=False)
            y = F.conv2d(xb, wk)[..., 2 - K // 2 : 2 - K // 2 + 2 * x.shape[2], 2 - K // 2 : 2 - K // 2 + 2 * x.shape[3]]
        else:
            y = F.conv2d(xb, wk, padding=K // 2)
        if layer.noise is not None:
            y = y + layer.noise.strength[None, :, None, None] * noise[b : b + 1]
        y = y + layer.bias[None, :, None, None]
        if layer.activation == "lrelu":
            y = F.leaky_relu(y, 0.2) * math.sqrt(2)
        outs.append(y)
    return torch.cat(outs)


def _randomise(layer):
    """Non-trivial values in every parameter that starts at a constant."""
    with torch.no_grad():
        layer.bias.normal_()
        if layer.affine_select is not None:
            layer.affine_select.bias.normal_()
        if layer.noise is not None:
            layer.noise.strength.normal_()
    return layer


# ---------------------------------------------------------------------------
# modulated_conv2d: fused == naive

@pytest.mark.parametrize("B,C_in,C_out,K,H", [(1, 3, 5, 3, 8), (3, 8, 4, 1, 6), (4, 6, 10, 5, 7)])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv2d_fused_equals_naive(B, C_in, C_out, K, H, per_sample, demodulate):
    x = torch.randn(B, C_in, H, H)
    shape = (B, C_out, C_in, K, K) if per_sample else (C_out, C_in, K, K)
    weight = torch.randn(shape)
    styles = torch.randn(B, C_in)
    a = ks.modulated_conv2d(x, weight, styles, demodulate=demodulate, fused=True)
    b = ks.modulated_conv2d(x, weight, styles, demodulate=demodulate, fused=False)
    assert a.shape == (B, C_out, H, H)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B,C_in,C_out,K,H", [(1, 3, 5, 3, 4), (3, 8, 4, 1, 5), (2, 6, 10, 5, 3)])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("demodulate", [True, False])
def test_upsampling_modulated_conv2d_fused_equals_naive(B, C_in, C_out, K, H, per_sample, demodulate):
    # fused: one transposed conv (matmul + fold) then the blur; naive: upsample2x, then conv
    x = torch.randn(B, C_in, H, H + 1)
    weight = torch.randn((B, C_out, C_in, K, K) if per_sample else (C_out, C_in, K, K))
    styles = torch.randn(B, C_in)
    a = ks.modulated_conv2d(x, weight, styles, demodulate=demodulate, fused=True, up=2)
    b = ks.modulated_conv2d(x, weight, styles, demodulate=demodulate, fused=False, up=2)
    assert a.shape == b.shape == (B, C_out, 2 * H, 2 * H + 2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_upsampling_conv_is_upsample_then_conv_away_from_the_border():
    # the swap conv(blur(zero_insert(x))) = blur(conv_transpose(x)) is exact; only the edge
    # differs from upsample2x's replicated border (x is zero outside the image instead)
    x, weight = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
    a = ks.modulated_conv2d(x, weight, torch.ones(2, 4), demodulate=False, up=2)
    b = F.conv2d(ks.upsample2x(x), weight, padding=1)         # the resize-conv written plainly
    torch.testing.assert_close(a[..., 2:-2, 2:-2], b[..., 2:-2, 2:-2], atol=1e-5, rtol=1e-5)
    assert (a - b).abs().amax() > 1e-3                       # and the border does differ


def test_kernel_energy_from_the_gram_matrix_equals_the_mixed_kernels_squares():
    for N, B in ((1, 4), (3, 4), (3, 16)):
        layer = _randomise(ks.AdaptiveConv2d(6, 7, 3, w_dim=8, n_kernels=N))
        w = torch.randn(B, 8)
        torch.testing.assert_close(layer.kernel_energy(w), layer.kernel(w).square().sum((-2, -1)),
                                   atol=1e-6, rtol=1e-5)


def test_modulated_conv2d_matches_plain_conv_with_unit_styles_no_demod():
    x, weight = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
    out = ks.modulated_conv2d(x, weight, torch.ones(2, 4), demodulate=False)
    torch.testing.assert_close(out, F.conv2d(x, weight, padding=1), atol=1e-5, rtol=1e-5)


def test_demodulation_gives_unit_norm_per_output_channel_per_sample():
    weight = torch.randn(4, 7, 6, 3, 3)                      # per-sample kernels
    styles = torch.rand(4, 6) * 5 + 0.1                      # arbitrary positive scales
    wmod = ks.modulate_weight(weight, styles, demodulate=True)
    assert wmod.shape == (4, 7, 6, 3, 3)
    norms = wmod.square().sum(dim=(2, 3, 4)).sqrt()          # (B, C_out)
    torch.testing.assert_close(norms, torch.ones(4, 7), atol=1e-5, rtol=0)
    # and through an AdaptiveConv2d: its kernel, modulated by its styles
    layer = _randomise(ks.AdaptiveConv2d(6, 7, 3, w_dim=8, n_kernels=3))
    w = torch.randn(4, 8)
    wmod = ks.modulate_weight(layer.kernel(w), layer.affine_style(w))
    torch.testing.assert_close(wmod.square().sum(dim=(2, 3, 4)), torch.ones(4, 7), atol=1e-5, rtol=0)


def test_demodulated_output_has_unit_std():
    x = torch.randn(8, 32, 16, 16)
    out = ks.modulated_conv2d(x, torch.randn(64, 32, 3, 3), torch.rand(8, 32) * 3)
    assert abs(out[..., 1:-1, 1:-1].std().item() - 1) < 0.05


# ---------------------------------------------------------------------------
# AdaptiveConv2d

@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("B,C_in,C_out,K,H,up", [(2, 4, 6, 3, 8, 1), (3, 5, 3, 1, 6, 1), (2, 6, 4, 3, 5, 2), (1, 3, 8, 5, 4, 2),
                                                  (16, 4, 6, 3, 5, 1), (17, 5, 4, 3, 4, 2)])  # B >= N^2: the bank's Gram and layout
def test_adaptive_conv_fused_equals_naive(N, B, C_in, C_out, K, H, up):
    layer = _randomise(ks.AdaptiveConv2d(C_in, C_out, K, w_dim=10, n_kernels=N, up=up))
    x, w = torch.randn(B, C_in, H, H), torch.randn(B, 10)
    noise = torch.randn(B, 1, H * up, H * up)
    a = layer(x, w, noise)                                   # default: layer.fused = True
    assert layer.fused is True
    b = layer(x, w, noise, fused=False)
    layer.fused = False
    c = layer(x, w, noise)                                   # the attribute switches it too
    assert a.shape == (B, C_out, H * up, H * up)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, c, atol=0, rtol=0)


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate,activation,noise", [(True, "lrelu", True), (False, None, False)])
def test_single_kernel_equals_independent_stylegan2(up, demodulate, activation, noise):
    layer = ks.AdaptiveConv2d(5, 7, 3, w_dim=12, n_kernels=1, demodulate=demodulate,
                              up=up, activation=activation, noise=noise)
    _randomise(layer)
    x, w = torch.randn(3, 5, 6, 6), torch.randn(3, 12)
    nz = torch.randn(3, 1, 6 * up, 6 * up)
    expected = stylegan2_layer_reference(layer, x, w, nz)
    for fused in (True, False):
        got = layer(x, w, nz if noise else None, fused=fused)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # and the selection itself is exactly one, the kernel exactly the stored one times c
    assert torch.equal(layer.selection_weights(w), torch.ones(3, 1))
    assert torch.equal(layer.kernel(w), layer.weight[0] * layer.weight_gain)  # one kernel for the batch


def test_selection_weights_softmax_and_depend_on_w():
    layer = _randomise(ks.AdaptiveConv2d(4, 4, 3, w_dim=16, n_kernels=5))
    w = torch.randn(6, 16)
    p = layer.selection_weights(w)
    assert p.shape == (6, 5)
    assert (p > 0).all()
    torch.testing.assert_close(p.sum(dim=1), torch.ones(6))
    assert (p[0] - p[1]).abs().max() > 1e-3                  # differs between samples
    # it is exactly softmax(W_filter^T w + b_filter) with equalized LR
    logits = w @ (layer.affine_select.weight / 4).T + layer.affine_select.bias  # sqrt(16) = 4
    torch.testing.assert_close(p, logits.softmax(dim=1))
    # the mixed kernel is the p-weighted sum of the bank, per sample
    k = layer.kernel(w)
    k2 = sum(p[3, i] * layer.weight[i] for i in range(5)) * layer.weight_gain
    torch.testing.assert_close(k[3], k2, atol=1e-6, rtol=1e-5)


def test_adaptive_conv_noise_is_random_unless_given_and_starts_off():
    layer = ks.AdaptiveConv2d(3, 4, 3, w_dim=8)
    x, w = torch.randn(2, 3, 5, 5), torch.randn(2, 8)
    torch.testing.assert_close(layer(x, w), layer(x, w))     # strength init 0: no effect yet
    with torch.no_grad():
        layer.noise.strength.fill_(1.0)
    assert not torch.allclose(layer(x, w), layer(x, w))      # fresh noise each call
    nz = torch.randn(1, 1, 5, 5)                             # batch-1 noise broadcasts
    torch.testing.assert_close(layer(x, w, nz), layer(x, w, nz.expand(2, 1, 5, 5)))
    with pytest.raises(AssertionError):
        layer(x, w, torch.randn(2, 1, 4, 4))                 # wrong noise size


def test_noise_injection_formula():
    inj = ks.NoiseInjection(3)
    with torch.no_grad():
        inj.strength.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x, n = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(inj(x, n), x + torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1) * n)
    scalar = ks.NoiseInjection()                             # StyleGAN2's single strength
    assert scalar.strength.shape == (1,) and scalar.strength.item() == 0


def test_bad_inputs_are_rejected():
    layer = ks.AdaptiveConv2d(4, 4, 3, w_dim=8)
    with pytest.raises(AssertionError):
        layer(torch.randn(2, 5, 6, 6), torch.randn(2, 8))    # wrong C_in
    with pytest.raises(AssertionError):
        layer(torch.randn(2, 4, 6, 6), torch.randn(3, 8))    # batch mismatch
    with pytest.raises(AssertionError):
        ks.modulated_conv2d(torch.randn(2, 4, 6, 6), torch.randn(3, 5, 4, 3, 3), torch.randn(2, 4))


# ---------------------------------------------------------------------------
# Double backward (R1 needs the gradient of a gradient norm)

def _double_backward(f, x, params):
    """R1's gradient of a gradient through f at x (conftest.double_backward): every param gets one."""
    x = x.clone().requires_grad_(True)
    assert double_backward([f(x)], [x], params) == len(params)


@pytest.mark.parametrize("fused", [True, False])
def test_double_backward_modulated_conv(fused):
    weight = torch.randn(5, 3, 3, 3, requires_grad=True)
    styles = torch.randn(2, 3, requires_grad=True)
    f = lambda x: F.leaky_relu(ks.modulated_conv2d(x, weight, styles, fused=fused), 0.2)
    _double_backward(f, torch.randn(2, 3, 6, 6), [weight, styles])


@pytest.mark.parametrize("up", [1, 2])
def test_double_backward_adaptive_conv(up):
    layer = _randomise(ks.AdaptiveConv2d(3, 4, 3, w_dim=6, n_kernels=3, up=up))
    w = torch.randn(2, 6)
    nz = torch.randn(2, 1, 5 * up, 5 * up)
    _double_backward(lambda x: layer(x, w, nz), torch.randn(2, 3, 5, 5), list(layer.parameters()))


def test_double_backward_resampling():
    conv = ks.EqualConv2d(3, 2, 3, activation="lrelu")
    f = lambda x: conv(ks.downsample2x(ks.upsample2x(x)) * x)
    _double_backward(f, torch.randn(2, 3, 4, 4), list(conv.parameters()))


# ---------------------------------------------------------------------------
# Equalized learning rate

def test_equal_linear_gain_and_init():
    lin = ks.EqualLinear(512, 1024)
    assert lin.weight_gain == pytest.approx(1 / math.sqrt(512))
    assert abs(lin.weight.std().item() - 1) < 0.01            # stored weights are unit normal
    assert (lin.bias == 0).all()
    x = torch.randn(3, 512)
    torch.testing.assert_close(lin(x), x @ (lin.weight / math.sqrt(512)).T + lin.bias)


def test_equal_linear_lr_mul_and_bias_init():
    lin = ks.EqualLinear(256, 512, bias_init=1.0, lr_mul=0.01, activation="lrelu")
    assert lin.weight_gain == pytest.approx(0.01 / math.sqrt(256))
    # stored W ~ N(0, 1/lr_mul^2): effective weight (lr_mul * W) / sqrt(fan_in) is He-scaled
    assert abs((lin.weight * 0.01).std().item() - 1) < 0.01
    torch.testing.assert_close(lin.bias * 0.01, torch.ones(512))  # effective bias starts at bias_init
    x = torch.randn(3, 256)
    ref = x @ (lin.weight * 0.01 / 16).T + lin.bias * 0.01
    torch.testing.assert_close(lin(x), F.leaky_relu(ref, 0.2) * math.sqrt(2))


def test_equal_conv_gain_and_init():
    conv = ks.EqualConv2d(64, 128, 3, stride=2)
    assert conv.weight_gain == pytest.approx(1 / math.sqrt(64 * 9))
    assert abs(conv.weight.std().item() - 1) < 0.02
    x = torch.randn(2, 64, 8, 8)
    ref = F.conv2d(x, conv.weight / math.sqrt(64 * 9), conv.bias, stride=2, padding=1)
    out = conv(x)
    assert out.shape == (2, 128, 4, 4)
    torch.testing.assert_close(out, ref)


def test_adaptive_conv_bank_is_equalized():
    layer = ks.AdaptiveConv2d(64, 64, 3, w_dim=32, n_kernels=4)
    assert layer.weight.shape == (4, 64, 64, 3, 3)
    assert layer.weight_gain == pytest.approx(1 / math.sqrt(64 * 9))
    assert abs(layer.weight.std().item() - 1) < 0.02
    torch.testing.assert_close(layer.affine_style.bias * layer.affine_style.lr_mul, torch.ones(64))


def test_lrelu_gain():
    x = torch.tensor([-1.0, 2.0])
    torch.testing.assert_close(ks.lrelu_gain(x), torch.tensor([-0.2, 2.0]) * math.sqrt(2))


# ---------------------------------------------------------------------------
# Up / down sampling with the fixed blur

def test_resampling_shapes_and_constants():
    c = torch.full((2, 5, 6, 8), -0.3)
    up, down = ks.upsample2x(c), ks.downsample2x(c)
    assert up.shape == (2, 5, 12, 16) and down.shape == (2, 5, 3, 4)
    torch.testing.assert_close(up, torch.full_like(up, -0.3))
    torch.testing.assert_close(down, torch.full_like(down, -0.3))
    assert ks.downsample2x(torch.randn(1, 3, 2, 2)).shape == (1, 3, 1, 1)  # smallest case works
    m_up, m_down = ks.Upsample2x(), ks.Downsample2x()
    x = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(m_up(x), ks.upsample2x(x))
    torch.testing.assert_close(m_down(x), ks.downsample2x(x))
    assert "f" in dict(m_up.named_buffers()) and len(m_up.state_dict()) == 0  # buffer, not stored


def test_upsample_is_bilinear():
    x = torch.randn(2, 3, 5, 7)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(ks.upsample2x(x), ref, atol=1e-6, rtol=1e-5)


def test_downsample_is_anti_aliased_blur():
    # a one-pixel checkerboard is the highest frequency; plain subsampling would return a
    # constant 1, the anti-aliased downsample returns its mean 0.5 everywhere
    i = torch.arange(8)
    board = ((i[:, None] + i[None, :]) % 2).float().view(1, 1, 8, 8)
    assert (board[..., ::2, ::2] == 0).all()
    torch.testing.assert_close(ks.downsample2x(board), torch.full((1, 1, 4, 4), 0.5))
    # interior pixels: the explicit formula, sum of [1,3,3,1] x [1,3,3,1] / 64 over a 4x4 window
    x = torch.randn(1, 1, 8, 8)
    f = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    y = ks.downsample2x(x)
    j = 1                                                    # output (1, 2) reads input rows 1..4, cols 3..6
    window = x[0, 0, 2 * j - 1 : 2 * j + 3, 3:7]
    torch.testing.assert_close(y[0, 0, 1, 2], (f[:, None] * f[None, :] * window).sum())


def test_resampling_handles_low_precision():
    x = torch.randn(1, 2, 4, 4, dtype=torch.bfloat16)
    assert ks.upsample2x(x).dtype == torch.bfloat16
    assert ks.Downsample2x()(x).dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_resampling_functions_follow_the_input_to_the_gpu():
    """The functional forms build their default filter on x's device (train.py's real pyramid,
    the D blocks and the upsampler call them without a filter buffer)."""
    x = torch.randn(1, 2, 8, 8)
    for op in (ks.upsample2x, ks.downsample2x):
        torch.testing.assert_close(op(x.cuda()).cpu(), op(x))


# ---------------------------------------------------------------------------

def test_demo_runs():
    ks.demo()


@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (4, 6, 5, 3, 3), (2, 4, 6, 5, 1, 1), (3, 2, 5, 5)])
def test_transposed_rows_are_the_flipped_kernels_laid_out_as_rows(shape):
    """Its one-copy form equals the literal one: each kernel flipped on both axes, then
    (C_out, K, K, C_in) -> rows; exactly, and so are the gradients."""
    w = torch.randn(shape, requires_grad=True)
    *lead, C_out, C_in, K, _ = shape
    literal = w.flip(-2, -1).movedim(-3, -1).reshape(*lead, C_out * K * K, C_in)
    for b in range(C_out):                                   # row (o, k, l) holds w[o, :, K-1-k, K-1-l]
        assert torch.equal(literal[..., b * K * K, :], w[..., b, :, K - 1, K - 1])
    with torch.no_grad():                                    # the single-copy form
        rows = ks.transposed_rows(w)
    assert rows.is_contiguous() and torch.equal(rows, literal)
    rows = ks.transposed_rows(w)                             # the form with autograd
    assert rows.is_contiguous() and torch.equal(rows, literal)
    g = torch.randn(rows.shape)
    assert torch.equal(torch.autograd.grad(rows, w, g)[0], torch.autograd.grad(literal, w, g)[0])
