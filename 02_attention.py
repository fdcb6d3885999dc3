"""
02 - Stable attention layers (GigaGAN Sec. 3.1, "Interleaving attention with convolution";
Sec. 3.2, Eq. 5 for the order self-attention (with w) -> cross-attention to the text tokens).

What: the attention layers GigaGAN puts between its convolutions, and the transformer
block its text encoder T is made of:
    SelfAttention        tokens attend to tokens, L2-distance logits, tied query/key
    CrossAttention       image tokens attend to text tokens (t_local), with a padding mask
    TransformerBlock     pre-norm residual block (self-attention + MLP), used by T of G and D
    ImageSelfAttention   (B, C, H, W) wrapper: pixels (and the style w, in G) as tokens,
                         norm, attention, residual: Eq. 5's g_attn(f, w)
    ImageCrossAttention  (B, C, H, W) wrapper for Eq. 5: f = f + g_cross(f, t_local)
    attention_param_groups  AdamW groups: weight decay 0.01 on the attention projections

Why: the paper finds that dropping plain dot-product self-attention into StyleGAN makes
training collapse. Dot-product self-attention is not Lipschitz (Kim et al. 2021, "The
Lipschitz constant of self-attention"): its logit x_i W_q (x_j W_k)^T is quadratic in the
input, so its slope grows without bound, and a GAN discriminator (and the R1 penalty on
it) needs bounded slopes. GigaGAN's remedies, all implemented here:
    1. L2-distance logits      s_ij = -|q_i - k_j|^2 * scale        (Kim et al.)
    2. tied query/key weights  W_q = W_k, one projection            (Kim et al.: with
                               W_q = W_k the L2 self-attention map is Lipschitz)
    3. equalized learning rate and unit-normal init (EqualLinear from 01), as in StyleGAN
    4. logits scaled down      scale = 1 / head_dim                 (constant: our choice)
    5. reduced residual gain   x + RESIDUAL_GAIN * attn(norm(x))    (constant: our choice)
    6. weight decay 0.01 on the attention weights (attention_param_groups, for AdamW)

The L2 logits are written out as -(|q|^2 - 2 q.k + |k|^2) with plain matmuls rather than
torch.cdist. cdist returns the distance, a square root whose slope is infinite at distance
0, which is exactly where every token meets itself (its matmul path gives NaN gradients
there), and the lazy R1 penalty differentiates the discriminator's gradient once more.
The expanded square needs no root; its first and second derivatives are plain matmuls.
Distance 0 is the smallest possible, so with tied weights every token's largest logit is
the one to itself: a token may attend to itself (we mask nothing on the diagonal).

Cross-attention (Eq. 5) uses ordinary scaled dot-product logits (this project's choice;
the paper asks for L2 logits only in self-attention). Its keys come from the text, which
is a fixed condition rather than the input being differentiated, so the logit q_i . k_j is
linear in the image features and the quadratic blow-up that motivates L2 does not occur.

Masks: bool, True = a real token to attend to, False = padding. Masked keys get exactly
zero weight. A query whose keys are ALL masked gets an all-zero weight row (not NaN), so
its attention output is the output projection's bias and the residual wrappers pass the
input through almost unchanged (exactly unchanged at init, where the bias is zero).

Fast path: `fused=True` computes the same thing with F.scaled_dot_product_attention (no
(L, L) matrix kept for backward on GPUs). It uses that |q_i|^2 is the same for every key
of row i and cancels in the softmax:  softmax_j(-(|q_i|^2 - 2 q_i.k_j + |k_j|^2) * s)
= softmax_j(2 s q_i.k_j - s |k_j|^2),  a dot product plus a per-key bias. The naive path
is the default: the fused GPU kernels have no double backward (needed by R1).

Run the demo:  python 02_attention.py

Shape legend (shared by every numbered file):
    B batch, C channels (= attention width), H W height width, L tokens that attend
    (text tokens in T, H*W pixels in the image wrappers), M context (text) tokens,
    D context (text) width, nh heads, hd = C // nh width of one head.
"""
import importlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_kernels = importlib.import_module("01_kernel_selection")
EqualLinear = _kernels.EqualLinear  # equalized-LR linear layer, unit-normal stored weight

# Residual gain of every attention / MLP branch: x + RESIDUAL_GAIN * branch(norm(x)).
# The paper says "reduced residual gain" without a number; 0.5 is this project's choice
# (a unit-variance branch then adds 25% to the residual stream's variance, not 100%).
RESIDUAL_GAIN = 0.5


def l2_logit_scale(head_dim):
    """Scale of the L2 logits: 1 / hd (this project's choice; the paper says "scaled down").

    With unit-variance q, k (LayerNorm'd input, unit-normal equalized weights) two unrelated
    tokens have E|q - k|^2 = 2 hd, so dividing by hd gives an expected logit of -2 for any
    head width, against 0 for the token itself. The usual 1/sqrt(hd) would give -2 sqrt(hd)
    (-16 at hd = 64): every token would attend almost only to itself at init.
    """
    return 1.0 / head_dim


def dot_logit_scale(head_dim):
    """Scale of dot-product logits: the usual 1 / sqrt(hd) (Vaswani et al.), unit variance."""
    return 1.0 / math.sqrt(head_dim)


# -----------------------------------------------------------------------------
# Functional pieces: heads, logits, masked softmax

def split_heads(x, heads):
    """(B, L, C) -> (B, nh, L, hd): each head sees its own slice of the channels."""
    B, L, C = x.shape
    return x.view(B, L, heads, C // heads).permute(0, 2, 1, 3)  # (B, nh, L, hd)


def merge_heads(x):
    """(B, nh, L, hd) -> (B, L, C): concatenate the heads' outputs again."""
    B, nh, L, hd = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, L, nh * hd)  # (B, L, C)


def l2_logits(q, k, scale):
    """s_ij = -|q_i - k_j|^2 * scale, expanded as -(|q_i|^2 - 2 q_i.k_j + |k_j|^2) * scale.

    Plain matmuls and sums only: no square root, so it is twice differentiable everywhere,
    including the diagonal q_i = k_i where torch.cdist's gradient is undefined.
    q (B, nh, L, hd), k (B, nh, M, hd) -> (B, nh, L, M).
    """
    # EXERCISE: s_ij = -(|q_i|^2 - 2 q_i.k_j + |k_j|^2) * scale, matmuls only (no sqrt, no cdist)
    ### BEGIN SOLUTION
    q_sq = q.pow(2).sum(-1, keepdim=True)                 # |q_i|^2          (B, nh, L, 1)
    k_sq = k.pow(2).sum(-1).unsqueeze(-2)                 # |k_j|^2          (B, nh, 1, M)
    qk = q @ k.transpose(-2, -1)                          # q_i . k_j        (B, nh, L, M)
    return -(q_sq - 2 * qk + k_sq) * scale                # (B, nh, L, M)
    ### END SOLUTION


def dot_logits(q, k, scale):
    """s_ij = q_i . k_j * scale: q (B, nh, L, hd), k (B, nh, M, hd) -> (B, nh, L, M)."""
    return (q @ k.transpose(-2, -1)) * scale              # (B, nh, L, M)


def masked_softmax(logits, key_mask=None):
    """Softmax over keys (last dim) where keys with key_mask False get weight exactly 0.

    logits (B, nh, L, M), key_mask (B, M) bool or None -> weights (B, nh, L, M).
    Masked logits become the most negative finite number (not -inf): exp underflows to 0
    for them, and a row with every key masked becomes uniform instead of 0/0 = NaN; the
    final multiply by the mask then zeroes that row. Gradients stay finite everywhere.
    """
    if key_mask is None:
        return logits.softmax(dim=-1)
    # EXERCISE: masked keys weigh exactly 0; an all-masked row is all 0 (no NaN, no -inf)
    ### BEGIN SOLUTION
    keep = key_mask[:, None, None, :]                     # (B, 1, 1, M)
    logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
    return logits.softmax(dim=-1) * keep                  # all-masked rows -> all 0
    ### END SOLUTION


def fused_attention(q, k, v, scale, key_bias=None, key_mask=None):
    """softmax(q.k * scale + key_bias) @ v with F.scaled_dot_product_attention.

    Same masking convention as masked_softmax (all-masked rows give an output of 0).
    q (B, nh, L, hd), k v (B, nh, M, hd), key_bias (B, nh, 1, M) or None -> (B, nh, L, hd).
    """
    B, nh, M = k.shape[0], k.shape[1], k.shape[2]
    bias = key_bias if key_bias is not None else q.new_zeros(B, nh, 1, M)  # (B, nh, 1, M)
    if key_mask is not None:
        bias = bias.masked_fill(~key_mask[:, None, None, :], torch.finfo(q.dtype).min)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # (B, nh, L, hd)
    if key_mask is not None:
        out = out * key_mask.any(dim=-1)[:, None, None, None]  # no real key -> output 0
    return out


def _check_mask(mask, B, M):
    """Key-padding masks are bool (B, M), True = real token."""
    assert mask.dtype == torch.bool, f"mask must be bool (True = real token), got {mask.dtype}"
    assert mask.shape == (B, M), f"mask shape {tuple(mask.shape)} != {(B, M)}"


# -----------------------------------------------------------------------------
# Attention layers on token sequences (B, L, C)

class SelfAttention(nn.Module):
    """Multi-head self-attention with L2-distance logits and one tied query/key projection.

    a_ij = softmax_j(-|x_i W_qk - x_j W_qk|^2 / hd),  out_i = (sum_j a_ij x_j W_v) W_out.
    Returns the attention output only (no residual, no norm): the wrappers add those.
    """

    def __init__(
        self,
        dim,           # C, width of the tokens (in and out)
        heads,         # nh, number of heads; must divide dim
        fused=False,   # use F.scaled_dot_product_attention (same result; no double backward on GPU)
    ):
        super().__init__()
        assert dim % heads == 0, f"heads={heads} must divide dim={dim}"
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.scale = l2_logit_scale(self.head_dim)
        self.fused = fused
        # Tied weights: q and k are the SAME projection (W_q = W_k). No bias: a shared bias
        # cancels in q_i - k_j, so it could never change the logits.
        self.to_qk = EqualLinear(dim, dim, bias=False)
        self.to_v = EqualLinear(dim, dim)                 # values
        self.to_out = EqualLinear(dim, dim)               # mixes the heads' outputs

    def _check(self, x, mask):
        assert x.dim() == 3 and x.shape[2] == self.dim, f"x must be (B, L, C={self.dim}), got {tuple(x.shape)}"
        if mask is not None:
            _check_mask(mask, x.shape[0], x.shape[1])

    def attention_weights(self, x, mask=None):
        """x (B, L, C), mask (B, L) bool or None -> weights (B, nh, L, L), rows sum to 1."""
        self._check(x, mask)
        qk = split_heads(self.to_qk(x), self.heads)       # q = k  (B, nh, L, hd)
        logits = l2_logits(qk, qk, self.scale)            # (B, nh, L, L), diagonal ~ 0 = row max
        return masked_softmax(logits, mask)               # (B, nh, L, L)

    def forward(self, x, mask=None):
        """x (B, L, C), mask (B, L) bool (True = attend to this key) -> (B, L, C)."""
        self._check(x, mask)
        B, L, C = x.shape
        v = split_heads(self.to_v(x), self.heads)         # (B, nh, L, hd)
        if self.fused:
            qk = split_heads(self.to_qk(x), self.heads)   # (B, nh, L, hd)
            # softmax_j(-(|q_i|^2 - 2 q_i.k_j + |k_j|^2) s) = softmax_j(2s q_i.k_j - s|k_j|^2)
            key_bias = -self.scale * qk.pow(2).sum(-1).unsqueeze(-2)  # -s |k_j|^2 (B, nh, 1, L)
            out = fused_attention(qk, qk, v, 2 * self.scale, key_bias, mask)  # (B, nh, L, hd)
        else:
            out = self.attention_weights(x, mask) @ v     # sum_j a_ij v_j  (B, nh, L, hd)
        out = self.to_out(merge_heads(out))               # (B, L, C)
        assert out.shape == (B, L, C)
        return out


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from x (image), keys/values from context (text).

    a_ij = softmax_j(q_i . k_j / sqrt(hd)) over the real context tokens (Eq. 5's attention).
    Dot-product logits are this project's choice (see the module docstring).
    """

    def __init__(
        self,
        dim,           # C, width of the queries x and of the output
        context_dim,   # D, width of the context tokens (text width; may differ from C)
        heads,         # nh, number of heads; must divide dim
        fused=False,   # use F.scaled_dot_product_attention (same result; no double backward on GPU)
    ):
        super().__init__()
        assert dim % heads == 0, f"heads={heads} must divide dim={dim}"
        self.dim, self.context_dim = dim, context_dim
        self.heads, self.head_dim = heads, dim // heads
        self.scale = dot_logit_scale(self.head_dim)
        self.fused = fused
        # No q/k biases: a key bias adds q_i . b_k, the same for every key, which cancels in
        # the softmax; kept symmetric for the query. Keys and values map D -> C.
        self.to_q = EqualLinear(dim, dim, bias=False)
        self.to_k = EqualLinear(context_dim, dim, bias=False)
        self.to_v = EqualLinear(context_dim, dim)
        self.to_out = EqualLinear(dim, dim)

    def _check(self, x, context, context_mask):
        B, L, C = x.shape
        assert C == self.dim, f"expected query width {self.dim}, got {C}"
        assert context.dim() == 3 and context.shape[0] == B and context.shape[2] == self.context_dim, (
            f"context must be (B={B}, M, D={self.context_dim}), got {tuple(context.shape)}")
        if context_mask is not None:
            _check_mask(context_mask, B, context.shape[1])

    def attention_weights(self, x, context, context_mask=None):
        """x (B, L, C), context (B, M, D), mask (B, M) -> weights (B, nh, L, M)."""
        self._check(x, context, context_mask)
        q = split_heads(self.to_q(x), self.heads)         # (B, nh, L, hd)
        k = split_heads(self.to_k(context), self.heads)   # (B, nh, M, hd)
        return masked_softmax(dot_logits(q, k, self.scale), context_mask)  # (B, nh, L, M)

    def forward(self, x, context, context_mask=None):
        """x (B, L, C), context (B, M, D), context_mask (B, M) bool -> (B, L, C)."""
        self._check(x, context, context_mask)
        B, L, C = x.shape
        v = split_heads(self.to_v(context), self.heads)   # (B, nh, M, hd)
        if self.fused:
            q = split_heads(self.to_q(x), self.heads)     # (B, nh, L, hd)
            k = split_heads(self.to_k(context), self.heads)  # (B, nh, M, hd)
            out = fused_attention(q, k, v, self.scale, None, context_mask)  # (B, nh, L, hd)
        else:
            out = self.attention_weights(x, context, context_mask) @ v  # (B, nh, L, hd)
        out = self.to_out(merge_heads(out))               # (B, L, C)
        assert out.shape == (B, L, C)
        return out


class TransformerBlock(nn.Module):
    """Pre-norm residual block of the text encoder T (G and D):

        x = x + g * SelfAttention(LN(x), mask)
        x = x + g * MLP(LN(x)),      g = residual_gain.
    Padded positions are computed too (they cannot be attended to); callers ignore them.
    """

    def __init__(
        self,
        dim,                          # C, token width
        heads,                        # nh, attention heads
        mlp_ratio=4.0,                # hidden width of the MLP = mlp_ratio * C
        residual_gain=RESIDUAL_GAIN,  # g, reduced residual gain (this project's choice)
        fused=False,                  # fast attention path (see SelfAttention)
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.residual_gain = residual_gain
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, fused=fused)
        self.norm2 = nn.LayerNorm(dim)
        # MLP with equalized LR too; leaky ReLU * sqrt(2) keeps unit variance (01).
        self.mlp = nn.Sequential(EqualLinear(dim, hidden, activation="lrelu"), EqualLinear(hidden, dim))

    def forward(self, x, mask=None):
        """x (B, L, C), mask (B, L) bool or None -> (B, L, C)."""
        shape = x.shape
        x = x + self.residual_gain * self.attn(self.norm1(x), mask)  # (B, L, C)
        x = x + self.residual_gain * self.mlp(self.norm2(x))         # (B, L, C)
        assert x.shape == shape
        return x


# -----------------------------------------------------------------------------
# Image-side wrappers used between the generator's (and discriminator's) convolutions

def image_to_tokens(x):
    """(B, C, H, W) -> (B, H*W, C): every pixel becomes one token (row-major order)."""
    return x.flatten(2).transpose(1, 2)                   # (B, H*W, C)


def tokens_to_image(t, H, W):
    """(B, H*W, C) -> (B, C, H, W), the inverse of image_to_tokens."""
    B, L, C = t.shape
    return t.transpose(1, 2).reshape(B, C, H, W)          # (B, C, H, W)


class ImageSelfAttention(nn.Module):
    """f = f + g * SelfAttention(LN([f; A(w)]))[:H*W] over the H*W pixels of a feature map.

    In the generator the style w takes part as one more token (Eq. 5: g_attn(f, w); the paper
    "leverages the style vector w as an additional token"): a learned affine A maps w (S,) to
    a C-wide token that is appended to the H*W pixel tokens, so every pixel can attend to it
    (and it to the pixels). Its own output row is dropped: the feature map keeps H*W tokens.
    The discriminator's attention has no w (w_dim=None): pixels only.
    """

    def __init__(
        self,
        channels,                     # C, feature channels = attention width
        heads,                        # nh, attention heads; must divide channels
        residual_gain=RESIDUAL_GAIN,  # g, reduced residual gain (this project's choice)
        fused=False,                  # fast attention path (see SelfAttention)
        w_dim=None,                   # S: append A(w) as one more token (G, Eq. 5); None: pixels only (D)
    ):
        super().__init__()
        self.channels, self.residual_gain, self.w_dim = channels, residual_gain, w_dim
        self.norm = nn.LayerNorm(channels)                # per token, over channels
        self.attn = SelfAttention(channels, heads, fused=fused)
        # A: w -> one C-wide token. An affine map is this project's choice (the paper does
        # not say how w becomes a token); the LayerNorm then puts it on the pixels' scale.
        self.w_token = EqualLinear(w_dim, channels) if w_dim is not None else None

    def tokens(self, x, w=None):
        """x (B, C, H, W), w (B, S) or None -> the attending tokens (B, H*W [+ 1], C), not normalised."""
        B, C, H, W = x.shape
        assert C == self.channels, f"expected {self.channels} channels, got {C}"
        t = image_to_tokens(x)                            # (B, H*W, C)
        if self.w_token is None:
            assert w is None, "this self-attention was built without w_dim: it takes no w"
            return t
        assert w is not None and w.shape == (B, self.w_dim), (
            f"w must be (B={B}, S={self.w_dim}), got {None if w is None else tuple(w.shape)}")
        return torch.cat([t, self.w_token(w).unsqueeze(1)], dim=1)  # (B, H*W + 1, C) w last

    def attention_weights(self, x, w=None):
        """x (B, C, H, W), w (B, S) or None -> weights (B, nh, T, T), T = H*W (+ 1: the w token, last)."""
        return self.attn.attention_weights(self.norm(self.tokens(x, w)))

    def forward(self, x, w=None):
        """x (B, C, H, W), w (B, S) (required iff built with w_dim) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        t = self.tokens(x, w)                             # (B, H*W [+ 1], C)
        out = self.attn(self.norm(t))[:, : H * W]         # (B, H*W, C) the w token's own row dropped
        t = t[:, : H * W] + self.residual_gain * out      # (B, H*W, C)
        return tokens_to_image(t, H, W)                   # (B, C, H, W)


class ImageCrossAttention(nn.Module):
    """Eq. 5: f = f + g * CrossAttention(LN(f), LN(t_local), mask), pixels attend to words."""

    def __init__(
        self,
        channels,                     # C, feature channels = query width
        context_dim,                  # D, width of t_local (the text encoder T's output)
        heads,                        # nh, attention heads; must divide channels
        residual_gain=RESIDUAL_GAIN,  # g, reduced residual gain (this project's choice)
        fused=False,                  # fast attention path (see CrossAttention)
    ):
        super().__init__()
        self.channels, self.residual_gain = channels, residual_gain
        self.norm = nn.LayerNorm(channels)                # image tokens, per pixel
        # Text tokens normalised too (this project's choice): the keys then have unit scale
        # whatever the text encoder's output scale, like the queries.
        self.context_norm = nn.LayerNorm(context_dim)
        self.attn = CrossAttention(channels, context_dim, heads, fused=fused)

    def attention_weights(self, x, context, context_mask=None):
        """x (B, C, H, W), context (B, M, D) -> weights (B, nh, H*W, M), for inspection."""
        return self.attn.attention_weights(self.norm(image_to_tokens(x)), self.context_norm(context), context_mask)

    def forward(self, x, context, context_mask=None):
        """x (B, C, H, W), context = t_local (B, M, D), context_mask (B, M) bool -> (B, C, H, W)."""
        B, C, H, W = x.shape
        assert C == self.channels, f"expected {self.channels} channels, got {C}"
        t = image_to_tokens(x)                            # (B, H*W, C)
        t = t + self.residual_gain * self.attn(self.norm(t), self.context_norm(context), context_mask)
        return tokens_to_image(t, H, W)                   # (B, C, H, W)


# -----------------------------------------------------------------------------
# Weight decay 0.01 on the attention weights (paper), for AdamW

def attention_param_groups(module, weight_decay=0.01):
    """Split module.parameters() into AdamW groups: attention projection weights / the rest.

    The q/k/v/out projection weights of every SelfAttention and CrossAttention inside
    `module` (found by class while walking module.modules()) get `weight_decay`; all other
    parameters (biases, norms, convs, MLPs) get 0. Every parameter lands in exactly one
    group. Empty groups are left out. Usage: torch.optim.AdamW(attention_param_groups(G), lr=...).
    """
    decayed = set()
    for m in module.modules():
        if isinstance(m, (SelfAttention, CrossAttention)):
            for proj in m.modules():
                if isinstance(proj, EqualLinear):
                    decayed.add(id(proj.weight))          # the projection matrix, not its bias
    attention, other = [], []
    for p in module.parameters():                         # each shared parameter once
        (attention if id(p) in decayed else other).append(p)
    groups = [
        {"params": attention, "weight_decay": weight_decay, "name": "attention_weights"},
        {"params": other, "weight_decay": 0.0, "name": "other"},
    ]
    return [g for g in groups if g["params"]]


# -----------------------------------------------------------------------------

def demo():
    torch.manual_seed(0)
    B, L, C, nh = 2, 6, 32, 4
    M, D = 5, 24

    print("--- SelfAttention: L2 logits, tied q/k ---")
    sa = SelfAttention(C, nh)
    x = torch.randn(B, L, C)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4:] = False                                   # sample 1: last 2 tokens are padding
    a = sa.attention_weights(x, mask)                     # (B, nh, L, L)
    y = sa(x, mask)
    print(f"x {tuple(x.shape)} -> out {tuple(y.shape)}, weights {tuple(a.shape)}, "
          f"params {sum(p.numel() for p in sa.parameters())}")
    print("head 0 of sample 1 (rows: queries, cols: keys; last 2 keys are padding):")
    print(a[1, 0].detach().numpy().round(3))
    assert torch.allclose(a.sum(-1), torch.ones(B, nh, L)), "rows sum to 1"
    assert (a[1, :, :, 4:] == 0).all(), "masked keys get exactly zero weight"
    diag = a[0].diagonal(dim1=-2, dim2=-1)                # (nh, L) weight of each token on itself
    assert (diag > 0).all() and (diag >= a[0].amax(-1) - 1e-6).all(), "self is the largest weight"
    print(f"mean weight on itself {diag.mean():.3f} vs uniform {1 / L:.3f}")
    sa.fused = True
    assert torch.allclose(sa(x, mask), y, atol=1e-5), "fused path equals the naive one"
    sa.fused = False

    print("--- CrossAttention: image tokens -> text tokens ---")
    ca = CrossAttention(C, D, nh)
    context = torch.randn(B, M, D)
    cmask = torch.ones(B, M, dtype=torch.bool)
    cmask[0, 3:] = False                                  # sample 0 has 3 real words
    cmask[1, :] = False                                   # sample 1: every word masked
    a = ca.attention_weights(x, context, cmask)           # (B, nh, L, M)
    y = ca(x, context, cmask)
    print(f"x {tuple(x.shape)}, context {tuple(context.shape)} -> out {tuple(y.shape)}, "
          f"weights {tuple(a.shape)}, params {sum(p.numel() for p in ca.parameters())}")
    assert torch.allclose(a[0].sum(-1), torch.ones(nh, L)) and (a[0, :, :, 3:] == 0).all()
    assert (a[1] == 0).all() and torch.isfinite(y).all(), "all-masked row: zero weights, no NaN"
    print("all-masked sample: weights all 0, output = to_out bias (0 at init):", y[1].abs().max().item())

    print("--- TransformerBlock (text encoder T) ---")
    block = TransformerBlock(C, nh)
    print(f"{tuple(x.shape)} -> {tuple(block(x, mask).shape)}, params {sum(p.numel() for p in block.parameters())}")

    print("--- image wrappers (generator synthesis) ---")
    f = torch.randn(B, C, 8, 8)
    S = 16                                                # style width
    w = torch.randn(B, S)                                 # (B, S) one style per sample
    isa, ica = ImageSelfAttention(C, nh, w_dim=S), ImageCrossAttention(C, D, nh)
    g = ica(isa(f, w), context, cmask)
    print(f"f {tuple(f.shape)}, w {tuple(w.shape)} -> self (w as token 65) -> cross -> {tuple(g.shape)}, "
          f"weights {tuple(isa.attention_weights(f, w).shape)} / {tuple(ica.attention_weights(f, context, cmask).shape)}")
    assert g.shape == f.shape
    assert not torch.allclose(isa(f, w), isa(f, torch.randn(B, S))), "the pixels see the w token (Eq. 5)"
    assert torch.allclose(ica(f, context, cmask)[1], f[1]), "no real word: features pass unchanged"

    print("--- AdamW parameter groups ---")
    model = nn.ModuleDict({"block": block, "isa": isa, "ica": ica, "conv": nn.Conv2d(C, C, 3)})
    groups = attention_param_groups(model)
    for group in groups:
        print(f"{group['name']:>18}: {len(group['params'])} tensors, "
              f"{sum(p.numel() for p in group['params'])} values, weight_decay {group['weight_decay']}")
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=1e-3, betas=(0.0, 0.99))
    print("ok")


if __name__ == "__main__":
    demo()


# -----------------------------------------------------------------------------
# Exercises. Each says what to change, what to look for, and which test or demo checks it.
# (The ### BEGIN / END SOLUTION regions above are the other kind: `python make_student_copy.py`
# cuts them out for students, and tests/test_student_copy.py lists the tests that grade them.)
#
# 1. Dot product instead of L2. In SelfAttention.attention_weights use dot_logits(qk, qk,
#    dot_logit_scale(self.head_dim)). In the demo, scale the input by t = 1, 4, 16 and print the
#    slope |J v| / |v| of the layer (torch.autograd.functional.jvp, random v). Look for: with the
#    dot product the slope grows several-fold with t; with L2 it stays about 1 (Kim et al.: L2 with
#    tied q/k is Lipschitz). The demo's "self is the largest weight" assertion fails too.
# 2. Untie q and k. Give SelfAttention separate to_q and to_k projections. Look for: a token's
#    largest weight is no longer on itself. Check: pytest tests/test_attention.py -k
#    "attends_to_itself or tied"
# 3. The logit scale. Set l2_logit_scale to 1 / sqrt(head_dim) and print the demo's "mean weight on
#    itself" for heads 8 and 64 wide. Look for: at init every token attends almost only to itself.
#    Check: pytest tests/test_attention.py -k logit_scale
# 4. -inf masks. In masked_softmax fill with float("-inf") instead of the most negative float. Look
#    for: NaN rows where every key is masked (a prompt with no real word). Check: pytest
#    tests/test_attention.py -k all_masked
# 5. cdist. Write l2_logits as -torch.cdist(q, k) ** 2 * scale. Look for: NaN or missing second
#    derivatives at q_i = k_i, which R1 needs. Check: pytest tests/test_attention.py -k double_backward
