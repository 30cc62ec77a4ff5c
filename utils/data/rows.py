"""The JSONL rows the phases exchange: reading and writing them, their shapes, and the one check of a row.

prepare_data.py writes two row shapes, and every reader checks its rows here, line by line, with one
message naming the file, the line and what was expected:

* ``sft`` rows (``sft/{train,validation}.jsonl``): ``messages``, a whole conversation ending with the
  assistant's answer;
* ``prompt`` rows (``grpo/{train,validation}.jsonl``, ``eval/test.jsonl``): ``prompt``, the conversation up
  to the answer (ending with the user's turn), ``question``, ``reference`` and the labels the rewards read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from utils.core.config import UserError

PREPARE = "python prepare_data.py --config configs/cpu/prepare.yaml"
MISSING_HINT = f"run `{PREPARE}` first (or set data_dir)"
# The split files under data/processed and the row shape each holds.
SPLITS = {"sft/train": "sft", "sft/validation": "sft", "grpo/train": "prompt", "grpo/validation": "prompt",
          "eval/test": "prompt"}


# What each row shape holds, for the one-line errors.
SHAPES = {"sft": "'messages': [{role, content}, ...] with at least two turns, the assistant's answer last",
          "prompt": "'prompt': [{role, content}, ...] with the user's question last, and 'id', 'task', 'question' "
                    "and 'reference' texts"}


class DataError(UserError):
    pass


# ============================================================================= writing
def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_jsonl(path: str | Path, hint: str = MISSING_HINT) -> list[dict]:
    """The JSON objects of a JSONL file, blank lines skipped (:func:`read_jsonl_lines` gives line numbers)."""
    return [row for _, row in read_jsonl_lines(path, hint)]


def read_jsonl_lines(path: str | Path, hint: str = MISSING_HINT) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line; one-line errors for a missing file (with ``hint``:
    how to make it), non-UTF-8 text, invalid JSON and non-object lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; {hint}")
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {i} is not a JSON object")
                rows.append((i, row))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return rows


def _conversation(x) -> bool:
    return (isinstance(x, list) and bool(x)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in x))


def row_problem(row: dict, shape: str) -> str | None:
    """What is wrong with a row of the given shape (``sft`` or ``prompt``, see the module docstring), or None.

    >>> row_problem({"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q2"}]}, "sft")
    "'messages' ends with a 'user' message"
    >>> row_problem({"id": "a", "task": "EBK", "prompt": [{"role": "user", "content": "Q"}], "question": "Q",
    ...              "reference": "A"}, "prompt") is None
    True
    """
    if shape == "sft":
        msgs = row.get("messages")
        if not _conversation(msgs) or len(msgs) < 2:
            return "no valid 'messages' list"
        if msgs[-1]["role"] != "assistant":
            return f"'messages' ends with a {msgs[-1]['role']!r} message"
        return None
    if shape != "prompt":
        raise ValueError(f"unknown row shape {shape!r}; expected sft or prompt")
    if not _conversation(row.get("prompt")):
        return "no valid 'prompt' list"
    if row["prompt"][-1]["role"] != "user":
        return f"'prompt' ends with a {row['prompt'][-1]['role']!r} message"
    for key in ("id", "task", "question", "reference"):
        if not isinstance(row.get(key), str):
            return f"field '{key}' " + ("missing" if key not in row else f"is {type(row[key]).__name__}, not text")
    return None


def read_rows(path: str | Path, shape: str, hint: str = MISSING_HINT) -> list[dict]:
    """The rows of a JSONL file of the given shape, every one checked (:func:`row_problem`)."""
    rows = []
    for line, row in read_jsonl_lines(path, hint):
        problem = row_problem(row, shape)
        if problem:
            raise DataError(f"{path}: line {line}: {problem}; expected {SHAPES[shape]}, as prepare_data.py writes them")
        rows.append(row)
    return rows


def read_split(data_dir: str | Path, split: str) -> list[dict]:
    """One split of ``data_dir`` (a key of :data:`SPLITS`, e.g. ``grpo/train``), checked."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return read_rows(Path(data_dir) / f"{split}.jsonl", SPLITS[split])


LABEL_KEYS = ("label_yesno", "label_disease", "label_followup", "followup_days", "numbers")


def sft_row(r: dict) -> dict:
    return {"id": r["id"], "task": r["task"], "messages": r["messages"]}


def prompt_row(r: dict) -> dict:
    """GRPO / evaluation: the conversation up to the answer, the reference, the labels."""
    return {"id": r["id"], "task": r["task"], "prompt": r["messages"][:-1], "question": r["question"],
            "reference": r["reference"], **{k: r[k] for k in LABEL_KEYS}}
