"""
train_upsampler.py - the upsampler stage's loop (paper Sec. 3.4): `python train.py --stage upsampler`.

    python train.py --stage upsampler                # tiny 32 -> 128 upsampler on `shapes` -> runs/tiny-upsampler
    python train.py --stage upsampler --full --lpips vgg --data 'shards/{00000..09999}.tar'   # 64 -> 512

The same GAN step as train.py's, with three differences:
- the generator is 06's upsampler U, and it reads a real image made small: U(make_lowres(x), z, c)
  in place of G(z, c); the data are real images at U's output size;
- the G step adds lpips_weight * LPIPS(U(...), x) (and pixel_weight * MSE) to the real image, and
  there is no vision-aided D (--lpips vgg | alex | random picks LPIPS's backbone);
- the first --warmup-steps steps (tiny: 1300; not in the paper) are a reconstruction warm-up:
  U alone on pixel MSE, with its own AdamW and no random detail, as ESRGAN pretrains its generator.
The D step, EMA and optimisers are train.py's; checkpoints, logs and stopping are rundir.py's.
Shapes: b micro-batch (--batch-gpu), R U's output side, r its input side, L text tokens, D text width.
"""
import contextlib
import copy
import importlib
import os

import torch

import data
from config import UPSAMPLER_TRAIN_PRESETS, clip_spec
from rundir import (Clock, StopRequest, exit_interrupted, finish, guard_nonfinite, log_eval_row, log_step,
                    out_of_time, progress_bar, resume, save_run, save_upsampler_snapshot, start_run_dir)
from runtime import MicroBuffers, make_batches, micro_batches, reduce_grads, seed_for, sync_buffers
from train import backward, count, d_step, frozen_clips, optimisers, sample_lib, update_ema

discriminator = importlib.import_module("04_discriminator")
losses = importlib.import_module("05_losses")
upsampler = importlib.import_module("06_upsampler")
attention = importlib.import_module("02_attention")

WARMUP_LR = 0.01  # the warm-up's AdamW learning rate, with a regression's betas (0.9, 0.99) (project's choice)


def train_upsampler(cfg, u_cfg, d_cfg, loss_cfg, rt, dataset, ckpt=None, timer=None):
    """Train the upsampler U (06's UpsamplerConfig u_cfg) and its D on `dataset` (real images at
    U's output size); ckpt, timer: as train.train."""
    timer = timer or contextlib.nullcontext
    device, r = rt.device, u_cfg.in_resolution
    lpips = build_lpips(cfg, rt)                                       # fails fast, before CLIP training
    if cfg.clip == "tiny":  # its CLIP reads text only: a tiny one is trained at U's input size
        dataset_clip = data.build_dataset(cfg.data, r, seed=cfg.seed)
        if not os.path.isfile(clip_spec(cfg)[5:]) and rt.main:
            print(f"note: no tiny CLIP in {cfg.out}: training one first, as --stage clip does (minutes on a "
                  f"CPU); --clip tiny:runs/{cfg.preset}/clip.pt conditions on the base run's CLIP instead")
    else:
        dataset_clip = dataset
    clip, _ = frozen_clips(cfg, rt, dataset_clip, r, vision=False, images=False)
    start_run_dir(cfg, rt, u_cfg, d_cfg, loss_cfg)

    # ---- models and optimisers (seeded: every process starts from the same weights)
    torch.manual_seed(cfg.seed)
    U = upsampler.Upsampler(u_cfg, text_dim=clip.text_width).to(device).train()  # train(): input noise on
    D = discriminator.Discriminator(d_cfg, text_dim=clip.text_width).to(device)
    U_ema = copy.deepcopy(U).eval().requires_grad_(False)
    opt_U, opt_D = optimisers(cfg, U, [D])
    opt_W = torch.optim.AdamW(attention.attention_param_groups(U), lr=WARMUP_LR, betas=(0.9, 0.99))  # the warm-up's own
    U_fwd, D_fwd = (torch.compile(U), torch.compile(D)) if cfg.compile else (U, D)
    parts = dict(G=U, G_ema=U_ema, D=D, opt_G=opt_U, opt_D=opt_D, opt_W=opt_W)  # one checkpoint layout: U as G
    step, nimg = resume(cfg, rt, ckpt, parts)
    if rt.main:
        print(f"U {count(U) / 1e6:.2f}M params ({r} -> {u_cfg.out_resolution} px), D {count(D) / 1e6:.2f}M, "
              f"LPIPS {cfg.lpips} (weight {loss_cfg.lpips_weight}), pixel MSE weight {loss_cfg.pixel_weight}, "
              f"{min(cfg.warmup_steps, cfg.max_steps)} warm-up steps, CLIP {clip_spec(cfg)}, "
              f"{rt.world} process(es) on {device}")

    batch_gpu, micros = micro_batches(cfg, rt)
    batches = make_batches(dataset, cfg, rt, batch_gpu, micros, step)
    w_avgs = MicroBuffers(U)
    stats = {}
    lowres_of = {}  # micro -> this step's low-res inputs (b, 3, r, r)

    def captions_of(captions):  # Eq. 8's pairs for U's D, from the text-feature cache; no vision-aided D
        perm, valid = losses.mismatched_permutation(captions, return_valid=True)
        text = clip.text_features(captions)
        return losses.Captions(text, losses.permute_text(text, perm), valid.to(device), clip.embed_text(captions),
                               losses.caption_ids(captions).to(device))

    def generate(micro, caps, **noise):
        """U(x_lr, z, c) of a micro-batch, z from the step's seed: a pyramid at U's output size."""
        z = torch.randn(caps.text[0].shape[0], u_cfg.z_dim, device=device)
        w_avgs.enter(micro)
        with rt.autocast():
            out = U_fwd(lowres_of[micro], z, *caps.text, **noise)
        w_avgs.leave(micro)
        return out

    # fixed snapshot and eval inputs: held-out images (fresh shapes, another seed; else a seeded subset)
    held = data.build_dataset(cfg.data, u_cfg.out_resolution, seed=cfg.seed + 1) if cfg.data == "shapes" else dataset
    eval_hr, eval_captions = sample_lib().eval_pairs(held, max(cfg.eval_images, 4))  # >= the snapshot's 4 rows
    eval_hr = eval_hr.to(device)                                        # (n, 3, R, R)
    eval_lr = upsampler.make_lowres(eval_hr, r)                         # (n, 3, r, r)

    def checkpoint():
        save_run(cfg, step, nimg, parts, config={"train": cfg, "U": u_cfg, "D": d_cfg, "loss": loss_cfg,
                                                 "stage": "upsampler"}, clips={"clip": clip_spec(cfg)})

    with StopRequest() as stop, progress_bar(cfg, rt, step) as bar, guard_nonfinite(cfg, rt):
        clock = Clock()
        while step < cfg.max_steps:
            with timer("data"):
                work = []
                for micro in micros:
                    images, captions = next(batches)
                    reals = images.to(device, non_blocking=True)        # (b, 3, R, R)
                    lowres_of[micro] = upsampler.make_lowres(reals, r)  # (b, 3, r, r) U's input
                    work.append((micro, reals, list(captions)))

            if step < cfg.warmup_steps:
                # ---- reconstruction warm-up (ESRGAN-style; the paper leaves it open): U alone, pixel
                # MSE to the real image, its own AdamW. Its input carries the noise of the GAN steps
                # and of inference from step one (augment_lowres): trained on clean inputs, U
                # sharpens sample.py's noise instead of removing it
                # (NOTES.md, "Upsampler input noise"). No noise inputs: a pixel loss cannot predict
                # random detail, it would teach U to switch them off.
                with timer("warm-up step"):
                    U.requires_grad_(True)
                    opt_W.zero_grad(set_to_none=True)
                    for micro, reals, captions in work:
                        seed_for(cfg, step, micro, phase=1)
                        caps = losses.Captions(clip.text_features(captions))
                        out = generate(micro, caps, noise_aug=None, noise_mode="none")
                        loss = (out[0].float() - reals).square().mean()  # the finest level, (b, 3, R, R)
                        backward(loss * len(captions) / cfg.batch_size, "warm-up", step, {"W/mse": loss.detach()}, stats)
                    reduce_grads([U], rt)
                    opt_W.step()
                    w_avgs.merge()
                    sync_buffers([U], rt)
            else:
                # ---- D step (train.py's): real high-res images are real, U's outputs fake
                with timer("D step"):
                    U.requires_grad_(False)
                    d_step(D, opt_D, work, captions_of, generate, cfg, loss_cfg, rt, step, stats, D_fwd=D_fwd)
                # ---- G step: fool D, and stay close to this very image (LPIPS, pixel MSE)
                with timer("G step"):
                    U.requires_grad_(True)
                    D.requires_grad_(False)
                    opt_U.zero_grad(set_to_none=True)
                    for micro, reals, captions in work:
                        seed_for(cfg, step, micro, phase=1)
                        caps = captions_of(captions)
                        fakes = generate(micro, caps)
                        with rt.autocast():
                            loss, logs = losses.generator_loss(D_fwd, fakes, caps, loss_cfg, clip=clip, lpips=lpips,
                                                               target=reals)
                        backward(loss * len(captions) / cfg.batch_size, "G", step, logs, stats)
                    reduce_grads([U], rt)
                    opt_U.step()
                    w_avgs.merge()
                    sync_buffers([U], rt)

            with timer("EMA"):
                step, nimg = step + 1, nimg + cfg.batch_size
                update_ema(U_ema, U, cfg, nimg)
            last = step == cfg.max_steps or out_of_time(cfg, rt)
            log_step(cfg, rt, step, nimg, last, stats, clock, bar)
            with clock.paused():
                if rt.main and (step % cfg.snapshot_every == 0 or last):
                    save_upsampler_snapshot(cfg, U_ema, clip, eval_lr[:4], eval_hr[:4], eval_captions[:4], step)
                if rt.main and cfg.eval_every and (step % cfg.eval_every == 0 or last):
                    # the path a user gets (sample.py --lowres: default input noise), and with none
                    bar.set_postfix_str("evaluating")
                    log_eval_row(cfg, step, sample_lib().evaluate_upsampler(U_ema, clip, eval_hr, eval_captions))
                    bar.set_postfix_str("")
                if rt.main and (step % cfg.ckpt_every == 0 or last):
                    checkpoint()
            if stop.agreed(rt):
                if rt.main:
                    checkpoint()
                exit_interrupted(rt, step, os.path.join(cfg.out, "checkpoint.pt"))
            if last:
                break
    finish(cfg, rt, step, [U, D], f"snapshots {cfg.out}/samples_*.png (bicubic | upsampled | real)")
    return U_ema


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
