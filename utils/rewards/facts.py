"""Key facts of an ECG answer that one word can turn false (a direction such as prolonged/shortened, an
ECG lead, a disease name) with their contraries, and :func:`flip_fact`, which copies a reference and
changes one key fact (those, or a number): the tables the ``terms`` reward's contradiction check and the
audit's flipped-fact attacks share.

A flipped fact leaves an answer that reads like the reference, word for word but one, and is wrong:
ROUGE-L and sentence embeddings barely move, so only a reward that knows which words are facts, and
which word contradicts which, can score it below the truth.
"""

from __future__ import annotations

import random
import re
from collections import Counter

from utils.data.text import extract_numbers, followup_interval

FLIP_KINDS = ("number", "direction", "lead", "disease")


# ============================================================================= the tables
# Direction words: a pair of words whose swap turns a true ECG statement into a false one. Each pair is
# here for the statements it flips; the first word of a pair maps to the second and back (a word in two
# pairs keeps its first partner). Vague pairs (more/less, common/rare, early/late, with/without) stay out:
# swapped, the statement often still reads true, and an honest paraphrase uses them freely. So does
# regular/irregular: in these answers it is mostly "regular follow-up", not the rhythm.
DIRECTIONS: list[tuple[str, str]] = [
    ("prolonged", "shortened"), ("prolongation", "shortening"),   # QT/PR/QRS duration
    ("prolongs", "shortens"), ("prolong", "shorten"),
    ("increased", "decreased"), ("increase", "decrease"),       # risk, amplitude, rate, automaticity
    ("increases", "decreases"), ("increasing", "decreasing"),
    ("elevation", "depression"), ("elevations", "depressions"),  # ST segment: injury vs ischaemia
    ("elevated", "depressed"),
    ("tachycardia", "bradycardia"), ("tachycardias", "bradycardias"),  # fast vs slow rhythms
    ("left", "right"),                                           # axis, bundle branch, ventricle, atrium
    ("positive", "negative"),                                    # deflections, test results
    ("present", "absent"), ("presence", "absence"),              # P waves, Q waves, pulses
    ("high", "low"), ("higher", "lower"),                        # voltage, risk, potassium
    ("wide", "narrow"), ("widened", "narrowed"),                 # QRS width: ventricular vs supraventricular
    ("widening", "narrowing"),
    ("upright", "inverted"),                                     # T-wave / P-wave polarity
    ("peaked", "flattened"),                                     # T waves: hyper- vs hypokalaemia
    ("long", "short"), ("longer", "shorter"),                    # intervals
    ("fast", "slow"), ("faster", "slower"),                      # rates, conduction
    ("above", "below"),                                          # thresholds ("a QTc above 460 ms")
    ("normal", "abnormal"),                                      # the verdict on a finding
    ("acute", "chronic"),                                        # infarction, pericarditis
    ("anterior", "inferior"), ("posterior", "anterior"),         # infarct territory
    ("benign", "malignant"),                                     # early repolarisation, arrhythmias
]


# ECG leads, each with the leads it is confused with, nearest territory mistake first: the flip takes the
# first one the text does not name (so 'V1 and V6' does not just become 'V6 and V1'). Mirror images across
# the precordium (V1<->V6, V2<->V5, V3<->V4) and inferior<->lateral/aVR in the limb leads: each swap moves
# a finding to another wall of the heart. Lead I is recognised only inside a list of leads.
LEADS: dict[str, tuple[str, ...]] = {
    "V1": ("V6", "V5", "V4"), "V2": ("V5", "V6", "V4"), "V3": ("V4", "V6", "V1"),
    "V4": ("V3", "V1", "V2"), "V5": ("V2", "V1", "V3"), "V6": ("V1", "V2", "V3"),
    "I": ("III", "aVF", "II"), "II": ("aVL", "aVR", "I"), "III": ("aVL", "I", "aVR"),
    "aVR": ("II", "aVF", "III"), "aVL": ("III", "aVF", "II"), "aVF": ("aVL", "I", "aVR"),
}


# Disease and finding names an answer can mistake for each other: same family, opposite or different
# mechanism, different ECG or treatment. The first name not already in the text replaces the found one.
DISEASES: dict[str, tuple[str, ...]] = {
    "atrial fibrillation": ("atrial flutter",), "atrial flutter": ("atrial fibrillation",),   # f vs F waves
    "ventricular fibrillation": ("ventricular tachycardia",),                                  # pulseless vs not
    "ventricular tachycardia": ("ventricular fibrillation", "supraventricular tachycardia"),
    "supraventricular tachycardia": ("ventricular tachycardia",),                              # narrow vs wide QRS
    "hyperkalemia": ("hypokalemia",), "hypokalemia": ("hyperkalemia",),           # peaked T vs U waves
    "hyperkalaemia": ("hypokalaemia",), "hypokalaemia": ("hyperkalaemia",),
    "hypercalcemia": ("hypocalcemia",), "hypocalcemia": ("hypercalcemia",),       # short vs long QT
    "hypermagnesemia": ("hypomagnesemia",), "hypomagnesemia": ("hypermagnesemia",),
    "hypernatremia": ("hyponatremia",), "hyponatremia": ("hypernatremia",),
    "hyperthyroidism": ("hypothyroidism",), "hypothyroidism": ("hyperthyroidism",),  # tachy- vs bradycardia
    "hypertension": ("hypotension",), "hypotension": ("hypertension",),
    "hyperglycemia": ("hypoglycemia",), "hypoglycemia": ("hyperglycemia",),
    "hyperthermia": ("hypothermia",), "hypothermia": ("hyperthermia",),           # Osborn waves
    "STEMI": ("NSTEMI",), "NSTEMI": ("STEMI",),                                   # reperfusion now or not
    "LBBB": ("RBBB",), "RBBB": ("LBBB",), "LAFB": ("LPFB",), "LPFB": ("LAFB",),   # axis, QRS morphology
    "LVH": ("RVH",), "RVH": ("LVH",),
    "pericarditis": ("myocarditis",), "myocarditis": ("pericarditis",),           # diffuse ST vs myocyte injury
    "hypertrophic cardiomyopathy": ("dilated cardiomyopathy",),
    "dilated cardiomyopathy": ("hypertrophic cardiomyopathy",),
    "first-degree": ("third-degree",), "second-degree": ("third-degree",),        # AV block: benign vs pacing
    "third-degree": ("first-degree",),
    "Mobitz type I": ("Mobitz type II",), "Mobitz type II": ("Mobitz type I",),   # Wenckebach vs infranodal
    "Mobitz I": ("Mobitz II",), "Mobitz II": ("Mobitz I",),
    "long QT syndrome": ("short QT syndrome",), "short QT syndrome": ("long QT syndrome",),
    "aortic stenosis": ("aortic regurgitation",), "aortic regurgitation": ("aortic stenosis",),
    "mitral stenosis": ("mitral regurgitation",), "mitral regurgitation": ("mitral stenosis",),
}


_CASE_SENSITIVE_DISEASES = {"STEMI", "NSTEMI", "LBBB", "RBBB", "LAFB", "LPFB", "LVH", "RVH"}


def _symmetric(pairs: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for a, b in pairs:
        out.setdefault(a, b)
        out.setdefault(b, a)
    return out


DIRECTION_MAP = _symmetric(DIRECTIONS)


_DIRECTION_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, DIRECTION_MAP), key=len, reverse=True))
                           + r")\b", re.IGNORECASE)


# Phrases where a direction word is no direction: a patient's right, "as long as", "no longer", a patient
# who may "present with" symptoms.
_NOT_DIRECTION = re.compile(r"\bright\s+(?:to|away|now)\b|\ball\s+right\b|\bas\s+long\s+as\b|\bno\s+longer\b|"
                            r"\bpresent\s+(?:with|as)\b", re.IGNORECASE)


def _phrase(name: str) -> str:
    """A regex for a name: words joined by a space or a hyphen ('first-degree' = 'first degree')."""
    return r"[\s-]+".join(re.escape(w) for w in re.split(r"[\s-]+", name))


# Longest names first, so that 'Mobitz type II' is not read as 'Mobitz type I' + 'I'.
_DISEASE_NAMES = sorted(DISEASES, key=len, reverse=True)


_DISEASE_RE = re.compile(
    "|".join(rf"(?P<d{i}>{'' if n in _CASE_SENSITIVE_DISEASES else '(?i:'}\b{_phrase(n)}\b"
             rf"{'' if n in _CASE_SENSITIVE_DISEASES else ')'})" for i, n in enumerate(_DISEASE_NAMES)))


# A lead: V1-V6 (any case), aVR/aVL/aVF (as written: 'AVR' is also aortic valve replacement), and the
# roman limb leads, which count only inside a list of leads ('Mobitz II' and 'type I' are not leads).
_LEAD_TOKEN = r"(?:[Vv][1-6](?![0-9Rr])|aV[RLF]|III|II|I)"
_LEAD_LIST = re.compile(rf"\b{_LEAD_TOKEN}(?:(?:\s*(?:,|/|-|–|\band\b|\bor\b|&)\s*|\s+){_LEAD_TOKEN})*\b")
_LEAD_IN_LIST = re.compile(rf"\b({_LEAD_TOKEN})\b")
_LEAD_WORD = re.compile(r"\bleads?\s*$", re.IGNORECASE)


def _canon_lead(tok: str) -> str:
    return tok.upper() if tok[0] in "vV" else tok


def lead_spans(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, lead)`` of each ECG lead named in ``text``: V1-V6 and aVR/aVL/aVF anywhere; I, II
    and III inside a list that follows 'lead(s)' or names one of the others.

    >>> [s[2] for s in lead_spans("ST elevation in leads II, III and aVF, not in V1; Mobitz II is no lead.")]
    ['II', 'III', 'aVF', 'V1']
    """
    out = []
    for m in _LEAD_LIST.finditer(text):
        toks = [(t.start(), t.end(), t.group(1)) for t in _LEAD_IN_LIST.finditer(m.group(0))]
        sure = any(t[2] not in ("I", "II", "III") for t in toks)
        after_word = bool(_LEAD_WORD.search(text[max(0, m.start() - 8):m.start()]))
        for s, e, tok in toks:
            if tok in ("I", "II", "III") and not (sure or after_word):
                continue
            out.append((m.start() + s, m.start() + e, _canon_lead(tok)))
    return out


def _disease_spans(text: str) -> list[tuple[int, int, str]]:
    out = []
    for m in _DISEASE_RE.finditer(text):
        name = _DISEASE_NAMES[int(m.lastgroup[1:])]
        out.append((m.start(), m.end(), name))
    return out


def _direction_spans(text: str) -> list[tuple[int, int, str]]:
    skip = [(m.start(), m.end()) for m in _NOT_DIRECTION.finditer(text)]
    return [(m.start(), m.end(), m.group(1).lower()) for m in _DIRECTION_RE.finditer(text)
            if not any(s <= m.start() < e for s, e in skip)]


_SPANS = {"direction": _direction_spans, "lead": lead_spans, "disease": _disease_spans}


def key_facts(text: str) -> Counter:
    """How often ``text`` states each key fact, as ``(kind, name)``: direction words (lower case), leads
    and disease names (as in :data:`LEADS` and :data:`DISEASES`).

    >>> sorted(key_facts("Hyperkalemia: peaked T waves in V2 and V3, QRS widened.").items())
    [(('direction', 'peaked'), 1), (('direction', 'widened'), 1), (('disease', 'hyperkalemia'), 1), \
(('lead', 'V2'), 1), (('lead', 'V3'), 1)]
    """
    c: Counter = Counter()
    for kind, find in _SPANS.items():
        c.update((kind, name) for _, _, name in find(text))
    return c


def _contraries(kind: str, name: str) -> tuple[str, ...]:
    if kind == "direction":
        return (DIRECTION_MAP[name],) if name in DIRECTION_MAP else ()
    return (LEADS if kind == "lead" else DISEASES).get(name, ())


def contradictions(answer: str, reference: str, reference_facts: Counter | None = None) -> list[tuple[str, str, str]]:
    """The key facts of the reference that the answer replaces by a contrary: ``(kind, reference's word,
    answer's word)`` for each fact the answer states less often than the reference while stating one of
    its contraries more often. So an answer that names both ('unlike hypokalemia, hyperkalemia ...')
    contradicts nothing, and neither does one that leaves a fact out or words it otherwise.
    ``reference_facts`` (``key_facts(reference)``) saves reading the reference again.

    >>> contradictions("The QT interval is shortened in hypocalcemia.", "The QT interval is prolonged in hypocalcemia.")
    [('direction', 'prolonged', 'shortened')]
    >>> contradictions("Hypocalcemia prolongs the QT interval.", "The QT interval is prolonged in hypocalcemia.")
    []
    """
    ref = key_facts(reference) if reference_facts is None else reference_facts
    ans = key_facts(answer)
    out = []
    for (kind, name), n in sorted(ref.items()):
        if ans[(kind, name)] >= n:
            continue
        for other in _contraries(kind, name):
            key = (kind, other.lower() if kind == "direction" else other)
            if ans[key] > ref[key]:
                out.append((kind, name, key[1]))
                break
    return out


# ============================================================================= flipping one fact
def _case_like(word: str, model: str) -> str:
    """``word`` in the case of the word it replaces ('Prolonged' -> 'Shortened', 'LEFT' -> 'RIGHT');
    names with capitals of their own ('aVL', 'V6', 'NSTEMI', 'Mobitz type I') as they are."""
    if word != word.lower():
        return word
    if model.isupper() and len(model) > 1:
        return word.upper()
    if model[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _replace_all(text: str, spans: list[tuple[int, int, str]], name: str, new: str) -> str:
    out, last = [], 0
    for s, e, n in spans:
        if n == name:
            out += [text[last:s], _case_like(new, text[s:e])]
            last = e
    return "".join(out) + text[last:]


def _flip_named(text: str, kind: str, rng: random.Random) -> str | None:
    """One named fact of ``kind`` replaced, everywhere, by its first contrary that the text does not
    name and that reads as a fact of its kind where it lands ('II' outside a list of leads does not)."""
    find = _SPANS[kind]
    spans = find(text)
    present = {n.lower() for _, _, n in spans}
    options = []
    for name in dict.fromkeys(n for _, _, n in spans):
        for new in _contraries(kind, name):
            if new.lower() in present:
                continue
            out = _replace_all(text, spans, name, new)
            if any(n.lower() == new.lower() for _, _, n in find(out)):
                options.append(out)
                break
    return rng.choice(options) if options else None


# Factors that move a quantity out of any tolerance (numbers within 10% agree): "120 ms" -> "180 ms".
_FACTORS = (0.5, 1.5, 2.0, 3.0)


_CLEAR = 1.25  # the new range clears the old one by 25%


_DIGITS = re.compile(r"\d+(?:\.\d+)?")


def _scale(num: str, factor: float) -> str:
    decimals = len(num.split(".")[1]) if "." in num else 0
    return f"{float(num) * factor:.{decimals}f}"


def _flip_number(text: str, rng: random.Random) -> str | None:
    """One quantity with a unit (or the follow-up period) moved clear of its value, everywhere it is written."""
    spans = [n["text"] for n in extract_numbers(text)]
    fu = followup_interval(text)
    if fu:
        spans.append(fu[0])
    options = []
    for span in dict.fromkeys(spans):
        old = [float(x) for x in _DIGITS.findall(span)]
        if not old or min(old) <= 0:
            continue
        for f in _FACTORS:
            new = _DIGITS.sub(lambda m: _scale(m.group(0), f), span)
            vals = [float(x) for x in _DIGITS.findall(new)]
            # written as rounded, the new value must still clear the old one (and not be zero)
            if min(vals) > 0 and (min(vals) > max(old) * _CLEAR or max(vals) * _CLEAR < min(old)):
                options.append((span, new))
    if not options:
        return None
    span, new = rng.choice(options)
    return text.replace(span, new)


def flip_fact(reference: str, rng: random.Random, kind: str | None = None) -> tuple[str, str] | None:
    """The reference with one key fact changed, and the kind of fact: a number with a unit or the
    follow-up period ('120 ms' -> '180 ms'), a direction word ('prolonged' -> 'shortened'), an ECG lead
    ('V1' -> 'V6') or a disease name ('hyperkalemia' -> 'hypokalemia'), everywhere it occurs. ``kind``
    (one of :data:`FLIP_KINDS`) asks for that kind only; else a kind the reference has is drawn. None
    when the reference has no such fact.

    >>> flip_fact("The QT interval is prolonged in hypocalcemia.", random.Random(0), "direction")
    ('The QT interval is shortened in hypocalcemia.', 'direction')
    >>> flip_fact("ST elevation in V1 and V2.", random.Random(0), "lead")[0] in ("ST elevation in V6 and V2.",
    ...                                                                       "ST elevation in V1 and V5.")
    True
    >>> flip_fact("Ask your doctor.", random.Random(0)) is None
    True
    """
    if kind is not None and kind not in FLIP_KINDS:
        raise ValueError(f"flip kind {kind!r}: expected one of {', '.join(FLIP_KINDS)}")
    results = []
    for k in [kind] if kind else FLIP_KINDS:
        if k == "number":
            out = _flip_number(reference, rng)
        else:
            out = _flip_named(reference, k, rng)
        if out is not None and out != reference:
            results.append((out, k))
    if not results:
        return None
    return results[0] if kind else rng.choice(results)
