"""Every phase script answers --help; every shipped YAML loads onto its script's config class."""

import importlib
import re
import subprocess
import sys
import typing

import pytest

from tests.conftest import ROOT
from utils.core.config import load_config

SCRIPTS = sorted(p.name for p in ROOT.glob("*.py"))
YAMLS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*/*.yaml") if p.parent.name != "accelerate")
# "# python X.py --config <this file> ...", possibly behind a launcher or env, or after a wrapper "(or: ...)"
COMMAND = re.compile(r"python\s+(?P<script>\w+\.py)\b(?P<rest>[^()]*)")


def test_phase_scripts_exist():
    for name in ("prepare_data.py", "sft_train.py", "reward_model.py", "grpo_train.py", "evaluate.py", "chat.py"):
        assert (ROOT / name).is_file(), name


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def config_class(script: str):
    """The dataclass a script's ``main(config: X)`` takes."""
    module = importlib.import_module(script[:-3])
    return typing.get_type_hints(module.main)["config"]


@pytest.mark.parametrize("path", YAMLS)
def test_shipped_yaml_loads(path):
    first = (ROOT / path).read_text().splitlines()[0]
    m = COMMAND.search(first) if first.startswith("#") else None
    assert m, f"{path}: the first line must be the command that runs it, got {first!r}"
    assert path in m.group("rest"), f"{path}: its command names another file"
    load_config(config_class(m.group("script")), ROOT / path)
