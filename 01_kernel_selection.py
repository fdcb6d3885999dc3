"""
01 - Sample-adaptive kernel selection (GigaGAN Sec. 3.1, Eq. 1-2), built on StyleGAN2's
modulated convolution.

What. The convolution layer of GigaGAN's generator. Each layer owns a bank of N kernels
{K_1 .. K_N}; every sample mixes its own kernel from the bank, with weights read off its
style vector w (Eq. 1):

    K = sum_i K_i * softmax(W_filter^T w + b_filter)_i

and then modulates and demodulates that kernel with a second affine of w (Eq. 2), exactly as
StyleGAN2 does (Karras et al. 2020, Sec. 2.2):

    s = A(w)                                    one scale per input channel, init 1
    w'_oikl  = s_i * K_oikl                     modulation
    w''_oikl = w'_oikl / sqrt(sum_ikl w'_oikl^2 + eps)   demodulation

Why. A StyleGAN2 layer has one kernel for every sample, so the style can only rescale its
input channels. Open-world text-to-image needs more capacity, but wider convs are too
costly, since the same operation is repeated at every pixel. The bank multiplies the conv
parameters by N at almost no compute: the mixture is formed once per sample, before the
convolution (B*N*C_out*C_in*K*K multiply-adds, versus B*H*W*C_out*C_in*K*K for the conv),
and the convolution itself costs the same as StyleGAN2's. Different prompts can then use
different filters. With N = 1 the
softmax of a single logit is exactly 1, and the layer IS StyleGAN2's modulated conv.

Also here, because everything later builds on them: equalized-learning-rate layers, noise
injection, and 2x up/down sampling with a fixed [1, 3, 3, 1] blur (the generator, the
discriminator and the real-image pyramid all use them).

A modulated conv can be run two ways (a naive reference first, a faster path tested equal to it):
    naive  loop over the batch, one F.conv2d per sample with its own kernel (obviously right)
    fused  modulate the activations instead of the kernel (s * x, then d * conv): one batched
           F.conv2d for a shared kernel (N = 1), or the batch folded into conv groups
           (groups=B) for per-sample mixed kernels (fast; the default); a 2x-upsampling
           layer as a transposed conv, which skips the zeros the upsampling inserts
Training runs the fused path only (AdaptiveConv2d.fused is True): _modulated_conv2d_fused, or
upsample_modulated_conv2d for up=2, each scaling its output by demodulation(). The naive path
is the reference that tests/test_kernel_selection.py holds the fused one to.

Run:  python 01_kernel_selection.py      (a CPU demo, about a second)

Shape legend (shared by every numbered file):
    B batch, C channels, H W height width, N kernels in a bank, S style (w) width,
    L text tokens, D text width, E embedding width, K kernel size.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Equalized learning rate (Karras et al. 2018, used by StyleGAN2 and GigaGAN)
#
# Weights are stored as N(0, 1) samples and multiplied by c = lr_mul / sqrt(fan_in) at
# run time, every forward pass. Adam's update size is roughly independent of a weight's
# scale, so storing unit-scale weights makes every layer learn at the same speed; the
# runtime constant c restores the He-init output scale.

def lrelu_gain(x, slope=0.2, gain=math.sqrt(2)):
    """Leaky ReLU times sqrt(2): keeps unit variance through the nonlinearity (He et al.)."""
    return F.leaky_relu(x, slope) * gain


class EqualLinear(nn.Module):
    """y = (x @ (c * W)^T + lr_mul * b), W ~ N(0, 1/lr_mul^2), c = lr_mul / sqrt(in_features)."""

    def __init__(
        self,
        in_features,      # width of the input
        out_features,     # width of the output
        bias=True,        # learned bias (stored / lr_mul, applied * lr_mul)
        bias_init=0.0,    # initial value of the effective bias (1.0 for style affines)
        lr_mul=1.0,       # learning-rate multiplier (0.01 in the mapping network)
        activation=None,  # None or "lrelu" (leaky ReLU with gain sqrt(2))
    ):
        super().__init__()
        assert activation in (None, "lrelu"), activation
        # stored W ~ N(0, 1/lr_mul^2): after the runtime c the effective weight is He-scaled
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        # stored b = bias_init / lr_mul, so the effective lr_mul * b starts at bias_init
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)  # the runtime scale c
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x):                                    # (..., in_features)
        w = self.weight * self.weight_gain                   # effective weight c * W
        b = self.bias * self.lr_mul if self.bias is not None else None  # effective bias
        x = F.linear(x, w, b)                                # (..., out_features)
        return lrelu_gain(x) if self.activation == "lrelu" else x

    def extra_repr(self):
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, lr_mul={self.lr_mul}, act={self.activation}"


class EqualConv2d(nn.Module):
    """Plain (unmodulated) conv with equalized LR: c = 1 / sqrt(C_in * K * K)."""

    def __init__(
        self,
        in_channels,      # C_in
        out_channels,     # C_out
        kernel_size,      # K (square kernels; padding K // 2 keeps H, W)
        bias=True,        # learned bias
        stride=1,         # 2 halves H and W (used by the discriminator)
        activation=None,  # None or "lrelu"
    ):
        super().__init__()
        assert activation in (None, "lrelu"), activation
        # stored unit normal; the runtime gain below gives the He scale 1 / sqrt(fan_in)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)  # fan_in = C_in * K * K
        self.stride, self.padding = stride, kernel_size // 2
        self.activation = activation

    def forward(self, x):                                    # (B, C_in, H, W)
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, self.stride, self.padding)
        return lrelu_gain(x) if self.activation == "lrelu" else x  # (B, C_out, H/stride, W/stride)


# -----------------------------------------------------------------------------
# 2x resampling with a fixed [1, 3, 3, 1] binomial blur (StyleGAN2's resample filter)
#
# Halving a grid without a low-pass filter aliases: plain subsampling x[..., ::2, ::2] turns
# a one-pixel checkerboard into a flat wrong colour. The binomial [1, 3, 3, 1] / 8 is a
# cheap approximation of a Gaussian; its 2D version is the outer product with itself. It is
# fixed (a buffer, never trained) and applied per channel (depthwise conv, groups=C).
# Both functions are linear and built from conv ops, so they support double backward (R1).

def blur_filter(device=None, dtype=None):
    """The 4x4 blur outer([1,3,3,1], [1,3,3,1]) / 64; its taps sum to 1."""
    f = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device, dtype=dtype)  # (4,) binomial row
    f = torch.outer(f, f)                                    # (4, 4) separable 2D filter
    return f / f.sum()                                       # unit DC gain: constants pass unchanged


def upsample2x(x, f=None):
    """(B, C, H, W) -> (B, C, 2H, 2W): zero insertion, then the blur times 4.

    With edge replication this is exactly bilinear interpolation (align_corners=False):
    each new pixel is 3/4 of its nearest old pixel plus 1/4 of the next one, per axis.
    """
    B, C, H, W = x.shape
    f = blur_filter(x.device) if f is None else f            # (4, 4) on x's device (CPU or GPU)
    # only 1 of 4 output pixels receives an input sample, so the taps used per output pixel
    # sum to 1/4: the gain 4 keeps a constant image constant
    k = (f.to(x.dtype) * 4).repeat(C, 1, 1, 1)               # (C, 1, 4, 4) one filter per channel
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")             # (B, C, H+2, W+2) repeat the edges
    # transposed conv = zero insertion + filtering; padding 3 crops the replicated border
    x = F.conv_transpose2d(x, k, stride=2, padding=3, groups=C)  # (B, C, 2H, 2W)
    return x


def downsample2x(x, f=None):
    """(B, C, H, W) -> (B, C, H/2, W/2): blur, then keep every second pixel (anti-aliased).

    Output pixel j averages input pixels 2j-1 .. 2j+2 with weights 1, 3, 3, 1 (per axis),
    centred between 2j and 2j+1, so the half-size grid is aligned like average pooling.
    """
    B, C, H, W = x.shape
    assert H % 2 == 0 and W % 2 == 0, f"downsample2x needs even sizes, got {(H, W)}"
    f = blur_filter(x.device) if f is None else f            # (4, 4) on x's device (CPU or GPU)
    k = f.to(x.dtype).repeat(C, 1, 1, 1)                     # (C, 1, 4, 4) one filter per channel
    # reflected edges (this project's choice): a one-pixel checkerboard averages to its mean
    # right up to the border, and a constant image stays constant (no dark frame)
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")               # (B, C, H+2, W+2)
    x = F.conv2d(x, k, stride=2, groups=C)                   # (B, C, H/2, W/2)
    return x


class Upsample2x(nn.Module):
    """upsample2x as a module, holding the blur filter as a buffer (moves with .to(device))."""

    def __init__(self):
        super().__init__()
        self.register_buffer("f", blur_filter(), persistent=False)  # (4, 4) fixed, not in checkpoints

    def forward(self, x):                                    # (B, C, H, W)
        return upsample2x(x, self.f)                         # (B, C, 2H, 2W)


class Downsample2x(nn.Module):
    """downsample2x as a module, holding the blur filter as a buffer (moves with .to(device))."""

    def __init__(self):
        super().__init__()
        self.register_buffer("f", blur_filter(), persistent=False)  # (4, 4) fixed, not in checkpoints

    def forward(self, x):                                    # (B, C, H, W)
        return downsample2x(x, self.f)                       # (B, C, H/2, W/2)


# -----------------------------------------------------------------------------
# Noise injection (StyleGAN): per-pixel randomness for stochastic detail (hair, texture)

class NoiseInjection(nn.Module):
    """x + strength_c * n, with n ~ N(0, 1) per pixel, one noise image shared by all channels."""

    def __init__(
        self,
        channels=1,  # C for a per-channel strength; 1 gives StyleGAN2's single scalar
    ):
        super().__init__()
        # init 0: a new layer starts noise-free and learns how much randomness helps
        self.strength = nn.Parameter(torch.zeros(channels))  # (C,) or (1,)

    def forward(self, x, noise=None):
        """x (B, C, H, W); noise (B or 1, 1, H, W), or None to draw fresh N(0, 1) noise.

        Pass `noise` explicitly for deterministic outputs (tests, fixed-noise sampling).
        """
        B, C, H, W = x.shape
        if noise is None:
            noise = torch.randn(B, 1, H, W, device=x.device, dtype=x.dtype)  # (B, 1, H, W)
        assert noise.dim() == 4 and noise.shape[0] in (1, B) and noise.shape[1:] == (1, H, W), noise.shape
        return x + self.strength.view(1, -1, 1, 1) * noise  # (B, C, H, W) broadcast over channels


# -----------------------------------------------------------------------------
# StyleGAN2 modulated convolution: naive (per-sample loop) and fused (activation modulation)

def modulate_weight(weight, styles, demodulate=True, eps=1e-8):
    """Per-sample kernels of a modulated conv, batched.

    weight (C_out, C_in, K, K) shared, or (B, C_out, C_in, K, K) one per sample;
    styles (B, C_in). Returns (B, C_out, C_in, K, K); with demodulate=True every
    output channel's kernel has unit L2 norm (up to eps), for every sample.
    """
    B, C_in = styles.shape
    if weight.dim() == 4:
        weight = weight.unsqueeze(0)                         # (1, C_out, C_in, K, K) shared by the batch
    w = weight * styles.view(B, 1, C_in, 1, 1)               # (B, C_out, C_in, K, K)  w'_oikl = s_i * w_oikl
    if demodulate:
        # d_o = 1 / sqrt(sum_ikl w'_oikl^2 + eps): for unit-variance, independent inputs the
        # output variance is sum_ikl w'^2, so dividing by its root restores unit variance
        d = (w.square().sum(dim=(2, 3, 4), keepdim=True) + eps).rsqrt()  # (B, C_out, 1, 1, 1)
        w = w * d                                            # w''_oikl = d_o * w'_oikl
    return w


def _modulated_conv2d_naive(x, weight, styles, demodulate, padding, eps):
    """Reference: one ordinary conv per sample, the formulas written out directly. Training
    never runs it (AdaptiveConv2d.fused is True); the tests hold the fused path to it."""
    outs = []
    for b in range(x.shape[0]):
        wb = weight[b] if weight.dim() == 5 else weight      # (C_out, C_in, K, K) this sample's kernel
        wb = wb * styles[b].view(1, -1, 1, 1)                # w'_oikl = s_i * w_oikl
        if demodulate:
            # w''_oikl = w'_oikl / sqrt(sum_ikl w'_oikl^2 + eps)
            wb = wb / torch.sqrt((wb ** 2).sum(dim=(1, 2, 3), keepdim=True) + eps)
        outs.append(F.conv2d(x[b : b + 1], wb, padding=padding))  # (1, C_out, H', W')
    return torch.cat(outs)                                   # (B, C_out, H', W')


def _modulated_conv2d_fused(x, weight, styles, demodulate, padding, eps, energy=None):
    """Fast path, the same function with the modulation moved onto the activations
    (StyleGAN2's own observation, its Sec. 2.2): conv(x, s * w) = conv(s * x, w) per input
    channel, and the demodulation d_o is a scale of output channel o, so

        out = d * conv(s * x, w),   d_o = 1 / sqrt(sum_i s_i^2 * sum_kl w_oikl^2 + eps)

    No per-sample copy of the kernel is modulated, squared and rescaled (three passes over
    B * C_out * C_in * K * K numbers, the larger part of a step at 256 channels on a CPU):
    a shared kernel runs as one ordinary batched conv; per-sample kernels (a kernel bank
    mixed per sample) as one grouped conv, the batch becoming conv groups.
    """
    B, C_in, H, W = x.shape
    x = x * styles.view(B, C_in, 1, 1)                       # (B, C_in, H, W)  s_i on input channel i
    if weight.dim() == 4:
        out = F.conv2d(x, weight, padding=padding)           # (B, C_out, H', W') one kernel for all
    else:
        C_out, K = weight.shape[1], weight.shape[-1]
        x = x.reshape(1, B * C_in, H, W)                     # (1, B*C_in, H, W) sample b = channel group b
        w = weight.reshape(B * C_out, C_in, K, K)            # (B*C_out, C_in, K, K) group b = sample b's kernel
        # groups=B: output group b only sees input group b, i.e. sample b with its own kernel
        out = F.conv2d(x, w, padding=padding, groups=B)      # (1, B*C_out, H', W')
        out = out.reshape(B, C_out, *out.shape[2:])          # (B, C_out, H', W')
    if demodulate:
        if energy is None:
            energy = weight.square().sum(dim=(-2, -1))       # (C_out, C_in) or (B, C_out, C_in): sum_kl w^2
        out = out * demodulation(energy, styles, eps).view(B, -1, 1, 1)  # (B, C_out, H', W')
    return out


def demodulation(energy, styles, eps=1e-8):
    """The demodulation of the fused path, the one training runs (both its convs, up=1 and up=2,
    scale their output by it): d_o = 1 / sqrt(sum_ikl w'_oikl^2 + eps) of Eq. 2, with
    w'_oikl = s_i * w_oikl, so sum_ikl w'_oikl^2 = sum_i s_i^2 * energy_oi, where
    energy_oi = sum_kl w_oikl^2 of the unmodulated kernel: no modulated kernel is formed.

    energy (C_out, C_in) shared or (B, C_out, C_in); styles (B, C_in) -> (B, C_out).
    """
    # EXERCISE: the demodulation d_o = 1 / sqrt(sum_i s_i^2 * energy_oi + eps), per sample (Eq. 2)
    ### BEGIN SOLUTION
    sq = energy * styles.square().unsqueeze(1)               # (B, C_out, C_in) s_i^2 * sum_kl w_oikl^2
    return (sq.sum(-1) + eps).rsqrt()                        # (B, C_out) d_o
    ### END SOLUTION


def modulated_conv2d(x, weight, styles, demodulate=True, padding=None, fused=True, eps=1e-8, up=1, energy=None):
    """StyleGAN2's modulated (and demodulated) convolution, stride 1, of x or (up=2) of its
    2x upsampling (see upsample_modulated_conv2d below).

    x (B, C_in, H, W); weight (C_out, C_in, K, K) shared or (B, C_out, C_in, K, K) per
    sample; styles (B, C_in); padding defaults to K // 2 (same size for odd K; up=1 only).
    fused=True runs the activation-modulation form (one batched or grouped conv),
    fused=False the per-sample reference loop. energy: sum_kl weight^2, (C_out, C_in) or
    (B, C_out, C_in), when the caller has it more cheaply (AdaptiveConv2d does).
    Returns (B, C_out, H*up, W*up) (H', W' with another padding).
    """
    B, C_in, H, W = x.shape
    assert styles.shape == (B, C_in), (styles.shape, x.shape)
    assert weight.dim() in (4, 5), weight.shape
    assert weight.dim() == 4 or weight.shape[0] == B, (weight.shape, B)
    assert weight.shape[-3] == C_in, (weight.shape, C_in)
    assert up in (1, 2), up
    if up == 2:
        assert padding is None, "up=2 always gives (2H, 2W)"
        if fused:
            out = upsample_modulated_conv2d(x, transposed_rows(weight), styles, weight.shape[-1],
                                            demodulate, eps, energy)
        else:
            out = _upsample_modulated_conv2d_naive(x, weight, styles, demodulate, eps)
    else:
        padding = weight.shape[-1] // 2 if padding is None else padding
        if fused:
            out = _modulated_conv2d_fused(x, weight, styles, demodulate, padding, eps, energy)
        else:
            out = _modulated_conv2d_naive(x, weight, styles, demodulate, padding, eps)
    assert out.shape[:2] == (B, weight.shape[-4]), out.shape
    return out


# -----------------------------------------------------------------------------
# 2x upsampling + modulated conv in one op: a transposed conv (a quarter of the work)
#
# An up=2 layer convolves the 2x upsampling of its input. upsample2x is "insert a zero after
# every sample, then blur with [1, 3, 3, 1] x 4", so 3 of every 4 pixels the conv reads are
# inserted zeros. The blur and the conv are both linear filters on the fine grid, so their
# order can be swapped:
#
#     conv(blur(zero_insert(x))) = blur(conv(zero_insert(x))) = blur(conv_transpose2d(x, stride 2))
#
# and a stride-2 transposed conv never multiplies the inserted zeros: every input pixel
# scatters its C_out x K x K patch (one matmul per sample), the overlapping patches are
# summed (F.fold). A quarter of the multiply-adds of "upsample, then conv" (StyleGAN2
# upsamples inside its convs the same way). x counts as zero outside the image
# [U: upsample2x on its own replicates its edges; the swap needs one linear filter chain].
# _upsample_modulated_conv2d_naive is the literal "zero-pad, upsample, then conv" reference.

def transposed_rows(weight):
    """(..., C_out, C_in, K, K) -> (..., C_out*K*K, C_in): each kernel flipped (a transposed
    conv scatters with the flipped kernel what the conv gathers) and laid out as the rows of
    the matrix that maps one input pixel's C_in values to its output patch."""
    *lead, C_out, C_in, K, _ = weight.shape
    if torch.is_grad_enabled() and weight.requires_grad:  # training: flip's backward is the cheaper one
        rows = weight.permute(*range(len(lead)), -4, -2, -1, -3).flip(-3, -2)  # (..., C_out, K, K, C_in)
        return rows.reshape(*lead, C_out * K * K, C_in)      # (..., C_out*K*K, C_in), a second copy
    # Without autograd (sampling, the D step's fakes): flipping both kernel axes reverses the raster
    # order of the K*K taps, so one index_select flips and lays out in a single copy (a third faster)
    reverse = torch.arange(K * K - 1, -1, -1, device=weight.device)  # (K*K,) taps in reverse raster order
    taps = weight.reshape(-1, C_in, K * K).transpose(1, 2)               # (n, K*K, C_in), n = prod(lead) * C_out
    return taps.index_select(1, reverse).view(*lead, C_out * K * K, C_in)  # (..., C_out*K*K, C_in)


def upsample_modulated_conv2d(x, rows, styles, kernel_size, demodulate=True, eps=1e-8, energy=None):
    """Modulated conv of the 2x upsampling of x, as blur(conv_transpose2d(s * x)) * d.

    x (B, C_in, H, W); rows (C_out*K*K, C_in) shared or (B, C_out*K*K, C_in) per sample
    (transposed_rows of the kernel); styles (B, C_in); energy sum_kl w^2 as in
    modulated_conv2d (needed with demodulate; computed from rows when None).
    Returns (B, C_out, 2H, 2W).
    """
    B, C_in, H, W = x.shape
    K = kernel_size
    C_out = rows.shape[-2] // (K * K)
    x = x * styles.view(B, C_in, 1, 1)                       # (B, C_in, H, W)  s_i on input channel i
    patches = torch.matmul(rows, x.reshape(B, C_in, H * W))   # (B, C_out*K*K, H*W) one output patch per input pixel
    # patches placed 2 px apart and summed where they overlap = conv_transpose2d, stride 2
    out = F.fold(patches, (2 * H + K - 2, 2 * W + K - 2), K, stride=2)  # (B, C_out, 2H+K-2, 2W+K-2)
    # the blur of upsample2x, zeros outside; pad (5 - K) // 2 (negative crops) -> (2H, 2W)
    p = (5 - K) // 2
    f = (blur_filter(x.device, out.dtype) * 4).expand(C_out, 1, 4, 4)  # (C_out, 1, 4, 4) gain 4 as in upsample2x
    out = F.conv2d(F.pad(out, (p, p, p, p)), f, groups=C_out)  # (B, C_out, 2H, 2W)
    if demodulate:
        if energy is None:
            energy = rows.unflatten(-2, (C_out, K * K)).square().sum(-2)  # (C_out, C_in) or (B, C_out, C_in)
        out = out * demodulation(energy, styles, eps).view(B, C_out, 1, 1)
    return out


def _upsample_modulated_conv2d_naive(x, weight, styles, demodulate, eps):
    """Reference for up=2: zero-pad x by m, upsample2x (bilinear), conv without padding, crop
    the (2H, 2W) that the image covers."""
    K = weight.shape[-1]
    m = K // 4 + 1                                           # enough zeros for the conv's reach
    u = upsample2x(F.pad(x, (m, m, m, m)))                   # (B, C_in, 2H+4m, 2W+4m) zeros outside x
    out = _modulated_conv2d_naive(u, weight, styles, demodulate, 0, eps)  # (B, C_out, 2H+4m-K+1, ...)
    c = 2 * m - K // 2                                       # where the image's first output pixel is
    return out[..., c : c + 2 * x.shape[2], c : c + 2 * x.shape[3]]


# -----------------------------------------------------------------------------
# The sample-adaptive kernel bank (GigaGAN Eq. 1-2)

class AdaptiveConv2d(nn.Module):
    """GigaGAN's conv layer: a per-sample mixture of N kernels, modulated by w.

    forward(x (B, C_in, H, W), w (B, S), noise=None) -> (B, C_out, H*up, W*up):
        K   = sum_i softmax(W_filter^T w + b_filter)_i * K_i     (Eq. 1)     per sample
        y   = modconv(upsample(x) if up == 2 else x, K, s = A(w))           StyleGAN2
              (up == 2 runs as one transposed conv, upsample_modulated_conv2d)
        out = act(y + strength * noise + bias)
    With n_kernels=1 this is exactly a StyleGAN2 modulated conv layer. With
    demodulate=False, kernel_size=1, activation=None, noise=False it is a ToRGB layer.
    """

    def __init__(
        self,
        in_channels,         # C_in
        out_channels,        # C_out
        kernel_size,         # K, odd; padding K // 2 keeps H, W
        w_dim,               # S, width of the style vector w
        n_kernels=1,         # N, kernels in the bank (1 = StyleGAN2); per-resolution N is ours (paper: open)
        demodulate=True,     # normalise each output channel's kernel (off for ToRGB)
        up=1,                # 1, or 2 to double H and W before the conv
        activation="lrelu",  # "lrelu" (with gain sqrt(2)) or None
        noise=True,          # add a NoiseInjection after the conv
    ):
        super().__init__()
        assert kernel_size % 2 == 1, "odd kernel sizes only (same padding)"
        assert up in (1, 2), up
        assert activation in (None, "lrelu"), activation
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.w_dim, self.n_kernels = kernel_size, w_dim, n_kernels
        self.demodulate, self.up, self.activation = demodulate, up, activation
        # the bank {K_i}, stored unit normal (equalized LR); one parameter, no Python list
        self.weight = nn.Parameter(torch.randn(n_kernels, out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)  # runtime He scale c = 1/sqrt(fan_in)
        # W_filter, b_filter of Eq. 1: w -> N selection logits (bias init 0: uniform on average);
        # none for N = 1, whose selection is the constant 1 (a StyleGAN2 layer)
        self.affine_select = EqualLinear(w_dim, n_kernels) if n_kernels > 1 else None
        # StyleGAN2's affine A: w -> styles s, one per input channel; bias init 1 so s ~ 1 at start
        self.affine_style = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.bias = nn.Parameter(torch.zeros(out_channels))  # (C_out,) added after the conv and noise
        self.noise = NoiseInjection(out_channels) if noise else None  # per-channel strength (project's choice)
        # up=2: the conv of the bilinear 2x upsampling of x (zeros around x); the fused path runs
        # it as StyleGAN2 does, a stride-2 transposed conv and then the blur (4x fewer
        # multiply-adds), the naive path literally (upsample, then conv). See above.
        self.fused = True  # activation-modulation fast path; False runs the per-sample reference loop

    def selection_weights(self, w):
        """softmax(W_filter^T w + b_filter): how much of each kernel each sample uses. (B, N)"""
        assert w.shape[1:] == (self.w_dim,), w.shape
        if self.affine_select is None:                       # N = 1: softmax of one logit
            return w.new_ones(w.shape[0], 1)                 # (B, 1)
        # EXERCISE: selection weights softmax(W_filter^T w + b_filter) over the N kernels (Eq. 1)
        ### BEGIN SOLUTION
        logits = self.affine_select(w)                       # (B, N)
        return logits.softmax(dim=1)                         # (B, N), rows sum to 1
        ### END SOLUTION

    def kernel(self, w):
        """Each sample's mixed kernel K = c * sum_i p_i K_i, before modulation: (B, C_out, C_in, K, K),
        or the one shared (C_out, C_in, K, K) when N = 1."""
        return self._mix(w, self.weight)

    def _mix(self, w, bank):
        """c * sum_n p_bn * bank_n for a bank (N, ...) stored in any layout -> (B, ...), or
        (...) shared when N = 1."""
        if self.n_kernels == 1:                              # softmax of one logit is 1: StyleGAN2's
            return bank[0] * self.weight_gain                # shared by the batch
        # the equalized-LR scale c goes onto the (B, N) weights, not onto the B kernels after mixing:
        # the same numbers, one pass less over B * C_out * C_in * K * K (10% of G's op time at 256 ch)
        # EXERCISE: per-sample kernels K_b = sum_n (c * p_bn) * bank_n (Eq. 1), one matmul for the batch
        ### BEGIN SOLUTION
        p = self.selection_weights(w) * self.weight_gain    # (B, N) c * p_bn
        return (p @ bank.flatten(1)).view(-1, *bank.shape[1:])  # (B, N) @ (N, rest) -> (B, ...)
        ### END SOLUTION

    def kernel_energy(self, w):
        """sum_kl K_oikl^2 of each sample's mixed kernel, for the demodulation, without forming
        the B squared kernels: with G_nm = sum_kl K_n K_m (the bank's Gram matrix, N x N per
        (o, i), shared by the batch), sum_kl (sum_n p_n K_n)^2 = sum_nm p_n p_m G_nm.
        -> (B, C_out, C_in), or (C_out, C_in) shared when N = 1."""
        bank = self.weight.flatten(-2)                       # (N, C_out, C_in, K*K)
        if self.n_kernels == 1:
            return bank[0].square().sum(-1) * self.weight_gain ** 2  # (C_out, C_in)
        gram = torch.einsum("noik,moik->nmoi", bank, bank)   # (N, N, C_out, C_in)
        p = self.selection_weights(w) * self.weight_gain    # (B, N)
        pp = (p[:, :, None] * p[:, None, :]).flatten(1)      # (B, N*N) p_n * p_m
        return (pp @ gram.flatten(2).flatten(0, 1)).view(-1, *gram.shape[2:])  # (B, C_out, C_in)

    def forward(self, x, w, noise=None, fused=None):
        """x (B, C_in, H, W), w (B, S), noise (B or 1, 1, H*up, W*up) or None -> (B, C_out, H*up, W*up).

        fused=None uses self.fused.
        """
        B, C, H, W = x.shape
        assert C == self.in_channels, (x.shape, self.in_channels)
        assert w.shape == (B, self.w_dim), (w.shape, B, self.w_dim)
        assert noise is None or self.noise is not None, "this layer was built with noise=False"
        fused = self.fused if fused is None else fused
        styles = self.affine_style(w)                        # (B, C_in) s = A(w)
        if not fused:                                        # reference: the mixed kernel, conv per sample
            x = modulated_conv2d(x, self.kernel(w), styles, self.demodulate, fused=False, up=self.up)
        else:
            # Few samples (B < N^2): squaring and re-laying out the B mixed kernels is less work
            # than the bank's Gram matrix and re-laying out the N bank kernels; many: the reverse.
            few = B < self.n_kernels ** 2
            kernel = self.kernel(w) if few or self.up == 1 else None  # (B, C_out, C_in, K, K) or shared
            energy = None                                    # (B, C_out, C_in) or shared
            if self.demodulate:
                energy = kernel.square().sum((-2, -1)) if few else self.kernel_energy(w)
            if self.up == 2:                                 # the kernel as (C_out*K*K, C_in) rows, flipped
                rows = transposed_rows(kernel) if few else self._mix(w, transposed_rows(self.weight))
                x = upsample_modulated_conv2d(x, rows, styles, self.kernel_size, self.demodulate, energy=energy)
            else:
                x = modulated_conv2d(x, kernel, styles, self.demodulate, energy=energy)
        if self.noise is not None:
            x = self.noise(x, noise)                         # + strength_c * n, per pixel
        x = x + self.bias.view(1, -1, 1, 1)                  # (B, C_out, H*up, W*up)
        if self.activation == "lrelu":
            x = lrelu_gain(x)
        assert x.shape == (B, self.out_channels, H * self.up, W * self.up), x.shape
        return x

    def extra_repr(self):
        return (f"in={self.in_channels}, out={self.out_channels}, k={self.kernel_size}, w_dim={self.w_dim}, "
                f"N={self.n_kernels}, demod={self.demodulate}, up={self.up}, act={self.activation}, fused={self.fused}")


# -----------------------------------------------------------------------------

def demo():
    """Build a 4-kernel adaptive conv, run a batch, and check the facts that are the concept."""
    torch.manual_seed(0)
    B, C_in, C_out, S, N, R = 4, 16, 32, 64, 4, 16           # batch, channels, style width, bank, resolution
    layer = AdaptiveConv2d(C_in, C_out, 3, w_dim=S, n_kernels=N)
    n_params = sum(p.numel() for p in layer.parameters())
    print(f"AdaptiveConv2d: bank {tuple(layer.weight.shape)} (N, C_out, C_in, K, K), {n_params:,} parameters")
    x = torch.randn(B, C_in, R, R)                           # (B, C_in, H, W) unit-std input
    w = torch.randn(B, S)                                    # (B, S) one style vector per sample

    # 1. kernel selection: a softmax over the bank, different for every sample (Eq. 1)
    p = layer.selection_weights(w)                           # (B, N)
    print("selection weights (B, N):")
    for b in range(B):
        print("   sample", b, " ".join(f"{v:.3f}" for v in p[b].tolist()))
    assert torch.allclose(p.sum(dim=1), torch.ones(B)), "softmax rows must sum to 1"
    assert (p[0] - p[1:]).abs().amax() > 1e-3, "selection must depend on w"

    # 2. the full layer: mixed kernel -> modulation -> demodulation -> noise, bias, lrelu
    y = layer(x, w)                                          # (B, C_out, H, W)
    print(f"x {tuple(x.shape)}, w {tuple(w.shape)} -> kernel {tuple(layer.kernel(w).shape)} -> y {tuple(y.shape)}")

    # 3. demodulation: unit-std input gives unit-std output, whatever the styles' scale
    z = modulated_conv2d(x, layer.kernel(w), 10 * layer.affine_style(w))  # styles x 10 on purpose
    std = z[..., 1:-1, 1:-1].std().item()                    # interior: zero padding lowers the border
    print(f"demodulated conv output std {std:.3f} (input std {x.std().item():.3f})")
    assert 0.9 < std < 1.1, std

    # 4. fused (activation modulation) == naive (per-sample loop), for up=1 and up=2
    for up in (1, 2):
        lay = AdaptiveConv2d(C_in, C_out, 3, w_dim=S, n_kernels=N, up=up)
        with torch.no_grad():
            lay.noise.strength.fill_(0.1)                    # make the noise term visible
        noise = torch.randn(B, 1, R * up, R * up)            # shared, so both paths see the same noise
        y_fused = lay(x, w, noise, fused=True)
        y_naive = lay(x, w, noise, fused=False)
        err = (y_fused - y_naive).abs().max().item()
        print(f"up={up}: out {tuple(y_fused.shape)}, max |fused - naive| = {err:.2e}")
        assert err < 1e-5, err

    # 5. N = 1 is StyleGAN2: the softmax of one logit is exactly 1, the kernel is the bank's only one
    one = AdaptiveConv2d(C_in, C_out, 3, w_dim=S, n_kernels=1)
    assert torch.equal(one.selection_weights(w), torch.ones(B, 1))
    assert torch.equal(one.kernel(w), one.weight[0] * one.weight_gain)  # (C_out, C_in, K, K) shared
    print("N=1: selection weights are exactly 1, kernel is the single StyleGAN2 kernel, shared by the batch")

    # 6. the fixed blur resampling keeps constants and halves/doubles the size
    c = torch.full((1, 3, 8, 8), 0.7)
    print(f"upsample2x {tuple(c.shape)} -> {tuple(upsample2x(c).shape)}, "
          f"downsample2x -> {tuple(downsample2x(c).shape)}")
    assert torch.allclose(upsample2x(c), torch.full((1, 3, 16, 16), 0.7))
    assert torch.allclose(downsample2x(c), torch.full((1, 3, 4, 4), 0.7))
    print("ok")


if __name__ == "__main__":
    demo()


# -----------------------------------------------------------------------------
# Exercises. Each says what to change, what to look for, and which test or demo checks it.
# (The ### BEGIN / END SOLUTION regions above are the other kind: `python make_student_copy.py`
# cuts them out for students, and tests/test_student_copy.py lists the tests that grade them. All
# three are on the path G trains on: with any one cut, `python train.py` stops at its hint.)
#
# 1. N = 1 is StyleGAN2. Build AdaptiveConv2d(8, 16, 3, w_dim=32, n_kernels=1) and write the
#    StyleGAN2 layer yourself: per sample, w' = s * K, demodulate, F.conv2d, + bias, lrelu * sqrt(2).
#    Look for: the same output to float precision, and selection_weights exactly 1.
#    Check: pytest tests/test_kernel_selection.py -k single_kernel; step 5 of the demo.
# 2. Demodulation. In step 3 of the demo call modulated_conv2d(..., demodulate=False). Look for: the
#    output std follows the styles (x10 there) instead of staying near 1: StyleGAN2 replaced
#    AdaIN's normalisation of the activations with this. Check: the demo's `0.9 < std < 1.1`.
# 3. Hard selection. Replace the softmax in selection_weights by a one-hot of its argmax. Look for:
#    after layer(x, w).sum().backward(), affine_select.weight.grad is None: no gradient reaches
#    W_filter, so a hard choice cannot be learned this way. Check: pytest
#    tests/test_kernel_selection.py -k selection_weights (it compares with the softmax).
# 4. Cost of the bank. For N = 1, 4, 8 count the layer's parameters and time layer(x, w) at B = 16,
#    C = 64, 32 x 32 (torch.utils.benchmark). Look for: parameters grow N-fold; compare the time
#    with the multiply-adds of the module docstring (the mixture is formed once per sample), and
#    note that N = 1 runs as one shared-kernel conv, N > 1 as a grouped one. Check: the demo.
# 5. Naive and fused. Run layer(x, w, fused=False) and fused=True for up=1 and up=2 and time both.
#    Look for: equal outputs (the demo's step 4) and which path is faster at your batch size.
#    Check: pytest tests/test_kernel_selection.py -k fused_equals_naive
