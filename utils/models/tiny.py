"""Random-weight Llamas with the real Llama-3 tokenizer: a tiny one runs the Llama recipe's code path in
seconds on a CPU (the tests' model); one with Llama-3.2-3B's shapes measures the recipe on a GPU without the
gated weights (scripts/gpu_check.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from utils.core.artifacts import DONE_MARKER, atomic_save
from utils.models.resolve import ModelNotFound


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
    return build_random_llama(out_dir, {"hidden_size": hidden_size, "intermediate_size": hidden_size * 2,
                                        "num_hidden_layers": layers, "num_attention_heads": 4,
                                        "num_key_value_heads": 2}, seed=seed)


def build_random_llama(out_dir: str | Path, shape: dict, seed: int = 0, dtype: str = "float32",
                       device: str = "cpu") -> Path:
    """A LlamaForCausalLM with the architecture numbers ``shape`` (a config.json's hidden_size,
    num_hidden_layers, ...; e.g. Llama-3.2-3B's from utils.training.plan.KNOWN_CONFIGS), random weights
    built directly in ``dtype`` on ``device`` (a 3B model in bf16 on a GPU takes seconds), and the real
    Llama-3 tokenizer; saved once into ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / DONE_MARKER).is_file():
        return out_dir
    tok = llama3_tokenizer()
    torch.manual_seed(seed)
    numbers = {k: v for k, v in shape.items() if k != "vocab_size"}
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **{"tie_word_embeddings": True, **numbers})
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)

    def save(tmp: Path):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_save(out_dir, save)
