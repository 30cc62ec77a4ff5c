"""BLEU-1 and METEOR, the ECG-Expert-QA paper's word-overlap metrics beside ROUGE-L, as rewards.

Evaluation reports them through these same functions (:mod:`utils.evaluation.metrics`), so a GRPO mix
that weighs them optimises exactly what the report measures. Both read lower-case word tokens
(:func:`utils.data.text.words`). METEOR needs nltk's WordNet (``bash scripts/setup_wordnet.sh``).
"""

from __future__ import annotations

import functools
import logging
import warnings

from utils.data.text import words
from utils.rewards.rules import _answers, _column, _finite, _str, rouge_l

log = logging.getLogger(__name__)

# An answer longer than this is scored on its first words, as if the rest matched nothing (the score is
# scaled by the share kept): both metrics are super-linear in the answer's length, and a looping
# 100k-character completion must not stall a GRPO step. GRPO's completions (<= 96 tokens here) and the
# references (p99 well under 200 words) are far below it.
MAX_WORDS = 1024


# ============================================================================= the metrics
@functools.lru_cache(maxsize=4)
def _wordnet_reader(paths: tuple[str, ...]):
    """The reader for one nltk search path, or None (warned once per path: GRPO asks every step)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    try:
        with warnings.catch_warnings():
            # METEOR reads English synonyms only; the multilingual (OMW) data is not needed
            warnings.filterwarnings("ignore", message="The multilingual functions")
            return WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)
    except (LookupError, OSError):
        log.warning("METEOR skipped: nltk finds no WordNet data; install it with `bash scripts/setup_wordnet.sh` "
                    "(or python -c \"import nltk; nltk.download('wordnet')\")")
        return None


def load_wordnet():
    """nltk's WordNet reader, or None (with one warning line) when WordNet is not installed for nltk:
    METEOR is then left out rather than computed without its synonym stage."""
    import nltk

    return _wordnet_reader(tuple(nltk.data.path))


@functools.lru_cache(maxsize=1)
def _smoothing():
    from nltk.translate.bleu_score import SmoothingFunction

    return SmoothingFunction().method1


def bleu1(answer: str, reference: str) -> float:
    """Sentence BLEU-1 (nltk, smoothing method 1) on lower-case word tokens; 0 for an empty answer.

    >>> round(bleu1("The cat ran away", "the cat sat"), 3)
    0.5
    """
    from nltk.translate.bleu_score import sentence_bleu

    hyp, ref = words(answer), words(reference)
    if not hyp or not ref:
        return 0.0
    head = hyp[:MAX_WORDS]
    return _finite(sentence_bleu([ref], head, weights=(1.0,), smoothing_function=_smoothing())
                   * len(head) / len(hyp))


def meteor(answer: str, reference: str, wordnet) -> float:
    """METEOR on lower-case word tokens with nltk's defaults (alpha 0.9, beta 3, gamma 0.5): exact,
    Porter-stem and WordNet-synonym matches; 0 for an empty answer."""
    from nltk.translate.meteor_score import meteor_score

    hyp, ref = words(answer), words(reference)
    if not hyp or not ref:
        return 0.0
    head = hyp[:MAX_WORDS]
    return _finite(meteor_score([ref], head, wordnet=wordnet) * len(head) / len(hyp))


def benchmark_score(answer: str, reference: str, wordnet) -> float:
    """The mean of the benchmark's three word-overlap metrics (ROUGE-L, BLEU-1, METEOR) against the
    reference; METEOR is left out of the mean when ``wordnet`` is None.

    >>> round(benchmark_score("the cat sat", "the cat sat", None), 3)
    1.0
    """
    scores = [rouge_l(answer, reference), bleu1(answer, reference)]
    if wordnet is not None:
        scores.append(meteor(answer, reference, wordnet))
    return sum(scores) / len(scores)


# ============================================================================= as rewards
def bleu1_reward(completions, reference=None, answer_format: str = "plain", **kwargs) -> list[float | None]:
    """BLEU-1 of the answer against the reference: unigram precision times a brevity penalty, so an answer
    shorter than the reference loses (exp(1 - ref/answer length)) even when every word is right. Range
    [0, 1]; None without a reference.

    >>> bleu1_reward(["The cat ran away", "the cat"], reference=["the cat sat", "the cat sat"])
    [0.5, 0.606...]
    """
    answers = _answers(completions, answer_format)
    refs = _column({"reference": reference}, "reference", len(answers))
    return [None if not _str(r).strip() else bleu1(a, _str(r)) for a, r in zip(answers, refs)]


def meteor_reward(completions, reference=None, answer_format: str = "plain", **kwargs) -> list[float | None]:
    """METEOR of the answer against the reference: a recall-weighted F-mean of word matches (exact, stem,
    WordNet synonym) with a penalty for scattered matches. Range [0, 1]; None without a reference, and for
    every item when WordNet is not installed (one warning; GRPO refuses a positive weight then).

    >>> meteor_reward(["the heart is quick"], reference=["the heart is fast"])  # doctest: +SKIP
    [0.992...]
    """
    answers = _answers(completions, answer_format)
    refs = _column({"reference": reference}, "reference", len(answers))
    wordnet = load_wordnet()
    if wordnet is None:
        return [None] * len(answers)
    return [None if not _str(r).strip() else meteor(a, _str(r), wordnet) for a, r in zip(answers, refs)]
