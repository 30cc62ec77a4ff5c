"""The ECG term lexicon (data/ecg_terms.txt): phrases, synonyms and the token folding the terms reward
and the key-term metrics share.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from utils.core.config import UserError

# ============================================================================= key clinical terms
REPO_ROOT = Path(__file__).resolve().parents[1]


DEFAULT_LEXICON = "data/ecg_terms.txt"


_TOKEN = re.compile(r"[a-z0-9]+")


def _fold(tok: str) -> str:
    """Crude plural folding, applied alike to the lexicon and to answers: 'waves' and 'wave' match."""
    if len(tok) <= 3:
        return tok
    if tok.endswith("ies"):
        return tok[:-3] + "y"
    if tok.endswith(("ches", "shes", "xes", "sses")):
        return tok[:-2]
    if tok.endswith("s") and not tok.endswith(("ss", "us", "is")):
        return tok[:-1]
    return tok


def term_tokens(text: str) -> list[str]:
    """Lower-case alphanumeric tokens, plurals folded: 'ST-segment elevations' -> ['st', 'segment', 'elevation']."""
    return [_fold(t) for t in _TOKEN.findall(text.lower())]


@dataclass(frozen=True)
class Lexicon:
    """Term token sequences -> canonical term; synonyms and abbreviations map to one canonical name."""
    terms: dict[tuple[str, ...], str]
    max_len: int

    def find(self, text: str) -> set[str]:
        """Canonical terms in ``text``, longest match first: 'left bundle branch block' is not also
        'bundle branch block'."""
        toks = term_tokens(text)
        found, i = set(), 0
        while i < len(toks):
            for n in range(min(self.max_len, len(toks) - i), 0, -1):
                hit = self.terms.get(tuple(toks[i:i + n]))
                if hit is not None:
                    found.add(hit)
                    i += n
                    break
            else:
                i += 1
        return found

    def __len__(self) -> int:
        return len(set(self.terms.values()))


def _resolve_path(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p  # the shipped lexicon, also when run from another folder
    return p


def parse_lexicon(lines: Iterable[str], source: str = "lexicon") -> Lexicon:
    """``canonical | synonym | ...`` per line; ``#`` starts a comment. Later duplicates are errors."""
    terms: dict[tuple[str, ...], str] = {}
    for no, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        names = [n.strip() for n in line.split("|") if n.strip()]
        canonical = " ".join(term_tokens(names[0]))
        if not canonical:
            raise UserError(f"{source}: line {no}: term {names[0]!r} has no letters or digits")
        for name in names:
            key = tuple(term_tokens(name))
            if not key:
                raise UserError(f"{source}: line {no}: synonym {name!r} has no letters or digits")
            if key in terms and terms[key] != canonical:
                raise UserError(f"{source}: line {no}: {name!r} already stands for {terms[key]!r}")
            terms[key] = canonical
    if not terms:
        raise UserError(f"{source}: no terms (expected lines such as 'atrial fibrillation | af')")
    return Lexicon(terms, max(len(k) for k in terms))


@functools.lru_cache(maxsize=8)
def _load_lexicon(path: str, mtime: float) -> Lexicon:
    return parse_lexicon(Path(path).read_text(encoding="utf-8").splitlines(), path)


def load_lexicon(path: str | Path = DEFAULT_LEXICON) -> Lexicon:
    """The term lexicon at ``path`` (cached; reloaded when the file changes)."""
    p = _resolve_path(path)
    if not p.is_file():
        raise UserError(f"term_lexicon: {path} not found (expected a text file of terms, e.g. {DEFAULT_LEXICON})")
    return _load_lexicon(str(p), p.stat().st_mtime)
