"""
ablation.py - the paper's Table 1 at toy scale: the tiny GigaGAN on `shapes`, once with every
component on and once with each Table 1 component off, over several seeds.

    python ablation.py --steps 1500 --seeds 2                       # 8 rows x 2 seeds (16 runs of train.py)
    python ablation.py --steps 1500 --seeds 2 --only "no CLIP loss" "all on"   # some rows
    python ablation.py --steps 1500 --seeds 2 --report              # only the table and chart of what has run
    python ablation.py --steps 1500 --seeds 2 -- --device cuda      # after --: flags for every train.py run

Every run is a train.py run directory, <out>/<row>/seed<k>, trained by train.main(argv) with the
row's flags (ROWS below), --seed k, --max-steps --steps and no time budget (--max-minutes 0), so
the rows differ only by the component. They share one tiny CLIP (<out>/clip/clip.pt, trained
first unless --clip names one): its features condition G, it scores every row, and a CLIP per
row would add its own noise. The study resumes: a finished run is skipped, a run with a
checkpoint short of --steps goes on with --resume, so after a Ctrl-C (train.py saves the step
it is in) the same command picks up where it stopped.

Per run, measured on G_ema at its last step (result.json in its directory):
  - accuracy of each shapes attribute (and their mean): sample.evaluate on --eval-images real
    captions, judged from pixels by metrics.judge_shapes_image;
  - CLIP score and the CLIP-feature Frechet distance to real images (sample.evaluate);
  - seed spread: how much the images of one caption vary with z, relative to real images of
    that caption: sample.evaluate's spread_x, spread_y, spread_size (metrics.seed_spread on
    sample.SPREAD_Z z of each of the first sample.SPREAD_CAPTIONS evaluation captions, as
    sample.py --eval and train.py's eval lines report it) and their mean, spread_mean (1 = as
    varied as the data, 0 = one image per caption; None when no caption had 3 right shapes);
  - img/s: train.py's logged training throughput, minutes: wall time of its train.py calls.
Per row, ablation.md holds mean +- spread over the seeds (spread = half the range: with two
seeds, each seed is at mean +- spread; a difference inside it is not a finding) next to the
paper's Table 1 numbers for the component, and ablation.png a bar chart of the same.

Bad input (an unknown row, a bad train.py flag) is one line on stderr and exit status 2.
"""
import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch

import data
import sample
import train

# -----------------------------------------------------------------------------
# The rows: name -> the train.py flags that turn the component off. Table 1 (FID-10k / CLIP score
# at 64 px) adds components one by one; PAPER says what adding this one did there.

ROWS = {
    "all on": [],
    "no self-attention": ["--g.self_attention", "false"],
    "no cross-attention": ["--g.cross_attention", "false"],
    "no kernel bank (N = 1)": ["--g.n_kernels", "1,1,1,1"],  # one entry per G scale (4 at 32 px)
    # Table 1's rows before "+matching-aware D" (05_losses.MATCHING["off"]): no mismatched pair for
    # D, real or generated, and none of the project's G-side term
    "no matching-aware loss": ["--loss.table1-matching", "off"],
    "no CLIP loss": ["--loss.clip_weight", "0"],
    "no multi-scale D (MS-I/O)": ["--d.multi_scale", "false"],
    "no vision-aided D": ["--loss.vision_weight", "0"],
}
PAPER = {
    "all on": "64 px model: FID 13.67, CLIP 0.287 (scaled up: 9.18, 0.307)",
    "no self-attention": "+attention (self and cross): FID 29.91 -> 23.87, CLIP 0.222 -> 0.235",
    "no cross-attention": "+attention (self and cross): FID 29.91 -> 23.87, CLIP 0.222 -> 0.235",
    "no kernel bank (N = 1)": "+adaptive conv: FID 21.66 -> 19.97, CLIP 0.254 -> 0.261",
    "no matching-aware loss": "+matching-aware G and D: FID 23.87 -> 21.66, CLIP 0.235 -> 0.254 (D only: FID 27.29)",
    "no CLIP loss": "+CLIP loss: FID 19.18 -> 14.88, CLIP 0.263 -> 0.280",
    "no multi-scale D (MS-I/O)": "+multi-scale: FID 14.88 -> 14.92, CLIP 0.280 -> 0.300",
    "no vision-aided D": "+vision-aided: FID 14.92 -> 13.67, CLIP 0.300 -> 0.287",
}
ATTRIBUTES = sample.SHAPES_ATTRIBUTES + ("mean",)   # per-attribute accuracy and their mean
EVAL_DATA_SEED = 0         # real captions and images of the evaluation, the same for every run


class StudyError(ValueError):
    """A bad command line or a failed run: printed as one line, exit status 2."""


def slug(row):
    """'no kernel bank (N = 1)' -> 'no-kernel-bank-n-1': the row's directory name."""
    return re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")


# -----------------------------------------------------------------------------
# One run: train (or resume), then measure


def checkpoint_step(run_dir):
    """The step of <run_dir>/checkpoint.pt, or None when there is none."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def run_train(argv):
    """One train.py run, through its command line (train.main); a failure stops the study."""
    try:
        train.main(argv)
    except SystemExit as err:
        if err.code == 130:  # Ctrl-C or SIGTERM: train.py saved the step it was in
            raise StudyError(f"interrupted ({argv[argv.index('--out') + 1]} saved): run the same ablation.py "
                             "command again to go on") from None
        if err.code not in (None, 0):
            raise StudyError(f"train.py {' '.join(argv)} stopped with status {err.code} (its message is above); "
                             "fix it, then run the same ablation.py command again to go on") from None


def add_seconds(run_dir, seconds):
    """Wall time of a run's train.py calls, summed over resumes in <run_dir>/ablation_time.json."""
    path = os.path.join(run_dir, "ablation_time.json")
    total = json.load(open(path))["seconds"] if os.path.isfile(path) else 0.0
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"seconds": total + seconds}, f)


def train_run(run_dir, argv, steps):
    """Train <run_dir> to `steps`: skip it if its checkpoint is there, resume a shorter one, else
    start it (a log of an attempt that never reached a checkpoint is kept aside, not appended to)."""
    step = checkpoint_step(run_dir)
    if step is not None and step > steps:
        raise StudyError(f"{run_dir} is at step {step}, past --steps {steps}: use another --out, or --steps {step}")
    if step == steps:
        return False
    if step is None and os.path.isfile(os.path.join(run_dir, "log.jsonl")):
        os.replace(os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, f"log.unfinished-{int(time.time())}.jsonl"))
    # --resume: from the checkpoint, or from step 0 in a folder an attempt left without one (train.py
    # refuses to start a new run over its config.json: a run directory belongs to one run)
    started = step is not None or os.path.isfile(os.path.join(run_dir, "config.json"))
    argv = argv + (["--resume"] if started else [])
    print(f"[ablation] {'resuming' if step is not None else 'training'} {run_dir}"
          f"{f' from step {step}' if step is not None else ''}: python train.py {' '.join(argv)}", flush=True)
    t0 = time.time()
    try:
        run_train(argv)
    finally:  # an interrupted call's time counts too: the resumed run is the same run
        add_seconds(run_dir, time.time() - t0)
    if checkpoint_step(run_dir) != steps:
        raise StudyError(f"{run_dir} ended before step {steps}: run the same ablation.py command again to go on")
    return True


def throughput(run_dir):
    """Mean of train.py's logged img/s over the run's training log lines."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    speeds = [r["img_s"] for r in rows if r.get("kind") == "train" and "img_s" in r]
    return float(np.mean(speeds)) if speeds else float("nan")


def measure(run_dir, eval_images):
    """G_ema of a finished run -> its metrics dict (written to <run_dir>/result.json): sample.evaluate's
    figures (the same as sample.py --eval's), spread_mean, img/s and minutes."""
    G, clip, ckpt = sample.load_generator(run_dir)
    dataset = data.ShapesDataset(G.cfg.resolution, seed=EVAL_DATA_SEED)
    metrics = sample.evaluate(G, clip, dataset, n=eval_images, shapes=True)
    seconds = json.load(open(os.path.join(run_dir, "ablation_time.json")))["seconds"]
    return {"step": ckpt["step"], "eval_images": eval_images, "spread_z": sample.SPREAD_Z, **metrics,
            "spread_mean": spread_mean(metrics), "img_s": throughput(run_dir), "minutes": seconds / 60}


def spread_mean(scores):
    """The table's one seed-spread figure: the mean of sample.evaluate's spread_x, spread_y and
    spread_size, or None where no caption counted (seed_spread then says 0, but measured nothing)."""
    if scores["spread_captions"] == 0:
        return None
    return float(np.mean([scores[f"spread_{k}"] for k in ("x", "y", "size")]))


def run_row_seed(row, seed, args, clip_spec):
    """Train (or resume) and measure one run; reuse its result.json when it is up to date."""
    run_dir = os.path.join(args.out, slug(row), f"seed{seed}")
    argv = ["--out", run_dir, "--seed", str(seed), "--max-steps", str(args.steps), "--max-minutes", "0",
            "--clip", clip_spec, *ROWS[row], *args.train_flags]
    trained = train_run(run_dir, argv, args.steps)
    path = os.path.join(run_dir, "result.json")
    settings = {"step": args.steps, "eval_images": args.eval_images, "spread_z": sample.SPREAD_Z}
    if not trained and os.path.isfile(path):
        result = json.load(open(path))
        if all(result.get(k) == v for k, v in settings.items()):
            print(f"[ablation] {run_dir}: done before, result.json kept", flush=True)
            return result
    print(f"[ablation] measuring {run_dir}", flush=True)
    result = measure(run_dir, args.eval_images)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    return result


# -----------------------------------------------------------------------------
# The report: per row, mean +- spread over seeds; a Markdown table and a bar chart

COLUMNS = [  # (result key, column title, digits)
    *[(f"align_{a}", a if a != "color" else "colour", 2) for a in ATTRIBUTES],
    ("spread_mean", "seed spread", 2), ("clip_score", "CLIP score", 3), ("clip_fd", "CLIP FD", 3),
    ("img_s", "img/s", 0), ("minutes", "minutes", 1),
]


def summarise(values):
    """Values over seeds -> (mean, spread = half their range; 0 for one seed)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), (max(values) - min(values)) / 2


def collect(out, steps, eval_images):
    """Every row's finished results under `out` at this --steps: {row: [result per seed]}."""
    found = {}
    for row in ROWS:
        folder = os.path.join(out, slug(row))
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name, "result.json")
            if re.fullmatch(r"seed\d+", name) and os.path.isfile(path):
                result = json.load(open(path))
                if result.get("step") == steps and result.get("eval_images") == eval_images:
                    found.setdefault(row, []).append(result)
    return found


def markdown_table(found, steps, seeds):
    """The study's table: one line per row, mean +- spread over its seeds."""
    head = ["row"] + [title for _, title, _ in COLUMNS] + ["paper, Table 1 (adding it)"]
    lines = [f"Tiny GigaGAN on shapes, {steps} steps of 16 images; mean +- half the range over seeds "
             f"(a difference inside it is not a finding). Seed spread: std over z of the shape's x, y and "
             f"extent for one caption / the same for real images of it, median over captions, mean of the three "
             f"(metrics.seed_spread; 1 = as varied as the data, 0 = one image per caption).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, results in found.items():
        cells = [row + (f" ({len(results)} of {seeds} seeds)" if len(results) < seeds else "")]
        for key, _, digits in COLUMNS:
            mean, spread = summarise([r.get(key) for r in results])
            cells.append("-" if math.isnan(mean) else f"{mean:.{digits}f} +- {spread:.{digits}f}")
        cells.append(PAPER[row])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(found, path):
    """One panel per headline metric, one bar per row, error bars = the seed spread."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    panels = [("align_shape", "shape accuracy"), ("align_mean", "mean accuracy (5 attributes)"),
              ("spread_mean", "seed spread (real = 1)"), ("clip_score", "CLIP score"),
              ("clip_fd", "CLIP-feature FD (lower is better)"), ("img_s", "training img/s")]
    rows = list(found)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, panels):
        stats = [summarise([r.get(key) for r in found[row]]) for row in rows]
        ax.bar(range(len(rows)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3,
               color=["tab:green" if row == "all on" else "tab:blue" for row in rows])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(rows, rotation=40, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(args):
    """Write <out>/ablation.md, ablation.png and ablation.json from every finished run."""
    found = collect(args.out, args.steps, args.eval_images)
    if not found:
        raise StudyError(f"no finished run under {args.out} at --steps {args.steps}: run the study first")
    table = markdown_table(found, args.steps, args.seeds)
    paths = [os.path.join(args.out, f"ablation.{ext}") for ext in ("md", "png", "json")]
    with open(paths[0], "w") as f:
        f.write(table)
    bar_chart(found, paths[1])
    with open(paths[2], "w") as f:
        json.dump(found, f, indent=2)
    print(table)
    print(f"[ablation] wrote {', '.join(paths)}")
    return found


# -----------------------------------------------------------------------------
# Command line


def pick_rows(names):
    """--only names (or directory names) -> rows, in the order of ROWS."""
    if not names:
        return list(ROWS)
    by_name = {**{r.lower(): r for r in ROWS}, **{slug(r): r for r in ROWS}}
    unknown = [n for n in names if n.lower() not in by_name]
    if unknown:
        raise StudyError(f"unknown row {unknown[0]!r} for --only: choose from " + ", ".join(repr(r) for r in ROWS))
    chosen = {by_name[n.lower()] for n in names}
    return [r for r in ROWS if r in chosen]


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as every other bad input
        raise StudyError(message)


def build_parser():
    p = Parser(
        prog="ablation.py", description="Table 1 at toy scale: the tiny GigaGAN on shapes with each component off. "
        "Flags after -- go to every train.py run.")
    p.add_argument("--steps", type=int, default=1500, help="training steps of every run (default 1500)")
    p.add_argument("--seeds", type=int, default=2, help="runs per row, seeds 0..N-1 (default 2)")
    p.add_argument("--out", default=os.path.join("runs", "ablation"), help="the study's folder (default runs/ablation)")
    p.add_argument("--only", nargs="+", metavar="ROW", help="run these rows only: " + "; ".join(ROWS))
    p.add_argument("--clip", default="", help="tiny:PATH of a tiny CLIP to share (default: <out>/clip/clip.pt, trained if missing)")
    p.add_argument("--clip-steps", type=int, default=1000, help="steps of the shared tiny CLIP when it is trained here")
    p.add_argument("--eval-images", type=int, default=256, help="real captions of the accuracy / CLIP / FD evaluation")
    p.add_argument("--report", action="store_true", help="train nothing: write the table and chart of the finished runs")
    return p


def parse_args(argv):
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(own)
    args.train_flags = extra
    for name in ("steps", "seeds", "clip_steps", "eval_images"):
        if getattr(args, name) < 1:
            raise StudyError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.eval_images < 2:
        raise StudyError("--eval-images must be at least 2 (a Frechet distance needs a covariance)")
    owned = {"--out", "--seed", "--max-steps", "--max-minutes", "--clip", "--resume", "--stage", "--data"}
    clash = [f for f in extra if f.split("=")[0].replace("_", "-") in owned]
    if clash:
        raise StudyError(f"{clash[0]} after --: ablation.py sets it for every run (use its own --steps, --out, --clip)")
    args.rows = pick_rows(args.only)
    for row in args.rows:  # every run's flags, checked before minutes of training
        train_configs(["--out", args.out, "--clip", "tiny:x", *ROWS[row], *extra], row)
    return args


def train_configs(argv, row=""):
    """train.py's own reading of a command line (its parse_flags), or None where this train.py has
    none (then its first run reports a bad flag); a bad flag -> StudyError."""
    parse = getattr(train, "parse_flags", None)
    if parse is None:
        return None
    try:
        return parse(argv)
    except getattr(train, "FlagError", ValueError) as err:
        raise StudyError(f"train.py flags{f' of row {row!r}' if row else ''}: {err}") from None


def clip_stage_flags(train_flags):
    """The study's train.py flags that --stage clip reads (config.TRAIN_SCOPE: --data, --device, ...):
    train.py refuses the GAN's own there (--batch-size, --g.*) as flags that do nothing."""
    import config
    from dry_run import flag_text
    given = config.read_flags(train_flags)[""]
    return [word for name, value in given.items() if "clip" in config.TRAIN_SCOPE[name][0]
            for word in (f"--{name.replace('_', '-')}", flag_text(value))]


def shared_clip(args):
    """The tiny CLIP every run shares: --clip, or <out>/clip/clip.pt (trained now if missing)."""
    if args.clip:
        spec = args.clip if args.clip.startswith("tiny:") else "tiny:" + args.clip
        if not os.path.isfile(spec[5:]):
            raise StudyError(f"--clip {args.clip}: no such file (a clip.pt written by python train.py --stage clip)")
        return "tiny:" + os.path.abspath(spec[5:])
    folder = os.path.join(args.out, "clip")
    path = os.path.join(folder, "clip.pt")
    if not os.path.isfile(path):
        print(f"[ablation] training the shared tiny CLIP -> {path}", flush=True)
        run_train(["--stage", "clip", "--out", folder, "--clip-steps", str(args.clip_steps),
                   *clip_stage_flags(args.train_flags)])
    return "tiny:" + os.path.abspath(path)


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if not args.report:
            clip_spec = shared_clip(args)
            t0 = time.time()
            for seed in range(args.seeds):  # every row once before any row twice: a stopped study is balanced
                for row in args.rows:
                    run_row_seed(row, seed, args, clip_spec)
            print(f"[ablation] {len(args.rows)} row(s) x {args.seeds} seed(s) done in {(time.time() - t0) / 60:.1f} minutes")
        return report(args)
    except StudyError as err:
        print(f"ablation.py: {err}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
