"""
train.py - one flat, readable training loop for every stage of GigaGAN.

    python train.py                                  # a tiny CLIP, then a tiny text-to-image GAN on `shapes` (CPU, ~20 minutes)
    python train.py --stage clip --out runs/clip     # only the tiny CLIP -> runs/clip/clip.pt
    python train.py --preset small --device cuda     # 64 px on one GPU, OpenAI's ViT-B/32 CLIP (downloads once)
    torchrun --nproc_per_node=8 train.py --full --data 'shards/{00000..09999}.tar'
    python train.py --full --dry-run                 # parameter counts, memory estimate, launch line, no training
    python train.py --preset small --dry-run --gpu-memory 12   # the --batch-gpu that fits a 12 GB GPU
    python train.py --stage upsampler                # tiny 32 -> 128 upsampler on `shapes` -> runs/tiny-upsampler
    python train.py --stage upsampler --full --lpips vgg --data 'shards/{00000..09999}.tar'   # 64 -> 512

Flags are `--key value` or `--key=value` for every field of TrainConfig (config.py); fields of the
generator, discriminator and loss configs are `--g.FIELD`, `--d.FIELD`, `--loss.FIELD`
(e.g. `--g.self-attention false`, `--loss.clip_weight 0`), of the upsampler `--u.FIELD` (with
--stage upsampler, where --d.* and --loss.* configure its D and losses). Unknown flags are an error.
Every flag is checked (its range beside its field in config.py, then what combines flags, then G and D
built on the meta device) before any CLIP is trained, any file written or any model built.
Checkpoints, logs, snapshots and how a run stops: rundir.py. `--dry-run`: dry_run.py.

The order of one optimisation step, written out below (Sec. 3 and Appendix of the paper):
    D step (adversarial + matching-aware + vision-aided) -> lazy R1 every r1_interval steps
    -> G step (adversarial + matching-aware + CLIP + vision-aided) -> EMA of G
    -> logs, snapshots, evaluation, checkpoint.
(--loss.mode-seeking-weight W > 0 adds MSGAN's diversity term to the G step, ours, not the paper's:
its rows P..2P-1 then take the captions of rows 0..P-1, so each caption is drawn with two z.)
The upsampler stage (06_upsampler.py, paper Sec. 3.4) runs the same loop with U(make_lowres(real))
in place of G(z), the same MS-I/O D on its output pyramid, no vision-aided D, and LPIPS to the
real high-res image in the G step (--lpips vgg | alex | random, weight --loss.lpips-weight).
Its first --warmup-steps steps (tiny: 1300; not in the paper) are a reconstruction warm-up:
U alone on pixel MSE, with its own Adam and no random detail, as ESRGAN pretrains its generator;
its input already carries the noise augmentation that inference adds (06's augment_lowres).

The frozen CLIPs: --clip gives the text features and the CLIP loss; --vision-clip the backbone of the
vision-aided D (auto: the --clip model, except that a tiny CLIP with a ViT image tower, --clip-tower
vit, gets a tiny ResNet-tower sibling `vision_clip.pt`, which reads shape; see vision_clip_spec;
`same`: always the --clip model). With --clip tiny they are trained first (the tiny default: one
CLIP with a ResNet image tower, which serves both roles; --clip-tower auto | vit | resnet, where auto
is resnet for the base stage at a multiple of 32 px and vit otherwise; --help shows it resolved).

Determinism and multi-GPU (one process with gradient accumulation, N processes and a resumed run
see the same numbers): runtime.py.
"""
import dataclasses
import functools
import importlib
import os
import sys
import time
import typing

import torch
import torch.distributed as dist

import data
import metrics
# config.py: TrainConfig, the presets and flags; rundir.py: checkpoints, logs, snapshots, stopping
from config import (HARD_ATTRIBUTES, UPSAMPLER_TRAIN_PRESETS, VISION_CLIP, FlagError, TrainConfig,  # noqa: F401
                    check_mode_seeking, check_models, check_pack, clip_spec, data_error, parse_flags, print_help,
                    vision_clip_spec)
from rundir import (NonFiniteLoss, StopRequest, budget_note, check_finite, check_run_dir, clear_run_dir,
                    exit_interrupted, exit_nonfinite, log_eval_row, log_train_row, mean_stats, open_resume,
                    out_of_time, plot_losses, progress_bar, save_checkpoint, save_snapshot, save_upsampler_snapshot,
                    say, snapshot_prompts, stored_clip_spec, trim_log, write_config)
from dry_run import dry_run
# runtime.py: devices, processes, seeds, the data order, micro-batches and their buffers
from runtime import (MicroBuffers, Runtime, check_in_sync, make_batches, micro_batches, reduce_grads,  # noqa: F401
                     seed_for, setup_runtime, sync_buffers)

clip_lib = importlib.import_module("00_clip")
kernels = importlib.import_module("01_kernel_selection")
attention = importlib.import_module("02_attention")
generator = importlib.import_module("03_generator")
discriminator = importlib.import_module("04_discriminator")
losses = importlib.import_module("05_losses")
upsampler = importlib.import_module("06_upsampler")

# -----------------------------------------------------------------------------
# The GAN loop of both stages


def train(cfg, g_cfg, d_cfg, loss_cfg, rt, dataset, ckpt=None):
    """Train the base GAN G (g_cfg: 03's GeneratorConfig) or, with --stage upsampler, the upsampler U
    (g_cfg: 06's UpsamplerConfig) on `dataset`; ckpt: the checkpoint to continue (open_resume), or None.

    One loop, step for step the same; the upsampler (06_upsampler.py, paper Sec. 3.4) differs in:
    its generator reads a real image made small, U(make_lowres(real), z, c) in place of G(z, c), and
    `dataset` holds real images at U's output size; it has no vision-aided D; its G step adds
    lpips_weight * LPIPS (and pixel_weight * MSE) to the real image; it begins with --warmup-steps
    of pixel MSE alone. The names G, G_ema stand for U, U_ema there."""
    up = cfg.stage == "upsampler"
    device = rt.device
    lpips = build_lpips(cfg, rt) if up else None                       # fails fast, before CLIP training
    spec, clip, vspec, vclip = frozen_clips(cfg, g_cfg, loss_cfg, rt, dataset)
    os.makedirs(cfg.out, exist_ok=True)     # config.json once the CLIPs load: a missing pretrained
    if rt.main:                             # CLIP leaves no stray run directory behind
        write_config(cfg, g_cfg, d_cfg, loss_cfg)

    # ---- models and optimisers (seeded: every process starts from the same weights)
    torch.manual_seed(cfg.seed)

    def make_G():  # the base G, or the upsampler U (train(): its input noise augmentation on)
        if up:
            return upsampler.Upsampler(g_cfg, text_dim=clip.text_width).to(device).train()
        return generator.Generator(g_cfg, text_dim=clip.text_width).to(device)

    G = make_G()
    D = discriminator.Discriminator(d_cfg, text_dim=clip.text_width).to(device)
    VD = None
    if loss_cfg.vision_weight > 0 and not up:
        VD = discriminator.VisionAidedDiscriminator(vclip.feature_channels, vclip.embed_dim, hidden=d_cfg.vision_hidden,
                                                    psi_layers=d_cfg.vision_psi_layers).to(device)
    G_ema = make_G().eval().requires_grad_(False)
    G_ema.load_state_dict(G.state_dict())
    d_modules = [m for m in (D, VD) if m is not None]
    betas = (cfg.beta1, cfg.beta2)
    # AdamW with weight decay 0.01 on attention weights only (paper), 0 elsewhere.
    opt_G = torch.optim.AdamW(attention.attention_param_groups(G), lr=cfg.lr_g, betas=betas)
    opt_D = torch.optim.AdamW([g for m in d_modules for g in attention.attention_param_groups(m)],
                              lr=cfg.lr_d, betas=betas)
    opt_W = None  # the upsampler's warm-up: its own Adam, with the beta1 of a regression
    if up:
        opt_W = torch.optim.AdamW(attention.attention_param_groups(G), lr=cfg.warmup_lr, betas=(0.9, 0.99))
    # Compiled forwards for the D and G steps; R1 keeps the eager D: its penalty is a gradient of
    # a gradient, which torch.compile's backward does not support.
    G_fwd, D_fwd = (torch.compile(G), torch.compile(D)) if cfg.compile else (G, D)

    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    step, nimg = 0, 0
    if ckpt is not None:  # checked by open_resume: same configurations, CLIPs and vision-aided D
        G.load_state_dict(ckpt["G"]); G_ema.load_state_dict(ckpt["G_ema"]); D.load_state_dict(ckpt["D"])
        if VD is not None:
            VD.load_state_dict(ckpt["VD"])
        opt_G.load_state_dict(ckpt["opt_G"]); opt_D.load_state_dict(ckpt["opt_D"])
        if opt_W is not None and "opt_W" in ckpt:          # runs saved before the warm-up existed have none
            opt_W.load_state_dict(ckpt["opt_W"])
        step, nimg = ckpt["step"], ckpt["nimg"]
        if rt.main:
            say(f"resumed {ckpt_path} at step {step}")
    if cfg.resume and rt.main:  # the log rows of steps trained again (after the last checkpoint) go
        trim_log(cfg, step)

    config = {"train": dataclasses.asdict(cfg), "U" if up else "G": dataclasses.asdict(g_cfg),
              "D": dataclasses.asdict(d_cfg), "loss": dataclasses.asdict(loss_cfg)}
    fingerprints = {"clip": clip_lib.tiny_clip_fingerprint(spec)}         # tiny CLIP files: checked on resume
    if up:
        config["stage"] = "upsampler"  # a checkpoint without "stage" is a base-stage one
    else:
        fingerprints["vision_clip"] = clip_lib.tiny_clip_fingerprint(vspec or spec)

    def checkpoint():  # the upsampler too is stored under G / G_ema: one checkpoint layout
        state = {"G": G.state_dict(), "G_ema": G_ema.state_dict(), "D": D.state_dict(),
                 "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(), "step": step, "nimg": nimg,
                 "config": config, "clip": stored_clip_spec(spec, cfg.out), "clip_sha": fingerprints}
        if up:
            state["opt_W"] = opt_W.state_dict()
        else:
            state.update(VD=VD.state_dict() if VD is not None else {},
                         vision_clip=stored_clip_spec(vspec or spec, cfg.out))
        save_checkpoint(ckpt_path, state)

    if rt.main:
        print_models(cfg, g_cfg, loss_cfg, rt, spec, clip, vspec, G, D, VD)
    batch_gpu, micros = micro_batches(cfg, rt)
    train_set = dataset  # --d.pack m: shapes batches of P captions x m draws (the packs); evals keep `dataset`
    if d_cfg.pack > 1 and not up:
        train_set = data.ShapesDataset(dataset.resolution, seed=dataset.seed, length=dataset.length, group=d_cfg.pack)
    batches = make_batches(train_set, cfg, rt, batch_gpu, micros, step)
    levels = g_cfg.levels if up else len(g_cfg.scales)            # pyramid levels: 4 at 32 px, 6 at 128 px
    r = g_cfg.in_resolution if up else None                        # the upsampler's input size
    if up:  # fixed snapshot and eval inputs: held-out images (fresh shapes, another seed; else a seeded subset)
        held = data.build_dataset(cfg.data, g_cfg.out_resolution, seed=cfg.seed + 1) if cfg.data == "shapes" else dataset
        eval_hr, eval_captions = sample_lib().eval_pairs(held, max(cfg.eval_images, 4))
        eval_hr = eval_hr.to(device)                               # (n, 3, R, R)
        eval_lr = upsampler.make_lowres(eval_hr, r)                # (n, 3, r, r)
    else:   # fixed snapshot prompts and z
        snap_prompts = snapshot_prompts(dataset)
        snap_z = torch.randn(4, g_cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    fid = None  # Inception FID at each eval (--eval-fid): its reference statistics once, cached next to the data
    if not up and rt.main and cfg.eval_fid and cfg.eval_every:
        fid = metrics.prepare_fid(dataset, cfg.data, cfg.out, cfg.eval_images, device=device, flag="--eval-fid false")
    scale = batch_gpu / cfg.batch_size     # each micro-batch's share of the global-batch mean
    w_avgs = MicroBuffers(G)               # w_avg: one chain per micro-batch, their mean per step
    stats, t_log, n_log = {}, time.time(), 0

    def condition(captions):
        """Everything the losses need to know about a micro-batch's captions, from the caches."""
        text, wrong, valid, wrong_caps = caption_pairs(clip, captions, cfg, 1 if up else d_cfg.pack)
        embed, wrong_embed = clip.embed_text(captions), clip.embed_text(wrong_caps)  # (b, E) each
        vision = None
        if VD is not None:  # the vision-aided D reads its own CLIP's embeddings (one CLIP may serve both)
            v_embeds = (embed, wrong_embed) if vclip is clip else (vclip.embed_text(captions),
                                                                   vclip.embed_text(wrong_caps))
            vision = losses.VisionAided(VD, vclip, *v_embeds)
        return Condition(text, wrong, valid.to(device), embed, vision)

    def add_stats(logs):
        for k, v in logs.items():
            stats.setdefault(k, []).append(float(v))

    with StopRequest() as stop, progress_bar(cfg, rt, step) as bar:
        try:
            while step < cfg.max_steps:
                # The micro-batches of this step (the same images and captions serve D and G).
                work = []
                for micro in micros:
                    images, captions = next(batches)
                    reals = images.to(device, non_blocking=True)                      # (b, 3, R, R)
                    lowres = upsampler.make_lowres(reals, r) if up else None          # (b, 3, r, r) U's input
                    work.append((micro, reals, lowres, list(captions)))

                if step < cfg.warmup_steps:
                    # ---- the upsampler's reconstruction warm-up (ESRGAN-style; project's choice, the paper leaves it open):
                    # U alone, pixel MSE to the real image, its own Adam. Its input gets the noise of the GAN
                    # steps and of inference from step one (augment_lowres, sigma ~ U(0, noise_aug_sigma)): trained
                    # on clean inputs, U sharpens sample.py's noise instead of removing it
                    # (NOTES.md, "Upsampler input noise"). No noise inputs: a pixel loss cannot predict random
                    # detail, it would teach U to switch them off.
                    G.requires_grad_(True)
                    opt_W.zero_grad(set_to_none=True)
                    for micro, reals, lowres, captions in work:
                        seed_for(cfg, step, micro, phase=1)
                        z = torch.randn(len(captions), g_cfg.z_dim, device=device)
                        w_avgs.enter(micro)
                        with rt.autocast():
                            out = G_fwd(lowres, z, *clip.text_features(captions), noise_aug=None, noise_mode="none")
                        w_avgs.leave(micro)
                        loss = (out[0].float() - reals).square().mean()          # the finest level, (b, 3, R, R)
                        check_finite(loss, "warm-up", step)
                        (loss * scale).backward()
                        add_stats({"W/mse": loss.detach()})
                    reduce_grads([G], rt)
                    opt_W.step()
                    w_avgs.merge()
                    sync_buffers([G], rt)
                else:
                    # ---- D step: real images with their own captions are real; generated images,
                    # and real images with a wrong caption (matching-aware, Eq. 8), are fake.
                    G.requires_grad_(False); [m.requires_grad_(True) for m in d_modules]
                    opt_D.zero_grad(set_to_none=True)
                    do_r1 = (loss_cfg.r1_gamma > 0 or loss_cfg.r2_gamma > 0) and step % loss_cfg.r1_interval == 0
                    r2_fakes = []                                     # this step's fakes, for R2 (R3GAN)
                    for micro, reals, lowres, captions in work:
                        seed_for(cfg, step, micro, phase=0)
                        cond = condition(captions)
                        z = torch.randn(len(captions), g_cfg.z_dim, device=device)
                        w_avgs.enter(micro)
                        with rt.autocast(), torch.no_grad():                  # pyramid, finest first
                            fakes = G_fwd(lowres, z, *cond.text) if up else G_fwd(z, *cond.text)
                        w_avgs.leave(micro)
                        r2_fakes.append(fakes if do_r1 and loss_cfg.r2_gamma > 0 else None)
                        real_pyr = image_pyramid(reals, levels)
                        with rt.autocast():
                            loss, logs = losses.discriminator_loss(
                                D_fwd, real_pyr, fakes, cond.text, cond.wrong, loss_cfg, wrong_valid=cond.valid,
                                vision=cond.vision)
                        check_finite(loss, "D", step)
                        (loss * scale).backward()
                        add_stats(logs)
                    reduce_grads(d_modules, rt)
                    opt_D.step()

                    # ---- lazy R1 (StyleGAN2): every r1_interval steps, gamma/2 * E||grad_x D(x, c)||^2
                    # over every level of the real pyramid, scaled by the interval; its own D step.
                    # With --loss.r2-gamma, R2 too: the same penalty at the D step's generated images.
                    if do_r1:
                        opt_D.zero_grad(set_to_none=True)
                        for (micro, reals, lowres, captions), fakes in zip(work, r2_fakes):
                            text = clip.text_features(captions)
                            with rt.autocast():
                                loss, logs = losses.lazy_r1_loss(D, image_pyramid(reals, levels), text, loss_cfg,
                                                                 fake_pyr=fakes)
                            check_finite(loss, "R1", step)
                            (loss * scale).backward()
                            add_stats(logs)
                        reduce_grads([D], rt)
                        opt_D.step()

                    # ---- G step: fool D with the right caption (adversarial), be recognisably
                    # *this* caption's image (matching-aware), match it in CLIP space (Eq. 9), fool
                    # the vision-aided D; the upsampler: stay close to this very image (LPIPS).
                    G.requires_grad_(True); [m.requires_grad_(False) for m in d_modules]
                    opt_G.zero_grad(set_to_none=True)
                    for micro, reals, lowres, captions in work:
                        seed_for(cfg, step, micro, phase=1)
                        if loss_cfg.mode_seeking_weight > 0:  # rows i and P + i: one caption, two z
                            captions = losses.mode_seeking_captions(captions)
                        cond = condition(captions)
                        z = torch.randn(len(captions), g_cfg.z_dim, device=device)
                        w_avgs.enter(micro)
                        with rt.autocast():
                            fakes = G_fwd(lowres, z, *cond.text) if up else G_fwd(z, *cond.text)
                        w_avgs.leave(micro)
                        with rt.autocast():
                            loss, logs = losses.generator_loss(
                                D_fwd, fakes, cond.text, cond.wrong, loss_cfg, wrong_valid=cond.valid,
                                clip=clip, text_embed=cond.embed, caption_ids=losses.caption_ids(captions).to(device),
                                vision=cond.vision, lpips=lpips, lpips_target=reals if up else None, z=z,
                                real_pyr=image_pyramid(reals, levels) if loss_cfg.relativistic else None)
                        check_finite(loss, "G", step)
                        (loss * scale).backward()
                        add_stats(logs)
                    reduce_grads([G], rt)
                    opt_G.step()
                    w_avgs.merge()
                    sync_buffers([G], rt)

                # ---- EMA of G: the weights we sample from
                step += 1
                nimg += cfg.batch_size
                update_ema(G_ema, G, cfg, nimg)
                last = step == cfg.max_steps or out_of_time(cfg, rt)  # --max-minutes ends a run early
                bar.update(1)

                # ---- logs, snapshots, evaluation, checkpoints (rank 0)
                n_log += cfg.batch_size
                if step % cfg.log_every == 0 or last:
                    means = mean_stats(stats, rt)                       # every rank takes part
                    if rt.main:
                        log_train_row(cfg, step, nimg, n_log / (time.time() - t_log), means)
                    stats, t_log, n_log = {}, time.time(), 0
                t_aux = time.time()  # time spent below is not training: keep it out of img/s
                if rt.main and (step % cfg.snapshot_every == 0 or last):
                    if up:
                        save_upsampler_snapshot(cfg, G_ema, clip, eval_lr[:4], eval_hr[:4], eval_captions[:4], step)
                    else:
                        save_snapshot(cfg, G_ema, clip, snap_prompts, snap_z, step)
                if rt.main and cfg.eval_every and (step % cfg.eval_every == 0 or last):
                    bar.set_postfix_str("evaluating")
                    if up:
                        # the path a user gets (sample.py --lowres: default input noise), and with none
                        scores = sample_lib().evaluate_upsampler(G_ema, clip, eval_hr, eval_captions)
                    else:
                        scores = sample_lib().evaluate(G_ema, clip, dataset, n=cfg.eval_images,
                                                       shapes=cfg.data == "shapes", fid=fid)
                    log_eval_row(cfg, step, scores)
                    bar.set_postfix_str("")
                if rt.main and (step % cfg.ckpt_every == 0 or last):
                    checkpoint()
                t_log += time.time() - t_aux
                if stop.agreed(rt):
                    exit_interrupted(rt, checkpoint, step, ckpt_path)
                if last:
                    break
        except NonFiniteLoss as err:
            exit_nonfinite(rt, err, ckpt_path)

    if rt.world > 1:
        check_in_sync([G, D], rt)
    if rt.main:
        plots = plot_losses(cfg)
        outputs = (f"snapshots {cfg.out}/samples_*.png (bicubic | upsampled | real)" if up else
                   f"samples {cfg.out}/samples_*.png (prompts in samples_prompts.txt)")
        print(f"done: {step} steps{budget_note(cfg, step)}. checkpoint {ckpt_path}; {outputs}; "
              f"curves {' and '.join(plots) or '-'}; log {cfg.out}/log.jsonl")
    return G_ema


def print_models(cfg, g_cfg, loss_cfg, rt, spec, clip, vspec, G, D, VD):
    """One line: the sizes of what is trained, the CLIPs, the processes."""
    n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (G, D))
    where = f"CLIP {spec} (text width {clip.text_width}), {rt.world} process(es) on {rt.device}"
    if cfg.stage == "upsampler":
        print(f"U {n_g / 1e6:.2f}M params ({g_cfg.in_resolution} -> {g_cfg.out_resolution} px), D {n_d / 1e6:.2f}M, "
              f"LPIPS {cfg.lpips} (weight {loss_cfg.lpips_weight}), pixel MSE weight {loss_cfg.pixel_weight}, "
              f"{min(cfg.warmup_steps, cfg.max_steps)} warm-up steps, {where}")
    else:
        n_vd = sum(p.numel() for p in VD.parameters()) if VD is not None else 0
        print(f"G {n_g / 1e6:.2f}M params, D {n_d / 1e6:.2f}M, vision-aided D {n_vd / 1e6:.2f}M"
              f"{f' on CLIP {vspec}' if vspec else ''}, {where}")


@torch.no_grad()
def update_ema(G_ema, G, cfg, nimg):
    """G_ema <- beta G_ema + (1 - beta) G with a half-life of ema_kimg thousand images,
    ramped up early in training (StyleGAN2); buffers such as w_avg are copied."""
    half_life = min(cfg.ema_kimg * 1000, nimg * cfg.ema_rampup) if cfg.ema_rampup > 0 else cfg.ema_kimg * 1000
    beta = 0.5 ** (cfg.batch_size / max(half_life, 1e-8))
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.lerp_(p.detach(), 1 - beta)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)
    return beta


def image_pyramid(images, levels):
    """Real images -> the pyramid D sees, finest first: repeated anti-aliased 2x downsampling."""
    pyramid = [images]                                                   # (b, 3, R, R)
    for _ in range(levels - 1):
        pyramid.append(kernels.downsample2x(pyramid[-1]))                 # (b, 3, R/2^i, R/2^i)
    return pyramid


def sample_lib():
    """sample.py (the evaluation metrics), imported when first needed."""
    return importlib.import_module("sample")


# -----------------------------------------------------------------------------
# Wrong captions for the matching-aware loss (Eq. 8)
#
# The paper pairs each image with another caption of the batch. Two random shapes captions
# almost always differ in several words, so D can reject most such pairs by their colour words
# and need not read the shape word. With --hard-negatives F a share F of the rows instead gets
# its own caption with one attribute word changed (data.shapes_hard_negatives, the tiny CLIP's
# negatives): a pair D can only reject by checking that one attribute. This project's addition
# (the paper leaves the choice of wrong captions open); 0, the default, is the paper's
# (whether it helps: NOTES.md, "Hard negatives in Eq. 8").


@functools.lru_cache(maxsize=100_000)
def one_word_edits(caption):
    """data.shapes_hard_negatives, cached: a tuple of 5 tuples of captions, one per attribute."""
    return tuple(tuple(edits) for edits in data.shapes_hard_negatives(caption))


def wrong_captions(captions, perm, cfg):
    """The wrong caption c^ of every row: captions[perm[i]], or for a cfg.hard_negatives share of
    the rows (drawn from torch's seeded generator) a one-word edit of captions[i]. Returns the list
    and the (B,) bool mask of rows whose caption really differs. The loop is over strings only:
    the text features of the result come from the per-caption cache, like the right ones."""
    B = len(captions)
    wrong = [captions[j] for j in perm.tolist()]
    hard = torch.rand(B) < cfg.hard_negatives                               # (B,) rows to edit
    if cfg.hard_attribute == "any":
        attr = torch.randint(len(HARD_ATTRIBUTES), (B,))                    # (B,) which word
    else:
        attr = torch.full((B,), HARD_ATTRIBUTES.index(cfg.hard_attribute))
    pick = torch.rand(B)                                                    # (B,) which edit of it
    for i in hard.nonzero().flatten().tolist():
        edits = one_word_edits(captions[i])
        if edits and edits[attr[i]]:                                        # () outside the grammar
            options = edits[attr[i]]
            wrong[i] = options[int(pick[i] * len(options))]
    valid = torch.tensor([w != c for w, c in zip(wrong, captions)])
    return wrong, valid


def caption_pairs(clip, captions, cfg, pack=1):
    """Eq. 8's pairs of a micro-batch, from the text-feature cache: the right (tokens, mask, eot)
    triple, the wrong one, the (B,) mask of rows that really got a wrong caption, and the wrong
    captions themselves (for their CLIP embeddings, cached too). pack m (--d.pack): rows m*g ..
    m*g+m-1 share a caption, and the permutation moves whole packs (one wrong caption per pack)."""
    if pack > 1:
        perm, valid = losses.mismatched_permutation(captions[::pack], return_valid=True)  # over packs
        perm = (perm[:, None] * pack + torch.arange(pack)).flatten()                     # (B,) rows
        valid = valid.repeat_interleave(pack)
    else:
        perm, valid = losses.mismatched_permutation(captions, return_valid=True)
    if not cfg.hard_negatives:                                  # the paper's: a shuffled batch
        text = clip.text_features(captions)                     # (b, L, D), (b, L), (b,)
        return text, losses.permute_text(text, perm), valid, [captions[j] for j in perm.tolist()]
    wrong_caps, valid = wrong_captions(captions, perm, cfg)    # some one-word edits (above)
    both = clip.text_features(captions + wrong_caps)            # one call: one padded length L
    b = len(captions)
    return tuple(x[:b] for x in both), tuple(x[b:] for x in both), valid, wrong_caps




class Condition(typing.NamedTuple):
    """What the losses read of a micro-batch's captions (train's condition() builds it from the caches)."""
    text: tuple               # (tokens (b, L, D), mask (b, L), eot (b,)) of the captions c
    wrong: tuple              # the same triple of the wrong captions c^ (Eq. 8)
    valid: torch.Tensor       # (b,) bool: rows whose c^ really differs from c
    embed: torch.Tensor       # (b, E) --clip's embedding of c, for the CLIP loss (Eq. 9)
    vision: typing.Any        # losses.VisionAided: the vision-aided D, its CLIP and embeddings; None: no such D


# -----------------------------------------------------------------------------
# The frozen CLIPs and LPIPS


def frozen_clips(cfg, g_cfg, loss_cfg, rt, dataset):
    """The run's frozen CLIPs -> (spec, clip, vspec, vclip): --clip's, and the vision-aided D's (vspec
    None: `clip` serves it too). With --clip tiny, their files are trained first when missing
    (<out>/clip.pt, and the vision-aided D's <out>/vision_clip.pt: see vision_clip_spec)."""
    spec, vspec = clip_spec(cfg), None
    if cfg.stage == "upsampler":  # its CLIP reads text only: a tiny one is trained at U's input size
        resolution, vision = g_cfg.in_resolution, False
        if cfg.clip == "tiny":
            dataset = data.build_dataset(cfg.data, resolution, seed=cfg.seed)
            if not os.path.isfile(spec[5:]) and rt.main:
                print(f"note: no tiny CLIP in {cfg.out}: training one first, as --stage clip does (minutes on a "
                      f"CPU); --clip tiny:runs/{cfg.preset}/clip.pt conditions on the base run's CLIP instead")
    else:
        resolution, vision = g_cfg.resolution, loss_cfg.vision_weight > 0
    if cfg.clip == "tiny":
        train_clip_stage(cfg, resolution, rt, dataset, vision=vision, only_missing=True)  # cached
    elif spec.startswith("tiny:") and not os.path.isfile(spec[5:]):
        raise FileNotFoundError(f"no tiny CLIP at {spec[5:]}: train one with python train.py --stage clip")
    clip = clip_lib.load_clip(spec, device=rt.device)              # frozen, never saved in checkpoints
    if vision:
        vspec = vision_clip_spec(cfg)
    vclip = clip if vspec is None else clip_lib.load_clip(vspec, device=rt.device)
    if cfg.dtype == "bfloat16" and cfg.stage != "upsampler":  # frozen image towers: cast once, not at every pass
        clip.image_tower_to(torch.bfloat16)
        vclip.image_tower_to(torch.bfloat16)  # the same object when there is no --vision-clip
    return spec, clip, vspec, vclip


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


def build_lpips(cfg, rt):
    """The LPIPS module of the G step; a missing pretrained backbone raises MissingWeightsError
    (one line naming --lpips random). Seeded: a random backbone is the same in every run."""
    if cfg.lpips == "random" and rt.main:
        why = ("the tiny upsampler's preset: no download" if UPSAMPLER_TRAIN_PRESETS[cfg.preset].get("lpips") == "random"
               else "as asked")
        print(f"note: --lpips random ({why}): LPIPS on a randomly initialised AlexNet backbone, a distance but "
              "not a perceptual one; --lpips vgg is the paper's")
    torch.manual_seed(cfg.seed)
    return losses.LPIPS(cfg.lpips).to(rt.device).eval()


# -----------------------------------------------------------------------------
# Entry point


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        return print_help(__doc__)
    rt = None
    try:  # bad input, found before or during the run, is one line and exit status 2
        # The checks, in one pass before any CLIP training, file writing or model building: every
        # flag's range (config.TRAIN_RULES, SUB_RULES), what combines flags, G and D built on the
        # meta device, the CLIP spec, the micro-batches.
        cfg, g_cfg, d_cfg, loss_cfg = parse_flags(argv)
        check_models(cfg, g_cfg, d_cfg)
        clip_spec(cfg)
        if data_error(cfg.data):  # a missing --data folder, before the dry run's plan too
            raise FlagError(data_error(cfg.data))
        if cfg.dry_run:  # a plan for any machine: no device is touched, nothing is loaded or written
            planned = Runtime(torch.device("meta"), 0, 1, None, time.time())
            check_mode_seeking(cfg, loss_cfg, micro_batches(cfg, planned)[0])
            check_pack(cfg, d_cfg, micro_batches(cfg, planned)[0])
            return dry_run(cfg, g_cfg, d_cfg, loss_cfg)
        doomed = check_run_dir(cfg)  # --out: writable, and no other run's files there (--resume, --overwrite)
        rt = setup_runtime(cfg)
        check_mode_seeking(cfg, loss_cfg, micro_batches(cfg, rt)[0])
        check_pack(cfg, d_cfg, micro_batches(cfg, rt)[0])
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
        clear_run_dir(cfg, doomed, rt)  # --overwrite: the earlier run's files go, after every check passed
        ckpt = open_resume(cfg, g_cfg, d_cfg, loss_cfg)  # before any CLIP is trained or config.json rewritten
        if cfg.stage == "clip":
            os.makedirs(cfg.out, exist_ok=True)
            if rt.main:
                write_config(cfg, g_cfg, d_cfg, loss_cfg)
            return train_clip_stage(cfg, g_cfg.resolution, rt, dataset)
        return train(cfg, g_cfg, d_cfg, loss_cfg, rt, dataset, ckpt)  # writes config.json once its CLIPs load
    except (FlagError, FileNotFoundError, losses.MissingWeightsError, clip_lib.CLIPLoadError) as err:
        print(f"train.py: {err}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if rt is not None and rt.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
