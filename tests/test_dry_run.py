"""dry_run.py: the largest --batch-gpu that fits (against a brute-force search), the bytes autograd saves,
the launch line read back by the parser, --gpu-memory."""
import dataclasses
import itertools
import json
import shlex

import pytest

import dry_run
import train

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
    """Numbers of the size of --preset small (0.8 GiB state, 53.6 MiB activations per image, no CLIP)."""
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


# ----------------------------------------------------------------------------- the dry run itself

def dry(capsys, *argv):
    """train.py --dry-run ARGV -> (its printed lines, the launch line's train.py flags)."""
    train.main([*argv, "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    launch = next(line for line in lines if line.startswith("launch: "))
    words = shlex.split(launch[len("launch: "):])
    return lines, words[words.index("train.py") + 1:]


def comparable(argv):
    """parse_flags' configurations, less what only the dry run reads, --batch-gpu resolved."""
    cfg, *models = train.parse_flags(argv)
    return dataclasses.replace(cfg, dry_run=False, gpu_memory=0.0, batch_gpu=cfg.batch_gpu or cfg.batch_size), models


@pytest.mark.parametrize("argv", [
    ["--preset", "small", "--clip", "ViT-B-32/laion2b_s34b_b79k", "--lr", "0.001", "--data", "DIR"],
    ["--preset", "small", "--device", "cuda", "--g.channels", "64,64,64,32,16", "--loss.r1-gamma", "0.5",
     "--d.attention", "false", "--out", "runs/my run"],
    ["--full", "--batch-size", "96", "--batch-gpu", "8", "--g.attn-resolutions", ""],
    ["--stage", "upsampler", "--u.noise-aug-sigma", "0.1", "--lpips", "alex", "--seed", "3"],
    ["--stage", "upsampler", "--full", "--clip", "ViT-B-32/openai"],
    ["--g.resolution", "16", "--g.channels", "[64, 64, 32]", "--g.blocks-per-scale", "1,1,1", "--g.n-kernels", "1,2,2",
     "--loss.table1-matching", "d"],
])
def test_launch_line_reads_back_as_the_planned_configuration(capsys, tmp_path, argv):
    """The printed torchrun line, parsed again by train.py, gives the configuration the dry run planned
    (on this CPU machine too, --device cuda included); its processes divide the micro-batches."""
    argv = [str(tmp_path) if a == "DIR" else a for a in argv]
    lines, flags = dry(capsys, *argv)
    planned, launched = comparable(argv), comparable(flags)
    if not planned[0].data:  # the preset has no data set: the line shows where it goes
        assert launched[0].data == dry_run.PLACEHOLDER_DATA
        planned = (dataclasses.replace(planned[0], data=launched[0].data), planned[1])
    assert launched == planned
    launch = next(line for line in lines if line.startswith("launch: "))
    nproc, nnodes = (int(launch.split(f"--{k}=")[1].split()[0]) for k in ("nproc_per_node", "nnodes"))
    cfg = planned[0]
    assert (cfg.batch_size // cfg.batch_gpu) % (nproc * nnodes) == 0 and nproc <= 8


def test_small_preset_dry_run_uses_vit_b32_as_the_readme_says(capsys):
    lines, flags = dry(capsys, "--preset", "small")
    assert "frozen CLIP: ViT-B-32" in lines, lines
    assert "--clip" not in flags                                    # the preset's own choice
    assert json.loads(lines[-1])["clip_gib"] > 0.4


def test_gpu_memory_picks_the_batch_gpu_and_puts_it_in_the_launch_line(capsys):
    lines, flags = dry(capsys, "--preset", "small", "--gpu-memory", "12")
    counts = json.loads(lines[-1])
    fit = next(line for line in lines if line.startswith("--gpu-memory 12: "))
    b = counts["batch_gpu"]
    assert f"--batch-gpu {b} fits" in fit and flags[flags.index("--batch-gpu") + 1] == str(b)
    assert b < 64 and 64 % b == 0 and counts["est_gib_per_gpu"] <= 12 - 1.0
    launch = next(line for line in lines if line.startswith("launch: "))
    assert f"{64 // b} accumulation steps" in fit and "--nproc_per_node=1 --nnodes=1 " in launch
    lines, _ = dry(capsys, "--preset", "small", "--gpu-memory", "80")
    assert json.loads(lines[-1])["batch_gpu"] == 64                 # the whole batch fits: no accumulation


def test_gpu_memory_too_small_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--preset", "small", "--dry-run", "--gpu-memory", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "even --batch-gpu 1 needs about" in err[0], err


def test_dry_run_plans_a_gpu_run_on_any_machine(capsys, monkeypatch):
    """--device cuda --dry-run builds on the meta device: no GPU needed (here: none visible)."""
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    lines, flags = dry(capsys, "--preset", "small", "--device", "cuda")
    assert flags[flags.index("--device") + 1] == "cuda"


def test_dry_run_counts_saved_activations():
    """The per-image estimate is what autograd saves in a G step or in three D passes, whichever is more."""
    import torch
    cfg, g_cfg, d_cfg, _ = train.parse_flags([])
    n_g, n_d, per_image = dry_run.measure(cfg, g_cfg, d_cfg)
    torch.manual_seed(0)
    G, D = dry_run.generator.Generator(g_cfg, text_dim=128), dry_run.discriminator.Discriminator(d_cfg, text_dim=128)
    assert (n_g, n_d) == (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters()))
    text = (torch.zeros(2, 77, 128), torch.ones(2, 77, dtype=torch.bool), torch.full((2,), 76))
    params = [*G.parameters(), *D.parameters()]
    z = torch.zeros(2, g_cfg.z_dim)
    g_step = dry_run.saved_activation_bytes(lambda: D(G(z, *text), *text), params)
    with torch.no_grad():
        fakes = G(z, *text)
    d_step = 3 * dry_run.saved_activation_bytes(lambda: D(fakes, *text), params)
    assert per_image == max(g_step, d_step) / 2 > 0


# ----------------------------------------------------------------------------- plans that reproduce themselves

def plan(capsys, argv):
    """train.py ARGV --dry-run -> (its lines, the launch line, the JSON counts, the launch line's flags)."""
    lines, flags = dry(capsys, *argv)
    launch = next(line for line in lines if line.startswith("launch: "))
    return lines, launch, json.loads(lines[-1]), flags


@pytest.mark.parametrize("argv", [
    ["--preset", "small", "--gpu-memory", "12"],
    ["--full", "--gpu-memory", "80"],
    ["--stage", "upsampler", "--full"],
])
def test_the_launch_line_pasted_back_plans_the_same_run(capsys, argv):
    """The issue's rows: the printed launch line, given back to --dry-run, prints the same launch line
    and estimate (small at 12 GB planned 1 process, pasted back 2; full at 80 GB 4 nodes, pasted back
    8). So it is a fixed point: pasting it back again would give train.py the very flags it got here
    (the flags are read off the line), and the dry run is deterministic (the meta device, no draws)."""
    _, launch, counts, flags = plan(capsys, argv)
    lines, again, counts_again, flags_again = plan(capsys, flags)
    assert again == launch and counts_again == counts and flags_again == flags
    assert not any(line.startswith("WARNING") for line in lines), lines
    if argv[0] == "--full":  # dry_run.py's docstring quotes these counts
        assert f"G {counts['G_params'] / 1e6:.1f}M, D {counts['D_params'] / 1e6:.1f}M" in dry_run.__doc__
        assert "--nproc_per_node=8 --nnodes=4 " in launch                # the preset's 32 GPUs, accumulation 2
    if argv[0] == "--stage":  # the full upsampler preset fits an A100 80 GB; its counts are in the docstring
        assert counts["est_gib_per_gpu"] <= 80 - 1.0 and counts["batch_gpu"] == 4
        assert f"U {counts['U_params'] / 1e6:.1f}M, D {counts['U_D_params'] / 1e6:.1f}M" in dry_run.__doc__


def test_a_batch_over_the_presets_gpu_warns_with_the_batch_that_fits(capsys):
    lines, _, counts, _ = plan(capsys, ["--full", "--batch-gpu", "32"])
    warning = [line for line in lines if line.startswith("WARNING")]
    assert len(warning) == 1 and "more than the 80 GiB GPUs the full preset is planned for" in warning[0], lines
    assert "--batch-gpu 16 fits" in warning[0] and counts["est_gib_per_gpu"] > 80


def test_the_full1024_upsampler_is_selectable_and_fits(capsys):
    """README's presets table lists the upsampler `full1024` (128 -> 1024, 352.4M, D 422.3M)."""
    lines, launch, counts, _ = plan(capsys, ["--stage", "upsampler", "--preset", "full1024"])
    assert round(counts["U_params"] / 1e6, 1) == 352.4 and round(counts["U_D_params"] / 1e6, 1) == 422.3
    assert counts["est_gib_per_gpu"] <= 80 - 1.0 and not any(line.startswith("WARNING") for line in lines)
    assert "--preset full1024 --stage upsampler" in launch
