"""Test items against each model's training data: evaluation refuses to score a model on questions it was
trained on, and notes a model whose training a time limit cut short.

A model folder made by a training phase records, in ``fingerprint.json``, the sha256 of every split it read
and, in ``train_config.yaml``, the folder they came from. When the test set belongs to the same prepared
folder (same data card, same train split hashes), the split is leak-free by construction (prepare keeps
near-duplicates on one side). Otherwise (data prepared again with other settings, a test file from
elsewhere), the model's training rows are read and compared with the test items by id and by the text the
model is shown; any overlap stops the evaluation with one line.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from utils.core.artifacts import training_lineage
from utils.core.config import UserError
from utils.core.fingerprint import file_sha256

log = logging.getLogger(__name__)

_SPACE = re.compile(r"\s+")


def _user_text(messages) -> str:
    """The user turns of a conversation, whitespace-normalised: what identifies an item to the model."""
    if not isinstance(messages, list):
        return ""
    return _SPACE.sub(" ", " ".join(m.get("content", "") for m in messages
                                    if isinstance(m, dict) and m.get("role") == "user")).strip().lower()


def _item_keys(row: dict) -> tuple[str | None, str]:
    msgs = row.get("prompt") or row.get("messages") or []
    return row.get("id"), _user_text(msgs)


def training_sources(model_dir: str | Path) -> list[tuple[Path | None, dict[str, str]]]:
    """``[(data_dir, {split: sha256}), ...]``: the training splits a model folder records, then those of the
    model it started from (:func:`utils.core.artifacts.training_lineage`)."""
    return [(Path(s["data_dir"]) if s["data_dir"] else None, s["data"]) for s in training_lineage(model_dir)]


def check_test_items(model_name: str, model_dir: str | Path, rows: list[dict], test_file: str | Path | None) -> str | None:
    """Refuse (one line) when test ``rows`` overlap the training data of the model at ``model_dir``. Returns
    a note for the report when the overlap could not be checked (the training files are gone or changed),
    else None."""
    ids, texts = {}, {}
    for i, row in enumerate(rows):
        item_id, text = _item_keys(row)
        if item_id:
            ids[item_id] = i
        if text:
            texts[text] = i
    notes = [n for data_dir, splits in training_sources(model_dir)
             if (n := _check_source(model_name, data_dir, splits, rows, ids, texts, test_file))]
    return "; ".join(notes) or None


def _check_source(model_name: str, data_dir: Path | None, splits: dict[str, str], rows: list[dict], ids: dict,
                  texts: dict, test_file: str | Path | None) -> str | None:
    if test_file is not None and data_dir is not None and Path(test_file).parent.parent.resolve() == data_dir.resolve():
        current = {s: file_sha256(data_dir / f"{s}.jsonl") for s in splits if (data_dir / f"{s}.jsonl").is_file()}
        if current == splits:
            return None  # the same prepared folder the model trained on: train and test are disjoint by construction
    checked = []
    for split, sha in splits.items():
        path = (data_dir / f"{split}.jsonl") if data_dir is not None else None
        if path is None or not path.is_file() or file_sha256(path) != sha:
            continue
        checked.append(split)
        overlap = 0
        example = None
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                train_id, text = _item_keys(json.loads(line))
                hit = ids.get(train_id) if train_id else None
                hit = hit if hit is not None else texts.get(text) if text else None
                if hit is not None:
                    overlap += 1
                    example = example or rows[hit].get("id")
        if overlap:
            raise UserError(f"{model_name}: {overlap} test item(s) (e.g. {example}) are in its training data {path}; "
                            "evaluate on the test split prepared together with that data, or retrain the model on "
                            "the current data")
    if len(checked) < len(splits):
        missing = ", ".join(s for s in splits if s not in checked)
        note = (f"{model_name}: its training data ({missing} under {data_dir}) is gone or changed since it trained, so "
                "the test items could not be checked against it")
        log.warning("%s", note)
        return note
    return None


def training_stopped_early(model_name: str, model_dir: str | Path) -> str | None:
    """A note for the report when a model's training was ended by its time limit before its planned
    steps (``stopped_by_time_limit`` in its metrics.json): such a model depends on the machine's speed."""
    path = Path(model_dir) / "metrics.json"
    if not path.is_file():
        return None
    try:
        stopped = json.loads(path.read_text(encoding="utf-8")).get("stopped_by_time_limit")
    except (ValueError, AttributeError):
        return None
    if not isinstance(stopped, dict):
        return None
    return (f"{model_name}: training stopped at its time limit ({stopped.get('minutes')} min) after "
            f"{stopped.get('steps_run')} of {stopped.get('steps_planned')} planned steps; on a faster or slower "
            "machine it would be another model")
