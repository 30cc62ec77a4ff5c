"""Phase 1: turn the raw ECG-Expert-QA files into clean, leak-free SFT, GRPO and evaluation sets.

Usage:
    python prepare_data.py --config configs/cpu/prepare.yaml
    python prepare_data.py --config configs/cpu/prepare.yaml --raw-dir ../shared/ECG-Expert-QA
    python prepare_data.py --config configs/cpu/prepare.yaml --download   # fetch the pinned upstream commit

Writes data/processed/{sft,grpo,eval}/*.jsonl (load them with `datasets.load_dataset("json", ...)`),
records.jsonl, and data_card.{md,json}: counts per task and split, cleaning, token lengths.
"""

import sys

from utils.core.cli import run
from utils.core.runtime import configure_process
from utils.data.prepare import PrepareConfig, run_prepare


def main(config: PrepareConfig):
    run_prepare(config)


if __name__ == "__main__":
    configure_process()  # before anything imports torch: OpenMP wait policy, allocator
    sys.exit(run(main, PrepareConfig, __doc__))
