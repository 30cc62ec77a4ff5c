"""A batched decoder for CPU generation: finished rows leave the batch, waiting prompts take their place.

``model.generate`` decodes every row of a batch until its longest answer ends, and its cache grows by
concatenation (a copy of the whole KV cache per token). On CPU both cost more than the model itself: with
answers of ~30 tokens and a 96-token cap most decoded tokens were padding, and generation ran at ~7% of
the machine's bound (scripts/bench_eval.py). Here

* each layer's keys and values live in one preallocated buffer; a step writes one column;
* a row leaves the batch at its stop token, and prompts still waiting join it (continuous batching):
  they are prefilled together (each distinct prompt once, so GRPO's groups share one prefill) and their
  caches placed right-aligned beside the running rows', so that every row writes the same column;
* greedy, temperature, top-k and top-p sampling are done on the logits directly (one uniform draw per
  row against the cumulative probabilities);
* fp32 linear layers run on weights that oneDNN has packed once per call for the decode batch
  (:func:`packed_linears`): at 16 rows ~1.7x faster than the plain matmul, the 49k-token output layer 3x;
* Llama models (SmolLM2, Llama-3.x) prefill and step through :class:`LlamaStep`, the forward written out
  over these buffers with q/k/v and gate/up fused into one product each, instead of the model's modules.

Other models run their own forward (any Llama-like model whose cache layers are plain full-attention
layers); :func:`supported` says when it can, and callers fall back to ``model.generate`` otherwise
(sliding-window or hybrid caches, beam search, repetition penalties, a GPU, where vLLM is the recipe's
fast path)::

    ids = decode(model, [tok.encode("Hi")] * 4, max_new_tokens=32, stop_ids=[tok.eos_token_id],
                 pad_id=tok.pad_token_id, max_rows=16, do_sample=True, temperature=0.7)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import Sequence

log = logging.getLogger(__name__)

# Generation-config fields that change which token is chosen, with the value that means "off"; anything else
# set sends the caller back to model.generate (a silently ignored knob would change results).
_NEUTRAL = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_p": None,
            "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "bad_words_ids": None,
            "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
            "forced_eos_token_id": None, "min_new_tokens": None, "min_length": 0, "sequence_bias": None,
            "guidance_scale": None, "encoder_repetition_penalty": 1.0, "penalty_alpha": None,
            "renormalize_logits": False, "diversity_penalty": 0.0, "exponential_decay_length_penalty": None,
            "watermarking_config": None, "assistant_model": None, "prompt_lookup_num_tokens": None,
            "logits_processor": None, "stop_strings": None, "low_memory": None, "constraints": None,
            "force_words_ids": None, "num_return_sequences": 1}


def unsupported(generation_config) -> list[str]:
    """The generation-config fields set to something this decoder does not do (empty: it can decode)."""
    out = []
    for key, off in _NEUTRAL.items():
        val = getattr(generation_config, key, off)
        if not (val is None or val == off or (not val and not off)):  # e.g. min_p 0.0 is off like None
            out.append(f"{key}={val!r}")
    return out


def supported(model) -> str | None:
    """``None`` when :func:`decode` can run this model, else why not (one phrase)."""
    import torch
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if getattr(model, "config", None) is None:
        return "not a transformers model (no config)"
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"device {device.type} (GPUs generate with model.generate or vLLM)"
    if getattr(model.config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception as exc:  # an architecture the cache cannot describe
        return f"cache layout unknown ({exc})"
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return "sliding-window or hybrid cache layers"
    if any(p.dtype not in (torch.float32, torch.bfloat16, torch.float16) for p in model.parameters()):
        return "quantized weights"
    return None


@dataclass
class DecodeStats:
    """What one :func:`decode` call did."""
    rows: int = 0              # completions produced
    new_tokens: int = 0        # tokens generated (stop tokens included)
    steps: int = 0             # forward passes of one token per row
    row_steps: int = 0         # rows x steps summed: decoding work done (== new_tokens minus first tokens)
    prefills: int = 0          # prefill forward passes (one per admission of waiting prompts)
    step: str = ""             # what ran a decode step: "llama" (LlamaStep) or "model" (the model's forward)
    matmul: str = ""           # the dtype of the matrix products: the weights' own, or bfloat16
    seconds: float = 0.0


def _layer_class():
    from transformers.cache_utils import CacheLayerMixin

    class _Layer(CacheLayerMixin):
        """One layer's keys and values in a buffer ``[rows, heads, capacity, head_dim]`` of which ``n``
        columns are in use: the model's attention writes its new column in place instead of concatenating a
        new cache. ``keys`` / ``values`` are views of the used columns."""

        is_sliding = False

        def __init__(self):
            super().__init__()
            self.k = self.v = None
            self.n = 0

        def lazy_initialization(self, key_states, value_states) -> None:
            self.is_initialized = True

        def set(self, k, v, n: int) -> None:
            self.k, self.v, self.n, self.is_initialized = k, v, n, True
            self.keys, self.values = k[:, :, :n], v[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            s = key_states.shape[-2]
            if self.k is None:  # a prefill's own cache: exactly its width
                self.set(key_states, value_states, s)
                return self.keys, self.values
            if self.n + s > self.k.shape[-2]:
                raise RuntimeError("decode cache overflow")  # _Engine sizes the buffer: a bug if reached
            self.k[:, :, self.n:self.n + s] = key_states
            self.v[:, :, self.n:self.n + s] = value_states
            self.set(self.k, self.v, self.n + s)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.n

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.n + query_length, 0

        def get_max_length(self) -> int:
            return -1

    return _Layer


def _cache(n_layers: int):
    from transformers.cache_utils import Cache

    layer = _layer_class()
    return Cache(layers=[layer() for _ in range(n_layers)])


def pick_tokens(logits, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                top_p: float = 1.0, generator=None):
    """Next token per row: argmax, or a sample after temperature, top-k and top-p (nucleus: the smallest set
    of tokens whose probability reaches ``top_p``, the most likely always kept), as transformers does."""
    import torch

    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # the mass before a token already reaches top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # Inverse-CDF: one uniform per row against the running sum. torch.multinomial draws an exponential for
    # every vocabulary entry (20 ms at 16 rows x 49k tokens here, a tenth of a decode step); this takes 1 ms.
    # Summed in float64 so that the ~49k additions lose nothing a float32 probability can express.
    cdf = logits.softmax(-1).double().cumsum(-1)
    u = torch.rand((cdf.shape[0], 1), generator=generator, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


# oneDNN's packed layout pays off only for layers big enough; measured at 16 rows (AMD EPYC, 2 threads), a
# 576 -> 192 projection ran slower packed (49 vs 34 us) while 576 -> 576 and larger ran 1.4-3x faster.
_PACK_MIN_FEATURES = 256


def _packer(rows: int, dtype=None):
    """``pack(weight, bias=None)``: a function multiplying by a copy of ``weight`` that oneDNN has reordered
    for ``rows`` rows (``torch.ops.mkldnn._linear_pointwise``, what torch.compile's CPU freezing uses), or
    ``None`` where that does not apply: oneDNN missing, not fp32 on the CPU, or too small to gain.

    ``dtype`` bfloat16: the copy is bf16 (packed where oneDNN does bf16, else a plain bf16 product) and the
    function takes and returns fp32, so that only the matrix products round to bf16; it never returns
    ``None``. On a CPU with AMX a bf16 product at decode sizes is 2-4x faster than the fp32 one
    (docs/EXPERIMENTS.md); on one without native bf16 it is slower."""
    import torch

    mkldnn = getattr(torch.ops, "mkldnn", None)
    can_pack = torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
    if dtype == torch.bfloat16:
        can_pack = can_pack and mkldnn._is_mkldnn_bf16_supported()

        def pack_bf16(weight, bias=None):
            w = weight.detach().to(torch.bfloat16).contiguous()
            b = None if bias is None else bias.detach().to(torch.bfloat16)
            if can_pack and min(w.shape) >= _PACK_MIN_FEATURES:
                product = functools.partial(_packed_matmul, mkldnn._linear_pointwise,
                                            mkldnn._reorder_linear_weight(w, rows), b)
            else:
                product = functools.partial(torch.nn.functional.linear, weight=w, bias=b)
            return functools.partial(_in_dtype, product, torch.bfloat16)
        return pack_bf16
    if dtype not in (None, torch.float32):
        raise ValueError(f"matmul dtype {dtype}: expected None, torch.float32 or torch.bfloat16")
    if not can_pack:
        return lambda weight, bias=None: None

    def pack(weight, bias=None):
        if (weight.dtype != torch.float32 or weight.device.type != "cpu"
                or min(weight.shape) < _PACK_MIN_FEATURES):
            return None
        w = mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)
        return functools.partial(_packed_matmul, mkldnn._linear_pointwise, w,
                                 None if bias is None else bias.detach())
    return pack


def _packed_matmul(linear, weight, bias, x):
    # ``linear`` is bound once per packing: every decoded token runs this for each packed layer.
    return linear(x, weight, bias, "none", [], "")  # any leading dimensions, as F.linear


def _in_dtype(product, dtype, x):
    return product(x.to(dtype)).to(x.dtype)


def resolve_decode_dtype(choice: str):
    """The dtype :func:`decode` multiplies in for a config's ``decode_dtype``: ``None`` (the weights' own) for
    ``model``, bf16 for ``bfloat16``, and for ``auto`` bf16 where the CPU has AMX (bf16 products 2-4x faster than
    fp32 at decode sizes, measured) and the weights' own elsewhere (without native bf16 they are slower)."""
    import torch

    if choice == "model":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    if choice == "auto":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return torch.bfloat16 if amx is not None and amx() else None
    raise ValueError(f"decode_dtype {choice!r}: expected one of {', '.join(DECODE_DTYPES)}")


DECODE_DTYPES = ("model", "bfloat16", "auto")


@contextlib.contextmanager
def packed_linears(model, rows: int, dtype=None):
    """Within the block, every ``nn.Linear`` of ``model`` that :func:`_packer` packs multiplies with its
    oneDNN-packed copy (bf16 products with ``dtype`` bfloat16: then every layer, small ones unpacked). In fp32
    logits differ from the plain matmul's by rounding only (~1e-5); the copies cost the weights' size in memory
    while the block runs, and ~0.2 s to make for a 135M model. Other layers run as they are. Inference only:
    the packed weight is a snapshot, not a parameter."""
    import torch

    pack, patched = _packer(rows, dtype), []
    try:
        for mod in model.modules():
            if type(mod) is torch.nn.Linear and (forward := pack(mod.weight, mod.bias)) is not None:
                mod.forward = forward
                patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward  # the class's forward again


class LlamaStep:
    """The forward of a Llama model (``LlamaForCausalLM``: SmolLM2, Llama-3.x) written out over the engine's
    cache buffers, for decode steps and prefills. Through the model's own forward a decode step ran ~25 module
    calls and mask/cache bookkeeping per layer; here q, k and v are one product, gate and up another, and a
    layer is ~20 tensor operations: 1.3-1.4x faster a step at 2-16 rows on the CPU recipe, and prefills use
    the packed weights too (docs/EXPERIMENTS.md). Weights are fused (and oneDNN-packed for the call's row
    count where big enough) once per :func:`decode` call. :meth:`build` returns ``None`` for anything else
    (other architectures, biases, an unmerged adapter, non-fp32 weights): the engine then runs the model's
    forward, which is always right; this is only faster."""

    def __init__(self, inner, weight, rows: int, dtype=None):
        import torch

        cfg, m = inner.config, inner.model
        self.torch, self.F = torch, torch.nn.functional
        self.rope = m.rotary_emb
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = m.layers[0].self_attn.head_dim
        self.inter = cfg.intermediate_size
        pack = _packer(rows, dtype)

        def prep(w):
            return pack(w) or functools.partial(self.F.linear, weight=w)

        self.layers = []
        for layer in m.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                prep(torch.cat([weight(att.q_proj), weight(att.k_proj), weight(att.v_proj)])),
                prep(weight(att.o_proj)), att.scaling,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                prep(torch.cat([weight(mlp.gate_proj), weight(mlp.up_proj)])), prep(weight(mlp.down_proj))))
        self.norm, self.eps = m.norm.weight, m.norm.variance_epsilon
        self.embed, self.head = m.embed_tokens.weight, prep(weight(inner.lm_head))

    @classmethod
    def build(cls, model, rows: int, dtype=None) -> "LlamaStep | None":
        """The step for ``model`` decoding ``rows`` rows at most (its matrix products in ``dtype``, default the
        weights' fp32), or ``None`` when it does not apply."""
        import torch
        from transformers.models.llama import modeling_llama as ml

        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = getattr(inner, "config", None)
        if (type(inner) is not ml.LlamaForCausalLM or cfg.hidden_act != "silu" or cfg.attention_bias
                or cfg.mlp_bias or (getattr(cfg, "pretraining_tp", 1) or 1) != 1):
            return None
        m = inner.model
        if (type(m.embed_tokens) is not torch.nn.Embedding or type(m.norm) is not ml.LlamaRMSNorm
                or any(type(layer) is not ml.LlamaDecoderLayer or type(layer.mlp) is not ml.LlamaMLP
                       or type(layer.self_attn) is not ml.LlamaAttention for layer in m.layers)):
            return None
        linears = [inner.lm_head] + [getattr(layer.self_attn, n) for layer in m.layers for n in ("q_proj", "k_proj",
                   "v_proj", "o_proj")] + [getattr(layer.mlp, n) for layer in m.layers for n in ("gate_proj",
                   "up_proj", "down_proj")]
        weights = [_effective_weight(mod) for mod in linears]
        if any(w is None for w in weights) or any(
                p.dtype != torch.float32 or p.device.type != "cpu" for p in [m.embed_tokens.weight, *weights]):
            return None
        return cls(inner, _effective_weight, rows, dtype)

    def _rms(self, h, weight, eps):
        return h * self.torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight

    def __call__(self, ids, pos, cache_layers, n: int, mask):
        """Last-token logits ``[rows, vocab]`` after the tokens ``ids[r]`` (``[rows, tokens]``) at positions
        ``pos[r]``, whose keys and values go into columns ``n, n + 1, ...`` of the cache buffers; each token
        attends to the columns before its own and itself, except those where ``mask[r]`` (``[rows, n + tokens]``)
        is False: padding, or another row's past. One token a row is a decode step; more is a prefill."""
        torch, F = self.torch, self.F
        H, KV, hd = self.heads, self.kv_heads, self.head_dim
        (B, S), G, half, qk_w = ids.shape, H // KV, hd // 2, (H + KV) * hd
        T = n + S
        h = self.embed[ids]
        cos, sin = self.rope(h, pos)  # [B, S, hd]: the model's own rotary (any rope scaling)
        cos, sin = cos[:, :, None], sin[:, :, None]
        allowed = mask[:, None, :T]
        if S > 1:  # causal: token i sees the columns up to n + i; a padding token sees itself at least, so
            # that no row of scores is all -inf (its NaN would reach every later key through the cache)
            cols, own = torch.arange(T)[None, :], n + torch.arange(S)[:, None]
            allowed = (allowed | (cols == own)[None]) & (cols <= own)[None]
        bias = torch.zeros(allowed.shape, dtype=h.dtype).masked_fill_(~allowed, float("-inf"))  # [B, S or 1, T]
        bias = bias[:, None, None].expand(B, 1, G, allowed.shape[1], T).reshape(B, 1, -1, T)
        for (n1, e1, qkv_proj, o_proj, scale, n2, e2, gate_up, down), layer in zip(self.layers, cache_layers):
            qkv = qkv_proj(self._rms(h, n1, e1))
            qk = qkv[..., :qk_w].view(B, S, H + KV, hd)  # queries and keys rotate together
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            layer.k[:, :, n:T] = qk[:, :, H:].transpose(1, 2)
            layer.v[:, :, n:T] = qkv[..., qk_w:].view(B, S, KV, hd).transpose(1, 2)
            # Grouped-query attention without repeating keys: the G query heads of a group share theirs.
            q = qk[:, :, :H].reshape(B, S, KV, G, hd).permute(0, 2, 3, 1, 4).reshape(B, KV, G * S, hd)
            s = torch.matmul(q, layer.k[:, :, :T].transpose(-1, -2)).mul_(scale).add_(bias)
            o = torch.matmul(s.softmax(-1), layer.v[:, :, :T])  # [B, KV, G * S, hd]
            h = h + o_proj(o.view(B, KV, G, S, hd).permute(0, 3, 1, 2, 4).reshape(B, S, H * hd))
            gu = gate_up(self._rms(h, n2, e2))
            h = h + down(F.silu(gu[..., :self.inter]) * gu[..., self.inter:])
        return self.head(self._rms(h[:, -1], self.norm, self.eps))


def _effective_weight(mod):
    """The weight ``mod`` multiplies by: a bias-free ``nn.Linear``'s, or a PEFT LoRA layer's base weight when
    every adapter it would apply is merged into it; else ``None``."""
    import torch

    if type(mod) is torch.nn.Linear:
        return mod.weight if mod.bias is None else None
    base = getattr(mod, "base_layer", None)
    if type(base) is not torch.nn.Linear or base.bias is not None or not hasattr(mod, "merged_adapters"):
        return None
    if getattr(mod, "disable_adapters", False):  # PEFT unmerges in forward when adapters are disabled
        return None if mod.merged_adapters else base.weight
    own = {a for a in mod.active_adapters if a in getattr(mod, "lora_A", {})}
    return base.weight if own <= set(mod.merged_adapters) else None


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all ``prompts`` share, less one so that every prompt keeps a token of
    its own to prefill (the last prompt token's logits pick the first new token)."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


class _Engine:
    """The running batch: one cache buffer per layer, ``mask[row, column]`` marking real tokens (padding
    and the columns before a row's first token are False), each row's next position and latest token."""

    def __init__(self, model, prompts, max_new_tokens, stop_ids, pad_id, max_rows, pick, fast=None):
        import torch

        self.torch = torch
        self.model, self.prompts, self.pick, self.fast = model, prompts, pick, fast
        self.max_new, self.pad_id, self.max_rows = max_new_tokens, pad_id, max(1, max_rows)
        self.stops = torch.tensor(sorted(set(stop_ids)) or [-1], dtype=torch.long)
        self.n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.cache = _cache(self.n_layers)
        self.rows: list[int] = []                         # prompt index of each running row
        self.mask = torch.zeros((0, 0), dtype=torch.bool)  # [rows, capacity]
        self.pos = torch.zeros(0, dtype=torch.long)        # position id of each row's next token
        self.last = torch.zeros(0, dtype=torch.long)       # each row's latest token (the next step's input)
        self.alive = torch.zeros(0, dtype=torch.bool)      # False once a row has ended (until it is dropped)
        self.made = torch.zeros(0, dtype=torch.long)       # tokens each row has generated (exact while alive)
        self.out: list[list[int]] = [[] for _ in prompts]
        self.stats = DecodeStats(rows=len(prompts), step="llama" if fast else "model")
        self.progress, self.started, self.logged = False, time.time(), time.time()
        # The prefix every prompt shares (the system prompt and chat header: ~70 of ~100 tokens here) is
        # run once per call; each admission prefills only the prompts' own tokens after it.
        self.prefix = self.prompts[0][:common_prefix(self.prompts)]
        self.prefix_kv = None
        if self.prefix:
            fresh = _cache(self.n_layers)
            P = len(self.prefix)
            self._prefill(torch.tensor([self.prefix]), torch.ones((1, P), dtype=torch.bool),
                          torch.arange(P)[None], fresh, 0)
            self.prefix_kv = [(layer.k, layer.v) for layer in fresh.layers]

    # ------------------------------------------------------------------ admission
    def admit(self, idx: list[int]) -> None:
        """Prefill the prompts ``idx`` (each distinct prompt once, after the shared prefix), pick their first
        tokens and place their caches beside the running rows' (finished rows leave in the same copy)."""
        torch = self.torch
        keep = self._forget_finished()
        keys: dict[tuple, int] = {}
        which = [keys.setdefault(tuple(self.prompts[i]), len(keys)) for i in idx]
        P = len(self.prefix)
        tails = [list(d[P:]) for d in keys]
        S = max(len(t) for t in tails)
        ids = torch.full((len(tails), S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(tails), P + S), dtype=torch.bool)
        mask[:, :P] = True
        for r, t in enumerate(tails):  # left-padded after the prefix: every tail ends at the last column
            ids[r, S - len(t):] = torch.tensor(t, dtype=torch.long)
            mask[r, P + S - len(t):] = True
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]
        fresh = _cache(self.n_layers)
        if P:
            for layer, (k, v) in zip(fresh.layers, self.prefix_kv):
                shape = (len(tails), k.shape[1], P + S, k.shape[3])
                kb, vb = k.new_empty(shape), v.new_empty(shape)
                kb[:, :, :P], vb[:, :, :P] = k, v
                layer.set(kb, vb, P)
        logits = self._prefill(ids, mask, pos, fresh, P)
        sel = torch.tensor(which, dtype=torch.long)
        first = self.pick(logits[sel])
        # New layout: the running rows keep the columns any of them still uses, right-aligned; the new rows'
        # block goes beside them, right-aligned too, so that every row writes its next token at column n.
        n_old = self.cache.layers[0].n
        old_w = n_old - self._first_used(n_old) if self.rows else 0
        width = max(old_w, P + S)
        cap = width + self.max_new + 1  # every row admitted now ends within max_new more columns
        b_old, b = len(self.rows), len(self.rows) + len(idx)
        for layer, new in zip(self.cache.layers, fresh.layers):
            # Columns from ``width`` on are written by a step before any row reads them; those before it that a
            # row does not use are masked, and must still hold numbers (0 x NaN would poison the attention).
            k = new.k.new_empty((b, new.k.shape[1], cap, new.k.shape[3]))
            v = torch.empty_like(k)
            k[:, :, :width].zero_()
            v[:, :, :width].zero_()
            if b_old:  # the kept rows' used columns only: one gather, one write
                k[:b_old, :, width - old_w:width] = layer.k[keep, :, n_old - old_w:n_old]
                v[:b_old, :, width - old_w:width] = layer.v[keep, :, n_old - old_w:n_old]
            k[b_old:, :, width - P - S:width] = new.k[sel, :, :P + S]
            v[b_old:, :, width - P - S:width] = new.v[sel, :, :P + S]
            layer.set(k, v, width)
        m = torch.zeros((b, cap), dtype=torch.bool)
        if b_old:
            m[:b_old, width - old_w:width] = self.mask[:, n_old - old_w:n_old]
        m[b_old:, width - P - S:width] = mask[sel]
        self.mask = m
        self.pos = torch.cat([self.pos, pos[sel, -1] + 1])
        self.alive = torch.cat([self.alive, torch.ones(len(idx), dtype=torch.bool)])
        self.made = torch.cat([self.made, torch.ones(len(idx), dtype=torch.long)])
        self.last = torch.cat([self.last, first])
        self.rows += idx
        self.stats.new_tokens += len(idx)
        for r, i in enumerate(idx):
            self.out[i].append(int(first[r]))

    def _prefill(self, ids, mask, pos, fresh, n: int):
        """Run ``ids`` (``[rows, tokens]``, left-padded) into the cache ``fresh``, whose first ``n`` columns may
        already hold a shared prefix; the last token's logits."""
        self.stats.prefills += 1
        if self.fast is None:
            return self.model(input_ids=ids, attention_mask=mask.long(), position_ids=pos, cache=fresh,
                              use_cache=True, logits_to_keep=1).logits[:, -1]
        if n == 0:  # the written-out step writes into buffers: give it ones exactly as wide as the prompts
            shape = (ids.shape[0], self.fast.kv_heads, ids.shape[1], self.fast.head_dim)
            for layer in fresh.layers:
                layer.set(self.fast.embed.new_empty(shape), self.fast.embed.new_empty(shape), 0)
        logits = self.fast(ids, pos, fresh.layers, n, mask)
        for layer in fresh.layers:
            layer.set(layer.k, layer.v, n + ids.shape[1])
        return logits

    def _first_used(self, n: int) -> int:
        """The first column some running row still attends to."""
        return int(self.mask[:, :n].any(0).int().argmax())

    # ------------------------------------------------------------------ leaving
    def finish(self) -> None:
        """Rows whose latest token ends them (a stop token or the length cap) stop being alive; they stay in
        the batch, decoding nothing that is kept, until :meth:`drop` copies the cache without them."""
        self.alive &= ~(self.torch.isin(self.last, self.stops) | (self.made >= self.max_new))

    def log_progress(self, waiting: int) -> None:
        now = time.time()
        if self.progress and now - self.logged >= 30:
            self.logged = now
            log.info("generated %d/%d completions (%.0f new tokens/s)", len(self.prompts) - waiting - len(self.rows),
                     len(self.prompts), self.stats.new_tokens / (now - self.started))

    def _forget_finished(self):
        """Drop the finished rows from the row bookkeeping (not from the cache); the indices of the kept
        rows in the cache."""
        keep = self.alive.nonzero().flatten()
        self.rows = [self.rows[i] for i in keep.tolist()]
        self.pos, self.last, self.alive, self.mask = self.pos[keep], self.last[keep], self.alive[keep], self.mask[keep]
        self.made = self.made[keep]
        if not self.rows:
            self.cache = _cache(self.n_layers)
        return keep

    def drop(self) -> None:
        """Copy the cache without the finished rows and without the columns that only they used."""
        keep = self._forget_finished()
        if not self.rows:
            return
        n = self.cache.layers[0].n
        lo = self._first_used(n)
        self.mask = self.mask[:, lo:]
        for layer in self.cache.layers:
            layer.set(layer.k[keep, :, lo:], layer.v[keep, :, lo:], n - lo)

    # ------------------------------------------------------------------ one step
    def step(self) -> None:
        n = self.cache.layers[0].n
        self.mask[:, n] = True
        if self.fast is not None:
            logits = self.fast(self.last[:, None], self.pos[:, None], self.cache.layers, n, self.mask[:, :n + 1])
            for layer in self.cache.layers:
                layer.set(layer.k, layer.v, n + 1)
        else:
            logits = self.model(input_ids=self.last.unsqueeze(1), attention_mask=self.mask[:, :n + 1].long(),
                                position_ids=self.pos.unsqueeze(1), cache=self.cache,
                                use_cache=True).logits[:, -1]
        self.stats.steps += 1
        self.stats.row_steps += int(self.alive.sum())
        self.pos += 1
        self.made += 1  # finished rows count on too, harmlessly: they are no longer alive
        self.last = self.pick(logits)
        alive = self.alive.nonzero().flatten().tolist()
        self.stats.new_tokens += len(alive)
        for r in alive:
            self.out[self.rows[r]].append(int(self.last[r]))

    # ------------------------------------------------------------------ loop
    def run(self) -> list[list[int]]:
        queue = list(range(len(self.prompts)))
        # Admit waiting prompts once an eighth of the rows are free, and copy a finished row out of the cache
        # once an eighth have finished: each admission is a prefill plus a copy of the cache, each drop a copy,
        # either costing about what decoding a few rows for a step does (scripts/bench_eval.py).
        every = max(1, self.max_rows // 8)
        while True:
            self.finish()
            self.log_progress(len(queue))
            alive = int(self.alive.sum())
            free = self.max_rows - alive
            if queue and (not alive or free >= min(every, len(queue))):
                take, queue = queue[:free], queue[free:]
                self.admit(take)
                self.finish()  # a first token may already end a row
                if not bool(self.alive.any()):
                    continue
            elif not alive:
                break
            elif len(self.rows) - alive >= max(1, len(self.rows) // 8):
                self.drop()
            self.step()
        return self.out


def decode(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
           max_rows: int = 16, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
           top_p: float = 1.0, generator=None, progress: bool = False,
           matmul_dtype=None) -> tuple[list[list[int]], DecodeStats]:
    """Completions of ``prompts`` (token ids, no padding), each up to and including its first stop token or
    ``max_new_tokens`` long, in the prompts' order; at most ``max_rows`` decoded together. Greedy unless
    ``do_sample``. The caller has checked :func:`supported` and puts the model in eval mode. ``progress`` logs
    the completions done and tokens/s about every 30 seconds. ``matmul_dtype`` bfloat16 (a config's
    ``decode_dtype`` through :func:`resolve_decode_dtype`) rounds the fp32 weights and the inputs of every matrix
    product to bf16; the rest stays fp32."""
    import torch

    started = time.time()
    if not prompts:
        return [], DecodeStats()
    if max_new_tokens <= 0:
        return [[] for _ in prompts], DecodeStats(rows=len(prompts))

    def pick(logits):
        return pick_tokens(logits, do_sample, temperature, top_k, top_p, generator)

    rows = min(max_rows, len(prompts))
    with torch.inference_mode():
        fast = LlamaStep.build(model, rows, matmul_dtype)
    # The written-out step has its own packed weights; other models pack their layers in place.
    with torch.inference_mode(), (contextlib.nullcontext() if fast else packed_linears(model, rows, matmul_dtype)):
        engine = _Engine(model, [list(p) for p in prompts], max_new_tokens, stop_ids, pad_id, max_rows, pick, fast)
        engine.progress = progress
        engine.stats.matmul = str(matmul_dtype or next(model.parameters()).dtype).removeprefix("torch.")
        out = engine.run()
    engine.stats.seconds = time.time() - started
    return out, engine.stats
