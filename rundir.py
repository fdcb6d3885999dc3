"""
rundir.py - what train.py keeps in its run directory (--out), and how a run stops.

    <out>/config.json       the final configuration (train, G or U, D, loss)
    <out>/checkpoint.pt     weights, optimisers, step: written atomically, checked on --resume
    <out>/log.jsonl         one JSON row per log line ("train") and evaluation ("eval")
    <out>/losses.png        one panel per logged term (plot_losses)
    <out>/eval.png          one panel per evaluation figure: alignment, seed spread, CLIP score, FD
    <out>/samples_*.png     sample grids of fixed prompts and z (snapshots)

A run stops at --max-steps, at the --max-minutes budget (out_of_time), on Ctrl-C / SIGTERM after the
step in progress (StopRequest: save, exit 130), or on a NaN/inf loss (exit 1, the last good
checkpoint kept). Bad input is a FlagError: one line, exit status 2.
"""
import contextlib
import dataclasses
import importlib
import json
import math
import os
import pickle
import re
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from config import VISION_CLIP, FlagError, clip_spec, vision_clip_spec, writable_error
from runtime import check_in_sync

clip_lib = importlib.import_module("00_clip")
generator = importlib.import_module("03_generator")
discriminator = importlib.import_module("04_discriminator")
upsampler = importlib.import_module("06_upsampler")

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


def stored_clip_spec(spec, out):
    """How the checkpoint names a tiny CLIP: relative to the run directory when the file is in
    it or in a run beside it (`tiny:clip.pt`, `tiny:../tiny/clip.pt`: runs move together),
    absolute otherwise; sample.py resolves relative paths against the run directory."""
    if spec.startswith("tiny:"):
        path = os.path.abspath(spec[5:])
        rel = os.path.relpath(path, os.path.abspath(out))
        return "tiny:" + (path if rel.startswith(os.path.join(os.pardir, os.pardir)) else rel)
    return spec


def article(word):
    """'a' or 'an' before `word`: an upsampler-stage run, a base-stage one."""
    return "an" if word[:1] in "aeiou" else "a"


def check_resumable(ckpt, path, stage, preset, models):
    """A checkpoint continues only the same stage, preset and model configurations.
    models: {config key ("G", "U", "D"): (this run's config dict, its dataclass)}. A field added
    to a dataclass since the checkpoint was written counts at its default."""
    found = ckpt["config"].get("stage", "base")
    if found != stage:
        raise FlagError(f"{path} is {article(found)} {found}-stage run, not {article(stage)} {stage}-stage one: "
                        f"resume it with --stage {found}, or use another --out")
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


def open_resume(cfg, g_cfg, d_cfg, loss_cfg):
    """--resume: read <out>/checkpoint.pt and check, before any CLIP is trained or config.json
    rewritten, that this run can continue it: the same stage, preset and model configurations
    (check_resumable), the same CLIPs (their files still there: a tiny CLIP trained anew would
    give other features than the ones G and D learned on), and the vision-aided D on or off as
    before. -> the checkpoint, or None without --resume (and for --stage clip)."""
    if not cfg.resume or cfg.stage == "clip":
        return None
    up, vision_aided = cfg.stage == "upsampler", None
    models = {"U" if up else "G": (dataclasses.asdict(g_cfg), upsampler.UpsamplerConfig if up else generator.GeneratorConfig),
              "D": (dataclasses.asdict(d_cfg), discriminator.DiscriminatorConfig)}
    clip_specs = {"clip": clip_spec(cfg)}  # {checkpoint key: load_clip spec}
    if not up:
        vision_aided = loss_cfg.vision_weight > 0
        if vision_aided:  # the vision-aided D's heads fit that CLIP's feature maps only
            clip_specs["vision_clip"] = vision_clip_spec(cfg) or clip_specs["clip"]
    path = os.path.join(cfg.out, "checkpoint.pt")
    if not os.path.isfile(path) and run_files(cfg.out):  # stopped before its first checkpoint: from step 0
        return started_without_checkpoint(cfg, path)
    if not os.path.isfile(path):
        raise FlagError(f"no checkpoint at {path} to resume: drop --resume to start a new run there, "
                        "or point --out at the run directory")
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, path, cfg.stage, cfg.preset, models)
    if ckpt["step"] >= cfg.max_steps:  # nothing to train: the run and its config.json stay as they are
        where = "already at" if ckpt["step"] == cfg.max_steps else "past"
        raise FlagError(f"{path} is at step {ckpt['step']}, {where} --max-steps {cfg.max_steps}: give a larger "
                        "--max-steps to train on (nothing was changed)")
    for key, spec in clip_specs.items():
        stored = ckpt.get(key)
        if stored is not None and stored != stored_clip_spec(spec, cfg.out):  # name the run's own CLIP
            used = stored
            if stored.startswith("tiny:") and not os.path.isabs(stored[5:]):  # relative to the run directory
                used = "tiny:" + os.path.normpath(os.path.join(cfg.out, stored[5:]))
            flag = f"--vision-clip {used} (and the --clip-tower of that run)" if key == "vision_clip" else f"--clip {used}"
            raise FlagError(f"{path} was trained with {key.replace('_', ' ')} {used}, this run would use "
                            f"{spec}: resume with {flag}")
        if spec.startswith("tiny:") and not os.path.isfile(spec[5:]):
            raise FlagError(f"{spec[5:]} is missing: {path} was trained on the features of that tiny CLIP, "
                            "and one trained anew would not give them; put the file back to resume")
        fingerprint = ckpt.get("clip_sha", {}).get(key)  # None for an open_clip model: its name says the weights
        if fingerprint is not None and fingerprint != clip_lib.tiny_clip_fingerprint(spec):
            raise FlagError(f"{spec[5:]} is not the tiny CLIP {path} was trained with (its file changed since, "
                            "e.g. trained anew): put the run's own file back to resume")
    if vision_aided is not None and bool(ckpt.get("VD")) != vision_aided:
        was = "with" if ckpt.get("VD") else "without"
        raise FlagError(f"{path} was trained {was} the vision-aided D: resume with "
                        f"--loss.vision-weight {'> 0' if ckpt.get('VD') else '0'}, as that run")
    return ckpt


# -----------------------------------------------------------------------------
# One run per directory: --resume continues it, --overwrite deletes it, nothing mixes two runs

RUN_NAMES = ("checkpoint.pt", "config.json", "log.jsonl", "losses.png", "eval.png", "samples_prompts.txt",
             "clip.pt", VISION_CLIP)
RUN_PATTERN = re.compile(r"samples_\d{6}\.png|checkpoint\.pt\.tmp\d+")  # snapshots, a cut-short checkpoint write
CLIP_NAMES = ("clip.pt", VISION_CLIP)  # a tiny CLIP the GAN stages reuse (--clip tiny: a cache; --clip tiny:PATH)


def run_files(out):
    """The files of a train.py run in the folder `out` (RUN_NAMES, RUN_PATTERN), sorted."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n in RUN_NAMES or RUN_PATTERN.fullmatch(n))


def clip_stage_config(out):
    """Is <out>/config.json the config of a --stage clip run (no G, no U)? A GAN run reuses its CLIP."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            config = json.load(f)
        return isinstance(config, dict) and config.get("train", {}).get("stage") == "clip"
    except (OSError, ValueError, AttributeError):
        return False


def kept_files(cfg):
    """The tiny CLIP files in --out that this run was pointed at (--clip tiny:OUT/clip.pt,
    --vision-clip tiny:OUT/vision_clip.pt): its inputs, which --overwrite keeps."""
    specs = [cfg.clip, cfg.vision_clip]
    paths = {os.path.abspath(s[len("tiny:"):]) for s in specs if s.startswith("tiny:")}
    return {n for n in CLIP_NAMES if os.path.abspath(os.path.join(cfg.out, n)) in paths}


def check_run_dir(cfg):
    """Before any work (no CLIP trained, no file written): --out must be a folder this process can
    write, and a run directory belongs to one run. --out holding another run's checkpoint, log or
    CLIP is refused in one line (FlagError), unless --resume continues it (open_resume checks that
    it is this run) or --overwrite deletes it. The GAN stages may start in a folder that holds only
    a tiny CLIP (and its --stage clip config.json): they reuse it (--clip tiny caches it there).
    -> the files --overwrite deletes (clear_run_dir), [] otherwise."""
    error = writable_error(cfg.out, "--out")
    if error:
        raise FlagError(error)
    if cfg.overwrite and cfg.resume:
        raise FlagError("--overwrite deletes the run in --out and --resume continues it: give one of them")
    found = run_files(cfg.out)
    if cfg.overwrite:
        return [n for n in found if n not in kept_files(cfg)]
    if cfg.stage != "clip":
        found = [n for n in found if n not in CLIP_NAMES and not (n == "config.json" and clip_stage_config(cfg.out))]
        if cfg.resume:
            return []
    if found:
        listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        what = ("--stage clip would replace its files: choose another --out" if cfg.stage == "clip" else
                "add --resume to continue it, or choose another --out")
        raise FlagError(f"--out {cfg.out} holds a run ({listed}): {what}; --overwrite deletes that run and starts anew")
    return []


def clear_run_dir(cfg, names, rt):
    """--overwrite: delete the earlier run's files (check_run_dir) on rank 0, then every process goes on."""
    if rt.main and names:
        for name in names:
            os.remove(os.path.join(cfg.out, name))
        print(f"--overwrite: deleted the earlier run's {len(names)} file(s) in {cfg.out} ({', '.join(names[:4])}"
              f"{', ...' if len(names) > 4 else ''})")
    if rt.world > 1:
        dist.barrier()


def trim_log(cfg, step):
    """--resume from `step`: drop the log rows of later steps (a run killed after its last checkpoint
    logged steps that are now trained again), so that log.jsonl describes one run, step after step."""
    path = os.path.join(cfg.out, "log.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


def started_without_checkpoint(cfg, path):
    """--resume of a run that stopped before its first checkpoint (its folder holds its CLIP, maybe its
    config.json and log): the same stage and preset (config.json), then step 0. -> None."""
    try:
        with open(os.path.join(cfg.out, "config.json")) as f:
            train_cfg = json.load(f).get("train", {})
    except (OSError, ValueError, AttributeError):
        train_cfg = {}
    for key in ("stage", "preset"):
        if train_cfg.get(key, getattr(cfg, key)) not in (getattr(cfg, key), "clip"):
            raise FlagError(f"{cfg.out} holds a {train_cfg[key]!r} {key} run, not a {getattr(cfg, key)!r} one: "
                            f"resume it with --{key} {train_cfg[key]}, or use another --out")
    print(f"note: no checkpoint at {path} yet (the run stopped before its first): --resume starts at step 0 "
          f"with the files in {cfg.out}")
    return None


def write_config(cfg, g_cfg, d_cfg, loss_cfg):
    """Print the final configuration and write it to <out>/config.json (rank 0)."""
    full_config = {"train": dataclasses.asdict(cfg)}
    if cfg.stage != "clip":  # the CLIP stage builds no G, D or GAN losses
        full_config.update({"U" if cfg.stage == "upsampler" else "G": dataclasses.asdict(g_cfg),
                            "D": dataclasses.asdict(d_cfg), "loss": dataclasses.asdict(loss_cfg)})
    print("config: " + json.dumps(full_config))
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(full_config, f, indent=2)


# -----------------------------------------------------------------------------
# What a training loop does around its steps (train.py's and train_upsampler.py's)


def start_run_dir(cfg, rt, g_cfg, d_cfg, loss_cfg):
    """<out>/ and its config.json, once the CLIPs loaded (a missing pretrained CLIP leaves no stray
    run directory). (On --resume, resume() trims the log rows of steps that will be trained again.)"""
    os.makedirs(cfg.out, exist_ok=True)
    if rt.main:
        write_config(cfg, g_cfg, d_cfg, loss_cfg)


def save_run(cfg, step, nimg, parts, config, clips):
    """<out>/checkpoint.pt, written atomically: the state of every model and optimiser in `parts`
    (None: stored empty), the step, the configurations and which CLIPs the run reads (spec and
    tiny-file fingerprint, checked on --resume)."""
    state = {name: part.state_dict() if part is not None else {} for name, part in parts.items()}
    state.update(step=step, nimg=nimg, config={k: v if isinstance(v, str) else dataclasses.asdict(v)
                                               for k, v in config.items()},
                 clip_sha={k: clip_lib.tiny_clip_fingerprint(spec) for k, spec in clips.items()},
                 **{k: stored_clip_spec(spec, cfg.out) for k, spec in clips.items()})
    save_checkpoint(os.path.join(cfg.out, "checkpoint.pt"), state)


def resume(cfg, rt, ckpt, parts):
    """Load a checkpoint (checked by open_resume; None: start at step 0) into `parts`, and with
    --resume drop the log rows of the steps that will be trained again; -> (step, images seen)."""
    step, nimg = (ckpt["step"], ckpt["nimg"]) if ckpt is not None else (0, 0)
    for name, part in parts.items():
        if ckpt is not None and part is not None and ckpt.get(name):
            part.load_state_dict(ckpt[name])
    if ckpt is not None and rt.main:
        say(f"resumed {cfg.out}/checkpoint.pt at step {step}")
    if cfg.resume and rt.main:
        trim_log(cfg, step)
    return step, nimg


class Clock:
    """img/s of the training steps alone: time inside `paused()` (snapshots, evals, checkpoints)
    is left out."""

    def __init__(self):
        self.start, self.images = time.time(), 0

    def rate(self):
        return self.images / max(time.time() - self.start, 1e-9)

    @contextlib.contextmanager
    def paused(self):
        t0 = time.time()
        yield
        self.start += time.time() - t0


def log_step(cfg, rt, step, nimg, last, stats, clock, bar):
    """The end of a step's bookkeeping: the progress bar, and every log_every steps (and at the
    last) a log line of the loss means over every process and the img/s since the last line."""
    bar.update(1)
    clock.images += cfg.batch_size
    if step % cfg.log_every == 0 or last:
        means = mean_stats(stats, rt)                                   # every rank takes part
        if rt.main:
            log_train_row(cfg, step, nimg, clock.rate(), means)
        stats.clear()
        clock.start, clock.images = time.time(), 0


@contextlib.contextmanager
def guard_nonfinite(cfg, rt):
    """A NaN/inf loss ends the run (exit 1) with the last good checkpoint kept."""
    try:
        yield
    except NonFiniteLoss as err:
        exit_nonfinite(rt, err, os.path.join(cfg.out, "checkpoint.pt"))


def finish(cfg, rt, step, modules, outputs):
    """The end of a run: processes checked in sync, the loss curves plotted, one line of where things are."""
    if rt.world > 1:
        check_in_sync(modules, rt)
    if rt.main:
        plots = plot_losses(cfg)
        print(f"done: {step} steps{budget_note(cfg, step)}. checkpoint {cfg.out}/checkpoint.pt; {outputs}; "
              f"curves {' and '.join(plots) or '-'}; log {cfg.out}/log.jsonl")


# -----------------------------------------------------------------------------
# Logs, plots and snapshots (rank 0)


def say(line):
    """Print a log line, above the progress bar when there is one; flushed, so that a log piped
    to a file or another program is there line by line."""
    tqdm.write(line)
    sys.stdout.flush()


def progress_bar(cfg, rt, step):
    """A bar of the run's steps with an ETA (tqdm, on stderr), when rank 0 writes to a terminal;
    elsewhere (a file, a pipe, a test) a disabled one: the log lines stay the whole output."""
    budget = f", budget {cfg.max_minutes:g} min" if cfg.max_minutes else ""  # may end before the ETA
    return tqdm(total=cfg.max_steps, initial=step, unit="step", desc=cfg.stage + budget, dynamic_ncols=True,
                leave=False, disable=not (rt.main and sys.stderr.isatty() and sys.stdout.isatty()))


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
    eta_s = (cfg.max_steps - step) * cfg.batch_size / max(img_s, 1e-9)  # at this line's speed, evals excluded
    row = {"kind": "train", "step": step, "kimg": nimg / 1000, "img_s": img_s, "eta_s": eta_s, **means}
    log_row(cfg, row)
    eta = f"eta {int(eta_s // 3600)}:{int(eta_s % 3600 // 60):02d}:{int(eta_s % 60):02d}"  # h:mm:ss to max_steps
    say(f"step {step:6d}/{cfg.max_steps}  {eta}  "
        + "  ".join(f"{k} {v:.3g}" for k, v in row.items() if k not in ("kind", "step", "kimg", "eta_s")))


def log_eval_row(cfg, step, metrics):
    """One evaluation row: the base stage's alignment and CLIP scores, or the upsampler's errors."""
    log_row(cfg, {"kind": "eval", "step": step, **metrics})
    if "mae_bicubic" in metrics:  # the upsampler, against bicubic upsampling of the same input
        clean = f"; no noise {metrics['mae_ratio_clean']:.2f}" if "mae_ratio_clean" in metrics else ""
        say(f"eval  mae {metrics['mae']:.4f} (bicubic {metrics['mae_bicubic']:.4f}, ratio "
            f"{metrics['mae'] / max(metrics['mae_bicubic'], 1e-12):.2f}{clean})  sharpness "
            f"{metrics['sharpness']:.4f} (bicubic {metrics['sharpness_bicubic']:.4f}, "
            f"real {metrics['sharpness_real']:.4f})")
    else:
        say("eval  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


def plot_log(cfg, kind, filename):
    """log.jsonl -> one panel per logged number of `kind` ("train": the loss terms; "eval": the
    evaluations), against the step; -> the PNG's path, or None if there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(os.path.join(cfg.out, "log.jsonl"))]
    rows = [r for r in rows if r.get("kind") == kind]
    skip = ("kind", "step", "kimg", "img_s", "eta_s", "spread_captions")
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in skip))  # first-seen order
    if not keys:
        return None
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(4 * cols, 2.6 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], marker="." if kind == "eval" else None)
        ax.set_title(key, fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    inch = 1 / fig.get_figheight()  # fixed margins: tight_layout would cost about 0.4 s a plot
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.3 * inch, top=1 - 0.3 * inch, hspace=0.5, wspace=0.25)
    path = os.path.join(cfg.out, filename)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_losses(cfg):
    """losses.png (every loss term) and, when the run evaluated, eval.png (alignment per
    attribute, seed spread, CLIP score, FD): a reader sees the model learn. -> the paths."""
    return [p for p in (plot_log(cfg, "train", "losses.png"), plot_log(cfg, "eval", "eval.png")) if p]


def snapshot_prompts(dataset, n=8):
    """A fixed set of prompts for the sample grids: the first n captions of the data set."""
    return [dataset[i][1] for i in range(n)]


@torch.no_grad()
def save_snapshot(cfg, G_ema, clip, prompts, z, step):
    """A grid: one row per prompt, one column per fixed z; the prompts go in a .txt beside it."""
    tokens, mask, eot = clip.text_features([p for p in prompts for _ in range(len(z))])
    zz = z.repeat(len(prompts), 1)                                   # (rows * cols, z_dim)
    images = G_ema(zz, tokens, mask, eot, noise_mode="const")[0]     # finest level
    path = os.path.join(cfg.out, f"samples_{step:06d}.png")
    data.save_image_grid(images.float().cpu(), path, ncol=len(z))
    with open(os.path.join(cfg.out, "samples_prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    return path


@torch.no_grad()
def save_upsampler_snapshot(cfg, U_ema, clip, lowres, reals, prompts, step):
    """A grid, one row per fixed (image, prompt): bicubic of the low-res input | U_ema's | real."""
    R = U_ema.cfg.out_resolution
    z = torch.randn(len(prompts), U_ema.cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed))
    out = U_ema(lowres, z.to(lowres.device), *clip.text_features(prompts), noise_mode="const")[0]  # (n, 3, R, R)
    bicubic = upsampler.resize(lowres, R)                                # (n, 3, R, R)
    rows = torch.stack([bicubic, out, reals], dim=1).flatten(0, 1)       # (3n, 3, R, R) row-major
    path = os.path.join(cfg.out, f"samples_{step:06d}.png")
    data.save_image_grid(rows.float().cpu(), path, ncol=3)
    with open(os.path.join(cfg.out, "samples_prompts.txt"), "w") as f:
        f.write("columns: bicubic | upsampled | real\n" + "\n".join(prompts) + "\n")
    return path


# -----------------------------------------------------------------------------
# Stopping: Ctrl-C / SIGTERM, the time budget, a NaN/inf loss


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


def exit_interrupted(rt, step, ckpt_path):
    """Ctrl-C / SIGTERM, agreed by every process after a finished step, whose checkpoint the loop
    has just saved: say so, then exit 130."""
    if rt.main:
        say(f"interrupted: saved step {step} to {ckpt_path}; continue with --resume")
    raise SystemExit(130)


def exit_nonfinite(rt, err, ckpt_path):
    """A NaN/inf loss: keep the last good checkpoint (nothing is saved now), say what to try, exit 1."""
    if rt.main:
        print(f"stopping: {err}. The last good checkpoint ({ckpt_path}) is kept; try a lower "
              "--lr, --dtype float32, or a larger --loss.r1-gamma", file=sys.stderr)
    raise SystemExit(1)


def check_finite(loss, what, step):
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"{what} loss is {loss.item()} at step {step}")
