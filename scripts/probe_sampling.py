"""Sampled completions against the greedy answer: does GRPO's group baseline point where the held-out
reward (greedy answers) is measured?

Usage:
    python scripts/probe_sampling.py                                  # models/sft, 64 validation prompts, T 0.9, 0.6
    python scripts/probe_sampling.py --policy rlhf --prompts 128 --temperatures 1.0,0.7,0.5
    python scripts/probe_sampling.py --config configs/cpu/grpo.yaml --json /tmp/probe.json

For the first N held-out prompts of a GRPO recipe it decodes the greedy answer and samples
num_generations completions per prompt at each temperature (the recipe's top_p, max_completion_length),
scores everything with the recipe's reward mix, and prints per temperature: the greedy and sample means,
the best-of-N mean, the share of samples better than the greedy answer, and, of the samples above their
group's mean (the ones GRPO reinforces), the share better than greedy. When that last share is low, GRPO
mostly teaches the sampled policy to be less random while its greedy answers barely move.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from utils.core.cli import guarded, setup_logging
from utils.core.config import UserError, load_config
from utils.core.runtime import configure_process


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cpu/grpo.yaml", help="GRPO recipe whose prompts, rewards and "
                   "sampling settings to use")
    p.add_argument("--policy", default="", help="model reference; default: the recipe's policy (sft)")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts to probe")
    p.add_argument("--temperatures", default="0.9,0.6", help="comma-separated sampling temperatures")
    p.add_argument("--num-threads", type=int, default=0, help="torch CPU threads; default: torch's")
    p.add_argument("--json", default="", help="also write the figures (and every answer's total) here")
    args = p.parse_args(argv)
    setup_logging("WARNING")
    return guarded(lambda: probe(args))


def summarize(greedy: list[float], groups: list[list[float]]) -> dict:
    """The figures of one temperature from the greedy totals and each prompt's sampled totals."""
    pairs = [(v, g0, mean) for g, g0, mean in zip(groups, greedy, map(statistics.mean, groups)) for v in g]
    reinforced = [v > g0 for v, g0, mean in pairs if v > mean]
    return {"greedy_mean": statistics.mean(greedy), "sample_mean": statistics.mean(v for v, _, _ in pairs),
            "best_of_n_mean": statistics.mean(max(g) for g in groups),
            "share_above_greedy": sum(v > g0 for v, g0, _ in pairs) / len(pairs),
            "reinforced_above_greedy": sum(reinforced) / len(reinforced) if reinforced else 0.0}


def probe(args) -> None:
    import torch

    from utils.models.generation import generate
    from utils.models.loading import load_for_inference
    from utils.training.grpo.config import GRPOTrainConfig, heldout_rows

    over = {"heldout_prompts": args.prompts}
    if args.policy:
        over["policy"] = args.policy
    cfg = load_config(GRPOTrainConfig, args.config, over)
    temps = [float(t) for t in args.temperatures.split(",") if t.strip()]
    if not temps or any(t <= 0 for t in temps):
        raise UserError(f"--temperatures {args.temperatures!r}: expected positive numbers such as 0.9,0.6")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    rows = heldout_rows(cfg)
    if not rows:
        raise UserError(f"--prompts {args.prompts}: expected at least 1 held-out prompt")
    model, tok = load_for_inference(cfg.policy, cfg.base_model)
    prompts, n = [r["prompt"] for r in rows], cfg.num_generations
    t0 = time.time()
    greedy_answers = generate(model, tok, prompts, max_new_tokens=cfg.max_completion_length,
                              batch_size=cfg.eval_batch_size)
    greedy = [s["total"] for s in cfg.score(greedy_answers, rows)]
    print(f"policy {cfg.policy}, {len(rows)} held-out prompts, {n} samples each, top_p {cfg.top_p}, "
          f"at most {cfg.max_completion_length} tokens; greedy decoding {time.time() - t0:.0f} s")
    print(f"{'temperature':>11}  {'greedy':>6}  {'sample':>6}  {f'best of {n}':>9}  {'samples > greedy':>16}  "
          f"{'reinforced > greedy':>19}  {'words':>5}  {'seconds':>7}")
    out = {"policy": cfg.policy, "prompts": len(rows), "num_generations": n, "greedy": greedy, "temperatures": {}}
    for t in temps:
        t0 = time.time()
        sampled = generate(model, tok, prompts, max_new_tokens=cfg.max_completion_length,
                           batch_size=max(1, cfg.eval_batch_size // n), do_sample=True, temperature=t,
                           top_p=cfg.top_p, num_return_sequences=n, seed=cfg.seed)
        flat = [a for group in sampled for a in group]
        totals = [s["total"] for s in cfg.score(flat, [r for r in rows for _ in range(n)])]
        groups = [totals[i * n:(i + 1) * n] for i in range(len(rows))]
        fig = summarize(greedy, groups)
        fig["words"] = statistics.mean(len(a.split()) for a in flat)
        out["temperatures"][str(t)] = {**fig, "totals": groups}
        print(f"{t:>11.2f}  {fig['greedy_mean']:>6.3f}  {fig['sample_mean']:>6.3f}  {fig['best_of_n_mean']:>9.3f}  "
              f"{fig['share_above_greedy']:>16.0%}  {fig['reinforced_above_greedy']:>19.0%}  {fig['words']:>5.1f}  "
              f"{time.time() - t0:>7.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    configure_process()
    sys.exit(main())
