"""
03 - The GigaGAN generator (Kang et al. 2023, Sec. 3.1-3.2, Fig. 4; Eq. 1-2 and 5).

What. A text-conditioned StyleGAN2 made bigger in the three ways the paper found stable:

    prompt -> frozen CLIP (00) -> tokens (B, L, D), mask (B, L), eot (B,)
           -> text encoder T (learned attention layers)    -> t_local (B, L, C), t_global (B, C)
    z, t_global -> mapping network M                        -> w (B, S)
    w -> one style per layer, ws (B, num_ws, S)
    learned constant (4 px) -> per scale, several blocks of
           adaptive conv (01, Eq. 1-2: a kernel bank mixed per sample, modulated by w)
        -> self-attention with L2 logits over the pixels and w as one more token (02, Eq. 5)
        -> cross-attention to t_local (02, Eq. 5)
       and a ToRGB at every scale -> the image pyramid [x_R, ..., x_8, x_4], finest first

Why. A StyleGAN2 conv has one kernel for all samples and sees only a 3x3 neighbourhood;
for open-world text that is too little capacity and too little context. GigaGAN adds a
bank of kernels chosen per sample from w (capacity at almost no compute), attention layers
interleaved with the convs (global context, and word-level text through cross-attention),
more blocks per scale (depth), and an output pyramid that the multi-scale discriminator
(04) judges level by level.

Sampling controls are plain arguments, never hooks or iterators:
    truncation   w' = w_m + psi (w - w_m), w_m the per-prompt mean w_c, the global mean, or a blend
    style mixing ws[:, :k] from one w, ws[:, k:] from another          (style_mixing)
    prompt mixing coarse blocks get one prompt's t_local, fine blocks another's (prompt_mixing)
    prompt interpolation: lerp t_global / t_local and w between prompts, same z (Fig. 7)

Run: python 03_generator.py   (tiny generator on random text; seconds on a CPU)

Shape legend (shared by every numbered file):
    B batch, C channels, H W height width, N kernels in a bank, S style (w) width,
    L text tokens, D text width (CLIP), E embedding width, K kernel size.
"""
import dataclasses
import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

_kernels = importlib.import_module("01_kernel_selection")
EqualLinear = _kernels.EqualLinear            # equalized-LR linear layer
AdaptiveConv2d = _kernels.AdaptiveConv2d      # kernel bank + modulation + noise (Eq. 1-2)
modulated_conv2d = _kernels.modulated_conv2d  # StyleGAN2 modulated conv (used by ToRGB)
upsample2x = _kernels.upsample2x              # fixed-blur 2x upsampling

_attention = importlib.import_module("02_attention")
TransformerBlock = _attention.TransformerBlock          # the blocks of T
ImageSelfAttention = _attention.ImageSelfAttention      # L2 self-attention over pixels
ImageCrossAttention = _attention.ImageCrossAttention    # pixels attend to t_local (Eq. 5)


# -----------------------------------------------------------------------------
# Configuration. Tuples run coarse to fine: entry s belongs to the scale 4 * 2**s px,
# i.e. (4, 8, 16, 32) for a 32 px generator and (4, 8, 16, 32, 64) for 64 px.


@dataclass
class GeneratorConfig:
    resolution: int = 32                      # R, side of the finest pyramid level; levels R, R/2, ..., 4
    z_dim: int = 128                          # width of the latent z (paper: 128)
    w_dim: int = 128                          # S, width of the style w (paper: unstated, project's choice)
    mapping_layers: int = 2                   # EqualLinear layers in M (paper: 4 at full size)
    mapping_lr_mul: float = 0.01              # learning-rate multiplier of M (StyleGAN2's value; project's choice)
    w_avg_beta: float = 0.998                 # EMA decay of the tracked global mean of w (StyleGAN2-ADA's value)
    text_width: int = 128                     # C of t_local / t_global, T's output width (project's choice)
    text_depth: int = 1                       # TransformerBlocks in T (0 = projection only; project's choice)
    text_heads: int = 2                       # attention heads in T
    channels: tuple = (64, 64, 64, 32)        # feature channels per scale, coarse to fine
    blocks_per_scale: tuple = (1, 2, 1, 1)    # conv(+attention) blocks per scale; the first one of a scale > 4 px upsamples
    n_kernels: tuple = (1, 2, 2, 2)           # N, kernels in each conv's bank per scale (1 = StyleGAN2 conv)
    attn_resolutions: tuple = (8, 16)         # scales (px) whose blocks get self- and cross-attention
    attn_heads: int = 2                       # heads of the image attention layers
    self_attention: bool = True               # Table 1 switch: L2 self-attention after each conv at attn_resolutions
    attention_w_token: bool = True            # paper (Eq. 5): the self-attention also sees w as one more token
    cross_attention: bool = True              # Table 1 switch: cross-attention to t_local after it
    kernel_size: int = 3                      # K of the synthesis convs
    noise: bool = True                        # StyleGAN2's per-pixel noise inputs in every conv (off in "tiny", see there)

    def __post_init__(self):
        # tuples may arrive as lists (from a checkpoint's plain-dict config or a CLI flag)
        for name in ("channels", "blocks_per_scale", "n_kernels", "attn_resolutions"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        log2 = int(math.log2(self.resolution))
        assert self.resolution == 2**log2 and self.resolution >= 8, f"resolution {self.resolution}: a power of 2, >= 8"
        n_scales = log2 - 1                                   # 4, 8, ..., R
        for name in ("channels", "blocks_per_scale", "n_kernels"):
            assert len(getattr(self, name)) == n_scales, f"{name} needs {n_scales} entries (4 px .. {self.resolution} px)"
        assert all(b >= 1 for b in self.blocks_per_scale), "every scale needs at least one block"

    @property
    def scales(self):
        """Side of every scale, coarse to fine: [4, 8, ..., R]."""
        return [4 * 2**s for s in range(len(self.channels))]


# Presets: one code path, sizes only. Every number not in the paper is ours.
G_PRESETS = {
    # 32 px, ~0.75M parameters with text_dim 128 (the dataclass defaults): trains on the shapes toy set on a
    # 2-core CPU in minutes. Channels and depth are cut to what one fwd+bwd at batch 16
    # affords in well under 0.15 s; attention only at 8 and 16 px (at 32 px it would cost most).
    # M at the full learning rate: here M carries t_global into w (NOTES.md, "Mapping network learning rate").
    # No per-pixel noise inputs: G used them to speckle its edges (NOTES.md, "Per-pixel noise inputs").
    "tiny": GeneratorConfig(mapping_lr_mul=1.0, noise=False),
    # 64 px for one 8-24 GB GPU (project's choice of sizes), every component switched on.
    "small": GeneratorConfig(
        resolution=64, z_dim=128, w_dim=512, mapping_layers=4,
        text_width=256, text_depth=2, text_heads=4,
        channels=(512, 512, 256, 256, 128), blocks_per_scale=(1, 2, 2, 2, 2),
        n_kernels=(1, 2, 4, 4, 4), attn_resolutions=(8, 16, 32), attn_heads=4,
    ),
    # The paper's 64 px base model. From the paper: z 128, 4 mapping layers, CLIP ViT-L/14
    # tokens (text_dim 768), attention interleaved with several convs per scale (w as a token
    # of each self-attention), banks growing with resolution. Everything else (w 1024, T 3 x
    # 768, channels, blocks per scale, N per scale, attention up to 32 px) is this project's
    # choice, calibrated so that the count matches the published 652.5M: 653.6M here (+0.2%;
    # T 20.1M, M 5.1M, synthesis 628.4M, of which 11.5M map w to the attention tokens).
    "full": GeneratorConfig(
        resolution=64, z_dim=128, w_dim=1024, mapping_layers=4,
        text_width=768, text_depth=3, text_heads=12,
        channels=(1024, 1024, 1024, 768, 512), blocks_per_scale=(3, 4, 4, 4, 4),
        n_kernels=(1, 2, 4, 8, 8), attn_resolutions=(8, 16, 32), attn_heads=8,
    ),
}


def table1_config(cfg, row):
    """The generator side of a row of the paper's Table 1, as a config derived from `cfg`.

    Rows (cumulative, as in the table): "stylegan2" (text enters only through M: no attention,
    N = 1, StyleGAN2's depth of one block at 4 px and two per later scale), "+attention"
    (self- and cross-attention on), "+adaptive_conv" (cfg's kernel banks), "+deeper" (cfg's
    blocks per scale, i.e. cfg itself). The loss / discriminator rows live in 04 and 05.
    The shallow rows never use more blocks than cfg: for tiny, whose depth is already below
    StyleGAN2's, "+deeper" is the same network as "+adaptive_conv".
    """
    n = len(cfg.channels)
    stylegan2 = (1,) + (2,) * (n - 1)                          # StyleGAN2: 1 conv at 4 px, 2 per scale after
    shallow = tuple(min(a, b) for a, b in zip(stylegan2, cfg.blocks_per_scale))  # capped by cfg
    rows = {
        "stylegan2": dict(self_attention=False, cross_attention=False, n_kernels=(1,) * n, blocks_per_scale=shallow),
        "+attention": dict(n_kernels=(1,) * n, blocks_per_scale=shallow),
        "+adaptive_conv": dict(blocks_per_scale=shallow),
        "+deeper": dict(),
    }
    assert row in rows, f"unknown Table 1 row {row!r}; choose from {list(rows)}"
    return dataclasses.replace(cfg, **rows[row])


# -----------------------------------------------------------------------------
# Text encoder T (Sec. 3.2, "Text and latent-code conditioning", Fig. 4): t_local, t_global


class TextEncoder(nn.Module):
    """Learned attention layers T on top of frozen CLIP token features.

    t_global = T's output at the end-of-text (EOT) position: CLIP pools the sentence there.
    t_local  = every token but EOT (paper: "all but the EOT token"), with the padding mask.
    Used by G (t_global -> mapping, t_local -> cross-attention) and by D (04) for t_D.
    """

    def __init__(
        self,
        text_dim,    # D, width of the CLIP token features
        width,       # C, width of t_local and t_global
        depth,       # number of TransformerBlocks (0: just the linear projection)
        heads,       # attention heads per block
    ):
        super().__init__()
        self.text_dim, self.width = text_dim, width
        self.proj = EqualLinear(text_dim, width)              # D -> C, no nonlinearity
        self.blocks = nn.ModuleList([TransformerBlock(width, heads) for _ in range(depth)])

    def forward(self, tokens, mask, eot):
        """tokens (B, L, D), mask (B, L) bool True = real token, eot (B,) long
        -> t_local (B, L, C), local_mask (B, L) bool, t_global (B, C)."""
        B, L, D = tokens.shape
        assert D == self.text_dim, f"text width {D} != text_dim {self.text_dim}"
        assert mask.shape == (B, L) and mask.dtype == torch.bool, (mask.shape, mask.dtype)
        assert eot.shape == (B,), eot.shape
        x = self.proj(tokens)                                  # (B, L, C)
        for block in self.blocks:
            x = block(x, mask)                                 # (B, L, C), padding never attended
        batch = torch.arange(B, device=x.device)               # (B,)
        t_global = x[batch, eot]                               # (B, C), gather at EOT, no loop
        positions = torch.arange(L, device=x.device)           # (L,)
        local_mask = mask & (positions[None, :] != eot[:, None])  # (B, L), EOT removed
        return x, local_mask, t_global


# -----------------------------------------------------------------------------
# Mapping network M (Sec. 3.2, "Text and latent-code conditioning"): w = M(z, t_global)


def normalize_2nd_moment(x, eps=1e-8):
    """x / sqrt(mean(x^2)) over features: every row gets unit RMS (StyleGAN's "pixel norm")."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()  # (B, F)


class MappingNetwork(nn.Module):
    """w = M(z, t_global): an MLP on [normalised z, normalised embedding of t_global].

    The concatenation follows StyleGAN2-ADA's conditional mapping (project's choice; the paper
    only says M takes z and t_global). Also tracks w_avg, the running mean of w over training,
    the target of global truncation.
    """

    def __init__(
        self,
        z_dim,        # width of z
        text_width,   # C, width of t_global
        w_dim,        # S, width of w
        num_layers,   # EqualLinear layers (paper: 4)
        lr_mul,       # learning-rate multiplier of the layers (StyleGAN2: 0.01)
        w_avg_beta,   # EMA decay of w_avg
    ):
        super().__init__()
        self.z_dim, self.text_width, self.w_dim = z_dim, text_width, w_dim
        self.w_avg_beta = w_avg_beta
        self.embed = EqualLinear(text_width, w_dim)           # t_global -> S, the text's "class embedding"
        widths = [z_dim + w_dim] + [w_dim] * num_layers       # input, then every layer's output
        self.layers = nn.ModuleList([
            EqualLinear(widths[i], widths[i + 1], lr_mul=lr_mul, activation="lrelu") for i in range(num_layers)
        ])
        self.register_buffer("w_avg", torch.zeros(w_dim))     # (S,) running mean of w, a buffer (not trained)

    def forward(self, z, t_global, update_w_avg=None):
        """z (B, z_dim), t_global (B, C) -> w (B, S). update_w_avg defaults to self.training."""
        B = z.shape[0]
        assert z.shape == (B, self.z_dim), z.shape
        assert t_global.shape == (B, self.text_width), t_global.shape
        text = normalize_2nd_moment(self.embed(t_global))      # (B, S), unit RMS
        x = torch.cat([normalize_2nd_moment(z), text], dim=1)   # (B, z_dim + S)
        for layer in self.layers:
            x = layer(x)                                        # (B, S) leaky ReLU * sqrt(2)
        update = self.training if update_w_avg is None else update_w_avg
        if update:
            with torch.no_grad():                               # w_avg <- beta w_avg + (1 - beta) mean_batch(w)
                self.w_avg.copy_(x.detach().mean(dim=0).to(self.w_avg.dtype).lerp(self.w_avg, self.w_avg_beta))
        return x                                                # (B, S)


# -----------------------------------------------------------------------------
# Synthesis network: constant -> blocks (adaptive conv, self-attn, cross-attn) -> pyramid


NOISE_MODES = ("random", "const", "none")


class SynthesisBlock(nn.Module):
    """One GigaGAN layer, Eq. 5: f_{l+1} = g_xa(g_attn(g_adaconv(f_l, w), w), t_local).

        f = AdaptiveConv2d(f, w)                    g_adaconv, Eq. 1-2, upsamples 2x when up=2
        f = f + g * SelfAttention(LN([f; A(w)]))    g_attn: L2 logits, tied q/k, w as a token (02)
        f = f + g * CrossAttention(LN(f), t_local)  g_xa (02)
    with w = ws[:, w_index], the same style row for the conv and the self-attention.
    """

    def __init__(
        self,
        in_channels,      # C_in
        out_channels,     # C_out
        resolution,       # side of the output feature map (px)
        w_index,          # which row of ws (B, num_ws, S) this block's conv reads
        w_dim,            # S
        text_width,       # C of t_local
        n_kernels,        # N, kernels in the conv's bank
        up,               # 2 for the first block of a new scale, else 1
        self_attention,   # add an L2 self-attention layer
        cross_attention,  # add a cross-attention layer to t_local
        heads,            # heads of both attention layers
        kernel_size,      # K
        noise=True,       # a per-pixel noise input after the conv (StyleGAN2)
        w_token=True,     # the self-attention sees w as one more token (Eq. 5); False: pixels only
    ):
        super().__init__()
        self.resolution, self.w_index = resolution, w_index
        self.conv = AdaptiveConv2d(in_channels, out_channels, kernel_size, w_dim, n_kernels=n_kernels, up=up,
                                   noise=noise)
        self.self_attn = (ImageSelfAttention(out_channels, heads, w_dim=w_dim if w_token else None)
                          if self_attention else None)
        self.cross_attn = ImageCrossAttention(out_channels, text_width, heads) if cross_attention else None
        if noise:  # fixed noise image for noise_mode="const": a buffer, saved with the model
            self.register_buffer("noise_const", torch.randn(1, 1, resolution, resolution))

    def forward(self, x, ws, t_local, local_mask, noise_mode="random"):
        """x (B, C_in, r/up, r/up), ws (B, num_ws, S), t_local (B, L, C), local_mask (B, L) -> (B, C_out, r, r)."""
        if noise_mode == "random" or self.conv.noise is None:
            noise = None                                        # fresh N(0, 1) per sample, or no noise input at all
        elif noise_mode == "const":
            noise = self.noise_const                            # (1, 1, r, r) shared by the batch
        else:
            noise = torch.zeros_like(self.noise_const)          # (1, 1, r, r) no stochastic detail
        w = ws[:, self.w_index]                                 # (B, S) this block's style row
        x = self.conv(x, w, noise)                              # (B, C_out, r, r)
        if self.self_attn is not None:
            x = self.self_attn(x, w if self.self_attn.w_dim else None)  # (B, C_out, r, r), w a token
        if self.cross_attn is not None:
            x = self.cross_attn(x, t_local, local_mask)         # (B, C_out, r, r)
        return x


class ToRGB(nn.Module):
    """Features -> RGB with a modulated 1x1 conv, no demodulation (StyleGAN2's tRGB)."""

    def __init__(
        self,
        in_channels,  # C
        w_dim,        # S
        w_index,      # which row of ws this layer reads
    ):
        super().__init__()
        self.w_index = w_index
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)  # styles s = A(w), start at 1
        self.weight = nn.Parameter(torch.randn(3, in_channels, 1, 1))  # (3, C, 1, 1) stored unit normal
        self.bias = nn.Parameter(torch.zeros(3))
        self.weight_gain = 1 / math.sqrt(in_channels)          # equalized LR: 1 / sqrt(fan_in)

    def forward(self, x, ws):
        """x (B, C, H, W), ws (B, num_ws, S) -> (B, 3, H, W)."""
        styles = self.affine(ws[:, self.w_index]) * self.weight_gain  # (B, C), gain folded into s
        # no demodulation: the output scale must stay free to encode colour intensity
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, padding=0)  # (B, 3, H, W)
        return x + self.bias.view(1, 3, 1, 1)                  # (B, 3, H, W)


class Synthesis(nn.Module):
    """ws (B, num_ws, S), t_local -> image pyramid [x_R, ..., x_4], finest first.

    Style index map (a fixed, named assignment, listed by `w_names`): rows of ws are given
    out coarse to fine, at each scale first to its blocks' convs in order, then to its ToRGB.
    E.g. tiny: 0 "4px.block0", 1 "4px.torgb", 2 "8px.block0", 3 "8px.block1", 4 "8px.torgb", ...
    So ws[:, :k] controls everything coarser than w_names[k]: style mixing is a slice.

    Pyramid (project's choice: StyleGAN2's "skip" generator): x_4 = ToRGB_4(f_4) and
    x_r = upsample2x(x_{r/2}) + ToRGB_r(f_r). Each level is the image at that scale, each
    finer level only adds detail, and the final image's gradient reaches every ToRGB.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.scales = cfg.scales                                # [4, 8, ..., R]
        self.const = nn.Parameter(torch.randn(cfg.channels[0], 4, 4))  # (C_4, 4, 4) learned input
        blocks, torgbs, names, scale_blocks = [], [], [], []
        for s, res in enumerate(self.scales):
            scale_blocks.append([])
            for b in range(cfg.blocks_per_scale[s]):
                first = b == 0 and s > 0                        # first block of a new scale upsamples
                attn = res in cfg.attn_resolutions
                scale_blocks[s].append(len(blocks))
                blocks.append(SynthesisBlock(
                    in_channels=cfg.channels[s - 1] if first else cfg.channels[s],
                    out_channels=cfg.channels[s],
                    resolution=res,
                    w_index=len(names),
                    w_dim=cfg.w_dim,
                    text_width=cfg.text_width,
                    n_kernels=cfg.n_kernels[s],
                    up=2 if first else 1,
                    self_attention=attn and cfg.self_attention,
                    cross_attention=attn and cfg.cross_attention,
                    heads=cfg.attn_heads,
                    kernel_size=cfg.kernel_size,
                    noise=cfg.noise,
                    w_token=cfg.attention_w_token,
                ))
                names.append(f"{res}px.block{b}")
            torgbs.append(ToRGB(cfg.channels[s], cfg.w_dim, w_index=len(names)))
            names.append(f"{res}px.torgb")
        self.blocks = nn.ModuleList(blocks)                     # every block, coarse to fine
        self.torgbs = nn.ModuleList(torgbs)                     # one per scale, coarse to fine
        self.scale_blocks = scale_blocks                        # scale s -> indices into self.blocks
        self.w_names = names                                    # row k of ws -> the layer that reads it
        self.num_ws = len(names)                                # rows of ws
        self.num_blocks = len(blocks)                           # entries of a per-block t_local list

    def _per_block(self, value, name):
        """One tensor for every block, or a list with one per block (prompt mixing)."""
        if isinstance(value, (list, tuple)):
            assert len(value) == self.num_blocks, f"{name}: {len(value)} entries for {self.num_blocks} blocks"
            return list(value)
        return [value] * self.num_blocks

    def forward(self, ws, t_local, local_mask, noise_mode="random"):
        """ws (B, num_ws, S); t_local (B, L, C) or a list of num_blocks of them; local_mask
        (B, L) bool or a list likewise; noise_mode "random" | "const" | "none"
        -> pyramid, a list finest first: [(B, 3, R, R), ..., (B, 3, 4, 4)]."""
        B = ws.shape[0]
        assert ws.shape == (B, self.num_ws, self.cfg.w_dim), (ws.shape, self.num_ws)
        assert noise_mode in NOISE_MODES, noise_mode
        t_locals = self._per_block(t_local, "t_local")
        masks = self._per_block(local_mask, "local_mask")
        for t, m in zip(t_locals, masks):
            assert t.shape[0] == B and t.shape[2] == self.cfg.text_width and m.shape == t.shape[:2], (t.shape, m.shape)
        x = self.const.unsqueeze(0).expand(B, -1, -1, -1)       # (B, C_4, 4, 4)
        img, pyramid = None, []
        for s, res in enumerate(self.scales):
            for i in self.scale_blocks[s]:
                x = self.blocks[i](x, ws, t_locals[i], masks[i], noise_mode)  # (B, C_s, res, res)
            rgb = self.torgbs[s](x, ws)                         # (B, 3, res, res)
            img = rgb if img is None else upsample2x(img) + rgb  # skip: coarse image + finer detail
            pyramid.append(img)                                 # coarse to fine so far
        pyramid = pyramid[::-1]                                 # finest first: [x_R, ..., x_4]
        for x_r, res in zip(pyramid, reversed(self.scales)):
            assert x_r.shape == (B, 3, res, res), x_r.shape
        return pyramid


# -----------------------------------------------------------------------------
# Style mixing and prompt mixing: plain functions building synthesis arguments


def style_mixing(ws_a, ws_b, crossover):
    """Rows [0, crossover) of ws from ws_a (coarse), the rest from ws_b (fine). (B, num_ws, S)

    crossover 0 gives ws_b, crossover num_ws gives ws_a; see Synthesis.w_names for the rows.
    """
    assert ws_a.shape == ws_b.shape, (ws_a.shape, ws_b.shape)
    # EXERCISE: rows [0, crossover) of ws from ws_a (coarse), the rest from ws_b (fine)
    ### BEGIN SOLUTION
    return torch.cat([ws_a[:, :crossover], ws_b[:, crossover:]], dim=1)  # (B, num_ws, S)
    ### END SOLUTION


def prompt_mixing(a, b, crossover, num_blocks):
    """Per-block list: blocks [0, crossover) get `a` (coarse: layout), the rest `b` (fine: style).

    Use for t_local and local_mask alike, e.g. prompt_mixing(t_a, t_b, k, G.synthesis.num_blocks).
    """
    assert 0 <= crossover <= num_blocks, (crossover, num_blocks)
    return [a] * crossover + [b] * (num_blocks - crossover)


# -----------------------------------------------------------------------------
# The generator: T, M, synthesis and text-conditioned truncation

TRUNCATION_TARGETS = {"prompt": 0.0, "global": 1.0}  # target name -> the global mean's share g


class Generator(nn.Module):
    """G(z, tokens, mask, eot) -> image pyramid, finest first (Fig. 4).

    Lower-level pieces, usable alone: G.text_encoder (T), G.mapping (M), G.synthesis,
    G.mean_w (per-prompt mean style), G.truncate. G.num_ws rows of ws, G.synthesis.w_names
    names them; G.synthesis.num_blocks is the length of a per-block t_local list.
    """

    def __init__(
        self,
        cfg,        # GeneratorConfig
        text_dim,   # D, width of the CLIP token features (768 for ViT-L/14)
    ):
        super().__init__()
        self.cfg, self.text_dim = cfg, text_dim
        self.text_encoder = TextEncoder(text_dim, cfg.text_width, cfg.text_depth, cfg.text_heads)
        self.mapping = MappingNetwork(cfg.z_dim, cfg.text_width, cfg.w_dim, cfg.mapping_layers,
                                      cfg.mapping_lr_mul, cfg.w_avg_beta)
        self.synthesis = Synthesis(cfg)
        self.num_ws = self.synthesis.num_ws

    @torch.no_grad()
    def mean_w(self, t_global, n=256, seed=0):
        """Per-prompt mean style w_c = E_z[M(z, t_global)], estimated with n z's. (B, S)

        The same n z's (from `seed`) serve every prompt, so w_c of a prompt does not depend
        on the rest of the batch, and is deterministic. Does not touch w_avg.
        """
        B, C = t_global.shape
        g = torch.Generator(device=t_global.device).manual_seed(seed)
        z = torch.randn(n, self.cfg.z_dim, generator=g, device=t_global.device)  # (n, z_dim)
        z = z.unsqueeze(0).expand(B, -1, -1).reshape(B * n, -1)  # (B*n, z_dim) same z's per prompt
        t = t_global.unsqueeze(1).expand(-1, n, -1).reshape(B * n, C)  # (B*n, C) prompt b repeated n times
        w = self.mapping(z, t.to(z.dtype), update_w_avg=False)  # (B*n, S)
        return w.view(B, n, -1).mean(dim=1)                     # (B, S)

    def truncate(self, w, t_global, psi, target="prompt", n=256, seed=0):
        """Truncation trick toward a mean style, text-conditioned. (B, S)

            w' = w_m + psi (w - w_m),   w_m = (1 - g) w_c + g w_avg,   w_c = E_z[M(z, t_global)]
        target "prompt" (g = 0): toward the per-prompt mean w_c; "global" (g = 1): toward the
        running mean w_avg (StyleGAN); a number g in [0, 1]: toward a point between the two.
        App. C interpolates toward both means but gives no formula or weights: StyleGAN's linear
        form, applied to every layer's w (no cutoff), the blend g, and w_c estimated from n fixed
        z's are this project's choices. psi 1: identity; psi 0: the mean w_m.
        """
        g = TRUNCATION_TARGETS.get(target, target)              # the global mean's share of w_m
        assert isinstance(g, (int, float)) and 0 <= g <= 1, f"truncation target {target!r}: prompt, global or [0, 1]"
        if psi == 1:
            return w                                            # exact identity, no mean needed
        # EXERCISE: w' = w_m + psi (w - w_m); w_m = (1 - g) mean_w + g w_avg (g = 0: "prompt", 1: "global")
        ### BEGIN SOLUTION
        w_mean = self.mapping.w_avg.unsqueeze(0).expand_as(w)   # (B, S) global running mean
        if g < 1:
            w_c = self.mean_w(t_global, n=n, seed=seed)         # (B, S) w_c per prompt
            w_mean = torch.lerp(w_c, w_mean, g)                 # (B, S) exactly w_c at g = 0
        return w_mean + psi * (w - w_mean)                      # (B, S)
        ### END SOLUTION

    def forward(self, z, tokens, mask, eot, truncation_psi=1.0, truncation_target="prompt", noise_mode="random"):
        """z (B, z_dim), tokens (B, L, D), mask (B, L) bool, eot (B,) long -> pyramid finest first."""
        B = z.shape[0]
        assert tokens.shape[0] == B and tokens.shape[2] == self.text_dim, (tokens.shape, self.text_dim)
        t_local, local_mask, t_global = self.text_encoder(tokens, mask, eot)  # (B, L, C), (B, L), (B, C)
        w = self.mapping(z, t_global)                           # (B, S)
        w = self.truncate(w, t_global, truncation_psi, truncation_target)  # (B, S)
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1)           # (B, num_ws, S) same w for every layer
        return self.synthesis(ws, t_local, local_mask, noise_mode=noise_mode)


def count_parameters(module):
    """Number of parameters (works on the meta device too: no memory)."""
    return sum(p.numel() for p in module.parameters())


# -----------------------------------------------------------------------------


def random_text(B, L=77, D=128, seed=0):
    """Random stand-in for CLIP text features: tokens (B, L, D), mask (B, L), eot (B,)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, L, D, generator=g)                  # (B, L, D)
    eot = torch.randint(3, L, (B,), generator=g)                # (B,) end-of-text index
    mask = torch.arange(L)[None, :] <= eot[:, None]             # (B, L) True at 0..eot
    return tokens, mask, eot


def demo():
    torch.manual_seed(0)
    cfg, D, B = G_PRESETS["tiny"], 128, 4
    G = Generator(cfg, text_dim=D).eval()
    print(f"tiny G: {count_parameters(G):,} parameters, {G.num_ws} styles, {G.synthesis.num_blocks} blocks")
    print("style rows:", ", ".join(f"{k} {name}" for k, name in enumerate(G.synthesis.w_names)))
    tokens, mask, eot = random_text(B, D=D)
    z = torch.randn(B, cfg.z_dim)
    with torch.no_grad():
        pyramid = G(z, tokens, mask, eot)
    print("pyramid (finest first):", [tuple(x.shape) for x in pyramid])
    assert [x.shape[-1] for x in pyramid] == cfg.scales[::-1]

    # truncation: psi = 1 is the identity, psi = 0 is the per-prompt mean w_c = E_z[M(z, t_global)]
    with torch.no_grad():
        _, _, t_global = G.text_encoder(tokens, mask, eot)      # (B, C)
        w = G.mapping(z, t_global)                              # (B, S)
        w_c = G.mean_w(t_global, n=64)                          # (B, S)
        assert torch.equal(G.truncate(w, t_global, 1.0), w)
        assert torch.allclose(G.truncate(w, t_global, 0.0, n=64), w_c)
    print(f"psi=1: identity; psi=0: per-prompt mean w_c; |w - w_c| per prompt "
          f"{[round(v, 2) for v in (w - w_c).norm(dim=1).tolist()]}")
    print("ok")


if __name__ == "__main__":
    demo()


# -----------------------------------------------------------------------------
# Exercises. Each says what to change, what to look for, and which test or demo checks it.
# (The ### BEGIN / END SOLUTION regions above are the other kind: `python make_student_copy.py`
# cuts them out for students, and tests/test_student_copy.py lists the tests that grade them.)
#
# 1. Truncation. After `python train.py`, sweep psi from 1 to 0 for a few prompts
#    (python sample.py --ckpt runs/tiny --truncation-sweep 6 --prompt "..." --n 8), then with
#    --truncation-target global and 0.5 (App. C's target between the two means). Look for: the
#    height spread it prints falling with psi; does the prompt survive psi 0 toward the
#    per-prompt mean, toward the global one, between them? Check: pytest
#    tests/test_generator.py -k truncation
# 2. Style mixing. python sample.py --ckpt runs/tiny --prompt "..." --style-mix ROW with ROW at the
#    8 px and at the 16 px rows (sample.py lists them). Look for: which attributes (position,
#    size, colour) come with the coarse rows. Check: pytest tests/test_generator.py -k style_mixing
# 3. Table 1's generator rows. For each row of table1_config(G_PRESETS["tiny"], row) build the
#    Generator (text_dim 128) and print count_parameters. Look for: what attention and the kernel
#    banks cost at this size, against the paper's 27.8M -> 59.0M -> 80.2M at 64 px.
#    Check: pytest tests/test_generator.py -k table1
# 4. Text only through w. Set cross_attention=False: the prompt now reaches the synthesis only
#    through t_global -> M -> w (StyleGAN2 + text). Train it with python ablation.py --only
#    "no cross-attention" --seeds 1 and compare its attribute accuracy with "all on".
# 5. Noise inputs. Build the tiny G with noise=True and compare images for noise_mode "random",
#    "const" and "none". Look for: what changes with the noise (texture, not layout). Check:
#    pytest tests/test_generator.py -k noise
