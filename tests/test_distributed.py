"""Two CPU processes (gloo) under DDP and under DeepSpeed ZeRO-3 (its CPU accelerator): SFT, the reward
model and GRPO train a few steps on the tiny Llama, save once, and the saved adapter reloads and merges.
For SFT and the reward model, whose steps are deterministic, the adapter equals the single-process save of
the same steps (same tensor names, values equal to float rounding); GRPO samples, so its ranks draw other
completions than one process would, and its adapter is checked for the same tensors, non-empty."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

ZERO3_CPU = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "mixed_precision": "no",
             "deepspeed_config": {"zero_stage": 3, "zero3_init_flag": False, "zero3_save_16bit_model": True,
                                  "offload_optimizer_device": "none", "offload_param_device": "none"},
             "num_machines": 1, "num_processes": 2, "machine_rank": 0, "rdzv_backend": "static",
             "same_network": True, "use_cpu": True}
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The fixture files prepared once, shared by every run of this module."""
    from tests.fixtures import write_raw
    from utils.core.config import load_config
    from utils.data.prepare import PrepareConfig, run_prepare

    tmp = tmp_path_factory.mktemp("dist")
    cfg = load_config(PrepareConfig, None, {"raw_dir": str(write_raw(tmp / "raw")), "out_dir": str(tmp / "processed"),
                                            "system_prompt_file": str(ROOT / "data/system_prompt.txt"),
                                            "tokenizer": "", "val_fraction": 0.1, "test_fraction": 0.1})
    run_prepare(cfg)
    return tmp / "processed"


def _launch(tmp: Path, kind: str, script: list[str], port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ECG_MODELS_DIR": str(tmp / "m"),
           "DS_ACCELERATOR": "cpu"}
    if kind == "single":
        cmd = [sys.executable, *script]
    elif kind == "ddp":  # torchrun: two gloo ranks, as accelerate launches them on GPUs (DDP)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]
    else:
        cfg = tmp / f"{kind}.yaml"
        # zero3_init_flag as configs/accelerate/zero3.yaml ships it (models built sharded) for the merge's sake
        ds = {**ZERO3_CPU["deepspeed_config"], "zero3_init_flag": kind == "zero3-init"}
        cfg.write_text(yaml.safe_dump({**ZERO3_CPU, "deepspeed_config": ds}))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--main_process_port",
               str(port), *script]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _same_tensors(a: dict, b: dict, atol: float) -> None:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:5]
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert (a[k].float() - b[k].float()).abs().max().item() <= atol, k


def _reload_and_merge(folder: Path, head: str = "causal") -> None:
    from utils.models.loading import load_model

    model = load_model(str(folder), head=head, dtype="float32", adapter="merge")
    assert sum(p.numel() for p in model.parameters()) > 0


def _needs_deepspeed(kind: str) -> None:
    if kind.startswith("zero3") and importlib.util.find_spec("deepspeed") is None:
        pytest.fail("deepspeed is not installed: `make setup` installs it (requirements.txt) for the ZeRO-3 tests")


SFT_FLAGS = ["--lora-r", "4", "--lora-alpha", "8", "--batch-size", "4", "--per-device-batch-size", "2",
             "--max-length", "128", "--max-steps", "2", "--learning-rate", "1e-3", "--eval-steps", "100",
             "--no-eval-on-start", "--max-eval-samples", "4", "--save-steps", "100", "--report-to", "",
             "--num-threads", "1", "--max-train-samples", "8", "--warmup-ratio", "0", "--lr-scheduler", "constant",
             # SGD: an update linear in the gradient, so the comparison sees the save path, not Adam turning
             # rounding-level differences of near-zero gradients into full +-lr steps
             "--trainer-extra", "{optim: sgd}"]


@pytest.fixture(scope="module")
def sft_single(tmp_path_factory, data, tiny_llama):
    tmp = tmp_path_factory.mktemp("sft-single")
    r = _launch(tmp, "single", ["sft_train.py", "--config", "configs/cpu/sft.yaml", "--base-model", str(tiny_llama),
                                "--data-dir", str(data), "--run-dir", str(tmp / "run"), "--output-dir",
                                str(tmp / "out"), *SFT_FLAGS], 0)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "out"


def test_sft_ddp_saves_the_single_process_adapter(tmp_path, data, tiny_llama, sft_single):
    _sft(tmp_path, data, tiny_llama, sft_single, "ddp", 29631)


def test_sft_zero3_saves_the_single_process_adapter_and_merges(tmp_path, data, tiny_llama, sft_single):
    """With zero3_init_flag on, as the shipped zero3.yaml: the main process's merge (merge: true) loads the
    base outside DeepSpeed's sharded construction, which the waiting processes would never join."""
    _sft(tmp_path, data, tiny_llama, sft_single, "zero3-init", 29632, "--merge", "true")
    assert (tmp_path / "out/merged/.complete").is_file()


def _sft(tmp_path, data, tiny_llama, sft_single, kind, port, *flags):
    _needs_deepspeed(kind)
    r = _launch(tmp_path, kind, ["sft_train.py", "--config", "configs/cpu/sft.yaml", "--base-model", str(tiny_llama),
                                 "--data-dir", str(data), "--run-dir", str(tmp_path / "run"), "--output-dir",
                                 str(tmp_path / "out"), *SFT_FLAGS, *flags], port)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("saved ") == 1  # the main process alone writes
    _same_tensors(_adapter(tmp_path / "out"), _adapter(sft_single), atol=1e-4)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["global_step"] == 2
    _reload_and_merge(tmp_path / "out")


RM_FLAGS = ["--lora-r", "4", "--lora-alpha", "8", "--batch-size", "4", "--per-device-batch-size", "2",
            "--max-steps", "2", "--learning-rate", "1e-3", "--keep-layers", "0", "--max-train-pairs", "8",
            "--negatives", "flip_yesno,numbers,truncate,sampled", "--max-eval-pairs", "0", "--max-test-items", "8",
            # sampled negatives in 3 seeded chunks, split over the ranks and gathered: the same pairs as 1 process
            "--sample-model", "base", "--sample-items", "40", "--sample-max-new-tokens", "8",
            "--save-steps", "100", "--report-to", "", "--num-threads", "1", "--warmup-ratio", "0",
            "--lr-scheduler", "constant", "--trainer-extra", "{optim: sgd}"]  # SGD: see SFT_FLAGS


@pytest.fixture(scope="module")
def rm_single(tmp_path_factory, data, tiny_llama):
    tmp = tmp_path_factory.mktemp("rm-single")
    r = _launch(tmp, "single", ["reward_model.py", "train", "--config", "configs/cpu/reward.yaml", "--base-model",
                                str(tiny_llama), "--data-dir", str(data), "--run-dir", str(tmp / "run"),
                                "--output-dir", str(tmp / "out"), *RM_FLAGS], 0)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "out"


def test_reward_model_ddp_saves_the_single_process_adapter(tmp_path, data, tiny_llama, rm_single):
    _reward_model(tmp_path, data, tiny_llama, rm_single, "ddp", 29641)


def test_reward_model_zero3_saves_the_single_process_adapter(tmp_path, data, tiny_llama, rm_single):
    _reward_model(tmp_path, data, tiny_llama, rm_single, "zero3", 29642)


def _reward_model(tmp_path, data, tiny_llama, rm_single, kind, port):
    _needs_deepspeed(kind)
    r = _launch(tmp_path, kind, ["reward_model.py", "train", "--config", "configs/cpu/reward.yaml", "--base-model",
                                 str(tiny_llama), "--data-dir", str(data), "--run-dir", str(tmp_path / "run"),
                                 "--output-dir", str(tmp_path / "out"), *RM_FLAGS], port)
    assert r.returncode == 0, r.stderr[-3000:]
    ours, single = (json.loads((p / "metrics.json").read_text()) for p in (tmp_path / "out", rm_single))
    assert ours["train_pair_types"].get("sampled") and ours["train_pair_types"] == single["train_pair_types"]
    _same_tensors(_adapter(tmp_path / "out"), _adapter(rm_single), atol=1e-4)
    _reload_and_merge(tmp_path / "out", head="seqcls")


def test_grpo_ddp_saves_a_whole_adapter(tmp_path, data, tiny_llama):
    _grpo(tmp_path, data, tiny_llama, "ddp", 29651)


def test_grpo_zero3_saves_a_whole_adapter(tmp_path, data, tiny_llama):
    _grpo(tmp_path, data, tiny_llama, "zero3", 29652)


def _grpo(tmp_path, data, tiny_llama, kind, port):
    _needs_deepspeed(kind)
    cfg = {"base_model": str(tiny_llama), "policy": "base", "data_dir": str(data),
           "rewards": {"format": 0.5, "length": 1.0, "rouge": 1.0}, "num_generations": 2, "batch_size": 4,
           "per_device_batch_size": 2, "max_completion_length": 6, "max_steps": 2, "learning_rate": 1e-3,
           "heldout_prompts": 2, "eval_steps": 2, "eval_batch_size": 2, "sample_steps": 0, "logging_steps": 1,
           "save_steps": 100, "report_to": [], "run_dir": str(tmp_path / "run"), "output_dir": str(tmp_path / "out"),
           "lora_r": 4, "lora_alpha": 8, "num_threads": 1}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(cfg))
    r = _launch(tmp_path, kind, ["grpo_train.py", "--config", str(tmp_path / "grpo.yaml")], port)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["num_processes"] == 2 and m["global_step"] == 2
    saved = _adapter(tmp_path / "out")
    assert saved and all(v.numel() > 0 for v in saved.values())
    # the same tensors a single-process adapter of this recipe has (every LoRA layer, nothing partitioned away)
    names = {k for k in saved if "lora_A" in k}
    assert len(names) == 2 * 7  # 2 layers x 7 linear modules of the tiny Llama
    _reload_and_merge(tmp_path / "out")


def test_evaluation_shares_generation_over_two_processes(tmp_path, data, tiny_llama):
    """torchrun starts two CPU processes: the first reads the cache (here: 3 answers from an earlier run),
    each answers half of the rest into its own part of the cache, the first merges them, scores and
    reports; a single process then finds every answer cached."""
    n = len((data / "eval/test.jsonl").read_text().splitlines())
    flags = ["evaluate.py", "--config", "configs/cpu/eval.yaml", "--models", str(tiny_llama), "--test-file",
             str(data / "eval/test.jsonl"), "--reward-model", "null", "--max-new-tokens", "4", "--batch-size", "2",
             "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "reports")]
    r = _launch(tmp_path, "single", [*flags, "--run-name", "some", "--limit", "3"], 0)
    assert r.returncode == 0, r.stderr[-3000:]

    r = _launch(tmp_path, "ddp", [*flags, "--run-name", "two", "--num-threads", "1"], 0)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("report: ") == 1  # the first process reports
    left = n - 3
    assert f"generating {(left + 1) // 2} answers (3 cached; process 0 of 2)" in r.stderr
    assert f"{left} answers from 2 processes ({(left + 1) // 2} + {left // 2})" in r.stderr
    (cache,) = (tmp_path / "cache/answers").iterdir()  # the parts were merged into one file
    assert len({json.loads(line)["key"] for line in cache.read_text().splitlines()}) == n
    generation = json.loads((tmp_path / "reports/two/metrics.json").read_text())["generation"]["tiny-llama"]
    assert generation["generated"] == left and generation["cached"] == 3

    r = _launch(tmp_path, "single", [*flags, "--run-name", "one"], 0)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"all {n} answers cached" in r.stderr
