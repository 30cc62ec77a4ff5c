"""Phase 2: supervised fine-tuning of the base instruct model on ECG-Expert-QA answers (LoRA / QLoRA).

Usage:
    python sft_train.py --config configs/cpu/sft.yaml
    python sft_train.py --config configs/cpu/sft.yaml --max-steps 20 --output-dir /tmp/sft-try
    python sft_train.py --config configs/cpu/sft.yaml --resume              # continue the last checkpoint
    python sft_train.py --config configs/llama-3.2-3b/sft.yaml              # one CUDA GPU
    accelerate launch --num_processes 4 sft_train.py --config configs/llama-3.2-3b/sft.yaml

Reads data/processed/sft/{train,validation}.jsonl (made by prepare_data.py) and trains on the answer
tokens only. Writes checkpoints and TensorBoard logs to runs/sft/ (`tensorboard --logdir runs/sft`)
and the finished model to models/sft/: adapter, tokenizer, train_config.yaml, metrics.json, README.md
(and merged/ with `--merge`).
"""

import sys

from utils.core.cli import run
from utils.core.runtime import configure_process
from utils.training.plan import format_plan
from utils.training.sft import SFTTrainConfig, dry_run_plan, run_sft


def main(config: SFTTrainConfig):
    if config.dry_run:
        print(format_plan(dry_run_plan(config)))
        return
    run_sft(config)


if __name__ == "__main__":
    configure_process()  # before anything imports torch: OpenMP wait policy, allocator
    sys.exit(run(main, SFTTrainConfig, __doc__))
