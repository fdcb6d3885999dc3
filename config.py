"""
config.py - train.py's configuration: TrainConfig, the presets, the command line and its checks.

    cfg, g_cfg, d_cfg, loss_cfg = parse_flags(["--preset", "small", "--g.self-attention", "false"])

Order: dataclass defaults (the default run, `python train.py`) < preset (TRAIN_PRESETS, and
UPSAMPLER_TRAIN_PRESETS with --stage upsampler: only what differs) < flags. Every field of
TrainConfig is a flag `--key value` or `--key=value` (dashes or underscores), declared in one line
with its rule and the stages that read it (`flag`). The model and loss configs of 03-06 become
`--g.FIELD`, `--d.FIELD`, `--loss.FIELD`, `--u.FIELD` for the fields SUB_FLAGS names, one line each;
their other fields are set by 03-06's presets. Each value is coerced to its field's type; a bool
takes true/false (or 1/0, yes/no, on/off), a bare `--resume` meaning true. Bad input is a
FlagError: one line, exit status 2. sample.py parses its own flags with the same FlagParser.
"""
import argparse
import dataclasses
import importlib
import json
import os
import tempfile
import typing
from dataclasses import dataclass

clip_lib = importlib.import_module("00_clip")
generator = importlib.import_module("03_generator")
discriminator = importlib.import_module("04_discriminator")
losses = importlib.import_module("05_losses")
upsampler = importlib.import_module("06_upsampler")

# -----------------------------------------------------------------------------
# Rules: the valid values of a flag, checked by check_values on the flags given, before anything
# runs (no CLIP training, no file, no model). A rule is
#   "[1, inf)"  an interval: [ ] includes its end, ( ) excludes it, inf is unbounded (so nan and inf
#               are refused); for a tuple field, every entry;
#   ("a", "b")  the words allowed;
#   a function  value -> None if valid, else the whole one-line message;
#   ANY         every value of the field's type (coerce checks the type); the comment says where the
#               value itself is checked.
ANY = "any"
SEED_MAX = 2**32 - 1  # seeds of train.py and sample.py: 0 .. 4294967295 (torch.manual_seed takes < 2**64)
MAX_STEPS = 10**9     # --max-steps, --clip-steps: a billion steps, 30 years at one step a second (a run can reach it)
STEPS = f"[1, {MAX_STEPS}]"
LPIPS_NETS = ("vgg", "alex", "random")


def device_rule(value):
    ok = value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    return None if ok else f"unknown --device {value!r}: choose auto | cpu | cuda | cuda:N"


def vision_clip_rule(value):
    if value in ("auto", "same") or value.startswith("tiny:") or "/" in value:
        return None
    return (f"bad --vision-clip {value!r}: choose auto | same | tiny:PATH | NAME/TAG "
            "(e.g. ViT-B-32/openai, or ViT-B-32/none for random weights)")


def out_rule(value):
    return f"--out {value} is a file: give a run directory" if os.path.isfile(value) else writable_error(value, "--out")


def writable_error(path, flag):
    """None when `path` is a folder this process can write in, or one that os.makedirs can make;
    else the one-line message: a file in the way (FILE/sub), or a parent that takes no new entries
    (read-only, /proc). Tried by making and removing an empty folder in the nearest existing one."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{flag} {path}: {probe} is a file, not a folder: give a path under a folder, e.g. runs/NAME"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=probe))
    except OSError as err:
        return (f"{flag} {path}: cannot write in {probe} ({err.strerror or type(err).__name__}): "
                "choose a folder you can write to, e.g. runs/NAME")
    return None


def data_error(value):
    """A folder given to --data must be there, also for a dry run (train.main; shard patterns may
    live on the cluster the run is planned for; the folder's contents: data.build_dataset). Not a
    rule of check_values: a command parses on any machine (tests/test_commands.py)."""
    if value in ("", "shapes") or ".tar" in value or os.path.isdir(value):
        return None
    import data  # data.py: its own words for the flag
    return f"--data '{value}' {'is a file' if os.path.exists(value) else 'does not exist'}; {data.DATA_SPEC_HELP}"


# Scopes: the stages that read a flag, and what the flag does (the words of check_scope's message
# when it is given for another stage).
CLIP_STAGE, BASE, UP = "clip", "base", "upsampler"
EVERY, GAN = (CLIP_STAGE, BASE, UP), (BASE, UP)
ALL = (EVERY, "")
RUN = (GAN, "configures the GAN's training (the CLIP stage trains a tiny CLIP: --clip-steps, --clip-batch-size, "
            "--clip-tower)")
TINY_CLIP = (EVERY, "trains a tiny CLIP")  # the GAN stages: only with --clip tiny (check_scope)
CLIP = (GAN, "picks the CLIP a GAN is conditioned on (the CLIP stage trains a tiny one)")
PLAN = (GAN, "plans a GAN run (the CLIP stage trains a tiny CLIP, minutes on a CPU)")
UP_ONLY = ((UP,), "is the upsampler stage's")


def flag(default, rule, scope=RUN):
    """A TrainConfig field: its default (the value `python train.py` runs with), its rule and scope."""
    return dataclasses.field(default=default, metadata={"rule": rule, "scope": scope})


# -----------------------------------------------------------------------------
# The training configuration and its presets

@dataclass
class TrainConfig:
    preset: str = flag("tiny", ("tiny", "small", "full", "full1024"), ALL)  # size preset of G, D, losses and this config
    full: bool = flag(False, ANY, ALL)                 # shorthand for --preset full (the paper's 64 px model)
    stage: str = flag("base", (CLIP_STAGE, BASE, UP), ALL)  # clip (tiny CLIP only) | base (text-to-image GAN) | upsampler
    data: str = flag("shapes", ANY, ALL)               # shapes | an image folder with captions | 'shards/{00000..00099}.tar' (data_error)
    out: str = flag("", out_rule, ALL)                 # run directory; '' -> runs/<preset>
    max_steps: int = flag(3000, STEPS)                 # optimiser steps of G (and of D)
    max_minutes: float = flag(0.0, "[0, inf)")         # time budget of the whole run, CLIP training included (0: none)
    batch_size: int = flag(16, "[1, inf)")             # global batch: all processes, all micro-batches
    batch_gpu: int = flag(0, "[0, inf)")               # micro-batch per forward pass; 0 -> batch_size / processes
    lr: float = flag(0.005, "(0, inf)")                # AdamW learning rate of G and D (paper: 0.0025; tiny: twice that)
    ema_kimg: float = flag(10.0, "[0, inf)")           # EMA half-life of G_ema in thousands of images (full: the paper's)
    seed: int = flag(0, f"[0, {SEED_MAX}]", ALL)       # seeds every random draw (per step and micro-batch)
    device: str = flag("auto", device_rule, ALL)       # auto | cpu | cuda | cuda:N
    dtype: str = flag("float32", ("float32", "bfloat16"))  # autocast of the forward passes
    compile: bool = flag(False, ANY)                   # torch.compile G and D for the D and G steps (GPU speed-up)
    resume: bool = flag(False, ANY, (GAN, "continues a GAN run's checkpoint (the CLIP stage has none)"))
    overwrite: bool = flag(False, ANY, ALL)            # delete the run in --out first (checkpoint, CLIPs, log, snapshots)
    clip: str = flag("tiny", ANY, CLIP)                # tiny | tiny:PATH | NAME/TAG (NAME/none: random weights) (clip_spec)
    vision_clip: str = flag("auto", vision_clip_rule,  # CLIP of the vision-aided D: auto | same | tiny:PATH | NAME/TAG
                            ((CLIP_STAGE, BASE), "picks the vision-aided D's CLIP (the upsampler has no vision-aided D)"))
    clip_steps: int = flag(1000, STEPS, TINY_CLIP)     # training steps of each tiny CLIP
    clip_tower: str = flag("auto", ("auto", "vit", "resnet"), TINY_CLIP)  # auto: resnet at a multiple of 32 px, else vit
    clip_batch_size: int = flag(128, "[2, inf)", TINY_CLIP)  # batch of the tiny CLIP's contrastive training
    workers: int = flag(-1, "[-1, inf)")               # DataLoader worker processes; -1 -> 0 on CPU, 4 on GPU
    log_every: int = flag(25, "[1, inf)")              # steps between log lines
    snapshot_every: int = flag(250, "[1, inf)")        # steps between sample grids of fixed prompts and z
    eval_every: int = flag(500, "[0, inf)")            # steps between alignment / CLIP-score evaluations (0: off)
    eval_images: int = flag(128, "[2, inf)")           # images generated per evaluation (a Frechet distance needs 2)
    eval_fid: bool = flag(False, ANY, ((BASE,), "scores the base stage's periodic evals"))  # Inception FID at each eval
    ckpt_every: int = flag(250, "[1, inf)")            # steps between checkpoints
    dry_run: bool = flag(False, ANY, PLAN)             # build the models on the meta device, print sizes, exit
    gpu_memory: float = flag(0.0, "[0, inf)", (GAN, "plans a GAN run's --batch-gpu"))  # --dry-run: GB -> the --batch-gpu that fits
    lpips: str = flag("vgg", LPIPS_NETS, UP_ONLY)      # LPIPS backbone: vgg (paper) | alex | random (no download)
    warmup_steps: int = flag(0, "[0, inf)", UP_ONLY)   # the first steps train U on pixel MSE alone (no D; project's choice)


# Training-side presets: only what differs from TrainConfig's defaults (the tiny run). G and D
# sizes come from 03/04's registries under the same names, the loss weights from 05's.
TRAIN_PRESETS = {
    # tiny: TrainConfig's defaults, twice the paper's learning rate (project's choice) and a fixed
    # 3,000 steps: every attribute >= 0.94 on fresh captions, the same picture on every machine
    # (NOTES.md, "Learning rate of G and D" and "Default run, fixed steps")
    "tiny": dict(),
    # small: OpenAI's ViT-B/32 for the text and the vision-aided D (downloads once; --clip tiny trains one here)
    "small": dict(max_steps=200_000, batch_size=64, lr=0.0025, ema_kimg=20.0, clip="ViT-B-32/openai",
                  clip_batch_size=256, clip_steps=5000, snapshot_every=1000, eval_every=5000, ckpt_every=1000,
                  log_every=100),
    # full: the paper's G EMA, decay 0.9999 per step at batch 1024 (update_ema's beta = 0.5 ** (batch /
    # (ema_kimg * 1000))): ema_kimg = 1024 ln 0.5 / (1000 ln 0.9999) = 7097.47; the ramp-up over the
    # first images (train.update_ema's rampup) is StyleGAN2's, the project's choice (the paper gives none); --batch-gpu 16
    # fits an A100 80 GB (the dry run: about 63 GiB; 32 would need about 106)
    "full": dict(max_steps=1_350_000, batch_size=1024, batch_gpu=16, lr=0.0025, ema_kimg=7097.47, dtype="bfloat16",
                 clip="ViT-L-14/openai", vision_clip="ViT-B-32/openai", data="",
                 snapshot_every=5000, eval_every=20000, ckpt_every=5000, log_every=100),
}

# The upsampler stage's own training settings per preset, over TRAIN_PRESETS (project's choice; the
# paper leaves them open). tiny: a random LPIPS backbone (no download), a 1,300-step pixel-MSE warm-up
# (ESRGAN's recipe, not the paper's), then GAN steps at the paper's 0.0025
# (NOTES.md, "Tiny upsampler default", "What lets U learn on MSE" and "Upsampler warm-up")
UPSAMPLER_TRAIN_PRESETS = {
    "tiny": dict(max_steps=1500, warmup_steps=1300, batch_size=8, lpips="random", lr=0.0025,
                 eval_images=64, log_every=20, snapshot_every=200, eval_every=200, ckpt_every=200),
    # full, full1024: the --batch-gpu that fits an A100 80 GB (the dry run: full about 57 GiB at 4, 8 needed
    # about 101; full1024 about 53 GiB at 2)
    "full": dict(batch_size=256, batch_gpu=4, lpips="vgg"),
    "full1024": dict(batch_size=256, batch_gpu=2, lpips="vgg"),
}
# Upsampler presets with no base model of their own: their other train settings are those of the
# named TRAIN_PRESETS entry (full1024: 128 -> 1024, ours; the paper shows such results, no model).
UPSAMPLER_ONLY_PRESETS = {"full1024": "full"}

# -----------------------------------------------------------------------------
# The flags of the model and loss configs (03-06): field -> (rule, scope), one line each. Their
# other fields are the presets' (03's G_PRESETS, 04's D_PRESETS, 05's LOSS_PRESETS, 06's U_PRESETS).
# What depends on several fields (lengths per scale, powers of 2) is the configs' own __post_init__,
# and check_models builds the models.
WIDTH = "[1, inf)"
G = ((BASE,), "configures the base generator (the upsampler's fields are --u.*, 06_upsampler.py's UpsamplerConfig)")
U = ((UP,), "configures the upsampler")
D = (GAN, "configures the GAN's D")
LOSS = (GAN, "is a GAN loss term")
VISION_AIDED = ((BASE,), "configures the vision-aided D (the upsampler has none)")
SUB_FLAGS = {
    "g.": dict(resolution=("[8, inf)", G), channels=(WIDTH, G), w_dim=(WIDTH, G), text_width=(WIDTH, G),
               blocks_per_scale=(WIDTH, G), n_kernels=(WIDTH, G),
               attn_resolutions=("[4, inf)", G), self_attention=(ANY, G), cross_attention=(ANY, G), noise=(ANY, G)),
    "d.": dict(channel_base=(WIDTH, D), channel_max=(WIDTH, D), attention=(ANY, D), multi_scale=(ANY, D)),
    "loss.": dict(table1_matching=(tuple(losses.MATCHING), LOSS), match_weight=("[0, inf)", LOSS),
                  clip_weight=("[0, inf)", LOSS), vision_weight=("[0, inf)", VISION_AIDED),
                  r1_gamma=("[0, inf)", LOSS), r1_interval=("[1, inf)", LOSS),
                  lpips_weight=("[0, inf)", ((UP,), "weighs the upsampler's LPIPS to the real image")),
                  pixel_weight=("[0, inf)", ((UP,), "weighs the upsampler's pixel MSE to the real image"))),
    "u.": dict(in_resolution=("[4, inf)", U), out_resolution=("[8, inf)", U), channels=(WIDTH, U),
               noise_aug_sigma=("[0, 1]", U)),
}
SUB_CONFIGS = {"g.": generator.GeneratorConfig, "d.": discriminator.DiscriminatorConfig,
               "loss.": losses.LossConfig, "u.": upsampler.UpsamplerConfig}
for _prefix, _cls in SUB_CONFIGS.items():  # every flag names a field (a typo fails here, at import)
    assert set(SUB_FLAGS[_prefix]) <= {f.name for f in dataclasses.fields(_cls)}, (_prefix, set(SUB_FLAGS[_prefix]))

# The same, as tables: {field: rule} and {field: scope}, "" for TrainConfig's
TRAIN_RULES = {f.name: f.metadata["rule"] for f in dataclasses.fields(TrainConfig)}
TRAIN_SCOPE = {f.name: f.metadata["scope"] for f in dataclasses.fields(TrainConfig)}
SUB_RULES = {p: {name: rule for name, (rule, _) in fields.items()} for p, fields in SUB_FLAGS.items()}
SUB_SCOPE = {p: {name: scope for name, (_, scope) in fields.items()} for p, fields in SUB_FLAGS.items()}
TINY_CLIP_FLAGS = tuple(name for name, scope in TRAIN_SCOPE.items() if scope is TINY_CLIP)


def interval_words(rule):
    """"[1, inf)" -> ">= 1", "(0, inf)" -> "> 0", "[0, 1)" -> "in [0, 1)": how a message says it."""
    low, high = (x.strip() for x in rule[1:-1].split(","))
    if high == "inf":
        return f"{'>=' if rule[0] == '[' else '>'} {low}"
    return f"in {rule}"


def in_interval(value, rule):
    """Is the number `value` inside the interval `rule` ("[0, 1)", "(0, inf)", ...)? nan never is."""
    low, high = (float(x) for x in rule[1:-1].split(","))
    above = value >= low if rule[0] == "[" else value > low
    below = value <= high if rule[-1] == "]" else value < high
    return bool(above and below)


def rule_error(flag, value, rule):
    """The one-line message of `--flag value` breaking `rule`, or None when it keeps it."""
    if rule is ANY:
        return None
    if callable(rule):
        return rule(value)
    if isinstance(rule, tuple):
        return None if value in rule else f"unknown {flag} {value!r}: choose {' | '.join(rule)}"
    entries = value if isinstance(value, (tuple, list)) else [value]
    bad = [v for v in entries if not in_interval(v, rule)]
    if not bad:
        return None
    if isinstance(value, (tuple, list)):
        return f"every entry of {flag} must be {interval_words(rule)}, got {bad[0]} in {list(value)}"
    return f"{flag} must be {interval_words(rule)}, got {value}"


def check_values(given, rules, prefix=""):
    """Every flag given ({field: coerced value}) against its field's rule: the first broken one is a
    FlagError (one line, exit status 2)."""
    for name, value in given.items():
        message = rule_error(f"--{prefix}{name.replace('_', '-')}", value, rules[name])
        if message:
            raise FlagError(message)

def check_scope(values, stage, clip):
    """Refuse every flag given ({prefix: {field: value}}, read_flags) that does nothing for `stage`
    (TRAIN_SCOPE, SUB_SCOPE), and the tiny CLIP's training flags when a GAN stage trains no tiny
    CLIP (`clip`: the run's --clip, after the preset)."""
    for prefix, given in values.items():
        scope = SUB_SCOPE[prefix] if prefix else TRAIN_SCOPE
        for name in given:
            stages, what = scope[name]
            flag = f"--{prefix}{name.replace('_', '-')}"
            if stage not in stages:
                raise FlagError(f"{flag} does nothing with --stage {stage}: it {what}; drop it, or use "
                                f"--stage {' or '.join(stages)}")
            if not prefix and name in TINY_CLIP_FLAGS and stage != CLIP_STAGE and clip != "tiny":
                raise FlagError(f"{flag} does nothing with --clip {clip}: it {what}, which only --clip tiny "
                                "does here; drop it, or use --clip tiny")

# -----------------------------------------------------------------------------
# Flags: argparse, generated from the dataclass fields


class FlagError(ValueError):
    """A bad command line: printed as one line, exit status 2."""


class FlagParser(argparse.ArgumentParser):
    """argparse that raises FlagError (one line) where argparse would print its usage and exit."""

    def error(self, message):
        raise FlagError(f"{message} (see python {self.prog} --help)")


def coerce(value, annotation, flag):
    """Turn the string of `--flag value` into the dataclass field's type."""
    origin = typing.get_origin(annotation)
    try:
        if annotation is bool:  # not bool(value): bool("false") is True (the type=bool trap)
            low = value.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return low in ("1", "true", "yes", "on")
        if annotation in (int, float, str):
            return annotation(value)
        if origin in (tuple, list, dict) or annotation in (tuple, list, dict):
            kind = origin or annotation
            text = value
            if kind is not dict and not text.lstrip().startswith(("[", "{")):
                text = f"[{text}]"  # --g.channels 64,64,64,32 as well as '[64, 64, 64, 32]'
            parsed = json.loads(text)  # e.g. --g.channels '[64, 64, 64, 32]'
            if not isinstance(parsed, dict if kind is dict else list):
                raise ValueError
            # every tuple field of the configs holds whole numbers (channels, blocks, resolutions)
            if kind is not dict and not all(type(v) is int for v in parsed):
                raise ValueError
            return tuple(parsed) if kind is tuple else parsed
    except (ValueError, json.JSONDecodeError):
        what = getattr(annotation, '__name__', annotation)
        hint = " of whole numbers, such as 64,64,64,32 or '[64, 64, 64, 32]'" if what in ("tuple", "list") else ""
        raise FlagError(f"bad value for {flag}: {value!r} (expected {what}{hint})") from None
    return value


class Coerce(argparse.Action):
    """Store a flag's value as its field's type; a bare boolean flag (`--resume`) means true."""

    def __init__(self, option_strings, dest, annotation, **kwargs):
        self.annotation = annotation
        if annotation is bool:
            kwargs.update(nargs="?", const="true")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, coerce(value, self.annotation, self.option_strings[0]))


def add_dataclass_flags(parser, cls, prefix="", names=None):
    """One flag per field of the dataclass `cls` (or per field in `names`): --PREFIXfield-name. Only
    the flags given land in the parsed namespace (default SUPPRESS), under dest PREFIXfield_name."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=prefix + f.name, action=Coerce,
                            annotation=hints[f.name], default=argparse.SUPPRESS)


def dashed(arg):
    """--max_steps=3 -> --max-steps=3: a flag's name with dashes (both are accepted), its value as given."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value


def read_flags(argv):
    """argv -> {"": {field: value}, "g.": {...}, "d.": {...}, "loss.": {...}, "u.": {...}}: the flags given."""
    parser = FlagParser(prog="train.py", add_help=False, allow_abbrev=False)
    add_dataclass_flags(parser, TrainConfig)
    for prefix, cls in SUB_CONFIGS.items():
        add_dataclass_flags(parser, cls, prefix, SUB_FLAGS[prefix])
    given, rest = parser.parse_known_args([dashed(arg) for arg in argv])
    if rest:
        if rest[0].startswith("--") and rest[0] != "--":
            raise FlagError(f"unknown flag {rest[0].split('=')[0]} (python train.py --help lists the flags)")
        raise FlagError(f"unexpected argument {rest[0]!r}: flags look like --key value (see python train.py --help)")
    values = {prefix: {} for prefix in ("", *SUB_CONFIGS)}
    for dest, value in vars(given).items():
        prefix = next((p for p in SUB_CONFIGS if dest.startswith(p)), "")
        values[prefix][dest[len(prefix):]] = value
    return values


def parse_flags(argv):
    """argv -> (TrainConfig, GeneratorConfig, DiscriminatorConfig, LossConfig); with --stage upsampler
    the second is 06's UpsamplerConfig and the third the upsampler's D.

    Order: dataclass defaults < preset < flags, wherever the flags stand on the command line:
    `--batch-size 8 --preset small` keeps the 8."""
    values = read_flags(argv)
    for prefix, given in values.items():  # each flag's own range first, then what combines them
        check_values(given, SUB_RULES[prefix] if prefix else TRAIN_RULES, prefix)
    flags = values[""]
    preset, stage = flags.get("preset", "tiny"), flags.get("stage", "base")
    if flags.get("full"):  # --full is --preset full
        if preset != "full" and "preset" in flags:
            raise FlagError(f"--full is --preset full: drop one of --full and --preset {preset}")
        preset = flags["preset"] = "full"
    if stage == "upsampler" and preset not in UPSAMPLER_TRAIN_PRESETS:
        raise FlagError(f"no upsampler preset {preset!r}: use --preset tiny (32 -> 128), --full (64 -> 512) "
                        "or --preset full1024 (128 -> 1024)")
    if stage != "upsampler" and preset in UPSAMPLER_ONLY_PRESETS:
        raise FlagError(f"--preset {preset} is an upsampler preset (06_upsampler.py's U_PRESETS): "
                        "add --stage upsampler")
    stage_preset = UPSAMPLER_TRAIN_PRESETS[preset] if stage == "upsampler" else {}
    train_preset = TRAIN_PRESETS[UPSAMPLER_ONLY_PRESETS.get(preset, preset)]
    cfg = TrainConfig(**{**train_preset, **stage_preset, "preset": preset, **flags})
    check_scope(values, cfg.stage, cfg.clip)  # flags that do nothing for this stage (TRAIN_SCOPE, SUB_SCOPE)
    check_train_config(cfg)
    cfg.out = cfg.out or os.path.join("runs", cfg.preset + ("-upsampler" if cfg.stage == "upsampler" else ""))
    if cfg.stage == "upsampler":
        # the generator is the upsampler U; its MS-I/O D reads pyramids of U's output size
        g_cfg = configured(upsampler.U_PRESETS[preset], values["u."], "upsampler", "u")
        d_cfg = configured(upsampler.U_D_PRESETS[preset], {"resolution": g_cfg.out_resolution, **values["d."]},
                           "discriminator", "d")
        cfg.clip_tower = "vit" if cfg.clip_tower == "auto" else cfg.clip_tower  # its CLIP only reads text
        check_clip_tower(cfg, g_cfg.in_resolution)
        loss_cfg = configured(loss_preset("upsampler", preset), values["loss."], "loss", "loss")
        return cfg, g_cfg, d_cfg, loss_cfg
    g_cfg = configured(generator.G_PRESETS[preset], values["g."], "generator", "g")
    if cfg.clip_tower == "auto":  # the ResNet tower needs sides divisible by 32 (five stride-2 steps)
        cfg.clip_tower = "vit" if g_cfg.resolution % 32 else "resnet"
    check_clip_tower(cfg, g_cfg.resolution)
    if cfg.vision_clip == "auto" and g_cfg.resolution % 32:  # no ResNet-tower sibling below 32 px steps
        cfg.vision_clip = "same"
    d_cfg = configured(discriminator.D_PRESETS[preset], {"resolution": g_cfg.resolution, **values["d."]},
                       "discriminator", "d")  # D reads G's pyramid: G's resolution
    loss_cfg = configured(loss_preset("base", preset), values["loss."], "loss", "loss")
    return cfg, g_cfg, d_cfg, loss_cfg


# -----------------------------------------------------------------------------
# Checks: each bad setting is one FlagError line that says what to do


def check_train_config(cfg):
    """What combines several TrainConfig fields (each field's own range: check_values)."""
    if cfg.warmup_steps and cfg.stage != "upsampler":
        raise FlagError("--warmup-steps: only the upsampler stage has a warm-up; add --stage upsampler")
    if cfg.eval_fid and (cfg.stage != "base" or not cfg.eval_every):
        raise FlagError("--eval-fid scores the base stage's periodic evals: use it with --stage base and "
                        "--eval-every > 0, or drop it")
    if cfg.gpu_memory and not cfg.dry_run:
        raise FlagError("--gpu-memory plans a run: add --dry-run (it prints the --batch-gpu that fits)")


def text_width(cfg):
    """Width of the CLIP text tower's token features: a known open_clip model's, else the tiny CLIP's
    (the real width comes from the loaded CLIP; this one builds models on the meta device)."""
    return {"ViT-L-14": 768, "ViT-B-32": 512, "ViT-B-16": 512, "ViT-H-14": 1024}.get(cfg.clip.split("/")[0], 128)


def check_models(cfg, g_cfg, d_cfg):
    """Build G (or U) and D on the meta device and run one forward pass: settings that each keep
    their range but do not fit together (heads that do not divide a width, an even kernel) fail
    here, in one line, in a second and with no memory, not after minutes of CLIP training."""
    if cfg.stage == "clip":
        return
    import torch
    dim = text_width(cfg)
    what = "upsampler configuration (--u.*)" if cfg.stage == "upsampler" else "generator configuration (--g.*)"
    try:
        with torch.device("meta"):
            tokens, mask = torch.zeros(1, 4, dim), torch.ones(1, 4, dtype=torch.bool)
            eot = torch.full((1,), 3, dtype=torch.long)
            if cfg.stage == "upsampler":
                G = upsampler.Upsampler(g_cfg, text_dim=dim)
                lowres = torch.zeros(1, 3, g_cfg.in_resolution, g_cfg.in_resolution)
                pyramid = G(lowres, torch.zeros(1, g_cfg.z_dim), tokens, mask, eot)
            else:
                G = generator.Generator(g_cfg, text_dim=dim)
                pyramid = G(torch.zeros(1, g_cfg.z_dim), tokens, mask, eot)
    except NotImplementedError:  # an unwritten exercise of a student copy (make_student_copy.py): its hint
        raise
    except (AssertionError, ValueError, RuntimeError, IndexError, ZeroDivisionError) as err:
        raise FlagError(f"bad {what}: {str(err).splitlines()[0] or type(err).__name__}") from None
    try:
        with torch.device("meta"):
            discriminator.Discriminator(d_cfg, text_dim=dim)(pyramid, tokens, mask, eot)
    except NotImplementedError:
        raise
    except (AssertionError, ValueError, RuntimeError, IndexError, ZeroDivisionError) as err:
        raise FlagError(f"bad discriminator configuration (--d.*): "
                        f"{str(err).splitlines()[0] or type(err).__name__}") from None


def configured(preset_cfg, changes, what, prefix):
    """A model or loss preset with the --PREFIX.* flags applied; the config's own checks (its
    __post_init__ asserts) become one FlagError line."""
    try:
        return dataclasses.replace(preset_cfg, **changes)
    except AssertionError as err:
        raise FlagError(f"bad {what} configuration (--{prefix}.*): {err}") from None


def loss_preset(stage, preset):
    """05's loss settings of a stage ("base" | "upsampler"): "<stage>_<preset>" where a size preset
    has its own (tiny: a stronger R1 for the base, a pixel MSE for the upsampler), else "<stage>"."""
    return losses.LOSS_PRESETS.get(f"{stage}_{preset}", losses.LOSS_PRESETS[stage])


def check_clip_tower(cfg, resolution):
    """The tiny CLIP is trained at the data's resolution; a ResNet tower needs a multiple of 32."""
    if cfg.clip_tower == "resnet" and resolution % 32:
        raise FlagError(f"--clip-tower resnet needs a resolution divisible by 32, got {resolution}: "
                        "use --clip-tower vit")


def print_help(usage):
    """train.py --help: its docstring (usage), then every flag with the value `python train.py` runs with."""
    print(usage)
    cfg, g_cfg, d_cfg, loss_cfg = parse_flags([])
    for title, prefix, values in (("train", "", cfg), ("generator", "g.", g_cfg), ("discriminator", "d.", d_cfg),
                                  ("losses", "loss.", loss_cfg),
                                  ("upsampler (--stage upsampler)", "u.", upsampler.U_PRESETS["tiny"])):
        print(f"{title} flags (the default run's values):")
        for f in dataclasses.fields(values):
            if not prefix or f.name in SUB_FLAGS[prefix]:
                print(f"  --{prefix}{f.name.replace('_', '-'):<24} {getattr(values, f.name)!r}")
    print(f"presets: {', '.join(TRAIN_PRESETS)}, with these train settings changed: {json.dumps(TRAIN_PRESETS)}; "
          f"--stage upsampler: {json.dumps(UPSAMPLER_TRAIN_PRESETS)}")


# -----------------------------------------------------------------------------
# Which CLIPs a run uses: --clip, --vision-clip


def clip_spec(cfg):
    """--clip -> a load_clip spec. `tiny` is the run's own <out>/clip.pt."""
    if cfg.clip == "tiny":
        return "tiny:" + os.path.join(cfg.out, "clip.pt")
    if "/" not in cfg.clip and not cfg.clip.startswith("tiny:"):
        raise FlagError(f"--clip {cfg.clip} needs a weights tag: --clip {cfg.clip}/TAG, or "
                        f"--clip {cfg.clip}/none for random weights, or --clip tiny")
    return cfg.clip


VISION_CLIP = "vision_clip.pt"  # the ResNet-tower sibling of a tiny clip.pt, for the vision-aided D


def vision_clip_spec(cfg):
    """--vision-clip -> the load_clip spec of the vision-aided D's CLIP, or None: the text CLIP itself.

    `auto` (the default): a tiny CLIP with the ViT image tower (`--clip tiny --clip-tower vit`) gets
    a sibling with the ResNet image tower, `vision_clip.pt` beside its `clip.pt`, which this run
    trains itself (as --stage clip does); `--clip tiny:PATH` uses that sibling when it is there;
    any other --clip, and the tiny default's ResNet-tower CLIP, serve both roles (`same`).
    Why (project's choice; the paper, too, gives the vision-aided D its own CLIP, ViT-B/32 beside
    the ViT-L/14 of the text): the tiny ResNet tower reads shape, the tiny ViT poorly
    (NOTES.md, "Vision-aided D: which ResNet stages")."""
    if cfg.vision_clip == "same":
        return None
    if cfg.vision_clip != "auto":
        return cfg.vision_clip
    spec = clip_spec(cfg)
    if not spec.startswith("tiny:"):
        return None
    path = os.path.join(os.path.dirname(spec[len("tiny:"):]), VISION_CLIP)
    if cfg.clip == "tiny":  # this run trains its CLIP: a ResNet-tower one needs no sibling
        return None if cfg.clip_tower == "resnet" else "tiny:" + path
    same_file = os.path.abspath(path) == os.path.abspath(spec[len("tiny:"):])  # --clip tiny:DIR/vision_clip.pt
    return "tiny:" + path if os.path.isfile(path) and not same_file else None

