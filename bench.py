"""
bench.py - how fast this GigaGAN trains and samples on this machine, all figures from one run.

    python bench.py                                   # about 5-10 minutes on 2 CPU cores
    python bench.py --quick                           # a smoke run: the tiny sizes, a few steps
    python bench.py --threads 2 --json bench.json     # also write every figure as JSON
    python bench.py --peer /tmp/peer/bin/python --peer-script peer_lucidrains.py   # side by side
    python bench.py --sample-only --no-checks --peer /tmp/peer/bin/python --peer-script peer_lucidrains.py   # sampling only

It prints, in this order:
  peak      the machine's float32 (and bfloat16) matmul rate, n x n x n, in GFLOP/s;
  train     for the tiny preset and the benchmark size (32 px, batch 8, G 7.8M / D 1.3M, a random
            ViT-B/32 CLIP: `--clip ViT-B-32/none`), with every loss term and
            without the CLIP and vision-aided terms (`--loss.clip_weight 0 --loss.vision_weight 0`),
            in float32 and bfloat16: FLOPs per step, step time, img/s and utilisation (achieved
            FLOP/s over the float32 peak);
  sample    seconds per image at batch 1 and 32, for G alone (text features ready) and end to end
            (text features, G, clamping, PNGs and captions.jsonl, as sample.py does), with a new
            prompt per image and, batched, with one new prompt for every seed (the peer's batch);
  checks    the speed figures the unit tests do not assert: data loader images/s, the tiny
            upsampler's forward+backward, `python 06_upsampler.py`, how fast missing pretrained
            weights fail;
  peer      with --peer: lucidrains/gigagan-pytorch's step and sampling (its own script, in its own
            Python), run before and after this project's figures, and the ratios (equal work: the
            benchmark size without the CLIP and vision-aided terms against the peer's step).

How the training step is timed: `train.main` itself runs (the same code as `python train.py`,
nothing rebuilt here), with --log-every 1; the first step (allocation, the first lazy R1) is
skipped and the next r1_interval steps are averaged (total images / total time), so exactly one
lazy R1 step is in the window, as in a long run. As in a long run, too, the captions' text
features come from the frozen CLIP's cache: one untimed run of each size fills it first. img/s is train.py's own logged figure (snapshots
and checkpoints are kept out of it by train.py).
FLOPs per step: torch.utils.flop_counter.FlopCounterMode around one step of a train.main run,
opened and closed by the loop's timer (forward, backward and R1's double backward, matmuls and
convolutions only): a step without R1. The same with --loss.r1_interval 1 gives a step with R1,
and the figure is the average over an R1 period. FLOPs do not depend on the dtype.

Machines differ by a third from hour to hour and more when other processes share the cores:
compare figures only within one run of this script (the ratios it prints), never across days.

GPU check (--gpu, gpu_check.py: its rows, budgets and figures): one dated table of the CUDA path in
at most 8 minutes on an H100, OUT/gpu_check.md and OUT/gpu_check.json.
    python bench.py --gpu --out DIR                           # on one CUDA GPU
    python bench.py --gpu --quick --device cpu --out DIR      # every row at tiny sizes on a CPU
On a lent GPU (the device tool's `run`; that machine has no network), from the repository root:
    command:   PYTHONUNBUFFERED=1 python3 bench.py --gpu --out $OUT 2>&1 | tee $OUT/gpu_check.log
    carry:     ["wheels"]          timeout_s: 590
Then paste $OUT/gpu_check.md into NOTES.md (dated, with the card) and quote it in the README.
The carried wheels (wheels/, git-ignored, 22 MB: what that machine lacks, and lucidrains'
gigagan-pytorch with its own open_clip 2.x in wheels/peer/) are rebuilt here with
    F="--no-deps --only-binary=:all: --implementation cp --platform manylinux_2_28_x86_64 \
       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    pip download $F --python-version 3.12 -d wheels open_clip_torch==3.3.0 lpips==0.1.4 \
        webdataset==1.0.2 torch-fidelity==0.4.0 ftfy==6.3.1 wcwidth==0.9.5 braceexpand==0.1.7 timm==1.0.31
    pip download $F --python-version 3.12 -d wheels/peer gigagan-pytorch==0.3.0 open_clip_torch==2.32.0 \
        beartype==0.23.1 ema-pytorch==0.8.3 kornia==0.9.2 kornia_rs==0.2.0 einops==0.8.2 \
        accelerate==1.16.0 psutil==7.2.2
    pip download $F --python-version 3.11 -d wheels/peer kornia_rs==0.2.0    # this machine's Python (--quick)
    pip download --no-deps --no-binary=:all: -d /tmp numerize==0.12 && \
        pip wheel --no-deps -w wheels/peer /tmp/numerize-0.12.tar.gz          # numerize has no wheel
"""
import sys

if __name__ == "__main__" and "--gpu" in sys.argv[1:]:
    # The GPU check (gpu_check.py) installs carried wheels first, so it runs before the imports
    # below need them (00_clip imports open_clip).
    import gpu_check
    gpu_check.main([arg for arg in sys.argv[1:] if arg != "--gpu"])
    raise SystemExit(0)

import argparse
import contextlib
import io
import importlib
import json
import os
import statistics
import subprocess
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import sample
import train

clip_lib = importlib.import_module("00_clip")
generator = importlib.import_module("03_generator")
losses = importlib.import_module("05_losses")
upsampler = importlib.import_module("06_upsampler")

ROOT = os.path.dirname(os.path.abspath(__file__))

# The two sizes measured (train.py flags). "bench" is the README's benchmark command.
CONFIGS = {
    "tiny": [],
    "bench": ["--clip", "ViT-B-32/none", "--batch-size", "8",
              "--g.channels", "256,256,256,128", "--g.w_dim", "256", "--g.text_width", "256",
              "--d.channel_base", "1024", "--d.channel_max", "128"],
}
# Loss terms: all of them, or G and D alone (no frozen-CLIP image passes): the peer's equal work.
TERMS = {"all": [], "no_clip": ["--loss.clip_weight", "0", "--loss.vision_weight", "0"]}
DTYPES = ("float32", "bfloat16")
# Every run: no evaluation, no time budget, no snapshot or checkpoint before the last step.
# Timed steps per run: one R1 period (05_losses.LossConfig's lazy R1 interval, 16 in every preset).
R1_INTERVAL = losses.LossConfig().r1_interval
QUIET = ["--eval-every", "0", "--max-minutes", "0", "--snapshot-every", "100000", "--ckpt-every", "100000",
         "--seed", "0"]


def log(*args):
    print(*args, flush=True)


# -----------------------------------------------------------------------------
# Peak


def matmul_gflops(n, dtype, repeats):
    """Best n x n x n matmul rate in GFLOP/s (2 n^3 FLOPs per product)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b                                                                   # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# -----------------------------------------------------------------------------
# Training: train.main itself


TEXT_CACHE = {}  # load_clip spec -> {caption: cached text features}, shared by this script's runs


def run_train(argv, timer=None):
    """train.main(argv, timer) with its printing captured; returns the captured text.

    Every run starts with the text features its frozen CLIP computed for the same spec in earlier
    runs: runs with the same seed see the same captions, so after one warm-up run of a size the
    timed runs find every caption cached, as a long run does (a cold cache encodes ~16 new captions
    a step, 15% of the benchmark size's step without the CLIP terms: --breakdown's "captions")."""
    load, loaded = clip_lib.load_clip, []

    def load_clip(spec, *args, **kwargs):
        clip = load(spec, *args, **kwargs)
        if isinstance(getattr(clip, "_cache", None), dict):     # FrozenCLIP's per-caption cache
            clip._cache.update(TEXT_CACHE.get(spec, {}))
            loaded.append((spec, clip))
        return clip
    clip_lib.load_clip = load_clip
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            train.main(argv, timer=timer)
    finally:
        clip_lib.load_clip = load
        for spec, clip in loaded:
            TEXT_CACHE.setdefault(spec, {}).update(clip._cache)
    return buf.getvalue()


def train_rows(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == "train"]


def run_config(out):
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)


def tiny_clip(workdir):
    """A tiny CLIP for the tiny preset (2 training steps: a step's cost does not depend on its weights)."""
    out = os.path.join(workdir, "clip")
    run_train(["--stage", "clip", "--out", out, "--clip-steps", "2", "--clip-batch-size", "16"])
    return f"tiny:{out}/clip.pt"


def time_train(base, out, steps):
    """Run train.py for 1 + steps steps; -> (img/s, s/step, batch) over the steps after the first."""
    run_train([*base, "--max-steps", str(1 + steps), "--log-every", "1", "--out", out])
    rows = train_rows(out)[1:]                                   # the first step warms up
    batch = run_config(out)["train"]["batch_size"]
    seconds = sum(batch / r["img_s"] for r in rows)              # each row: one step's images / time
    return batch * len(rows) / seconds, seconds / len(rows), batch


class _NoModuleTracker:
    """Stands in for FlopCounterMode's per-module tracker, whose hooks on every module's backward
    break R1's torch.autograd.grad ("A leaf node was passed to _will_engine_execute_node"). The
    total needs no per-module breakdown: every FLOP is counted under "Global"."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def flop_counter():
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracker()
    return counter


class StepFlops:
    """train.main's `timer`: a FlopCounterMode open from the `data` part of step index `step` to the
    end of its EMA part (the parts open and close in order, so the counter's mode stays on top of
    torch's mode stack for the whole step): one step's FLOPs, nothing before or after it."""

    def __init__(self, step):
        self.step, self.done, self.counter = step, 0, None

    @property
    def active(self):
        return self.counter is not None and self.done == self.step

    @contextlib.contextmanager
    def __call__(self, label):
        if label == "data" and self.done == self.step:
            self.counter = flop_counter()
            self.counter.__enter__()
        try:
            yield
        except BaseException:
            if self.active:
                self.counter.__exit__(None, None, None)
            self.counter = None
            raise
        if label == "EMA":
            if self.active:
                self.counter.__exit__(None, None, None)
            self.done += 1


def count_flops(base, workdir, step=1):
    """FLOPs of step index `step` of a train.py run, less the frozen CLIP's encoding of captions
    it has not seen in that step: a long run finds them in the text cache (ViT-B/32: about
    1 GFLOP a caption). Step 1: R1 falls on step 0 unless --loss.r1_interval is 1."""
    out = tempfile.mkdtemp(dir=workdir)
    window, encoding = StepFlops(step), []
    encode = getattr(clip_lib.FrozenCLIP, "_encode", None)

    def counted_encode(self, captions):
        with flop_counter() as inner:                            # nested: the step's counter counts it too
            result = encode(self, captions)
        if window.active:
            encoding.append(inner.get_total_flops())
        return result
    if encode is not None:                                       # renamed: the encoding is counted too
        clip_lib.FrozenCLIP._encode = counted_encode
    try:
        run_train([*base, "--max-steps", str(step + 1), "--log-every", "1000", "--out", out], timer=window)
    finally:
        if encode is not None:
            clip_lib.FrozenCLIP._encode = encode
    return window.counter.get_total_flops() - sum(encoding)


def step_flops(base, workdir, r1_interval, amortise=True):
    """FLOPs of one training step, averaged over an R1 period (see the docstring)."""
    plain = count_flops(base, workdir)                                    # step index 1: no R1 (interval >= 2)
    if not amortise or r1_interval <= 1:
        return plain
    with_r1 = count_flops([*base, "--loss.r1_interval", "1"], workdir)   # step index 1 with R1
    return plain + (with_r1 - plain) / r1_interval


def bench_train(configs, args, workdir, peak):
    rows, runs = [], {}
    clip = None
    for name in configs:
        extra = list(CONFIGS[name])
        if name == "tiny":
            clip = clip or tiny_clip(workdir)
            extra += ["--clip", clip]
        # one untimed run fills the text cache with the captions every timed run below will see
        run_train([*extra, *TERMS["no_clip"], *QUIET, "--max-steps", str(1 + (args.steps or R1_INTERVAL)),
                   "--log-every", "1000", "--out", os.path.join(workdir, f"{name}_warm")])
        for terms in TERMS:
            flops = None
            for dtype in DTYPES:
                out = os.path.join(workdir, f"{name}_{terms}_{dtype}")
                base = [*extra, *TERMS[terms], "--dtype", dtype, *QUIET]
                img_s, step_s, batch = time_train(base, out, args.steps or R1_INTERVAL)
                r1_interval = run_config(out)["loss"]["r1_interval"]
                if not args.steps and r1_interval != R1_INTERVAL:
                    log(f"note   {name}: r1_interval {r1_interval}, the window holds {R1_INTERVAL} steps")
                if flops is None:                                # the same in either dtype
                    flops = step_flops([*extra, *TERMS[terms], *QUIET], workdir, r1_interval, not args.quick)
                util = flops / step_s / (peak * 1e9)
                row = dict(config=name, terms=terms, dtype=dtype, batch=batch, flops_per_step=flops,
                           step_s=step_s, img_s=img_s, gflops_per_s=flops / step_s / 1e9, utilisation=util)
                rows.append(row)
                runs[(name, terms, dtype)] = out
                log(f"train  {name:5s} {terms:7s} {dtype:8s} batch {batch:2d}: {flops / 1e9:7.2f} GFLOP/step, "
                    f"{step_s:6.3f} s/step, {img_s:6.2f} img/s, {flops / step_s / 1e9:6.1f} GFLOP/s "
                    f"= {100 * util:4.1f}% of the float32 peak")
    return rows, runs


# -----------------------------------------------------------------------------
# Where a step's time goes (--breakdown): train.main again, with timers around its pieces

class PhaseTimer:
    """train.main's `timer`: `with timer(label):` around each part of a step (data, D step with its
    lazy R1, G step, EMA). Inside a part, the model calls wrapped below (G, D, the vision-aided D,
    CLIP's image tower, backward, optimiser steps) are timed under that part's name. Only the
    window after the first step counts (allocation, the first lazy R1)."""

    def __init__(self, steps):
        self.totals, self.phase, self.window, self.steps = {}, "data", [], steps

    @contextlib.contextmanager
    def __call__(self, label):
        self.phase = label
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(label, time.perf_counter() - t0)
            if label == "EMA":                                  # the end of a step
                self.window.append(time.perf_counter())

    def add(self, key, seconds):
        if 1 <= len(self.window) <= self.steps:                 # after the first step, up to the last
            self.totals[key] = self.totals.get(key, 0.0) + seconds

    def wrap(self, owner, name, what):
        """Time owner.name (a model's or torch's method) under "<part>: <what>"; -> an undo function."""
        fn = getattr(owner, name)
        timer = self

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timer.add(f"{timer.phase}: {what}", time.perf_counter() - t0)
        setattr(owner, name, timed)
        return lambda: setattr(owner, name, fn)


def bench_breakdown(name, terms, workdir, steps, clip=None, dtype="float32"):
    """One configuration's step, split into its parts: a table of milliseconds per step."""
    extra = list(CONFIGS[name]) + TERMS[terms] + (["--clip", clip] if name == "tiny" else [])
    disc = importlib.import_module("04_discriminator")
    timer = PhaseTimer(steps)
    out = os.path.join(workdir, f"breakdown_{name}_{terms}")
    run_train([*extra, *QUIET, "--max-steps", str(1 + steps), "--log-every", "1000", "--out", out + "_warm"])
    undo = [timer.wrap(generator.Generator, "forward", "G forward"),
            timer.wrap(disc.Discriminator, "forward", "D forward"),
            timer.wrap(disc.VisionAidedDiscriminator, "forward", "vision-aided D forward"),
            timer.wrap(clip_lib.FrozenCLIP, "image_features_and_embedding", "CLIP image tower"),
            timer.wrap(torch.Tensor, "backward", "backward"),
            timer.wrap(torch.optim.AdamW, "step", "optimiser step")]
    try:
        run_train([*extra, "--dtype", dtype, *QUIET, "--max-steps", str(1 + steps), "--log-every", "1", "--out", out],
                  timer=timer)
    finally:
        for u in reversed(undo):
            u()
    step_s = (timer.window[-1] - timer.window[0]) / steps
    per_step = {k: v / steps for k, v in sorted(timer.totals.items())}
    parts = ("data", "D step", "G step", "EMA")
    rest = step_s - sum(per_step.get(k, 0.0) for k in parts)
    log(f"breakdown {name} {terms} {dtype}: {step_s:.3f} s/step over {steps} steps (one lazy R1 per {R1_INTERVAL})")
    for k in parts:
        log(f"  {k:45s} {1000 * per_step.get(k, 0.0):8.1f} ms  {100 * per_step.get(k, 0.0) / step_s:5.1f}%")
        for sub in per_step:
            if sub.startswith(k + ": "):
                log(f"    {sub:43s} {1000 * per_step[sub]:8.1f} ms  {100 * per_step[sub] / step_s:5.1f}%")
    log(f"  {'the rest (logs, snapshots, Python)':45s} {1000 * rest:8.1f} ms  {100 * rest / step_s:5.1f}%")
    return dict(config=name, terms=terms, dtype=dtype, step_s=step_s, per_step_s=per_step, rest_s=rest)


# -----------------------------------------------------------------------------
# Sampling: sample.py's own functions on a run's checkpoint


def fresh_captions(seed):
    """An endless stream of distinct shapes captions (each one new to a CLIP's text cache)."""
    seen, ds, i = set(), data.ShapesDataset(32, seed=seed), 0
    while True:
        caption = ds[i][1]
        i += 1
        if caption not in seen:
            seen.add(caption)
            yield caption


def median_time(fn, repeats):
    fn()                                                                    # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_sampling(name, run_dir, batches, repeats, workdir):
    G, clip, _ = sample.load_generator(run_dir)
    captions = fresh_captions(seed=1000)
    rows = []
    for B in batches:
        seeds = list(range(B))
        ready = [next(captions) for _ in range(B)]
        text = clip.text_features(ready)                                   # cached: G alone below
        z = sample.seeded_z(seeds, G.cfg.z_dim, "cpu")

        def g_alone():
            with torch.no_grad():
                G(z, *text, noise_mode="const")

        def end_to_end(one_prompt=False):                                   # new prompt(s) every call
            prompts = [next(captions)] * B if one_prompt else [next(captions) for _ in range(B)]
            misses = clip.cache_misses
            images = sample.generate(G, clip, prompts, seeds, batch=B)
            assert clip.cache_misses - misses == len(set(prompts)), "the prompts must be new to the text cache"
            sample.write_outputs(tempfile.mkdtemp(dir=workdir), images,
                                 [{"caption": p, "seed": s} for p, s in zip(prompts, seeds)])

        g = median_time(g_alone, repeats) / B
        e2e = median_time(end_to_end, repeats) / B
        # one new prompt x B seeds (sample.py --prompt P --n B; the peer's batched workload): one text pass
        one = median_time(lambda: end_to_end(one_prompt=True), repeats) / B if B > 1 else e2e
        rows.append(dict(config=name, batch=B, g_s_per_img=g, end_to_end_s_per_img=e2e, one_prompt_s_per_img=one))
        log(f"sample {name:5s} batch {B:2d}: G alone {1000 * g:7.2f} ms/img, end to end {1000 * e2e:7.2f} ms/img "
            f"({B} new prompts), {1000 * one:7.2f} ms/img (one new prompt x {B} seeds)")
    return rows


# -----------------------------------------------------------------------------
# Checks moved out of the unit tests (figures, not assertions)


def bench_checks(workdir, quick=False):
    checks = {}
    checks["data_img_s"] = data.measure_images_per_second(data.ShapesDataset(32), num_workers=2, n_images=3000)
    log(f"check  shapes 32 px, DataLoader with 2 workers: {checks['data_img_s']:,.0f} images/s (target >= 500)")

    torch.manual_seed(0)
    U = upsampler.Upsampler(upsampler.U_PRESETS["tiny"], text_dim=128)
    cfg, B = U.cfg, 8
    lowres = torch.rand(B, 3, cfg.in_resolution, cfg.in_resolution) * 2 - 1
    z, text = torch.randn(B, cfg.z_dim), generator.random_text(B, D=128)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        sum(x.square().mean() for x in U(lowres, z, *text)).backward()
        best = min(best, time.perf_counter() - t0)
    checks["upsampler_tiny_fwd_bwd_s"] = best
    log(f"check  tiny upsampler forward + backward at batch 8: {best:.3f} s (best of 3; target < 1 s)")

    if not quick:                                                          # a fresh process: 10-30 s
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "06_upsampler.py"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        checks["upsampler_demo_s"] = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr[-2000:]
        log(f"check  python 06_upsampler.py: {checks['upsampler_demo_s']:.1f} s (target < 30 s)")

    os.environ["HF_HUB_OFFLINE"] = "1"
    t0 = time.perf_counter()
    try:
        clip_lib.load_clip("ViT-B-32/laion2b_s34b_b79k")
    except RuntimeError:
        pass
    checks["clip_missing_weights_s"] = time.perf_counter() - t0
    log(f"check  a missing pretrained CLIP fails in {checks['clip_missing_weights_s']:.2f} s (target < 5 s; "
        "0 s when its weights are cached)")

    torch_home = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = tempfile.mkdtemp(dir=workdir)              # an empty cache: no weights
    t0 = time.perf_counter()
    try:
        losses.LPIPS("vgg")
    except losses.MissingWeightsError:
        pass
    finally:
        if torch_home is None:
            del os.environ["TORCH_HOME"]
        else:
            os.environ["TORCH_HOME"] = torch_home
    checks["lpips_missing_weights_s"] = time.perf_counter() - t0
    log(f"check  missing LPIPS weights fail in {checks['lpips_missing_weights_s']:.2f} s (target < 5 s)")
    return checks


# -----------------------------------------------------------------------------
# The peer: its own script in its own Python; its G is reused for batched sampling

PEER_WRAPPER = r"""
import json, runpy, sys, time
import torch
script, size, threads, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.argv = [script, size, threads]
ns = runpy.run_path(script, run_name="__main__")       # prints the script's own JSON line
G, texts = ns["G"], ns["texts"]
with torch.no_grad():
    G(texts=texts[:1] * batch, batch_size=batch)        # warm-up
    t = time.perf_counter()
    G(texts=texts[:1] * batch, batch_size=batch)
    s = (time.perf_counter() - t) / batch
print(json.dumps({"sample_batch": batch, "batched_sample_s_per_img": s}))
"""


def run_peer(python, script, threads, batch):
    """The peer script's figures (training step at batch 8, sampling at batch 1) plus its G's
    sampling at `batch`: one dict."""
    proc = subprocess.run([python, "-c", PEER_WRAPPER, os.path.abspath(script), "32", str(threads), str(batch)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"bench.py: the peer failed ({python} {script}): {last}")
    result = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            result.update(json.loads(line))
    log(f"peer   train {result['train_img_per_s']:.2f} img/s, sample {1000 * result['sample_s_per_img']:.1f} "
        f"ms/img at batch 1, {1000 * result['batched_sample_s_per_img']:.1f} ms/img at batch {batch}")
    return result


def peer_ratios(peers, train_rows_, sample_rows):
    """Ours / the peer's, against the mean of its runs before and after ours."""
    mean = {k: statistics.mean(p[k] for p in peers)
            for k in ("train_img_per_s", "sample_s_per_img", "batched_sample_s_per_img")}
    ratios = {}
    for r in train_rows_:
        if r["config"] == "bench":                                # the peer's size
            ratios[f"train_img_s_{r['terms']}_{r['dtype']}"] = r["img_s"] / mean["train_img_per_s"]
    for r in sample_rows:
        if r["config"] == "bench":
            peer = mean["sample_s_per_img"] if r["batch"] == 1 else mean["batched_sample_s_per_img"]
            ratios[f"sample_s_per_img_batch{r['batch']}"] = r["end_to_end_s_per_img"] / peer
            ratios[f"sample_G_s_per_img_batch{r['batch']}"] = r["g_s_per_img"] / peer
            if r["batch"] > 1:  # the peer's batched figure is one text repeated: the same work
                ratios[f"sample_one_prompt_s_per_img_batch{r['batch']}"] = r["one_prompt_s_per_img"] / peer
    for k, v in ratios.items():
        what = "x the peer's img/s" if k.startswith("train") else "x the peer's s/img"
        log(f"ratio  {k}: {v:.2f} {what}")
    return ratios


# -----------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description="Training and sampling speed, side by side, in one run.")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes only, 1 timed step, 1 repeat")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--steps", type=int, default=0, help="timed steps per run (default: the R1 interval, 16)")
    p.add_argument("--configs", default=None, help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--peer", default=None, help="the peer's Python (a venv with gigagan-pytorch 0.3.0)")
    p.add_argument("--peer-script", default=None, help="the peer's timing script (with --peer)")
    p.add_argument("--no-checks", action="store_true", help="skip the checks moved out of the unit tests")
    p.add_argument("--sample-only", action="store_true",
                   help="time sampling only (and the peer with --peer): no training figures")
    p.add_argument("--breakdown", action="store_true",
                   help="only: where each configuration's float32 step spends its time (timers around train.py's pieces)")
    args = p.parse_args(argv)
    if (args.peer is None) != (args.peer_script is None):
        p.error("--peer and --peer-script go together: the peer's Python and its timing script")
    if args.peer_script is not None and not os.path.isfile(args.peer_script):
        p.error(f"--peer-script {args.peer_script}: no such file")
    if args.threads < 1 or args.steps < 0:
        p.error("--threads must be >= 1 and --steps >= 0")
    names = args.configs.split(",") if args.configs else (["tiny"] if args.quick else list(CONFIGS))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--configs {','.join(unknown)}: choose from {', '.join(CONFIGS)}")
    args.configs = names
    if args.quick and not args.steps:
        args.steps = 1
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")                 # random weights only: never wait on the hub
    torch.set_num_threads(args.threads)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "torch": torch.__version__,
              "quick": args.quick}
    log(f"bench.py {result['date']}, torch {torch.__version__}, {args.threads} thread(s), "
        f"{os.cpu_count()} CPU(s){', quick' if args.quick else ''}")
    with tempfile.TemporaryDirectory(prefix="bench_") as workdir:
        if args.breakdown:
            clip = tiny_clip(workdir) if "tiny" in args.configs else None
            result["breakdown"] = [bench_breakdown(name, terms, workdir, args.steps or R1_INTERVAL, clip)
                                   for name in args.configs for terms in TERMS]
            args.peer = None
            return finish(args, result)
        peers = []
        if args.peer:
            peers.append(run_peer(args.peer, args.peer_script, args.threads, 32))

        n = 1024 if args.quick else 2048
        peak = {"n": n, "float32_gflops": matmul_gflops(n, torch.float32, 3 if args.quick else 5),
                "bfloat16_gflops": matmul_gflops(n, torch.bfloat16, 3 if args.quick else 5)}
        result["peak"] = peak
        log(f"peak   {n}^3 matmul: float32 {peak['float32_gflops']:.1f} GFLOP/s, "
            f"bfloat16 {peak['bfloat16_gflops']:.1f} GFLOP/s")

        if args.sample_only:  # a one-step run of each size is the checkpoint to sample from
            result["train"], runs = [], {}
            for name in args.configs:
                out = os.path.join(workdir, f"{name}_all_float32")
                extra = ["--clip", tiny_clip(workdir)] if name == "tiny" else []
                run_train([*CONFIGS[name], *extra, *QUIET, "--max-steps", "1", "--out", out])
                runs[(name, "all", "float32")] = out
        else:
            result["train"], runs = bench_train(args.configs, args, workdir, peak["float32_gflops"])

        result["sample"] = []
        batches = (1, 4) if args.quick else (1, 32)
        for name in args.configs:
            result["sample"] += bench_sampling(name, runs[(name, "all", "float32")], batches,
                                               1 if args.quick else 5, workdir)

        if not args.no_checks:
            result["checks"] = bench_checks(workdir, args.quick)

        if args.peer:
            peers.append(run_peer(args.peer, args.peer_script, args.threads, 32))
            result["peer"] = peers
            result["ratios"] = peer_ratios(peers, result["train"], result["sample"])
    return finish(args, result)


def finish(args, result):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        log(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
