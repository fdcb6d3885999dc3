"""00 - The frozen CLIP that everything in GigaGAN is conditioned on.

What: one wrapper, `FrozenCLIP`, around an open_clip model, loaded once by `load_clip(spec)` and
shared by the generator, the discriminator and the losses. It gives
  - text: per-token features of the text transformer's PENULTIMATE block (the paper's choice,
    Sec. 3.2 "text and latent-code conditioning", Fig. 4), a padding mask and the end-of-text
    index; G's and D's own learned encoders T turn them into `t_local` and `t_global`;
  - text: the L2-normalised CLIP text embedding (for the CLIP contrastive loss, Eq. 9);
  - images: the L2-normalised CLIP image embedding of generator images in [-1, 1] and the
    intermediate feature maps of the vision tower (for the vision-aided discriminator),
    both differentiable with respect to the images (G learns through them).
Why a wrapper: the encoder is frozen, so a caption's features never change during a run; they
are computed once per caption and cached. The weights live in non-persistent buffers, so no
optimiser sees them, no checkpoint stores them (a checkpoint stores the spec string instead)
and `.to(device)` still moves them.

Three kinds of CLIP, one `spec` string (see `load_clip`):
  "ViT-L-14/openai"  pretrained open_clip weights (the paper's text encoder; needs the internet
                     once, then the local cache); missing weights fail in about a second;
  "ViT-B-32/none"    the same architecture with explicitly random weights (benchmarks, tests);
  "tiny:PATH"        a 3.5M-parameter CLIP (3.2M of it the token embedding table; a small ViT or
                     ResNet image tower) trained here by `train_tiny_clip` on the training data
                     (e.g. the `shapes` toy set) in about 3 minutes on a laptop CPU, so the whole
                     pipeline, CLIP loss and vision-aided D included, runs offline.

Demo (seconds, no downloads):  python 00_clip.py

Shapes: B batch, L text tokens (at most the context length 77), D text width, E joint embedding width,
C_i channels and g_i side of the i-th image feature map (a ViT's patch grid or a ResNet stage's
map), S the tower's image size.
"""
import hashlib
import math
import os
import socket
import time
import urllib.parse
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.modified_resnet import ModifiedResNet
from torch.nn.utils.rnn import pad_sequence


# ----------------------------------------------------------------------------------------------
# The tiny CLIP's configuration (an ordinary open_clip CLIP, just small)

@dataclass
class TinyCLIPConfig:
    image_size: int = 32  # S: the vision tower's input side (= the data resolution of the tiny preset)
    # The image tower: "vit" or "resnet" (open_clip's ModifiedResNet, CLIP's RN50 design, made small);
    # train.py's tiny default picks resnet (NOTES.md, "Tiny CLIP image tower" and "One CLIP for every role").
    vision: str = "vit"
    resnet_width: int = 8  # stem width; stage i outputs 4 * width * 2^i channels: 32, 64, 128, 256
    resnet_layers: tuple = (1, 1, 1, 1)  # bottleneck blocks per stage (strides 4, 8, 16, 32 px)
    resnet_head_width: int = 16  # attention pooling: heads = 32 * width // head_width -> 16 heads
    patch_size: int = 8  # vit: 32 / 8 -> a 4 x 4 patch grid, 16 image tokens + 1 class token
    vision_width: int = 64  # vit: channels of every image token (C_i of all feature maps)
    vision_layers: int = 3  # vit: transformer blocks
    vision_head_width: int = 16  # vit: open_clip derives heads = width // head_width -> 4 heads
    text_width: int = 64  # D: width of the text tokens handed to G and D
    text_layers: int = 3  # text blocks; the penultimate one feeds G and D
    text_heads: int = 4  # attention heads of the text transformer
    embed_dim: int = 64  # E: width of the joint image-text embedding
    context_length: int = 77  # CLIP's, so prompts are handled exactly as with ViT-L/14
    vocab_size: int = 49408  # open_clip's BPE vocabulary, which ships with the package


def build_tiny_clip(cfg: TinyCLIPConfig) -> open_clip.CLIP:
    """A randomly initialised open_clip `CLIP` of the given tiny size (no I/O)."""
    if cfg.vision == "resnet":  # open_clip builds a ModifiedResNet when `layers` is a tuple
        if cfg.image_size % 32:
            raise ValueError(f"the tiny CLIP's ResNet tower needs an image size divisible by 32, got "
                             f"{cfg.image_size}: use a resolution such as 32 or 64, or vision='vit'")
        vision_cfg = dict(image_size=cfg.image_size, layers=tuple(cfg.resnet_layers), width=cfg.resnet_width,
                          head_width=cfg.resnet_head_width)
    elif cfg.vision == "vit":
        vision_cfg = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                          layers=cfg.vision_layers, head_width=cfg.vision_head_width)
    else:
        raise ValueError(f"unknown tiny CLIP vision tower {cfg.vision!r}: expected 'resnet' or 'vit'")
    text_cfg = dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                    heads=cfg.text_heads, layers=cfg.text_layers)
    return open_clip.CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)


# ----------------------------------------------------------------------------------------------
# The two towers, written out once and used both by FrozenCLIP and by train_tiny_clip.
# tests/test_clip.py checks them against open_clip's own encode_text / encode_image.

def text_tower(model: open_clip.CLIP, ids: torch.Tensor, eot: torch.Tensor):
    """Run CLIP's text transformer on token ids (B, n).

    Returns the penultimate block's token features (B, n, D), after CLIP's final LayerNorm,
    and the un-normalised text embedding (B, E) read at the end-of-text token of the last block.
    n may be shorter than the context length: with the causal mask no token sees a later one,
    so dropping the padding after the longest caption leaves positions 0..eot unchanged.
    """
    n = ids.shape[1]  # tokens actually run (<= L)
    x = model.token_embedding(ids).to(model.transformer.get_cast_dtype())  # (B, n, D)
    x = x + model.positional_embedding[:n].to(x.dtype)  # learned absolute positions
    blocks = model.transformer.resblocks  # pre-LayerNorm residual attention blocks
    for block in blocks[:-1]:  # every block but the last
        x = clip_block(block, x, causal=True)  # (B, n, D); CLIP's text mask is causal
    # Project choice: the final LayerNorm is applied to the penultimate output too (as Stable
    # Diffusion 2 does with OpenCLIP), so the features have a fixed scale whatever the model.
    # EXERCISE: penultimate tokens through ln_final; then the last block, ln_final, and pool at EOT
    ### BEGIN SOLUTION
    penultimate = model.ln_final(x)  # (B, n, D)
    x = model.ln_final(clip_block(blocks[-1], x, causal=True))  # (B, n, D) the usual final output
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, D) the EOT token sums up the prompt
    ### END SOLUTION
    proj = model.text_projection  # (D, E) matrix, or a Linear in some configs
    embed = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj  # (B, E)
    return penultimate, embed


def vision_tower(model: open_clip.CLIP, x: torch.Tensor, feature_layers):
    """Run CLIP's image tower on preprocessed images (B, 3, S, S).

    ViT: returns the patch-token grids after the blocks in `feature_layers`, each (B, C, g, g) with
    the class token dropped, and the un-normalised image embedding (B, E) (open_clip's
    VisionTransformer forward: conv1 patches, class token, positions, patch dropout, ln_pre,
    blocks, ln_post, proj). ResNet: the outputs of the stages in `feature_layers` (0-3), each
    (B, C_i, S / 2^(i+2), S / 2^(i+2)), and the attention-pooled embedding (B, E).
    """
    v = model.visual
    if isinstance(v, ModifiedResNet):  # CLIP's RN50 design: conv stem, 4 bottleneck stages, attention pool
        x = v.stem(x)  # (B, width, S/4, S/4): three 3x3 convs and a 2x2 average pool
        features = []
        for i, stage in enumerate([v.layer1, v.layer2, v.layer3, v.layer4]):
            x = stage(x)  # (B, 4 * width * 2^i, S / 2^(i+2), S / 2^(i+2))
            if i in feature_layers:
                features.append(x)
        return features, v.attnpool(x)  # QKV attention of the mean token over the last grid -> (B, E)
    # One token per patch: open_clip's conv1 (kernel = stride = patch size p, no bias) is a linear
    # map of each p x p patch, written here as a matmul on the cut-out patches: the same numbers,
    # and in bfloat16 on a CPU its backward is cheaper (NOTES.md, "ViT patch embedding as a matmul").
    w = v.conv1.weight  # (C, 3, p, p)
    C, p = w.shape[0], w.shape[-1]
    B, g = x.shape[0], x.shape[-1] // p  # g = S / p patches a side
    patches = x.unflatten(2, (g, p)).unflatten(4, (g, p))  # (B, 3, g, p, g, p): [b, c, row, i, col, j]
    patches = patches.permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)  # (B, g*g, 3*p*p) raster order
    x = patches @ w.flatten(1).t().to(patches.dtype)  # (B, g*g, C) tokens
    cls = v.class_embedding.to(x.dtype).expand(B, 1, C)  # (B, 1, C) learned summary token
    x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1 + g*g, C)
    x = v.ln_pre(v.patch_dropout(x))  # patch dropout is the identity in eval mode
    features = []  # the intermediate grids for the vision-aided discriminator
    for i, block in enumerate(v.transformer.resblocks):
        x = clip_block(block, x)  # (B, 1 + g*g, C), full (non-causal) attention
        if i in feature_layers:
            features.append(x[:, 1:].transpose(1, 2).reshape(B, C, g, g))  # (B, C, g, g)
    x = v.ln_post(x)  # (B, 1 + g*g, C)
    pooled = x[:, 0] if v.pool_type == "tok" else x[:, 1:].mean(dim=1)  # (B, C) class token or mean
    return features, pooled @ v.proj  # list of (B, C, g, g), (B, E)


def clip_block(block, x, causal=False):
    """open_clip's pre-norm transformer block, written out: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    The same numbers as `block(x)` (tested), but with F.linear and F.scaled_dot_product_attention
    instead of nn.MultiheadAttention, whose backward in bfloat16 on a CPU goes through slow
    batched-matmul copies (NOTES.md, "Written-out CLIP block"). causal=True: the text tower's mask
    (no token attends to a later one). x: (B, N, C) tokens -> (B, N, C).
    """
    attn = block.attn  # nn.MultiheadAttention (batch first), its weights frozen into buffers
    B, N, C = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3C): q, k, v stacked
    q, k, v = qkv.view(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, C / heads)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, N, C / heads): softmax(q k^T / sqrt(d)) v
    y = F.linear(y.transpose(1, 2).reshape(B, N, C), attn.out_proj.weight, attn.out_proj.bias)  # (B, N, C)
    x = x + block.ls_1(y)  # ls_*: LayerScale, or the identity (the usual CLIPs)
    return x + block.ls_2(block.mlp(block.ln_2(x)))  # MLP: C -> 4C -> GELU -> C


def clip_preprocess(images, image_size, mean, std):
    """Images in [-1, 1] (B, 3, H, W) -> the normalised (B, 3, S, S) input CLIP was trained on.

    Differentiable: antialiased bicubic resize (a blur before shrinking, so generator images are
    not aliased), then [-1, 1] -> [0, 1] -> (x - mean) / std per channel.
    """
    if images.shape[-2:] != (image_size, image_size):  # non-square images are stretched
        images = F.interpolate(images, size=(image_size, image_size), mode="bicubic",
                               align_corners=False, antialias=True)  # (B, 3, S, S)
    return ((images + 1) / 2 - mean) / std  # (B, 3, S, S)


def tokenize(tokenizer, captions, context_length, warned=None):
    """BPE-tokenise captions into (B, L) ids: SOT, words, EOT, zero padding; returns (ids, eot).

    Captions longer than L tokens are cut (keeping a final EOT) with a warning, once per caption
    when a `warned` set is passed. In open_clip's vocabulary EOT (49407) is the largest id, so
    `ids.argmax(-1)` finds it, as CLIP itself does.
    """
    sot, eot_id = tokenizer.sot_token_id, tokenizer.eot_token_id  # 49406, 49407
    ids = torch.zeros(len(captions), context_length, dtype=torch.long)  # (B, L) 0 = padding
    for i, caption in enumerate(captions):
        seq = [sot] + tokenizer.encode(caption) + [eot_id]  # the BPE lowercases and cleans text
        if len(seq) > context_length:
            if warned is None or caption not in warned:
                warnings.warn(f"caption truncated to {context_length} CLIP tokens "
                              f"({len(seq)} tokens): {caption[:60]!r}...")
                if warned is not None:
                    warned.add(caption)
            seq = seq[:context_length - 1] + [eot_id]  # keep an EOT so pooling still works
        ids[i, :len(seq)] = torch.tensor(seq)
    eot = ids.argmax(dim=-1)  # (B,) index of the end-of-text token
    return ids, eot


def freeze_into_buffers(model: nn.Module):
    """Turn every parameter into a non-persistent buffer (non-trainable tensors are buffers, not frozen parameters).

    The frozen weights then never reach an optimiser or `parameters()` counts, are never written
    into a checkpoint (`state_dict()` skips non-persistent buffers) and still follow `.to()`.
    """
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:  # some slots are None (e.g. unused attention projections)
                del module._parameters[name]  # free the name ...
                module.register_buffer(name, p.detach(), persistent=False)  # ... for a buffer


@torch.no_grad()
def _fold_batchnorm(visual: ModifiedResNet):
    """Fold each frozen batch norm into the conv before it: y = (conv(x) - mean) / sqrt(var + eps) * g + b
    is one conv with weights scaled by s = g / sqrt(var + eps) and bias b - mean * s. The same map in
    half the ops (a ResNet at 32 px is bound by the count of small ops on a CPU), and no batch-norm
    statistics left, so the frozen CLIP still has nothing to save.
    """
    pairs = [(visual, "conv1", "bn1"), (visual, "conv2", "bn2"), (visual, "conv3", "bn3")]  # the stem
    for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        for block in stage:
            pairs += [(block, "conv1", "bn1"), (block, "conv2", "bn2"), (block, "conv3", "bn3")]
            if block.downsample is not None:  # Sequential(avgpool "-1", conv "0", bn "1")
                pairs.append((block.downsample, "0", "1"))
    for module, conv_name, bn_name in pairs:
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          bias=True).to(conv.weight)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])  # (C_out, C_in, k, k)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)  # (C_out,)
        setattr(module, conv_name, fused)
        setattr(module, bn_name, nn.Identity())


# ----------------------------------------------------------------------------------------------
# The wrapper

class FrozenCLIP(nn.Module):
    """A frozen open_clip CLIP with a per-caption text cache; always in eval mode.

    Keep it outside G and D and pass it in (train.py must not save it: its weights are
    non-persistent buffers, so even a module that holds it saves none of them).
    """

    def __init__(
        self,
        model: open_clip.CLIP,  # an open_clip CLIP with the built-in text transformer, a ViT or a ModifiedResNet
        spec: str,  # how it was loaded, e.g. "ViT-L-14/openai" or "tiny:runs/clip.pt"
        mean=OPENAI_DATASET_MEAN,  # per-channel input normalisation the weights were trained with
        std=OPENAI_DATASET_STD,
        feature_layers=None,  # ViT blocks / ResNet stages for image_features; None: 3 evenly spaced blocks, every stage
        cache_size: int = 100_000,  # most captions kept; ViT-L/14 needs ~3 KB per token kept
    ):
        super().__init__()
        v = getattr(model, "visual", None)
        resnet = isinstance(v, ModifiedResNet)
        plain_vit = isinstance(v, open_clip.transformer.VisionTransformer) and v.attn_pool is None \
            and not v.final_ln_after_pool and v.pool_type in ("tok", "avg")
        if not isinstance(model, open_clip.CLIP) or not (resnet or plain_vit):
            raise ValueError(f"CLIP {spec}: only open_clip CLIP models with the built-in text transformer "
                             "and a plain ViT or a ModifiedResNet image tower are supported")
        blocks = list(model.transformer.resblocks) + ([] if resnet else list(v.transformer.resblocks))
        if not all(type(b) is open_clip.transformer.ResidualAttentionBlock and b.attn.batch_first
                   and b.attn._qkv_same_embed_dim and not hasattr(b, "ln_1_kv") for b in blocks):
            raise ValueError(f"CLIP {spec}: its transformer blocks are not open_clip's plain ResidualAttentionBlock "
                             "(clip_block runs exactly that one)")
        if resnet:
            _fold_batchnorm(v)
        freeze_into_buffers(model)
        self.model = model.eval()  # no dropout, no patch dropout
        self.spec = spec
        self.tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)  # CLIP's BPE, offline
        self.context_length = model.context_length  # L = 77
        self.text_width = model.transformer.width  # D
        self.embed_dim = v.output_dim  # E
        self.image_size = v.image_size if resnet else v.image_size[0]  # S (square towers only)
        n_blocks = 4 if resnet else len(v.transformer.resblocks)  # ResNet: its 4 stages
        if feature_layers is None and resnet:  # every stage: strides 4, 8, 16, 32 (project's choice)
            # the stride-8 map is where a 10-20 px shape's outline lives at 32 px
            # (NOTES.md, "Vision-aided D: which ResNet stages")
            feature_layers = list(range(n_blocks))
        elif feature_layers is None:  # ViT: 3 evenly spaced, e.g. 12 blocks -> after 3, 7, 11 (0-based); 3 -> 0, 1, 2
            feature_layers = sorted({max(0, round(n_blocks * k / 3) - 1) for k in (1, 2, 3)})
        self.feature_layers = list(feature_layers)
        if resnet:  # stage i: 4 * width * 2^i channels at stride 2^(i+2)
            stages = [v.layer1, v.layer2, v.layer3, v.layer4]
            self.feature_channels = [stages[i][-1].conv3.out_channels for i in self.feature_layers]  # C_i
            self.feature_sizes = [self.image_size // 2 ** (i + 2) for i in self.feature_layers]  # g_i
        else:
            self.feature_channels = [v.transformer.width] * len(self.feature_layers)  # C_i
            self.feature_sizes = [v.grid_size[0]] * len(self.feature_layers)  # g: every grid is g x g
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.image_dtype = torch.float32  # the image tower's weights; see image_tower_to
        self.cache_size = cache_size
        self._cache = OrderedDict()  # caption -> (tokens (eot+1, D), embedding (E,)), on the CPU, LRU order
        self._warned = set()  # captions already warned about truncation
        self.cache_hits = 0  # captions served from the cache
        self.cache_misses = 0  # captions that had to be encoded

    def train(self, mode: bool = True):
        """Stay in eval mode whatever a parent module asks: the encoder is frozen."""
        return super().train(False)

    @property
    def device(self):
        return self.mean.device

    # -------------------------------------------------------------------- text (frozen, cached)

    @torch.no_grad()
    def _encode(self, captions):
        """Encode captions not yet seen: one batched pass -> {caption: (tokens (n_i, D), embed (E,))}."""
        ids, eot = tokenize(self.tokenizer, captions, self.context_length, self._warned)  # (B, L), (B,)
        n = int(eot.max()) + 1  # nothing after the longest caption's EOT matters (causal mask)
        tokens, embed = text_tower(self.model, ids[:, :n].to(self.device), eot.to(self.device))
        embed = F.normalize(embed.float(), dim=-1).cpu()  # (B, E) on the unit sphere
        tokens = tokens.cpu()  # (B, n, D)
        return {c: (tokens[i, :e + 1].clone(), embed[i]) for i, (c, e) in enumerate(zip(captions, eot.tolist()))}

    def _lookup(self, captions):
        """Cached entries for a batch of captions; only the missing ones are encoded, in one pass."""
        assert len(captions) > 0 and all(isinstance(c, str) for c in captions), "captions: a non-empty list of str"
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))  # unique, in order
        new = {}  # freshly encoded entries
        for start in range(0, len(missing), 512):  # bounded batches for a huge first call
            new.update(self._encode(missing[start:start + 512]))
        self.cache_misses += len(missing)
        self.cache_hits += len(captions) - len(missing)
        entries = []  # gathered before eviction, so even a batch larger than the cache works
        for c in captions:
            entry = new.get(c)
            if entry is None:
                entry = self._cache[c]
                self._cache.move_to_end(c)  # recently used
            entries.append(entry)
        self._cache.update(new)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # drop the least recently used caption
        return entries

    def text_features(self, captions, length=None):
        """Captions -> (tokens (B, L, D), mask (B, L) bool, eot (B,) long) on the CLIP's device.

        tokens: penultimate-block features (after ln_final); zero after the EOT (project choice:
        padding carries nothing; mask it out). mask: True at positions 0..eot inclusive.
        L = `length`, or by default the longest caption's token count rounded up to a multiple
        of 8 (at most the context length 77). Every consumer masks the padding out, so the
        shorter L changes no number, and G, D and U skip the work on up to 77 - L empty tokens
        (their text encoders and cross-attention run on L tokens). Rounding keeps the shapes few
        (torch.compile, tensor cores). Pass length=clip.context_length where features of
        separate calls are combined (sample.py's interpolation and prompt mixing).
        """
        entries = self._lookup(list(captions))
        B, D = len(entries), self.text_width
        eot = torch.tensor([t.shape[0] - 1 for t, _ in entries], dtype=torch.long)  # (B,)
        L = length if length is not None else min(self.context_length, -(-(int(eot.max()) + 1) // 8) * 8)
        if not int(eot.max()) < L <= self.context_length:
            raise ValueError(f"text_features: length {L} must hold the longest caption "
                             f"({int(eot.max()) + 1} tokens) and be at most {self.context_length}")
        tokens = pad_sequence([t for t, _ in entries], batch_first=True)  # (B, max eot + 1, D)
        tokens = F.pad(tokens, (0, 0, 0, L - tokens.shape[1]))  # (B, L, D) zero padding
        mask = torch.arange(L)[None, :] <= eot[:, None]  # (B, L) True up to and including EOT
        assert tokens.shape == (B, L, D) and mask.shape == (B, L)
        return tokens.to(self.device), mask.to(self.device), eot.to(self.device)

    def embed_text(self, captions):
        """Captions -> (B, E) L2-normalised CLIP text embeddings (cached with the tokens)."""
        embed = torch.stack([e for _, e in self._lookup(list(captions))])  # (B, E)
        assert embed.shape == (len(captions), self.embed_dim)
        return embed.to(self.device)

    # -------------------------------------------------------------------- images (differentiable)

    def image_tower_to(self, dtype):
        """Keep the frozen image tower's weights in `dtype` (train.py: bfloat16 under --dtype bfloat16).

        Cast once here rather than by autocast in every call: faster on a CPU with bfloat16 matrix
        units (NOTES.md, "bf16 image tower"). Images are cast on entry and the outputs come back
        in the images' dtype. The text tower stays float32 (its features are computed once per
        caption and cached).
        """
        self.model.visual.to(dtype)
        self.image_dtype = dtype
        return self

    def image_features_and_embedding(self, images):
        """One vision pass: (feature maps [(B, C_i, g_i, g_i)], L2-normalised embedding (B, E))."""
        assert images.ndim == 4 and images.shape[1] == 3, f"images must be (B, 3, H, W), got {tuple(images.shape)}"
        x = clip_preprocess(images.float(), self.image_size, self.mean, self.std)  # (B, 3, S, S)
        features, embed = vision_tower(self.model, x.to(self.image_dtype), self.feature_layers)
        features = [f.to(images.dtype) for f in features]  # back to the caller's dtype
        return features, F.normalize(embed.to(images.dtype), dim=-1)  # gradients reach `images`, never the weights

    def embed_image(self, images):
        """Images in [-1, 1] (B, 3, H, W) -> (B, E) L2-normalised CLIP image embeddings."""
        embed = self.image_features_and_embedding(images)[1]
        assert embed.shape == (images.shape[0], self.embed_dim)
        return embed

    def image_features(self, images):
        """Images in [-1, 1] (B, 3, H, W) -> list of (B, C_i, g_i, g_i) ViT token grids or ResNet maps."""
        features = self.image_features_and_embedding(images)[0]
        assert [f.shape for f in features] == [(images.shape[0], c, g, g)
                                               for c, g in zip(self.feature_channels, self.feature_sizes)]
        return features


# ----------------------------------------------------------------------------------------------
# Loading: "tiny:PATH" | "NAME/TAG" | "NAME/none"

SPEC_HELP = "expected 'tiny:PATH', 'NAME/TAG' (e.g. 'ViT-L-14/openai') or 'NAME/none' (random weights)"


def _cached_weights(cfg):
    """Path of already downloaded weights for an open_clip pretrained config, or None (no network)."""
    if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():  # open_clip prefers the HF hub too
        from huggingface_hub import hf_hub_download
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" -> default file name
        filename = filename or HF_WEIGHTS_NAME
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else os.path.splitext(filename)[0] + ".safetensors"
        for name in (safe, filename):  # the same order open_clip tries
            try:
                return hf_hub_download(repo, name, local_files_only=True)  # never touches the network
            except Exception:
                pass
    elif cfg.get("url"):  # open_clip's own download cache
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(path):
            return path
    return None


def _offline_reason(cfg):
    """Why a download cannot work right now (one line), or None. Takes milliseconds, not hub retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct probe proves nothing; let the download try
    use_hub = cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub()
    host = "huggingface.co" if use_hub else urllib.parse.urlparse(cfg.get("url", "")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()  # DNS + TCP: fails fast offline
        return None
    except OSError as e:
        return f"{host} unreachable: {e}"


class CLIPLoadError(RuntimeError):
    """Weights that cannot be had here (no file, no download, another version's file); its message
    is one line that names the command or flag that avoids it, for train.py and sample.py to print."""


def load_clip(spec: str, device="cpu", cache_size: int = 100_000) -> FrozenCLIP:
    """Build the frozen CLIP named by `spec` (see the module docstring); fails fast and clearly."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"bad CLIP spec {spec!r}: {SPEC_HELP}")
    if spec.startswith("tiny:"):
        path = spec[len("tiny:"):]
        if not os.path.isfile(path):
            raise CLIPLoadError(f"tiny CLIP file {path!r} not found: train one with "
                               "`python train.py --stage clip --out DIR` (it writes DIR/clip.pt)")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # {"config": dict, "state_dict": ...}
        config = {"vision": "vit", **ckpt["config"]}  # files saved before the ResNet tower hold a ViT
        # earlier versions had an optional conv stem for the ViT; a file without it loads as is
        unknown = sorted(k for k, v in config.items() if k not in TinyCLIPConfig.__dataclass_fields__
                         and not (k == "conv_stem" and not v))
        if unknown:
            raise CLIPLoadError(f"tiny CLIP file {path!r} was written by another version of 00_clip.py "
                               f"(settings {unknown} are unknown here): retrain it with "
                               "`python train.py --stage clip --out DIR`")
        config = {k: v for k, v in config.items() if k in TinyCLIPConfig.__dataclass_fields__}
        model = build_tiny_clip(TinyCLIPConfig(**config))
        model.load_state_dict(ckpt["state_dict"])
        return FrozenCLIP(model, spec, cache_size=cache_size).to(device)
    name, sep, tag = spec.rpartition("/")  # "ViT-L-14/openai" -> ("ViT-L-14", "/", "openai")
    if not sep or not name or not tag:
        raise ValueError(f"bad CLIP spec {spec!r}: {SPEC_HELP}")
    if name not in open_clip.list_models():
        raise ValueError(f"bad CLIP spec {spec!r}: unknown open_clip model {name!r} "
                         f"(e.g. ViT-B-32, ViT-B-16, ViT-L-14, ViT-H-14; see open_clip.list_models())")
    if tag == "none":  # explicitly random weights: no download is attempted
        model = open_clip.create_model(name, pretrained=None)
        return FrozenCLIP(model, spec, cache_size=cache_size).to(device)
    cfg = open_clip.get_pretrained_cfg(name, tag)  # {} for an unknown tag
    if not cfg:
        raise ValueError(f"bad CLIP spec {spec!r}: {name} has no pretrained tag {tag!r}; known: "
                         f"{open_clip.list_pretrained_tags_by_model(name)} or 'none'")
    path = _cached_weights(cfg)
    if path is None:
        hint = (f"could not load pretrained CLIP {spec} (no internet or cache?: {{}}): train a tiny one with "
                f"`python train.py --stage clip` and pass `--clip tiny`, or pass `--clip {name}/none` for random weights")
        reason = _offline_reason(cfg)
        if reason is not None:
            raise CLIPLoadError(hint.format(reason))
        try:
            path = open_clip.pretrained.download_pretrained(cfg)  # the real download (first use)
        except Exception as e:
            raise CLIPLoadError(hint.format(f"{type(e).__name__}: {str(e)[:200]}")) from e
    # quick_gelu: OpenAI's weights were trained with QuickGELU, which the plain config lacks.
    model = open_clip.create_model(name, pretrained=path, force_quick_gelu=cfg.get("quick_gelu", False))
    return FrozenCLIP(model, spec, mean=cfg.get("mean", OPENAI_DATASET_MEAN), std=cfg.get("std", OPENAI_DATASET_STD),
                      cache_size=cache_size).to(device)


def tiny_clip_fingerprint(spec: str):
    """The first 16 hex digits of a tiny CLIP file's sha256, or None for an open_clip model (its
    name and tag say which weights it is). train.py stores it in checkpoints, so that resuming and
    sampling can tell a tiny CLIP trained anew under the same path from the one G learned on."""
    if not spec.startswith("tiny:"):
        return None
    with open(spec[len("tiny:"):], "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Training the tiny CLIP (CLIP's contrastive objective on the training data)

def contrastive_loss(image_embed, text_embed, logit_scale, groups, negative_embed=None, negative_groups=None):
    """Symmetric InfoNCE (CLIP, Radford et al. 2021) with a learned temperature.

    image_embed, text_embed: (B, E) L2-normalised; logit_scale: log(1 / temperature);
    groups: (B,) long, equal for identical captions, which are all counted as positives
    (a batch with a caption twice has no single right answer otherwise).
    negative_embed: optional (M, E) extra captions on the text side of the image -> text term
    only (hard negatives, NegCLIP of Yuksekgonul et al. 2023), with their groups (M,): one that
    happens to be some image's own caption counts as that image's positive.
    """
    # EXERCISE: InfoNCE logits (scale capped at 100), same-group texts as positives, the text->image term
    ### BEGIN SOLUTION
    logits = logit_scale.exp().clamp(max=100) * image_embed @ text_embed.t()  # (B, B) cosine / T
    positives = (groups[:, None] == groups[None, :]).float()  # (B, B), 1 on the diagonal at least
    targets = positives / positives.sum(dim=1, keepdim=True)  # each row a distribution over texts
    text_to_image = F.cross_entropy(logits.t(), targets)  # `positives` is symmetric: same targets
    ### END SOLUTION
    if negative_embed is not None:
        extra = logit_scale.exp().clamp(max=100) * image_embed @ negative_embed.t()  # (B, M)
        logits = torch.cat([logits, extra], dim=1)  # (B, B + M)
        positives = torch.cat([positives, (groups[:, None] == negative_groups[None, :]).float()], dim=1)
        targets = positives / positives.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + text_to_image) / 2


def train_tiny_clip(dataset, out_path, steps=1000, batch_size=128, lr=2e-3, device="cpu", resolution=32,
                    log_every=50, seed=0, pool_size=8192, config=None, negatives=None, vision="vit") -> FrozenCLIP:
    """Train a tiny CLIP on (image, caption) pairs, save it atomically to `out_path`, return it frozen.

    The first `pool_size` pairs are read once into memory (a procedural set renders slower than a
    small ViT trains) and minibatches are drawn from them with a seeded generator.
    negatives: optional function caption -> lists of hard-negative captions (e.g. one list per
    attribute, data.shapes_hard_negatives); each step every image brings one of them into the
    batch, drawn by picking a list uniformly, then a caption in it, so the one-word differences
    a random batch rarely holds (position, shape) are learned too.
    vision: the image tower when no config is given, "vit" or "resnet" (see TinyCLIPConfig).
    The file holds {"config": dict, "state_dict": ...}, loadable with torch.load(weights_only=True).
    """
    torch.manual_seed(seed)  # the initial weights
    gen = torch.Generator().manual_seed(seed)  # the minibatch order
    cfg = config or TinyCLIPConfig(image_size=resolution, vision=vision)
    model = build_tiny_clip(cfg).to(device).train()
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)
    mean = torch.tensor(OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)  # the same input mapping
    std = torch.tensor(OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)  # as FrozenCLIP uses

    t0 = time.time()
    n = min(len(dataset), pool_size)  # pairs in the in-memory pool
    pairs = [dataset[i] for i in range(n)]
    images = torch.stack([img for img, _ in pairs])  # (n, 3, H, W) in [-1, 1]
    images = clip_preprocess(images, cfg.image_size, mean.cpu(), std.cpu())  # (n, 3, S, S), done once
    captions = [c for _, c in pairs]
    ids, eot = tokenize(tokenizer, captions, cfg.context_length, warned=set())  # (n, L), (n,)
    index = {}  # caption -> group id, so identical captions are positives of each other
    groups = torch.tensor([index.setdefault(c, len(index)) for c in captions])  # (n,)
    if negatives is not None:
        # A table of every pool caption's hard negatives: neg[i, a, k] indexes a flat caption list,
        # count[i, a] says how many of the k are real (0: no list a), so draws stay inside lists.
        lists = [[l for l in negatives(c) if l] for c in captions]  # per pair: non-empty lists
        flat = sorted({c for per in lists for l in per for c in l})  # each distinct negative once
        where = {c: k for k, c in enumerate(flat)}
        A = max(1, max(len(per) for per in lists))  # lists per caption
        K = max([1] + [len(l) for per in lists for l in per])  # captions per list
        neg = torch.zeros(n, A, K, dtype=torch.long)
        count = torch.zeros(n, A, dtype=torch.long)  # 0: no such list for this pair
        for i, per in enumerate(lists):
            for a, l in enumerate(per):
                neg[i, a, : len(l)] = torch.tensor([where[c] for c in l])
                count[i, a] = len(l)
        has_neg = count.sum(1) > 0  # (n,) pairs with at least one negative
        neg_ids, neg_eot = tokenize(tokenizer, flat or [""], cfg.context_length, warned=set())  # (M, L), (M,)
        neg_groups = torch.tensor([index.setdefault(c, len(index)) for c in flat or [""]])  # (M,)
        print(f"clip: {len(flat)} distinct hard negatives for {int(has_neg.sum())} pairs")
    print(f"clip: pool of {n} pairs ({len(set(captions))} distinct captions) in {time.time() - t0:.1f}s")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]  # matrices
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]  # gains, biases, T
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)  # CLIP's AdamW settings
    warmup = max(1, steps // 20)  # linear warm-up, then cosine decay to zero (CLIP's schedule)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    layers = []  # no feature maps are needed while training
    t_start, t_log, seen = time.time(), time.time(), 0  # seen: images since the last log line
    for step in range(steps):
        idx = torch.randint(n, (batch_size,), generator=gen)  # (B,) with replacement
        x = images[idx].to(device)  # (B, 3, S, S)
        e = eot[idx]  # (B,)
        t = ids[idx, : int(e.max()) + 1].to(device)  # (B, n) trimmed after the longest caption
        image_embed = F.normalize(vision_tower(model, x, layers)[1], dim=-1)  # (B, E)
        text_embed = F.normalize(text_tower(model, t, e.to(device))[1], dim=-1)  # (B, E)
        negative_embed = negative_groups = None
        if negatives is not None and bool(has_neg[idx].any()):
            keep = idx[has_neg[idx]]  # (B',) the batch's pairs that have hard negatives
            c = count[keep].float()  # (B', A)
            a = torch.multinomial((c > 0).float(), 1, generator=gen)[:, 0]  # (B',) a list, uniformly
            k = (torch.rand(len(keep), generator=gen) * c[torch.arange(len(keep)), a]).long()  # (B',)
            j = neg[keep, a, k]  # (M = B',) indices into the flat negatives
            ne = neg_eot[j]
            nt = neg_ids[j, : int(ne.max()) + 1].to(device)  # (M, n)
            negative_embed = F.normalize(text_tower(model, nt, ne.to(device))[1], dim=-1)  # (M, E)
            negative_groups = neg_groups[j].to(device)
        loss = contrastive_loss(image_embed, text_embed, model.logit_scale, groups[idx].to(device),
                                negative_embed, negative_groups)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        seen += batch_size
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"clip step {step:5d}/{steps} loss {loss.item():.4f} "
                  f"T {1 / model.logit_scale.exp().item():.4f} {seen / (time.time() - t_log):.0f} img/s")
            t_log, seen = time.time(), 0
    print(f"clip: {steps} steps in {time.time() - t_start:.1f}s")

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp{os.getpid()}"  # write, then rename: a crash never leaves half a file
    torch.save({"config": asdict(cfg), "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, out_path)
    return load_clip(f"tiny:{out_path}", device=device)


def zero_shot_attribute_accuracy(clip: FrozenCLIP, dataset, n=500, vocab=None, caption_fn=None, n_templates=None):
    """Per attribute, how often the image's own caption beats the captions that change that attribute.

    For each of the first n images and each attribute, the candidates are the true caption and
    the same caption (same template) with every other value of that attribute; the pick is the
    highest cosine similarity of embed_image and embed_text. Captions naming a shape colour equal
    to the background are skipped (no image shows them). Defaults come from data.py (shapes).
    Returns {attribute: accuracy in [0, 1]}.
    """
    if vocab is None or caption_fn is None:
        import data  # imported lazily: 00 imports nothing from the project at module level
        vocab = vocab or {"shape": list(data.SHAPES), "color": list(data.COLORS), "background": list(data.COLORS),
                          "size": list(data.SIZES), "position": list(data.POSITIONS)}
        caption_fn = caption_fn or data.shapes_caption
        n_templates = n_templates or len(data.CAPTION_TEMPLATES)
    n_templates = n_templates or 1
    n = min(n, len(dataset))
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(n)])  # (n, 3, H, W)
        image_embed = torch.cat([clip.embed_image(images[s:s + 256].to(clip.device)) for s in range(0, n, 256)])
    attrs = [dataset.attributes(i) for i in range(n)]
    accuracy = {}
    for key, values in vocab.items():
        options, texts = [], []  # per image: the candidate attribute dicts and their captions
        for i, a in enumerate(attrs):
            o = [dict(a, **{key: v}) for v in values]  # the true caption is among them
            o = [d for d in o if d.get("color") is None or d.get("color") != d.get("background")]
            options.append(o)
            texts.append([caption_fn(d, template=i % n_templates) for d in o])
        distinct = sorted({t for per in texts for t in per})  # every caption embedded once, in chunks
        with torch.no_grad():
            text_embed = torch.cat([clip.embed_text(distinct[s:s + 512]) for s in range(0, len(distinct), 512)])
        row = {t: k for k, t in enumerate(distinct)}
        correct = 0
        for i, a in enumerate(attrs):
            scores = text_embed[[row[t] for t in texts[i]]] @ image_embed[i]  # (K,) cosine similarities
            correct += int(options[i][int(scores.argmax())][key] == a[key])
        accuracy[key] = correct / n
    return accuracy


# ----------------------------------------------------------------------------------------------

def demo():
    torch.manual_seed(0)
    clip = FrozenCLIP(build_tiny_clip(TinyCLIPConfig()), spec="tiny (random weights, demo)")
    print(f"FrozenCLIP {clip.spec}: D={clip.text_width} E={clip.embed_dim} L={clip.context_length} "
          f"S={clip.image_size}, trainable parameters: {sum(p.numel() for p in clip.parameters())}, "
          f"frozen weights: {sum(b.numel() for b in clip.model.buffers()):,}")
    prompts = ["a red circle", "a large blue square on the left of a yellow background"]
    tokens, mask, eot = clip.text_features(prompts)
    print(f"text_features: tokens {tuple(tokens.shape)}, mask {tuple(mask.shape)}, eot {eot.tolist()}, "
          f"real tokens per prompt {mask.sum(1).tolist()}")
    assert (mask.sum(1) == eot + 1).all() and eot[0] < eot[1]  # the mask covers 0..eot, longer prompt, later EOT
    print(f"embed_text {tuple(clip.embed_text(prompts).shape)} (norms {clip.embed_text(prompts).norm(dim=-1).tolist()})")
    images = torch.rand(2, 3, 64, 64, requires_grad=True) * 2 - 1  # any resolution: resized inside
    print(f"embed_image {tuple(clip.embed_image(images).shape)}, image_features "
          f"{[tuple(f.shape) for f in clip.image_features(images)]} (channels {clip.feature_channels})")
    misses = clip.cache_misses
    clip.text_features(prompts + prompts)  # seen before: nothing is encoded again
    print(f"cache: {clip.cache_hits} hits, {clip.cache_misses} misses (the repeat call encoded {clip.cache_misses - misses})")
    assert clip.cache_misses == misses


if __name__ == "__main__":
    demo()


# -----------------------------------------------------------------------------
# Exercises. Each says what to change, what to look for, and which test or demo checks it.
# (The ### BEGIN / END SOLUTION regions above are the other kind: `python make_student_copy.py`
# cuts them out for students, and tests/test_student_copy.py lists the tests that grade them.)
#
# 1. Penultimate or last layer. In text_tower, hand G and D the last block's tokens instead of the
#    penultimate ones. Look for: test_text_tower_matches_open_clip fails. Why might the paper
#    prefer the penultimate block (what is the last one trained to do with its tokens)?
#    Check: pytest tests/test_clip.py -k text_tower
# 2. The caption cache. Build FrozenCLIP(build_tiny_clip(TinyCLIPConfig()), "t", cache_size=2) and
#    call text_features on three prompts twice: count cache_hits and cache_misses before and after.
#    Look for: a repeated prompt costs nothing while it is cached; the oldest is dropped first.
#    Check: pytest tests/test_clip.py -k cache; the demo's last assertion.
# 3. Hard negatives. Train two tiny CLIPs with train_tiny_clip(data.ShapesDataset(32), PATH,
#    steps=300, vision="resnet"), one with negatives=data.shapes_hard_negatives and one without, and
#    compare zero_shot_attribute_accuracy(clip, data.ShapesDataset(32, seed=1)). Look for: which
#    attributes a random batch rarely contrasts (position, shape) and what the negatives change.
#    A few minutes on a CPU; check: pytest tests/test_clip.py -k hard_negatives
# 4. Duplicate captions. In contrastive_loss pass groups=torch.arange(B) for a batch whose captions
#    repeat (e.g. each caption twice, with equal text embeddings). Look for: the loss can no longer
#    fall below log 2, however well the images match. Check: the explicit-formula test,
#    pytest tests/test_clip.py -k contrastive
