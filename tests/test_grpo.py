"""GRPO phase: config errors, the faster generation, the held-out bookkeeping, and real runs of
grpo_train.py on the tiny Llama (through the command line, killed and resumed, two processes on gloo)."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import grpo_train
from tests.conftest import ROOT
from utils.core.artifacts import is_complete_checkpoint
from utils.core.cli import run
from utils.core.config import ConfigError, UserError, load_config
from utils.training.grpo.callbacks import (
    EMA_FILE,
    KLWindow,
    WeightEMA,
    hacking_signature,
    heldout_ratio_interval,
    heldout_summary,
    paired_change,
    samples_markdown,
)
from utils.training.grpo.config import GRPOTrainConfig
from utils.training.grpo.run import _prepare_run_dir

TINY_REWARDS = {"format": 0.5, "length": 1.0, "rouge": 1.0, "yesno": 1.0}


# ============================================================================= helpers
def make_sft_adapter(base: Path, out: Path, answer_format: str = "plain") -> Path:
    """A LoRA adapter on the tiny Llama saved the way sft_train.py saves one (non-zero, so it changes the model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.core.artifacts import mark_complete

    if (out / ".complete").is_file():
        return out
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / "train_config.yaml").write_text(f"answer_format: {answer_format}\n")
    mark_complete(out)
    return out


def tiny_config(tmp_path: Path, tiny: Path, processed: Path, **over) -> Path:
    """A GRPO recipe for the tiny Llama and the fixture data; the run's folders under tmp_path."""
    cfg = {"base_model": str(tiny), "policy": "base", "data_dir": str(processed), "rewards": TINY_REWARDS,
           "num_generations": 2, "batch_size": 4, "per_device_batch_size": 4, "max_completion_length": 6,
           "max_steps": 2, "learning_rate": 1e-3, "heldout_prompts": 3, "eval_steps": 1, "eval_batch_size": 4,
           "sample_steps": 1, "logging_steps": 1, "save_steps": 1, "report_to": ["tensorboard"],
           "run_dir": str(tmp_path / "run"), "output_dir": str(tmp_path / "out"), "lora_r": 4, "lora_alpha": 8}
    cfg.update(over)
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def script_env(tmp_path: Path) -> dict:
    return {**os.environ, "ECG_MODELS_DIR": str(tmp_path / "models"), "PYTHONPATH": str(ROOT),
            "ECG_LOG_LEVEL": "INFO", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """grpo_train.py in this process (imports once, unlike a subprocess): exit code and its error line(s)."""
    code = run(grpo_train.main, GRPOTrainConfig, grpo_train.__doc__, argv)
    return code, "\n".join(x for x in capsys.readouterr().err.splitlines() if x.startswith("error:"))


def metrics_of(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "metrics.json").read_text())


# ============================================================================= config errors
@pytest.mark.parametrize("over,expected", [
    ({"batch_size": 30, "per_device_batch_size": 5, "num_generations": 8},
     "batch_size 30 is not a multiple of num_generations 8"),
    ({"num_generations": 1}, "key 'num_generations' = 1: expected an integer >= 2"),
    ({"loss_type": "ppo"}, "key 'loss_type' = 'ppo': expected one of grpo, dr_grpo, dapo, bnpo"),
    ({"scale_rewards": "std"}, "key 'scale_rewards' = 'std': expected one of group, batch, none"),
    ({"reward_aggregation": "mean"}, "expected one of sum_then_normalize, normalize_then_sum"),
    ({"rewards": {"acuracy": 1.0}}, "key 'rewards'"),
    ({"rewards": {"format": 0.0}}, "key 'rewards'"),
    ({"epsilon": 0.2, "epsilon_high": 0.1}, "epsilon_high 0.1 is below epsilon 0.2"),
    ({"trainer_extra": {"num_generatons": 4}}, "did you mean 'num_generations'"),
    ({"use_vllm": "maybe"}, "key 'use_vllm' = 'maybe'"),
    ({"max_completion_length": 0}, "key 'max_completion_length' = 0: expected an integer > 0"),
    ({"rewards": {"reward_model": 1.0}}, "reward_model is not set"),
    ({"loss_type": "luspo"}, "expected importance_sampling_level: sequence"),
    ({"importance_sampling_level": "group"}, "expected one of token, sequence"),
    ({"vllm_sleep_mode": True}, "vllm_sleep_mode: true with use_vllm False"),
    ({"attn_implementation": "flash"}, "expected one of auto, sdpa, eager, flash_attention_2"),
    ({"push_to_hub": True}, "hub_model_id '': expected the Hub repo as owner/name"),
    ({"trainer_extra": {"push_to_hub": True}}, "'push_to_hub' has a config key of its own here"),
    ({"trainer_extra": {"use_liger_kernel": True}}, "expected liger_kernel instead"),
    ({"length_neutral": 1.5}, "key 'length_neutral' = 1.5: expected a number in [0, 1]"),
    ({"weight_ema": 1.0}, "key 'weight_ema' = 1.0: expected a number in [0, 1)"),
    ({"beta": 0.0, "beta_steps": 20}, "beta_steps 20 with beta 0"),
])
def test_config_errors_name_the_file_and_key(tmp_path, over, expected):
    path = tmp_path / "bad.yaml"
    base = yaml.safe_load((ROOT / "configs/cpu/grpo.yaml").read_text())
    path.write_text(yaml.safe_dump({**base, **over}))
    with pytest.raises(ConfigError) as e:
        load_config(GRPOTrainConfig, path)
    msg = str(e.value)
    assert str(path) in msg and expected in msg and "\n" not in msg


def test_shipped_recipes_agree_with_the_data(tmp_path):
    """Both recipes take whole groups per step, and the CPU cap covers 90% of the reference answers
    (the data card's p90, when the card has token lengths)."""
    cpu = load_config(GRPOTrainConfig, ROOT / "configs/cpu/grpo.yaml")
    gpu = load_config(GRPOTrainConfig, ROOT / "configs/llama-3.2-3b/grpo.yaml")
    for c in (cpu, gpu):
        assert c.batch_size % c.num_generations == 0 and c.batch_size % c.per_device_batch_size == 0
    assert cpu.precision == "auto" and cpu.use_vllm is False and cpu.fast_generation
    assert gpu.precision == "bf16" and gpu.gradient_checkpointing and gpu.use_vllm == "auto"
    card = ROOT / "data/processed/data_card.json"
    if card.is_file():
        answer = json.loads(card.read_text()).get("token_lengths", {}).get("answer", {})
        if "p90" in answer:
            assert cpu.max_completion_length >= answer["p90"]


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"ddp.yaml": ("MULTI_GPU", None), "zero2.yaml": ("DEEPSPEED", 2), "zero3.yaml": ("DEEPSPEED", 3)}
    for name, (kind, stage) in expected.items():
        path = ROOT / "configs/accelerate" / name
        first = path.read_text().splitlines()[0]
        assert first.startswith("# accelerate launch --config_file configs/accelerate/" + name)
        assert "grpo_train.py --config configs/" in first
        cfg = load_config_from_file(str(path))
        assert str(cfg.distributed_type).endswith(kind)
        if stage:
            assert cfg.deepspeed_config["zero_stage"] == stage


def test_vllm_and_deepspeed_without_the_package_fail_clearly(tmp_path, processed, capsys, monkeypatch):
    pytest.importorskip("trl")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        code, err = run_cli(["--config", str(ROOT / "configs/cpu/grpo.yaml"), "--data-dir", str(processed),
                             "--use-vllm", "true"], capsys)
        assert code == 2 and "use_vllm: true needs vLLM" in err and "pip install vllm" in err
    if importlib.util.find_spec("deepspeed") is None:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        code, err = run_cli(["--config", str(ROOT / "configs/cpu/grpo.yaml"), "--data-dir", str(processed)], capsys)
        assert code == 2 and "deepspeed is not installed" in err and "configs/accelerate/ddp.yaml" in err


def test_weight_ema_under_zero3_fails_clearly(tmp_path, processed, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    code, err = run_cli(["--config", str(ROOT / "configs/cpu/grpo.yaml"), "--data-dir", str(processed),
                         "--weight-ema", "0.9"], capsys)
    assert code == 2 and "weight_ema 0.9" in err and "ZeRO-3" in err


def test_missing_sft_policy_names_the_script(tmp_path, processed, capsys, monkeypatch):
    monkeypatch.setenv("ECG_MODELS_DIR", str(tmp_path / "models"))
    code, err = run_cli(["--config", str(ROOT / "configs/cpu/grpo.yaml"), "--data-dir", str(processed),
                         "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "no finished sft model" in err and "sft_train.py" in err


@pytest.mark.slow
def test_bad_prompt_rows_and_format_mismatch(tmp_path, processed, tiny_llama, capsys, monkeypatch):
    monkeypatch.setenv("ECG_MODELS_DIR", str(tmp_path / "models"))
    bad = tmp_path / "bad"
    (bad / "grpo").mkdir(parents=True)
    (bad / "grpo/train.jsonl").write_text(json.dumps({"id": "x", "reference": "Yes."}) + "\n")
    code, err = run_cli(["--config", str(tiny_config(tmp_path, tiny_llama, bad))], capsys)
    assert code == 2 and "grpo/train.jsonl: line 1: no valid 'prompt' list; expected 'prompt': [{role, content}" in err

    make_sft_adapter(tiny_llama, tmp_path / "models/sft", answer_format="reasoning")
    code, err = run_cli(["--config", str(tiny_config(tmp_path, tiny_llama, processed, policy="sft"))], capsys)
    assert code == 2 and "trained with answer_format reasoning" in err and "set answer_format: reasoning" in err


# ============================================================================= faster generation
@pytest.mark.slow
def test_grouped_generation_matches_plain_generate(tiny_llama):
    """One prefill per distinct prompt, then its cache copied to the group, gives what generate() gives."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from utils.training.grpo.trainer import _trim_after_eos, generate_grouped

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    torch.manual_seed(1)
    distinct = [torch.randint(10, 5000, (n,)).tolist() for n in (7, 4, 11)]
    prompts = [distinct[i] for i in (0, 0, 1, 2, 1, 0, 2, 2)]  # groups interleaved, as with several processes
    gen = GenerationConfig(do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=[1])
    with torch.no_grad():
        grouped = generate_grouped(model, prompts, gen, pad_token_id=0)
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, width:]
    assert grouped.tolist() == plain.tolist()
    assert _trim_after_eos(torch.tensor([[5, 1, 7], [5, 6, 7]]), [1]) == [[5, 1], [5, 6, 7]]
    # the CPU decoder (a finished row leaves the batch) gives the same completions, cut after the end token
    from utils.models.decode import decode

    ids, stats = decode(model, prompts, max_new_tokens=6, stop_ids=[1], pad_id=0, max_rows=len(prompts))
    assert ids == _trim_after_eos(plain, [1]) and stats.prefills == 1  # 3 distinct prompts in one prefill


@pytest.mark.slow
@pytest.mark.parametrize("attn, checkpointing", [("sdpa", False), ("eager", False), ("eager", True)])
def test_packed_groups_give_the_unpacked_logps_and_gradients(tiny_llama, attn, checkpointing):
    """Each prompt once per group, completions packed behind it, attention block by block: same log-probs,
    entropies and LoRA gradients as one row per completion, with left-padded prompts, completions of different
    lengths, an empty one; the model's attention implementation is its own again after. With gradient
    checkpointing (layers recomputed in backward) the model's own attention runs, with the full block mask."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from utils.training.grpo import packing
    from utils.training.grpo.packing import packed_group_logps

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
        model.train()  # transformers checkpoints only in training mode (LoRA dropout is 0)
    p_len, c_len, temp = 9, 6, 0.7
    prompts = [torch.randint(10, 5000, (n,)) for n in (7, 4, 9)]
    groups = [0, 0, 0, 1, 1, 2, 2, 1]
    ids = torch.zeros(len(groups), p_len + c_len, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, g in enumerate(groups):
        ids[i, p_len - len(prompts[g]):p_len], mask[i, p_len - len(prompts[g]):p_len] = prompts[g], 1
        n = 0 if i == 4 else [6, 2, 5, 3][i % 4]  # row 4: a completion masked out entirely
        ids[i, p_len:p_len + n], mask[i, p_len:p_len + n] = torch.randint(10, 5000, (n,)), 1
    logits = model(input_ids=ids, attention_mask=mask).logits[:, p_len - 1:-1].float() / temp
    ref = torch.log_softmax(logits, -1).gather(-1, ids[:, p_len:, None]).squeeze(-1)
    ref_ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    calls, real_attention = [], packing.block_attention
    packing.block_attention = lambda *a, **k: calls.append(1) or real_attention(*a, **k)  # registered per pass
    try:
        lp, ent = packed_group_logps(model, ids, mask, c_len, temp, compute_entropy=True)
    finally:
        packing.block_attention = real_attention
    assert len(calls) == (0 if checkpointing else model.config.num_hidden_layers)
    assert model.config._attn_implementation == attn
    real = mask[:, p_len:].bool()
    assert torch.allclose(lp[real], ref[real], atol=1e-4) and torch.allclose(ent[real], ref_ent[real], atol=1e-3)
    assert (lp[~real] == 0).all()
    weights = torch.randn_like(ref) * real
    params = [p for p in model.parameters() if p.requires_grad]
    g_ref = torch.autograd.grad((ref * weights).sum(), params)
    g_packed = torch.autograd.grad((lp * weights).sum(), params)
    for a, b in zip(g_ref, g_packed):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    # under bf16 autocast (precision: bf16 on a CPU): fp32 results near the fp32 ones
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp16, ent16 = packed_group_logps(model, ids, mask, c_len, temp, compute_entropy=True)
    assert lp16.dtype == ent16.dtype == torch.float32
    assert torch.allclose(lp16[real], ref[real], atol=0.1) and torch.allclose(ent16[real], ref_ent[real], atol=0.1)
    # every completion empty: zero log-probs that still reach the weights, so that backward runs
    mask[:, p_len:] = 0
    lp, _ = packed_group_logps(model, ids, mask, c_len, temp)
    assert (lp == 0).all() and lp.requires_grad
    assert all((g == 0).all() for g in torch.autograd.grad(lp.sum(), params))


def test_tied_groups_leave_the_loss():
    """skip_tied_groups: a group whose trained rewards all tie (NaN = unscored, a weight-0 reward only logged)
    is masked out of this process's loss, and the token count the loss averages over shrinks with it."""
    from collections import defaultdict
    from types import SimpleNamespace

    import torch

    from utils.training.grpo.trainer import drop_tied_groups, tied_groups

    nan = float("nan")
    # 3 groups of 2 completions, rewards (trained, trained, logged only)
    rewards = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.5, 9.0],    # tied on what trains: out
                            [1.0, 0.5, 0.0], [0.0, 0.5, 0.0],    # differs: stays
                            [nan, 0.2, 0.0], [1.0, 0.2, 0.0]])   # first reward unscored once: ties on the rest
    weights = torch.tensor([1.0, 2.0, 0.0])
    assert tied_groups(rewards, weights, 2).tolist() == [True, True, False, False, True, True]
    # this process holds completions 2..3 of each "process" slice of 2; process 0 holds the tied group
    acc = SimpleNamespace(process_index=0, gather=lambda t: t.reshape(1))
    trainer = SimpleNamespace(reward_weights=weights, num_generations=2, accelerator=acc,
                              _metrics={"train": defaultdict(list)})
    out = {"completion_mask": torch.ones(2, 3, dtype=torch.long), "num_items_in_batch": torch.tensor(6)}
    out = drop_tied_groups(trainer, out, rewards)
    assert out["completion_mask"].sum() == 0 and out["num_items_in_batch"] == 0
    acc.process_index = 1
    out = drop_tied_groups(trainer, {"completion_mask": torch.ones(2, 3, dtype=torch.long)}, rewards)
    assert out["completion_mask"].sum() == 6 and out["num_items_in_batch"] == 6
    assert trainer._metrics["train"]["skipped_tied_groups"] == [pytest.approx(2 / 3)] * 2


def test_length_neutral_advantages_leave_nothing_for_length_alone():
    """length_neutral: within each group, the advantages keep their mean and lose (all, or the given share of)
    their linear dependence on completion length; the two-process slice gets its own completions back, and
    the correlation is logged before and after."""
    from collections import defaultdict
    from types import SimpleNamespace

    import torch

    from utils.training.grpo.trainer import length_correlation, neutral_length_advantages, neutralise_length

    torch.manual_seed(0)
    lengths = torch.tensor([5., 9., 14., 30., 3., 40., 41., 7., 12., 12., 12., 12.])
    adv = 0.05 * lengths + torch.randn(12)  # longer pays, as BLEU-1's brevity penalty makes it
    adv = adv - adv.view(3, 4).mean(1).repeat_interleave(4)  # group-centred, as TRL's are

    def cov(a):  # per group: covariance of advantage and length
        a, lc = a.view(3, 4), lengths.view(3, 4) - lengths.view(3, 4).mean(1, keepdim=True)
        return (a * lc).sum(1)

    full = neutral_length_advantages(adv, lengths, 4)
    assert torch.allclose(cov(full), torch.zeros(3), atol=1e-4)
    assert torch.allclose(full.view(3, 4).mean(1), adv.view(3, 4).mean(1), atol=1e-6)
    assert torch.equal(full[8:], adv[8:])  # all as long: nothing to take out
    half = neutral_length_advantages(adv, lengths, 4, strength=0.5)
    assert torch.allclose(cov(half), cov(adv) / 2, atol=1e-4)
    assert length_correlation(adv, lengths, 4) > 0.3 and abs(length_correlation(full, lengths, 4)) < 1e-5
    assert length_correlation(torch.zeros(4), torch.arange(4.0), 4) == 0.0  # tied: nothing depends on length
    assert length_correlation(torch.arange(4.0), torch.ones(4), 4) is None  # equally long: nothing to say

    # two processes of 6 completions each: the second group (4..7) spans them; each gets its slice of the whole
    process0 = [adv[:6], lengths[:6]]  # what the other process contributes to each gather, in turn
    acc = SimpleNamespace(process_index=1, gather=lambda t: torch.cat([process0.pop(0), t]))
    trainer = SimpleNamespace(accelerator=acc, num_generations=4, length_neutral=1.0,
                              _metrics={"train": defaultdict(list)})
    mask = (torch.arange(41).expand(12, -1) < lengths.unsqueeze(1)).long()
    out = neutralise_length(trainer, {"advantages": adv[6:].clone(), "completion_mask": mask[6:]})
    assert torch.allclose(out["advantages"], full[6:], atol=1e-6)
    log = trainer._metrics["train"]
    assert log["advantage_length_corr"][0] > 0.3 and abs(log["advantage_length_corr_after"][0]) < 1e-5


@pytest.mark.parametrize("dora", [False, True])
def test_merged_adapter_round_trip(tiny_llama, dora):
    """Sampling with the merged adapter computes the adapter's function, with the weights PEFT's merge gives
    (our fused merge for vanilla LoRA, PEFT's own for DoRA), and leaving the block restores the weights:
    vanilla LoRA's to the bit, over many rounds with an adapter that changes between them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from utils.training.grpo.trainer import _plain_lora, merged_adapter

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    lora = [m for m in model.modules() if hasattr(m, "merged") and hasattr(m, "lora_A")]
    assert (_plain_lora(lora) is None) == dora  # which merge runs
    x = torch.randint(10, 5000, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=x).logits
        with merged_adapter(model):
            assert all(m.merged for m in lora)
            merged = model(input_ids=x).logits
            ours = {n: p.detach().clone() for n, p in model.named_parameters() if n in before}
        after = model(input_ids=x).logits
        assert not any(m.merged for m in lora)
        model.merge_adapter()
        # to rounding (a fused multiply-add may round once where PEFT rounds twice; DoRA is PEFT's own merge)
        assert all(torch.allclose(p, ours[n], rtol=1e-6, atol=1e-7)
                   for n, p in model.named_parameters() if n in before)
        model.unmerge_adapter()
        with merged_adapter(model):
            model.unmerge_adapter()  # un-merged inside the block: leaving it must not subtract the update again
        start = {n: p.detach().clone() for n, p in model.named_parameters() if n in before}
        for _ in range(20):  # GRPO's rounds: sample merged, then a training step moves the adapter
            with merged_adapter(model):
                pass
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data.add_(torch.randn_like(p), alpha=0.01)
    assert torch.allclose(ref, merged, atol=1e-4) and torch.allclose(ref, after, atol=1e-5)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.allclose(p, before[n], atol=1e-6), n  # PEFT's own merge and unmerge ran above
            # PEFT's unmerge (DoRA) subtracts the update again, back to rounding only; ours restores the bits
            assert dora or torch.equal(p, start[n]), n


# ============================================================================= held-out bookkeeping
def test_heldout_summary_and_paired_change():
    hist = [{"step": 0, "heldout/total": 0.40}, {"loss": 1.0, "step": 1}, {"step": 10, "heldout/total": 0.45},
            {"step": 20, "heldout/total": 0.47}, {"step": 30, "heldout/total": 0.52}]
    s = heldout_summary(hist)
    assert s["heldout_first"]["step"] == 0 and s["heldout_last"]["step"] == 30 and len(s["heldout"]) == 4
    diffs = [0.05, 0.02, 0.05]
    mean = sum(diffs) / 3
    assert s["heldout_step_noise"] == pytest.approx((sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5)
    first = [{"total": 0.1}, {"total": 0.5}, {"total": None}, {"total": 0.3}]
    last = [{"total": 0.3}, {"total": 0.6}, {"total": 0.9}, {"total": 0.3}]
    c = paired_change(first, last)
    assert c["n"] == 3 and c["mean"] == pytest.approx(0.1) and c["stderr"] == pytest.approx(0.1 / 3 ** 0.5)


def test_hacking_signature_needs_the_learned_reward_up_and_the_rule_mix_down():
    import random

    from utils.training.grpo.run import _hacking_line

    rng = random.Random(0)
    n = 60
    first = [{"reward_model": 0.5 + rng.gauss(0, 0.05), "rouge": 0.4 + rng.gauss(0, 0.05),
              "terms": 0.2 + rng.gauss(0, 0.05), "format": 1.0} for _ in range(n)]

    def moved(rm: float, rouge: float, terms: float, fmt: float | None = 1.0) -> list[dict]:
        def jitter() -> float:
            return rng.gauss(0, 0.01)

        return [{"reward_model": f["reward_model"] + rm + jitter(), "rouge": f["rouge"] + rouge + jitter(),
                 "terms": f["terms"] + terms + jitter(), "format": fmt} for f in first]

    weights = {"rouge": 1.5, "terms": 1.0, "format": 0.5, "reward_model": 1.0}
    # the reward model pleased, the rules paying for it: the signature, with the rules that fell named
    h = hacking_signature(first, moved(0.1, -0.05, -0.05), weights)
    assert h["signature"] and h["learned_rising"] == ["reward_model"] and h["rules_falling"] == ["rouge", "terms"]
    assert h["rules"]["mean"] == pytest.approx((1.5 * -0.05 + -0.05) / 3, abs=0.005)
    assert h["learned"]["reward_model"]["mean"] == pytest.approx(0.1, abs=0.005)
    assert "**the hacking signature**" in _hacking_line(h) and "rouge, terms" in _hacking_line(h)
    # everything up together: no signature
    h = hacking_signature(first, moved(0.1, 0.05, 0.05), weights)
    assert not h["signature"] and h["rules_falling"] == [] and "no hacking signature" in _hacking_line(h)
    # one rule falls while the mix rises: named, but the mix decides
    h = hacking_signature(first, moved(0.1, 0.05, -0.03), weights)
    assert not h["signature"] and h["rules_falling"] == ["terms"]
    # the rules fall but the reward model does not rise: not the signature either
    assert not hacking_signature(first, moved(0.0, -0.05, -0.05), weights)["signature"]
    # a rule logged at weight 0 is not part of the mix; a mix without a learned reward has nothing to check
    assert "format" not in hacking_signature(first, moved(0.1, 0.0, 0.0, fmt=0.0), {**weights, "format": 0.0})[
        "rules_falling"]
    assert hacking_signature(first, moved(0.1, -0.05, -0.05), {"rouge": 1.0}) == {}
    assert hacking_signature(first[:1], moved(0.1, -0.05, -0.05)[:1], weights) == {}  # no standard error


def _evals(steps_totals: list[tuple[int, list[float | None]]]) -> list[dict]:
    return [{"step": step, "items": [{"id": f"p{i}", "scores": {"total": t}} for i, t in enumerate(totals)]}
            for step, totals in steps_totals]


def test_heldout_ratio_interval_says_how_much_the_verdict_owes_to_the_prompts():
    import random

    rng = random.Random(1)
    base = [rng.random() for _ in range(40)]
    # every prompt climbs by the same steps: any resample of them reads the same curve, the interval is a point
    alike = _evals([(s, [b + d for b in base]) for s, d in ((0, 0.0), (20, 0.010), (40, 0.022), (60, 0.029))])
    r = heldout_ratio_interval(alike)
    diffs = [0.010, 0.012, 0.007]
    assert r["value"] == pytest.approx(0.029 / statistics.stdev(diffs))
    assert r["lo"] == pytest.approx(r["value"]) and r["hi"] == pytest.approx(r["value"])
    assert (r["prompts"], r["resamples"], r["confidence"]) == (40, 1000, 0.9)
    # the same mean curve carried by prompts that move every which way: the verdict depends on the prompts
    moves = [[rng.gauss(0, 0.05) for _ in base] for _ in range(3)]
    spread = _evals([(0, base)] + [(s, [b + d + m for b, m in zip(base, moves[k])])
                                   for k, (s, d) in enumerate(((20, 0.010), (40, 0.022), (60, 0.029)))])
    w = heldout_ratio_interval(spread)
    assert w["lo"] < w["median"] < w["hi"] and w["hi"] - w["lo"] > 1.0
    assert heldout_ratio_interval(spread, seed=0) == w  # seeded: the same interval on every run

    # a step evaluated again after a resume counts once (the later), a prompt without a total in some
    # evaluation is left out, and fewer than three evaluations have no step noise
    again = _evals([(0, [0.5, 0.6, 0.2]), (20, [0.0, 0.0, 0.9]), (20, [0.52, 0.61, None]), (40, [0.55, 0.66, 0.3]),
                    (60, [0.56, 0.66, 0.3])])
    r = heldout_ratio_interval(again)
    curve = [0.55, 0.565, 0.605, 0.61]
    assert r["prompts"] == 2
    assert r["value"] == pytest.approx(0.06 / statistics.stdev(b - a for a, b in zip(curve, curve[1:])))
    assert heldout_ratio_interval(again[:2]) == {} and heldout_ratio_interval([]) == {}
    assert heldout_ratio_interval(_evals([(s, [0.5, 0.6]) for s in (0, 20, 40)])) == {}  # no step noise


def test_kl_window_lifts_the_penalty_after_its_steps():
    """KLWindow(2): steps 1 and 2 keep beta, step 3 on runs without; a run resumed past the window starts
    without it."""
    from types import SimpleNamespace

    window = KLWindow(2)
    window.trainer = SimpleNamespace(beta=0.04)
    seen = []
    for finished in range(4):  # on_step_begin sees the steps finished so far
        window.on_step_begin(None, SimpleNamespace(global_step=finished), None)
        seen.append(window.trainer.beta)
    assert seen == [0.04, 0.04, 0.0, 0.0]
    resumed = KLWindow(2)
    resumed.trainer = SimpleNamespace(beta=0.04)
    resumed.on_step_begin(None, SimpleNamespace(global_step=8), None)
    assert resumed.trainer.beta == 0.0


def test_weight_ema_averages_lends_and_resumes(tmp_path):
    """The average starts at the starting weights, moves by (1 - decay) of the gap each step, leaves frozen
    weights alone; applied() lends it and restores the live weights; a checkpoint carries it to a resumed run,
    and a checkpoint of another model's weights is refused."""
    import torch

    class Trainer:  # what WeightEMA reads of a transformers Trainer
        def __init__(self, model):
            self.model = model
            self.accelerator = type("Acc", (), {"is_main_process": True})()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    frozen = model[1].weight.detach().clone()
    start = model[0].weight.detach().clone()
    ema = WeightEMA(0.75)
    ema.trainer = Trainer(model)
    ema.on_train_begin(None, None, None)
    assert set(ema.avg) == {"0.weight", "0.bias"}
    with torch.no_grad():
        model[0].weight.add_(4.0)
    ema.on_step_end(None, None, type("Control", (), {"should_save": False})())
    assert torch.allclose(ema.avg["0.weight"], start + 1.0)
    live = model[0].weight.detach().clone()
    with ema.applied():
        assert torch.allclose(model[0].weight, start + 1.0) and torch.equal(model[1].weight, frozen)
    assert torch.equal(model[0].weight, live)

    args = type("Args", (), {"output_dir": str(tmp_path)})()
    ema.on_step_end(args, type("State", (), {"global_step": 1})(), type("Control", (), {"should_save": True})())
    assert torch.allclose(ema.avg["0.weight"], start + 1.75)  # a second step: a quarter of the gap to start + 4
    resumed = WeightEMA(0.75, str(tmp_path / "checkpoint-1"))
    resumed.trainer = Trainer(model)
    resumed.on_train_begin(None, None, None)
    assert torch.allclose(resumed.avg["0.weight"], start + 1.75)
    resumed.apply()
    assert torch.allclose(model[0].weight, start + 1.75)

    other = torch.nn.Sequential(torch.nn.Linear(3, 2))
    wrong = WeightEMA(0.75, str(tmp_path / "checkpoint-1"))
    wrong.trainer = Trainer(torch.nn.ModuleDict({"x": other}))
    with pytest.raises(UserError, match=f"checkpoint-1/{EMA_FILE}: its averaged weights are not this model's"):
        wrong.on_train_begin(None, None, None)


def test_samples_markdown_groups_by_question():
    items = [{"question": "Is it AF?", "completion": "Yes | it is.", "rewards": {"yesno": 1.0, "rouge": None},
              "advantage": 0.7},
             {"question": "Is it AF?", "completion": "No.", "rewards": {"yesno": 0.0, "rouge": None}, "advantage": -0.7},
             {"question": "What is QT?", "completion": "An interval.", "rewards": {"yesno": None, "rouge": 0.25},
              "advantage": None}]
    md = samples_markdown(items, ["yesno", "rouge"])
    assert md.count("**Q:**") == 2 and "Yes \\| it is." in md
    assert "| No. | 0.00 | - | -0.70 |" in md and "| An interval. | - | 0.25 | - |" in md


def test_resumed_run_drops_logs_after_its_checkpoint(tmp_path):
    from utils.training.grpo.callbacks import HELDOUT_LOG, SAMPLES_LOG
    from utils.training.grpo.config import GRPOTrainConfig

    cfg = GRPOTrainConfig(run_dir=str(tmp_path))
    for name in (HELDOUT_LOG, SAMPLES_LOG):
        (tmp_path / name).write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 2, 4, 6)))
    _prepare_run_dir(cfg, str(tmp_path / "checkpoint-4"))
    assert [json.loads(x)["step"] for x in (tmp_path / HELDOUT_LOG).read_text().splitlines()] == [0, 2, 4]
    _prepare_run_dir(cfg, None)
    assert (tmp_path / SAMPLES_LOG).read_text() == ""


# ============================================================================= real runs on the tiny Llama
def tensorboard_tags(run_dir: Path) -> tuple[set, set]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, texts = set(), set()
    for events in run_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        scalars |= set(acc.Tags().get("scalars", []))
        scalars |= {t for t in acc.Tags().get("tensors", [])}
        texts |= {t for t in acc.Tags().get("tensors", []) if "samples" in t}
    return scalars, texts


@pytest.mark.slow
def test_tiny_grpo_run_through_the_command_line(tmp_path, processed, tiny_llama):
    """From an SFT adapter: trains it further, logs what the issue asks, saves a loadable adapter on the base."""
    from safetensors.torch import load_file

    from utils.models.loading import load_model
    from utils.models.resolve import adapter_base, is_complete

    sft = make_sft_adapter(tiny_llama, tmp_path / "models/sft")
    # The tiny model writes random tokens, which the rule rewards mostly score alike: a group that ties trains
    # nothing (and skip_tied_groups drops it), so whether 2 steps move the adapter would be down to the draws.
    # length_match (the answer's word count against the reference's) tells random answers apart.
    rewards = {**TINY_REWARDS, "length_match": 1.0}
    cfg = tiny_config(tmp_path, tiny_llama, processed, policy="sft", max_steps=2, skip_tied_groups=True,
                      rewards=rewards)
    r = subprocess.run([sys.executable, "grpo_train.py", "--config", str(cfg)], cwd=ROOT, env=script_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    assert min(h["skipped_tied_groups"] for h in metrics_of(tmp_path)["train_curve"]) < 1.0
    assert is_complete(out) and (out / ".complete").is_file()
    for name in ("train_config.yaml", "metrics.json", "README.md", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert adapter_base(str(out)) == str(tiny_llama)  # still an adapter on the base, like SFT's
    assert not (out / "ref").exists()
    trained, start = load_file(out / "adapter_model.safetensors"), load_file(sft / "adapter_model.safetensors")
    assert trained.keys() == start.keys()
    assert any(not (trained[k] == start[k]).all() for k in trained)
    load_model(str(out))

    m = metrics_of(tmp_path)
    assert m["global_step"] == 2 and m["resumed_from"] is None and m["num_processes"] == 1
    assert [h["step"] for h in m["heldout"]] == [0, 1, 2]
    assert {"heldout/total", "heldout/format", "heldout/length"} <= set(m["heldout_last"])
    assert set(m["heldout_change"]) == {"total", *rewards}
    assert all(f"rewards/{k}/mean" in m["train_curve"][0] for k in ("format", "length", "rouge"))
    card = (out / "README.md").read_text()
    assert "held-out reward at step 0" in r.stderr and "Held-out reward" in card
    # the Hub's front matter: push_to_hub uploads this card as it is
    assert card.startswith("---\n") and "library_name: peft" in card and "pipeline_tag: text-generation" in card

    run_dir = tmp_path / "run"
    heldout = [json.loads(x) for x in (run_dir / "heldout.jsonl").read_text().splitlines()]
    assert [h["step"] for h in heldout] == [0, 1, 2]
    # 3 evaluations: the ratio and its interval over the held-out prompts go to metrics.json. The tiny policy's
    # greedy answers mostly score alike at every step (no step noise): then the interval is left empty.
    iv = m["heldout_ratio"]
    if m["heldout_step_noise"]:
        assert iv["prompts"] == len(heldout[0]["items"]) and iv["lo"] <= iv["median"] <= iv["hi"]
        assert iv["value"] == pytest.approx((m["heldout_change"]["total"]["mean"]) / m["heldout_step_noise"])
    else:
        assert iv == {} and "Gain over step noise" not in card
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2] and len(samples[0]["items"]) == 2 * 2
    assert set(samples[0]["items"][0]["rewards"]) == set(rewards)
    scalars, texts = tensorboard_tags(run_dir)
    for tag in ("train/reward", "train/reward_std", "train/rewards/length/mean", "train/rewards/length/std",
                "train/frac_reward_zero_std", "train/completions/mean_length", "train/completions/clipped_ratio",
                "heldout/total", "heldout/rouge", "train/skipped_tied_groups"):
        assert tag in scalars, (tag, sorted(scalars))
    assert texts, "no sample completions in TensorBoard"


@pytest.mark.slow
def test_weight_ema_is_what_the_heldout_reward_reads_and_the_run_saves(tmp_path, processed, tiny_llama, capsys,
                                                                      monkeypatch):
    """weight_ema in the recipe: the saved adapter is the average kept in the last checkpoint, not the live
    weights the checkpoint holds; the held-out answers of each step come from the average; the card says so."""
    from safetensors.torch import load_file

    from utils.training.grpo import callbacks

    monkeypatch.setenv("ECG_MODELS_DIR", str(tmp_path / "models"))
    lent, real = [], callbacks.WeightEMA.applied

    def spy(self):
        lent.append(self.trainer.state.global_step)
        return real(self)

    monkeypatch.setattr(callbacks.WeightEMA, "applied", spy)
    rewards = {**TINY_REWARDS, "length_match": 1.0}  # tells the tiny model's random answers apart (see above)
    cfg = tiny_config(tmp_path, tiny_llama, processed, weight_ema=0.5, rewards=rewards, learning_rate=5e-2)
    code, err = run_cli(["--config", str(cfg)], capsys)
    assert code == 0, err
    assert lent == [0, 1, 2]  # every held-out evaluation
    ckpt = tmp_path / "run/checkpoint-2"
    avg = torch_load(ckpt / EMA_FILE)
    saved, live = load_file(tmp_path / "out/adapter_model.safetensors"), load_file(ckpt / "adapter_model.safetensors")
    assert saved.keys() == live.keys() and len(avg) == len(saved)
    # PEFT saves without the adapter's name: base_model.model....lora_A.weight for ....lora_A.default.weight
    for name, tensor in avg.items():
        assert saved[name.replace(".default", "")].equal(tensor.to(saved[name.replace(".default", "")].dtype))
    assert any(not saved[k].equal(live[k]) for k in saved)
    assert "moving average (decay 0.5)" in (tmp_path / "out/README.md").read_text()


@pytest.mark.slow
def test_beta_steps_holds_the_kl_penalty_for_the_first_steps_only(tmp_path, processed, tiny_llama, capsys,
                                                                  monkeypatch):
    """beta_steps: 1 with beta > 0: the first step pays the KL penalty (TRL logs kl), the later ones run
    without the reference pass (no kl logged); the model card says how long it held."""
    monkeypatch.setenv("ECG_MODELS_DIR", str(tmp_path / "models"))
    cfg = tiny_config(tmp_path, tiny_llama, processed, beta=0.1, beta_steps=1, max_steps=3)
    code, err = run_cli(["--config", str(cfg)], capsys)
    assert code == 0, err
    curve = metrics_of(tmp_path)["train_curve"]
    assert [h["step"] for h in curve] == [1, 2, 3]
    assert ["kl" in h for h in curve] == [True, False, False]
    assert "beta 0.1 for the first 1 steps" in (tmp_path / "out/README.md").read_text()


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_same_final_step(tmp_path, processed, tiny_llama):
    """Killed after a checkpoint, the run resumes there; the weights' moving average (weight_ema) goes on from
    the one the checkpoint kept, not from the checkpoint's live weights."""
    cfg = tiny_config(tmp_path, tiny_llama, processed, policy="base", max_steps=5, eval_steps=2, sample_steps=0,
                      weight_ema=0.5)
    cmd = [sys.executable, "grpo_train.py", "--config", str(cfg)]
    env = script_env(tmp_path)
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log_file:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
        ckpt = tmp_path / "run/checkpoint-2"
        deadline = time.time() + 300
        while not is_complete_checkpoint(ckpt) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        if not is_complete_checkpoint(ckpt):
            proc.kill()
            pytest.fail(f"no checkpoint-2 in time: {log_path.read_text()[-3000:]}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "out").exists(), "the run finished before it could be killed"

    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    assert EMA_FILE not in r.stderr  # the warning that the average starts again
    m = metrics_of(tmp_path)
    assert m["global_step"] == 5 and m["max_steps"] == 5
    assert int(Path(m["resumed_from"]).name.split("-")[1]) >= 2
    # the held-out curve runs from before the kill (restored with the checkpoint) to the end, each step once
    assert [h["step"] for h in m["heldout"]] == [0, 2, 4, 5]
    steps = [json.loads(x)["step"] for x in (tmp_path / "run/heldout.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 5]


@pytest.mark.slow
def test_two_process_cpu_run_with_gloo(tmp_path, processed, tiny_llama):
    """torchrun starts two ranks; the step's completions, the held-out prompts and the reward groups are
    shared out between them, and one model is saved."""
    cfg = tiny_config(tmp_path, tiny_llama, processed, batch_size=8, per_device_batch_size=2, max_steps=2,
                      eval_steps=2, sample_steps=0)
    env = {**script_env(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "grpo_train.py", "--config", str(cfg)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics_of(tmp_path)
    assert m["num_processes"] == 2 and m["global_step"] == 2
    assert [h["step"] for h in m["heldout"]] == [0, 2]
    lines = [json.loads(x) for x in (tmp_path / "run/heldout.jsonl").read_text().splitlines()]
    assert [len(x["items"]) for x in lines] == [3, 3]  # both ranks' shares gathered
    assert len(list((tmp_path / "out").glob("adapter_model.safetensors"))) == 1


@pytest.mark.slow
def test_bench_runs_both_sides(tmp_path, processed, tiny_llama):
    cfg = tiny_config(tmp_path, tiny_llama, processed, heldout_prompts=0)
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "scripts/bench_grpo.py", "--config", str(cfg), "--steps", "1", "--warmup",
                        "0", "--json", str(out), "--set", "decode_dtype=bfloat16"], cwd=ROOT, env=script_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res) == {"plain", "ours", "machine"} and res["machine"]["cores"] >= 1
    assert "machine: " in r.stdout
    assert res["plain"]["completions_per_step"] == 8 and res["ours"]["completions_per_step"] == 4
    for side in (res["plain"], res["ours"]):
        assert side["steps"] == 1 and side["samples_per_s"] > 0 and 0 < side["gen_share"] < 1
        assert side["peak_rss_mb"] > 0 and side["gen_fraction_of_bound"] > 0
        # the completions' own bound counts the tail that on-policy batches cannot refill: never above the
        # bound of every row going on to the end, as many steps as the longest completion needs
        # (equal where FLOPs bind, each computed its own way: to rounding)
        assert side["full_rows_bound_tokens_per_s"] * (1 + 1e-9) >= side["bound_tokens_per_s"] > 0
        assert side["longest_completion_tokens"] >= side["mean_completion_tokens"]
    # each side's bound in the dtype it generates in: ours bf16 products, plain TRL's autocast (or fp32)
    assert res["ours"]["bound_dtype"] == "bfloat16"
    assert res["plain"]["bound_dtype"] == ("bfloat16" if res["plain"]["bf16"] else "float32")
    assert "samples/s (wall)" in r.stdout and "ours / plain" in r.stdout


def test_bench_help():
    r = subprocess.run([sys.executable, "scripts/bench_grpo.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "plain TRL" in r.stdout


# ============================================================================= sampling probe
def test_probe_summary():
    from scripts.probe_sampling import summarize

    fig = summarize([0.5, 0.2], [[0.9, 0.1, 0.4, 0.2], [0.3, 0.1, 0.1, 0.1]])
    assert fig["greedy_mean"] == pytest.approx(0.35) and fig["sample_mean"] == pytest.approx(0.275)
    assert fig["best_of_n_mean"] == pytest.approx(0.6)
    assert fig["share_above_greedy"] == pytest.approx(2 / 8)  # 0.9 (> 0.5) and 0.3 (> 0.2)
    # above their group's mean: 0.9 (mean 0.4) and 0.3 (mean 0.15); both beat their greedy answer
    assert fig["reinforced_above_greedy"] == pytest.approx(1.0)


@pytest.mark.slow
def test_probe_sampling_runs_on_the_tiny_model(tmp_path, processed, tiny_llama):
    cfg = tiny_config(tmp_path, tiny_llama, processed)
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "scripts/probe_sampling.py", "--config", str(cfg), "--prompts", "2",
                        "--temperatures", "1.0,0.5", "--json", str(out)], cwd=ROOT, env=script_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["prompts"] == 2 and set(res["temperatures"]) == {"1.0", "0.5"}
    for fig in res["temperatures"].values():
        assert [len(g) for g in fig["totals"]] == [2, 2]  # num_generations 2 per prompt
        assert fig["best_of_n_mean"] >= fig["sample_mean"] and 0 <= fig["reinforced_above_greedy"] <= 1
    assert "reinforced > greedy" in r.stdout
    bad = subprocess.run([sys.executable, "scripts/probe_sampling.py", "--config", str(cfg), "--temperatures", "0"],
                         cwd=ROOT, env=script_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--temperatures '0': expected positive numbers" in bad.stderr


def test_probe_help():
    r = subprocess.run([sys.executable, "scripts/probe_sampling.py", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "GRPO reinforces" in r.stdout


@pytest.mark.slow
def test_decode_dtype_reaches_rollouts_and_heldout_answers(tmp_path, processed, tiny_llama, capsys, monkeypatch):
    """decode_dtype: bfloat16 in the recipe: every decoder call of the run (the rollouts and the held-out
    answers) multiplies in bf16."""
    import torch

    from utils.models import decode

    monkeypatch.setenv("ECG_MODELS_DIR", str(tmp_path / "models"))
    seen, real = [], decode.decode
    monkeypatch.setattr(decode, "decode", lambda *a, **k: seen.append((k.get("do_sample"), k.get("matmul_dtype")))
                        or real(*a, **k))
    code, err = run_cli(["--config", str(tiny_config(tmp_path, tiny_llama, processed, max_steps=1, eval_steps=1,
                                                     decode_dtype="bfloat16"))], capsys)
    assert code == 0, err
    assert {sample for sample, _ in seen} == {True, False}  # sampled rollouts and greedy held-out answers
    assert all(dtype is torch.bfloat16 for _, dtype in seen)


@pytest.mark.slow
def test_length_neutral_reaches_the_steps_advantages(tmp_path, processed, tiny_llama, capsys, monkeypatch):
    """length_neutral: 1 in the recipe: every training step's advantages pass through it, the correlations it
    logs reach metrics.json's train curve, and the model card says so. The tiny model's answers all run to
    max_completion_length and mostly tie, so each step's first answer of every group is made one token
    shorter and better: then there is a length dependence to take out."""
    import torch

    from utils.training.grpo import trainer as trainer_mod

    monkeypatch.setenv("ECG_MODELS_DIR", str(tmp_path / "models"))
    seen, real = [], trainer_mod.neutralise_length

    def spy(trainer, out):
        out["completion_mask"][0::2, -1] = 0
        out["advantages"] = torch.tensor([1.0, -1.0]).repeat(out["advantages"].numel() // 2)
        before = out["advantages"].clone()
        out = real(trainer, out)
        seen.append((trainer.length_neutral, before, out["advantages"], out["completion_mask"].sum(1)))
        return out

    monkeypatch.setattr(trainer_mod, "neutralise_length", spy)
    code, err = run_cli(["--config", str(tiny_config(tmp_path, tiny_llama, processed, length_neutral=1.0))], capsys)
    assert code == 0, err
    assert len(seen) == 2  # one generation batch a step, none for the held-out answers
    for strength, before, after, lengths in seen:
        assert strength == 1.0
        assert torch.allclose(after, trainer_mod.neutral_length_advantages(before, lengths, 2), atol=1e-6)
    assert "length-neutral advantages 1.0" in (tmp_path / "out/README.md").read_text()
    curve = metrics_of(tmp_path)["train_curve"]
    assert [h["advantage_length_corr"] for h in curve] == [pytest.approx(-1.0)] * 2
    assert [h["advantage_length_corr_after"] for h in curve] == [pytest.approx(0.0, abs=1e-6)] * 2


def test_bench_repeats_alternate_the_sides_and_report_medians(monkeypatch, capsys, tmp_path):
    """--repeats N runs plain, ours, plain, ours, ... and reports each side's median figures beside every
    repeat's wall-clock ratio (stand-in runs: no model is loaded)."""
    from scripts import bench_grpo

    order, speeds = [], {"plain": iter([0.40, 0.30, 0.35]), "ours": iter([1.6, 1.8, 2.0])}

    def fake_run(args, side, rep):
        order.append((side, rep))
        v = next(speeds[side])
        return {"side": side, "samples_per_s": v, "completions_per_step": 16, "per_device_batch": 8,
                "gradient_checkpointing": False, "bf16": False, "model_dtype": "float32", "bound_dtype": "float32",
                "bandwidth_gb_s": 50.0, "matmul_gflop_s": 150.0, "mean_reward": None}

    monkeypatch.setattr(bench_grpo, "run_side", fake_run)
    out = tmp_path / "bench.json"
    bench_grpo.compare(bench_grpo.parse(["--repeats", "3", "--json", str(out)]))
    assert order == [("plain", 0), ("ours", 0), ("plain", 1), ("ours", 1), ("plain", 2), ("ours", 2)]
    printed = capsys.readouterr().out
    assert "per repeat: 4.00x, 6.00x, 5.71x (median 5.71x)" in printed
    res = json.loads(out.read_text())
    assert res["plain"]["samples_per_s"] == 0.35 and res["ours"]["samples_per_s"] == 1.8  # the medians
    assert "| samples/s (wall) | 0.350 | 1.800 | 5.14x |" in printed
    assert [round(r, 2) for r in res["wall_ratios"]] == [4.0, 6.0, 5.71] and len(res["repeats"]["ours"]) == 3
    with pytest.raises(UserError, match="--repeats: 0: expected 1 or more"):
        bench_grpo.compare(bench_grpo.parse(["--repeats", "0"]))
