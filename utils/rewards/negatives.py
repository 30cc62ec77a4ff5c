"""Hard negatives for reward-model pairs: answers that look like the reference but are wrong (a flipped
verdict, altered numbers, a swapped direction, a truncation, a similar question's answer, a sample),
and pairs of two samples of the same question ranked by the benchmark's metrics.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict

from utils.core.config import UserError
from utils.data.text import extract_numbers, followup_interval, jaccard, words
from utils.rewards.facts import FLIP_KINDS, flip_fact
from utils.rewards.lexicon import DEFAULT_LEXICON, load_lexicon
from utils.rewards.overlap import benchmark_score, load_wordnet
from utils.rewards.reward_model import user_text
from utils.rewards.rules import rouge_l

NEGATIVE_TYPES = ("similar", "flip_yesno", "numbers", "truncate", "padded", "contradiction", "sampled", "ranked")


# A sample this close to its reference (ROUGE-L) is not a worse answer, so it is no "sampled" negative.
SAMPLED_MAX_ROUGE = 0.6


# A "ranked" pair's two samples differ by at least this much in benchmark score (the mean of ROUGE-L,
# BLEU-1 and METEOR, in [0, 1]): the metrics count shared words, so a smaller gap is often a rewording, not
# a better answer. With 4 samples of the CPU recipe's SFT model, 56% of the questions yield a pair ...
RANKED_MIN_GAP = 0.1


# ... and in length by at most this ratio (words): the capped reward model in GRPO rose while the answers
# lengthened (docs/EXPERIMENTS.md), so a pair must not be separable by length alone.
RANKED_MAX_LENGTH_RATIO = 1.5


# Below this many words an answer has no room to be cut short and still look like an answer.
MIN_TRUNCATE_WORDS = 8


# A "similar question" whose question or answer is this close to the item's is a paraphrase with the
# same answer, not a wrong answer. 0.8 word Jaccard is the split's near-duplicate threshold; answers
# with a TF-IDF cosine of 0.2 or more were, on reading a sample of the train split, mostly restatements
# of the reference (0.2 keeps ~3/4 of the neighbours; their MiniLM cosine with the reference: p90 0.8).
SIMILAR_MAX_QUESTION_JACCARD = 0.8


SIMILAR_MAX_ANSWER_COSINE = 0.2


SIMILAR_NEIGHBOURS = 10


# ============================================================================= hard negatives
_VERDICT = re.compile(r"^(\s*)(yes|no)\b", re.IGNORECASE)


# The first modal after the verdict, toggled so that the flipped answer is fluent and wrong, not a
# "No, you can ..." that a model could reject for being incoherent alone.
_MODALS = [("have the right", "do not have the right"), ("has the right", "does not have the right"),
           ("cannot", "can"), ("can not", "can"), ("can't", "can"), ("can", "cannot"),
           ("may not", "may"), ("may", "may not"), ("should not", "should"), ("should", "should not"),
           ("do not", "do"), ("don't", "do"), ("does not", "does"), ("doesn't", "does"),
           ("will not", "will"), ("won't", "will"), ("will", "will not"),
           ("is not", "is"), ("isn't", "is"), ("is", "is not"), ("are not", "are"), ("aren't", "are"),
           ("are", "are not"), ("must not", "must"), ("must", "must not"), ("need not", "need to")]


_MODAL_RE = re.compile(r"\b(" + "|".join(re.escape(a) for a, _ in _MODALS) + r")\b", re.IGNORECASE)


_MODAL_MAP = dict(_MODALS)


def _case_like(word: str, model: str) -> str:
    if model.isupper() and len(model) > 1:
        return word.upper()
    if model[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def flip_yesno(reference: str) -> str | None:
    """'Yes, you can ask ...' -> 'No, you cannot ask ...'; None when the answer has no leading verdict."""
    m = _VERDICT.match(reference)
    if not m:
        return None
    other = "no" if m.group(2).lower() == "yes" else "yes"
    rest = reference[m.end():]
    lead = re.match(r"[\s,.!;:—-]*", rest).group(0)  # the verdict's own punctuation ("Yes. It is ...")
    first, dot, tail = rest[len(lead):].partition(". ")
    mm = _MODAL_RE.search(first)
    if mm:
        first = first[:mm.start()] + _case_like(_MODAL_MAP[mm.group(1).lower()], mm.group(1)) + first[mm.end():]
    return m.group(1) + _case_like(other, m.group(2)) + lead + first + dot + tail


def contradict(reference: str, rng: random.Random) -> str | None:
    """The reference with one key fact swapped for its contrary everywhere it occurs: a direction word
    ('ST elevation' -> 'ST depression'), an ECG lead or a disease name, from the tables the terms reward's
    contradiction check and the audit use (:mod:`utils.rewards.facts`); None when it has none. (Numbers
    are the ``numbers`` negative type's.)"""
    flips = [f for k in FLIP_KINDS if k != "number" and (f := flip_fact(reference, rng, k)) is not None]
    return rng.choice(flips)[0] if flips else None


_DIGITS = re.compile(r"\d+(?:\.\d+)?")


# Factors that move a quantity far outside any tolerance (numbers within 10% agree), both ways.
_NUMBER_FACTORS = (0.1, 0.25, 0.5, 2.0, 3.0, 4.0, 10.0)


_CLEAR = 1.25  # an altered range must clear the original by 25%, so no tolerance lets them overlap


def _scaled(num: str, factor: float) -> str:
    decimals = len(num.split(".")[1]) if "." in num else 0
    value = float(num) * factor
    out = f"{value:.{decimals}f}"
    if float(out) == float(num):  # e.g. 0 stays 0: move it anyway
        out = f"{float(num) + 1:.{decimals}f}"
    return out


def alter_numbers(reference: str, rng: random.Random) -> str | None:
    """The reference with every number that carries a unit (and its follow-up period) scaled by one
    factor (0.1 to 10) that moves each of them clear of its original range; None when it has no such
    number or no factor does that."""
    spans = [n["text"] for n in extract_numbers(reference)]
    fu = followup_interval(reference)
    if fu:
        spans.append(fu[0])
    if not spans:
        return None
    ranges = [(n["low"], n["high"]) for n in extract_numbers(reference)] + ([(fu[1], fu[1])] if fu else [])
    ok = [f for f in _NUMBER_FACTORS
          if all(lo > 0 and (f * lo > hi * _CLEAR or f * hi * _CLEAR < lo) for lo, hi in ranges)]
    if not ok:  # e.g. a zero or a range too wide to move clear of itself
        return None
    factor = rng.choice(ok)
    out = reference
    for s in dict.fromkeys(spans):
        out = out.replace(s, _DIGITS.sub(lambda m: _scaled(m.group(0), factor), s))
    return out if out != reference else None


def truncate(reference: str, rng: random.Random) -> str | None:
    """The reference cut at 30-70% of its words, without closing punctuation; None when too short."""
    ws = reference.split()
    if len(ws) < MIN_TRUNCATE_WORDS:
        return None
    cut = rng.randint(max(2, int(0.3 * len(ws))), max(3, int(0.7 * len(ws))))
    return " ".join(ws[:cut]).rstrip(".,;:!?)\"'”’")


_SENTENCE = re.compile(r"\S.*?[.!?](?=\s|$)", re.DOTALL)


def pad(reference: str, other: str | None) -> str | None:
    """The reference with the first sentence of ``other`` (another question's answer) appended: longer and
    partly off the question. Truncated negatives teach that the longer answer wins; these teach that it does
    not by length alone. None without ``other``.

    >>> pad("The QT is long.", "Beta blockers slow the heart. They also lower blood pressure.")
    'The QT is long. Beta blockers slow the heart.'
    """
    if not other:
        return None
    m = _SENTENCE.match(other.strip())
    extra = (m.group(0) if m else other.strip()).strip()
    sep = "" if reference.rstrip().endswith((".", "!", "?")) else "."
    return f"{reference.rstrip()}{sep} {extra}"


def first_far_sample(samples: list[str], reference: str) -> str | None:
    """The first sample that is not a near-copy of the reference (ROUGE-L < SAMPLED_MAX_ROUGE), or None."""
    return next((a for a in samples if a.strip() and rouge_l(a, reference) < SAMPLED_MAX_ROUGE), None)


def far_apart(score_a: float, score_b: float, words_a: int, words_b: int) -> bool:
    """Whether two answers make a ranked pair: lengths within RANKED_MAX_LENGTH_RATIO and benchmark scores at
    least RANKED_MIN_GAP apart (form alone cannot separate them; the benchmark clearly does)."""
    return max(words_a, words_b) <= RANKED_MAX_LENGTH_RATIO * min(words_a, words_b) and \
        abs(score_a - score_b) >= RANKED_MIN_GAP


def ranked_pairs(samples: list[str], reference: str, wordnet=None, k: int = 1) -> list[tuple[str, str]]:
    """Up to ``k`` pairs (better, worse) of distinct samples whose lengths are within RANKED_MAX_LENGTH_RATIO
    and whose :func:`~utils.rewards.overlap.benchmark_score` differ by at least RANKED_MIN_GAP, the widest
    gaps first. Unlike a sample against the reference, both answers come from the same model, so the reward
    model can only tell them apart by what the benchmark measures, not by form.

    >>> ranked_pairs(["The QT interval is prolonged.", "The PR interval is short.", "QT is prolonged here."],
    ...              "The QT interval is prolonged.")
    [('The QT interval is prolonged.', 'The PR interval is short.')]
    """
    scored = [(benchmark_score(a, reference, wordnet), a, len(a.split()))
              for a in dict.fromkeys(x.strip() for x in samples) if a]
    found = []
    for i, (si, ai, ni) in enumerate(scored):
        for sj, aj, nj in scored[i + 1:]:
            if far_apart(si, sj, ni, nj):
                found.append((-abs(si - sj), (ai, aj) if si > sj else (aj, ai)))
    return [pair for _, pair in sorted(found, key=lambda x: x[0])[:k]]


def similar_answers(rows: list[dict], term_lexicon: str = DEFAULT_LEXICON) -> list[str | None]:
    """For each row, the reference of the most similar *different* question of the same rows (TF-IDF
    cosine of the questions), or None.

    The data holds many paraphrased questions whose answers are paraphrases too, and such an answer is
    not wrong. So a neighbour counts only when its question names other clinical terms (myocarditis
    vs. pericarditis), or, for questions without terms, shares under 80% of its words; and its answer
    is lexically far from the reference (see SIMILAR_MAX_ANSWER_COSINE)."""
    if len(rows) < 2:
        return [None] * len(rows)
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    lex = load_lexicon(term_lexicon)
    questions = [r.get("question") or "" for r in rows]
    mat = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, stop_words="english", min_df=1).fit_transform(
        questions)
    qterms = [lex.find(q) for q in questions]
    qsets = [set(words(q)) for q in questions]
    answers = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, stop_words="english", min_df=1).fit_transform(
        [r.get("reference") or "" for r in rows])
    out: list[str | None] = []
    k = min(SIMILAR_NEIGHBOURS + 1, len(rows))
    for start in range(0, len(rows), 512):  # chunks keep the dense similarity block small
        sims = (mat[start:start + 512] @ mat.T).toarray()
        for off, row_sims in enumerate(sims):
            i = start + off
            row_sims[i] = -1.0
            cand = np.argpartition(-row_sims, k - 1)[:k]
            pick = None
            for j in sorted(cand, key=lambda j: -row_sims[j]):
                if j == i or rows[j].get("reference") == rows[i].get("reference"):
                    continue
                if qterms[i] or qterms[j]:
                    if qterms[i] == qterms[j]:
                        continue
                elif jaccard(qsets[i], qsets[j]) >= SIMILAR_MAX_QUESTION_JACCARD:
                    continue
                if answers[i].multiply(answers[j]).sum() >= SIMILAR_MAX_ANSWER_COSINE:
                    continue
                pick = rows[j]["reference"]
                break
            out.append(pick)
    return out


def build_pairs(rows: list[dict], types: list[str], seed: int, sampled: dict[str, list[str]] | None = None,
                term_lexicon: str = DEFAULT_LEXICON, ranked_per_item: int = 1) -> list[dict]:
    """Preference pairs from one split's rows: for each row and negative type that applies to it,
    ``{"id", "task", "type", "user", "reference", "chosen", "rejected"}``; the chosen answer is the reference except in
    "ranked" pairs (the better of two samples, up to ``ranked_per_item`` of them). ``sampled`` maps row ids
    to a model's sampled answers."""
    rng = random.Random(seed)
    similar = similar_answers(rows, term_lexicon) if {"similar", "padded"} & set(types) else [None] * len(rows)
    wordnet = load_wordnet() if "ranked" in types else None
    pairs = []
    for row, sim in zip(rows, similar):
        ref = (row.get("reference") or "").strip()
        if not ref:
            continue
        for t in types:
            if t == "ranked":
                for better, worse in ranked_pairs((sampled or {}).get(row.get("id"), []), ref, wordnet,
                                                  ranked_per_item):
                    pairs.append({"id": row.get("id"), "task": row.get("task"), "type": t, "user": user_text(row),
                                  "reference": ref, "chosen": better, "rejected": worse})
                continue
            if t == "similar":
                neg = sim
            elif t == "flip_yesno":
                neg = flip_yesno(ref) if row.get("label_yesno") in ("yes", "no") else None
            elif t == "numbers":
                neg = alter_numbers(ref, rng)
            elif t == "truncate":
                neg = truncate(ref, rng)
            elif t == "padded":
                neg = pad(ref, sim)
            elif t == "contradiction":
                neg = contradict(ref, rng)
            elif t == "sampled":
                neg = first_far_sample((sampled or {}).get(row.get("id"), []), ref)
            else:
                raise UserError(f"negatives: unknown type {t!r}; expected one of {', '.join(NEGATIVE_TYPES)}")
            if neg and neg.strip() and neg.strip() != ref:
                pairs.append({"id": row.get("id"), "task": row.get("task"), "type": t, "user": user_text(row),
                              "reference": ref, "chosen": ref, "rejected": neg.strip()})
    return pairs


def balanced_subsample(pairs: list[dict], n: int, seed: int, weights: dict[str, float] | None = None) -> list[dict]:
    """``n`` pairs, shuffled, with each negative type's share proportional to its weight (1 when not
    given) as far as the type has pairs; a type that runs out leaves its share to the others. Without
    this the plentiful types (truncate, similar) would crowd out the rare ones (flip_yesno, numbers),
    and an easy type learnt in a few dozen pairs (truncate) would take as much time as a hard one."""
    rng = random.Random(seed)
    by: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        by[p["type"]].append(p)
    for v in by.values():
        rng.shuffle(v)
    weights = {t: (weights or {}).get(t, 1.0) for t in by}
    if not n or n >= len(pairs):
        out = [p for v in by.values() for p in v]
    else:
        # stride scheduling: the next pair comes from the type furthest below its share
        taken = Counter()
        out = []
        live = [t for t in sorted(by) if weights[t] > 0]
        while len(out) < n and live:
            t = min(live, key=lambda t: ((taken[t] + 1) / weights[t], t))
            out.append(by[t].pop())
            taken[t] += 1
            if not by[t]:
                live.remove(t)
    rng.shuffle(out)
    return out


def subsample(items: list, n: int, seed: int) -> list:
    """A seeded subset of ``n`` items in their original order (all of them when n is 0)."""
    if not n or n >= len(items):
        return list(items)
    keep = set(random.Random(seed).sample(range(len(items)), n))
    return [x for i, x in enumerate(items) if i in keep]
