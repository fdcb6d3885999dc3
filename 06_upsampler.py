"""
06 - The GigaGAN upsampler (Kang et al. 2023, Sec. 3.4, "GAN-based upsampler"):
a text-conditioned, asymmetric U-Net that turns a 64 px image into a 512 px one.

What. Super-resolution as a conditional GAN, built from the same parts as the base G:

    low-res image (B, 3, r, r) --(+ Gaussian noise: training, and inference in sample.py)--> x_lr
    x_lr -> stem conv -> encoder: plain residual blocks that halve H, W (04's Scale),
            keeping the features of every scale as skips                 r -> r/2 -> ... -> b
    prompt -> T (03) -> t_local, t_global;   z, t_global -> M (03) -> w
    decoder, per scale 2b, 4b, ..., R, one residual block:  upsample2x -> concat the skip
            of the same size -> blocks of adaptive conv (01, w-modulated kernel bank)
               [-> L2 self-attention with w -> cross-attention to t_local (02)]  (03's SynthesisBlock)
            -> + a 1x1 conv of the block's input, / sqrt(2) (StyleGAN2's residual form)
            -> ToRGB: a residual image, accumulated across scales (StyleGAN2's skip outputs)
    every level of the output = resize(x_lr) + that residual
    -> image pyramid [x_R, x_R/2, ..., x_4], finest first, for the MS-I/O D (04)

"Asymmetric": the paper uses 3 downsampling residual blocks and 6 upsampling blocks with
attention (64 -> 8 -> 512 for the 8x model): the encoder only has to read a small image,
the decoder has to invent the detail of a big one. Both paths are residual blocks (paper).
Training: the same losses as the base model (MS-I/O D, matching-aware, CLIP), plus LPIPS to
the real high-res image with weight 10 (05_losses.py, LOSS_PRESETS["upsampler"]); no
vision-aided loss. The tiny preset adds what a CPU budget needs (train.py, not the paper): a
pixel-MSE warm-up before the GAN steps (with the input noise), and a pixel MSE among the GAN losses.

Why these pieces.
- Text conditioning (M and cross-attention): at 8x, most of the output pixels are not in
  the input; the prompt tells the decoder what the detail should be.
- Noise augmentation: the upsampler is trained on real images made small (make_lowres),
  but used on a base model's outputs, which have their own artifacts. Gaussian noise of a
  random strength on the input during training (augment_lowres) teaches it not to trust
  single pixels, so it also upsamples other models' images. The paper applies it "during
  training and inference": sample.py adds inference_sigma(cfg) by default (--noise-aug to
  change it), so U must learn to remove that noise, from its first training step on: a U
  warmed up on clean inputs sharpens the noise, and its default output ends further from
  the real image than bicubic's (NOTES.md, "Upsampler input noise"). The module itself adds
  none in eval mode unless asked (noise_aug), so that its metrics are deterministic.
- Residual over the interpolated input (this project's choice): the output is
  resize(x_lr, R) + learned residual, not an image from scratch. The coarse structure is
  right from step 0 (the ToRGB layers start at 1/1000 of their usual size, rgb_init: the
  untrained output is within ~15% of bicubic's error), so GAN training starts from a
  sensible image instead of first having to learn the identity map through a U-Net.
  Beating bicubic's pixel error takes this tiny U-Net many steps on a CPU, which is why
  train.py warms it up on pixel MSE (NOTES.md, "U on pixel loss alone" and "Upsampler warm-up").

Low-res training pairs: make_lowres(real, r) is bicubic, anti-aliased (PIL's filter, the
cubic kernel stretched by the factor), clamped to [-1, 1]. data.py shrinks real images
with PIL Lanczos, a filter of about the same sharpness, so these inputs look like the 64 px
images the base model learnt to draw (the box or [1, 3, 3, 1] filters are blurrier).
The MS-I/O D's real pyramid (train.py) keeps 01's [1, 3, 3, 1] downsample2x.

Which discriminator: 04's Discriminator with resolution = out_resolution; its pyramid has
log2(R) - 1 levels (R .. 4 px), the same as this file's output. U_D_PRESETS below pairs one
DiscriminatorConfig with each upsampler preset. The real pyramid is train.py's
image_pyramid(real, levels) of the high-res image.

Metrics (restoration_metrics here; upsampling_metrics runs it on U's own clean path, and
train.py --stage upsampler logs sample.py's evaluate_upsampler at eval intervals, the path a
user takes, default input noise and none): mean absolute error to the real high-res image
against bicubic's, and sharpness (RMS gradient magnitude) of the output, of bicubic and of the
real image. A GAN upsampler should beat bicubic on both: lower error and sharper, close to
the real image's sharpness.

Run:  python 06_upsampler.py    (tiny 32 -> 128 upsampler on random text, seconds on a CPU)

Shape legend (shared by every numbered file):
    B batch, C channels, H W height width, N kernels in a bank, S style (w) width,
    L text tokens, D text width (CLIP), r input side, R output side, b bottleneck side.
"""
import dataclasses
import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

_kernels = importlib.import_module("01_kernel_selection")
EqualConv2d = _kernels.EqualConv2d            # equalized-LR conv (the stem)
upsample2x = _kernels.upsample2x              # fixed-blur 2x upsampling (= bilinear)
downsample2x = _kernels.downsample2x          # [1, 3, 3, 1] blur, keep every 2nd pixel

_generator = importlib.import_module("03_generator")
TextEncoder = _generator.TextEncoder          # T: CLIP tokens -> t_local, t_global
MappingNetwork = _generator.MappingNetwork    # M: (z, t_global) -> w
SynthesisBlock = _generator.SynthesisBlock    # adaptive conv -> self-attn -> cross-attn
ToRGB = _generator.ToRGB                      # modulated 1x1 conv to RGB, no demodulation
NOISE_MODES = _generator.NOISE_MODES          # "random" | "const" | "none"
count_parameters = _generator.count_parameters
random_text = _generator.random_text          # random stand-in for CLIP tokens

_discriminator = importlib.import_module("04_discriminator")
EncoderScale = _discriminator.Scale           # residual blocks at one scale, the last halves H, W
DiscriminatorConfig = _discriminator.DiscriminatorConfig
D_PRESETS = _discriminator.D_PRESETS


# -----------------------------------------------------------------------------
# Configuration. Tuples run coarse to fine, like 03's. With b the bottleneck side:
#   channels      scales b, 2b, ..., R          (every scale the network has)
#   down_blocks   encoder scales 2b, ..., r     (each one ends by halving to its half)
#   up_blocks, n_kernels   decoder scales 2b, ..., R


@dataclass
class UpsamplerConfig:
    in_resolution: int = 32                   # r, side of the low-res input
    out_resolution: int = 128                 # R, side of the output; R / r a power of 2
    z_dim: int = 128                          # width of the latent z (as the base G)
    w_dim: int = 128                          # S, width of the style w (project's choice)
    mapping_layers: int = 2                   # EqualLinear layers in M (paper: 4 in the base G)
    mapping_lr_mul: float = 0.01              # learning-rate multiplier of M (StyleGAN2's value)
    w_avg_beta: float = 0.998                 # EMA decay of M's tracked mean w (StyleGAN2-ADA's)
    text_width: int = 64                      # C of t_local / t_global, T's width (project's choice)
    text_depth: int = 1                       # TransformerBlocks in T (project's choice)
    text_heads: int = 2                       # attention heads in T
    channels: tuple = (64, 64, 48, 32, 16)    # feature channels per scale b .. R, coarse to fine
    down_blocks: tuple = (1, 1)               # encoder residual blocks per scale 2b .. r; len = halvings
    up_blocks: tuple = (1, 1, 1, 1)           # decoder blocks (conv + attention) per scale 2b .. R
    n_kernels: tuple = (1, 2, 2, 2)           # N, kernels in each decoder conv's bank per scale 2b .. R
    attn_resolutions: tuple = (16,)           # decoder scales (px) whose blocks get attention
    attn_heads: int = 2                       # heads of the image attention layers
    self_attention: bool = True               # L2 self-attention after each decoder conv at attn_resolutions
    cross_attention: bool = True              # cross-attention to t_local after it
    kernel_size: int = 3                      # K of the stem and decoder convs
    noise_aug_sigma: float = 0.2              # max std of the training noise on x_lr in [-1, 1] (ours)
    rgb_init: float = 0.001                   # ToRGB weights start at this x StyleGAN2's: small residual (ours)

    def __post_init__(self):
        # tuples may arrive as lists (from a checkpoint's plain-dict config or a CLI flag)
        for name in ("channels", "down_blocks", "up_blocks", "n_kernels", "attn_resolutions"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        r, R = self.in_resolution, self.out_resolution
        assert r >= 4 and r & (r - 1) == 0, f"in_resolution {r}: a power of 2, >= 4"
        assert R > r and R & (R - 1) == 0, f"out_resolution {R}: a power of 2 above in_resolution {r}"
        assert self.bottleneck >= 4, f"{len(self.down_blocks)} halvings of {r} px go below 4 px"
        n_up = len(self.decoder_scales)
        assert len(self.channels) == n_up + 1, f"channels needs {n_up + 1} entries ({self.bottleneck} .. {R} px)"
        for name in ("up_blocks", "n_kernels"):
            assert len(getattr(self, name)) == n_up, f"{name} needs {n_up} entries ({2 * self.bottleneck} .. {R} px)"
        assert all(n >= 1 for n in self.down_blocks + self.up_blocks), "every scale needs at least one block"

    @property
    def factor(self):
        """Upsampling factor R / r (2, 4, 8, ...)."""
        return self.out_resolution // self.in_resolution

    @property
    def bottleneck(self):
        """b, side of the encoder's coarsest features: r halved once per down_blocks entry."""
        return self.in_resolution >> len(self.down_blocks)

    @property
    def scales(self):
        """Every scale, coarse to fine: [b, 2b, ..., R] (one entry of channels each)."""
        return [self.bottleneck << s for s in range(int(math.log2(self.out_resolution // self.bottleneck)) + 1)]

    @property
    def encoder_scales(self):
        """Scales the encoder halves, coarse to fine: [2b, ..., r] (one entry of down_blocks each)."""
        return [s for s in self.scales if self.bottleneck < s <= self.in_resolution]

    @property
    def decoder_scales(self):
        """Scales the decoder makes, coarse to fine: [2b, ..., R] (one ToRGB each)."""
        return self.scales[1:]

    @property
    def levels(self):
        """Pyramid levels R, R/2, ..., 4: as DiscriminatorConfig(resolution=R).levels."""
        return int(math.log2(self.out_resolution)) - 1


# Presets: one code path, sizes only. Every number not in the paper is ours.
U_PRESETS = {
    # 32 -> 128 on the shapes toy set, a 2-core CPU. Bottleneck 8 px (2 halvings, 4 doublings:
    # asymmetric like the paper's 3 / 6), narrow at high resolution where pixels are many,
    # attention at 16 px only (256 tokens; at 32 px it would cost most of the step).
    # About 0.57M parameters with text_dim 128; forward + backward at batch 8 ~0.25 s on one core.
    # M at the full learning rate, as the tiny base G (NOTES.md, "What lets U learn on MSE").
    # Input noise up to 0.02, not 0.2 or 0.05: the noise this small U learns to remove within the
    # stage's 1,500 steps (NOTES.md, "Input noise strength" and "Upsampler input noise").
    "tiny": UpsamplerConfig(mapping_lr_mul=1.0, noise_aug_sigma=0.02),
    # The paper's 64 -> 512 upsampler (359.1M). From the paper: the asymmetric U-Net with 3
    # downsampling residual blocks (64 -> 32 -> 16 -> 8, one per scale) and 6 upsampling
    # residual blocks with attention (8 -> 16 -> ... -> 512, one per scale), skips at equal
    # resolution, text through M and cross-attention, z of 128, 4 mapping layers (as the base
    # G), CLIP ViT-L/14 tokens (text_dim 768). Everything else is this project's choice:
    # w 1024 (as our base G), a 3-block 768-wide T, widths 1024 up to 32 px then halving per
    # octave (64 at 512 px, as StyleGAN2 at 512 px), 3-4 conv blocks inside a decoder block up
    # to 64 px and 2 above, banks growing with resolution like the base G's, and attention up
    # to 64 px (4096 tokens; a 512 px self-attention map is out of reach).
    # Calibrated to the paper's size: 360.3M with text_dim 768 (+0.3%): T 20.1M, M 5.1M,
    # stem + encoder 47.5M, decoder 287.7M.
    "full": UpsamplerConfig(
        in_resolution=64, out_resolution=512, z_dim=128, w_dim=1024, mapping_layers=4,
        text_width=768, text_depth=3, text_heads=12,
        channels=(1024, 1024, 1024, 512, 256, 128, 64),
        down_blocks=(1, 1, 1), up_blocks=(3, 4, 3, 3, 2, 2), n_kernels=(1, 2, 4, 8, 8, 8),
        attn_resolutions=(16, 32, 64), attn_heads=16,
    ),
    # 128 -> 1024 (project's choice; the paper shows 1K-4K results but gives no such
    # model): full's structure one octave higher (128 -> 16 -> 1024), the same widths per
    # network scale, so 64 channels at 1024 px; attention at 32 and 64 px only (a 128 px
    # map has 16384 tokens). 352.4M parameters with text_dim 768.
    "full1024": UpsamplerConfig(
        in_resolution=128, out_resolution=1024, z_dim=128, w_dim=1024, mapping_layers=4,
        text_width=768, text_depth=3, text_heads=12,
        channels=(1024, 1024, 1024, 512, 256, 128, 64),
        down_blocks=(1, 1, 1), up_blocks=(3, 4, 3, 3, 2, 2), n_kernels=(1, 2, 4, 8, 8, 8),
        attn_resolutions=(32, 64), attn_heads=16,
    ),
}

# The MS-I/O discriminator (04) that judges each preset's pyramid: resolution = R. Widths are
# this project's choice (the paper gives no upsampler D size): tiny C(r) = min(2048 / r, 64)
# = 16, 32, 64, 64, ... at 128, 64, 32, 16 px (0.88M parameters with text_dim 128); full /
# full1024 are 04's full D read at 512 / 1024 px, C(r) = min(32768 / r, 1024) (405.2M / 422.3M
# with ViT-L/14's text_dim 768).
U_D_PRESETS = {
    "tiny": DiscriminatorConfig(resolution=128, channel_base=2048, channel_max=64),
    "full": dataclasses.replace(D_PRESETS["full"], resolution=512),
    "full1024": dataclasses.replace(D_PRESETS["full"], resolution=1024),
}


# -----------------------------------------------------------------------------
# Low-res inputs: the training pairs and the noise augmentation


def resize(images, size):
    """(B, C, H, W) -> (B, C, size, size), bicubic, anti-aliased when shrinking.

    PIL's bicubic (Keys a = -0.5; when shrinking, the kernel is stretched by the factor so
    that every input pixel contributes: a low-pass filter before sampling, no aliasing).
    """
    if images.shape[-1] == size and images.shape[-2] == size:
        return images                                         # exact identity, no filtering
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def make_lowres(images, in_resolution):
    """Real high-res images (B, 3, R, R) in [-1, 1] -> the upsampler's input (B, 3, r, r) in [-1, 1].

    Anti-aliased bicubic (resize), clamped: bicubic overshoots a little at sharp edges.
    Without the low-pass, x[..., ::k, ::k] would turn fine texture into false patterns
    (a one-pixel checkerboard into a flat wrong colour) that a real small image never has.
    """
    B, C, H, W = images.shape
    assert C == 3 and H == W and H % in_resolution == 0, (images.shape, in_resolution)
    return resize(images, in_resolution).clamp(-1, 1)        # (B, 3, r, r)


def add_input_noise(x, sigma, generator=None):
    """x + sigma_b * n, n ~ N(0, 1) per pixel: x (B, C, H, W), sigma (B,) one std per image."""
    B = x.shape[0]
    assert sigma.shape == (B,), (sigma.shape, B)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # (B, C, H, W)
    return x + sigma.view(B, 1, 1, 1).to(x.dtype) * noise     # (B, C, H, W)


def augment_lowres(x, max_sigma, generator=None, return_sigma=False):
    """Gaussian noise augmentation (paper Sec. 3.4) with a random strength per image.

    sigma_b ~ U(0, max_sigma), drawn per image, so the network sees every strength from
    clean to max_sigma (a uniform law is this project's choice; the network is not
    told sigma_b). x (B, C, H, W) in [-1, 1]; the result is not clamped (the noise is the
    point). Returns x + sigma_b * n, or (that, sigma (B,)) with return_sigma.
    """
    B = x.shape[0]
    sigma = torch.rand(B, generator=generator, device=x.device, dtype=x.dtype) * max_sigma  # (B,)
    x = add_input_noise(x, sigma, generator)                 # (B, C, H, W)
    return (x, sigma) if return_sigma else x


def inference_sigma(cfg):
    """The std of the Gaussian noise added to x_lr at inference by default (sample.py).

    The paper applies the augmentation "during training and inference" but gives no
    strength: a quarter of the training maximum is this project's choice - a strength that
    three quarters of the training draws U(0, noise_aug_sigma) exceed, so one the network
    has learnt to remove (tiny: 0.005, full: 0.05 in [-1, 1] units). At half the maximum the
    tiny U's default output was 0.78x bicubic's error, at a quarter 0.62x, and trained on
    clean inputs it was 1.43x (NOTES.md, "Upsampler input noise").
    """
    return cfg.noise_aug_sigma / 4


# -----------------------------------------------------------------------------
# The decoder scale: skip concat -> SynthesisBlocks -> ToRGB


class DecoderScale(nn.Module):
    """One scale of the upsampling path, at resolution res (input already upsampled 2x):

        x   = cat(upsample2x(x_coarse), skip)  (skip only where the encoder has this scale)
        y   = blocks(x, w, t_local)            03's SynthesisBlock: adaptive conv (Eq. 1-2)
                                               [-> self-attention with w -> cross-attention (Eq. 5)]
        x   = (y + conv1x1(x)) / sqrt(2)       a residual block (paper); the 1x1 form, as
                                               04's DownBlock, is StyleGAN2's (project's choice)
        rgb = ToRGB(x, w)                      this scale's residual detail, (B, 3, res, res)
    The 2x upsampling is a fixed bilinear resize outside the conv ("resize-convolution"; 01's
    up=2 computes the resize and its conv together, as a transposed conv), so the skip can be
    concatenated at the new size first.
    """

    def __init__(
        self,
        in_channels,      # C of the upsampled coarse features + C of the skip
        out_channels,     # C at this scale
        resolution,       # res, side of this scale (px)
        blocks,           # SynthesisBlocks at this scale
        w_dim,            # S
        text_width,       # C of t_local
        n_kernels,        # N of every conv's bank
        self_attention,   # an L2 self-attention layer in every block
        cross_attention,  # a cross-attention layer to t_local in every block
        heads,            # attention heads
        kernel_size,      # K
        rgb_init,         # ToRGB weights scaled by this at init
    ):
        super().__init__()
        self.resolution = resolution
        self.blocks = nn.ModuleList([
            SynthesisBlock(
                in_channels=in_channels if b == 0 else out_channels,
                out_channels=out_channels,
                resolution=resolution,
                w_index=0,                                    # one w for every layer (ws has one row)
                w_dim=w_dim,
                text_width=text_width,
                n_kernels=n_kernels,
                up=1,                                         # upsampled before, see the docstring
                self_attention=self_attention,
                cross_attention=cross_attention,
                heads=heads,
                kernel_size=kernel_size,
            ) for b in range(blocks)])
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False)  # the residual path, linear
        self.torgb = ToRGB(out_channels, w_dim, w_index=0)
        with torch.no_grad():
            self.torgb.weight.mul_(rgb_init)                  # the residual starts small: output ~ resize(x_lr)

    def forward(self, x, ws, t_local, local_mask, noise_mode):
        """x (B, C_in, res, res), ws (B, 1, S), t_local (B, L, C_t), local_mask (B, L)
        -> features (B, C_out, res, res), rgb (B, 3, res, res)."""
        y = x
        for block in self.blocks:
            y = block(y, ws, t_local, local_mask, noise_mode)  # (B, C_out, res, res)
        x = (y + self.skip(x)) * math.sqrt(0.5)              # (B, C_out, res, res) keeps unit variance
        return x, self.torgb(x, ws)                          # (B, C_out, res, res), (B, 3, res, res)


# -----------------------------------------------------------------------------
# The upsampler


class Upsampler(nn.Module):
    """U(x_lr, z, tokens, mask, eot) -> image pyramid [x_R, ..., x_4], finest first.

    Lower-level pieces: U.text_encoder (T), U.mapping (M), U.encode (x_lr -> skips),
    U.decode (skips, w, t_local -> pyramid), U.augment (the noise augmentation rule).
    """

    def __init__(
        self,
        cfg,        # UpsamplerConfig
        text_dim,   # D, width of the CLIP token features (768 for ViT-L/14)
    ):
        super().__init__()
        self.cfg, self.text_dim = cfg, text_dim
        ch = dict(zip(cfg.scales, cfg.channels))             # side (px) -> C
        r = cfg.in_resolution
        # text and style, as in the base G (03); the upsampler has its own copies
        self.text_encoder = TextEncoder(text_dim, cfg.text_width, cfg.text_depth, cfg.text_heads)
        self.mapping = MappingNetwork(cfg.z_dim, cfg.text_width, cfg.w_dim, cfg.mapping_layers,
                                      cfg.mapping_lr_mul, cfg.w_avg_beta)
        # encoder: stem at r px, then per scale residual blocks ending in a halving (04's
        # StyleGAN2 D block: blur-downsample, residual, unmodulated). Style and text enter
        # only the decoder (project's choice: the encoder just reads the image).
        self.stem = EqualConv2d(3, ch[r], cfg.kernel_size, activation="lrelu")
        self.encoder = nn.ModuleList([
            EncoderScale(ch[res], ch[res // 2], n, attention=False, heads=1)
            for res, n in zip(cfg.encoder_scales[::-1], cfg.down_blocks[::-1])])  # run fine to coarse
        # decoder: one DecoderScale per doubling, concatenating the skip where one exists (<= r px)
        self.decoder = nn.ModuleList([
            DecoderScale(
                in_channels=ch[res // 2] + (ch[res] if res <= r else 0),
                out_channels=ch[res],
                resolution=res,
                blocks=cfg.up_blocks[s],
                w_dim=cfg.w_dim,
                text_width=cfg.text_width,
                n_kernels=cfg.n_kernels[s],
                self_attention=cfg.self_attention and res in cfg.attn_resolutions,
                cross_attention=cfg.cross_attention and res in cfg.attn_resolutions,
                heads=cfg.attn_heads,
                kernel_size=cfg.kernel_size,
                rgb_init=cfg.rgb_init,
            ) for s, res in enumerate(cfg.decoder_scales)])

    def augment(self, x_lr, noise_aug=None):
        """The noise augmentation rule: x_lr (B, 3, r, r) -> (B, 3, r, r).

        noise_aug None: augment_lowres with max cfg.noise_aug_sigma (a random sigma per
        image) in training mode, nothing in eval mode. A float: that sigma for every image,
        in either mode (0 = off). A tensor () or (B,): per-image sigmas, in either mode.
        """
        B = x_lr.shape[0]
        if noise_aug is None:
            return augment_lowres(x_lr, self.cfg.noise_aug_sigma) if self.training else x_lr
        sigma = torch.as_tensor(noise_aug, device=x_lr.device, dtype=x_lr.dtype)
        assert sigma.dim() == 0 or sigma.shape == (B,), f"noise_aug: a float or (B,), got {tuple(sigma.shape)}"
        return add_input_noise(x_lr, sigma.expand(B))        # (B, 3, r, r)

    def encode(self, x_lr):
        """x_lr (B, 3, r, r) -> skips {side: (B, C, side, side)} for r, r/2, ..., b."""
        # EXERCISE: stem, then each encoder scale; keep every side's features as a skip {side: features}
        ### BEGIN SOLUTION
        x = self.stem(x_lr)                                  # (B, C_r, r, r)
        skips = {x.shape[-1]: x}
        for scale in self.encoder:
            x = scale(x)                                     # (B, C_{s/2}, s/2, s/2) halved
            skips[x.shape[-1]] = x
        ### END SOLUTION
        return skips

    def decode(self, x_lr, skips, w, t_local, local_mask, noise_mode="random"):
        """Decoder and output pyramid. x_lr (B, 3, r, r) the (augmented) input, skips from
        encode, w (B, S), t_local (B, L, C_t), local_mask (B, L) -> [x_R, ..., x_4].

        Residual pyramid (project's choice): at every decoder scale s
            res_s = upsample2x(res_{s/2}) + ToRGB_s(f_s)        (StyleGAN2's skip outputs)
            x_s   = base_s + res_s
        with base_s the input at side s: bicubic upsampling above r, x_lr itself at r, and
        repeated downsample2x below r (the filter of D's real pyramid, train.py). Levels
        coarser than the first decoder scale are downsample2x of the next finer level.
        """
        cfg, B = self.cfg, x_lr.shape[0]
        ws = w.unsqueeze(1)                                  # (B, 1, S) the one style row (w_index 0)
        bases = {cfg.in_resolution: x_lr}                    # side -> (B, 3, side, side)
        for s in reversed([s for s in cfg.decoder_scales if s < cfg.in_resolution]):
            bases[s] = downsample2x(bases[2 * s])            # (B, 3, s, s)
        x, res, pyramid = skips[cfg.bottleneck], None, []    # x (B, C_b, b, b)
        for scale in self.decoder:
            s = scale.resolution
            x = upsample2x(x)                                # (B, C, s, s)
            if s in skips:
                x = torch.cat([x, skips[s]], dim=1)          # (B, C + C_skip, s, s) U-Net skip
            x, rgb = scale(x, ws, t_local, local_mask, noise_mode)  # (B, C_s, s, s), (B, 3, s, s)
            res = rgb if res is None else upsample2x(res) + rgb  # (B, 3, s, s) accumulated residual
            base = bases[s] if s in bases else resize(x_lr, s)  # (B, 3, s, s)
            pyramid.append(base + res)                       # coarse to fine so far
        while len(pyramid) < cfg.levels:
            pyramid.insert(0, downsample2x(pyramid[0]))      # levels below 2b: blur-downsampled
        pyramid = pyramid[::-1]                              # finest first: [x_R, ..., x_4]
        for i, x_i in enumerate(pyramid):
            side = cfg.out_resolution >> i
            assert x_i.shape == (B, 3, side, side), (i, x_i.shape)
        return pyramid

    def forward(self, lowres, z, tokens, mask, eot, noise_aug=None, noise_mode="random"):
        """lowres (B, 3, r, r) in [-1, 1], z (B, z_dim), tokens (B, L, D), mask (B, L) bool,
        eot (B,) long; noise_aug None | float | (B,) tensor (see augment); noise_mode
        "random" | "const" | "none" (the StyleGAN noise inputs) -> pyramid finest first,
        [(B, 3, R, R), ..., (B, 3, 4, 4)]."""
        cfg, B = self.cfg, lowres.shape[0]
        assert lowres.shape == (B, 3, cfg.in_resolution, cfg.in_resolution), (lowres.shape, cfg.in_resolution)
        assert z.shape == (B, cfg.z_dim), z.shape
        assert tokens.shape[0] == B and tokens.shape[2] == self.text_dim, (tokens.shape, self.text_dim)
        assert noise_mode in NOISE_MODES, noise_mode
        lowres = self.augment(lowres, noise_aug)             # (B, 3, r, r) training: + sigma_b * n
        t_local, local_mask, t_global = self.text_encoder(tokens, mask, eot)  # (B, L, C_t), (B, L), (B, C_t)
        w = self.mapping(z, t_global)                        # (B, S)
        skips = self.encode(lowres)                          # {side: (B, C, side, side)}
        return self.decode(lowres, skips, w, t_local, local_mask, noise_mode)


# -----------------------------------------------------------------------------
# Metrics of an upsampler: closer to the real image than bicubic, and as sharp as it


def sharpness(images):
    """Gradient magnitude of images (B, C, H, W) -> float: the root mean square over pixels
    and channels of |grad x| = sqrt(dx^2 + dy^2), with forward differences
    dx = x[i, j+1] - x[i, j], dy = x[i+1, j] - x[i, j].

    Root mean SQUARE, not the plain mean: blurring a monotone edge of height h over k pixels
    keeps the sum of |dx| (k steps of h/k) but divides the sum of dx^2 by k (k (h/k)^2), so
    only the squared form sees blur on images of flat regions and edges (the shapes data).
    """
    # EXERCISE: forward differences dx, dy on (H-1, W-1); the RMS of sqrt(dx^2 + dy^2)
    ### BEGIN SOLUTION
    dx = images[..., :-1, 1:] - images[..., :-1, :-1]         # (B, C, H-1, W-1)
    dy = images[..., 1:, :-1] - images[..., :-1, :-1]         # (B, C, H-1, W-1)
    return (dx.square() + dy.square()).mean().sqrt().item()
    ### END SOLUTION


@torch.no_grad()
def restoration_metrics(out, lowres, highres):
    """An upsampler's output (B, 3, R, R), clamped to [-1, 1], against the real high-res images
    and against bicubic resize(lowres), the baseline -> dict of floats:
        mae, mae_bicubic         mean |x - highres| of the output and of bicubic
        sharpness, sharpness_bicubic, sharpness_real   RMS gradient magnitude (sharpness())
    Shared by upsampling_metrics below and sample.py's evaluate_upsampler (the user's path)."""
    R = highres.shape[-1]
    assert out.shape == highres.shape, (out.shape, highres.shape)
    highres = highres.to(out.device)
    bicubic = resize(lowres.to(out.device), R).clamp(-1, 1)  # (B, 3, R, R) the baseline
    return {"mae": (out - highres).abs().mean().item(),
            "mae_bicubic": (bicubic - highres).abs().mean().item(),
            "sharpness": sharpness(out),
            "sharpness_bicubic": sharpness(bicubic),
            "sharpness_real": sharpness(highres)}


@torch.no_grad()
def upsampling_metrics(U, lowres, highres, tokens, mask, eot, seed=0):
    """How well U restores real high-res images from their low-res versions -> dict of floats.

    lowres (B, 3, r, r) = make_lowres(highres), highres (B, 3, R, R) the real images,
    tokens/mask/eot their captions' CLIP features. U runs in eval mode (no noise
    augmentation), with constant noise and z from `seed`; outputs are clamped to [-1, 1]
    as saved images are. Returns restoration_metrics(U's output, lowres, highres).
    The training target: mae well below mae_bicubic, sharpness near sharpness_real.
    """
    B, R = lowres.shape[0], U.cfg.out_resolution
    assert highres.shape == (B, 3, R, R), (highres.shape, R)
    was_training = U.training
    U.eval()
    z = torch.randn(B, U.cfg.z_dim, generator=torch.Generator().manual_seed(seed)).to(lowres.device)
    try:
        out = U(lowres, z, tokens, mask, eot, noise_mode="const")[0].clamp(-1, 1)  # (B, 3, R, R)
    finally:
        U.train(was_training)
    return restoration_metrics(out, lowres, highres)


# -----------------------------------------------------------------------------


def demo():
    torch.manual_seed(0)
    cfg, D, B = U_PRESETS["tiny"], 128, 2
    U = Upsampler(cfg, text_dim=D).eval()
    print(f"tiny upsampler {cfg.in_resolution} -> {cfg.out_resolution} px (x{cfg.factor}): "
          f"{count_parameters(U):,} parameters; encoder {cfg.encoder_scales[::-1]} -> {cfg.bottleneck} px, "
          f"decoder {cfg.decoder_scales} px")
    with torch.device("meta"):                                # sizes only, no memory
        for name, text_dim in (("full", 768), ("full1024", 768)):
            c = U_PRESETS[name]
            n = count_parameters(Upsampler(c, text_dim=text_dim))
            print(f"{name} upsampler {c.in_resolution} -> {c.out_resolution} px: {n / 1e6:.1f}M parameters"
                  + (" (paper: 359.1M)" if name == "full" else ""))

    g = torch.Generator().manual_seed(0)
    highres = torch.rand(B, 3, cfg.out_resolution, cfg.out_resolution, generator=g) * 2 - 1  # stand-in reals
    lowres = make_lowres(highres, cfg.in_resolution)          # (B, 3, r, r)
    tokens, mask, eot = random_text(B, D=D)
    z = torch.randn(B, cfg.z_dim)
    with torch.no_grad():
        pyramid = U(lowres, z, tokens, mask, eot, noise_mode="const")
    print(f"lowres {tuple(lowres.shape)} -> pyramid (finest first):", [tuple(x.shape) for x in pyramid])
    d_cfg = U_D_PRESETS["tiny"]
    assert len(pyramid) == d_cfg.levels == cfg.levels, "the pyramid must match the MS-I/O D at R px"
    print(f"judged by 04's Discriminator(DiscriminatorConfig(resolution={d_cfg.resolution}, ...)), "
          f"{d_cfg.levels} levels")

    # residual design: at init the output is the bicubic upsampling plus a small residual
    bicubic = resize(lowres, cfg.out_resolution)
    print(f"init: mean |x_R - bicubic(x_lr)| = {(pyramid[0] - bicubic).abs().mean():.3f} "
          f"(residual starts small, rgb_init={cfg.rgb_init})")

    # the concept: the text changes the output (same image, same z, same noise)
    with torch.no_grad():
        other = U(lowres, z, *random_text(B, D=D, seed=1), noise_mode="const")
    change = (other[0] - pyramid[0]).abs().mean().item()
    print(f"another prompt changes the output by {change:.4f} on average")
    assert change > 1e-4, "the upsampler ignores the text"

    # noise augmentation: off in eval (deterministic with const noise), on when asked
    with torch.no_grad():
        again = U(lowres, z, tokens, mask, eot, noise_mode="const")
        noisy = U(lowres, z, tokens, mask, eot, noise_aug=0.2, noise_mode="const")
    assert torch.equal(again[0], pyramid[0]), "eval mode must not augment unless asked"
    print(f"eval: no input noise (identical outputs); noise_aug=0.2 changes the output by "
          f"{(noisy[0] - pyramid[0]).abs().mean():.3f}")
    x_aug, sigma = augment_lowres(lowres, cfg.noise_aug_sigma, generator=g, return_sigma=True)
    measured = (x_aug - lowres).flatten(1).std(dim=1)        # (B,) empirical noise std per image
    print("training: sigma per image", [round(v, 3) for v in sigma.tolist()],
          "measured", [round(v, 3) for v in measured.tolist()])
    metrics = upsampling_metrics(U, lowres, highres, tokens, mask, eot)
    print("metrics against the real images (untrained, so about bicubic's):",
          {k: round(v, 3) for k, v in metrics.items()})
    print("ok")


if __name__ == "__main__":
    demo()


# -----------------------------------------------------------------------------
# Exercises. Each says what to change, what to look for, and which test or demo checks it.
# (The ### BEGIN / END SOLUTION regions above are the other kind: `python make_student_copy.py`
# cuts them out for students, and tests/test_student_copy.py lists the tests that grade them.)
#
# 1. Skips. Make decode read only the bottleneck (no torch.cat of skips; DecoderScale's
#    in_channels change to match). Look for: the output still starts at bicubic (the residual
#    design); do the test's few L1 steps shrink the error as much? Check: pytest
#    tests/test_upsampler.py -k residual_starts_at_bicubic
# 2. Noise augmentation. In the demo, print the change of the output for noise_aug 0, 0.05, 0.2
#    and check the measured noise std against sigma. Look for: eval mode adds nothing unless asked.
#    Check: pytest tests/test_upsampler.py -k noise_augmentation
# 3. Sharpness. Blur a shapes image with a Gaussian of sigma 0.5, 1, 2 px and print sharpness();
#    then replace its root mean square by the plain mean of |grad|. Look for: which of the two
#    falls with blur (the docstring's edge argument). Check: pytest tests/test_upsampler.py -k sharpness
# 4. Aliasing. Make a one-pixel checkerboard at 128 px and compare make_lowres with x[..., ::4, ::4].
#    Look for: the plain subsampling turns it into a flat, wrong colour. Check: pytest
#    tests/test_upsampler.py -k anti_aliased
# 5. The residual's start. Set rgb_init=1.0 in UpsamplerConfig and rerun the demo. Look for: the
#    init distance to bicubic grows from near 0. Check: pytest tests/test_upsampler.py -k init_output
