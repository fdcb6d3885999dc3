"""make_student_copy.py: the exercise regions of the numbered files, cut out into a student copy.

The round trip, for every numbered file: in a copy with that file's regions cut, the tests that
grade it (make_student_copy.GRADING_TESTS) fail, each with NotImplementedError and the hint of one
of its regions, and every region's hint shows up; in a plain copy the same tests pass. Each copy
runs its few named tests in a subprocess (a fresh import of the copy's modules, about 4 s of CPU,
mostly importing torch), all of them started at once, as many at a time as there are cores.
"""
import concurrent.futures
import os
import subprocess
import sys

import pytest

import make_student_copy as msc

ROOT = msc.ROOT


def run_tests(folder, node_ids, stop_first=False):
    """pytest on node ids in `folder` (a copy), in a subprocess; -> (exit status, output)."""
    env = dict(os.environ, COLUMNS="400", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=line"]
    cmd += (["-x"] if stop_first else []) + node_ids
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env=env, timeout=600)
    return done.returncode, done.stdout + done.stderr


# ---------------------------------------------------------------------------- the markers


SAMPLE = """def f(x):
    y = 1
    # EXERCISE: double x "twice" (Eq. 0)
    ### BEGIN SOLUTION
    z = 2 * x
    return z + y
    ### END SOLUTION


class A:
    def g(self):
        if True:
            # EXERCISE: return seven
            ### BEGIN SOLUTION
            return 7
            ### END SOLUTION
        return 0
"""


def test_strip_regions_replaces_each_region_by_a_raise_with_its_hint_at_its_indentation():
    student = msc.strip_regions(SAMPLE)
    assert student == """def f(x):
    y = 1
    # EXERCISE: double x "twice" (Eq. 0)
    raise NotImplementedError('double x "twice" (Eq. 0)')


class A:
    def g(self):
        if True:
            # EXERCISE: return seven
            raise NotImplementedError('return seven')
        return 0
"""
    scope = {}
    exec(compile(student, "student", "exec"), scope)
    with pytest.raises(NotImplementedError, match="twice"):
        scope["f"](3)
    with pytest.raises(NotImplementedError, match="return seven"):
        scope["A"]().g()
    solution = {}
    exec(compile(SAMPLE, "solution", "exec"), solution)
    assert solution["f"](3) == 7 and solution["A"]().g() == 7


@pytest.mark.parametrize("text,message", [
    ("x = 1\n### BEGIN SOLUTION\ny = 2\n### END SOLUTION\n", "hint right above"),
    ("# EXERCISE:\n### BEGIN SOLUTION\ny = 2\n### END SOLUTION\n", "hint right above"),
    ("# EXERCISE: a\n### BEGIN SOLUTION\ny = 2\n", "never closed"),
    ("y = 2\n### END SOLUTION\n", "without a"),
    ("# EXERCISE: a\n### BEGIN SOLUTION\n### END SOLUTION\n", "empty region"),
    ("def f():\n    # EXERCISE: a\n    ### BEGIN SOLUTION\n    y = 2\n### END SOLUTION\n", "not indented"),
    ("# EXERCISE: a\n### BEGIN SOLUTION\n# EXERCISE: b\n### BEGIN SOLUTION\n", "inside the region"),
    ("# EXERCISE: a\n### BEGIN SOLUTION\nfor i in range(3):\n### END SOLUTION\n    y = i\n", "invalid Python"),
])
def test_malformed_markers_are_one_clear_error(text, message):
    with pytest.raises(msc.MarkerError, match=message):
        msc.strip_regions(text, "f.py")


def test_every_numbered_file_has_regions_and_tests_that_grade_it():
    files = msc.numbered_files()
    assert files[:7] == ["00_clip.py", "01_kernel_selection.py", "02_attention.py", "03_generator.py",
                         "04_discriminator.py", "05_losses.py", "06_upsampler.py"]
    for f in files:
        with open(os.path.join(ROOT, f)) as fh:
            regions = msc.find_regions(fh.read(), f)
        assert regions, f"{f} has no exercise region"
        assert len({r.hint for r in regions}) == len(regions), f"{f}: two regions share a hint"
        assert msc.GRADING_TESTS.get(f), f"{f} has no grading tests in make_student_copy.GRADING_TESTS"
        for node in msc.GRADING_TESTS[f]:  # each node id names a test that exists
            path, name = node.split("::")
            with open(os.path.join(ROOT, path)) as fh:
                assert f"def {name}(" in fh.read(), f"{node} does not exist"


def test_bad_command_lines_are_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("data")
    for argv, message in [(["--out", str(tmp_path / "full")], "not an empty folder"),
                          (["--out", str(tmp_path / "a"), "07_nothing.py"], "not a numbered file"),
                          (["01"], "--out DIR is required"),
                          (["--out", os.path.join(ROOT, "student")], "inside the repository")]:
        with pytest.raises(SystemExit) as exit_info:
            msc.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (tmp_path / "full" / "keep.txt").read_text() == "data"  # nothing overwritten
    assert not (tmp_path / "a").exists() and not os.path.exists(os.path.join(ROOT, "student"))


# ---------------------------------------------------------------------------- the round trip


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """Every copy of the round trip, made now, its tests started in parallel subprocesses:
    {file name: (copy folder, cut regions, future of (status, output))}, and None: the plain copy."""
    base = tmp_path_factory.mktemp("copies")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    runs = {}
    for name in [None] + sorted(msc.GRADING_TESTS):
        out = base / (name or "full").replace(".py", "")
        cut = msc.make_copy(str(out), [name] if name else [])
        if name is None:  # the solutions: every file's grading tests in one process, first failure stops it
            nodes, stop_first = [node for tests in msc.GRADING_TESTS.values() for node in tests], True
        else:
            nodes, stop_first = msc.GRADING_TESTS[name], False
        runs[name] = (out, cut, pool.submit(run_tests, out, nodes, stop_first))
    yield runs
    pool.shutdown(wait=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(msc.GRADING_TESTS))
def test_student_copy_fails_its_grading_tests_with_the_hints(name, round_trips):
    out, cut, future = round_trips[name]
    assert cut == {name: len(msc.find_regions(open(os.path.join(ROOT, name)).read()))}
    assert "raise NotImplementedError(" in (out / name).read_text()
    assert not (out / "tests" / "test_student_copy.py").exists()
    for other in msc.numbered_files():  # every other file is copied unchanged
        if other != name:
            assert (out / other).read_text() == open(os.path.join(ROOT, other)).read()
    # its grading tests import their modules and run (pytest's status 1: tests failed, not 2-4: an
    # import, collection or usage error), every failure a NotImplementedError with a hint of this file
    status, output = future.result()
    assert status == 1, output[-3000:]
    hints = [r.hint for r in msc.find_regions(open(os.path.join(ROOT, name)).read())]
    failures = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    assert failures, output[-3000:]
    for line in failures:
        assert "NotImplementedError" in line and any(h in line for h in hints), line
    for hint in hints:  # and every region is graded by at least one of them
        assert hint in output, f"no grading test of {name} reaches the region {hint!r}"


@pytest.mark.slow
def test_full_copy_passes_every_grading_test(round_trips):
    out, cut, future = round_trips[None]
    assert cut == {} and (out / "tests" / "conftest.py").exists()
    status, output = future.result()
    assert status == 0, output[-3000:]


def cut_one_region(text, k, name="<text>"):
    """A file's text with only its k-th exercise region cut (as strip_regions cuts each)."""
    lines = text.splitlines(keepends=True)
    r = msc.find_regions(text, name)[k]
    return "".join(lines[:r.begin] + [f"{r.indent}raise NotImplementedError({r.hint!r})\n"] + lines[r.end + 1:])


KERNELS = "01_kernel_selection.py"
KERNEL_HINTS = [r.hint for r in msc.find_regions(open(os.path.join(ROOT, KERNELS)).read())]


@pytest.mark.parametrize("k", range(len(KERNEL_HINTS)), ids=lambda k: f"region{k}")
def test_train_in_a_student_copy_blames_each_unwritten_exercise_of_01(k, tmp_path):
    """`python train.py --max-steps 2` in a copy with one of 01's regions cut: its
    NotImplementedError and hint, not "bad generator configuration" (train.py builds G on the meta
    device first), and no run directory written. So every region of 01 is code that training runs
    (the fused modulated conv, not only the naive reference that the tests compare it with)."""
    out = tmp_path / "copy"
    msc.make_copy(str(out), [])
    (out / KERNELS).write_text(cut_one_region(open(os.path.join(ROOT, KERNELS)).read(), k, KERNELS))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    try:  # the failure comes in seconds, from G's meta-device forward; a region off the path trains on
        done = subprocess.run([sys.executable, "train.py", "--max-steps", "2", "--out", "runs/x"], cwd=out,
                              capture_output=True, text=True, env=env, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"train.py ran 5 minutes without reaching the region {KERNEL_HINTS[k]!r}: not on the path G trains on?")
    assert done.returncode != 0 and "bad generator configuration" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"NotImplementedError: {KERNEL_HINTS[k]}", done.stderr[-2000:]
    assert not (out / "runs").exists()
