"""Several trained runs (one per seed) against one baseline, read from an evaluation report.

The question a recipe must answer is whether GRPO beats SFT, not whether one lucky run does. Evaluate the
baseline and every seed's model together (``evaluate.py --models sft,models/rlhf-s42,models/rlhf-s43,...``;
cached answers are not generated again), then :func:`seed_table` reads the report's ``metrics.json`` and
``answers.jsonl`` and each model folder's training ``metrics.json`` (held-out reward change and its step
noise), and says for each run, and for the runs pooled, whether it meets the bar of issue 21:

- the reward mix rises (paired test p < alpha);
- at least two of ROUGE-L, BLEU-1 and METEOR rise with p < alpha, and none falls with p < alpha;
- yes/no balanced accuracy rises;
- the held-out reward gain is at least 3x its step noise (per run; the pooled row has none). Beside it, the
  ratio's 90% interval over bootstrap resamples of the held-out prompts (training's ``heldout_ratio``): how
  much the verdict owes to which prompts happened to be held out;
- with a trained reward model in the run's mix: no reward-hacking signature (training's ``reward_hacking``:
  the reward model's held-out score up while the rule rewards' mix fell).

"Pooled" compares the baseline with the per-item mean of the runs' scores: the recipe's expected answer
quality, with the seed-to-seed spread averaged out, on the same paired test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from utils.core.config import UserError
from utils.evaluation.stats import paired_comparison

BENCHMARK = ("rouge", "bleu1", "meteor")  # the ECG-Expert-QA paper's metrics
COLUMNS = {"rouge": "ROUGE-L", "bleu1": "BLEU-1", "meteor": "METEOR", "total": "reward mix"}
# Held-out gain over step noise a run must reach (issue 21). The step noise is the spread of the changes
# between consecutive held-out evaluations: the policy's own wandering plus the error of measuring it on a
# finite prompt set. Below 3x, the gain is within what the curve moves by from one evaluation to the next.
NOISE_FACTOR = 3.0


@dataclass
class RunResult:
    """One run (or the pooled runs) against the baseline."""
    name: str
    diffs: dict[str, dict | None]           # metric -> paired comparison (mean, lo, hi, p) of run - baseline
    balanced: float | None                  # yes/no balanced accuracy
    heldout_gain: float | None = None
    heldout_noise: float | None = None
    heldout_ratio: dict = field(default_factory=dict)  # the ratio's bootstrap over held-out prompts (median, lo, hi)
    hacking: dict = field(default_factory=dict)  # training's reward-hacking check ({} without a reward model)
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def passes(self) -> bool:
        return bool(self.checks) and all(self.checks.values())


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found (evaluate.py writes it)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _training_metrics(model_path: str | None) -> dict:
    """A GRPO output folder's metrics.json (held-out change, step noise, the ratio's interval, the
    reward-hacking check); {} where absent."""
    path = Path(model_path) / "metrics.json" if model_path else None
    return _read(path) if path and path.is_file() else {}


def _check(r: RunResult, base_balanced: float | None, alpha: float) -> dict[str, bool]:
    def up(m):
        d = r.diffs.get(m)
        return bool(d) and d["mean"] > 0 and d["p"] < alpha

    def down(m):
        d = r.diffs.get(m)
        return bool(d) and d["mean"] < 0 and d["p"] < alpha

    checks = {
        "reward mix up": up("total"),
        "2 of 3 benchmark metrics up": sum(up(m) for m in BENCHMARK) >= 2,
        "no benchmark metric down": not any(down(m) for m in BENCHMARK),
        "balanced yes/no up": r.balanced is not None and base_balanced is not None and r.balanced > base_balanced,
    }
    if r.name != "pooled":
        checks["held-out gain >= 3x noise"] = (r.heldout_gain is not None and bool(r.heldout_noise)
                                               and r.heldout_gain >= NOISE_FACTOR * r.heldout_noise)
    if r.hacking:
        checks["no reward hacking"] = not r.hacking.get("signature")
    return checks


def seed_results(report: str | Path, baseline: str = "sft", alpha: float = 0.05,
                 runs: list[str] | None = None) -> tuple[list[RunResult], dict]:
    """Each run of the report against ``baseline``, then the pooled runs; and the report's metrics.json.
    ``runs``: the models to compare (default: every model but the baseline and, unless it is the baseline,
    the untrained ``base``, which a pipeline report holds beside SFT and GRPO but no seed pool should)."""
    report = Path(report)
    meta = _read(report / "metrics.json")
    names = [m["name"] for m in meta.get("models", [])]
    if baseline not in names:
        raise UserError(f"{report / 'metrics.json'}: no model {baseline!r} (models: {', '.join(names)}); "
                        f"set --baseline")
    if runs:
        unknown = [n for n in runs if n not in names or n == baseline]
        if unknown:
            raise UserError(f"{report / 'metrics.json'}: runs {', '.join(unknown)}: expected models of the report "
                            f"other than the baseline {baseline!r} ({', '.join(n for n in names if n != baseline)})")
    else:
        runs = [n for n in names if n not in (baseline, "base")]
    if not runs:
        raise UserError(f"{report / 'metrics.json'}: only {baseline!r} was evaluated; evaluate the runs beside it")
    paths = {m["name"]: m.get("path") for m in meta["models"]}
    balanced = {n: (meta["summary"].get("balanced_accuracy", {}).get(n) or {}).get("all") for n in names}
    paired = {p["b"]: p["metrics"] for p in meta.get("paired", []) if p["a"] == baseline}
    cfg = meta.get("config", {})
    stats_args = (cfg.get("bootstrap", 1000), cfg.get("confidence", 0.95), cfg.get("seed", 0))
    metrics = [*BENCHMARK, "total"]

    out = []
    for n in runs:
        # The report compares each later model with each earlier one; a baseline listed after a run is read
        # the other way round.
        diffs = paired.get(n) or {m: _flip(d) for p in meta.get("paired", []) if p["a"] == n and p["b"] == baseline
                                  for m, d in p["metrics"].items()}
        t = _training_metrics(paths.get(n))
        gain = ((t.get("heldout_change") or {}).get("total") or {}).get("mean")
        out.append(RunResult(n, {m: diffs.get(m) for m in metrics}, balanced.get(n), gain, t.get("heldout_step_noise"),
                             t.get("heldout_ratio") or {}, t.get("reward_hacking") or {}))

    if len(runs) > 1:
        items = [json.loads(line) for line in (report / "answers.jsonl").read_text(encoding="utf-8").splitlines()
                 if line.strip()]
        diffs = {}
        for m in metrics:
            a, b = [], []
            for it in items:
                base = it["answers"][baseline]["scores"].get(m)
                vals = [it["answers"][n]["scores"].get(m) for n in runs]
                if base is not None and all(v is not None for v in vals):
                    a.append(base)
                    b.append(sum(vals) / len(vals))
            diffs[m] = paired_comparison(a, b, *stats_args)
        bals = [balanced.get(n) for n in runs]
        out.append(RunResult("pooled", diffs, sum(bals) / len(bals) if None not in bals else None))

    for r in out:
        r.checks = _check(r, balanced.get(baseline), alpha)
    return out, meta


def _flip(d: dict | None) -> dict | None:
    if not d:
        return d
    return {**d, "mean": -d["mean"], "lo": -d["hi"], "hi": -d["lo"]}


def _cell(d: dict | None) -> str:
    if not d:
        return "n/a"
    p = d["p"]
    return f"{d['mean']:+.3f} (p {p:.3f})" if p >= 0.001 else f"{d['mean']:+.3f} (p < 0.001)"


def seed_table(report: str | Path, baseline: str = "sft", alpha: float = 0.05, runs: list[str] | None = None) -> str:
    """A markdown table: each run's paired difference from the baseline on the benchmark metrics and the
    reward mix (with p), balanced yes/no accuracy, held-out gain over step noise, and which checks fail."""
    results, meta = seed_results(report, baseline, alpha, runs)
    base_bal = (meta["summary"].get("balanced_accuracy", {}).get(baseline) or {}).get("all")
    head = ["run", *COLUMNS.values(), "balanced yes/no", "held-out gain / noise", f"meets the bar (p < {alpha})"]
    lines = [f"{meta.get('items', '?')} test items; differences are run - {baseline} "
             f"(balanced yes/no accuracy of {baseline}: {_num(base_bal)})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ratio = (f"{r.heldout_gain:+.4f} / {r.heldout_noise:.4f} = {r.heldout_gain / r.heldout_noise:.1f}x"
                 if r.heldout_gain is not None and r.heldout_noise else "n/a")
        if r.heldout_ratio:
            iv = r.heldout_ratio
            ratio += f" ({iv['confidence']:.0%}: {iv['lo']:.1f}-{iv['hi']:.1f}x)"
        verdict = "yes" if r.passes else "no: " + ", ".join(k for k, v in r.checks.items() if not v)
        cells = [r.name, *(_cell(r.diffs.get(m)) for m in COLUMNS), _num(r.balanced), ratio, verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
