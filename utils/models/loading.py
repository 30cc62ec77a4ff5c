"""The one model loader: tokenizers, causal LMs and one-logit sequence classifiers, with their
adapters, dtype and quantization, for training, generation and scoring alike.
"""

from __future__ import annotations

from utils.core.config import UserError
from utils.models.resolve import ModelNotFound, adapter_base, resolve_model


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


def load_seqcls(path: str, dtype, keep_layers: int = 0, quantization_config=None, device_map=None):
    """A one-logit sequence classifier on the model at ``path`` (a full model folder or Hub id)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kwargs = dict(num_labels=1, dtype=dtype, device_map=device_map)
    if keep_layers:
        kwargs["num_hidden_layers"] = keep_layers
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    # The new score head (and, with keep_layers, the unused layers) are reported as a load warning.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"{path}: could not load as a sequence classifier ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
