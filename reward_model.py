"""Phase 3: the reward model, and the reward tools shared with GRPO and evaluation.

Usage:
    python reward_model.py --config configs/cpu/reward.yaml            # train models/reward (same as `train`)
    python reward_model.py train --config configs/cpu/reward.yaml
    python reward_model.py score --config configs/cpu/reward.yaml --input FILE.jsonl --output OUT.jsonl
    python reward_model.py audit --config configs/cpu/reward.yaml [--output audit.json]
    python reward_model.py terms --config configs/cpu/reward.yaml    # lexicon curation: frequent missing phrases

train: builds preference pairs from the train split (chosen: the reference; rejected: hard negatives),
trains a one-logit sequence classifier with TRL's RewardTrainer (LoRA), reports pairwise accuracy per
negative type on pairs from the test split, and writes models/reward (adapter, metrics.json,
train_config.yaml, README.md).
score: reads JSONL lines with question, reference, completion (optionally task, label) and writes each
back with "rewards": every reward of the config's mix (`rewards:`) and the weighted total.
audit: scores adversarial completions (keyword stuffing, the question repeated, the system prompt,
"Yes." to everything, the right numbers in nonsense, empty, very long, another question's answer) on
test items and prints each one's mean total beside the honest reference's; exits 1 if an attack is
not ranked below the reference.
"""

import sys

from utils.core.cli import run
from utils.core.runtime import configure_process
from utils.rewards.audit import audit_table, run_audit, run_terms, score_file
from utils.training.plan import format_plan
from utils.training.reward_model import SUBCOMMANDS, RewardModelConfig, dry_run_plan, train_reward_model


def main(config: RewardModelConfig):
    if config.dry_run:
        print(format_plan(dry_run_plan(config)))
        return
    metrics = train_reward_model(config)
    acc = metrics["test_accuracy"]
    print("held-out pairwise accuracy (test split):")
    for t, d in acc.items():
        print(f"  {t:<14} {d['accuracy']:.3f}  ({d['pairs']} pairs)")


def score(config: RewardModelConfig):
    print(score_file(config))


def audit(config: RewardModelConfig):
    result = run_audit(config)
    print(f"Reward-hacking audit: {result['items']} test items, mix {result['mix']}")
    print(audit_table(result))
    if not result["passed"]:
        print("FAILED: some attack scores at least as high as the honest reference", file=sys.stderr)
        sys.exit(1)


def terms(config: RewardModelConfig):
    print("frequent phrases of the train references that the lexicon lacks (document frequency):")
    for phrase, n in run_terms(config):
        print(f"  {n:6d}  {phrase}")


if __name__ == "__main__":
    configure_process()  # before anything imports torch: OpenMP wait policy, allocator
    argv = sys.argv[1:]
    command = "train"
    if argv and not argv[0].startswith("-"):
        command, argv = argv[0], argv[1:]
        if command not in SUBCOMMANDS:
            print(f"error: unknown command {command!r}; expected one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
            sys.exit(2)
    sys.exit(run({"train": main, "score": score, "audit": audit, "terms": terms}[command], RewardModelConfig,
                 __doc__, argv))
