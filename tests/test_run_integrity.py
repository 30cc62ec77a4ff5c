"""A model or run folder is exactly what it says it is: run fingerprints, resume only of the same run,
nothing deleted, finished runs not "resumed", torn logs survived, one-line errors for broken model folders,
and the same seed giving the same numbers."""

import json
import logging
from pathlib import Path

import pytest

from utils.core.artifacts import read_log
from utils.core.config import load_config
from utils.core.fingerprint import differences, file_sha256
from utils.models.resolve import ModelNotFound, adapter_base, model_identity
from utils.training.run import RUN_RECORD, fingerprint, mark_finished, resume_checkpoint
from utils.training.sft import SFTTrainConfig

ROOT = Path(__file__).resolve().parents[1]


def cfg(tmp_path, **over):
    return load_config(SFTTrainConfig, ROOT / "configs/cpu/sft.yaml",
                       {"run_dir": str(tmp_path / "run"), "output_dir": str(tmp_path / "out"), **over})


def _checkpoint(run: Path, step: int) -> Path:
    p = run / f"checkpoint-{step}"
    p.mkdir(parents=True)
    (p / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return p


def _fp(c, data_hash="aa", model_hash="m1"):
    return {"config": {"learning_rate": c.learning_rate}, "data": {"sft/train": data_hash},
            "model": {"files": {"model.safetensors": model_hash}}, "code": {"source_sha256": "c1"}}


def test_resume_needs_the_same_fingerprint(tmp_path, caplog):
    """Same config, data, model and code: resume. Data prepared again with other settings (another hash):
    a fresh run, a line naming what differs, the old checkpoints moved aside, none deleted."""
    c = cfg(tmp_path)
    run = Path(c.run_dir)
    assert resume_checkpoint(c, fingerprint=_fp(c)) is None
    _checkpoint(run, 2)
    assert resume_checkpoint(c, fingerprint=_fp(c)) == str(run / "checkpoint-2")
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(c, fingerprint=_fp(c, data_hash="bb")) is None
    line = [r.getMessage() for r in caplog.records if "another run" in r.getMessage()]
    assert len(line) == 1 and "data.sft/train" in line[0] and "--resume" in line[0] and "\n" not in line[0]
    assert list(run.glob("previous-*/checkpoint-2/trainer_state.json"))
    assert json.loads((run / RUN_RECORD).read_text())["fingerprint"]["data"]["sft/train"] == "bb"
    _checkpoint(run, 4)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(c, fingerprint=_fp(c, data_hash="bb", model_hash="m2")) is None
    assert "model.files.model.safetensors" in caplog.text  # another base model: named too


def test_a_finished_run_is_not_resumed(tmp_path):
    c = cfg(tmp_path)
    run = Path(c.run_dir)
    resume_checkpoint(c, fingerprint=_fp(c))
    _checkpoint(run, 6)
    mark_finished(run, tmp_path / "out")
    assert json.loads((run / RUN_RECORD).read_text())["finished"]
    assert resume_checkpoint(c, fingerprint=_fp(c)) is None  # same command again: a fresh run
    assert not (run / "checkpoint-6").exists() and list(run.glob("previous-*/checkpoint-6"))
    assert json.loads((run / RUN_RECORD).read_text())["finished"] is None


def test_checkpoints_without_a_run_record_are_kept_aside(tmp_path):
    """A run folder from before run records (or a torn run.json) is another run: never continued
    silently, never deleted."""
    c = cfg(tmp_path)
    run = Path(c.run_dir)
    _checkpoint(run, 3)
    (run / RUN_RECORD).write_text('{"fingerprint": {')  # torn
    assert resume_checkpoint(c, fingerprint=_fp(c)) is None
    assert list(run.glob("previous-*/checkpoint-3"))


def test_fingerprint_records_config_data_model_packages_code(tmp_path, tiny_llama):
    c = cfg(tmp_path, base_model=str(tiny_llama))
    data = tmp_path / "train.jsonl"
    data.write_text('{"a": 1}\n')
    fp = fingerprint(c, {"sft/train": file_sha256(data)}, str(tiny_llama))
    assert set(fp) == {"config", "data", "model", "packages", "code"}
    assert "run_dir" not in fp["config"] and fp["config"]["learning_rate"] == c.learning_rate
    assert fp["model"]["files"]["model.safetensors"] == file_sha256(tiny_llama / "model.safetensors")
    assert fp["packages"]["torch"] and fp["code"]["source_sha256"]
    assert differences(fp, fingerprint(c, {"sft/train": file_sha256(data)}, str(tiny_llama))) == []
    data.write_text('{"a": 2}\n')
    assert differences(fp, fingerprint(c, {"sft/train": file_sha256(data)}, str(tiny_llama))) == ["data.sft/train"]


def test_model_identity_follows_an_adapter_to_its_base(tmp_path, tiny_llama):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_llama)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    ident = model_identity(str(adapter))
    assert ident["base"] == model_identity(str(tiny_llama)) and "adapter_model.safetensors" in ident["files"]
    assert model_identity("meta-llama/Llama-3.2-3B-Instruct")["hub_id"] == "meta-llama/Llama-3.2-3B-Instruct"


@pytest.mark.parametrize("text, expected", [
    ("{not json", "not a readable PEFT adapter config"),
    ('{"r": 8}', "no base_model_name_or_path"),
    (b"\xff\xfe\x00", "not a readable PEFT adapter config"),
    ('{"base_model_name_or_path": null}', "base_model_name_or_path is None"),
])
def test_a_broken_adapter_config_is_one_line(tmp_path, text, expected):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ModelNotFound) as e:
        adapter_base(str(folder))
    assert expected in str(e.value) and "adapter_config.json" in str(e.value) and "\n" not in str(e.value)


def test_a_broken_model_config_is_one_line(tmp_path, tiny_llama):
    import shutil

    from utils.models.loading import load_model

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": ')  # truncated
    with pytest.raises(ModelNotFound) as e:
        load_model(str(broken))
    assert str(broken) in str(e.value) and "\n" not in str(e.value)


def test_a_torn_log_line_is_dropped_with_a_warning(tmp_path, caplog):
    log = tmp_path / "heldout.jsonl"
    log.write_text('{"step": 0, "means": {"total": 0.5}}\n{"step": 20, "means": {"tot')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        rows = read_log(log)
    assert rows == [{"step": 0, "means": {"total": 0.5}}] and "torn last line" in caplog.text
    assert log.read_text().endswith("}\n")  # cut, so the next append starts on its own line
    with log.open("a") as f:
        f.write('{"step": 20, "means": {"total": 0.6}}\n')
    assert [r["step"] for r in read_log(log)] == [0, 20]


def test_grpo_resume_survives_a_torn_heldout_log(tmp_path):
    """A GRPO run killed while writing heldout.jsonl resumes: the logs are trimmed to the checkpoint, the
    torn line dropped."""
    from utils.training.grpo.callbacks import HELDOUT_LOG, _read_heldout
    from utils.training.grpo.config import GRPOTrainConfig
    from utils.training.grpo.run import _prepare_run_dir

    c = load_config(GRPOTrainConfig, ROOT / "configs/cpu/grpo.yaml", {"run_dir": str(tmp_path / "run")})
    run = tmp_path / "run"
    run.mkdir()
    (run / HELDOUT_LOG).write_text('{"step": 0, "items": []}\n{"step": 10, "items": []}\n{"step": 20, "it')
    _prepare_run_dir(c, str(run / "checkpoint-10"))
    assert [e["step"] for e in _read_heldout(str(run))] == [0, 10]


@pytest.mark.slow
def test_same_seed_same_numbers(tmp_path, processed, tiny_llama):
    """The same seed, data and thread count give the same SFT validation loss and the same reward-model
    accuracy (to 1e-6 on CPU): every random draw, the score head's included, comes after the seed."""
    from utils.training.reward_model import RewardModelConfig, train_reward_model
    from utils.training.sft import run_sft

    def sft(i):
        c = load_config(SFTTrainConfig, ROOT / "configs/cpu/sft.yaml", {
            "base_model": str(tiny_llama), "data_dir": str(processed), "run_dir": str(tmp_path / f"sft-run{i}"),
            "output_dir": str(tmp_path / f"sft{i}"), "max_steps": 2, "batch_size": 2, "per_device_batch_size": 2,
            "max_eval_samples": 4, "eval_steps": 2, "save_steps": 100, "num_threads": 1, "report_to": []})
        return run_sft(c)["eval_loss_last"]

    def rm(i):
        c = load_config(RewardModelConfig, ROOT / "configs/cpu/reward.yaml", {
            "base_model": str(tiny_llama), "data_dir": str(processed), "run_dir": str(tmp_path / f"rm-run{i}"),
            "output_dir": str(tmp_path / f"rm{i}"), "max_steps": 2, "batch_size": 4, "per_device_batch_size": 4,
            "negatives": ["flip_yesno", "numbers", "truncate"], "keep_layers": 0, "max_train_pairs": 16,
            "max_eval_pairs": 0, "save_steps": 100, "num_threads": 1, "report_to": [], "max_test_items": 20})
        return {t: d["accuracy"] for t, d in train_reward_model(c)["test_accuracy"].items()}

    a, b = sft(1), sft(2)
    assert abs(a - b) < 1e-6, (a, b)
    ra, rb = rm(1), rm(2)
    assert ra.keys() == rb.keys() and all(abs(ra[k] - rb[k]) < 1e-6 for k in ra), (ra, rb)


def test_a_truncated_train_config_is_one_line(tmp_path):
    from utils.core.artifacts import read_train_config
    from utils.core.config import UserError

    (tmp_path / "train_config.yaml").write_text("answer_format: plain\nlora_r: [16,\n")  # cut mid-write
    with pytest.raises(UserError) as e:
        read_train_config(tmp_path)
    assert "train_config.yaml: not readable YAML" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "train_config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="not the mapping"):
        read_train_config(tmp_path)


@pytest.mark.parametrize("flag, value", [("--learning-rate", "nan"), ("--learning-rate", ".inf"),
                                         ("--learning-rate", "5"), ("--warmup-ratio", "-.nan")])
def test_non_finite_or_absurd_config_values_are_one_line(flag, value):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "sft_train.py", "--config", "configs/cpu/sft.yaml", f"{flag}={value}"],
                       cwd=ROOT, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and flag[2:].replace("-", "_") \
        in lines[0], r.stderr[-2000:]


def test_non_utf8_on_chats_standard_input_is_one_line(tiny_llama):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "chat.py", "--config", "configs/cpu/chat.yaml", "--model", str(tiny_llama)],
                       cwd=ROOT, input=b"What is a \xff\xfe QRS?\n", capture_output=True)
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "not UTF-8" in err[0], r.stderr.decode()[-2000:]


def test_folders_the_project_did_not_write_are_never_replaced(tmp_path):
    """An output or report folder is replaced only when it carries the project's marker: a folder of the
    user's (here: their notes) at that path stops the run in one line, untouched."""
    from utils.core.artifacts import DONE_MARKER, atomic_save
    from utils.core.config import UserError

    theirs = tmp_path / "models" / "sft"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as e:
        atomic_save(theirs, lambda tmp: tmp.mkdir())
    assert "not written by this project" in str(e.value) and "output_dir" in str(e.value)
    assert (theirs / "notes.txt").read_text() == "mine" and not list(tmp_path.glob("models/sft.tmp-*"))
    ours = atomic_save(tmp_path / "models" / "rlhf", lambda tmp: tmp.mkdir())
    assert (ours / DONE_MARKER).is_file()
    atomic_save(ours, lambda tmp: (tmp.mkdir(), (tmp / "new").write_text("x")))  # ours: replaced
    assert (ours / "new").is_file()


def test_training_refuses_a_foreign_output_folder_before_training(tmp_path, processed, tiny_llama):
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("\\documentclass{article}")
    r = subprocess.run([sys.executable, "sft_train.py", "--config", "configs/cpu/sft.yaml", "--base-model",
                        str(tiny_llama), "--data-dir", str(processed), "--run-dir", str(tmp_path / "run"),
                        "--output-dir", str(out), "--max-steps", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "not written by this project" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("checkpoint-*"))
    assert (out / "thesis.tex").is_file()


def _model_trained_on(tmp_path, data_dir: Path, name="m") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "fingerprint.json").write_text(json.dumps(
        {"data": {"sft/train": file_sha256(data_dir / "sft/train.jsonl"), "sft/validation": "x"}}))
    (folder / "train_config.yaml").write_text(f"data_dir: {data_dir}\n")
    return folder


def test_evaluation_refuses_test_items_the_model_trained_on(tmp_path):
    from utils.core.config import UserError
    from utils.data.rows import read_jsonl
    from utils.evaluation.leakage import check_test_items

    data = tmp_path / "processed"
    (data / "sft").mkdir(parents=True)
    (data / "eval").mkdir()
    test_rows = [{"id": f"t{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}]} for i in range(3)]
    (data / "eval/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    train = [{"id": "a", "messages": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "A"}]}]
    (data / "sft/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    model = _model_trained_on(tmp_path, data)
    rows = read_jsonl(data / "eval/test.jsonl")
    assert check_test_items("sft", model, rows, data / "eval/test.jsonl") is None  # same folder, unchanged

    # prepare run again with other settings: a test question is now a training item (other id, same text)
    train.append({"id": "zz", "messages": [{"role": "user", "content": "question  1?"},
                                           {"role": "assistant", "content": "A"}]})
    (data / "sft/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    model2 = _model_trained_on(tmp_path, data, "m2")
    other = tmp_path / "other/eval"
    other.mkdir(parents=True)
    (other / "test.jsonl").write_text((data / "eval/test.jsonl").read_text())
    with pytest.raises(UserError) as e:
        check_test_items("sft", model2, rows, other / "test.jsonl")
    assert "1 test item(s) (e.g. t1) are in its training data" in str(e.value) and "\n" not in str(e.value)

    # the training file changed after the model trained on it: not checkable, said in the report
    note = check_test_items("sft", model, rows, other / "test.jsonl")
    assert note and "could not be checked" in note

    # GRPO from that SFT model, on a GRPO split without the question: the SFT data it inherits still counts
    from utils.core.artifacts import training_lineage

    grpo_data = tmp_path / "grpo-data"
    (grpo_data / "grpo").mkdir(parents=True)
    (grpo_data / "grpo/train.jsonl").write_text(json.dumps({"id": "g", "prompt": [{"role": "user",
                                                                                   "content": "Else?"}]}) + "\n")
    rlhf = tmp_path / "rlhf"
    rlhf.mkdir()
    (rlhf / "fingerprint.json").write_text(json.dumps(
        {"data": {"grpo/train": file_sha256(grpo_data / "grpo/train.jsonl")}, "lineage": training_lineage(str(model2))}))
    (rlhf / "train_config.yaml").write_text(f"data_dir: {grpo_data}\n")
    with pytest.raises(UserError, match="1 test item.*sft/train.jsonl"):
        check_test_items("rlhf", rlhf, rows, other / "test.jsonl")


def test_push_to_hub_uploads_the_finished_folder_with_its_card(tmp_path, monkeypatch):
    """push_to_hub creates the repo (private by default) and uploads the model folder, card included, but
    not its completion marker."""
    import huggingface_hub

    from utils.core.config import load_config
    from utils.training.run import push_to_hub
    from utils.training.sft import SFTTrainConfig

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
            calls.append(("upload", repo_id, folder_path, ignore_patterns))
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    cfg = load_config(SFTTrainConfig, None, {"push_to_hub": True, "hub_model_id": "me/ecg-sft"})
    folder = tmp_path / "sft"
    folder.mkdir()
    assert push_to_hub(folder, cfg) == "https://huggingface.co/me/ecg-sft/commit/1"
    assert calls[0] == ("create", "me/ecg-sft", True, True)
    assert calls[1][:3] == ("upload", "me/ecg-sft", str(folder)) and ".complete" in calls[1][3]
