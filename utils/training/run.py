"""One run folder, one resume rule and one save path for every trainer.

Checkpoints and TensorBoard logs live in the run folder (``runs/<phase>/``); the finished model goes to
``output_dir`` (``models/<phase>/``), which only ever holds a complete model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import resource
import sys
import time
from pathlib import Path
from typing import Callable

from utils.core.artifacts import (
    FINGERPRINT,
    METRICS_FILE,
    TRAIN_CONFIG,
    checkpoints,
    is_complete_checkpoint,
    training_lineage,
)
from utils.core.config import UserError, dump_yaml, to_dict
from utils.core.fingerprint import differences
from utils.training.config import TrainConfig, precision_flags

log = logging.getLogger(__name__)


RUN_CONFIG = "run_config.yaml"  # in the run folder: the resolved config of the run its checkpoints belong to
RUN_RECORD = "run.json"          # in the run folder: that run's fingerprint, start and end
PREVIOUS = "previous-"            # run folders' old runs are moved into previous-<time>/, never deleted

# Config keys that may change between a run and its resumption without making the checkpoints stale (where
# things are written or logged, not what is computed). The data's content is fingerprinted by its hashes.
RESUME_NEUTRAL = {"resume", "merge", "output_dir", "run_dir", "data_dir", "report_to", "wandb_project", "run_name",
                  "logging_steps", "save_steps", "save_total_limit", "eval_steps", "num_threads", "eval_on_start",
                  # memory and evaluation knobs: the same optimizer steps whatever they are
                  "per_device_batch_size", "eval_batch_size", "gradient_checkpointing", "max_eval_samples",
                  "heldout_prompts", "heldout_max_new_tokens", "score_batch_size", "max_test_items",
                  # the reward config's score/audit/terms commands only
                  "input", "output", "audit_items", "terms_top",
                  "time_limit_minutes", "sample_steps", "samples_to_log",  # the last three: GRPO's
                  "dry_run", "world_size", "zero_stage",
                  # kernels compute the same function (to rounding); publishing happens after training
                  "attn_implementation", "liger_kernel", "push_to_hub", "hub_model_id", "hub_private"}


def _config_fingerprint(cfg) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in RESUME_NEUTRAL}


@dataclasses.dataclass
class Run:
    """A training run: the checkpoint it resumes from (None: a fresh start) and its fingerprint."""

    checkpoint: str | None
    fingerprint: dict


def output_dir(cfg: TrainConfig) -> Path:
    """The finished model's folder: ``cfg.output_dir``, or ``models/<MODEL_FOLDER>`` of the phase (under
    ``$ECG_MODELS_DIR`` when set), where the next phase looks for it."""
    from utils.models.resolve import models_root

    return Path(cfg.output_dir) if cfg.output_dir else models_root() / cfg.MODEL_FOLDER


def with_output_dir(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its output folder resolved, as the model card and ``train_config.yaml`` record it."""
    return cfg if cfg.output_dir else dataclasses.replace(cfg, output_dir=str(output_dir(cfg)))


def data_hashes(data_dir: str | Path, splits: list[str]) -> dict[str, str]:
    """The sha256 of each split file read, checked against the data card that prepare_data.py wrote
    (:func:`utils.data.card.verify_splits`): a split rewritten or half-written since then stops the run
    with one line. A folder without a data card (files made by hand) is hashed as it is, with a warning."""
    from utils.core.fingerprint import file_sha256
    from utils.data.card import CARD_FILE, verify_splits

    if (Path(data_dir) / CARD_FILE).is_file():
        return verify_splits(data_dir, splits)
    log.warning("%s has no data card (not written by prepare_data.py): its files are fingerprinted as they are, "
                "not checked", data_dir)
    return {s: file_sha256(Path(data_dir) / f"{s}.jsonl") for s in splits if (Path(data_dir) / f"{s}.jsonl").is_file()}


def fingerprint(cfg: TrainConfig, data: dict[str, str], model_ref: str | None = None,
                other_models: dict[str, str | None] | None = None) -> dict:
    """What makes this run: the config (apart from :data:`RESUME_NEUTRAL`), the hash of each data split
    read, the identity of the model it starts from (its files' hashes) and of ``other_models`` it uses (a
    reward model), the package and code versions."""
    from utils.core.fingerprint import code_version, package_versions
    from utils.models.resolve import model_identity, resolve_model

    out = {"config": _config_fingerprint(cfg), "data": data}
    if model_ref is not None:
        start = resolve_model(model_ref, cfg.base_model)
        out["model"] = model_identity(start)
        lineage = training_lineage(start) if Path(start).is_dir() else []
        if lineage:
            out["lineage"] = lineage
    for name, ref in (other_models or {}).items():
        if ref:
            out[name] = model_identity(resolve_model(ref, cfg.base_model))
    out.update(packages=package_versions(), code=code_version())
    return out


def start_run(cfg: TrainConfig, data: dict[str, str] | None = None, model_ref: str | None = None,
              on_start: Callable[[str | None], None] | None = None,
              other_models: dict[str, str | None] | None = None) -> Run:
    """Settle the run folder and pick the checkpoint to resume from (:func:`resume_checkpoint`), for the
    run fingerprinted by ``data`` (split hashes, :func:`data_hashes`) and ``model_ref`` (the model it
    starts from).

    The main process goes first and alone writes (an old run moved aside, the run record, and
    ``on_start(checkpoint)``, e.g. GRPO trimming its logs); the other processes of a distributed run then
    read the folder it settled, so every process resumes from the same checkpoint."""
    from accelerate import PartialState

    from utils.core.artifacts import check_replaceable

    check_run_dir(cfg)
    check_replaceable(output_dir(cfg))  # before hours of training, not at the save
    fp = fingerprint(cfg, data or {}, model_ref, other_models)
    from utils.training.config import has_cuda

    # cpu=True on a machine without CUDA: else accelerate sets up no process group for CPU ranks, and every
    # rank would take itself for the main process (the TRL config sets the state up the same way later)
    state = PartialState(cpu=not has_cuda())
    with state.main_process_first():
        ckpt = resume_checkpoint(cfg, write=state.is_main_process, fingerprint=fp)
        if on_start is not None and state.is_main_process:
            on_start(ckpt)
    return Run(ckpt, fp)


def finish_run(trainer, cfg: TrainConfig, run: Run, metrics: dict, card: str,
               base_ref: str | None = None) -> Path | None:
    """Save the finished model once, for every trainer and every launch: under DeepSpeed ZeRO-3 the
    weights are first gathered from all processes in 16 bits (as the Trainer does when it saves), then the
    main process alone writes and merges (:func:`save_final`, with the run's fingerprint) and marks the
    run finished while the others wait. Returns the folder on the main process, None elsewhere."""
    acc = trainer.accelerator
    state_dict = None
    if getattr(acc.state, "deepspeed_plugin", None) is not None and acc.state.deepspeed_plugin.zero_stage == 3:
        state_dict = acc.get_state_dict(trainer.model_wrapped)  # a collective: every process takes part
    out = None
    if acc.is_main_process:
        out = save_final(acc.unwrap_model(trainer.model), trainer.processing_class, cfg, metrics, card, base_ref,
                         state_dict=state_dict, fingerprint=run.fingerprint)
        mark_finished(cfg.run_dir, out)
    acc.wait_for_everyone()
    if out is not None and cfg.push_to_hub:
        push_to_hub(out, cfg)  # after the barrier: a failed upload cannot leave the other processes waiting
    return out


def push_to_hub(folder: Path, cfg: TrainConfig) -> str:
    """Upload the finished model folder (with its model card ``README.md``) to the Hub repo
    ``cfg.hub_model_id``, created (private unless ``hub_private: false``) when missing; returns its URL.
    The model is saved locally first, so a failed upload loses nothing: the error says how to retry."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(cfg.hub_model_id, private=cfg.hub_private, exist_ok=True)
        info = api.upload_folder(repo_id=cfg.hub_model_id, folder_path=str(folder),
                                 commit_message=f"{Path(sys.argv[0]).name or 'ecg-grpo'}: {folder.name}",
                                 ignore_patterns=[".complete", "*.tmp"])
    except Exception as e:  # network, login, permissions: all the user's to fix, none lose the saved model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"push_to_hub: uploading {folder} to {cfg.hub_model_id} failed ({first}); the model is "
                        f"saved; retry with `huggingface-cli upload {cfg.hub_model_id} {folder}`") from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{cfg.hub_model_id}"
    log.info("pushed %s to %s", folder, url)
    return url


def card_metadata(cfg: TrainConfig, base_ref: str | None) -> str:
    """The YAML front matter the Hub reads from a model card: base model (when it is a Hub id), library,
    task and tags."""
    from utils.training.config import HUB_ID

    base = base_ref or cfg.base_model
    lines = ["---"]
    if HUB_ID.fullmatch(str(base)) and not Path(str(base)).exists():
        lines.append(f"base_model: {base}")
    lines += [f"library_name: {'peft' if cfg.adapter == 'lora' else 'transformers'}",
              f"pipeline_tag: {cfg.PIPELINE_TAG}",
              "tags: [ecg, medical-qa, ecg-expert-qa, trl, " + cfg.MODEL_FOLDER + "]", "---", ""]
    return "\n".join(lines)


def _read_record(run_dir: Path) -> dict | None:
    path = run_dir / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        log.warning("%s is unreadable (a write was interrupted); its run is treated as another run", path)
        return None
    return record if isinstance(record, dict) else None


def mark_finished(run_dir: str | Path, output: Path | None) -> None:
    """Record in the run folder that its run ended with a saved model: running the same command again then
    starts a fresh run (the finished one moved aside) instead of "resuming" it."""
    run_dir = Path(run_dir)
    record = _read_record(run_dir) or {}
    record.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), output_dir=str(output) if output else None)
    write_json(run_dir / RUN_RECORD, record)


def write_json(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``, atomically: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


# What a run writes into its run folder: only these are ever moved aside (anything else there is left alone).
RUN_ITEMS = re.compile(r"^(checkpoint-\d+|runs|run\.json|run_config\.yaml|heldout\.jsonl|samples\.jsonl|"
                       r"events\.out\.tfevents\..*|trainer_state\.json)$")


def check_run_dir(cfg: TrainConfig) -> None:
    """Refuse a run folder that would hold more than one run's files: empty (the current folder), the
    checkout itself, or a folder that contains the output folder."""
    from utils.core.fingerprint import REPO_ROOT

    if not cfg.run_dir.strip() or Path(cfg.run_dir).resolve() in (Path.cwd().resolve(), REPO_ROOT.resolve()):
        raise UserError(f"run_dir {cfg.run_dir!r}: expected a folder of its own for the run's checkpoints and logs, "
                        "e.g. runs/sft")
    out = output_dir(cfg).resolve()
    if Path(cfg.run_dir).resolve() in out.parents or Path(cfg.run_dir).resolve() == out:
        raise UserError(f"run_dir {cfg.run_dir} contains output_dir {out}; expected separate folders, e.g. runs/sft "
                        "and models/sft")


def move_aside(run_dir: Path) -> Path | None:
    """Move a run's files in ``run_dir`` (checkpoints, logs, records: :data:`RUN_ITEMS`) into
    ``run_dir/previous-<time>/``; nothing is deleted, nothing else is touched. Returns that folder, or None
    when there was nothing to move."""
    if not run_dir.is_dir():
        return None
    items = [p for p in run_dir.iterdir() if RUN_ITEMS.match(p.name)]
    if not items:
        return None
    dest = run_dir / f"{PREVIOUS}{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir / f"{PREVIOUS}{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    dest.mkdir()
    for p in items:
        p.rename(dest / p.name)
    return dest


def resume_checkpoint(cfg: TrainConfig, write: bool = True, fingerprint: dict | None = None) -> str | None:
    """The checkpoint to continue from, per ``cfg.resume``, after settling the run folder.

    * ``auto``: the last complete checkpoint of the run folder when its run is unfinished and has the same
      fingerprint as this one (``fingerprint``; by default the config alone). Otherwise a fresh run, with a
      line naming what differs (or that the run had finished) and how to continue the old one anyway.
    * ``never``: a fresh run.
    * a checkpoint folder: that checkpoint (it must be complete), whatever made it (a warning names what
      differs).

    A fresh run first moves whatever the run folder holds into ``previous-<time>/`` (:func:`move_aside`):
    the Trainer's checkpoint rotation then never mixes two runs, and nothing is lost. The run record
    (``run.json``: the fingerprint) and the resolved config (``run_config.yaml``) are written for the next
    resumption to compare with. With ``write=False`` (the other processes of a distributed run) nothing is
    moved or written.
    """
    run_dir = Path(cfg.run_dir)
    fp = fingerprint if fingerprint is not None else {"config": _config_fingerprint(cfg)}
    record = _read_record(run_dir)
    chosen: str | None = None
    if cfg.resume not in ("auto", "never"):
        path = Path(cfg.resume)
        if not path.is_dir():
            raise UserError(f"resume: {path} is not a folder; expected auto, never or a checkpoint folder")
        if not is_complete_checkpoint(path):
            raise UserError(f"resume: {path} is not a complete checkpoint (no readable trainer_state.json with "
                            "a global_step; the run was killed while saving it): pick an earlier checkpoint")
        chosen = str(path)
        if record and record.get("fingerprint") and path.resolve().parent == run_dir.resolve():
            changed = differences(_compared(record["fingerprint"]), _compared(fp))
            if changed and write:
                log.warning("resume: %s continues a run made with other %s, as asked", path, _describe(changed))
    elif cfg.resume == "auto":
        found = checkpoints(run_dir)
        if found and record is not None and record.get("finished"):
            if write:
                log.info("%s: its run finished (%s) and saved %s; starting a fresh run", run_dir, record["finished"],
                         record.get("output_dir"))
        elif found:
            changed = differences(_compared(record.get("fingerprint", {})), _compared(fp)) if record \
                else ["the run record (run.json)"]
            if not changed:
                chosen = str(found[-1])
            elif write:
                moved = move_aside(run_dir)
                log.warning("%s: its checkpoints belong to another run (%s); starting a fresh run, the old one moved "
                            "to %s (to continue it anyway: --resume %s)", run_dir, _describe(changed), moved,
                            moved / found[-1].name if moved else found[-1])
    if not write:
        return chosen
    if chosen is None:
        moved = move_aside(run_dir)
        if moved is not None:
            log.info("the run folder's earlier contents are in %s", moved)
    else:
        log.info("resuming from %s", chosen)
    run_dir.mkdir(parents=True, exist_ok=True)
    if chosen is None or record is None or cfg.resume not in ("auto", "never"):
        # a fresh run, or one continued from a checkpoint the user named: from now on this fingerprint
        # is the run's, so that a kill and `resume: auto` continue it
        record = {"fingerprint": fp, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None,
                  "resumed_from": chosen}
    write_json(run_dir / RUN_RECORD, record)
    dump_yaml(cfg, run_dir / RUN_CONFIG)
    return chosen


def _compared(fp: dict) -> dict:
    """The part of a fingerprint that must match for a resume: the git commit and dirty flag are recorded
    (provenance) but not compared, so that committing the very tree a run used does not orphan it; the
    source hash stands for the code."""
    out = dict(fp)
    if isinstance(out.get("code"), dict):
        out["code"] = {k: v for k, v in out["code"].items() if not k.startswith("git_")}
    return out


def _describe(changed: list[str]) -> str:
    shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    return f"settings: {shown}"


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
    import torch

    from utils.core.runtime import machine_summary

    if torch.cuda.is_available():
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)  # this process's GPU
    out["machine"] = machine_summary()  # what any time or throughput figure above was measured on
    if evals:
        out["eval_loss_first"], out["eval_loss_last"] = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    out.update(extra or {})
    return out


def save_final(model, tokenizer, cfg: TrainConfig, metrics: dict, card: str, base_ref: str | None = None,
               state_dict: dict | None = None, fingerprint: dict | None = None) -> Path:
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
        (tmp / "README.md").write_text(card if card.startswith("---") else card_metadata(cfg, base_ref) + card,
                                       encoding="utf-8")
        if fingerprint is not None:
            (tmp / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2, default=str), encoding="utf-8")
        if cfg.merge and cfg.adapter == "lora":
            merged = tmp / "merged"
            _merge_into_base(tmp, merged, base_ref or cfg.base_model, cfg)
            tokenizer.save_pretrained(merged)
            # the merged model is the same model: it says how it was trained, as the adapter folder does
            dump_yaml(cfg, merged / TRAIN_CONFIG)
            if fingerprint is not None:
                (merged / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2, default=str), encoding="utf-8")
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
    with _no_zero3_init():
        merged = load_model(str(adapter_dir), base_ref, head="seqcls" if task == "SEQ_CLS" else "causal",
                            dtype="float32" if dtype == "float32" else "bfloat16",
                            keep_layers=getattr(cfg, "keep_layers", 0))
    merged.save_pretrained(out)


@contextlib.contextmanager
def _no_zero3_init():
    """Load a plain model on this process alone while a ZeRO-3 launch is set up. With accelerate's
    ``zero3_init_flag: true`` (configs/accelerate/zero3.yaml), transformers builds every model under
    ``deepspeed.zero.Init``, sharding it across the processes, a collective the other processes (waiting
    for the main one's save) never join: the merge would hang."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:
        yield
        return
    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref
