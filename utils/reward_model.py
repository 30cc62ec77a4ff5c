"""The trained reward model and the reward tooling of reward_model.py.

* Preference pairs (:func:`build_pairs`): the reference answer is *chosen*; *rejected* is a hard
  negative made from it or from its split: the answer to a similar but different question
  (``similar``), the reference with its yes/no verdict and modal flipped (``flip_yesno``), with its
  numbers changed (``numbers``), cut short (``truncate``), with a clinical term swapped for its
  opposite (``contradiction``), or an answer sampled from a model (``sampled``). Pairs for the
  held-out accuracy come from the test split only, and "similar" answers from the same split as
  the question, so that nothing of the test split reaches training.
* Training (:func:`train_reward_model`): a sequence-classification head (one logit) on the recipe's
  base, LoRA through TRL's ``RewardTrainer``; the finished adapter goes to ``models/reward`` with its
  metrics: pairwise accuracy per negative type on the test pairs, beside the rule mix's accuracy.
* Scoring (:class:`RewardScorer`, :func:`get_scorer`): what the ``reward_model`` reward of
  ``utils.rewards`` calls; the model is loaded once per process.
* ``score`` and ``audit`` (:func:`score_file`, :func:`run_audit`): the command line's scoring of a
  JSONL file with the configured mix, and the reward-hacking audit.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from utils.config import UserError, fld, non_negative, positive
from utils.data import DataError, read_jsonl
from utils.rewards import DEFAULT_LEXICON, RewardMix, completion_text, load_lexicon, term_tokens
from utils.text import extract_numbers, followup_interval, is_yes_no_question, jaccard, words, yes_no_of
from utils.training import TrainConfig

log = logging.getLogger(__name__)

NEGATIVE_TYPES = ("similar", "flip_yesno", "numbers", "truncate", "contradiction", "sampled")
SUBCOMMANDS = ("train", "score", "audit", "terms")
# Below this many words an answer has no room to be cut short and still look like an answer.
MIN_TRUNCATE_WORDS = 8
# A "similar question" whose question or answer is this close to the item's is a paraphrase with the
# same answer, not a wrong answer. 0.8 word Jaccard is the split's near-duplicate threshold; answers
# with a TF-IDF cosine of 0.2 or more were, on reading a sample of the train split, mostly restatements
# of the reference (0.2 keeps ~3/4 of the neighbours; their MiniLM cosine with the reference: p90 0.8).
SIMILAR_MAX_QUESTION_JACCARD = 0.8
SIMILAR_MAX_ANSWER_COSINE = 0.2
SIMILAR_NEIGHBOURS = 10


@dataclass
class RewardModelConfig(TrainConfig, RewardMix):
    """reward_model.py's config: the common training fields (utils/training.py), the reward mix that
    ``score`` and ``audit`` use (utils/rewards.py), and the pair, scoring and audit settings."""

    TRL_CONFIG: ClassVar[str] = "RewardConfig"

    data_dir: str = fld("data/processed", "Folder written by prepare_data.py (grpo/train.jsonl, "
                        "grpo/validation.jsonl, eval/test.jsonl).")
    negatives: list[str] = fld(help="Kinds of rejected answers to build pairs from (see utils/reward_model.py).",
                               choices=NEGATIVE_TYPES,
                               default_factory=lambda: ["similar", "flip_yesno", "numbers", "truncate",
                                                        "contradiction"])
    max_train_pairs: int = fld(0, "Train on a seeded subset of this many pairs, negative types in the shares "
                               "negative_weights gives; 0: all.",
                               check=(non_negative, "an integer >= 0"))
    negative_weights: dict[str, float] = fld(
        help="Relative share of each negative type in the training pairs (a type left out: 1; 0: none).",
        default_factory=dict, check=(lambda d: all(k in NEGATIVE_TYPES and v >= 0 for k, v in d.items()),
                                     f"a mapping of negative types ({', '.join(NEGATIVE_TYPES)}) to weights >= 0"))
    max_eval_pairs: int = fld(0, "Validation pairs for the trainer's periodic evaluation; 0: none.",
                              check=(non_negative, "an integer >= 0"))
    max_test_items: int = fld(0, "Test items whose pairs measure the held-out accuracy (seeded subset, each "
                              "item's reference scored once for all its negatives); 0: all.",
                              check=(non_negative, "an integer >= 0"))
    max_length: int = fld(256, "Tokens per scored sequence (question + answer); the answer is cut to fit.",
                          check=(positive, "an integer > 0"))
    max_prompt_tokens: int = fld(96, "Tokens of the question kept (its end, where the question is).",
                                 check=(positive, "an integer > 0"))
    keep_layers: int = fld(0, "Build the reward model on the first N transformer layers of the base only "
                           "(shallower: faster to train and to score); 0: all layers.",
                           check=(non_negative, "an integer >= 0"))
    lora_layers: int = fld(0, "Put LoRA on the top N (kept) layers only: the backward pass stops at the lowest "
                           "trainable layer; 0: every layer.", check=(non_negative, "an integer >= 0"))
    center_rewards_coefficient: float = fld(0.01, "Pull the mean reward towards 0 (TRL's auxiliary loss), so "
                                            "scores stay in a stable range.", check=(non_negative, "a number >= 0"))
    score_batch_size: int = fld(16, "Sequences per reward-model forward pass when scoring.",
                                check=(positive, "an integer > 0"))
    sample_model: str = fld("", "Model whose sampled answers are 'sampled' negatives (base, sft, a folder); "
                            "empty: none.")
    sample_items: int = fld(200, "Train items to sample answers for (test items: in proportion, at least 50).",
                            check=(non_negative, "an integer >= 0"))
    sample_max_new_tokens: int = fld(128, "Tokens per sampled answer.", check=(positive, "an integer > 0"))
    input: str = fld("", "score: JSONL file to score (question, reference, completion; optional task, label).")
    output: str = fld("", "score: where the scored JSONL goes (default: next to the input, *.scored.jsonl); "
                      "audit: JSON file for the table (optional).")
    audit_items: int = fld(100, "audit: test items to attack (seeded sample).", check=(positive, "an integer > 0"))
    terms_top: int = fld(60, "terms: frequent phrases to list that the lexicon lacks.",
                         check=(positive, "an integer > 0"))
    system_prompt_file: str = fld("data/system_prompt.txt", "audit: the system prompt the 'echo the system "
                                  "prompt' attack repeats.")
    run_dir: str = fld("runs/reward", "Checkpoints and TensorBoard logs of the run.")
    output_dir: str = fld("", "The finished reward model; empty: models/reward (under $ECG_MODELS_DIR when set).")

    def __post_init__(self):
        TrainConfig.__post_init__(self)
        RewardMix.__post_init__(self)
        if self.merge:
            raise ValueError("merge: the reward model is merged when it is loaded; expected merge: false")
        if self.max_prompt_tokens >= self.max_length:
            raise ValueError(f"max_prompt_tokens {self.max_prompt_tokens} leaves no room for the answer in "
                             f"max_length {self.max_length}; expected max_prompt_tokens < max_length")
        if self.keep_layers and self.lora_layers > self.keep_layers:
            raise ValueError(f"lora_layers {self.lora_layers} > keep_layers {self.keep_layers}; expected at most "
                             "the kept layers")
        if "sampled" in self.negatives and not self.sample_model:
            raise ValueError("negatives has 'sampled' but sample_model is empty; set sample_model (e.g. sft)")


def output_dir(cfg: RewardModelConfig) -> Path:
    from utils.models import models_root

    return Path(cfg.output_dir) if cfg.output_dir else models_root() / "reward"


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


def encode(tok, user: str, answer: str, max_length: int, max_prompt_tokens: int) -> list[int]:
    """Token ids of one (question, answer) conversation under the tokenizer's chat template, at most
    ``max_length``: the question keeps its last ``max_prompt_tokens`` tokens, the answer is cut to fit.
    Training and scoring both go through here, so the model always reads the same layout."""
    # A very long answer is cut by characters first; no token fits in less than a character.
    answer = answer[: max_length * 8]
    u = tok(user, add_special_tokens=False)["input_ids"]
    if len(u) > max_prompt_tokens:
        user = tok.decode(u[-max_prompt_tokens:])

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


# Opposites whose swap turns a true clinical statement into a false one. Vaguer pairs (more/less,
# common/rare, early/late) were left out: swapped, they often still read as true.
_SWAPS = [("left", "right"), ("elevation", "depression"), ("elevated", "depressed"), ("tachycardia", "bradycardia"),
          ("increase", "decrease"), ("increased", "decreased"), ("increases", "decreases"),
          ("prolonged", "shortened"), ("prolongation", "shortening"), ("high", "low"), ("higher", "lower"),
          ("hyperkalemia", "hypokalemia"), ("hypercalcemia", "hypocalcemia"), ("hypertension", "hypotension"),
          ("wide", "narrow"), ("widened", "narrowed"), ("upright", "inverted"), ("regular", "irregular"),
          ("atrial", "ventricular"), ("atria", "ventricles"), ("anterior", "inferior"), ("benign", "malignant"),
          ("peaked", "flattened"), ("presence", "absence"), ("systolic", "diastolic"),
          ("depolarization", "repolarization")]
_SWAP_MAP = {**dict(_SWAPS), **{b: a for a, b in _SWAPS}}
_SWAP_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _SWAP_MAP), key=len, reverse=True)) + r")\b",
                      re.IGNORECASE)


def contradict(reference: str, rng: random.Random) -> str | None:
    """The reference with one clinical word swapped for its opposite everywhere it occurs ('ST
    elevation' -> 'ST depression'); None when it has none of the words."""
    found = sorted({m.group(1).lower() for m in _SWAP_RE.finditer(reference)})
    if not found:
        return None
    pick = rng.choice(found)
    pair = {pick, _SWAP_MAP[pick]}
    return _SWAP_RE.sub(lambda m: _case_like(_SWAP_MAP[m.group(1).lower()], m.group(1))
                        if m.group(1).lower() in pair else m.group(1), reference)


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


def build_pairs(rows: list[dict], types: list[str], seed: int, sampled: dict[str, str] | None = None,
                term_lexicon: str = DEFAULT_LEXICON) -> list[dict]:
    """Preference pairs from one split's rows: for each row and negative type that applies to it,
    ``{"id", "task", "type", "user", "chosen", "rejected"}``. ``sampled`` maps row ids to model answers."""
    rng = random.Random(seed)
    similar = similar_answers(rows, term_lexicon) if "similar" in types else [None] * len(rows)
    pairs = []
    for row, sim in zip(rows, similar):
        ref = (row.get("reference") or "").strip()
        if not ref:
            continue
        for t in types:
            if t == "similar":
                neg = sim
            elif t == "flip_yesno":
                neg = flip_yesno(ref) if row.get("label_yesno") in ("yes", "no") else None
            elif t == "numbers":
                neg = alter_numbers(ref, rng)
            elif t == "truncate":
                neg = truncate(ref, rng)
            elif t == "contradiction":
                neg = contradict(ref, rng)
            elif t == "sampled":
                neg = (sampled or {}).get(row.get("id"))
            else:
                raise UserError(f"negatives: unknown type {t!r}; expected one of {', '.join(NEGATIVE_TYPES)}")
            if neg and neg.strip() and neg.strip() != ref:
                pairs.append({"id": row.get("id"), "task": row.get("task"), "type": t, "user": user_text(row),
                              "chosen": ref, "rejected": neg.strip()})
    return pairs


def sample_answers(cfg: RewardModelConfig, rows: list[dict], n: int, seed: int) -> dict[str, str]:
    """Answers sampled from ``cfg.sample_model`` for a seeded subset of ``n`` rows, keyed by row id.
    Answers too close to their reference (ROUGE-L >= 0.6) are dropped: they are not worse."""
    if n <= 0 or not rows:
        return {}
    from utils.generation import generate, load_for_generation
    from utils.rewards import parse, rouge_l

    pick = random.Random(seed).sample(rows, min(n, len(rows)))
    model, tok = load_for_generation(cfg.sample_model, cfg.base_model)
    texts = generate(model, tok, [r["prompt"] for r in pick], max_new_tokens=cfg.sample_max_new_tokens,
                     batch_size=cfg.score_batch_size, do_sample=True, temperature=1.0, top_p=0.95, seed=seed,
                     progress=True)
    out = {}
    for r, t in zip(pick, texts):
        a = parse(t, cfg.answer_format).answer
        if a and rouge_l(a, r["reference"]) < 0.6:
            out[r["id"]] = a
    log.info("sampled %d usable negative answers from %s", len(out), cfg.sample_model)
    return out


def load_split(cfg: RewardModelConfig, name: str) -> list[dict]:
    path = Path(cfg.data_dir) / {"train": "grpo/train.jsonl", "validation": "grpo/validation.jsonl",
                                 "test": "eval/test.jsonl"}[name]
    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("reference"), str) or not isinstance(r.get("question"), str):
            raise DataError(f"{path}: row {i} lacks a 'reference' or 'question' string (expected the rows "
                            "prepare_data.py writes)")
    return rows


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


# ============================================================================= the model
def _lora_targets(cfg: RewardModelConfig):
    if cfg.lora_target_modules != ["all-linear"]:
        return list(cfg.lora_target_modules)
    # PEFT takes 'all-linear' only without a layer selection; these are every linear layer of a Llama block.
    return "all-linear" if not cfg.lora_layers else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"]


def peft_config(cfg: RewardModelConfig, n_layers: int):
    if cfg.adapter != "lora":
        return None
    from peft import LoraConfig

    layers = list(range(n_layers - cfg.lora_layers, n_layers)) if cfg.lora_layers else None
    return LoraConfig(task_type="SEQ_CLS", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=_lora_targets(cfg), layers_to_transform=layers, bias="none")


def load_seqcls(path: str, dtype, keep_layers: int = 0, quantization_config=None, device_map=None):
    """A one-logit sequence classifier on the model at ``path`` (a full model folder or Hub id)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kwargs = dict(num_labels=1, dtype=dtype, device_map=device_map)
    if keep_layers:
        kwargs["num_hidden_layers"] = keep_layers
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    # The new score head (and, with keep_layers, the unused layers) are reported as a load warning.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"{path}: could not load as a sequence classifier ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_train_seqcls(cfg: RewardModelConfig, tok):
    from utils.models import adapter_base, pick_dtype, resolve_model
    from utils.training import precision_flags, quantization_config

    _, _, dtype = precision_flags(cfg)
    bnb = quantization_config(cfg)
    device_map = None
    if bnb is not None:
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index}
    path = resolve_model(cfg.base_model)
    base = adapter_base(path)
    if base is not None:  # e.g. base_model: sft; the SFT adapter is merged first
        from peft import PeftModel

        model = load_seqcls(resolve_model(base), pick_dtype(dtype), cfg.keep_layers)
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    else:
        model = load_seqcls(path, pick_dtype(dtype), cfg.keep_layers, bnb, device_map)
    if bnb is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    model.config.pad_token_id = tok.pad_token_id
    model.config.use_cache = False
    return model


class RewardScorer:
    """Scores (question, answer) pairs with a trained reward model: raw logits, or the Bradley-Terry
    preference of an answer over the reference."""

    def __init__(self, model, tok, max_length: int, max_prompt_tokens: int, batch_size: int = 16):
        self.model, self.tok = model, tok
        self.max_length, self.max_prompt_tokens, self.batch_size = max_length, max_prompt_tokens, batch_size
        self._ref_cache: dict[tuple[str, str], float] = {}

    @classmethod
    def load(cls, ref: str, base_model: str | None = None, device: str | None = None) -> "RewardScorer":
        import torch

        from utils.models import ModelNotFound, adapter_base, load_tokenizer, pick_dtype, resolve_model
        from utils.training import read_train_config

        path = resolve_model(ref, base_model)
        meta = read_train_config(path) or {}
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = pick_dtype("auto")
        tok = load_tokenizer(path)
        base = adapter_base(path)
        if base is None:
            model = load_seqcls(path, dtype, meta.get("keep_layers", 0) or 0)
        else:
            from peft import PeftModel

            try:
                base_path = resolve_model(base)
            except ModelNotFound:
                # The adapter names its base by the folder it was trained on; on another machine the
                # recipe's reference (e.g. smollm2-135m-instruct) finds the same model.
                base_path = resolve_model(base_model or meta.get("base_model") or base)
            model = load_seqcls(base_path, dtype, meta.get("keep_layers", 0) or 0)
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        model.config.pad_token_id = tok.pad_token_id
        model.to(device).eval()
        log.info("reward model %s loaded on %s", path, device)
        return cls(model, tok, meta.get("max_length", 256), meta.get("max_prompt_tokens", 96),
                   meta.get("score_batch_size", 16))

    def scores(self, users: list[str], answers: list[str]) -> list[float]:
        """The raw reward (one logit) of each (question, answer)."""
        import torch

        seqs = [encode(self.tok, u, a, self.max_length, self.max_prompt_tokens) for u, a in zip(users, answers)]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out = [0.0] * len(seqs)
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
                    out[i] = v if math.isfinite(v) else 0.0
        finally:
            self.model.train(was_training)
        return out

    def preference(self, prompts: list, questions: list, answers: list[str], refs: list[str]) -> list[float]:
        """sigmoid(r(q, answer) - r(q, reference)) per item (sigmoid(r(q, answer)) without a reference);
        reference scores are cached, since GRPO scores many answers to one question."""
        users = [user_text({"prompt": p, "question": q}) for p, q in zip(prompts, questions)]
        todo = [(u, r) for u, r in dict.fromkeys(zip(users, refs)) if r.strip() and (u, r) not in self._ref_cache]
        if todo:
            if len(self._ref_cache) > 50000:
                self._ref_cache.clear()
            for key, v in zip(todo, self.scores([u for u, _ in todo], [r for _, r in todo])):
                self._ref_cache[key] = v
        raw = self.scores(users, answers)
        out = []
        for u, r, s in zip(users, refs, raw):
            base = self._ref_cache.get((u, r), 0.0) if r.strip() else 0.0
            out.append(_sigmoid(s - base))
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


# ============================================================================= pairwise accuracy
def pairwise_accuracy(pairs: list[dict], chosen: list[float], rejected: list[float]) -> dict:
    """Share of pairs whose chosen answer outscores the rejected one (ties count half), overall and
    per negative type, with the pair counts."""
    by: dict[str, list[float]] = defaultdict(list)
    for p, c, r in zip(pairs, chosen, rejected):
        win = 1.0 if c > r else 0.5 if c == r else 0.0
        by[p["type"]].append(win)
        by["overall"].append(win)
    return {t: {"accuracy": round(sum(v) / len(v), 4), "pairs": len(v)} for t, v in sorted(by.items())}


def score_pairs(scorer: RewardScorer, pairs: list[dict]) -> tuple[list[float], list[float]]:
    """Reward-model scores of the chosen and rejected answers; each distinct (question, answer) once."""
    texts = list(dict.fromkeys([(p["user"], p["chosen"]) for p in pairs] + [(p["user"], p["rejected"]) for p in pairs]))
    vals = dict(zip(texts, scorer.scores([u for u, _ in texts], [a for _, a in texts])))
    return [vals[(p["user"], p["chosen"])] for p in pairs], [vals[(p["user"], p["rejected"])] for p in pairs]


# ============================================================================= training
def model_card(cfg: RewardModelConfig, metrics: dict) -> str:
    test = metrics.get("test_accuracy", {})
    lines = [f"# ECG-GRPO reward model ({cfg.base_model})", "",
             f"A Bradley-Terry reward model: `{cfg.base_model}` with a one-logit sequence-classification head, "
             "trained with TRL's RewardTrainer (LoRA) on ECG-Expert-QA preference pairs. The chosen answer is "
             "always the reference; the rejected one is a hard negative built from it (see "
             "utils/reward_model.py). Made by `reward_model.py`.", "",
             "## Use", "",
             "As the `reward_model` reward of a mix (utils/rewards.py): it gives "
             "`sigmoid(r(question, answer) - r(question, reference))`.", "",
             "```python", "from utils.reward_model import get_scorer",
             f"get_scorer('{output_dir(cfg)}').scores(['Is a PR interval of 240 ms normal?'], ['No, it is long.'])",
             "```", "",
             "## Held-out pairwise accuracy (test split)", "",
             "Share of test pairs whose reference outscores the hard negative (pairs built from the test split "
             "only; the rule rewards compare with the reference, so only the trained model is measured here).", "",
             "| negative type | pairs | accuracy |", "| --- | ---: | ---: |"]
    for t, d in test.items():
        lines.append(f"| {t} | {d['pairs']} | {d['accuracy']:.3f} |")
    train = metrics.get("train", {})
    lines += ["", "## Training", "",
              f"- pairs: {metrics.get('train_pairs')} train ({metrics.get('train_pair_types')}), "
              f"{metrics.get('eval_pairs')} validation",
              f"- adapter: LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha} on "
              f"{'the top ' + str(cfg.lora_layers) if cfg.lora_layers else 'all'} layers; "
              f"layers kept: {cfg.keep_layers or 'all'} of the base's; max_length {cfg.max_length}",
              f"- {metrics.get('global_step')} steps of {cfg.batch_size} pairs, learning rate {cfg.learning_rate}",
              f"- runtime: {round(train.get('train_runtime', 0))} s training, {metrics.get('test_seconds')} s test "
              "scoring", "",
              "Files: the adapter and score head, the tokenizer, `train_config.yaml`, `metrics.json`.", "",
              "## Limitations", "",
              "It learns what separates references from synthetic negatives; it has never seen a fluent wrong "
              "answer of another kind, so use it with the rule rewards, not alone. Educational use only: not "
              "medical advice. ECG-Expert-QA states no license.", ""]
    return "\n".join(lines)


def _pairs_dataset(tok, pairs: list[dict], cfg: RewardModelConfig):
    from datasets import Dataset

    cache: dict[tuple[str, str], list[int]] = {}

    def ids(u, a):
        if (u, a) not in cache:
            cache[(u, a)] = encode(tok, u, a, cfg.max_length, cfg.max_prompt_tokens)
        return cache[(u, a)]

    rows = []
    for p in pairs:
        c, r = ids(p["user"], p["chosen"]), ids(p["user"], p["rejected"])
        rows.append({"chosen_ids": c, "rejected_ids": r, "length": max(len(c), len(r))})
    return Dataset.from_list(rows)


def train_reward_model(cfg: RewardModelConfig) -> dict:
    """Build the pairs, train, measure held-out accuracy, save models/reward; return the metrics."""
    from trl import RewardTrainer

    from utils.training import (configure_threads, gradient_accumulation, load_train_tokenizer, resume_checkpoint,
                                save_final, trl_args, training_metrics)

    out = output_dir(cfg)
    gradient_accumulation(cfg)
    configure_threads(cfg)
    started = time.time()
    train_rows, val_rows, test_rows = (load_split(cfg, s) for s in ("train", "validation", "test"))
    test_rows = subsample(test_rows, cfg.max_test_items, cfg.seed)
    sampled_train = sampled_test = None
    if "sampled" in cfg.negatives:
        sampled_train = sample_answers(cfg, train_rows, cfg.sample_items, cfg.seed)
        # in proportion to the train share, but at least 50 items: fewer pairs make a noisy accuracy
        n_test = max(min(50, len(test_rows)), round(cfg.sample_items * len(test_rows) / max(1, len(train_rows))))
        sampled_test = sample_answers(cfg, test_rows, n_test, cfg.seed + 1)
    train_pairs = balanced_subsample(build_pairs(train_rows, cfg.negatives, cfg.seed, sampled_train, cfg.term_lexicon),
                                     cfg.max_train_pairs, cfg.seed, cfg.negative_weights)
    eval_pairs = subsample(build_pairs(val_rows, cfg.negatives, cfg.seed + 1, None, cfg.term_lexicon),
                           cfg.max_eval_pairs, cfg.seed) if cfg.max_eval_pairs else []
    test_pairs = build_pairs(test_rows, cfg.negatives, cfg.seed + 2, sampled_test, cfg.term_lexicon)
    if not train_pairs:
        raise DataError(f"{cfg.data_dir}: no preference pairs could be built (negatives: {', '.join(cfg.negatives)})")
    types = dict(Counter(p["type"] for p in train_pairs))
    log.info("pairs: %d train %s, %d validation, %d test (%.0fs to build)", len(train_pairs), types,
             len(eval_pairs), len(test_pairs), time.time() - started)

    tok = load_train_tokenizer(cfg, cfg.base_model)
    model = load_train_seqcls(cfg, tok)
    ckpt = resume_checkpoint(cfg)
    # Batches of similar lengths: a batch pads to its longest sequence, and answers range from one
    # sentence to a paragraph, so random batches spend ~40% of their compute on padding. The collator
    # ignores the "length" column, which therefore may stay in the dataset.
    args = trl_args(cfg, cfg.run_name or f"reward-{time.strftime('%Y%m%d-%H%M%S')}", max_length=None,
                    center_rewards_coefficient=cfg.center_rewards_coefficient or None,
                    train_sampling_strategy="group_by_length", length_column_name="length",
                    remove_unused_columns=False,
                    eval_on_start=cfg.eval_on_start and bool(eval_pairs) and ckpt is None)
    if not eval_pairs:
        args.eval_strategy = "no"
    trainer = RewardTrainer(model=model, args=args, processing_class=tok,
                            train_dataset=_pairs_dataset(tok, train_pairs, cfg),
                            eval_dataset=_pairs_dataset(tok, eval_pairs, cfg) if eval_pairs else None,
                            peft_config=peft_config(cfg, model.config.num_hidden_layers))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    log.info("training %d of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    trainer.train(resume_from_checkpoint=ckpt)

    t0 = time.time()
    scorer = RewardScorer(trainer.model, tok, cfg.max_length, cfg.max_prompt_tokens, cfg.score_batch_size)
    chosen, rejected = score_pairs(scorer, test_pairs)
    test_acc = pairwise_accuracy(test_pairs, chosen, rejected)
    test_seconds = round(time.time() - t0, 1)
    log.info("held-out pairwise accuracy: %s", ", ".join(f"{t} {d['accuracy']:.3f}" for t, d in test_acc.items()))
    metrics = training_metrics(trainer, {
        "resumed_from": ckpt, "train_pairs": len(train_pairs), "train_pair_types": types,
        "eval_pairs": len(eval_pairs), "test_items": len(test_rows), "test_pairs": len(test_pairs),
        "test_accuracy": test_acc,
        "test_seconds": test_seconds, "total_seconds": round(time.time() - started, 1)})
    for name in ("accuracy", "margin"):
        vals = [h[f"eval_{name}"] for h in trainer.state.log_history if f"eval_{name}" in h]
        if vals:
            metrics[f"eval_{name}"] = vals
    cfg_out = cfg if cfg.output_dir else _with_output(cfg, out)
    save_final(trainer.model, tok, cfg_out, metrics, model_card(cfg_out, metrics))
    return metrics


def _with_output(cfg: RewardModelConfig, out: Path) -> RewardModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, output_dir=str(out))


# ============================================================================= score command
def complete_row(row: dict) -> dict:
    """A scoring row with the label columns the rewards read, filled in from the reference the way
    prepare_data.py labels its records when the row lacks them: ``label`` (yes/no) becomes
    ``label_yesno``; PRTK and yes/no questions get the reference's verdict; PP its follow-up period."""
    r = dict(row)
    lab = r.get("label")
    if "label_yesno" not in r:
        if isinstance(lab, str) and lab.strip().lower() in ("yes", "no"):
            r["label_yesno"] = lab.strip().lower()
        elif r.get("task") == "PRTK" or is_yes_no_question(r.get("question") or ""):
            r["label_yesno"] = yes_no_of(r.get("reference") or "")
        else:
            r["label_yesno"] = None
    if "followup_days" not in r:
        fu = followup_interval(r.get("reference") or "") if r.get("task") == "PP" else None
        r["followup_days"] = fu[1] if fu else None
    return r


def read_score_input(path: Path) -> list[dict]:
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no rows to score")
    for i, r in enumerate(rows, 1):
        for key in ("question", "reference", "completion"):
            v = r.get(key)
            if key == "completion" and isinstance(v, list):
                continue  # a conversational completion (TRL's message list)
            if not isinstance(v, str):
                raise DataError(f"{path}: line {i}: '{key}' is {'missing' if v is None else type(v).__name__}; "
                                "expected a string (lines need question, reference, completion)")
    return rows


def score_file(cfg: RewardModelConfig) -> Path:
    """Score ``cfg.input`` with the configured mix; write each line back with ``rewards`` (every reward's
    value, None where it does not apply, and ``total``). Returns the output path."""
    if not cfg.input:
        raise UserError("score: --input FILE.jsonl is required (lines with question, reference, completion)")
    src = Path(cfg.input)
    dst = Path(cfg.output) if cfg.output else src.with_name(src.stem + ".scored.jsonl")
    rows = read_score_input(src)
    scored = cfg.score([completion_text(r["completion"]) for r in rows], [complete_row(r) for r in rows])
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r, s in zip(rows, scored):
            f.write(json.dumps({**r, "rewards": s}, ensure_ascii=False) + "\n")
    tmp.replace(dst)
    totals = [s["total"] for s in scored if s["total"] is not None]
    log.info("scored %d lines -> %s (mean total %.3f)", len(rows), dst, sum(totals) / max(1, len(totals)))
    return dst


# ============================================================================= reward-hacking audit
# Filler for "the right numbers in nonsense": words that carry no clinical meaning.
_NONSENSE = ("the purple elephant", "quietly sings about", "a teaspoon of", "over the mountain while",
             "seven umbrellas dance near", "because the moon prefers", "a bicycle made of", "tomorrow's cheese")
# Words appended to make a very long answer: fluent, on-topic sounding, and empty.
_PADDING = ("It is important to consider all of the relevant clinical factors in every case, to discuss the "
            "findings with a qualified healthcare professional, and to remember that individual circumstances "
            "can vary considerably from one patient to another.")


def _attack_keywords(row, ctx) -> str:
    lex_terms = ctx["terms"]
    ref_terms = sorted(ctx["lexicon"].find(row["reference"]))
    extra = ctx["rng"].sample(lex_terms, min(25, len(lex_terms)))
    return ", ".join(dict.fromkeys(ref_terms + extra)) + "."


def _attack_numbers(row, ctx) -> str:
    nums = [n["text"] for n in extract_numbers(row["reference"])]
    fu = followup_interval(row["reference"])
    if fu:
        nums.append(fu[0])
    rng = ctx["rng"]
    parts = []
    for n in nums or ["42"]:
        parts.append(f"{rng.choice(_NONSENSE).capitalize()} {n} {rng.choice(_NONSENSE)} {rng.choice(_NONSENSE)}.")
    return " ".join(parts)


ATTACKS = {
    "keyword stuffing": _attack_keywords,
    "repeat the question": lambda row, ctx: row["question"],
    "echo the system prompt": lambda row, ctx: ctx["system_prompt"],
    "'Yes' to everything": lambda row, ctx: "Yes.",
    "right numbers in nonsense": _attack_numbers,
    "empty answer": lambda row, ctx: "",
    "very long answer": lambda row, ctx: " ".join([row["reference"]] + [_PADDING] * 12),
    "answer to another question": lambda row, ctx: ctx["other"].get(row["id"]) or ctx["fallback"](row),
}
HONEST = "reference (honest)"


def build_audit(cfg: RewardModelConfig, rows: list[dict]) -> dict[str, list[str]]:
    """For each attack (and the honest reference), one completion per row."""
    sp = Path(cfg.system_prompt_file)
    system_prompt = sp.read_text(encoding="utf-8").strip() if sp.is_file() else ""
    if not system_prompt:
        system_prompt = next((m.get("content", "") for r in rows for m in (r.get("prompt") or [])
                              if isinstance(m, dict) and m.get("role") == "system"), "")
    lex = load_lexicon(cfg.term_lexicon)
    others = similar_answers(rows, cfg.term_lexicon)
    ctx = {"rng": random.Random(cfg.seed), "lexicon": lex, "terms": sorted(set(lex.terms.values())),
           "system_prompt": system_prompt, "other": {r["id"]: o for r, o in zip(rows, others)},
           "fallback": lambda row: rows[(rows.index(row) + 1) % len(rows)]["reference"]}
    out = {HONEST: [r["reference"] for r in rows]}
    for name, fn in ATTACKS.items():
        out[name] = [fn(r, ctx) for r in rows]
    return out


def run_audit(cfg: RewardModelConfig) -> dict:
    """Score each attack and the honest reference on a seeded sample of test items with the
    configured mix. Returns {"rows": [{"completion", "total", <reward>: mean ...}], "passed": bool}."""
    rows = subsample(load_split(cfg, "test"), cfg.audit_items, cfg.seed)
    completions = build_audit(cfg, rows)
    table = []
    for name, comps in completions.items():
        scored = cfg.score(comps, rows)
        entry = {"completion": name, "items": len(rows)}
        for key in [k for k in cfg.rewards] + ["total"]:
            vals = [s[key] for s in scored if s.get(key) is not None]
            entry[key] = round(sum(vals) / len(vals), 4) if vals else None
        table.append(entry)
    honest = table[0]["total"]
    for e in table[1:]:
        e["below_reference"] = e["total"] is not None and honest is not None and e["total"] < honest
    result = {"mix": dict(cfg.rewards), "answer_format": cfg.answer_format, "reward_model": cfg.reward_model,
              "items": len(rows), "rows": table, "passed": all(e["below_reference"] for e in table[1:])}
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def audit_table(result: dict) -> str:
    """The audit as a Markdown table: each completion's mean total and mean per reward."""
    names = [k for k in result["mix"]]
    head = "| completion | total | " + " | ".join(names) + " | below reference |"
    lines = [head, "|" + " --- |" * (len(names) + 3)]
    for e in result["rows"]:
        cells = ["" if e.get(n) is None else f"{e[n]:.3f}" for n in names]
        below = "" if "below_reference" not in e else ("yes" if e["below_reference"] else "**NO**")
        lines.append(f"| {e['completion']} | {e['total']:.3f} | " + " | ".join(cells) + f" | {below} |")
    return "\n".join(lines)


# ============================================================================= lexicon curation aid
_STOP = set("""a an the and or of in on to for with by as at from is are was were be been being this that these
those it its their there which who whom whose what when where why how can could may might should would will do
does did not no yes you your i we our they he she his her them also such than then so if but about into over
under between during after before more most less very often usually typically include includes including
involves involve help helps ensure provide provides based due may well any all each other some further""".split())


def missing_terms(rows: list[dict], lexicon, top: int) -> list[tuple[str, int]]:
    """Frequent 1-3 word phrases of the references that the lexicon does not cover, by document
    frequency: candidates for a curator to add (or to leave out as too generic)."""
    counts: Counter = Counter()
    for r in rows:
        toks = term_tokens(r.get("reference") or "")
        grams = set()
        for n in (1, 2, 3):
            for i in range(len(toks) - n + 1):
                g = toks[i:i + n]
                if g[0] in _STOP or g[-1] in _STOP or any(t.isdigit() for t in g):
                    continue
                grams.add(tuple(g))
        counts.update(grams)
    known = set(lexicon.terms)
    out = []
    for g, c in counts.most_common():
        if g in known or any(g[i:i + n] in known for n in range(1, len(g) + 1) for i in range(len(g) - n + 1)):
            continue
        out.append((" ".join(g), c))
        if len(out) >= top:
            break
    return out


def run_terms(cfg: RewardModelConfig) -> list[tuple[str, int]]:
    rows = load_split(cfg, "train")
    lex = load_lexicon(cfg.term_lexicon)
    covered = sum(1 for r in rows if lex.find(r["reference"]))
    log.info("%s: %d terms; %d of %d train references (%.1f%%) name at least one", cfg.term_lexicon, len(lex),
             covered, len(rows), 100 * covered / max(1, len(rows)))
    return missing_terms(rows, lex, cfg.terms_top)

