"""Statistics of the report: bootstrap confidence intervals, paired comparisons, majority baselines,
balanced yes/no accuracy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from utils.evaluation.answers import GenerationRun, ModelSpec
from utils.evaluation.config import EvalConfig


# ============================================================================= statistics
def _values(scores: list[dict], metric: str, idx: list[int]) -> list[float]:
    return [scores[i][metric] for i in idx if scores[i].get(metric) is not None]


def bootstrap_ci(values, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict | None:
    """Mean and percentile-bootstrap CI of ``values``: ``{mean, lo, hi, n}``; None without values."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return {"mean": mean, "lo": mean, "hi": mean, "n": int(x.size)}
    res = stats.bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                          vectorized=True, rng=np.random.default_rng(seed))
    return {"mean": mean, "lo": float(res.confidence_interval.low), "hi": float(res.confidence_interval.high),
            "n": int(x.size)}


def paired_comparison(a, b, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict | None:
    """``b - a`` on the same items: mean difference, its bootstrap CI, and a two-sided paired permutation
    (sign-flip) p-value; None without pairs."""
    import numpy as np
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size == 0:
        return None
    d = b - a
    out = bootstrap_ci(d, n_resamples, confidence, seed)
    if np.all(d == 0):
        out["p"] = 1.0
        return out

    def mean_diff(x, y, axis=-1):
        return np.mean(y - x, axis=axis)

    res = stats.permutation_test((a, b), mean_diff, permutation_type="samples", n_resamples=n_resamples,
                                 vectorized=True, rng=np.random.default_rng(seed))
    out["p"] = float(res.pvalue)
    return out


def majority_baseline(rows: list[dict], idx: list[int]) -> dict | None:
    """Accuracy of always answering the most frequent yes/no label of these items."""
    labels = [rows[i]["label_yesno"] for i in idx if rows[i].get("label_yesno") in ("yes", "no")]
    if not labels:
        return None
    label, n = Counter(labels).most_common(1)[0]
    return {"label": label, "accuracy": n / len(labels), "n": len(labels)}


def balanced_accuracy(rows: list[dict], scores: list[dict], idx: list[int]) -> float | None:
    """Yes/no accuracy macro-averaged over the two labels: always "yes" scores 0.5 however skewed the
    items are (the plain accuracy of always-"yes" is the majority share). None unless both labels occur.

    >>> rows = [{"label_yesno": "yes"}] * 3 + [{"label_yesno": "no"}]
    >>> balanced_accuracy(rows, [{"yesno": 1.0}] * 3 + [{"yesno": 0.0}], [0, 1, 2, 3])
    0.5
    """
    per_label = []
    for label in ("yes", "no"):
        vals = [scores[i]["yesno"] for i in idx
                if rows[i].get("label_yesno") == label and scores[i].get("yesno") is not None]
        if not vals:
            return None
        per_label.append(sum(vals) / len(vals))
    return sum(per_label) / 2


def summarize(rows: list[dict], scores: dict[str, list[dict]], metrics: list[str], cfg: EvalConfig) -> dict:
    """``{"groups": [...], "figures": {model: {group: {metric: ci}}}, "majority": {group: ...}}``, group
    'all' plus one per task."""
    groups = {"all": list(range(len(rows)))}
    for t in sorted({r["task"] for r in rows}):
        groups[t] = [i for i, r in enumerate(rows) if r["task"] == t]
    figures: dict = {}
    for name, sc in scores.items():
        figures[name] = {g: {m: bootstrap_ci(_values(sc, m, idx), cfg.bootstrap, cfg.confidence, cfg.seed)
                             for m in metrics} for g, idx in groups.items()}
    majority = {g: majority_baseline(rows, idx) for g, idx in groups.items()}
    balanced = {name: {g: balanced_accuracy(rows, sc, idx) for g, idx in groups.items()} for name, sc in scores.items()}
    return {"groups": list(groups), "sizes": {g: len(v) for g, v in groups.items()}, "figures": figures,
            "majority": majority, "balanced_accuracy": balanced}


def compare_models(scores: dict[str, list[dict]], metrics: list[str], cfg: EvalConfig) -> list[dict]:
    """Every later model against every earlier one, per metric, on the items both have a value for."""
    names = list(scores)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            row = {"a": a, "b": b, "metrics": {}}
            for m in metrics:
                pairs = [(x[m], y[m]) for x, y in zip(scores[a], scores[b])
                         if x.get(m) is not None and y.get(m) is not None]
                row["metrics"][m] = paired_comparison([p[0] for p in pairs], [p[1] for p in pairs], cfg.bootstrap,
                                                      cfg.confidence, cfg.seed)
            out.append(row)
    return out


# What one evaluation run produced: the report is written from this.
@dataclass
class EvalResult:
    cfg: EvalConfig
    source: str
    rows: list[dict]
    models: list[ModelSpec]
    answers: dict[str, list[str]]
    scores: dict[str, list[dict]]
    metrics: list[str]
    summary: dict
    paired: list[dict]
    generation: dict[str, GenerationRun]
    notes: list[str] = field(default_factory=list)
    judge_replies: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
