"""The trained reward model as a reward: scoring (question, answer) pairs with a one-logit classifier.
"""

from __future__ import annotations

import logging
import math

from utils.core.config import UserError
from utils.models.special_tokens import escape_special_tokens
from utils.rewards.rules import _answers, _column, _finite, _str


# ============================================================================= trained reward model
def reward_model_reward(completions, reward_model: str | None = None, prompts=None, prompt=None, question=None,
                        reference=None, answer_format: str = "plain", base_model: str | None = None,
                        reward_model_ceiling: float = 1.0, **kwargs) -> list[float | None]:
    """The trained reward model's preference for the answer over the reference:
    ``sigmoid(r(q, answer) - r(q, reference))``, the Bradley-Terry probability that the answer would be
    chosen over the reference (0.5 for the reference itself), or ``sigmoid(r(q, answer))`` for items
    without a reference. ``reward_model`` is a model reference (``reward``, a folder); the model is
    loaded once per process. An empty answer scores 0. Range [0, 1]; None for an item whose score (or its
    reference's) is not finite, which the scorer counts and logs (:meth:`RewardScorer.scores`).

    A reward model trained with ``reference_tokens`` > 0 reads the reference beside the question and grades
    the answer against it: its reward is ``sigmoid(r(q, reference, answer))``, with no reference term to
    subtract (the reference would grade itself as a perfect copy).

    ``reward_model_ceiling`` c < 1 returns ``min(p, c) / c``: with c = 0.5 an answer the model rates at
    or above the reference scores 1, like the reference itself. A policy that pleases a small reward
    model climbs beyond the reference (docs/EXPERIMENTS.md, Phase 3); the cap leaves it nothing to gain
    there, while answers worse than the reference still rank below it.

    >>> reward_model_reward(["Yes, you may."], reward_model="reward", question=["May I refuse?"],
    ...                     reference=["Yes, you may refuse."])  # doctest: +SKIP
    [0.47]
    """
    if not reward_model:
        raise UserError("reward 'reward_model' needs a model: set reward_model (e.g. 'reward', made by "
                        "`python reward_model.py --config configs/cpu/reward.yaml`)")

    answers = _answers(completions, answer_format)
    n = len(answers)
    prm = _column({"p": prompts if prompts is not None else prompt}, "p", n)
    qs = _column({"question": question}, "question", n)
    refs = [_str(r) for r in _column({"reference": reference}, "reference", n)]
    # An empty answer says nothing: 0, as for the semantic reward (and no forward pass).
    idx = [i for i, a in enumerate(answers) if a.strip()]
    out: list[float | None] = [0.0] * n
    if idx:
        got = get_scorer(reward_model, base_model).preference([prm[i] for i in idx], [qs[i] for i in idx],
                                                              [answers[i] for i in idx], [refs[i] for i in idx])
        for i, v in zip(idx, got):
            # None: a non-finite score, counted and logged
            out[i] = None if v is None else _finite(min(v, reward_model_ceiling) / reward_model_ceiling)
    return out


log = logging.getLogger(__name__)


# ============================================================================= inputs
def user_text(row: dict) -> str:
    """What the reward model reads as the question: the last user turn of the prompt (with its record
    or medical advice, as the policy saw it), else the question."""
    prompt = row.get("prompt") if isinstance(row, dict) else None
    if isinstance(prompt, list):
        for m in reversed(prompt):
            if isinstance(m, dict) and m.get("role") == "user":
                return str(m.get("content") or "")
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    q = row.get("question") if isinstance(row, dict) else None
    return q if isinstance(q, str) else ""


# What introduces the reference in the user turn of a reward model that reads it (reference_tokens > 0).
REFERENCE_HEADER = "\n\nReference answer: "


def encode(tok, user: str, answer: str, max_length: int, max_prompt_tokens: int, reference: str | None = None,
           reference_tokens: int = 0) -> list[int]:
    """Token ids of one (question, answer) conversation under the tokenizer's chat template, at most
    ``max_length``: the question keeps its last ``max_prompt_tokens`` tokens, the answer is cut to fit.
    With ``reference_tokens`` > 0 the user turn also holds the first ``reference_tokens`` tokens of
    ``reference`` after the question (REFERENCE_HEADER), so the model grades the answer against it.
    Training and scoring both go through here, so the model always reads the same layout. Special-token
    strings in any text are read as text (utils.models.special_tokens)."""
    # A very long answer is cut by characters first; no token fits in less than a character.
    answer = escape_special_tokens(answer[: max_length * 8], tok)
    user = escape_special_tokens(user, tok)
    u = tok(user, add_special_tokens=False)["input_ids"]
    if len(u) > max_prompt_tokens:
        user = tok.decode(u[-max_prompt_tokens:])
    if reference_tokens and reference and reference.strip():
        r = tok(escape_special_tokens(reference[: reference_tokens * 8], tok), add_special_tokens=False)["input_ids"]
        user = user + REFERENCE_HEADER + tok.decode(r[:reference_tokens])

    def render(a: str) -> list[int]:
        ids = tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": a}],
                                      tokenize=True, return_dict=True)["input_ids"]
        return list(ids)

    ids = render(answer)
    if len(ids) > max_length:
        a = tok(answer, add_special_tokens=False)["input_ids"]
        keep = max(0, len(a) - (len(ids) - max_length) - 2)  # 2: a re-tokenised cut may merge differently
        ids = render(tok.decode(a[:keep]))
    return ids[:max_length]


class RewardScorer:
    """Scores (question, answer) pairs with a trained reward model: raw logits, or the Bradley-Terry
    preference of an answer over the reference; a model trained with ``reference_tokens`` reads the reference
    too and grades the answer against it."""

    def __init__(self, model, tok, max_length: int, max_prompt_tokens: int, batch_size: int = 16,
                 reference_tokens: int = 0):
        self.model, self.tok = model, tok
        self.max_length, self.max_prompt_tokens, self.batch_size = max_length, max_prompt_tokens, batch_size
        self.reference_tokens = reference_tokens  # > 0: the model reads the reference beside the question
        self._ref_cache: dict[tuple[str, str], float] = {}
        self.non_finite = 0  # scores whose logit was NaN or infinite, in this process

    @classmethod
    def load(cls, ref: str, base_model: str | None = None, device: str | None = None) -> "RewardScorer":
        from utils.core.artifacts import read_train_config
        from utils.models.loading import load_for_inference
        from utils.models.resolve import resolve_model

        path = resolve_model(ref, base_model)
        meta = read_train_config(path) or {}
        # An adapter names its base by the folder it was trained on; elsewhere the recipe's reference (e.g.
        # smollm2-135m-instruct) finds the same model.
        model, tok = load_for_inference(path, base_model or meta.get("base_model"), head="seqcls", device=device,
                                        keep_layers=meta.get("keep_layers", 0) or 0)
        device = str(next(model.parameters()).device)
        log.info("reward model %s loaded on %s", path, device)
        return cls(model, tok, meta.get("max_length", 256), meta.get("max_prompt_tokens", 96),
                   meta.get("score_batch_size", 16), meta.get("reference_tokens", 0) or 0)

    def scores(self, users: list[str], answers: list[str], refs: list[str] | None = None) -> list[float]:
        """The raw reward (one logit) of each (question, answer), or of each (question, reference, answer)
        for a model that reads the reference; NaN where the logit is not finite.

        A non-finite logit is a broken model or an overflow, not a judgement: it is counted
        (``self.non_finite``) and logged, and stays NaN (never a made-up 0) so that every consumer sees it:
        :meth:`preference` turns it into None, "no score"."""
        import torch

        refs = refs if refs is not None else [None] * len(users)
        seqs = [encode(self.tok, u, a, self.max_length, self.max_prompt_tokens, r, self.reference_tokens)
                for u, a, r in zip(users, answers, refs)]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = [math.nan] * len(seqs)
        device = next(self.model.parameters()).device
        pad = self.tok.pad_token_id
        was_training = self.model.training
        self.model.eval()
        try:
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):  # right padding, as the trainer's collator pads
                    ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
                    mask[row, :len(seqs[i])] = 1
                with torch.inference_mode():
                    logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for row, i in enumerate(idx):
                    v = float(logits[row, 0])
                    out[i] = v if math.isfinite(v) else math.nan
        finally:
            self.model.train(was_training)
        bad = sum(1 for v in out if math.isnan(v))
        if bad:
            self.non_finite += bad
            log.warning("reward model: %d of %d scores are not finite (NaN or infinite logits; %d in this process); "
                        "those items get no reward_model value", bad, len(out), self.non_finite)
        return out

    def preference(self, prompts: list, questions: list, answers: list[str], refs: list[str]) -> list[float | None]:
        """sigmoid(r(q, answer) - r(q, reference)) per item (sigmoid(r(q, answer)) without a reference, and
        sigmoid(r(q, reference, answer)) for a model that reads the reference); None where a score is not
        finite. Reference scores are cached, since GRPO scores many answers to one question."""
        users = [user_text({"prompt": p, "question": q}) for p, q in zip(prompts, questions)]
        if self.reference_tokens:  # the model grades against the reference it reads: no reference term
            return [_sigmoid(s) if math.isfinite(s) else None for s in self.scores(users, answers, refs)]
        if len(self._ref_cache) > 50000:  # cleared before the look-up, so every reference below is scored
            self._ref_cache.clear()
        todo = [(u, r) for u, r in dict.fromkeys(zip(users, refs)) if r.strip() and (u, r) not in self._ref_cache]
        fresh = dict(zip(todo, self.scores([u for u, _ in todo], [r for _, r in todo]))) if todo else {}
        # A non-finite reference score is not cached: it is scored, counted and logged again next time.
        self._ref_cache.update((k, v) for k, v in fresh.items() if math.isfinite(v))
        raw = self.scores(users, answers)
        out = []
        for u, r, s in zip(users, refs, raw):
            base = (fresh[(u, r)] if (u, r) in fresh else self._ref_cache[(u, r)]) if r.strip() else 0.0
            out.append(_sigmoid(s - base) if math.isfinite(s) and math.isfinite(base) else None)
        return out


def _sigmoid(x: float) -> float:
    x = max(-60.0, min(60.0, x))  # exp overflows far beyond where the sigmoid is already 0 or 1
    return 1.0 / (1.0 + math.exp(-x))


_SCORERS: dict[tuple[str, str | None], RewardScorer] = {}


def get_scorer(ref: str, base_model: str | None = None) -> RewardScorer:
    """The reward model ``ref`` (``reward``, a folder ...), loaded once per process."""
    key = (ref, base_model)
    if key not in _SCORERS:
        _SCORERS[key] = RewardScorer.load(ref, base_model)
    return _SCORERS[key]
