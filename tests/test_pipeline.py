"""The whole pipeline on the tiny Llama: scripts/run_pipeline.sh runs every phase through its command line,
hands checkpoints on through models/, ends with a report, and skips finished phases when run again. It runs
with two lanes (GRPO beside the reward model and the first evaluation), as `make demo` does on a CPU;
test_pipeline_lanes.py checks the lanes' order and failures with a stand-in Python."""

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT


# Tiny sizes for each CPU recipe file: everything else (reward mix, formats, LoRA, ...) is the recipe's.
def overrides(tmp, tiny):
    processed = str(tmp / "processed")
    return {
        "prepare": {"out_dir": processed, "tokenizer": str(tiny), "val_fraction": 0.1, "test_fraction": 0.1},
        "sft": {"base_model": str(tiny), "data_dir": processed, "max_train_samples": 8, "max_eval_samples": 4,
                "max_length": 128, "max_steps": 2, "batch_size": 2, "per_device_batch_size": 2, "eval_batch_size": 2,
                "logging_steps": 1, "eval_steps": 2, "save_steps": 2, "run_dir": str(tmp / "runs/sft"),
                "report_to": []},
        "reward": {"base_model": str(tiny), "data_dir": processed, "max_train_pairs": 8, "max_test_items": 4,
                   "max_length": 96, "max_steps": 2, "batch_size": 2, "per_device_batch_size": 2, "eval_steps": 2,
                   "save_steps": 2, "run_dir": str(tmp / "runs/reward"), "report_to": [], "audit_items": 3,
                   "sample_items": 0},
        "grpo": {"base_model": str(tiny), "data_dir": processed, "max_train_prompts": 8, "num_generations": 2,
                 "batch_size": 2, "per_device_batch_size": 2, "max_completion_length": 8, "max_steps": 2,
                 "heldout_prompts": 2, "eval_steps": 2, "eval_batch_size": 2, "sample_steps": 2, "save_steps": 2,
                 "run_dir": str(tmp / "runs/grpo"), "report_to": []},
        "eval": {"base_model": str(tiny), "test_file": f"{processed}/eval/test.jsonl", "per_task": 1,
                 "max_new_tokens": 8, "batch_size": 4, "cache_dir": str(tmp / "reports/cache"),
                 "out_dir": str(tmp / "reports"), "bootstrap": 100},
    }


def write_configs(tmp, tiny):
    cfg_dir = tmp / "configs"
    cfg_dir.mkdir()
    for phase, over in overrides(tmp, tiny).items():
        data = yaml.safe_load((ROOT / "configs/cpu" / f"{phase}.yaml").read_text())
        unknown = set(over) - set(data)
        assert not unknown, f"configs/cpu/{phase}.yaml lacks keys {unknown}"
        data.update(over)
        (cfg_dir / f"{phase}.yaml").write_text(yaml.safe_dump(data))
    return cfg_dir


@pytest.mark.slow
def test_whole_pipeline_on_tiny_llama(tmp_path, tiny_llama, raw_dir):
    env = {**os.environ, "CFG_DIR": str(write_configs(tmp_path, tiny_llama)), "RAW_DIR": str(raw_dir),
           "ECG_MODELS_DIR": str(tmp_path / "models"), "PROCESSED_DIR": str(tmp_path / "processed"),
           "REPORTS_DIR": str(tmp_path / "reports"), "PYTHON": sys.executable, "RECIPE": "tiny",
           "HF_HUB_OFFLINE": "1", "LANES": "2"}
    run = lambda: subprocess.run(["bash", "scripts/run_pipeline.sh"], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=1500)
    r = run()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for phase in ("sft", "reward", "rlhf"):
        assert (tmp_path / "models" / phase / ".complete").is_file(), phase
    report = tmp_path / "reports/pipeline-tiny"
    html = (report / "report.html").read_text()
    assert "<table" in html and "sft" in html and "rlhf" in html
    assert (report / "report.md").is_file()
    times = (tmp_path / "reports/pipeline_times.tsv").read_text().splitlines()
    phases = [line.split("\t")[0] for line in times[1:]]
    assert phases[:2] == ["prepare", "sft"] and phases[-1] == "eval"
    assert sorted(phases[2:-1]) == ["eval-base-sft", "grpo", "reward"]   # the two lanes, in either order
    assert (tmp_path / "reports/pipeline-tiny-sft/report.md").is_file()   # base vs SFT, written beside GRPO
    # the last evaluation generates only GRPO's answers, in two processes: base's and SFT's come from the
    # side lane's cache
    assert "base: all" in r.stderr and "sft: all" in r.stderr and "rlhf: generating" in r.stderr
    assert "process 0 of 2" in r.stderr
    assert "chat.py" in r.stdout and "report.html" in r.stdout

    # Run again: every finished phase is skipped, evaluation reuses its cached answers.
    r = run()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for phase in ("prepare", "sft", "reward", "grpo"):
        assert f"{phase}: done already, skipped" in r.stdout
