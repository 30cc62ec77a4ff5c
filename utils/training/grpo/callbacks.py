"""What GRPO logs besides TRL's metrics: the held-out reward, sample completions, a time limit; and the
moving average of the weights that the held-out reward and the saved model may read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

from utils.core.artifacts import read_log
from utils.core.config import UserError
from utils.rewards.mix import weighted_total
from utils.rewards.rules import completion_text
from utils.training.grpo.config import GRPOTrainConfig
from utils.training.grpo.trainer import merged_adapter

log = logging.getLogger(__name__)


HELDOUT_LOG = "heldout.jsonl"   # in the run folder: every held-out evaluation, answers included


SAMPLES_LOG = "samples.jsonl"   # in the run folder: the sample completions logged every sample_steps


EMA_FILE = "weight_ema.pt"      # in a checkpoint folder: the weights' moving average, so a resumed run continues it


# ============================================================================= held-out reward, samples
def _tb_writer(trainer):
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            return cb.tb_writer
    return None


def summarize_scores(scores: list[dict]) -> dict[str, float]:
    """Mean of each reward over the items it applies to, and of the weighted total."""
    names = list(dict.fromkeys(k for s in scores for k in s))
    out = {}
    for name in names:
        vals = [s[name] for s in scores if s.get(name) is not None]
        if vals:
            out[name] = sum(vals) / len(vals)
    return out


def paired_change(first: list[dict], last: list[dict], key: str = "total") -> dict:
    """Mean per-prompt change of ``key`` between two evaluations of the same prompts, with its standard error."""
    diffs = [b[key] - a[key] for a, b in zip(first, last) if a.get(key) is not None and b.get(key) is not None]
    if len(diffs) < 2:
        return {}
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": sum(diffs) / len(diffs), "stderr": se, "n": len(diffs)}


LEARNED_REWARDS = ("reward_model",)  # rewards a model gives, which a policy can learn to please


def hacking_signature(first: list[dict], last: list[dict], weights: dict[str, float], z: float = 2.0) -> dict:
    """Does the policy please a learned reward at the expense of the rule-based ones? ``first`` and ``last``
    are the per-prompt scores of two held-out evaluations of the same prompts (step 0 and the end). The
    signature: a learned reward (``reward_model``) rises while the weighted mix of the rule rewards falls, each
    change beyond ``z`` paired standard errors. ``rules_falling`` names each rule reward with a positive weight
    that fell that far (a rule can fall for reasons of its own, so only the mix decides the signature).
    {} when the mix holds no learned reward, or fewer than two prompts have both scores.

    >>> first = [{"reward_model": .5, "rouge": .4 + i / 100} for i in range(8)]
    >>> last = [{"reward_model": .7 + i / 200, "rouge": .3 + i / 100} for i in range(8)]
    >>> h = hacking_signature(first, last, {"rouge": 1.0, "reward_model": 1.0})
    >>> h["signature"], h["rules_falling"], round(h["rules"]["mean"], 2)
    (True, ['rouge'], -0.1)
    """
    learned = [k for k in weights if k in LEARNED_REWARDS]
    rules = {k: w for k, w in weights.items() if k not in LEARNED_REWARDS and w > 0}
    if not learned or not rules:
        return {}

    def with_rules(scores: list[dict]) -> list[dict]:
        return [{**s, "rules": weighted_total(s, rules)} for s in scores]

    first, last = with_rules(first), with_rules(last)
    up = {k: c for k in learned if (c := paired_change(first, last, k))}
    mix = paired_change(first, last, "rules")
    if not up or not mix:  # fewer than two prompts scored both times: no standard error to decide by
        return {}

    def fell(c: dict) -> bool:
        return bool(c) and c["mean"] + z * c["stderr"] < 0

    falling = [k for k in rules if fell(paired_change(first, last, k))]
    rising = [k for k, c in up.items() if c["mean"] - z * c["stderr"] > 0]
    return {"learned": up, "rules": mix, "rules_falling": falling, "learned_rising": rising, "z": z,
            "signature": bool(rising) and fell(mix)}


class _Callback:
    """A transformers ``TrainerCallback`` by duck typing: the events a subclass does not define do nothing.
    (Subclassing the real one would import transformers with this module, slowing ``--help``.)"""

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class HeldOutReward(_Callback):
    """Scores greedy answers to fixed validation prompts at the start (``eval_on_start``), every
    ``eval_steps`` steps and at the end; the prompts are shared out over the processes. Each evaluation
    goes to TensorBoard (``heldout/<reward>``), to the trainer state's log history (so it survives a
    resume), and with its answers to ``<run_dir>/heldout.jsonl``."""

    def __init__(self, cfg: GRPOTrainConfig, rows: list[dict], tokenizer):
        self.cfg, self.rows, self.tok = cfg, rows, tokenizer
        self.trainer = None
        self.last_step = None
        self.weights = contextlib.nullcontext  # WeightEMA.applied: answer with the weights' moving average
        self.max_new_tokens = cfg.heldout_max_new_tokens or cfg.max_completion_length

    def evaluate(self, step: int) -> dict | None:
        from accelerate.utils import gather_object
        from trl.models import unwrap_model_for_generation

        from utils.models.generation import generate

        tr = self.trainer
        acc = tr.accelerator
        shard = self.rows[acc.process_index::acc.num_processes]
        started = time.time()
        # A process without prompts of its own answers the first one and drops the answer: under ZeRO-3
        # the processes must run the same generation calls, or the others wait for it for ever.
        prompts = [r["prompt"] for r in shard] or [self.rows[0]["prompt"]]
        with self.weights(), \
                unwrap_model_for_generation(tr.model_wrapped, acc, gather_deepspeed3_params=tr.args.ds3_gather_for_generation,
                                            gradient_checkpointing_kwargs=tr.args.gradient_checkpointing_kwargs) as m, \
                merged_adapter(m):
            answers = generate(m, self.tok, prompts, max_new_tokens=self.max_new_tokens,
                               batch_size=self.cfg.eval_batch_size or self.cfg.per_device_batch_size,
                               decode_dtype=self.cfg.decode_dtype)[:len(shard)]
        scores = self.cfg.score(answers, shard) if shard else []
        results = gather_object([{"id": r["id"], "task": r["task"], "answer": a, "scores": s}
                                 for r, a, s in zip(shard, answers, scores)])
        self.last_step = step
        if not acc.is_main_process:
            return None
        order = {r["id"]: i for i, r in enumerate(self.rows)}
        results.sort(key=lambda x: order[x["id"]])
        means = summarize_scores([x["scores"] for x in results])
        entry = {"step": step, **{f"heldout/{k}": round(v, 5) for k, v in means.items()}}
        tr.state.log_history.append(entry)
        writer = _tb_writer(tr)
        if writer is not None:
            for k, v in means.items():
                writer.add_scalar(f"heldout/{k}", v, step)
            writer.flush()
        with (Path(self.cfg.run_dir) / HELDOUT_LOG).open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "means": means, "items": results}, ensure_ascii=False) + "\n")
        log.info("held-out reward at step %d: %.4f (%s) over %d prompts in %.0f s", step, means.get("total", float("nan")),
                 ", ".join(f"{k} {v:.3f}" for k, v in means.items() if k != "total"), len(results),
                 time.time() - started)
        return means

    def on_train_begin(self, args, state, control, **kwargs):
        if self.rows and self.cfg.eval_on_start and state.global_step == 0:
            self.evaluate(0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.rows and state.global_step % self.cfg.eval_steps == 0:
            self.evaluate(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.rows and self.last_step != state.global_step:
            self.evaluate(state.global_step)


class WeightEMA(_Callback):
    """An exponential moving average of the trainable weights (Polyak averaging), updated after every
    optimizer step: ``avg = decay * avg + (1 - decay) * weights``, starting from the starting policy's.
    Sampling and training use the live weights; :meth:`applied` lends the average to the held-out reward
    and :meth:`apply` puts it in the model for the final save. Why: a short GRPO run's policy wanders
    between steps (its held-out reward moves by as much between two evaluations as over the run); the
    average keeps the drift that the steps share and smooths out what one step's samples happened to push.
    The average goes into every checkpoint (``weight_ema.pt``) so a resumed run continues it.
    Needs whole parameters on every process (one process, DDP; not ZeRO-3, whose shards it would not see)."""

    def __init__(self, decay: float, checkpoint: str | None = None):
        self.decay, self.checkpoint = decay, checkpoint
        self.trainer = None
        self.avg: dict | None = None

    def _params(self):
        return [(n, p) for n, p in self.trainer.model.named_parameters() if p.requires_grad]

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        params = self._params()
        saved = Path(self.checkpoint) / EMA_FILE if self.checkpoint else None
        if saved is not None and saved.exists():
            avg = torch.load(saved, map_location="cpu", weights_only=True)
            if sorted(avg) != sorted(n for n, _ in params):
                raise UserError(f"{saved}: its averaged weights are not this model's trainable ones; resume with "
                                 f"the settings that made it, or start a new run folder")
            self.avg = {n: avg[n].to(p.device, p.dtype) for n, p in params}
        else:
            if self.checkpoint:
                log.warning("%s has no %s: the weights' moving average starts again from the checkpoint's weights",
                            self.checkpoint, EMA_FILE)
            self.avg = {n: p.detach().clone() for n, p in params}

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        with torch.no_grad():
            for n, p in self._params():
                self.avg[n].lerp_(p.detach(), 1.0 - self.decay)
        # Written into the step's checkpoint folder before the Trainer fills it: the Trainer writes
        # trainer_state.json last, which makes a checkpoint complete, so a complete checkpoint always holds
        # its average (after the Trainer's own on_save a kill could leave one without). The flow callback,
        # which runs first, has already decided whether this step saves.
        if control.should_save and self.trainer.accelerator.is_main_process:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({n: t.cpu() for n, t in self.avg.items()}, folder / EMA_FILE)

    def _load(self, tensors: dict) -> None:
        import torch

        with torch.no_grad():
            for n, p in self._params():
                p.copy_(tensors[n])

    @contextlib.contextmanager
    def applied(self):
        """The model holds the average inside the block and its live weights again after it."""
        live = {n: p.detach().clone() for n, p in self._params()}
        self._load(self.avg)
        try:
            yield
        finally:
            self._load(live)

    def apply(self) -> None:
        """Put the average into the model for good (the final save)."""
        self._load(self.avg)


class DropEmptyMetrics(_Callback):
    """Removes metrics without a value from a log record before TensorBoard sees it: TRL reports a reward
    that applied to no completion of the step (e.g. yesno on a step without yes/no questions) as None,
    which the TensorBoard writer refuses with a warning each time. Must run first among the callbacks."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for k in [k for k, v in (logs or {}).items() if v is None]:
            del logs[k]


class KLWindow(_Callback):
    """Holds the KL penalty for the first ``steps`` optimizer steps, then sets the trainer's beta to 0, which
    TRL reads at every step: the reference pass and the penalty stop. A resumed run past the window starts
    without it, as the uninterrupted run was at that step."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_begin(self, args, state, control, **kwargs):
        # state.global_step counts the steps finished: this step is number global_step + 1
        if state.global_step >= self.steps and self.trainer.beta:
            log.info("KL penalty off from step %d (beta_steps %d)", state.global_step + 1, self.steps)
            self.trainer.beta = 0.0


class TimeLimit(_Callback):
    """Ends training once ``time_limit_minutes`` have passed since the first step began."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.started = None
        self.stopped = None  # {"steps_run", "steps_planned", "minutes"} once the limit ended the run

    def on_step_begin(self, args, state, control, **kwargs):
        if self.started is None:
            self.started = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds and self.started is not None and time.time() - self.started > self.seconds:
            log.warning("time limit of %.0f minutes reached at step %d of %d planned; finishing early: the "
                        "model depends on this machine's speed", self.seconds / 60, state.global_step, state.max_steps)
            self.stopped = {"steps_run": state.global_step, "steps_planned": state.max_steps,
                            "minutes": round(self.seconds / 60, 1)}
            control.should_training_stop = True
            control.should_save = True


class SampleLogger(_Callback):
    """Every ``sample_steps`` steps: the first ``samples_to_log`` prompt groups of the latest generation
    batch, each completion with its rewards and advantage, as a TensorBoard text table (``samples``) and a
    line of ``<run_dir>/samples.jsonl``."""

    def __init__(self, cfg: GRPOTrainConfig):
        self.cfg = cfg
        self.trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        if not self.cfg.sample_steps or state.global_step % self.cfg.sample_steps or \
                not self.trainer.accelerator.is_main_process:
            return
        logs = self.trainer._logs
        n = min(len(logs["prompt"]), self.cfg.samples_to_log * self.cfg.num_generations)
        if not n:
            return
        names = list(logs["rewards"])
        items = []
        for i in range(n):
            prompt = logs["prompt"][i]
            items.append({"question": completion_text([m for m in prompt if m.get("role") == "user"][-1:]),
                          "completion": completion_text(logs["completion"][i]),
                          "rewards": {k: _num(logs["rewards"][k][i]) for k in names},
                          "advantage": _num(logs["advantages"][i])})
        with (Path(self.cfg.run_dir) / SAMPLES_LOG).open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, "items": items}, ensure_ascii=False) + "\n")
        writer = _tb_writer(self.trainer)
        if writer is not None:
            writer.add_text("samples", samples_markdown(items, names), state.global_step)
            writer.flush()


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def samples_markdown(items: list[dict], names: list[str]) -> str:
    """Sample completions as Markdown: one table per question (TensorBoard renders it)."""
    out, question = [], None

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")[:600]

    for it in items:
        if it["question"] != question:
            question = it["question"]
            out += ["", f"**Q:** {cell(question)}", "", "| completion | " + " | ".join(names) + " | advantage |",
                    "|---" * (len(names) + 2) + "|"]
        vals = " | ".join("-" if it["rewards"][k] is None else f"{it['rewards'][k]:.2f}" for k in names)
        adv = "-" if it["advantage"] is None else f"{it['advantage']:.2f}"
        out.append(f"| {cell(it['completion'])} | {vals} | {adv} |")
    return "\n".join(out).strip()


def heldout_summary(history: list[dict]) -> dict:
    """The held-out curve from the log history, its first and last points, and the step-to-step noise (std of
    the differences between consecutive evaluations of the weighted total)."""
    curve = [h for h in history if "heldout/total" in h]
    out: dict[str, Any] = {"heldout": curve}
    if curve:
        out["heldout_first"], out["heldout_last"] = curve[0], curve[-1]
        if len(curve) >= 3:
            out["heldout_step_noise"] = step_noise([h["heldout/total"] for h in curve])
    return out


def step_noise(curve: list[float]) -> float:
    """The spread (standard deviation) of the changes between consecutive held-out evaluations; needs three."""
    return statistics.stdev(b - a for a, b in zip(curve, curve[1:]))


def heldout_ratio_interval(evals: list[dict], resamples: int = 1000, confidence: float = 0.9, seed: int = 0) -> dict:
    """How much the held-out gain over its step noise owes to which prompts the held-out set holds: the ratio
    recomputed on ``resamples`` bootstrap resamples of the prompts (one resample serves every evaluation, as
    the same prompts answer each), with its median and central ``confidence`` interval. ``evals`` are the
    run folder's held-out log rows (a step evaluated twice, before and after a resume, counts once: the
    later); {} with fewer than three evaluations or two prompts, or without step noise (changes all equal).

    >>> evals = [{"step": s, "items": [{"id": "a", "scores": {"total": t}}, {"id": "b", "scores": {"total": t + .1}}]}
    ...          for s, t in zip((0, 20, 40, 60), (0.5, 0.52, 0.55, 0.56))]
    >>> round(heldout_ratio_interval(evals)["value"], 2)
    6.0
    """
    evals = latest_per_step(evals)
    if len(evals) < 3:
        return {}
    totals = [{it["id"]: it["scores"].get("total") for it in e["items"]} for e in evals]
    ids = [i for i in totals[0] if all(t.get(i) is not None for t in totals)]
    if len(ids) < 2:
        return {}

    def ratio(sample: list[str]) -> float | None:
        curve = [sum(t[i] for i in sample) / len(sample) for t in totals]
        noise = step_noise(curve)
        return (curve[-1] - curve[0]) / noise if noise > 0 else None

    value = ratio(ids)
    rng = random.Random(seed)
    ratios = sorted(r for r in (ratio(rng.choices(ids, k=len(ids))) for _ in range(resamples)) if r is not None)
    if value is None or not ratios:
        return {}
    tail = (1 - confidence) / 2

    def quantile(q: float) -> float:
        return ratios[min(len(ratios) - 1, int(q * len(ratios)))]

    return {"value": value, "median": quantile(0.5), "lo": quantile(tail), "hi": quantile(1 - tail),
            "confidence": confidence, "resamples": len(ratios), "prompts": len(ids)}


def latest_per_step(evals: list[dict]) -> list[dict]:
    """Held-out log rows in step order, a step evaluated twice (before and after a resume) once: the later."""
    return [e for _, e in sorted({e["step"]: e for e in evals}.items())]


def _read_heldout(run_dir: str, repair: bool = True) -> list[dict]:
    """The run folder's held-out log (``repair=False``: read only, for a run that may still be appending)."""
    return read_log(Path(run_dir) / HELDOUT_LOG, repair=repair)
