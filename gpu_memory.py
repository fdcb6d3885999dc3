"""
gpu_memory.py - which --batch-gpu fits a GPU of a given size, from train.py --dry-run's estimate.

    python train.py --preset small --dry-run --gpu-memory 12    # -> the --batch-gpu and accumulation to use

The dry run builds G and D on the meta device and estimates the memory of one process as
    state (fp32 weights, grads, two Adam moments, G_ema: 16 B per trained parameter + 4 B per G one)
  + frozen CLIP(s)
  + batch_gpu * activations of one image (G's and D's for the G step, D's on three batches for the D step).
Only the last term grows with the micro-batch, so the largest micro-batch that fits is
    floor((GPU - reserve - state - CLIP) / activations per image),
lowered to one that train.py accepts: it divides --batch-size, and the micro-batches split evenly
over the processes (train.micro_batches). Gradient accumulation then makes up the global batch:
batch_size / (batch_gpu * processes) micro-batches per process and step, with the same result
(train.py seeds every draw per micro-batch).
"""
import torch

GIB = 2 ** 30
RESERVE_GIB = 1.0  # CUDA context, cuDNN workspaces and allocator slack, never given to tensors (project's choice)


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
        raise ValueError(f"--gpu-memory {gpu_gib}: even --batch-gpu 1 needs about {need:.1f} GiB "
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


def saved_activation_bytes(forward, params=()):
    """Bytes that autograd keeps for the backward pass of forward(): every tensor it saves, each
    storage counted once, the parameters' own storages left out (they are the state, counted
    apart). Runs on the meta device too (same numbers, no memory, no compute), so it measures
    what train.activation_bytes_per_image (leaf-module outputs) misses: attention maps, modulated
    weights, normalisation intermediates. Peak memory also holds the gradients in flight: a bound
    from below, closer than leaf outputs (small preset: 326 vs 54 MiB per image)."""
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
