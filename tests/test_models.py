"""The model resolver, the tiny Llama, the SmolLM2 conversion and atomic saves."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from utils.core.artifacts import DONE_MARKER, atomic_save
from utils.models.loading import load_model, load_tokenizer
from utils.models.resolve import ModelNotFound, adapter_base, is_complete, resolve_model
from utils.models.tiny import build_tiny_llama


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ECG_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "models"


@pytest.mark.parametrize("alias,script", [("sft", "sft_train.py"), ("reward", "reward_model.py"),
                                          ("rlhf", "grpo_train.py")])
def test_missing_phase_checkpoint_names_its_script(models_dir, alias, script):
    with pytest.raises(ModelNotFound) as e:
        resolve_model(alias)
    assert f"{models_dir / alias}" in str(e.value) and script in str(e.value) and "\n" not in str(e.value)


def test_hub_id_passes_through_and_bad_refs_fail(models_dir, tmp_path):
    assert resolve_model("meta-llama/Llama-3.2-3B-Instruct") == "meta-llama/Llama-3.2-3B-Instruct"
    with pytest.raises(ModelNotFound, match="not a Hub id"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="not a model folder"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFound, match="base_model"):
        resolve_model("base")


def test_alias_and_base_resolve_to_folders(models_dir, tiny_llama):
    import shutil

    shutil.copytree(tiny_llama, models_dir / "sft")
    assert resolve_model("sft") == str(models_dir / "sft")
    assert resolve_model("base", base_model=str(tiny_llama)) == str(tiny_llama)


def test_phase_folder_without_marker_is_refused(models_dir, tiny_llama):
    """A phase folder whose save did not finish is refused by name; an explicit folder needs no marker."""
    import shutil

    shutil.copytree(tiny_llama, models_dir / "rlhf")
    (models_dir / "rlhf" / DONE_MARKER).unlink()
    with pytest.raises(ModelNotFound) as e:
        resolve_model("rlhf")
    msg = str(e.value)
    assert str(models_dir / "rlhf") in msg and DONE_MARKER in msg and "grpo_train.py" in msg and "\n" not in msg
    assert resolve_model(str(models_dir / "rlhf")) == str(models_dir / "rlhf")


def test_tiny_llama_is_the_llama_recipe(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    assert len(tok) == 128256
    assert tok.convert_ids_to_tokens([128000, 128009]) == ["<|begin_of_text|>", "<|eot_id|>"]
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    model = load_model(str(tiny_llama), dtype="float32")
    ids = tok("The QRS complex", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == 128256
    assert adapter_base(str(tiny_llama)) is None


def test_atomic_save_never_leaves_a_complete_looking_folder(tmp_path):
    target = tmp_path / "sft"

    def crash(d):
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"x")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        atomic_save(target, crash)
    assert not target.exists()
    with pytest.raises(ModelNotFound):
        resolve_model(str(target))

    def ok(d):
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"x")

    atomic_save(target, ok)
    assert (target / DONE_MARKER).is_file() and is_complete(target)


def test_build_tiny_llama_is_cached(tiny_llama):
    before = (tiny_llama / "model.safetensors").stat().st_mtime
    assert build_tiny_llama(tiny_llama) == tiny_llama
    assert (tiny_llama / "model.safetensors").stat().st_mtime == before


@pytest.mark.slow
def test_smollm2_converts_once_and_generates(models_dir):
    """The built-in base: GGUF -> safetensors under models/base, once; a half-written folder is redone."""
    code = ("from utils.models.resolve import resolve_model; from utils.models.loading import load_tokenizer, load_model;"
            "p = resolve_model('smollm2-135m-instruct'); tok = load_tokenizer(p);"
            "m = load_model(p, dtype='bfloat16');"
            "ids = tok.apply_chat_template([{'role': 'user', 'content': 'What is an ECG?'}],"
            " add_generation_prompt=True, return_tensors='pt', return_dict=True);"
            "out = m.generate(**ids, max_new_tokens=8, do_sample=False);"
            "print('PATH', p); print('TEXT', repr(tok.decode(out[0, ids['input_ids'].shape[1]:])))")
    env = {"ECG_MODELS_DIR": str(models_dir), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    folder = models_dir / "base" / "smollm2-135m-instruct"
    # (a library may log to stdout too: DeepSpeed, when installed, says which accelerator it found)
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("PATH ", "TEXT ")))
    assert out["PATH"] == str(folder)
    assert len(out["TEXT"]) > 3  # some decoded text
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    # Remove the marker: the folder no longer counts and is converted again, once, by whichever of two
    # processes started together (the ranks of a launch on a fresh machine) gets there first.
    (folder / DONE_MARKER).unlink()
    mtime = (folder / "model.safetensors").stat().st_mtime
    again = ("import logging; logging.basicConfig(level=logging.INFO);"
             "from utils.models.resolve import resolve_model; print('PATH', resolve_model('smollm2-135m-instruct'))")
    procs = [subprocess.Popen([sys.executable, "-c", again], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    results = [(p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=600)]]
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    assert sum(err.count("converting ") for _, _, err in results) == 1
    assert (folder / DONE_MARKER).is_file() and (folder / "model.safetensors").stat().st_mtime > mtime
    assert sorted(p.name for p in folder.parent.iterdir()) == [".smollm2-135m-instruct.lock", "smollm2-135m-instruct"]
