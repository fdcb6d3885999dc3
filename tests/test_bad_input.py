"""Every flag of train.py and sample.py given bad values: exit status 2, one line on stderr that names
the flag, nothing written to --out, no CLIP trained. Table-driven from the rules beside the dataclasses
(config.TRAIN_RULES, config.SUB_RULES, sample.SAMPLE_RULES): a new flag is in these tables by
construction, and a free-text one without a bad value here fails test_every_flag_has_a_bad_value."""
import dataclasses
import math
import os
import typing

import pytest

import config
import sample
import train
from conftest import small_clip_pool

A = "a large red circle on the left of a blue background"


def interval_breakers(rule, kind):
    """Numbers just outside an interval rule ("[1, inf)", "(0, 1]", ...), and nan for floats."""
    low, high = (float(x) for x in rule[1:-1].split(","))
    out = []
    if math.isfinite(low):
        out.append(low if rule[0] == "(" else low - (1 if kind is int else 0.5))
    if math.isfinite(high):
        out.append(high if rule[-1] == ")" else high + 1)
    if kind is float:
        out += [float("nan"), float("inf")]
    return [str(int(v)) if kind is int else repr(v) for v in out]


def generated(rule, kind):
    """Bad values of a flag from its rule and its type alone."""
    values = []
    if kind in (int, float, tuple):
        values.append("abc")                                     # not a number
    if kind is bool:
        values.append("maybe")
    if isinstance(rule, str) and rule is not config.ANY:
        values += interval_breakers(rule, float if kind is float else int)
    if isinstance(rule, tuple):
        values.append("bogus")
    return values


# Free-text flags (and those checked by a function): a bad value and the flags it needs, by hand.
TRAIN_TEXT = {
    "data": ["/no/such/folder"],
    "out": ["FILE"],
    "clip": ["ViT-B-32"],                                        # no weights tag
    "vision_clip": ["ViT-B-32"],
    "device": ["tpu", "cuda:x"],
}


def train_cases():
    cases = []
    for prefix, cls in (("", config.TrainConfig), *config.SUB_CONFIGS.items()):
        rules = config.SUB_RULES[prefix] if prefix else config.TRAIN_RULES
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in rules:                                  # a preset's field, not a flag
                continue
            kind = hints[f.name]
            values = generated(rules[f.name], kind) + (TRAIN_TEXT.get(f.name, []) if not prefix else [])
            flag = f"--{prefix}{f.name.replace('_', '-')}"
            stage = ["--stage", "upsampler"] if prefix == "u." else []
            cases += [pytest.param(flag, value, stage, id=f"{flag}={value}") for value in values]
    return cases


def test_every_flag_has_a_bad_value():
    flags = {c.values[0] for c in train_cases()}
    for prefix, cls in (("", config.TrainConfig), *config.SUB_CONFIGS.items()):
        for name in config.SUB_RULES[prefix] if prefix else config.TRAIN_RULES:
            assert f"--{prefix}{name.replace('_', '-')}" in flags, (prefix, name)


def test_every_preset_keeps_the_rules():
    """The presets' own values are inside every rule (the checks run on the flags given)."""
    for preset in config.TRAIN_RULES["preset"]:
        stages = [s for s, presets in (("base", config.TRAIN_PRESETS), ("upsampler", config.UPSAMPLER_TRAIN_PRESETS))
                  if preset in presets]
        assert stages, preset
        for stage in stages:
            cfg, g_cfg, d_cfg, loss_cfg = config.parse_flags(["--preset", preset, "--stage", stage])
            for prefix, values in (("", cfg), ("u." if stage == "upsampler" else "g.", g_cfg), ("d.", d_cfg),
                                   ("loss.", loss_cfg)):
                rules = config.SUB_RULES[prefix] if prefix else config.TRAIN_RULES
                given = {k: v for k, v in dataclasses.asdict(values).items() if k in rules and k not in ("out", "data")}
                config.check_values(given, rules, prefix)


@pytest.mark.parametrize("flag, value, stage", train_cases())
def test_train_flag_bad_value(tmp_path, capsys, flag, value, stage):
    out = tmp_path / "run"
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    value = str(a_file) if value == "FILE" else value
    tiny_clip = [] if flag == "--clip" else ["--clip-steps", "2"]  # (--clip-steps needs --clip tiny)
    argv = ["--out", str(out), "--max-steps", "1", *tiny_clip, *stage, flag, value]
    if flag == "--out":
        argv = ["--max-steps", "1", *stage, flag, value]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    err = printed.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: ") and flag in err[0], err
    assert not out.exists()                                              # nothing written
    assert "[clip] training" not in printed.out                          # no CLIP trained


@pytest.mark.parametrize("argv, hint", [
    (["--eval-images", "0"], "--eval-images must be >= 2, got 0"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--g.channels", "abc"], "bad value for --g.channels: 'abc' (expected tuple of whole numbers"),
    (["--g.channels", "64,64.5,64,32"], "expected tuple of whole numbers"),
    (["--g.channels", "64,0,64,32"], "every entry of --g.channels must be >= 1, got 0"),
    (["--seed", "18446744073709551615"], "--seed must be in [0, 4294967295]"),
    (["--g.channels", "64,64,64"], "bad generator configuration (--g.*)"),
    (["--d.channel-base", "8"], "set --d.channel-base to at least 32"),
    (["--stage", "upsampler", "--u.channels", "64,64"], "bad upsampler configuration (--u.*)"),
    (["--eval-fid", "true", "--eval-every", "0"], "--eval-fid scores the base stage's periodic evals"),
    (["--gpu-memory", "12"], "--gpu-memory plans a run: add --dry-run"),
    (["--clip", "ViT-B-32/openai"], "--clip ViT-B-32/none"),      # offline: and no stray config.json
])
def test_issue_rows_are_one_line_before_any_work(tmp_path, capsys, argv, hint):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(out), "--max-steps", "1", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and hint in err[0], err
    assert not out.exists()


# ----------------------------------------------------------------------------- flags that do nothing

def scope_cases():
    """Every field, given for every stage outside its scope (config.TRAIN_SCOPE, SUB_SCOPE), at a
    value its rule accepts: a new flag is in this table by construction."""
    import dry_run
    defaults = {"": config.TrainConfig(), "g.": dry_run.generator.G_PRESETS["tiny"],
                "u.": dry_run.upsampler.U_PRESETS["tiny"], "d.": dry_run.discriminator.D_PRESETS["tiny"],
                "loss.": config.losses.LOSS_PRESETS["base"]}
    cases = []
    for prefix, scope in (("", config.TRAIN_SCOPE), *config.SUB_SCOPE.items()):
        for name, (stages, _) in scope.items():
            flag = f"--{prefix}{name.replace('_', '-')}"
            value = dry_run.flag_text(getattr(defaults[prefix], name))
            cases += [pytest.param(stage, flag, value, id=f"{stage}:{flag}")
                      for stage in ("clip", "base", "upsampler") if stage not in stages]
    return cases


def test_every_field_has_a_scope():
    """Every flag is classified: TrainConfig's fields (flag()) and the SUB_FLAGS of 03-06's configs."""
    for prefix, cls in (("", config.TrainConfig), *config.SUB_CONFIGS.items()):
        scope = config.SUB_SCOPE[prefix] if prefix else config.TRAIN_SCOPE
        rules = config.SUB_RULES[prefix] if prefix else config.TRAIN_RULES
        assert set(scope) == set(rules) <= {f.name for f in dataclasses.fields(cls)}, prefix
        assert all(set(stages) <= {"clip", "base", "upsampler"} and stages for stages, _ in scope.values())


@pytest.mark.parametrize("stage, flag, value", scope_cases())
def test_a_flag_outside_its_stage_is_refused(stage, flag, value):
    with pytest.raises(config.FlagError) as err:
        config.parse_flags(["--stage", stage, flag, value])
    assert str(err.value).startswith(f"{flag} does nothing with --stage {stage}: "), err.value


@pytest.mark.parametrize("argv, hint", [
    (["--stage", "clip", "--g.channels", "32,32,32,16"], "--g.channels does nothing with --stage clip"),
    (["--stage", "clip", "--loss.r1-gamma", "1"], "--loss.r1-gamma does nothing with --stage clip"),
    (["--stage", "clip", "--max-steps", "5"], "--max-steps does nothing with --stage clip"),
    (["--stage", "clip", "--dry-run"], "--dry-run does nothing with --stage clip"),
    (["--stage", "clip", "--resume"], "--resume does nothing with --stage clip"),
    (["--stage", "upsampler", "--loss.vision-weight", "2"], "--loss.vision-weight does nothing with --stage upsampler"),
    (["--stage", "upsampler", "--vision-clip", "same"], "--vision-clip does nothing with --stage upsampler"),
    (["--lpips", "alex"], "--lpips does nothing with --stage base"),
    (["--full", "--preset", "tiny"], "--full is --preset full: drop one of --full and --preset tiny"),
    (["--preset", "small", "--clip-steps", "5"], "--clip-steps does nothing with --clip ViT-B-32/openai"),
    (["--preset", "full1024"], "--preset full1024 is an upsampler preset"),
])
def test_issue_flags_that_do_nothing_are_one_line_before_any_work(tmp_path, capsys, argv, hint):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(out), *argv])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    err = printed.err.strip().splitlines()
    assert len(err) == 1 and hint in err[0], err
    assert not out.exists() and "[clip] training" not in printed.out


def test_flags_of_their_stage_are_accepted():
    config.parse_flags(["--stage", "clip", "--clip-steps", "3", "--clip-tower", "vit", "--vision-clip", "same",
                        "--seed", "2", "--overwrite"])
    config.parse_flags(["--stage", "upsampler", "--u.channels", "64,64,48,32,16", "--loss.lpips-weight", "1", "--lpips", "alex"])
    config.parse_flags(["--loss.vision-weight", "1", "--d.multi-scale", "true", "--g.noise", "true", "--eval-fid"])
    config.parse_flags(["--preset", "small", "--clip", "tiny", "--clip-steps", "5"])   # a tiny CLIP: trained


# ----------------------------------------------------------------------------- issue 38's rows

def test_out_in_the_way_is_one_line_before_any_work(tmp_path, capsys):
    """--out under a file, or where nothing can be made (/proc), or in a read-only folder: one line
    that says what to do, exit status 2, nothing trained or written."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = [(f"{a_file}/sub", "is a file, not a folder"), ("/proc/x", "cannot write in /proc")]
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        cases.append((str(tmp_path / "ro" / "run"), "cannot write in"))
    for out, hint in cases:
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--out", out, "--max-steps", "2"])
        assert exit_info.value.code == 2
        printed = capsys.readouterr()
        err = printed.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("train.py: --out ") and hint in err[0], err
        assert "runs/NAME" in err[0] and "[clip] training" not in printed.out


def test_a_missing_data_folder_is_refused_by_the_dry_run_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", "/no/such/folder", "--dry-run"])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    err = printed.err.strip().splitlines()
    assert len(err) == 1 and "--data '/no/such/folder' does not exist" in err[0], err
    assert "launch:" not in printed.out


def test_max_steps_has_a_range_a_run_can_reach(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--max-steps", "99999999999999999999999"])
    assert exit_info.value.code == 2
    assert f"--max-steps must be in [1, {config.MAX_STEPS}]" in capsys.readouterr().err
    assert config.parse_flags(["--max-steps", str(config.MAX_STEPS)])[0].max_steps == config.MAX_STEPS


def test_eval_fid_offline_is_one_line_before_data_or_clip(tmp_path, capsys, monkeypatch):
    """--eval-fid with no Inception weights and no network: one line naming --eval-fid false, before
    the data set is read or a CLIP trained."""
    import metrics
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(metrics, "INCEPTION_URL", "https://weights.invalid/weights-inception-2015-12-05-6726825d.pth")
    monkeypatch.setattr(train.data, "build_dataset", lambda *a, **k: pytest.fail("data read before the weights check"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(tmp_path / "run"), "--max-steps", "1", "--eval-fid", "true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: Inception FID") and err[0].endswith("--eval-fid false"), err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- sample.py

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run (4 CLIP steps, 1 GAN step) for the checks that need a loaded G."""
    out = tmp_path_factory.mktemp("run")
    with small_clip_pool():
        train.main(["--out", str(out), "--clip-steps", "4", "--clip-batch-size", "16", "--max-steps", "1",
                    "--batch-size", "4", "--snapshot-every", "1000", "--eval-every", "0", "--ckpt-every", "1000"])
    return out


# Flags whose values are free text or checked against the loaded model: (argv, hint), by hand.
SAMPLE_TEXT = {
    "ckpt": [(["--ckpt", "TEXT", "--prompt", A], "is not a checkpoint of train.py"),
             (["--ckpt", "RUN/none", "--prompt", A], "no checkpoint at")],
    "upsampler": [(["--ckpt", "RUN", "--upsampler", "TEXT", "--prompt", A], "is not a checkpoint of train.py"),
                  (["--ckpt", "RUN", "--upsampler", "RUN", "--prompt", A], "not an upsampler run")],
    "prompt": [(["--ckpt", "RUN", "--prompt", " "], "empty --prompt")],
    "prompts": [(["--ckpt", "RUN", "--prompts", "RUN/none.txt"], "--prompts")],
    "out": [(["--ckpt", "RUN", "--prompt", A, "--out", "TEXT"], "is a file"),
            (["--ckpt", "RUN", "--prompt", A, "--out", "TEXT/sub"], "is a file, not a folder"),
            (["--ckpt", "RUN", "--eval", "--n", "2", "--out", "TEXT/sub"], "is a file, not a folder"),
            (["--ckpt", "RUN", "--prompt", A, "--out", "/proc/x"], "cannot write in /proc"),
            (["--ckpt", "RUN", "--prompt", A, "--out", "FOREIGN"], "no captions.jsonl of sample.py")],
    "grid": [(["--ckpt", "RUN", "--prompt", A, "--grid", "maybe"], "unrecognized arguments: maybe")],
    "beside_data": [(["--ckpt", "RUN", "--prompt", "a red circle", "--beside-data"], "all five attributes")],
    "eval": [(["--ckpt", "RUN", "--eval", "--prompt", A], "--eval uses the data set's captions")],
    "fid": [(["--ckpt", "RUN", "--prompt", A, "--fid"], "--fid is part of --eval")],
    "data": [(["--ckpt", "RUN", "--eval", "--n", "2", "--data", "RUN/none"], "--data")],
    "style_mix": [(["--ckpt", "RUN", "--prompt", A, "--style-mix", "99"], "choose a row of ws")],
    "prompt_mix": [(["--ckpt", "RUN", "--prompt", A, "--prompt", A, "--prompt-mix", "0"], "choose a row of ws")],
    "lowres": [(["--upsampler", "RUN", "--lowres", "RUN/none.png", "--prompt", A], "no such file")],
    "device": [(["--ckpt", "RUN", "--prompt", A, "--device", "tpu"], "unknown --device 'tpu'")],
    "truncation_target": [(["--ckpt", "RUN", "--prompt", A, "--truncation-target", "2"], "prompt, global, or a number")],
    "arithmetic": [(["--ckpt", "RUN", "--prompt", A, "--prompt", A, "--prompt", A, "--arithmetic", "u"], "invalid choice")],
    "analogies": [(["--ckpt", "RUN", "--analogies", "--prompt", A], "--analogies draws its own captions")],
    "figure": [(["--ckpt", "RUN", "--prompt", A, "--figure", "x.jpg"], "give a .png file name")],
    "seed": [(["--ckpt", "RUN", "--prompt", A, "--seed", "4294967295", "--n", "2"], "use --seed 4294967294 or less"),
             (["--ckpt", "RUN", "--prompt", A, "--seed", "4294967293", "--n", "2", "--style-mix"], "up to 4294967296")],
}


def sample_cases():
    kinds = {a.dest: a.type for a in sample.build_parser()._actions}
    cases = []
    for dest, rule in sample.SAMPLE_RULES.items():
        flag = "--" + dest.replace("_", "-")
        for value in generated(rule, kinds[dest]):
            cases.append(pytest.param(["--ckpt", "RUN", "--prompt", A, "--prompt", A, flag, value], flag,
                                      id=f"{flag}={value}"))
        cases += [pytest.param(argv, hint, id=f"{flag}:{hint}") for argv, hint in SAMPLE_TEXT.get(dest, [])]
    return cases


def test_every_sample_flag_has_a_bad_value():
    ids = {c.id.split("=")[0].split(":")[0] for c in sample_cases()}
    assert ids == {"--" + d.replace("_", "-") for d in sample.SAMPLE_RULES}


@pytest.mark.parametrize("argv, hint", sample_cases())
def test_sample_flag_bad_value(run_dir, tmp_path, capsys, argv, hint):
    text, foreign, out = tmp_path / "text.txt", tmp_path / "foreign", tmp_path / "out"
    text.write_text("hello\n")
    foreign.mkdir()
    (foreign / "00000.png").write_bytes(b"someone else's picture")
    swap = {"RUN": str(run_dir), "TEXT": str(text), "FOREIGN": str(foreign)}
    argv = [next((path + a[len(key):] for key, path in swap.items() if a == key or a.startswith(key + "/")), a)
            for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        sample.main([*argv, "--device", "cpu"] if "--device" not in argv else argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sample.py: ") and hint in err[0], err
    assert not out.exists()
    assert os.listdir(foreign) == ["00000.png"]                          # a folder it did not write: kept


@pytest.mark.parametrize("value", ["-1", "2", "nan"])
def test_noise_aug_message_quotes_no_training_default(run_dir, capsys, value):
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(run_dir), "--upsampler", str(run_dir), "--prompt", A, "--noise-aug", value])
    err = capsys.readouterr().err.strip()
    assert err == f"sample.py: --noise-aug must be in [0, 1], got {float(value)}", err


def test_huge_seed_is_one_line_not_an_overflow(run_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", str(run_dir), "--prompt", A, "--seed", "18446744073709551615"])
    assert exit_info.value.code == 2
    assert "--seed must be in [0, 4294967295]" in capsys.readouterr().err
