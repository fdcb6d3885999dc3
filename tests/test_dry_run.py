"""dry_run.py: the largest --batch-gpu that fits (against a brute-force search), the bytes autograd saves,
the launch line read back by the parser, --gpu-memory."""
import itertools

import pytest

import dry_run

GIB = 2 ** 30


def brute_force(gpu_gib, state, act, clip, batch_size, world, reserve):
    """Every micro-batch from 1 up, kept if train.py accepts it and its estimate fits."""
    ok = [b for b in range(1, batch_size + 1) if batch_size % b == 0 and (batch_size // b) % world == 0
          and state + clip + b * act <= (gpu_gib - reserve) * GIB]
    return max(ok) if ok else None


def test_fit_matches_a_brute_force_search():
    for gpu, batch_size, world, act_mib in itertools.product((8, 12, 16, 24), (16, 64, 96, 1024), (1, 2, 8),
                                                              (13, 53, 210, 900)):
        state, clip, act = int(0.8 * GIB), int(0.4 * GIB), act_mib * 2 ** 20
        best = brute_force(gpu, state, act, clip, batch_size, world, 1.0)
        if best is None:
            with pytest.raises(ValueError, match="even --batch-gpu 1"):
                dry_run.fit_batch_gpu(gpu, state, act, clip, batch_size, world)
            continue
        b, accumulation = dry_run.fit_batch_gpu(gpu, state, act, clip, batch_size, world)
        assert b == best and b * accumulation * world == batch_size, (gpu, batch_size, world, act_mib)


def test_the_small_preset_numbers():
    """--preset small's dry run: 0.8 GiB state, 53.6 MiB activations per image (fp32), tiny CLIP."""
    state, act = int(0.83 * GIB), int(53.6 * 2 ** 20)
    assert dry_run.fit_batch_gpu(8, state, act, 0, 64) == (64, 1)     # 4.2 GiB at 64
    assert dry_run.fit_batch_gpu(4, state, act, 0, 64) == (32, 2)     # 2.5 GiB at 32
    line = dry_run.describe_fit(4, state, act, 0, 64)
    assert "--batch-gpu 32" in line and "2 accumulation steps" in line and "\n" not in line


def test_nothing_fits_is_one_line():
    with pytest.raises(ValueError) as err:
        dry_run.fit_batch_gpu(2, 2 * GIB, GIB, 0, 64)
    assert "\n" not in str(err.value) and "--gpu-memory 2" in str(err.value)
    with pytest.raises(ValueError, match="give the GPU's memory"):
        dry_run.fit_batch_gpu(0, GIB, GIB, 0, 64)


def test_saved_bytes_of_a_small_net_by_hand():
    """Linear saves its input (for the weight's gradient), ReLU its output, which the second Linear
    saves again (one storage, counted once); weights are state, not activations."""
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    got = dry_run.saved_activation_bytes(lambda: net(x), net.parameters())
    assert got == 5 * (8 + 16) * 4


def test_saved_bytes_on_the_meta_device_equal_those_on_the_cpu():
    """The dry run measures G and D on the meta device: the same count as a real forward pass."""
    import importlib
    import torch
    import train
    generator, discriminator = importlib.import_module("03_generator"), importlib.import_module("04_discriminator")
    _, g_cfg, d_cfg, _ = train.parse_flags(["--preset", "tiny"])
    counts = []
    for device in ("cpu", "meta"):
        with torch.device(device):
            G, D = generator.Generator(g_cfg, text_dim=32), discriminator.Discriminator(d_cfg, text_dim=32)
            tokens, mask = torch.randn(2, 7, 32), torch.ones(2, 7, dtype=torch.bool)
            eot, z = torch.full((2,), 6, dtype=torch.long), torch.randn(2, g_cfg.z_dim)
            params = [*G.parameters(), *D.parameters()]
            counts.append(dry_run.saved_activation_bytes(lambda: D(G(z, tokens, mask, eot), tokens, mask, eot),
                                                            params))
    assert counts[0] == counts[1] > 0
