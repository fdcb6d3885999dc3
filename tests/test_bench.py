"""bench.py: a --quick run writes every figure (no speed thresholds: figures, not assertions),
its flags are checked, and the peer's figures are read and turned into ratios."""
import json
import sys

import pytest

import bench
from conftest import small_clip_pool


def small_peak(monkeypatch):
    """The peak's matmuls at n 256, not 1,024: a CPU without bfloat16 units emulates that product,
    about 9 s for four 1,024^3 ones. The figure is checked for being there, not for its size."""
    real = bench.matmul_gflops
    monkeypatch.setattr(bench, "matmul_gflops", lambda n, dtype, repeats: real(min(n, 256), dtype, repeats))


@pytest.mark.slow
def test_quick_run_writes_every_figure(tmp_path, capsys, monkeypatch):
    small_peak(monkeypatch)
    path = tmp_path / "bench.json"
    with small_clip_pool():                     # its tiny CLIP: 2 steps, whose cost is all that counts
        bench.main(["--quick", "--threads", "1", "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["peak"]["float32_gflops"] > 0 and result["peak"]["bfloat16_gflops"] > 0
    rows = {(r["config"], r["terms"], r["dtype"]): r for r in result["train"]}
    assert set(rows) == {("tiny", t, d) for t in bench.TERMS for d in bench.DTYPES}
    for r in rows.values():
        for key in ("flops_per_step", "step_s", "img_s", "utilisation"):
            assert r[key] > 0, (key, r)
        assert r["batch"] == 16 and r["img_s"] == pytest.approx(r["batch"] / r["step_s"])
    # the CLIP and vision-aided terms add frozen-CLIP image passes to the same G and D work
    # (bench counts a step's FLOPs once per terms: they depend on the shapes, not the dtype)
    assert rows[("tiny", "all", "float32")]["flops_per_step"] > rows[("tiny", "no_clip", "float32")]["flops_per_step"]
    assert [r["batch"] for r in result["sample"]] == [1, 4]
    for r in result["sample"]:
        assert r["g_s_per_img"] > 0 and r["end_to_end_s_per_img"] > 0 and r["one_prompt_s_per_img"] > 0
    for key in ("data_img_s", "upsampler_tiny_fwd_bwd_s", "clip_missing_weights_s", "lpips_missing_weights_s"):
        assert result["checks"][key] > 0
    out = capsys.readouterr().out
    assert "GFLOP/step" in out and "% of the float32 peak" in out and "end to end" in out


@pytest.mark.parametrize("argv, message", [
    (["--peer", sys.executable], "--peer and --peer-script go together"),
    (["--peer", sys.executable, "--peer-script", "/no/such/file.py"], "no such file"),
    (["--configs", "huge"], "choose from tiny, bench"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        bench.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


FAKE_PEER = '''
import json, sys
size, threads = sys.argv[1], sys.argv[2]
texts = ["a caption"] * 8
calls = []
def G(texts, batch_size):
    assert len(texts) == batch_size
    calls.append(batch_size)
print(json.dumps(dict(size=int(size), threads=int(threads), train_img_per_s=4.0, sample_s_per_img=0.08)))
'''


def test_sample_only_times_sampling_and_no_training(capsys, monkeypatch):
    small_peak(monkeypatch)
    with small_clip_pool():
        result = bench.main(["--quick", "--threads", "1", "--sample-only", "--no-checks"])
    assert result["train"] == [] and [r["batch"] for r in result["sample"]] == [1, 4]
    assert all(r["g_s_per_img"] > 0 and r["one_prompt_s_per_img"] > 0 for r in result["sample"])
    assert "train  tiny" not in capsys.readouterr().out


def test_peer_script_runs_in_its_python_and_gives_ratios(tmp_path):
    script = tmp_path / "peer.py"
    script.write_text(FAKE_PEER)
    peer = bench.run_peer(sys.executable, str(script), threads=1, batch=32)
    assert peer["size"] == 32 and peer["threads"] == 1 and peer["sample_batch"] == 32
    assert peer["train_img_per_s"] == 4.0 and peer["batched_sample_s_per_img"] >= 0
    peers = [peer, dict(peer, train_img_per_s=6.0, sample_s_per_img=0.12, batched_sample_s_per_img=0.02)]
    train_rows = [dict(config="bench", terms="no_clip", dtype="float32", img_s=10.0),
                  dict(config="tiny", terms="no_clip", dtype="float32", img_s=99.0)]      # not the peer's size
    sample_rows = [dict(config="bench", batch=1, g_s_per_img=0.01, end_to_end_s_per_img=0.02),
                   dict(config="bench", batch=32, g_s_per_img=0.001, end_to_end_s_per_img=0.004,
                        one_prompt_s_per_img=0.002)]
    ratios = bench.peer_ratios(peers, train_rows, sample_rows)
    assert ratios["train_img_s_no_clip_float32"] == pytest.approx(10.0 / 5.0)  # the mean of before and after
    assert ratios["sample_s_per_img_batch1"] == pytest.approx(0.02 / 0.10)
    assert ratios["sample_G_s_per_img_batch1"] == pytest.approx(0.01 / 0.10)
    batched = (peer["batched_sample_s_per_img"] + 0.02) / 2
    assert ratios["sample_s_per_img_batch32"] == pytest.approx(0.004 / batched)
    assert ratios["sample_one_prompt_s_per_img_batch32"] == pytest.approx(0.002 / batched)
    assert len(ratios) == 6


def test_a_failing_peer_is_one_line(tmp_path):
    script = tmp_path / "peer.py"
    script.write_text("raise ImportError('no module named gigagan_pytorch')\n")
    with pytest.raises(SystemExit, match="the peer failed.*gigagan_pytorch"):
        bench.run_peer(sys.executable, str(script), threads=1, batch=2)


# ----------------------------------------------------------------------------- bench.py --gpu (gpu_check.py)

@pytest.mark.slow
def test_gpu_check_quick_on_cpu_writes_every_row_and_survives_a_failing_row(tmp_path):
    """The GPU day's command, at tiny sizes on the CPU (`--quick --device cpu`), through bench.py's
    own command line: every row is in the table and the JSON, every figure is finite, and a row
    forced to fail (--fail-row) records its one-line error while the rows after it still run."""
    import math
    import os
    import subprocess

    import gpu_check
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "bench.py", "--gpu", "--quick", "--device", "cpu", "--out", str(out),
                           "--fail-row", "full_step"], cwd=os.path.dirname(os.path.dirname(__file__)),
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == gpu_check.ROWS
    assert rows["full_step"]["status"] == "failed" and "forced to fail by --fail-row" in rows["full_step"]["error"]
    for name, r in rows.items():
        if name == "peer" and r["status"] == "skipped":            # its wheels are optional
            assert r["error"].startswith("not installed")
            continue
        if name != "full_step":
            assert r["status"] == "ok", (name, r["error"])
        for key, value in r["figures"].items():
            if isinstance(value, float):
                assert math.isfinite(value) and value >= 0 or key == "error_pct", (name, key, value)
    assert rows["tests"]["figures"]["passed"] >= 5 and rows["tests"]["figures"]["failed"] == 0
    assert rows["small_train"]["figures"]["img_s"] > 0 and rows["small_train"]["figures"]["estimate_gib"] > 0
    for name in ("sample_64", "sample_64_compile"):
        assert rows[name]["figures"]["s_per_img_b1"] > 0 and rows[name]["figures"]["s_per_img_b2"] > 0
    assert rows["chain_compile"]["figures"]["s_per_img_b2"] > 0 and rows["chain"]["figures"]["out_px"] == 128
    table = (out / "gpu_check.md").read_text()
    assert table.startswith(f"# GPU check, {result['date']}")
    for name in gpu_check.ROWS:
        assert f"| {name} | {rows[name]['status']} |" in table
    assert "RuntimeError: forced to fail by --fail-row" in table


def test_gpu_check_flags_exit_2_with_one_line(capsys):
    import gpu_check
    for argv, message in ([["--out", "x", "--rows", "huge"], "unknown row huge"],
                          [["--out", "x", "--fail-row", "nope"], "unknown row nope"]):
        with pytest.raises(SystemExit) as info:
            gpu_check.parse_args(argv + ["--device", "cpu"])
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_gpu_check_installs_only_what_is_missing(tmp_path):
    """install_wheels asks pip for nothing when every module imports, and names the folder to
    rebuild when a module is missing and its wheels are not there."""
    import gpu_check
    assert gpu_check.install_wheels(str(tmp_path / "none"), [("pytest", "pytest")]) == ([], ["pytest"])
    with pytest.raises(FileNotFoundError, match="bench.py's docstring"):
        gpu_check.install_wheels(str(tmp_path / "none"), [("no-such-dist", "no_such_module_here")])


@pytest.mark.parametrize("limit, start, expected", [(37, 22, (35, 37)), (5, 22, (5, 5)), (1000, 4, (938, 1000))])
def test_gpu_check_batch_search_finds_the_limit_within_a_sixteenth(limit, start, expected):
    """full_step's search: doubling, then bisecting between the largest batch that ran and the
    smallest that ran out of memory (here a fake limit), stops within 1/16 below the limit."""
    import gpu_check
    figures, tried = {}, []
    b = gpu_check.largest_batch(lambda b: tried.append(b) or b <= limit, start, 1 << 16, 60, figures)
    assert expected[0] <= b <= expected[1] and b <= limit, (b, tried)
    assert figures["batch_gpu"] == b and figures["trials"] == len(tried) <= 14
    assert gpu_check.largest_batch(lambda b: True, 2, 8, 60, {}) == 8         # a ceiling (the --quick mode's)
    assert gpu_check.largest_batch(lambda b: False, 4, 8, 60, {}) == 0        # nothing fits
