"""ECG-Expert-QA's eleven raw file shapes read into one record shape, cleaned and labelled.

Every raw item becomes one record of the same shape::

    {"id": "PRTK-0f3a9c1d2b", "task": "PRTK", "source": "Patient's right to know.json", "index": 12,
     "question": "...", "context": None | "...", "reference": "...",
     "messages": [system, user, assistant, (user, assistant)...],   # whole conversation, answer last
     "label_yesno": None | "yes" | "no", "label_disease": None | "...",
     "label_followup": None | "every 3 months", "followup_days": None | 91.3,
     "numbers": [{"text", "low", "high", "unit", "dim", "base_low", "base_high"}, ...],
     "flags": [...]}
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from utils.data.rows import DataError
from utils.data.text import (
    extract_numbers,
    followup_interval,
    is_yes_no_question,
    looks_truncated,
    normalize_whitespace,
    repair_mojibake,
    yes_no_of,
)

log = logging.getLogger(__name__)


UPSTREAM_REPO = "Zaozzz/ECG-Expert-QA"


UPSTREAM_COMMIT = "8eff3b48b1b6d81d9667994d65f562b5ca9c800a"


@dataclass(frozen=True)
class Task:
    code: str
    file: str
    blob: str  # git blob hash prefix of the file at UPSTREAM_COMMIT: what --download verifies
    title: str


TASKS: dict[str, Task] = {t.code: t for t in [
    Task("EBK", "ECG Knowledge (Basic Q&A).json", "ba05c4b2", "ECG knowledge"),
    Task("CK", "Cardiology Knowledge (Basic Knowledge Q&A).json", "c59512c0", "Cardiology knowledge"),
    Task("CD", "Complex diagnosis (analysis of difficult diseases).json", "6a7426de", "Complex diagnosis"),
    Task("PP", "Patient prognosis (prognostic analysis).json", "8dddf2f7", "Patient prognosis"),
    Task("PRTK", "Patient's right to know.json", "d074e4fc", "Patient's right to know"),
    Task("CMD", "Cross modal diagnosis (ECG Text corresponding diagnosis).json", "4211062f",
         "Cross-modal diagnosis"),
    Task("GRA", "Generate risk assessment.json", "54ab23b3", "Risk assessment"),
    Task("LTD", "Long text diagnosis.json", "4a1c0d8e", "Long-text diagnosis"),
    Task("MEE", "Medical entity extraction.json", "31c27f92", "Medical entity extraction"),
    Task("MROD", "Medical inquiry, multiple rounds of dialogue between doctors and patients.json", "e1230184",
         "Multi-round inquiry"),
    Task("MC", "Memory correction.json", "9c161f60", "Memory correction"),
]}


FILE_TO_TASK = {t.file: t.code for t in TASKS.values()}


# Instructions for the shapes that carry no question of their own.
GRA_QUESTION = "Based on this patient's ECG history, write a risk assessment."


MEE_QUESTION = "List the medical entities (findings, diagnoses, measurements) in this ECG record."


CONTEXT_LABEL = {"PP": "Medical advice I was given", "CMD": "ECG machine measurements"}


DEFAULT_CONTEXT_LABEL = "Patient's ECG record"


# Answers that are lists, not prose: no closing punctuation to expect.
LIST_ANSWERS = {"MEE"}




# MIMIC-IV-ECG writes 29999 for an axis it could not measure.
NOT_MEASURED = {29999, "29999"}


# ============================================================================= reading
def read_json_list(path: Path) -> list[dict]:
    """A raw file as a list of objects, or a one-line DataError naming the file and what is wrong."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not raw.strip():
        raise DataError(f"{path}: empty file (expected a JSON list of objects)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, found a JSON {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: empty list (expected a JSON list of objects)")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {i} is a JSON {type(item).__name__}, expected an object")
    return data


def _text(value: Any) -> str:
    """Free text from a field that may be a string, a list or a mapping (GRA's RA, MEE's keywords)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "\n".join(_text(v) for v in value if _text(v))
    if isinstance(value, dict):
        return "\n".join(f"{k}: {_text(v)}" for k, v in value.items() if _text(v))
    return str(value)


def _cmd_context(item: dict) -> str:
    """The MIMIC-IV-ECG report lines and machine measurements that come with a cross-modal item."""
    reports = [_text(item[k]) for k in sorted((k for k in item if k.startswith("report_")),
                                                   key=lambda k: int(k.split("_")[1]) if k.split("_")[1].isdigit() else 0)
               if _text(item[k]).strip()]
    skip = {"Q", "A", "subject_id", "study_id", "cart_id", "ecg_time"} | {k for k in item if k.startswith("report_")}
    measures = [f"{k}={item[k]}" for k in sorted(item) if k not in skip and item[k] not in NOT_MEASURED
                and item[k] not in (None, "")]
    parts = []
    if reports:
        parts.append("Report: " + "; ".join(reports))
    if measures:
        parts.append("Measurements: " + ", ".join(measures))
    return "\n".join(parts)


def _qa_pairs(value: Any) -> list[tuple[str, str]] | None:
    """LTD / MROD ``QA``: a list of {Q, A} or a mapping {key: {Question, Answer}} (or {Q, A})."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if items is None:
        return None
    pairs = []
    for p in items:
        if not isinstance(p, dict):
            return None
        q = p.get("Q", p.get("Question"))
        a = p.get("A", p.get("Answer"))
        if q is None or a is None:
            return None
        pairs.append((_text(q), _text(a)))
    return pairs


_ASSISTANT_ROLES = ("doctor", "assistant", "physician", "gpt", "model", "bot", "医生")


_USER_ROLES = ("patient", "user", "human", "患者", "病人")


def _conversation_turns(value: Any) -> list[tuple[str, str]] | None:
    """MC ``Conversation``: {phase: [ {role: text}, ... ]} flattened in order into (user|assistant, text).

    Role names are not documented: doctor-like names are the assistant, patient-like ones the user,
    and otherwise the first speaker is the user and the second the assistant.
    """
    if isinstance(value, dict):
        phases = list(value.values())
    elif isinstance(value, list):
        phases = [value]
    else:
        return None
    raw: list[tuple[str, str]] = []
    for turns in phases:
        if isinstance(turns, dict):
            turns = [turns]
        if not isinstance(turns, list):
            return None
        for turn in turns:
            if not isinstance(turn, dict):
                return None
            if set(turn) >= {"role", "content"}:
                raw.append((str(turn["role"]), _text(turn["content"])))
            else:
                raw.extend((str(r), _text(t)) for r, t in turn.items())
    order: list[str] = []
    for r, _ in raw:
        if r not in order:
            order.append(r)

    def role(r: str) -> str:
        low = r.lower()
        if any(k in low for k in _ASSISTANT_ROLES):
            return "assistant"
        if any(k in low for k in _USER_ROLES):
            return "user"
        return "user" if order.index(r) % 2 == 0 else "assistant"

    return [(role(r), t) for r, t in raw]


def item_turns(task: str, item: dict) -> tuple[str | None, list[tuple[str, str]], dict, list[str]]:
    """One raw item -> (context, [(role, text), ...] ending with the answer, labels, ignored keys).

    Returns turns == [] when the item's keys fit no known shape (the caller names file and index).
    A multi-QA item (LTD) gives several conversations; here they come back as one list of pairs and
    ``split_pairs`` in labels tells the caller to cut them apart.
    """
    keys = set(item)
    labels: dict = {}
    if {"Q", "A"} <= keys:
        q, a = _text(item["Q"]), _text(item["A"])
        if task == "CMD":  # upstream stores the question under A and the answer under Q
            q, a = a, q
        context = None
        known = {"Q", "A"}
        if "medical_advice" in keys:
            context = _text(item["medical_advice"])
            known.add("medical_advice")
        if "Disease" in keys:
            labels["disease"] = _text(item["Disease"]).strip() or None
            known.add("Disease")
        if task == "CMD":
            context = _cmd_context(item) or None
            known = keys
        return context, [("user", q), ("assistant", a)], labels, sorted(keys - known - {"subject_id"})
    if {"Question", "Answer"} <= keys:
        return None, [("user", _text(item["Question"])), ("assistant", _text(item["Answer"]))], labels, \
            sorted(keys - {"Question", "Answer", "subject_id"})
    if "result" in keys:
        context = _text(item["result"])
        rest = sorted(keys - {"result", "subject_id", "RA", "QA", "keywords", "Conversation"})
        if "RA" in keys:
            return context, [("user", GRA_QUESTION), ("assistant", _text(item["RA"]))], labels, rest
        if "keywords" in keys:
            kw = item["keywords"]
            answer = ", ".join(_text(k) for k in kw) if isinstance(kw, list) else _text(kw)
            return context, [("user", MEE_QUESTION), ("assistant", answer)], labels, rest
        if "QA" in keys:
            pairs = _qa_pairs(item["QA"])
            if pairs is None:
                return None, [], labels, rest
            turns = [t for q, a in pairs for t in (("user", q), ("assistant", a))]
            # LTD's pairs are separate questions on one record; MROD's form one conversation.
            labels["split_pairs"] = task != "MROD"
            return context, turns, labels, rest
        if "Conversation" in keys:
            turns = _conversation_turns(item["Conversation"])
            return context, turns or [], labels, rest
    return None, [], labels, []


# ============================================================================= records
def _stable_id(task: str, *parts: str) -> str:
    h = hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:10]
    return f"{task}-{h}"


def render_user(question: str, context: str | None, task: str) -> str:
    if not context:
        return question
    return f"{CONTEXT_LABEL.get(task, DEFAULT_CONTEXT_LABEL)}:\n{context}\n\nQuestion: {question}"


def make_record(task: str, source: str, index: int, context: str | None, turns: list[tuple[str, str]],
                labels: dict, system_prompt: str) -> dict:
    """Build the record shape of the module docstring from cleaned turns (the answer is the last turn)."""
    question = turns[-2][1]
    reference = turns[-1][1]
    messages = [{"role": "system", "content": system_prompt}]
    for i, (role, text) in enumerate(turns):
        # the context goes with the first user turn; later turns are the conversation itself
        content = render_user(text, context, task) if i == 0 else text
        messages.append({"role": role, "content": content})
    yesno = yes_no_of(reference) if (task == "PRTK" or is_yes_no_question(question)) else None
    follow = followup_interval(reference) if task == "PP" else None
    return {
        "id": _stable_id(task, context or "", *[t for _, t in turns]),
        "task": task, "source": source, "index": index,
        "question": question, "context": context, "reference": reference, "messages": messages,
        "label_yesno": yesno, "label_disease": labels.get("disease"),
        "label_followup": follow[0] if follow else None, "followup_days": follow[1] if follow else None,
        "numbers": extract_numbers(reference),
        "flags": [],
    }


def _valid_turns(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop leading assistant turns and trailing user turns: a conversation starts with the user and ends
    with the answer to learn."""
    while turns and turns[0][0] != "user":
        turns = turns[1:]
    while turns and turns[-1][0] != "assistant":
        turns = turns[:-1]
    return turns


@dataclass
class CleanOptions:
    unrecoverable: str = "drop"  # drop | keep: items with mojibake that cannot be undone
    drop_truncated: bool = True
    drop_contradictory: bool = True
    skip_bad_items: bool = False


def load_raw(raw_dir: Path, system_prompt: str, opts: CleanOptions, tasks: Iterable[str] | None = None
             ) -> tuple[list[dict], dict]:
    """Read every known file under ``raw_dir`` into cleaned records, and the cleaning report."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: raw data directory not found. Get the data with "
                        f"`python prepare_data.py --download` (fetches {UPSTREAM_REPO} at "
                        f"{UPSTREAM_COMMIT[:8]}) or point --raw-dir at a copy")
    wanted = set(tasks) if tasks else set(TASKS)
    report: dict = {"files": {}, "removed": Counter(), "repaired": Counter(), "flagged": Counter(),
                    "ignored_fields": Counter()}
    records: list[dict] = []
    found = [p for p in sorted(raw_dir.glob("*.json")) if p.name in FILE_TO_TASK]
    if not found:
        raise DataError(f"{raw_dir}: none of the ECG-Expert-QA files is here (expected names such as "
                        f"'{TASKS['EBK'].file}')")
    for path in found:
        task = FILE_TO_TASK[path.name]
        if task not in wanted:
            continue
        items = read_json_list(path)
        n_rec = 0
        for idx, item in enumerate(items):
            context, turns, labels, ignored = item_turns(task, item)
            for k in ignored:
                report["ignored_fields"][f"{task}.{k}"] += 1
            if not turns:
                msg = f"{path}: item {idx} has keys {sorted(item)} which fit no known ECG-Expert-QA shape"
                if not opts.skip_bad_items:
                    raise DataError(msg)
                log.warning("skipping: %s", msg)
                report["removed"]["bad_item"] += 1
                continue
            convs = ([turns[i:i + 2] for i in range(0, len(turns) - 1, 2)] if labels.pop("split_pairs", False)
                     else [turns])
            for conv in convs:
                rec = _clean_conversation(task, path.name, idx, context, conv, labels, system_prompt, opts, report)
                if rec is not None:
                    records.append(rec)
                    n_rec += 1
        report["files"][path.name] = {"task": task, "items": len(items), "records_after_cleaning": n_rec}
    records = _drop_duplicates(records, opts, report)
    report["records"] = len(records)
    return records, report


def _clean_conversation(task, source, idx, context, turns, labels, system_prompt, opts, report) -> dict | None:
    fixed = broken = ws = 0

    def clean(s: str) -> str:
        nonlocal fixed, broken, ws
        s2, f, b = repair_mojibake(s)
        fixed, broken = fixed + f, broken + b
        s3 = normalize_whitespace(s2)
        ws += s3 != s2
        return s3

    turns = [(r, clean(t)) for r, t in turns]
    context = clean(context) if context else None
    labels = {k: clean(v) if isinstance(v, str) else v for k, v in labels.items()}
    turns = [(r, t) for r, t in turns if t]
    turns = _valid_turns(turns)
    if len(turns) < 2:
        report["removed"]["empty_question_or_answer"] += 1
        return None
    if fixed:
        report["repaired"]["mojibake_items"] += 1
    if ws:
        report["repaired"]["whitespace_items"] += 1
    flags = []
    if broken:
        if opts.unrecoverable == "drop":
            report["removed"]["mojibake_unrecoverable"] += 1
            return None
        flags.append("mojibake_unrecoverable")
        report["flagged"]["mojibake_unrecoverable"] += 1
    if task not in LIST_ANSWERS and looks_truncated(turns[-1][1]):
        if opts.drop_truncated:
            report["removed"]["truncated_answer"] += 1
            return None
        flags.append("truncated_answer")
        report["flagged"]["truncated_answer"] += 1
    rec = make_record(task, source, idx, context, turns, labels, system_prompt)
    rec["flags"] = flags
    return rec


def _drop_duplicates(records: list[dict], opts: CleanOptions, report: dict) -> list[dict]:
    """Exact duplicates (same id: same task, context and turns) go; so does a question answered both
    Yes and No, when ``drop_contradictory``: neither answer can be trusted as a reference."""
    seen, out = set(), []
    for r in records:
        if r["id"] in seen:
            report["removed"]["exact_duplicate"] += 1
            continue
        seen.add(r["id"])
        out.append(r)
    by_q: dict[tuple, set] = defaultdict(set)
    for r in out:
        if r["label_yesno"]:
            by_q[(r["task"], r["context"] or "", r["question"].lower())].add(r["label_yesno"])
    contra = {k for k, v in by_q.items() if len(v) > 1}
    if contra:
        kept = []
        for r in out:
            if (r["task"], r["context"] or "", r["question"].lower()) in contra:
                if opts.drop_contradictory:
                    report["removed"]["contradictory_answer"] += 1
                    continue
                r["flags"].append("contradictory_answer")
                report["flagged"]["contradictory_answer"] += 1
            kept.append(r)
        out = kept
    report["contradictory_questions"] = len(contra)
    return out
