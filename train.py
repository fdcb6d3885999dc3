"""
train.py - the training loop of GigaGAN's text-to-image model, written out step by step.

    python train.py                                  # a tiny CLIP, then a tiny text-to-image GAN on `shapes` (CPU, ~20 minutes)
    python train.py --stage clip --out runs/clip     # only the tiny CLIP -> runs/clip/clip.pt
    python train.py --preset small --device cuda     # 64 px on one GPU, OpenAI's ViT-B/32 CLIP (downloads once)
    torchrun --nproc_per_node=8 train.py --full --data 'shards/{00000..09999}.tar'
    python train.py --full --dry-run                 # parameter counts, memory estimate, launch line, no training
    python train.py --preset small --dry-run --gpu-memory 12   # the --batch-gpu that fits a 12 GB GPU
    python train.py --stage upsampler                # tiny 32 -> 128 upsampler on `shapes` (train_upsampler.py)
    python train.py --stage upsampler --full --lpips vgg --data 'shards/{00000..09999}.tar'   # 64 -> 512

One optimisation step (Sec. 3.3 and the Appendix of the paper), written out in train() below:
    D step (adversarial + matching-aware + vision-aided, 05's discriminator_loss)
    -> lazy R1 every r1_interval steps -> G step (adversarial + matching-aware + CLIP +
    vision-aided, 05's generator_loss) -> EMA of G -> logs, snapshots, evaluation, checkpoint.
The upsampler stage (Sec. 3.4) has its own loop in train_upsampler.py; it calls this file's D
step, EMA and optimisers, and rundir.py's checkpoint, log and stop functions.
Shapes: b micro-batch (--batch-gpu), R image side, L text tokens, D text width, E CLIP embedding width.

Flags: `python train.py --help` lists them, with the values `python train.py` runs with (config.py:
the dataclass defaults are the default run; presets change a few; each value's rule sits beside
its field). Every flag is checked before any CLIP is trained, any file written or any model built.
Checkpoints, logs, snapshots and how a run stops: rundir.py. Devices, processes, seeds, the data
order and micro-batches: runtime.py. `--dry-run`: dry_run.py.
"""
import contextlib
import copy
import importlib
import os
import sys
import time

import torch
import torch.distributed as dist

import data
import metrics
from config import VISION_CLIP, FlagError, check_models, clip_spec, data_error, parse_flags, print_help, vision_clip_spec
from dry_run import dry_run
from rundir import (Clock, StopRequest, check_finite, check_run_dir, clear_run_dir, exit_interrupted, finish,
                    guard_nonfinite, log_eval_row, log_step, open_resume, out_of_time, progress_bar, resume, save_run,
                    save_snapshot, snapshot_prompts, start_run_dir)
from runtime import MicroBuffers, Runtime, make_batches, micro_batches, reduce_grads, seed_for, setup_runtime, sync_buffers

clip_lib = importlib.import_module("00_clip")
kernels = importlib.import_module("01_kernel_selection")
attention = importlib.import_module("02_attention")
generator = importlib.import_module("03_generator")
discriminator = importlib.import_module("04_discriminator")
losses = importlib.import_module("05_losses")

# -----------------------------------------------------------------------------
# The loop


def train(cfg, g_cfg, d_cfg, loss_cfg, rt, dataset, ckpt=None, timer=None):
    """Train G (03's GeneratorConfig g_cfg) and D on `dataset`; ckpt: a checkpoint to continue
    (open_resume) or None. timer: bench.py's `timer(label)` context, around each part of a step."""
    timer = timer or contextlib.nullcontext
    device = rt.device
    clip, vclip = frozen_clips(cfg, rt, dataset, g_cfg.resolution, vision=loss_cfg.vision_weight > 0)
    start_run_dir(cfg, rt, g_cfg, d_cfg, loss_cfg)

    # ---- models and optimisers (seeded: every process starts from the same weights)
    torch.manual_seed(cfg.seed)
    G = generator.Generator(g_cfg, text_dim=clip.text_width).to(device)
    D = discriminator.Discriminator(d_cfg, text_dim=clip.text_width).to(device)
    VD = None  # the vision-aided D: trainable heads on the frozen CLIP's image features
    if loss_cfg.vision_weight > 0:
        VD = discriminator.VisionAidedDiscriminator(vclip.feature_channels, vclip.embed_dim, hidden=d_cfg.vision_hidden,
                                                    psi_layers=d_cfg.vision_psi_layers).to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)     # the weights we sample from
    d_modules = [m for m in (D, VD) if m is not None]
    opt_G, opt_D = optimisers(cfg, G, d_modules)
    # compiled forwards for the D and G steps (R1 keeps the eager D: torch.compile's backward
    # does not take a gradient of a gradient)
    G_fwd, D_fwd = (torch.compile(G), torch.compile(D)) if cfg.compile else (G, D)
    parts = dict(G=G, G_ema=G_ema, D=D, VD=VD, opt_G=opt_G, opt_D=opt_D)  # what a checkpoint holds
    step, nimg = resume(cfg, rt, ckpt, parts)
    vspec = vision_clip_spec(cfg) if VD is not None else None  # None: --clip's CLIP serves the vision-aided D too
    if rt.main:
        print(f"G {count(G) / 1e6:.2f}M params, D {count(D) / 1e6:.2f}M, vision-aided D "
              f"{count(VD) / 1e6 if VD is not None else 0:.2f}M{f' on CLIP {vspec}' if vspec else ''}, "
              f"CLIP {clip_spec(cfg)} (text width {clip.text_width}), {rt.world} process(es) on {device}")

    batch_gpu, micros = micro_batches(cfg, rt)
    batches = make_batches(dataset, cfg, rt, batch_gpu, micros, step)   # (images, captions) per micro-batch
    w_avgs = MicroBuffers(G)               # w_avg: one chain per micro-batch, their mean per step
    stats = {}                             # every loss term's values since the last log line

    def captions_of(captions):
        """losses.Captions of a micro-batch, from the caches of CLIP's text features. The wrong
        captions c^ of Eq. 8 are the batch's own, shuffled so that no row keeps its caption."""
        perm, valid = losses.mismatched_permutation(captions, return_valid=True)
        wrong = [captions[j] for j in perm.tolist()]
        text, embed = clip.text_features(captions), clip.embed_text(captions)  # (b, L, D) (b, L) (b,); (b, E)
        vision = None
        if VD is not None:  # the vision-aided D reads its own CLIP's embeddings (one CLIP may serve both)
            v = (embed, clip.embed_text(wrong)) if vclip is clip else (vclip.embed_text(captions), vclip.embed_text(wrong))
            vision = losses.VisionAided(VD, vclip, *v)
        return losses.Captions(text, losses.permute_text(text, perm), valid.to(device), embed,
                               losses.caption_ids(captions).to(device), vision)

    def generate(micro, caps):
        """G(z, c) of a micro-batch, z drawn from the step's seed: a pyramid, finest first."""
        z = torch.randn(caps.text[0].shape[0], g_cfg.z_dim, device=device)
        w_avgs.enter(micro)
        with rt.autocast():
            fakes = G_fwd(z, *caps.text)                              # [(b, 3, R, R), ..., (b, 3, 4, 4)]
        w_avgs.leave(micro)
        return fakes

    def checkpoint():
        save_run(cfg, step, nimg, parts, config={"train": cfg, "G": g_cfg, "D": d_cfg, "loss": loss_cfg},
                 clips={"clip": clip_spec(cfg), "vision_clip": vspec or clip_spec(cfg)})

    snap_prompts = snapshot_prompts(dataset)       # fixed prompts and z for the snapshots
    snap_z = torch.randn(4, g_cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    fid = None  # --eval-fid: Inception FID at each eval, its reference statistics once (cached next to the data)
    if rt.main and cfg.eval_fid and cfg.eval_every:
        fid = metrics.prepare_fid(dataset, cfg.data, cfg.out, cfg.eval_images, device=device, flag="--eval-fid false")

    with StopRequest() as stop, progress_bar(cfg, rt, step) as bar, guard_nonfinite(cfg, rt):
        clock = Clock()
        while step < cfg.max_steps:
            with timer("data"):  # the micro-batches of this step: the same images and captions serve D and G
                work = []
                for micro in micros:
                    images, captions = next(batches)
                    work.append((micro, images.to(device, non_blocking=True), list(captions)))  # (b, 3, R, R), b captions

            # ---- D step: real images with their own captions are real; generated images, and
            # real images with a wrong caption (matching-aware, Eq. 8), are fake. Then lazy R1.
            with timer("D step"):
                G.requires_grad_(False)
                d_step(D, opt_D, work, captions_of, generate, cfg, loss_cfg, rt, step, stats, VD=VD, D_fwd=D_fwd)

            # ---- G step: fool D with the right caption (adversarial), be recognisably *this*
            # caption's image (matching-aware), match it in CLIP space (Eq. 9), fool the vision-aided D.
            with timer("G step"):
                G.requires_grad_(True)
                for m in d_modules:
                    m.requires_grad_(False)
                opt_G.zero_grad(set_to_none=True)
                for micro, reals, captions in work:
                    seed_for(cfg, step, micro, phase=1)
                    caps = captions_of(captions)
                    fakes = generate(micro, caps)
                    with rt.autocast():
                        loss, logs = losses.generator_loss(D_fwd, fakes, caps, loss_cfg, clip=clip)
                    backward(loss * len(captions) / cfg.batch_size, "G", step, logs, stats)  # its share, as in d_step
                reduce_grads([G], rt)
                opt_G.step()
                w_avgs.merge()
                sync_buffers([G], rt)

            # ---- EMA of G
            with timer("EMA"):
                step, nimg = step + 1, nimg + cfg.batch_size
                update_ema(G_ema, G, cfg, nimg)
            # ---- logs, snapshots, evaluation, checkpoints (rank 0); a Ctrl-C saves and exits
            last = step == cfg.max_steps or out_of_time(cfg, rt)  # --max-minutes ends a run early
            log_step(cfg, rt, step, nimg, last, stats, clock, bar)
            with clock.paused():                                  # not training time: left out of img/s
                if rt.main and (step % cfg.snapshot_every == 0 or last):
                    save_snapshot(cfg, G_ema, clip, snap_prompts, snap_z, step)
                if rt.main and cfg.eval_every and (step % cfg.eval_every == 0 or last):
                    bar.set_postfix_str("evaluating")
                    log_eval_row(cfg, step, sample_lib().evaluate(G_ema, clip, dataset, n=cfg.eval_images,
                                                                  shapes=cfg.data == "shapes", fid=fid))
                    bar.set_postfix_str("")
                if rt.main and (step % cfg.ckpt_every == 0 or last):
                    checkpoint()
            if stop.agreed(rt):                                   # Ctrl-C / SIGTERM, after a whole step
                if rt.main:
                    checkpoint()
                exit_interrupted(rt, step, os.path.join(cfg.out, "checkpoint.pt"))
            if last:
                break
    finish(cfg, rt, step, [G, D], f"samples {cfg.out}/samples_*.png (prompts in samples_prompts.txt)")
    return G_ema


# -----------------------------------------------------------------------------
# What both loops share (this one and train_upsampler.py's): the D step, backward, EMA, pyramid, optimisers


def d_step(D, opt_D, work, captions_of, generate, cfg, loss_cfg, rt, step, stats, VD=None, D_fwd=None):
    """One D step on the step's micro-batches `work`, [(micro, reals (b, 3, R, R), captions)], then,
    every r1_interval steps, a lazy R1 step (StyleGAN2): gamma/2 * E||grad_x D(x, c)||^2 over every
    level of the real pyramid, times the interval, with its own optimiser step.
    captions_of(captions) -> losses.Captions; generate(micro, caps) -> the fakes' pyramid (G's, or
    the upsampler's from the real image made small). Each micro-batch's loss is scaled by its share
    of the global batch, so the summed gradients are the global batch's mean."""
    d_modules = [m for m in (D, VD) if m is not None]
    for m in d_modules:
        m.requires_grad_(True)
    opt_D.zero_grad(set_to_none=True)
    texts = []  # each micro-batch's caption features, for R1 below
    for micro, reals, captions in work:
        # EXERCISE: seed (phase 0), caps, fakes without a gradient, 05's discriminator_loss (autocast), scaled backward
        ### BEGIN SOLUTION
        seed_for(cfg, step, micro, phase=0)                           # before any draw: a resume redraws the same
        caps = captions_of(captions)
        with torch.no_grad():
            fakes = generate(micro, caps)                               # pyramid, finest first
        with rt.autocast():
            loss, logs = losses.discriminator_loss(D_fwd or D, image_pyramid(reals, D.cfg.levels), fakes, caps,
                                                   loss_cfg)
        backward(loss * len(captions) / cfg.batch_size, "D", step, logs, stats)
        ### END SOLUTION
        texts.append(caps.text)
    reduce_grads(d_modules, rt)
    opt_D.step()
    if loss_cfg.r1_gamma > 0 and step % loss_cfg.r1_interval == 0:    # lazy R1: the eager D
        opt_D.zero_grad(set_to_none=True)
        for (micro, reals, captions), text in zip(work, texts):
            with rt.autocast():
                loss, logs = losses.lazy_r1_loss(D, image_pyramid(reals, D.cfg.levels), text, loss_cfg)
            backward(loss * len(captions) / cfg.batch_size, "R1", step, logs, stats)
        reduce_grads([D], rt)
        opt_D.step()


def backward(loss, what, step, logs, stats):
    """loss.backward(), after checking that it is finite; its logged terms join `stats`."""
    check_finite(loss, what, step)
    loss.backward()
    for k, v in logs.items():
        stats.setdefault(k, []).append(float(v))


@torch.no_grad()
def update_ema(G_ema, G, cfg, nimg, rampup=0.05):
    """G_ema <- beta G_ema + (1 - beta) G with a half-life of ema_kimg thousand images, at most
    `rampup` times the images seen so far (StyleGAN2's ramp-up; project's choice, the paper gives
    none); buffers such as w_avg are copied."""
    half_life = min(cfg.ema_kimg * 1000, nimg * rampup) if rampup > 0 else cfg.ema_kimg * 1000
    beta = 0.5 ** (cfg.batch_size / max(half_life, 1e-8))  # beta^(half_life / batch) = 1/2
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.lerp_(p.detach(), 1 - beta)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)
    return beta


def image_pyramid(images, levels):
    """Real images -> the pyramid D sees, finest first: repeated anti-aliased 2x downsampling."""
    pyramid = [images]                                                   # (b, 3, R, R)
    for i in range(1, levels):
        pyramid.append(kernels.downsample2x(pyramid[-1]))                 # (b, 3, R/2^i, R/2^i)
    return pyramid


def optimisers(cfg, G, d_modules):
    """AdamW for G and for D (with the vision-aided D), the paper's betas (0, 0.99); weight
    decay 0.01 on attention weights only (paper), 0 elsewhere."""
    opt_G = torch.optim.AdamW(attention.attention_param_groups(G), lr=cfg.lr, betas=BETAS)
    opt_D = torch.optim.AdamW([g for m in d_modules for g in attention.attention_param_groups(m)], lr=cfg.lr,
                              betas=BETAS)
    return opt_G, opt_D


BETAS = (0.0, 0.99)  # Adam's (beta1, beta2), the paper's for G and D


def count(module):
    return sum(p.numel() for p in module.parameters())


def sample_lib():
    """sample.py (the evaluation metrics), imported when first needed."""
    return importlib.import_module("sample")


# -----------------------------------------------------------------------------
# The frozen CLIPs


def frozen_clips(cfg, rt, dataset, resolution, vision, images=True):
    """The run's frozen CLIPs -> (clip, vclip): --clip's, and the vision-aided D's when `vision` (the
    same object when one serves both). With --clip tiny their files are trained first when missing,
    on `dataset` at `resolution` px (<out>/clip.pt, and <out>/vision_clip.pt: see vision_clip_spec).
    images: the run reads CLIP's image tower (the CLIP loss, the vision-aided D), cast once to bf16."""
    spec = clip_spec(cfg)
    if cfg.clip == "tiny":
        train_clip_stage(cfg, resolution, rt, dataset, vision=vision, only_missing=True)  # cached
    elif spec.startswith("tiny:") and not os.path.isfile(spec[5:]):
        raise FileNotFoundError(f"no tiny CLIP at {spec[5:]}: train one with python train.py --stage clip")
    clip = clip_lib.load_clip(spec, device=rt.device)              # frozen, never saved in checkpoints
    vspec = vision_clip_spec(cfg) if vision else None
    vclip = clip if vspec is None else clip_lib.load_clip(vspec, device=rt.device)
    if cfg.dtype == "bfloat16" and images:  # frozen image towers: cast once, not at every pass
        clip.image_tower_to(torch.bfloat16)
        vclip.image_tower_to(torch.bfloat16)
    return clip, vclip


def train_clip_stage(cfg, resolution, rt, dataset, vision=True, only_missing=False):
    """Train the run's tiny CLIPs on the training data at `resolution` px (rank 0 only; the others
    wait): <out>/clip.pt with the --clip-tower image tower and, when `vision` and --vision-clip auto
    asks for it (vision_clip_spec), its ResNet-tower sibling <out>/vision_clip.pt.
    only_missing: skip a file that is already there (the cache of `--clip tiny`). -> clip.pt's path."""
    path, sibling = os.path.join(cfg.out, "clip.pt"), os.path.join(cfg.out, VISION_CLIP)
    jobs = [(path, cfg.clip_tower)]
    if vision and vision_clip_spec(cfg) == "tiny:" + sibling:  # one rule for when the sibling exists
        jobs.append((sibling, "resnet"))
    if only_missing and os.path.isfile(path):  # the cache must hold the tower this run asks for
        cached = torch.load(path, map_location="cpu", weights_only=True).get("config", {}).get("vision", "vit")
        if cached != cfg.clip_tower:
            raise FlagError(f"{path} is a tiny CLIP with the {cached} image tower, this run asks for "
                            f"{cfg.clip_tower}: pass --clip-tower {cached} to go on with it, or another --out")
    jobs = [(p, tower) for p, tower in jobs if not (only_missing and os.path.isfile(p))]
    if rt.main:
        negatives = data.shapes_hard_negatives if cfg.data == "shapes" else None  # one-word changes
        for p, tower in jobs:
            print(f"[clip] training a tiny CLIP ({tower} image tower) for {cfg.clip_steps} steps on {cfg.data} -> {p}")
            clip_lib.train_tiny_clip(dataset, p, steps=cfg.clip_steps, batch_size=cfg.clip_batch_size,
                                     device=rt.device, resolution=resolution, seed=cfg.seed,
                                     negatives=negatives, vision=tower)
    if rt.world > 1:
        dist.barrier()
    return path


# -----------------------------------------------------------------------------
# Entry point


def main(argv=None, timer=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        return print_help(__doc__)
    rt = None
    try:  # bad input, found before or during the run, is one line and exit status 2
        # The checks, in one pass before any CLIP training, file writing or model building: every
        # flag's rule (config.py), what combines flags, G and D built on the meta device, the CLIP spec.
        cfg, g_cfg, d_cfg, loss_cfg = parse_flags(argv)
        check_models(cfg, g_cfg, d_cfg)
        clip_spec(cfg)
        if data_error(cfg.data):  # a missing --data folder, before the dry run's plan too
            raise FlagError(data_error(cfg.data))
        if cfg.dry_run:  # a plan for any machine: no device is touched, nothing is loaded or written
            # only its check: --batch-size splits into --batch-gpu micro-batches
            micro_batches(cfg, Runtime(torch.device("meta"), rank=0, world=1, autocast=None, started=time.time()))
            return dry_run(cfg, g_cfg, d_cfg, loss_cfg)
        overwritten = check_run_dir(cfg)  # --out writable, no other run's files; the files --overwrite deletes
        rt = setup_runtime(cfg)
        micro_batches(cfg, rt)
        if not cfg.data:
            raise FlagError("--data is required for this preset: an image folder or 'shards/{00000..00099}.tar'")
        if cfg.eval_fid and rt.main:  # the Inception weights first: offline, one line in about a second
            try:
                metrics.inception_weights("--eval-fid false")
            except metrics.FIDUnavailable as err:
                raise FlagError(str(err)) from None
        up = cfg.stage == "upsampler"
        try:  # the upsampler learns from real images at its OUTPUT size (made small on the fly)
            dataset = data.build_dataset(cfg.data, g_cfg.out_resolution if up else g_cfg.resolution, seed=cfg.seed)
        except (FileNotFoundError, ValueError) as err:
            raise FlagError(str(err)) from None
        clear_run_dir(cfg, overwritten, rt)  # --overwrite: the earlier run's files go, after every check passed
        ckpt = open_resume(cfg, g_cfg, d_cfg, loss_cfg)  # before any CLIP is trained or config.json rewritten
        if cfg.stage == "clip":
            start_run_dir(cfg, rt, g_cfg, d_cfg, loss_cfg)
            return train_clip_stage(cfg, g_cfg.resolution, rt, dataset)
        if up:
            return importlib.import_module("train_upsampler").train_upsampler(
                cfg, g_cfg, d_cfg, loss_cfg, rt, dataset, ckpt, timer)
        return train(cfg, g_cfg, d_cfg, loss_cfg, rt, dataset, ckpt, timer)  # writes config.json once its CLIPs load
    except (FlagError, FileNotFoundError, losses.MissingWeightsError, clip_lib.CLIPLoadError) as err:
        print(f"train.py: {err}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if rt is not None and rt.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
