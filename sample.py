"""
sample.py - prompts -> images with a trained GigaGAN, the paper's sampling tricks, and metrics.

    python sample.py --ckpt runs/tiny --prompt "a large red circle on the left of a blue background"
    python sample.py --ckpt runs/tiny --prompts prompts.txt --n 4 --grid --truncation 0.7
    python sample.py --ckpt runs/tiny --style-mix --prompt "..."          # Sec. 4.4, coarse/fine styles
    python sample.py --ckpt runs/tiny --interpolate 8 --prompt A --prompt B   # prompt interpolation
    python sample.py --ckpt runs/tiny --prompt-mix 2 --prompt A --prompt B    # coarse from A, fine from B
    python sample.py --ckpt runs/tiny --eval                               # CLIP score, FD, shapes alignment

Outputs: one PNG per image and `captions.jsonl` (one {"file", "caption"} row per image) in
--out, plus `grid.png` with --grid; the last line printed says where they are.

Determinism: image k of a prompt uses z drawn from seed + k, whatever the batch it is made in,
and constant noise, so the same (prompt, seed) gives the same image on every call.
"""
import argparse
import importlib
import json
import os
import sys

import torch

import data

clip_lib = importlib.import_module("00_clip")
generator = importlib.import_module("03_generator")

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


def load_generator(path, device="cpu"):
    """-> (G_ema in eval mode, the frozen CLIP it was trained with, the checkpoint dict)."""
    path = resolve_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    g_cfg = generator.GeneratorConfig(**ckpt["config"]["G"])
    clip = clip_lib.load_clip(resolve_clip_spec(ckpt["clip"], os.path.dirname(path)), device=device)
    G = generator.Generator(g_cfg, text_dim=clip.text_width)
    G.load_state_dict(ckpt["G_ema"])
    return G.to(device).eval().requires_grad_(False), clip, ckpt


def seeded_z(seeds, z_dim, device):
    """z for each seed, drawn from its own generator: (len(seeds), z_dim)."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


@torch.no_grad()
def generate(G, clip, prompts, seeds, truncation_psi=1.0, batch=32):
    """One image per (prompt, seed) pair -> (N, 3, R, R) in [-1, 1], on G's device."""
    device = next(G.parameters()).device
    out = []
    for i in range(0, len(prompts), batch):
        tokens, mask, eot = clip.text_features(prompts[i:i + batch])
        z = seeded_z(seeds[i:i + batch], G.cfg.z_dim, device)
        pyramid = G(z, tokens, mask, eot, truncation_psi=truncation_psi, noise_mode="const")
        out.append(pyramid[0].clamp(-1, 1))  # the finest level is the image
    return torch.cat(out)


# -----------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def clip_score(clip, images, captions):
    """Mean cosine similarity between CLIP image and caption embeddings (Hessel et al. 2021,
    without their 2.5 * max(., 0) rescaling; the paper reports it this way, e.g. 0.307)."""
    return (clip.embed_image(images) * clip.embed_text(captions)).sum(-1).mean().item()


def frechet_distance(feats_a, feats_b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}) of two (N, E) feature sets.

    tr((S_a S_b)^{1/2}) = sum of sqrt(eigenvalues of S_a^{1/2} S_b S_a^{1/2}), a symmetric
    PSD matrix, so two symmetric eigendecompositions in float64 replace scipy's sqrtm."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)                   # (E, E)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T   # S_a^{1/2}
    middle = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * middle).item()


@torch.no_grad()
def clip_frechet_distance(clip, fake, real, batch=64):
    """Frechet distance between CLIP image embeddings of generated and real images
    (a fast, offline stand-in for Inception FID; same formula, other features)."""
    embed = lambda x: torch.cat([clip.embed_image(x[i:i + batch]) for i in range(0, len(x), batch)])
    return frechet_distance(embed(fake), embed(real))


SHAPES_ATTRIBUTES = ("shape", "color", "background", "size", "position")


@torch.no_grad()
def shapes_alignment(G, clip, n=128, seed=12345, truncation_psi=1.0):
    """For the shapes toy data: generate one image for each of n fresh prompts and judge it by
    pixel geometry (data.judge_shapes_image) -> accuracy per attribute, and the mean."""
    ds = data.ShapesDataset(G.cfg.resolution, seed=seed, length=n)
    prompts = [ds[i][1] for i in range(n)]
    truth = [data.parse_shapes_caption(p) for p in prompts]
    images = generate(G, clip, prompts, seeds=[seed + i for i in range(n)], truncation_psi=truncation_psi)
    judged = data.judge_shapes_image(images.cpu())
    acc = {a: sum(j[a] == t[a] for j, t in zip(judged, truth)) / n for a in SHAPES_ATTRIBUTES}
    acc["mean"] = sum(acc.values()) / len(SHAPES_ATTRIBUTES)
    return acc


@torch.no_grad()
def evaluate(G, clip, dataset, n=128, seed=12345, shapes=False):
    """The metrics train.py logs: CLIP score, CLIP-feature FD against real images, and
    for the shapes data the per-attribute alignment."""
    device = next(G.parameters()).device
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist() if len(dataset) < 10**8 else list(range(n))
    reals, captions = zip(*(dataset[i] for i in idx))
    reals = torch.stack(reals).to(device)
    fakes = generate(G, clip, list(captions), seeds=[seed + i for i in range(len(idx))])
    out = {"clip_score": clip_score(clip, fakes, list(captions)),
           "clip_score_real": clip_score(clip, reals, list(captions)),
           "clip_fd": clip_frechet_distance(clip, fakes, reals)}
    if shapes:
        out.update({f"align_{k}": v for k, v in shapes_alignment(G, clip, n, seed).items()})
    return out
