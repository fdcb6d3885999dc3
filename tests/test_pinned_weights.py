"""The same flags and seed give the same weights: a few-step run of each GAN stage, pinned to a
fingerprint of its checkpoint's weights, compared with a stated tolerance.

Why: train.py is refactored from time to time (its configuration, run-directory handling and the
loop shared by both stages move between files); such a move must not change the numbers.

Why a tolerance and not a checksum: float results depend on the CPU's instruction set (AVX2 or
AVX-512 kernels sum in another order), so bit-exact weights are exact on one machine only. The
fingerprint is, per top-level submodule of G, G_ema, D and VD, the weights' L2 norm and their
projection on a fixed random direction (seeded by the submodule's name). A refactor that keeps
the numbers moves neither by more than TOL of the submodule's norm; a changed random draw or data
order moves the projection by about the norm itself, a changed loss weight beyond TOL.

Re-pinning: a change MEANT to move the numbers (a model, loss, data or CLIP change of 00-06 or
data.py, a new draw of the random numbers) fails this test. Then run
`python tests/test_pinned_weights.py --repin`, check that only this test moved, and commit the
new tests/fixtures/pinned_weights.json on its own, saying which change moved it.
"""
import json
import os
import sys
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "pinned_weights.json")
# of a submodule's weight norm. Float noise: two threads instead of one (another summation order,
# as another CPU's kernels) moved a projection by up to 1.7e-4 of the norm (2026-12-07); a changed
# match weight halved moved most submodules by 2e-3 to 7e-3 after 3 steps, a changed seed by ~1.
TOL = 2e-3

# base: tiny CLIP (4 steps), 3 steps of batch 4 in micro-batches of 2 (gradient accumulation),
# R1 at step 0
BASE = ["--clip-steps", "4", "--clip-batch-size", "16", "--max-steps", "3", "--batch-size", "4",
        "--batch-gpu", "2", "--log-every", "1", "--snapshot-every", "2", "--eval-every", "0",
        "--ckpt-every", "1000"]
# upsampler on that CLIP: one warm-up step, then 2 GAN steps with R1 each, random LPIPS
UPSAMPLER = ["--stage", "upsampler", "--max-steps", "3", "--batch-size", "2", "--log-every", "1",
             "--snapshot-every", "1000", "--eval-every", "0", "--ckpt-every", "1000", "--lpips", "random",
             "--warmup-steps", "1", "--loss.r1-interval", "1"]


def fingerprint(path, keys):
    """{'G.mapping': [norm, projection], ...} over the top-level submodules of the named state_dicts."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    groups = {}
    for key in keys:
        for name, tensor in (ckpt.get(key) or {}).items():
            if tensor.is_floating_point():
                groups.setdefault(f"{key}.{name.split('.')[0]}", []).append((name, tensor.double().flatten()))
    out = {}
    for group, tensors in sorted(groups.items()):
        norm2, proj = 0.0, 0.0
        for name, t in sorted(tensors, key=lambda nt: nt[0]):
            gen = torch.Generator().manual_seed(zlib.crc32(f"{group}/{name}".encode()))
            direction = torch.randn(t.numel(), generator=gen, dtype=torch.float64)
            norm2 += float(t @ t)
            proj += float(t @ direction)
        out[group] = [norm2 ** 0.5, proj]
    return out


def run_both(tmp):
    base, up = os.path.join(tmp, "base"), os.path.join(tmp, "up")
    train.main(["--out", base, *BASE])
    train.main([*UPSAMPLER, "--out", up, "--clip", f"tiny:{os.path.join(base, 'clip.pt')}"])
    return {"base": fingerprint(os.path.join(base, "checkpoint.pt"), ["G", "G_ema", "D", "VD"]),
            "upsampler": fingerprint(os.path.join(up, "checkpoint.pt"), ["G", "G_ema", "D"])}


def compare(got, pinned):
    """The list of submodules whose fingerprint moved by more than TOL of its norm."""
    moved = []
    for stage in pinned:
        assert set(got[stage]) == set(pinned[stage]), f"{stage}: other submodules than pinned"
        for group, (norm, proj) in pinned[stage].items():
            g_norm, g_proj = got[stage][group]
            scale = max(norm, 1e-3)
            if abs(g_norm - norm) > TOL * scale or abs(g_proj - proj) > TOL * scale:
                moved.append(f"{stage}/{group}: norm {norm:.6f} -> {g_norm:.6f}, projection {proj:.6f} -> {g_proj:.6f}")
    return moved


def test_a_few_steps_of_each_stage_give_the_pinned_weights(tmp_path):
    with open(FIXTURE) as f:
        pinned = json.load(f)
    moved = compare(run_both(str(tmp_path)), pinned)
    assert not moved, "weights moved (re-pin only for a change meant to move them):\n" + "\n".join(moved)


def test_the_tolerance_tells_a_changed_draw_from_float_noise(tmp_path):
    """Float noise (every number times 1 + 1e-4) passes; another seed fails in (almost) every submodule."""
    with open(FIXTURE) as f:
        pinned = json.load(f)
    noisy = {s: {g: [n * (1 + 1e-4), p + 1e-4 * n] for g, (n, p) in v.items()} for s, v in pinned.items()}
    assert compare(noisy, pinned) == []
    other = os.path.join(tmp_path, "other")
    train.main(["--out", other, *BASE, "--seed", "1"])
    got = {"base": fingerprint(os.path.join(other, "checkpoint.pt"), ["G", "G_ema", "D", "VD"])}
    moved = compare(got, {"base": pinned["base"]})
    assert len(moved) >= len(pinned["base"]) - 1, moved


if __name__ == "__main__":
    if sys.argv[1:] != ["--repin"]:
        sys.exit("usage: python tests/test_pinned_weights.py --repin")
    import tempfile
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        fp = run_both(tmp)
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    with open(FIXTURE, "w") as f:
        json.dump(fp, f, indent=1, sort_keys=True)
    print(f"wrote {FIXTURE}")
