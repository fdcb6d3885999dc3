"""
sample.py - prompts -> images with a trained GigaGAN, the paper's sampling tricks, and metrics.

    python sample.py --ckpt runs/tiny --prompt "a large red circle on the left of a blue background"
    python sample.py --ckpt runs/tiny --prompts prompts.txt --n 4 --grid --truncation 0.7
    python sample.py --ckpt runs/tiny --style-mix --prompt "..."          # Sec. 4.6, coarse/fine styles
    python sample.py --ckpt runs/tiny --interpolate 8 --prompt A --prompt B   # prompt interpolation
    python sample.py --ckpt runs/tiny --prompt-mix 2 --prompt A --prompt B    # coarse from A, fine from B
    python sample.py --ckpt runs/tiny --eval                               # CLIP score, FD, shapes alignment
    python sample.py --ckpt runs/small --eval --n 10000                    # + Inception FID-10k on real data
    python sample.py --ckpt runs/tiny --upsampler runs/tiny-upsampler --prompt "..."   # 32 px -> 128 px
    python sample.py --upsampler runs/tiny-upsampler --lowres photo.jpg --prompt "..." # upsample any image

--ckpt takes a run directory of train.py (its checkpoint.pt) or a checkpoint file; G_ema is
used, with the frozen CLIP the run was trained with. Modes (one at a time, else plain sampling):
    plain           --n images per prompt, image k from seed --seed + k; --grid: rows = prompts,
                    cols = seeds
    --style-mix [ROW]  one prompt; rows of ws [0, ROW) (coarse) from seeds S..S+n-1, the rest
                    (fine) from seeds S+n..S+2n-1; grid as in StyleGAN: a header row of the
                    fine-seed images, a header column of the coarse-seed ones, mixtures inside.
                    ROW defaults to the first 16 px row (coarse = 4-8 px).
    --interpolate K K frames from each prompt to the next (endpoints included): T's t_local and
                    t_global are lerped, z is kept; grid rows = seeds, cols = frames
    --prompt-mix ROW  two prompts; ws rows [0, ROW) and the cross-attention text of the blocks
                    reading them from prompt A, the rest from prompt B; grid rows = seeds,
                    cols = (A, mix, B)
    --eval          CLIP score, CLIP-feature Frechet distance against real images of the run's
                    data (or --data), Inception FID (--fid / --no-fid; default on except for
                    shapes; reference statistics cached next to the data), and per-attribute
                    alignment on the shapes data -> eval.json (metrics.py); by default the numbers
                    of train.py's eval rows (same seed 12345, same count)
Other flags: --truncation PSI in [0, 1] toward the per-prompt mean w_c (--truncation-target
global: toward the running mean w_avg), --device auto|cpu|cuda, --batch (images per pass).
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
eval), plus `grid.png` with --grid (always for --style-mix, --interpolate and --prompt-mix);
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
import re
import sys
import time
import zipfile

import torch
from PIL import Image, UnidentifiedImageError

import data
import metrics
from metrics import (EVAL_SEED, SHAPES_ATTRIBUTES, clip_score, embed_images, eval_metrics, eval_pairs,  # noqa: F401
                     frechet_distance, shapes_alignment)  # re-exported: sample.X is what train.py and tests call
from config import ANY, SEED_MAX, FlagError, FlagParser, check_values, device_rule

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
    g_cfg = generator.GeneratorConfig(**ckpt["config"]["G"])
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
    highres = highres.to(out.device)
    bicubic = upsampler.resize(lowres.to(out.device), R).clamp(-1, 1)      # (n, 3, R, R) the baseline
    mae_bicubic = (bicubic - highres).abs().mean().item()
    mae, mae_clean = ((x - highres).abs().mean().item() for x in (out, clean))
    return {"noise_aug": sigma,
            "mae": mae, "mae_ratio": mae / max(mae_bicubic, 1e-12),
            "mae_clean": mae_clean, "mae_ratio_clean": mae_clean / max(mae_bicubic, 1e-12),
            "mae_bicubic": mae_bicubic,
            "sharpness": upsampler.sharpness(out), "sharpness_clean": upsampler.sharpness(clean),
            "sharpness_bicubic": upsampler.sharpness(bicubic), "sharpness_real": upsampler.sharpness(highres)}


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
    """Image i: G's text features lerped from prompts_a[i] to prompts_b[i] by alphas[i], z from
    seeds[i]. (M, 3, R, R)

    t_local and t_global (T's outputs) are lerped, so M(z, t_global) and the cross-attention
    both see the in-between text, and truncation pulls toward the in-between prompt's mean.
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
        w = style(G, seeds[sl], t_global, psi, target)                       # (b, S)
        ws = w[:, None].expand(-1, G.num_ws, -1)                             # (b, num_ws, S)
        return G.synthesis(ws, t_local, m_a | m_b, noise_mode="const")[0].clamp(-1, 1)
    return in_batches(len(seeds), batch, make)


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
    return images, rows, (images if args.grid else None), args.n


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


def png_pixels(images):
    """(N, 3, R, R) in [-1, 1] -> (N, R, R, 3) uint8: the pixels data.save_image_grid writes for
    each image (the same rounding, so the same PNG bytes), converted in one pass for the batch."""
    return ((images.float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


OWNED = ("captions.jsonl", "grid.png", "eval.json", "lowres.png", "comparison.png")  # what sample.py writes
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
    p.add_argument("--seed", type=int, help=f"image k of a prompt uses seed + k (default 0; {EVAL_SEED} with --eval)")
    p.add_argument("--truncation", type=float, default=1.0, metavar="PSI", help="psi in [0, 1]; 1 = none")
    p.add_argument("--truncation-target", choices=("prompt", "global"), default="prompt",
                   help="truncate toward the per-prompt mean w_c (paper) or the global mean w_avg")
    p.add_argument("--out", help="output directory (default <run dir>/samples, or <run dir>/<mode>)")
    p.add_argument("--grid", action="store_true", help="also write grid.png (rows = prompts, cols = seeds)")
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
    p.add_argument("--fid", action=argparse.BooleanOptionalAction, default=None,
                   help="with --eval: Inception FID (default: on for image folders and shards, off for shapes; "
                        "the Inception weights download once, 91 MB)")
    p.add_argument("--upsampler", metavar="UP", help="an upsampler run of train.py --stage upsampler: upsample "
                                                       "the --ckpt images, or the --lowres image")
    p.add_argument("--noise-aug", type=float, default=None, metavar="SIGMA",
                   help="with --upsampler: std of Gaussian noise added to its input (in [-1, 1] units; "
                        "training used up to the run's noise_aug_sigma); default a quarter of that, 0 = off")
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
    "truncation_target": ("prompt", "global"),
    "out": ANY,                             # check_args: not a file; earlier_outputs
    "grid": ANY, "eval": ANY, "fid": ANY,
    "device": device_rule,
    "batch": "[1, inf)",
    "data": ANY,                            # run_eval: data.build_dataset
    "style_mix": ANY, "prompt_mix": ANY,    # check_row: a row of the loaded G's ws
    "interpolate": "[2, inf)",              # frames per pair, both endpoints
    "noise_aug": "[0, 1]",                  # a std in [-1, 1] units; 0 = off
    "lowres": ANY,                          # check_args: a file; run_lowres: an image
}


def mode_of(args):
    for name in ("style_mix", "interpolate", "prompt_mix"):
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
    if args.ckpt is None and args.lowres is None:
        raise UsageError("--ckpt is required: a run directory of train.py, e.g. --ckpt runs/tiny"
                         + (" (--upsampler upsamples its images; or give --lowres IMAGE)" if args.upsampler else ""))
    need = {"samples": "at least one prompt", "style_mix": "exactly one prompt", "interpolate": "at least two prompts",
            "prompt_mix": "exactly two prompts", "eval": "no prompt"}[mode]
    ok = {"samples": len(prompts) >= 1, "style_mix": len(prompts) == 1, "interpolate": len(prompts) >= 2,
          "prompt_mix": len(prompts) == 2, "eval": not prompts}[mode]
    if not ok:
        what = "--eval uses the data set's captions" if mode == "eval" else "give them with --prompt or --prompts FILE"
        raise UsageError(f"{'--' + mode.replace('_', '-') if mode != 'samples' else 'sampling'} needs {need}"
                         f", got {len(prompts)}: {what}")
    if mode == "eval" and args.n is not None and args.n < 2:
        raise UsageError(f"--n {args.n}: must be >= 2 with --eval (a Frechet distance needs two images)")
    if args.out is not None and os.path.isfile(args.out):
        raise UsageError(f"--out {args.out} is a file: give a directory")
    if args.out is not None:
        earlier_outputs(args.out)  # refuses a folder sample.py did not write, before any model is loaded
    if args.fid is not None and mode != "eval":
        raise UsageError(f"--{'no-' * (not args.fid)}fid is part of --eval: add --eval, or drop it")


def pick_device(name):
    """--device (already one of auto | cpu | cuda | cuda:N) -> the device to use."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is visible; use --device cpu")
    return name


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
    unknown = list(dict.fromkeys(w for p in prompts for w in data.words(p) if w not in known))
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
    if args.n is None:
        args.n = {"style_mix": 4, "eval": ckpt["config"]["train"].get("eval_images", 128)}.get(mode, 1)
    if args.seed is None:
        args.seed = EVAL_SEED if mode == "eval" else 0
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
    print(f"wrote {', '.join(written)} to {out}")
    return out


if __name__ == "__main__":
    main()
