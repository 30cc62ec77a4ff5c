"""The seed table: several runs against a baseline, read from an evaluation report."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from utils.core.config import UserError
from utils.evaluation.seeds import seed_results, seed_table

METRICS = ("rouge", "bleu1", "meteor", "total")


def _report(tmp_path, shifts: dict[str, dict[str, float]], balanced: dict[str, float], heldout: dict):
    """A report of 60 items: the baseline's scores vary per item; each run adds its shift per metric plus
    small item noise, so a shift of 0.05 is significant and 0 is not."""
    import random

    rng = random.Random(0)
    names = ["sft", *shifts]
    items, scores = [], {n: [] for n in names}
    for i in range(60):
        base = {m: 0.3 + 0.2 * rng.random() for m in METRICS}
        answers = {"sft": {"text": "a", "scores": base}}
        scores["sft"].append(base)
        for n, sh in shifts.items():
            s = {m: base[m] + sh.get(m, 0.0) + rng.uniform(-0.02, 0.02) for m in METRICS}
            answers[n] = {"text": "b", "scores": s}
            scores[n].append(s)
        items.append({"id": str(i), "answers": answers})
    from utils.evaluation.stats import paired_comparison

    paired = [{"a": a, "b": b, "metrics": {m: paired_comparison([x[m] for x in scores[a]], [y[m] for y in scores[b]],
                                                                200, 0.95, 0) for m in METRICS}}
              for k, a in enumerate(names) for b in names[k + 1:]]
    models = []
    for n in names:
        folder = tmp_path / n
        folder.mkdir()
        if n in heldout:
            gain, noise, *extra = heldout[n]
            interval, hacking = (extra + [None, None])[:2]
            (folder / "metrics.json").write_text(json.dumps({"heldout_change": {"total": {"mean": gain}},
                                                             "heldout_step_noise": noise,
                                                             **({"heldout_ratio": interval} if interval else {}),
                                                             **({"reward_hacking": hacking} if hacking else {})}))
        models.append({"name": n, "path": str(folder)})
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text(json.dumps({
        "items": 60, "models": models, "paired": paired, "config": {"bootstrap": 200, "confidence": 0.95, "seed": 0},
        "summary": {"balanced_accuracy": {n: {"all": v} for n, v in balanced.items()}}}))
    (report / "answers.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    return report


def test_a_run_that_gains_everywhere_passes_and_one_that_does_not_says_why(tmp_path):
    up = {"rouge": 0.05, "bleu1": 0.05, "meteor": 0.0, "total": 0.05}
    report = _report(tmp_path, {"good": up, "flat": {}, "drop": {**up, "meteor": -0.05}},
                     {"sft": 0.45, "good": 0.50, "flat": 0.45, "drop": 0.55},
                     {"good": (0.01, 0.002, {"value": 5.0, "median": 3.2, "lo": 0.4, "hi": 9.1, "confidence": 0.9}),
                      "flat": (0.001, 0.002), "drop": (0.01, 0.002)})
    results, _ = seed_results(report)
    by = {r.name: r for r in results}
    assert list(by) == ["good", "flat", "drop", "pooled"]
    assert by["good"].passes and by["good"].diffs["rouge"]["p"] < 0.05
    assert not by["flat"].passes
    assert {k for k, v in by["flat"].checks.items() if not v} == {
        "reward mix up", "2 of 3 benchmark metrics up", "balanced yes/no up", "held-out gain >= 3x noise"}
    assert {k for k, v in by["drop"].checks.items() if not v} == {"no benchmark metric down"}
    # pooled: the per-item mean of the three runs (rouge +0.033 on average), balanced the runs' mean
    pooled = by["pooled"]
    assert pooled.diffs["rouge"]["mean"] == pytest.approx(0.10 / 3, abs=0.01) and pooled.diffs["rouge"]["p"] < 0.05
    assert pooled.balanced == pytest.approx(0.5) and "held-out gain >= 3x noise" not in pooled.checks

    table = seed_table(report)
    assert "| good | +0.05" in table and "| yes |" in table
    assert "no: no benchmark metric down" in table and "5.0x" in table
    # the ratio's interval over resamples of the held-out prompts, where training wrote one
    assert "= 5.0x (90%: 0.4-9.1x) |" in table and "| flat |" in table and table.count("(90%:") == 1


def test_a_run_that_pleased_its_reward_model_fails_the_bar(tmp_path):
    up = {"rouge": 0.05, "bleu1": 0.05, "meteor": 0.0, "total": 0.05}
    report = _report(tmp_path, {"hacked": up, "clean": up}, {"sft": 0.45, "hacked": 0.5, "clean": 0.5},
                     {"hacked": (0.01, 0.002, None, {"signature": True}),
                      "clean": (0.01, 0.002, None, {"signature": False})})
    by = {r.name: r for r in seed_results(report)[0]}
    assert by["clean"].passes and by["clean"].checks["no reward hacking"]
    assert {k for k, v in by["hacked"].checks.items() if not v} == {"no reward hacking"}
    assert "| hacked |" in seed_table(report) and "no: no reward hacking" in seed_table(report)
    # a run without a reward model in its mix has no such check
    (tmp_path / "other").mkdir()
    report = _report(tmp_path / "other", {"plain": up}, {"sft": 0.45, "plain": 0.5}, {"plain": (0.01, 0.002)})
    assert "no reward hacking" not in seed_results(report)[0][0].checks


def test_a_baseline_after_the_runs_is_read_the_other_way_round(tmp_path):
    report = _report(tmp_path, {"run": {"rouge": 0.05}}, {"sft": 0.4, "run": 0.5}, {})
    meta = json.loads((report / "metrics.json").read_text())
    assert [p["a"] for p in meta["paired"]] == ["sft"]
    (r,), _ = seed_results(report, baseline="sft")
    (back,), _ = seed_results(report, baseline="run")
    assert back.diffs["rouge"]["mean"] == pytest.approx(-r.diffs["rouge"]["mean"])
    assert r.heldout_gain is None and not r.checks["held-out gain >= 3x noise"]


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"metrics.json: not found \(evaluate.py writes it\)"):
        seed_results(tmp_path)
    report = _report(tmp_path, {"run": {}}, {"sft": 0.4, "run": 0.5}, {})
    with pytest.raises(UserError, match="no model 'rlhf'.*models: sft, run"):
        seed_results(report, baseline="rlhf")
    r = subprocess.run([sys.executable, "scripts/seed_table.py", str(tmp_path / "none")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not found" in r.stderr


def test_a_pipeline_report_compares_grpo_alone_and_runs_can_be_named(tmp_path):
    """`make demo`'s report holds base, sft and rlhf: the untrained base is no seed run (no pooled row of
    base and GRPO); --runs picks models, and a name the report lacks is refused with the valid ones."""
    up = {"rouge": 0.05, "bleu1": 0.05, "total": 0.05}
    report = _report(tmp_path, {"base": {m: -0.1 for m in METRICS}, "rlhf": up},
                     {"sft": 0.45, "base": 0.3, "rlhf": 0.5}, {"rlhf": (0.01, 0.002)})
    results, _ = seed_results(report)
    assert [r.name for r in results] == ["rlhf"] and results[0].passes
    assert [r.name for r in seed_results(report, runs=["base", "rlhf"])[0]] == ["base", "rlhf", "pooled"]
    assert [r.name for r in seed_results(report, baseline="base")[0]] == ["sft", "rlhf", "pooled"]
    with pytest.raises(UserError, match=r"runs s42: expected models of the report other than .*\(base, rlhf\)"):
        seed_results(report, runs=["s42"])
    out = subprocess.run([sys.executable, "scripts/seed_table.py", str(report), "--runs", "rlhf"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert "| rlhf |" in out and "| base |" not in out and "pooled" not in out
