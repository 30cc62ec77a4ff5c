"""The Llama recipe's launch plans for the GPU setups the README lists: one GPU (bf16 LoRA, 4-bit QLoRA),
one node of 8 (DDP, ZeRO-2, ZeRO-3) and two nodes of 8 (ZeRO-3), for SFT, the reward model and GRPO.

Usage:
    python scripts/plan_launches.py            # the README's table: per-device batch x accumulation, GiB per GPU
    python scripts/plan_launches.py --full     # every plan as `--dry-run` prints it

Each cell is what `<script> --config configs/llama-3.2-3b/<phase>.yaml --dry-run --world-size N
--zero-stage S` prints (the same functions, in one process): no GPU, no weights. The memory is an estimate
(utils/training/plan.py), not a measurement; scripts/gpu_check.py measures one GPU.
"""

from __future__ import annotations

import argparse
import sys

from utils.core.cli import guarded, setup_logging
from utils.core.config import load_config

# (name, processes, ZeRO stage, config overrides, launch written in the README)
SETUPS = [
    ("1 GPU, bf16 LoRA", 1, 0, {}, "python"),
    ("1 GPU, 4-bit QLoRA", 1, 0, {"quantization": "4bit"}, "python ... --quantization 4bit"),
    ("8 GPUs, DDP", 8, 0, {}, "ddp.yaml --num_processes 8"),
    ("8 GPUs, ZeRO-2", 8, 2, {}, "zero2.yaml --num_processes 8"),
    ("8 GPUs, ZeRO-3", 8, 3, {}, "zero3.yaml --num_processes 8"),
    ("2 nodes x 8 GPUs, ZeRO-3", 16, 3, {}, "zero3.yaml, 16 processes"),
]
PHASES = ["sft", "reward", "grpo"]


# script -> (module of its config class, the class, module of its dry_run_plan)
SCRIPTS = {"sft_train.py": ("utils.training.sft", "SFTTrainConfig", "utils.training.sft"),
           "reward_model.py": ("utils.training.reward_model", "RewardModelConfig", "utils.training.reward_model"),
           "grpo_train.py": ("utils.training.grpo.config", "GRPOTrainConfig", "utils.training.grpo.run")}
PHASE_SCRIPTS = {"sft": "sft_train.py", "reward": "reward_model.py", "grpo": "grpo_train.py"}


def dry_run(script: str, argv: list[str] | None = None, over: dict | None = None) -> dict:
    """What ``<script> <argv> --dry-run`` prints, as a dict, in this process: the script's config class
    parsed from ``argv`` (flags and ``--config``), ``over`` on top."""
    import importlib

    from utils.core.config import build_parser

    module, cls_name, plan_module = SCRIPTS[script]
    cls = getattr(importlib.import_module(module), cls_name)
    ns = build_parser(cls).parse_args(argv or [])
    overrides = {k: v for k, v in vars(ns).items() if k != "config"}
    cfg = load_config(cls, ns.config, {**overrides, **(over or {}), "dry_run": True})
    return importlib.import_module(plan_module).dry_run_plan(cfg)


def plan_for(phase: str, world: int, zero: int, over: dict) -> dict:
    return dry_run(PHASE_SCRIPTS[phase], ["--config", f"configs/llama-3.2-3b/{phase}.yaml"],
                   {**over, "world_size": world, "zero_stage": zero})


def cell(plan: dict) -> str:
    """``per-device x accumulation, GiB`` (``+ vLLM`` when the GPU also holds a colocated vLLM)."""
    mem = plan.get("memory_gib") or {}
    vllm = next((v for k, v in mem.items() if k.startswith("vllm")), 0.0)
    gib = f"{mem['total'] - vllm:.1f} GiB" + (f" + vLLM {vllm:.0f}" if vllm else "") if mem else "?"
    return f"{plan['per_device_batch']}x{plan['gradient_accumulation']}, {gib}"


def table() -> list[str]:
    rows = ["| setup | launch | SFT | reward model | GRPO |", "|---|---|---|---|---|"]
    for name, world, zero, over, launch in SETUPS:
        cells = [cell(plan_for(p, world, zero, over)) for p in PHASES]
        rows.append(f"| {name} | {launch} | " + " | ".join(cells) + " |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="print every plan in full, as --dry-run does")
    args = p.parse_args(argv)
    setup_logging("WARNING")

    def run():
        if not args.full:
            print("\n".join(table()))
            return
        from utils.training.plan import format_plan

        for name, world, zero, over, _ in SETUPS:
            for phase in PHASES:
                print(f"### {name}: {phase}\n\n```\n{format_plan(plan_for(phase, world, zero, over))}\n```\n")

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
