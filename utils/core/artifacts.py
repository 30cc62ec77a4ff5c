"""The files that make a folder trustworthy: completion markers and atomic folder writes.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import yaml

DONE_MARKER = ".complete"  # written last: a folder without it is a half-written save


def mark_complete(folder: Path) -> None:
    (Path(folder) / DONE_MARKER).write_text("ok\n")


def atomic_save(folder: Path, save_fn) -> Path:
    """Write a model folder through ``save_fn(tmp_dir)`` into a temporary sibling, then rename it.

    An interrupted save leaves only ``<folder>.tmp-*``, never a folder that looks complete.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_fn(tmp)
    mark_complete(tmp)
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return folder


TRAIN_CONFIG = "train_config.yaml"  # in the final model folder: the resolved config of the run


METRICS_FILE = "metrics.json"


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ============================================================================= run folder and resume
def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first. The Trainer writes trainer_state.json last, so a
    checkpoint killed while being written lacks it and is skipped."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := CHECKPOINT.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def read_train_config(folder: str | Path) -> dict | None:
    """The resolved config a model folder was trained with (e.g. its ``answer_format``), or None."""
    path = Path(folder) / TRAIN_CONFIG
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text(encoding="utf-8"))
