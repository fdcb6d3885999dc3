"""The `small` preset on real photos, end to end on CPU: a COCO-format folder built from the photo
matplotlib ships (grace_hopper.jpg, cropped and flipped), a tiny CLIP trained on its captions,
a few GAN steps (narrower than the preset, see NARROW) with snapshots, evaluation and
checkpoints, --resume, then sample.py --eval with
Inception FID (torch-fidelity's network with random weights, placed where torch.hub keeps the
real ones: the whole path runs, no download). Plumbing, not quality."""
import json
import os

import pytest
import torch
from matplotlib import cbook
from PIL import Image, ImageOps

import data
import metrics
import sample
import train
from test_metrics import random_inception_weights

# The small preset's own G and D take ~20 s per step of 2 images and ~40 s per snapshot grid on
# one CPU thread (35.6M + 10.3M parameters, attention at 32 px): narrower widths and attention
# at 8 px only keep this test within the suite's time. Everything else is the preset's
# (64 px, its losses, its D and training settings).
NARROW = ["--g.channels", "[64, 64, 32, 32, 16]", "--g.attn-resolutions", "[8]", "--d.channel-max", "32"]
CAPTIONS = ["a portrait of a woman in uniform", "an old photo of an officer", "a woman with grey hair",
            "a close-up of a face", "a naval officer smiling"]


def real_photo_tree(root, n=8):
    """n crops of the photo (every other one mirrored), two captions each, in COCO's layout:
    root/train2017/*.jpg and root/annotations/captions_train2017.json."""
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")  # 512 x 600
    w, h = photo.size
    images, annotations = [], []
    os.makedirs(root / "train2017")
    for k in range(n):
        side = w // 2 + 20 * k                                             # 256 .. 396 px squares
        x, y = (k * 37) % (w - side), (k * 53) % (h - side)
        crop = photo.crop((x, y, x + side, y + side))
        crop = ImageOps.mirror(crop) if k % 2 else crop
        name = f"{k + 1:012d}.jpg"
        crop.save(root / "train2017" / name, quality=90)
        images.append({"id": k + 1, "file_name": name, "width": side, "height": side})
        for j in range(2):
            annotations.append({"id": len(annotations), "image_id": k + 1, "caption": CAPTIONS[(k + j) % 5]})
    os.makedirs(root / "annotations")
    with open(root / "annotations" / "captions_train2017.json", "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    return root / "train2017"


@pytest.mark.slow
def test_small_preset_on_real_photos_trains_resumes_and_evaluates(tmp_path, monkeypatch, capsys):
    folder = real_photo_tree(tmp_path / "coco")
    out = tmp_path / "run"
    flags = ["--preset", "small", "--clip", "tiny", "--data", str(folder), "--out", str(out), "--device", "cpu",
             "--clip-steps", "2", "--clip-batch-size", "8", "--batch-size", "2", "--log-every", "1",
             "--snapshot-every", "1", "--eval-every", "1", "--eval-images", "4", "--ckpt-every", "1",
             *NARROW]
    train.main([*flags, "--max-steps", "1"])
    printed = capsys.readouterr().out
    assert "done: 1 step" in printed
    config = json.load(open(out / "config.json"))
    assert config["train"]["preset"] == "small" and config["G"]["resolution"] == 64
    for name in ("clip.pt", "checkpoint.pt", "samples_000001.png", "samples_prompts.txt", "log.jsonl"):
        assert (out / name).is_file(), name
    snapshot_prompts = (out / "samples_prompts.txt").read_text()
    assert any(c in snapshot_prompts for c in CAPTIONS)                   # prompts from the COCO captions
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [1]

    # --resume goes on from step 1, the CLIP is not trained again
    clip_mtime = os.path.getmtime(out / "clip.pt")
    train.main([*flags, "--max-steps", "2", "--resume"])
    assert "done: 2 steps" in capsys.readouterr().out
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert (out / "samples_000002.png").is_file()
    assert os.path.getmtime(out / "clip.pt") == clip_mtime

    # sample.py --eval: FID is on for an image folder; its reference is cached next to the data
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    random_inception_weights(tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(metrics.INCEPTION_URL),
                             monkeypatch)
    sample.main(["--ckpt", str(out), "--eval", "--n", "4", "--device", "cpu"])
    scores = json.load(open(out / "eval" / "eval.json"))
    assert scores["n"] == 4 and scores["data"] == str(folder) and scores["step"] == 2
    assert all(torch.isfinite(torch.tensor(scores[k])) for k in ("clip_score", "clip_fd", "fid"))
    assert "align_mean" not in scores                                      # shapes-only metric
    assert (folder / f"fid_stats_inception_64px_n4_seed{metrics.EVAL_SEED}.pt").is_file()
    assert len(data.build_dataset(str(folder), 64)) == 8                   # the stats file is no image
