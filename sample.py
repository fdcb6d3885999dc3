"""
sample.py - prompts -> images with a trained GigaGAN, the paper's sampling tricks, and metrics.

    python sample.py --ckpt runs/tiny --prompt "a large red circle on the left of a blue background"
    python sample.py --ckpt runs/tiny --prompts prompts.txt --n 4 --grid --truncation 0.7
    python sample.py --ckpt runs/tiny --style-mix --prompt "..."          # Sec. 4.6, coarse/fine styles
    python sample.py --ckpt runs/tiny --interpolate 8 --prompt A --prompt B   # prompt interpolation
    python sample.py --ckpt runs/tiny --prompt-mix 2 --prompt A --prompt B    # coarse from A, fine from B
    python sample.py --ckpt runs/tiny --truncation-sweep 6 --prompt A          # psi 1 -> 0 (App. C)
    python sample.py --ckpt runs/tiny --z-interpolate 8 --prompt A             # latent interpolation
    python sample.py --ckpt runs/tiny --arithmetic t --prompt A --prompt B --prompt C   # A - B + C
    python sample.py --ckpt runs/tiny --analogies                          # judged analogies per space
    python sample.py --ckpt runs/tiny --eval                               # CLIP score, FD, shapes alignment
    python sample.py --ckpt runs/small --eval --n 10000                    # + Inception FID-10k on real data
    python sample.py --ckpt runs/tiny --upsampler runs/tiny-upsampler --prompt "..."   # 32 px -> 128 px
    python sample.py --upsampler runs/tiny-upsampler --lowres photo.jpg --prompt "..." # upsample any image

--ckpt takes a run directory of train.py (its checkpoint.pt) or a checkpoint file; G_ema is
used, with the frozen CLIP the run was trained with. Modes (one at a time, else plain sampling):
    plain           --n images per prompt, image k from seed --seed + k; --grid: rows = prompts,
                    cols = seeds; --beside-data: then the data's own --n draws of each caption
    --style-mix [ROW]  one prompt; rows of ws [0, ROW) (coarse) from seeds S..S+n-1, the rest
                    (fine) from seeds S+n..S+2n-1; grid as in StyleGAN: a header row of the
                    fine-seed images, a header column of the coarse-seed ones, mixtures inside.
                    ROW defaults to the first 16 px row (coarse = 4-8 px).
    --interpolate K K frames from each prompt to the next (endpoints included): T's t_local and
                    t_global and the style w = M(z, t_global) are lerped, z is kept (Fig. 7);
                    grid rows = seeds, cols = frames
    --prompt-mix ROW  two prompts; ws rows [0, ROW) and the cross-attention text of the blocks
                    reading them from prompt A, the rest from prompt B; grid rows = seeds,
                    cols = (A, mix, B)
    --truncation-sweep K  grid rows = (prompt, seed), cols = psi from 1 (plain) to 0 (the mean
                    w of --truncation-target) in K steps
    --z-interpolate K  K frames from the z of seed S + 2k to that of S + 2k + 1 (slerp), one
                    row per prompt and k < n
    --arithmetic SPACE  prompts A B C [D]: the code of A - B + C in SPACE, one z per row: clip (CLIP's
                    token features), t (T's t_local, t_global), w (w and t_local), w-only (w; t_local
                    of C); the prompts must have equal token counts. Cols = A, B, C, result [, D]
    --analogies     --n (64) random shapes analogies of one attribute each, drawn in every SPACE and
                    judged by pixels -> analogies.json and a table; cols = a, b, c, d, the spaces
    --eval          CLIP score, CLIP-feature Frechet distance against real images of the run's
                    data (or --data), Inception FID (--fid / --no-fid; default on except for
                    shapes; reference statistics cached next to the data), and per-attribute
                    alignment on the shapes data -> eval.json (metrics.py); by default the numbers
                    of train.py's eval rows (same seed 12345, same count)
Other flags: --truncation PSI in [0, 1] toward the per-prompt mean w_c (--truncation-target
global: toward the running mean w_avg; a number G: toward (1 - G) w_c + G w_avg), --device
auto|cpu|cuda, --batch (images per pass), --figure PNG (also write the grid there, for a page:
tiles 3x larger, white gaps).
Upsampler (06_upsampler.py, a run of train.py --stage upsampler; its G_ema):
    --upsampler UP  with --ckpt BASE (plain sampling): the base G_ema draws, then the upsampler
                    upsamples each image with the same prompt (z from the same seed); the PNGs
                    are the high-res images. The base resolution must be the upsampler's input.
    --lowres IMAGE  with --upsampler UP and no --ckpt: any image PIL reads is centre-cropped to a
                    square and resized to the upsampler's input size, then upsampled with
                    --prompt (one, or none: the empty prompt), --n seeds. Also writes
                    comparison.png (rows = seeds; nearest | bicubic | GigaGAN at the output
                    size) and lowres.png (the resized input). Default --out <UP>/upsampled.
    --noise-aug S   with --upsampler: the std S of the Gaussian noise added to its input first
                    (the paper's augmentation "during training and inference": it hides a base
                    model's artifacts). Default: a quarter of the run's training maximum
                    (06_upsampler.inference_sigma; tiny 0.005); 0 = off.
Rows of ws are named by G.synthesis.w_names (tiny: 0 4px.block0, 1 4px.torgb, 2 8px.block0, ...);
a bad ROW is answered with the list.

Outputs: one PNG per image and `captions.jsonl` (one {"file", "caption", "seed", ...} row per
image) in --out (default: <run dir>/samples, or <run dir>/style_mix, interpolate, prompt_mix,
eval, ...), plus `grid.png` with --grid (always for every mode but plain sampling and --eval);
the last line printed says where they are.
Bad input is one line on stderr and exit status 2.

Determinism: image k of a prompt uses z drawn from seed + k, whatever the batch it is made in,
and constant noise, so the same (prompt, seed) gives the same image on every call.

Shape legend: B batch, R resolution, L text tokens, C text width of G, S style (w) width,
E CLIP embedding width, M images of a mode.
"""
import argparse
import concurrent.futures
import importlib
import itertools
import json
import os
import random
import re
import string
import sys
import time
import zipfile

import torch
from PIL import Image, UnidentifiedImageError

import data
import metrics
from metrics import (EVAL_SEED, SHAPES_ATTRIBUTES, clip_score, embed_images, eval_metrics, eval_pairs,  # noqa: F401
                     frechet_distance, shapes_alignment)  # re-exported: sample.X is what train.py and tests call
from config import ANY, SEED_MAX, FlagError, FlagParser, check_values, device_rule, writable_error

clip_lib = importlib.import_module("00_clip")
generator = importlib.import_module("03_generator")
upsampler = importlib.import_module("06_upsampler")

# -----------------------------------------------------------------------------
# Loading a run


def resolve_checkpoint(path):
    """A run directory or a checkpoint file -> the checkpoint file."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: pass a run directory made by train.py "
                                "(e.g. --ckpt runs/tiny) or its checkpoint.pt")
    return path


def resolve_clip_spec(spec, run_dir):
    """A tiny CLIP is stored beside the checkpoint as a path relative to the run directory."""
    if spec.startswith("tiny:") and not os.path.isabs(spec[5:]):
        return "tiny:" + os.path.join(run_dir, spec[5:])
    return spec


def counted(n, noun):
    """'1 image', '8 images'."""
    return f"{n} {noun}{'s' * (n != 1)}"


def run_clip(ckpt, path, device):
    """The frozen CLIP a run was trained with (its spec in the checkpoint, a tiny CLIP's path relative
    to the run directory), refused in one line if a tiny CLIP's file changed since (trained anew):
    G_ema's images would not follow the prompts."""
    spec = resolve_clip_spec(ckpt["clip"], os.path.dirname(path))
    if spec.startswith("tiny:") and not os.path.isfile(spec[5:]):  # no retraining advice: it would not be this CLIP
        raise ValueError(f"{spec[5:]} is missing: {path} was trained on the features of that tiny CLIP, and one "
                         "trained anew would not give them; put the run's own file back (e.g. from a copy of the run)")
    expected = (ckpt.get("clip_sha") or {}).get("clip")  # runs saved before fingerprints have none
    if expected and os.path.isfile(spec[5:]) and clip_lib.tiny_clip_fingerprint(spec) != expected:
        raise ValueError(f"{spec[5:]} is not the tiny CLIP {path} was trained with (the file changed since, "
                         "e.g. trained anew): put the run's own clip.pt back")
    return clip_lib.load_clip(spec, device=device)


def read_checkpoint(path):
    """torch.load a checkpoint file, or one ValueError line: a file torch.save did not write (it
    writes zip archives), or one cut short."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a checkpoint of train.py (not a file torch.save wrote, or one cut "
                         "short): pass a run directory of train.py, e.g. --ckpt runs/tiny, or its checkpoint.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"could not read {path} as a checkpoint ({type(err).__name__}): "
                         "restore it from a copy, or train again") from err


# Options a generator had once and lost (NOTES.md names the commits): a checkpoint saved with
# their default value loads as if they never existed; one that used them does not load.
REMOVED_G_OPTIONS = {"synthesis_input": "const", "z_path": "mixed"}


def stored_config(stored, path):
    """A checkpoint's generator config, without the removed options it stored at their defaults."""
    used = {k: v for k, v in stored.items() if k in REMOVED_G_OPTIONS and v != REMOVED_G_OPTIONS[k]}
    if used:
        raise ValueError(f"{path} was trained with {', '.join(f'{k}={v!r}' for k, v in used.items())}, an option "
                         "this version no longer has (NOTES.md names the commit that had it)")
    return {k: v for k, v in stored.items() if k not in REMOVED_G_OPTIONS}


def load_generator(path, device="cpu"):
    """-> (G_ema in eval mode, the frozen CLIP it was trained with, the checkpoint dict).
    Raises FileNotFoundError / ValueError / RuntimeError with a one-line message."""
    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"G_ema", "config", "clip"} <= set(ckpt):
        raise ValueError(f"{path} holds no generator (G_ema, config, clip): pass a base-stage run of train.py")
    if ckpt["config"].get("stage", "base") != "base":
        raise ValueError(f"{path} is an {ckpt['config'].get('stage')}-stage run: pass it with --upsampler, "
                         "and a base-stage run with --ckpt")
    g_cfg = generator.GeneratorConfig(**stored_config(ckpt["config"]["G"], path))
    clip = run_clip(ckpt, path, device)
    G = generator.Generator(g_cfg, text_dim=clip.text_width)
    try:
        G.load_state_dict(ckpt["G_ema"])
    except RuntimeError as err:  # its message is many lines long
        raise ValueError(f"{path}: G_ema does not fit the generator its config describes") from err
    return G.to(device).eval().requires_grad_(False), clip, ckpt


def load_upsampler(path, device="cpu"):
    """-> (the upsampler's G_ema in eval mode, its frozen CLIP, the checkpoint dict), or a
    one-line FileNotFoundError / ValueError."""
    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("config", {}).get("stage") != "upsampler":
        raise ValueError(f"{path} is not an upsampler run: pass a run of train.py --stage upsampler to --upsampler")
    u_cfg = upsampler.UpsamplerConfig(**ckpt["config"]["U"])
    clip = run_clip(ckpt, path, device)
    U = upsampler.Upsampler(u_cfg, text_dim=clip.text_width)
    try:
        U.load_state_dict(ckpt["G_ema"])
    except RuntimeError as err:
        raise ValueError(f"{path}: G_ema does not fit the upsampler its config describes") from err
    return U.to(device).eval().requires_grad_(False), clip, ckpt


def seeded_normal(seeds, shape, device):
    """N(0, 1) numbers of `shape` for each seed, from its own generator: (len(seeds), *shape).
    An image's draw depends on its seed only, never on its batch or position in it."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def seeded_z(seeds, z_dim, device):
    """z for each seed: (len(seeds), z_dim)."""
    return seeded_normal(seeds, (z_dim,), device)


# -----------------------------------------------------------------------------
# Generation. Every mode is G's own pieces (T, M, truncation, synthesis) with constant noise;
# mixed_images with the same (prompt, seed) for coarse and fine layers is a plain image
# (tests check that each mode's pure images equal `generate`'s).


def in_batches(n, batch, make):
    """make(slice) -> images for those items; concatenated over slices of `batch` items."""
    return torch.cat([make(slice(i, min(i + batch, n))) for i in range(0, n, batch)])


@torch.no_grad()
def generate(G, clip, prompts, seeds, truncation_psi=1.0, batch=32, truncation_target="prompt"):
    """One image per (prompt, seed) pair -> (N, 3, R, R) in [-1, 1], on G's device."""
    device = next(G.parameters()).device

    def make(sl):
        tokens, mask, eot = clip.text_features(prompts[sl])                 # (b, L, D), (b, L), (b,)
        z = seeded_z(seeds[sl], G.cfg.z_dim, device)                         # (b, z_dim)
        pyramid = G(z, tokens, mask, eot, truncation_psi=truncation_psi,
                    truncation_target=truncation_target, noise_mode="const")
        return pyramid[0].clamp(-1, 1)                                       # (b, 3, R, R) the finest level
    return in_batches(len(prompts), batch, make)


@torch.no_grad()
def upsample(U, clip, lowres, prompts, seeds, batch=32, noise_aug=None):
    """Low-res images (N, 3, r, r) in [-1, 1], one prompt and seed each -> (N, 3, R, R) in [-1, 1].
    U in eval mode, constant noise, z from each seed. noise_aug: the std of Gaussian noise added
    to the input first (Sec. 3.4's augmentation, which the paper applies at inference too: it
    hides a base model's artifacts at the cost of detail); None = upsampler.inference_sigma(U.cfg),
    0 = off. Deterministic for a seed: the noise of image k is drawn from its own seed."""
    device = next(U.parameters()).device
    if noise_aug is None:
        noise_aug = upsampler.inference_sigma(U.cfg)                         # the default: moderate noise

    def make(sl):
        tokens, mask, eot = clip.text_features(prompts[sl])                 # (b, L, D), (b, L), (b,)
        z = seeded_z(seeds[sl], U.cfg.z_dim, device)                         # (b, z_dim)
        x = lowres[sl].to(device)                                            # (b, 3, r, r)
        if noise_aug > 0:
            x = x + noise_aug * seeded_normal(seeds[sl], x.shape[1:], device)  # (b, 3, r, r) per-seed noise
        return U(x, z, tokens, mask, eot, noise_aug=0.0, noise_mode="const")[0].clamp(-1, 1)
    return in_batches(len(prompts), batch, make)


def as_png(images):
    """(N, 3, H, W) in [-1, 1] -> the same images as a PNG stores them and data.load_image reads
    them back: 8 bits per channel (png_pixels' rounding), float32 in [-1, 1] again."""
    pixels = torch.from_numpy(png_pixels(images)).permute(0, 3, 1, 2).float()  # (N, 3, H, W) 0..255
    return (pixels / 127.5 - 1.0).to(images.device)


@torch.no_grad()
def evaluate_upsampler(U, clip, highres, captions, seeds=None, noise_aug=None, batch=32):
    """How close U brings real images, made small, back to the real ones, on the path a user takes:
    `sample.py --upsampler RUN --lowres IMG --prompt CAPTION --seed S` with IMG the small image.

    highres (n, 3, R, R) real images in [-1, 1], one caption each. Each is made small (06's
    make_lowres) and stored as a PNG would (as_png), then upsampled by upsample() twice: at
    noise_aug (None: the default, upsampler.inference_sigma(U.cfg)) and at 0 (--noise-aug 0).
    seeds: one per image (z and input noise as --seed S draws them); default 0 .. n-1.
    -> dict of floats, MAEs in [-1, 1] units (x 127.5 for 0-255):
        noise_aug                      the default path's sigma
        mae, mae_ratio                 default path: mean |x - highres|, and that / mae_bicubic
        mae_clean, mae_ratio_clean     the same with no input noise
        mae_bicubic                    bicubic upsampling of the small image (upsampler.resize)
        sharpness, sharpness_clean, sharpness_bicubic, sharpness_real   RMS gradient (06's sharpness)
    (the MAEs and sharpness by 06's restoration_metrics, as its upsampling_metrics computes them)
    The target: both ratios well below 1 (NOTES.md, "Upsampler input noise"), sharpness near real.
    """
    n, R = highres.shape[0], U.cfg.out_resolution
    assert highres.shape == (n, 3, R, R) and len(captions) == n, (highres.shape, R, len(captions))
    seeds = list(range(n)) if seeds is None else list(seeds)
    sigma = upsampler.inference_sigma(U.cfg) if noise_aug is None else float(noise_aug)
    lowres = as_png(upsampler.make_lowres(highres, U.cfg.in_resolution))   # (n, 3, r, r) the small PNG
    was_training = U.training
    U.eval()                                                                # as load_upsampler returns it
    try:
        out = upsample(U, clip, lowres, captions, seeds, batch, sigma)      # (n, 3, R, R) the default path
        clean = upsample(U, clip, lowres, captions, seeds, batch, 0.0)      # (n, 3, R, R) --noise-aug 0
    finally:
        U.train(was_training)
    m, m_clean = (upsampler.restoration_metrics(x, lowres, highres) for x in (out, clean))
    mae_bicubic = m["mae_bicubic"]                                          # the same baseline for both
    return {"noise_aug": sigma,
            "mae": m["mae"], "mae_ratio": m["mae"] / max(mae_bicubic, 1e-12),
            "mae_clean": m_clean["mae"], "mae_ratio_clean": m_clean["mae"] / max(mae_bicubic, 1e-12),
            "mae_bicubic": mae_bicubic,
            "sharpness": m["sharpness"], "sharpness_clean": m_clean["sharpness"],
            "sharpness_bicubic": m["sharpness_bicubic"], "sharpness_real": m["sharpness_real"]}


def text_condition(G, clip, prompts, length=None):
    """Prompts -> G's own text features (T): t_local (B, L, C), local_mask (B, L), t_global (B, C).
    length: L (see FrozenCLIP.text_features); give it when two calls' features are combined."""
    return G.text_encoder(*clip.text_features(prompts, length))


def style(G, seeds, t_global, psi, target):
    """w = M(z, t_global) for z from `seeds`, truncated toward the prompt's (or global) mean. (B, S)"""
    z = seeded_z(seeds, G.cfg.z_dim, t_global.device)                    # (B, z_dim)
    return G.truncate(G.mapping(z, t_global), t_global, psi, target)     # (B, S)


def blocks_before(G, row):
    """Synthesis blocks whose conv reads a row of ws before `row`: they count as coarse."""
    return sum(block.w_index < row for block in G.synthesis.blocks)


def default_crossover(G):
    """StyleGAN's 'coarse' styles are the 4-8 px ones: the first row of a scale >= 16 px
    (of the finest scale for an 8 px G, so that something is left to mix)."""
    first_fine = min(16, G.cfg.resolution)
    return next(k for k, name in enumerate(G.synthesis.w_names) if int(name.split("px")[0]) >= first_fine)


@torch.no_grad()
def mixed_images(G, clip, coarse, fine, row, psi=1.0, target="prompt", batch=32):
    """coarse[i], fine[i] = (prompt, seed). Image i takes rows [0, row) of ws, and the text
    (t_local) of the blocks reading them, from coarse[i]; the rest from fine[i]. (M, 3, R, R)

    Style mixing: one prompt, two seeds. Prompt mixing: two prompts, one seed, i.e. the
    prompt's (w, t_local) switch at the crossover (paper Sec. 4.6)."""
    k, nb = blocks_before(G, row), G.synthesis.num_blocks

    def make(sl):
        (p_c, s_c), (p_f, s_f) = zip(*coarse[sl]), zip(*fine[sl])
        L = clip.context_length                                              # the same L for both
        t_c, m_c, g_c = text_condition(G, clip, list(p_c), L)                # (b, L, C), (b, L), (b, C)
        t_f, m_f, g_f = text_condition(G, clip, list(p_f), L)
        w_c = style(G, s_c, g_c, psi, target)[:, None].expand(-1, G.num_ws, -1)  # (b, num_ws, S)
        w_f = style(G, s_f, g_f, psi, target)[:, None].expand(-1, G.num_ws, -1)
        ws = generator.style_mixing(w_c, w_f, row)                           # (b, num_ws, S)
        t_local = generator.prompt_mixing(t_c, t_f, k, nb)                   # num_blocks x (b, L, C)
        mask = generator.prompt_mixing(m_c, m_f, k, nb)                      # num_blocks x (b, L)
        return G.synthesis(ws, t_local, mask, noise_mode="const")[0].clamp(-1, 1)  # (b, 3, R, R)
    return in_batches(len(coarse), batch, make)


@torch.no_grad()
def interpolated_images(G, clip, prompts_a, prompts_b, alphas, seeds, psi=1.0, target="prompt", batch=32):
    """Image i: prompt interpolation (Fig. 7) from prompts_a[i] to prompts_b[i] by alphas[i], z
    from seeds[i]. (M, 3, R, R)

    The text (T's outputs t_local, t_global) and the style are lerped together:
        t_x = lerp(t_a, t_b, alpha),   w = lerp(M(z, t_global_a), M(z, t_global_b), alpha)
    so the cross-attention reads the in-between text and every layer the in-between style, and
    truncation pulls w toward the in-between prompt's mean (of lerp(t_global_a, t_global_b)).
    Project's choice: the token mask is the union of the two prompts' masks, so the endpoints
    are exactly the two prompts' images when both have the same token count (otherwise an
    endpoint also attends to its own T outputs at the positions past its last word that the
    other, longer prompt uses)."""
    def make(sl):
        L = clip.context_length                                              # the same L for both
        t_a, m_a, g_a = text_condition(G, clip, prompts_a[sl], L)           # (b, L, C), (b, L), (b, C)
        t_b, m_b, g_b = text_condition(G, clip, prompts_b[sl], L)
        alpha = torch.tensor(alphas[sl], device=t_a.device, dtype=t_a.dtype)  # (b,)
        t_local = torch.lerp(t_a, t_b, alpha[:, None, None])                 # (b, L, C)
        t_global = torch.lerp(g_a, g_b, alpha[:, None])                      # (b, C)
        z = seeded_z(seeds[sl], G.cfg.z_dim, t_a.device)                     # (b, z_dim) one z per frame
        w = torch.lerp(G.mapping(z, g_a), G.mapping(z, g_b), alpha[:, None])  # (b, S)
        w = G.truncate(w, t_global, psi, target)                             # (b, S)
        ws = w[:, None].expand(-1, G.num_ws, -1)                             # (b, num_ws, S)
        return G.synthesis(ws, t_local, m_a | m_b, noise_mode="const")[0].clamp(-1, 1)
    return in_batches(len(seeds), batch, make)


# -----------------------------------------------------------------------------
# The latent space (paper Sec. 4.6, App. C, the abstract): truncation sweep, latent
# interpolation, vector arithmetic. (Style mixing, prompt interpolation and mixing are above.)


def psi_sweep(k):
    """k values of psi, evenly spaced from 1 (plain sampling) down to 0 (the mean w)."""
    return [1 - i / (k - 1) for i in range(k)]


def slerp(a, b, t):
    """Spherical interpolation of the rows of a and b (B, F) by t (B,): the direction moves along
    the great circle from a's to b's at a constant angle per step, the length is lerped; a at
    t = 0 and b at t = 1 exactly.

    Project's choice for z (StyleGAN's, for its path-length metric): M reads only z's direction
    (normalize_2nd_moment), and a lerp, once normalised, walks the same arc but unevenly (fastest
    mid-way between two nearly orthogonal z), so equal steps in t would not be equal steps for M."""
    n_a, n_b = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)   # (B, 1)
    cos = ((a / n_a) * (b / n_b)).sum(dim=1, keepdim=True).clamp(-1, 1)    # (B, 1)
    omega = torch.acos(cos)                                               # (B, 1) angle between a and b
    t = t[:, None]                                                        # (B, 1)
    sin = torch.sin(omega)
    alike = sin < 1e-6                                                    # (nearly) parallel: lerp
    length = torch.lerp(n_a, n_b, t)                                      # (B, 1)
    w_a = torch.where(alike, 1 - t, torch.sin((1 - t) * omega) / sin * (length / n_a))  # (B, 1)
    w_b = torch.where(alike, t, torch.sin(t * omega) / sin * (length / n_b))             # (B, 1)
    return w_a * a + w_b * b                                              # (B, F)


@torch.no_grad()
def z_interpolated_images(G, clip, prompts, seeds_a, seeds_b, ts, psi=1.0, target="prompt", batch=32):
    """Image i: latent interpolation, prompt prompts[i] with z = slerp(z(seeds_a[i]), z(seeds_b[i]),
    ts[i]); t = 0 and 1 are `generate`'s images of the two seeds. (M, 3, R, R)"""
    device = next(G.parameters()).device

    def make(sl):
        tokens, mask, eot = clip.text_features(prompts[sl])                 # (b, L, D), (b, L), (b,)
        t = torch.tensor(ts[sl], device=device)                              # (b,)
        z = slerp(seeded_z(seeds_a[sl], G.cfg.z_dim, device), seeded_z(seeds_b[sl], G.cfg.z_dim, device), t)
        pyramid = G(z, tokens, mask, eot, truncation_psi=psi, truncation_target=target, noise_mode="const")
        return pyramid[0].clamp(-1, 1)                                       # (b, 3, R, R)
    return in_batches(len(prompts), batch, make)


# The spaces of vector arithmetic, input to output; each names what is combined as a - b + c.
ARITHMETIC_SPACES = {
    "clip": "CLIP's token features (G's T, M and synthesis run on the result)",
    "t": "T's outputs t_local and t_global; w = M(z, t_global)",
    "w": "the synthesis's whole input: w = M(z, t_global) of each prompt (one z), and t_local",
    "w-only": "w alone; t_local is c's (what w carries without the cross-attention's text)",
}


def arithmetic_code(G, clip, a, b, c, z, space, psi=1.0, target="prompt"):
    """The code of a minus that of b plus that of c (lists of prompts of equal token counts: one
    template, words swapped), with z (B, z_dim) -> the synthesis's input (ws, t_local, local_mask).
    Token features combine position by position, hence the equal counts."""
    L = clip.context_length
    feats = [clip.text_features(p, L) for p in (a, b, c)]                  # 3 x ((B, L, D), (B, L), (B,))
    if not all(torch.equal(feats[0][1], f[1]) for f in feats):
        raise ValueError("vector arithmetic needs prompts of equal token counts (e.g. one template, one word "
                         f"swapped): {a[0]!r}, {b[0]!r}, {c[0]!r}")

    def combine(x_a, x_b, x_c):
        return x_a - x_b + x_c                                               # the analogy a - b + c

    def style_of(t_global):
        return G.truncate(G.mapping(z, t_global), t_global, psi, target)    # (B, S)
    if space == "clip":
        tokens = combine(*(f[0] for f in feats))                             # (B, L, D)
        t_local, local_mask, t_global = G.text_encoder(tokens, feats[0][1], feats[0][2])  # (B, L, C), (B, L), (B, C)
        w = style_of(t_global)                                               # (B, S)
    else:
        texts = [G.text_encoder(*f) for f in feats]                          # 3 x (t_local, local_mask, t_global)
        local_mask = texts[0][1]                                             # (B, L) equal for the three
        t_local = combine(*(t[0] for t in texts))                            # (B, L, C)
        if space == "t":
            w = style_of(combine(*(t[2] for t in texts)))                    # (B, S) M of the combined t_global
        else:
            w = combine(*(style_of(t[2]) for t in texts))                    # (B, S) each prompt's w, one z
            if space == "w-only":
                t_local = texts[2][0]                                        # (B, L, C) c's text
    return w[:, None].expand(-1, G.num_ws, -1), t_local, local_mask         # (B, num_ws, S), ...


@torch.no_grad()
def arithmetic_images(G, clip, a, b, c, seeds, space, psi=1.0, target="prompt", batch=32):
    """Image i: the code of a[i] - b[i] + c[i] in `space` (ARITHMETIC_SPACES), z from seeds[i]. (M, 3, R, R)"""
    device = next(G.parameters()).device

    def make(sl):
        z = seeded_z(seeds[sl], G.cfg.z_dim, device)                         # (b, z_dim) one z for all three
        ws, t_local, mask = arithmetic_code(G, clip, a[sl], b[sl], c[sl], z, space, psi, target)
        return G.synthesis(ws, t_local, mask, noise_mode="const")[0].clamp(-1, 1)  # (b, 3, R, R)
    return in_batches(len(seeds), batch, make)


@torch.no_grad()
def analogy_residuals(G, clip, a, b, c, d, seeds, psi=1.0, target="prompt"):
    """How far each space's a - b + c lands from d's own code, at the synthesis's input: for w
    and for t_local, |x - x_d| / |x_c - x_d| averaged over the analogies (0: exactly d's code;
    1: as far as c, i.e. as if nothing was carried). -> {space: {"w": r, "t_local": r}}"""
    z = seeded_z(seeds, G.cfg.z_dim, next(G.parameters()).device)            # (B, z_dim)
    codes = {space: arithmetic_code(G, clip, a, b, c, z, space, psi, target) for space in ARITHMETIC_SPACES}
    codes["c"], codes["d"] = (arithmetic_code(G, clip, p, p, p, z, "t", psi, target) for p in (c, d))

    def gap(x, y, mask=None):
        diff = x - y if mask is None else (x - y) * mask[..., None]          # padding left out
        return diff.flatten(1).norm(dim=1)                                   # (B,) one distance per analogy
    out = {}
    for space in ARITHMETIC_SPACES:
        (ws, t_local, mask), (ws_c, t_c, _), (ws_d, t_d, _) = codes[space], codes["c"], codes["d"]
        out[space] = {"w": (gap(ws[:, 0], ws_d[:, 0]) / gap(ws_c[:, 0], ws_d[:, 0])).mean().item(),
                      "t_local": (gap(t_local, t_d, mask) / gap(t_c, t_d, mask)).mean().item()}
    return out


ANALOGY_ATTRIBUTES = ("shape", "color", "background", "size", "position")  # data.py's caption attributes


def random_analogies(clip, n, seed):
    """n shapes analogies (a, b, c, d, x): a and b differ in one attribute x, c is b with another
    attribute changed, d is a with that change, so d = a - b + c ("large red circle" - "large red
    square" + "large blue square" = "large blue circle"). One template for all four, equal token
    counts; colour never equal to the background. Deterministic for a seed."""
    rng = random.Random(seed)
    values = {"shape": data.SHAPES, "color": list(data.COLORS), "background": list(data.COLORS),
              "size": list(data.SIZES), "position": list(data.POSITIONS)}
    out = []
    while len(out) < n:
        a = {k: rng.choice(v) for k, v in values.items()}
        x, y = rng.sample(ANALOGY_ATTRIBUTES, 2)                             # x: a -> b; y: b -> c
        b = dict(a, **{x: rng.choice([v for v in values[x] if v != a[x]])})
        c = dict(b, **{y: rng.choice([v for v in values[y] if v != b[y]])})
        d = dict(a, **{y: c[y]})
        if any(t["color"] == t["background"] for t in (a, b, c, d)):
            continue
        template = rng.randrange(len(data.CAPTION_TEMPLATES))
        caps = [data.shapes_caption(t, template) for t in (a, b, c, d)]
        eot = clip.text_features(caps)[2]                                    # (4,) token counts - 1
        if (eot == eot[0]).all():
            out.append((*caps, x))
    return out


def analogy_scores(attrs, targets, carried):
    """Judged attrs vs the target d's: the share with all five right, with the attribute that
    a - b carries (x) right, and with the other four right."""
    n = len(targets)
    return {"all": sum(j == t for j, t in zip(attrs, targets)) / n,
            "carried": sum(j[x] == t[x] for j, t, x in zip(attrs, targets, carried)) / n,
            "rest": sum(all(j[k] == t[k] for k in t if k != x) for j, t, x in zip(attrs, targets, carried)) / n}


def carried_by_attribute(attrs, targets, carried):
    """The share of analogies whose carried attribute is right, per attribute that a - b carries."""
    out = {}
    for x in ANALOGY_ATTRIBUTES:
        hits = [j[x] == t[x] for j, t, c in zip(attrs, targets, carried) if c == x]
        if hits:
            out[x] = sum(hits) / len(hits)
    return out


# -----------------------------------------------------------------------------
# Evaluation (the metrics themselves are in metrics.py)


@torch.no_grad()
def evaluate(G, clip, dataset, n=128, seed=EVAL_SEED, shapes=False, truncation_psi=1.0, batch=32, fid=None):
    """The metrics train.py logs (see metrics.eval_metrics); one generated image per real caption,
    image i from seed + i, each image used by every metric (generated once). fid: None, or a
    metrics.InceptionFID whose reference is these n real images (metrics.prepare_fid)."""
    reals, captions = eval_pairs(dataset, n, seed)
    fakes = generate(G, clip, captions, [seed + i for i in range(len(captions))], truncation_psi, batch)
    scores = eval_metrics(clip, fakes, reals, captions, shapes, fid)
    if shapes:
        scores.update(spread_metrics(G, clip, captions, seed, truncation_psi, batch))
    return scores


SPREAD_CAPTIONS, SPREAD_Z = 16, 8  # seed spread: 8 z for each of the first 16 evaluation captions


def spread_metrics(G, clip, captions, seed, truncation_psi=1.0, batch=32):
    """metrics.seed_spread on SPREAD_Z samples of each of the first SPREAD_CAPTIONS captions
    (z from seeds seed + 10**6 + k, apart from the alignment images' seeds)."""
    caps = captions[:SPREAD_CAPTIONS]
    prompts = [c for c in caps for _ in range(SPREAD_Z)]                     # caption-major
    seeds = [seed + 10**6 + k for _ in caps for k in range(SPREAD_Z)]
    images = generate(G, clip, prompts, seeds, truncation_psi, batch)        # (P * n_z, 3, R, R)
    return metrics.seed_spread(images.view(len(caps), SPREAD_Z, *images.shape[1:]), caps, seed=seed)


# -----------------------------------------------------------------------------
# Command line: each mode -> (images (M, 3, R, R), one captions row each, grid tiles, grid cols)


def run_plain(G, clip, args, prompts):
    """--n images per prompt; grid rows = prompts, cols = seeds."""
    seeds = [args.seed + k for k in range(args.n)]
    pairs = [(p, s) for p in prompts for s in seeds]                          # prompt-major
    images = generate(G, clip, [p for p, _ in pairs], [s for _, s in pairs], args.truncation, args.batch,
                      args.truncation_target)
    rows = [{"caption": p, "seed": s} for p, s in pairs]
    if not args.beside_data:
        return images, rows, (images if args.grid else None), args.n
    # --beside-data: each grid row holds the prompt's n samples, then n draws of the data's own
    # jitter for that caption (data.jittered_shapes): how much the caption leaves open
    n = args.n
    draws = [data.jittered_shapes(data.parse_shapes_caption(p), n, G.cfg.resolution, seed=args.seed) for p in prompts]
    grid = torch.cat([torch.cat([images[i * n:(i + 1) * n].cpu(), d]) for i, d in enumerate(draws)])
    return images, rows, grid, 2 * n


def run_style_mix(G, clip, args, prompt, row):
    """(n + 1) x (n + 1) figure: blank corner, header row = fine seeds, header column = coarse
    seeds, cell (i, j) = coarse styles of coarse seed i with fine styles of fine seed j."""
    n, S = args.n, args.seed
    coarse_seeds, fine_seeds = list(range(S, S + n)), list(range(S + n, S + 2 * n))
    pure = coarse_seeds + fine_seeds
    cells = list(itertools.product(coarse_seeds, fine_seeds))                 # row-major
    coarse = [(prompt, s) for s in pure] + [(prompt, c) for c, _ in cells]
    fine = [(prompt, s) for s in pure] + [(prompt, f) for _, f in cells]
    images = mixed_images(G, clip, coarse, fine, row, args.truncation, args.truncation_target, args.batch)
    rows = ([{"caption": prompt, "seed": s} for s in pure] +
            [{"caption": prompt, "seed": c, "fine_seed": f, "crossover": row} for c, f in cells])
    img_c, img_f, img_mix = images[:n], images[n:2 * n], images[2 * n:]
    blank = torch.ones_like(images[:1])                                       # white tile
    tiles = [blank, img_f] + [t for i in range(n) for t in (img_c[i:i + 1], img_mix[i * n:(i + 1) * n])]
    return images, rows, torch.cat(tiles), n + 1


def run_interpolate(G, clip, args, prompts):
    """For each seed, frames along prompt 0 -> 1 -> 2 ...; shared endpoints appear once."""
    K = args.interpolate
    path = [(i, k / (K - 1)) for i in range(len(prompts) - 1) for k in range(K if i == len(prompts) - 2 else K - 1)]
    items = [(s, i, alpha) for s in range(args.seed, args.seed + args.n) for i, alpha in path]  # seed-major
    images = interpolated_images(G, clip, [prompts[i] for _, i, _ in items], [prompts[i + 1] for _, i, _ in items],
                                 [a for _, _, a in items], [s for s, _, _ in items], args.truncation,
                                 args.truncation_target, args.batch)
    rows = [{"caption": prompts[i] if a == 0 else prompts[i + 1] if a == 1 else
             f"{prompts[i]} -> {prompts[i + 1]} ({a:.3f})", "seed": s,
             "prompt_a": prompts[i], "prompt_b": prompts[i + 1], "alpha": a} for s, i, a in items]
    return images, rows, images, len(path)


def run_prompt_mix(G, clip, args, prompts, row):
    """Per seed: prompt A alone, A coarse + B fine, prompt B alone."""
    a, b = prompts
    seeds = range(args.seed, args.seed + args.n)
    coarse = [(p, s) for s in seeds for p in (a, a, b)]
    fine = [(p, s) for s in seeds for p in (a, b, b)]
    images = mixed_images(G, clip, coarse, fine, row, args.truncation, args.truncation_target, args.batch)
    rows = [{"caption": pc if pc == pf else f"coarse: {pc} | fine: {pf}", "seed": s, "coarse_prompt": pc,
             "fine_prompt": pf, "crossover": row} for (pc, s), (pf, _) in zip(coarse, fine)]
    return images, rows, images, 3


def run_truncation_sweep(G, clip, args, prompts, shapes=False):
    """Rows = (prompt, seed), prompt-major; cols = psi from 1 to 0 (--truncation-sweep K values)
    toward --truncation-target. Column psi is `generate` at psi: the first is plain sampling.
    shapes (a run on the shapes data) and n >= 2: also prints the spread of the shapes' height
    over the seeds per psi (metrics.judge_shapes_image's centre y: the std over seeds, averaged
    over the prompts), which truncation shrinks to 0 at psi 0."""
    psis = psi_sweep(args.truncation_sweep)
    pairs = [(p, args.seed + k) for p in prompts for k in range(args.n)]
    per_psi = [generate(G, clip, [p for p, _ in pairs], [s for _, s in pairs], psi, args.batch,
                        args.truncation_target) for psi in psis]             # K x (P n, 3, R, R)
    images = torch.stack(per_psi, dim=1).flatten(0, 1)                       # (P n K, 3, R, R) pair-major
    if shapes and args.n >= 2:
        heights = [torch.tensor([info["cy"] for _, info in metrics.judge_shapes_image(x, details=True)])
                   for x in per_psi]                                         # K x (P n,)
        spread = [h.view(len(prompts), args.n).std(dim=1).mean().item() for h in heights]
        print("height spread over seeds (std of the centre's y): " +
              ", ".join(f"psi {psi:.2f}: {v:.3f}" for psi, v in zip(psis, spread)))
    rows = [{"caption": p, "seed": s, "truncation": psi, "truncation_target": args.truncation_target}
            for p, s in pairs for psi in psis]
    return images, rows, images, len(psis)


def run_z_interpolate(G, clip, args, prompts):
    """Rows = (prompt, k < n), prompt-major; cols = K frames from the z of seed S + 2k to that of
    S + 2k + 1 (slerp), the prompt fixed."""
    K = args.z_interpolate
    ts = [i / (K - 1) for i in range(K)]
    items = [(p, args.seed + 2 * k, t) for p in prompts for k in range(args.n) for t in ts]
    images = z_interpolated_images(G, clip, [p for p, _, _ in items], [s for _, s, _ in items],
                                   [s + 1 for _, s, _ in items], [t for _, _, t in items], args.truncation,
                                   args.truncation_target, args.batch)
    rows = [{"caption": p, "seed": s, "seed_b": s + 1, "t": t} for p, s, t in items]
    return images, rows, images, K


def run_arithmetic(G, clip, args, prompts):
    """Rows = seeds; cols = a, b, c, a - b + c in --arithmetic SPACE, and d (a fourth prompt, the
    one the result should draw) if given. Every column of a row uses the row's z."""
    a, b, c = prompts[:3]
    seeds = [args.seed + k for k in range(args.n)]
    plain = generate(G, clip, [p for _ in seeds for p in prompts], [s for s in seeds for _ in prompts],
                     args.truncation, args.batch, args.truncation_target)  # (n P, 3, R, R) seed-major
    result = arithmetic_images(G, clip, [a] * len(seeds), [b] * len(seeds), [c] * len(seeds), seeds,
                               args.arithmetic, args.truncation, args.truncation_target, args.batch)
    P = len(prompts)
    tiles, rows = [], []
    for k, s in enumerate(seeds):
        tiles += [plain[k * P:k * P + 3], result[k:k + 1], plain[k * P + 3:(k + 1) * P]]
        rows += [{"caption": p, "seed": s} for p in prompts[:3]]
        rows += [{"caption": f"{a} - {b} + {c}", "seed": s, "space": args.arithmetic}]
        rows += [{"caption": p, "seed": s} for p in prompts[3:]]
    images = torch.cat(tiles)                                                # (n (P + 1), 3, R, R)
    return images, rows, images, P + 1


def run_analogies(G, clip, args):
    """--n random analogies (random_analogies, from --seed; analogy i drawn with the z of seed
    --seed + i), each computed in every space of ARITHMETIC_SPACES and judged by pixels against
    d's attributes. Images: per analogy a, b, c, d (plain) and one per space; the grid shows the
    first 8 analogies, one per row. -> (images, rows, grid, ncol, scores)"""
    analogies = random_analogies(clip, args.n, args.seed)
    seeds = [args.seed + i for i in range(args.n)]
    a, b, c, d, carried = (list(col) for col in zip(*analogies))
    kw = dict(psi=args.truncation, target=args.truncation_target, batch=args.batch)
    plain = [generate(G, clip, p, seeds, args.truncation, args.batch, args.truncation_target) for p in (a, b, c, d)]
    spaces = {space: arithmetic_images(G, clip, a, b, c, seeds, space, **kw) for space in ARITHMETIC_SPACES}
    targets = [data.parse_shapes_caption(t) for t in d]
    judged = {"d drawn from its prompt": metrics.judge_shapes_image(plain[3]),
              "c drawn from its prompt": metrics.judge_shapes_image(plain[2]),
              **{space: metrics.judge_shapes_image(x) for space, x in spaces.items()}}
    scores = {name: {**analogy_scores(attrs, targets, carried),
                     "carried_by_attribute": carried_by_attribute(attrs, targets, carried)}
              for name, attrs in judged.items()}
    for space, residual in analogy_residuals(G, clip, a, b, c, d, seeds, args.truncation,
                                             args.truncation_target).items():
        scores[space]["code_residual"] = residual                           # why a space works or not
    columns = plain + list(spaces.values())                                  # 4 + spaces x (n, 3, R, R)
    images = torch.stack(columns, dim=1).flatten(0, 1)                       # (n (4 + spaces), 3, R, R)
    names = ["a", "b", "c", "d"] + list(spaces)
    rows = [{"caption": (a[i], b[i], c[i], d[i])[j] if j < 4 else f"{a[i]} - {b[i]} + {c[i]}", "seed": seeds[i],
             "analogy": i, "column": name, "carried": carried[i]} for i in range(args.n) for j, name in enumerate(names)]
    ncol = len(names)
    return images, rows, images[:8 * ncol], ncol, scores


def png_pixels(images):
    """(N, 3, R, R) in [-1, 1] -> (N, R, R, 3) uint8: the pixels data.save_image_grid writes for
    each image (the same rounding, so the same PNG bytes), converted in one pass for the batch."""
    return ((images.float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


OWNED = ("captions.jsonl", "grid.png", "eval.json", "lowres.png", "comparison.png", "analogies.json")  # what sample.py writes
IMAGE_NAME = re.compile(r"\d{5}\.png")                                                 # besides 00000.png, ...


def earlier_outputs(out):
    """The files of an earlier sample.py call in `out`: the PNGs its captions.jsonl lists and the
    files sample.py writes (OWNED). Refused in one line (UsageError): a folder holding such names
    without a readable captions.jsonl, which sample.py did not write and must not overwrite."""
    if not os.path.isdir(out):
        return []
    names = set(os.listdir(out))
    ours = sorted(n for n in names if n in OWNED or IMAGE_NAME.fullmatch(n))
    listed = []
    try:
        with open(os.path.join(out, "captions.jsonl"), encoding="utf-8") as f:
            listed = [json.loads(line)["file"] for line in f if line.strip()]
    except (OSError, ValueError, KeyError, TypeError):
        if ours:
            raise UsageError(f"--out {out} holds {ours[0]} but no captions.jsonl of sample.py: choose a new or "
                             "empty folder (sample.py replaces only its own earlier outputs)") from None
        return []
    return sorted({n for n in listed if isinstance(n, str) and IMAGE_NAME.fullmatch(n) and n in names}
                  | {n for n in OWNED if n in names})


def clear_earlier_outputs(out):
    """Remove an earlier call's outputs (earlier_outputs), so that the folder and its captions.jsonl
    describe this call only, and say so."""
    old = earlier_outputs(out)
    for name in old:
        os.remove(os.path.join(out, name))
    if old:
        pngs = [n for n in old if IMAGE_NAME.fullmatch(n)]
        what = ([counted(len(pngs), "PNG")] if pngs else []) + [n for n in old if not IMAGE_NAME.fullmatch(n)]
        print(f"replaced the earlier outputs in {out} ({', '.join(what)})")


def write_outputs(out, images, rows, grid=None, ncol=1):
    """00000.png, 00001.png, ... and captions.jsonl (one row per image); grid.png if given.
    An earlier call's outputs in `out` are removed first (clear_earlier_outputs)."""
    clear_earlier_outputs(out)
    os.makedirs(out, exist_ok=True)
    pixels = png_pixels(images)                                               # (N, R, R, 3) uint8
    names = [f"{i:05d}.png" for i in range(len(rows))]

    def save(i):
        Image.fromarray(pixels[i]).save(os.path.join(out, names[i]))
    # PNG compression and file writes release the GIL: a few threads write a batch 2x faster
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(save, range(len(names))))                               # re-raises any error
    with open(os.path.join(out, "captions.jsonl"), "w") as f:                 # one write, after the images
        f.write("".join(json.dumps({"file": name, **row}) + "\n" for name, row in zip(names, rows)))
    if grid is not None:
        data.save_image_grid(grid.float().cpu(), os.path.join(out, "grid.png"), ncol=ncol)


UsageError = FlagError  # bad input: printed as one line on stderr, exit status 2 (as train.py's)


def build_parser():
    """The flags, parsed by config.py's FlagParser as train.py's are: a bad one raises UsageError."""
    p = FlagParser(prog="sample.py", description=__doc__.split("Determinism:")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="run directory of train.py, or its checkpoint.pt")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE", help="a text file, one prompt per line (blank lines skipped)")
    p.add_argument("--n", type=int, help="images per prompt (default 1; 4 with --style-mix; "
                                         "the run's eval_images with --eval)")
    p.add_argument("--seed", type=int, help=f"image k of a prompt uses seed + k (default 0; {EVAL_SEED} with --eval); "
                                            f"every seed used must be <= {SEED_MAX}: a larger one is refused, "
                                            "not wrapped")
    p.add_argument("--truncation", type=float, default=1.0, metavar="PSI", help="psi in [0, 1]; 1 = none")
    p.add_argument("--truncation-target", type=truncation_target, default="prompt", metavar="TARGET",
                   help="prompt | global | G in [0, 1]: truncate toward the per-prompt mean w_c, the global mean "
                        "w_avg, or (1 - G) w_c + G w_avg (App. C: between the two)")
    p.add_argument("--out", help="output directory (default <run dir>/samples, or <run dir>/<mode>)")
    p.add_argument("--grid", action="store_true", help="also write grid.png (rows = prompts, cols = seeds)")
    p.add_argument("--beside-data", action="store_true", help="grid.png: each prompt's samples, then the data's "
                                                               "own --n draws of that caption (shapes runs)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=32, help="images per forward pass")
    p.add_argument("--data", help="--eval: real images to compare with (default: the run's --data)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--style-mix", nargs="?", type=int, const=-1, metavar="ROW",
                      help="style mixing of one prompt: ws rows [0, ROW) from one seed, the rest from another")
    mode.add_argument("--interpolate", type=int, metavar="K", help="K frames from each prompt to the next")
    mode.add_argument("--prompt-mix", type=int, metavar="ROW", help="ws rows [0, ROW) and their blocks' text "
                                                                      "from prompt A, the rest from prompt B")
    mode.add_argument("--eval", action="store_true", help="CLIP score, CLIP FD, Inception FID, shapes alignment "
                                                          "-> eval.json")
    mode.add_argument("--truncation-sweep", type=int, metavar="K", help="K columns of psi from 1 to 0 per prompt "
                                                                         "and seed")
    mode.add_argument("--z-interpolate", type=int, metavar="K", help="K frames from one z to another (slerp), "
                                                                      "the prompt fixed")
    mode.add_argument("--arithmetic", choices=tuple(ARITHMETIC_SPACES), metavar="SPACE",
                      help="prompts A B C [D]: draw the code of A - B + C in SPACE: " + "; ".join(
                          f"{k}: {v}" for k, v in ARITHMETIC_SPACES.items()))
    mode.add_argument("--analogies", action="store_true", default=None,
                      help="--n random shapes analogies in every --arithmetic space, judged by pixels "
                           "-> analogies.json")
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=None,
                   help="with --eval: Inception FID (default: on for image folders and shards, off for shapes; "
                        "the Inception weights download once, 91 MB)")
    p.add_argument("--upsampler", metavar="UP", help="an upsampler run of train.py --stage upsampler: upsample "
                                                       "the --ckpt images, or the --lowres image")
    p.add_argument("--noise-aug", type=float, default=None, metavar="SIGMA",
                   help="with --upsampler: std of Gaussian noise added to its input (in [-1, 1] units; "
                        "training used up to the run's noise_aug_sigma); default a quarter of that, 0 = off")
    p.add_argument("--figure", metavar="PNG", help="also write the grid to this file, tiles 3x larger with "
                                                     "gaps (a README picture)")
    p.add_argument("--lowres", metavar="IMAGE", help="with --upsampler, no --ckpt: an image file, centre-cropped "
                                                      "and resized to the upsampler's input size, then upsampled")
    dests = {a.dest for a in p._actions if a.dest != "help"}
    assert dests == set(SAMPLE_RULES), f"flags and SAMPLE_RULES differ: {dests ^ set(SAMPLE_RULES)}"
    return p


# The valid values of every flag (config.py's rules: an interval, the words allowed, a function, or
# ANY where the comment says what checks it), checked before any model is loaded; build_parser
# asserts that every flag has one.
SAMPLE_RULES = {
    "ckpt": ANY, "upsampler": ANY,          # resolve_checkpoint, read_checkpoint
    "prompt": ANY, "prompts": ANY,          # read_prompts
    "n": "[1, inf)",                        # and >= 2 with --eval (check_args)
    "seed": f"[0, {SEED_MAX}]",
    "truncation": "[0, 1]",
    "truncation_target": lambda v: None if v in generator.TRUNCATION_TARGETS or 0 <= v <= 1 else
    f"--truncation-target {v}: prompt, global, or a number in [0, 1]",
    "out": ANY,                             # check_args: not a file; earlier_outputs
    "grid": ANY, "eval": ANY, "fid": ANY, "beside_data": ANY,  # check_args: plain sampling of shapes prompts
    "device": device_rule,
    "batch": "[1, inf)",
    "data": ANY,                            # run_eval: data.build_dataset
    "style_mix": ANY, "prompt_mix": ANY,    # check_row: a row of the loaded G's ws
    "interpolate": "[2, inf)",              # frames per pair, both endpoints
    "noise_aug": "[0, 1]",                  # a std in [-1, 1] units; 0 = off
    "lowres": ANY,                          # check_args: a file; run_lowres: an image
    "truncation_sweep": "[2, inf)", "z_interpolate": "[2, inf)",  # columns, both ends
    "arithmetic": ANY, "analogies": ANY,    # argparse's choices
    "figure": ANY,                          # check_figure
}


def mode_of(args):
    for name in ("style_mix", "interpolate", "prompt_mix", *LATENT_MODES):
        if getattr(args, name) is not None:
            return name
    return "eval" if args.eval else "samples"


def read_prompts(args):
    """--prompt values, then the lines of --prompts FILE; every one non-empty."""
    prompts = list(args.prompt)
    if args.prompts is not None:
        if not os.path.isfile(args.prompts):
            raise UsageError(f"--prompts {args.prompts}: no such file (one prompt per line)")
        with open(args.prompts, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        if not lines:
            raise UsageError(f"--prompts {args.prompts} holds no prompts (one per line; blank lines are skipped)")
        prompts += lines
    if any(not p.strip() for p in prompts):
        raise UsageError("empty --prompt: give some text, e.g. --prompt \"a small red circle on a blue background\"")
    return prompts


def check_args(args, mode, prompts):
    """Everything that can be checked before loading a model."""
    if args.noise_aug is not None and args.upsampler is None:
        raise UsageError("--noise-aug is the upsampler's input noise: give --upsampler UP too")
    if args.lowres is not None:
        if args.upsampler is None:
            raise UsageError("--lowres IMAGE needs --upsampler UP: a run of train.py --stage upsampler")
        if args.ckpt is not None:
            raise UsageError("--lowres upsamples an existing image: drop --ckpt (or drop --lowres to "
                             "upsample the base model's images)")
        if mode != "samples":
            raise UsageError(f"--lowres does not combine with --{mode.replace('_', '-')}")
        if len(prompts) > 1:
            raise UsageError(f"--lowres takes at most one prompt (none: the empty prompt), got {len(prompts)}")
        if not os.path.isfile(args.lowres):
            raise UsageError(f"--lowres {args.lowres}: no such file")
        prompts = [""]  # the count check below is met: the prompt is optional here
    elif args.upsampler is not None and mode != "samples":
        raise UsageError(f"--upsampler works with plain sampling, not --{mode.replace('_', '-')}")
    if args.beside_data:
        if mode != "samples" or args.lowres is not None or args.upsampler is not None:
            raise UsageError("--beside-data puts the data's draws beside plain samples: drop the other mode flags")
        unparsed = [p for p in prompts if None in data.parse_shapes_caption(p).values()]
        if unparsed:
            raise UsageError(f"--beside-data draws the shapes data of a caption, and {unparsed[0]!r} does not name "
                             "all five attributes (shape, colour, background, size, position)")
        args.grid = True
    if args.ckpt is None and args.lowres is None:
        raise UsageError("--ckpt is required: a run directory of train.py, e.g. --ckpt runs/tiny"
                         + (" (--upsampler upsamples its images; or give --lowres IMAGE)" if args.upsampler else ""))
    need = {"samples": "at least one prompt", "style_mix": "exactly one prompt", "interpolate": "at least two prompts",
            "prompt_mix": "exactly two prompts", "eval": "no prompt", **{m: n for m, (n, _) in LATENT_MODES.items()}}[mode]
    ok = {"samples": len(prompts) >= 1, "style_mix": len(prompts) == 1, "interpolate": len(prompts) >= 2,
          "prompt_mix": len(prompts) == 2, "eval": not prompts, **{m: f(len(prompts)) for m, (_, f) in
                                                                   LATENT_MODES.items()}}[mode]
    if not ok:
        what = ("--eval uses the data set's captions" if mode == "eval" else "--analogies draws its own captions"
                if mode == "analogies" else "give them with --prompt or --prompts FILE")
        raise UsageError(f"{'--' + mode.replace('_', '-') if mode != 'samples' else 'sampling'} needs {need}"
                         f", got {len(prompts)}: {what}")
    if mode == "eval" and args.n is not None and args.n < 2:
        raise UsageError(f"--n {args.n}: must be >= 2 with --eval (a Frechet distance needs two images)")
    if args.out is not None and os.path.isfile(args.out):
        raise UsageError(f"--out {args.out} is a file: give a directory")
    out = args.out if args.out is not None else default_out(args, mode)
    if out is not None and writable_error(out, "--out"):  # FILE/sub, a read-only parent, /proc/x
        raise UsageError(writable_error(out, "--out") + ("" if args.out is not None else " (give --out)"))
    if args.out is not None:
        earlier_outputs(args.out)  # refuses a folder sample.py did not write, before any model is loaded
    if args.seed is not None and args.n is not None:  # with a default left, again once it is known
        check_seeds(args.seed, args.n, mode)
    if args.fid is not None and mode != "eval":
        raise UsageError(f"--{'no-' * (not args.fid)}fid is part of --eval: add --eval, or drop it")


# Modes of the latent-space tools: the prompts each needs (check_args).
LATENT_MODES = {
    "truncation_sweep": ("at least one prompt", lambda n: n >= 1),
    "z_interpolate": ("at least one prompt", lambda n: n >= 1),
    "arithmetic": ("three prompts A B C (A - B + C), or four (D: what it should draw)", lambda n: n in (3, 4)),
    "analogies": ("no prompt", lambda n: n == 0),
}


def truncation_target(text):
    """--truncation-target: a name of generator.TRUNCATION_TARGETS, else a number (the global share)."""
    return text if text in generator.TRUNCATION_TARGETS else float(text)


def check_figure(args):
    """--figure PNG: a .png file whose folder exists; it implies --grid (plain sampling, --eval)."""
    if args.figure is None:
        return
    if not args.figure.endswith(".png") or os.path.isdir(args.figure):
        raise UsageError(f"--figure {args.figure}: give a .png file name, e.g. assets/style_mix.png")
    folder = os.path.dirname(args.figure) or "."
    if not os.path.isdir(folder):
        raise UsageError(f"--figure {args.figure}: no folder {folder}")
    args.grid = True                                                          # a figure is the grid


def save_figure(grid, path, ncol, scale=3):
    """--figure: the grid for a page, each tile `scale` times larger (nearest: the pixels stay
    visible) with 2 white pixels between tiles. grid (M, 3, R, R) in [-1, 1]."""
    import torchvision
    big = torch.nn.functional.interpolate(grid.float().cpu(), scale_factor=scale, mode="nearest")  # (M, 3, sR, sR)
    torchvision.utils.save_image(big.clamp(-1, 1) * 0.5 + 0.5, path, nrow=ncol, padding=2, pad_value=1.0)


def write_analogies(out, scores, args, ckpt):
    """analogies.json, and the judge's accuracy per space as a table on stdout."""
    print(f"{'space':<26} all five  carried  rest   ({args.n} analogies; carried: the attribute a - b carries)")
    for space, acc in scores.items():
        by_attribute = " ".join(f"{x} {v:.2f}" for x, v in acc["carried_by_attribute"].items())
        residual = (f"; |code - d's| / |c's - d's|: w {acc['code_residual']['w']:.2f}, t_local "
                    f"{acc['code_residual']['t_local']:.2f}") if "code_residual" in acc else ""
        print(f"{space:<26} {acc['all']:8.3f} {acc['carried']:8.3f} {acc['rest']:6.3f}   carried: {by_attribute}"
              + residual)
    with open(os.path.join(out, "analogies.json"), "w") as f:
        json.dump({"accuracy": scores, "n": args.n, "seed": args.seed, "truncation": args.truncation,
                   "step": ckpt.get("step")}, f, indent=2)


def default_out(args, mode):
    """Where the outputs go without --out (see the module docstring); None when the run is not
    found (loading it says so)."""
    try:
        if args.lowres is not None:
            return os.path.join(os.path.dirname(resolve_checkpoint(args.upsampler)), "upsampled")
        return os.path.join(os.path.dirname(resolve_checkpoint(args.ckpt)), mode)
    except FileNotFoundError:
        return None


def check_seeds(seed, n, mode):
    """Every seed recorded in captions.jsonl must be one --seed accepts: seeds seed .. seed + count - 1
    (count: n, 2n with --style-mix) stay <= SEED_MAX, else one line (refused, not wrapped)."""
    count = n * (2 if mode == "style_mix" else 1)
    if seed + count - 1 > SEED_MAX:
        raise UsageError(f"--seed {seed} with {count} seeds would use seeds up to {seed + count - 1}, past "
                         f"{SEED_MAX} (the largest --seed): use --seed {max(SEED_MAX - count + 1, 0)} or less")


def pick_device(name):
    """--device (already one of auto | cpu | cuda | cuda:N) -> the device to use."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is visible; use --device cpu")
    return name


def typed_words(prompt):
    """The words of a prompt as typed: split at white space, punctuation stripped at their ends."""
    return [w.strip(string.punctuation) for w in prompt.split() if w.strip(string.punctuation)]


def known_word(word, known):
    """A typed word means something to a tiny CLIP when it is plain ASCII and every lower-case
    letter run in it (data.words: 'don't' -> don, t) is in `known`; 'émoji', '日本語', '🐶' never are."""
    return word.isascii() and all(w in known for w in data.words(word))


def warn_unknown_words(ckpt, prompts):
    """A tiny CLIP (and G's text encoder) learned the words of the run's training captions only:
    warn once, on stderr, naming the words of the prompts that were never among them (they carry
    no meaning here). Only for tiny CLIPs and data whose captions can be listed (not shards)."""
    if not ckpt["clip"].startswith("tiny:"):
        return
    spec = ckpt["config"]["train"]["data"]
    try:
        known = data.caption_words(spec)
    except (OSError, ValueError):
        return
    if known is None:
        return
    unknown = list(dict.fromkeys(w for p in prompts for w in typed_words(p) if not known_word(w, known)))
    if unknown:
        print(f"sample.py: warning: the run's tiny CLIP never saw {', '.join(map(repr, unknown))} in its training "
              f"captions (--data {spec}): such words carry no meaning to it", file=sys.stderr)


def check_row(G, row, flag):
    """A crossover row must leave layers on both sides; the error lists the rows."""
    if not 1 <= row < G.num_ws:
        names = ", ".join(f"{k} {n}" for k, n in enumerate(G.synthesis.w_names) if k > 0)
        raise UsageError(f"{flag} {row}: choose a row of ws in 1..{G.num_ws - 1}, the first fine layer: {names}")


def eval_data_spec(args, ckpt):
    """--eval's real images: --data, else the run's own --data."""
    return args.data or ckpt["config"]["train"]["data"]


def run_eval(G, clip, args, ckpt):
    """Generate for n real captions, score; also returns the images like the other modes.
    With --fid the Inception statistics of the n real images are read from their cache (next to
    the data; the run directory for shapes), or computed once and stored there."""
    train_cfg = ckpt["config"]["train"]
    spec = eval_data_spec(args, ckpt)
    try:
        dataset = data.build_dataset(spec, G.cfg.resolution, seed=train_cfg["seed"])
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"{err} (pass the real images with --data)") from err
    fid = None
    if args.fid:
        try:  # the weights first: offline, one line in about a second
            metrics.inception_weights("--no-fid")
            fid = metrics.prepare_fid(dataset, spec, os.path.dirname(resolve_checkpoint(args.ckpt)), args.n,
                                      args.seed, next(G.parameters()).device, flag="--no-fid")
        except metrics.FIDUnavailable as err:
            raise UsageError(str(err)) from err
        print(f"Inception FID against {counted(fid.n_real, 'real image')} of {spec}")
    reals, captions = eval_pairs(dataset, args.n, args.seed)
    seeds = [args.seed + i for i in range(len(captions))]
    fakes = generate(G, clip, captions, seeds, args.truncation, args.batch, args.truncation_target)
    scores = eval_metrics(clip, fakes, reals, captions, shapes=spec == "shapes", fid=fid)
    if spec == "shapes":
        scores.update(spread_metrics(G, clip, captions, args.seed, args.truncation, args.batch))
    rows = [{"caption": c, "seed": s} for c, s in zip(captions, seeds)]
    return fakes, rows, scores, spec


def comparison_rows(lowres, upsampled):
    """One row per upsampled image: nearest-upscaled input | bicubic | the upsampler's output,
    every panel at the output size. lowres (1, 3, r, r), upsampled (n, 3, R, R) -> (3n, 3, R, R)."""
    n, R = upsampled.shape[0], upsampled.shape[-1]
    nearest = torch.nn.functional.interpolate(lowres, size=(R, R), mode="nearest")  # (1, 3, R, R) the pixels
    bicubic = upsampler.resize(lowres, R).clamp(-1, 1)                               # (1, 3, R, R) the baseline
    return torch.cat([torch.cat([nearest, bicubic, upsampled[k:k + 1]]) for k in range(n)])


def run_lowres(args, prompts, device):
    """--upsampler UP --lowres IMAGE: load, crop, resize to r, upsample --n times; write the PNGs,
    captions.jsonl, lowres.png and comparison.png."""
    try:
        U, clip, ckpt = load_upsampler(args.upsampler, device)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise UsageError(str(err).splitlines()[0]) from err
    r, R = U.cfg.in_resolution, U.cfg.out_resolution
    try:
        with Image.open(args.lowres) as img:
            size = img.size
            lowres = data.load_image(img, r)[None]                                   # (1, 3, r, r)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UsageError(f"--lowres {args.lowres}: not an image PIL can read ({type(err).__name__})") from err
    prompt = prompts[0] if prompts else ""
    n, seed = args.n or 1, args.seed or 0
    check_seeds(seed, n, "samples")
    out = args.out or os.path.join(os.path.dirname(resolve_checkpoint(args.upsampler)), "upsampled")
    print(f"--lowres {args.lowres}: {size[0]}x{size[1]}, centre-cropped to a square and resized to {r}x{r} "
          f"(the upsampler's input); upsampling x{U.cfg.factor} to {R}x{R} with prompt {prompt!r} on {device}")
    t0 = time.time()
    images = upsample(U, clip, lowres.expand(n, -1, -1, -1), [prompt] * n, [seed + k for k in range(n)],
                      args.batch, args.noise_aug).cpu()                              # (n, 3, R, R)
    print(f"{counted(n, 'image')} in {time.time() - t0:.2f} s")
    rows = [{"caption": prompt, "seed": seed + k, "lowres": args.lowres} for k in range(n)]
    write_outputs(out, images, rows)
    data.save_image_grid(lowres, os.path.join(out, "lowres.png"), ncol=1)
    data.save_image_grid(comparison_rows(lowres, images), os.path.join(out, "comparison.png"), ncol=3)
    print(f"wrote {counted(n, 'PNG')}, captions.jsonl, lowres.png, "
          f"comparison.png (nearest | bicubic | GigaGAN) to {out}")
    return out


def main(argv=None):
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"sample.py: {err}", file=sys.stderr)
        raise SystemExit(2)


def _main(argv):
    args = build_parser().parse_args(argv)
    check_values({k: v for k, v in vars(args).items() if v is not None}, SAMPLE_RULES)  # each flag's range
    mode = mode_of(args)
    prompts = read_prompts(args)
    check_args(args, mode, prompts)
    check_figure(args)
    device = pick_device(args.device)
    if args.lowres is not None:
        return run_lowres(args, prompts, device)
    try:
        G, clip, ckpt = load_generator(args.ckpt, device)
        U, u_clip = load_upsampler(args.upsampler, device)[:2] if args.upsampler else (None, None)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise UsageError(str(err).splitlines()[0]) from err
    if U is not None and U.cfg.in_resolution != G.cfg.resolution:
        raise UsageError(f"the base model makes {G.cfg.resolution} px images but the upsampler reads "
                         f"{U.cfg.in_resolution} px: pair runs of matching presets")
    run_dir = os.path.dirname(resolve_checkpoint(args.ckpt))
    out = args.out or os.path.join(run_dir, mode)
    warn_unknown_words(ckpt, prompts)
    if mode == "analogies" and ckpt["config"]["train"]["data"] != "shapes":
        raise UsageError("--analogies judges shapes images by pixels: pass a run trained on --data shapes")
    if args.n is None:
        args.n = {"style_mix": 4, "eval": ckpt["config"]["train"].get("eval_images", 128), "analogies": 64}.get(mode, 1)
    if args.seed is None:
        args.seed = EVAL_SEED if mode == "eval" else 0
    check_seeds(args.seed, args.n, mode)
    if mode == "eval" and args.fid is None:  # Inception features say little about flat shapes: alignment
        args.fid = eval_data_spec(args, ckpt) != "shapes"  # measures those
    print(f"{mode}: {ckpt['config']['train']['preset']} G_ema of {resolve_checkpoint(args.ckpt)} "
          f"(step {ckpt.get('step')}), {G.cfg.resolution} px, psi {args.truncation}, on {device}")

    t0 = time.time()
    scores, grid, ncol = None, None, 1
    if mode == "samples":
        images, rows, grid, ncol = run_plain(G, clip, args, prompts)
    elif mode == "style_mix":
        row = default_crossover(G) if args.style_mix == -1 else args.style_mix
        check_row(G, row, "--style-mix")
        images, rows, grid, ncol = run_style_mix(G, clip, args, prompts[0], row)
    elif mode == "interpolate":
        images, rows, grid, ncol = run_interpolate(G, clip, args, prompts)
    elif mode == "prompt_mix":
        check_row(G, args.prompt_mix, "--prompt-mix")
        images, rows, grid, ncol = run_prompt_mix(G, clip, args, prompts, args.prompt_mix)
    elif mode == "truncation_sweep":
        images, rows, grid, ncol = run_truncation_sweep(G, clip, args, prompts,
                                                        shapes=ckpt["config"]["train"]["data"] == "shapes")
    elif mode == "z_interpolate":
        images, rows, grid, ncol = run_z_interpolate(G, clip, args, prompts)
    elif mode == "arithmetic":
        try:
            images, rows, grid, ncol = run_arithmetic(G, clip, args, prompts)
        except ValueError as err:
            raise UsageError(str(err)) from err
    elif mode == "analogies":
        images, rows, grid, ncol, analogies = run_analogies(G, clip, args)
    else:
        images, rows, scores, spec = run_eval(G, clip, args, ckpt)
        grid, ncol = (images, min(len(images), 16)) if args.grid else (None, 1)
    if U is not None:  # the chain: each image upsampled with its own prompt and seed
        images = upsample(U, u_clip, images, [r["caption"] for r in rows], [r["seed"] for r in rows], args.batch,
                          args.noise_aug)
        grid = images if grid is not None else None
        print(f"upsampled x{U.cfg.factor} to {U.cfg.out_resolution} px by {resolve_checkpoint(args.upsampler)}")
    images = images.cpu()  # waits for the GPU: the time below is the whole generation
    seconds = time.time() - t0
    print(f"{counted(len(images), 'image')} in {seconds:.2f} s ({1000 * seconds / len(images):.1f} ms/image, "
          f"batch {args.batch})")

    write_outputs(out, images, rows, grid, ncol)
    written = [counted(len(images), "PNG"), "captions.jsonl"] + (["grid.png"] if grid is not None else [])
    if scores is not None:
        print("eval  " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump({**scores, "n": len(images), "seed": args.seed, "truncation": args.truncation,
                       "data": spec, "step": ckpt.get("step")}, f, indent=2)
        written.insert(0, "eval.json")
    if mode == "analogies":
        write_analogies(out, analogies, args, ckpt)
        written.insert(0, "analogies.json")
    if args.figure is not None and grid is not None:
        save_figure(grid, args.figure, ncol)
        print(f"wrote the grid to {args.figure}")
    print(f"wrote {', '.join(written)} to {out}")
    return out


if __name__ == "__main__":
    main()
