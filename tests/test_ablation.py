"""ablation.py: the Table 1 study at toy scale. The rows' flags, the report arithmetic, bad input,
and a smoke run of two rows for a few steps (train, skip, resume). Its seed spread is
metrics.seed_spread (tests/test_metrics.py)."""
import dataclasses
import json
import os

import numpy as np
import pytest

import ablation
import data


# ---------------------------------------------------------------------------- report


def test_spread_mean_is_the_mean_of_the_three_ratios_and_none_when_nothing_counted():
    scores = {"spread_x": 0.5, "spread_y": 1.0, "spread_size": 1.5, "spread_captions": 3}
    assert ablation.spread_mean(scores) == pytest.approx(1.0)
    assert ablation.spread_mean({**scores, "spread_captions": 0}) is None   # not a collapse: not measured
    assert ablation.summarise([None, 0.4]) == (0.4, 0.0)                     # a seed without it is left out


def test_summarise_and_table_give_mean_and_half_range_over_seeds(tmp_path):
    assert ablation.summarise([0.5, 0.7]) == pytest.approx((0.6, 0.1))
    assert ablation.summarise([0.5]) == (0.5, 0.0)
    keys = [k for k, _, _ in ablation.COLUMNS]
    found = {"all on": [dict.fromkeys(keys, 0.5), dict.fromkeys(keys, 0.7)],
             "no CLIP loss": [dict.fromkeys(keys, 0.25)]}
    table = ablation.markdown_table(found, steps=100, seeds=2)
    lines = [line for line in table.splitlines() if line.startswith("| all on") or line.startswith("| no CLIP")]
    assert lines[0].count("0.60 +- 0.10") == 7                         # 5 attributes, their mean, the seed spread
    assert "0.600 +- 0.100" in lines[0] and "(1 of 2 seeds)" in lines[1]
    assert ablation.PAPER["no CLIP loss"] in lines[1]
    ablation.bar_chart(found, str(tmp_path / "chart.png"))
    assert (tmp_path / "chart.png").stat().st_size > 10_000


def test_every_row_has_flags_train_accepts_and_a_paper_line():
    assert list(ablation.ROWS)[0] == "all on" and ablation.ROWS["all on"] == []
    assert set(ablation.PAPER) == set(ablation.ROWS)
    assert len({ablation.slug(r) for r in ablation.ROWS}) == len(ablation.ROWS)
    base = ablation.train_configs([])
    for row, flags in ablation.ROWS.items():
        configs = ablation.train_configs(flags, row)                       # train.py accepts the flags
        changed = [a for a, b in zip(configs, base) if a != b]
        assert (len(changed) > 0) == (row != "all on"), row                # and each row changes the run


def test_matching_row_is_the_papers_row_without_the_matching_aware_loss():
    losses = pytest.importorskip("conftest").load("05_losses")
    base = ablation.train_configs([])[3]                                   # (cfg, g, d, loss)
    row = ablation.train_configs(ablation.ROWS["no matching-aware loss"])[3]
    assert base.match_d and base.match_fake and base.match_g              # "all on" has every term
    assert row.table1_matching == "off" and losses.MATCHING["off"] == (False, False, False)
    assert dataclasses.replace(row, table1_matching=base.table1_matching) == base  # nothing else changed


@pytest.mark.parametrize("argv,message", [
    (["--only", "no such row"], "unknown row"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--", "--seed", "3"], "ablation.py sets it"),
    (["--", "--g.no_such_field", "1"], "unknown flag"),
    (["--clip", "/no/such/clip.pt"], "no such file"),
    (["--nonsense"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(["--out", str(tmp_path / "study"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "study" / "clip").exists()                   # nothing was trained


def test_report_without_runs_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablation.main(["--out", str(tmp_path), "--report"])
    assert "no finished run" in capsys.readouterr().err


# ---------------------------------------------------------------------------- a smoke run

SMOKE = ["--seeds", "1", "--only", "all on", "no-clip-loss", "--eval-images", "8", "--",
         "--batch-size", "4", "--log-every", "1", "--eval-every", "0", "--snapshot-every", "100", "--ckpt-every", "100"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP of 2 steps on 64 shapes images (the study's own, <out>/clip, renders 8192)."""
    clip_lib = pytest.importorskip("conftest").load("00_clip")
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    clip_lib.train_tiny_clip(data.ShapesDataset(32), str(path), steps=2, batch_size=8, pool_size=64, vision="resnet")
    return str(path)


@pytest.mark.slow
def test_smoke_study_trains_skips_finished_runs_and_resumes(tmp_path, capsys, monkeypatch, tiny_clip):
    out = tmp_path / "study"
    calls = []
    real_main = ablation.train.main
    monkeypatch.setattr(ablation.train, "main", lambda argv: (calls.append(argv), real_main(argv))[1])
    found = ablation.main(["--steps", "2", "--out", str(out), "--clip", tiny_clip, *SMOKE])
    assert [c[c.index("--out") + 1] for c in calls] == [str(out / "all-on" / "seed0"),
                                                       str(out / "no-clip-loss" / "seed0")]
    assert "--resume" not in calls[0] and calls[1][-2:] == ["--ckpt-every", "100"]
    assert calls[1][calls[1].index("--loss.clip_weight") + 1] == "0" and "--loss.clip_weight" not in calls[0]
    assert calls[0][calls[0].index("--clip") + 1] == "tiny:" + tiny_clip
    assert set(found) == {"all on", "no CLIP loss"}
    for row in ("all-on", "no-clip-loss"):
        result = json.load(open(out / row / "seed0" / "result.json"))
        assert result["step"] == 2 and 0 <= result["align_shape"] <= 1 and result["img_s"] > 0
        assert result["minutes"] > 0 and np.isfinite(result["clip_fd"])
        assert {"spread_x", "spread_y", "spread_size", "spread_captions"} <= set(result)  # sample.evaluate's
        spreads = [result[f"spread_{k}"] for k in ("x", "y", "size")]
        assert (result["spread_mean"] is None if result["spread_captions"] == 0
                else result["spread_mean"] == pytest.approx(sum(spreads) / 3))
    table = (out / "ablation.md").read_text()
    assert "| all on |" in table and "| no CLIP loss |" in table and (out / "ablation.png").exists()
    # the same command again: nothing is trained
    calls.clear()
    stamp = os.path.getmtime(out / "all-on" / "seed0" / "checkpoint.pt")
    ablation.main(["--steps", "2", "--out", str(out), "--clip", tiny_clip, *SMOKE])
    assert calls == [] and os.path.getmtime(out / "all-on" / "seed0" / "checkpoint.pt") == stamp
    assert "result.json kept" in capsys.readouterr().out
    # more steps: each run goes on from its checkpoint
    ablation.main(["--steps", "3", "--out", str(out), "--clip", tiny_clip, *SMOKE])
    assert len(calls) == 2 and all("--resume" in c for c in calls)
    assert json.load(open(out / "all-on" / "seed0" / "result.json"))["step"] == 3
    steps = [json.loads(line)["step"] for line in open(out / "all-on" / "seed0" / "log.jsonl")
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3]
    # --report trains nothing and rewrites the table of what has run at these steps
    calls.clear()
    (out / "ablation.md").unlink()
    assert set(ablation.main(["--steps", "3", "--out", str(out), "--report", *SMOKE])) == {"all on", "no CLIP loss"}
    assert calls == [] and (out / "ablation.md").exists()
