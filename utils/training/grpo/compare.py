"""GRPO runs side by side on their held-out (validation) curves, each on its own reward mix or all on one.

Settings are chosen on validation only (the test split chooses nothing): every run folder keeps each held-out
evaluation's answers and per-reward scores (``heldout.jsonl``), so runs trained on different mixes can be read
on one yardstick (a common mix recomputed from those scores) without generating anything again.
``scripts/heldout_table.py`` prints :func:`compare_runs`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from utils.core.config import ConfigError, UserError, load_config
from utils.rewards.mix import weighted_total
from utils.training.grpo.callbacks import (
    HELDOUT_LOG,
    _read_heldout,
    heldout_ratio_interval,
    latest_per_step,
    step_noise,
    summarize_scores,
)

BENCHMARK = ("rouge", "bleu1", "meteor")  # the paper's metrics, logged as rewards of the same names
BAR = 3.0  # the README's results hold every seed to it: a gain that three steps' noise cannot explain


def mix_weights(text: str) -> dict[str, float]:
    """Reward weights from a YAML config's ``rewards`` (``text`` a file: a GRPO or evaluation recipe) or from a
    YAML mapping given inline, checked as a config's ``rewards`` is."""
    import yaml

    from utils.rewards.mix import RewardMix

    path = Path(text)
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict) or "rewards" not in data:
            raise ConfigError(f"{path}: no 'rewards' mapping in it (a GRPO or evaluation config has one)")
        text = data["rewards"]
    elif not text.lstrip().startswith("{"):
        raise ConfigError(f"--mix {text!r}: neither a config file nor a mapping like '{{rouge: 1, bleu1: 1}}'")
    # The mix is only read back from logged scores: no reward model is loaded, so none has to be named.
    return load_config(RewardMix, None, {"rewards": text, "reward_model": "logged"}).rewards


def read_heldout(run_dir: str | Path) -> list[dict]:
    """A run folder's held-out evaluations in step order (a step evaluated twice, before and after a resume,
    counts once: the later). Read-only: a run still appending is not touched."""
    path = Path(run_dir) / HELDOUT_LOG
    if not path.is_file():
        raise UserError(f"{run_dir}: no held-out log {HELDOUT_LOG} (grpo_train.py writes it when heldout_prompts > 0)")
    evals = latest_per_step([e for e in _read_heldout(run_dir, repair=False) if "step" in e and "items" in e])
    if not evals:
        raise UserError(f"{path}: no held-out evaluation in it yet")
    return evals


def rescore(evals: list[dict], weights: dict[str, float], where: str = "") -> list[dict]:
    """``evals`` with each item's ``total`` recomputed as the ``weights``' mix of its logged rewards (the
    weighted mean over the rewards that apply to it, as in training). A weighted reward that the run never
    logged is an error naming it, not a silently smaller mix.

    >>> ev = [{"step": 0, "items": [{"id": "a", "answer": "x", "scores": {"rouge": 0.2, "bleu1": 0.4, "total": 0.9}}]}]
    >>> round(rescore(ev, {"rouge": 1.0, "bleu1": 1.0})[0]["items"][0]["scores"]["total"], 3)
    0.3
    """
    logged = {k for e in evals for it in e["items"] for k in it["scores"]} - {"total"}
    missing = [k for k, w in weights.items() if w > 0 and k not in logged]
    if missing:
        raise UserError(f"{where or 'run'}: its held-out log has no {missing[0]!r} scores, so that mix cannot be "
                        f"recomputed; it logged: {', '.join(sorted(logged))}")
    return [{**e, "items": [{**it, "scores": {**it["scores"], "total": weighted_total(it["scores"], weights)}}
                            for it in e["items"]]} for e in evals]


def curve(evals: list[dict]) -> dict:
    """What one run's held-out evaluations say: the steps, the mean total and answer words at each, the
    benchmark's metrics at the last, the gain over the step noise and its interval over prompt resamples."""
    means = [summarize_scores([it["scores"] for it in e["items"]]) for e in evals]
    totals = [m.get("total") for m in means]
    out = {"steps": [e["step"] for e in evals], "totals": totals, "prompts": len(evals[0]["items"]),
           "words": [statistics.mean(len(str(it.get("answer", "")).split()) for it in e["items"]) if e["items"]
                     else 0.0 for e in evals],
           "benchmark": {k: means[-1][k] for k in BENCHMARK if k in means[-1]}}
    if len(totals) >= 3 and None not in totals:
        noise = step_noise(totals)
        out.update(gain=totals[-1] - totals[0], noise=noise,
                   ratio=(totals[-1] - totals[0]) / noise if noise > 0 else None,
                   interval=heldout_ratio_interval(evals))
    return out


def _ratio_cell(c: dict) -> str:
    if "gain" not in c:
        return "(needs 3 evaluations)"
    if c["ratio"] is None:
        return f"{c['gain']:+.4f} / 0 (no step noise)"
    iv = c["interval"]
    span = f" (90%: {iv['lo']:.1f}-{iv['hi']:.1f}x)" if iv else ""
    return f"{c['gain']:+.4f} / {c['noise']:.4f} = {c['ratio']:.2f}x{span}"


def compare_runs(run_dirs: list[str], weights: dict[str, float] | None = None) -> str:
    """A markdown table of the runs' held-out curves: per run the prompts, the steps evaluated, the mean
    total at each, its gain over the step noise (:data:`BAR`) with the interval over prompt resamples,
    ROUGE-L / BLEU-1 / METEOR at the last evaluation and the answers' mean words at each. ``weights``
    (reward name -> weight): every run's totals recomputed on that one mix; None: each run's own."""
    rows = []
    for d in run_dirs:
        evals = read_heldout(d)
        if weights is not None:
            evals = rescore(evals, weights, str(d))
        rows.append((d, curve(evals)))
    which = "the given mix" if weights is not None else "each run's own mix"
    lines = [f"| run | prompts | steps | held-out total ({which}) | gain / step noise | ROUGE-L / BLEU-1 / METEOR at the "
             "end | words |", "| --- | ---: | --- | --- | --- | --- | --- |"]
    for d, c in rows:
        bench = " / ".join(f"{c['benchmark'][k]:.4f}" if k in c["benchmark"] else "-" for k in BENCHMARK)
        totals = " / ".join("-" if t is None else f"{t:.4f}" for t in c["totals"])
        lines.append(f"| {d} | {c['prompts']} | {'/'.join(map(str, c['steps']))} | {totals} | {_ratio_cell(c)} | "
                     f"{bench} | {' / '.join(f'{w:.1f}' for w in c['words'])} |")
    passed = sum(1 for _, c in rows if (c.get("ratio") or 0) >= BAR)
    lines += ["", f"Held-out gain at least {BAR:g}x its step noise: {passed} of {len(rows)} runs."]
    return "\n".join(lines)
