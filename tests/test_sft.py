"""SFT: training examples, answer-only labels under both chat templates, the script end to end, resume
after SIGKILL, and the errors a user can make."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from utils.core.artifacts import checkpoints
from utils.core.config import ConfigError, load_config
from utils.data.formats import FORMAT_INSTRUCTIONS, parse
from utils.data.rows import DataError, read_jsonl
from utils.training.sft import SFTTrainConfig, build_trainer, expand_conversation, load_examples, reasoning_scaffold

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*/sft.yaml"))


def sft_cfg(tmp_path, processed, base, **over):
    base_over = {"base_model": str(base), "data_dir": str(processed), "run_dir": str(tmp_path / "run"),
                 "output_dir": str(tmp_path / "out"), "report_to": [], "eval_on_start": False,
                 "lora_r": 2, "lora_alpha": 4, "batch_size": 2, "per_device_batch_size": 2}
    return load_config(SFTTrainConfig, None, {**base_over, **over})


def multi_turn_row(processed: Path) -> dict:
    rows = read_jsonl(processed / "sft" / "train.jsonl")
    return next(r for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) >= 2)


# ----------------------------------------------------------------------------- examples
def test_every_assistant_turn_becomes_one_example(processed):
    row = multi_turn_row(processed)
    answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    examples = expand_conversation(row, "plain")
    assert [e["completion"][0]["content"] for e in examples] == answers
    for k, e in enumerate(examples):
        # the prompt is the conversation up to this turn, earlier answers included, and ends with the user
        assert e["prompt"] == row["messages"][:len(e["prompt"])] and e["prompt"][-1]["role"] == "user"
        assert sum(m["role"] == "assistant" for m in e["prompt"]) == k


def test_reasoning_targets_parse_back_to_the_reference(processed):
    rows = read_jsonl(processed / "sft" / "train.jsonl")
    for row in rows:
        for e, m in zip(expand_conversation(row, "reasoning"), [m for m in row["messages"] if m["role"] == "assistant"]):
            p = parse(e["completion"][0]["content"], "reasoning")
            assert p.well_formed and p.answer == m["content"]
            assert m["content"] not in p.reasoning  # the scaffold is read from the prompt, never the answer
            assert e["prompt"][0]["content"].endswith(FORMAT_INSTRUCTIONS["reasoning"])


def test_reasoning_scaffold_names_the_kind_of_question():
    yes_no = reasoning_scaffold([{"role": "user", "content": "Can I see my ECG report?"}])
    timing = reasoning_scaffold([{"role": "user", "content": "Medical advice I was given:\nTake apixaban.\n\n"
                                  "Question: How often should I come back?"}])
    other = reasoning_scaffold([{"role": "user", "content": "What does a delta wave indicate?"}])
    assert "Yes or No" in yes_no and "interval" in timing and "record" in timing and "key facts" in other


def test_subset_and_task_filter_are_seeded(tmp_path, processed, tiny_llama):
    c = sft_cfg(tmp_path, processed, tiny_llama, tasks=["PRTK", "EBK"], max_train_samples=5)
    a, b = load_examples(c, "train", 5), load_examples(c, "train", 5)
    assert a == b and len(a) == 5 and {e["task"] for e in a} <= {"PRTK", "EBK"}


# ----------------------------------------------------------------------------- labels
@pytest.fixture(scope="session")
def tiny_smollm2(tmp_path_factory):
    """A random 2-layer Llama with the real SmolLM2 tokenizer and ChatML template (read from the packaged
    GGUF file, ~10 s): what the CPU recipe tokenizes, without its weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from utils.core.artifacts import atomic_save
    from utils.models.resolve import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.pad_token = "<|endoftext|>"  # as utils.models.resolve.convert_smollm2 sets it
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))

    def save(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_save(tmp_path_factory.mktemp("smol") / "tiny-smollm2", save)


@pytest.mark.parametrize("template, end_of_turn", [("llama", "<|eot_id|>"), ("smollm2", "<|im_end|>")])
def test_loss_covers_the_answer_tokens_only(tmp_path, processed, tiny_llama, tiny_smollm2, template, end_of_turn):
    base = tiny_llama if template == "llama" else tiny_smollm2
    rows = read_jsonl(processed / "sft" / "train.jsonl")
    row = next(r for r in rows if r["task"] == "PP")  # a record (context) + question + answer
    multi = multi_turn_row(processed)
    examples = expand_conversation(row, "plain") + expand_conversation(multi, "plain")
    trainer = build_trainer(sft_cfg(tmp_path, processed, base), examples, None)
    tok = trainer.processing_class
    data = trainer.train_dataset
    assert len(data) == len(examples)
    for ex, item in zip(examples, data):
        ids, labels = item["input_ids"], item["labels"]
        trained = [i for i, lab in zip(ids, labels) if lab != -100]
        assert [lab for lab in labels if lab != -100] == trained
        text = tok.decode(trained)
        answer = ex["completion"][0]["content"]
        # exactly the answer and the end-of-turn token (ChatML also closes the line after <|im_end|>)
        assert text.startswith(answer) and text[len(answer):].strip() == end_of_turn, text
        first = next(k for k, lab in enumerate(labels) if lab != -100)
        assert all(lab == -100 for lab in labels[:first])
        prompt_text = tok.decode(ids[:first])
        for m in ex["prompt"]:  # system prompt, record, question, earlier turns: all in the masked part
            assert m["content"][:40] in prompt_text
        assert prompt_text.rstrip().endswith("assistant" if template == "smollm2" else "<|end_header_id|>")


# ----------------------------------------------------------------------------- configs and errors
@pytest.mark.parametrize("path", CONFIGS, ids=[p.parent.name for p in CONFIGS])
def test_shipped_recipes_load(path):
    cfg = load_config(SFTTrainConfig, path)
    first = path.read_text().splitlines()[0]
    assert first == f"# python sft_train.py --config configs/{path.parent.name}/sft.yaml"
    assert cfg.batch_size % cfg.per_device_batch_size == 0


def test_recipes_exist():
    assert {p.parent.name for p in CONFIGS} >= {"cpu", "llama-3.2-3b"}


def run_script(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "sft_train.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_help_runs():
    r = run_script("--help")
    assert r.returncode == 0 and "--resume" in r.stdout and "sft_train.py --config" in r.stdout


@pytest.mark.parametrize("flags, words", [
    (["--lora-r", "0"], "lora_r"), (["--learning-rate", "-0.001"], "learning_rate"),
    (["--batch-size", "6", "--world-size", "4", "--dry-run"], "cannot be split evenly over 4 processes"),
])
def test_out_of_range_flags_fail_with_one_line(flags, words):
    r = run_script("--config", "configs/cpu/sft.yaml", *flags)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and words in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_processed_data_says_to_run_prepare(tmp_path):
    r = run_script("--config", "configs/cpu/sft.yaml", "--data-dir", tmp_path / "nothing")
    assert r.returncode == 2 and "prepare_data.py" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_base_model_is_named(tmp_path, processed):
    r = run_script("--config", "configs/cpu/sft.yaml", "--data-dir", processed, "--base-model",
                   tmp_path / "no-such-model", "--run-dir", tmp_path / "run")
    assert r.returncode == 2 and "no-such-model" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_rows_are_refused(tmp_path, processed, tiny_llama):
    bad = tmp_path / "bad"
    (bad / "sft").mkdir(parents=True)
    (bad / "sft" / "train.jsonl").write_text(json.dumps({"id": "x", "task": "EBK", "messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl: line 1: 'messages' ends with a 'user' message"):
        load_examples(sft_cfg(tmp_path, bad, tiny_llama), "train", 0)


def test_unknown_trainer_extra_key_in_a_recipe(tmp_path):
    p = tmp_path / "sft.yaml"
    p.write_text((ROOT / "configs/cpu/sft.yaml").read_text() + "  packing_strategyy: bfd\n")
    with pytest.raises(ConfigError, match="packing_strategyy"):
        load_config(SFTTrainConfig, p)


# ----------------------------------------------------------------------------- end to end
TINY_FLAGS = ["--lora-r", "4", "--lora-alpha", "8", "--batch-size", "2", "--per-device-batch-size", "2",
              "--max-length", "256", "--logging-steps", "1", "--report-to", "tensorboard", "--learning-rate", "1e-3"]


@pytest.mark.slow
def test_cli_run_end_to_end(tmp_path, processed, tiny_llama, monkeypatch):
    models = tmp_path / "models"
    r = run_script("--config", "configs/cpu/sft.yaml", "--base-model", tiny_llama, "--data-dir", processed,
                   "--run-dir", tmp_path / "run", "--max-steps", 4, "--eval-steps", 2, "--save-steps", 2,
                   "--max-eval-samples", 4, "--max-train-samples", 0, "--answer-format", "reasoning", *TINY_FLAGS,
                   "--push-to-hub", "true", "--hub-model-id", "ecg-test/tiny-sft",
                   env={"ECG_MODELS_DIR": str(models), "HF_HUB_OFFLINE": "1"})
    # the upload cannot reach the Hub here: one line, exit 2, and the model is saved all the same
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert "push_to_hub: uploading" in errors[0] and "the model is saved" in errors[0]
    assert "huggingface-cli upload ecg-test/tiny-sft" in errors[0]
    out = models / "sft"  # output_dir "" means $ECG_MODELS_DIR/sft
    assert (out / ".complete").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["answer_format"] == "reasoning"
    assert [e["step"] for e in metrics["eval_loss"]] == [0, 2, 4]  # on start, then every 2 steps
    assert metrics["eval_loss_last"] < metrics["eval_loss_first"]  # lr 1e-3 on a random model: it learns
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))  # TensorBoard logs
    assert "reasoning" in (out / "README.md").read_text() and (out / "train_config.yaml").is_file()

    from utils.data.formats import with_format_instructions
    from utils.models.generation import generate
    from utils.models.loading import load_for_inference

    monkeypatch.setenv("ECG_MODELS_DIR", str(models))
    model, tok = load_for_inference("sft")
    prompt = with_format_instructions([{"role": "user", "content": "Is a QRS of 140 ms wide?"}], "reasoning")
    (text,) = generate(model, tok, [prompt], max_new_tokens=4)
    assert isinstance(text, str)


@pytest.mark.slow
def test_resume_after_sigkill_finishes_at_the_same_step(tmp_path, processed, tiny_llama):
    steps = 12
    args = ["--config", "configs/cpu/sft.yaml", "--base-model", tiny_llama, "--data-dir", processed,
            "--run-dir", tmp_path / "run", "--output-dir", tmp_path / "out", "--max-steps", steps,
            "--save-steps", 2, "--eval-steps", 1000, "--no-eval-on-start", "--max-eval-samples", 2,
            "--max-train-samples", 0, *TINY_FLAGS]
    proc = subprocess.Popen([sys.executable, "sft_train.py", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if checkpoints(tmp_path / "run"):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "out").exists()
    done = [int(p.name.split("-")[1]) for p in checkpoints(tmp_path / "run")]
    assert done and max(done) < steps
    # and the next checkpoint killed as its trainer_state.json was being written (empty): the Trainer
    # would fail to read it, so resumption must pass over it
    partial = tmp_path / "run" / f"checkpoint-{max(done) + 2}"
    partial.mkdir(exist_ok=True)
    (partial / "trainer_state.json").write_text("")

    r = run_script(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["global_step"] == steps and metrics["resumed_from"].endswith(f"checkpoint-{max(done)}")
    from utils.models.loading import load_model

    model = load_model(str(tmp_path / "out"), dtype="float32", adapter="keep")
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_unreachable_hub_model_is_named_with_how_to_get_it(tmp_path, processed):
    r = run_script("--config", "configs/cpu/sft.yaml", "--data-dir", processed, "--base-model",
                   "example-org/no-such-model", "--run-dir", tmp_path / "run", env={"HF_HUB_OFFLINE": "1"})
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: example-org/no-such-model") and "login" in last
    assert "Traceback" not in r.stderr


def test_bench_help_runs():
    r = subprocess.run([sys.executable, "scripts/bench_sft.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "tokens/s" in r.stdout


@pytest.mark.slow
def test_bench_prints_throughput_and_memory(tmp_path, processed, tiny_llama):
    recipe = yaml.safe_load((ROOT / "configs/cpu/sft.yaml").read_text())
    recipe.update(base_model=str(tiny_llama), data_dir=str(processed), lora_r=2, lora_alpha=4, batch_size=2,
                  per_device_batch_size=2, max_train_samples=0, max_length=256)
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    r = subprocess.run([sys.executable, "scripts/bench_sft.py", "--config", str(cfg), "--steps", "2",
                        "--json", str(tmp_path / "b.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["input_tokens_per_s"] > 0 and b["answer_tokens_per_s"] > 0 and b["peak_rss_mib"] > 100
    assert b["timed_steps"] == 2 and "input_tokens_per_s" in r.stdout
