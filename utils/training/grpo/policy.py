"""GRPO's policy and backends: which model is trained (a fresh adapter, or the SFT adapter trained
further) and where it generates (transformers, or vLLM).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from utils.core.artifacts import read_train_config
from utils.core.config import UserError
from utils.training.config import has_cuda, load_for_training, lora_config
from utils.training.grpo.config import GRPOTrainConfig

log = logging.getLogger(__name__)


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
    if cfg.weight_ema and _zero3():
        raise UserError(f"weight_ema {cfg.weight_ema} averages whole parameters, which a ZeRO-3 process does not "
                        "hold; launch with configs/accelerate/ddp.yaml or zero2.yaml, or set weight_ema: 0")
    if wants_ds and importlib.util.find_spec("deepspeed") is None:
        raise UserError("this run asks for DeepSpeed (a configs/accelerate/zero*.yaml launch or trainer_extra."
                        "deepspeed) but deepspeed is not installed: `pip install deepspeed` on a CUDA machine, or "
                        "launch with configs/accelerate/ddp.yaml")


def _zero3() -> bool:
    return os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"


def load_policy(cfg: GRPOTrainConfig):
    """``(model, tokenizer, peft_config, base_ref)``: the policy to train, its tokenizer, the fresh LoRA config
    for TRL to add (None when the policy's own adapter is trained further, or for full fine-tuning), and the
    model an adapter saved at the end applies to (what ``merge`` merges it into).

    An adapter policy (models/sft) keeps training that adapter on its own base, so models/rlhf is again an
    adapter on the base; a full model folder gets a fresh adapter."""
    from utils.models.loading import adapter_base_path
    from utils.models.resolve import adapter_base, resolve_model

    path = resolve_model(cfg.policy, cfg.base_model)
    base = adapter_base(path)
    trained = read_train_config(path) if Path(path).is_dir() else None
    if trained and trained.get("answer_format", cfg.answer_format) != cfg.answer_format:
        raise UserError(f"policy {path} was trained with answer_format {trained['answer_format']} but this config "
                        f"says {cfg.answer_format}; set answer_format: {trained['answer_format']}")
    if base is None or cfg.adapter != "lora":
        if base is not None and cfg.beta > 0:
            raise UserError(f"beta {cfg.beta} with adapter: none and the adapter policy {path}: TRL would rebuild the "
                            "reference from the bare base; use adapter: lora, beta: 0, or a merged policy folder")
        log.info("policy %s%s", path, " (adapter merged into its base)" if base else "")
        model, tok = load_for_training(cfg, path)
        return model, tok, lora_config(cfg), path
    model, tok = load_for_training(cfg, path, adapter="train")
    own = model.peft_config["default"]
    if (own.r, own.lora_alpha) != (cfg.lora_r, cfg.lora_alpha):
        log.info("training the policy's own adapter (r=%d, alpha=%d); lora_r/lora_alpha apply to fresh adapters only",
                 own.r, own.lora_alpha)
    if _zero3() and cfg.quantization == "none":
        # ZeRO-3 gathers parameters in the dtype of the first one it meets: an fp32 adapter on a bf16 base breaks
        # it (TRL applies the same cast to the adapters it creates itself).
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(next(model.get_base_model().parameters()).dtype)
    # the base as found on this machine (the adapter may name a folder of the machine it was trained on)
    base_ref = adapter_base_path(path, base, cfg.base_model)
    log.info("policy %s: its adapter on %s, trained further", path, base_ref)
    return model, tok, None, base_ref
