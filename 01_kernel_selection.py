"""
01 - Sample-adaptive kernel selection (GigaGAN Sec. 3.2, Eq. 1-2), built on StyleGAN2's
modulated convolution.

THIS FILE IS BEING WRITTEN. The equalized-learning-rate layers below are final API;
the modulated conv, kernel bank, noise and resampling follow.

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
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)  # the runtime scale c
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x):                                    # (..., in_features)
        w = self.weight * self.weight_gain
        b = self.bias * self.lr_mul if self.bias is not None else None
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
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.stride, self.padding = stride, kernel_size // 2
        self.activation = activation

    def forward(self, x):                                    # (B, C_in, H, W)
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, self.stride, self.padding)
        return lrelu_gain(x) if self.activation == "lrelu" else x  # (B, C_out, H/stride, W/stride)
