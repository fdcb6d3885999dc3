"""The CUDA path: facts only a GPU can show, checked by `python bench.py --gpu` (gpu_check.py's
"tests" row runs `pytest -m gpu`) and skipped on a machine without CUDA.

GIGAGAN_TEST_DEVICE=cpu runs them on the CPU instead: that is how `bench.py --gpu --quick --device
cpu` keeps them from rotting between GPU days (on a CPU they check the tolerances, not the kernels).

Each check compares a fast or low-precision path with the reference on the same device, by the
relative error ||out - ref|| / ||ref||: bfloat16 keeps 8 bits of mantissa (about 4e-3 per rounding),
so a network of a few dozen layers lands near 1e-2; float32 lands far under 1e-4 once TF32 is off.
"""
import importlib
import os

import pytest
import torch

ks = importlib.import_module("01_kernel_selection")
generator = importlib.import_module("03_generator")
discriminator = importlib.import_module("04_discriminator")

DEVICE = os.environ.get("GIGAGAN_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="needs a GPU (GIGAGAN_TEST_DEVICE=cpu runs these on the CPU)"),
]
BF16_TOL = 0.05       # relative error of a bfloat16 forward (project's choice: 5x the expected 1e-2)
BF16_GRAD_TOL = 0.15  # of its gradients, which add the backward's roundings (project's choice)


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def flat_grads(module):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


@pytest.fixture
def no_tf32():
    """float32 as float32: CUDA convolutions default to TF32 (10-bit mantissa), which would hide
    a real difference between two float32 paths behind 1e-3 of rounding."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def bf16():
    return torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16)


def test_bf16_autocast_generator_matches_float32(no_tf32):
    """train.py's --dtype bfloat16 is autocast around G: every pyramid level and every gradient
    stays within bfloat16's rounding of the float32 pass, and nothing overflows."""
    torch.manual_seed(0)
    G = generator.Generator(generator.G_PRESETS["tiny"], text_dim=128).to(DEVICE)
    text = [t.to(DEVICE) for t in generator.random_text(4, D=128)]        # (B, L, D), (B, L), (B,)
    z = torch.randn(4, G.cfg.z_dim, device=DEVICE)                        # (B, z_dim)
    runs = {}
    for name, ctx in (("float32", torch.autocast(torch.device(DEVICE).type, enabled=False)), ("bfloat16", bf16())):
        G.zero_grad(set_to_none=True)
        with ctx:
            pyramid = G(z, *text, noise_mode="const")                     # [(B, 3, R, R), ...]
        sum(level.float().square().mean() for level in pyramid).backward()
        runs[name] = [level.detach().float() for level in pyramid], flat_grads(G)
    for level, ref in zip(runs["bfloat16"][0], runs["float32"][0]):
        assert torch.isfinite(level).all()
        assert rel_err(level, ref) < BF16_TOL, (tuple(level.shape), rel_err(level, ref))
    assert rel_err(runs["bfloat16"][1], runs["float32"][1]) < BF16_GRAD_TOL


def test_bf16_autocast_discriminator_matches_float32(no_tf32):
    """The same for the MS-I/O D: its predictions and its gradients under bfloat16 autocast."""
    torch.manual_seed(0)
    D = discriminator.Discriminator(discriminator.D_PRESETS["tiny"], text_dim=128).to(DEVICE)
    text = [t.to(DEVICE) for t in generator.random_text(4, D=128)]
    R = D.cfg.resolution
    image = torch.rand(4, 3, R, R, device=DEVICE) * 2 - 1                 # (B, 3, R, R)
    pyramid = [image]
    while pyramid[-1].shape[-1] > 4:
        pyramid.append(ks.downsample2x(pyramid[-1]))                      # (B, 3, R/2^i, R/2^i)
    runs = {}
    for name, ctx in (("float32", torch.autocast(torch.device(DEVICE).type, enabled=False)), ("bfloat16", bf16())):
        D.zero_grad(set_to_none=True)
        with ctx:
            preds = D(pyramid, *text)                                      # P predictions
        sum(p.float().mean() for p in preds).backward()
        runs[name] = torch.cat([p.detach().float().flatten() for p in preds]), flat_grads(D)
    assert torch.isfinite(runs["bfloat16"][0]).all()
    assert rel_err(runs["bfloat16"][0], runs["float32"][0]) < BF16_TOL
    assert rel_err(runs["bfloat16"][1], runs["float32"][1]) < BF16_GRAD_TOL


@pytest.mark.parametrize("up", [1, 2])
def test_fused_modulated_conv_equals_naive_on_device(up, no_tf32):
    """01's fused path (activation modulation: one batched or grouped conv, or the transposed conv
    for up=2) equals the per-sample reference loop on this device, values and gradients."""
    torch.manual_seed(0)
    B, C_in, C_out, S, N, R = 4, 16, 32, 64, 4, 16
    layer = ks.AdaptiveConv2d(C_in, C_out, 3, w_dim=S, n_kernels=N, up=up).to(DEVICE)
    x = torch.randn(B, C_in, R, R, device=DEVICE)                         # (B, C_in, H, W)
    w = torch.randn(B, S, device=DEVICE)                                  # (B, S)
    noise = torch.randn(B, 1, R * up, R * up, device=DEVICE)              # shared by both paths
    out = {}
    for fused in (True, False):
        layer.zero_grad(set_to_none=True)
        y = layer(x, w, noise, fused=fused)                               # (B, C_out, R*up, R*up)
        y.square().mean().backward()
        out[fused] = y.detach(), flat_grads(layer)
    assert rel_err(out[True][0], out[False][0]) < 1e-5
    assert rel_err(out[True][1], out[False][1]) < 1e-4


def test_fused_modulated_conv_under_bf16_autocast():
    """Under bfloat16 autocast (the GPU's training dtype) the fused path stays within bfloat16's
    rounding of the float32 reference loop."""
    torch.manual_seed(0)
    layer = ks.AdaptiveConv2d(16, 32, 3, w_dim=64, n_kernels=4).to(DEVICE)
    x, w = torch.randn(4, 16, 16, 16, device=DEVICE), torch.randn(4, 64, device=DEVICE)
    noise = torch.randn(4, 1, 16, 16, device=DEVICE)
    with torch.no_grad():
        ref = layer(x, w, noise, fused=False)                             # float32 reference loop
        with bf16():
            y = layer(x, w, noise, fused=True)
    assert rel_err(y.float(), ref) < BF16_TOL
