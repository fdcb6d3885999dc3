"""
04 - The GigaGAN discriminators (Kang et al. 2023, Sec. 3.3, Eq. 6-7, Fig. 5).

What. Two discriminators judge each (image, text) pair:

1. The multi-scale input, multi-scale output (MS-I/O) discriminator D, trained from
   scratch. It has two branches:
       text branch   CLIP tokens -> its own text encoder T (03) -> t_global -> MLP -> t_D
       image branch  phi: per scale, [self-attention] -> residual block that halves H, W;
                     the last stage (at 4 px) flattens the 4x4 map into a 1x1 tensor
   The generator outputs an image pyramid x_0 .. x_{L-1} (64, 32, 16, 8, 4 px at 64 px).
   "Late entry": level x_i enters phi through its own 1x1 fromRGB at the layer of its own
   resolution, and "early exit": it is judged after every later layer j >= i:

       D_ij(x_i, c) = psi_j(phi_{i->j}(x_i), t_D) + conv1x1(phi_{i->j}(x_i))     (Eq. 7)

   The stages' outputs, where the exits are, have sides 32, 16, 8, 4, 1 at 64 px (the paper's
   {32, 16, 8, 4, 1}: "the final stage flattens the spatial extent into a 1x1 tensor").
   Indexing: this file's exit j is the stage that STARTS at the side of x_j, the paper's
   index j + 1 (its phi_{i->j} ends at the side S_j, S_L = 1).
   phi_{i->j} = layers i..j of the shared image branch; psi_j = a stack of 1x1 convs
   modulated by t_D (StyleGAN2 modulation + demodulation; for a 1x1 kernel that is just a
   per-sample scaling of the input channels, tested equal to 01's modulated_conv2d); the
   conv1x1 term is the unconditional realism score, psi the text-image agreement (a
   projection-style discriminator, Miyato & Koyama 2018, with the inner product replaced
   by psi).
   Entry i = 0..L-1, exit j = i..L-1: L(L+1)/2 predictions (15 at 64 px, 10 at 32 px),
   each summed into the loss with equal weight (Eq. 6).

2. The vision-aided discriminator (Kumari et al. 2022, adapted to text): small trainable
   heads on a FROZEN CLIP image encoder's intermediate features, each ending in the same
   Eq. 7 predictor, conditioned on the CLIP text embedding. CLIP is not a submodule: the
   caller passes its features, so checkpoints never store it.

Why. A single-scale D judges the finest image only, and the low-resolution layers of G
get their training signal through many layers of G and D; the paper observes that they go
"inactive". Judging every pyramid level on its own (and at several depths) gives each
scale of G a direct signal, and Table 1 reports a better CLIP score (0.280 -> 0.300).
Every prediction must depend on the text, or D could not enforce text alignment.

Efficient implementation. At layer j the streams from entries 0..j all run through the
SAME weights, so they are concatenated along the batch dimension: one call per layer on
(j+1)*B images, and one psi_j call for all (i, j) with that j. The only Python loop is
over the L scales. Streams never mix (no minibatch-std, no batch norm): prediction (i, j)
depends on x_i alone, which tests/test_discriminator.py checks by autograd.

Project choices (the paper does not give them): widths follow StyleGAN2's rule
C(r) = min(channel_base / r, channel_max); the block is StyleGAN2's residual D block; the
flattening to 1x1 is StyleGAN2's D epilogue (flatten the 4x4 map, one fully connected
layer); one logit per image = the spatial mean of Eq. 7's map (at 1x1: the map itself); a
learned position map at the exits wider than 1x1 (Predictor); the full preset's widths are
chosen to land on the paper's 381.4M parameters. Minibatch-std is off (the paper's 64 px
T2I D).

Prediction order of D's output list: entry-major, sorted by (i, j), see D.pairs:
    4 levels: (0,0) (0,1) (0,2) (0,3) (1,1) (1,2) (1,3) (2,2) (2,3) (3,3)
so index 3 = (0, L-1) is the classic "whole image through the whole D" prediction.

Run:  python 04_discriminator.py      (tiny D on random inputs, a few seconds on a CPU)

Shape legend (shared by every numbered file):
    B batch, C channels, H W height width, L text tokens (or pyramid levels, said so),
    D text width (CLIP tokens), E embedding width (CLIP), C_t width of t_D,
    P number of predictions, n streams stacked in the batch at one layer.
"""
import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

_kernels = importlib.import_module("01_kernel_selection")
EqualLinear = _kernels.EqualLinear            # equalized-LR linear layer
EqualConv2d = _kernels.EqualConv2d            # equalized-LR conv layer
downsample2x = _kernels.downsample2x          # [1, 3, 3, 1] blur, then keep every 2nd pixel
modulated_conv2d = _kernels.modulated_conv2d  # StyleGAN2 (de)modulated conv, batched

_attention = importlib.import_module("02_attention")
ImageSelfAttention = _attention.ImageSelfAttention  # L2-distance self-attention over pixels

_generator = importlib.import_module("03_generator")
TextEncoder = _generator.TextEncoder          # learned attention layers T on CLIP tokens
random_text = _generator.random_text          # random stand-in for CLIP token features (the demo)


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class DiscriminatorConfig:
    resolution: int = 32              # side R of the finest pyramid level x_0 (same as G's); levels R .. 4 px
    channel_base: int = 512           # widths C(r) = min(channel_base // r, channel_max) (StyleGAN2 rule)
    channel_max: int = 64             # cap on C(r)
    blocks_per_scale: int = 1         # residual blocks per scale, the last halves H, W (project's choice)
    attention: bool = True            # self-attention before each block at attn_resolutions (ablation)
    attn_resolutions: tuple = (8, 4)  # resolutions with self-attention (project's choice)
    attn_heads: int = 2               # heads of D's image self-attention
    multi_scale: bool = True          # MS-I/O; False: finest level in, final prediction out (ablation)
    text_width: int = 64              # width of D's text encoder T (project's choice)
    text_depth: int = 1               # TransformerBlocks in D's T (project's choice)
    text_heads: int = 2               # attention heads in D's T
    t_dim: int = 64                   # C_t, width of the text descriptor t_D (project's choice)
    psi_layers: int = 4               # modulated 1x1 convs in each psi_j (paper: "4-layer 1x1 conv")
    vision_hidden: int = 64           # width of each vision-aided head (project's choice)
    vision_psi_layers: int = 2        # modulated 1x1 convs per vision-aided head (project's choice)

    def __post_init__(self):
        # a tuple may arrive as a list (a checkpoint's plain-dict config, a JSON CLI flag)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        assert self.resolution >= 8 and self.resolution & (self.resolution - 1) == 0, (
            f"resolution {self.resolution}: a power of 2, >= 8")
        assert self.blocks_per_scale >= 1 and self.psi_layers >= 1
        assert self.channel_base >= self.resolution, (  # C(R) = channel_base // R must be >= 1
            f"channel_base {self.channel_base} leaves D no channels at {self.resolution} px: "
            f"set --d.channel-base to at least {self.resolution}")

    @property
    def levels(self):
        """L, pyramid levels R, R/2, ..., 4 px: 5 at 64 px, 4 at 32 px (as G's pyramid)."""
        return int(math.log2(self.resolution)) - 1


# Where the sizes come from. The paper gives the full D's size (381.4M) and its structure
# (Sec. 3.3), not its widths; all widths below are this project's choice.
#   tiny   32 px, 4 levels; trains beside a ~1M-parameter G on a 2-core CPU: widths
#          C(r) = min(512 / r, 64) = 16, 32, 64, 64 (then 64 at 1x1) at 32, 16, 8, 4 px,
#          attention at 8 and 4 px, a 1-block 64-wide T. About 0.46M parameters (D = 128).
#   small  64 px on one 8-24 GB GPU: C(r) = min(8192 / r, 256), attention at <= 16 px.
#   full   the paper's 64 px D: StyleGAN2's channel rule with twice its base and cap,
#          C(r) = min(32768 / r, 1024) = 512 at 64 px, 1024 below; 3 residual blocks per
#          scale (the generator is also "deeper" than StyleGAN2); attention at <= 32 px;
#          a 3-block, 1024-wide T; t_D 768 wide; psi 4 layers (paper); the 4 px stage
#          flattened by a 16384 -> 1024 fully connected layer (16.8M). Total 381.0M with
#          the CLIP ViT-L/14 text width D = 768, i.e. -0.1% from the paper's 381.4M.
# The vision-aided heads are counted apart from the 381.4M (this project's reading):
# build them with VisionAidedDiscriminator(feature_channels, E, hidden=cfg.vision_hidden,
# psi_layers=cfg.vision_psi_layers). 64 wide on the tiny CLIP's 64 x 4 x 4 ViT token grids.
D_PRESETS = {
    "tiny": DiscriminatorConfig(),
    "small": DiscriminatorConfig(
        resolution=64, channel_base=8192, channel_max=256, blocks_per_scale=1,
        attn_resolutions=(16, 8, 4), attn_heads=4, text_width=256, text_depth=2,
        text_heads=4, t_dim=256, vision_hidden=256),
    "full": DiscriminatorConfig(
        resolution=64, channel_base=32768, channel_max=1024, blocks_per_scale=3,
        attn_resolutions=(32, 16, 8, 4), attn_heads=16, text_width=1024, text_depth=3,
        text_heads=16, t_dim=768, vision_hidden=512, vision_psi_layers=4),
}


# -----------------------------------------------------------------------------
# Building blocks of the image branch phi


class DownBlock(nn.Module):
    """StyleGAN2's residual D block (Karras et al. 2020, Fig. 7c), optionally halving H, W.

        main = conv3x3(lrelu) -> [blur-downsample] -> conv3x3(lrelu)
        skip = [blur-downsample] -> conv1x1 (linear, no bias)
        out  = (main + skip) / sqrt(2)          keeps unit variance
    The stride-2 step is "blur, keep every second pixel" (01's downsample2x) followed by a
    stride-1 conv at the lower resolution: anti-aliased like StyleGAN2's blur + stride-2 conv.
    """

    def __init__(
        self,
        in_channels,   # C_in at resolution r
        out_channels,  # C_out at the output resolution
        down=True,     # True: output at r / 2, False: output at r
    ):
        super().__init__()
        self.down = down
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, activation="lrelu")
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, activation="lrelu")
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x):                                     # (n, C_in, r, r)
        y = self.conv0(x)                                     # (n, C_in, r, r)
        if self.down:
            y, x = downsample2x(y), downsample2x(x)           # (n, C_in, r/2, r/2) both paths
        y = self.conv1(y)                                     # (n, C_out, r', r')
        return (y + self.skip(x)) * math.sqrt(0.5)            # (n, C_out, r', r')


class Flatten1x1(nn.Module):
    """The last stage's end (paper: it "flattens the spatial extent into a 1x1 tensor"):

        (n, C_in, r, r) -> flatten (n, C_in * r * r) -> fully connected, lrelu -> (n, C_out, 1, 1)
    StyleGAN2's D epilogue (its flatten + fc layer; project's choice of how to flatten): unlike
    a spatial mean, the fully connected layer knows WHERE each feature is.
    """

    def __init__(
        self,
        in_channels,   # C_in of the r x r map
        out_channels,  # C_out of the 1x1 tensor
        resolution,    # r, side of the map it flattens (4 px)
    ):
        super().__init__()
        self.in_shape = (in_channels, resolution, resolution)
        self.fc = EqualLinear(in_channels * resolution * resolution, out_channels, activation="lrelu")

    def forward(self, x):                                     # (n, C_in, r, r)
        assert x.shape[1:] == self.in_shape, (tuple(x.shape), self.in_shape)
        return self.fc(x.flatten(1))[:, :, None, None]        # (n, C_out, 1, 1)


class Scale(nn.Module):
    """All layers of phi at one resolution r: blocks x ([self-attention] -> DownBlock).

    Only the last block halves the resolution and changes the width C(r) -> C(r/2).
    flatten=r (the last stage of the MS-I/O D, at r = 4 px): no block halves; Flatten1x1
    turns the r x r map into a 1x1 tensor of width C(r/2) instead.
    """

    def __init__(
        self,
        in_channels,   # C(r)
        out_channels,  # C(r / 2)
        blocks,        # residual blocks at this scale (>= 1)
        attention,     # put ImageSelfAttention before every block
        heads,         # attention heads
        flatten=None,  # r: end in Flatten1x1 at r px (output (n, C(r/2), 1, 1)); None: halve
    ):
        super().__init__()
        layers = []
        for b in range(blocks):
            halve = b == blocks - 1 and flatten is None       # the last block halves, unless we flatten
            if attention:
                layers.append(ImageSelfAttention(in_channels, heads))  # residual inside
            layers.append(DownBlock(in_channels, out_channels if halve else in_channels, down=halve))
        if flatten is not None:
            layers.append(Flatten1x1(in_channels, out_channels, flatten))  # (n, C(r/2), 1, 1)
        self.layers = nn.Sequential(*layers)

    def forward(self, x):                                     # (n, C(r), r, r)
        return self.layers(x)                                 # (n, C(r/2), r/2, r/2), or 1x1 if flatten


# -----------------------------------------------------------------------------
# The predictor of Eq. 7: psi_j(features, t_D) + conv1x1(features), one logit per image


class ModulatedConv1x1(nn.Module):
    """A 1x1 conv whose input channels are scaled per sample by an affine of the condition.

        s = A(c)                     (C_in,) per sample, bias init 1 (s ~ 1 at the start)
        y = conv1x1(x, W * s)        w'_oi = s_i * w_oi             (StyleGAN2 modulation)
        y = y / ||w'_o||             demodulation (hidden layers), keeps unit variance
    Two equal paths: reference=True builds per-sample kernels with 01's modulated_conv2d;
    the default scales the input pixels instead (one shared conv, cheaper on a CPU).
    """

    def __init__(
        self,
        in_channels,       # C_in
        out_channels,      # C_out
        cond_dim,          # width of the condition c (t_D, or a CLIP text embedding)
        demodulate=True,   # normalise each output channel's per-sample kernel
        activation=True,   # leaky ReLU * sqrt(2) after the bias
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))  # unit-normal (equalized LR)
        self.weight_gain = 1 / math.sqrt(in_channels)         # He scale (cancels under demodulation)
        self.affine = EqualLinear(cond_dim, in_channels, bias_init=1.0)  # A: c -> styles
        self.bias = nn.Parameter(torch.zeros(out_channels))   # (C_out,)
        self.demodulate, self.activation = demodulate, activation
        self.reference = False  # True: 01's modulated_conv2d (per-sample kernels), same result

    def forward(self, x, c):                                  # x (n, C_in, H, W), c (n, cond_dim)
        styles = self.affine(c)                               # (n, C_in)
        w = self.weight * self.weight_gain                    # (C_out, C_in, 1, 1)
        if self.reference:
            x = modulated_conv2d(x, w, styles, self.demodulate, padding=0)  # (n, C_out, H, W) 01's path
        else:
            # a 1x1 kernel sees one pixel, so scaling the kernel's input channels by s equals
            # scaling the input pixels by s: one shared conv, no per-sample kernels needed
            x = nn.functional.conv2d(x * styles[:, :, None, None], w)  # (n, C_out, H, W)
            if self.demodulate:
                # d_o = 1 / sqrt(sum_i (s_i w_oi)^2 + eps), per sample, as in modulate_weight (01)
                d = (styles.square() @ w.flatten(1).square().t() + 1e-8).rsqrt()  # (n, C_out)
                x = x * d[:, :, None, None]                   # (n, C_out, H, W)
        x = x + self.bias.view(1, -1, 1, 1)                   # (n, C_out, H, W)
        return _kernels.lrelu_gain(x) if self.activation else x


class Predictor(nn.Module):
    """One exit of Eq. 7: logit = mean_hw( psi(h, c) + conv1x1(h) ) (at 1x1 the mean is the value).

    psi = (psi_layers - 1) modulated, demodulated 1x1 convs C -> C with lrelu, then one
    modulated 1x1 conv C -> 1 (no demodulation: a single output channel would be
    normalised to a fixed scale). conv1x1 = an unconditional 1x1 conv C -> 1.
    The (n, 1, h, w) map is averaged over space into one logit per image (project's choice;
    the paper does not say how its map is reduced).
    size: with the side h > 1 of the feature map, a learned position map (C, h, h) is added to
    h first (project's choice). 1x1 convs and a mean are blind to WHERE a feature is, so
    without it D could not check "on the left" or "large" against the caption. The 1x1 exit
    needs none: its Flatten1x1 layer already saw where every feature was.
    """

    def __init__(
        self,
        channels,      # C of the features h
        cond_dim,      # width of the condition c
        psi_layers,    # number of modulated 1x1 convs in psi (paper: 4)
        size=None,     # h of the feature map: adds the learned position map when h > 1; None: none
    ):
        super().__init__()
        assert psi_layers >= 1, psi_layers
        # stored unit normal (like the learned constant of G), one vector per location
        self.position = nn.Parameter(torch.randn(1, channels, size, size)) if size and size > 1 else None
        hidden = [ModulatedConv1x1(channels, channels, cond_dim) for _ in range(psi_layers - 1)]
        last = ModulatedConv1x1(channels, 1, cond_dim, demodulate=False, activation=False)
        self.psi = nn.ModuleList(hidden + [last])             # psi_j of Eq. 7
        self.unconditional = EqualConv2d(channels, 1, 1)      # conv1x1 of Eq. 7

    def forward(self, h, c):                                  # h (n, C, H, W), c (n, cond_dim)
        if self.position is not None:
            h = h + self.position                             # (n, C, H, W) features that know where they are
        x = h
        for layer in self.psi:
            x = layer(x, c)                                   # (n, C, H, W), last layer (n, 1, H, W)
        logits = x + self.unconditional(h)                    # (n, 1, H, W)  Eq. 7
        return logits.mean(dim=(1, 2, 3))                     # (n,) one logit per image


# -----------------------------------------------------------------------------
# The MS-I/O discriminator


class Discriminator(nn.Module):
    """MS-I/O discriminator (Sec. 3.3, Fig. 5).

    forward(pyramid [x_0 (B, 3, R, R), ..., x_{L-1}], tokens (B, L, D), mask (B, L) bool,
            eot (B,) long) -> list of P tensors (B,), in the order of self.pairs.
    Several captions per image (the matching-aware pairs of Eq. 8): tokens (k*B, L, D), caption
    row g*B + b going with image b; the image branch runs once, predictions are (k*B,) rows.
    multi_scale=False keeps only x_0 (the rest of the pyramid is ignored) and (0, L-1).
    """

    def __init__(
        self,
        cfg,        # DiscriminatorConfig
        text_dim,   # D, width of the CLIP token features
    ):
        super().__init__()
        self.cfg = cfg
        levels = cfg.levels                                   # pyramid levels (L of Eq. 6)
        self.resolutions = [cfg.resolution >> i for i in range(levels)]  # [R, R/2, ..., 4], finest first
        # side of the features at exit j: halved per stage, the last stage flattened to 1x1
        self.exit_resolutions = [r // 2 for r in self.resolutions[:-1]] + [1]  # [R/2, ..., 4, 1]

        def width(r):
            return min(cfg.channel_base // r, cfg.channel_max)  # C(r), StyleGAN2's rule

        # text branch: T (03) -> t_global -> 2-layer MLP -> t_D
        self.text_encoder = TextEncoder(text_dim, cfg.text_width, cfg.text_depth, cfg.text_heads)
        self.text_mlp = nn.Sequential(
            EqualLinear(cfg.text_width, cfg.t_dim, activation="lrelu"),
            EqualLinear(cfg.t_dim, cfg.t_dim, activation="lrelu"))

        # which (entry i, exit j) pairs exist; single-scale: only the finest in, the last out
        self.entries = list(range(levels)) if cfg.multi_scale else [0]
        self.exits = list(range(levels)) if cfg.multi_scale else [levels - 1]
        # EXERCISE: MS-I/O pairs (i, j): every entry i exits at every j >= i, entry-major order
        ### BEGIN SOLUTION
        self.pairs = [(i, j) for i in self.entries for j in self.exits if j >= i]
        ### END SOLUTION

        # image branch phi: fromRGB per entry level, one Scale per resolution
        self.from_rgb = nn.ModuleDict({
            str(i): EqualConv2d(3, width(self.resolutions[i]), 1, activation="lrelu") for i in self.entries})
        # (the last one, at 4 px, flattens to 1x1 instead of halving)
        self.scales = nn.ModuleList([
            Scale(width(r), width(r // 2), cfg.blocks_per_scale,
                  attention=cfg.attention and r in cfg.attn_resolutions, heads=cfg.attn_heads,
                  flatten=r if j == levels - 1 else None)
            for j, r in enumerate(self.resolutions)])
        # one predictor per exit j, on C(r_j / 2)-wide features of side exit_resolutions[j]
        self.predictors = nn.ModuleDict({
            str(j): Predictor(width(self.resolutions[j] // 2), cfg.t_dim, cfg.psi_layers,
                              size=self.exit_resolutions[j])
            for j in self.exits})

    @property
    def num_predictions(self):
        """P = L(L+1)/2 for MS-I/O, 1 single-scale."""
        return len(self.pairs)

    def text_descriptor(self, tokens, mask, eot):
        """t_D of the text branch: tokens (B, L, D), mask (B, L), eot (B,) -> (B, C_t)."""
        _, _, t_global = self.text_encoder(tokens, mask, eot)  # (B, text_width) EOT feature
        return self.text_mlp(t_global)                        # (B, C_t)

    def forward(self, pyramid, tokens, mask, eot):
        B = pyramid[0].shape[0]                               # images
        k = tokens.shape[0] // B                              # captions per image (text groups)
        assert isinstance(pyramid, (list, tuple)), "pyramid: a list of images, finest first"
        assert tokens.shape[0] == k * B and k >= 1, f"{tokens.shape[0]} captions for {B} images"
        assert len(pyramid) == self.cfg.levels or not self.cfg.multi_scale, (
            f"expected {self.cfg.levels} pyramid levels, got {len(pyramid)}")
        for i in self.entries:
            r = self.resolutions[i]
            assert pyramid[i].shape == (B, 3, r, r), f"level {i}: {tuple(pyramid[i].shape)} != {(B, 3, r, r)}"

        t_D = self.text_descriptor(tokens, mask, eot)         # (k*B, C_t)
        h, streams, out = None, [], {}
        for j, scale in enumerate(self.scales):
            if str(j) in self.from_rgb:                       # late entry of x_j at its own resolution
                x = self.from_rgb[str(j)](pyramid[j])         # (B, C(r_j), r_j, r_j)
                h = x if h is None else torch.cat([h, x])     # (n*B, C(r_j), r_j, r_j) streams stacked
                streams.append(j)                             # entry of each stacked stream, in order
            h = scale(h)                                      # (n*B, C(r_j/2), r_j/2, r_j/2), 1x1 at the last
            if str(j) in self.predictors:                     # early exit j for every stream
                n = len(streams)
                # phi never sees the text: its features serve all k captions of an image, and
                # only psi runs once per (stream, caption): rows ordered (caption group, stream, image)
                c = t_D.view(k, 1, B, -1).expand(k, n, B, t_D.shape[1]).reshape(k * n * B, -1)  # (k*n*B, C_t)
                logits = self.predictors[str(j)](h.repeat(k, 1, 1, 1), c).view(k, n, B)  # (k, n, B)
                for s, i in enumerate(streams):
                    out[(i, j)] = logits[:, s].reshape(k * B)  # (k*B,) prediction D_ij
        preds = [out[p] for p in self.pairs]                  # P x (k*B,)
        assert all(p.shape == (k * B,) for p in preds)
        return preds


# -----------------------------------------------------------------------------
# The vision-aided discriminator (Kumari et al. 2022) on frozen CLIP features


class VisionAidedHead(nn.Module):
    """One trainable head on one frozen CLIP feature map:
    normalise -> conv1x1(lrelu) -> conv3x3(lrelu) -> Predictor (Eq. 7 form, text-modulated).
    """

    def __init__(
        self,
        in_channels,   # C_i of the CLIP feature map
        hidden,        # width of the head
        embed_dim,     # E, width of the CLIP text embedding (the condition)
        psi_layers,    # modulated 1x1 convs in the predictor
    ):
        super().__init__()
        self.stem = nn.Sequential(
            EqualConv2d(in_channels, hidden, 1, activation="lrelu"),
            EqualConv2d(hidden, hidden, 3, activation="lrelu"))
        self.predictor = Predictor(hidden, embed_dim, psi_layers)

    def forward(self, f, c):                                  # f (B, C_i, h, w), c (B, E)
        # per-position normalisation over channels without parameters (project's choice):
        # a ViT's residual stream has a few huge channels that would otherwise dominate
        f = (f - f.mean(1, keepdim=True)) * torch.rsqrt(f.var(1, keepdim=True, unbiased=False) + 1e-5)
        return self.predictor(self.stem(f), c)                # (B,)


class VisionAidedDiscriminator(nn.Module):
    """forward(features [(B, C_i, h_i, w_i)] from FrozenCLIP.image_features, text_embed (B, E))
    -> list of logits (B,), one per feature map.

    The CLIP image encoder is frozen and lives outside (it is passed features); only the
    heads are trained. Text enters by modulation with the (L2-normalised) CLIP text
    embedding, rescaled by sqrt(E) so that its entries have unit variance.
    """

    def __init__(
        self,
        feature_channels,   # [C_i], channels of each CLIP feature map (FrozenCLIP.feature_channels)
        embed_dim,          # E, CLIP embedding width
        hidden=64,          # width of each head (DiscriminatorConfig.vision_hidden; project's choice)
        psi_layers=2,       # modulated 1x1 convs per head (DiscriminatorConfig.vision_psi_layers)
    ):
        super().__init__()
        self.feature_channels, self.embed_dim = list(feature_channels), embed_dim
        self.heads = nn.ModuleList([VisionAidedHead(c, hidden, embed_dim, psi_layers) for c in feature_channels])

    def forward(self, features, text_embed):
        B = text_embed.shape[0]
        assert text_embed.shape == (B, self.embed_dim), (text_embed.shape, self.embed_dim)
        assert len(features) == len(self.heads), f"expected {len(self.heads)} feature maps, got {len(features)}"
        for f, c in zip(features, self.feature_channels):
            assert f.dim() == 4 and f.shape[:2] == (B, c), f"feature {tuple(f.shape)} != (B={B}, C={c}, h, w)"
        # EXERCISE: one logit per feature map; heads conditioned on the text embedding * sqrt(E)
        ### BEGIN SOLUTION
        c = text_embed * math.sqrt(self.embed_dim)            # (B, E), unit-variance entries
        logits = [head(f, c) for head, f in zip(self.heads, features)]  # len(features) x (B,)
        ### END SOLUTION
        assert all(l.shape == (B,) for l in logits)
        return logits


# -----------------------------------------------------------------------------


def demo():
    """Tiny D on a random pyramid and random text: shapes, parameters, the (i, j) table."""
    torch.manual_seed(0)
    cfg, B, text_dim = D_PRESETS["tiny"], 2, 128
    D = Discriminator(cfg, text_dim)
    n = cfg.levels                                            # pyramid levels
    pyramid = [torch.randn(B, 3, r, r) for r in D.resolutions]  # finest first, [-1, 1]-ish noise
    tokens, mask, eot = random_text(B, D=text_dim, seed=1)    # stand-in for CLIP token features
    preds = D(pyramid, tokens, mask, eot)                     # P x (B,)
    print(f"tiny D: {sum(p.numel() for p in D.parameters()):,} parameters, levels {D.resolutions} px")
    for k, ((i, j), p) in enumerate(zip(D.pairs, preds)):
        print(f"  prediction {k}: entry i={i} ({D.resolutions[i]} px) exit j={j} "
              f"(features {D.exit_resolutions[j]}x{D.exit_resolutions[j]}) -> {tuple(p.shape)}")
    assert len(preds) == n * (n + 1) // 2, "MS-I/O makes L(L+1)/2 predictions"

    print("list index of prediction D_ij (rows: entry i, columns: exit j):")
    print("        " + " ".join(f"j={j:<3}" for j in range(n)))
    for i in range(n):
        row = [f"{D.pairs.index((i, j)):<5}" if (i, j) in D.pairs else "-    " for j in range(n)]
        print(f"  i={i}   " + " ".join(row))

    # the concept's other half: the text changes every prediction, the final one included
    preds2 = D(pyramid, *random_text(B, D=text_dim, seed=2))  # same images, other text
    diffs = [(a - b).abs().min().item() for a, b in zip(preds, preds2)]  # smallest change per prediction
    print("min |change| of each prediction under another text:", " ".join(f"{d:.3f}" for d in diffs))
    assert min(diffs) > 1e-4, "some prediction ignores the text"

    VD = VisionAidedDiscriminator([32, 32], embed_dim=16, hidden=32)
    features = [torch.randn(B, 32, 7, 7), torch.randn(B, 32, 7, 7)]  # stand-ins for CLIP features
    text_embed = nn.functional.normalize(torch.randn(B, 16), dim=1)   # (B, E) like embed_text
    logits = VD(features, text_embed)                         # 2 x (B,)
    print(f"vision-aided D: {sum(p.numel() for p in VD.parameters()):,} parameters, "
          f"features {[tuple(f.shape) for f in features]} -> logits {[tuple(z.shape) for z in logits]}")


if __name__ == "__main__":
    demo()


# -----------------------------------------------------------------------------
# Exercises. Each says what to change, what to look for, and which test or demo checks it.
# (The ### BEGIN / END SOLUTION regions above are the other kind: `python make_student_copy.py`
# cuts them out for students, and tests/test_student_copy.py lists the tests that grade them.)
#
# 1. The MS-I/O table. Print Discriminator(cfg, 128).pairs for cfg = D_PRESETS["tiny"], for
#    resolution 64, and with multi_scale=False. Look for: L(L+1)/2 predictions (10, 15) against one.
#    Check: pytest tests/test_discriminator.py -k "number_order or single_scale"
# 2. Late entry. In forward, let every stream start from x_0 (pyramid[0] resized) instead of x_j.
#    Look for: prediction (i, j) now has a gradient from x_0, not from x_i. Check: pytest
#    tests/test_discriminator.py -k late_entry (it asks autograd which level each prediction reads).
# 3. Where is the shape? Build Predictor(C, cond, 2) without `size` and feed it a feature map and
#    the same map rolled sideways. Look for: the same logit: 1x1 convs and a mean are blind to
#    position, so "on the left" could not be checked. Check: pytest tests/test_discriminator.py
#    -k position_map
# 4. The text in D. Replace t_D by zeros in forward. Look for: the demo's "some prediction ignores
#    the text" assertion fails, and D could no longer tell a real image with a wrong caption (Eq. 8)
#    from one with its own. Check: python 04_discriminator.py
