"""
gpu_check.py - `python bench.py --gpu --out DIR`: one prepared check of the CUDA path, for the few minutes a
GPU is lent (at most 8 on an H100), on a machine with no network. It writes one dated Markdown
table, OUT/gpu_check.md, and every figure as JSON, OUT/gpu_check.json.

    python bench.py --gpu --out gpu_check                    # on one CUDA GPU, <= 8 minutes
    python bench.py --gpu --quick --device cpu --out /tmp/g  # every row at tiny sizes on a CPU, ~1 minute
    python bench.py --gpu --quick --device cpu --fail-row full_step --out /tmp/g   # a row forced to fail

Rows, in order, each with its own time budget (seconds on the GPU; a row that overruns is stopped
and recorded as such), each guarded: a failing row writes its one-line error into the table and
the check goes on with the next (a GPU minute is precious):
  install            the carried wheels (wheels/) that this Python lacks, installed offline (below)
  tests              pytest -m gpu: tests/test_cuda.py (bf16 autocast of G and D against float32,
                     fused vs naive modulated conv) and the suite's other GPU-marked tests
  small_train        train.main, --preset small at 64 px, bfloat16, random ViT-B/32 CLIP, ~200 steps:
                     img/s, peak memory (torch.cuda.max_memory_allocated) against dry_run.py's
                     estimate at that --batch-gpu, and the error in %
  full_step          --full's G and D (with G_ema and both AdamWs), one D step + G step (05's losses,
                     random text features, no CLIP terms) at the largest --batch-gpu that fits,
                     found by doubling and bisecting on torch.cuda.OutOfMemoryError, starting from
                     the dry run's prediction; peak memory against the estimate less its CLIP, step time
  sample_64          sample.generate from small_train's checkpoint, s/img at batch 1 and 32
  sample_64_compile  the same with torch.compile(G); the compile time apart
  chain              sample.generate, then sample.upsample through the full 64 -> 512 upsampler
                     (random weights), s/img at batch 1 and 8
  chain_compile      the same with torch.compile on G and U
  peer               lucidrains' gigagan-pytorch 0.3.0 (its own site folder, carried as wheels in
                     wheels/peer/), against this project at equal work (bench.py's "bench" size,
                     32 px, without the CLIP and vision-aided terms): training img/s and sampling
                     s/img, as ratios from this run; 'not installed' when its wheels are absent
With --quick every row runs at tiny sizes for a few steps (the tiny preset, the tiny upsampler,
torch.compile with the "eager" backend: dynamo's tracing without inductor's C++ build) and
the GPU tests run on the CPU (GIGAGAN_TEST_DEVICE=cpu): a test (tests/test_bench.py) runs it, so
the check cannot rot between GPU days. On a CPU, memory rows say "-" (no allocator statistics).

The command line for a lent GPU and the commands that rebuild the carried wheels (git-ignored
wheels/, 22 MB) are in bench.py's docstring. The GPU machine (Python 3.12, PyTorch 2.11) has torch,
torchvision, torchmetrics, numpy, scipy, timm, huggingface_hub, safetensors and regex: install_wheels
installs only the distributions this Python cannot import (`pip install --no-index --no-deps
--target`: never torch) into a site folder of the run, put first on sys.path and PYTHONPATH; the
peer gets a site folder of its own (gigagan-pytorch needs open_clip < 3). No weights are fetched:
HF_HUB_OFFLINE=1, random CLIP weights, no LPIPS.
"""
import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import typing

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
GIB = 2 ** 30

# The distributions this project needs beyond the GPU machine's image: (distribution, import name).
WHEELS = [("open_clip_torch", "open_clip"), ("lpips", "lpips"), ("webdataset", "webdataset"),
          ("torch-fidelity", "torch_fidelity"), ("ftfy", "ftfy"), ("wcwidth", "wcwidth"),
          ("braceexpand", "braceexpand"), ("timm", "timm")]

# -----------------------------------------------------------------------------
# The sizes of the two modes


@dataclasses.dataclass
class Sizes:
    small_flags: tuple        # train.py flags of the small_train row
    small_steps: int          # its optimiser steps
    full_flags: tuple         # train.py flags whose G and D the full_step row builds
    full_max_batch: int       # the batch search's ceiling (0: up to the first out-of-memory)
    sample_batches: tuple     # sample_64's batch sizes
    upsampler: str            # 06's U_PRESETS name of the chain
    chain_batches: tuple      # the chain's batch sizes
    repeats: int              # timed calls per figure (the median is kept)
    compile_backend: str      # torch.compile's backend
    peer_batch: int           # the peer comparison's training batch
    peer_steps: int           # its timed training steps (each side)
    total_s: int              # the whole check's budget: a row with less than half its own left is skipped
    budgets: dict             # row -> seconds


GPU = Sizes(
    small_flags=("--preset", "small", "--clip", "ViT-B-32/none", "--dtype", "bfloat16", "--batch-size", "64",
                 "--batch-gpu", "64", "--workers", "8"),
    small_steps=200, full_flags=("--full",), full_max_batch=0, sample_batches=(1, 32), upsampler="full",
    chain_batches=(1, 8), repeats=5, compile_backend="inductor", peer_batch=32, peer_steps=20, total_s=480,
    budgets=dict(install=20, tests=40, small_train=100, full_step=75, sample_64=20, sample_64_compile=55,
                 chain=30, chain_compile=75, peer=60))
# --quick: float32 (bfloat16 convolutions are slow on most CPUs; the tests row checks bfloat16 there) and
# no CLIP image passes (a ViT-B/32 at 224 px would be most of a CPU step); budgets for a busy 2-core box
QUICK = Sizes(
    small_flags=("--preset", "tiny", "--clip", "ViT-B-32/none", "--batch-size", "2", "--loss.clip-weight", "0",
                 "--loss.vision-weight", "0"),
    small_steps=2, full_flags=("--preset", "tiny"), full_max_batch=2, sample_batches=(1, 2), upsampler="tiny",
    chain_batches=(2,), repeats=1, compile_backend="eager", peer_batch=2, peer_steps=1, total_s=600,
    budgets=dict(install=60, tests=90, small_train=90, full_step=60, sample_64=60, sample_64_compile=90,
                 chain=60, chain_compile=90, peer=120))
ROWS = list(GPU.budgets)


def log(*args):
    print(*args, flush=True)


def import_project():
    """The project's modules, imported only after install_wheels: 00_clip needs open_clip."""
    global config, data, dry_run, sample, train, bench, generator, discriminator, losses, upsampler, attention
    import bench
    import config
    import data
    import dry_run
    import sample
    import train
    generator, discriminator = (importlib.import_module(n) for n in ("03_generator", "04_discriminator"))
    losses, upsampler = (importlib.import_module(n) for n in ("05_losses", "06_upsampler"))
    attention = importlib.import_module("02_attention")


# -----------------------------------------------------------------------------
# Rows: a time budget and a guard around each


class RowTimeout(Exception):
    """A row ran past its budget (raised by SIGALRM in the main thread)."""


@contextlib.contextmanager
def time_limit(seconds):
    def expired(signum, frame):
        raise RowTimeout(f"over its {seconds:.0f} s budget")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(err):
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def run_row(name, fn, ctx):
    """fn(ctx, figures) fills `figures` as it measures; whatever it raised (an out-of-memory, a
    SystemExit of train.main, the budget's RowTimeout) becomes the row's one-line error, and the
    figures measured before it stay."""
    budget = ctx.sizes.budgets[name]
    row = {"row": name, "status": "ok", "error": None, "budget_s": budget, "figures": {}}
    spent = time.perf_counter() - ctx.started
    if spent + budget / 2 > ctx.sizes.total_s:                 # not even half its budget is left
        row.update(status="skipped", error=f"the check's {ctx.sizes.total_s} s are spent", seconds=0.0)
        return row
    log(f"--- {name} (budget {budget} s)")
    t0 = time.perf_counter()
    try:
        with time_limit(budget):
            if name in ctx.args.fail_row:
                raise RuntimeError("forced to fail by --fail-row (a test of the guard)")
            if name != "install":
                import_project()                    # after install; an import error is this row's error
            note = fn(ctx, row["figures"])
        if note:                                    # a row that could not run here says why
            row.update(status="skipped", error=note)
    except KeyboardInterrupt:
        raise
    except BaseException as err:                    # SystemExit too: train.main's bad-input exit
        row.update(status="timeout" if isinstance(err, RowTimeout) else "failed", error=one_line(err))
        log(f"    {row['status']}: {row['error']}")
    finally:
        row["seconds"] = time.perf_counter() - t0
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log(f"    {row['status']} in {row['seconds']:.1f} s: {json.dumps(row['figures'])}")
    return row


@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    workdir: str
    started: float
    small_run: typing.Optional[str] = None    # small_train's run directory, for the sampling rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    """Peak allocated memory since reset_peak, GiB; None on a CPU (no allocator statistics)."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def error_pct(measured, estimate):
    return None if measured is None else 100 * (measured - estimate) / estimate


def median_s(fn, device, repeats):
    """Median seconds of fn() over `repeats` calls after one warm-up call; device work included."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -----------------------------------------------------------------------------
# install: the carried wheels


def install_wheels(folder, wanted=WHEELS, target=None, all_of_them=False):
    """pip-install, offline and without dependencies, into the site folder `target` (None: this
    Python's own), the distributions of `wanted` whose import name this Python cannot find (or
    every one, all_of_them), from the wheels in `folder`. -> (installed, present): distribution names."""
    missing = [dist for dist, module in wanted if all_of_them or importlib.util.find_spec(module) is None]
    present = [dist for dist, _ in wanted if dist not in missing]
    if missing:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}/ is missing (bench.py's docstring rebuilds it): "
                                    f"cannot install {', '.join(missing)}")
        where = ["--target", target] if target else []
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                               "--no-compile", "--disable-pip-version-check", "--find-links", folder, *where,
                               *missing], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"pip install from {folder}/ failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        importlib.invalidate_caches()
    return missing, present


def add_site(site):
    """Put a site folder first on this process's path and on its children's (PYTHONPATH)."""
    sys.path.insert(0, site)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()


def row_install(ctx, figures):
    """Into a site folder of this run (the GPU machine's own environment stays as it was)."""
    site = os.path.join(ctx.workdir, "site")
    installed, present = install_wheels(os.path.join(ROOT, "wheels"), target=site)
    if installed:
        add_site(site)
    figures.update(installed=len(installed), already_there=len(present))
    figures["what"] = ("installed " + " ".join(installed)) if installed else "nothing missing"
    figures["open_clip"] = importlib.metadata.version("open_clip_torch")


# -----------------------------------------------------------------------------
# tests: pytest -m gpu in a child process


def row_tests(ctx, figures):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GIGAGAN_TEST_DEVICE": ctx.device.type}
    files = ["tests/test_cuda.py", "tests/test_kernel_selection.py"]   # every file with a gpu-marked test
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=ctx.sizes.budgets["tests"] - 5)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    for word in ("passed", "failed", "skipped", "error"):
        found = re.search(rf"(\d+) {word}", summary)
        figures[word] = int(found.group(1)) if found else 0
    if proc.returncode not in (0, 5):                            # 5: nothing collected
        failing = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        raise RuntimeError(failing[0] if failing else summary)


# -----------------------------------------------------------------------------
# small_train: train.main itself, then its peak memory against dry_run's estimate


def run_train(argv):
    """train.main(argv) with its printing kept out of the table's log; its one-line error (train.py
    prints it to stderr and exits 2) becomes this row's error."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            train.main(argv)
    except SystemExit as exit_:
        lines = [line for line in err.getvalue().splitlines() if line.startswith("train.py: ")]
        raise RuntimeError(lines[-1] if lines else f"train.py exited with status {exit_.code}") from None


def small_argv(ctx, out):
    quiet = ["--eval-every", "0", "--snapshot-every", "100000", "--ckpt-every", "100000", "--seed", "0",
             "--log-every", "10" if ctx.sizes is GPU else "1"]
    minutes = 0.8 * ctx.sizes.budgets["small_train"] / 60      # train.py stops itself before the budget
    return [*ctx.sizes.small_flags, *quiet, "--device", str(ctx.device), "--max-steps", str(ctx.sizes.small_steps),
            "--max-minutes", f"{minutes:.2f}", "--out", out]


def row_small_train(ctx, figures):
    out = os.path.join(ctx.workdir, "small")
    argv = small_argv(ctx, out)
    cfg, g_cfg, d_cfg, _ = config.parse_flags(argv)
    plan = dry_run.memory_estimate(cfg, g_cfg, d_cfg)          # what --dry-run --gpu-memory adds up
    batch_gpu = cfg.batch_gpu or cfg.batch_size
    estimate = (plan["state_bytes"] + plan["clip_bytes"] + batch_gpu * plan["act_bytes_per_image"]) / GIB
    reset_peak(ctx.device)
    run_train(argv)
    ctx.small_run = out
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    rows = [r for r in rows if r.get("kind") == "train"]
    steps = [0] + [r["step"] for r in rows]
    windows = [(s - prev) * cfg.batch_size / r["img_s"] for prev, s, r in zip(steps, steps[1:], rows)]
    timed = slice(1, None) if len(rows) > 1 else slice(None)   # the first window holds the warm-up
    images = sum((s - prev) * cfg.batch_size for prev, s in list(zip(steps, steps[1:]))[timed])
    figures.update(steps=steps[-1], batch_gpu=batch_gpu, img_s=images / sum(windows[timed]),
                   peak_gib=peak_gib(ctx.device), estimate_gib=estimate)
    figures["error_pct"] = error_pct(figures["peak_gib"], estimate)


# -----------------------------------------------------------------------------
# full_step: the largest micro-batch of --full that fits one optimiser step


def build_full(ctx):
    """--full's G, G_ema, D and their AdamWs (train.py's parameter groups) on the device."""
    cfg, g_cfg, d_cfg, loss_cfg = config.parse_flags(list(ctx.sizes.full_flags))
    dim = config.text_width(cfg)
    torch.manual_seed(0)
    G = generator.Generator(g_cfg, text_dim=dim).to(ctx.device)
    D = discriminator.Discriminator(d_cfg, text_dim=dim).to(ctx.device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    opt_G, opt_D = train.optimisers(cfg, G, [D])
    # no frozen CLIP here: the CLIP and vision-aided terms are off (random text features stand in)
    loss_cfg = dataclasses.replace(loss_cfg, clip_weight=0.0, vision_weight=0.0)
    return cfg, g_cfg, d_cfg, loss_cfg, (G, G_ema, D, opt_G, opt_D), dim


def full_step(ctx, cfg, loss_cfg, models, dim, b):
    """One D step and one G step at micro-batch b, as train.py orders them (05's losses under
    autocast, then AdamW, then the EMA), on random images and text features."""
    G, G_ema, D, opt_G, opt_D = models
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    autocast = lambda: torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    text = tuple(t.to(ctx.device) for t in generator.random_text(b, D=dim, seed=b))  # (b, L, D), (b, L), (b,)
    caps = losses.Captions(text, losses.permute_text(text, torch.roll(torch.arange(b), 1)))  # c and Eq. 8's c^
    R = G.cfg.resolution
    reals = train.image_pyramid(torch.rand(b, 3, R, R, device=ctx.device) * 2 - 1, len(G.cfg.scales))
    z = torch.randn(b, G.cfg.z_dim, device=ctx.device)                            # (b, z_dim)
    G.requires_grad_(False); D.requires_grad_(True)
    opt_D.zero_grad(set_to_none=True)
    with autocast(), torch.no_grad():
        fakes = G(z, *text)                                                       # pyramid, finest first
    with autocast():
        loss, _ = losses.discriminator_loss(D, reals, fakes, caps, loss_cfg)
    loss.backward()
    opt_D.step()
    G.requires_grad_(True); D.requires_grad_(False)
    opt_G.zero_grad(set_to_none=True)
    with autocast():
        loss, _ = losses.generator_loss(D, G(z, *text), caps, loss_cfg)
    loss.backward()
    opt_G.step()
    train.update_ema(G_ema, G, cfg, b)
    sync(ctx.device)


def fits(step, b, modules):
    """Does step(b) run? False on torch.cuda.OutOfMemoryError (its memory handed back first)."""
    try:
        step(b)
        return True
    except torch.cuda.OutOfMemoryError:
        pass                                        # leave the except block: its traceback holds tensors
    for m in modules:
        m.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    return False


def largest_batch(runs, start, ceiling, seconds, figures):
    """The largest b <= ceiling for which runs(b) is True (False: out of memory), to within 1/16:
    double from `start` until a b fails, then bisect between the largest b that ran and the
    smallest that did not; stop after `seconds`. Records batch_gpu, smallest_oom and trials in
    `figures` as it goes. -> b (0: not even the smallest tried ran)."""
    fit, oom, b, t0 = 0, None, min(start, ceiling), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if runs(b):
            fit = b
        else:
            oom = b
        figures.update(batch_gpu=fit, smallest_oom=oom, trials=figures.get("trials", 0) + 1)
        if oom is None and fit >= ceiling:
            break
        nxt = min(2 * fit, ceiling) if oom is None else (fit + oom) // 2
        if nxt in (fit, oom) or (oom is not None and oom - fit <= max(1, fit // 16)):
            break                                                    # within 1/16 of the limit
        b = nxt
    return fit


def row_full_step(ctx, figures):
    cfg, g_cfg, d_cfg, loss_cfg, models, dim = build_full(ctx)
    plan = dry_run.memory_estimate(cfg, g_cfg, d_cfg)
    act = plan["act_bytes_per_image"]
    figures.update(G_params=plan["G_params"], D_params=plan["D_params"])

    def step(b):
        full_step(ctx, cfg, loss_cfg, models, dim, b)
    # the search starts at the dry run's prediction for this GPU (less the CLIP, which is not loaded)
    if ctx.device.type == "cuda":
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        guess = max(1, int((total - dry_run.RESERVE_GIB * GIB - plan["state_bytes"]) // act))
    else:
        guess = 2
    figures["predicted_batch"] = guess
    fit = largest_batch(lambda b: fits(step, b, models[:3]), guess, ctx.sizes.full_max_batch or 1 << 16,
                        0.6 * ctx.sizes.budgets["full_step"], figures)
    if not fit:
        raise RuntimeError(f"not even --batch-gpu {figures['smallest_oom']} fits one step")
    reset_peak(ctx.device)
    figures["step_s"] = median_s(lambda: step(fit), ctx.device, 1)
    figures["img_s"] = fit / figures["step_s"]
    figures["peak_gib"] = peak_gib(ctx.device)
    figures["estimate_gib"] = (plan["state_bytes"] + fit * act) / GIB       # the dry run's, less its CLIP
    figures["error_pct"] = error_pct(figures["peak_gib"], figures["estimate_gib"])


# -----------------------------------------------------------------------------
# Sampling: sample.py's own functions on small_train's checkpoint, then the chain to 512 px


def prompts_and_seeds(n):
    ds = data.ShapesDataset(32, seed=1000)
    return [ds[i][1] for i in range(n)], list(range(n))


def compiled(module, ctx):
    """torch.compile with static shapes: one graph per batch size, as a sampler runs. (Dynamic
    shapes fail on the upsampler: its input noise, torch.randn(x.shape, generator=...), needs
    concrete sizes with torch 2.14: NOTES.md, "torch.compile of the upsampler at a second batch size".)"""
    return torch.compile(module, backend=ctx.sizes.compile_backend, dynamic=False)


def time_sampling(ctx, figures, compile_):
    if ctx.small_run is None:
        raise RuntimeError("no checkpoint: small_train did not finish")
    G, clip, _ = sample.load_generator(ctx.small_run, device=ctx.device)
    figures["resolution"] = G.cfg.resolution
    G_run = compiled(G, ctx) if compile_ else G
    for B in ctx.sizes.sample_batches:
        prompts, seeds = prompts_and_seeds(B)
        clip.text_features(prompts)                                            # cached: G's time below
        t0 = time.perf_counter()
        sample.generate(G_run, clip, prompts, seeds, batch=B)                  # the first call compiles
        sync(ctx.device)
        if compile_:
            figures[f"compile_s_b{B}"] = time.perf_counter() - t0
        figures[f"s_per_img_b{B}"] = median_s(lambda: sample.generate(G_run, clip, prompts, seeds, batch=B),
                                              ctx.device, ctx.sizes.repeats) / B


def row_sample_64(ctx, figures):
    time_sampling(ctx, figures, compile_=False)


def row_sample_64_compile(ctx, figures):
    time_sampling(ctx, figures, compile_=True)


def time_chain(ctx, figures, compile_):
    if ctx.small_run is None:
        raise RuntimeError("no checkpoint: small_train did not finish")
    G, clip, _ = sample.load_generator(ctx.small_run, device=ctx.device)
    u_cfg = upsampler.U_PRESETS[ctx.sizes.upsampler]
    if u_cfg.in_resolution != G.cfg.resolution:
        raise RuntimeError(f"the base G makes {G.cfg.resolution} px, the upsampler reads {u_cfg.in_resolution} px")
    torch.manual_seed(0)
    U = upsampler.Upsampler(u_cfg, text_dim=clip.text_width).to(ctx.device).eval().requires_grad_(False)
    figures.update(U_params=sum(p.numel() for p in U.parameters()), out_px=u_cfg.out_resolution)
    G_run, U_run = (compiled(G, ctx), compiled(U, ctx)) if compile_ else (G, U)
    for B in ctx.sizes.chain_batches:
        prompts, seeds = prompts_and_seeds(B)
        clip.text_features(prompts)

        def chain():
            lowres = sample.generate(G_run, clip, prompts, seeds, batch=B)           # (B, 3, 64, 64)
            return sample.upsample(U_run, clip, lowres, prompts, seeds, batch=B)     # (B, 3, 512, 512)
        t0 = time.perf_counter()
        chain()
        sync(ctx.device)
        if compile_:
            figures[f"compile_s_b{B}"] = time.perf_counter() - t0
        figures[f"s_per_img_b{B}"] = median_s(chain, ctx.device, ctx.sizes.repeats) / B


def row_chain(ctx, figures):
    time_chain(ctx, figures, compile_=False)


def row_chain_compile(ctx, figures):
    time_chain(ctx, figures, compile_=True)


# -----------------------------------------------------------------------------
# peer: lucidrains' gigagan-pytorch in a child process with its own site folder

# Its own site folder (PYTHONPATH of its process) holds all of these, so that its open_clip 2.x and
# ours (3.x) never meet; the GPU machine has einops, accelerate and psutil, a CPU day may not.
PEER_WHEELS = [("gigagan-pytorch", "gigagan_pytorch"), ("open_clip_torch", "open_clip"), ("beartype", "beartype"),
               ("ema-pytorch", "ema_pytorch"), ("kornia", "kornia"), ("kornia_rs", "kornia_rs"),
               ("numerize", "numerize"), ("einops", "einops"), ("accelerate", "accelerate"), ("psutil", "psutil")]
# The peer's sizes are those of /work/shared/peer's timing (bench.py --peer): 32 px, G 7.5M / D 1.4M.
PEER_PROGRAM = r"""
import json, sys, time
import torch
from gigagan_pytorch import Generator, Discriminator
from gigagan_pytorch.gigagan_pytorch import TextEncoder
from gigagan_pytorch.open_clip import OpenClipAdapter
device, batch, steps, sample_batch, repeats, threads = sys.argv[1], *map(int, sys.argv[2:7])
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
torch.manual_seed(0)
if threads:
    torch.set_num_threads(threads)
clip = OpenClipAdapter(name="ViT-B-32", pretrained=None)            # random weights: nothing fetched
G = Generator(image_size=32, dim_capacity=8, dim_max=256,
              style_network=dict(dim=128, depth=2, dim_text_latent=128),
              text_encoder=TextEncoder(dim=128, depth=1, clip=clip),
              self_attn_resolutions=(16,), cross_attn_resolutions=(16,), num_conv_kernels=2).to(device)
D = Discriminator(image_size=32, dim_capacity=8, dim_max=256, text_encoder=TextEncoder(dim=128, depth=1, clip=clip),
                  attn_resolutions=(16,), multiscale_input_resolutions=(16,), num_conv_kernels=2).to(device)
texts = ["a large red circle on the left of a blue background"] * batch
def step():                                    # G and D forward and backward: no CLIP image loss
    images, rgbs = G(texts=texts, batch_size=batch, return_all_rgbs=True)
    logits, multiscale, aux = D(images, rgbs, texts=texts)
    (logits.mean() + sum(m.mean() for m in multiscale) + sum(a.mean() for a in aux)).backward()
def timed(fn, n):
    fn(); sync(); t = time.perf_counter()
    for _ in range(n): fn()
    sync(); return (time.perf_counter() - t) / n
out = {"train_img_s": batch / timed(step, steps)}
G.eval()
with torch.no_grad():
    for b in (1, sample_batch):
        out[f"sample_s_per_img_b{b}"] = timed(lambda: G(texts=texts[:1] * b, batch_size=b), repeats) / b
print(json.dumps(out))
"""


def row_peer(ctx, figures):
    folder = os.path.join(ROOT, "wheels", "peer")
    if not os.path.isdir(folder):
        return "not installed (no wheels/peer/: bench.py's docstring rebuilds it)"
    site = os.path.join(ctx.workdir, "peer_site")
    install_wheels(folder, PEER_WHEELS, target=site, all_of_them=True)
    B, sample_batch = ctx.sizes.peer_batch, max(ctx.sizes.sample_batches)
    # its site folder first (its open_clip 2.x over ours), then ours (ftfy and wcwidth, where install put them)
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", PEER_PROGRAM, str(ctx.device), str(B), str(ctx.sizes.peer_steps),
                           str(sample_batch), str(ctx.sizes.repeats), str(torch.get_num_threads())],
                          env=env, capture_output=True, text=True, cwd=ctx.workdir)
    if proc.returncode:
        raise RuntimeError("the peer failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    peer = json.loads(proc.stdout.strip().splitlines()[-1])
    figures.update({f"peer_{k}": v for k, v in peer.items()})
    # this project at the same size and batch, G and D alone (bench.py's "bench" size, no_clip terms)
    out = os.path.join(ctx.workdir, "ours_peer_size")
    argv = [*bench.CONFIGS["bench"], *bench.TERMS["no_clip"], *bench.QUIET, "--batch-size", str(B),
            "--device", str(ctx.device), "--max-steps", str(1 + ctx.sizes.peer_steps), "--log-every", "1",
            "--out", out]
    run_train(argv)
    rows = [r for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if r.get("kind") == "train"][1:]
    ours_img_s = B * len(rows) / sum(B / r["img_s"] for r in rows)
    G, clip, _ = sample.load_generator(out, device=ctx.device)
    figures["ours_train_img_s"] = ours_img_s
    figures["train_img_s_ratio"] = ours_img_s / peer["train_img_s"]
    for b in (1, sample_batch):
        prompts, seeds = prompts_and_seeds(b)
        s = median_s(lambda: sample.generate(G, clip, prompts, seeds, batch=b), ctx.device, ctx.sizes.repeats) / b
        figures[f"ours_sample_s_per_img_b{b}"] = s
        figures[f"sample_s_ratio_b{b}"] = s / peer[f"sample_s_per_img_b{b}"]


# -----------------------------------------------------------------------------
# The table

ROW_FUNCTIONS = {"install": row_install, "tests": row_tests, "small_train": row_small_train,
                 "full_step": row_full_step, "sample_64": row_sample_64, "sample_64_compile": row_sample_64_compile,
                 "chain": row_chain, "chain_compile": row_chain_compile, "peer": row_peer}
assert list(ROW_FUNCTIONS) == ROWS


def fmt(value):
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def markdown(result):
    lines = [f"# GPU check, {result['date']}", "",
             f"{result['device_name']}; torch {result['torch']}; {'quick' if result['quick'] else 'full'} mode; "
             f"{result['seconds']:.0f} s in all. Figures: img/s, s/img and s are medians or means of timed "
             "calls after a warm-up; GiB are torch.cuda.max_memory_allocated (- on a CPU); error_pct = "
             "(peak - dry-run estimate) / estimate.", "",
             "| row | status | s (budget) | figures | error |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        figures = ", ".join(f"{k} {fmt(v)}" for k, v in r["figures"].items())
        lines.append(f"| {r['row']} | {r['status']} | {r['seconds']:.1f} ({r['budget_s']}) | {figures or '-'} | "
                     f"{(r['error'] or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench.py --gpu", description="The prepared check of the CUDA path.")
    p.add_argument("--out", required=True, help="folder for gpu_check.md and gpu_check.json")
    p.add_argument("--quick", action="store_true", help="every row at tiny sizes, a few steps (a CPU smoke run)")
    p.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu (with --quick)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    p.add_argument("--fail-row", default="", help="make these rows (comma-separated) raise at once: tests the guard")
    args = p.parse_args(argv)
    args.rows, args.fail_row = args.rows.split(","), [r for r in args.fail_row.split(",") if r]
    unknown = [r for r in args.rows + args.fail_row if r not in ROWS]
    if unknown:
        p.error(f"unknown row {unknown[0]}: choose from {', '.join(ROWS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible: use --quick --device cpu for the CPU smoke run")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ["HF_HUB_OFFLINE"] = "1"                            # random weights only: never the hub
    device = torch.device(args.device)
    if args.quick:
        torch.set_num_threads(1)      # tiny models on a shared CPU: a second thread costs more than it gives
    ctx = Context(args, QUICK if args.quick else GPU, device, tempfile.mkdtemp(prefix="gpu_check_"),
                  time.perf_counter())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "device_name": name, "torch": torch.__version__,
              "quick": args.quick, "rows": []}
    log(f"gpu_check {result['date']} on {name}, torch {torch.__version__}{', quick' if args.quick else ''}")
    os.makedirs(args.out, exist_ok=True)
    for row in ROWS:
        if row in args.rows or row == "install":                  # the others need install's imports
            result["rows"].append(run_row(row, ROW_FUNCTIONS[row], ctx))
            result["seconds"] = time.perf_counter() - ctx.started
            write(args.out, result)                               # after every row: a killed run keeps its table
    log(markdown(result))
    return result


def write(out, result):
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(markdown(result))


if __name__ == "__main__":
    main()
