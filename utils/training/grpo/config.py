"""GRPO's config (the training fields plus sampling, loss, rewards and held-out evaluation) and its prompts.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from utils.core.config import fld, non_negative, positive, probability
from utils.data.formats import with_format_instructions
from utils.data.raw import TASKS
from utils.data.rows import DataError, read_split
from utils.models.decode import DECODE_DTYPES
from utils.models.special_tokens import escape_messages
from utils.rewards.mix import RewardMix
from utils.training.config import TrainConfig

log = logging.getLogger(__name__)


# TRL 1.16's loss types (tests/test_trl_compat.py checks that TRL still accepts each)
LOSS_TYPES = ["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"]


def _min_two(x) -> bool:
    return isinstance(x, int) and x >= 2


@dataclass
class GRPOTrainConfig(TrainConfig, RewardMix):
    """grpo_train.py's config: the common training fields, the reward mix and the GRPO knobs."""

    TRL_CONFIG: ClassVar[str] = "GRPOConfig"
    MODEL_FOLDER: ClassVar[str] = "rlhf"

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
    loss_type: str = fld("dapo", "The policy loss (TRL's): dapo (token losses averaged over all tokens of the step: "
                         "no length bias), grpo (per sequence, then over sequences), dr_grpo (Dr. GRPO: over a "
                         "constant; pair it with scale_rewards: none), bnpo (over the local batch's tokens), cispo "
                         "(clipped importance weights, MiniMax-M1), sapo (soft gate instead of clipping), luspo "
                         "(length-unbiased GSPO; needs importance_sampling_level: sequence), vespo (soft "
                         "sequence-level weights).", choices=LOSS_TYPES)
    importance_sampling_level: str = fld("token", "Probability ratio per token (PPO/GRPO) or one per sequence, the "
                                         "mean of its tokens' log-ratios (GSPO: sequence with loss_type grpo, "
                                         "epsilon 3e-4, epsilon_high 4e-4, as its paper).",
                                         choices=["token", "sequence"])
    skip_tied_groups: bool = fld(False, "Leave out of the loss the completions of a prompt whose group's rewards "
                                 "all tie (they carry no advantage, only KL and a share of the token average): the "
                                 "step averages over the groups that teach something. DAPO's dynamic sampling "
                                 "without its resampling (the step has fewer completions); logged as "
                                 "skipped_tied_groups.")
    length_neutral: float = fld(0.0, "Share of each group's advantages that completion length explains (least "
                                "squares within the group) taken out of them: 1 leaves no reward for length "
                                "alone (answers may still change length with what they say); 0 keeps TRL's "
                                "advantages. Logged as advantage_length_corr (before) and "
                                "advantage_length_corr_after.", check=(probability, "a number in [0, 1]"))
    weight_ema: float = fld(0.0, "Decay of an exponential moving average of the trainable weights, updated after "
                            "every optimizer step: the held-out evaluations and the saved model use the average, "
                            "sampling and training the live weights. 0: off; 0.9 averages over ~10 steps (the "
                            "saved model then lags the live one by ~9 steps).",
                            check=(lambda x: x is not None and 0.0 <= x < 1.0, "a number in [0, 1)"))
    beta: float = fld(0.0, "Weight of the KL penalty to the starting policy; 0 skips the reference pass (and the KL "
                      "log).", check=(non_negative, "a number >= 0"))
    beta_steps: int = fld(0, "Optimizer steps that the KL penalty holds for: 0: the whole run; N > 0: the first N "
                          "steps only, then beta falls to 0 and the reference pass stops (a brake on the early "
                          "steps, where short runs swing furthest).", check=(non_negative, "an integer >= 0"))
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
    decode_dtype: str = fld("model", "Matrix products of the CPU decoder (rollouts and held-out answers): model: "
                            "the weights' dtype (fp32 on CPU); bfloat16: bf16 products, fp32 elsewhere (2-4x faster "
                            "products on a CPU with AMX, slower without native bf16); auto: bfloat16 where the CPU "
                            "has AMX. The sampled tokens then differ from fp32's by rounding.",
                            choices=DECODE_DTYPES)
    pack_groups: bool = fld(True, "Training forward passes run each prompt once per group, its completions packed "
                            "after it with a block attention mask (same gradient, fewer tokens); false: TRL's "
                            "one row per completion.")
    use_vllm: bool | str = fld(False, "Generate with vLLM (CUDA; `pip install vllm`); auto: when vLLM and a GPU are "
                               "there.", choices=[False, True, "auto"])
    vllm_mode: str = fld("colocate", "colocate: vLLM shares the training GPUs; server: a separate `trl vllm-serve` "
                         "process (several nodes).", choices=["colocate", "server"])
    vllm_gpu_memory_utilization: float = fld(0.3, "Share of GPU memory vLLM takes in colocate mode.",
                                             check=(lambda x: 0.0 < x < 1.0, "a number in (0, 1)"))
    vllm_sleep_mode: bool = fld(False, "Colocate mode: vLLM releases its weights and KV cache while the policy "
                                "trains and takes them back to sample (more memory for training, a wake-up "
                                "transfer per step).")
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
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            raise ValueError("loss_type luspo is GSPO's length-unbiased sequence loss; expected "
                             "importance_sampling_level: sequence")
        if self.vllm_sleep_mode and (self.use_vllm is False or self.vllm_mode != "colocate"):
            raise ValueError(f"vllm_sleep_mode: true with use_vllm {self.use_vllm} and vllm_mode {self.vllm_mode}: "
                             "sleep mode frees a colocated engine's memory; expected use_vllm: true or auto with "
                             "vllm_mode: colocate")
        if self.beta_steps and not self.beta:
            raise ValueError(f"beta_steps {self.beta_steps} with beta 0: there is no KL penalty to hold for those "
                             "steps; expected beta > 0 or beta_steps: 0")
        if self.vllm_server_base_url and not self.vllm_server_base_url.startswith(("http://", "https://")):
            raise ValueError(f"vllm_server_base_url {self.vllm_server_base_url!r}: expected http://host:port")


# ============================================================================= prompts
def load_prompts(cfg: GRPOTrainConfig, split: str, limit: int = 0) -> list[dict]:
    """Rows of ``grpo/<split>.jsonl``, checked, filtered by task, subsampled (seeded), with the answer
    format's instruction in the system prompt (as SFT trained it) and special-token strings in the prompt
    escaped. TRL tokenises this prompt column itself, and the policy's tokenizer is not loaded yet, so the
    escape here is the tokenizer-free ``<|name|>`` shape (every special token of Llama 3 and ChatML's turn
    tokens); the held-out generation escapes again with the tokenizer (utils.models.special_tokens)."""
    path = Path(cfg.data_dir) / "grpo" / f"{split}.jsonl"
    rows = read_split(cfg.data_dir, f"grpo/{split}")
    if cfg.tasks:
        rows = [r for r in rows if r.get("task") in cfg.tasks]
    if not rows:
        raise DataError(f"{path}: no prompts left" + (f" for tasks {cfg.tasks}" if cfg.tasks else ""))
    if limit and len(rows) > limit:
        rows = random.Random(cfg.seed).sample(rows, limit)
    return [{**r, "prompt": escape_messages(with_format_instructions(r["prompt"], cfg.answer_format))} for r in rows]


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
