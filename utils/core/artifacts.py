"""The files that make a folder trustworthy: completion markers and atomic folder writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import yaml

from utils.core.config import UserError

log = logging.getLogger(__name__)

DONE_MARKER = ".complete"  # written last: a folder without it is a half-written save


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on ``path`` (created if missing) for the block: the processes of a launch
    that all need the same one-time file work (e.g. converting the base model on a fresh machine) do it
    once, one after the other, instead of writing over each other. POSIX ``flock``; elsewhere, no lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: one process per machine is the only supported launch there
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def mark_complete(folder: Path) -> None:
    (Path(folder) / DONE_MARKER).write_text("ok\n")


def check_replaceable(folder: str | Path, key: str = "output_dir", legacy: tuple[str, ...] = ()) -> None:
    """Refuse, in one line, to replace a folder this project did not write: an existing, non-empty
    ``folder`` is replaced only when it carries the completion marker (or, for folders written before the
    marker existed, all of the ``legacy`` files). ``key``: the setting that chooses the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder; choose another {key}")
    if replaceable(folder, DONE_MARKER) or (legacy and replaceable(folder, *legacy)):
        return
    raise UserError(f"{folder}: exists and was not written by this project (no {DONE_MARKER} marker), so it is "
                    f"left as it is; choose another {key}, or move that folder away yourself")


def atomic_save(folder: Path, save_fn, key: str = "output_dir", legacy: tuple[str, ...] = ()) -> Path:
    """Write a folder through ``save_fn(tmp_dir)`` into a temporary sibling, then rename it into place with
    its completion marker; an existing folder is replaced only when the project wrote it
    (:func:`check_replaceable`).

    An interrupted save leaves only ``<folder>.tmp-*``, never a folder that looks complete.
    """
    folder = Path(folder)
    check_replaceable(folder, key, legacy)
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


def replaceable(folder: Path, *markers: str) -> bool:
    """Whether the project may replace ``folder``: it is absent, empty, or holds every file in ``markers``
    (the marks the project writes into the folders it makes). A folder someone else made, such as a
    shared copy of the data, is never deleted."""
    folder = Path(folder)
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    return not any(folder.iterdir()) or all((folder / m).is_file() for m in markers)


TRAIN_CONFIG = "train_config.yaml"  # in the final model folder: the resolved config of the run


METRICS_FILE = "metrics.json"
FINGERPRINT = "fingerprint.json"  # in a model folder: what made it (utils.training.run.fingerprint)


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ============================================================================= run folder and resume
def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a checkpoint the Trainer finished writing. It writes trainer_state.json last,
    so a checkpoint killed while being written lacks it, or holds it empty or cut short (a kill during
    that very write): both are incomplete."""
    try:
        state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and isinstance(state.get("global_step"), int)


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``run_dir`` (:func:`is_complete_checkpoint`), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := CHECKPOINT.match(p.name)) and is_complete_checkpoint(p)]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path | None) -> int:
    """The optimizer step a checkpoint folder was saved at (its trainer_state.json), 0 for None: any folder
    name works, not only checkpoint-N."""
    if path is None:
        return 0
    try:
        return int(json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        m = CHECKPOINT.match(Path(path).name)
        if m:
            return int(m.group(1))
        raise UserError(f"{path}: no readable global_step in trainer_state.json; expected a checkpoint the Trainer "
                        "wrote") from None


def training_lineage(model_dir: str | Path) -> list[dict]:
    """The training data behind a model folder a phase made, then behind the model that run started from,
    and so on: ``[{"data_dir": ..., "data": {split: sha256}}, ...]`` with the ``*/train`` splits only,
    nearest first (GRPO's policy carries what its SFT start trained on). Empty for a model no phase made;
    one line when its ``fingerprint.json`` is unreadable."""
    path = Path(model_dir) / FINGERPRINT
    if not path.is_file():
        return []
    try:
        fp = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path}: unreadable JSON; expected the fingerprint a training phase writes (run that "
                        "phase again)") from None
    trained = read_train_config(model_dir) or {}
    out = []
    for source in [{"data_dir": trained.get("data_dir"), "data": fp.get("data")}, *(fp.get("lineage") or [])]:
        data = {s: h for s, h in (source.get("data") or {}).items() if s.endswith("/train")}
        if data:
            out.append({"data_dir": source.get("data_dir") if isinstance(source.get("data_dir"), str) else None,
                        "data": data})
    return out


def read_train_config(folder: str | Path) -> dict | None:
    """The resolved config a model folder was trained with (e.g. its ``answer_format``), or None."""
    path = Path(folder) / TRAIN_CONFIG
    if not path.is_file():
        return None
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not readable YAML ({first}); expected the {TRAIN_CONFIG} a training phase "
                        "writes: run that phase again, or remove the file") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: holds {type(cfg).__name__}, not the mapping of settings a training phase writes; "
                        "run that phase again, or remove the file")
    return cfg


def read_log(path: str | Path, repair: bool = True) -> list[dict]:
    """The JSON objects of an append-only JSONL log (held-out answers, samples, the answer cache).

    A run killed while appending leaves a torn last line (no newline, or cut JSON): it is dropped with a
    warning, and with ``repair`` cut from the file so that the next append starts on a fresh line. Other
    unreadable lines are skipped and counted in a warning. A missing file is an empty log."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[:raw.rfind(b"\n") + 1]
        if repair:
            path.write_bytes(raw)
        log.warning("%s: dropped a torn last line (a write was interrupted)", path)
    out, bad = [], 0
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(obj, dict):
            out.append(obj)
        else:
            bad += 1
    if bad:
        log.warning("%s: %d unreadable line(s) ignored", path, bad)
    return out
