"""GRPO: config, prompts, policy, the trainer with faster generation, held-out reward, the run.

grpo_train.py runs :func:`run_grpo`:

* **policy**: ``policy: sft`` starts from models/sft. An adapter folder keeps training that adapter on
  its own base (so models/rlhf is again an adapter on the base, loadable by every phase); a full model
  folder (e.g. models/sft/merged, or SFT with ``adapter: none``) gets a fresh LoRA adapter; ``base``
  starts from the recipe's base model. QLoRA (``quantization: 4bit``) loads the frozen base in 4 bits.
* **rewards**: the mix of utils/rewards.py by name and weight (:class:`utils.rewards.RewardMix`),
  handed to TRL's ``GRPOTrainer`` as ``reward_funcs`` / ``reward_weights``; ``reward_aggregation``
  chooses TRL's ``multi_objective_aggregation``.
* **speed** (:class:`ECGGRPOTrainer`): on the transformers generation path, completions are sampled
  with the LoRA update merged into the fp32 weights (no adapter work per decoded token), and each
  prompt's prefill runs once for its group of ``num_generations`` completions, its KV cache then
  copied to the group's rows. ``fast_generation: false`` restores TRL's own generation.
* **logs**: TRL's metrics go to TensorBoard (each reward's mean and std, total reward, KL when
  ``beta > 0``, completion lengths, clipped ratio, share of groups with zero reward spread);
  :class:`SampleLogger` adds sample completions with their rewards, :class:`HeldOutReward` the
  held-out reward: greedy answers to a fixed set of validation prompts, scored by the same mix.
* **checkpoints**: as SFT (utils/training.py): ``resume: auto`` continues the run folder's last
  checkpoint; the finished model goes to models/rlhf with the resolved config, metrics and a card.

torch, transformers and trl are imported inside functions so that ``--help`` and config errors stay quick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from utils.config import UserError, fld, non_negative, positive
from utils.data import TASKS, DataError, read_jsonl
from utils.generation import with_format_instructions
from utils.rewards import RewardMix, completion_text
from utils.training import (TrainConfig, configure_threads, gradient_accumulation, has_cuda, load_train_model,
                            load_train_tokenizer, lora_config, precision_flags, quantization_config,
                            read_train_config, resume_checkpoint, save_final, training_metrics, trl_args)

log = logging.getLogger(__name__)

LOSS_TYPES = ["grpo", "dr_grpo", "dapo", "bnpo"]
HELDOUT_LOG = "heldout.jsonl"   # in the run folder: every held-out evaluation, answers included
SAMPLES_LOG = "samples.jsonl"   # in the run folder: the sample completions logged every sample_steps


def _min_two(x) -> bool:
    return isinstance(x, int) and x >= 2


@dataclass
class GRPOTrainConfig(TrainConfig, RewardMix):
    """grpo_train.py's config: the common training fields, the reward mix and the GRPO knobs."""

    TRL_CONFIG: ClassVar[str] = "GRPOConfig"

    # ---- policy and data
    policy: str = fld("sft", "Where the policy starts: sft (models/sft), base (the recipe's base_model), a model "
                      "folder or a Hub id. An adapter folder keeps training its adapter on its base; a full model "
                      "gets a fresh LoRA adapter.")
    data_dir: str = fld("data/processed", "Folder written by prepare_data.py (reads grpo/train.jsonl and "
                        "grpo/validation.jsonl).")
    tasks: list[str] = fld(help="Train and measure on these tasks only (codes such as PRTK); empty: every task.",
                           choices=list(TASKS), default_factory=list)
    max_train_prompts: int = fld(0, "Train on a seeded random subset of this many prompts; 0: all.",
                                 check=(non_negative, "an integer >= 0"))
    # ---- GRPO
    num_generations: int = fld(8, "Completions sampled per prompt (the group whose rewards are compared).",
                               check=(_min_two, "an integer >= 2"))
    max_completion_length: int = fld(96, "Most tokens per sampled completion.", check=(positive, "an integer > 0"))
    temperature: float = fld(1.0, "Sampling temperature of the completions.", check=(positive, "a number > 0"))
    top_p: float = fld(1.0, "Nucleus sampling share of the completions.",
                       check=(lambda x: 0.0 < x <= 1.0, "a number in (0, 1]"))
    loss_type: str = fld("dapo", "How token losses are averaged: grpo (per sequence, then over sequences), dr_grpo "
                         "(over a constant), dapo (over all tokens of the step), bnpo (over the local batch's "
                         "tokens).", choices=LOSS_TYPES)
    beta: float = fld(0.0, "Weight of the KL penalty to the starting policy; 0 skips the reference pass (and the KL "
                      "log).", check=(non_negative, "a number >= 0"))
    epsilon: float = fld(0.2, "Clipping range of the probability ratio (lower side).", check=(positive, "a number > 0"))
    epsilon_high: float | None = fld(None, "Upper clipping range (DAPO's clip-higher, e.g. 0.28); null: epsilon.",
                                     check=(positive, "a number > 0"))
    scale_rewards: str = fld("group", "Divide advantages by the reward std of the group, of the whole batch, or not "
                             "at all (Dr. GRPO).", choices=["group", "batch", "none"])
    reward_aggregation: str = fld("sum_then_normalize", "Combine the rewards: weighted sum then normalise per "
                                  "group, or normalise each reward per group then sum (GDPO).",
                                  choices=["sum_then_normalize", "normalize_then_sum"])
    mask_truncated_completions: bool = fld(False, "Leave completions cut at max_completion_length out of the loss.")
    num_iterations: int = fld(1, "Optimizer passes over each generated batch (mu in the GRPO paper).",
                              check=(positive, "an integer > 0"))
    # ---- generation backend
    fast_generation: bool = fld(True, "Sample with the adapter merged into fp32 weights and one prefill per prompt "
                                "group (transformers generation); false: TRL's own generate.")
    pack_groups: bool = fld(True, "Training forward passes run each prompt once per group, its completions packed "
                            "after it with a block attention mask (same gradient, fewer tokens); false: TRL's "
                            "one row per completion.")
    use_vllm: bool | str = fld(False, "Generate with vLLM (CUDA; `pip install vllm`); auto: when vLLM and a GPU are "
                               "there.", choices=[False, True, "auto"])
    vllm_mode: str = fld("colocate", "colocate: vLLM shares the training GPUs; server: a separate `trl vllm-serve` "
                         "process (several nodes).", choices=["colocate", "server"])
    vllm_gpu_memory_utilization: float = fld(0.3, "Share of GPU memory vLLM takes in colocate mode.",
                                             check=(lambda x: 0.0 < x < 1.0, "a number in (0, 1)"))
    vllm_tensor_parallel_size: int = fld(1, "GPUs one colocated vLLM engine spans.", check=(positive, "an integer > 0"))
    vllm_server_base_url: str = fld("", "vLLM server URL in server mode, e.g. http://node0:8000; empty: "
                                    "http://localhost:8000.")
    time_limit_minutes: float = fld(0.0, "Stop training after this many minutes of this process (the final held-out "
                                    "evaluation and the save follow); 0: no limit. A time-boxed run on a shared "
                                    "machine ends on time whatever the load.", check=(non_negative, "a number >= 0"))
    # ---- held-out reward, samples
    heldout_prompts: int = fld(64, "Validation prompts whose greedy answers are scored every eval_steps (and at the "
                               "start with eval_on_start, and at the end); 0: none.",
                               check=(non_negative, "an integer >= 0"))
    heldout_max_new_tokens: int = fld(0, "Most tokens per held-out answer; 0: max_completion_length.",
                                      check=(non_negative, "an integer >= 0"))
    sample_steps: int = fld(10, "Log sample completions with their rewards to TensorBoard every N steps; 0: never.",
                            check=(non_negative, "an integer >= 0"))
    samples_to_log: int = fld(2, "Prompt groups shown per sample log.", check=(positive, "an integer > 0"))
    # ---- defaults that differ from SFT's
    learning_rate: float = fld(2e-5, "Peak learning rate.", check=(positive, "a number > 0"))
    batch_size: int = fld(32, "Completions per optimizer step over all devices (prompts x num_generations).",
                          check=(positive, "an integer > 0"))
    per_device_batch_size: int = fld(8, "Completions per forward pass on one device.",
                                     check=(positive, "an integer > 0"))
    lora_dropout: float = fld(0.0, "Dropout on the LoRA input (0: sampling and training see the same policy).",
                              check=(lambda x: 0.0 <= x < 1.0, "a fraction in [0, 1)"))
    eval_steps: int = fld(10, "Measure the held-out reward every N steps.", check=(positive, "an integer > 0"))
    save_steps: int = fld(10, "Write a checkpoint every N steps.", check=(positive, "an integer > 0"))
    run_dir: str = fld("runs/grpo", "Checkpoints, TensorBoard logs, held-out answers and samples of the run.")
    output_dir: str = fld("", "The finished model folder; empty: models/rlhf (under $ECG_MODELS_DIR when set).")

    def __post_init__(self):
        TrainConfig.__post_init__(self)
        RewardMix.__post_init__(self)
        if self.batch_size % self.num_generations:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of num_generations "
                             f"{self.num_generations}; expected whole groups per step (prompts x num_generations)")
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ValueError(f"epsilon_high {self.epsilon_high} is below epsilon {self.epsilon}; expected >= epsilon "
                             "(or null)")
        if self.use_vllm is True and self.quantization != "none":
            raise ValueError(f"use_vllm with quantization {self.quantization}: vLLM cannot load the bitsandbytes "
                             "base with its adapter; expected quantization: none or use_vllm: false")
        if self.vllm_server_base_url and not self.vllm_server_base_url.startswith(("http://", "https://")):
            raise ValueError(f"vllm_server_base_url {self.vllm_server_base_url!r}: expected http://host:port")


# ============================================================================= prompts
def _check_row(row: dict, path: Path, n: int) -> None:
    prompt = row.get("prompt")
    if (not isinstance(prompt, list) or not prompt
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)):
        raise DataError(f"{path}: row {n} has no valid 'prompt' list (expected [{{role, content}}, ...] as "
                        "prepare_data.py writes)")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{path}: row {n}: the prompt ends with a {prompt[-1]['role']!r} message; expected the "
                        "user's question last")
    if not isinstance(row.get("reference"), str):
        raise DataError(f"{path}: row {n} has no 'reference' text")


def load_prompts(cfg: GRPOTrainConfig, split: str, limit: int = 0) -> list[dict]:
    """Rows of ``grpo/<split>.jsonl``, checked, filtered by task, subsampled (seeded), with the answer
    format's instruction in the system prompt (as SFT trained it)."""
    path = Path(cfg.data_dir) / "grpo" / f"{split}.jsonl"
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        _check_row(row, path, n)
    if cfg.tasks:
        rows = [r for r in rows if r.get("task") in cfg.tasks]
    if not rows:
        raise DataError(f"{path}: no prompts left" + (f" for tasks {cfg.tasks}" if cfg.tasks else ""))
    if limit and len(rows) > limit:
        rows = random.Random(cfg.seed).sample(rows, limit)
    return [{**r, "prompt": with_format_instructions(r["prompt"], cfg.answer_format)} for r in rows]


def heldout_rows(cfg: GRPOTrainConfig) -> list[dict]:
    """The fixed held-out prompts: the validation rows first in the order of a hash of their id, so that
    the set does not depend on the seed and runs with different settings are measured on the same prompts."""
    if not cfg.heldout_prompts:
        return []
    rows = load_prompts(cfg, "validation")
    rows.sort(key=lambda r: hashlib.sha1(str(r["id"]).encode()).hexdigest())
    return rows[:cfg.heldout_prompts]


def to_dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


# ============================================================================= backends and policy
def vllm_wanted(cfg: GRPOTrainConfig) -> bool:
    """Whether this run generates with vLLM: ``true``, or ``auto`` where vLLM, a GPU and an unquantized
    base are there."""
    if cfg.use_vllm == "auto":
        return importlib.util.find_spec("vllm") is not None and has_cuda() and cfg.quantization == "none"
    return bool(cfg.use_vllm)


def check_backends(cfg: GRPOTrainConfig) -> None:
    """Refuse, with the fix, a run that asks for vLLM or DeepSpeed where they cannot run."""
    if cfg.use_vllm is True:
        if importlib.util.find_spec("vllm") is None:
            raise UserError("use_vllm: true needs vLLM, which is not installed: `pip install vllm` on a CUDA machine, "
                            "or set use_vllm: false to generate with transformers")
        if not has_cuda():
            raise UserError("use_vllm: true needs a CUDA GPU; set use_vllm: false on this machine")
    wants_ds = (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
                or "deepspeed" in cfg.trainer_extra)
    if wants_ds and importlib.util.find_spec("deepspeed") is None:
        raise UserError("this run asks for DeepSpeed (a configs/accelerate/zero*.yaml launch or trainer_extra."
                        "deepspeed) but deepspeed is not installed: `pip install deepspeed` on a CUDA machine, or "
                        "launch with configs/accelerate/ddp.yaml")


def _zero3() -> bool:
    return os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"


def load_policy(cfg: GRPOTrainConfig):
    """``(model, peft_config, base_ref)``: the policy to train, the fresh LoRA config for TRL to add (None
    when the policy's own adapter is trained further or for full fine-tuning), and the model an adapter
    saved at the end applies to (what ``merge`` merges it into)."""
    from utils.models import adapter_base, resolve_model

    path = resolve_model(cfg.policy, cfg.base_model)
    base = adapter_base(path) if Path(path).is_dir() else None
    trained = read_train_config(path) if Path(path).is_dir() else None
    if trained and trained.get("answer_format", cfg.answer_format) != cfg.answer_format:
        raise UserError(f"policy {path} was trained with answer_format {trained['answer_format']} but this config "
                        f"says {cfg.answer_format}; set answer_format: {trained['answer_format']}")
    if base is None or cfg.adapter != "lora":
        if base is not None and cfg.beta > 0:
            raise UserError(f"beta {cfg.beta} with adapter: none and the adapter policy {path}: TRL would rebuild the "
                            "reference from the bare base; use adapter: lora, beta: 0, or a merged policy folder")
        log.info("policy %s%s", path, " (adapter merged into its base)" if base else "")
        return load_train_model(cfg, path), lora_config(cfg), path
    return _continue_adapter(cfg, path, base), None, base


def _continue_adapter(cfg: GRPOTrainConfig, path: str, base: str):
    """The policy's own LoRA adapter on its base, trainable: GRPO refines the SFT adapter, and the result is
    an adapter on the same base as SFT's."""
    from peft import PeftModel

    from utils.models import load_causal_lm

    _, _, dtype = precision_flags(cfg)
    bnb = quantization_config(cfg)
    device_map = None
    if bnb is not None:
        from accelerate import PartialState

        device_map = {"": PartialState().local_process_index}
    model = load_causal_lm(base, dtype=dtype, device_map=device_map, quantization_config=bnb)
    if bnb is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    model.config.use_cache = False
    model = PeftModel.from_pretrained(model, path, is_trainable=True)
    own = model.peft_config["default"]
    if (own.r, own.lora_alpha) != (cfg.lora_r, cfg.lora_alpha):
        log.info("training the policy's own adapter (r=%d, alpha=%d); lora_r/lora_alpha apply to fresh adapters only",
                 own.r, own.lora_alpha)
    if _zero3() and bnb is None:
        # ZeRO-3 gathers parameters in the dtype of the first one it meets: an fp32 adapter on a bf16 base breaks
        # it (TRL applies the same cast to the adapters it creates itself).
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(next(model.get_base_model().parameters()).dtype)
    log.info("policy %s: its adapter on %s, trained further", path, base)
    return model


# ============================================================================= faster generation
@contextlib.contextmanager
def merged_adapter(model):
    """Sample with the LoRA update merged into the base weights: the per-token adapter matmuls go away.

    Only for fp32 weights: un-merging subtracts the same update again, exact to fp32 rounding (about
    1e-7 relative per round, far below what training moves); with bf16 or 4-bit weights the round trip
    would lose precision, so those generate with the adapter as it is. Not under ZeRO-3 (sharded weights).
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    ok = (bool(layers) and hasattr(model, "merge_adapter") and not _zero3()
          and all(getattr(m.get_base_layer(), "weight", None) is not None
                  and m.get_base_layer().weight.dtype == torch.float32 for m in layers)
          and not any(m.merged for m in layers))
    if not ok:
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


def generate_grouped(model, prompt_ids: list[list[int]], generation_config, pad_token_id: int) -> "Any":
    """``model.generate`` for a batch in which prompts repeat (GRPO's groups): the prompts are left-padded,
    each distinct prompt's prefill (all but its last token) runs once, and its KV cache is copied to every
    row that asks it; generation then goes on from the last prompt token. Returns the generated ids
    (rows x new tokens), in the order of ``prompt_ids``."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    keys: dict[tuple, int] = {}
    rows = [keys.setdefault(tuple(p), len(keys)) for p in prompt_ids]
    distinct = [list(k) for k in keys]
    width = max(len(p) for p in distinct)
    ids = torch.full((len(distinct), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(distinct), width), dtype=torch.long)
    for i, p in enumerate(distinct):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    index = torch.tensor(rows, device=device)
    past = None
    if len(distinct) < len(prompt_ids) and width > 1:
        # The same positions as generate() derives from the mask, so the cached keys match what it would compute.
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        past = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
              past_key_values=past, use_cache=True, logits_to_keep=1)
        past.batch_select_indices(index)
    out = model.generate(input_ids=ids[index], attention_mask=mask[index], past_key_values=past,
                         generation_config=generation_config)
    return out[:, width:]


def _trim_after_eos(completion_ids, eos_token_ids: list[int]) -> list[list[int]]:
    """Each row up to and including its first end token (as TRL does after generate)."""
    import torch

    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long, device=completion_ids.device)
    eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
    seq = torch.arange(is_eos.size(1), device=completion_ids.device).expand(is_eos.size(0), -1)
    keep = seq <= eos_idx.unsqueeze(1)
    return [c[m].tolist() for c, m in zip(completion_ids.cpu(), keep.cpu())]


def group_rows(prompt_ids, prompt_mask) -> list["Any"]:
    """Indices of the rows that share a prompt (identical padded prompt and mask), one tensor per prompt,
    in order of first appearance."""
    import torch

    key = torch.cat([prompt_ids, prompt_mask], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    order = list(dict.fromkeys(inverse.tolist()))
    return [(inverse == g).nonzero().flatten() for g in order]


def packed_group_logps(model, input_ids, attention_mask, logits_to_keep: int, temperature: float,
                       attn_implementation: str, compute_entropy: bool = False):
    """Per-token log-probabilities (and entropies) of the completions, with each prompt run once per group.

    GRPO trains on ``num_generations`` completions of the same prompt; the usual batch repeats the
    prompt in every row and pads every completion to the longest, so most of the forward and backward
    work goes to the same prompt tokens again and to padding. Here each group becomes one row: the
    prompt, then its completions one after the other at their own lengths, with a block attention mask
    (every completion sees the prompt and its own earlier tokens, never another completion) and
    positions that restart after the prompt for each completion. The logits, and so the gradient, are
    those of the unpacked rows (up to float rounding); the prompt's activations are computed once and
    receive the group's summed gradient.

    ``input_ids`` / ``attention_mask``: prompts (left-padded) then completions (right-padded, the last
    ``logits_to_keep`` columns), as TRL builds them. Returns ``(logps, entropies or None)``, each
    ``rows x logits_to_keep``, rows in the input order, 0 at padding.
    """
    import torch

    n, width = input_ids.shape
    c = logits_to_keep
    p = width - c
    device = input_ids.device
    prompt_ids, prompt_mask = input_ids[:, :p], attention_mask[:, :p].bool()
    comp_ids = input_ids[:, p:]
    # A completion's real tokens are a prefix of its columns (up to and including its end token).
    lengths = attention_mask[:, p:].sum(dim=1).tolist()
    groups = group_rows(prompt_ids, prompt_mask.long())
    length = p + max(sum(lengths[r] for r in g.tolist()) for g in groups)
    packed = torch.zeros((len(groups), length), dtype=input_ids.dtype, device=device)
    positions = torch.zeros((len(groups), length), dtype=torch.long, device=device)
    allowed = torch.zeros((len(groups), length, length), dtype=torch.bool, device=device)
    causal = torch.ones((max(p, c), max(p, c)), dtype=torch.bool, device=device).tril()
    slots = []  # (group, row, start column, length)
    for g, rows in enumerate(groups):
        pm = prompt_mask[rows[0]]
        packed[g, :p] = prompt_ids[rows[0]]
        positions[g, :p] = (pm.long().cumsum(0) - 1).clamp(min=0)
        allowed[g, :p, :p] = causal[:p, :p] & pm[None, :]
        n_prompt = int(pm.sum())
        start = p
        for r in rows.tolist():
            m = lengths[r]
            packed[g, start:start + m] = comp_ids[r, :m]
            positions[g, start:start + m] = n_prompt + torch.arange(m, device=device)
            allowed[g, start:start + m, :p] = pm[None, :]
            allowed[g, start:start + m, start:start + m] = causal[:m, :m]
            slots.append((g, r, start, m))
            start += m
    # Every query sees at least itself: a padding position with nothing to attend to would give NaN.
    allowed |= torch.eye(length, dtype=torch.bool, device=device)
    if attn_implementation == "sdpa":
        mask4d = allowed[:, None]
    else:  # eager attention adds the mask to the scores
        mask4d = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
        mask4d = mask4d.masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    # Hidden states from the last prompt column on: that column predicts each completion's first token.
    keep = torch.arange(p - 1, length, device=device)
    logits = model(input_ids=packed, attention_mask=mask4d, position_ids=positions, logits_to_keep=keep,
                   use_cache=False).logits.float() / temperature
    logps = torch.zeros((n, c), dtype=torch.float32, device=device)
    entropies = torch.zeros((n, c), dtype=torch.float32, device=device) if compute_entropy else None
    rows_lp, rows_ent, index_r, index_t = [], [], [], []
    for g, r, start, m in slots:
        if m == 0:
            continue
        # column start + j - 1 predicts token j; for j = 0 that is the prompt's last column (logits row 0)
        lg = torch.cat([logits[g, :1], logits[g, start - p + 1: start - p + m]], dim=0)  # m x vocab
        lse = torch.logsumexp(lg, dim=-1)
        rows_lp.append(lg.gather(-1, comp_ids[r, :m, None]).squeeze(-1) - lse)
        if compute_entropy:
            with torch.no_grad():
                rows_ent.append(lse - (torch.softmax(lg, dim=-1) * lg).sum(-1))
        index_r += [r] * m
        index_t += list(range(m))
    if rows_lp:
        idx = (torch.tensor(index_r, device=device), torch.tensor(index_t, device=device))
        logps = logps.index_put(idx, torch.cat(rows_lp))
        if compute_entropy:
            entropies = entropies.index_put(idx, torch.cat(rows_ent))
    return logps, entropies


def _trainer_class():
    """:class:`ECGGRPOTrainer`, built on first use so that importing this module does not import trl."""
    global ECGGRPOTrainer
    if ECGGRPOTrainer is not None:
        return ECGGRPOTrainer
    import torch
    from trl import GRPOTrainer
    from trl.extras.profiling import profiling_context
    from trl.models import unwrap_model_for_generation

    from trl.trainer.grpo_trainer import split_tensor_dict

    class _Trainer(GRPOTrainer):
        """TRL's GRPOTrainer with the faster generation and the packed prompt groups of the module
        docstring; vLLM, continuous batching, tools and multimodal inputs keep TRL's own paths."""

        fast_generation = True
        pack_groups = True

        def _packing(self) -> bool:
            return (self.pack_groups and not self.tools and not self._is_vlm and not self.aux_loss_enabled
                    and not self._entropy_bonus_enabled
                    and self.model.config._attn_implementation in ("sdpa", "eager"))

        def _prepare_inputs(self, generation_batch):
            # TRL shuffles a generation batch before cutting it into micro-batches; with one optimizer step
            # per generation batch (on-policy) the order does not change the update, and keeping each
            # prompt's group in one micro-batch is what lets the packed forward run the prompt once.
            if not self.model.training or not self._packing():
                return super()._prepare_inputs(generation_batch)
            generate_every = self.args.steps_per_generation * self.num_iterations
            if self._step % generate_every == 0 or self._buffered_inputs is None:
                batch = self._generate_and_score_completions(generation_batch)
                self._buffered_inputs = split_tensor_dict(batch, self.args.steps_per_generation)
            return self._buffered_inputs[self._step % self.args.steps_per_generation]

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **multimodal):
            if compute_aux_loss or any(v is not None for v in multimodal.values()) or not self._packing():
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
            p = input_ids.size(1) - logits_to_keep
            groups = group_rows(input_ids[:, :p], attention_mask[:, :p])
            limit = max(batch_size or input_ids.size(0), max(len(g) for g in groups))
            chunks, current = [], []
            for g in groups:  # whole groups per forward pass, about batch_size rows each
                if current and sum(len(x) for x in current) + len(g) > limit:
                    chunks.append(torch.cat(current))
                    current = []
                current.append(g)
            chunks.append(torch.cat(current))
            logps = torch.zeros(input_ids.size(0), logits_to_keep, device=input_ids.device)
            entropies = torch.zeros_like(logps) if compute_entropy else None
            impl = self.model.config._attn_implementation
            for rows in chunks:
                with self.accelerator.autocast():
                    lp, ent = packed_group_logps(model, input_ids[rows], attention_mask[rows], logits_to_keep,
                                                 self.temperature, impl, compute_entropy)
                logps = logps.index_put((rows,), lp)
                if compute_entropy:
                    entropies = entropies.index_put((rows,), ent)
            return logps, entropies, None

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            if (not self.fast_generation or self.use_vllm or self.use_transformers_continuous_batching
                    or images is not None or multimodal_fields or self.tools):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            with (profiling_context(self, "transformers.generate"),
                  unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                              gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                              generation_kwargs=self.generation_kwargs,
                                              gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
                  as unwrapped, torch.no_grad(), self._dist.summon_full_params(self.model_wrapped, recurse=False),
                  merged_adapter(unwrapped)):
                new = generate_grouped(unwrapped, prompt_ids, self.generation_config, self._tokenizer.pad_token_id)
            return _trim_after_eos(new, self.eos_token_ids), None

    ECGGRPOTrainer = _Trainer
    return _Trainer


ECGGRPOTrainer = None


# ============================================================================= held-out reward, samples
def _tb_writer(trainer):
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            return cb.tb_writer
    return None


def summarize_scores(scores: list[dict]) -> dict[str, float]:
    """Mean of each reward over the items it applies to, and of the weighted total."""
    names = list(dict.fromkeys(k for s in scores for k in s))
    out = {}
    for name in names:
        vals = [s[name] for s in scores if s.get(name) is not None]
        if vals:
            out[name] = sum(vals) / len(vals)
    return out


def paired_change(first: list[dict], last: list[dict], key: str = "total") -> dict:
    """Mean per-prompt change of ``key`` between two evaluations of the same prompts, with its standard error."""
    diffs = [b[key] - a[key] for a, b in zip(first, last) if a.get(key) is not None and b.get(key) is not None]
    if len(diffs) < 2:
        return {}
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": sum(diffs) / len(diffs), "stderr": se, "n": len(diffs)}


class _Callback:
    """A transformers ``TrainerCallback`` by duck typing: the events a subclass does not define do nothing.
    (Subclassing the real one would import transformers with this module, slowing ``--help``.)"""

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class HeldOutReward(_Callback):
    """Scores greedy answers to fixed validation prompts at the start (``eval_on_start``), every
    ``eval_steps`` steps and at the end; the prompts are shared out over the processes. Each evaluation
    goes to TensorBoard (``heldout/<reward>``), to the trainer state's log history (so it survives a
    resume), and with its answers to ``<run_dir>/heldout.jsonl``."""

    def __init__(self, cfg: GRPOTrainConfig, rows: list[dict], tokenizer):
        self.cfg, self.rows, self.tok = cfg, rows, tokenizer
        self.trainer = None
        self.last_step = None
        self.max_new_tokens = cfg.heldout_max_new_tokens or cfg.max_completion_length

    def evaluate(self, step: int) -> dict | None:
        from accelerate.utils import gather_object
        from trl.models import unwrap_model_for_generation

        from utils.generation import generate

        tr = self.trainer
        acc = tr.accelerator
        shard = self.rows[acc.process_index::acc.num_processes]
        started = time.time()
        with unwrap_model_for_generation(tr.model_wrapped, acc, gather_deepspeed3_params=tr.args.ds3_gather_for_generation,
                                         gradient_checkpointing_kwargs=tr.args.gradient_checkpointing_kwargs) as m, \
                merged_adapter(m):
            answers = generate(m, self.tok, [r["prompt"] for r in shard], max_new_tokens=self.max_new_tokens,
                               batch_size=self.cfg.eval_batch_size or self.cfg.per_device_batch_size)
        scores = self.cfg.score(answers, shard) if shard else []
        results = gather_object([{"id": r["id"], "task": r["task"], "answer": a, "scores": s}
                                 for r, a, s in zip(shard, answers, scores)])
        self.last_step = step
        if not acc.is_main_process:
            return None
        order = {r["id"]: i for i, r in enumerate(self.rows)}
        results.sort(key=lambda x: order[x["id"]])
        means = summarize_scores([x["scores"] for x in results])
        entry = {"step": step, **{f"heldout/{k}": round(v, 5) for k, v in means.items()}}
        tr.state.log_history.append(entry)
        writer = _tb_writer(tr)
        if writer is not None:
            for k, v in means.items():
                writer.add_scalar(f"heldout/{k}", v, step)
            writer.flush()
        with (Path(self.cfg.run_dir) / HELDOUT_LOG).open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "means": means, "items": results}, ensure_ascii=False) + "\n")
        log.info("held-out reward at step %d: %.4f (%s) over %d prompts in %.0f s", step, means.get("total", float("nan")),
                 ", ".join(f"{k} {v:.3f}" for k, v in means.items() if k != "total"), len(results),
                 time.time() - started)
        return means

    def on_train_begin(self, args, state, control, **kwargs):
        if self.rows and self.cfg.eval_on_start and state.global_step == 0:
            self.evaluate(0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.rows and state.global_step % self.cfg.eval_steps == 0:
            self.evaluate(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.rows and self.last_step != state.global_step:
            self.evaluate(state.global_step)


class DropEmptyMetrics(_Callback):
    """Removes metrics without a value from a log record before TensorBoard sees it: TRL reports a reward
    that applied to no completion of the step (e.g. yesno on a step without yes/no questions) as None,
    which the TensorBoard writer refuses with a warning each time. Must run first among the callbacks."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for k in [k for k, v in (logs or {}).items() if v is None]:
            del logs[k]


class TimeLimit(_Callback):
    """Ends training once ``time_limit_minutes`` have passed since the first step began."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.started = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.started is None:
            self.started = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds and self.started is not None and time.time() - self.started > self.seconds:
            log.info("time limit of %.0f minutes reached at step %d of %d; finishing", self.seconds / 60,
                     state.global_step, state.max_steps)
            control.should_training_stop = True
            control.should_save = True


class SampleLogger(_Callback):
    """Every ``sample_steps`` steps: the first ``samples_to_log`` prompt groups of the latest generation
    batch, each completion with its rewards and advantage, as a TensorBoard text table (``samples``) and a
    line of ``<run_dir>/samples.jsonl``."""

    def __init__(self, cfg: GRPOTrainConfig):
        self.cfg = cfg
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        if not self.cfg.sample_steps or state.global_step % self.cfg.sample_steps or \
                not self.trainer.accelerator.is_main_process:
            return
        logs = self.trainer._logs
        n = min(len(logs["prompt"]), self.cfg.samples_to_log * self.cfg.num_generations)
        if not n:
            return
        names = list(logs["rewards"])
        items = []
        for i in range(n):
            prompt = logs["prompt"][i]
            items.append({"question": completion_text([m for m in prompt if m.get("role") == "user"][-1:]),
                          "completion": completion_text(logs["completion"][i]),
                          "rewards": {k: _num(logs["rewards"][k][i]) for k in names},
                          "advantage": _num(logs["advantages"][i])})
        with (Path(self.cfg.run_dir) / SAMPLES_LOG).open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, "items": items}, ensure_ascii=False) + "\n")
        writer = _tb_writer(self.trainer)
        if writer is not None:
            writer.add_text("samples", samples_markdown(items, names), state.global_step)
            writer.flush()


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def samples_markdown(items: list[dict], names: list[str]) -> str:
    """Sample completions as Markdown: one table per question (TensorBoard renders it)."""
    out, question = [], None

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")[:600]

    for it in items:
        if it["question"] != question:
            question = it["question"]
            out += ["", f"**Q:** {cell(question)}", "", "| completion | " + " | ".join(names) + " | advantage |",
                    "|---" * (len(names) + 2) + "|"]
        vals = " | ".join("-" if it["rewards"][k] is None else f"{it['rewards'][k]:.2f}" for k in names)
        adv = "-" if it["advantage"] is None else f"{it['advantage']:.2f}"
        out.append(f"| {cell(it['completion'])} | {vals} | {adv} |")
    return "\n".join(out).strip()


# ============================================================================= the run
def output_dir(cfg: GRPOTrainConfig) -> Path:
    from utils.models import models_root

    return Path(cfg.output_dir) if cfg.output_dir else models_root() / "rlhf"


def grpo_args(cfg: GRPOTrainConfig, reward_weights: list[float]):
    """TRL's GRPOConfig for ``cfg``: the common training settings (utils.training.trl_args) plus GRPO's.
    One generation round per optimizer step (the generation batch is the step's batch), so sampling is
    on-policy and needs no extra log-probability pass."""
    extra: dict[str, Any] = dict(
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=cfg.top_p, loss_type=cfg.loss_type, beta=cfg.beta,
        epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, scale_rewards=cfg.scale_rewards,
        multi_objective_aggregation=cfg.reward_aggregation,
        mask_truncated_completions=cfg.mask_truncated_completions, num_iterations=cfg.num_iterations,
        reward_weights=reward_weights,
        # Dropout would make the sampled policy and the trained one differ; LoRA dropout is 0 here anyway.
        disable_dropout=True,
        # The held-out reward replaces TRL's evaluation loop (which would sample num_generations per prompt).
        eval_strategy="no", eval_on_start=False,
        use_vllm=vllm_wanted(cfg), vllm_mode=cfg.vllm_mode,
        vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        vllm_tensor_parallel_size=cfg.vllm_tensor_parallel_size,
        # Keeps the extra dataset columns (reference, labels) that the rewards read.
        remove_unused_columns=False,
        # GRPO batches carry no input_ids for the Trainer to count; TRL counts the tokens itself (num_tokens).
        include_num_input_tokens_seen="no",
    )
    if cfg.vllm_server_base_url:
        extra["vllm_server_base_url"] = cfg.vllm_server_base_url
    if extra["use_vllm"] and cfg.vllm_mode == "colocate":
        # vLLM's context must hold the longest prompt plus a completion; 2048 covers the data card's longest
        # prompts with room to spare and keeps the KV reservation small.
        extra["vllm_max_model_length"] = 2048
    name = cfg.run_name or f"grpo-{time.strftime('%Y%m%d-%H%M%S')}"
    return trl_args(cfg, name, **extra)


def build_trainer(cfg: GRPOTrainConfig, train_rows: list[dict], args=None):
    """The GRPO trainer for ``cfg`` on ``train_rows``, and the model an adapter of it applies to."""
    configure_threads(cfg)
    funcs, weights = cfg.build()
    args = args or grpo_args(cfg, weights)
    tok = load_train_tokenizer(cfg, cfg.policy)
    model, peft_config, base_ref = load_policy(cfg)
    cls = _trainer_class()
    trainer = cls(model=model, reward_funcs=funcs, args=args, train_dataset=to_dataset(train_rows),
                  processing_class=tok, peft_config=peft_config)
    trainer.fast_generation = cfg.fast_generation
    trainer.pack_groups = cfg.pack_groups
    return trainer, base_ref


def heldout_summary(history: list[dict]) -> dict:
    """The held-out curve from the log history, its first and last points, and the step-to-step noise (std of
    the differences between consecutive evaluations of the weighted total)."""
    curve = [h for h in history if "heldout/total" in h]
    out: dict[str, Any] = {"heldout": curve}
    if curve:
        out["heldout_first"], out["heldout_last"] = curve[0], curve[-1]
        steps = [b["heldout/total"] - a["heldout/total"] for a, b in zip(curve, curve[1:])]
        if len(steps) >= 2:
            out["heldout_step_noise"] = statistics.stdev(steps)
    return out


def _read_heldout(run_dir: str) -> list[dict]:
    path = Path(run_dir) / HELDOUT_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _prepare_run_dir(cfg: GRPOTrainConfig, ckpt: str | None) -> None:
    """Start the run folder's logs afresh, or, on resumption, drop what was logged after the checkpoint
    (those steps run again)."""
    upto = int(Path(ckpt).name.split("-")[-1]) if ckpt else -1
    for name in (HELDOUT_LOG, SAMPLES_LOG):
        path = Path(cfg.run_dir) / name
        if not path.is_file():
            continue
        keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= upto]
        path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def run_grpo(cfg: GRPOTrainConfig) -> dict:
    """Train, measure and save as the config says; return the metrics written to metrics.json."""
    import torch

    check_backends(cfg)
    out = output_dir(cfg)
    gradient_accumulation(cfg)  # a batch that does not divide over this run's processes stops here, early
    train = load_prompts(cfg, "train", cfg.max_train_prompts)
    heldout = heldout_rows(cfg)
    _, weights = cfg.build()
    args = grpo_args(cfg, weights)  # sets up the processes of a distributed run
    with args.main_process_first(desc="run folder"):
        ckpt = resume_checkpoint(cfg)
        if args.process_index == 0:
            _prepare_run_dir(cfg, ckpt)
    log.info("generation: %s", f"vLLM ({cfg.vllm_mode})" if args.use_vllm else
             "transformers" + (" (merged adapter, shared prefill)" if cfg.fast_generation else ""))
    log.info("GRPO on %d prompts x %d completions, %d held-out prompts, rewards %s (%s) -> %s", len(train),
             cfg.num_generations, len(heldout), cfg.rewards, cfg.reward_aggregation, out)
    try:
        trainer, base_ref = build_trainer(cfg, train, args)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
        log.info("training %d of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
        held = HeldOutReward(cfg, heldout, trainer.processing_class)
        samples = SampleLogger(cfg)
        for cb in (held, samples, TimeLimit(cfg.time_limit_minutes)):
            cb.trainer = trainer
            trainer.add_callback(cb)
        trainer.callback_handler.callbacks.insert(0, DropEmptyMetrics())
        started = time.time()
        trainer.train(resume_from_checkpoint=ckpt)
        wall = time.time() - started
        metrics = {}
        if trainer.accelerator.is_main_process:
            metrics = final_metrics(cfg, trainer, ckpt, len(train), wall)
            model = trainer.model
            if hasattr(model, "peft_config") and "ref" in model.peft_config:
                model.delete_adapter("ref")  # TRL's frozen copy for the KL term, not part of the result
            cfg_out = cfg if cfg.output_dir else dataclasses.replace(cfg, output_dir=str(out))
            save_final(model, trainer.processing_class, cfg_out, metrics, model_card(cfg_out, metrics, base_ref),
                       base_ref=base_ref)
        return metrics
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Without an orderly teardown the gloo backend sometimes aborts the other ranks at exit.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def final_metrics(cfg: GRPOTrainConfig, trainer, ckpt: str | None, n_train: int, wall: float) -> dict:
    history = trainer.state.log_history
    rewards = [{k: v for k, v in h.items() if k == "step" or k == "reward" or k.startswith("rewards/")
                or k in ("kl", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio")}
               for h in history if "reward" in h]
    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    steps_run = trainer.state.global_step - (int(Path(ckpt).name.split("-")[-1]) if ckpt else 0)
    extra = {"resumed_from": ckpt, "num_processes": trainer.accelerator.num_processes, "train_prompts": n_train, "answer_format": cfg.answer_format,
             "rewards": cfg.rewards, "train_curve": rewards,
             "wall_seconds_this_run": round(wall, 1),
             "samples_per_second_this_run": round(steps_run * cfg.batch_size / wall, 3) if wall else None,
             **heldout_summary(history)}
    evals = _read_heldout(cfg.run_dir)
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        by_id = {x["id"]: x["scores"] for x in first["items"]}
        pairs = [(by_id[x["id"]], x["scores"]) for x in last["items"] if x["id"] in by_id]
        extra["heldout_change"] = {k: paired_change([a for a, _ in pairs], [b for _, b in pairs], k)
                                   for k in ["total", *cfg.rewards]}
        extra["heldout_change_steps"] = [first["step"], last["step"]]
    out = training_metrics(trainer, extra)
    out.pop("eval_loss", None)
    out.pop("train_loss", None)
    out["train"] = {k: v for k, v in summary.items() if k != "step"}
    return out


def model_card(cfg: GRPOTrainConfig, metrics: dict, base_ref: str | None) -> str:
    first, last = metrics.get("heldout_first", {}), metrics.get("heldout_last", {})
    names = ["total", *cfg.rewards]

    def fmt(h, k):
        v = h.get(f"heldout/{k}")
        return "n/a" if v is None else f"{v:.3f}"

    rows = [f"| {k} | {fmt(first, k)} | {fmt(last, k)} |" for k in names]
    change = metrics.get("heldout_change", {}).get("total", {})
    lora = (f"LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha}" if cfg.adapter == "lora" else "full fine-tuning")
    return "\n".join([
        f"# ECG-GRPO policy ({cfg.base_model})", "",
        f"GRPO fine-tune of `{cfg.policy}` (adapter on `{base_ref}`) on ECG-Expert-QA prompts "
        f"(tasks: {', '.join(cfg.tasks) if cfg.tasks else 'all in the GRPO set'}), made by `grpo_train.py`.", "",
        "## Use", "",
        "```python",
        "from utils.generation import load_for_generation, generate, with_format_instructions",
        f"model, tok = load_for_generation('{output_dir(cfg)}')",
        f"generate(model, tok, [with_format_instructions(messages, '{cfg.answer_format}')])",
        "```", "",
        "## Training", "",
        f"- rewards (weights): {', '.join(f'{k} {v}' for k, v in cfg.rewards.items())}; aggregation "
        f"{cfg.reward_aggregation}, scaling {cfg.scale_rewards}",
        f"- {metrics.get('global_step')} steps of {cfg.batch_size} completions ({cfg.num_generations} per prompt, at "
        f"most {cfg.max_completion_length} tokens, temperature {cfg.temperature}); loss {cfg.loss_type}, beta "
        f"{cfg.beta}, learning rate {cfg.learning_rate}; {lora}",
        f"- wall time {metrics.get('wall_seconds_this_run')} s (this run), peak RSS {metrics.get('peak_rss_mb')} MiB", "",
        f"## Held-out reward ({cfg.heldout_prompts} validation prompts, greedy)", "",
        f"| reward | step {first.get('step', '-')} | step {last.get('step', '-')} |", "| --- | ---: | ---: |", *rows, "",
        (f"Paired change of the total: {change['mean']:+.4f} +- {change['stderr']:.4f} (standard error, "
         f"{change['n']} prompts)." if change else ""), "",
        "## Limitations", "",
        "Educational use only: not medical advice. The rewards are automatic proxies of answer quality; "
        "ECG-Expert-QA states no license upstream, so this model is for research within those terms.", ""])
