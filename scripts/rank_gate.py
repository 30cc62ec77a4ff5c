"""How well a reward model ranks the policy's own answers: the gate before it goes into GRPO's mix.

Usage:
    python scripts/rank_gate.py --reward-model models/reward runs/grpo
    python scripts/rank_gate.py --reward-model models/reward-b runs/a runs/b --data-dir data/processed

Reads the greedy answers that GRPO runs logged on their held-out validation prompts (heldout.jsonl, every
evaluated step), pairs two answers to one prompt of similar length whose benchmark scores (ROUGE-L, BLEU-1,
METEOR against the reference) differ clearly, as the reward model's own ranked training pairs, and prints the
share of pairs the reward model orders as the benchmark does (0.5 is a coin), how often it prefers the longer
answer beside how often the longer one is the better, and the counts. A model near 0.5 here pays GRPO for its
biases (docs/EXPERIMENTS.md, point 5). Validation prompts only: the test split chooses nothing.
"""

from __future__ import annotations

import argparse
import sys

from utils.core.cli import guarded, setup_logging


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="GRPO run folders whose heldout.jsonl holds the policy's answers")
    p.add_argument("--reward-model", default="reward", help="the reward model: reward (models/reward) or a folder")
    p.add_argument("--data-dir", default="data/processed", help="prepare_data.py's folder (the references)")
    p.add_argument("--per-prompt", type=int, default=2, help="pairs per prompt at most, widest score gaps first")
    p.add_argument("--base-model", default=None, help="the reward model's base, when its folder does not name one")
    args = p.parse_args(argv)
    if args.per_prompt < 1:
        p.error(f"--per-prompt {args.per_prompt}: expected an integer >= 1")
    setup_logging("WARNING")

    def run():
        from utils.training.grpo.rank_gate import rank_gate

        r = rank_gate(args.reward_model, args.runs, args.data_dir, args.per_prompt, args.base_model)
        longer = "-" if r["prefers_longer"] is None else f"{r['prefers_longer']:.3f} (the longer is the better in " \
                 f"{r['longer_is_better']:.3f})"
        print(f"reward model {r['reward_model']}: orders {r['accuracy']:.3f} of {r['pairs']} pairs of the policy's "
              f"answers as the benchmark does ({r['prompts']} prompts); prefers the longer answer {longer}")

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
