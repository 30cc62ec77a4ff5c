"""Batch layouts derived from the world size, and --dry-run: the shipped recipes fit 1, 8 and 16 processes,
a layout that cannot fit says which would, and a dry run plans a 16-GPU launch on this machine without
loading weights (utils/training/plan.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

from utils.core.config import UserError, load_config
from utils.training.plan import layout, lora_parameters, parameters

ROOT = Path(__file__).resolve().parents[1]
PHASES = {"sft": ("sft_train.py", []), "reward": ("reward_model.py", ["train"]), "grpo": ("grpo_train.py", [])}
LLAMA_3B = {"hidden_size": 3072, "num_hidden_layers": 28, "intermediate_size": 8192, "num_attention_heads": 24,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True}


@pytest.mark.parametrize("batch, max_per_device, world, per_device, accumulation", [
    (32, 16, 1, 16, 2), (32, 16, 4, 8, 1), (32, 16, 8, 4, 1), (32, 4, 2, 4, 4), (64, 8, 16, 4, 1), (6, 4, 1, 3, 2),
])
def test_layouts_fill_the_batch(batch, max_per_device, world, per_device, accumulation):
    lay = layout(batch, max_per_device, world)
    assert (lay.per_device, lay.accumulation) == (per_device, accumulation)
    assert lay.batch == batch and lay.per_device <= max_per_device


def test_no_layout_names_the_nearest_that_fit():
    with pytest.raises(UserError) as e:
        layout(32, 16, 3)
    assert str(e.value) == ("batch_size 32 cannot be split evenly over 3 processes; batch sizes that fit 3 processes: "
                            "30, 33 (nearest), or run 2 or 4 processes")
    with pytest.raises(UserError, match="batch sizes that fit 3 processes: 48, 72"):
        layout(64, 8, 3, multiple_of=8)  # GRPO: whole groups of 8 completions on every process
    with pytest.raises(UserError, match="not a multiple of 8"):
        layout(60, 8, 1, multiple_of=8)


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_the_llama_recipes_fit_one_to_sixteen_gpus(phase, world):
    from utils.training.grpo.config import GRPOTrainConfig
    from utils.training.plan import batch_layout
    from utils.training.reward_model import RewardModelConfig
    from utils.training.sft import SFTTrainConfig

    cls = {"sft": SFTTrainConfig, "reward": RewardModelConfig, "grpo": GRPOTrainConfig}[phase]
    cfg = load_config(cls, ROOT / f"configs/llama-3.2-3b/{phase}.yaml", {"dry_run": True, "world_size": world})
    lay = batch_layout(cfg)
    assert lay.batch == cfg.batch_size and lay.per_device <= cfg.per_device_batch_size


def test_parameter_count_of_llama_3b():
    assert abs(parameters(LLAMA_3B) - 3.21e9) < 0.01e9  # Llama-3.2-3B: 3.21 B parameters (tied embeddings)
    assert 20e6 < lora_parameters(LLAMA_3B, 16) < 30e6  # rank 16 on every linear layer: ~24 M


@pytest.mark.parametrize("phase", list(PHASES))
def test_dry_run_plans_a_launch_without_weights(phase):
    """The Llama recipe by its Hub name, on a machine with neither the weights nor the network: the plan
    comes from the config alone (1 and 8 processes: the README table's test, in one process)."""
    world = 16
    script, sub = PHASES[phase]
    r = subprocess.run([sys.executable, script, *sub, "--config", f"configs/llama-3.2-3b/{phase}.yaml", "--dry-run",
                        "--world-size", str(world)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"dry run for {world} process(es): no weights loaded" in r.stdout
    for key in ("per_device_batch", "gradient_accumulation", "max_tokens_per_step", "memory per device"):
        assert key in r.stdout, key
    assert "3.21 B" in r.stdout


def test_world_size_outside_a_dry_run_must_match_the_launch():
    r = subprocess.run([sys.executable, "sft_train.py", "--config", "configs/cpu/sft.yaml", "--world-size", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "for planning with --dry-run" in r.stderr.strip().splitlines()[-1]


def test_zero_stages_shard_more_memory_one_after_the_other():
    """ZeRO-1 shards the optimizer states, ZeRO-2 the gradients too, ZeRO-3 the weights too: each stage needs
    less per device than the one before, and the frozen weights move only at stage 3."""
    from utils.core.config import load_config
    from utils.training.plan import memory_estimate
    from utils.training.sft import SFTTrainConfig

    cfg = load_config(SFTTrainConfig, ROOT / "configs/llama-3.2-3b/sft.yaml")
    est = [memory_estimate(LLAMA_3B, cfg, 4, 384, 8, zero_stage=z) for z in (0, 1, 2, 3)]
    totals = [e["total"] for e in est]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4, totals
    assert est[0]["weights"] == est[1]["weights"] == est[2]["weights"] > est[3]["weights"]


def test_dry_run_of_the_cpu_recipe_converts_nothing(tmp_path, monkeypatch):
    """The CPU recipe's built-in base is planned from its known shape: the dry run neither converts it (that
    loads the weights) nor needs the package; the reward model's plan counts only the layers it keeps."""
    monkeypatch.setenv("ECG_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    launches = _plan_launches()
    plans = {}
    for phase, script in launches.PHASE_SCRIPTS.items():
        argv = ["--config", f"configs/cpu/{phase}.yaml", "--base-model", "smollm2-135m-instruct"]
        plans[phase] = launches.dry_run(script, argv + (["--policy", "base"] if phase == "grpo" else []))
    assert not (tmp_path / "models").exists()
    assert plans["sft"]["parameters"] == plans["grpo"]["parameters"] == "0.13 B"
    assert plans["reward"]["parameters"] != "0.13 B"  # keep_layers: 8 of SmolLM2's 30


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _plan_launches():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_launches", ROOT / "scripts/plan_launches.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_gpu_table_is_the_plans():
    """The README's GPU table is what scripts/plan_launches.py (the --dry-run functions) prints now."""
    module = _plan_launches()
    rows = [x for x in _readme_section("On GPUs").splitlines() if x.startswith("|")]
    assert rows == module.table(), "README 'On GPUs' table is stale: paste `python scripts/plan_launches.py`"


def _dry_run_of(line: str) -> tuple[str, list[str]] | None:
    """A README launch line as the dry run of the same launch: the script and its flags, with the world
    size from --num_processes and the ZeRO stage from the accelerate config."""
    import shlex

    words = shlex.split(line.split("#")[0])
    script = next((i for i, w in enumerate(words) if w in _plan_launches().SCRIPTS), None)
    if script is None:
        return None
    launcher = words[:script]
    world = int(launcher[launcher.index("--num_processes") + 1]) if "--num_processes" in launcher else 1
    conf = next((w for w in launcher if w.startswith("configs/accelerate/")), "")
    zero = 3 if "zero3" in conf else 2 if "zero2" in conf else 0
    return words[script], [*words[script + 1:], "--dry-run", "--world-size", str(world), "--zero-stage", str(zero)]


def test_readme_gpu_commands_plan_without_a_gpu(monkeypatch):
    """Every training launch the README's "On GPUs" shows parses and passes its --dry-run plan here (the
    batch layout for its process count, every flag a config key), so the documented commands start."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    block = _readme_section("On GPUs").split("```bash", 1)[1].split("```", 1)[0]
    commands = [c for c in (_dry_run_of(x) for x in block.splitlines() if x.strip()) if c]
    assert len(commands) >= 4, block
    plans = _plan_launches()
    for script, argv in commands:
        plan = plans.dry_run(script, argv)
        world = int(argv[argv.index("--world-size") + 1])
        assert plan["world_size"] == world and plan.get("memory_gib"), (script, argv, plan)


def test_gpu_kernels_on_a_machine_without_cuda_are_one_line():
    """attn_implementation: flash_attention_2 and liger_kernel load anywhere (plans), and are refused with the
    fix when a model is to be trained without CUDA, or without their package."""
    from utils.training.config import check_kernels
    from utils.training.sft import SFTTrainConfig

    for over in ({"attn_implementation": "flash_attention_2"}, {"liger_kernel": True}):
        cfg = load_config(SFTTrainConfig, ROOT / "configs/llama-3.2-3b/sft.yaml", over)
        with pytest.raises(UserError, match="needs a CUDA GPU") as e:
            check_kernels(cfg, cuda=False)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="needs flash-attn, which is not installed"):
        check_kernels(load_config(SFTTrainConfig, None, {"attn_implementation": "flash_attention_2"}), cuda=True)
    check_kernels(load_config(SFTTrainConfig, None, {}), cuda=False)  # nothing asked: nothing refused
