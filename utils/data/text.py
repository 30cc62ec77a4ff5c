"""Text helpers shared by data preparation, rewards and evaluation: cleaning, words, numbers."""

from __future__ import annotations

import re
import unicodedata

# ----------------------------------------------------------------------------- mojibake
# ECG-Expert-QA holds some UTF-8 text that was once decoded as GBK: "’s" became "鈥檚". The data is
# English, so a run of CJK characters is the trace of that accident; encoding the run back to GBK
# gives the original UTF-8 bytes when none was lost.
_CJK_RUN = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]+")
# A lost third byte leaves a two-byte prefix we cannot complete: "鈮" is E2 89 (≠ ≤ ≥ ≈ ...).
UNRECOVERABLE = "\ufffd"


def repair_mojibake(text: str) -> tuple[str, int, int]:
    """Return ``(text, repaired, unrecoverable)`` counts of CJK runs fixed and left broken.

    >>> repair_mojibake("the heart鈥檚 rhythm")
    ('the heart’s rhythm', 1, 0)
    >>> repair_mojibake("rate 鈮70 bpm")
    ('rate \\ufffd70 bpm', 0, 1)
    """
    repaired = broken = 0

    def fix(m: re.Match) -> str:
        nonlocal repaired, broken
        run = m.group()
        try:
            out = run.encode("gbk").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            try:
                raw = run.encode("gbk")
            except UnicodeEncodeError:
                broken += 1
                return UNRECOVERABLE
            out = raw.decode("utf-8", errors="replace")
            broken += 1
            # keep what decodes, mark the rest with one replacement character
            return re.sub("\ufffd+", UNRECOVERABLE, out)
        repaired += 1
        return out

    return _CJK_RUN.sub(fix, text), repaired, broken


_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """NFC, no zero-width characters, single spaces, at most one blank line, stripped ends."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _ZERO_WIDTH.sub("", text)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


_TERMINAL = tuple(".!?)]\"'”’…:;")


def looks_truncated(text: str) -> bool:
    """An answer that stops without closing punctuation was cut off mid-sentence."""
    text = text.rstrip()
    return bool(text) and not text.endswith(_TERMINAL)


# ----------------------------------------------------------------------------- words
_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-case word tokens, as used for near-duplicate detection and lexical overlap."""
    return _WORD.findall(text.lower())


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# ----------------------------------------------------------------------------- yes / no
_YESNO_QUESTION = re.compile(
    r"^\s*(is|are|am|was|were|can|could|does|do|did|should|shall|will|would|has|have|had|may|might|must)\b",
    re.IGNORECASE)
_YESNO_ANSWER = re.compile(r"^\s*(yes|no)\b[\s,.!;:—-]", re.IGNORECASE)


def yes_no_of(answer: str) -> str | None:
    """'yes' / 'no' when the answer opens with that word, else None.

    >>> yes_no_of("Yes, you have the right to ..."), yes_no_of("Not always."), yes_no_of("No.")
    ('yes', None, 'no')
    """
    m = _YESNO_ANSWER.match(answer + " ")
    return m.group(1).lower() if m else None


def is_yes_no_question(question: str) -> bool:
    return bool(_YESNO_QUESTION.match(question))


# ----------------------------------------------------------------------------- numbers with units
# Canonical unit -> (dimension, factor to the dimension's base unit). Time's base is seconds so that
# "0.12 s" and "120 ms" compare equal; follow-up periods use the same dimension.
UNITS: dict[str, tuple[str, float]] = {
    "ms": ("time", 0.001), "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0),
    "day": ("time", 86400.0), "week": ("time", 604800.0), "month": ("time", 2629800.0),
    "year": ("time", 31557600.0),
    "bpm": ("rate", 1.0), "/min": ("rate", 1.0),
    "mm": ("length", 1.0), "cm": ("length", 10.0),
    "mv": ("voltage", 1.0), "µv": ("voltage", 0.001),
    "mmhg": ("pressure", 1.0), "%": ("percent", 1.0), "°": ("angle", 1.0),
    "mg": ("mass", 1.0), "g": ("mass", 1000.0), "kg": ("mass", 1e6),
    "meq/l": ("concentration", 1.0), "mmol/l": ("concentration", 1.0),
}
_UNIT_ALIASES = {
    "milliseconds": "ms", "millisecond": "ms", "msec": "ms", "ms": "ms",
    "seconds": "s", "second": "s", "secs": "s", "sec": "s", "s": "s",
    "minutes": "min", "minute": "min", "mins": "min", "min": "min",
    "hours": "h", "hour": "h", "hrs": "h", "hr": "h", "h": "h",
    "days": "day", "day": "day", "weeks": "week", "week": "week", "wks": "week",
    "months": "month", "month": "month", "years": "year", "year": "year", "yrs": "year",
    "beats per minute": "bpm", "beats/min": "bpm", "bpm": "bpm", "/min": "/min", "breaths per minute": "/min",
    "millimeters": "mm", "millimetres": "mm", "mm": "mm", "cm": "cm", "centimeters": "cm",
    "millivolts": "mv", "millivolt": "mv", "mv": "mv", "µv": "µv", "uv": "µv", "microvolts": "µv",
    "mmhg": "mmhg", "mm hg": "mmhg", "%": "%", "percent": "%", "°": "°", "degrees": "°", "degree": "°",
    "mg": "mg", "milligrams": "mg", "g": "g", "grams": "g", "kg": "kg",
    "meq/l": "meq/l", "mmol/l": "mmol/l",
}
_UNIT_RE = "|".join(sorted((re.escape(u) for u in _UNIT_ALIASES), key=len, reverse=True))
_NUM = r"[-+−]?\d+(?:[.,]\d+)?"
_NUMBER = re.compile(
    rf"(?<![\w.])(?P<lo>{_NUM})(?:\s*(?:-|–|to)\s*(?P<hi>{_NUM}))?\s*(?P<unit>{_UNIT_RE})(?![a-z])",
    re.IGNORECASE)


def _num(s: str) -> float:
    return float(s.replace("−", "-").replace(",", "") if s.count(",") and len(s.split(",")[-1]) == 3
                 else s.replace("−", "-").replace(",", "."))


def extract_numbers(text: str) -> list[dict]:
    """Numbers that carry a unit, with ranges kept as ``low``/``high``, in base units of their dimension.

    >>> [(n["low"], n["high"], n["unit"], n["dim"]) for n in extract_numbers("QRS > 120 ms; 0.12-0.20 s")]
    [(120.0, 120.0, 'ms', 'time'), (0.12, 0.2, 's', 'time')]
    """
    out = []
    for m in _NUMBER.finditer(text):
        unit = _UNIT_ALIASES[m.group("unit").lower()]
        dim, factor = UNITS[unit]
        try:
            lo = _num(m.group("lo"))
            hi = _num(m.group("hi")) if m.group("hi") else lo
        except ValueError:
            continue
        if hi < lo:
            lo, hi = hi, lo
        out.append({"text": m.group(0), "low": lo, "high": hi, "unit": unit, "dim": dim,
                    "base_low": lo * factor, "base_high": hi * factor})
    return out


_FOLLOWUP = re.compile(
    rf"\b(?:every|each|in|within|after|for)\s+(?:the\s+next\s+|about\s+|approximately\s+)?(?P<n>{_NUM}|one|two|three|four|"
    r"five|six|seven|eight|nine|ten|twelve|a|an)(?:\s*(?:-|–|to)\s*(?P<m>\d+))?\s*(?P<u>days?|weeks?|months?|years?)\b",
    re.IGNORECASE)
_WORD_NUM = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
             "eight": 8, "nine": 9, "ten": 10, "twelve": 12}


def followup_interval(text: str) -> tuple[str, float] | None:
    """The first follow-up period in a prognosis answer, as (text, days), e.g. ('every 3 months', 91.3)."""
    m = _FOLLOWUP.search(text)
    if not m:
        return None
    n = m.group("n").lower()
    lo = float(_WORD_NUM[n]) if n in _WORD_NUM else _num(n)
    hi = float(m.group("m")) if m.group("m") else lo
    unit = m.group("u").lower().rstrip("s")
    days = {"day": 1.0, "week": 7.0, "month": 30.44, "year": 365.25}[unit] * (lo + hi) / 2
    return m.group(0), round(days, 2)
