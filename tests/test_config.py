"""The config loader: YAML onto typed dataclasses, flag overrides, one-line errors."""

import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT
from utils.core.config import ConfigError, fld, load_config, parse_args, positive


@dataclass
class Cfg:
    name: str = fld("run", "A name.")
    lr: float = fld(1e-4, "Learning rate.", check=(positive, "a number > 0"))
    steps: int = fld(10, "Steps.")
    mode: str = fld("plain", "Answer format.", choices=["plain", "reasoning"])
    tasks: list[str] = fld(help="Tasks.", choices=["EBK", "CK"], default_factory=list)
    weights: dict[str, float] = fld(help="Weights.", default_factory=dict)
    merge: bool = fld(False, "Merge.")
    path: str | None = fld(None, "Optional path.")
    batch: int = fld(4, "Batch.")
    accum: int = fld(1, "Accumulation.")

    def __post_init__(self):
        if self.batch % self.accum:
            raise ValueError(f"batch {self.batch} is not divisible by accum {self.accum}")


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_then_flags(tmp_path):
    p = write(tmp_path, "lr: 3.0e-4\nsteps: 5\ntasks: [EBK]\nweights: {rouge: 1.0}\nmerge: true\n")
    cfg = parse_args(Cfg, ["--config", str(p), "--steps", "7", "--tasks", "EBK,CK", "--no-merge"])
    assert (cfg.lr, cfg.steps, cfg.tasks, cfg.weights, cfg.merge) == (3e-4, 7, ["EBK", "CK"], {"rouge": 1.0}, False)
    assert parse_args(Cfg, ["--merge"]).merge is True
    assert parse_args(Cfg, ["--weights", "{format: 0.5}"]).weights == {"format": 0.5}
    # a list flag also takes the YAML form the file uses (pasted from a recipe); an unclosed one is an error
    assert parse_args(Cfg, ["--tasks", "[EBK, CK]"]).tasks == ["EBK", "CK"]
    assert parse_args(Cfg, ["--tasks", "[]"]).tasks == []
    with pytest.raises(ConfigError, match=r"command line --tasks"):
        parse_args(Cfg, ["--tasks", "[EBK, CK"])


# Each case: YAML text, and the words the one-line error must contain (file, key, what is allowed).
BAD = [
    ("lrr: 1\n", ["unknown key 'lrr'", "did you mean 'lr'"]),                # typo
    ("steps: ten\n", ["key 'steps'", "expected an integer"]),               # wrong type
    ("steps: 1.5\n", ["key 'steps'", "expected an integer"]),               # float is not an int
    ("lr: -1\n", ["key 'lr'", "expected a number > 0"]),                     # out of range
    ("mode: fancy\n", ["key 'mode'", "one of plain, reasoning"]),            # bad choice
    ("tasks: [EBK, XX]\n", ["key 'tasks'", "'XX'", "one of EBK, CK"]),       # bad list member
    ("merge: maybe\n", ["key 'merge'", "true or false"]),
    ("weights: [1, 2]\n", ["key 'weights'", "a mapping"]),
    ("- a\n- b\n", ["expected a mapping"]),                                  # not a mapping
    ("lr: [1\n", ["not valid YAML", "line"]),                                # broken YAML
    ("batch: 6\naccum: 4\n", ["not divisible"]),                             # cross-field check
]


@pytest.mark.parametrize("text,words", BAD)
def test_bad_config_one_line(tmp_path, text, words):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, p)
    msg = str(e.value)
    assert "\n" not in msg
    if "mapping at the top" in msg or "YAML" in msg or "divisible" in msg:
        assert str(p) in msg
    for w in words:
        assert w in msg, msg


def test_bad_flag_names_the_flag():
    with pytest.raises(ConfigError, match=r"command line --lr.*expected a number > 0"):
        parse_args(Cfg, ["--lr", "0"])


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(Cfg, "nope.yaml")


def test_script_prints_one_line_and_exits_2(tmp_path):
    p = write(tmp_path, "val_fractoin: 0.1\n")
    r = subprocess.run([sys.executable, "prepare_data.py", "--config", str(p)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {p}: unknown key 'val_fractoin' (did you mean 'val_fraction'?); valid keys: "
                     + lines[0].split("valid keys: ")[1]]
    assert "Traceback" not in r.stderr
