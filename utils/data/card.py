"""The data card's read side: is a processed folder whole, and are its split files the ones prepare wrote?

prepare_data.py writes ``data/processed/`` into a temporary sibling and renames it into place with a
completion marker, so a folder with the marker is one whole run. Its ``data_card.json`` records each
file's sha256 and row count (``outputs``); :func:`verify_splits` checks the bytes against it, so a split
edited or replaced since, by hand or by another run, is caught before a model trains or is scored on it,
and its hash can be recorded with the model.
"""

from __future__ import annotations

import json
from pathlib import Path

from utils.core.artifacts import DONE_MARKER
from utils.core.fingerprint import file_sha256
from utils.data.rows import MISSING_HINT, PREPARE, SPLITS, DataError

CARD_FILE = "data_card.json"
CARD_MD = "data_card.md"


def read_card(data_dir: str | Path) -> dict:
    """The data card of a processed folder that prepare_data.py finished writing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: processed data folder not found; {MISSING_HINT}")
    if not (data_dir / DONE_MARKER).is_file():
        raise DataError(f"{data_dir}: no {DONE_MARKER} marker, so prepare_data.py did not finish writing it "
                        f"(or an older version wrote it); run `{PREPARE}` again")
    path = data_dir / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run `{PREPARE}` again") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}); run `{PREPARE}` again") from None
    if not isinstance(card, dict) or not isinstance(card.get("outputs"), dict):
        raise DataError(f"{path}: no 'outputs' table of the files prepare wrote; run `{PREPARE}` again")
    return card


def _recorded_sha256(card: dict, data_dir: Path, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    entry = card["outputs"].get(f"{split}.jsonl")
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise DataError(f"{data_dir / CARD_FILE}: records no sha256 for {split}.jsonl (an older prepare_data.py "
                        f"wrote it); run `{PREPARE}` again")
    return entry["sha256"]


def _verified(card: dict, data_dir: Path, split: str) -> str:
    recorded = _recorded_sha256(card, data_dir, split)
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: not found, though the data card lists it; run `{PREPARE}` again")
    actual = file_sha256(path)
    if actual != recorded:
        raise DataError(f"{path}: changed since prepare_data.py wrote it (sha256 {actual[:12]}, the data card "
                        f"records {recorded[:12]}); run `{PREPARE}` again")
    return actual


def split_hash(data_dir: str | Path, split: str) -> str:
    """The sha256 of one split file (a key of :data:`utils.data.rows.SPLITS`, e.g. ``sft/train``), checked
    against the data card: a file changed since prepare wrote it is an error, not a new hash."""
    return _verified(read_card(data_dir), Path(data_dir), split)


def verify_splits(data_dir: str | Path, splits: list[str]) -> dict[str, str]:
    """``{split: sha256}`` for ``splits``, every file checked against the data card (one-line error naming
    the first file whose bytes changed)."""
    card = read_card(data_dir)
    return {s: _verified(card, Path(data_dir), s) for s in splits}
