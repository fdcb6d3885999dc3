"""train.py --stage upsampler and sample.py's upsampler modes end to end on CPU: a tiny CLIP
(4 steps), a tiny base GAN (1 step), the tiny 32 -> 128 upsampler (2 steps of batch 2, random
LPIPS backbone); checkpoint, resume, dry run, the base -> upsampler chain, --lowres on a photo,
and bad input (exit 2, one line). Plumbing only, not quality."""
import json
import os

import matplotlib.cbook
import pytest
import torch
from PIL import Image

import sample
import train

A = "a large red circle on the left of a blue background"
FAST = ["--batch-size", "2", "--log-every", "1", "--snapshot-every", "1000", "--eval-every", "0",
        "--ckpt-every", "1000", "--lpips", "random",
        "--warmup-steps", "1", "--loss.r1-interval", "1"]   # step 1 warm-up, then GAN steps with R1 each
PHOTO = str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def upsampler_run(out, clip, *extra):
    train.main(["--stage", "upsampler", "--out", str(out), "--clip", clip, *FAST, *extra])
    return out


def state(out):
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(tiny CLIP spec, base run dir, upsampler run dir trained 2 steps with a snapshot and an eval)."""
    root = tmp_path_factory.mktemp("up")
    train.main(["--stage", "clip", "--out", str(root / "base"), "--clip-steps", "4", "--clip-batch-size", "16"])
    clip = f"tiny:{root / 'base' / 'clip.pt'}"
    train.main(["--out", str(root / "base"), "--clip", clip, "--max-steps", "1", "--batch-size", "2",
                "--log-every", "1", "--snapshot-every", "1000", "--eval-every", "0", "--ckpt-every", "1000"])
    up = upsampler_run(root / "up", clip, "--max-steps", "2", "--snapshot-every", "2", "--eval-every", "2",
                       "--eval-images", "4")
    return clip, root / "base", up


# ----------------------------------------------------------------------------- train.py

def test_upsampler_stage_writes_everything(runs):
    _, _, out = runs
    for name in ("config.json", "log.jsonl", "losses.png", "checkpoint.pt", "samples_000002.png",
                 "samples_prompts.txt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert "W/mse" in train_rows[0] and "D/adv" not in train_rows[0]  # step 1: the reconstruction warm-up
    for key in ("img_s", "D/adv", "D/match", "G/adv", "G/match", "G/lpips", "G/pixel", "R1/penalty"):
        assert key in train_rows[1], key
    assert not any(k.endswith("vision") for k in train_rows[1])     # no vision-aided D for the upsampler
    (ev,) = [r for r in rows if r["kind"] == "eval"]
    assert {"mae", "mae_bicubic", "sharpness", "sharpness_bicubic", "sharpness_real"} <= set(ev)
    # snapshot: 3 columns (bicubic | upsampled | real) of 128 px, one row per fixed prompt, 1 px padding
    assert Image.open(out / "samples_000002.png").size == (3 * 129 + 1, 4 * 129 + 1)
    ckpt = state(out)                                                # weights_only loadable
    assert set(ckpt) >= {"G", "G_ema", "D", "opt_G", "opt_D", "opt_W", "step", "nimg", "config", "clip"}
    assert ckpt["step"] == 2 and ckpt["nimg"] == 4
    assert ckpt["config"]["stage"] == "upsampler" and ckpt["config"]["U"]["out_resolution"] == 128
    assert ckpt["config"]["D"]["resolution"] == 128 and ckpt["config"]["train"]["lpips"] == "random"
    assert any(k.startswith("decoder.") for k in ckpt["G"])          # the upsampler, not a base G
    assert ckpt["clip"] == "tiny:../base/clip.pt"                   # the base run's CLIP, beside it


def test_resume_equals_uninterrupted(runs, tmp_path):
    clip, _, whole = runs                         # 2 steps in one go (its snapshot and eval draw no training noise)
    # stopped after the warm-up step, resumed into the GAN step
    part = upsampler_run(tmp_path / "part", clip, "--max-steps", "1")
    upsampler_run(tmp_path / "part", clip, "--max-steps", "2", "--resume")
    a, b = state(whole), state(part)
    assert b["step"] == 2
    for key in ("G", "G_ema", "D"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=1e-5, msg=f"{key}.{name}")


def test_warm_up_trains_u_alone_on_pixel_mse(runs, tmp_path):
    clip, _, _ = runs
    out = upsampler_run(tmp_path / "warm", clip, "--max-steps", "3", "--warmup-steps", "3")
    rows = [json.loads(line) for line in open(out / "log.jsonl") if '"train"' in line]
    assert [sorted(k for k in r if "/" in k) for r in rows] == [["W/mse"]] * 3   # no D, G or R1 terms
    ckpt = state(out)
    assert ckpt["opt_D"]["state"] == {} and ckpt["opt_G"]["state"] == {}       # D and the GAN optimiser never stepped
    assert len(ckpt["opt_W"]["state"]) > 0
    assert train.parse_flags(["--stage", "upsampler"])[0].warmup_steps > 0     # the tiny preset warms up
    assert train.parse_flags([])[0].warmup_steps == 0                          # the base stage has none


def test_upsampler_stage_trains_with_hard_negatives(runs, tmp_path):
    clip, _, _ = runs
    out = upsampler_run(tmp_path / "hard", clip, "--max-steps", "2", "--hard-negatives", "1")
    (gan_row,) = [json.loads(line) for line in open(out / "log.jsonl") if '"D/match"' in line]
    assert gan_row["step"] == 2 and gan_row["D/match"] > 0


def test_dry_run_prints_upsampler_counts(capsys):
    train.main(["--stage", "upsampler", "--dry-run"])
    printed = capsys.readouterr().out.strip().splitlines()
    counts = json.loads(printed[-1])
    assert {"G_params", "D_params", "U_params", "U_D_params"} <= set(counts)
    assert 0.3e6 < counts["U_params"] < 1e6 and counts["U_D_params"] > 0
    assert any(line.startswith("U ") for line in printed)


def test_tiny_defaults_to_a_random_lpips_backbone_with_a_note():
    cfg = train.parse_flags(["--stage", "upsampler"])[0]
    assert cfg.lpips == "random" and cfg.out.endswith("tiny-upsampler")
    assert train.parse_flags(["--stage", "upsampler", "--lpips", "vgg"])[0].lpips == "vgg"
    assert train.parse_flags([])[0].lpips == "vgg"                  # the base stage keeps the field's default
    # the tiny upsampler adds a pixel MSE to the paper's losses; the full one keeps the paper's
    assert train.parse_flags(["--stage", "upsampler"])[3].pixel_weight > 0
    assert train.parse_flags(["--stage", "upsampler", "--full"])[3].pixel_weight == 0


def test_a_tiny_clip_is_named_relative_to_the_run_when_beside_it():
    assert train.stored_clip_spec("tiny:runs/up/clip.pt", "runs/up") == "tiny:clip.pt"
    assert train.stored_clip_spec("tiny:runs/tiny/clip.pt", "runs/up") == "tiny:../tiny/clip.pt"
    far = os.path.abspath(os.path.join(os.sep, "elsewhere", "clip.pt"))
    assert train.stored_clip_spec(f"tiny:{far}", "runs/up") == f"tiny:{far}"  # absolute: no ../../..
    assert train.stored_clip_spec("ViT-B-32/openai", "runs/up") == "ViT-B-32/openai"


def bad(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: "), err
    return err[0]


def test_resuming_another_stage_or_config_is_one_line(runs, tmp_path, capsys):
    clip, base, up = runs
    assert "is a base-stage run" in bad(["--stage", "upsampler", "--out", str(base), "--clip", clip, *FAST,
                                         "--max-steps", "3", "--resume"], capsys)
    assert "is an upsampler-stage run" in bad(["--out", str(up), "--clip", clip, "--max-steps", "3",
                                              "--batch-size", "2", "--resume"], capsys)
    assert "(rgb_init 0.001 -> 0.5): resume it with the same --u.* flags" in bad(["--stage", "upsampler", "--out", str(up), "--clip", clip, *FAST, "--max-steps", "3",
                                "--resume", "--u.rgb-init", "0.5"], capsys)


@pytest.mark.parametrize("argv, message", [
    (["--stage", "upsampler", "--lpips", "squeeze"], "unknown --lpips"),
    (["--stage", "upsampler", "--g.z-dim", "64"], "--u.*"),
    (["--u.z-dim", "64"], "add --stage upsampler"),
    (["--stage", "upsampler", "--preset", "small"], "no upsampler preset"),
    (["--stage", "upsampler", "--u.in-resolution", "48"], "bad upsampler configuration"),
    (["--stage", "upsampler", "--d.resolution", "64"], "must equal"),
    (["--warmup-steps", "5"], "add --stage upsampler"),
    (["--stage", "upsampler", "--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--stage", "upsampler", "--lpips", "vgg", "--clip", "CLIP"], "--lpips random"),  # no VGG weights offline
])
def test_bad_input_is_one_clear_line(runs, tmp_path, capsys, argv, message):
    argv = [a.replace("CLIP", runs[0]) for a in argv]
    assert message in bad(["--out", str(tmp_path / "bad"), "--max-steps", "1", *argv], capsys)


# ----------------------------------------------------------------------------- sample.py

def test_chain_base_then_upsampler_writes_high_res_images(runs, tmp_path, capsys):
    _, base, up = runs
    out = tmp_path / "chain"
    sample.main(["--ckpt", str(base), "--upsampler", str(up), "--prompt", A, "--n", "2", "--grid",
                 "--out", str(out), "--device", "cpu"])
    rows = [json.loads(line) for line in open(out / "captions.jsonl")]
    assert [r["caption"] for r in rows] == [A, A]
    assert all(Image.open(out / r["file"]).size == (128, 128) for r in rows)
    assert Image.open(out / "grid.png").size == (2 * 128, 128)
    assert str(out) in capsys.readouterr().out.strip().splitlines()[-1]


def test_lowres_photo_writes_upsampled_and_comparison(runs, tmp_path, capsys):
    _, _, up = runs
    out = tmp_path / "lr"
    sample.main(["--upsampler", str(up), "--lowres", PHOTO, "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "resized to 32x32" in printed
    assert Image.open(out / "00000.png").size == (128, 128)
    assert Image.open(out / "comparison.png").size == (3 * 128, 128)  # nearest | bicubic | GigaGAN
    assert Image.open(out / "lowres.png").size == (32, 32)
    (row,) = [json.loads(line) for line in open(out / "captions.jsonl")]
    assert row["caption"] == "" and row["lowres"] == PHOTO


def test_lowres_noise_aug_is_seeded_and_changes_the_output(runs, tmp_path):
    _, _, up = runs
    def png(name, *extra):
        sample.main(["--upsampler", str(up), "--lowres", PHOTO, "--out", str(tmp_path / name), "--device", "cpu",
                     "--seed", "3", *extra])
        return torch.tensor(list(Image.open(tmp_path / name / "00000.png").getdata()), dtype=torch.float)
    clean, noisy, again = png("clean"), png("noisy", "--noise-aug", "0.3"), png("again", "--noise-aug", "0.3")
    assert torch.equal(noisy, again)                                    # the noise comes from the seed
    assert (noisy - clean).abs().mean() > 0.5                           # and it reaches the output


BAD = [
    (["--lowres", "PHOTO", "--prompt", A], "needs --upsampler"),
    (["--ckpt", "BASE", "--prompt", A, "--noise-aug", "0.1"], "give --upsampler"),
    (["--upsampler", "UP", "--lowres", "PHOTO", "--noise-aug", "-1"], "--noise-aug must be in [0, 1], got -1.0"),
    (["--upsampler", "UP", "--lowres", "TMP/missing.png"], "no such file"),
    (["--upsampler", "UP", "--lowres", "UP/log.jsonl"], "not an image"),
    (["--upsampler", "UP", "--lowres", "PHOTO", "--prompt", A, "--prompt", A], "at most one prompt"),
    (["--upsampler", "UP", "--lowres", "PHOTO", "--ckpt", "BASE"], "drop --ckpt"),
    (["--upsampler", "UP", "--prompt", A], "--ckpt is required"),
    (["--upsampler", "BASE", "--ckpt", "BASE", "--prompt", A], "not an upsampler run"),
    (["--ckpt", "UP", "--prompt", A], "pass it with --upsampler"),
    (["--upsampler", "UP", "--ckpt", "BASE", "--style-mix", "--prompt", A], "plain sampling"),
]


@pytest.mark.parametrize("argv,hint", BAD, ids=[h for _, h in BAD])
def test_bad_sample_input_is_one_line_and_exit_2(runs, tmp_path, capsys, argv, hint):
    _, base, up = runs
    argv = [a.replace("UP", str(up)).replace("BASE", str(base)).replace("PHOTO", PHOTO).replace("TMP", str(tmp_path))
            for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        sample.main([*argv, "--device", "cpu", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and hint in err[0] and err[0].startswith("sample.py: "), err


def test_chain_with_mismatched_resolution_is_one_line(runs, tmp_path, capsys, monkeypatch):
    _, base, up = runs
    real = sample.load_upsampler

    def at_64(path, device="cpu"):
        U, clip, ckpt = real(path, device)
        U.cfg.in_resolution = 64                                        # as a 64 -> 512 upsampler would read
        return U, clip, ckpt

    monkeypatch.setattr(sample, "load_upsampler", at_64)
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(base), "--upsampler", str(up), "--prompt", A, "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "32 px" in err[0] and "64 px" in err[0], err
