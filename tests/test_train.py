"""train.py end to end on CPU: every stage for a few steps, resume, checkpoints, multi-process
(gloo), bad input, and a short run whose text alignment must improve."""
import importlib
import json
import os
import signal
import subprocess
import sys

import dataclasses
import shutil
import socket

import pytest
import torch

import config
import data
import train
from conftest import FAST, StepHook, assert_same, bad, log_rows, small_clip_pool, state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp_path, *extra, name="run", clip=None, timer=None):
    out = tmp_path / name
    argv = ["--out", str(out), *FAST, *extra]
    if clip:
        argv += ["--clip", clip]
    train.main(argv, timer=timer)
    return out


def test_base_stage_writes_everything(tmp_path, tiny_clip, capsys):
    out = run(tmp_path, "--max-steps", "3", "--snapshot-every", "2", "--eval-every", "3", "--eval-images", "4",
              clip=tiny_clip)
    printed = capsys.readouterr().out
    for name in ("config.json", "log.jsonl", "losses.png", "checkpoint.pt", "samples_000002.png",
                 "samples_000003.png", "samples_prompts.txt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("img_s", "D/adv", "D/match", "D/vision", "G/adv", "G/match", "G/clip", "G/vision",
                "D/real_logit", "D/fake_logit"):
        assert key in train_rows[0], key
    assert "R1/penalty" in train_rows[0]                       # step 0 is an R1 step
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals and "align_mean" in evals[0] and "clip_score" in evals[0]
    ckpt = state(out)                                           # weights_only loadable
    assert ckpt["step"] == 3 and ckpt["nimg"] == 12
    assert set(ckpt) >= {"G", "G_ema", "D", "VD", "opt_G", "opt_D", "config", "clip"}
    assert not any(k.startswith("clip") or "visual" in k for k in ckpt["G"])  # frozen CLIP never stored
    assert json.load(open(out / "config.json"))["train"]["max_steps"] == 3
    assert "img_s" in printed and "done: 3 steps" in printed


def test_resume_equals_uninterrupted(tmp_path, tiny_clip, monkeypatch):
    """2 steps, then --resume to 4, equals 4 steps in one go bit for bit: every module (G, G_ema,
    D, VD), both optimiser states, step, nimg, the RNG after every step and the log rows (but
    their img/s). Everything random is drawn from seed_for(seed, step, ...), so no RNG state needs
    to be stored."""
    hook = StepHook()
    whole = run(tmp_path, "--max-steps", "4", name="whole", clip=tiny_clip, timer=hook)
    rng_whole = hook.rng[:]
    hook.rng.clear()
    part = run(tmp_path, "--max-steps", "2", name="part", clip=tiny_clip, timer=hook)
    assert state(part)["step"] == 2
    run(tmp_path, "--max-steps", "4", "--resume", name="part", clip=tiny_clip, timer=hook)
    rng_part = hook.rng[:]
    a, b = state(whole), state(part)
    assert (b["step"], b["nimg"]) == (4, 16) and a["VD"] and a["opt_D"]["state"]
    keys = ("G", "G_ema", "D", "VD", "opt_G", "opt_D", "step", "nimg")
    assert_same({k: a[k] for k in keys}, {k: b[k] for k in keys})
    assert len(rng_whole) == len(rng_part) == 4 and all(map(torch.equal, rng_whole, rng_part))
    rows = [[{k: v for k, v in r.items() if k not in ("img_s", "eta_s")} for r in log_rows(out)] for out in (whole, part)]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4] and rows[0] == rows[1]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_clip, monkeypatch, capsys):
    run(tmp_path, "--max-steps", "2", "--ckpt-every", "1", name="nan", clip=tiny_clip)
    good = state(tmp_path / "nan")
    real_loss = train.losses.generator_loss

    def poisoned(*args, **kwargs):
        loss, logs = real_loss(*args, **kwargs)
        return loss * float("nan"), logs

    monkeypatch.setattr(train.losses, "generator_loss", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--max-steps", "4", "--ckpt-every", "1", "--resume", name="nan", clip=tiny_clip)
    assert exit_info.value.code == 1
    assert "G loss is nan" in capsys.readouterr().err
    after = state(tmp_path / "nan")
    assert after["step"] == good["step"] == 2
    assert all(torch.equal(good["G"][k], after["G"][k]) for k in good["G"])


def test_ctrl_c_finishes_the_step_saves_then_resumes(tmp_path, tiny_clip, capsys):
    ctrl_c = StepHook(at=3, action=lambda: os.kill(os.getpid(), signal.SIGINT))  # what a terminal sends, in step 3
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--max-steps", "10", name="int", clip=tiny_clip, timer=ctrl_c)
    assert exit_info.value.code == 130
    assert "saved step 3" in capsys.readouterr().out
    assert state(tmp_path / "int")["step"] == 3
    run(tmp_path, "--max-steps", "4", "--resume", name="int", clip=tiny_clip)
    assert state(tmp_path / "int")["step"] == 4


def test_max_minutes_ends_the_run_early_with_its_last_outputs_then_resume_goes_on(tmp_path, tiny_clip, capsys):
    """--max-minutes (the tiny preset's 15-minute budget) ends a run at a step boundary as
    --max-steps would: last log line, snapshot, evaluation and checkpoint at that step; a budget
    of 0.51 minutes, less the 30 s kept for those outputs, runs out within the first steps."""
    out = run(tmp_path, "--max-steps", "50", "--max-minutes", "0.51", "--eval-every", "1000", "--eval-images", "4",
              name="budget", clip=tiny_clip)
    printed = capsys.readouterr().out
    step = state(out)["step"]
    assert 1 <= step < 50
    assert f"done: {step} steps in the 0.51-minute budget (--max-minutes), of 50" in printed
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [step]
    assert rows[-1]["step"] == step and (out / f"samples_{step:06d}.png").is_file()
    run(tmp_path, "--max-steps", str(step + 2), "--resume", "--max-minutes", "0", name="budget", clip=tiny_clip)
    assert state(out)["step"] == step + 2


def test_tiny_preset_trains_a_fixed_number_of_steps_without_a_budget():
    """The default ends at the same step on every machine: 3,000 steps, no --max-minutes."""
    cfg = train.parse_flags([])[0]
    assert (cfg.max_minutes, cfg.max_steps) == (0.0, 3000)
    assert train.parse_flags(["--stage", "upsampler"])[0].max_minutes == 0
    assert train.parse_flags(["--max-minutes", "15"])[0].max_minutes == 15.0


def leaf_parameters(loss):
    """The trainable leaves a loss depends on, found through its autograd graph."""
    leaves, todo, seen = [], [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):                       # AccumulateGrad: a leaf tensor
            leaves.append(node.variable)
        todo.extend(fn for fn, _ in node.next_functions)
    return leaves


def test_gradient_accumulation_is_the_batch_mean_and_bf16_autocast_is_used(tmp_path, tiny_clip, monkeypatch):
    """--batch 4 --batch-gpu 2: the gradient G's optimiser steps with is the mean over the whole
    batch, (grad L_a + grad L_b) / 2 of its two micro-batches' mean losses, bit for bit (the
    halving is exact); and --dtype bfloat16 runs G's forward and loss under bfloat16 autocast."""
    micro_grads, step_grads, dtypes = [], [], []
    real_loss, real_step = train.losses.generator_loss, torch.optim.AdamW.step

    def spy_loss(D, fakes, *args, **kwargs):
        loss, logs = real_loss(D, fakes, *args, **kwargs)
        dtypes.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        params = leaf_parameters(loss)
        micro_grads.append(dict(zip(params, torch.autograd.grad(loss, params, retain_graph=True))))
        return loss, logs

    def spy_step(opt, *args, **kwargs):
        step_grads.append({p: p.grad.clone() for group in opt.param_groups for p in group["params"]
                           if p.grad is not None})
        return real_step(opt, *args, **kwargs)

    monkeypatch.setattr(train.losses, "generator_loss", spy_loss)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    out = run(tmp_path, "--max-steps", "1", "--batch-gpu", "2", "--dtype", "bfloat16", name="accum", clip=tiny_clip)
    assert state(out)["step"] == 1 and len(micro_grads) == 2
    assert dtypes == [(True, torch.bfloat16)] * 2                      # G's forward and its loss ran in bf16
    g_step = next(g for g in step_grads if g.keys() == micro_grads[0].keys())   # opt_G's step
    assert len(g_step) > 10
    for p, grad in g_step.items():
        assert torch.equal(grad, micro_grads[0][p] / 2 + micro_grads[1][p] / 2)


@pytest.mark.parametrize("stage", ["base", "upsampler"])
def test_compile_keeps_r1_on_the_eager_discriminator(tmp_path, tiny_clip, monkeypatch, stage):
    """--compile: R1 (step 0 is an R1 step) differentiates D's gradient, which a compiled
    module's backward does not support, so it must get the eager D; the D and G steps the
    compiled one. torch.compile itself takes minutes on a CPU: a stand-in marks what it wraps."""
    wrapped, called, r1_discriminators = [], [], []

    def fake_compile(module):
        def forward(*args, **kwargs):
            called.append(module)
            return module(*args, **kwargs)
        wrapped.append(module)
        return forward

    def spy_r1(D, *args, **kwargs):
        r1_discriminators.append(D)
        return real_r1(D, *args, **kwargs)

    real_r1 = train.losses.lazy_r1_loss
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(train.losses, "lazy_r1_loss", spy_r1)
    extra = ["--stage", "upsampler", "--warmup-steps", "0", "--lpips", "random", "--batch-size", "2"] if stage == "upsampler" else []
    out = run(tmp_path, "--max-steps", "1", "--compile", "true", *extra, name=stage, clip=tiny_clip)
    assert [type(m).__name__ for m in wrapped] == ["Upsampler" if stage == "upsampler" else "Generator", "Discriminator"]
    G, D = wrapped
    assert r1_discriminators and all(d is D for d in r1_discriminators)  # R1 got the eager module itself
    assert G in called and D in called                          # the D and G steps went through the compiled ones
    assert state(out)["step"] == 1


def free_port():
    """A TCP port no one listens on now: the one the system picks for a bind to port 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path, tiny_clip):
    """torchrun with 2 CPU processes (gloo): the weights stay identical across ranks, and equal
    those of one process accumulating the same two micro-batches bit for bit: G, G_ema, D, VD,
    w_avg (each micro-batch keeps its own chain of it, see train.MicroBuffers) and the optimisers.
    (a + b in one process and in gloo's all-reduce of two ranks is the same float sum.)"""
    common = [*FAST, "--max-steps", "2", "--batch-gpu", "2", "--clip", tiny_clip, "--seed", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(ROOT, "train.py"), "--out", str(tmp_path / "ddp"), *common]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "weights identical across 2 processes" in proc.stdout
    train.main(["--out", str(tmp_path / "single"), *common])
    a, b = state(tmp_path / "ddp"), state(tmp_path / "single")
    keys = ("G", "G_ema", "D", "VD", "opt_G", "opt_D", "step", "nimg")
    assert a["VD"] and any(k.endswith("w_avg") for k in a["G_ema"])
    assert_same({k: a[k] for k in keys}, {k: b[k] for k in keys})
    # the log lines describe the global batch: the loss terms are averaged over the processes
    logs = [[r for r in map(json.loads, open(tmp_path / name / "log.jsonl")) if r["kind"] == "train"]
            for name in ("ddp", "single")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2]
    for row_ddp, row_single in zip(*logs):
        assert row_ddp.keys() == row_single.keys()
        for k in row_ddp.keys() - {"kind", "step", "kimg", "img_s", "eta_s"}:
            assert row_ddp[k] == pytest.approx(row_single[k], rel=1e-4, abs=1e-5), k


def test_full_dry_run_prints_parameter_counts(capsys):
    train.main(["--full", "--dry-run"])
    out, err = capsys.readouterr()
    counts = json.loads(out.strip().splitlines()[-1])
    # its torchrun line must be one train.py accepts: processes x --batch-gpu divides --batch-size
    assert "--nproc_per_node=8 --nnodes=4" in out and "WARNING" not in out + err, out + err
    assert abs(counts["G_params"] / 652.5e6 - 1) < 0.05
    assert abs(counts["D_params"] / 381.4e6 - 1) < 0.05
    # ViT-L/14 (text 123.7M fp32, image 304.0M bf16) + ViT-B/32 (text 63.4M fp32, image 87.8M bf16)
    assert abs(counts["clip_gib"] - 1.43) < 0.02 and counts["est_gib_per_gpu"] > counts["clip_gib"]
    assert counts["est_gib_per_gpu"] <= 80 - 1.0 and counts["batch_gpu"] == 16   # an A100 80 GB, as README says


def test_dry_run_launch_line_fits_the_batch(capsys):
    """The printed torchrun line must be one train.py accepts: processes x --batch-gpu divides --batch-size.
    (The full preset's line: test_full_dry_run_prints_parameter_counts, on the same dry run.)"""
    train.main(["--preset", "small", "--dry-run"])
    out, err = capsys.readouterr()
    assert "--nproc_per_node=1 --nnodes=1" in out and "WARNING" not in out + err, out + err


def test_help_lists_every_flag(capsys):
    train.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--max-steps", "--batch-gpu", "--g.n-kernels", "--d.multi-scale", "--loss.clip-weight",
                 "--loss.table1-matching"):
        assert flag in text, flag
    # the values listed are the tiny preset's, the ones `python train.py` runs with
    import re
    assert re.search(r"--lr\s+0\.005\n", text) and re.search(r"--g\.noise\s+False\n", text)
    # at most 60 flags: the ones the paper and the README's readers need
    assert 30 <= len(re.findall(r"^  --", text, flags=re.M)) <= 60


def test_the_base_loop_reads_in_one_sitting():
    """train.py is the base stage's loop, read top to bottom: at most 400 lines, the step loop
    starting in the file's first third, and no branch on the upsampler stage (train_upsampler.py)."""
    lines = open(os.path.join(os.path.dirname(train.__file__), "train.py")).read().splitlines()
    assert len(lines) <= 400
    loop = next(i for i, line in enumerate(lines) if line.strip() == "while step < cfg.max_steps:")
    assert loop < len(lines) / 3, (loop, len(lines))
    start = next(i for i, line in enumerate(lines) if line.startswith("def train("))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("def "))
    assert not [line for line in lines[start:end] if "upsampler" in line and line.startswith(" ")]


def test_tuple_flags_take_commas_or_json():
    for value in ("48,48,32,16", "[48, 48, 32, 16]"):
        _, g_cfg, _, _ = train.parse_flags(["--g.channels", value])[:4]
        assert g_cfg.channels == (48, 48, 32, 16)
    with pytest.raises(train.FlagError, match="such as 64,64,64,32"):
        train.parse_flags(["--g.channels", "wide"])
    with pytest.raises(train.FlagError, match="bad value for --g.channels"):
        train.parse_flags(["--g.channels", '{"4": 64}'])     # a dict is not a tuple


def test_flags_take_dashes_or_underscores_key_equals_value_and_win_over_the_preset_anywhere():
    """config.py's argparse parser, generated from the dataclass fields: `--key value` or
    `--key=value`, dashes or underscores, a bare boolean flag is true, and a flag given before
    --preset still wins over that preset's value."""
    a = train.parse_flags(["--max_steps=7", "--loss.r1_gamma", "0.5", "--resume", "--compile=false",
                           "--batch-size", "8", "--preset", "small"])
    b = train.parse_flags(["--preset=small", "--max-steps", "7", "--loss.r1-gamma=0.5", "--resume", "true",
                           "--compile", "0", "--batch_size=8"])
    assert a == b
    cfg, _, _, loss_cfg = a
    assert (cfg.max_steps, cfg.batch_size, cfg.resume, cfg.compile, loss_cfg.r1_gamma) == (7, 8, True, False, 0.5)
    assert cfg.preset == "small" and cfg.ema_kimg == 20.0          # the rest: the small preset's


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")

# Every one-line error of train.py (exit status 2), base and upsampler stages. In argv, CLIP is the
# session's tiny CLIP spec and DATA/ a folder bad_data() writes; --max-steps 1 is added if missing.
BAD = [
    (["--bogus", "1"], "unknown flag --bogus"),
    (["--stage", "gan"], "unknown --stage 'gan': choose clip | base | upsampler"),
    pytest.param(["--device", "cuda"], "--device cuda but no GPU is visible: use --device cpu", marks=NO_GPU),
    (["--preset"], "--preset: expected one argument"),
    (["--max-steps"], "--max-steps: expected one argument"),
    (["--batch-gpu", "-1"], "--batch-gpu must be >= 0"),
    (["--clip", "tiny:/no/such/clip.pt"], "no tiny CLIP at /no/such/clip.pt"),
    (["--full"], "--data is required for this preset"),
    (["--data", "DATA/no_header"], "expected a header row with columns file,caption"),
    (["--data", "DATA/bad_jsonl"], "line 1: expected a JSON object"),
    (["--data", "DATA/empty"], "no images"),
    (["--data", "DATA/no_header/a.png"], "is a file"),
    (["--data", "DATA/shards/{00000..00001}.tar"], "2 of 2 shards"),
    # the upsampler stage
    (["--stage", "upsampler", "--lpips", "squeeze"], "unknown --lpips"),
    (["--stage", "upsampler", "--g.channels", "64,64,64,32"], "--u.*"),
    (["--u.channels", "64,64,48,32,16"], "use --stage upsampler"),
    (["--stage", "upsampler", "--preset", "small"], "no upsampler preset"),
    (["--stage", "upsampler", "--u.in-resolution", "48"], "bad upsampler configuration"),
    (["--warmup-steps", "5"], "use --stage upsampler"),
    (["--stage", "upsampler", "--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--stage", "upsampler", "--lpips", "vgg", "--clip", "CLIP"], "--lpips random"),  # no VGG weights offline
    (["--max-steps", "ten"], "bad value for --max-steps"),
    (["--max-steps", "0"], "--max-steps must be in [1, 1000000000], got 0"),
    (["--preset", "huge"], "unknown --preset 'huge'"),
    (["--dtype", "float8"], "unknown --dtype"),
    (["--clip-tower", "convnext"], "unknown --clip-tower"),
    (["--clip-tower", "resnet", "--g.resolution", "16", "--g.channels", "[64, 64, 32]", "--g.blocks-per-scale", "[1, 1, 1]", "--g.n-kernels", "[1, 2, 2]"], "divisible by 32"),
    (["--g.self-attention", "maybe"], "bad value for --g.self-attention"),
    (["--loss.table1-matching", "g"], "unknown --loss.table1-matching 'g': choose off | d | g_and_d | g_and_d+g"),
    (["--g.resolution", "30"], "bad generator configuration (--g.*)"),
    (["--stage", "upsampler", "--d.multi-scale", "maybe"], "bad value for --d.multi-scale"),
    (["--loss.r1-gamma", "-1"], "--loss.r1-gamma must be >= 0, got -1"),
    (["--stage", "upsampler", "--loss.r1-interval", "0"], "--loss.r1-interval must be >= 1, got 0"),
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--max-minutes", "-1"], "--max-minutes must be >= 0"),
    (["--lr", "0"], "--lr must be > 0, got 0"),
    (["--stage", "upsampler", "--loss.vision-weight", "1"], "the upsampler has none"),
    (["--g.z-dim", "64"], "unknown flag --g.z-dim"),  # a preset's field, not a flag
    (["--clip", "ViT-B-32"], "needs a weights tag"),
    (["--vision-clip", "ViT-B-32"], "bad --vision-clip 'ViT-B-32': choose auto | same"),
    (["--clip", "ViT-B-32/openai"], "--clip ViT-B-32/none"),  # offline: no weights, one line
    (["--batch-size", "6", "--batch-gpu", "4"], "multiple of --batch-gpu"),
    (["stray"], "unexpected argument"),
    (["--full", "--preset", "small"], "--full is --preset full"),
]


def bad_data(root):
    """Image folders train.py must refuse in one line: captions.csv without a header, a broken
    captions.jsonl, no images at all."""
    from PIL import Image
    for name, captions in (("no_header", ("captions.csv", "a.png,a red circle\n")),
                           ("bad_jsonl", ("captions.jsonl", "not json\n"))):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "a.png")
        (root / name / captions[0]).write_text(captions[1])
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no images here")


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_input_is_one_clear_line(tmp_path, tiny_clip, argv, message, capsys):
    bad_data(tmp_path / "data")
    argv = [a.replace("CLIP", tiny_clip).replace("DATA", str(tmp_path / "data")) for a in argv]
    steps = [] if "--max-steps" in argv else ["--max-steps", "1"]
    assert message in bad(train.main, ["--out", str(tmp_path / "bad"), *steps, *argv], capsys, "train.py")
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_resume_of_another_preset_or_g_configuration_is_refused(tiny_run, capsys):
    """The tiny run resumed as --preset small, or with other --g.* flags: one line each, and the run
    is left as it was (refused before anything is written)."""
    config, ckpt = (tiny_run / "config.json").read_bytes(), (tiny_run / "checkpoint.pt").read_bytes()
    argv = ["--out", str(tiny_run), "--clip", f"tiny:{tiny_run / 'clip.pt'}", *FAST, "--max-steps", "3", "--resume"]
    err = bad(train.main, [*argv, "--preset", "small"], capsys, "train.py")
    assert "is a 'tiny' run, not a 'small' one: resume it with --preset tiny" in err
    err = bad(train.main, [*argv, "--g.channels", "[32, 32, 32, 16]"], capsys, "train.py")
    assert "another G configuration (channels (64, 64, 64, 32) -> (32, 32, 32, 16))" in err
    assert "resume it with the same --g.* flags" in err
    assert (tiny_run / "config.json").read_bytes() == config and (tiny_run / "checkpoint.pt").read_bytes() == ckpt


def test_resume_checks_everything_before_training_a_clip_or_writing_config(tmp_path, capsys):
    """--resume is refused in one line, before any CLIP is trained and before config.json is
    rewritten, when the run cannot be continued as it was trained."""
    import shutil
    tiny = ["--clip-steps", "4", "--clip-batch-size", "16"]
    with small_clip_pool():
        base = run(tmp_path, "--max-steps", "1", *tiny, name="base")   # the default: its own tiny CLIP in base/
    config = (base / "config.json").read_text()
    capsys.readouterr()                                           # what the base run printed

    def refused(name, *extra, prepare=None):
        out = tmp_path / name
        if not out.exists():
            shutil.copytree(base, out)
        if prepare:
            prepare(out)
        with pytest.raises(SystemExit) as exit_info:
            run(tmp_path, "--max-steps", "2", "--resume", *tiny, *extra, name=name)
        assert exit_info.value.code == 2
        printed = capsys.readouterr()
        err = printed.err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("train.py: "), err
        assert "[clip] training" not in printed.out                 # refused before any CLIP training
        return err, out

    err, out = refused("d", "--d.channel-max", "32")             # D's weights would not fit
    assert "another D configuration (channel_max 64 -> 32): resume it with the same --d.* flags" in err
    assert (out / "config.json").read_text() == config           # the run's settings are kept
    err, _ = refused("vd", "--loss.vision-weight", "0")
    assert "was trained with the vision-aided D" in err
    err, out = refused("noclip", prepare=lambda out: (out / "clip.pt").unlink())
    assert "clip.pt is missing" in err and not (out / "clip.pt").exists()

    def retrain_clip(out):  # the same path, other weights: as if --stage clip had run again there
        clip = torch.load(out / "clip.pt", weights_only=True)
        clip["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in clip["state_dict"].items()}
        torch.save(clip, out / "clip.pt")
    err, _ = refused("newclip", prepare=retrain_clip)
    assert "is not the tiny CLIP" in err and "put the run's own file back" in err
    err, _ = refused("corrupt", prepare=lambda out: (out / "checkpoint.pt").write_bytes(
        (base / "checkpoint.pt").read_bytes()[:5000]))
    assert "could not read" in err and "as a checkpoint" in err
    (tmp_path / "empty").mkdir()
    err, out = refused("empty")
    assert "no checkpoint at" in err and "drop --resume" in err and not (out / "clip.pt").exists()


def test_resume_of_a_run_written_before_a_config_field_existed(tmp_path, tiny_clip, capsys):
    # a run from before GeneratorConfig.noise (noise inputs on, no "noise" key in its config)
    out = run(tmp_path, "--max-steps", "1", "--g.noise", "true", name="old", clip=tiny_clip)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    del ckpt["config"]["G"]["noise"]
    torch.save(ckpt, out / "checkpoint.pt")
    with pytest.raises(SystemExit):                          # the new tiny default (no noise) is another model
        run(tmp_path, "--max-steps", "2", "--resume", name="old", clip=tiny_clip)
    err = capsys.readouterr().err
    assert "another G configuration (noise True -> False)" in err and len(err.strip().splitlines()) == 1
    run(tmp_path, "--max-steps", "2", "--resume", "--g.noise", "true", name="old", clip=tiny_clip)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["config"]["G"]["retired_field"] = 1                 # a field this version no longer has
    torch.save(ckpt, out / "checkpoint.pt")
    with pytest.raises(SystemExit):
        run(tmp_path, "--max-steps", "3", "--resume", "--g.noise", "true", name="old", clip=tiny_clip)
    assert "configuration this version of the code cannot read" in capsys.readouterr().err


@pytest.mark.slow
def test_short_tiny_run_learns_the_background_colour(tmp_path):
    """The learning test: the default tiny CLIP (ResNet tower) of 100 steps, then 150 GAN steps of
    batch 8 (1,200 images; about a minute on 2 cores). The pixel judge of metrics.py reads the
    background colour of G_ema's images back: after one step it is near chance (1 in 7), after 150
    it must be right far more often. (The shape, its colour, size and position take longer: see
    the README.) Seeds 0, 1, 2 gave 0.11 -> 0.58, 0.66, 0.69 (2026-12-08); --lr 1e-6 gave 0.09 -> 0.09.
    """
    clip_out = tmp_path / "clip"
    train.main(["--stage", "clip", "--out", str(clip_out), "--clip-steps", "100", "--clip-batch-size", "64"])
    clip = f"tiny:{clip_out / 'clip.pt'}"
    common = ["--batch-size", "8", "--eval-images", "64", "--log-every", "50"]
    out = run(tmp_path, *common, "--max-steps", "1", "--eval-every", "1", clip=clip)
    out = run(tmp_path, *common, "--max-steps", "150", "--eval-every", "150", "--resume", clip=clip)
    evals = [json.loads(line) for line in open(out / "log.jsonl") if '"eval"' in line]
    assert [e["step"] for e in evals] == [1, 150]
    before, after = evals[0]["align_background"], evals[1]["align_background"]
    assert before < 0.35 and after > before + 0.15, (before, after)
    assert evals[1]["clip_fd"] < evals[0]["clip_fd"]  # generated CLIP features moved toward the real ones
    assert z_rms(out) > 0.01   # G still uses z: two z of one caption differ (G ignoring z gives exactly 0)


def z_rms(out, n=8):
    """Pixel RMS between G_ema's images of the same caption from two z, over n captions."""
    import sample
    G, clip, _ = sample.load_generator(out)
    captions = [data.ShapesDataset(32, seed=7)[i][1] for i in range(n)]
    a = sample.generate(G, clip, captions, list(range(n)))
    b = sample.generate(G, clip, captions, list(range(1000, 1000 + n)))
    rms = (a - b).square().mean().sqrt().item()
    print(f"RMS between two z of one caption: {rms:.4f}")
    return rms


def test_z_rms_is_zero_when_g_ignores_z(tiny_run, monkeypatch):
    """The learning test's check of z, made to fail: a G whose mapping network never sees z draws
    one picture per caption, whatever the z."""
    gen = importlib.import_module("03_generator")
    forward = gen.MappingNetwork.forward
    assert z_rms(tiny_run) > 0.01
    monkeypatch.setattr(gen.MappingNetwork, "forward", lambda self, z, t, update_w_avg=None:
                        forward(self, torch.zeros_like(z) + 1, t, update_w_avg))
    assert z_rms(tiny_run) < 1e-6


def test_tiny_preset_uses_its_own_r1_gamma():
    # the tiny base preset trains with gamma 1.0 (05's LOSS_PRESETS["base_tiny"]); the other
    # presets keep the paper's 0.2048, and a flag overrides either
    assert train.parse_flags([])[3].r1_gamma == 1.0
    assert train.parse_flags(["--preset", "small"])[3].r1_gamma == pytest.approx(0.2048)
    assert train.parse_flags(["--full"])[3].r1_gamma == pytest.approx(0.2048)
    assert train.parse_flags(["--loss.r1_gamma", "0.5"])[3].r1_gamma == 0.5
    # and weighs the vision-aided terms 2 (its ResNet-tower vision CLIP teaches the shape); the paper-sized
    # presets keep 0.5
    assert train.parse_flags([])[3].vision_weight == 2.0
    assert train.parse_flags(["--full"])[3].vision_weight == 0.5


def spy_weighted_terms(monkeypatch):
    """Records, for every D and G loss of a run: (the loss, the loss again with one term's weight
    set to 0, that term's logged value), for D/vision (--loss.vision-weight) and G/clip
    (--loss.clip-weight). -> {"D/vision": [...], "G/clip": [...]}."""
    seen = {"D/vision": [], "G/clip": []}

    def spying(name, key, field):
        real = getattr(train.losses, name)

        def spy(*args, **kwargs):
            loss, logs = real(*args, **kwargs)
            i = next(i for i, a in enumerate(args) if isinstance(a, train.losses.LossConfig))
            cfg = args[i]
            with torch.no_grad():
                without, _ = real(*args[:i], dataclasses.replace(cfg, **{field: 0.0}), *args[i + 1:], **kwargs)
            seen[key].append((loss.item(), without.item(), getattr(cfg, field), logs.get(key)))
            return loss, logs
        monkeypatch.setattr(train.losses, name, spy)

    spying("discriminator_loss", "D/vision", "vision_weight")
    spying("generator_loss", "G/clip", "clip_weight")
    return seen


def assert_terms_count(seen, n_steps):
    """Each term was computed at every step, and G's or D's loss moves by exactly weight * term."""
    for key, calls in seen.items():
        assert len(calls) == n_steps, key
        for total, without, weight, term in calls:
            assert weight > 0 and term is not None and term != 0, key
            assert (total - without) / weight == pytest.approx(term, rel=1e-4, abs=1e-6), key


def test_base_stage_with_a_resnet_tiny_clip_for_the_vision_aided_d(tmp_path, tiny_clip, monkeypatch):
    """--vision-clip tiny:PATH gives the vision-aided D its own (ResNet-tower) CLIP: here the text
    CLIP has no sibling beside it (so `auto` would use it for both), and the flag names one."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tiny_clip[len("tiny:"):], alone / "clip.pt")
    spec = "tiny:" + os.path.join(os.path.dirname(tiny_clip[len("tiny:"):]), "vision_clip.pt")
    seen = spy_weighted_terms(monkeypatch)
    out = run(tmp_path, "--max-steps", "2", "--vision-clip", spec, name="split", clip=f"tiny:{alone / 'clip.pt'}")
    assert_terms_count(seen, 2)
    assert state(out)["vision_clip"] == spec
    # the vision-aided D reads the ResNet CLIP's feature maps, not the text CLIP's
    def shapes(state_dict):
        return {k: tuple(v.shape) for k, v in state_dict.items()}

    d_cfg = train.discriminator.D_PRESETS["tiny"]
    for c, same in ((train.clip_lib.load_clip(spec), True), (train.clip_lib.load_clip(tiny_clip), False)):
        vd = train.discriminator.VisionAidedDiscriminator(c.feature_channels, c.embed_dim, hidden=d_cfg.vision_hidden,
                                                          psi_layers=d_cfg.vision_psi_layers)
        assert (shapes(vd.state_dict()) == shapes(state(out)["VD"])) == same


def test_vision_clip_auto_resolves_to_the_resnet_sibling(tmp_path):
    """--vision-clip auto: `--clip tiny --clip-tower vit` trains <out>/vision_clip.pt; `--clip tiny:PATH`
    uses the file beside PATH when it is there; the default ResNet text CLIP, a pretrained one or
    `same` serve both."""
    def spec(*argv):
        return train.vision_clip_spec(train.parse_flags(["--out", str(tmp_path / "r"), *argv])[0])

    assert spec("--clip-tower", "vit") == f"tiny:{tmp_path / 'r' / 'vision_clip.pt'}"
    assert spec() is None                                        # the default tower at 32 px: resnet
    assert spec("--clip-tower", "resnet") is None
    assert spec("--vision-clip", "same") is None
    assert spec("--clip", "ViT-B-32/none") is None
    assert spec("--vision-clip", "tiny:elsewhere.pt") == "tiny:elsewhere.pt"
    assert spec("--full") == "ViT-B-32/openai"                   # the paper's: ViT-B/32 beside ViT-L/14
    assert spec("--g.resolution", "16", "--g.channels", "64,64,32", "--g.blocks-per-scale", "1,1,1",
                "--g.n-kernels", "1,2,2") is None                # a ResNet tower needs a multiple of 32 px
    (tmp_path / "c").mkdir()
    assert spec("--clip", f"tiny:{tmp_path / 'c' / 'clip.pt'}") is None  # no sibling: the text CLIP
    (tmp_path / "c" / "vision_clip.pt").write_bytes(b"")
    assert spec("--clip", f"tiny:{tmp_path / 'c' / 'clip.pt'}") == f"tiny:{tmp_path / 'c' / 'vision_clip.pt'}"
    assert spec("--clip", f"tiny:{tmp_path / 'c' / 'vision_clip.pt'}") is None  # the sibling itself: one CLIP


def test_clip_tower_auto_is_resnet_for_the_base_stage_at_multiples_of_32_px():
    def tower(*argv):
        return train.parse_flags(list(argv))[0].clip_tower

    assert tower() == "resnet" and tower("--stage", "clip") == "resnet"
    assert tower("--g.resolution", "16", "--g.channels", "64,64,32", "--g.blocks-per-scale", "1,1,1",
                 "--g.n-kernels", "1,2,2") == "vit"             # ResNet stages need sides divisible by 32
    assert tower("--stage", "upsampler") == "vit"                # its CLIP only conditions on text
    assert tower("--clip-tower", "vit") == "vit"


@pytest.mark.slow
def test_default_tiny_clip_is_one_resnet_clip_for_every_role(tmp_path, capsys, monkeypatch):
    """`--stage clip` as `python train.py` runs it: one ResNet-tower clip.pt and no sibling; the base
    stage then reads text, the CLIP loss and the vision-aided D's features from that one model."""
    clip_out = tmp_path / "clip"
    with small_clip_pool():
        train.main(["--stage", "clip", "--out", str(clip_out), "--clip-steps", "2", "--clip-batch-size", "16"])
    assert (clip_out / "clip.pt").is_file() and not (clip_out / "vision_clip.pt").exists()
    spec = f"tiny:{clip_out / 'clip.pt'}"
    rn = train.clip_lib.load_clip(spec)
    seen = spy_weighted_terms(monkeypatch)
    out = run(tmp_path, "--max-steps", "2", name="one", clip=spec)
    printed = capsys.readouterr().out
    assert f", CLIP {spec} (" in printed and " on CLIP " not in printed  # no second CLIP named
    ckpt = state(out)
    assert ckpt["vision_clip"] == ckpt["clip"] and ckpt["config"]["loss"]["clip_weight"] == 0.1
    head = next(v for k, v in ckpt["VD"].items() if k.endswith("stem.0.weight"))
    assert head.shape[1] == rn.feature_channels[0]              # VD reads the ResNet's feature maps
    assert_terms_count(seen, 2)
    # `--clip tiny` caches <out>/clip.pt; a cached CLIP of another tower is refused in one line
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(clip_out), *FAST, "--max-steps", "1", "--clip-tower", "vit"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "resnet image tower" in err and "--clip-tower resnet" in err and len(err.splitlines()) == 1, err


def test_stage_clip_trains_the_resnet_sibling_and_the_base_stage_uses_it(tmp_path, tiny_clip, capsys):
    sibling = os.path.join(os.path.dirname(tiny_clip[len("tiny:"):]), "vision_clip.pt")
    assert os.path.isfile(sibling)                              # --stage clip wrote both files
    written = json.load(open(os.path.join(os.path.dirname(sibling), "config.json")))
    assert set(written) == {"train"}                            # no G/D/loss settings for the CLIP stage
    rn = train.clip_lib.load_clip("tiny:" + sibling)
    assert rn.feature_channels != train.clip_lib.load_clip(tiny_clip).feature_channels  # a ResNet tower
    out = run(tmp_path, "--max-steps", "2", name="auto", clip=tiny_clip)
    assert "on CLIP tiny:" + sibling in capsys.readouterr().out
    ckpt = state(out)
    assert ckpt["vision_clip"].endswith("vision_clip.pt")
    head = next(v for k, v in ckpt["VD"].items() if k.endswith("stem.0.weight"))
    assert head.shape[1] == rn.feature_channels[0]              # VD reads the ResNet's feature maps
    # resuming with another vision-aided CLIP would load VD onto other feature maps: refused
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--max-steps", "3", "--resume", "--vision-clip", "same", name="auto", clip=tiny_clip)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert f"resume with --vision-clip tiny:{sibling}" in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- EMA and the real pyramid

def test_update_ema_formula_and_ramp_up():
    """G_ema <- beta G_ema + (1 - beta) G, beta = 0.5 ** (batch / half-life): after half-life
    images the old weights count half. The half-life is ema_kimg thousand images, but at most
    rampup times the images seen so far; buffers (w_avg) are copied, not averaged."""
    def modules(value):
        m = torch.nn.Linear(3, 2)
        m.register_buffer("w_avg", torch.full((2,), value))
        torch.nn.init.constant_(m.weight, value), torch.nn.init.constant_(m.bias, value)
        return m

    cfg = config.TrainConfig(batch_size=4, ema_kimg=0.1)                      # half-life 100 images
    for nimg, half_life in ((40, 2.0), (1000, 50.0), (10_000, 100.0)):       # ramped up: 0.05 * nimg
        G_ema, G = modules(1.0), modules(3.0)
        beta = train.update_ema(G_ema, G, cfg, nimg)
        assert beta == pytest.approx(0.5 ** (4 / half_life), rel=1e-12), nimg
        torch.testing.assert_close(G_ema.weight, torch.full((2, 3), beta * 1.0 + (1 - beta) * 3.0))
        assert torch.equal(G_ema.w_avg, G.w_avg)
    # no ramp-up: the half-life from the first step; after half_life / batch steps, half of the gap is left
    G_ema, G = modules(1.0), modules(3.0)
    for step in range(25):                                                    # 25 steps of 4 = 100 images
        train.update_ema(G_ema, G, cfg, nimg=4 * (step + 1), rampup=0.0)
    torch.testing.assert_close(G_ema.bias, torch.full((2,), 2.0))             # 3 - (3 - 1) / 2


def test_image_pyramid_is_the_image_then_repeated_anti_aliased_halving():
    """Finest first: the image itself, then each level the 2x downsampling of the one before;
    a flat image stays flat, and the mean of an image is kept at every level."""
    images = data.ShapesDataset(32, seed=1)[0][0][None].repeat(2, 1, 1, 1)    # (2, 3, 32, 32)
    pyramid = train.image_pyramid(images, 4)
    assert [x.shape[-1] for x in pyramid] == [32, 16, 8, 4] and pyramid[0] is images
    for fine, coarse in zip(pyramid, pyramid[1:]):
        assert torch.equal(coarse, train.kernels.downsample2x(fine))
        blurred = torch.nn.functional.avg_pool2d(fine, 2)                     # the box filter: close, not equal
        assert (coarse - blurred).abs().mean() < 0.1 and not torch.equal(coarse, blurred)
        torch.testing.assert_close(coarse.mean(), fine.mean(), rtol=0, atol=2e-2)
    flat = train.image_pyramid(torch.full((1, 3, 16, 16), 0.25), 3)
    assert all(torch.allclose(x, torch.full_like(x, 0.25), atol=1e-6) for x in flat)


def test_resume_names_the_clip_the_run_used_and_refuses_max_steps_it_passed(tmp_path, tiny_clip, capsys):
    """A run trained on --clip tiny:OTHER/clip.pt, resumed without the flag: one line naming the
    flag that resumes it (not "clip.pt is missing"); --max-steps at or below the run's step: one line,
    config.json untouched."""
    out = run(tmp_path, "--max-steps", "2", name="other", clip=tiny_clip)
    config = (out / "config.json").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--max-steps", "3", "--resume", name="other")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"resume with --clip {tiny_clip}" in err[0], err
    for steps, word in (("1", "past"), ("2", "already at")):
        with pytest.raises(SystemExit) as exit_info:
            run(tmp_path, "--max-steps", steps, "--resume", name="other", clip=tiny_clip)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is at step 2, {word} --max-steps {steps}" in err[0], err
        assert (out / "config.json").read_text() == config and state(out)["step"] == 2
    run(tmp_path, "--max-steps", "3", "--resume", name="other", clip=tiny_clip)    # the flag it named
    assert state(out)["step"] == 3


def test_full_preset_ema_is_the_papers_decay_per_step():
    """The paper's G EMA: 0.9999 per step at batch 1024 (after the ramp-up)."""
    cfg = train.parse_flags(["--full"])[0]
    G, G_ema = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    beta = train.update_ema(G_ema, G, cfg, nimg=10**9)             # far past the ramp-up
    assert cfg.batch_size == 1024 and beta == pytest.approx(0.9999, abs=1e-6)


def test_coco_captions_change_with_the_epoch(tmp_path):
    """StepSampler hands CocoCaptions (index, epoch): an image with several captions is shown with
    other ones in later epochs (a plain index would always give epoch 0's caption)."""
    from PIL import Image
    root = tmp_path / "coco" / "train2017"
    root.mkdir(parents=True)
    images, annotations = [], []
    for k in range(2):
        Image.new("RGB", (16, 16), (40 * k, 80, 120)).save(root / f"{k}.png")
        images.append({"id": k, "file_name": f"{k}.png"})
        annotations += [{"image_id": k, "caption": f"image {k} caption {j}"} for j in range(5)]
    (tmp_path / "coco" / "annotations").mkdir()
    (tmp_path / "coco" / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))
    dataset = train.data.build_dataset(str(root), 16)
    cfg = train.parse_flags(["--batch-size", "2", "--workers", "0", "--data", str(root)])[0]
    rt = train.Runtime(torch.device("cpu"), 0, 1, None, 0.0)
    batches = train.make_batches(dataset, cfg, rt, 2, [0], 0)
    per_epoch = [sorted(next(batches)[1]) for _ in range(6)]           # 2 images: one epoch per step
    assert len({tuple(p) for p in per_epoch}) > 1, per_epoch
    first = train.make_batches(dataset, cfg, rt, 2, [0], 3)            # resumed at step 3: the same captions
    assert sorted(next(first)[1]) == per_epoch[3]


def test_tiny_upsampler_lpips_note_says_it_is_the_preset(capsys):
    cfg = train.parse_flags(["--stage", "upsampler"])[0]
    importlib.import_module("train_upsampler").build_lpips(cfg, train.Runtime(torch.device("cpu"), 0, 1, None, 0.0))
    note = capsys.readouterr().out
    assert "the tiny upsampler's preset" in note and "cannot be downloaded" not in note
