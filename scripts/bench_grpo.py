"""Throughput of grpo_train.py's GRPO against a plain TRL GRPOTrainer, side by side in one run.

Usage:
    python scripts/bench_grpo.py                                   # configs/cpu/grpo.yaml, 4 measured steps
    python scripts/bench_grpo.py --config configs/cpu/grpo.yaml --steps 6 --warmup 1
    python scripts/bench_grpo.py --policy base                     # without models/sft
    python scripts/bench_grpo.py --set fast_generation=false       # ablation: a config key changed for ours
    python scripts/bench_grpo.py --plain-warmup 0 --plain-steps 1  # plain TRL's steps are slow on CPU
    python scripts/bench_grpo.py --plain bf16=false                # plain TRL without bf16 autocast
    python scripts/bench_grpo.py --sides ours --json /tmp/ours.json
    python scripts/bench_grpo.py --repeats 3                       # alternate the sides 3 times: median ratio

Each side runs in its own process (so that each has its own peak memory) on the same policy (the config's,
with the same LoRA adapter), the same prompts in the same order, the same number of generations, the same
completion length and the same rewards:

* ours: the trainer grpo_train.py builds from the config (utils.training.grpo.run.build_trainer), held-out reward and
  sample logging off, with grpo_train.py's process tuning (utils.core.runtime);
* plain: ``trl.GRPOTrainer`` with GRPOConfig's defaults for everything else (per-device batch 8, no
  gradient accumulation, gradient checkpointing, bf16 autocast, TRL's generate).

After ``--warmup`` steps it measures ``--steps`` optimizer steps and prints, for both: completions
(samples) per second (wall clock and per CPU-second, which is less sensitive to other processes on a
shared machine), generated tokens per second, the share of step time spent generating, generation
throughput as a fraction of the machine's bound for the completions sampled (each decode step reads the
weights once, for as many steps as each batch's longest completion, and each token costs 2 FLOPs a weight:
memory bandwidth and matmul FLOP/s, both measured at start; utils.core.runtime.completions_bound) and, beside
it, of the bound had every row run to the end (the batch's rows per step), peak resident memory, and
the mean reward of the measured steps, and each side's OpenMP wait policy (both the runtime's default
unless OMP_WAIT_POLICY is set, as grpo_train.py runs alone); then the ratios ours / plain.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from utils.core.cli import guarded, setup_logging
from utils.core.config import UserError, load_config
from utils.core.runtime import completions_bound, configure_process, decode_bound, machine_bound
from utils.models.decode import resolve_decode_dtype

ROOT = Path(__file__).resolve().parents[1]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cpu/grpo.yaml", help="GRPO recipe (grpo_train.py's YAML)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps measured per side")
    p.add_argument("--warmup", type=int, default=1, help="steps run first and not measured")
    p.add_argument("--plain-steps", type=int, default=None, help="measured steps of the plain side (default --steps)")
    p.add_argument("--plain-warmup", type=int, default=None, help="warm-up steps of the plain side (default --warmup)")
    p.add_argument("--policy", default=None, help="override the config's policy (e.g. base without models/sft)")
    p.add_argument("--sides", default="plain,ours", help="which sides to run, in order: plain, ours")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for ours only (repeatable), e.g. fast_generation=false")
    p.add_argument("--plain", action="append", default=[], metavar="KEY=VALUE",
                   help="set a GRPOConfig field of the plain side (repeatable), e.g. bf16=false for a stronger "
                        "baseline on CPUs without native bf16")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the sides this many times, alternating (plain, ours, plain, ours, ...), and report "
                        "each side's median figures and every repeat's wall-clock ratio: the machine drifts "
                        "between runs minutes apart (two single runs an hour apart read 4.59x and 4.95x)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def grpo_config(args, side: str, run_dir: str):
    from utils.training.grpo.config import GRPOTrainConfig

    overrides = {"heldout_prompts": 0, "sample_steps": 0, "report_to": [], "resume": "never",
                 "save_steps": 10**6, "run_dir": run_dir, "output_dir": str(Path(run_dir) / "out"),
                 "max_steps": args.warmup + args.steps, "logging_steps": 1, "eval_on_start": False}
    if args.policy:
        overrides["policy"] = args.policy
    if side == "ours":
        for kv in args.set:
            k, _, v = kv.partition("=")
            overrides[k.replace("-", "_")] = v
    return load_config(GRPOTrainConfig, ROOT / args.config if not Path(args.config).is_absolute() else args.config,
                       overrides)


# ============================================================================= one side
class Meter:
    """Wraps a trainer's generation and reward methods and times its steps."""

    def __init__(self, trainer, warmup: int):
        self.tr, self.warmup = trainer, warmup
        self.gen_s = self.reward_s = 0.0
        self.tokens = self.rows = self.calls = self.longest = 0
        self.step_s: list[float] = []
        self.cpu_s = 0.0
        self._t = self._c = None
        gen, rew = trainer._generate_single_turn, trainer._calculate_rewards

        def timed_gen(*a, **k):
            t = time.perf_counter()
            ids, lp = gen(*a, **k)
            if self.measuring:
                self.gen_s += time.perf_counter() - t
                self.tokens += sum(len(c) for c in ids)
                self.rows += len(ids)
                self.calls += 1
                self.longest += max((len(c) for c in ids), default=0)  # the batch's decode steps
            return ids, lp

        def timed_rewards(*a, **k):
            t = time.perf_counter()
            out = rew(*a, **k)
            if self.measuring:
                self.reward_s += time.perf_counter() - t
            return out

        trainer._generate_single_turn = timed_gen
        trainer._calculate_rewards = timed_rewards
        meter = self

        from transformers import TrainerCallback

        class _StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                meter._t, meter._c = time.perf_counter(), time.process_time()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step > meter.warmup:
                    meter.step_s.append(time.perf_counter() - meter._t)
                    meter.cpu_s += time.process_time() - meter._c

        trainer.add_callback(_StepTimer())

    @property
    def measuring(self) -> bool:
        return self.tr.state.global_step >= self.warmup


def _yaml_value(v: str):
    import yaml

    return yaml.safe_load(v)


def build_side(side: str, cfg, plain_over: list[str] = ()):
    """The trainer of one side, on the same policy, prompts, LoRA and rewards."""
    from utils.training.grpo.config import load_prompts, to_dataset
    from utils.training.grpo.run import build_trainer

    rows = load_prompts(cfg, "train", cfg.max_train_prompts)
    if side == "ours":
        trainer, _ = build_trainer(cfg, rows)
        return trainer
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from utils.training.grpo.policy import load_policy

    funcs, weights = cfg.build()
    model, tok, peft_config, _ = load_policy(cfg)
    model.config.use_cache = True  # as from_pretrained leaves it
    args = GRPOConfig(output_dir=cfg.run_dir, use_cpu=not torch.cuda.is_available(), seed=cfg.seed,
                      num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
                      reward_weights=weights, max_steps=cfg.max_steps, logging_steps=1, report_to="none",
                      save_strategy="no", disable_tqdm=True,
                      **{k: _yaml_value(v) for k, _, v in (kv.partition("=") for kv in plain_over)})
    return GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=to_dataset(rows),
                       processing_class=tok, peft_config=peft_config)


def worker(args) -> dict:
    import torch

    side = args.worker
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as tmp:
        cfg = grpo_config(args, side, tmp)
        trainer = build_side(side, cfg, args.plain)
        model = trainer.model
        weight = next(model.parameters())
        dtype = weight.dtype
        # The bound in the dtype generation multiplies in: ours, the decoder's (decode_dtype); plain TRL, bf16
        # under its autocast
        gen_dtype = (resolve_decode_dtype(cfg.decode_dtype) if side == "ours" else
                     torch.bfloat16 if trainer.args.bf16 else None) or dtype
        bound = machine_bound(gen_dtype, weight.device.type)
        meter = Meter(trainer, args.warmup)
        trainer.train()
        hist = [h for h in trainer.state.log_history if "reward" in h and h.get("step", 0) > args.warmup]
        targs = trainer.args
        per_step = targs.per_device_train_batch_size * targs.gradient_accumulation_steps * targs.world_size
    steps = len(meter.step_s)
    wall = sum(meter.step_s)
    rows_per_call = meter.rows / max(meter.calls, 1)
    gen_tps = meter.tokens / meter.gen_s if meter.gen_s else 0.0
    tps_bound = decode_bound(model, rows_per_call, bound, gen_dtype)
    sampled_bound = completions_bound(model, meter.longest, meter.tokens, bound, gen_dtype)
    return {
        "side": side, "steps": steps, "completions_per_step": per_step,
        "per_device_batch": targs.per_device_train_batch_size,
        "gradient_checkpointing": bool(targs.gradient_checkpointing), "bf16": bool(targs.bf16),
        "model_dtype": str(dtype).replace("torch.", ""), "bound_dtype": str(gen_dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "samples_per_s": per_step * steps / wall if wall else 0.0,
        "samples_per_cpu_s": per_step * steps / meter.cpu_s if meter.cpu_s else 0.0,
        "step_s": wall / steps if steps else 0.0,
        "gen_share": meter.gen_s / wall if wall else 0.0, "reward_share": meter.reward_s / wall if wall else 0.0,
        "gen_tokens_per_s": gen_tps, "rows_per_generate": rows_per_call,
        "mean_completion_tokens": meter.tokens / max(meter.rows, 1),
        "longest_completion_tokens": meter.longest / max(meter.calls, 1),
        "bound_tokens_per_s": sampled_bound,
        "gen_fraction_of_bound": gen_tps / sampled_bound if sampled_bound else 0.0,
        "full_rows_bound_tokens_per_s": tps_bound,
        "gen_fraction_of_full_rows_bound": gen_tps / tps_bound if tps_bound else 0.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # PASSIVE (for processes sharing cores) costs a process alone on them ~20% (docs/EXPERIMENTS.md)
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "mean_reward": sum(h["reward"] for h in hist) / len(hist) if hist else None,
        **bound,
    }


# ============================================================================= report
ROWS = [("completions per optimizer step", "completions_per_step", "{:.0f}"),
        ("per-device batch / grad. checkpointing", None, None),
        ("samples/s (wall)", "samples_per_s", "{:.3f}"), ("samples per CPU-second", "samples_per_cpu_s", "{:.3f}"),
        ("step time (s)", "step_s", "{:.1f}"), ("generation share of step", "gen_share", "{:.0%}"),
        ("reward share of step", "reward_share", "{:.0%}"),
        ("generated tokens/s", "gen_tokens_per_s", "{:.0f}"), ("rows per generate call", "rows_per_generate", "{:.0f}"),
        ("mean completion tokens", "mean_completion_tokens", "{:.1f}"),
        ("longest completion a call (decode steps)", "longest_completion_tokens", "{:.1f}"),
        ("tokens/s bound for these completions", "bound_tokens_per_s", "{:.0f}"),
        ("tokens/s as fraction of bound", "gen_fraction_of_bound", "{:.0%}"),
        ("tokens/s bound, every row to the end", "full_rows_bound_tokens_per_s", "{:.0f}"),
        ("tokens/s as fraction of that bound", "gen_fraction_of_full_rows_bound", "{:.0%}"),
        ("peak RSS (MiB)", "peak_rss_mb", "{:.0f}"), ("mean reward (measured steps)", "mean_reward", "{:.3f}"),
        ("measured bandwidth GB/s / matmul GFLOP/s (dtype)", None, None), ("OpenMP wait policy", None, None)]


def report(results: dict[str, dict]) -> str:
    sides = list(results)
    lines = ["| | " + " | ".join(sides) + (" | ours / plain |" if len(sides) == 2 else " |"),
             "|---" * (len(sides) + 1 + (len(sides) == 2)) + "|"]
    for label, key, fmt in ROWS:
        if key is None:
            if label.startswith("per-device"):
                vals = [f"{r['per_device_batch']} / {'yes' if r['gradient_checkpointing'] else 'no'}"
                        f" ({r['model_dtype']}{', bf16 autocast' if r['bf16'] else ''})" for r in results.values()]
            elif label.startswith("OpenMP"):
                vals = [str(r.get("omp_wait_policy", "n/a")) for r in results.values()]
            else:
                vals = [f"{r['bandwidth_gb_s']} / {r['matmul_gflop_s']} ({r.get('bound_dtype', '?')})"
                        for r in results.values()]
            lines.append(f"| {label} | " + " | ".join(vals) + (" | |" if len(sides) == 2 else " |"))
            continue
        vals = [r.get(key) for r in results.values()]
        cells = ["n/a" if v is None else fmt.format(v) for v in vals]
        ratio = ""
        if len(sides) == 2 and "plain" in results and "ours" in results:
            a, b = results["ours"].get(key), results["plain"].get(key)
            ratio = f"{a / b:.2f}x" if a is not None and b else ""
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {ratio} |" if len(sides) == 2 else " |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    setup_logging(os.environ.get("ECG_LOG_LEVEL", "WARNING"))
    args = parse(argv)
    return guarded(lambda: compare(args))


def compare(args) -> None:
    """The worker side (one side's measurement in this process), or both sides as subprocesses and the report."""
    if args.worker:
        if args.worker == "ours":
            configure_process()  # as grpo_train.py runs; plain TRL runs with the process as it is
        print("BENCH_RESULT " + json.dumps(worker(args)), flush=True)
        return
    grpo_config(args, "ours", tempfile.gettempdir())  # a bad config or --set stops here, before any run
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for side in sides:
        if side not in ("ours", "plain"):
            raise UserError(f"--sides: {side!r}: expected ours and/or plain")
    if args.repeats < 1:
        raise UserError(f"--repeats: {args.repeats}: expected 1 or more")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for rep in range(args.repeats):
        for side in sides:
            runs[side].append(run_side(args, side, rep))
    results = {side: median_result(r) for side, r in runs.items()}
    wall = []
    if {"ours", "plain"} <= set(runs):
        wall = [o["samples_per_s"] / p["samples_per_s"] if p["samples_per_s"] else None
                for o, p in zip(runs["ours"], runs["plain"])]
    from utils.core.runtime import format_machine, machine_summary

    machine = machine_summary()
    print(f"machine: {format_machine(machine)}")
    if args.repeats > 1:
        paired = [r for r in wall if r is not None]
        print(f"medians of {args.repeats} alternating runs a side; wall-clock ratio ours / plain per repeat: "
              + ", ".join("n/a" if r is None else f"{r:.2f}x" for r in wall)
              + (f" (median {statistics.median_low(paired):.2f}x)" if paired else ""))
    print(report(results))
    if args.json:
        extra = {"repeats": runs, "wall_ratios": wall} if args.repeats > 1 else {}
        Path(args.json).write_text(json.dumps({**results, "machine": machine, **extra}, indent=2), encoding="utf-8")


def run_side(args, side: str, rep: int) -> dict:
    """One side's measurement in a fresh process (its own peak memory); its result row."""
    steps = args.plain_steps if side == "plain" and args.plain_steps is not None else args.steps
    warmup = args.plain_warmup if side == "plain" and args.plain_warmup is not None else args.warmup
    cmd = [sys.executable, __file__, "--worker", side, "--config", args.config, "--steps", str(steps),
           "--warmup", str(warmup)] + (["--policy", args.policy] if args.policy else [])
    for kv in args.set:
        cmd += ["--set", kv]
    for kv in args.plain:
        cmd += ["--plain", kv]
    print(f"running {side} ({warmup} warm-up + {steps} measured steps)"
          + (f", repeat {rep + 1} of {args.repeats}" if args.repeats > 1 else "") + " ...", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if r.returncode or line is None:
        sys.stderr.write(r.stderr[-3000:])
        raise UserError(f"the {side} side failed (exit {r.returncode}); its last output is above")
    return json.loads(line[len("BENCH_RESULT "):])


def median_result(rows: list[dict]) -> dict:
    """One side's figures over its repeats: the median of each number (the lower middle one for an even count,
    so that every figure is one that was measured), the first repeat's for anything else.

    >>> median_result([{"x": 3.0, "d": "a"}, {"x": 1.0, "d": "b"}, {"x": 2.0, "d": "c"}])
    {'x': 2.0, 'd': 'a'}
    """
    out = dict(rows[0])
    for key, first in rows[0].items():
        vals = [r.get(key) for r in rows]
        if isinstance(first, (int, float)) and not isinstance(first, bool) and all(
                isinstance(v, (int, float)) for v in vals):
            out[key] = statistics.median_low(vals)
    return out


if __name__ == "__main__":
    sys.exit(main())
