"""Phase 3's training: preference pairs from the train split, TRL's RewardTrainer with a LoRA adapter,
held-out pairwise accuracy per negative type, and the saved reward model.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from utils.core.config import fld, non_negative, positive
from utils.core.runtime import set_threads
from utils.data.rows import DataError, read_split
from utils.rewards.mix import RewardMix
from utils.rewards.negatives import NEGATIVE_TYPES, balanced_subsample, build_pairs, subsample
from utils.rewards.reward_model import RewardScorer, encode
from utils.training.config import TrainConfig
from utils.training.run import output_dir, write_json

log = logging.getLogger(__name__)


SUBCOMMANDS = ("train", "score", "audit", "terms")


# Negative types built from a model's sampled answers (they need sample_model).
SAMPLED_TYPES = ("sampled", "ranked")


@dataclass
class RewardModelConfig(TrainConfig, RewardMix):
    """reward_model.py's config: the common training fields (utils/training/config.py), the reward mix that
    ``score`` and ``audit`` use (utils/rewards/mix.py), and the pair, scoring and audit settings."""

    TRL_CONFIG: ClassVar[str] = "RewardConfig"
    MODEL_FOLDER: ClassVar[str] = "reward"
    PIPELINE_TAG: ClassVar[str] = "text-classification"

    data_dir: str = fld("data/processed", "Folder written by prepare_data.py (grpo/train.jsonl, "
                        "grpo/validation.jsonl, eval/test.jsonl).")
    negatives: list[str] = fld(help="Kinds of rejected answers to build pairs from (see utils/rewards/negatives.py).",
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
    reference_tokens: int = fld(0, "Tokens of the reference answer the reward model reads after the question "
                                "(its beginning), so that it grades an answer against the reference instead of "
                                "judging it alone; it then gives sigmoid(r(q, reference, answer)). 0: question and "
                                "answer only.", check=(non_negative, "an integer >= 0"))
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
    sample_count: int = fld(1, "Answers sampled per item: 'sampled' takes the first that is not a near-copy of "
                            "the reference; 'ranked' pairs two of them (needs >= 2).",
                            check=(positive, "an integer > 0"))
    ranked_per_item: int = fld(1, "'ranked': pairs per item at most, the widest score gaps first (more pairs from "
                               "the same samples, but pairs of one item share answers).",
                               check=(positive, "an integer > 0"))
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
        if self.max_prompt_tokens + self.reference_tokens >= self.max_length:
            raise ValueError(f"max_prompt_tokens {self.max_prompt_tokens} + reference_tokens {self.reference_tokens} "
                             f"leave no room for the answer in max_length {self.max_length}; expected their sum "
                             "< max_length")
        if self.keep_layers and self.lora_layers > self.keep_layers:
            raise ValueError(f"lora_layers {self.lora_layers} > keep_layers {self.keep_layers}; expected at most "
                             "the kept layers")
        for kind in SAMPLED_TYPES:
            if kind in self.negatives and not self.sample_model:
                raise ValueError(f"negatives has '{kind}' but sample_model is empty; set sample_model (e.g. sft)")
        if "ranked" in self.negatives and self.sample_count < 2:
            raise ValueError(f"negatives has 'ranked' but sample_count is {self.sample_count}; expected >= 2 "
                             "(a ranked pair is two samples of one question)")

    @property
    def needs_samples(self) -> bool:
        """Whether a negative type of the config is built from sample_model's answers."""
        return any(t in SAMPLED_TYPES for t in self.negatives)



# Items per seeded sampling chunk, the unit of work a process takes: fixed (not a batch-size knob), so that
# the negatives depend on neither the batch size nor the number of processes; 16 fills a CPU's or a GPU's
# decode batch for a 135M-3B model.
SAMPLE_CHUNK = 16


# The sampling model's own distribution (temperature 1), without its unlikeliest tail: the fluent mistakes a
# policy makes, not the gibberish of the last 5% of probability mass.
SAMPLE_TEMPERATURE, SAMPLE_TOP_P = 1.0, 0.95


# The sampled answers kept in the run folder (not one of its run items: a fresh run leaves them in place).
SAMPLE_CACHE = "sampled-answers-"


def _sample_key(cfg: RewardModelConfig, pick: list[dict], seed: int) -> dict:
    """Everything the sampled answers depend on: the sampling model's files, the prompts, the settings and
    the package versions (not the pair settings: a run that changes only those reuses the samples)."""
    import hashlib
    import json

    from utils.core.fingerprint import package_versions
    from utils.models.resolve import model_identity, resolve_model

    prompts = json.dumps([[r["id"], r["prompt"]] for r in pick], sort_keys=True)
    return {"sample_model": model_identity(resolve_model(cfg.sample_model, cfg.base_model)),
            "prompts": hashlib.sha256(prompts.encode()).hexdigest(), "seed": seed, "count": cfg.sample_count,
            "max_new_tokens": cfg.sample_max_new_tokens, "answer_format": cfg.answer_format,
            "chunk": SAMPLE_CHUNK, "temperature": SAMPLE_TEMPERATURE, "top_p": SAMPLE_TOP_P,
            "packages": package_versions()}


def sample_answers(cfg: RewardModelConfig, rows: list[dict], n: int, seed: int,
                   cache_dir: str | Path | None = None) -> dict[str, list[str]]:
    """``cfg.sample_count`` answers sampled from ``cfg.sample_model`` for each of a seeded subset of ``n``
    rows, keyed by row id (empty answers dropped). With ``cache_dir`` (the run folder) they are kept there in
    ``sampled-answers-<key>.json`` and read back by any later run that would sample the very same answers:
    a killed or re-run reward phase does not pay the sampling (minutes on a CPU) again."""
    if n <= 0 or not rows:
        return {}
    import hashlib
    import json

    from accelerate import PartialState
    from accelerate.utils import gather_object

    from utils.data.formats import parse
    from utils.models.generation import generate
    from utils.models.loading import load_for_inference

    pick = random.Random(seed).sample(rows, min(n, len(rows)))
    cache = None
    if cache_dir is not None:
        key = _sample_key(cfg, pick, seed)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"{SAMPLE_CACHE}{digest}.json"
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                log.info("sampled answers read from %s (made by an earlier run with the same settings)", cache)
                return saved["answers"]
        except (OSError, ValueError, AttributeError):
            pass  # none yet, or unreadable (a run killed while writing it): sample again
    # The items go in fixed chunks, each sampled with its own seed, and each process samples every W-th chunk;
    # the chunks are then gathered: W times faster on W GPUs, every process ends up with the same negatives,
    # and they are the same whatever W is (a 1-GPU and an 8-GPU run train on the same pairs).
    from utils.training.config import has_cuda

    state = PartialState(cpu=not has_cuda())  # as start_run: CPU ranks need cpu=True to form a process group
    chunks = [list(range(i, min(i + SAMPLE_CHUNK, len(pick)))) for i in range(0, len(pick), SAMPLE_CHUNK)]
    model, tok = load_for_inference(cfg.sample_model, cfg.base_model, device=str(state.device))
    k = cfg.sample_count
    mine = []
    for c in range(state.process_index, len(chunks), state.num_processes):
        texts = generate(model, tok, [pick[i]["prompt"] for i in chunks[c]], max_new_tokens=cfg.sample_max_new_tokens,
                         batch_size=max(1, SAMPLE_CHUNK // k), do_sample=True, temperature=SAMPLE_TEMPERATURE,
                         top_p=SAMPLE_TOP_P, num_return_sequences=k, seed=seed + c)
        mine += [(i, t if k > 1 else [t]) for i, t in zip(chunks[c], texts)]
        if state.is_main_process:
            log.info("sampled chunk %d of %d", c + 1, len(chunks))
    del model
    gathered = dict(gather_object(mine) if state.num_processes > 1 else mine)
    out = {}
    for i, r in enumerate(pick):
        answers = [a for t in gathered[i] if (a := parse(t, cfg.answer_format).answer)]
        if answers:
            out[r["id"]] = answers
    log.info("sampled %d answers for %d items from %s", sum(map(len, out.values())), len(out), cfg.sample_model)
    if cache is not None and state.is_main_process:
        write_json(cache, {"key": key, "answers": out})
    return out


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
    texts = list(dict.fromkeys([(p["user"], p.get("reference"), p[k]) for k in ("chosen", "rejected") for p in pairs]))
    vals = dict(zip(texts, scorer.scores([u for u, _, _ in texts], [a for _, _, a in texts], [r for _, r, _ in texts])))
    return ([vals[(p["user"], p.get("reference"), p["chosen"])] for p in pairs],
            [vals[(p["user"], p.get("reference"), p["rejected"])] for p in pairs])


# ============================================================================= training
def model_card(cfg: RewardModelConfig, metrics: dict) -> str:
    test = metrics.get("test_accuracy", {})
    lines = [f"# ECG-GRPO reward model ({cfg.base_model})", "",
             f"A Bradley-Terry reward model: `{cfg.base_model}` with a one-logit sequence-classification head, "
             "trained with TRL's RewardTrainer (LoRA) on ECG-Expert-QA preference pairs. The chosen answer is "
             "the reference and the rejected one a hard negative built from it, or, in 'ranked' pairs, the better "
             "and the worse (by ROUGE-L, BLEU-1 and METEOR) of two answers sampled from one model (see "
             "utils/rewards/negatives.py). Made by `reward_model.py`.", "",
             "## Use", "",
             "As the `reward_model` reward of a mix (utils/rewards/mix.py): it gives "
             + ("`sigmoid(r(question, reference, answer))`: it reads the first "
                f"{cfg.reference_tokens} tokens of the reference after the question and grades the answer "
                "against them." if cfg.reference_tokens else
                "`sigmoid(r(question, answer) - r(question, reference))`."), "",
             "```python", "from utils.rewards.reward_model import get_scorer",
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

    cache: dict[tuple, list[int]] = {}

    def ids(u, ref, a):
        if (u, ref, a) not in cache:
            cache[(u, ref, a)] = encode(tok, u, a, cfg.max_length, cfg.max_prompt_tokens, ref, cfg.reference_tokens)
        return cache[(u, ref, a)]

    rows = []
    for p in pairs:
        c, r = ids(p["user"], p.get("reference"), p["chosen"]), ids(p["user"], p.get("reference"), p["rejected"])
        rows.append({"chosen_ids": c, "rejected_ids": r, "length": max(len(c), len(r))})
    return Dataset.from_list(rows)


def dry_run_plan(cfg: RewardModelConfig) -> dict:
    """What ``reward_model.py train --dry-run`` prints (:func:`utils.training.plan.plan`): a pair is two
    sequences of up to max_length tokens."""
    from utils.training.plan import count_rows, plan

    n = count_rows(Path(cfg.data_dir) / "grpo" / "train.jsonl")
    if n:  # about one pair per negative type and item, capped
        n = min(n * len(cfg.negatives), cfg.max_train_pairs or n * len(cfg.negatives))
    extra = {"sampled_negatives": f"{cfg.sample_count} answers to each of {cfg.sample_items} items from "
             f"{cfg.sample_model}, shared across processes" if cfg.needs_samples else "none"}
    return plan(cfg, "reward_model.py train", cfg.base_model, 2 * cfg.max_length, n, "pairs", extra)


def train_reward_model(cfg: RewardModelConfig) -> dict:
    """Build the pairs, train, measure held-out accuracy, save models/reward; return the metrics."""
    from trl import RewardTrainer

    from utils.training.config import gradient_accumulation, load_for_training, trl_args
    from utils.training.run import data_hashes, finish_run, start_run, training_metrics, with_output_dir

    gradient_accumulation(cfg)
    set_threads(cfg.num_threads)
    started = time.time()
    train_rows, val_rows, test_rows = (read_split(cfg.data_dir, s) for s in ("grpo/train", "grpo/validation", "eval/test"))
    test_rows = subsample(test_rows, cfg.max_test_items, cfg.seed)
    # The run folder is checked (and a resumable checkpoint found) before the sampling, which takes minutes.
    run = start_run(cfg, data_hashes(cfg.data_dir, ["grpo/train", "grpo/validation", "eval/test"]), cfg.base_model,
                    other_models={"sample_model": cfg.sample_model if cfg.needs_samples else None})
    ckpt = run.checkpoint
    sampled_train = sampled_test = None
    if cfg.needs_samples:
        sampled_train = sample_answers(cfg, train_rows, cfg.sample_items, cfg.seed, cfg.run_dir)
        # in proportion to the train share, but at least 50 items: fewer pairs make a noisy accuracy
        n_test = max(min(50, len(test_rows)), round(cfg.sample_items * len(test_rows) / max(1, len(train_rows))))
        sampled_test = sample_answers(cfg, test_rows, n_test, cfg.seed + 1, cfg.run_dir)
    train_pairs = balanced_subsample(build_pairs(train_rows, cfg.negatives, cfg.seed, sampled_train, cfg.term_lexicon,
                                                 cfg.ranked_per_item),
                                     cfg.max_train_pairs, cfg.seed, cfg.negative_weights)
    eval_pairs = subsample(build_pairs(val_rows, cfg.negatives, cfg.seed + 1, None, cfg.term_lexicon),
                           cfg.max_eval_pairs, cfg.seed) if cfg.max_eval_pairs else []
    test_pairs = build_pairs(test_rows, cfg.negatives, cfg.seed + 2, sampled_test, cfg.term_lexicon,
                             cfg.ranked_per_item)
    if not train_pairs:
        raise DataError(f"{cfg.data_dir}: no preference pairs could be built (negatives: {', '.join(cfg.negatives)})")
    types = dict(Counter(p["type"] for p in train_pairs))
    log.info("pairs: %d train %s, %d validation, %d test (%.0fs to build)", len(train_pairs), types,
             len(eval_pairs), len(test_pairs), time.time() - started)

    # base_model may be an adapter folder (e.g. sft): it is merged into its base before the fresh adapter.
    model, tok = load_for_training(cfg, cfg.base_model, head="seqcls", keep_layers=cfg.keep_layers)
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
    scorer = RewardScorer(trainer.model, tok, cfg.max_length, cfg.max_prompt_tokens, cfg.score_batch_size,
                          cfg.reference_tokens)
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
    cfg_out = with_output_dir(cfg)
    finish_run(trainer, cfg_out, run, metrics, model_card(cfg_out, metrics))
    return metrics
