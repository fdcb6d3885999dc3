"""
make_student_copy.py - a copy of this repository for a course, with the exercise regions cut out.

    python make_student_copy.py --out student/                           # every numbered file and the loop
    python make_student_copy.py --out student/ 01_kernel_selection.py    # only 01's regions cut
    python make_student_copy.py --list                                   # the regions, and the tests grading each file

An exercise region is marked in a numbered file as nbgrader and otter-grader mark one, under a
one-line hint:

    # EXERCISE: selection weights softmax(W_filter^T w + b_filter) over the N kernels (Eq. 1)
    ### BEGIN SOLUTION
    logits = self.affine_select(w)
    return logits.softmax(dim=1)
    ### END SOLUTION

In the copy, the lines from BEGIN to END become `raise NotImplementedError("<the hint>")` at the
markers' indentation, and the hint stays above it. Everything else is copied unchanged (the files
git tracks or would track; outside a git checkout every file but runs/, caches and virtual
environments), so the copy imports and its tests run: the tests in GRADING_TESTS fail with the
hint until the student has written the region, and pass once it is right. tests/test_student_copy.py
is left out of the copy (it checks the solutions, which the copy no longer has).
Bad input (a file without regions, a malformed marker, a folder that is not empty) is one line on
stderr and exit status 2; nothing is written then.
"""
import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.abspath(__file__))
HINT = "# EXERCISE:"
BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"

# Which tests grade which file: each names the tests that run the file's regions (every region's
# hint shows up in at least one of them when the region is cut) and stay fast. Run them with
#     python -m pytest -q <the node ids>
GRADING_TESTS = {
    "00_clip.py": [
        "tests/test_clip.py::test_text_tower_matches_open_clip",
        "tests/test_clip.py::test_text_features_shapes_mask_and_eot",
        "tests/test_clip.py::test_contrastive_loss_with_hard_negatives_matches_explicit_formula",
        "tests/test_clip.py::test_demo_runs",
    ],
    "01_kernel_selection.py": [
        "tests/test_kernel_selection.py::test_selection_weights_softmax_and_depend_on_w",
        "tests/test_kernel_selection.py::test_modulated_conv2d_fused_equals_naive",
        "tests/test_kernel_selection.py::test_adaptive_conv_fused_equals_naive",
        "tests/test_kernel_selection.py::test_single_kernel_equals_independent_stylegan2",
        "tests/test_kernel_selection.py::test_demo_runs",
    ],
    "02_attention.py": [
        "tests/test_attention.py::test_l2_logits_equal_pairwise_distance",
        "tests/test_attention.py::test_self_attention_matches_loop_reference",
        "tests/test_attention.py::test_cross_attention_mask_and_widths",
        "tests/test_attention.py::test_all_masked_rows_give_zero_weights_not_nan",
        "tests/test_attention.py::test_demo_runs",
    ],
    "03_generator.py": [
        "tests/test_generator.py::test_truncation_identity_and_prompt_mean",
        "tests/test_generator.py::test_truncation_toward_a_blend_of_the_prompt_and_global_means",
        "tests/test_generator.py::test_style_mixing",
        "tests/test_generator.py::test_demo_runs",
    ],
    "04_discriminator.py": [
        "tests/test_discriminator.py::test_number_order_and_shapes_of_predictions",
        "tests/test_discriminator.py::test_late_entry_early_exit_by_autograd",
        "tests/test_discriminator.py::test_vision_aided_shapes_text_and_double_backward",
        "tests/test_discriminator.py::test_demo_runs",
    ],
    "05_losses.py": [
        "tests/test_losses.py::test_adversarial_losses_equal_the_logistic_formulas",
        "tests/test_losses.py::test_matching_loss_masks_rows_without_a_wrong_caption",
        "tests/test_losses.py::test_clip_loss_is_minimised_by_matching_embeddings",
        "tests/test_losses.py::test_clip_loss_counts_every_copy_of_a_duplicated_caption_as_positive",
        "tests/test_losses.py::test_r1_equals_the_analytic_value_for_a_linear_d",
        "tests/test_losses.py::test_demo_runs",
    ],
    "train.py": [  # a short run: the student's D step must give the pinned weights of 3 steps
        "tests/test_pinned_weights.py::test_a_few_steps_of_each_stage_give_the_pinned_weights",
    ],
    "06_upsampler.py": [
        "tests/test_upsampler.py::test_sharpness_drops_with_blur_and_is_zero_on_flat_images",
        "tests/test_upsampler.py::test_init_output_is_the_bicubic_upsampling_plus_a_small_residual",
        "tests/test_upsampler.py::test_demo_runs",
    ],
}
NOT_COPIED = ("tests/test_student_copy.py",)  # needs the solutions (the round trip)
SKIP_DIRS = {".git", "runs", "__pycache__", ".pytest_cache", ".venv", "venv", "env", "node_modules"}


class MarkerError(ValueError):
    """A malformed exercise region: printed as one line, exit status 2."""


@dataclass
class Region:
    hint: str     # the text after "# EXERCISE:"
    begin: int    # 0-based line index of "### BEGIN SOLUTION"
    end: int      # 0-based line index of "### END SOLUTION"
    indent: str   # the markers' indentation, which the raise takes


def find_regions(text, name="<text>"):
    """Every exercise region of a file's text, in order; MarkerError names the line of a bad one."""
    lines = text.splitlines()
    regions, begin = [], None
    for k, line in enumerate(lines):
        stripped = line.strip()
        if stripped == BEGIN:
            if begin is not None:
                raise MarkerError(f"{name}:{k + 1}: {BEGIN} inside the region opened at line {begin + 1}")
            above = lines[k - 1].strip() if k else ""
            if not above.startswith(HINT) or not above[len(HINT):].strip():
                raise MarkerError(f"{name}:{k + 1}: {BEGIN} needs a one-line hint right above it: {HINT} <what to write>")
            begin = k
        elif stripped == END:
            if begin is None:
                raise MarkerError(f"{name}:{k + 1}: {END} without a {BEGIN} before it")
            indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
            if line[: len(line) - len(line.lstrip())] != indent:
                raise MarkerError(f"{name}:{k + 1}: {END} is not indented as its {BEGIN} (line {begin + 1})")
            if k == begin + 1:
                raise MarkerError(f"{name}:{k + 1}: an empty region (nothing between the markers)")
            hint = lines[begin - 1].strip()[len(HINT):].strip()
            regions.append(Region(hint, begin, k, indent))
            begin = None
    if begin is not None:
        raise MarkerError(f"{name}:{begin + 1}: {BEGIN} is never closed by {END}")
    return regions


def strip_regions(text, name="<text>"):
    """The student's version of a file's text: each region -> raise NotImplementedError(hint)."""
    lines = text.splitlines(keepends=True)
    out, last = [], 0
    for r in find_regions(text, name):
        out += lines[last:r.begin]
        out.append(f"{r.indent}raise NotImplementedError({r.hint!r})\n")
        last = r.end + 1
    out += lines[last:]
    student = "".join(out)
    try:  # a region must be whole statements: the copy has to import
        compile(student, name, "exec")
    except SyntaxError as err:
        raise MarkerError(f"{name}:{err.lineno}: cutting the regions leaves invalid Python ({err.msg}): "
                          "a region must hold whole statements") from None
    return student


def numbered_files(root=ROOT):
    """The files with exercise regions: the concept files 00_*.py .. 99_*.py, sorted, then train.py
    (the loop's exercise: its D step)."""
    return sorted(f for f in os.listdir(root) if fnmatch.fnmatch(f, "[0-9][0-9]_*.py")) + ["train.py"]


def repository_files(root=ROOT):
    """Relative paths of the files a copy holds: git's tracked and not-ignored files in a checkout,
    else every file outside runs/, caches and virtual environments."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=root, capture_output=True, check=True).stdout.decode().split("\0")
        files = [f for f in listed if f and os.path.isfile(os.path.join(root, f))]
        if files:
            return sorted(files)
    except (OSError, subprocess.CalledProcessError):
        pass
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        files += [os.path.relpath(os.path.join(folder, n), root) for n in names if not n.endswith(".pyc")]
    return sorted(files)


def resolve_files(names, root=ROOT):
    """Command-line names (01_kernel_selection.py, ./01_kernel_selection.py, or just 01) -> file names."""
    available = numbered_files(root)
    chosen = []
    for name in names:
        base = os.path.basename(name)
        match = [f for f in available if f == base or f.split("_")[0] == base]
        if len(match) != 1:
            raise MarkerError(f"{name}: not a numbered file of this repository; choose from {', '.join(available)}")
        chosen.append(match[0])
    return chosen


def make_copy(out, files, root=ROOT):
    """Copy the repository to `out` (a new or empty folder), the regions of `files` cut out.
    -> {file: number of regions cut}. Checks every file before anything is written."""
    students = {}
    for f in files:
        with open(os.path.join(root, f)) as fh:
            text = fh.read()
        if not find_regions(text, f):
            raise MarkerError(f"{f} has no exercise regions ({BEGIN} ... {END}); "
                              f"files with some: {', '.join(g for g in numbered_files(root) if has_regions(g, root))}")
        students[f] = strip_regions(text, f)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise MarkerError(f"--out {out} exists and is not an empty folder: choose a new one (nothing is overwritten)")
    if os.path.abspath(out).startswith(os.path.abspath(root) + os.sep):
        top = os.path.relpath(os.path.abspath(out), root).split(os.sep)[0]
        if top not in SKIP_DIRS:  # a copy inside the checkout would be copied into itself next time
            raise MarkerError(f"--out {out} is inside the repository: choose a folder outside it (or under runs/)")
    for rel in repository_files(root):
        if rel in NOT_COPIED:
            continue
        dst = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst) or out, exist_ok=True)
        if rel in students:
            with open(dst, "w") as fh:
                fh.write(students[rel])
        else:
            shutil.copy2(os.path.join(root, rel), dst)
    return {f: len(find_regions(open(os.path.join(root, f)).read(), f)) for f in files}


def has_regions(f, root=ROOT):
    with open(os.path.join(root, f)) as fh:
        return bool(find_regions(fh.read(), f))


def grading_command(f):
    """The command that grades file f in a copy."""
    return "python -m pytest -q " + " ".join(GRADING_TESTS.get(f, []))


def print_list(root=ROOT):
    for f in numbered_files(root):
        with open(os.path.join(root, f)) as fh:
            regions = find_regions(fh.read(), f)
        print(f"{f}: {len(regions)} region(s)")
        for r in regions:
            print(f"  line {r.begin + 1}: {r.hint}")
        print(f"  graded by: {grading_command(f)}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="make_student_copy.py",
        description="Copy the repository for students, each exercise region of the chosen numbered files "
                    "replaced by raise NotImplementedError(<hint>).")
    parser.add_argument("files", nargs="*", help="numbered files whose regions are cut (default: all of them)")
    parser.add_argument("--out", help="a new or empty folder for the copy")
    parser.add_argument("--list", action="store_true", help="print every region's hint and the tests grading each file")
    args = parser.parse_args(argv)
    try:
        if args.list:
            return print_list()
        if not args.out:
            raise MarkerError("--out DIR is required: the folder the student copy is written to")
        files = resolve_files(args.files) if args.files else [f for f in numbered_files() if has_regions(f)]
        cut = make_copy(args.out, files)
    except MarkerError as err:
        print(f"make_student_copy.py: {err}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote a student copy to {args.out}: " + ", ".join(f"{f} ({n} region{'s' * (n != 1)})" for f, n in cut.items()))
    for f in cut:
        print(f"  grade {f}: cd {args.out} && {grading_command(f)}")
    return cut


if __name__ == "__main__":
    main()
