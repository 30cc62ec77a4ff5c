"""Evaluation throughput: answers per second of generation (the cost of an evaluation) and of scoring.

Usage:
    python scripts/bench_eval.py                                    # CPU recipe, base model, 16 questions
    python scripts/bench_eval.py --model sft --n 32 --batch-sizes 8,16,32
    python scripts/bench_eval.py --model sft --n 96 --decode-dtype bfloat16   # bf16 products (CPUs with AMX)
    python scripts/bench_eval.py --config configs/llama-3.2-3b/eval.yaml --n 128 --batch-sizes 32,64

Generates fresh answers (the cache is neither read nor written) for the first N questions of the
recipe's seeded sample, once per batch size, then scores them with every metric of the report. Prints
answers/s and new tokens/s per batch size with their share of the machine's decode bound at that batch
size (utils.core.runtime.decode_bound), scoring answers/s, and what a whole evaluation would take.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from utils.core.cli import guarded, setup_logging
from utils.core.config import load_config
from utils.core.runtime import configure_process, decode_bound, machine_bound
from utils.models.loading import load_for_inference


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cpu/eval.yaml", help="eval recipe whose settings to use")
    p.add_argument("--model", default="base", help="model reference (default: base)")
    p.add_argument("--n", type=int, default=16, help="questions to answer per batch size")
    p.add_argument("--batch-sizes", default="", help="comma-separated; default: the recipe's batch_size")
    p.add_argument("--max-new-tokens", type=int, default=0, help="default: the recipe's")
    p.add_argument("--num-threads", type=int, default=0, help="torch CPU threads; default: the recipe's")
    p.add_argument("--decode-dtype", default="", help="model, bfloat16 or auto (the CPU decoder's matrix products); "
                   "default: the recipe's")
    args = p.parse_args(argv)
    setup_logging("WARNING")
    return guarded(lambda: bench(args))


def bench(args) -> int:
    import torch

    from utils.evaluation.answers import prompt_for, resolve_models
    from utils.evaluation.config import EvalConfig, load_items
    from utils.evaluation.metrics import reward_model_status, score_answers
    from utils.models import decode, generation
    from utils.rewards.overlap import load_wordnet

    over = {"models": [args.model], "limit": args.n, "per_task": 0}
    if args.max_new_tokens:
        over["max_new_tokens"] = args.max_new_tokens
    if args.num_threads:
        over["num_threads"] = args.num_threads
    if args.decode_dtype:
        over["decode_dtype"] = args.decode_dtype
    cfg = load_config(EvalConfig, args.config, over)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rows, source = load_items(cfg)
    (spec,) = resolve_models(cfg)
    prompts = [prompt_for(r, spec.answer_format) for r in rows]
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()] or [cfg.batch_size]
    from utils.core.runtime import format_machine

    print(f"machine: {format_machine()}")
    print(f"model {spec.name} ({spec.path}), {source}")
    print(f"greedy={not cfg.do_sample}, max_new_tokens={cfg.max_new_tokens}, dtype={cfg.dtype}, "
          f"torch threads={torch.get_num_threads()}, device={'cuda' if torch.cuda.is_available() else 'cpu'}")
    t0 = time.time()
    model, tok = load_for_inference(spec.path, cfg.base_model, dtype=cfg.dtype)
    print(f"load: {time.time() - t0:.1f} s")
    weight = next(model.parameters())
    # the bound in the dtype the decoder multiplies in (decode_dtype bfloat16: bf16 products of fp32 weights)
    gen_dtype = (decode.resolve_decode_dtype(cfg.decode_dtype) if weight.device.type == "cpu" else None) or weight.dtype
    bound = machine_bound(gen_dtype, weight.device.type)
    print(f"measured: {bound['bandwidth_gb_s']} GB/s copy, {bound['matmul_gflop_s']} GFLOP/s matmul "
          f"({str(gen_dtype).removeprefix('torch.')})")
    answers, best = None, 0.0
    print(f"{'batch':>5}  {'answers':>7}  {'seconds':>7}  {'answers/s':>9}  {'tokens/s':>8}  {'tokens/answer':>13}  "
          f"{'bound tok/s':>11}  {'of bound':>8}  engine")
    for bs in sizes:
        t0 = time.time()
        answers = generation.generate(model, tok, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=bs,
                                      do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p,
                                      decode_dtype=cfg.decode_dtype)
        dt = time.time() - t0
        st = generation.last_stats
        best = max(best, len(prompts) / dt)
        tps_bound = decode_bound(model, bs, bound, gen_dtype)
        print(f"{bs:>5}  {len(prompts):>7}  {dt:>7.1f}  {len(prompts) / dt:>9.2f}  {st.new_tokens / dt:>8.0f}  "
              f"{st.new_tokens / len(prompts):>13.1f}  {tps_bound:>11.0f}  {st.new_tokens / dt / tps_bound:>8.0%}  "
              f"{st.engine}")
    del model
    reward_model, note = reward_model_status(cfg)
    wordnet = load_wordnet()
    score_answers(answers[:2], rows[:2], spec.answer_format, cfg, reward_model)  # loads the scorers
    t0 = time.time()
    score_answers(answers, rows, spec.answer_format, cfg, reward_model)
    dt = time.time() - t0
    print(f"scoring: {len(answers) / dt:.1f} answers/s (reward model: {'yes' if reward_model else 'no'}, "
          f"METEOR: {'yes' if wordnet is not None else 'no'})")
    n_all = len(load_items(load_config(EvalConfig, args.config, {"models": [args.model]}))[0])
    per_model = n_all / best + n_all * dt / len(answers)
    print(f"evaluation throughput: {best:.2f} answers/s generating; the recipe's sample ({n_all} questions) takes "
          f"~{per_model / 60:.1f} min per model")
    return 0


if __name__ == "__main__":
    configure_process()
    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(main())
