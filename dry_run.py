"""
dry_run.py - `python train.py --dry-run`: the sizes and memory of a configuration, without building it
for real (the models are made on the meta device: no weights, no memory, seconds on a CPU).

    python train.py --full --dry-run                     # G 652.5M, D 381.4M, GiB per GPU, a launch line
    python train.py --stage upsampler --full --dry-run   # the 64 -> 512 upsampler

The last line printed is JSON (the counts and the estimate), for scripts and tests.
"""
import importlib
import json
import logging

import torch

from config import vision_clip_spec

clip_lib = importlib.import_module("00_clip")
generator = importlib.import_module("03_generator")
discriminator = importlib.import_module("04_discriminator")
upsampler = importlib.import_module("06_upsampler")


def dry_run(cfg, g_cfg, d_cfg, loss_cfg):
    """Print the parameter counts and a memory estimate of this configuration (either stage)."""
    if cfg.stage == "upsampler":
        return dry_run_upsampler(cfg, g_cfg, d_cfg)
    return dry_run_base(cfg, g_cfg, d_cfg)


def text_width(cfg):
    """Width of the CLIP text tower's token features: a known open_clip model's, else the tiny CLIP's."""
    return {"ViT-L-14": 768, "ViT-B-32": 512, "ViT-B-16": 512, "ViT-H-14": 1024}.get(cfg.clip.split("/")[0], 128)


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


def dry_run_base(cfg, g_cfg, d_cfg):
    text_dim = text_width(cfg)
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


def dry_run_upsampler(cfg, u_cfg, d_cfg):
    """--stage upsampler --dry-run: U and its D on the meta device (and the base model's counts)."""
    text_dim = text_width(cfg)
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

