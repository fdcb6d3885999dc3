"""Every command the project shows a reader parses: the README's and every module docstring's
`python train.py ...`, `torchrun ... train.py ...`, `python sample.py ...`, `python bench.py ...`
and `python ablation.py ...` lines go through the script's own parser (parse only: nothing is
trained, loaded or written), so a renamed or removed flag fails here, not in a reader's shell."""
import glob
import os
import re
import shlex

import pytest

import ablation
import bench
import config
import gpu_check
import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = re.compile(r"(?:python|torchrun)\b[^`\n|]*?\b(train|sample|bench|ablation)\.py([^`\n|]*)")


def shown_commands():
    """(where, script, argv) of every command in README.md and the *.py module docstrings."""
    sources = {"README.md": open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()}
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        text = open(path, encoding="utf-8").read()
        doc = re.match(r'\s*(?:#[^\n]*\n\s*)*"""(.*?)"""', text, re.S)
        if doc:
            sources[os.path.basename(path)] = doc.group(1)
    found = []
    for where, text in sources.items():
        for line in text.splitlines():
            for script, rest in SCRIPT.findall(line):
                argv = shlex.split(rest, comments=True)
                if "--help" in argv or "-h" in argv:
                    continue
                found.append((where, script, argv))
    return found


COMMANDS = shown_commands()


def test_the_docs_show_commands_of_every_script():
    scripts = {s for _, s, _ in COMMANDS}
    assert {"train", "sample", "bench", "ablation"} <= scripts, scripts
    assert len(COMMANDS) >= 25, len(COMMANDS)


@pytest.mark.parametrize("where,script,argv", COMMANDS, ids=[f"{w}:{' '.join(a)[:60]}" for w, _, a in COMMANDS])
def test_every_shown_command_parses(where, script, argv, monkeypatch):
    if script == "train":
        config.parse_flags(argv)          # FlagError (one line) on any unknown flag or bad value
    elif script == "sample":
        sample.build_parser().parse_args(argv)
    elif script == "bench" and "--gpu" in argv:  # bench.py --gpu hands its flags to gpu_check.py
        monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)  # parse as on the GPU machine
        gpu_check.parse_args([a for a in argv if a != "--gpu"])
    elif script == "bench":  # a placeholder path stands for the peer's timing script: any file will do
        argv = [__file__ if prev == "--peer-script" else a for prev, a in zip([None] + argv, argv)]
        bench.parse_args(argv)
    else:
        ablation.parse_args(argv)


def test_a_stale_flag_would_fail():
    with pytest.raises(config.FlagError):
        config.parse_flags(["--g.attention", "false"])           # the field is --g.self-attention
    with pytest.raises(config.FlagError):
        sample.build_parser().parse_args(["--no-such-flag"])
