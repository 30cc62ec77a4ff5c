"""SFT training throughput: tokens/s, seconds per optimizer step and peak memory, on a recipe.

Usage:
    python scripts/bench_sft.py                                   # CPU recipe, 1 warm-up + 4 timed steps
    python scripts/bench_sft.py --steps 8 --per-device-batch-size 4 --num-threads 1
    python scripts/bench_sft.py --config configs/llama-3.2-3b/sft.yaml --steps 20 --json /tmp/bench.json

Runs the recipe's real trainer (model, LoRA, tokenization, batch sizes, sampler) on the first
examples of its training subset, writes no checkpoint and no model, and prints the measured rates:
input tokens/s (every non-padding token goes through the forward and backward pass), answer tokens/s
(the tokens the loss covers), examples/s, s/step, peak resident memory (and peak CUDA memory), and
what the recipe's max_steps would take at that rate. Warm-up steps are excluded from the rates.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from utils.core.cli import guarded, setup_logging
from utils.core.config import UserError, load_config
from utils.core.runtime import configure_process


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cpu/sft.yaml", help="SFT recipe to measure")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocation, first-call costs)")
    p.add_argument("--per-device-batch-size", type=int, default=0, help="default: the recipe's")
    p.add_argument("--batch-size", type=int, default=0, help="default: the recipe's")
    p.add_argument("--num-threads", type=int, default=-1, help="torch CPU threads; default: the recipe's")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    setup_logging("WARNING")
    return guarded(lambda: bench(args))


def bench(args) -> dict:
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    import torch
    from transformers import TrainerCallback

    from utils.training.config import gradient_accumulation
    from utils.training.run import peak_rss_mb
    from utils.training.sft import SFTTrainConfig, build_trainer, check_base_model, load_examples

    recipe = load_config(SFTTrainConfig, args.config)
    total = args.warmup + args.steps
    tmp = tempfile.mkdtemp(prefix="bench-sft-")
    over = {"run_dir": tmp, "output_dir": str(Path(tmp) / "out"), "report_to": [], "eval_on_start": False,
            "max_steps": total, "resume": "never",
            "trainer_extra": {**recipe.trainer_extra, "save_strategy": "no", "disable_tqdm": True}}
    if args.per_device_batch_size:
        over["per_device_batch_size"] = args.per_device_batch_size
    if args.batch_size:
        over["batch_size"] = args.batch_size
    if args.num_threads >= 0:
        over["num_threads"] = args.num_threads
    cfg = load_config(SFTTrainConfig, args.config, over)
    check_base_model(cfg)
    n = cfg.batch_size * total
    examples = load_examples(cfg, "train", cfg.max_train_samples or n)[:n]
    trainer = build_trainer(cfg, examples, None)
    trainer.args.eval_strategy = "no"

    class Clock(TrainerCallback):
        """Time and token counts at the end of the warm-up and of the last step."""
        marks: dict = {}

        def on_step_end(self, a, state, control, **kw):
            if state.global_step in (args.warmup, total):
                self.marks[state.global_step] = (time.perf_counter(), state.num_input_tokens_seen)

        def on_train_begin(self, a, state, control, **kw):
            self.marks[0] = (time.perf_counter(), 0)

    clock = Clock()
    trainer.add_callback(clock)
    # answer tokens per example, to turn examples/s into trained tokens/s
    labels = trainer.train_dataset["labels"]
    answer_tokens = sum(sum(1 for x in row if x != -100) for row in labels) / len(labels)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (t0, tok0), (t1, tok1) = clock.marks[args.warmup], clock.marks[total]
    secs = t1 - t0
    examples_s = args.steps * cfg.batch_size / secs
    result = {
        "config": args.config, "model": cfg.base_model, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(), "per_device_batch_size": cfg.per_device_batch_size,
        "gradient_accumulation": gradient_accumulation(cfg), "timed_steps": args.steps,
        "seconds_per_step": round(secs / args.steps, 3), "examples_per_s": round(examples_s, 3),
        "input_tokens_per_s": round((tok1 - tok0) / secs, 1),
        "answer_tokens_per_s": round(examples_s * answer_tokens, 1),
        "peak_rss_mib": round(peak_rss_mb(), 1),
    }
    if torch.cuda.is_available():
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if recipe.max_steps > 0:
        result["recipe_train_minutes_estimate"] = round(recipe.max_steps * secs / args.steps / 60, 1)
    from utils.core.runtime import format_machine, machine_summary

    result["machine"] = machine_summary()
    print(f"{'machine':>32}: {format_machine(result['machine'])}")
    for k, v in result.items():
        if k != "machine":
            print(f"{k:>32}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    configure_process()
    logging.captureWarnings(True)
    sys.exit(main())
