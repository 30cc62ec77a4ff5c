"""One run folder, one resume rule and one save path for every trainer.

Checkpoints and TensorBoard logs live in the run folder (``runs/<phase>/``); the finished model goes to
``output_dir`` (``models/<phase>/``), which only ever holds a complete model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import shutil
import sys
from pathlib import Path
from typing import Callable

import yaml

from utils.core.artifacts import METRICS_FILE, TRAIN_CONFIG, checkpoints
from utils.core.config import UserError, dump_yaml, to_dict
from utils.training.config import TrainConfig, precision_flags

log = logging.getLogger(__name__)


RUN_CONFIG = "run_config.yaml"      # in the run folder: what the checkpoints there were trained with


# Keys that may change between a run and its resumption without making the checkpoints stale.
RESUME_NEUTRAL = {"resume", "merge", "output_dir", "report_to", "wandb_project", "run_name", "logging_steps",
                  "save_steps", "save_total_limit", "eval_steps", "num_threads", "eval_on_start",
                  "time_limit_minutes", "sample_steps", "samples_to_log"}  # the last three: GRPO's


def _fingerprint(cfg) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in RESUME_NEUTRAL}


def output_dir(cfg: TrainConfig) -> Path:
    """The finished model's folder: ``cfg.output_dir``, or ``models/<MODEL_FOLDER>`` of the phase (under
    ``$ECG_MODELS_DIR`` when set), where the next phase looks for it."""
    from utils.models.resolve import models_root

    return Path(cfg.output_dir) if cfg.output_dir else models_root() / cfg.MODEL_FOLDER


def with_output_dir(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its output folder resolved, as the model card and ``train_config.yaml`` record it."""
    return cfg if cfg.output_dir else dataclasses.replace(cfg, output_dir=str(output_dir(cfg)))


def start_run(cfg: TrainConfig, on_start: Callable[[str | None], None] | None = None) -> str | None:
    """Settle the run folder and return the checkpoint to resume from (:func:`resume_checkpoint`).

    The main process goes first and alone writes (old checkpoints removed, ``run_config.yaml``, and
    ``on_start(checkpoint)``, e.g. GRPO trimming its logs); the other processes of a distributed run then
    read the folder it settled, so every process resumes from the same checkpoint."""
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first():
        ckpt = resume_checkpoint(cfg, write=state.is_main_process)
        if on_start is not None and state.is_main_process:
            on_start(ckpt)
    return ckpt


def finish_run(trainer, cfg: TrainConfig, metrics: dict, card: str, base_ref: str | None = None) -> Path | None:
    """Save the finished model once, for every trainer and every launch: under DeepSpeed ZeRO-3 the
    weights are first gathered from all processes in 16 bits (as the Trainer does when it saves), then the
    main process alone writes and merges (:func:`save_final`) while the others wait. Returns the folder on
    the main process, None elsewhere."""
    acc = trainer.accelerator
    state_dict = None
    if getattr(acc.state, "deepspeed_plugin", None) is not None and acc.state.deepspeed_plugin.zero_stage == 3:
        state_dict = acc.get_state_dict(trainer.model_wrapped)  # a collective: every process takes part
    out = None
    if acc.is_main_process:
        out = save_final(acc.unwrap_model(trainer.model), trainer.processing_class, cfg, metrics, card, base_ref,
                         state_dict=state_dict)
    acc.wait_for_everyone()
    return out


def resume_checkpoint(cfg: TrainConfig, write: bool = True) -> str | None:
    """The checkpoint to continue from, per ``cfg.resume``, after preparing the run folder.

    * ``auto``: the last complete checkpoint when the run folder's config matches this one (apart from
      logging and output keys); otherwise start afresh.
    * ``never``: start afresh.
    * a folder: that checkpoint (it must be complete).

    Starting afresh removes the run folder's old checkpoints, so that the Trainer's rotation never mixes
    two runs. The current config is written to the run folder for the next resumption to compare with.
    With ``write=False`` (the other processes of a distributed run) nothing is removed or written.
    """
    run_dir = Path(cfg.run_dir)
    chosen: str | None = None
    if cfg.resume not in ("auto", "never"):
        path = Path(cfg.resume)
        if not path.is_dir():
            raise UserError(f"resume: {path} is not a folder; expected auto, never or a checkpoint folder")
        if not (path / "trainer_state.json").is_file():
            raise UserError(f"resume: {path} is not a complete checkpoint (no trainer_state.json)")
        chosen = str(path)
    elif cfg.resume == "auto":
        found = checkpoints(run_dir)
        if found:
            saved = run_dir / RUN_CONFIG
            old = yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.is_file() else None
            if old is not None and {k: v for k, v in old.items() if k not in RESUME_NEUTRAL} == _fingerprint(cfg):
                chosen = str(found[-1])
            else:
                changed = sorted(k for k in _fingerprint(cfg) if old is None or old.get(k) != getattr(cfg, k))
                log.warning("%s: the checkpoints there were made with other settings (%s); starting afresh "
                            "(pass --resume %s to continue anyway)", run_dir, ", ".join(changed[:5]) or "unknown",
                            found[-1])
    if not write:
        return chosen
    if chosen is None:
        stale = [p for p in run_dir.glob("checkpoint-*") if p.is_dir()] if run_dir.is_dir() else []
        if stale:
            log.info("removing %d old checkpoint(s) from %s", len(stale), run_dir)
            for p in stale:
                shutil.rmtree(p)
    else:
        log.info("resuming from %s", chosen)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / RUN_CONFIG)
    return chosen


# ============================================================================= final save
def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 1024 / 1024


def training_metrics(trainer, extra: dict | None = None) -> dict:
    """Final metrics: the train summary, the eval-loss curve, and anything the phase adds."""
    state = trainer.state
    history = state.log_history
    evals = [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h]
    train_logs = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    out = {"global_step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
           "num_input_tokens_seen": state.num_input_tokens_seen,
           "train": {k: v for k, v in summary.items() if k != "step"},
           "eval_loss": evals, "train_loss": train_logs, "peak_rss_mb": round(peak_rss_mb(), 1)}
    if evals:
        out["eval_loss_first"], out["eval_loss_last"] = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    out.update(extra or {})
    return out


def save_final(model, tokenizer, cfg: TrainConfig, metrics: dict, card: str, base_ref: str | None = None,
               state_dict: dict | None = None) -> Path:
    """Write ``cfg.output_dir``: weights (the adapter, or the full model), tokenizer, ``train_config.yaml``,
    ``metrics.json``, ``README.md``; with ``cfg.merge`` also ``merged/`` (the adapter merged into a fresh copy
    of its base, in the training dtype). Everything goes to a temporary sibling first and is renamed into
    place with its completion marker, so a folder that looks finished is finished. ``state_dict``: the
    weights gathered from a sharded model (ZeRO-3), which ``model`` itself then holds only a shard of."""
    from utils.core.artifacts import atomic_save, mark_complete

    def write(tmp: Path):
        model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(tmp)
        dump_yaml(cfg, tmp / TRAIN_CONFIG)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str), encoding="utf-8")
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if cfg.merge and cfg.adapter == "lora":
            merged = tmp / "merged"
            _merge_into_base(tmp, merged, base_ref or cfg.base_model, cfg)
            tokenizer.save_pretrained(merged)
            mark_complete(merged)

    out = atomic_save(Path(cfg.output_dir), write)
    log.info("saved %s", out)
    return out


def _merge_into_base(adapter_dir: Path, out: Path, base_ref: str, cfg: TrainConfig) -> None:
    """Merge a saved adapter into an unquantized copy of its base (a 4-bit base cannot hold the merge)."""
    import json

    from utils.models.loading import load_model

    _, _, dtype = precision_flags(cfg)
    task = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("task_type")
    merged = load_model(str(adapter_dir), base_ref, head="seqcls" if task == "SEQ_CLS" else "causal",
                        dtype="float32" if dtype == "float32" else "bfloat16",
                        keep_layers=getattr(cfg, "keep_layers", 0))
    merged.save_pretrained(out)
