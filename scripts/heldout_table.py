"""GRPO runs side by side on their held-out (validation) curves: the view settings are chosen by.

Usage:
    python scripts/heldout_table.py runs/grpo                                    # each run on its own mix
    python scripts/heldout_table.py runs/a runs/b --mix configs/cpu/grpo.yaml    # both on the recipe's mix
    python scripts/heldout_table.py runs/a runs/b --mix "{rouge: 1, bleu1: 1, meteor: 1}"

Reads each run folder's heldout.jsonl (grpo_train.py writes it: greedy answers to the held-out validation
prompts every eval_steps, with every reward's score) and prints a markdown table: the mean total at each
evaluation, its gain over the step noise (the spread of the changes between evaluations; the README's
results hold every seed to 3x) with a 90% interval over resamples of the prompts, ROUGE-L / BLEU-1 / METEOR
at the end and the answers' mean length in words. ``--mix`` recomputes every run's totals on one reward mix
from the logged scores (a YAML config's ``rewards``, or a mapping), so that runs trained on different mixes
are read on one yardstick; a reward the mix weighs and a run never logged is an error. Nothing is generated;
a run may still be going.
"""

from __future__ import annotations

import argparse
import sys

from utils.core.cli import guarded, setup_logging


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="GRPO run folders (runs/grpo, or a grpo_train.py --run-dir)")
    p.add_argument("--mix", default=None, help="recompute every run's totals on this reward mix: a YAML config with "
                   "a 'rewards' key, or an inline mapping (default: each run's own totals)")
    args = p.parse_args(argv)
    setup_logging("WARNING")

    def run():
        from utils.training.grpo.compare import compare_runs, mix_weights

        print(compare_runs(args.runs, mix_weights(args.mix) if args.mix else None))

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
