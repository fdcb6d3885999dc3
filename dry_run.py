"""
dry_run.py - `python train.py --dry-run`: the sizes and memory of a configuration and the command that
launches it, without building it for real (the models are made on the meta device: no weights, no
memory, seconds on a CPU, on any machine: `--device cuda --dry-run` plans a GPU run on a laptop).

    python train.py --full --dry-run                          # G 653.6M, D 381.0M, GiB per GPU, a launch line
    python train.py --stage upsampler --full --dry-run        # the 64 -> 512 upsampler: U 360.3M, D 405.2M
    python train.py --preset small --dry-run --gpu-memory 12  # the --batch-gpu that fits a 12 GB GPU

The estimate of one process's memory:
    state (fp32 weights, grads, two Adam moments, G_ema: 16 B per trained parameter + 4 B per G one)
  + frozen CLIP(s) (text tower fp32, image tower in the run's dtype)
  + batch_gpu * activations of one image: the bytes autograd saves for the backward pass
    (saved_activation_bytes), of the G step (G and D) or the D step (D on three batches: real,
    fake, mismatched), whichever is larger; halved for bfloat16.
Only the last term grows with the micro-batch, so with --gpu-memory GB the largest micro-batch that
fits is floor((GB - reserve - state - CLIP) / activations per image), lowered to one train.py accepts
(it divides --batch-size and the micro-batches split evenly over the processes); gradient
accumulation makes up the global batch, with the same result (train.py seeds every draw per
micro-batch).

The launch line holds every flag whose value differs from the preset's (launch_line), so it runs
the configuration planned here; its processes follow from the flags alone (processes: one per
micro-batch, up to the GPUs the preset is planned for, PLANNED_GPUS), so the line, planned again
with --dry-run, prints the same plan. Without --gpu-memory, an estimate above the memory of the
preset's GPUs (the full presets: A100s, 80 GB) prints a WARNING line with the --batch-gpu that fits.
The last line printed is JSON (the counts and the estimate), for scripts and tests; the counts in
the examples above are checked against it by tests/test_dry_run.py.
"""
import dataclasses
import importlib
import json
import logging
import shlex

import torch

from config import SUB_RULES, FlagError, parse_flags, text_width, vision_clip_spec

clip_lib = importlib.import_module("00_clip")
generator = importlib.import_module("03_generator")
discriminator = importlib.import_module("04_discriminator")
upsampler = importlib.import_module("06_upsampler")

GIB = 2 ** 30
RESERVE_GIB = 1.0  # CUDA context, cuDNN workspaces and allocator slack, never given to tensors (project's choice)
PLACEHOLDER_DATA = "shards/{00000..09999}.tar"  # the launch line's --data when the preset has none

# -----------------------------------------------------------------------------
# Measuring on the meta device


def saved_activation_bytes(forward, params=()):
    """Bytes that autograd keeps for the backward pass of forward(): every tensor it saves, each
    storage counted once, the parameters' own storages left out (they are the state, counted
    apart). Runs on the meta device too (same numbers, no memory, no compute), so it counts what
    the outputs of the leaf modules miss: attention maps, modulated weights, normalisation
    intermediates. Peak memory also holds the gradients in flight: a bound from below."""
    skip = {p.untyped_storage()._cdata for p in params}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            saved[storage._cdata] = max(saved.get(storage._cdata, 0), storage.nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


def frozen_clip_bytes(specs, dtype):
    """Memory of the frozen CLIPs named by `specs` (load_clip specs): open_clip models built on the
    meta device (no weights read); text towers in float32, image towers in `dtype` (image_tower_to).
    -> {model name: bytes}; tiny CLIPs (a few MB) and names open_clip does not know are left out."""
    out = {}
    for spec in dict.fromkeys(specs):
        name = spec.split("/")[0]
        if name not in clip_lib.open_clip.list_models():
            continue
        logging.disable(logging.WARNING)  # open_clip warns "initialized randomly": here on purpose, only counted
        try:
            with torch.device("meta"):  # built there, not on the CPU and then moved (ViT-L/14: seconds)
                model = clip_lib.open_clip.create_model(name, pretrained=None, device="meta")
        finally:
            logging.disable(logging.NOTSET)
        n_image = sum(p.numel() for p in model.visual.parameters())
        n_text = sum(p.numel() for p in model.parameters()) - n_image
        out[name] = 4 * n_text + (2 if dtype == "bfloat16" else 4) * n_image
    return out


def parameters(module):
    return sum(p.numel() for p in module.parameters())


def measure(cfg, g_cfg, d_cfg):
    """G (or U) and D on the meta device -> (their parameter counts, activation bytes per image)."""
    up = cfg.stage == "upsampler"
    dim = text_width(cfg)
    b, L = 2, 77
    with torch.device("meta"):
        G = upsampler.Upsampler(g_cfg, text_dim=dim).train() if up else generator.Generator(g_cfg, text_dim=dim)
        D = discriminator.Discriminator(d_cfg, text_dim=dim)
        text = (torch.zeros(b, L, dim), torch.ones(b, L, dtype=torch.bool), torch.full((b,), L - 1))
        z = torch.zeros(b, g_cfg.z_dim)
        inputs = (torch.zeros(b, 3, g_cfg.in_resolution, g_cfg.in_resolution), z) if up else (z,)
        params = [*G.parameters(), *D.parameters()]
        g_step = saved_activation_bytes(lambda: D(G(*inputs, *text), *text), params)
        with torch.no_grad():
            pyramid = G(*inputs, *text)                                  # the D step's fakes: no graph
        d_step = 3 * saved_activation_bytes(lambda: D(pyramid, *text), params)
    per_image = max(g_step, d_step) / b * (0.5 if cfg.dtype == "bfloat16" else 1.0)
    return parameters(G), parameters(D), per_image


# -----------------------------------------------------------------------------
# Fitting a GPU: --gpu-memory


def fit_batch_gpu(gpu_gib, state_bytes, act_bytes_per_image, clip_bytes, batch_size, world=1,
                  reserve_gib=RESERVE_GIB):
    """-> (batch_gpu, accumulation steps per process): the largest micro-batch b with
    state + CLIP + b * activations <= GPU - reserve, b dividing batch_size and batch_size / b
    divisible by world. Raises ValueError (one line, what to do) when not even one image fits."""
    if gpu_gib <= 0:
        raise ValueError(f"--gpu-memory {gpu_gib}: give the GPU's memory in GB, e.g. --gpu-memory 12")
    free = gpu_gib * GIB - reserve_gib * GIB - state_bytes - clip_bytes   # bytes left for activations
    most = int(free // act_bytes_per_image) if free > 0 else 0
    fits = [b for b in range(min(most, batch_size), 0, -1)
            if batch_size % b == 0 and (batch_size // b) % world == 0]
    if not fits:
        need = (reserve_gib * GIB + state_bytes + clip_bytes + act_bytes_per_image) / GIB
        raise ValueError(f"--gpu-memory {gpu_gib:g}: even --batch-gpu 1 needs about {need:.1f} GiB "
                         f"({reserve_gib:g} GiB kept free); use a bigger GPU, --dtype bfloat16 or a smaller preset")
    b = fits[0]
    return b, batch_size // (b * world)


def describe_fit(gpu_gib, state_bytes, act_bytes_per_image, clip_bytes, batch_size, world=1,
                 reserve_gib=RESERVE_GIB):
    """The dry run's line for --gpu-memory: the --batch-gpu, the estimate at it, the accumulation."""
    b, accumulation = fit_batch_gpu(gpu_gib, state_bytes, act_bytes_per_image, clip_bytes, batch_size, world,
                                    reserve_gib)
    used = (state_bytes + clip_bytes + b * act_bytes_per_image) / GIB
    return (f"--gpu-memory {gpu_gib:g}: --batch-gpu {b} fits (about {used:.1f} GiB of {gpu_gib:g}, "
            f"{reserve_gib:g} GiB kept free); --batch-size {batch_size} on {world} GPU{'s' * (world > 1)} "
            f"takes {accumulation} accumulation step{'s' * (accumulation != 1)} per GPU and step")


def memory_warning(cfg, state_bytes, act_bytes_per_image, clip_bytes, batch_gpu, gpu_gib):
    """Without --gpu-memory: a WARNING line when the plan's estimate at
    `batch_gpu` exceeds the memory of the GPU its preset is planned for (PLANNED_GPUS), naming the
    --batch-gpu that fits it; '' when it fits (or the preset names no GPU)."""
    used = (state_bytes + clip_bytes + batch_gpu * act_bytes_per_image) / GIB
    if cfg.gpu_memory or not gpu_gib or used <= gpu_gib - RESERVE_GIB:
        return ""
    try:
        b = fit_batch_gpu(gpu_gib, state_bytes, act_bytes_per_image, clip_bytes, cfg.batch_size)[0]
        fix = f"--batch-gpu {b} fits (--gpu-memory {gpu_gib:g} plans it)"
    except ValueError as err:
        fix = str(err)
    return (f"WARNING: about {used:.1f} GiB per GPU at --batch-gpu {batch_gpu}, more than the {gpu_gib:g} GiB "
            f"GPUs the {cfg.preset} preset is planned for: {fix}")


# -----------------------------------------------------------------------------
# The launch line


# The GPUs each preset is planned for (README's presets table): how many, and the memory of each in
# GiB. A plan launches at most that many processes, and warns when its estimate exceeds that memory.
PLANNED_GPUS = {"tiny": (1, 0.0), "small": (1, 24.0), "full": (32, 80.0), "full1024": (32, 80.0)}


def processes(batch_size, batch_gpu, most=32):
    """How many processes the launch line starts: one per micro-batch up to `most` (the preset's
    GPUs, PLANNED_GPUS), at most 8 a node, beyond 8 only whole nodes; always a divisor of the
    micro-batches (train.micro_batches), the rest being gradient accumulation. A function of the
    flags alone: the launch line, planned again, plans the same processes."""
    n_micro = batch_size // batch_gpu
    return max(w for w in range(1, min(n_micro, max(most, 1)) + 1) if n_micro % w == 0 and (w <= 8 or w % 8 == 0))


def flag_text(value):
    """A config value as train.py's flags read it back (config.coerce)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def launch_flags(cfg, g_cfg, d_cfg, loss_cfg, batch_gpu):
    """train.py's flags that give this configuration: the preset (and stage), then every field
    whose value differs from what the preset alone gives, --batch-gpu always, and a --data
    placeholder where the preset has no data set."""
    flags = ["--full"] if cfg.full else ["--preset", cfg.preset]
    if cfg.stage != "base":
        flags += ["--stage", cfg.stage]
    preset = parse_flags(flags)                                  # what the preset alone gives
    g_prefix = "u." if cfg.stage == "upsampler" else "g."
    planned_only = ("preset", "full", "stage", "dry_run", "gpu_memory", "batch_gpu")
    for prefix, ours, theirs in zip(("", g_prefix, "d.", "loss."), (cfg, g_cfg, d_cfg, loss_cfg), preset):
        for f in dataclasses.fields(ours):
            value = getattr(ours, f.name)
            if not prefix and f.name == "data" and not value:  # where the flag goes when it is given
                value = PLACEHOLDER_DATA
            is_flag = f.name not in planned_only if not prefix else f.name in SUB_RULES[prefix]  # the rest follows
            if is_flag and value != getattr(theirs, f.name):
                flags += [f"--{prefix}{f.name.replace('_', '-')}", flag_text(value)]
    flags += ["--batch-gpu", str(batch_gpu)]
    return flags


def launch_line(cfg, g_cfg, d_cfg, loss_cfg, batch_gpu, world):
    """The torchrun command of this plan, `world` processes (one line, shell-quoted)."""
    nproc = min(world, 8)
    flags = launch_flags(cfg, g_cfg, d_cfg, loss_cfg, batch_gpu)
    return (f"torchrun --nproc_per_node={nproc} --nnodes={world // nproc} train.py "
            + " ".join(shlex.quote(f) for f in flags))


# -----------------------------------------------------------------------------
# The dry run


def memory_estimate(cfg, g_cfg, d_cfg):
    """The pieces of one process's memory estimate (the module docstring's sum), in bytes:
    {"G_params", "D_params", "state_bytes", "clips": {CLIP name: bytes}, "clip_bytes",
    "act_bytes_per_image"}; a micro-batch of b images needs state + CLIP + b * activations.
    (gpu_check.py compares it with a GPU's measured peak.)"""
    up = cfg.stage == "upsampler"
    n_g, n_d, per_image = measure(cfg, g_cfg, d_cfg)
    # fp32 weights + grads + two Adam moments = 16 bytes per trained parameter; G_ema 4 more.
    state = 16 * (n_g + n_d) + 4 * n_g
    # the upsampler's CLIP reads text only, but is loaded whole; a base run may hold a second one
    clips = frozen_clip_bytes([cfg.clip] if up else [cfg.clip, vision_clip_spec(cfg) or cfg.clip], cfg.dtype)
    return {"G_params": n_g, "D_params": n_d, "state_bytes": state, "clips": clips,
            "clip_bytes": sum(clips.values()), "act_bytes_per_image": per_image}


def dry_run(cfg, g_cfg, d_cfg, loss_cfg):
    """Print the parameter counts, a memory estimate, with --gpu-memory the --batch-gpu that fits,
    and the launch line of this configuration (either stage), then one JSON line."""
    up = cfg.stage == "upsampler"
    plan = memory_estimate(cfg, g_cfg, d_cfg)
    n_g, n_d, per_image = plan["G_params"], plan["D_params"], plan["act_bytes_per_image"]
    state, clips, clip_bytes = plan["state_bytes"], plan["clips"], plan["clip_bytes"]
    batch_gpu = cfg.batch_gpu or cfg.batch_size
    gpus, gpu_gib = PLANNED_GPUS.get(cfg.preset, (32, 0.0))
    world = processes(cfg.batch_size, batch_gpu, gpus)            # the processes the plan launches
    fit = None
    if cfg.gpu_memory:
        try:  # the micro-batch first, then the processes it gives (as the launch line, planned again)
            batch_gpu = fit_batch_gpu(cfg.gpu_memory, state, per_image, clip_bytes, cfg.batch_size)[0]
            world = processes(cfg.batch_size, batch_gpu, gpus)
            fit = describe_fit(cfg.gpu_memory, state, per_image, clip_bytes, cfg.batch_size, world)
        except ValueError as err:
            raise FlagError(str(err)) from None
    acts = batch_gpu * per_image
    counts = {}
    if up:
        base = ""
        if cfg.preset in generator.G_PRESETS:  # the base model it follows, for scale (full1024 has none)
            with torch.device("meta"):
                counts["G_params"] = parameters(generator.Generator(generator.G_PRESETS[cfg.preset], text_width(cfg)))
                counts["D_params"] = parameters(discriminator.Discriminator(discriminator.D_PRESETS[cfg.preset],
                                                                            text_width(cfg)))
            base = f"; base G {counts['G_params'] / 1e6:.1f}M, D {counts['D_params'] / 1e6:.1f}M"
        print(f"U {n_g / 1e6:.1f}M parameters ({g_cfg.in_resolution} -> {g_cfg.out_resolution} px), its D "
              f"{n_d / 1e6:.1f}M (paper: 359.1M for the 64 -> 512 upsampler){base}")
    else:
        print(f"G {n_g / 1e6:.1f}M parameters, D {n_d / 1e6:.1f}M (paper: 652.5M and 381.4M for full)")
    clip_name = ", ".join(clips) or "tiny"
    print(f"frozen CLIP: {clip_name}" + (" (text features only)" if up else ""))
    print(f"memory per GPU, roughly: {state / GIB:.1f} GiB weights+grads+Adam+EMA, "
          f"{acts / GIB:.1f} GiB activations at --batch-gpu {batch_gpu} ({cfg.dtype}, "
          f"{per_image / 2**20:.0f} MiB per image), {clip_bytes / GIB:.1f} GiB frozen CLIP")
    if fit:
        print(fit)
    warning = memory_warning(cfg, state, per_image, clip_bytes, batch_gpu, gpu_gib)
    if warning:
        print(warning)
    print("launch: " + launch_line(cfg, g_cfg, d_cfg, loss_cfg, batch_gpu, world))
    counts.update({"U_params": n_g, "U_D_params": n_d} if up else {"G_params": n_g, "D_params": n_d})
    print(json.dumps({**counts, "batch_size": cfg.batch_size, "batch_gpu": batch_gpu,
                      "clip_gib": round(clip_bytes / GIB, 2),
                      "est_gib_per_gpu": round((state + acts + clip_bytes) / GIB, 2)}))
