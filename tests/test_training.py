"""utils/training/ (config.py, run.py): TRL arguments, PEFT/bitsandbytes settings, resume, the atomic final save."""

import json
import logging
from pathlib import Path

import pytest
import yaml

from utils.core.artifacts import DONE_MARKER, checkpoints, read_train_config
from utils.core.config import ConfigError, UserError, dump_yaml, load_config, parse_args
from utils.models.resolve import ModelNotFound, resolve_model
from utils.training.config import gradient_accumulation, lora_config, precision_flags, quantization_config, trl_args
from utils.training.run import RUN_CONFIG, resume_checkpoint, save_final
from utils.training.sft import SFTTrainConfig


def cfg(tmp_path, **over):
    base = {"run_dir": str(tmp_path / "run"), "output_dir": str(tmp_path / "out"), "report_to": []}
    return load_config(SFTTrainConfig, None, {**base, **over})


def test_trl_args_cpu_defaults(tmp_path):
    c = cfg(tmp_path, batch_size=12, per_device_batch_size=4, save_steps=7, save_total_limit=3,
            report_to=["tensorboard"], learning_rate=1e-3, max_steps=9)
    args = trl_args(c, "r", max_length=99)
    assert args.use_cpu and not args.bf16 and not args.fp16  # no CUDA here; auto precision is fp32
    assert args.gradient_accumulation_steps == 3 and args.per_device_train_batch_size == 4
    assert (args.save_steps, args.save_total_limit, args.max_steps) == (7, 3, 9)
    assert args.learning_rate == 1e-3 and args.max_length == 99
    assert args.report_to == ["tensorboard"] and args.output_dir == c.run_dir
    assert not args.gradient_checkpointing


def test_trainer_extra_is_passed_and_wins(tmp_path):
    c = cfg(tmp_path, trainer_extra={"train_sampling_strategy": "group_by_length", "logging_steps": 3})
    args = trl_args(c, "r")
    assert args.train_sampling_strategy == "group_by_length" and args.logging_steps == 3


def test_trainer_extra_unknown_key_refused_at_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer_extra:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*learning_rat.*SFTConfig.*did you mean 'learning_rate'"):
        load_config(SFTTrainConfig, path)


@pytest.mark.parametrize("over, words", [
    ({"lora_r": 0}, "lora_r"), ({"learning_rate": -1e-4}, "learning_rate"),
    ({"zero_stage": 4}, "zero_stage"), ({"learning_rate": 2.0}, "learning_rate"),
    ({"lora_dropout": 1.5}, "lora_dropout"), ({"max_steps": 0}, "max_steps"),
    ({"quantization": "4bit", "adapter": "none"}, "adapter: lora"), ({"resume": ""}, "resume"),
])
def test_out_of_range_values_refused_at_load(tmp_path, over, words):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(over))
    with pytest.raises(ConfigError, match=words) as e:
        load_config(SFTTrainConfig, path)
    assert "bad.yaml" in str(e.value) and "\n" not in str(e.value)


def test_resume_flag_alone_means_auto():
    assert parse_args(SFTTrainConfig, ["--resume", "--resume", "never"]).resume == "never"
    assert parse_args(SFTTrainConfig, ["--resume"]).resume == "auto"
    assert parse_args(SFTTrainConfig, ["--resume", "runs/x/checkpoint-5"]).resume == "runs/x/checkpoint-5"


def test_batch_must_divide_over_processes(tmp_path, monkeypatch):
    c = cfg(tmp_path, batch_size=8, per_device_batch_size=4)
    assert gradient_accumulation(c) == 2
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="3 processes"):
        gradient_accumulation(c)


def test_precision_and_quantization_need_cuda_where_they_do(tmp_path):
    assert precision_flags(cfg(tmp_path)) == (False, False, "float32")
    assert precision_flags(cfg(tmp_path, precision="bf16"))[0]
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        precision_flags(cfg(tmp_path, precision="fp16"))
    with pytest.raises(UserError, match="4bit needs a CUDA GPU"):
        quantization_config(cfg(tmp_path, quantization="4bit"))
    assert quantization_config(cfg(tmp_path)) is None


def test_lora_config_from_fields(tmp_path):
    lc = lora_config(cfg(tmp_path, lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_target_modules=["q_proj", "v_proj"]))
    assert (lc.r, lc.lora_alpha, lc.lora_dropout) == (4, 8, 0.1)
    assert set(lc.target_modules) == {"q_proj", "v_proj"} and lc.task_type == "CAUSAL_LM"
    assert lora_config(cfg(tmp_path, lora_target_modules=["all-linear"])).target_modules == "all-linear"
    assert lora_config(cfg(tmp_path, adapter="none")) is None


def _fake_checkpoint(run: Path, step: int, complete: bool = True, state: str | None = None) -> Path:
    """``state``: trainer_state.json's text as a kill left it (empty, cut short)."""
    p = run / f"checkpoint-{step}"
    p.mkdir(parents=True)
    (p / "adapter_model.safetensors").write_bytes(b"x")
    if state is not None:
        (p / "trainer_state.json").write_text(state)
    elif complete:
        (p / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return p


def test_resume_auto_picks_last_complete_checkpoint(tmp_path):
    c = cfg(tmp_path)
    assert resume_checkpoint(c) is None  # nothing there yet; writes the run config
    run = Path(c.run_dir)
    assert (run / RUN_CONFIG).is_file()
    _fake_checkpoint(run, 2)
    _fake_checkpoint(run, 10)
    _fake_checkpoint(run, 12, complete=False)  # killed while being written
    _fake_checkpoint(run, 14, state="")  # killed as trainer_state.json was opened (CI saw this one)
    _fake_checkpoint(run, 16, state='{"log_history": [{"loss": 1.')  # killed halfway through writing it
    assert [p.name for p in checkpoints(run)] == ["checkpoint-2", "checkpoint-10"]
    # logging and output keys may change between the run and its resumption
    assert resume_checkpoint(cfg(tmp_path, logging_steps=1, save_steps=3)) == str(run / "checkpoint-10")


def test_resume_auto_with_other_settings_starts_afresh(tmp_path, caplog):
    run = tmp_path / "run"
    resume_checkpoint(cfg(tmp_path))
    _fake_checkpoint(run, 4)
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(cfg(tmp_path, learning_rate=1e-5)) is None
    assert "config.learning_rate" in caplog.text and "--resume" in caplog.text  # what differs, and the way back
    assert not list(run.glob("checkpoint-*"))  # the other run's checkpoints are out of the Trainer's way...
    moved = list(run.glob("previous-*/checkpoint-4/trainer_state.json"))
    assert len(moved) == 1  # ...but kept: nothing is deleted
    assert yaml.safe_load((run / RUN_CONFIG).read_text())["learning_rate"] == 1e-5


def test_resume_never_and_path(tmp_path):
    run = tmp_path / "run"
    resume_checkpoint(cfg(tmp_path))
    ck = _fake_checkpoint(run, 4)
    assert resume_checkpoint(cfg(tmp_path, resume=str(ck))) == str(ck)
    assert resume_checkpoint(cfg(tmp_path, resume="never")) is None and not ck.exists()
    assert list(run.glob("previous-*/checkpoint-4"))  # moved aside, not deleted
    with pytest.raises(UserError, match="not a folder"):
        resume_checkpoint(cfg(tmp_path, resume=str(tmp_path / "nope")))
    for step, state in [(6, None), (8, "")]:
        half = _fake_checkpoint(run, step, complete=False, state=state)
        with pytest.raises(UserError, match="not a complete checkpoint"):
            resume_checkpoint(cfg(tmp_path, resume=str(half)))


def _tiny_peft(tiny_llama):
    from peft import get_peft_model

    from utils.models.loading import load_model, load_tokenizer

    c = load_config(SFTTrainConfig, None, {"lora_r": 2, "lora_alpha": 4, "lora_target_modules": ["q_proj", "v_proj"]})
    return get_peft_model(load_model(str(tiny_llama), dtype="float32"), lora_config(c)), load_tokenizer(str(tiny_llama))


def test_save_final_writes_a_complete_loadable_folder(tmp_path, tiny_llama):
    import torch

    from utils.models.loading import load_model

    model, tok = _tiny_peft(tiny_llama)
    with torch.no_grad():  # a non-zero adapter, so that merging changes the weights
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    c = cfg(tmp_path, base_model=str(tiny_llama), merge=True, answer_format="reasoning")
    out = save_final(model, tok, c, {"global_step": 3}, "# card\n")
    assert resolve_model(str(out)) == str(out) and (out / DONE_MARKER).is_file()
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md", "metrics.json"):
        assert (out / f).is_file(), f
    assert read_train_config(out)["answer_format"] == "reasoning"
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 3
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        adapted = load_model(str(out), dtype="float32")(ids).logits
        merged = load_model(str(out / "merged"), dtype="float32")(ids).logits
        base = load_model(str(tiny_llama), dtype="float32")(ids).logits
    assert torch.allclose(adapted, merged, atol=1e-4) and not torch.allclose(adapted, base, atol=1e-4)
    assert not list(tmp_path.glob("out.tmp-*"))


def test_interrupted_save_never_looks_complete(tmp_path, tiny_llama):
    model, tok = _tiny_peft(tiny_llama)

    class Dies:
        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "adapter_config.json").write_text("{}")
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt  # killed halfway through the weights

    fresh = cfg(tmp_path, output_dir=str(tmp_path / "fresh"))
    with pytest.raises(KeyboardInterrupt):
        save_final(Dies(), tok, fresh, {}, "# never\n")
    assert not (tmp_path / "fresh").exists()  # no folder at all where the model was to go
    with pytest.raises(ModelNotFound):
        resolve_model(str(tmp_path / "fresh"))

    c = cfg(tmp_path)
    good = save_final(model, tok, c, {"global_step": 1}, "# first\n")
    with pytest.raises(KeyboardInterrupt):
        save_final(Dies(), tok, c, {"global_step": 2}, "# second\n")
    # the earlier model is untouched; the half-written one is only a .tmp sibling without the marker
    card = (good / "README.md").read_text()  # the card, behind the Hub's front matter
    assert card.startswith("---\n") and card.endswith("---\n# first\n") and resolve_model(str(good)) == str(good)
    assert all(not (t / DONE_MARKER).exists() for t in tmp_path.glob("*.tmp-*"))


def test_dump_of_resolved_config_round_trips(tmp_path):
    c = cfg(tmp_path, lora_r=8, tasks=["PRTK"])
    dump_yaml(c, tmp_path / "c.yaml")
    again = load_config(SFTTrainConfig, tmp_path / "c.yaml")
    assert again == c
