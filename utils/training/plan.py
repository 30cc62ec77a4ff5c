"""Batch layouts derived from the world size, and the ``--dry-run`` plan of a training launch.

The YAML states the effective batch (``batch_size``: examples, pairs or completions per optimizer step over
all processes) and the most one device may take in one pass (``per_device_batch_size``). The layout for
``W`` processes is then derived, not hand-matched: the largest per-device batch up to that limit that
divides ``batch_size / W``, and the gradient accumulation that makes up the rest. The same YAML thus runs
on 1 GPU, 8 GPUs or 2 nodes of 8; when no layout fits, one line names the nearest batch sizes and process
counts that do.

:func:`plan` (what ``--dry-run`` prints) adds the steps, tokens per step and an estimate of GPU memory per
device, from the model's ``config.json`` alone: no weights are loaded and no GPU is needed, so a 16-GPU
launch can be checked on a laptop.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from utils.core.config import UserError
from utils.core.runtime import launched_world_size

GIB = 1024 ** 3
# Architecture numbers of the recipe's model, from its public config.json, for a dry run on a machine that
# has neither the weights nor the Hub (the model is gated). A local folder's config.json always wins.
KNOWN_CONFIGS = {
    "meta-llama/Llama-3.2-3B-Instruct": {"hidden_size": 3072, "num_hidden_layers": 28, "intermediate_size": 8192,
                                         "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256,
                                         "tie_word_embeddings": True},
    # the CPU recipe's built-in base, so that a dry run does not convert it (conversion loads the weights)
    "smollm2-135m-instruct": {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
                              "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                              "tie_word_embeddings": True},
}


@dataclass(frozen=True)
class Layout:
    world_size: int
    per_device: int  # examples per forward/backward pass on one process
    accumulation: int  # passes per optimizer step on each process

    @property
    def batch(self) -> int:
        return self.world_size * self.per_device * self.accumulation


def world_size_of(requested: int = 0) -> int:
    """The processes a run has: ``requested`` when given (a dry run planning a launch), else the
    launcher's ``WORLD_SIZE`` (accelerate, torchrun), else 1."""
    return requested or launched_world_size()


def batch_layout(cfg) -> Layout:
    """The per-device batch and gradient accumulation of ``cfg.batch_size`` over this launch's processes
    (:func:`utils.training.plan.layout`); one line naming the batch sizes and process counts that fit when
    none does."""
    unit = getattr(cfg, "num_generations", 1)
    actual = world_size_of()
    if cfg.world_size and not cfg.dry_run and cfg.world_size != actual:
        raise UserError(f"world_size {cfg.world_size} is for planning with --dry-run; this launch has {actual} "
                        "process(es): drop --world-size, or launch that many (accelerate launch --num_processes)")
    return layout(cfg.batch_size, cfg.per_device_batch_size, world_size_of(cfg.world_size if cfg.dry_run else 0),
                  unit, f"{unit} completions per prompt" if unit > 1 else "examples")


def _nearest(values, target: int, n: int = 2) -> list[int]:
    return sorted(sorted(set(values), key=lambda v: (abs(v - target), v))[:n])


def layout(batch_size: int, max_per_device: int, world: int, multiple_of: int = 1, what: str = "examples") -> Layout:
    """The layout of ``batch_size`` over ``world`` processes (see the module docstring). ``multiple_of``: a
    unit the whole batch must be made of (GRPO: ``num_generations`` completions per prompt).

    >>> layout(32, 16, 4)
    Layout(world_size=4, per_device=8, accumulation=1)
    >>> layout(64, 8, 16)
    Layout(world_size=16, per_device=4, accumulation=1)
    >>> layout(32, 16, 3)
    Traceback (most recent call last):
    ...
    utils.core.config.UserError: batch_size 32 cannot be split evenly over 3 processes; batch sizes that fit 3 processes: 30, 33 (nearest), or run 2 or 4 processes
    """
    if batch_size % multiple_of:
        raise UserError(f"batch_size {batch_size} is not a multiple of {multiple_of} ({what}); nearest that are: "
                        f"{', '.join(map(str, _nearest(range(multiple_of, 4 * batch_size + multiple_of, multiple_of), batch_size)))}")
    if batch_size % world:
        unit = world * multiple_of // _gcd(world, multiple_of)
        sizes = _nearest(range(unit, 4 * batch_size + unit, unit), batch_size)
        procs = _nearest([w for w in range(1, batch_size + 1) if batch_size % w == 0], world)
        raise UserError(f"batch_size {batch_size} cannot be split evenly over {world} processes; batch sizes that fit "
                        f"{world} processes: {', '.join(map(str, sizes))} (nearest), or run "
                        f"{' or '.join(map(str, procs))} processes")
    share = batch_size // world
    per_device = max(d for d in range(1, min(max_per_device, share) + 1) if share % d == 0)
    return Layout(world, per_device, share // per_device)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def model_shape(ref: str, base_model: str | None = None) -> dict | None:
    """The architecture numbers of model ``ref`` from its config.json (an adapter's: its base's), without
    loading weights; None when neither a local config nor a known one is at hand."""
    from utils.models.resolve import SMOLLM2, ModelNotFound, adapter_base, models_root, resolve_model

    name = base_model if ref == "base" else ref
    if str(name).lower() == SMOLLM2:
        cfg = models_root() / "base" / SMOLLM2 / "config.json"
        return json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else KNOWN_CONFIGS[SMOLLM2]
    try:
        path = resolve_model(ref, base_model)
    except ModelNotFound:
        return KNOWN_CONFIGS.get(ref) or KNOWN_CONFIGS.get(base_model or "")
    base = adapter_base(path)
    if base is not None:
        return model_shape(base, base_model)
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text(encoding="utf-8"))
    return KNOWN_CONFIGS.get(path)


def parameters(shape: dict) -> int:
    """Parameter count of a Llama-style decoder from its config numbers."""
    h, n_layers, inter = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape.get("num_key_value_heads") or shape["num_attention_heads"]
    head_dim = shape.get("head_dim") or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * h * inter
    embed = shape["vocab_size"] * h * (1 if shape.get("tie_word_embeddings", True) else 2)
    return n_layers * (attn + mlp + 2 * h) + embed + h


def lora_parameters(shape: dict, rank: int) -> int:
    """LoRA parameters on every linear layer of the blocks (all-linear) at ``rank``."""
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape.get("num_key_value_heads") or shape["num_attention_heads"]
    head_dim = shape.get("head_dim") or h // heads
    pairs = [(h, heads * head_dim), (h, kv * head_dim), (h, kv * head_dim), (heads * head_dim, h),
             (h, inter), (h, inter), (inter, h)]
    return shape["num_hidden_layers"] * sum(rank * (a + b) for a, b in pairs)


def memory_estimate(shape: dict, cfg, per_device: int, seq_len: int, world: int, zero_stage: int = 0,
                    vllm_share: float = 0.0, gpu_gib: float = 80.0) -> dict[str, float]:
    """A rough GiB-per-device budget: frozen weights (bf16, or 4/8-bit), trainable weights with their
    gradients and AdamW states (fp32), activations of one micro-batch (with or without checkpointing), and
    the share of the GPU vLLM reserves when it is colocated. ZeRO-3 shards weights and states over
    ``world``; ZeRO-2 shards the states and gradients. A guide for choosing a layout, not a measurement."""
    n = parameters(shape)
    bytes_per = {"4bit": 0.55, "8bit": 1.05}.get(cfg.quantization, 2.0 if cfg.precision != "fp32" else 4.0)
    if cfg.adapter == "lora":
        trainable = lora_parameters(shape, cfg.lora_r)
        frozen = n
    else:
        trainable, frozen = n, 0
    weights = frozen * bytes_per + (trainable * 4 if cfg.adapter != "lora" else 0)
    grads = trainable * 4
    optimizer = trainable * (4 + 4 + (4 if cfg.adapter == "lora" else 0))  # Adam m and v, the fp32 master copy
    # ZeRO-1 shards the optimizer states, ZeRO-2 the gradients too, ZeRO-3 the weights too
    if zero_stage >= 1:
        optimizer /= world
    if zero_stage >= 2:
        grads /= world
    if zero_stage == 3:
        weights /= world
    states = grads + optimizer
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    # per token and layer: ~34 h bytes in bf16 without checkpointing (attention and MLP intermediates), ~2 h
    # with it (the layer input only); plus the logits of the vocabulary in fp32 for the loss
    # (a reward model's head has one output: no vocabulary logits)
    logits = 4 if getattr(cfg, "PIPELINE_TAG", "text-generation") == "text-generation" else 0
    per_token = layers * h * (2 if cfg.gradient_checkpointing else 34) + shape["vocab_size"] * logits
    activations = per_device * seq_len * per_token
    out = {"weights": weights / GIB, "trainable_and_optimizer": states / GIB, "activations": activations / GIB}
    if vllm_share:
        out[f"vllm ({vllm_share:.0%} of {gpu_gib:.0f})"] = vllm_share * gpu_gib
    out["total"] = sum(out.values())
    return out


def count_rows(path: str | Path) -> int | None:
    """Lines of a JSONL file (its rows), or None when it is not there."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def plan(cfg, phase: str, model_ref: str, seq_len: int, n_examples: int | None, unit: str = "examples",
         extra: dict | None = None, vllm_share: float = 0.0) -> dict:
    """What a launch of ``cfg`` will do, for ``--dry-run``: layout, steps, tokens per step and memory per
    device (see :func:`memory_estimate`), without loading weights."""
    import math

    lay = batch_layout(cfg)
    zero = cfg.zero_stage if cfg.zero_stage >= 0 else int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or 0)
    if cfg.max_steps > 0:
        steps = cfg.max_steps
    elif n_examples:
        steps = math.ceil(cfg.epochs * n_examples / cfg.batch_size)
    else:
        steps = "epochs x training rows / batch_size (no data here to count)"
    out = {"phase": phase, "world_size": lay.world_size, "batch_size": f"{cfg.batch_size} {unit} per optimizer step",
           "per_device_batch": lay.per_device, "gradient_accumulation": lay.accumulation, "optimizer_steps": steps,
           "max_tokens_per_step": cfg.batch_size * seq_len, "zero_stage": zero, "precision": cfg.precision,
           "quantization": cfg.quantization, "adapter": f"{cfg.adapter} r={cfg.lora_r}" if cfg.adapter == "lora"
           else cfg.adapter, **(extra or {})}
    shape = model_shape(model_ref, cfg.base_model)
    if shape is not None and getattr(cfg, "keep_layers", 0):
        # the reward model keeps only its first layers
        shape = {**shape, "num_hidden_layers": min(cfg.keep_layers, shape["num_hidden_layers"])}
    if shape is None:
        out["memory"] = f"unknown: no config.json for {model_ref} on this machine"
        return out
    out["parameters"] = f"{parameters(shape) / 1e9:.2f} B"
    out["memory_gib"] = memory_estimate(shape, cfg, lay.per_device, seq_len, lay.world_size, zero, vllm_share)
    return out


def format_plan(plan: dict) -> str:
    """The plan as the lines ``--dry-run`` prints."""
    lines = [f"{plan['phase']} dry run for {plan['world_size']} process(es): no weights loaded"]
    for key, value in plan.items():
        if key in ("phase", "memory_gib"):
            continue
        lines.append(f"  {key:<24} {value}")
    mem = plan.get("memory_gib")
    if mem:
        lines.append("  memory per device (GiB, estimate): " + ", ".join(f"{k} {v:.1f}" for k, v in mem.items()))
    return "\n".join(lines)


def prompt_tokens_p95(data_dir: str | Path, default: int = 512) -> int:
    """The 95th percentile of prompt tokens the data card measured (prepare_data.py's token-length pass),
    or ``default`` when the card has none."""
    path = Path(data_dir) / "data_card.json"
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["token_lengths"]["prompt"]["p95"])
    except (OSError, ValueError, KeyError, TypeError):
        return default
