"""The one model loader: tokenizers, causal LMs and one-logit sequence classifiers, with their adapters,
dtype and quantization, for training, generation and scoring alike.

:func:`load_model` is the only place that calls ``from_pretrained`` on a model of the pipeline. A reference
goes through :func:`utils.models.resolve.resolve_model` first; an adapter folder is loaded on its base and
then merged (generation, scoring, a fresh adapter on top), kept as a frozen ``PeftModel``, or kept
trainable (GRPO refining the SFT adapter). Every failure is one line naming the model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from utils.models.resolve import ModelNotFound, adapter_base, resolve_model

log = logging.getLogger(__name__)

HEADS = ("causal", "seqcls")
ADAPTER_MODES = ("merge", "keep", "train")


def pick_dtype(name: str):
    """``auto`` means bf16 where the hardware runs it well (CUDA with bf16), fp16 on other CUDA GPUs, fp32
    on CPU."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
            "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[name]


def hub_hint(ref: str) -> str:
    """What to check when ``ref`` (not a local folder) could not be fetched from the Hub."""
    if Path(ref).exists():
        return ""
    return (f"; {ref} is downloaded from the Hugging Face Hub on first use: check the name and the network, "
            "accept the model's license and run `huggingface-cli login` for gated models (meta-llama), or use "
            "a local folder")


def _load_error(ref: str, path: str, e: Exception, what: str = "") -> ModelNotFound:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ModelNotFound(f"{ref}: could not load{what} ({first}){hub_hint(path)}")


def load_tokenizer(ref: str, base_model: str | None = None):
    """The tokenizer of ``ref``, with a pad token. An adapter folder saved without a tokenizer uses its
    base's."""
    from transformers import AutoTokenizer

    path = resolve_model(ref, base_model)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        base = adapter_base(path)
        if base is None:
            raise _load_error(ref, path, e, " its tokenizer") from None
        tok = load_tokenizer(adapter_base_path(path, base, base_model))
    if tok.pad_token is None:
        # Llama 3 ships no pad token; it reserves one for exactly this.
        tok.pad_token = "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in tok.get_vocab() else tok.eos_token
    return tok


def adapter_base_path(path: str, base: str, base_model: str | None) -> str:
    """The folder or Hub id of an adapter's base. The adapter names its base by where it was trained; on
    another machine (or after the base moved) the recipe's ``base_model`` names the same model."""
    try:
        return resolve_model(base)
    except ModelNotFound:
        if base_model and base_model != base:
            log.info("%s: its base %s is not here; using base_model %s", path, base, base_model)
            return resolve_model(base_model)
        raise


def load_model(ref: str, base_model: str | None = None, *, head: str = "causal", dtype: str = "auto",
               adapter: str = "merge", quantization=None, keep_layers: int = 0, for_training: bool = False,
               gradient_checkpointing: bool = False, attn_implementation: str = "auto"):
    """Load the model ``ref`` (see :mod:`utils.models.resolve` for what a reference may be).

    * ``head``: ``causal`` (a language model) or ``seqcls`` (a one-logit sequence classifier, the reward
      model; its new score head is not reported as missing weights). ``keep_layers`` > 0 keeps only the
      first N transformer layers (a smaller, faster reward model).
    * ``adapter``: what becomes of an adapter folder's adapter: ``merge`` it into its base, ``keep`` it as
      a frozen ``PeftModel``, or ``train`` it further (a trainable ``PeftModel``). A full model ignores it.
    * ``quantization``: a ``BitsAndBytesConfig`` (QLoRA) or None; each process's copy goes to its own GPU,
      since a quantized model cannot be moved after loading. Merging into a quantized base is refused.
    * ``attn_implementation``: transformers' attention kernel (``sdpa``, ``eager``, ``flash_attention_2``,
      ...); ``auto``: transformers' own choice.
    * ``for_training``: prepare a quantized base for k-bit training, and turn the KV cache off (it only
      serves generation, and costs memory and a warning with gradient checkpointing).
    """
    if head not in HEADS:
        raise ValueError(f"head {head!r}: expected one of {', '.join(HEADS)}")
    if adapter not in ADAPTER_MODES:
        raise ValueError(f"adapter {adapter!r}: expected one of {', '.join(ADAPTER_MODES)}")
    path = resolve_model(ref, base_model)
    base = adapter_base(path)
    if base is not None and adapter == "merge" and quantization is not None:
        raise ModelNotFound(f"{ref}: an adapter cannot be merged into a quantized base; load it with "
                            "adapter='keep' or 'train', or without quantization")
    weights = path if base is None else adapter_base_path(path, base, base_model)
    kwargs: dict = {"dtype": pick_dtype(dtype)}
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        from accelerate import PartialState

        kwargs.update(quantization_config=quantization, device_map={"": PartialState().local_process_index})
    try:
        model = _from_pretrained(weights, head, keep_layers, kwargs)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise _load_error(ref, weights, e) from None
    if quantization is not None and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if for_training:
        model.config.use_cache = False
    if base is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, path, is_trainable=adapter == "train")
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise _load_error(ref, path, e, f" its adapter onto {weights}") from None
        if adapter == "merge":
            model = model.merge_and_unload()
    return model


def _from_pretrained(path: str, head: str, keep_layers: int, kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head == "causal":
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    from transformers.utils import logging as hf_logging

    if keep_layers:
        kwargs = {**kwargs, "num_hidden_layers": keep_layers}
    # The new score head (and, with keep_layers, the unused layers) are reported as a load warning.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def load_for_inference(ref: str, base_model: str | None = None, *, head: str = "causal", dtype: str = "auto",
                       device: str | None = None, keep_layers: int = 0):
    """``(model, tokenizer)`` ready to generate or score: an adapter merged into its base (faster), eval
    mode, on ``device`` (default: CUDA when there is one)."""
    import torch

    tok = load_tokenizer(ref, base_model)
    model = load_model(ref, base_model, head=head, dtype=dtype, keep_layers=keep_layers)
    if head == "seqcls":
        model.config.pad_token_id = tok.pad_token_id
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, tok
