"""
train.py - one flat, readable training loop for every stage of GigaGAN.

    python train.py                                  # a tiny CLIP, then a tiny text-to-image GAN on `shapes` (CPU, 15 minutes)
    python train.py --stage clip --out runs/clip     # only the tiny CLIP -> runs/clip/clip.pt
    python train.py --preset small --device cuda     # 64 px on one GPU
    torchrun --nproc_per_node=8 train.py --full --data 'shards/{00000..09999}.tar'
    python train.py --full --dry-run                 # parameter counts and memory estimate, no training
    python train.py --stage upsampler                # tiny 32 -> 128 upsampler on `shapes` -> runs/tiny-upsampler
    python train.py --stage upsampler --full --lpips vgg --data 'shards/{00000..09999}.tar'   # 64 -> 512

Flags are `--key value` or `--key=value` for every field of TrainConfig below; fields of the
generator, discriminator and loss configs are `--g.FIELD`, `--d.FIELD`, `--loss.FIELD`
(e.g. `--g.attention false`, `--loss.clip_weight 0`), of the upsampler `--u.FIELD` (with
--stage upsampler, where --d.* and --loss.* configure its D and losses). Unknown flags are an error.

The order of one optimisation step, written out below (Sec. 3 and Appendix of the paper):
    D step (adversarial + matching-aware + vision-aided) -> lazy R1 every r1_interval steps
    -> G step (adversarial + matching-aware + CLIP + vision-aided) -> EMA of G
    -> logs, snapshots, evaluation, checkpoint.
(--loss.mode-seeking-weight W > 0 adds MSGAN's diversity term to the G step, ours, not the paper's:
its rows P..2P-1 then take the captions of rows 0..P-1, so each caption is drawn with two z.)
The upsampler stage (06_upsampler.py, paper Sec. 3.5) runs the same loop with U(make_lowres(real))
in place of G(z), the same MS-I/O D on its output pyramid, no vision-aided D, and LPIPS to the
real high-res image in the G step (--lpips vgg | alex | random, weight --loss.lpips-weight).
Its first --warmup-steps steps (tiny: 1300; not in the paper) are a reconstruction warm-up:
U alone on pixel MSE, with its own Adam and no random detail, as ESRGAN pretrains its generator.

The frozen CLIPs: --clip gives the text features and the CLIP loss; --vision-clip the backbone of the
vision-aided D (auto: the --clip model, except that a tiny CLIP with a ViT image tower, --clip-tower
vit, gets a tiny ResNet-tower sibling `vision_clip.pt`, which reads shape; see vision_clip_spec;
`same`: always the --clip model). With --clip tiny they are trained first (the tiny default: one
CLIP with a ResNet image tower, which serves both roles; --clip-tower auto | vit | resnet, where auto
is resnet for the base stage at a multiple of 32 px and vit otherwise; --help shows it resolved).

Determinism and multi-GPU: the global batch is cut into micro-batches of `batch_gpu`
images; process `rank` takes micro-batches rank, rank + world, ... Every random draw of a
micro-batch (data indices, z, noise, wrong captions) is seeded by (seed, step, micro-batch),
never by the rank, and gradients are summed across processes with an explicit all-reduce.
So one process with gradient accumulation, N processes, and a resumed run all see the same
numbers (up to float summation order).
"""
import dataclasses
import functools
import importlib
import itertools
import json
import logging
import math
import os
import pickle
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data

clip_lib = importlib.import_module("00_clip")
kernels = importlib.import_module("01_kernel_selection")
attention = importlib.import_module("02_attention")
generator = importlib.import_module("03_generator")
discriminator = importlib.import_module("04_discriminator")
losses = importlib.import_module("05_losses")
upsampler = importlib.import_module("06_upsampler")

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    preset: str = "tiny"          # size preset of G, D, losses and this config: tiny | small | full
    full: bool = False            # shorthand for --preset full (the paper's 64 px model)
    stage: str = "base"           # clip (tiny CLIP only) | base (text-to-image GAN) | upsampler
    data: str = "shapes"          # shapes | an image folder with captions | 'shards/{00000..00099}.tar'
    out: str = ""                 # run directory; '' -> runs/<preset>
    max_steps: int = 1500         # optimiser steps of G (and of D)
    max_minutes: float = 0.0      # time budget of the whole run, CLIP training included: stop early, as at max_steps (0: none)
    batch_size: int = 16          # global batch: all processes, all micro-batches
    batch_gpu: int = 0            # micro-batch per forward pass; 0 -> batch_size / processes
    lr_g: float = 0.0025          # AdamW learning rate of G (paper: 0.0025)
    lr_d: float = 0.0025          # AdamW learning rate of D (paper: 0.0025)
    beta1: float = 0.0            # Adam beta1 (paper: 0)
    beta2: float = 0.99           # Adam beta2 (paper: 0.99)
    ema_kimg: float = 10.0        # EMA half-life of G_ema in thousands of images (project choice per preset)
    ema_rampup: float = 0.05      # half-life <= this fraction of images seen so far (StyleGAN2's ramp-up)
    seed: int = 0                 # seeds every random draw (per step and micro-batch)
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    dtype: str = "float32"        # float32 | bfloat16 (autocast of the forward passes)
    compile: bool = False         # torch.compile G and D for the D and G steps (GPU speed-up; runs, slower, on CPU)
    resume: bool = False          # continue from <out>/checkpoint.pt
    clip: str = "tiny"            # tiny | tiny:PATH | NAME (with --clip-pretrained) | NAME/TAG
    clip_pretrained: str = ""     # pretrained tag for NAME, or 'none' for random weights (benchmarks)
    vision_clip: str = "auto"     # CLIP of the vision-aided D: auto | same (--clip's) | tiny:PATH | NAME/TAG (vision_clip_spec)
    clip_steps: int = 1000        # training steps of each tiny CLIP (clip.pt, and vision_clip.pt with --vision-clip auto)
    clip_tower: str = "auto"      # the tiny CLIP's image tower: auto (resnet for the base stage at a multiple of 32 px, else vit) | vit | resnet
    clip_batch_size: int = 128    # batch of the tiny CLIP's contrastive training
    workers: int = -1             # DataLoader worker processes; -1 -> 0 on CPU, 4 on GPU
    log_every: int = 25           # steps between log lines
    snapshot_every: int = 250     # steps between sample grids of fixed prompts and z
    eval_every: int = 500         # steps between alignment / CLIP-score evaluations (0: off)
    eval_images: int = 128        # images generated per evaluation
    ckpt_every: int = 250         # steps between checkpoints
    dry_run: bool = False         # build the models on the meta device, print sizes, exit
    lpips: str = "vgg"            # upsampler stage: LPIPS backbone vgg (paper) | alex | random (no download)
    warmup_steps: int = 0         # upsampler stage: the first steps train U on pixel MSE alone (no D) [U]
    warmup_lr: float = 0.01       # their AdamW learning rate (beta1 0.9, beta2 0.99)
    hard_negatives: float = 0.0   # share of Eq. 8's wrong captions that are one-word edits (shapes) [U]
    hard_attribute: str = "any"   # the word they change: any | shape | color | background | size | position


# Training-side presets: sizes and a few settings, never code. G and D sizes come from 03/04's
# registries under the same names, the loss weights from 05's.
TRAIN_PRESETS = {
    # tiny: twice the paper's learning rate for G and D (project's choice). Measured, one
    # 1,000-step run each of `python train.py` (same tiny CLIP): mean alignment 0.71 vs 0.56,
    # colour 0.80 vs 0.63, position 0.80 vs 0.41, CLIP score 0.85 vs 0.77.
    # A 15-minute budget (CLIP training included): about 2,000 steps on a 2-core CPU with the
    # tiny CLIP (README, Measured), fewer on a slower machine; --resume goes on toward max_steps,
    # where every attribute of the shapes prompts is right in >= 94% of images (README, Status).
    "tiny": dict(lr_g=0.005, lr_d=0.005, max_steps=3500, max_minutes=15.0),
    "small": dict(max_steps=200_000, batch_size=64, ema_kimg=20.0, clip_batch_size=256,
                  clip_steps=5000, snapshot_every=1000, eval_every=5000, ckpt_every=1000, log_every=100),
    "full": dict(max_steps=1_350_000, batch_size=1024, batch_gpu=32, ema_kimg=500.0, dtype="bfloat16",
                 clip="ViT-L-14/openai", vision_clip="ViT-B-32/openai", data="",
                 snapshot_every=5000, eval_every=20000, ckpt_every=5000, log_every=100),
}


# The upsampler stage's own training settings per preset, over TRAIN_PRESETS (project's choice [U]).
# tiny: a randomly initialised LPIPS backbone (this offline machine cannot download VGG), 8 images
# of 128 px per step. First a reconstruction warm-up (ESRGAN's recipe, not the paper's): 1300
# steps of pixel MSE alone, no D, at ~0.25 s each; then 200 GAN steps at ~2.2 s each (R1 steps
# included; losses LOSS_PRESETS["upsampler_tiny"], with a pixel MSE), on both threads of an
# idle 2-core CPU. Why: a GAN U learns no detail in a few hundred CPU steps (its D is still at
# the matching-aware prior), and U on pixel MSE learns only with the noise inputs off and the
# learning rate and beta1 of a regression (README, "Status"). GAN steps: the paper's 0.0025.
UPSAMPLER_TRAIN_PRESETS = {
    "tiny": dict(max_steps=1500, max_minutes=0.0, warmup_steps=1300, warmup_lr=0.01, batch_size=8, lpips="random",
                 eval_images=64, log_every=20, snapshot_every=200, eval_every=200, ckpt_every=200,
                 lr_g=0.0025, lr_d=0.0025),
    "full": dict(batch_size=256, batch_gpu=8, lpips="vgg"),
}
LPIPS_NETS = ("vgg", "alex", "random")


class FlagError(ValueError):
    """A bad command line: printed as one line, exit status 2."""


def _coerce(value, annotation, flag):
    """Turn the string of `--flag value` into the dataclass field's type."""
    origin = typing.get_origin(annotation)
    try:
        if annotation is bool:
            low = value.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return low in ("1", "true", "yes", "on")
        if annotation in (int, float, str):
            return annotation(value)
        if origin in (tuple, list, dict) or annotation in (tuple, list, dict):
            kind = origin or annotation
            if kind is not dict and not value.lstrip().startswith(("[", "{")):
                value = f"[{value}]"  # --g.channels 64,64,64,32 as well as '[64, 64, 64, 32]'
            parsed = json.loads(value)  # e.g. --g.channels '[64, 64, 64, 32]'
            if not isinstance(parsed, dict if kind is dict else list):
                raise ValueError
            return tuple(parsed) if kind is tuple else parsed
    except (ValueError, json.JSONDecodeError):
        what = getattr(annotation, '__name__', annotation)
        hint = " such as 64,64,64,32 or '[64, 64, 64, 32]'" if what in ("tuple", "list") else ""
        raise FlagError(f"bad value for {flag}: {value!r} (expected {what}{hint})")
    return value


def parse_flags(argv):
    """argv -> (TrainConfig, GeneratorConfig, DiscriminatorConfig, LossConfig).

    Order: dataclass defaults < preset < flags. The preset is read first so that
    `--preset small --batch-size 8` keeps the 8."""
    pairs = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise FlagError(f"unexpected argument {arg!r}: flags look like --key value (see python train.py --help)")
        key, eq, value = arg[2:].partition("=")
        if not eq:  # `--key value`, or a bare boolean `--key`
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                value, i = nxt, i + 1
            else:
                value = None
        pairs.append((key.replace("-", "_"), value, arg))
        i += 1

    targets = {"": TrainConfig, "g.": generator.GeneratorConfig, "d.": discriminator.DiscriminatorConfig,
               "loss.": losses.LossConfig, "u.": upsampler.UpsamplerConfig}
    preset, stage = "tiny", "base"
    for key, value, arg in pairs:
        if key == "full" and value in (None, "true", "1", "yes", "on"):
            preset = "full"
        elif key == "preset":
            if value is None:
                raise FlagError("--preset needs a value: tiny | small | full")
            preset = value
        elif key == "stage" and value is not None:
            stage = value  # the stage picks its own presets below
    if preset not in TRAIN_PRESETS:
        raise FlagError(f"unknown preset {preset!r}: choose one of {', '.join(TRAIN_PRESETS)}")
    if stage == "upsampler" and preset not in UPSAMPLER_TRAIN_PRESETS:
        raise FlagError(f"no upsampler preset {preset!r}: use --preset tiny (32 -> 128) or --full (64 -> 512)")

    stage_preset = UPSAMPLER_TRAIN_PRESETS[preset] if stage == "upsampler" else {}
    values = {"": dict(TRAIN_PRESETS[preset], **stage_preset, preset=preset), "g.": {}, "d.": {}, "loss.": {}, "u.": {}}
    for key, value, arg in pairs:
        prefix = next((p for p in ("g.", "d.", "loss.", "u.") if key.startswith(p)), "")
        name = key[len(prefix):]
        if prefix == "g." and stage == "upsampler":
            raise FlagError(f"{arg.split('=')[0]}: --g.* configures the base generator; the upsampler's "
                            "fields are --u.* (06_upsampler.py's UpsamplerConfig)")
        if prefix == "u." and stage != "upsampler":
            raise FlagError(f"{arg.split('=')[0]}: --u.* configures the upsampler; add --stage upsampler")
        fields = {f.name: f for f in dataclasses.fields(targets[prefix])}
        if name not in fields:
            raise FlagError(f"unknown flag {arg.split('=')[0]} (python train.py --help lists the flags)")
        annotation = typing.get_type_hints(targets[prefix])[name]
        if value is None:
            if annotation is not bool:
                raise FlagError(f"{arg} needs a value")
            value = "true"
        values[prefix][name] = _coerce(value, annotation, "--" + key.replace("_", "-"))

    cfg = TrainConfig(**values[""])
    if cfg.stage not in ("clip", "base", "upsampler"):
        raise FlagError(f"unknown --stage {cfg.stage!r}: choose clip | base | upsampler")
    if cfg.lpips not in LPIPS_NETS:
        raise FlagError(f"unknown --lpips {cfg.lpips!r}: choose vgg (paper) | alex | random (no download)")
    if cfg.clip_tower not in ("auto", "vit", "resnet"):
        raise FlagError(f"unknown --clip-tower {cfg.clip_tower!r}: choose auto (default) | vit | resnet")
    if cfg.vision_clip not in ("auto", "same") and not cfg.vision_clip.startswith("tiny:") and "/" not in cfg.vision_clip:
        raise FlagError(f"bad --vision-clip {cfg.vision_clip!r}: choose auto | same | tiny:PATH | NAME/TAG "
                        "(e.g. ViT-B-32/openai, or ViT-B-32/none for random weights)")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise FlagError(f"unknown --dtype {cfg.dtype!r}: choose float32 | bfloat16")
    for name in ("max_steps", "batch_size", "log_every", "snapshot_every", "ckpt_every", "clip_steps"):
        if getattr(cfg, name) <= 0:
            raise FlagError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.batch_gpu < 0:
        raise FlagError(f"--batch-gpu must be >= 0, got {cfg.batch_gpu}")
    if cfg.max_minutes < 0:
        raise FlagError(f"--max-minutes must be >= 0 (0: no time budget), got {cfg.max_minutes:g}")
    if cfg.warmup_steps < 0 or cfg.warmup_lr <= 0:
        raise FlagError(f"--warmup-steps must be >= 0 and --warmup-lr positive, got {cfg.warmup_steps}, {cfg.warmup_lr}")
    if cfg.warmup_steps and cfg.stage != "upsampler":
        raise FlagError("--warmup-steps: only the upsampler stage has a warm-up; add --stage upsampler")
    if not 0.0 <= cfg.hard_negatives <= 1.0:
        raise FlagError(f"--hard-negatives is a share of the wrong captions, 0..1, got {cfg.hard_negatives}")
    if cfg.hard_attribute not in ("any",) + HARD_ATTRIBUTES:
        raise FlagError(f"unknown --hard-attribute {cfg.hard_attribute!r}: choose any | {' | '.join(HARD_ATTRIBUTES)}")
    if cfg.hard_negatives and (cfg.data != "shapes" or cfg.stage == "clip"):
        raise FlagError("--hard-negatives edits captions of the shapes grammar: use it with --data shapes "
                        "and --stage base or upsampler")
    cfg.out = cfg.out or os.path.join("runs", cfg.preset + ("-upsampler" if cfg.stage == "upsampler" else ""))
    if cfg.stage == "upsampler":
        # the generator is the upsampler U; its MS-I/O D reads pyramids of U's output size
        g_cfg = configured(upsampler.U_PRESETS[preset], values["u."], "upsampler", "u")
        d_cfg = configured(upsampler.U_D_PRESETS[preset], {"resolution": g_cfg.out_resolution, **values["d."]},
                           "discriminator", "d")
        if d_cfg.resolution != g_cfg.out_resolution:
            raise FlagError(f"--d.resolution {d_cfg.resolution} must equal the upsampler's output "
                            f"--u.out-resolution {g_cfg.out_resolution}")
        cfg.clip_tower = "vit" if cfg.clip_tower == "auto" else cfg.clip_tower  # its CLIP only reads text
        check_clip_tower(cfg, g_cfg.in_resolution)
        loss_cfg = configured(loss_preset("upsampler", preset), values["loss."], "loss", "loss")
        return cfg, g_cfg, d_cfg, loss_cfg
    g_cfg = configured(generator.G_PRESETS[preset], values["g."], "generator", "g")
    if cfg.clip_tower == "auto":  # the ResNet tower needs sides divisible by 32 (five stride-2 steps)
        cfg.clip_tower = "vit" if g_cfg.resolution % 32 else "resnet"
    check_clip_tower(cfg, g_cfg.resolution)
    if cfg.vision_clip == "auto" and g_cfg.resolution % 32:  # no ResNet-tower sibling below 32 px steps
        cfg.vision_clip = "same"
    d_cfg = configured(discriminator.D_PRESETS[preset], values["d."], "discriminator", "d")
    loss_cfg = configured(loss_preset("base", preset), values["loss."], "loss", "loss")
    return cfg, g_cfg, d_cfg, loss_cfg


def configured(preset_cfg, changes, what, prefix):
    """A model or loss preset with the --PREFIX.* flags applied; the config's own checks (its
    __post_init__ asserts) become one FlagError line."""
    try:
        return dataclasses.replace(preset_cfg, **changes)
    except AssertionError as err:
        raise FlagError(f"bad {what} configuration (--{prefix}.*): {err}") from None


def loss_preset(stage, preset):
    """05's loss settings of a stage ("base" | "upsampler"): "<stage>_<preset>" where a size preset
    has its own (tiny: a stronger R1 for the base, a pixel MSE for the upsampler), else "<stage>"."""
    return losses.LOSS_PRESETS.get(f"{stage}_{preset}", losses.LOSS_PRESETS[stage])


def check_mode_seeking(cfg, loss_cfg, batch_gpu):
    """Mode seeking pairs two z of one caption inside a micro-batch of the base G."""
    if loss_cfg.mode_seeking_weight <= 0:
        return
    if cfg.stage != "base":
        raise FlagError(f"--loss.mode-seeking-weight is a term of the base G (its z); the {cfg.stage} "
                        "stage has none: drop the flag or use --stage base")
    if batch_gpu < 2:
        raise FlagError(f"--loss.mode-seeking-weight pairs images within a micro-batch of {batch_gpu}: "
                        "use --batch-gpu 2 or more")


def check_clip_tower(cfg, resolution):
    """The tiny CLIP is trained at the data's resolution; a ResNet tower needs a multiple of 32."""
    if cfg.clip_tower == "resnet" and resolution % 32:
        raise FlagError(f"--clip-tower resnet needs a resolution divisible by 32, got {resolution}: "
                        "use --clip-tower vit")


def print_help():
    print(__doc__)
    # the values `python train.py` runs with (the tiny preset), not the dataclasses' own defaults
    cfg, g_cfg, d_cfg, loss_cfg = parse_flags([])[:4]
    for title, prefix, values in (("train", "", cfg), ("generator", "g.", g_cfg), ("discriminator", "d.", d_cfg),
                                  ("losses", "loss.", loss_cfg),
                                  ("upsampler (--stage upsampler)", "u.", upsampler.U_PRESETS["tiny"])):
        print(f"{title} flags (tiny defaults):")
        for f in dataclasses.fields(values):
            print(f"  --{prefix}{f.name.replace('_', '-'):<24} {getattr(values, f.name)!r}")
    print(f"presets: {', '.join(TRAIN_PRESETS)}; --stage upsampler: tiny, full, with these train "
          f"settings changed: {json.dumps(UPSAMPLER_TRAIN_PRESETS)}")


# -----------------------------------------------------------------------------
# Processes, devices, determinism


@dataclass
class Runtime:
    device: torch.device
    rank: int        # this process's index (0 when not under torchrun)
    world: int       # number of processes
    autocast: typing.Any  # a context-manager factory for the forward passes
    started: float   # time.time() when this run began, for --max-minutes

    @property
    def main(self):  # rank 0 logs, snapshots and saves
        return self.rank == 0


def setup_runtime(cfg):
    """Device, torch.distributed under torchrun (gloo on CPU, nccl on GPU), autocast."""
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FlagError("--device cuda but no GPU is visible: use --device cpu")
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if name.startswith("cuda") else "gloo")
        rank = dist.get_rank()
        if name.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            name = f"cuda:{local}"
    device = torch.device(name)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None

    def autocast():
        # bf16 autocast works on CPU too, so the GPU path has a CPU-testable twin.
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    return Runtime(device, rank, world, autocast, started=time.time())


def seed_for(cfg, step, micro, phase):
    """The seed of one micro-batch of one phase of one step: independent of the rank."""
    torch.manual_seed(((cfg.seed * 1_000_003 + step) * 1009 + micro) * 17 + phase)


def micro_batches(cfg, rt):
    """Micro-batch size and this process's micro-batch ids, e.g. batch 16, batch_gpu 4, 2 ranks:
    ids (0, 2) on rank 0 and (1, 3) on rank 1."""
    batch_gpu = cfg.batch_gpu or cfg.batch_size // rt.world
    n_micro = cfg.batch_size // max(batch_gpu, 1)
    if batch_gpu <= 0 or n_micro * batch_gpu != cfg.batch_size or n_micro % rt.world:
        raise FlagError(f"--batch-size {cfg.batch_size} must be a multiple of --batch-gpu {batch_gpu} "
                        f"times the number of processes ({rt.world})")
    return batch_gpu, list(range(rt.rank, n_micro, rt.world))


class StepSampler(torch.utils.data.Sampler):
    """Yields this process's micro-batches of dataset indices, step after step.

    Sample number k of the run (k = step * batch_size + micro * batch_gpu + j) is dataset index
    perm_epoch[k % n], with a fresh seeded permutation per epoch, so the data order depends on
    (seed, step) only: the same for 1 or N processes and after --resume."""

    def __init__(self, n_items, cfg, batch_gpu, micros, start_step):
        self.n, self.cfg, self.batch_gpu, self.micros, self.start = n_items, cfg, batch_gpu, micros, start_step
        self._epoch, self._perm = -1, None

    def _index(self, k):
        epoch, i = divmod(k, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return int(self._perm[i])

    def __iter__(self):
        step = self.start
        while True:
            for micro in self.micros:
                first = step * self.cfg.batch_size + micro * self.batch_gpu
                yield [self._index(first + j) for j in range(self.batch_gpu)]
            step += 1


def make_batches(dataset, cfg, rt, batch_gpu, micros, start_step):
    """An endless iterator of (images (b, 3, R, R), captions) micro-batches for this process."""
    workers = cfg.workers if cfg.workers >= 0 else (0 if rt.device.type == "cpu" else 4)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        # Streaming shards: each process and worker reads its own shards (data.py splits them);
        # the order is then not tied to (seed, step) as it is for map-style data.
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_gpu, num_workers=workers,
                                             drop_last=True, pin_memory=rt.device.type == "cuda")
        for epoch in itertools.count():
            dataset.set_epoch(epoch)  # a new, still seeded, shard order every pass
            yield from loader
    sampler = StepSampler(len(dataset), cfg, batch_gpu, micros, start_step)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         pin_memory=rt.device.type == "cuda",
                                         persistent_workers=workers > 0)
    yield from loader


def reduce_grads(modules, rt):
    """Sum gradients over processes (each micro-batch loss is already scaled by
    batch_gpu / batch_size, so the sum is the global-batch mean). An explicit all-reduce
    rather than DDP: R1 differentiates through D's gradient, which DDP's hooks do not support."""
    if rt.world == 1:
        return
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # a branch unused this step: still take part in the all-reduce
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])  # one message, not one per tensor
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


@torch.no_grad()
def sync_buffers(modules, rt):
    """Average the floating-point buffers (the mapping network's running mean w_avg) over
    processes: each rank updated them from its own micro-batches, and ranks must stay identical."""
    if rt.world == 1:
        return
    for m in modules:
        for b in m.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b.div_(rt.world)


class MicroBuffers:
    """G's running buffers (the mapping network's w_avg), one chain of updates per micro-batch.

    w_avg moves at every forward in training mode. Were a step's micro-batches to move it one after
    the other, one process accumulating 2 micro-batches would end with another w_avg than 2
    processes of one micro-batch each (which sync_buffers averages). So each micro-batch goes on
    from the step's start value along its own chain, and the step ends with the mean of the chains
    (then the mean over processes): w_avg depends on the batch, not on how it is split."""

    def __init__(self, module):
        self.buffers = [b for b in module.buffers() if b.is_floating_point()]
        self.start, self.ends = None, {}

    @torch.no_grad()
    def enter(self, micro):
        """Before a forward of micro-batch `micro`: its own chain (the step's start value at first)."""
        if self.start is None:
            self.start = [b.clone() for b in self.buffers]
        for b, value in zip(self.buffers, self.ends.get(micro, self.start)):
            b.copy_(value)

    @torch.no_grad()
    def leave(self, micro):
        self.ends[micro] = [b.clone() for b in self.buffers]

    @torch.no_grad()
    def merge(self):
        """End of a step: every buffer <- the mean of its micro-batch chains."""
        for i, b in enumerate(self.buffers):
            b.copy_(sum(end[i] for end in self.ends.values()) / len(self.ends))
        self.start, self.ends = None, {}


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


# -----------------------------------------------------------------------------
# Checkpoints: plain dicts of state_dicts, written atomically


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train first, or point --ckpt/--out at a run directory")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:  # truncated, not a checkpoint
        raise FlagError(f"could not read {path} as a checkpoint ({type(err).__name__}): restore it from a copy, "
                        "or train in another --out") from None


# -----------------------------------------------------------------------------
# Stage "clip": the tiny CLIP everything is conditioned on when no pretrained one is at hand


def clip_spec(cfg):
    """--clip/--clip-pretrained -> a load_clip spec. `tiny` is the run's own <out>/clip.pt."""
    if cfg.clip == "tiny":
        return "tiny:" + os.path.join(cfg.out, "clip.pt")
    if cfg.clip_pretrained:
        if "/" in cfg.clip or cfg.clip.startswith("tiny"):
            raise FlagError(f"--clip-pretrained goes with a bare model name, not --clip {cfg.clip}")
        return f"{cfg.clip}/{cfg.clip_pretrained}"
    if "/" not in cfg.clip and not cfg.clip.startswith("tiny:"):
        raise FlagError(f"--clip {cfg.clip} needs a weights tag: --clip {cfg.clip}/TAG, or "
                        "--clip-pretrained none for random weights, or --clip tiny")
    return cfg.clip


VISION_CLIP = "vision_clip.pt"  # the ResNet-tower sibling of a tiny clip.pt, for the vision-aided D


def vision_clip_spec(cfg):
    """--vision-clip -> the load_clip spec of the vision-aided D's CLIP, or None: the text CLIP itself.

    `auto` (the default): a tiny CLIP with the ViT image tower (`--clip tiny --clip-tower vit`) gets
    a sibling with the ResNet image tower, `vision_clip.pt` beside its `clip.pt`, which this run
    trains itself (as --stage clip does); `--clip tiny:PATH` uses that sibling when it is there;
    any other --clip, and the tiny default's ResNet-tower CLIP, serve both roles (`same`).
    Why (project's choice; the paper, too, gives the vision-aided D its own CLIP, ViT-B/32 beside
    the ViT-L/14 of the text): the tiny ViT reads shape poorly (zero-shot 0.83, and it takes G's
    upright ellipses for triangles), the tiny ResNet reads it (0.99), and its features in the
    vision-aided D teach G shape (README, Status: shape 0.58-0.72 at step 2,000 against 0.37 with
    the ViT alone)."""
    if cfg.vision_clip == "same":
        return None
    if cfg.vision_clip != "auto":
        return cfg.vision_clip
    spec = clip_spec(cfg)
    if not spec.startswith("tiny:"):
        return None
    path = os.path.join(os.path.dirname(spec[len("tiny:"):]), VISION_CLIP)
    if cfg.clip == "tiny":  # this run trains its CLIP: a ResNet-tower one needs no sibling
        return None if cfg.clip_tower == "resnet" else "tiny:" + path
    same_file = os.path.abspath(path) == os.path.abspath(spec[len("tiny:"):])  # --clip tiny:DIR/vision_clip.pt
    return "tiny:" + path if os.path.isfile(path) and not same_file else None


def stored_clip_spec(spec, out):
    """How the checkpoint names a tiny CLIP: relative to the run directory when the file is in
    it or in a run beside it (`tiny:clip.pt`, `tiny:../tiny/clip.pt`: runs move together),
    absolute otherwise; sample.py resolves relative paths against the run directory."""
    if spec.startswith("tiny:"):
        path = os.path.abspath(spec[5:])
        rel = os.path.relpath(path, os.path.abspath(out))
        return "tiny:" + (path if rel.startswith(os.path.join(os.pardir, os.pardir)) else rel)
    return spec


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
# Logs, plots and snapshots (rank 0)


def log_row(cfg, row):
    with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def mean_stats(stats, rt):
    """{term: its values since the last log line} -> {term: mean}, averaged over every process
    too (all of them call this: an all-reduce), so a log line describes the global batch."""
    keys = sorted(stats)  # the same terms on every rank: they run the same code
    means = torch.tensor([sum(stats[k]) / len(stats[k]) for k in keys], dtype=torch.float64, device=rt.device)
    if rt.world > 1:
        dist.all_reduce(means)
        means /= rt.world
    return dict(zip(keys, means.tolist()))


def log_train_row(cfg, step, nimg, img_s, means):
    """One training log line: step, throughput and the mean of every loss term since the last one."""
    row = {"kind": "train", "step": step, "kimg": nimg / 1000, "img_s": img_s, **means}
    log_row(cfg, row)
    print(f"step {step:6d}  " + "  ".join(
        f"{k} {v:.3g}" for k, v in row.items() if k not in ("kind", "step", "kimg")), flush=True)


def plot_losses(cfg):
    """log.jsonl -> losses.png: one panel per logged term, against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(os.path.join(cfg.out, "log.jsonl"))]
    rows = [r for r in rows if r.get("kind") == "train"]
    keys = [k for k in rows[0] if k not in ("kind", "step", "kimg", "time", "img_s")] if rows else []
    if not keys:
        return None
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(4 * cols, 2.6 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
        ax.set_title(key, fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(cfg.out, "losses.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def snapshot_prompts(dataset, n=8):
    """A fixed set of prompts for the sample grids: the first n captions of the data set."""
    return [dataset[i][1] for i in range(n)]


@torch.no_grad()
def save_snapshot(cfg, G_ema, clip, prompts, z, step):
    """A grid: one row per prompt, one column per fixed z; the prompts go in a .txt beside it."""
    import torchvision
    tokens, mask, eot = clip.text_features([p for p in prompts for _ in range(len(z))])
    zz = z.repeat(len(prompts), 1)                                   # (rows * cols, z_dim)
    images = G_ema(zz, tokens, mask, eot, noise_mode="const")[0]     # finest level
    path = os.path.join(cfg.out, f"samples_{step:06d}.png")
    torchvision.utils.save_image(images.float().clamp(-1, 1) * 0.5 + 0.5, path, nrow=len(z), padding=1)
    with open(os.path.join(cfg.out, "samples_prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    return path


# -----------------------------------------------------------------------------
# Wrong captions for the matching-aware loss (Eq. 8)
#
# The paper pairs each image with another caption of the batch. Two random shapes captions
# almost always differ in several words, so D can reject most such pairs by their colour words
# and need not read the shape word (README, "Why the shape is missing"). With
# --hard-negatives F a share F of the rows instead gets its own caption with one attribute
# word changed (data.shapes_hard_negatives, the tiny CLIP's negatives): a pair D can only
# reject by checking that one attribute. This project's addition [U]; 0 (the default) is the paper's.
# Measured (README): shape-word edits for half the rows did not speed up learning the shape.

HARD_ATTRIBUTES = ("shape", "color", "background", "size", "position")  # shapes_hard_negatives' order


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


def caption_pairs(clip, captions, cfg):
    """Eq. 8's pairs of a micro-batch, from the text-feature cache: the right (tokens, mask, eot)
    triple, the wrong one, the (B,) mask of rows that really got a wrong caption, and the wrong
    captions themselves (for their CLIP embeddings, cached too)."""
    perm, valid = losses.mismatched_permutation(captions, return_valid=True)
    if not cfg.hard_negatives:                                  # the paper's: a shuffled batch
        text = clip.text_features(captions)                     # (b, L, D), (b, L), (b,)
        return text, losses.permute_text(text, perm), valid, [captions[j] for j in perm.tolist()]
    wrong_caps, valid = wrong_captions(captions, perm, cfg)    # some one-word edits (above)
    both = clip.text_features(captions + wrong_caps)            # one call: one padded length L
    b = len(captions)
    return tuple(x[:b] for x in both), tuple(x[b:] for x in both), valid, wrong_caps


# -----------------------------------------------------------------------------
# Stage "base": the text-to-image GAN


class NonFiniteLoss(RuntimeError):
    pass


class StopRequest:
    """Ctrl-C / SIGTERM: finish the current step, save, exit. A second Ctrl-C stops at once.

    A flag rather than an exception in the middle of a step, so the checkpoint always holds
    a consistent step (D, G, EMA and optimisers all updated, or none)."""

    def __init__(self):
        self.requested = False

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving, then exiting "
              "(Ctrl-C again to stop without saving)", flush=True)

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, rt):
        """Every process stops at the same step if any of them was asked to."""
        if rt.world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


TIME_RESERVE_S = 30.0  # --max-minutes: kept for the last step's snapshot, evaluation, checkpoint and plot


def out_of_time(cfg, rt):
    """--max-minutes: has this run (its CLIP training included) used its budget, less a reserve
    for the last step's outputs? The same answer on every process (the latest clock decides)."""
    if not cfg.max_minutes:
        return False
    late = time.time() - rt.started > 60 * cfg.max_minutes - TIME_RESERVE_S
    if rt.world > 1:
        flag = torch.tensor([float(late)], device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        late = bool(flag.item())
    return late


def budget_note(cfg, step):
    """The end message's word on a run that --max-minutes ended before --max-steps."""
    if step >= cfg.max_steps:
        return ""
    return (f" in the {cfg.max_minutes:g}-minute budget (--max-minutes), of {cfg.max_steps}; "
            f"`--resume` trains on from here")


def exit_interrupted(rt, checkpoint, step, ckpt_path):
    """Ctrl-C / SIGTERM, agreed by every process after a finished step: save, then exit 130."""
    if rt.main:
        checkpoint()
        print(f"interrupted: saved step {step} to {ckpt_path}; continue with --resume", flush=True)
    raise SystemExit(130)


def exit_nonfinite(rt, err, ckpt_path):
    """A NaN/inf loss: keep the last good checkpoint (nothing is saved now), say what to try, exit 1."""
    if rt.main:
        print(f"stopping: {err}. The last good checkpoint ({ckpt_path}) is kept; try a lower "
              "--lr-g/--lr-d, --dtype float32, or a larger --loss.r1-gamma", file=sys.stderr)
    raise SystemExit(1)


def check_finite(loss, what, step):
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"{what} loss is {loss.item()} at step {step}")


def frozen_clip(cfg, rt, resolution, dataset, vision=False):
    """The run's frozen CLIP (--clip). With --clip tiny, its files are trained first when missing
    (<out>/clip.pt, and with `vision` the vision-aided D's <out>/vision_clip.pt: see vision_clip_spec)."""
    spec = clip_spec(cfg)
    if cfg.clip == "tiny":
        train_clip_stage(cfg, resolution, rt, dataset, vision=vision, only_missing=True)  # cached
    elif spec.startswith("tiny:") and not os.path.isfile(spec[5:]):
        raise FileNotFoundError(f"no tiny CLIP at {spec[5:]}: train one with python train.py --stage clip")
    return spec, clip_lib.load_clip(spec, device=rt.device)        # frozen, never saved in checkpoints


def check_resumable(ckpt, path, stage, preset, models):
    """A checkpoint continues only the same stage, preset and model configurations.
    models: {config key ("G", "U", "D"): (this run's config dict, its dataclass)}. A field added
    to a dataclass since the checkpoint was written counts at its default."""
    found = ckpt["config"].get("stage", "base")
    if found != stage:
        article = "an" if found[0] in "aeiou" else "a"
        raise FlagError(f"{path} is {article} {found}-stage run, not a {stage}-stage one: resume it with "
                        f"--stage {found}, or use another --out")
    stored_preset = ckpt["config"]["train"]["preset"]
    if stored_preset != preset:
        raise FlagError(f"{path} is a {stored_preset!r} run, not a {preset!r} one: resume it with "
                        f"--preset {stored_preset}, or use another --out")
    for key, (config, config_cls) in models.items():
        stored = ckpt["config"].get(key)
        try:
            stored = dataclasses.asdict(config_cls(**stored))
        except (TypeError, ValueError, AssertionError):  # a field this version no longer has, or a bad value
            raise FlagError(f"{path} holds a {key} configuration this version of the code cannot read: "
                            "resume it with the code that wrote it, or use another --out") from None
        changed = [f"{name} {stored[name]} -> {config[name]}" for name in config if stored[name] != config[name]]
        if changed:
            flag = {"G": "--g", "U": "--u", "D": "--d"}[key]
            raise FlagError(f"{path} is a {stored_preset!r} run with another {key} configuration "
                            f"({', '.join(changed)}): resume it with the same {flag}.* flags, or use another --out")


def open_resume(cfg, stage, models, clip_specs, vision_aided=None):
    """--resume: read <out>/checkpoint.pt and check, before any CLIP is trained or config.json
    rewritten, that this run can continue it: the same stage, preset and model configurations
    (check_resumable), the same CLIPs (their files still there: a tiny CLIP trained anew would
    give other features than the ones G and D learned on), and the vision-aided D on or off as
    before. clip_specs: {checkpoint key: load_clip spec}. -> the checkpoint, or None without --resume."""
    if not cfg.resume:
        return None
    path = os.path.join(cfg.out, "checkpoint.pt")
    if not os.path.isfile(path):
        raise FlagError(f"no checkpoint at {path} to resume: drop --resume to start a new run there, "
                        "or point --out at the run directory")
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, path, stage, cfg.preset, models)
    for key, spec in clip_specs.items():
        if spec.startswith("tiny:") and not os.path.isfile(spec[5:]):
            raise FlagError(f"{spec[5:]} is missing: {path} was trained on the features of that tiny CLIP, "
                            "and one trained anew would not give them; put the file back to resume")
        stored = ckpt.get(key)
        if stored is not None and stored != stored_clip_spec(spec, cfg.out):
            flags = "--vision-clip and --clip-tower" if key == "vision_clip" else "--clip"
            raise FlagError(f"{path} was trained with {key.replace('_', ' ')} {stored}, this run would use "
                            f"{stored_clip_spec(spec, cfg.out)}: resume with the {flags} of that run")
        fingerprint = ckpt.get("clip_sha", {}).get(key)  # None in runs saved before fingerprints existed
        if fingerprint is not None and fingerprint != clip_lib.tiny_clip_fingerprint(spec):
            raise FlagError(f"{spec[5:]} is not the tiny CLIP {path} was trained with (its file changed since, "
                            "e.g. trained anew): put the run's own file back to resume")
    if vision_aided is not None and bool(ckpt.get("VD")) != vision_aided:
        was = "with" if ckpt.get("VD") else "without"
        raise FlagError(f"{path} was trained {was} the vision-aided D: resume with "
                        f"--loss.vision-weight {'> 0' if ckpt.get('VD') else '0'}, as that run")
    return ckpt


def train_base(cfg, g_cfg, d_cfg, loss_cfg, rt, dataset, ckpt=None):
    """The base text-to-image GAN; ckpt: the checkpoint to continue (open_resume), or None."""
    device = rt.device
    spec, clip = frozen_clip(cfg, rt, g_cfg.resolution, dataset, vision=loss_cfg.vision_weight > 0)
    vspec = vision_clip_spec(cfg) if loss_cfg.vision_weight > 0 else None  # None: `clip` serves the vision-aided D
    vclip = clip if vspec is None else clip_lib.load_clip(vspec, device=device)
    if cfg.dtype == "bfloat16":  # frozen image towers: cast once, not by autocast at every pass
        clip.image_tower_to(torch.bfloat16)
        vclip.image_tower_to(torch.bfloat16)  # the same object when there is no --vision-clip

    # ---- models and optimisers
    torch.manual_seed(cfg.seed)
    G = generator.Generator(g_cfg, text_dim=clip.text_width).to(device)
    D = discriminator.Discriminator(d_cfg, text_dim=clip.text_width).to(device)
    VD = None
    if loss_cfg.vision_weight > 0:
        VD = discriminator.VisionAidedDiscriminator(vclip.feature_channels, vclip.embed_dim, hidden=d_cfg.vision_hidden,
                                                    psi_layers=d_cfg.vision_psi_layers).to(device)
    G_ema = generator.Generator(g_cfg, text_dim=clip.text_width).to(device).eval().requires_grad_(False)
    G_ema.load_state_dict(G.state_dict())
    d_modules = [m for m in (D, VD) if m is not None]
    betas = (cfg.beta1, cfg.beta2)
    # AdamW with weight decay 0.01 on attention weights only (paper), 0 elsewhere.
    opt_G = torch.optim.AdamW(attention.attention_param_groups(G), lr=cfg.lr_g, betas=betas)
    opt_D = torch.optim.AdamW([g for m in d_modules for g in attention.attention_param_groups(m)],
                              lr=cfg.lr_d, betas=betas)
    # Compiled forwards for the D and G steps; R1 keeps the eager D: its penalty is a gradient of
    # a gradient, which torch.compile's backward does not support.
    G_fwd, D_fwd = (torch.compile(G), torch.compile(D)) if cfg.compile else (G, D)

    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    fingerprints = {"clip": clip_lib.tiny_clip_fingerprint(spec),         # tiny CLIP files: checked on resume
                    "vision_clip": clip_lib.tiny_clip_fingerprint(vspec or spec)}
    config = {"train": dataclasses.asdict(cfg), "G": dataclasses.asdict(g_cfg),
              "D": dataclasses.asdict(d_cfg), "loss": dataclasses.asdict(loss_cfg)}
    step, nimg = 0, 0
    if ckpt is not None:  # checked by open_resume: same configurations, CLIPs and vision-aided D
        G.load_state_dict(ckpt["G"]); G_ema.load_state_dict(ckpt["G_ema"]); D.load_state_dict(ckpt["D"])
        if VD is not None:
            VD.load_state_dict(ckpt["VD"])
        opt_G.load_state_dict(ckpt["opt_G"]); opt_D.load_state_dict(ckpt["opt_D"])
        step, nimg = ckpt["step"], ckpt["nimg"]
        if rt.main:
            print(f"resumed {ckpt_path} at step {step}")

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "G": G.state_dict(), "G_ema": G_ema.state_dict(), "D": D.state_dict(),
            "VD": VD.state_dict() if VD is not None else {},
            "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
            "step": step, "nimg": nimg, "config": config, "clip": stored_clip_spec(spec, cfg.out),
            "vision_clip": stored_clip_spec(vspec or spec, cfg.out), "clip_sha": fingerprints})

    if rt.main:
        n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (G, D))
        n_vd = sum(p.numel() for p in VD.parameters()) if VD is not None else 0
        print(f"G {n_g / 1e6:.2f}M params, D {n_d / 1e6:.2f}M, vision-aided D {n_vd / 1e6:.2f}M"
              f"{f' on CLIP {vspec}' if vspec else ''}, CLIP {spec} (text width {clip.text_width}), "
              f"{rt.world} process(es) on {device}")
    batch_gpu, micros = micro_batches(cfg, rt)
    batches = make_batches(dataset, cfg, rt, batch_gpu, micros, step)
    levels = len(g_cfg.scales)                                     # pyramid levels: 4 at 32 px, 5 at 64 px
    snap_prompts = snapshot_prompts(dataset)
    snap_z = torch.randn(4, g_cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    scale = batch_gpu / cfg.batch_size     # each micro-batch's share of the global-batch mean
    w_avgs = MicroBuffers(G)               # w_avg: one chain per micro-batch, their mean per step
    stats, t_log, n_log = {}, time.time(), 0

    def condition(captions):
        """Everything the losses need to know about a micro-batch's captions, from the cache:
        CLIP tokens, the wrong-caption triple (Eq. 8) and which rows really got a wrong
        caption, and the CLIP text embeddings (right and wrong) for the CLIP/vision losses."""
        text, wrong, valid, wrong_caps = caption_pairs(clip, captions, cfg)
        embeds = (clip.embed_text(captions), clip.embed_text(wrong_caps))  # (b, E) each, cached
        v_embeds = embeds if vclip is clip else (vclip.embed_text(captions), vclip.embed_text(wrong_caps))
        return text, wrong, valid.to(device), (*embeds, *v_embeds)         # v_: the vision-aided D's CLIP

    def add_stats(logs):
        for k, v in logs.items():
            stats.setdefault(k, []).append(float(v))

    with StopRequest() as stop:
        try:
            while step < cfg.max_steps:
                # The micro-batches of this step (the same images and captions serve D and G).
                work = []
                for micro in micros:
                    images, captions = next(batches)
                    work.append((micro, images.to(device, non_blocking=True), list(captions)))

                # ---- D step: real images with their own captions are real; generated images,
                # and real images with a wrong caption (matching-aware, Eq. 8), are fake.
                G.requires_grad_(False); [m.requires_grad_(True) for m in d_modules]
                opt_D.zero_grad(set_to_none=True)
                do_r1 = loss_cfg.r1_gamma > 0 and step % loss_cfg.r1_interval == 0
                for micro, reals, captions in work:
                    seed_for(cfg, step, micro, phase=0)
                    text, wrong, valid, embeds = condition(captions)
                    z = torch.randn(len(captions), g_cfg.z_dim, device=device)
                    w_avgs.enter(micro)
                    with rt.autocast(), torch.no_grad():
                        fakes = G_fwd(z, *text)                               # pyramid, finest first
                    w_avgs.leave(micro)
                    real_pyr = image_pyramid(reals, levels)
                    with rt.autocast():
                        loss, logs = losses.discriminator_loss(
                            D_fwd, real_pyr, fakes, text, wrong, loss_cfg, wrong_valid=valid,
                            clip=vclip, vd=VD, text_embed=embeds[2], wrong_text_embed=embeds[3])
                    check_finite(loss, "D", step)
                    (loss * scale).backward()
                    add_stats(logs)
                reduce_grads(d_modules, rt)
                opt_D.step()

                # ---- lazy R1 (StyleGAN2): every r1_interval steps, gamma/2 * E||grad_x D(x, c)||^2
                # over every level of the real pyramid, scaled by the interval; its own D step.
                if do_r1:
                    opt_D.zero_grad(set_to_none=True)
                    for micro, reals, captions in work:
                        text = clip.text_features(captions)
                        with rt.autocast():
                            loss, logs = losses.lazy_r1_loss(D, image_pyramid(reals, levels), text, loss_cfg)
                        check_finite(loss, "R1", step)
                        (loss * scale).backward()
                        add_stats(logs)
                    reduce_grads([D], rt)
                    opt_D.step()

                # ---- G step: fool D with the right caption (adversarial), be recognisably
                # *this* caption's image (matching-aware), match it in CLIP space (Eq. 9), fool
                # the vision-aided D.
                G.requires_grad_(True); [m.requires_grad_(False) for m in d_modules]
                opt_G.zero_grad(set_to_none=True)
                for micro, reals, captions in work:
                    seed_for(cfg, step, micro, phase=1)
                    if loss_cfg.mode_seeking_weight > 0:  # rows i and P + i: one caption, two z
                        captions = losses.mode_seeking_captions(captions)
                    text, wrong, valid, embeds = condition(captions)
                    z = torch.randn(len(captions), g_cfg.z_dim, device=device)
                    w_avgs.enter(micro)
                    with rt.autocast():
                        fakes = G_fwd(z, *text)
                        w_avgs.leave(micro)
                        loss, logs = losses.generator_loss(
                            D_fwd, fakes, text, wrong, loss_cfg, wrong_valid=valid, clip=clip, vd=VD,
                            text_embed=embeds[0], wrong_text_embed=embeds[1],
                            vision_clip=vclip, vision_text_embed=embeds[2], vision_wrong_text_embed=embeds[3],
                            caption_ids=losses.caption_ids(captions).to(device), z=z)
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

                # ---- logs, snapshots, evaluation, checkpoints (rank 0)
                n_log += cfg.batch_size
                if step % cfg.log_every == 0 or last:
                    means = mean_stats(stats, rt)                       # every rank takes part
                    if rt.main:
                        log_train_row(cfg, step, nimg, n_log / (time.time() - t_log), means)
                    stats, t_log, n_log = {}, time.time(), 0
                t_aux = time.time()  # time spent below is not training: keep it out of img/s
                if rt.main and (step % cfg.snapshot_every == 0 or last):
                    save_snapshot(cfg, G_ema, clip, snap_prompts, snap_z, step)
                if rt.main and cfg.eval_every and (step % cfg.eval_every == 0 or last):
                    metrics = sample_lib().evaluate(G_ema, clip, dataset, n=cfg.eval_images,
                                                    shapes=cfg.data == "shapes")
                    log_row(cfg, {"kind": "eval", "step": step, **metrics})
                    print("eval  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
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
        plot = plot_losses(cfg)
        print(f"done: {step} steps{budget_note(cfg, step)}. checkpoint {ckpt_path}; samples {cfg.out}/samples_*.png "
              f"(prompts in samples_prompts.txt); loss curves {plot}; log {cfg.out}/log.jsonl")
    return G_ema


# -----------------------------------------------------------------------------
# Stage "upsampler": the text-conditioned GAN upsampler (06_upsampler.py, paper Sec. 3.5)


@torch.no_grad()
def save_upsampler_snapshot(cfg, U_ema, clip, lowres, reals, prompts, step):
    """A grid, one row per fixed (image, prompt): bicubic of the low-res input | U_ema's | real."""
    import torchvision
    R = U_ema.cfg.out_resolution
    z = torch.randn(len(prompts), U_ema.cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed))
    out = U_ema(lowres, z.to(lowres.device), *clip.text_features(prompts), noise_mode="const")[0]  # (n, 3, R, R)
    bicubic = upsampler.resize(lowres, R)                                # (n, 3, R, R)
    rows = torch.stack([bicubic, out, reals], dim=1).flatten(0, 1)       # (3n, 3, R, R) row-major
    path = os.path.join(cfg.out, f"samples_{step:06d}.png")
    torchvision.utils.save_image(rows.float().clamp(-1, 1) * 0.5 + 0.5, path, nrow=3, padding=1)
    with open(os.path.join(cfg.out, "samples_prompts.txt"), "w") as f:
        f.write("columns: bicubic | upsampled | real\n" + "\n".join(prompts) + "\n")
    return path


def build_lpips(cfg, rt):
    """The LPIPS module of the G step; a missing pretrained backbone raises MissingWeightsError
    (one line naming --lpips random). Seeded: a random backbone is the same in every run."""
    if cfg.lpips == "random" and rt.main:
        print("note: --lpips random: LPIPS on a randomly initialised AlexNet backbone (a distance, not a "
              "perceptual one), because pretrained weights cannot be downloaded here; --lpips vgg is the paper's")
    torch.manual_seed(cfg.seed)
    return losses.LPIPS(cfg.lpips).to(rt.device).eval()


def train_upsampler(cfg, u_cfg, d_cfg, loss_cfg, rt, dataset, ckpt=None):
    """Train U on (make_lowres(real), real) pairs of `dataset` (real images at U's output size).

    The same flat loop as train_base, step for step; what differs: the generator's input is
    a real image made small (z still varies the detail), the real pyramid is that of the
    high-res image, there is no vision-aided D, and the G step adds lpips_weight * LPIPS."""
    device = rt.device
    lpips = build_lpips(cfg, rt)                                    # fails fast, before CLIP training
    lowres_data = data.build_dataset(cfg.data, u_cfg.in_resolution, seed=cfg.seed) if cfg.clip == "tiny" else None
    if cfg.clip == "tiny" and not os.path.isfile(os.path.join(cfg.out, "clip.pt")) and rt.main:
        print(f"note: no tiny CLIP in {cfg.out}: training one first, as --stage clip does (minutes on a CPU); "
              f"--clip tiny:runs/{cfg.preset}/clip.pt conditions on the base run's CLIP instead")
    spec, clip = frozen_clip(cfg, rt, u_cfg.in_resolution, lowres_data)  # a tiny CLIP as --stage clip makes it

    # ---- models and optimisers
    torch.manual_seed(cfg.seed)
    U = upsampler.Upsampler(u_cfg, text_dim=clip.text_width).to(device).train()  # train(): noise augmentation on
    D = discriminator.Discriminator(d_cfg, text_dim=clip.text_width).to(device)
    U_ema = upsampler.Upsampler(u_cfg, text_dim=clip.text_width).to(device).eval().requires_grad_(False)
    U_ema.load_state_dict(U.state_dict())
    betas = (cfg.beta1, cfg.beta2)
    opt_G = torch.optim.AdamW(attention.attention_param_groups(U), lr=cfg.lr_g, betas=betas)
    opt_D = torch.optim.AdamW(attention.attention_param_groups(D), lr=cfg.lr_d, betas=betas)
    opt_W = torch.optim.AdamW(attention.attention_param_groups(U), lr=cfg.warmup_lr, betas=(0.9, 0.99))  # warm-up
    U_fwd, D_fwd = (torch.compile(U), torch.compile(D)) if cfg.compile else (U, D)  # R1: eager D, as in the base stage

    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    fingerprints = {"clip": clip_lib.tiny_clip_fingerprint(spec)}
    config = {"train": dataclasses.asdict(cfg), "U": dataclasses.asdict(u_cfg), "D": dataclasses.asdict(d_cfg),
              "loss": dataclasses.asdict(loss_cfg), "stage": "upsampler"}
    step, nimg = 0, 0
    if ckpt is not None:  # checked by open_resume
        U.load_state_dict(ckpt["G"]); U_ema.load_state_dict(ckpt["G_ema"]); D.load_state_dict(ckpt["D"])
        opt_G.load_state_dict(ckpt["opt_G"]); opt_D.load_state_dict(ckpt["opt_D"])
        if "opt_W" in ckpt:                              # runs saved before the warm-up existed have none
            opt_W.load_state_dict(ckpt["opt_W"])
        step, nimg = ckpt["step"], ckpt["nimg"]
        if rt.main:
            print(f"resumed {ckpt_path} at step {step}")

    def checkpoint():
        # the upsampler is stored under G / G_ema, as the base model: one checkpoint layout
        save_checkpoint(ckpt_path, {
            "G": U.state_dict(), "G_ema": U_ema.state_dict(), "D": D.state_dict(),
            "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(), "opt_W": opt_W.state_dict(),
            "step": step, "nimg": nimg, "config": config, "clip": stored_clip_spec(spec, cfg.out),
            "clip_sha": fingerprints})

    r, R = u_cfg.in_resolution, u_cfg.out_resolution
    if rt.main:
        n_u, n_d = (sum(p.numel() for p in m.parameters()) for m in (U, D))
        print(f"U {n_u / 1e6:.2f}M params ({r} -> {R} px), D {n_d / 1e6:.2f}M, LPIPS {cfg.lpips} "
              f"(weight {loss_cfg.lpips_weight}), pixel MSE weight {loss_cfg.pixel_weight}, "
              f"{min(cfg.warmup_steps, cfg.max_steps)} warm-up steps, CLIP {spec} (text width {clip.text_width}), "
              f"{rt.world} process(es) on {device}")
    batch_gpu, micros = micro_batches(cfg, rt)
    batches = make_batches(dataset, cfg, rt, batch_gpu, micros, step)
    levels = u_cfg.levels                                          # pyramid levels R .. 4 px: 6 at 128 px
    # held-out images for the metrics and snapshots: fresh shapes (another seed), else a seeded subset
    held = data.build_dataset(cfg.data, R, seed=cfg.seed + 1) if cfg.data == "shapes" else dataset
    eval_hr, eval_captions = sample_lib().eval_pairs(held, max(cfg.eval_images, 4))
    eval_hr = eval_hr.to(device)                                   # (n, 3, R, R)
    eval_lr = upsampler.make_lowres(eval_hr, r)                    # (n, 3, r, r)
    scale = batch_gpu / cfg.batch_size
    w_avgs = MicroBuffers(U)                                       # as in train_base
    stats, t_log, n_log = {}, time.time(), 0

    def condition(captions):
        """CLIP tokens, the wrong-caption triple (Eq. 8) and its valid rows, CLIP text embeddings."""
        text, wrong, valid, wrong_caps = caption_pairs(clip, captions, cfg)
        return text, wrong, valid.to(device), clip.embed_text(captions), clip.embed_text(wrong_caps)

    def add_stats(logs):
        for k, v in logs.items():
            stats.setdefault(k, []).append(float(v))

    with StopRequest() as stop:
        try:
            while step < cfg.max_steps:
                work = []
                for micro in micros:
                    images, captions = next(batches)
                    reals = images.to(device, non_blocking=True)                    # (b, 3, R, R)
                    work.append((micro, reals, upsampler.make_lowres(reals, r), list(captions)))

                if step < cfg.warmup_steps:
                    # ---- reconstruction warm-up (ESRGAN-style, this project's choice [U]): U alone,
                    # pixel MSE to the real image, its own Adam; no input noise and no noise inputs
                    # (a pixel loss cannot predict random detail: it would teach U to switch it off)
                    U.requires_grad_(True)
                    opt_W.zero_grad(set_to_none=True)
                    for micro, reals, lowres, captions in work:
                        seed_for(cfg, step, micro, phase=1)
                        z = torch.randn(len(captions), u_cfg.z_dim, device=device)
                        w_avgs.enter(micro)
                        with rt.autocast():
                            out = U_fwd(lowres, z, *clip.text_features(captions), noise_aug=0.0, noise_mode="none")
                        w_avgs.leave(micro)
                        loss = (out[0].float() - reals).square().mean()          # the finest level, (b, 3, R, R)
                        check_finite(loss, "warm-up", step)
                        (loss * scale).backward()
                        add_stats({"W/mse": loss.detach()})
                    reduce_grads([U], rt)
                    opt_W.step()
                    w_avgs.merge()
                    sync_buffers([U], rt)
                else:
                    # ---- D step: (real, c) real; (U(x_lr), c), (real, c^), (U(x_lr), c^) fake.
                    U.requires_grad_(False); D.requires_grad_(True)
                    opt_D.zero_grad(set_to_none=True)
                    do_r1 = loss_cfg.r1_gamma > 0 and step % loss_cfg.r1_interval == 0
                    for micro, reals, lowres, captions in work:
                        seed_for(cfg, step, micro, phase=0)
                        text, wrong, valid, _, _ = condition(captions)
                        z = torch.randn(len(captions), u_cfg.z_dim, device=device)
                        w_avgs.enter(micro)
                        with rt.autocast(), torch.no_grad():
                            fakes = U_fwd(lowres, z, *text)                     # pyramid, finest first; noisy x_lr
                        w_avgs.leave(micro)
                        with rt.autocast():
                            loss, logs = losses.discriminator_loss(D_fwd, image_pyramid(reals, levels), fakes,
                                                                   text, wrong, loss_cfg, wrong_valid=valid)
                        check_finite(loss, "D", step)
                        (loss * scale).backward()
                        add_stats(logs)
                    reduce_grads([D], rt)
                    opt_D.step()

                    # ---- lazy R1 on the real high-res pyramid, every r1_interval steps
                    if do_r1:
                        opt_D.zero_grad(set_to_none=True)
                        for micro, reals, lowres, captions in work:
                            with rt.autocast():
                                loss, logs = losses.lazy_r1_loss(D, image_pyramid(reals, levels),
                                                                 clip.text_features(captions), loss_cfg)
                            check_finite(loss, "R1", step)
                            (loss * scale).backward()
                            add_stats(logs)
                        reduce_grads([D], rt)
                        opt_D.step()

                    # ---- G step: fool D with the right caption, matching-aware, (CLIP if weighted),
                    # and lpips_weight * LPIPS(U(x_lr), real): stay close to this very image.
                    U.requires_grad_(True); D.requires_grad_(False)
                    opt_G.zero_grad(set_to_none=True)
                    for micro, reals, lowres, captions in work:
                        seed_for(cfg, step, micro, phase=1)
                        text, wrong, valid, embed, wrong_embed = condition(captions)
                        z = torch.randn(len(captions), u_cfg.z_dim, device=device)
                        use_clip = loss_cfg.clip_weight > 0
                        w_avgs.enter(micro)
                        with rt.autocast():
                            fakes = U_fwd(lowres, z, *text)
                            w_avgs.leave(micro)
                            loss, logs = losses.generator_loss(
                                D_fwd, fakes, text, wrong, loss_cfg, wrong_valid=valid,
                                clip=clip if use_clip else None, text_embed=embed, wrong_text_embed=wrong_embed,
                                caption_ids=losses.caption_ids(captions).to(device), lpips=lpips, lpips_target=reals)
                        check_finite(loss, "G", step)
                        (loss * scale).backward()
                        add_stats(logs)
                    reduce_grads([U], rt)
                    opt_G.step()
                    w_avgs.merge()
                    sync_buffers([U], rt)

                # ---- EMA of U
                step += 1
                nimg += cfg.batch_size
                update_ema(U_ema, U, cfg, nimg)
                last = step == cfg.max_steps or out_of_time(cfg, rt)  # --max-minutes ends a run early

                # ---- logs, snapshots, evaluation, checkpoints (rank 0)
                n_log += cfg.batch_size
                if step % cfg.log_every == 0 or last:
                    means = mean_stats(stats, rt)                       # every rank takes part
                    if rt.main:
                        log_train_row(cfg, step, nimg, n_log / (time.time() - t_log), means)
                    stats, t_log, n_log = {}, time.time(), 0
                t_aux = time.time()
                if rt.main and (step % cfg.snapshot_every == 0 or last):
                    save_upsampler_snapshot(cfg, U_ema, clip, eval_lr[:4], eval_hr[:4], eval_captions[:4], step)
                if rt.main and cfg.eval_every and (step % cfg.eval_every == 0 or last):
                    metrics = upsampler.upsampling_metrics(U_ema, eval_lr, eval_hr, *clip.text_features(eval_captions))
                    log_row(cfg, {"kind": "eval", "step": step, **metrics})
                    print(f"eval  mae {metrics['mae']:.4f} (bicubic {metrics['mae_bicubic']:.4f}, ratio "
                          f"{metrics['mae'] / max(metrics['mae_bicubic'], 1e-12):.2f})  sharpness "
                          f"{metrics['sharpness']:.4f} (bicubic {metrics['sharpness_bicubic']:.4f}, "
                          f"real {metrics['sharpness_real']:.4f})", flush=True)
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
        check_in_sync([U, D], rt)
    if rt.main:
        plot = plot_losses(cfg)
        print(f"done: {step} steps{budget_note(cfg, step)}. checkpoint {ckpt_path}; snapshots {cfg.out}/samples_*.png (bicubic | "
              f"upsampled | real); loss curves {plot}; log {cfg.out}/log.jsonl")
    return U_ema


def image_pyramid(images, levels):
    """Real images -> the pyramid D sees, finest first: repeated anti-aliased 2x downsampling."""
    pyramid = [images]                                                   # (b, 3, R, R)
    for _ in range(levels - 1):
        pyramid.append(kernels.downsample2x(pyramid[-1]))                 # (b, 3, R/2^i, R/2^i)
    return pyramid


def check_in_sync(modules, rt):
    """All processes must hold the same weights: compare a checksum across ranks."""
    total = torch.stack([sum(t.double().sum() for t in [*m.parameters(), *m.buffers()] if t.is_floating_point())
                         for m in modules]).to(rt.device)
    gathered = [torch.zeros_like(total) for _ in range(rt.world)]
    dist.all_gather(gathered, total)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"processes out of sync: weight checksums {[g.tolist() for g in gathered]}")
    if rt.main:
        print(f"weights identical across {rt.world} processes")


def sample_lib():
    return importlib.import_module("sample")


# -----------------------------------------------------------------------------
# --dry-run: sizes and memory of a configuration without building it for real


def activation_bytes_per_image(module, batch, *inputs):
    """Sum of the outputs of every leaf module for one forward pass on the meta device:
    a rough upper bound of what autograd keeps for the backward pass, per image."""
    total = [0]
    hooks = [m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + (
        o.numel() if torch.is_tensor(o) else 0))) for m in module.modules() if not list(m.children())]
    with torch.no_grad():
        module(*inputs)
    for h in hooks:
        h.remove()
    return total[0] / batch


def frozen_clip_bytes(cfg):
    """Memory of the frozen CLIP(s) a base run holds: open_clip models built on the meta device
    (no weights read); text towers in float32, image towers in the run's dtype (image_tower_to).
    -> {model name: bytes}; tiny CLIPs (a few MB) and names open_clip does not know are left out."""
    out = {}
    for spec in dict.fromkeys([cfg.clip, vision_clip_spec(cfg) or cfg.clip]):
        name = spec.split("/")[0]
        if name not in clip_lib.open_clip.list_models():
            continue
        logging.disable(logging.WARNING)  # open_clip warns "initialized randomly": here on purpose, only counted
        try:
            model = clip_lib.open_clip.create_model(name, pretrained=None, device="meta")
        finally:
            logging.disable(logging.NOTSET)
        n_image = sum(p.numel() for p in model.visual.parameters())
        n_text = sum(p.numel() for p in model.parameters()) - n_image
        out[name] = 4 * n_text + (2 if cfg.dtype == "bfloat16" else 4) * n_image
    return out


def dry_run(cfg, g_cfg, d_cfg, loss_cfg, rt):
    text_dim = {"ViT-L-14": 768, "ViT-B-32": 512, "ViT-B-16": 512, "ViT-H-14": 1024}.get(
        cfg.clip.split("/")[0], 128)  # width of the CLIP text tower's token features
    with torch.device("meta"):
        G = generator.Generator(g_cfg, text_dim=text_dim)
        D = discriminator.Discriminator(d_cfg, text_dim=text_dim)
        n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (G, D))
        b, L = 2, 77
        tokens, eot = torch.zeros(b, L, text_dim), torch.full((b,), L - 1, dtype=torch.long)
        mask = torch.ones(b, L, dtype=torch.bool)
        z = torch.zeros(b, g_cfg.z_dim)
        act_g = activation_bytes_per_image(G, b, z, tokens, mask, eot)
        pyramid = G(z, tokens, mask, eot)
        act_d = activation_bytes_per_image(D, b, pyramid, tokens, mask, eot)
    batch_gpu = cfg.batch_gpu or cfg.batch_size
    act_size = 2 if cfg.dtype == "bfloat16" else 4
    # fp32 weights + grads + two Adam moments = 16 bytes per trained parameter; G_ema 4 more.
    state = 16 * (n_g + n_d) + 4 * n_g
    # G step keeps G's and D's activations; D step keeps D's on 3 batches (real, fake, mismatched).
    acts = batch_gpu * act_size * max(act_g + act_d, 3 * act_d)
    clips = frozen_clip_bytes(cfg)  # frozen, no gradients or Adam state
    gpus = max(1, cfg.batch_size // batch_gpu)
    print(f"G {n_g / 1e6:.1f}M parameters, D {n_d / 1e6:.1f}M (paper: 652.5M and 381.4M for full)")
    print(f"memory per GPU, roughly: {state / 2**30:.1f} GiB weights+grads+Adam+EMA, "
          f"{acts / 2**30:.1f} GiB activations at --batch-gpu {batch_gpu} ({cfg.dtype}), "
          f"{sum(clips.values()) / 2**30:.1f} GiB frozen CLIP ({', '.join(clips) or 'tiny'})")
    print(f"launch: torchrun --nproc_per_node={min(gpus, 8)} --nnodes={-(-gpus // 8)} train.py --preset {cfg.preset} "
          f"--batch-size {cfg.batch_size} --batch-gpu {batch_gpu} --data 'shards/{{00000..09999}}.tar'")
    print(json.dumps({"G_params": n_g, "D_params": n_d, "batch_size": cfg.batch_size,
                      "batch_gpu": batch_gpu, "clip_gib": round(sum(clips.values()) / 2**30, 2),
                      "est_gib_per_gpu": round((state + acts + sum(clips.values())) / 2**30, 2)}))


def dry_run_upsampler(cfg, u_cfg, d_cfg, rt):
    """--stage upsampler --dry-run: U and its D on the meta device (and the base model's counts)."""
    text_dim = {"ViT-L-14": 768, "ViT-B-32": 512, "ViT-B-16": 512, "ViT-H-14": 1024}.get(
        cfg.clip.split("/")[0], 128)  # width of the CLIP text tower's token features
    r = u_cfg.in_resolution
    with torch.device("meta"):
        n_g = sum(p.numel() for p in generator.Generator(generator.G_PRESETS[cfg.preset], text_dim).parameters())
        n_bd = sum(p.numel() for p in discriminator.Discriminator(discriminator.D_PRESETS[cfg.preset],
                                                                  text_dim).parameters())
        U = upsampler.Upsampler(u_cfg, text_dim=text_dim).train()
        D = discriminator.Discriminator(d_cfg, text_dim=text_dim)
        n_u, n_d = (sum(p.numel() for p in m.parameters()) for m in (U, D))
        b, L = 2, 77
        tokens, eot = torch.zeros(b, L, text_dim), torch.full((b,), L - 1, dtype=torch.long)
        mask = torch.ones(b, L, dtype=torch.bool)
        lowres, z = torch.zeros(b, 3, r, r), torch.zeros(b, u_cfg.z_dim)
        act_u = activation_bytes_per_image(U, b, lowres, z, tokens, mask, eot)
        pyramid = U(lowres, z, tokens, mask, eot)
        act_d = activation_bytes_per_image(D, b, pyramid, tokens, mask, eot)
    batch_gpu = cfg.batch_gpu or cfg.batch_size
    act_size = 2 if cfg.dtype == "bfloat16" else 4
    state = 16 * (n_u + n_d) + 4 * n_u               # as dry_run: weights, grads, Adam, EMA
    acts = batch_gpu * act_size * max(act_u + act_d, 3 * act_d)  # LPIPS's own activations not counted
    print(f"U {n_u / 1e6:.1f}M parameters ({r} -> {u_cfg.out_resolution} px), its D {n_d / 1e6:.1f}M "
          f"(paper: 359.1M for the 64 -> 512 upsampler); base G {n_g / 1e6:.1f}M, D {n_bd / 1e6:.1f}M")
    print(f"memory per GPU, roughly: {state / 2**30:.1f} GiB weights+grads+Adam+EMA, "
          f"{acts / 2**30:.1f} GiB activations at --batch-gpu {batch_gpu} ({cfg.dtype})")
    print(json.dumps({"G_params": n_g, "D_params": n_bd, "U_params": n_u, "U_D_params": n_d,
                      "batch_size": cfg.batch_size, "batch_gpu": batch_gpu,
                      "est_gib_per_gpu": round((state + acts) / 2**30, 2)}))


# -----------------------------------------------------------------------------
# Entry point


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print_help()
        return
    try:
        cfg, g_cfg, d_cfg, loss_cfg = parse_flags(argv)
        rt = setup_runtime(cfg)
        check_mode_seeking(cfg, loss_cfg, micro_batches(cfg, rt)[0])  # check now, before minutes of
        clip_spec(cfg)                                                # CLIP training
    except FlagError as err:
        print(f"train.py: {err}", file=sys.stderr)
        raise SystemExit(2)
    if cfg.dry_run:
        if cfg.stage == "upsampler":
            return dry_run_upsampler(cfg, g_cfg, d_cfg, rt)
        return dry_run(cfg, g_cfg, d_cfg, loss_cfg, rt)
    if not cfg.data:
        print("train.py: --data is required for this preset: an image folder or 'shards/{00000..00099}.tar'",
              file=sys.stderr)
        raise SystemExit(2)
    up = cfg.stage == "upsampler"
    try:  # the upsampler learns from real images at its OUTPUT size (made small on the fly)
        dataset = data.build_dataset(cfg.data, g_cfg.out_resolution if up else g_cfg.resolution, seed=cfg.seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"train.py: {err}", file=sys.stderr)
        raise SystemExit(2)
    ckpt = None
    try:  # before any CLIP is trained or config.json rewritten: can --resume continue <out>?
        if up:
            ckpt = open_resume(cfg, "upsampler", {"U": (dataclasses.asdict(g_cfg), upsampler.UpsamplerConfig),
                                                  "D": (dataclasses.asdict(d_cfg), discriminator.DiscriminatorConfig)},
                               {"clip": clip_spec(cfg)})
        elif cfg.stage == "base":
            vision_aided = loss_cfg.vision_weight > 0
            specs = {"clip": clip_spec(cfg)}
            if vision_aided:  # the vision-aided D's heads fit that CLIP's feature maps only
                specs["vision_clip"] = vision_clip_spec(cfg) or specs["clip"]
            ckpt = open_resume(cfg, "base", {"G": (dataclasses.asdict(g_cfg), generator.GeneratorConfig),
                                             "D": (dataclasses.asdict(d_cfg), discriminator.DiscriminatorConfig)},
                               specs, vision_aided)
    except FlagError as err:
        print(f"train.py: {err}", file=sys.stderr)
        raise SystemExit(2)
    os.makedirs(cfg.out, exist_ok=True)
    if rt.main:
        full_config = {"train": dataclasses.asdict(cfg)}
        if cfg.stage != "clip":  # the CLIP stage builds no G, D or GAN losses
            full_config.update({"U" if up else "G": dataclasses.asdict(g_cfg), "D": dataclasses.asdict(d_cfg),
                                "loss": dataclasses.asdict(loss_cfg)})
        print("config: " + json.dumps(full_config))
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(full_config, f, indent=2)
    try:
        if cfg.stage == "clip":
            return train_clip_stage(cfg, g_cfg.resolution, rt, dataset)
        if up:
            return train_upsampler(cfg, g_cfg, d_cfg, loss_cfg, rt, dataset, ckpt)
        return train_base(cfg, g_cfg, d_cfg, loss_cfg, rt, dataset, ckpt)
    except (FlagError, FileNotFoundError, losses.MissingWeightsError, clip_lib.CLIPLoadError) as err:
        print(f"train.py: {err}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if rt.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
