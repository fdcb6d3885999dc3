"""Shared test setup: offline, deterministic, small thread count (CI has 2 cores); the session's
one tiny CLIP and one tiny run; helpers used by several test files."""
import contextlib
import importlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# One thread: the tiny models here are dominated by small ops, where a second thread costs
# more in synchronisation than it gains (and CI runs two processes at once in the gloo test).
torch.set_num_threads(1)


def load(name):
    """Import a numbered module such as '01_kernel_selection' (names start with a digit)."""
    return importlib.import_module(name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ----------------------------------------------------------------------------- one tiny CLIP, one tiny run

# The settings of every short base run in the tests: batch 4, a log line per step, no snapshots,
# evaluations or checkpoints but the last step's.
FAST = ["--batch-size", "4", "--log-every", "1", "--snapshot-every", "1000", "--eval-every", "0",
        "--ckpt-every", "1000"]


# Tiny CLIPs trained for plumbing (a few steps) draw their batches from this many pairs.
SMALL_CLIP_POOL = 256


@contextlib.contextmanager
def small_clip_pool(size=SMALL_CLIP_POOL):
    """train.py's tiny CLIPs, inside: their in-memory pool of pairs holds `size` pairs, not 8,192.
    Rendering, tokenising and listing the hard negatives of 8,192 pairs takes about 7 s of CPU per
    tower, before the first step; a run of 4 steps of 16 draws 64 pairs from it. For tests whose
    CLIP is plumbing, never for a CLIP a test judges by what it learned (nor the pinned weights)."""
    clip_lib = importlib.import_module("00_clip")
    real = clip_lib.train_tiny_clip

    def train_tiny_clip(*args, **kwargs):
        kwargs.setdefault("pool_size", size)
        return real(*args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clip_lib, "train_tiny_clip", train_tiny_clip)
        yield


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """One tiny ViT CLIP and its ResNet-tower sibling (vision_clip.pt, for the vision-aided D) for
    the whole session, 4 steps each on a small pool: the tests check plumbing, not accuracy.
    -> 'tiny:PATH'."""
    import train
    out = tmp_path_factory.mktemp("clip")
    with small_clip_pool():
        train.main(["--stage", "clip", "--out", str(out), "--clip-tower", "vit", "--clip-steps", "4",
                    "--clip-batch-size", "16"])
    assert (out / "clip.pt").is_file() and (out / "vision_clip.pt").is_file()
    return f"tiny:{out / 'clip.pt'}"


@pytest.fixture(scope="session")
def tiny_run(tiny_clip, tmp_path_factory):
    """One tiny base run of 2 steps (FAST, seed 0) for the whole session, its CLIP files beside its
    checkpoint as `python train.py` leaves them. Read it, never write into it (copy it first)."""
    import shutil
    import train
    out = tmp_path_factory.mktemp("shared") / "run"
    out.mkdir()
    clip_dir = os.path.dirname(tiny_clip[len("tiny:"):])
    for name in ("clip.pt", "vision_clip.pt"):
        shutil.copy(os.path.join(clip_dir, name), out / name)
    train.main(["--out", str(out), "--clip", f"tiny:{out / 'clip.pt'}", *FAST, "--max-steps", "2"])
    return out


# ----------------------------------------------------------------------------- helpers shared by the files

def state(out):
    """The checkpoint of a run directory, as train.py wrote it."""
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


def log_rows(out, kind="train"):
    """The rows of <out>/log.jsonl of one kind ("train" or "eval")."""
    return [row for row in map(json.loads, open(out / "log.jsonl")) if row["kind"] == kind]


def assert_same(a, b, path="checkpoint"):
    """Two checkpoints (or any nest of dicts, lists and tensors) are equal, tensors bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (path, a.keys() ^ b.keys())
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{path}: max difference {(a.double() - b.double()).abs().max().item()}"
    else:
        assert a == b, (path, a, b)


def bad(main, argv, capsys, prog):
    """main(argv) must stop with exit status 2 and one line on stderr that starts with 'PROG: '. -> the line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: "), err
    return err[0]


class CountOps(TorchDispatchMode):
    """Counts the tensor ops dispatched, except views and copies (reshape of a batch of 1 is a view,
    of a larger batch a copy: those counts legitimately differ). Equal counts for two batch sizes:
    no Python loop over the batch."""

    LAYOUT_OPS = {"aten.view.default", "aten._unsafe_view.default", "aten.clone.default"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += str(func) not in self.LAYOUT_OPS
        return func(*args, **(kwargs or {}))


def double_backward(outputs, inputs, params):
    """R1's gradient of a gradient: g = d sum(outputs) / d inputs, then ||g||^2 backward to params.
    Every param that gets a gradient gets a finite one, and at least one gets a nonzero one.
    -> the number of params that got a gradient."""
    grads = torch.autograd.grad(sum(o.sum() for o in outputs), inputs, create_graph=True)
    assert all(torch.isfinite(g).all() for g in grads)
    sum(g.square().sum() for g in grads).backward()
    got = [p.grad for p in params if p.grad is not None]
    assert got and all(torch.isfinite(g).all() for g in got)
    assert any(g.abs().sum() > 0 for g in got)
    return len(got)


class StepHook:
    """train.main's `timer` for the tests: torch's RNG state at the end of every step (after its
    EMA), and `action()` at the end of step `at` (e.g. a Ctrl-C)."""

    def __init__(self, at=None, action=None):
        self.rng, self.at, self.action = [], at, action

    @contextlib.contextmanager
    def __call__(self, label):
        yield
        if label == "EMA":
            self.rng.append(torch.get_rng_state())
            if len(self.rng) == self.at:
                self.action()


# The settings of every short upsampler run in the tests: batch 2 of 128 px, a random LPIPS
# backbone (offline), step 1 the reconstruction warm-up, then GAN steps with R1 at each.
UP_FAST = ["--stage", "upsampler", "--batch-size", "2", "--log-every", "1", "--snapshot-every", "1000",
           "--eval-every", "0", "--ckpt-every", "1000", "--lpips", "random", "--warmup-steps", "1",
           "--loss.r1-interval", "1"]


@pytest.fixture(scope="session")
def tiny_upsampler(tiny_run):
    """The tiny 32 -> 128 upsampler trained 2 steps (warm-up, then a GAN step) on the tiny run's
    CLIP, with a snapshot and an evaluation at step 2, in a directory beside the tiny run."""
    import train
    out = tiny_run.parent / "up"
    hook = StepHook()                             # torch's RNG state at the end of every step, for resume tests
    train.main(["--out", str(out), "--clip", f"tiny:{tiny_run / 'clip.pt'}", *UP_FAST, "--max-steps", "2",
                "--snapshot-every", "2", "--eval-every", "2", "--eval-images", "4"], timer=hook)
    torch.save(hook.rng, tiny_run.parent / "up_rng.pt")
    return out
