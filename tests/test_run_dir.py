"""A run directory belongs to one run (rundir.check_run_dir): train.py refuses, before any work, to
write into a folder that holds another run's checkpoint, CLIP or log, for every stage, unless
--resume continues that run or --overwrite deletes it; a folder with only a tiny CLIP is a cache
the GAN stages reuse; a resumed log holds each step once."""
import json
import os
import shutil

import pytest

import train
from conftest import FAST, UP_FAST, bad, log_rows, state


def files(out):
    """{name: bytes} of every file in a folder: to show that a refusal changed nothing."""
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def refused(argv, capsys):
    """train.main(argv) stops with one line, exit status 2, before any CLIP training. -> the line."""
    err = bad(train.main, argv, capsys, "train.py")
    assert "[clip] training" not in capsys.readouterr().out
    return err


def test_clip_stage_into_a_finished_run_is_refused(tiny_run, tmp_path, capsys):
    """The issue's row: `--stage clip --clip-steps 2 --out RUN` overwrote a finished run's clip.pt."""
    run = copy(tiny_run, tmp_path / "run")
    before = files(run)
    err = refused(["--stage", "clip", "--clip-steps", "2", "--out", str(run)], capsys)
    assert f"--out {run} holds a run (checkpoint.pt, clip.pt" in err and "--overwrite" in err, err
    assert files(run) == before
    # a folder with only a tiny CLIP of an earlier --stage clip: replacing it needs --overwrite too
    clip_only = tmp_path / "clip_only"
    clip_only.mkdir()
    shutil.copy(run / "clip.pt", clip_only / "clip.pt")
    assert "holds a run (clip.pt)" in refused(["--stage", "clip", "--out", str(clip_only)], capsys)


def test_base_stage_into_a_run_needs_resume_or_overwrite(tiny_run, tmp_path, capsys):
    """The issue's row: `--max-steps 20 --out RUN` without --resume replaced the checkpoint, and the
    next run appended to the old log."""
    run = copy(tiny_run, tmp_path / "run")
    before = files(run)
    err = refused(["--out", str(run), "--clip", f"tiny:{run / 'clip.pt'}", *FAST, "--max-steps", "20"], capsys)
    assert "holds a run (checkpoint.pt" in err and "add --resume to continue it" in err and "--overwrite" in err
    assert files(run) == before
    # the default --clip tiny (its cache in --out) is refused the same way
    assert "holds a run" in refused(["--out", str(run), "--max-steps", "20"], capsys)


def test_upsampler_stage_into_a_run_needs_resume_or_overwrite(tiny_run, tiny_upsampler, tmp_path, capsys):
    up = copy(tiny_upsampler, tmp_path / "up")
    before = files(up)
    clip = f"tiny:{tiny_run / 'clip.pt'}"
    err = refused(["--out", str(up), "--clip", clip, *UP_FAST, "--max-steps", "3"], capsys)
    assert "holds a run (checkpoint.pt" in err and "add --resume" in err
    assert files(up) == before
    # nor into the base run whose CLIP it reads
    run = copy(tiny_run, tmp_path / "run")
    before = files(run)
    assert "holds a run" in refused(["--out", str(run), "--clip", f"tiny:{run / 'clip.pt'}", *UP_FAST], capsys)
    assert files(run) == before


def test_overwrite_deletes_the_earlier_run(tiny_run, tiny_clip, tmp_path, capsys):
    """--overwrite: the earlier run's checkpoint, log, snapshots and (here unused) CLIPs go before the
    new run writes; the log then holds the new run only. It does not combine with --resume."""
    run = copy(tiny_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    argv = ["--out", str(run), "--clip", tiny_clip, *FAST, "--max-steps", "1", "--overwrite"]
    assert "give one of them" in refused([*argv, "--resume"], capsys)
    train.main(argv)
    printed = capsys.readouterr().out
    assert f"--overwrite: deleted the earlier run's" in printed and str(run) in printed
    assert [r["step"] for r in log_rows(run)] == [1] and state(run)["step"] == 1
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "log.jsonl", "losses.png",
                                                     "notes.txt", "samples_000001.png", "samples_prompts.txt"]
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 1


def test_a_folder_with_only_a_tiny_clip_is_a_cache_and_resume_starts_at_step_0(tiny_run, tmp_path, capsys):
    """A run stopped before its first checkpoint (its CLIP trained, maybe config.json and a log
    written): a plain run there is refused (it has a log), --resume starts it at step 0 with its
    CLIP, and the log keeps no row of the stopped attempt."""
    out = tmp_path / "stopped"
    out.mkdir()
    for name in ("clip.pt", "vision_clip.pt", "config.json"):
        shutil.copy(tiny_run / name, out / name)
    (out / "log.jsonl").write_text(json.dumps({"kind": "train", "step": 7, "img_s": 1.0}) + "\n")
    argv = ["--out", str(out), "--clip", f"tiny:{out / 'clip.pt'}", *FAST, "--max-steps", "1"]
    assert "holds a run (config.json, log.jsonl)" in refused(argv, capsys)
    train.main([*argv, "--resume"])
    assert "starts at step 0" in capsys.readouterr().out
    assert [r["step"] for r in log_rows(out)] == [1] and state(out)["step"] == 1
    # --resume of another preset's stopped attempt: one line
    os.remove(out / "checkpoint.pt")
    assert "holds a 'tiny' preset run, not a 'small' one" in refused([*argv, "--resume", "--preset", "small",
                                                                        "--clip", "ViT-B-32/none"], capsys)


def test_resume_drops_log_rows_past_the_checkpoint(tiny_run, tmp_path, capsys):
    """A run killed after its last checkpoint logged steps it trains again on --resume: their rows go."""
    run = copy(tiny_run, tmp_path / "run")
    with open(run / "log.jsonl", "a") as f:
        for step in (3, 4):
            f.write(json.dumps({"kind": "train", "step": step, "img_s": 1.0}) + "\n")
    train.main(["--out", str(run), "--clip", f"tiny:{run / 'clip.pt'}", *FAST, "--max-steps", "3", "--resume"])
    assert [r["step"] for r in log_rows(run)] == [1, 2, 3]


def test_resume_of_another_stage_names_it_in_good_grammar(tiny_run, tmp_path, capsys):
    """"not a upsampler-stage one" read wrong: the article follows the word."""
    run = copy(tiny_run, tmp_path / "run")
    err = refused(["--out", str(run), "--clip", f"tiny:{run / 'clip.pt'}", *UP_FAST, "--max-steps", "3",
                   "--resume"], capsys)
    assert "is a base-stage run, not an upsampler-stage one: resume it with --stage base" in err, err
