"""GRPO runs compared on their held-out logs (scripts/heldout_table.py, utils/training/grpo/compare.py)."""

import json
import statistics
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT
from utils.core.config import UserError
from utils.training.grpo.compare import compare_runs, curve, read_heldout, rescore

RECIPE = yaml.safe_load((ROOT / "configs/cpu/grpo.yaml").read_text())["rewards"]


def _run(tmp_path, name: str, steps: list[int], rouge: list[float], extra: dict[str, float] | None = None,
         words: list[int] | None = None):
    """A run folder whose held-out log has two prompts per evaluation: prompt b scores 0.1 above a on every
    reward; the logged total is rouge + 0.5 (any number: the run's own mix)."""
    folder = tmp_path / name
    folder.mkdir()
    lines = []
    for k, (step, r) in enumerate(zip(steps, rouge)):
        items = []
        for i, pid in enumerate("ab"):
            s = {name_: 0.5 for name_ in RECIPE} | {"rouge": r + 0.1 * i, "bleu1": 0.3, "meteor": 0.2} | (extra or {})
            s["total"] = s["rouge"] + 0.5
            items.append({"id": pid, "task": "CD", "answer": " ".join(["w"] * (words[k] if words else 3)),
                          "scores": s})
        lines.append(json.dumps({"step": step, "means": {}, "items": items}) + "\n")
    (folder / "heldout.jsonl").write_text("".join(lines))
    return folder


def test_own_mix_and_one_mix_for_all(tmp_path):
    a = _run(tmp_path, "a", [0, 20, 40, 60], [0.30, 0.32, 0.33, 0.36], {"length_match": 0.7}, words=[20, 30, 40, 50])
    b = _run(tmp_path, "b", [0, 20, 40, 60], [0.30, 0.29, 0.31, 0.30])
    ca = curve(read_heldout(a))
    # the mean over the two prompts: rouge + 0.05 + 0.5
    assert ca["totals"] == pytest.approx([0.85, 0.87, 0.88, 0.91])
    noise = statistics.stdev([0.02, 0.01, 0.03])
    assert ca["gain"] == pytest.approx(0.06) and ca["noise"] == pytest.approx(noise)
    assert ca["ratio"] == pytest.approx(0.06 / noise)
    assert ca["words"] == [20, 30, 40, 50] and ca["prompts"] == 2 and ca["steps"] == [0, 20, 40, 60]
    assert ca["benchmark"] == pytest.approx({"rouge": 0.41, "bleu1": 0.3, "meteor": 0.2})

    # one mix for both runs: ROUGE-L alone, recomputed from the logged scores
    ev = rescore(read_heldout(a), {"rouge": 1.0})
    assert curve(ev)["totals"] == pytest.approx([0.35, 0.37, 0.38, 0.41])
    # a mix of two: the weighted mean over the rewards that apply, as in training
    ev = rescore(read_heldout(b), {"rouge": 1.0, "bleu1": 3.0})
    assert curve(ev)["totals"][0] == pytest.approx((0.35 + 3 * 0.3) / 4)

    table = compare_runs([str(a), str(b)], {"rouge": 1.0})
    assert "the given mix" in table and "0.3500 / 0.3700 / 0.3800 / 0.4100" in table
    assert f"+0.0600 / {noise:.4f} = {0.06 / noise:.2f}x" in table
    assert "0.8500 / 0.8700" in compare_runs([str(a)])  # its own totals
    assert table.endswith("at least 3x its step noise: 1 of 2 runs.")  # a: 6x; b: no gain


def test_a_reward_the_run_never_logged_is_an_error_not_a_smaller_mix(tmp_path):
    b = _run(tmp_path, "b", [0, 20, 40], [0.30, 0.29, 0.31])
    with pytest.raises(UserError, match=r"b: its held-out log has no 'length_match' scores.*it logged: .*rouge"):
        compare_runs([str(b)], {"rouge": 1.0, "length_match": 1.0})
    # weight 0 only logs a reward in training: not needed here either
    assert "0.3500" in compare_runs([str(b)], {"rouge": 1.0, "length_match": 0.0})


def test_resumed_steps_count_once_and_short_or_missing_logs(tmp_path):
    a = _run(tmp_path, "a", [0, 20, 20, 40], [0.30, 0.99, 0.32, 0.33])
    assert curve(read_heldout(a))["totals"] == pytest.approx([0.85, 0.87, 0.88])  # the later step 20
    short = _run(tmp_path, "short", [0, 20], [0.30, 0.32])
    assert "(needs 3 evaluations)" in compare_runs([str(short)])
    flat = _run(tmp_path, "flat", [0, 20, 40], [0.30, 0.31, 0.32])
    assert "(no step noise)" in compare_runs([str(flat)])
    with pytest.raises(UserError, match=r"none: no held-out log heldout.jsonl \(grpo_train.py writes it"):
        read_heldout(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "heldout.jsonl").write_text("")
    with pytest.raises(UserError, match="no held-out evaluation in it yet"):
        read_heldout(tmp_path / "empty")


def test_a_run_still_writing_is_read_not_repaired(tmp_path):
    a = _run(tmp_path, "a", [0, 20, 40], [0.30, 0.32, 0.33])
    log = a / "heldout.jsonl"
    torn = log.read_text() + '{"step": 60, "items": [{"id"'
    log.write_text(torn)
    assert curve(read_heldout(a))["steps"] == [0, 20, 40]
    assert log.read_text() == torn  # the run appending to it finishes its line


def test_cli_reads_the_mix_from_a_config_or_inline(tmp_path):
    a = _run(tmp_path, "a", [0, 20, 40], [0.30, 0.32, 0.33])

    def cli(*args):
        return subprocess.run([sys.executable, "scripts/heldout_table.py", *args], cwd=ROOT, capture_output=True,
                              text=True)

    out = cli(str(a), "--mix", "configs/cpu/grpo.yaml")  # the recipe's mix: every reward of it is logged
    assert out.returncode == 0, out.stderr
    assert "| 2 | 0/20/40 |" in out.stdout and "the given mix" in out.stdout
    out = cli(str(a), "--mix", "{rouge: 1}")
    assert out.returncode == 0 and "0.3500 / 0.3700 / 0.3800" in out.stdout
    # a learned reward is read from the log as any other, with no model to name
    b = _run(tmp_path, "b", [0, 20, 40], [0.30, 0.32, 0.33], {"reward_model": 0.6})
    out = cli(str(b), "--mix", "{reward_model: 1}")
    assert out.returncode == 0 and "0.6000 / 0.6000 / 0.6000" in out.stdout, out.stderr
    for bad, says in (("{rogue: 1}", "expected a mapping of reward names"), ("rouge", "neither a config file nor"),
                      ("configs/cpu/prepare.yaml", "no 'rewards' mapping")):
        out = cli(str(a), "--mix", bad)
        assert out.returncode == 2 and says in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = cli(str(tmp_path / "nothing"))
    assert out.returncode == 2 and "no held-out log" in out.stderr
