"""sample.py end to end on CPU: the session's tiny run (2 steps, conftest.py), then every mode of
the command line (files, captions, sizes, determinism, mixing, interpolation, eval), every bad
input of sample.py, upsampler modes included (exit 2, one line), and the metrics against
independent formulations."""
import json
import math
import shutil

import matplotlib.cbook
import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import data
import sample
from conftest import bad

A = "a large red circle on the left of a blue background"   # A and B: same token count,
B = "a small blue square on the right of a red background"  # so interpolation endpoints are exact
C = "small yellow triangle, right side, purple backdrop"
PHOTO = str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.fixture
def run_dir(tiny_run):
    """The session's tiny run (its CLIP beside it): these tests check plumbing, not quality."""
    return tiny_run


def cli(run_dir, out, *argv):
    """Run sample.py with --ckpt run_dir --out out; returns (out, rows of captions.jsonl)."""
    sample.main(["--ckpt", str(run_dir), "--out", str(out), "--device", "cpu", *argv])
    rows = [json.loads(line) for line in open(out / "captions.jsonl")]
    return out, rows


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)  # (H, W, 3)


def images(out, rows):
    return [pixels(out / r["file"]) for r in rows]


def same(a, b):
    """Equal up to one 8-bit level: a float rounding at x.5 may differ across batch shapes."""
    return np.abs(a - b).max() <= 1


# ----------------------------------------------------------------------------- plain sampling

def test_plain_files_captions_grid_and_last_line(run_dir, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"\n{B}\n\n   \n{C}\n")
    out, rows = cli(run_dir, tmp_path / "s", "--prompt", A, "--prompts", str(prompts_file), "--n", "3", "--grid")
    assert [r["caption"] for r in rows] == [A] * 3 + [B] * 3 + [C] * 3     # --prompt first, blank lines skipped
    assert [r["seed"] for r in rows] == [0, 1, 2] * 3
    assert [r["file"] for r in rows] == [f"{i:05d}.png" for i in range(9)]
    assert sorted(p.name for p in out.glob("*.png")) == sorted([r["file"] for r in rows] + ["grid.png"])
    assert all(Image.open(out / r["file"]).size == (32, 32) for r in rows)
    assert Image.open(out / "grid.png").size == (3 * 32, 3 * 32)          # cols = seeds, rows = prompts
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert str(out) in last and "captions.jsonl" in last and "grid.png" in last


def test_beside_data_puts_the_datas_own_draws_of_each_caption_right_of_the_samples(run_dir, tmp_path):
    """--beside-data: a grid row per prompt, its --n samples then data.jittered_shapes' --n draws of
    the same caption (seed --seed); the samples themselves are unchanged."""
    out, rows = cli(run_dir, tmp_path / "b", "--prompt", A, "--prompt", B, "--n", "3", "--beside-data")
    assert len(rows) == 6 and Image.open(out / "grid.png").size == (6 * 32, 2 * 32)
    grid = pixels(out / "grid.png")
    for i, prompt in enumerate((A, B)):
        draws = data.jittered_shapes(data.parse_shapes_caption(prompt), 3, 32, seed=0)       # (3, 3, 32, 32)
        for k in range(3):
            sampled = grid[32 * i:32 * (i + 1), 32 * k:32 * (k + 1)]
            drawn = grid[32 * i:32 * (i + 1), 32 * (3 + k):32 * (4 + k)]
            assert same(sampled, pixels(out / rows[3 * i + k]["file"]))
            expected = ((draws[k].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            assert same(drawn, expected.astype(np.int16))
    assert not same(grid[:, 96:128], grid[:, 128:160])                     # two draws differ (the height)


def test_default_out_is_run_samples(run_dir, tmp_path):
    run_dir = shutil.copytree(run_dir, tmp_path / "run")                   # not into the shared run
    sample.main(["--ckpt", str(run_dir / "checkpoint.pt"), "--prompt", A, "--device", "cpu"])
    assert (run_dir / "samples" / "00000.png").is_file() and (run_dir / "samples" / "captions.jsonl").is_file()


def test_same_seed_same_image_different_seed_different(run_dir, tmp_path):
    out1, rows1 = cli(run_dir, tmp_path / "a", "--prompt", A, "--n", "2", "--seed", "5")
    out2, rows2 = cli(run_dir, tmp_path / "b", "--prompt", A, "--n", "2", "--seed", "5")
    for r1, r2 in zip(rows1, rows2):
        assert (out1 / r1["file"]).read_bytes() == (out2 / r2["file"]).read_bytes()
    first, second = images(out1, rows1)
    assert np.abs(first - second).max() > 10                               # seeds 5 and 6 differ
    # image k of a prompt is seed + k, whatever else is in the batch and the batch size
    out3, rows3 = cli(run_dir, tmp_path / "c", "--prompt", B, "--prompt", A, "--n", "3", "--seed", "4",
                      "--batch", "2")
    assert rows3[4] == {"file": "00004.png", "caption": A, "seed": 5}
    assert same(images(out3, rows3)[4], first) and same(images(out3, rows3)[5], second)


def test_truncation_zero_collapses_seeds_to_the_prompt_mean(run_dir, tmp_path):
    out, rows = cli(run_dir, tmp_path / "t", "--prompt", A, "--n", "3", "--truncation", "0")
    a, b, c = images(out, rows)
    assert same(a, b) and same(b, c)                                       # psi 0: w = w_c for every z


# ----------------------------------------------------------------------------- mixing and interpolation

def test_style_mix_grid_and_cells(run_dir, tmp_path):
    n = 2
    out, rows = cli(run_dir, tmp_path / "m", "--style-mix", "--prompt", A, "--n", str(n), "--grid")
    assert len(rows) == 2 * n + n * n and all(r["caption"] == A for r in rows)
    assert Image.open(out / "grid.png").size == ((n + 1) * 32, (n + 1) * 32)
    grid = pixels(out / "grid.png")
    assert (grid[:32, :32] == 255).all()                                   # blank corner
    coarse, fine, mixes = images(out, rows[:n]), images(out, rows[n:2 * n]), images(out, rows[2 * n:])
    assert [r["seed"] for r in rows[:2 * n]] == [0, 1, 2, 3]
    assert [(r["seed"], r["fine_seed"]) for r in rows[2 * n:]] == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert (grid[32:64, :32] == coarse[0]).all() and (grid[:32, 32:64] == fine[0]).all()  # headers
    assert (grid[64:96, 64:96] == mixes[3]).all()
    for i in range(n):
        for j in range(n):
            mix = mixes[i * n + j]
            assert np.abs(mix - coarse[i]).max() > 2 and np.abs(mix - fine[j]).max() > 2
    # the pure images are plain samples of those seeds
    plain_out, plain_rows = cli(run_dir, tmp_path / "p", "--prompt", A, "--n", str(2 * n))
    assert all(same(x, y) for x, y in zip(coarse + fine, images(plain_out, plain_rows)))


def test_style_mix_explicit_row(run_dir, tmp_path):
    _, rows = cli(run_dir, tmp_path / "m", "--style-mix", "3", "--prompt", A, "--n", "1")
    assert rows[-1]["crossover"] == 3


def test_interpolate_frames_captions_and_endpoints(run_dir, tmp_path):
    K = 4
    out, rows = cli(run_dir, tmp_path / "i", "--interpolate", str(K), "--prompt", A, "--prompt", B, "--prompt", C,
                    "--n", "2")
    frames = 2 * (K - 1) + 1                                               # A..B, B..C share B
    assert len(rows) == 2 * frames
    assert Image.open(out / "grid.png").size == (frames * 32, 2 * 32)
    assert [r["alpha"] for r in rows[:frames]] == pytest.approx([0, 1 / 3, 2 / 3, 0, 1 / 3, 2 / 3, 1])
    assert rows[0]["caption"] == A and rows[3]["caption"] == B and rows[frames - 1]["caption"] == C
    assert "->" in rows[1]["caption"] and [r["seed"] for r in rows] == [0] * frames + [1] * frames
    frames0 = images(out, rows[:frames])
    assert all(np.abs(x - y).max() > 0 for x, y in zip(frames0, frames0[1:]))  # it moves
    plain_out, plain_rows = cli(run_dir, tmp_path / "p", "--prompt", A, "--prompt", B)
    pa, pb = images(plain_out, plain_rows)
    assert same(frames0[0], pa) and same(frames0[3], pb)                   # endpoints are the prompts


def test_prompt_mix_differs_from_both_prompts(run_dir, tmp_path):
    out, rows = cli(run_dir, tmp_path / "x", "--prompt-mix", "2", "--prompt", A, "--prompt", B, "--n", "2")
    assert len(rows) == 6 and Image.open(out / "grid.png").size == (3 * 32, 2 * 32)
    assert [r["caption"] for r in rows[:3]] == [A, f"coarse: {A} | fine: {B}", B]
    assert [(r["coarse_prompt"], r["fine_prompt"]) for r in rows[3:]] == [(A, A), (A, B), (B, B)]
    for s in range(2):
        pure_a, mix, pure_b = images(out, rows[3 * s:3 * s + 3])
        assert np.abs(mix - pure_a).max() > 2 and np.abs(mix - pure_b).max() > 2
    plain_out, plain_rows = cli(run_dir, tmp_path / "p", "--prompt", A, "--prompt", B)
    pa, pb = images(plain_out, plain_rows)
    assert same(images(out, rows[:1])[0], pa) and same(images(out, rows[2:3])[0], pb)


def test_prompt_mix_switches_exactly_the_coarse_blocks(run_dir):
    """Rows [0, row) of ws and the blocks reading them come from prompt A, the rest from B:
    the 4 and 8 px ToRGB outputs of the mix equal A's, the 16 and 32 px ones differ from A's."""
    G, clip, _ = sample.load_generator(run_dir)
    row = sample.default_crossover(G)                                      # first 16 px row
    assert G.synthesis.w_names[row] == "16px.block0" and sample.blocks_before(G, row) == 3
    rgbs = []
    hooks = [t.register_forward_hook(lambda m, i, o: rgbs.append(o)) for t in G.synthesis.torgbs]
    try:
        sample.mixed_images(G, clip, [(A, 0), (A, 0)], [(B, 0), (A, 0)], row)  # item 0 mix, item 1 pure A
    finally:
        for h in hooks:
            h.remove()
    for rgb, res in zip(rgbs, G.cfg.scales):                               # coarse to fine
        if res < 16:
            assert torch.equal(rgb[0], rgb[1]), res
        else:
            assert not torch.allclose(rgb[0], rgb[1], atol=1e-4), res


# ----------------------------------------------------------------------------- evaluation

def test_eval_writes_finite_metrics(run_dir, tmp_path, capsys):
    out, rows = cli(run_dir, tmp_path / "e", "--eval", "--n", "8")
    metrics = json.load(open(out / "eval.json"))
    keys = ["clip_score", "clip_score_real", "clip_fd", "align_mean"] + [f"align_{a}" for a in sample.SHAPES_ATTRIBUTES]
    assert all(math.isfinite(metrics[k]) for k in keys)
    assert metrics["n"] == 8 and metrics["seed"] == sample.EVAL_SEED and len(rows) == 8
    assert "eval.json" in capsys.readouterr().out.strip().splitlines()[-1]


def test_evaluate_generates_once_and_matches_the_cli(run_dir, tmp_path, monkeypatch):
    G, clip, _ = sample.load_generator(run_dir)
    calls = []
    real_generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    ds = data.ShapesDataset(32, seed=0)
    metrics = sample.evaluate(G, clip, ds, n=8, shapes=True)            # the call train.py makes
    assert len(calls) == 2      # the alignment images, then SPREAD_Z per caption for the seed spread
    assert set(metrics) == {"clip_score", "clip_score_real", "clip_fd", "align_mean",
                            *(f"align_{a}" for a in sample.SHAPES_ATTRIBUTES),
                            "spread_x", "spread_y", "spread_size", "spread_captions"}
    out, _ = cli(run_dir, tmp_path / "e", "--eval", "--n", "8")
    cli_metrics = json.load(open(out / "eval.json"))
    assert all(cli_metrics[k] == pytest.approx(v, abs=1e-6) for k, v in metrics.items())


def test_shapes_alignment_is_perfect_on_real_images():
    ds = data.ShapesDataset(32, seed=3)
    images, captions = sample.eval_pairs(ds, 40, seed=0)
    acc = sample.shapes_alignment(images, captions)
    assert acc["mean"] >= 0.97 and set(acc) == {*sample.SHAPES_ATTRIBUTES, "mean"}


def test_frechet_distance_against_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(250, 6, generator=g) * 0.5 + 1.0
    mu_a, mu_b = a.double().mean(0).numpy(), b.double().mean(0).numpy()
    cov_a, cov_b = np.cov(a.double().numpy().T), np.cov(b.double().numpy().T)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real                          # (S_a S_b)^{1/2}
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
    assert sample.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert abs(sample.frechet_distance(a, a)) < 1e-8
    assert abs(sample.frechet_distance(b, b.clone())) < 1e-8


# ----------------------------------------------------------------------------- bad input

BAD = [  # (argv with RUN for the run directory, a piece of the one-line hint)
    ([], "--ckpt is required"),
    (["--ckpt", "RUN/nowhere", "--prompt", A], "no checkpoint at"),
    (["--ckpt", "RUN/clip.pt", "--prompt", A], "holds no generator"),
    (["--ckpt", "RUN"], "needs at least one prompt"),
    (["--ckpt", "RUN", "--prompts", "EMPTY"], "holds no prompts"),
    (["--ckpt", "RUN", "--prompts", "RUN/missing.txt"], "no such file"),
    (["--ckpt", "RUN", "--prompt", ""], "empty --prompt"),
    (["--ckpt", "RUN", "--prompt", "a red circle", "--beside-data"], "does not name all five attributes"),
    (["--ckpt", "RUN", "--prompt", A, "--beside-data", "--z-interpolate", "3"], "--beside-data puts the data's draws"),
    (["--ckpt", "RUN", "--prompt", A, "--n", "0"], "must be >= 1"),
    (["--ckpt", "RUN", "--prompt", A, "--n", "two"], "invalid int value"),
    (["--ckpt", "RUN", "--prompt", A, "--truncation", "1.5"], "--truncation must be in [0, 1]"),
    (["--ckpt", "RUN", "--prompt", A, "--truncation", "-0.1"], "--truncation must be in [0, 1]"),
    (["--ckpt", "RUN", "--prompt", A, "--batch", "0"], "--batch must be >= 1, got 0"),
    (["--ckpt", "RUN", "--prompt", A, "--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--ckpt", "RUN", "--prompt", A, "--device", "tpu"], "choose auto | cpu | cuda | cuda:N"),
    (["--ckpt", "RUN", "--prompt", A, "--bogus"], "unrecognized arguments"),
    (["--ckpt", "RUN", "--style-mix", "--prompt", A, "--prompt", B], "exactly one prompt"),
    (["--ckpt", "RUN", "--style-mix", "99", "--prompt", A], "choose a row of ws"),
    (["--ckpt", "RUN", "--interpolate", "3", "--prompt", A], "at least two prompt"),
    (["--ckpt", "RUN", "--interpolate", "1", "--prompt", A, "--prompt", B], "--interpolate must be >= 2"),
    (["--ckpt", "RUN", "--prompt-mix", "2", "--prompt", A], "exactly two prompt"),
    (["--ckpt", "RUN", "--prompt-mix", "0", "--prompt", A, "--prompt", B], "choose a row of ws"),
    (["--ckpt", "RUN", "--style-mix", "--interpolate", "3", "--prompt", A], "not allowed with"),
    (["--ckpt", "RUN", "--eval", "--prompt", A], "--eval uses the data set's captions"),
    (["--ckpt", "RUN", "--eval", "--n", "1"], "two images"),
    (["--ckpt", "RUN", "--eval", "--n", "4", "--data", "RUN/no_such_dir"], "--data"),
    (["--ckpt", "RUN", "--prompt", A, "--out", "RUN/clip.pt"], "is a file"),
    (["--ckpt", "RUN", "--prompt", A, "--fid"], "--fid is part of --eval"),
    (["--ckpt", "RUN", "--prompt", A, "--no-fid"], "--no-fid is part of --eval"),
    (["--upsampler", "RUN", "--prompt", A], "--ckpt is required"),
    (["--lowres", "x.png", "--prompt", A, "--out", "o"], "needs --upsampler"),
    (["--ckpt", "RUN", "--upsampler", "RUN", "--prompt", A], "not an upsampler run"),
    (["--ckpt", "RUN", "--upsampler", "RUN", "--prompt", A, "--noise-aug", "-0.1"], "--noise-aug must be in [0, 1]"),
    (["--ckpt", "RUN", "--upsampler", "RUN", "--prompt", A, "--noise-aug", "nan"], "--noise-aug must be in [0, 1]"),
    (["--ckpt", "TMP/truncated", "--prompt", A], "is not a checkpoint"),
    (["--ckpt", "TMP/other_g", "--prompt", A], "G_ema does not fit the generator its config describes"),
    pytest.param(["--ckpt", "RUN", "--prompt", A, "--device", "cuda"], "--device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")),
    # the upsampler's modes
    (["--ckpt", "RUN", "--prompt", A, "--noise-aug", "0.1"], "give --upsampler"),
    (["--upsampler", "UP", "--lowres", "PHOTO", "--noise-aug", "-1"], "--noise-aug must be in [0, 1]"),
    (["--upsampler", "UP", "--lowres", "TMP/missing.png"], "no such file"),
    (["--upsampler", "UP", "--lowres", "UP/log.jsonl"], "not an image"),
    (["--upsampler", "UP", "--lowres", "PHOTO", "--prompt", A, "--prompt", A], "at most one prompt"),
    (["--upsampler", "UP", "--lowres", "PHOTO", "--ckpt", "RUN"], "drop --ckpt"),
    (["--upsampler", "UP", "--ckpt", "RUN", "--style-mix", "--prompt", A], "plain sampling"),
    (["--ckpt", "UP", "--prompt", A], "pass it with --upsampler"),
    (["--upsampler", "TMP/truncated", "--lowres", "PHOTO"], "is not a checkpoint"),
    (["--upsampler", "TMP/other_u", "--lowres", "PHOTO"], "G_ema does not fit the upsampler its config describes"),
]


class _StubCLIP:
    """Random stand-in text features of width 16 (the upsampler below is built for them)."""

    def text_features(self, prompts):
        return sample.generator.random_text(len(prompts), L=8, D=16)


def test_upsampler_chain_adds_moderate_input_noise_by_default():
    """The paper applies the upsampler's Gaussian noise augmentation at inference too: by
    default sample.upsample (the base -> upsampler chain and --lowres) adds noise of std
    inference_sigma(U.cfg) (a quarter of the training maximum) to U's input; --noise-aug 0 adds none,
    another value that std; the noise of an image comes from its seed."""
    torch.manual_seed(0)
    up = sample.upsampler
    U = up.Upsampler(up.U_PRESETS["tiny"], text_dim=16).eval()
    seen = []
    U.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    lowres = torch.zeros(4, 3, 32, 32)
    prompts, seeds = [A] * 4, [0, 1, 2, 3]
    sample.upsample(U, _StubCLIP(), lowres, prompts, seeds, batch=4)
    default = seen[-1] - lowres                                       # (4, 3, 32, 32) the added noise
    sigma = up.inference_sigma(U.cfg)
    assert sigma > 0 and abs(default.std().item() - sigma) < 0.05 * sigma
    sample.upsample(U, _StubCLIP(), lowres, prompts, seeds, batch=2)  # other batches, same noise per seed
    torch.testing.assert_close(torch.cat(seen[-2:]), seen[0])
    sample.upsample(U, _StubCLIP(), lowres, prompts, seeds, batch=4, noise_aug=0.0)
    assert torch.equal(seen[-1], lowres)                              # 0 = off
    sample.upsample(U, _StubCLIP(), lowres, prompts, seeds, batch=4, noise_aug=0.2)
    assert abs((seen[-1] - lowres).std().item() - 0.2) < 0.01
    assert sample.build_parser().parse_args([]).noise_aug is None     # the CLI default: the module's


def damaged_runs(tmp, run_dir, up_dir):
    """TMP/truncated: a checkpoint cut short; TMP/other_g and TMP/other_u: a G_ema that does not fit
    the configuration stored beside it (a weight of another shape)."""
    (tmp / "truncated").mkdir()
    (tmp / "truncated" / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:5000])
    for name, src in (("other_g", run_dir), ("other_u", up_dir)):
        shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("*.png", "samples*"))
        ckpt = torch.load(tmp / name / "checkpoint.pt", weights_only=True)
        key = next(k for k, v in ckpt["G_ema"].items() if v.dim() == 2)
        ckpt["G_ema"][key] = ckpt["G_ema"][key][:, :-1]
        ckpt["clip"] = f"tiny:{run_dir / 'clip.pt'}"              # the CLIP is where it was
        torch.save(ckpt, tmp / name / "checkpoint.pt")


@pytest.mark.parametrize("argv,hint", BAD, ids=[f"{i}:{case[1] if isinstance(case, tuple) else case.values[1]}"
                                                for i, case in enumerate(BAD)])
def test_bad_input_is_one_line_and_exit_2(run_dir, tiny_upsampler, tmp_path, capsys, argv, hint):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    if any("TMP/" in a for a in argv):
        damaged_runs(tmp_path, run_dir, tiny_upsampler)
    argv = [a.replace("RUN", str(run_dir)).replace("EMPTY", str(empty)).replace("UP", str(tiny_upsampler))
            .replace("PHOTO", PHOTO).replace("TMP", str(tmp_path)) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "o")]
    assert hint in bad(sample.main, [*argv, *out], capsys, "sample.py")


def test_a_tiny_clip_trained_anew_under_the_run_is_refused(run_dir, tmp_path, capsys):
    """The checkpoint keeps the tiny CLIP's fingerprint: another clip.pt at the same place (trained
    anew) would condition G_ema on features it never saw, so sampling stops in one line."""
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    cli(moved, tmp_path / "ok", "--prompt", A)                 # a moved run still finds its own CLIP
    clip = torch.load(moved / "clip.pt", weights_only=True)
    clip["state_dict"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in clip["state_dict"].items()}
    torch.save(clip, moved / "clip.pt")
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", str(moved), "--prompt", A, "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the tiny CLIP" in err[0], err


def test_eval_fid_offline_is_one_line_naming_no_fid(run_dir, tmp_path, capsys, monkeypatch):
    """No Inception weights and no network: --eval --fid stops before generating, in one line that
    names --no-fid; with --no-fid the same command runs (and writes no fid)."""
    import metrics
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(metrics, "INCEPTION_URL", "https://weights.invalid/weights-inception-2015-12-05-6726825d.pth")
    monkeypatch.setattr(sample, "generate", lambda *a, **k: pytest.fail("generated before the weights check"))
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", str(run_dir), "--eval", "--fid", "--n", "4", "--out", str(tmp_path / "e")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sample.py: Inception FID") and err[0].endswith("--no-fid"), err
    monkeypatch.undo()
    out, _ = cli(run_dir, tmp_path / "ok", "--eval", "--no-fid", "--n", "4")
    assert "fid" not in json.load(open(out / "eval.json"))


def test_written_pngs_are_the_bytes_of_save_image_grid(tmp_path):
    """write_outputs converts the whole batch at once and writes in threads: each PNG must still be
    byte for byte the 1 x 1 grid data.save_image_grid writes (rounding edges and clamping included)."""
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2   # beyond [-1, 1] too
    images[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 0.5 / 127.5 - 1, 2.5 / 127.5 - 1])            # .5 rounding cases
    rows = [{"caption": f"caption {i}", "seed": i} for i in range(5)]
    sample.write_outputs(tmp_path / "new", images, rows)
    for i in range(5):
        data.save_image_grid(images[i:i + 1], tmp_path / f"ref{i}.png", ncol=1)
        assert (tmp_path / "new" / f"{i:05d}.png").read_bytes() == (tmp_path / f"ref{i}.png").read_bytes(), i
    assert [json.loads(line) for line in open(tmp_path / "new" / "captions.jsonl")] == \
        [{"file": f"{i:05d}.png", **row} for i, row in enumerate(rows)]


def test_out_folder_of_an_earlier_call_is_replaced_and_said(run_dir, tmp_path, capsys):
    """--out holding an earlier --n 3 --grid call: a --n 1 call leaves one PNG, a one-row
    captions.jsonl and no grid.png, says what it replaced, and keeps files that are not its own."""
    out, _ = cli(run_dir, tmp_path / "o", "--prompt", A, "--n", "3", "--grid")
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    out, rows = cli(run_dir, out, "--prompt", B)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "captions.jsonl", "notes.txt"]
    assert [r["caption"] for r in rows] == [B]
    printed = capsys.readouterr().out
    assert f"replaced the earlier outputs in {out} (3 PNGs, captions.jsonl, grid.png)" in printed, printed


def test_prompt_words_the_tiny_clip_never_saw_are_warned_once(run_dir, tmp_path, capsys):
    cli(run_dir, tmp_path / "w", "--prompt", "a dog on a red background", "--prompt", "a dog and a cat", "--n", "2")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "never saw 'dog', 'and', 'cat'" in err[0] and "--data shapes" in err[0], err
    cli(run_dir, tmp_path / "k", "--prompt", A)
    assert capsys.readouterr().err == ""                             # the grammar's words: no warning


# ----------------------------------------------------------------------------- the latent-space tools
# Each test fails when its mode does nothing: the mechanism is checked against its formula, and
# the images against their ends (plain samples, the mean w).

A2 = "a large red square on the left of a blue background"        # A - A2 + B3 = A3: shape, then colour
B3 = "a large green square on the left of a blue background"
A3 = "a large green circle on the left of a blue background"


def synthesis_inputs(G, monkeypatch):
    """Record (ws, t_local, mask) of every G.synthesis call; -> the list they go to."""
    calls, real = [], G.synthesis.forward
    monkeypatch.setattr(G.synthesis, "forward", lambda ws, t, m, **kw: calls.append((ws, t, m)) or real(ws, t, m, **kw))
    return calls


def test_truncation_sweep_runs_from_plain_samples_to_the_mean_w(run_dir, tmp_path, capsys):
    out, rows = cli(run_dir, tmp_path / "t", "--truncation-sweep", "3", "--prompt", A, "--prompt", B, "--n", "2",
                    "--truncation-target", "0.5", "--figure", str(tmp_path / "fig.png"))
    assert [r["truncation"] for r in rows[:3]] == [1.0, 0.5, 0.0] and len(rows) == 2 * 2 * 3
    assert [(r["caption"], r["seed"]) for r in rows[::3]] == [(A, 0), (A, 1), (B, 0), (B, 1)]
    assert Image.open(out / "grid.png").size == (3 * 32, 4 * 32)                # cols = psi, rows = (prompt, seed)
    assert "psi 0.00: 0.000" in capsys.readouterr().out                        # no height spread left at psi 0
    fig = pixels(tmp_path / "fig.png")                                          # tiles 3x, 2 px gaps
    assert fig.shape == (2 + 4 * (96 + 2), 2 + 3 * (96 + 2), 3) and (fig[:2] == 255).all()
    assert (fig[2:98:3, 2:98:3] == pixels(out / "grid.png")[:32, :32]).all()
    img = images(out, rows)
    plain_out, plain_rows = cli(run_dir, tmp_path / "p", "--prompt", A, "--prompt", B, "--n", "2")
    assert all(same(img[3 * i], x) for i, x in enumerate(images(plain_out, plain_rows)))  # psi 1: plain
    assert same(img[2], img[5]) and not same(img[2], img[8])                    # psi 0: one image per prompt
    assert np.abs(img[0] - img[3]).max() > 10 and not same(img[1], img[0])      # seeds differ; psi 0.5 moves
    # psi 0 is the image of the target w_m = (w_c + w_avg) / 2, drawn by hand
    G, clip, _ = sample.load_generator(run_dir)
    t_local, mask, t_global = sample.text_condition(G, clip, [A])
    w_m = 0.5 * G.mean_w(t_global) + 0.5 * G.mapping.w_avg
    by_hand = G.synthesis(w_m[:, None].expand(-1, G.num_ws, -1), t_local, mask, noise_mode="const")[0]
    assert same(img[2], sample.png_pixels(by_hand)[0])


def test_slerp_keeps_the_ends_and_walks_the_arc_evenly():
    a, b = torch.randn(3, 128), torch.randn(3, 128)
    b[2] = a[2] * 2                                                             # parallel: no NaN, a lerp
    assert torch.equal(sample.slerp(a, b, torch.zeros(3)), a) and torch.equal(sample.slerp(a, b, torch.ones(3)), b)
    cos = torch.nn.functional.cosine_similarity
    angle = torch.acos(cos(a, b)[:2])
    for t in (0.25, 0.5):
        mid = sample.slerp(a, b, torch.full((3,), t))
        torch.testing.assert_close(torch.acos(cos(a[:2], mid[:2])), t * angle)   # the angle moves evenly
        torch.testing.assert_close(torch.acos(cos(mid[:2], b[:2])), (1 - t) * angle)
        torch.testing.assert_close(mid[2], a[2] * (1 + t))
        torch.testing.assert_close(mid.norm(dim=1)[:2], torch.lerp(a.norm(dim=1), b.norm(dim=1), t)[:2])  # length


def test_z_interpolate_ends_are_the_two_seeds_and_the_middle_neither(run_dir, tmp_path):
    out, rows = cli(run_dir, tmp_path / "z", "--z-interpolate", "3", "--prompt", A, "--n", "2", "--seed", "4")
    assert [(r["seed"], r["seed_b"], r["t"]) for r in rows] == [(4, 5, 0), (4, 5, 0.5), (4, 5, 1), (6, 7, 0),
                                                                (6, 7, 0.5), (6, 7, 1)]
    assert Image.open(out / "grid.png").size == (3 * 32, 2 * 32)
    start, mid, end = images(out, rows[:3])
    plain_out, plain_rows = cli(run_dir, tmp_path / "p", "--prompt", A, "--n", "2", "--seed", "4")
    seed4, seed5 = images(plain_out, plain_rows)
    assert same(start, seed4) and same(end, seed5)
    assert np.abs(mid - start).max() > 2 and np.abs(mid - end).max() > 2


def test_prompt_interpolation_lerps_the_text_and_w_together(run_dir, monkeypatch):
    """Fig. 7: at alpha, t_local and w are the lerps of the two prompts' (same z)."""
    G, clip, _ = sample.load_generator(run_dir)
    calls = synthesis_inputs(G, monkeypatch)
    sample.interpolated_images(G, clip, [A, A], [B, B], [0.25, 1.0], [3, 3])
    ws, t_local, mask = calls[0]
    L = clip.context_length
    t_a, m_a, g_a = sample.text_condition(G, clip, [A], L)
    t_b, m_b, g_b = sample.text_condition(G, clip, [B], L)
    z = sample.seeded_z([3], G.cfg.z_dim, "cpu")
    w_a, w_b = G.mapping(z, g_a), G.mapping(z, g_b)
    torch.testing.assert_close(ws[0], (0.75 * w_a + 0.25 * w_b).expand(G.num_ws, -1))
    torch.testing.assert_close(t_local[0], (0.75 * t_a + 0.25 * t_b)[0])
    torch.testing.assert_close(ws[1], w_b.expand(G.num_ws, -1))                     # alpha 1: B's own w
    assert not torch.allclose(w_a, w_b, atol=1e-3)                                # so w really moves


def test_style_mix_takes_coarse_styles_from_one_seed_and_fine_from_the_other(run_dir, monkeypatch):
    """At the crossover row, rows [0, row) of ws are the coarse seed's w and the rest the fine
    seed's; the 4 and 8 px levels are the coarse seed's image, the finer ones are not."""
    G, clip, _ = sample.load_generator(run_dir)
    row = sample.default_crossover(G)
    calls = synthesis_inputs(G, monkeypatch)
    rgbs = []
    hooks = [t.register_forward_hook(lambda m, i, o: rgbs.append(o)) for t in G.synthesis.torgbs]
    try:
        sample.mixed_images(G, clip, [(A, 0), (A, 0)], [(A, 1), (A, 0)], row)      # item 0 mixed, item 1 seed 0
    finally:
        for h in hooks:
            h.remove()
    ws = calls[0][0]
    _, _, g = sample.text_condition(G, clip, [A])
    w0, w1 = (G.mapping(sample.seeded_z([s], G.cfg.z_dim, "cpu"), g)[0] for s in (0, 1))
    torch.testing.assert_close(ws[0, :row], w0.expand(row, -1))
    torch.testing.assert_close(ws[0, row:], w1.expand(G.num_ws - row, -1))
    for rgb, res in zip(rgbs, G.cfg.scales):
        assert torch.equal(rgb[0], rgb[1]) == (res < 16), res


def test_arithmetic_is_a_minus_b_plus_c_in_each_space(run_dir):
    G, clip, _ = sample.load_generator(run_dir)
    z = sample.seeded_z([0], G.cfg.z_dim, "cpu")
    L = clip.context_length
    feats = [clip.text_features([p], L) for p in (A, A2, B3)]
    texts = [G.text_encoder(*f) for f in feats]                                  # (t_local, mask, t_global) each

    def code(space):
        ws, t_local, mask = sample.arithmetic_code(G, clip, [A], [A2], [B3], z, space)
        assert torch.equal(ws[:, 0], ws[:, -1]) and torch.equal(mask, texts[0][1])
        return ws[:, 0], t_local
    t_sum = texts[0][0] - texts[1][0] + texts[2][0]
    w, t_local = code("w")
    torch.testing.assert_close(w, sum(s * G.mapping(z, t[2]) for s, t in zip((1, -1, 1), texts)))
    torch.testing.assert_close(t_local, t_sum)
    w, t_local = code("w-only")
    torch.testing.assert_close(t_local, texts[2][0])                               # C's own text
    w, t_local = code("t")
    torch.testing.assert_close(w, G.mapping(z, texts[0][2] - texts[1][2] + texts[2][2]))
    torch.testing.assert_close(t_local, t_sum)
    tokens = feats[0][0] - feats[1][0] + feats[2][0]
    t_ref, _, g_ref = G.text_encoder(tokens, feats[0][1], feats[0][2])
    w, t_local = code("clip")
    torch.testing.assert_close(w, G.mapping(z, g_ref))
    torch.testing.assert_close(t_local, t_ref)
    with pytest.raises(ValueError, match="equal token counts"):
        sample.arithmetic_code(G, clip, [A], [C], [B3], z, "t")


def test_arithmetic_cli_columns_and_a_minus_b_plus_b_is_a(run_dir, tmp_path):
    out, rows = cli(run_dir, tmp_path / "v", "--arithmetic", "t", "--prompt", A, "--prompt", A2, "--prompt", B3,
                    "--prompt", A3, "--n", "2")
    assert Image.open(out / "grid.png").size == (5 * 32, 2 * 32)
    assert [r["caption"] for r in rows[:5]] == [A, A2, B3, f"{A} - {A2} + {B3}", A3]
    assert rows[3]["space"] == "t" and [r["seed"] for r in rows] == [0] * 5 + [1] * 5
    a, _, c, result, _ = images(out, rows[:5])
    assert np.abs(result - c).max() > 2 and np.abs(result - a).max() > 2       # it does something
    for space in ("clip", "t", "w"):                     # A - B + B = A (w-only keeps B's own text)
        out, rows = cli(run_dir, tmp_path / space, "--arithmetic", space, "--prompt", A, "--prompt", A2,
                        "--prompt", A2)
        a, _, _, result = images(out, rows)
        assert np.abs(result - a).max() <= 2, space


def test_random_analogies_change_one_attribute_at_a_time(run_dir):
    _, clip, _ = sample.load_generator(run_dir)
    analogies = sample.random_analogies(clip, 24, seed=3)
    assert analogies == sample.random_analogies(clip, 24, seed=3) and len(set(analogies)) == 24
    for a, b, c, d, x in analogies:
        pa, pb, pc, pd = (data.parse_shapes_caption(t) for t in (a, b, c, d))
        assert [k for k in pa if pa[k] != pb[k]] == [x]                        # a -> b: the carried attribute
        (y,) = [k for k in pb if pb[k] != pc[k]]                                # b -> c: one other attribute
        assert y != x and pd == dict(pa, **{y: pc[y]})                          # d = a - b + c
        assert len({int(clip.text_features([t])[2][0]) for t in (a, b, c, d)}) == 1
    assert len({x for *_, x in analogies}) >= 4


def test_analogies_mode_judges_every_space(run_dir, tmp_path, capsys):
    out, rows = cli(run_dir, tmp_path / "an", "--analogies", "--n", "3")
    scores = json.load(open(out / "analogies.json"))["accuracy"]
    assert set(scores) == {"d drawn from its prompt", "c drawn from its prompt", *sample.ARITHMETIC_SPACES}
    assert len(rows) == 3 * 8 and Image.open(out / "grid.png").size == (8 * 32, 3 * 32)
    assert [r["column"] for r in rows[:8]] == ["a", "b", "c", "d", *sample.ARITHMETIC_SPACES]
    assert "w-only" in capsys.readouterr().out
    _, clip, _ = sample.load_generator(run_dir)                 # the scores, on the captions' own attributes:
    a, b, c, d, x = zip(*sample.random_analogies(clip, 3, seed=0))
    targets = [data.parse_shapes_caption(t) for t in d]
    assert sample.analogy_scores(targets, targets, x) == {"all": 1.0, "carried": 1.0, "rest": 1.0}
    as_c = sample.analogy_scores([data.parse_shapes_caption(t) for t in c], targets, x)
    assert as_c == {"all": 0.0, "carried": 0.0, "rest": 1.0}                   # c has b's value of x only
    assert set(scores["t"]["carried_by_attribute"]) == set(x)
    assert set(scores["t"]["code_residual"]) == {"w", "t_local"}
    G = sample.load_generator(run_dir)[0]                       # d - c + c lands on d's code, and w-only
    res = sample.analogy_residuals(G, clip, list(d), list(c), list(c), list(d), [0, 1, 2])  # keeps c's text
    assert all(res[s]["w"] < 1e-4 and res[s]["t_local"] < 1e-4 for s in ("clip", "t", "w")), res
    assert res["w-only"]["w"] < 1e-4 and res["w-only"]["t_local"] == pytest.approx(1)
    assert sample.carried_by_attribute(targets, targets, x) == dict.fromkeys(x, 1.0)


def test_figure_of_plain_sampling_is_its_grid(run_dir, tmp_path):
    out, rows = cli(run_dir, tmp_path / "f", "--prompt", A, "--n", "2", "--figure", str(tmp_path / "f.png"))
    assert (out / "grid.png").is_file() and Image.open(tmp_path / "f.png").size == (2 + 2 * 98, 2 + 98)


@pytest.mark.parametrize("argv,hint", [
    (["--arithmetic", "t", "--prompt", A, "--prompt", A2], "three prompts"),
    (["--arithmetic", "t", "--prompt", A, "--prompt", C, "--prompt", B3], "equal token counts"),
    (["--arithmetic", "v", "--prompt", A], "invalid choice"),
    (["--analogies", "--prompt", A], "draws its own captions"),
    (["--truncation-sweep", "1", "--prompt", A], "--truncation-sweep"),
    (["--truncation-target", "1.5", "--prompt", A], "--truncation-target"),
    (["--truncation-target", "mean", "--prompt", A], "--truncation-target"),
    (["--z-interpolate", "3", "--prompt", A, "--figure", "TMP"], "--figure"),
    (["--z-interpolate", "3", "--prompt", A, "--figure", "TMP/nowhere/x.png"], "no folder"),
])
def test_latent_modes_refuse_bad_input_in_one_line(run_dir, tmp_path, capsys, argv, hint):
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    assert hint in bad(sample.main, ["--ckpt", str(run_dir), "--out", str(tmp_path / "o"), *argv], capsys, "sample.py")


def test_prompt_words_are_named_as_typed(run_dir, tmp_path, capsys):
    """Accented letters, other scripts and emoji were cut to their ASCII letters ('émoji' -> 'moji')
    or dropped: the warning names every such word as the prompt has it."""
    cli(run_dir, tmp_path / "w", "--prompt", "un grand cercle rouge ☃ 日本語 émoji 🐶")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "never saw 'un', 'grand', 'cercle', 'rouge', '☃', '日本語', 'émoji', '🐶' in" in err[0], err
    cli(run_dir, tmp_path / "k", "--prompt", "A large, red circle; on the left of a blue background.")
    assert capsys.readouterr().err == ""                             # case and punctuation: the grammar's words


def test_every_recorded_seed_can_be_given_back(run_dir, tmp_path):
    """The largest seeds: captions.jsonl records only seeds that --seed accepts (past them: refused,
    tests/test_bad_input.py), and each one gives its image back."""
    _, rows = cli(run_dir, tmp_path / "top", "--prompt", A, "--seed", "4294967294", "--n", "2")
    assert [r["seed"] for r in rows] == [4294967294, 4294967295]
    _, again = cli(run_dir, tmp_path / "again", "--prompt", A, "--seed", str(rows[1]["seed"]))
    assert same(pixels(tmp_path / "top" / rows[1]["file"]), pixels(tmp_path / "again" / again[0]["file"]))


def test_a_missing_tiny_clip_asks_for_the_runs_own_file(run_dir, tmp_path, capsys):
    """No message may suggest a command that destroys a run: a run whose clip.pt is gone asks for that
    file back, not for `train.py --stage clip --out RUN`."""
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    (moved / "clip.pt").unlink()
    err = bad(sample.main, ["--ckpt", str(moved), "--prompt", A, "--out", str(tmp_path / "o")], capsys, "sample.py")
    assert "clip.pt is missing" in err and "put the run's own file back" in err and "--stage clip" not in err, err
