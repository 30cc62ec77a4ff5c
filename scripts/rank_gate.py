"""How well a reward model ranks the policy's own answers: the gate before it goes into GRPO's mix.

Usage:
    python scripts/rank_gate.py --reward-model models/reward runs/grpo
    python scripts/rank_gate.py --reward-model models/reward-b runs/a runs/b --data-dir data/processed
    python scripts/rank_gate.py --reward-model models/reward --groups runs/grpo     # within GRPO's groups

Reads the greedy answers that GRPO runs logged on their held-out validation prompts (heldout.jsonl, every
evaluated step), pairs two answers to one prompt of similar length whose benchmark scores (ROUGE-L, BLEU-1,
METEOR against the reference) differ clearly, as the reward model's own ranked training pairs, and prints the
share of pairs the reward model orders as the benchmark does (0.5 is a coin), how often it prefers the longer
answer beside how often the longer one is the better, and the counts. A model near 0.5 here pays GRPO for its
biases (docs/EXPERIMENTS.md, point 5). Validation prompts only: the test split chooses nothing.

``--groups`` reads the groups of sampled completions the runs logged instead (samples.jsonl, train prompts):
the share of every pair of a group that the reward, as GRPO pays it, orders as the benchmark does (most are
close), the same over the far pairs the default builds, and the reward's spread within a group beside the
benchmark score's: a reward that orders close answers at random but spreads widely steers GRPO by its biases.
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
    p.add_argument("--groups", action="store_true", help="read the runs' logged groups of sampled completions "
                   "(samples.jsonl) instead of their held-out answers")
    p.add_argument("--base-model", default=None, help="the reward model's base, when its folder does not name one")
    args = p.parse_args(argv)
    if args.per_prompt < 1:
        p.error(f"--per-prompt {args.per_prompt}: expected an integer >= 1")
    setup_logging("WARNING")

    def run():
        from utils.training.grpo.rank_gate import group_order, rank_gate

        if args.groups:
            r = group_order(args.reward_model, args.runs, args.data_dir, args.base_model)
            print(f"reward model {r['reward_model']} in {r['groups']} logged groups: orders {r['accuracy']:.3f} of "
                  f"{r['pairs']} pairs as the benchmark does, {r['far_accuracy'] or 0:.3f} of the {r['far_pairs']} far "
                  f"ones; spread within a group {r['spread']:.4f} (the benchmark score's {r['benchmark_spread']:.4f})")
            return
        r = rank_gate(args.reward_model, args.runs, args.data_dir, args.per_prompt, args.base_model)
        longer = "-" if r["prefers_longer"] is None else f"{r['prefers_longer']:.3f} (the longer is the better in " \
                 f"{r['longer_is_better']:.3f})"
        print(f"reward model {r['reward_model']}: orders {r['accuracy']:.3f} of {r['pairs']} pairs of the policy's "
              f"answers as the benchmark does ({r['prompts']} prompts); prefers the longer answer {longer}")

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())
