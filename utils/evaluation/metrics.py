"""The figures evaluation reports: the rewards' own scores (the code GRPO trains with, the benchmark's
ROUGE-L, BLEU-1 and METEOR among them) plus key-term precision and recall and the answer's length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from utils.core.config import UserError
from utils.data.formats import parse
from utils.evaluation.config import EvalConfig
from utils.rewards.lexicon import load_lexicon
from utils.rewards.mix import REWARDS, score_rows
from utils.rewards.rules import term_sets

log = logging.getLogger(__name__)


# ============================================================================= metrics
@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    group: str      # overlap | clinical | form: the headline tables' sections
    help: str
    unit: bool = True  # a score in [0, 1] (plotted together); False: a count such as words


METRICS: list[Metric] = [
    Metric("rouge", "ROUGE-L", "overlap", "ROUGE-L F1 against the reference (rouge-score, Porter stemmer); the "
           "rouge reward"),
    Metric("bleu1", "BLEU-1", "overlap", "unigram BLEU with brevity penalty (nltk, smoothing method 1) on lower-case "
           "word tokens; the bleu1 reward"),
    Metric("meteor", "METEOR", "overlap", "METEOR (nltk: exact, Porter-stem and WordNet-synonym matches) on lower-case "
           "word tokens; the meteor reward"),
    Metric("semantic", "semantic", "overlap", "cosine similarity of all-MiniLM-L6-v2 embeddings of answer and "
           "reference; the semantic reward"),
    Metric("yesno", "yes/no acc", "clinical", "share of yes/no questions whose answer opens with the reference's "
           "verdict; the yesno reward (majority baseline beside it)"),
    Metric("terms", "key terms F1", "clinical", "F1 of the lexicon's ECG/cardiology terms in answer vs reference, "
           "beyond those the question names; the terms reward"),
    Metric("terms_p", "key terms P", "clinical", "share of the answer's key terms that the reference names"),
    Metric("terms_r", "key terms R", "clinical", "share of the reference's key terms that the answer names"),
    Metric("numbers", "numbers", "clinical", "agreement of numbers with units and follow-up periods with the "
           "reference's; the numbers reward"),
    Metric("format", "format", "form", "share of answers that follow the answer format; the format reward"),
    Metric("length", "length score", "form", "1 unless the answer is too long, too short, truncated or looping; "
           "the length reward"),
    Metric("reward_model", "reward model", "form", "the trained reward model's preference for the answer over the "
           "reference (0.5: as good); the reward_model reward"),
    Metric("total", "reward (mix)", "form", "the weighted mean of the rewards in `rewards` (what GRPO maximises)"),
    Metric("judge", "judge", "form", "judge model's rubric score, 1-5 mapped to 0-1"),
    Metric("words", "words", "form", "answer length in words", unit=False),
]


METRIC_BY_NAME = {m.name: m for m in METRICS}


# ============================================================================= scoring
def term_precision_recall(answer: str, reference: str, lexicon,
                          question: str = "") -> tuple[float | None, float | None]:
    """Precision and recall of the key terms the terms reward matches (its lexicon and canonical names, less
    the question's terms); (None, None) when the reference names no term beyond the question's. An answer
    naming no such term has precision 0."""
    got, want = term_sets(answer, reference, question, lexicon)
    if not want:
        return None, None
    hit = len(got & want)
    return (hit / len(got) if got else 0.0), hit / len(want)


def reward_weights(cfg: EvalConfig, with_reward_model: bool) -> dict[str, float]:
    """Every reward, weighted as in the config's mix (weight 0: reported, not in the total)."""
    return {n: float(cfg.rewards.get(n, 0.0)) for n in REWARDS if n != "reward_model" or with_reward_model}


def score_answers(completions: list[str], rows: list[dict], answer_format: str, cfg: EvalConfig,
                  reward_model: str | None) -> list[dict]:
    """Per-item metrics: the rewards (shared code) plus evaluation's own figures; None where a metric
    does not apply to the item."""
    weights = reward_weights(cfg, reward_model is not None)
    shared = score_rows(completions, rows, weights, answer_format, reward_model, base_model=cfg.base_model,
                        **cfg.reward_options())
    lexicon = load_lexicon(cfg.term_lexicon)
    out = []
    for c, r, s in zip(completions, rows, shared):
        answer, ref = parse(c, answer_format).answer, r.get("reference") or ""
        d = {m: s.get(m) for m in REWARDS if m in s}
        d["total"] = s.get("total")
        d["terms_p"], d["terms_r"] = (term_precision_recall(answer, ref, lexicon, r.get("question") or "")
                                      if ref.strip() else (None, None))
        d["words"] = float(len(answer.split()))
        out.append(d)
    return out


def reward_model_status(cfg: EvalConfig) -> tuple[str | None, str | None]:
    """``(reward_model, None)`` when the configured reward model can score, else ``(None, note)``: the
    column is left out with a note rather than stopping a comparison of the models that do exist."""
    if not cfg.reward_model:
        return None, None
    from utils.models.resolve import resolve_model

    try:
        resolve_model(cfg.reward_model, cfg.base_model)
    except UserError as e:
        return None, f"reward model column left out: {e}"
    return cfg.reward_model, None


def _scoring_key(completions: list[str], rows: list[dict], answer_format: str, cfg: EvalConfig,
                 reward_model: str | None) -> str:
    """A hash of everything a score depends on: the answers and items themselves, the mix and its options,
    the files of the reward model, the sentence-embedding model and the lexicon, whether WordNet is there
    (METEOR), the scoring packages' versions, and the code."""
    from utils.core.fingerprint import PACKAGES, file_sha256, package_versions, source_sha256
    from utils.models.resolve import model_identity
    from utils.rewards.lexicon import _resolve_path
    from utils.rewards.overlap import load_wordnet
    from utils.rewards.rules import resolve_semantic_model

    rm = None
    if reward_model:
        from utils.models.resolve import resolve_model

        rm = model_identity(resolve_model(reward_model, cfg.base_model))
    lexicon = _resolve_path(cfg.term_lexicon) if cfg.term_lexicon else None
    weights = reward_weights(cfg, reward_model is not None)
    key = {"completions": completions, "rows": rows, "format": answer_format, "weights": weights,
           "options": cfg.reward_options(), "base_model": cfg.base_model, "reward_model": rm,
           "semantic": model_identity(resolve_semantic_model(cfg.semantic_model)) if "semantic" in weights else None,
           "lexicon": file_sha256(lexicon) if lexicon and lexicon.is_file() else cfg.term_lexicon,
           "wordnet": load_wordnet() is not None, "code": source_sha256(),
           "packages": package_versions(PACKAGES + ("nltk", "rouge-score", "sentence-transformers"))}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_scores(name: str, completions: list[str], rows: list[dict], answer_format: str, cfg: EvalConfig,
                  reward_model: str | None) -> list[dict]:
    """:func:`score_answers`, kept in ``<cache_dir>/scores/``: a run that compares a model again with the
    same answers on the same items (the pipeline's last evaluation, after the side lane's base and SFT;
    adding a model to a comparison) reads its scores instead of computing them again. The key
    (:func:`_scoring_key`) changes with anything that could change a score, the code included."""
    key = _scoring_key(completions, rows, answer_format, cfg, reward_model)
    from utils.evaluation.answers import file_slug

    path = Path(cfg.cache_dir) / "scores" / f"{file_slug(name)}-{key}.json"
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(scores, list) and len(scores) == len(rows):
            log.info("%s: scores cached (%s)", name, path)
            return scores
    except (OSError, ValueError):
        pass  # none yet, or a torn write: score again
    log.info("%s: scoring %d answers", name, len(rows))
    scores = score_answers(completions, rows, answer_format, cfg, reward_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(scores), encoding="utf-8")
    tmp.replace(path)  # whole or absent: two evaluations side by side never read half a file
    return scores
