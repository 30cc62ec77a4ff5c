"""Phase 5: tell whether fine-tuning worked. Every model answers the same test questions; the answers are
scored (BLEU-1, ROUGE-L, METEOR, yes/no accuracy, key terms, numbers, semantic similarity, reward model,
format, length, optionally a judge model) and compared with confidence intervals and paired tests.

Usage:
    python evaluate.py --config configs/cpu/eval.yaml --models base,sft,rlhf
    python evaluate.py --config configs/cpu/eval.yaml --models base,sft --per-task 20     # a seeded sample
    python evaluate.py --config configs/cpu/eval.yaml --limit 20                          # a quick look
    python evaluate.py --config configs/cpu/eval.yaml --models sft,models/other-adapter   # any folder
    python evaluate.py --config configs/cpu/eval.yaml --input my_questions.jsonl          # your own file
    python evaluate.py --config configs/cpu/eval.yaml --judge local --judge-model sft
    accelerate launch --num_processes 4 evaluate.py --config configs/llama-3.2-3b/eval.yaml  # 4 GPUs share
    torchrun --nproc-per-node 2 evaluate.py --config configs/cpu/eval.yaml --num-threads 1  # 2 CPU processes
    python evaluate.py --config configs/llama-3.2-3b/eval.yaml --judge openai \\
        --judge-endpoint http://localhost:8000/v1 --judge-model meta-llama/Llama-3.1-70B-Instruct

--input lines are {"question": ..., "answer": ... (the reference), "task": optional, "id": optional}.
Answers are cached in reports/cache/ per model and generation settings: a rerun, or a run after an
interruption, generates only what is missing. Writes reports/<run>/ (run: the model names, or
--run-name): report.md, report.html (self-contained), plots/, metrics.json, answers.jsonl.
"""

import logging
import os
import sys

from utils.core.cli import run
from utils.core.runtime import configure_process
from utils.evaluation.config import EvalConfig
from utils.evaluation.run import headline, run_evaluation


def main(config: EvalConfig):
    result, out = run_evaluation(config)
    if result is None:  # not the first of several processes: it shared the generation, the first reports
        # Its answers are handed over and it has left the process group; exit without the interpreter's
        # teardown, where a thread of the group's still joinable aborted the process twice in CI
        # ("terminate called without an active exception") and failed the launch.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    print(headline(result))
    print(f"report: {out / 'report.md'}  {out / 'report.html'}")


if __name__ == "__main__":
    configure_process()  # before anything imports torch: OpenMP wait policy, allocator
    sys.exit(run(main, EvalConfig, __doc__))
