"""Batched generation for lists of chat prompts: SFT comparisons, evaluation, GRPO's held-out reward.

One call renders each prompt with the tokenizer's chat template (generation prompt on), pads on the
left so that every row's new tokens start at the same column, generates greedily or by sampling, and
returns the decoded completions (the new text only, special tokens dropped), in the prompts' order::

    model, tok = load_for_inference("sft")      # utils.models.loading
    answers = generate(model, tok, [row["prompt"] for row in rows], max_new_tokens=128, batch_size=16)

On CPU, prompts go through :func:`utils.models.decode.decode` (finished rows leave the batch, waiting
prompts join it, the prompts' shared prefix is run once); elsewhere, or with a model or setting it does
not cover, through ``model.generate`` in batches of similar length (longest first, so that little compute
goes to padding). Either way the result is in the order of ``prompts``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from utils.models import decode
from utils.models.special_tokens import escape_messages

log = logging.getLogger(__name__)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every token that ends an assistant turn: the tokenizer's end-of-sequence token and the model's
    generation config's (SmolLM2 ends a turn with <|im_end|>, Llama 3 with <|eot_id|>; base models
    may also stop on <|end_of_text|>)."""
    ids = []
    for cand in (tokenizer.eos_token_id,
                 getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in (cand if isinstance(cand, (list, tuple)) else [cand]):
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


@dataclass
class GenerationStats:
    """What the last :func:`generate` call did, for throughput logs and benchmarks."""
    prompts: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    engine: str = ""  # "decode" (utils.models.decode) or "generate" (model.generate)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


last_stats = GenerationStats()


def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int = 128, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
             num_return_sequences: int = 1, seed: int | None = None, progress: bool = False,
             decode_dtype: str = "model") -> list:
    """Generate one completion per prompt (or a list of ``num_return_sequences`` per prompt).

    ``prompts`` are conversations (lists of ``{"role", "content"}``) ending with a user turn; a special-token
    string inside a message is read as text, never as the special token.
    Greedy unless ``do_sample``; ``seed`` makes sampling repeatable. The model is put in eval mode and
    run without gradients; its training flag is restored afterwards. ``decode_dtype`` (model, bfloat16, auto:
    :func:`utils.models.decode.resolve_decode_dtype`) is the CPU decoder's matrix-product dtype.
    """
    import torch

    global last_stats
    if not prompts:
        return []
    if seed is not None:
        torch.manual_seed(seed)
    # A special-token string inside a message is read as text (utils.models.special_tokens).
    encoded = [tokenizer.apply_chat_template(escape_messages(p, tokenizer), add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
               for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, model)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id, eos_token_id=stops,
                  num_return_sequences=num_return_sequences)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        # Greedy decoding: unset the sampling knobs a model's generation_config may carry, which
        # transformers would otherwise warn about on every call.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    results: list = [None] * len(prompts)
    was_training = model.training
    model.eval()
    stats = GenerationStats(prompts=len(prompts))
    started = time.time()
    why_not = decode.supported(model)
    stats.engine = "decode" if why_not is None else "generate"
    try:
        if why_not is None:
            rows = [i for i in order for _ in range(num_return_sequences)]
            new, dstats = decode.decode(model, [encoded[i] for i in rows], max_new_tokens=max_new_tokens,
                                        stop_ids=stops, pad_id=pad_id, max_rows=batch_size * num_return_sequences,
                                        do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                                        progress=progress, matmul_dtype=decode.resolve_decode_dtype(decode_dtype))
            stats.new_tokens = dstats.new_tokens
            texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
            for k, i in enumerate(order):
                seqs = texts[k * num_return_sequences:(k + 1) * num_return_sequences]
                results[i] = seqs if num_return_sequences > 1 else seqs[0]
        else:
            log.debug("generating with model.generate: %s", why_not)
            _generate_batches(model, tokenizer, encoded, order, batch_size, kwargs, stats, progress, results)
    finally:
        model.train(was_training)
    stats.seconds = time.time() - started
    last_stats = stats
    return results


def _generate_batches(model, tokenizer, encoded, order, batch_size, kwargs, stats, progress, results) -> None:
    """``model.generate`` (with ``kwargs``) over left-padded batches of similar length, longest first; fills
    ``results`` and ``stats.new_tokens``."""
    import torch

    device = next(model.parameters()).device
    pad_id, stops, n_seq = kwargs["pad_token_id"], set(kwargs["eos_token_id"]), kwargs["num_return_sequences"]
    started = time.time()
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every row's new tokens start at column `width`
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = out[:, width:].cpu()
        for row in range(new.shape[0]):
            toks = new[row].tolist()
            # count up to and including the first stop token: what was really generated
            stats.new_tokens += next((k + 1 for k, t in enumerate(toks) if t in stops), len(toks))
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for row, i in enumerate(idx):
            seqs = [t.strip() for t in texts[row * n_seq:(row + 1) * n_seq]]
            results[i] = seqs if n_seq > 1 else seqs[0]
        if progress:
            log.info("generated %d/%d prompts (%.0f new tokens/s)", min(b + batch_size, len(order)), len(order),
                     stats.new_tokens / max(time.time() - started, 1e-9))
