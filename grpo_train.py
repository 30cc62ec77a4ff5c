"""Phase 4: GRPO (Group Relative Policy Optimization) of the SFT policy with the ECG rewards.

Usage:
    python grpo_train.py --config configs/cpu/grpo.yaml
    python grpo_train.py --config configs/cpu/grpo.yaml --max-steps 20 --output-dir /tmp/rlhf-try
    python grpo_train.py --config configs/cpu/grpo.yaml --resume             # continue the last checkpoint
    python grpo_train.py --config configs/cpu/grpo.yaml --policy base        # start from the base model
    python grpo_train.py --config configs/llama-3.2-3b/grpo.yaml             # one CUDA GPU
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 4 \\
        grpo_train.py --config configs/llama-3.2-3b/grpo.yaml               # several GPUs (or zero2/zero3.yaml)
    torchrun --nproc_per_node 2 grpo_train.py --config configs/cpu/grpo.yaml  # two CPU processes (gloo)

Samples num_generations completions per prompt of data/processed/grpo/train.jsonl, scores them with the
reward mix of the config (utils/rewards/) and trains the policy (models/sft by default) with TRL's
GRPOTrainer. Every eval_steps it scores greedy answers to fixed validation prompts (the held-out reward).
Checkpoints, TensorBoard logs (`tensorboard --logdir runs/grpo`), held-out answers and sample completions
go to runs/grpo/; the finished policy to models/rlhf/: adapter, tokenizer, train_config.yaml,
metrics.json (held-out reward before and after, per reward), README.md (and merged/ with --merge).
"""

import sys

from utils.core.cli import run
from utils.core.runtime import configure_process
from utils.training.grpo.config import GRPOTrainConfig
from utils.training.grpo.run import dry_run_plan, run_grpo
from utils.training.plan import format_plan


def main(config: GRPOTrainConfig):
    if config.dry_run:
        print(format_plan(dry_run_plan(config)))
        return
    run_grpo(config)


if __name__ == "__main__":
    configure_process()  # before anything imports torch: OpenMP wait policy, allocator
    sys.exit(run(main, GRPOTrainConfig, __doc__))
