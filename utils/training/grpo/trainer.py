"""ECGGRPOTrainer: TRL's GRPOTrainer with faster generation, packed prompt groups and tied groups skipped.

On the transformers generation path, completions are sampled with the LoRA update merged into the fp32
weights (no adapter work per decoded token), and each prompt's prefill runs once for its group of
``num_generations`` completions, its KV cache then copied to the group's rows; on CPU by
:func:`utils.models.decode.decode` (a finished completion leaves the batch), else by ``model.generate``
(:func:`generate_grouped`). The log-probability pass likewise runs each group's shared prompt once
(:mod:`utils.training.grpo.packing`). ``fast_generation: false`` / ``pack_groups: false`` restore TRL's own
paths; vLLM, continuous batching, tools and multimodal inputs always use them.
``skip_tied_groups`` masks the completions of groups whose rewards all tie out of the loss; ``length_neutral``
takes out of each group's advantages what completion length explains.

The overrides are of private TRL methods (TRL gives no public hook for these); each is registered with
:func:`utils.training.trl_compat.overrides`, which records the TRL version and signature it was written
against, and a test fails when the installed TRL's method no longer matches.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from utils.core.config import UserError
from utils.models import decode
from utils.training.grpo.packing import group_rows, packed_group_logps
from utils.training.grpo.policy import _zero3
from utils.training.trl_compat import overrides, problems

log = logging.getLogger(__name__)


# ============================================================================= faster generation
@contextlib.contextmanager
def merged_adapter(model):
    """Sample with the LoRA update merged into the base weights: the per-token adapter matmuls go away.

    Vanilla LoRA (the recipes') merges into new tensors, ``W + s * B @ A``, that stand in for each base
    weight during the block; leaving it puts the frozen weight back as it was, to the bit. Subtracting the
    update again, as PEFT's unmerge does, would not: fp32 rounding moved about half of a weight's elements
    by ~2e-9 over 60 GRPO steps (docs/EXPERIMENTS.md), so the base drifted from ``models/base``. The price
    is a second copy of the adapted weights while sampling (~0.4 GB for SmolLM2-135M). Other adapters
    (DoRA, replicated layers) take PEFT's merge and unmerge. Only for fp32 weights: with bf16 or 4-bit
    weights PEFT's round trip would lose precision, so those generate with the adapter as it is. Not under
    ZeRO-3 (sharded weights).
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    ok = (bool(layers) and hasattr(model, "merge_adapter") and not _zero3()
          and all(getattr(m.get_base_layer(), "weight", None) is not None
                  and m.get_base_layer().weight.dtype == torch.float32 for m in layers)
          and not any(m.merged for m in layers))
    if not ok:
        yield model
        return
    # layer_replication shares one weight between layers: PEFT's merge handles (and refuses) that itself
    replicated = any(getattr(c, "layer_replication", None) for c in getattr(model, "peft_config", {}).values())
    plain = None if replicated else _plain_lora(layers)
    if plain is None:
        model.merge_adapter()
    else:
        frozen = _merge_lora(plain)
    try:
        yield model
    finally:
        if plain is None:
            model.unmerge_adapter()
        else:
            _restore(plain, frozen)


def _plain_lora(layers) -> list[tuple[Any, str]] | None:
    """``(layer, adapter)`` for every active adapter of ``layers`` when all are vanilla LoRA on ``nn.Linear``
    (no DoRA or other variant, no LoRA bias, no fan-in-fan-out weights, no offloading hook, adapter weights in
    the base weight's dtype and device), else ``None``."""
    import torch
    from peft.tuners.lora.layer import Linear

    out = []
    for m in layers:
        base = m.get_base_layer()
        if (type(m) is not Linear or m.fan_in_fan_out or type(base) is not torch.nn.Linear
                or hasattr(base, "_hf_hook")):
            return None
        for name in m.active_adapters:
            if name in m.lora_A:
                a, b = m.lora_A[name], m.lora_B[name]
                if (name in m.lora_variant or m.lora_bias[name] or type(a) is not torch.nn.Linear
                        or any(w.dtype != base.weight.dtype or w.device != base.weight.device
                               for w in (a.weight, b.weight))):
                    return None
                out.append((m, name))
    return out


def _merge_lora(pairs) -> dict:
    """Merge vanilla LoRA adapters as PEFT's merge does, but each layer's ``W + s * B @ A`` into a new tensor
    (one fused product a layer, where PEFT computes the update, scales it and adds it in three passes; PEFT's
    weights to rounding) that the base weight's parameter holds until :func:`_restore`. Returns ``{layer: its
    frozen weight's tensor}``."""
    import torch

    frozen = {}
    with torch.no_grad():
        for m, name in pairs:
            w = m.get_base_layer().weight
            frozen.setdefault(m, w.data)
            w.data = torch.addmm(w.data, m.lora_B[name].weight, m.lora_A[name].weight, alpha=m.scaling[name])
            m.merged_adapters.append(name)
    return frozen


def _restore(pairs, frozen: dict) -> None:
    """Undo :func:`_merge_lora`: each base weight's own tensor back, untouched; nothing to subtract (so an
    adapter that PEFT's unmerge took out meanwhile is handled too)."""
    for m, name in pairs:
        if name in m.merged_adapters:
            m.merged_adapters.remove(name)
    for m, data in frozen.items():
        m.get_base_layer().weight.data = data


def generate_grouped(model, prompt_ids: list[list[int]], generation_config, pad_token_id: int) -> "Any":
    """``model.generate`` for a batch in which prompts repeat (GRPO's groups): the prompts are left-padded,
    each distinct prompt's prefill (all but its last token) runs once, and its KV cache is copied to every
    row that asks it; generation then goes on from the last prompt token. Returns the generated ids
    (rows x new tokens), in the order of ``prompt_ids``."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    keys: dict[tuple, int] = {}
    rows = [keys.setdefault(tuple(p), len(keys)) for p in prompt_ids]
    distinct = [list(k) for k in keys]
    width = max(len(p) for p in distinct)
    ids = torch.full((len(distinct), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(distinct), width), dtype=torch.long)
    for i, p in enumerate(distinct):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    index = torch.tensor(rows, device=device)
    past = None
    if len(distinct) < len(prompt_ids) and width > 1:
        # The same positions as generate() derives from the mask, so the cached keys match what it would compute.
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        past = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids[:, :-1],
              past_key_values=past, use_cache=True, logits_to_keep=1)
        past.batch_select_indices(index)
    out = model.generate(input_ids=ids[index], attention_mask=mask[index], past_key_values=past,
                         generation_config=generation_config)
    return out[:, width:]


def _trim_after_eos(completion_ids, eos_token_ids: list[int]) -> list[list[int]]:
    """Each row up to and including its first end token (as TRL does after generate)."""
    import torch

    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long, device=completion_ids.device)
    eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
    seq = torch.arange(is_eos.size(1), device=completion_ids.device).expand(is_eos.size(0), -1)
    keep = seq <= eos_idx.unsqueeze(1)
    return [c[m].tolist() for c, m in zip(completion_ids.cpu(), keep.cpu())]


def tied_groups(rewards, weights, num_generations: int):
    """Per completion: whether its group's rewards all tie, reward by reward (the rewards that train, weight
    != 0; a completion a reward could not score, NaN, is left out of that reward's comparison). ``rewards``:
    completions x reward functions, the groups' completions consecutive, as TRL gathers them.

    >>> import torch
    >>> tied_groups(torch.tensor([[1.], [1.], [0.], [1.]]), torch.tensor([1.]), 2).tolist()
    [True, True, False, False]
    """
    import torch

    r = rewards[:, weights != 0].view(-1, num_generations, int((weights != 0).sum()))
    inf = torch.tensor(float("inf"), device=r.device)
    high = torch.where(r.isnan(), -inf, r).amax(dim=1)
    low = torch.where(r.isnan(), inf, r).amin(dim=1)
    # a reward with no score in the group (high = -inf) ties trivially
    tied = ((high - low).abs() <= 1e-6) | (high == -inf)
    return tied.all(dim=1).repeat_interleave(num_generations)


def drop_tied_groups(trainer, out: dict, rewards) -> dict:
    """``skip_tied_groups``: mask this process's completions of tied groups (:func:`tied_groups`) out of the
    loss and recount the tokens the loss averages over (TRL's ``num_items_in_batch``, over all processes)."""
    tied = tied_groups(rewards, trainer.reward_weights.to(rewards.device), trainer.num_generations)
    n = out["completion_mask"].size(0)
    start = trainer.accelerator.process_index * n
    keep = (~tied[start:start + n]).to(out["completion_mask"].device)
    out["completion_mask"] = out["completion_mask"] * keep.unsqueeze(1).to(out["completion_mask"].dtype)
    loss_mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
    out["num_items_in_batch"] = trainer.accelerator.gather(loss_mask.sum()).sum()
    trainer._metrics["train"]["skipped_tied_groups"].append(tied.view(-1, trainer.num_generations)[:, 0]
                                                            .float().mean().item())
    return out


def _centred_by_group(x, num_generations: int):
    """``x`` as groups x completions, each group's mean subtracted."""
    g = x.reshape(-1, num_generations).float()
    return g - g.mean(dim=1, keepdim=True)


def neutral_length_advantages(advantages, lengths, num_generations: int, strength: float = 1.0):
    """Per group of ``num_generations`` consecutive completions, take ``strength`` x the part of the advantages
    that a straight line in completion length explains out of them (least squares within the group). The
    group's mean advantage is kept; a group whose completions are all as long is left as it is. At strength 1
    a longer or shorter answer earns nothing for its length alone inside its group (its length may still
    change with what it says).

    >>> import torch
    >>> neutral_length_advantages(torch.tensor([-1., 1., -1., 1.]), torch.tensor([10., 20., 5., 5.]), 2).tolist()
    [0.0, 0.0, -1.0, 1.0]
    """
    import torch

    a = advantages.reshape(-1, num_generations).float()
    lc = _centred_by_group(lengths, num_generations)
    var = (lc * lc).sum(dim=1, keepdim=True)
    slope = torch.where(var > 0, (a * lc).sum(dim=1, keepdim=True) / var.clamp_min(1e-12), torch.zeros_like(var))
    return (a - strength * slope * lc).reshape(advantages.shape).to(advantages.dtype)


def length_correlation(advantages, lengths, num_generations: int) -> float | None:
    """Mean over groups whose completions differ in length of the Pearson correlation between a completion's
    advantage and its length (0 for a group whose advantages all tie): > 0 when the step pays for longer
    answers. None when every group's completions are equally long.

    >>> import torch
    >>> length_correlation(torch.tensor([-1., 1., 0., 0.]), torch.tensor([10., 20., 5., 9.]), 2)
    0.5
    """
    import torch

    a = _centred_by_group(advantages, num_generations)
    lc = _centred_by_group(lengths, num_generations)
    na, nl = a.norm(dim=1), lc.norm(dim=1)
    ok = nl > 0
    if not ok.any():
        return None
    corr = torch.where(na > 1e-9, (a * lc).sum(dim=1) / (na * nl).clamp_min(1e-12), torch.zeros_like(na))
    return corr[ok].mean().item()


def neutralise_length(trainer, out: dict) -> dict:
    """``length_neutral``: this process's advantages with their dependence on completion length removed group
    by group (:func:`neutral_length_advantages`), on every process's completions gathered (a group may span
    processes); logs ``advantage_length_corr`` before and ``..._after`` it."""
    mask = out["completion_mask"]
    n = mask.size(0)
    start = trainer.accelerator.process_index * n
    adv = trainer.accelerator.gather(out["advantages"])
    lengths = trainer.accelerator.gather(mask.sum(dim=1).to(adv.dtype))
    new = neutral_length_advantages(adv, lengths, trainer.num_generations, trainer.length_neutral)
    for key, a in (("advantage_length_corr", adv), ("advantage_length_corr_after", new)):
        corr = length_correlation(a, lengths, trainer.num_generations)
        if corr is not None:
            trainer._metrics["train"][key].append(corr)
    out["advantages"] = new[start:start + n]
    return out


def trainer_class():
    """:class:`ECGGRPOTrainer`, built on first use so that importing this module does not import trl."""
    global ECGGRPOTrainer
    if ECGGRPOTrainer is not None:
        return ECGGRPOTrainer
    import torch
    from trl import GRPOTrainer
    from trl.extras.profiling import profiling_context
    from trl.models import unwrap_model_for_generation
    from trl.trainer.grpo_trainer import split_tensor_dict

    class _Trainer(GRPOTrainer):
        """TRL's GRPOTrainer with the faster generation and the packed prompt groups of the module
        docstring; vLLM, continuous batching, tools and multimodal inputs keep TRL's own paths."""

        fast_generation = True
        decode_dtype = "model"
        pack_groups = True
        skip_tied_groups = False
        length_neutral = 0.0
        _rewards_seen = None

        def _packing(self) -> bool:
            # Not under ZeRO-3: every forward pass there gathers each layer's weights from all processes,
            # so all of them must run the same number of passes, and packing makes that number depend on
            # each process's groups.
            return (self.pack_groups and not self.tools and not self._is_vlm and not self.aux_loss_enabled
                    and not self._entropy_bonus_enabled and not _zero3()
                    and self.model.config._attn_implementation in ("sdpa", "eager"))

        @overrides("GRPOTrainer", ("self", "generation_batch"),
                   uses=("_step", "_buffered_inputs", "_generate_and_score_completions", "steps_per_generation"))
        def _prepare_inputs(self, generation_batch):
            # TRL shuffles a generation batch before cutting it into micro-batches; with one optimizer step
            # per generation batch (on-policy) the order does not change the update, and keeping each
            # prompt's group in one micro-batch is what lets the packed forward run the prompt once.
            if not self.model.training or not self._packing():
                return super()._prepare_inputs(generation_batch)
            generate_every = self.args.steps_per_generation * self.num_iterations
            if self._step % generate_every == 0 or self._buffered_inputs is None:
                batch = self._generate_and_score_completions(generation_batch)
                self._buffered_inputs = split_tensor_dict(batch, self.args.steps_per_generation)
            return self._buffered_inputs[self._step % self.args.steps_per_generation]

        @overrides("GRPOTrainer", ("self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size",
                                   "compute_entropy", "compute_aux_loss", "pixel_values", "image_grid_thw",
                                   "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                                   "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids"),
                   uses=("_is_vlm", "aux_loss_enabled", "_entropy_bonus_enabled", "temperature"))
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **multimodal):
            if compute_aux_loss or any(v is not None for v in multimodal.values()) or not self._packing():
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
            p = input_ids.size(1) - logits_to_keep
            groups = group_rows(input_ids[:, :p], attention_mask[:, :p])
            limit = max(batch_size or input_ids.size(0), max(len(g) for g in groups))
            chunks, current = [], []
            for g in groups:  # whole groups per forward pass, about batch_size rows each
                if current and sum(len(x) for x in current) + len(g) > limit:
                    chunks.append(torch.cat(current))
                    current = []
                current.append(g)
            chunks.append(torch.cat(current))
            logps = torch.zeros(input_ids.size(0), logits_to_keep, device=input_ids.device)
            entropies = torch.zeros_like(logps) if compute_entropy else None
            for rows in chunks:
                with self.accelerator.autocast():
                    lp, ent = packed_group_logps(model, input_ids[rows], attention_mask[rows], logits_to_keep,
                                                 self.temperature, compute_entropy)
                logps = logps.index_put((rows,), lp)
                if compute_entropy:
                    entropies = entropies.index_put((rows,), ent)
            return logps, entropies, None

        @overrides("GRPOTrainer", ("self", "inputs", "prompts", "completions", "completion_ids_list"))
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            # Kept for skip_tied_groups: the rewards of every process's completions, before aggregation.
            self._rewards_seen = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            return self._rewards_seen

        @overrides("GRPOTrainer", ("self", "inputs"), uses=("_metrics", "reward_weights", "num_generations"))
        def _generate_and_score_completions(self, inputs):
            self._rewards_seen = None
            out = super()._generate_and_score_completions(inputs)
            if self.length_neutral and self.model.training:
                out = neutralise_length(self, out)
            if self.skip_tied_groups and self.model.training and self._rewards_seen is not None:
                out = drop_tied_groups(self, out, self._rewards_seen)
            return out

        @overrides("GRPOTrainer", ("self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                                   "has_tool_images"),
                   uses=("use_transformers_continuous_batching", "_tokenizer", "eos_token_ids", "_dist",
                         "generation_kwargs", "generation_config"))
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            if (not self.fast_generation or self.use_vllm or self.use_transformers_continuous_batching
                    or images is not None or multimodal_fields or self.tools):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            with (profiling_context(self, "transformers.generate"),
                  unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                              gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                              generation_kwargs=self.generation_kwargs,
                                              gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
                  as unwrapped, torch.no_grad(), self._dist.summon_full_params(self.model_wrapped, recurse=False),
                  merged_adapter(unwrapped)):
                cfg = self.generation_config
                if decode.supported(unwrapped) is None and not decode.unsupported(cfg):
                    # All of the step's rows decode together; a row leaves at its end token.
                    ids, _ = decode.decode(unwrapped, prompt_ids, max_new_tokens=cfg.max_new_tokens,
                                           stop_ids=self.eos_token_ids, pad_id=self._tokenizer.pad_token_id,
                                           max_rows=len(prompt_ids), do_sample=cfg.do_sample,
                                           temperature=cfg.temperature or 1.0, top_k=cfg.top_k,
                                           top_p=cfg.top_p if cfg.top_p is not None else 1.0,
                                           matmul_dtype=decode.resolve_decode_dtype(self.decode_dtype))
                    return ids, None
                new = generate_grouped(unwrapped, prompt_ids, self.generation_config, self._tokenizer.pad_token_id)
            return _trim_after_eos(new, self.eos_token_ids), None

    _Trainer.__name__ = _Trainer.__qualname__ = "ECGGRPOTrainer"
    ECGGRPOTrainer = _Trainer
    return _Trainer


def pick_trainer_class(fast_generation: bool, pack_groups: bool, skip_tied_groups: bool = False,
                       length_neutral: float = 0.0) -> tuple[type, list[str]]:
    """``(class, differences)``: :class:`ECGGRPOTrainer` with its fast paths, or, when the installed TRL's
    private methods no longer fit the overrides (:func:`utils.training.trl_compat.problems`), TRL's own
    ``GRPOTrainer`` (slower, correct: no override is ever called with arguments it does not expect), with a
    warning naming each difference. Without anything of ours asked for, TRL's own class too.
    ``skip_tied_groups`` and ``length_neutral`` change what is optimised, so they are never dropped silently:
    on drift they are refused."""
    from trl import GRPOTrainer

    changes = [name for name, on in (("skip_tied_groups", skip_tied_groups), ("length_neutral", length_neutral))
               if on]
    if not (fast_generation or pack_groups or changes):
        return GRPOTrainer, []
    drift = problems("GRPOTrainer", GRPOTrainer)
    if drift and changes:
        raise UserError(f"{' and '.join(changes)} need{'' if len(changes) > 1 else 's'} this project's GRPOTrainer "
                        "overrides, which no longer fit "
                        f"the installed TRL ({'; '.join(drift)}); install the pinned trl or turn them off "
                        "(skip_tied_groups: false, length_neutral: 0)")
    if drift:
        log.warning("TRL's GRPOTrainer changed under this project's overrides; using TRL's own generation and "
                    "log-probabilities (slower, correct): %s", "; ".join(drift))
        return GRPOTrainer, drift
    return trainer_class(), []


ECGGRPOTrainer = None
