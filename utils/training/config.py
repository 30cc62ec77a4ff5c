"""The config every training phase shares and the TRL arguments built from it.

* :class:`TrainConfig`: model, precision, LoRA/QLoRA, batch sizes, schedule, logging, checkpoints, resume,
  final save. A phase's config subclasses it and names its TRL config class in ``TRL_CONFIG`` so that
  ``trainer_extra`` keys are checked at load.
* :func:`trl_args`: the TRL config (``SFTConfig``, ``RewardConfig``, ``GRPOConfig``) for a
  :class:`TrainConfig` plus the phase's own arguments: CPU when there is no CUDA, bf16 where the GPU has
  it, TensorBoard (and W&B) logging, checkpoints every N steps, ``trainer_extra`` last.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from utils.core.config import UserError, fld, fraction, non_negative, positive
from utils.data.formats import FORMATS

log = logging.getLogger(__name__)


ATTN_IMPLEMENTATIONS = ["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


# TRL / transformers arguments that this config sets through keys of its own (which do more than pass them on)
OWN_KEYS = {"push_to_hub": "push_to_hub", "hub_model_id": "hub_model_id", "hub_private_repo": "hub_private",
            "use_liger_kernel": "liger_kernel"}


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _resume_value(x) -> bool:
    return isinstance(x, str) and bool(x.strip())


@dataclass
class TrainConfig:
    """Fields common to every training phase (see the module docstring)."""

    TRL_CONFIG: ClassVar[str] = "SFTConfig"  # the trl class whose fields trainer_extra may set
    MODEL_FOLDER: ClassVar[str] = "train"  # models/<this> is the finished model when output_dir is empty
    PIPELINE_TAG: ClassVar[str] = "text-generation"  # the Hub's task for the model card

    # ---- model
    base_model: str = fld("smollm2-135m-instruct", "The recipe's base model: smollm2-135m-instruct, a folder or "
                          "a Hub id such as meta-llama/Llama-3.2-3B-Instruct.")
    precision: str = fld("auto", "Training precision. auto: bf16 on a GPU that has it, else fp16 on CUDA; fp32 on "
                         "CPU.", choices=["auto", "bf16", "fp16", "fp32"])
    quantization: str = fld("none", "Load the frozen base in 4 or 8 bits through bitsandbytes (QLoRA; CUDA only).",
                            choices=["none", "4bit", "8bit"])
    bnb_4bit_quant_type: str = fld("nf4", "4-bit data type (nf4 is the QLoRA paper's).", choices=["nf4", "fp4"])
    bnb_double_quant: bool = fld(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    attn_implementation: str = fld("auto", "Attention kernel: auto (transformers' choice: sdpa where it can), sdpa, "
                                   "eager, flash_attention_2 (CUDA, `pip install flash-attn`; fastest with long "
                                   "padded batches) or flash_attention_3 (Hopper GPUs). GRPO's packed groups need sdpa "
                                   "or eager and are skipped otherwise.", choices=ATTN_IMPLEMENTATIONS)
    liger_kernel: bool = fld(False, "Liger's fused Triton kernels (CUDA, `pip install liger-kernel`): for SFT the "
                             "fused linear cross-entropy loss (the logits are never materialised: much less memory "
                             "with a 128k vocabulary) plus RMSNorm/RoPE/SwiGLU kernels; for the reward model and "
                             "GRPO (which fuses its own log-probability head) the layer kernels.")
    # ---- adapter
    adapter: str = fld("lora", "lora: train a LoRA adapter on the frozen base; none: train every weight "
                       "(not with quantization).", choices=["lora", "none"])
    lora_r: int = fld(16, "LoRA rank.", check=(positive, "an integer > 0"))
    lora_alpha: int = fld(32, "LoRA scaling numerator (the update is scaled by alpha / r).",
                          check=(positive, "an integer > 0"))
    lora_dropout: float = fld(0.05, "Dropout on the LoRA input.", check=(fraction, "a fraction in [0, 1)"))
    lora_target_modules: list[str] = fld(help="Module names that get LoRA weights, or [all-linear].",
                                         default_factory=lambda: ["all-linear"])
    # ---- answer format
    answer_format: str = fld("plain", "Answer layout the model learns and is asked for (see utils/data/formats.py).",
                             choices=list(FORMATS))
    # ---- optimisation
    seed: int = fld(42, "Seed for adapter initialisation, data order and dropout.")
    learning_rate: float = fld(2e-4, "Peak learning rate.", check=(lambda x: 0 < x < 1, "a number in (0, 1)"))
    lr_scheduler: str = fld("cosine", "Learning-rate schedule after warm-up.",
                            choices=["linear", "cosine", "constant", "constant_with_warmup"])
    warmup_ratio: float = fld(0.05, "Share of the steps spent warming the learning rate up.",
                              check=(fraction, "a fraction in [0, 1)"))
    weight_decay: float = fld(0.0, "AdamW weight decay.", check=(non_negative, "a number >= 0"))
    max_grad_norm: float = fld(1.0, "Gradient clipping norm.", check=(positive, "a number > 0"))
    epochs: float = fld(1.0, "Passes over the training set (ignored when max_steps is set).",
                        check=(positive, "a number > 0"))
    max_steps: int = fld(-1, "Optimizer steps to train; -1: as many as `epochs` take.",
                         check=(lambda x: x == -1 or x > 0, "-1 or an integer > 0"))
    batch_size: int = fld(16, "Examples per optimizer step, over all devices (the effective batch); the per-device "
                          "batch and gradient accumulation are derived from it for the processes of the launch.",
                          check=(positive, "an integer > 0"))
    per_device_batch_size: int = fld(4, "Most examples per forward pass on one device (a memory limit): the largest "
                                     "per-device batch up to this that divides batch_size / processes is used, the "
                                     "rest is gradient accumulation.", check=(positive, "an integer > 0"))
    eval_batch_size: int = fld(0, "Examples per evaluation forward pass; 0: per_device_batch_size.",
                               check=(non_negative, "an integer >= 0"))
    gradient_checkpointing: bool = fld(False, "Recompute activations in the backward pass: less memory, ~20-30% "
                                       "slower.")
    num_threads: int = fld(0, "CPU threads for torch; 0: torch's default.", check=(non_negative, "an integer >= 0"))
    # ---- logging, checkpoints
    logging_steps: int = fld(10, "Log the training loss every N steps.", check=(positive, "an integer > 0"))
    eval_steps: int = fld(50, "Evaluate on the validation split every N steps.", check=(positive, "an integer > 0"))
    eval_on_start: bool = fld(True, "Evaluate once before the first step (the baseline the run improves on).")
    save_steps: int = fld(50, "Write a checkpoint every N steps.", check=(positive, "an integer > 0"))
    save_total_limit: int = fld(2, "Checkpoints kept in the run folder (oldest removed first).",
                                check=(positive, "an integer > 0"))
    report_to: list[str] = fld(help="Where metrics go besides the console: tensorboard, wandb (needs `pip install "
                               "wandb` and a login).", choices=["tensorboard", "wandb"],
                               default_factory=lambda: ["tensorboard"])
    wandb_project: str = fld("ecg-grpo", "W&B project, when report_to has wandb.")
    run_name: str = fld("", "Name of the run in TensorBoard / W&B; empty: the phase and the time.")
    # ---- folders, resume, final save
    run_dir: str = fld("runs/train", "Checkpoints and TensorBoard logs of the run.")
    output_dir: str = fld("models/train", "The finished model folder.")
    resume: str = fld("auto", "auto: continue the run folder's last checkpoint when the same run made it (same "
                      "config, data, model, code); never: start afresh (an old run is moved to previous-<time>/, "
                      "nothing is deleted); or a checkpoint folder. "
                      "`--resume` alone means auto.", check=(_resume_value, "auto, never or a checkpoint folder"),
                      const="auto")
    merge: bool = fld(False, "Also write the adapter merged into the base (output_dir/merged): a plain model that "
                      "loads and generates faster.")
    push_to_hub: bool = fld(False, "After the final save, upload output_dir (weights, tokenizer, model card "
                            "README.md, train_config.yaml, metrics.json; merged/ too with merge: true) to the Hub "
                            "repo hub_model_id (needs `huggingface-cli login`); checkpoints stay local.")
    hub_model_id: str = fld("", "The Hub repo push_to_hub writes, as owner/name (created when missing).")
    hub_private: bool = fld(True, "Create the Hub repo private (ECG-Expert-QA states no license: share with care).")
    trainer_extra: dict[str, Any] = fld(help="Extra keys passed as they are to the TRL config (checked against its "
                                        "field names at load).", default_factory=dict)
    # ---- planning a launch
    dry_run: bool = fld(False, "Check the config, print the launch plan (per-device batch, accumulation, steps, "
                        "tokens per step, GPU memory per device) and exit: no weights loaded, no GPU needed.")
    world_size: int = fld(0, "Processes to plan the batch layout for; 0: the launcher's WORLD_SIZE, else 1 (use it "
                          "with --dry-run to check a multi-GPU launch on any machine).",
                          check=(non_negative, "an integer >= 0"))
    zero_stage: int = fld(-1, "With --dry-run: the DeepSpeed ZeRO stage of the launch (0: none, 2, 3); -1: the "
                          "launcher's (accelerate sets it from configs/accelerate/zero*.yaml).",
                          check=(lambda x: x in (-1, 0, 1, 2, 3), "-1, 0, 1, 2 or 3"))

    def __post_init__(self):
        if self.quantization != "none" and self.adapter != "lora":
            raise ValueError(f"quantization {self.quantization} trains an adapter on a frozen quantized base; "
                             "expected adapter: lora")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty; expected module names or [all-linear]")
        if self.push_to_hub and not HUB_ID.fullmatch(self.hub_model_id):
            raise ValueError(f"push_to_hub: true with hub_model_id {self.hub_model_id!r}: expected the Hub repo as "
                             "owner/name, e.g. my-user/llama-3.2-3b-ecg-sft")
        for key in self.trainer_extra:
            if key in OWN_KEYS:
                # TRL's own push_to_hub would upload the run folder's checkpoints, not the finished model and its card.
                raise ValueError(f"trainer_extra: {key!r} has a config key of its own here; expected "
                                 f"{OWN_KEYS[key]} instead")
        check_trainer_extra(self.trainer_extra, trl_config_class(self.TRL_CONFIG))

    def trl_config_class(self):
        return trl_config_class(self.TRL_CONFIG)


def trl_config_class(name: str):
    import trl

    return getattr(trl, name)


def check_trainer_extra(extra: dict, trl_cls) -> None:
    """Refuse a ``trainer_extra`` key that the TRL config class does not have (a typo would be ignored)."""
    names = {f.name for f in dataclasses.fields(trl_cls)}
    for key in extra:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"trainer_extra: '{key}' is not a {trl_cls.__name__} field{hint}")


# ============================================================================= precision, devices
def gradient_accumulation(cfg: TrainConfig) -> int:
    """Passes per optimizer step on each process; checks early that the batch splits over the processes."""
    from utils.training.plan import batch_layout

    return batch_layout(cfg).accumulation


def precision_flags(cfg: TrainConfig) -> tuple[bool, bool, str]:
    """``(bf16, fp16, load_dtype)``: mixed-precision flags for the TRL config and the dtype to load the
    base in. On CPU ``auto`` is fp32: without bf16 matrix units (AVX512-BF16, AMX) bf16 is slower, and even
    with AMX bf16 autocast trained the CPU recipe no faster (docs/EXPERIMENTS.md); ``precision: bf16`` still
    asks for it."""
    import torch

    cuda = torch.cuda.is_available()
    p = cfg.precision
    if p == "auto":
        p = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if p == "fp16" and not cuda:
        raise UserError("precision: fp16 needs a CUDA GPU; use fp32 or bf16 on CPU")
    if p == "bf16":
        # Frozen LoRA bases load in bf16 (half the memory); full fine-tuning keeps fp32 master weights.
        return True, False, "bfloat16" if cfg.adapter == "lora" else "float32"
    if p == "fp16":
        return False, True, "float16" if cfg.adapter == "lora" else "float32"
    return False, False, "float32"


# GPU kernels a config may ask for: (what the config says, the module to find, the package to install)
def _kernels_asked(cfg: TrainConfig) -> list[tuple[str, str, str]]:
    flash = {"flash_attention_2": ("flash_attn", "flash-attn"),
             "flash_attention_3": ("flash_attn_interface", "flash-attn 3 (hopper build)")}
    asked = []
    if cfg.attn_implementation in flash:
        asked.append((f"attn_implementation: {cfg.attn_implementation}", *flash[cfg.attn_implementation]))
    if cfg.liger_kernel:
        asked.append(("liger_kernel: true", "liger_kernel", "liger-kernel"))
    return asked


def check_kernels(cfg: TrainConfig, cuda: bool) -> None:
    """Refuse, with the fix, GPU kernels asked for where they cannot run (the config itself loads anywhere,
    so that a launch can be planned with --dry-run on a laptop). Checked when the model is loaded for
    training, before any trainer is built."""
    for what, module, package in _kernels_asked(cfg):
        if not cuda:
            raise UserError(f"{what} needs a CUDA GPU; set it back (attn_implementation: auto, liger_kernel: false) "
                            "on this machine")
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{what} needs {package}, which is not installed: `make setup-gpu` (or `pip install "
                            f"{package}`)")


# ============================================================================= PEFT, quantization, model
def lora_config(cfg: TrainConfig):
    """The PEFT LoRA config of the recipe, or None for full fine-tuning."""
    if cfg.adapter != "lora":
        return None
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    target = "all-linear" if targets == ["all-linear"] else list(targets)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=target,
                      bias="none", task_type="CAUSAL_LM")


def quantization_config(cfg: TrainConfig):
    """bitsandbytes settings for QLoRA, or None. Refused without CUDA: bitsandbytes' kernels are GPU kernels."""
    if cfg.quantization == "none":
        return None
    if not has_cuda():
        raise UserError(f"quantization: {cfg.quantization} needs a CUDA GPU (bitsandbytes); set quantization: none "
                        "to train on this machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"quantization: {cfg.quantization} needs bitsandbytes; run `pip install bitsandbytes`")
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    bf16, _, _ = precision_flags(cfg)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=cfg.bnb_double_quant,
                              bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16)


# ============================================================================= TRL arguments
def trl_args(cfg: TrainConfig, run_name: str, **phase_args):
    """The TRL config for ``cfg`` (class ``cfg.TRL_CONFIG``): the common settings, then the phase's own
    ``phase_args``, then ``cfg.trainer_extra`` (which wins, and is logged)."""
    cls = cfg.trl_config_class()
    bf16, fp16, _ = precision_flags(cfg)
    report = list(cfg.report_to)
    if "wandb" in report:
        if importlib.util.find_spec("wandb") is None:
            raise UserError("report_to: wandb needs the wandb package; run `pip install wandb` and `wandb login`, "
                            "or drop wandb from report_to")
        os.environ.setdefault("WANDB_PROJECT", cfg.wandb_project)
    from utils.training.plan import batch_layout

    cuda = has_cuda()
    lay = batch_layout(cfg)
    kwargs: dict[str, Any] = dict(
        output_dir=cfg.run_dir, run_name=run_name, seed=cfg.seed, data_seed=cfg.seed,
        use_cpu=not cuda, bf16=bf16, fp16=fp16,
        per_device_train_batch_size=lay.per_device,
        per_device_eval_batch_size=cfg.eval_batch_size or lay.per_device,
        gradient_accumulation_steps=lay.accumulation,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=float(cfg.warmup_ratio),  # a float below 1 is a share of the steps
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        # transformers 5 calls gradient checkpointing "activation checkpointing" (the old name still works).
        activation_checkpointing=cfg.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without the input-grad hook.
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_strategy="steps", logging_steps=cfg.logging_steps, logging_first_step=True,
        eval_strategy="steps", eval_steps=cfg.eval_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        report_to=report or "none", include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=cuda, disable_tqdm=False,
    )
    if cfg.liger_kernel:
        kwargs["use_liger_kernel"] = True
    kwargs.update(phase_args)
    for key, value in cfg.trainer_extra.items():
        if key in kwargs and kwargs[key] != value:
            log.info("trainer_extra overrides %s: %r -> %r", key, kwargs[key], value)
        kwargs[key] = value
    return cls(**kwargs)


def load_for_training(cfg: TrainConfig, ref: str, *, head: str = "causal", adapter: str = "merge",
                      keep_layers: int = 0):
    """``(model, tokenizer)`` to train, through the one loader (:func:`utils.models.loading.load_model`): in
    the dtype :func:`precision_flags` picks, quantized and prepared for k-bit training when the config asks
    (QLoRA). An adapter folder is merged into its base (the phase then trains a fresh adapter on top)
    unless ``adapter="train"`` (that adapter is trained further). The config's own fresh LoRA adapter is
    added by the TRL trainer."""
    from transformers import set_seed

    from utils.models.loading import load_model, load_tokenizer

    # Seeded before loading: weights made at load time (a reward model's score head, layers a checkpoint
    # lacks) are drawn then, before the Trainer seeds itself, and would differ from run to run.
    set_seed(cfg.seed)
    check_kernels(cfg, has_cuda())
    from utils.models.resolve import adapter_base, resolve_model

    path = resolve_model(ref, cfg.base_model)
    if adapter == "merge" and cfg.adapter == "lora" and adapter_base(path) is not None:
        # PEFT would record the adapter's bare base as the new adapter's base: loaded later, the model would
        # silently lack the first adapter's update.
        raise UserError(f"{ref} is a LoRA adapter: a fresh adapter trained on it would be saved against its bare "
                        "base and load without it; train on its merged weights (its merged/ folder, made with "
                        "merge: true) or on the base model")
    _, _, dtype = precision_flags(cfg)
    tok = load_tokenizer(ref, cfg.base_model)
    model = load_model(ref, cfg.base_model, head=head, dtype=dtype, adapter=adapter,
                       quantization=quantization_config(cfg), keep_layers=keep_layers, for_training=True,
                       gradient_checkpointing=cfg.gradient_checkpointing,
                       attn_implementation=cfg.attn_implementation)
    if head == "seqcls":
        model.config.pad_token_id = tok.pad_token_id
    return model, tok
