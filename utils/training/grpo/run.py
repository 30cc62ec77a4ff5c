"""The GRPO run that grpo_train.py performs: arguments, trainer, run folder, training, final save.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from utils.core.artifacts import checkpoint_step, read_log
from utils.core.runtime import set_threads
from utils.training.config import gradient_accumulation, trl_args
from utils.training.grpo.callbacks import (
    HELDOUT_LOG,
    SAMPLES_LOG,
    DropEmptyMetrics,
    HeldOutReward,
    KLWindow,
    SampleLogger,
    TimeLimit,
    WeightEMA,
    _read_heldout,
    hacking_signature,
    heldout_ratio_interval,
    heldout_summary,
    paired_change,
)
from utils.training.grpo.config import GRPOTrainConfig, heldout_rows, load_prompts, to_dataset
from utils.training.grpo.policy import check_backends, load_policy, vllm_wanted
from utils.training.grpo.trainer import pick_trainer_class, trainer_class
from utils.training.run import (
    data_hashes,
    finish_run,
    output_dir,
    start_run,
    training_metrics,
    with_output_dir,
)

log = logging.getLogger(__name__)


# ============================================================================= the run


def grpo_args(cfg: GRPOTrainConfig, reward_weights: list[float]):
    """TRL's GRPOConfig for ``cfg``: the common training settings (utils.training.config.trl_args) plus GRPO's.
    One generation round per optimizer step (the generation batch is the step's batch), so sampling is
    on-policy and needs no extra log-probability pass."""
    extra: dict[str, Any] = dict(
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=cfg.top_p, loss_type=cfg.loss_type, beta=cfg.beta,
        epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, scale_rewards=cfg.scale_rewards,
        multi_objective_aggregation=cfg.reward_aggregation,
        mask_truncated_completions=cfg.mask_truncated_completions, num_iterations=cfg.num_iterations,
        reward_weights=reward_weights,
        # Dropout would make the sampled policy and the trained one differ; LoRA dropout is 0 here anyway.
        disable_dropout=True,
        # The held-out reward replaces TRL's evaluation loop (which would sample num_generations per prompt).
        eval_strategy="no", eval_on_start=False,
        use_vllm=vllm_wanted(cfg), vllm_mode=cfg.vllm_mode,
        vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        vllm_tensor_parallel_size=cfg.vllm_tensor_parallel_size, vllm_enable_sleep_mode=cfg.vllm_sleep_mode,
        importance_sampling_level=cfg.importance_sampling_level,
        # Keeps the extra dataset columns (reference, labels) that the rewards read.
        remove_unused_columns=False,
        # GRPO batches carry no input_ids for the Trainer to count; TRL counts the tokens itself (num_tokens).
        include_num_input_tokens_seen="no",
    )
    if cfg.vllm_server_base_url:
        extra["vllm_server_base_url"] = cfg.vllm_server_base_url
    if extra["use_vllm"] and cfg.vllm_mode == "colocate":
        # vLLM's context must hold the longest prompt plus a completion; 2048 covers the data card's longest
        # prompts with room to spare and keeps the KV reservation small.
        extra["vllm_max_model_length"] = 2048
    name = cfg.run_name or f"grpo-{time.strftime('%Y%m%d-%H%M%S')}"
    return trl_args(cfg, name, **extra)


def build_trainer(cfg: GRPOTrainConfig, train_rows: list[dict], args=None):
    """The GRPO trainer for ``cfg`` on ``train_rows``, and the model an adapter of it applies to."""
    set_threads(cfg.num_threads)
    funcs, weights = cfg.build()
    args = args or grpo_args(cfg, weights)
    model, tok, peft_config, base_ref = load_policy(cfg)
    cls, _ = pick_trainer_class(cfg.fast_generation, cfg.pack_groups, cfg.skip_tied_groups, cfg.length_neutral)
    trainer = cls(model=model, reward_funcs=funcs, args=args, train_dataset=to_dataset(train_rows),
                  processing_class=tok, peft_config=peft_config)
    if cls is trainer_class():
        trainer.fast_generation, trainer.pack_groups = cfg.fast_generation, cfg.pack_groups
        trainer.decode_dtype = cfg.decode_dtype
        trainer.skip_tied_groups, trainer.length_neutral = cfg.skip_tied_groups, cfg.length_neutral
    return trainer, base_ref


def _prepare_run_dir(cfg: GRPOTrainConfig, ckpt: str | None) -> None:
    """Start the run folder's logs afresh, or, on resumption, drop what was logged after the checkpoint
    (those steps run again)."""
    upto = checkpoint_step(ckpt) if ckpt else -1
    for name in (HELDOUT_LOG, SAMPLES_LOG):
        path = Path(cfg.run_dir) / name
        if not path.is_file():
            continue
        keep = [e for e in read_log(path) if isinstance(e.get("step"), int) and e["step"] <= upto]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in keep), encoding="utf-8")
        tmp.replace(path)  # a kill here leaves the old log or the trimmed one


def dry_run_plan(cfg: GRPOTrainConfig) -> dict:
    """What ``grpo_train.py --dry-run`` prints (:func:`utils.training.plan.plan`): the generation batch is
    the step's batch (one generation round per optimizer step, on-policy)."""
    from utils.training.plan import count_rows, plan, prompt_tokens_p95

    n = count_rows(Path(cfg.data_dir) / "grpo" / "train.jsonl")
    n = min(n, cfg.max_train_prompts) * cfg.num_generations if n and cfg.max_train_prompts else \
        (n * cfg.num_generations if n else None)
    # use_vllm: auto is planned as vLLM (the GPU machine the plan is for is where it would be found), except
    # with a quantized base, which vLLM cannot load with its adapter
    vllm = cfg.use_vllm is True or (cfg.use_vllm == "auto" and cfg.quantization == "none")
    colocate = vllm and cfg.vllm_mode == "colocate"
    extra = {"prompts_per_step": cfg.batch_size // cfg.num_generations, "generation_batch": cfg.batch_size,
             "generation": (f"vLLM ({cfg.vllm_mode})" + (", when installed" if cfg.use_vllm == "auto" else ""))
             if vllm else "transformers",
             "max_completion_tokens": cfg.max_completion_length}
    seq = prompt_tokens_p95(cfg.data_dir) + cfg.max_completion_length
    return plan(cfg, "grpo_train.py", cfg.policy, seq, n, "completions", extra,
                vllm_share=cfg.vllm_gpu_memory_utilization if colocate else 0.0)


def run_grpo(cfg: GRPOTrainConfig) -> dict:
    """Train, measure and save as the config says; return the metrics written to metrics.json."""
    import torch

    check_backends(cfg)
    out = output_dir(cfg)
    gradient_accumulation(cfg)  # a batch that does not divide over this run's processes stops here, early
    train = load_prompts(cfg, "train", cfg.max_train_prompts)
    heldout = heldout_rows(cfg)
    _, weights = cfg.build()
    args = grpo_args(cfg, weights)  # sets up the processes of a distributed run
    run = start_run(cfg, data_hashes(cfg.data_dir, ["grpo/train", "grpo/validation"]), cfg.policy,
                    on_start=lambda c: _prepare_run_dir(cfg, c), other_models={"reward_model": cfg.reward_model})
    ckpt = run.checkpoint
    log.info("generation: %s", f"vLLM ({cfg.vllm_mode})" if args.use_vllm else
             "transformers" + (" (merged adapter, shared prefill)" if cfg.fast_generation else ""))
    log.info("GRPO on %d prompts x %d completions, %d held-out prompts, rewards %s (%s) -> %s", len(train),
             cfg.num_generations, len(heldout), cfg.rewards, cfg.reward_aggregation, out)
    trainer, base_ref = build_trainer(cfg, train, args)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    log.info("training %d of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    ema = WeightEMA(cfg.weight_ema, ckpt) if cfg.weight_ema else None
    held = HeldOutReward(cfg, heldout, trainer.processing_class)
    if ema is not None:
        held.weights = ema.applied
    samples = SampleLogger(cfg)
    limit = TimeLimit(cfg.time_limit_minutes)
    kl = [KLWindow(cfg.beta_steps)] if cfg.beta_steps else []  # the config refuses beta_steps without beta
    # The average is updated before the held-out reward reads it at the same step.
    for cb in ([ema] if ema else []) + [held, samples, limit] + kl:
        cb.trainer = trainer
        trainer.add_callback(cb)
    trainer.callback_handler.callbacks.insert(0, DropEmptyMetrics())
    started = time.time()
    trainer.train(resume_from_checkpoint=ckpt)
    wall = time.time() - started
    metrics = final_metrics(cfg, trainer, ckpt, len(train), wall)
    if limit.stopped:
        metrics["stopped_by_time_limit"] = limit.stopped  # evaluation's report says so beside the results
    if ema is not None:
        ema.apply()  # the saved model is the average that the held-out reward measured
    model = trainer.model
    if hasattr(model, "peft_config") and "ref" in model.peft_config:
        model.delete_adapter("ref")  # TRL's frozen copy for the KL term, not part of the result
    cfg_out = with_output_dir(cfg)
    finish_run(trainer, cfg_out, run, metrics, model_card(cfg_out, metrics, base_ref), base_ref=base_ref)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Without an orderly teardown the gloo backend sometimes aborts the other ranks at exit (after a
        # failure there is none: the other ranks would wait in the barrier until a timeout).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics if trainer.accelerator.is_main_process else {}


def final_metrics(cfg: GRPOTrainConfig, trainer, ckpt: str | None, n_train: int, wall: float) -> dict:
    history = trainer.state.log_history
    rewards = [{k: v for k, v in h.items() if k == "step" or k == "reward" or k.startswith("rewards/")
                or k in ("kl", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                         "skipped_tied_groups", "advantage_length_corr", "advantage_length_corr_after",
                         "num_tokens")}
               for h in history if "reward" in h]
    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    steps_run = trainer.state.global_step - checkpoint_step(ckpt)
    extra = {"resumed_from": ckpt, "num_processes": trainer.accelerator.num_processes, "train_prompts": n_train, "answer_format": cfg.answer_format,
             "rewards": cfg.rewards, "train_curve": rewards,
             "wall_seconds_this_run": round(wall, 1),
             "samples_per_second_this_run": round(steps_run * cfg.batch_size / wall, 3) if wall else None,
             **heldout_summary(history)}
    evals = _read_heldout(cfg.run_dir)
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        by_id = {x["id"]: x["scores"] for x in first["items"]}
        pairs = [(by_id[x["id"]], x["scores"]) for x in last["items"] if x["id"] in by_id]
        extra["heldout_change"] = {k: paired_change([a for a, _ in pairs], [b for _, b in pairs], k)
                                   for k in ["total", *cfg.rewards]}
        extra["heldout_change_steps"] = [first["step"], last["step"]]
        extra["heldout_ratio"] = heldout_ratio_interval(evals)
        hacking = hacking_signature([a for a, _ in pairs], [b for _, b in pairs], cfg.rewards)
        if hacking:
            extra["reward_hacking"] = hacking
            if hacking["signature"]:
                log.warning("reward hacking signature on the held-out prompts: %s rose while the rule rewards' "
                            "mix fell by %.4f (falling: %s); the policy may be pleasing the reward model",
                            ", ".join(hacking["learned_rising"]), hacking["rules"]["mean"],
                            ", ".join(hacking["rules_falling"]) or "no single rule")
    out = training_metrics(trainer, extra)
    out.pop("eval_loss", None)
    out.pop("train_loss", None)
    out["train"] = {k: v for k, v in summary.items() if k != "step"}
    return out


def _hacking_line(h: dict) -> str:
    learned = "; ".join(f"{k} {c['mean']:+.4f} +- {c['stderr']:.4f}" for k, c in h["learned"].items())
    verdict = ("**the hacking signature**: a learned reward rose while the rule rewards fell; the policy may be "
               "pleasing the reward model" if h["signature"] else "no hacking signature")
    falling = f" Rule rewards that fell: {', '.join(h['rules_falling'])}." if h["rules_falling"] else ""
    return (f"Learned against rule rewards (paired changes, {h['z']:g} standard errors decide): {learned}; the rule "
            f"rewards' mix {h['rules']['mean']:+.4f} +- {h['rules']['stderr']:.4f}: {verdict}.{falling}")


def model_card(cfg: GRPOTrainConfig, metrics: dict, base_ref: str | None) -> str:
    first, last = metrics.get("heldout_first", {}), metrics.get("heldout_last", {})
    names = ["total", *cfg.rewards]

    def fmt(h, k):
        v = h.get(f"heldout/{k}")
        return "n/a" if v is None else f"{v:.3f}"

    rows = [f"| {k} | {fmt(first, k)} | {fmt(last, k)} |" for k in names]
    change = metrics.get("heldout_change", {}).get("total", {})
    ratio = metrics.get("heldout_ratio") or {}
    hacking = metrics.get("reward_hacking") or {}
    lora = (f"LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha}" if cfg.adapter == "lora" else "full fine-tuning")
    kl_window = f" for the first {cfg.beta_steps} steps" if cfg.beta_steps else ""
    return "\n".join([
        f"# ECG-GRPO policy ({cfg.base_model})", "",
        f"GRPO fine-tune of `{cfg.policy}` (adapter on `{base_ref}`) on ECG-Expert-QA prompts "
        f"(tasks: {', '.join(cfg.tasks) if cfg.tasks else 'all in the GRPO set'}), made by `grpo_train.py`.", "",
        "## Use", "",
        "```python",
        "from utils.data.formats import with_format_instructions",
        "from utils.models.generation import generate",
        "from utils.models.loading import load_for_inference",
        f"model, tok = load_for_inference('{output_dir(cfg)}')",
        f"generate(model, tok, [with_format_instructions(messages, '{cfg.answer_format}')])",
        "```", "",
        "## Training", "",
        f"- rewards (weights): {', '.join(f'{k} {v}' for k, v in cfg.rewards.items())}; aggregation "
        f"{cfg.reward_aggregation}, scaling {cfg.scale_rewards}"
        + (f", length-neutral advantages {cfg.length_neutral}" if cfg.length_neutral else ""),
        f"- {metrics.get('global_step')} steps of {cfg.batch_size} completions ({cfg.num_generations} per prompt, at "
        f"most {cfg.max_completion_length} tokens, temperature {cfg.temperature}); loss {cfg.loss_type}, beta "
        f"{cfg.beta}{kl_window}, learning rate {cfg.learning_rate}; {lora}"
        + (f"; the saved weights are their moving average (decay {cfg.weight_ema}), as the held-out reward "
           f"measured them" if cfg.weight_ema else ""),
        f"- wall time {metrics.get('wall_seconds_this_run')} s (this run), peak RSS {metrics.get('peak_rss_mb')} MiB", "",
        f"## Held-out reward ({cfg.heldout_prompts} validation prompts, greedy)", "",
        f"| reward | step {first.get('step', '-')} | step {last.get('step', '-')} |", "| --- | ---: | ---: |", *rows, "",
        (f"Paired change of the total: {change['mean']:+.4f} +- {change['stderr']:.4f} (standard error, "
         f"{change['n']} prompts)." if change else ""),
        (f"Gain over step noise (the spread of the changes between evaluations): {ratio['value']:.1f}x; on "
         f"bootstrap resamples of the held-out prompts {ratio['lo']:.1f}-{ratio['hi']:.1f}x "
         f"({ratio['confidence']:.0%}), median {ratio['median']:.1f}x." if ratio else ""),
        (_hacking_line(hacking) if hacking else ""), "",
        "## Limitations", "",
        "Educational use only: not medical advice. The rewards are automatic proxies of answer quality; "
        "ECG-Expert-QA states no license upstream, so this model is for research within those terms.", ""])
