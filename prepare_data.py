"""Phase 1: turn the raw ECG-Expert-QA files into clean, leak-free SFT, GRPO and evaluation sets.

Usage:
    python prepare_data.py --config configs/cpu/prepare.yaml
    python prepare_data.py --config configs/cpu/prepare.yaml --raw-dir ../shared/ECG-Expert-QA
    python prepare_data.py --config configs/cpu/prepare.yaml --download   # fetch the pinned upstream commit

Writes data/processed/{sft,grpo,eval}/*.jsonl (load them with `datasets.load_dataset("json", ...)`),
records.jsonl, and data_card.{md,json}: counts per task and split, cleaning, near-duplicate groups (judged
on the prompt and on the answer) and each held-out item's closest train item, token lengths, and the
sha256 and row count of every file, which the later phases check (utils.data.card.verify_splits).

The folder is written to a temporary sibling and renamed into place with a `.complete` marker: an
interrupted run leaves the previous folder whole. Nothing is replaced that the project did not make: an
existing --out-dir without that marker and its data card, or an existing --raw-dir that --download did
not make (no `.ecg-grpo-download`), stops with one line saying what to do.
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
