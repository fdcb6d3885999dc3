"""The same flags and seed give the same weights: a few-step run of each GAN stage, pinned to a
sha256 of its checkpoint's weights.

Why: train.py is refactored from time to time (its configuration, run-directory handling and the
loop shared by both stages moved between files); such a move must not change a single number.
The checksums were taken on the code before the move, on a CPU with one thread (conftest.py),
float32.

Re-pinning: a change that is MEANT to change the numbers (a model, loss, data or CLIP change of
03/04/05/06/00, data.py, or a new draw of the random numbers) changes these checksums as well.
Then re-pin: run this file, check that the failure is the checksum alone, and paste the new
digests below, saying in the commit which change moved them. A refactor must never need that.
"""
import hashlib

import torch

import train

# base: tiny CLIP (4 steps), 3 steps of batch 4 in micro-batches of 2 (gradient accumulation),
# R1 at step 0, hard negatives for half the rows, mode seeking (paired captions)
BASE = ["--clip-steps", "4", "--clip-batch-size", "16", "--max-steps", "3", "--batch-size", "4",
        "--batch-gpu", "2", "--log-every", "1", "--snapshot-every", "2", "--eval-every", "0",
        "--ckpt-every", "1000", "--hard-negatives", "0.5", "--loss.mode-seeking-weight", "1"]
BASE_SHA = "7789afc4c0a0c1123adbee094e4c233b91f07f02412fb688b2f467e818d1fcf7"
# upsampler on that CLIP: one warm-up step, then 2 GAN steps with R1 each, random LPIPS
UPSAMPLER = ["--stage", "upsampler", "--max-steps", "3", "--batch-size", "2", "--log-every", "1",
             "--snapshot-every", "1000", "--eval-every", "0", "--ckpt-every", "1000", "--lpips", "random",
             "--warmup-steps", "1", "--loss.r1-interval", "1"]
UPSAMPLER_SHA = "fd06ed4668e8c50441f5661c959c89746a90491f9c578b734d5199a425e868db"


def weights_sha256(path, keys):
    """sha256 over the named state_dicts of a checkpoint: sorted tensor names, their raw bytes."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for key in keys:
        state = ckpt.get(key) or {}
        for name in sorted(state):
            h.update(f"{key}.{name}".encode())
            h.update(state[name].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_a_few_steps_of_each_stage_give_the_pinned_weights(tmp_path):
    base, up = tmp_path / "base", tmp_path / "up"
    train.main(["--out", str(base), *BASE])
    assert weights_sha256(base / "checkpoint.pt", ["G", "G_ema", "D", "VD"]) == BASE_SHA
    train.main([*UPSAMPLER, "--out", str(up), "--clip", f"tiny:{base / 'clip.pt'}"])
    assert weights_sha256(up / "checkpoint.pt", ["G", "G_ema", "D"]) == UPSAMPLER_SHA
