"""The GRPO loss pass with each prompt run once per group: :func:`packed_group_logps`.

GRPO trains on ``num_generations`` completions of the same prompt; the usual batch repeats the prompt in every
row and pads every completion to the longest, so most of the forward and backward work goes to the same prompt
tokens again and to padding. Here each group becomes one row: the prompt, then its completions one after the
other at their own lengths, positions restarting after the prompt for each completion. A completion sees the
prompt and its own earlier tokens, never another completion: :func:`block_attention` computes exactly those
blocks (the prompt's causal square, and per completion its queries against the prompt's keys and its own),
where one attention over the packed row with a block mask computes the whole square: 0.34 s of attention
against 0.55 s in the forward and backward of 8 completions (425 tokens) behind a 110-column prompt
(docs/EXPERIMENTS.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

# The name under which block_attention is registered with transformers' AttentionInterface.
BLOCK_ATTENTION = "ecg_packed_blocks"


def group_rows(prompt_ids, prompt_mask) -> list[Any]:
    """Indices of the rows that share a prompt (identical padded prompt and mask), one tensor per prompt,
    in order of first appearance."""
    import torch

    key = torch.cat([prompt_ids, prompt_mask], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    order = list(dict.fromkeys(inverse.tolist()))
    return [(inverse == g).nonzero().flatten() for g in order]


@dataclass
class Blocks:
    """Where the prompts and completions sit in ``groups x length`` packed rows, as index tensors that every
    layer's :func:`block_attention` reuses.

    ``prompt``: ``[groups, p, p]`` bool, causal over each group's real prompt tokens (left padding masked;
    a padding query sees itself, so that no row of scores is all -inf). ``comp_group``: ``[n]`` each
    completion's group. ``comp_cols``: ``[n, m]`` the packed columns of each completion's tokens, padded to the
    longest ``m`` by repeating its last column (never read back). ``comp``: ``[n, 1, m, p + m]`` bool, what a
    completion token sees among its group's prompt columns then its own. ``out_index``: ``[groups * length]``
    the row of ``cat(prompt outputs, completion outputs)`` that each packed column takes its output from
    (columns past a group's last completion take row 0: never read)."""

    p: int
    prompt: Any
    comp_group: Any
    comp_cols: Any
    comp: Any
    out_index: Any


def block_layout(prompt_mask, slots: list[tuple[int, int, int]], length: int) -> Blocks:
    """``prompt_mask``: ``[groups, p]`` bool, each group's prompt columns that are real tokens; ``slots``:
    ``(group, start column, tokens)`` per non-empty completion, in packed order."""
    import torch

    device = prompt_mask.device
    groups, p = prompt_mask.shape
    m = max((k for _, _, k in slots), default=1)
    eye_p = torch.eye(p, dtype=torch.bool, device=device)
    prompt = (torch.ones((p, p), dtype=torch.bool, device=device).tril()[None] & prompt_mask[:, None, :]) | eye_p
    n = len(slots)
    comp_group = torch.tensor([g for g, _, _ in slots], dtype=torch.long, device=device)
    j = torch.arange(m, device=device)
    comp_cols = (torch.stack([s + j.clamp(max=k - 1) for _, s, k in slots]) if slots
                 else torch.zeros((0, m), dtype=torch.long, device=device))
    causal = torch.ones((m, m), dtype=torch.bool, device=device).tril()
    comp = torch.cat([prompt_mask[comp_group][:, None, :].expand(n, m, p), causal.expand(n, m, m)], dim=-1)[:, None]
    out_index = torch.zeros(groups * length, dtype=torch.long, device=device)
    out_index.view(groups, length)[:, :p] = torch.arange(groups * p, device=device).view(groups, p)
    for i, (g, s, k) in enumerate(slots):
        out_index[g * length + s:g * length + s + k] = groups * p + i * m + torch.arange(k, device=device)
    return Blocks(p, prompt, comp_group, comp_cols, comp, out_index)


def block_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    ecg_blocks: Blocks | None = None, **kwargs):
    """Attention over packed groups, block by block (transformers' attention-function signature: ``query``
    ``[groups, heads, length, dim]``, ``key`` / ``value`` ``[groups, kv_heads, length, dim]``; returns
    ``([groups, length, heads, dim], None)``). ``attention_mask`` is the equivalent full block mask, unused
    here: ``ecg_blocks`` says the same in the form this needs."""
    import torch

    if ecg_blocks is None:
        raise RuntimeError(f"{BLOCK_ATTENTION} attention runs only inside packed_group_logps")
    b, sdpa = ecg_blocks, torch.nn.functional.scaled_dot_product_attention
    groups, heads, length, dim = query.shape
    gqa = key.shape[1] != heads
    p, (n, m) = b.p, b.comp_cols.shape
    out_p = sdpa(query[:, :, :p], key[:, :, :p], value[:, :, :p], attn_mask=b.prompt[:, None], dropout_p=dropout,
                 scale=scaling, enable_gqa=gqa)  # [groups, heads, p, dim]
    rows = out_p.transpose(1, 2).reshape(groups * p, heads * dim)
    if n:  # else every completion is empty
        flat = (b.comp_cols + (b.comp_group * length)[:, None]).flatten()

        def own(t):  # [groups, h, length, dim] -> each completion's columns, [n, h, m, dim]
            cols = t.transpose(1, 2).reshape(groups * length, t.shape[1], dim).index_select(0, flat)
            return cols.view(n, m, -1, dim).transpose(1, 2)

        k = torch.cat([key[:, :, :p].index_select(0, b.comp_group), own(key)], dim=2)
        v = torch.cat([value[:, :, :p].index_select(0, b.comp_group), own(value)], dim=2)
        out_c = sdpa(own(query), k, v, attn_mask=b.comp, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        rows = torch.cat([rows, out_c.transpose(1, 2).reshape(n * m, heads * dim)])
    return rows.index_select(0, b.out_index).view(groups, length, heads, dim), None


@contextlib.contextmanager
def blocks_attention(model):
    """Within the block, ``model``'s attention layers run :func:`block_attention` (registered with
    transformers' AttentionInterface, a dict update); the implementation it had is restored after. A layer
    that gradient checkpointing recomputes in the backward pass would run that one instead:
    :func:`packed_group_logps` does not use this block then."""
    from transformers import AttentionInterface

    AttentionInterface.register(BLOCK_ATTENTION, block_attention)
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = BLOCK_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def packed_group_logps(model, input_ids, attention_mask, logits_to_keep: int, temperature: float,
                       compute_entropy: bool = False):
    """Per-token log-probabilities (and entropies) of the completions, with each prompt run once per group
    (module docstring). The logits, and so the gradient, are those of the unpacked rows (up to float
    rounding); the prompt's activations are computed once and receive the group's summed gradient.

    ``input_ids`` / ``attention_mask``: prompts (left-padded) then completions (right-padded, the last
    ``logits_to_keep`` columns), as TRL builds them. The model's attention implementation (sdpa or eager)
    is replaced by :func:`block_attention` for this pass on Llama models that do not checkpoint their layers
    (others run their own implementation with the full block mask). Returns ``(logps, entropies or None)``,
    each ``rows x logits_to_keep``, rows in the input order, 0 at padding.
    """
    import torch

    n, width = input_ids.shape
    c = logits_to_keep
    p = width - c
    device = input_ids.device
    prompt_ids, prompt_mask = input_ids[:, :p], attention_mask[:, :p].bool()
    comp_ids = input_ids[:, p:]
    # A completion's real tokens are a prefix of its columns (up to and including its end token).
    lengths = attention_mask[:, p:].sum(dim=1).tolist()
    groups = group_rows(prompt_ids, prompt_mask.long())
    length = p + max(sum(lengths[r] for r in g.tolist()) for g in groups)
    packed = torch.zeros((len(groups), length), dtype=input_ids.dtype, device=device)
    positions = torch.zeros((len(groups), length), dtype=torch.long, device=device)
    allowed = torch.zeros((len(groups), length, length), dtype=torch.bool, device=device)
    causal = torch.ones((max(p, c), max(p, c)), dtype=torch.bool, device=device).tril()
    slots = []  # (group, row, start column, length)
    for g, rows in enumerate(groups):
        pm = prompt_mask[rows[0]]
        packed[g, :p] = prompt_ids[rows[0]]
        positions[g, :p] = (pm.long().cumsum(0) - 1).clamp(min=0)
        allowed[g, :p, :p] = causal[:p, :p] & pm[None, :]
        n_prompt = int(pm.sum())
        start = p
        for r in rows.tolist():
            m = lengths[r]
            packed[g, start:start + m] = comp_ids[r, :m]
            positions[g, start:start + m] = n_prompt + torch.arange(m, device=device)
            allowed[g, start:start + m, :p] = pm[None, :]
            allowed[g, start:start + m, start:start + m] = causal[:m, :m]
            slots.append((g, r, start, m))
            start += m
    # Every query sees at least itself: a padding position with nothing to attend to would give NaN.
    allowed |= torch.eye(length, dtype=torch.bool, device=device)
    mask4d, extra, attention = allowed[:, None], {}, contextlib.nullcontext()
    from accelerate.utils import extract_model_from_parallel

    # the model under a DDP or DeepSpeed wrapper (the forward still goes through the wrapper)
    inner = extract_model_from_parallel(model, keep_fp32_wrapper=True)
    if inner.config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask4d = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min)[:, None]
    # Checkpointed layers are recomputed in the backward pass, after the model's own attention is back, and
    # must save what the first pass saved: then the full block mask throughout. Block attention knows plain
    # Llama attention only (no sliding window, logit soft-capping or attention sinks).
    checkpointed = (inner.is_activation_checkpointing if hasattr(inner, "is_activation_checkpointing")
                    else getattr(inner, "is_gradient_checkpointing", False))
    if not checkpointed and getattr(inner.config, "model_type", None) == "llama":
        # the mask still goes along (transformers then builds none), but block_attention reads ``ecg_blocks``
        extra["ecg_blocks"] = block_layout(torch.stack([prompt_mask[g[0]] for g in groups]),
                                           [(g, s, m) for g, _, s, m in slots if m > 0], length)
        attention = blocks_attention(inner)
    # Hidden states from the last prompt column on: that column predicts each completion's first token.
    keep = torch.arange(p - 1, length, device=device)
    # In place: the output layer's backward needs its input and weight, not its output, and a second tensor the
    # size of all the logits (~80 MB here) costs more in fresh pages than the division itself.
    with attention:
        logits = model(input_ids=packed, attention_mask=mask4d, position_ids=positions, logits_to_keep=keep,
                       use_cache=False, **extra).logits.float().div_(temperature)
    logps = torch.zeros((n, c), dtype=torch.float32, device=device)
    entropies = torch.zeros((n, c), dtype=torch.float32, device=device) if compute_entropy else None
    # Each completion token's logits row: column start + j - 1 predicts token j, for j = 0 that is the prompt's
    # last column (logits row 0). All tokens are read with one index and one logsumexp over the whole block:
    # slicing the logits per completion instead made every slice's backward fill a zero tensor the size of
    # all the logits (49k x the packed length, ~80 MB), 2.5 s of a 16 s CPU step.
    index_g, index_row, index_r, index_t = [], [], [], []
    for g, r, start, m in slots:
        if m == 0:
            continue
        index_g += [g] * m
        index_row += [0, *range(start - p + 1, start - p + m)]
        index_r += [r] * m
        index_t += list(range(m))
    if not index_r:
        # every completion masked out (skip_tied_groups on a batch of tied groups): a zero loss that still
        # reaches the weights, so that backward runs (and every DDP process takes part in the reduction)
        return logps + 0.0 * logits.sum(), entropies
    gi, ri = torch.tensor(index_g, device=device), torch.tensor(index_row, device=device)
    ri_out, ti_out = torch.tensor(index_r, device=device), torch.tensor(index_t, device=device)
    # log_softmax is one fused pass each way, and its backward needs only its output (the logits can go);
    # logsumexp and a subtraction took 1.5x as long (forward and backward, 426 x 49k logits, EXPERIMENTS).
    log_probs = torch.log_softmax(logits, dim=-1)
    del logits
    lp = log_probs[gi, ri, comp_ids[ri_out, ti_out]]
    logps = logps.index_put((ri_out, ti_out), lp)
    if compute_entropy:
        with torch.no_grad():
            ent = -torch.einsum("glv,glv->gl", log_probs.exp(), log_probs)
        # under bf16 autocast (precision: bf16) the product comes back in bf16; the entropies stay fp32
        entropies = entropies.index_put((ri_out, ti_out), ent[gi, ri].to(entropies.dtype))
    return logps, entropies
