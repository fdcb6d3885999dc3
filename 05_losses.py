"""
05 - The losses that train GigaGAN (Sec. 3.3, Eq. 6, 8-9; Sec. 3.4 for the upsampler's LPIPS).

What. Every term the base model and the upsampler are trained with, as small functions of
discriminator outputs and embeddings, plus two composite helpers that train.py calls once
per step (they only sum named terms and return a dict of floats for logging; the loop
itself - D step, lazy R1, G step, EMA - stays written out in train.py).

    non-saturating logistic loss, summed over all MS-I/O predictions (Eq. 6):
        L_D = sum_p E[softplus(-D_p(x, c))] + E[softplus(D_p(G(c), c))]
        L_G = sum_p E[softplus(-D_p(G(c), c))]
    matching-aware loss (Eq. 8): a wrong caption c^ turns any pair into a FAKE pair,
        V_match = E[softplus(D(x, c^))] + E[softplus(D(G(c), c^))]      (D minimises it)
        Table 1 rows: "Matching-aware D" keeps the (x, c^) term only (match_fake=False),
        "Matching-aware G and D" both (match_fake=True, the default): table1_matching.
    CLIP contrastive loss (Eq. 9), frozen CLIP, generated images against the batch's captions:
        L_CLIP = E[-log exp(e_img(G(c_0)) . e_txt(c_0) / tau) / sum_n exp(e_img(G(c_0)) . e_txt(c_n) / tau)]
    vision-aided loss: the same non-saturating loss on a second discriminator that sees
        frozen CLIP image features and the caption embedding (Kumari et al. 2022)
    R1 (Mescheder et al. 2018) on real images and every real pyramid level, lazy:
        R1 = sum_levels E_b ||d(sum_p D_p(x, c)) / d x_level||^2,  applied as gamma/2 * R1 * interval
    LPIPS (Zhang et al. 2018) for the upsampler, weight 10.
    mode seeking (Mao et al. 2019; project choice, not in the paper, off unless weighted):
        L_ms = 1 / mean_pairs(mean|G(c, z1) - G(c, z2)| / mean|z1 - z2|), pairs of one caption
    relativistic pairing with R1 + R2 (R3GAN, Huang et al. 2024; project option, off by default):
        L_D = sum_p E_b[softplus(D_p(G(c_b), c_b) - D_p(x_b, c_b))],  L_G the same with the two swapped;
        matching pairs ranked the same way, softplus(D(x, c^) - D(x, c)); R2 is R1 at the generated images

Why. The plain GAN loss only asks "is this a real image?"; a text-conditioned D can answer
that while ignoring the text. The matching-aware pairs make ignoring the text costly for D,
and the CLIP and vision-aided terms bring in a pretrained notion of image-text agreement.

The matching-aware rows of Table 1 ("Matching-aware D" 27.29 FID -> "G and D" 21.66). The
paper: "enforcing the matching-aware loss on generated images from G, as well as real images
x, leads to clear gains". So the "D" row shows D the real image with a wrong caption, (x, c^),
as its only mismatched pair, and the "G and D" row adds G's image with a wrong caption,
(G(c), c^): both are D-side terms of Eq. 8 (match_d, match_fake).

A G-side term is this project's option (match_g), not a paper row. Eq. 6 puts
V_match(G_i, D_ij) inside the G-D game, but the paper gives G no matching-aware formula; the
only part of Eq. 8 that depends on G is softplus(D(G(c), c^)). Two readings are possible:
  (i)  zero-sum / non-saturating: G minimises softplus(-D(G(c), c^)), i.e. G tries to make
       its image look REAL under a caption it does not depict. D learns that real images
       with wrong captions are fake, so the data itself does not satisfy this: it pulls G
       away from the data and against text alignment.
  (ii) G minimises softplus(+D(G(c), c^)): G's image, like a real one, should be judged
       FAKE under a wrong caption. The data satisfies it (D -> fake on every mismatched
       pair), so it leaves the GAN's fixed point alone, and it is a contrastive push toward
       alignment.
match_g implements (ii) (this project's choice, on by default; the paper gives no formula):
the G-side term has the SAME sign as D's, and grows with D(G(c), c^). tests/test_losses.py
checks the sign. table1_matching switches it off: the paper's rows are D-side terms only.

How train.py uses it (one step; the loop stays in train.py):
    text = clip.text_features(captions); emb = clip.embed_text(captions)
    perm, valid = mismatched_permutation(captions, return_valid=True)
    wrong = permute_text(text, perm); ids = caption_ids(captions)
    vision = VisionAided(vd, clip, emb, emb[perm])   # the vision-aided D and what it reads
    D step:  loss, logs = discriminator_loss(D, real_pyr, G(z, *text), text, wrong, cfg, wrong_valid=valid,
                                             vision=vision)
    R1 step: every cfg.r1_interval steps, loss, logs = lazy_r1_loss(D, real_pyr, text, cfg)
    G step:  loss, logs = generator_loss(D, G(z, *text), text, wrong, cfg, wrong_valid=valid, clip=clip,
                                         text_embed=emb, caption_ids=ids, vision=vision)
    (upsampler: vision=None, plus lpips=LPIPS("vgg"), lpips_target=the real high-res image)

Run:  python 05_losses.py        (a CPU demo with toy stand-ins, a few seconds)

Shape legend (shared by every numbered file):
    B batch, C channels, H W height width, L text tokens, D text width, E embedding width,
    P number of discriminator predictions (15 for the 5-level MS-I/O D).
    A pyramid is a list of (B, 3, H_i, W_i) images in [-1, 1], FINEST first.
    `text` is the (tokens (B, L, D), mask (B, L) bool, eot (B,) long) triple from 00_clip.
"""
import os
import socket
import dataclasses
import importlib
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_clip = importlib.import_module("00_clip")  # freeze_into_buffers: the frozen LPIPS trunk, as the frozen CLIP


@dataclass
class LossConfig:
    """Weights and switches of every loss term; each marked paper value or project choice."""

    match_d: bool = True            # paper value: on, Eq. 8 for D: (real, c^) is fake (Table 1 "Matching-aware D")
    match_fake: bool = True         # paper value: on, D's (G(c), c^) is fake too (Table 1 "Matching-aware G and D")
    match_g: bool = True            # project choice, not a paper row: G's term (ii), softplus(D(G(c), c^))
    match_weight: float = 1.0       # paper value: Eq. 6 adds V_match to V_GAN with weight 1
    clip_weight: float = 1.0        # project choice: lambda_CLIP of Eq. 9 (the paper gives no number)
    clip_temperature: float = 0.01  # project choice: CLIP's own trained scale (logit_scale = 100)
    vision_weight: float = 0.5      # project choice: weight of the vision-aided terms (G and D) (tiny: 2, see LOSS_PRESETS)
    vision_match: bool = True       # project choice: the vision-aided D also sees (x, c^) as fake
    r1_gamma: float = 0.2048        # paper value: low end of its 0.2048-2.048 range (tiny: 1.0, see LOSS_PRESETS)
    r1_interval: int = 16           # paper value: lazy R1 every 16 D steps (StyleGAN2's interval)
    lpips_weight: float = 10.0      # paper value: LPIPS weight of the 64 -> 512 upsampler
    pixel_weight: float = 0.0       # project choice, not in the paper: weight of a pixel MSE to lpips_target
    mode_seeking_weight: float = 0.0  # project choice, not in the paper: MSGAN's diversity term (base G only)
    relativistic: bool = False      # project option, not in the paper: R3GAN's pairing for the (x, c) terms
    r2_gamma: float = 0.0           # project option, not in the paper: R3GAN's R2, R1's penalty on generated images

    def __post_init__(self):
        for name in ("match_weight", "clip_weight", "vision_weight", "r1_gamma", "lpips_weight", "pixel_weight",
                     "mode_seeking_weight", "r2_gamma"):
            assert getattr(self, name) >= 0, f"{name} {getattr(self, name)}: a weight, >= 0 (0 turns the term off)"
        assert self.clip_temperature > 0, f"clip_temperature {self.clip_temperature}: > 0"
        assert self.r1_interval >= 1, f"r1_interval {self.r1_interval}: >= 1 (steps between R1 steps)"


# Named loss settings: the base model and the upsampler, and "<stage>_tiny" where the tiny preset
# differs (train.py's loss_preset picks "<stage>_<preset>" when it exists, else "<stage>"). The
# upsampler is trained with "the same losses as the base model" (paper, Sec. 3.4: adversarial,
# matching-aware, CLIP, R1) plus LPIPS (weight 10), without the vision-aided loss.
LOSS_PRESETS = {
    "base": LossConfig(),
    # the tiny 32 px base model on a CPU (project's choice): R1 gamma 1.0, inside the paper's
    # 0.2048-2.048 (NOTES.md, "R1 gamma"); vision-aided weight 2 (NOTES.md, "Vision-aided weight");
    # CLIP-loss weight 0.1 (NOTES.md, "CLIP loss weight" and "ResNet CLIP at full CLIP-loss weight").
    "base_tiny": LossConfig(r1_gamma=1.0, vision_weight=2.0, clip_weight=0.1),
    "upsampler": LossConfig(vision_weight=0.0),
    # the tiny 32 -> 128 upsampler on a CPU (project's choice): its LPIPS has a random
    # backbone, which barely pins colours, so a pixel MSE holds the image to the real one
    # (NOTES.md, "Pixel term in the GAN steps"). No CLIP loss here (project's choice, a
    # departure from the paper's "same losses"): with the tiny CLIP a full weight lets G fool
    # it with colour fringes (base_tiny, above), and the tiny stage's GAN steps are there to
    # sharpen, not to relearn what the low-res input fixes. Not measured for the upsampler.
    "upsampler_tiny": LossConfig(vision_weight=0.0, clip_weight=0.0, pixel_weight=1000.0),
}


# -----------------------------------------------------------------------------
# Wrong captions for the matching-aware loss
#
# A shuffled batch is the usual source of wrong captions, but a batch can hold the same
# caption several times (a small data set such as `shapes` repeats captions, web data
# repeats "a photo"). A (real image, its own caption) pair labelled fake would teach D the
# opposite of Eq. 8, so the permutation must avoid identical caption STRINGS, not just
# identical indices.

def caption_ids(captions):
    """(B,) long: equal ids for identical caption strings, numbered by first occurrence."""
    table = {}  # caption string -> id
    return torch.tensor([table.setdefault(c, len(table)) for c in captions], dtype=torch.long)


def mismatched_permutation(captions, generator=None, return_valid=False):
    """A random permutation `perm` (B,) such that captions[perm[i]] != captions[i] when possible.

    Image i is paired with wrong caption perm[i]. Construction (no loop over the batch):
    sort the batch by caption id, with the groups in random order and random order inside
    each group, then shift the sorted list cyclically by t. Identical captions now sit in
    one block of length n_g; a shift with m <= t <= B - m, m the largest block, moves every
    element out of its own block, so no caption meets itself.
    If m > B / 2 no such permutation exists; the shift t = B - m then gives the most
    mismatched pairs possible, 2 (B - m), and the rest stay matched (all of them if every
    caption is the same). Those rows must be left out of the matching-aware loss: ask for
    `return_valid=True` to get the (B,) bool mask of truly mismatched rows, which
    discriminator_loss / generator_loss take as `wrong_valid`; otherwise a warning is issued.
    The only Python loop is the string -> id lookup in caption_ids; perm and valid are CPU tensors.
    """
    ids = caption_ids(captions)  # (B,)
    B = ids.numel()
    counts = torch.bincount(ids)  # (n_groups,) size of each caption group
    m = int(counts.max())  # the largest group
    group_rank = torch.randperm(len(counts), generator=generator)[ids]  # (B,) random group order
    within = torch.randperm(B, generator=generator)  # random order inside groups
    order = within[torch.argsort(group_rank[within], stable=True)]  # (B,) sorted by group, groups contiguous
    if 2 * m <= B:  # a full derangement over caption identity exists
        t = int(torch.randint(m, B - m + 1, (1,), generator=generator))  # any shift in [m, B - m] works
    else:  # impossible: B - m is the best shift (see docstring)
        t = B - m
    perm = torch.empty_like(order)  # (B,)
    perm[order] = order.roll(-t)  # the element at sorted slot k gets the caption at slot k + t
    valid = ids[perm] != ids  # (B,) True where the pair really is mismatched
    if return_valid:
        return perm, valid
    if not bool(valid.all()):
        warnings.warn(f"mismatched_permutation: {int((~valid).sum())} of {B} images keep their own caption "
                      "(one caption fills more than half the batch); pass return_valid=True and mask them")
    return perm


def permute_text(text, perm):
    """The (tokens, mask, eot) triple with its batch rows reordered by perm: the wrong captions."""
    tokens, mask, eot = text
    perm = perm.to(tokens.device)
    return tokens[perm], mask[perm], eot[perm]


# -----------------------------------------------------------------------------
# Non-saturating logistic loss (Goodfellow et al. 2014), summed over all predictions
#
# A prediction is a logit: (B,) for an image-level one, (B, h, w) for a patch map. Each
# prediction's loss is a mean over its own elements, and the P predictions of the MS-I/O
# D are summed with equal weight (Eq. 6 sums V_GAN over all (i, j)). Logits are cast to
# float32 so bf16 autocast does not round the softplus.

def _row_means(pred):
    """(B,) per-image mean of a (B,) or (B, h, w) prediction, in float32."""
    return pred.float().reshape(pred.shape[0], -1).mean(1)  # (B,)


def _softplus_rows(pred, sign=1.0):
    """(B,) per-image mean of softplus(sign * logit) over a (B,) or (B, h, w) prediction."""
    return F.softplus(sign * pred.float()).reshape(pred.shape[0], -1).mean(1)  # (B,)


def _masked_mean(values, valid):
    """Mean of (B,) values over valid rows (all rows if valid is None; 0 if none is valid)."""
    if valid is None:
        return values.mean()
    valid = valid.to(values.device, values.dtype)  # (B,) 1. or 0.
    return (values * valid).sum() / valid.sum().clamp(min=1.0)


def d_adversarial_loss(real_preds, fake_preds):
    """D's loss: sum_p mean softplus(-real_p) + mean softplus(fake_p); reals up, fakes down."""
    loss = 0.0
    for real, fake in zip(real_preds, fake_preds, strict=True):
        # -log sigmoid(D(x, c)) - log(1 - sigmoid(D(G(c), c)))
        loss = loss + F.softplus(-real.float()).mean() + F.softplus(fake.float()).mean()
    return loss


def g_adversarial_loss(fake_preds):
    """G's non-saturating loss: sum_p mean softplus(-fake_p) = -log sigmoid(D(G(c), c))."""
    # EXERCISE: non-saturating G loss: sum over predictions of mean softplus(-logit)
    ### BEGIN SOLUTION
    return sum(F.softplus(-fake.float()).mean() for fake in fake_preds)
    ### END SOLUTION


# Relativistic pairing (R3GAN, Huang et al. 2024; a project option, off by default): each real
# image is paired with the generated image of the same caption, and the loss asks only that
# the one score above the other: softplus(D(lower) - D(higher)). D's step calls it with
# (fake, real), G's with (real, fake). Paired with R1 on reals and R2 on fakes, R3GAN reports
# every mode of Stacked-MNIST where the non-saturating loss misses some. Patch maps are
# averaged per image first, as R1 does (one score per image and prediction). A relativistic
# D's logits have no fixed zero, so the matching-aware pairs are ranked too (project's
# choice): an image with a wrong caption below the same image with its own caption, for D
# (x and G(c)) and for G's term. The vision-aided D keeps the non-saturating loss.

def relativistic_loss(lower_preds, higher_preds, valid=None):
    """sum_p mean_b softplus(lower_p,b - higher_p,b): row b of both lists is one pair (masked
    mean over the valid rows if given)."""
    return sum(_masked_mean(F.softplus(_row_means(lo) - _row_means(hi)), valid)
               for lo, hi in zip(lower_preds, higher_preds, strict=True))



# -----------------------------------------------------------------------------
# Matching-aware loss (Eq. 8): an image paired with a wrong caption c^ is a FAKE pair
#
# D is shown the real image with c^ (Table 1 "Matching-aware D") and, by default, the
# generated one too ("Matching-aware G and D"). The real pair is the one that matters: without
# it, D could call "fake" on any generated image and ignore the text. Rows whose permutation
# could not avoid their own caption are masked out by `valid`.

def table1_matching(cfg, row):
    """The matching-aware switches of a row of the paper's Table 1, as a LossConfig derived from cfg.

    "+attention" (before the matching-aware rows): no mismatched pair at all.
    "+matching_aware_d": D sees (x, c^) as fake; the (G(c), c^) pair is never built.
    "+matching_aware_g_and_d": D sees (x, c^) and (G(c), c^) as fake (every later row).
    The project's G-side term (match_g) is off in all of them: it is not a paper row.
    """
    rows = {
        "+attention": dict(match_d=False, match_fake=False, match_g=False),
        "+matching_aware_d": dict(match_d=True, match_fake=False, match_g=False),
        "+matching_aware_g_and_d": dict(match_d=True, match_fake=True, match_g=False),
    }
    assert row in rows, f"unknown Table 1 matching row {row!r}; choose from {list(rows)}"
    return dataclasses.replace(cfg, **rows[row])


def d_matching_loss(real_wrong_preds, fake_wrong_preds, valid=None):
    """Eq. 8 for D: sum_p E[softplus(D_p(x, c^))] + E[softplus(D_p(G(c), c^))]; both pairs fake.

    fake_wrong_preds None: the (x, c^) term only (Table 1 "Matching-aware D").
    """
    assert fake_wrong_preds is None or len(fake_wrong_preds) == len(real_wrong_preds)
    loss = 0.0
    # EXERCISE: Eq. 8 for D: per prediction, masked mean softplus(+logit) of (x, c^), plus (G(c), c^) if given
    ### BEGIN SOLUTION
    for p, real_wrong in enumerate(real_wrong_preds):
        loss = loss + _masked_mean(_softplus_rows(real_wrong), valid)  # -log(1 - sigmoid(D(x, c^)))
        if fake_wrong_preds is not None:
            loss = loss + _masked_mean(_softplus_rows(fake_wrong_preds[p]), valid)  # -log(1 - sigmoid(D(G(c), c^)))
    ### END SOLUTION
    return loss


def g_matching_loss(fake_wrong_preds, valid=None):
    """G side of Eq. 8, reading (ii) of the module docstring: sum_p E[softplus(+D_p(G(c), c^))].

    Same sign as D's term: G lowers it when D scores G's image LOW under a wrong caption.
    """
    return sum(_masked_mean(_softplus_rows(p), valid) for p in fake_wrong_preds)


# -----------------------------------------------------------------------------
# CLIP contrastive loss (Eq. 9), generated images only, frozen CLIP
#
# Each generated image must pick out its own caption among the batch's captions, in the
# embedding space of a frozen CLIP: a softmax over B captions with the right one as target.
# Only the image -> text direction exists: the captions are given, not generated.

def clip_contrastive_loss(image_embed, text_embed, temperature, caption_ids=None):
    """Eq. 9: mean_i -log( sum_{j ~ i} exp(e_i . t_j / tau) / sum_j exp(e_i . t_j / tau) ).

    image_embed, text_embed: (B, E), L2-normalised (FrozenCLIP.embed_image / embed_text).
    Duplicate captions: j ~ i means "caption j is the same string as caption i" when
    caption_ids (B,) is given, so every copy of the right caption counts as a positive.
    With one-hot targets a caption present k times would count its copies as negatives
    with the very same logit, and the loss could never drop below log k; as the copies'
    embeddings are identical the gradient is the same either way, so this only keeps the
    value honest (0 at a perfect match). Without caption_ids, j ~ i iff j = i.
    """
    B, E = image_embed.shape
    assert text_embed.shape == (B, E), (text_embed.shape, image_embed.shape)
    # EXERCISE: Eq. 9: cross-entropy of cosines / tau; with caption_ids, every copy a positive
    ### BEGIN SOLUTION
    logits = image_embed.float() @ text_embed.float().t() / temperature  # (B, B) cosine / tau
    if caption_ids is None:
        return F.cross_entropy(logits, torch.arange(B, device=logits.device))  # target: the diagonal
    ids = caption_ids.to(logits.device)
    positive = ids[:, None] == ids[None, :]  # (B, B) True where caption j equals caption i
    log_all = torch.logsumexp(logits, dim=1)  # (B,) log sum_j exp(l_ij)
    log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)  # (B,) over positives
    return (log_all - log_pos).mean()
    ### END SOLUTION


# -----------------------------------------------------------------------------
# Mode seeking (Mao et al. 2019, "MSGAN"; project choice, NOT in the paper, off by default)
#
# A conditional G can settle on one image per caption: each image looks real and matches
# its text, and as a batch of random captions rarely holds one caption twice, no D term
# sees that two seeds give the same picture. Mode seeking rewards G for images that move
# when z moves: for pairs of rows with the SAME caption and different z,
#     ratio = mean_pairs( mean|G(c, z1) - G(c, z2)| / mean|z1 - z2| ),   L_ms = 1 / (ratio + eps)
# (MSGAN's form; its gradient fades as the images spread, so it does not push without end).
# train.py builds such pairs by giving the G step's rows P..2P-1 the captions of rows 0..P-1.

def mode_seeking_loss(images, z, eps=1e-5):
    """images (2P, ...) and z (2P, Z): row i and row P + i are a pair (same caption, other z)."""
    P = images.shape[0] // 2
    assert P >= 1 and images.shape[0] == 2 * P == z.shape[0], (images.shape, z.shape)
    d_image = (images[:P].float() - images[P:].float()).abs().flatten(1).mean(1)  # (P,) mean abs per pair
    d_z = (z[:P].float() - z[P:].float()).abs().mean(1)                          # (P,)
    return 1.0 / ((d_image / d_z).mean() + eps)


def mode_seeking_captions(captions):
    """The G step's captions for mode seeking: the first half twice (an odd last row stays)."""
    P = len(captions) // 2
    return captions[:P] * 2 + captions[2 * P:]


# -----------------------------------------------------------------------------
# R1 (Mescheder et al. 2018) on real images and every real pyramid level, lazy
#
# R1 penalises the gradient of D at the real data, which keeps D smooth where the data
# is. The MS-I/O D reads every pyramid level, so every level is an input with its own
# gradient. Like the loss, the penalty sees the per-image mean of each patch map
# (this project's choice for (B, h, w) predictions), summed over the P predictions.
# Lazy regularisation (StyleGAN2): compute it every `r1_interval` D steps only and scale
# it by the interval, so on average it has the same strength as every step. The
# vision-aided D gets no R1 (this project's choice: its input is frozen CLIP features, and
# R1 would need a second backward through CLIP).

def r1_penalty(real_pyramid, preds):
    """sum_levels mean_b || d(sum_p mean_hw D_p(x_b)) / d x_level,b ||^2; levels must require grad."""
    # EXERCISE: R1: sum over levels of E_b ||d score / d x_level||^2, differentiable (create_graph)
    ### BEGIN SOLUTION
    score = sum(_row_means(p).sum() for p in preds)  # images are independent: one backward gives all
    grads = torch.autograd.grad(score, real_pyramid, create_graph=True, allow_unused=True)
    penalty = torch.zeros((), device=real_pyramid[0].device)
    for g in grads:
        if g is not None:  # a level the D does not read (single-scale ablation) has no gradient
            penalty = penalty + g.float().square().reshape(g.shape[0], -1).sum(1).mean()  # E_b ||grad||^2
    ### END SOLUTION
    return penalty


def lazy_r1_loss(D, real_pyr, text, cfg, fake_pyr=None):
    """The regulariser of one lazy R1 step: gamma/2 * R1 * r1_interval, and its logs.

    train.py calls it when `step % cfg.r1_interval == 0`, after the D loss step, then
    backward and a second D optimiser step (StyleGAN2's "Dreg" phase; adding it to that
    step's D loss instead is equivalent up to Adam's statistics). Real images meet their own
    captions; the levels are fresh leaves so each gets its own gradient. With cfg.r2_gamma > 0
    and fake_pyr (generated images of the same captions), R3GAN's R2 is added: the same
    penalty at the generated images, r2_gamma/2 * R2 * r1_interval.
    """
    loss, logs, everything = 0.0, {}, []
    terms = [("R1", real_pyr, cfg.r1_gamma)] + [("R2", fake_pyr, cfg.r2_gamma)] * (fake_pyr is not None)
    for name, pyramid, gamma in terms:
        if gamma <= 0:
            continue
        leaves = [x.detach().requires_grad_(True) for x in pyramid]  # finest first, leaves
        preds = D(leaves, *text)  # P predictions
        penalty = r1_penalty(leaves, preds)
        # a packed D (--d.pack m) returns each pack's logit on its m rows: the sum over rows is m times
        # the sum over packs, so the penalty comes out m times that at the packed input; undo it
        penalty = penalty / getattr(getattr(D, "cfg", None), "pack", 1)
        term = gamma / 2 * penalty * cfg.r1_interval  # gamma/2 * penalty, times the interval (lazy)
        loss = loss + term
        logs.update({f"{name}/penalty": _num(penalty), f"{name}/loss": _num(term)})
        everything += preds
    # + 0 * logits: every D parameter takes part in the graph (the last biases do not reach
    # the input gradient), which DistributedDataParallel requires
    loss = loss + 0.0 * sum(p.float().sum() for p in everything)
    return loss, logs


# -----------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018), for the upsampler (Sec. 3.4, weight 10)
#
# Distance between two images = sum over 5 layers of a frozen ImageNet network of the
# spatial mean of a learned, non-negative channel weighting of the squared difference of
# unit-normalised features:  d(x, y) = sum_l mean_hw sum_c w_lc (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)_c^2
# Written out here, checked against the `lpips` package in tests. Its trunk weights are
# torchvision's (downloaded once to torch.hub's cache); its linear weights w_lc ship inside
# the `lpips` pip package. A random trunk exists only when asked for (tests, offline runs).

_LPIPS_TRUNKS = {
    # net: (torchvision model name, indices in `.features` of the ReLUs whose outputs are compared)
    "alex": ("alexnet", (1, 4, 7, 9, 11)),
    "vgg": ("vgg16", (3, 8, 15, 22, 29)),
}
_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GIGAGAN_OFFLINE")  # any set -> never download


class MissingWeightsError(RuntimeError):
    """Pretrained weights are not on disk and cannot be fetched; the message names the flag to use."""


def _offline():
    """True if the environment forbids downloads."""
    return any(os.environ.get(k, "").lower() not in ("", "0", "false", "no") for k in _OFFLINE_FLAGS)


def _torchvision_trunk_state(tv_name, timeout):
    """torchvision's ImageNet state dict of `tv_name`, from the torch.hub cache or one quick download."""
    import torchvision

    url = torchvision.models.get_model_weights(tv_name).IMAGENET1K_V1.url  # the weights LPIPS was fitted on
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    fix = f"use --lpips random (random backbone, for tests) or put {os.path.basename(url)} in {os.path.dirname(path)}"
    if not os.path.exists(path) and _offline():  # fail at once, no network round trip
        raise MissingWeightsError(f"LPIPS needs torchvision's {tv_name} weights and downloads are off; {fix}")
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torch.hub has no timeout of its own: one short try, no retries
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
    except Exception as e:  # no network, DNS failure, bad hash, ...
        raise MissingWeightsError(f"LPIPS could not get {tv_name} weights ({type(e).__name__}); {fix}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def _lpips_linear_weights(net, channels):
    """The per-layer channel weights w_l (C_l,) shipped with the `lpips` package (v0.1)."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None:  # the package is only a weight file for us; fall back to plain channel means
        warnings.warn("the `lpips` package is missing: LPIPS uses uniform channel weights 1/C (not calibrated)")
        return [torch.full((c,), 1.0 / c) for c in channels]
    path = os.path.join(spec.submodule_search_locations[0], "weights", "v0.1", f"{net}.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)  # {"lin{l}.model.1.weight": (1, C_l, 1, 1)}
    return [state[f"lin{l}.model.1.weight"].reshape(-1) for l in range(len(channels))]  # (C_l,) each, >= 0


class LPIPS(nn.Module):
    """LPIPS distance, (B, 3, H, W) x 2 in [-1, 1] -> (B,); 0 for identical images, frozen.

    net="vgg" (as the paper's upsampler) or "alex" with pretrained=True loads torchvision's
    ImageNet trunk (or raises MissingWeightsError naming --lpips random); pretrained=False,
    or net="random" (an AlexNet trunk), uses a randomly initialised trunk with the calibrated
    linear weights: still a distance (zero iff features agree, symmetric, >= 0), but not
    perceptual. AlexNet needs H, W >= 32; VGG >= 16.
    """

    def __init__(
        self,
        net="vgg",               # "vgg" | "alex" | "random" (= AlexNet trunk, random weights)
        pretrained=True,         # trunk weights from ImageNet (True) or random init (False)
        download_timeout=10.0,   # seconds for the single download attempt of the trunk weights
    ):
        super().__init__()
        import torchvision

        if net == "random":
            net, pretrained = "alex", False
        assert net in _LPIPS_TRUNKS, f"LPIPS net must be vgg, alex or random, got {net!r}"
        tv_name, self.taps = _LPIPS_TRUNKS[net]
        self.net, self.pretrained = net, pretrained
        with torch.device("meta"):  # build without allocating or initialising the classifier head
            trunk = getattr(torchvision.models, tv_name)(weights=None).features[: self.taps[-1] + 1]
        trunk = trunk.to_empty(device="cpu")  # the conv / ReLU / max-pool stack up to the last tap
        if pretrained:
            state = _torchvision_trunk_state(tv_name, download_timeout)
            trunk.load_state_dict({k[len("features."):]: v for k, v in state.items()
                                   if k.startswith("features.") and int(k.split(".")[1]) <= self.taps[-1]})
        else:
            for m in trunk.modules():
                if isinstance(m, nn.Conv2d):
                    m.reset_parameters()  # PyTorch's default init, from the global seed
        _clip.freeze_into_buffers(trunk)  # frozen: buffers, not parameters (no optimiser can reach them)
        self.trunk = trunk
        channels = [trunk[i - 1].out_channels for i in self.taps]  # the conv before each tapped ReLU
        for l, w in enumerate(_lpips_linear_weights(net, channels)):
            self.register_buffer(f"lin{l}", w.float(), persistent=False)  # (C_l,) channel weights
        # the input normalisation LPIPS v0.1 uses in front of the trunk (ImageNet statistics in [-1, 1])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x, y):
        assert x.shape == y.shape and x.dim() == 4 and x.shape[1] == 3, (x.shape, y.shape)
        B = x.shape[0]
        h = (torch.cat([x, y]).float() - self.shift) / self.scale  # (2B, 3, H, W): one trunk pass for both
        dist = torch.zeros(B, device=x.device)
        taps = {t: l for l, t in enumerate(self.taps)}  # trunk index -> LPIPS layer l
        for i, layer in enumerate(self.trunk):
            h = layer(h)  # (2B, C_l, H_l, W_l)
            if i in taps:
                f = h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10)  # unit length along channels
                fx, fy = f[:B], f[B:]  # (B, C_l, H_l, W_l) each
                w = getattr(self, f"lin{taps[i]}")  # (C_l,)
                # mean_hw sum_c w_c (fx - fy)_c^2
                dist = dist + torch.einsum("bchw,c->b", (fx - fy).square(), w) / (h.shape[2] * h.shape[3])
        return dist  # (B,)


# -----------------------------------------------------------------------------
# Composite helpers: what train.py calls, once per D step and once per G step
#
# Several (image, caption) groups go through D in ONE call, concatenated along the batch
# (the D has no batch-coupled layer: minibatch-std is off in the text-to-image D), and
# the predictions are split back per group. `fake_pyr` must have been generated from the
# same captions as `text` (row i from caption i), so that caption perm[i] is wrong for
# both the real image i and the generated image i.

def _num(x):
    """A logged value: a plain float, detached from the graph."""
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def _call_d(D, pyramids, texts):
    """One D call on every (pyramid, text) pair of a grid; returns [text group][pyramid][prediction].

    pyramids: n pyramids of B images each; texts: k (tokens, mask, eot) groups of B captions.
    D's image branch does not see the text, so it runs once on the n*B images and only the
    text-modulated predictors run k times (the matching-aware pairs cost little extra).
    """
    B, n = pyramids[0][0].shape[0], len(pyramids)
    pyramid = [torch.cat(levels) for levels in zip(*pyramids, strict=True)]  # (nB, 3, H_i, W_i) per level
    # caption rows aligned with the stacked images: group g repeats its B captions for every pyramid
    tokens, mask, eot = (torch.cat([x.repeat(n, *[1] * (x.ndim - 1)) for x in parts])
                         for parts in zip(*texts, strict=True))  # (k*nB, L, D), (k*nB, L), (k*nB,)
    preds = D(pyramid, tokens, mask, eot)  # P tensors, (k*nB,)
    assert all(p.shape[0] == len(texts) * n * B for p in preds), [tuple(p.shape) for p in preds]
    chunks = [p.split(B) for p in preds]  # P lists of k*n (B,) chunks, ordered (text group, pyramid)
    return [[[c[g * n + i] for c in chunks] for i in range(n)] for g in range(len(texts))]


def _call_d_pairs(D, pairs):
    """One D call on a list of (pyramid, text) pairs, each its own stream; [pair][prediction].

    For a set of pairs that is not a full grid (Table 1's "Matching-aware D" row: (x, c),
    (G(c), c), (x, c^), but no (G(c), c^)): images and captions are stacked row by row, so D's
    image branch runs once per pair (a real image shown twice is processed twice).
    """
    B = pairs[0][0][0].shape[0]
    pyramid = [torch.cat(levels) for levels in zip(*(p for p, _ in pairs), strict=True)]  # (nB, 3, H_i, W_i)
    tokens, mask, eot = (torch.cat(parts) for parts in zip(*(t for _, t in pairs), strict=True))  # (nB, ...)
    preds = D(pyramid, tokens, mask, eot)  # P tensors, (nB,)
    chunks = [p.split(B) for p in preds]  # P lists of n (B,) chunks, in the order of pairs
    return [[c[i] for c in chunks] for i in range(len(pairs))]


def _call_vd(vd, features, embeds):
    """One vision-aided D call on several (CLIP features, text embedding) groups; [group][logit]."""
    B = embeds[0].shape[0]
    feats = [torch.cat(levels) for levels in zip(*features, strict=True)]  # (nB, C_i, h_i, w_i) per depth
    logits = vd(feats, torch.cat(embeds))  # list of (nB,) or (nB, ...) logits
    return [list(group) for group in zip(*(z.split(B) for z in logits))]


class VisionAided(NamedTuple):
    """The vision-aided D's inputs to discriminator_loss / generator_loss, as one argument."""
    vd: nn.Module                    # the vision-aided D (04): (CLIP feature maps, text embedding) -> logits
    clip: Any                        # the frozen CLIP whose image features it reads (image_features)
    text_embed: torch.Tensor         # (B, E) that CLIP's embeddings of the captions c
    wrong_text_embed: torch.Tensor   # (B, E) and of the wrong captions c^ (Eq. 8)


def discriminator_loss(D, real_pyr, fake_pyr, text, wrong_text, cfg, *, wrong_valid=None, vision=None):
    """D's loss of one step: non-saturating (Eq. 6) + matching-aware (Eq. 8) + vision-aided.

    D            the MS-I/O discriminator: D(pyramid, tokens, mask, eot) -> P predictions
    real_pyr     real images, a pyramid finest first; real image i's caption is text row i
    fake_pyr     generated pyramid from the same captions (detached here: no gradient to G)
    text         (tokens, mask, eot) of the batch's captions
    wrong_text   the same triple reordered by mismatched_permutation (None if cfg.match_d is off)
    wrong_valid  (B,) bool rows that really got a wrong caption (None: all)
    vision       VisionAided(vd, clip, text_embed, wrong_text_embed): the vision-aided D, the frozen
                 CLIP it reads, (B, E) caption embeddings right and permuted; None: no such term
    Pairs D sees:  (real, c) real;  (fake, c) fake;  (real, c^) fake if cfg.match_d;
                   (fake, c^) fake if cfg.match_d and cfg.match_fake (else never built).
    """
    assert [x.shape for x in real_pyr] == [x.shape for x in fake_pyr], "real and fake pyramids differ"
    assert text[0].shape[0] == real_pyr[0].shape[0], "one caption per image"
    fake_pyr = [x.detach() for x in fake_pyr]  # the D step never updates G
    match_fake = cfg.match_d and cfg.match_fake
    if cfg.match_d and not match_fake:  # Table 1 "Matching-aware D": (real, c^) but no (fake, c^)
        preds = _call_d_pairs(D, [(real_pyr, text), (fake_pyr, text), (real_pyr, wrong_text)])
    else:  # the full grid, one image-branch pass: (real, c), (fake, c) [, (real, c^), (fake, c^)]
        texts = [text, wrong_text] if cfg.match_d else [text]  # Eq. 6 pairs, then Eq. 8 pairs (both fake)
        grid = _call_d(D, [real_pyr, fake_pyr], texts)  # [text][pyramid][p]
        preds = [pair for row in grid for pair in row]
    # (real, c) up and (fake, c) down: each on its own, or as pairs with cfg.relativistic
    adv = relativistic_loss(preds[1], preds[0]) if cfg.relativistic else d_adversarial_loss(preds[0], preds[1])
    loss = adv
    logs = {"D/adv": _num(adv),
            "D/real_logit": _num(sum(_row_means(p).mean() for p in preds[0]) / len(preds[0])),  # mean logit
            "D/fake_logit": _num(sum(_row_means(p).mean() for p in preds[1]) / len(preds[1]))}
    if cfg.match_d:
        if cfg.relativistic:  # (x, c^) below (x, c), and (G(c), c^) below (G(c), c)
            match = relativistic_loss(preds[2], preds[0], wrong_valid)
            if match_fake:
                match = match + relativistic_loss(preds[3], preds[1], wrong_valid)
        else:
            match = d_matching_loss(preds[2], preds[3] if match_fake else None, wrong_valid)
        loss = loss + cfg.match_weight * match
        logs["D/match"] = _num(match)
    if vision is not None and cfg.vision_weight > 0:
        vd, clip, text_embed, wrong_text_embed = vision
        with torch.no_grad():  # CLIP is frozen and the D step needs no gradient to the images
            both = clip.image_features(torch.cat([real_pyr[0], fake_pyr[0]]))  # one pass, list of (2B, C_i, h_i, w_i)
            feats_real = [f[: len(f) // 2] for f in both]  # list of (B, C_i, h_i, w_i)
            feats_fake = [f[len(f) // 2:] for f in both]
        vgroups = [(feats_real, text_embed), (feats_fake, text_embed)]
        if cfg.vision_match and cfg.match_d:  # the same mismatched pairs as D's
            vgroups += [(feats_real, wrong_text_embed)] + [(feats_fake, wrong_text_embed)] * match_fake
        logits = _call_vd(vd, [g[0] for g in vgroups], [g[1] for g in vgroups])  # [group][k]
        vision = d_adversarial_loss(logits[0], logits[1])
        if len(logits) > 2:
            vision = vision + cfg.match_weight * d_matching_loss(
                logits[2], logits[3] if len(logits) == 4 else None, wrong_valid)
        loss = loss + cfg.vision_weight * vision
        logs["D/vision"] = _num(vision)
    logs["D/loss"] = _num(loss)
    return loss, logs


def generator_loss(D, fake_pyr, text, wrong_text, cfg, *, wrong_valid=None, clip=None, text_embed=None,
                   caption_ids=None, vision=None, lpips=None, lpips_target=None, z=None, real_pyr=None):
    """G's loss of one step: non-saturating + matching-aware (G side) + CLIP + vision-aided (+ LPIPS)
    (+ mode seeking).

    Arguments as in discriminator_loss, plus
    clip, text_embed, caption_ids   the frozen CLIP of the CLIP loss (Eq. 9, embed_image), the (B, E)
                  caption embeddings and (B,) ids of identical captions (caption_ids(captions));
                  vision.clip may be another model (the paper: ViT-B/32 for the vision-aided D,
                  ViT-L/14 for text)
    lpips, lpips_target   an LPIPS module and the real high-res images (upsampler only);
                  lpips_target also serves cfg.pixel_weight's MSE
    z             (B, Z) the latents of fake_pyr, for cfg.mode_seeking_weight > 0; the captions must
                  then be paired as mode_seeking_captions pairs them (row i and row P + i alike)
    real_pyr      real images of the same captions, for cfg.relativistic (row i pairs with fake i)
    Gradients flow into fake_pyr (every level) and from there into G. Pairs: (fake, c)
    should look real; with cfg.match_g (the project's option), (fake, c^) should look fake
    (reading (ii) of the module docstring).
    D and vision.vd also receive gradients here: train.py switches their requires_grad off for the
    G step (as StyleGAN2 does), or zeroes their gradients before the next D step.
    """
    texts = [text, wrong_text] if cfg.match_g else [text]
    if cfg.relativistic:  # the reals ride along in the same D call: (real, c) is row 0's second pyramid
        assert real_pyr is not None, "cfg.relativistic pairs each fake with a real image: pass real_pyr"
        grid = _call_d(D, [fake_pyr, real_pyr], texts)  # [text][pyramid][p]
        preds = [row[0] for row in grid]  # (fake, c), (fake, c^)
        adv = relativistic_loss([p.detach() for p in grid[0][1]], preds[0])  # fake above its real
    else:
        preds = [row[0] for row in _call_d(D, [fake_pyr], texts)]  # (fake, c), (fake, c^): [text][p]
        adv = g_adversarial_loss(preds[0])
    loss = adv
    logs = {"G/adv": _num(adv)}
    if cfg.match_g:  # relativistic: G's image with its caption above it with a wrong one
        match = relativistic_loss(preds[1], preds[0], wrong_valid) if cfg.relativistic else \
            g_matching_loss(preds[1], wrong_valid)
        loss = loss + cfg.match_weight * match
        logs["G/match"] = _num(match)
    image = fake_pyr[0]  # (B, 3, H, W) the finest level is the output image
    vd, vclip, v_embed, v_wrong = vision if vision is not None else (None,) * 4
    feats = None  # CLIP feature maps of the image, for the vision-aided term
    if clip is not None and cfg.clip_weight > 0:
        assert text_embed is not None, "the CLIP loss needs text_embed = clip.embed_text(captions)"
        if vd is not None and cfg.vision_weight > 0 and vclip is clip and hasattr(clip, "image_features_and_embedding"):
            feats, image_embed = clip.image_features_and_embedding(image)  # one ViT pass serves both terms
        else:
            image_embed = clip.embed_image(image)  # (B, E), differentiable w.r.t. the image
        clip_loss = clip_contrastive_loss(image_embed, text_embed, cfg.clip_temperature, caption_ids)
        loss = loss + cfg.clip_weight * clip_loss
        logs["G/clip"] = _num(clip_loss)
    if vd is not None and cfg.vision_weight > 0:
        if feats is None:
            feats = vclip.image_features(image)  # list of (B, C_i, h_i, w_i), differentiable
        vgroups = [(feats, v_embed)]
        if cfg.vision_match and cfg.match_g:
            vgroups.append((feats, v_wrong))
        logits = _call_vd(vd, [g[0] for g in vgroups], [g[1] for g in vgroups])
        vision = g_adversarial_loss(logits[0])
        if len(logits) == 2:
            vision = vision + cfg.match_weight * g_matching_loss(logits[1], wrong_valid)
        loss = loss + cfg.vision_weight * vision
        logs["G/vision"] = _num(vision)
    if lpips is not None and cfg.lpips_weight > 0:
        perceptual = lpips(image, lpips_target).mean()  # mean over the batch of (B,) distances
        loss = loss + cfg.lpips_weight * perceptual
        logs["G/lpips"] = _num(perceptual)
    if lpips_target is not None and cfg.pixel_weight > 0:
        # pins colours and edges to the real image where a random-backbone LPIPS barely does
        pixel = (image.float() - lpips_target).square().mean()
        loss = loss + cfg.pixel_weight * pixel
        logs["G/pixel"] = _num(pixel)
    if z is not None and cfg.mode_seeking_weight > 0 and image.shape[0] >= 2:
        n = image.shape[0] // 2 * 2  # the paired rows (an odd last row has no partner)
        seeking = mode_seeking_loss(image[:n], z[:n])
        loss = loss + cfg.mode_seeking_weight * seeking
        logs["G/mode_seeking"] = _num(seeking)
    logs["G/loss"] = _num(loss)
    return loss, logs


# -----------------------------------------------------------------------------
# Demo. TOY STAND-INS, for illustration only: a hand-written "discriminator", "CLIP" and
# "vision-aided D" with the call signatures of 04_discriminator.py and 00_clip.py, so this
# file runs alone. Every caption is one of K = 3 concepts; a real image "depicts" its
# caption by its colour, a generated one is noise (an untrained G).

_CONCEPTS = ["a red circle", "a green square", "a blue triangle"]  # toy vocabulary, K = 3


def _toy_code(captions):
    """(B, 3) +-1 code of each caption: +1 at its concept, -1 elsewhere."""
    ids = torch.tensor([_CONCEPTS.index(c) for c in captions])
    return F.one_hot(ids, 3).float() * 2 - 1


class _ToyD(nn.Module):
    """TOY MS-I/O D: per level, an image logit (B,) and on the finest level a patch map (B, h, w).

    logit = sign * 3 * (<colour, code(caption)> - 0.6): high for an image of its caption's colour.
    sign = +1 is a "good" D (reals with their caption high), -1 the reverse.
    """

    def __init__(self, sign):
        super().__init__()
        self.sign = sign

    def forward(self, pyramid, tokens, mask, eot):
        k = tokens.shape[0] // pyramid[0].shape[0]  # captions per image (04's contract: row g*B + b)
        pyramid = [x.repeat(k, 1, 1, 1) for x in pyramid]  # (k*B, 3, H, W) each image once per caption
        code = tokens[torch.arange(tokens.shape[0]), eot]  # (k*B, 3) the feature at end-of-text
        preds = [self.sign * 3 * ((pyramid[0] * code[:, :, None, None]).sum(1) - 0.6)]  # (B, h, w) patches
        for x in pyramid:
            preds.append(self.sign * 3 * ((x.mean((2, 3)) * code).sum(1) - 0.6))  # (B,)
        return preds


class _ToyCLIP:
    """TOY frozen CLIP: the image embedding is its mean colour, the text embedding its code."""

    def embed_image(self, images):
        return F.normalize(images.mean((2, 3)), dim=1)  # (B, 3)

    def embed_text(self, captions):
        return F.normalize(_toy_code(captions), dim=1)  # (B, 3)

    def image_features(self, images):
        return [images, F.avg_pool2d(images, 2)]  # two "depths"


class _ToyVD(nn.Module):
    """TOY vision-aided D: logit = sign * 4 * (cos(mean feature, text embedding) - 0.5) per depth."""

    def __init__(self, sign):
        super().__init__()
        self.sign = sign

    def forward(self, features, text_embed):
        return [self.sign * 4 * ((F.normalize(f.mean((2, 3)), dim=1) * text_embed).sum(1) - 0.5) for f in features]


def demo():
    torch.manual_seed(0)
    cfg = LossConfig()
    captions = ["a red circle", "a green square", "a red circle", "a blue triangle"]  # a duplicate!
    B, R = len(captions), 32
    perm, valid = mismatched_permutation(captions, return_valid=True)
    print("captions      ", captions)
    print("wrong captions", [captions[j] for j in perm.tolist()], "valid", valid.tolist())
    assert all(captions[j] != c for j, c in zip(perm.tolist(), captions))

    code = _toy_code(captions)  # (B, 3)
    tokens = torch.zeros(B, 4, 3)  # (B, L, D) toy "CLIP tokens": the code at the eot position 1
    tokens[:, 1] = code
    mask = torch.tensor([[True, True, False, False]] * B)  # (B, L)
    eot = torch.ones(B, dtype=torch.long)  # (B,)
    text = (tokens, mask, eot)
    wrong_text = permute_text(text, perm)

    def pyramid(x):  # finest first: 32, 16, 8, 4
        return [F.avg_pool2d(x, 2 ** i) if i else x for i in range(4)]

    real = (0.4 * code[:, :, None, None] + 0.05 * torch.randn(B, 3, R, R)).clamp(-1, 1)  # (B, 3, 32, 32)
    fake = (0.3 * torch.randn(B, 3, R, R)).requires_grad_(True)  # an untrained G's output
    real_pyr, fake_pyr = pyramid(real), pyramid(fake)
    print("pyramid       ", [tuple(x.shape) for x in real_pyr])

    clip = _ToyCLIP()
    emb = clip.embed_text(captions)  # (B, 3)
    extra = dict(wrong_valid=valid)
    results = {}
    for name, sign in (("good D", 1.0), ("reversed D", -1.0)):
        D, vd = _ToyD(sign), _ToyVD(sign)
        vision = VisionAided(vd, clip, emb, emb[perm])
        d_loss, d_logs = discriminator_loss(D, real_pyr, fake_pyr, text, wrong_text, cfg, vision=vision, **extra)
        g_loss, g_logs = generator_loss(D, fake_pyr, text, wrong_text, cfg, vision=vision, clip=clip, text_embed=emb,
                                         caption_ids=caption_ids(captions), **extra)
        r1_loss, r1_logs = lazy_r1_loss(D, real_pyr, text, cfg)
        results[name] = (d_loss.item(), g_logs["G/adv"] + g_logs["G/match"] + g_logs["G/vision"])
        print(f"{name:11s}", {k: round(v, 3) for k, v in {**d_logs, **g_logs, **r1_logs}.items()})
    # the sign conventions: a D that scores reals high and fakes low has the lower D loss,
    # and leaves G with the higher adversarial G loss (the CLIP term does not depend on D)
    assert results["good D"][0] < results["reversed D"][0], results
    assert results["good D"][1] > results["reversed D"][1], results

    # Eq. 9: images that depict their captions beat noise
    clip_real = clip_contrastive_loss(clip.embed_image(real), emb, cfg.clip_temperature, caption_ids(captions))
    clip_fake = clip_contrastive_loss(clip.embed_image(fake), emb, cfg.clip_temperature, caption_ids(captions))
    print(f"CLIP loss: real images {clip_real.item():.3f}, noise {clip_fake.item():.3f}")
    assert clip_real < clip_fake

    lpips = LPIPS("random")  # random AlexNet trunk: this demo never downloads
    d_same, d_diff = lpips(real, real), lpips(real, fake.detach())
    n_buffers = sum(b.numel() for b in lpips.buffers())
    print(f"LPIPS (random trunk, {n_buffers / 1e6:.2f}M frozen values): same {d_same.tolist()}, "
          f"different {[round(v, 4) for v in d_diff.tolist()]}")
    assert torch.all(d_same == 0) and torch.all(d_diff > 0)
    print("ok: sign conventions, matching-aware pairs, CLIP and LPIPS behave")


if __name__ == "__main__":
    demo()


# -----------------------------------------------------------------------------
# Exercises. Each says what to change, what to look for, and which test or demo checks it.
# (The ### BEGIN / END SOLUTION regions above are the other kind: `python make_student_copy.py`
# cuts them out for students, and tests/test_student_copy.py lists the tests that grade them.)
#
# 1. Saturating or not. Write the minimax G loss, -softplus(logit) (= log(1 - sigmoid)), beside
#    g_adversarial_loss and compare d loss / d logit at logits -6, -3, 0, 3. Look for: where D
#    confidently rejects G's images, the minimax gradient vanishes and the non-saturating one does
#    not. Check: pytest tests/test_losses.py -k "logistic or signs"
# 2. The matching-aware loss. Run python ablation.py --only "all on" "no matching-aware loss"
#    --seeds 1 --steps 1000 and compare the accuracy and CLIP-score columns. Look for: whether
#    they drop without Eq. 8 (Table 1: adding it raised the CLIP score 0.235 -> 0.254).
# 3. The CLIP temperature. With tests/test_losses.py's gradient-descent test as a template, run
#    the descent with temperature 0.01 and 0.5. Look for: how fast the matching accuracy rises.
#    Check: pytest tests/test_losses.py -k "clip_loss or gradient_descent"
# 4. R1. Train python train.py --loss.r1-gamma 0 --max-steps 1000 --out runs/r1off and the default;
#    compare D/real_logit and D/fake_logit in their logs (losses.png). Look for: how far apart D
#    pushes them without the penalty. Check the formula: pytest tests/test_losses.py -k r1
# 5. Duplicate captions. Call mismatched_permutation on ["a"] * 6 + ["b", "c"] with
#    return_valid=True. Look for: how many rows can get a wrong caption, and why the rest must be
#    masked. Check: pytest tests/test_losses.py -k mismatched_permutation
