"""
runtime.py - where train.py runs: devices and processes, the order of the data, seeds, and how
micro-batches and processes add up to one global batch.

Determinism and multi-GPU: the global batch is cut into micro-batches of `batch_gpu` images;
process `rank` takes micro-batches rank, rank + world, ... Every random draw of a micro-batch
(data indices, z, noise, wrong captions) is seeded by (seed, step, micro-batch), never by the
rank, and gradients are summed across processes with an explicit all-reduce. So one process with
gradient accumulation, N processes, and a resumed run all see the same numbers (tests check
this bit for bit).
"""
import itertools
import os
import time
import typing
from dataclasses import dataclass

import torch
import torch.distributed as dist

from config import FlagError

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
    torch.manual_seed((((cfg.seed * 1_000_003 + step) * 1009 + micro) * 17 + phase) % 2**63)  # < 2**64 (torch's limit)


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
    (seed, step) only: the same for 1 or N processes and after --resume. group > 1 (a data set whose
    indices g*group .. g*group+group-1 share a caption): the permutation is over groups, and a
    group's members come one after the other (a micro-batch holds whole groups if group divides it)."""

    def __init__(self, n_items, cfg, batch_gpu, micros, start_step, with_epoch=False, group=1):
        self.group = group
        self.n, self.cfg, self.batch_gpu, self.micros, self.start = n_items // group, cfg, batch_gpu, micros, start_step
        self.with_epoch = with_epoch  # yield (index, epoch): data sets that draw per epoch (CocoCaptions' caption)
        self._epoch, self._perm = -1, None

    def _index(self, k):
        member, k = k % self.group, k // self.group           # k: sample number -> group number
        epoch, i = divmod(k, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return int(self._perm[i]) * self.group + member

    def __iter__(self):
        step = self.start
        while True:
            for micro in self.micros:
                first = step * self.cfg.batch_size + micro * self.batch_gpu
                ks = range(first, first + self.batch_gpu)
                yield [(self._index(k), k // (self.n * self.group)) if self.with_epoch else self._index(k) for k in ks]
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
    sampler = StepSampler(len(dataset), cfg, batch_gpu, micros, start_step, with_epoch=hasattr(dataset, "set_epoch"),
                          group=getattr(dataset, "group", 1))
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
        # only what a training-mode forward moves (the mapping network's w_avg); fixed buffers stay out
        self.buffers = [b for name, b in module.named_buffers() if name.endswith("w_avg")]
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


