"""Several GRPO runs (seeds) against SFT on one evaluation report: the table of the README's result.

Usage:
    python evaluate.py --config configs/cpu/eval.yaml --models sft,models/rlhf-s42,models/rlhf-s43,models/rlhf-s44 \
        --run-name seeds
    python scripts/seed_table.py reports/seeds                    # baseline: sft
    python scripts/seed_table.py reports/seeds --baseline base --alpha 0.01
    python scripts/seed_table.py reports/pipeline-cpu             # after `make demo`: GRPO (rlhf) against SFT

Prints a markdown table: each run's paired difference from the baseline on ROUGE-L, BLEU-1, METEOR and the
reward mix (with the permutation test's p), balanced yes/no accuracy, the held-out reward gain over its step
noise (from each model folder's metrics.json), and whether the run meets the bar; then the runs pooled (the
per-item mean of their scores). The figures are the report's: nothing here depends on the machine.
"""

from __future__ import annotations

import argparse
import sys

from utils.core.cli import guarded, setup_logging
from utils.evaluation.seeds import seed_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="an evaluation report folder (reports/<run>/)")
    p.add_argument("--baseline", default="sft", help="the model every run is compared with (default: sft)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the checks (default: 0.05)")
    p.add_argument("--runs", default="", help="comma-separated models to compare (default: all but the baseline "
                   "and base)")
    args = p.parse_args(argv)
    setup_logging("WARNING")
    runs = [r for r in args.runs.split(",") if r] or None
    return guarded(lambda: print(seed_table(args.report, args.baseline, args.alpha, runs)))


if __name__ == "__main__":
    sys.exit(main())
