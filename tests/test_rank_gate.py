"""A reward model's ranking of the policy's own logged answers (scripts/rank_gate.py,
utils/training/grpo/rank_gate.py)."""

import json

import pytest

from utils.core.config import UserError
from utils.data.rows import read_split
from utils.training.grpo.rank_gate import policy_pairs, rank_gate

FILLER = "potassium sodium calcium magnesium chloride phosphate bicarbonate lactate glucose urea".split()


class CharScorer:
    """A stand-in reward model: the longer answer (in characters) is the better."""

    def scores(self, users, answers, refs=None):
        return [float(len(a)) for a in answers]


def _log(folder, items_per_step):
    folder.mkdir()
    folder.joinpath("heldout.jsonl").write_text("".join(
        json.dumps({"step": s, "means": {}, "items": [{"id": i, "task": "CD", "answer": a, "scores": {"total": 0.5}}
                                                      for i, a in items]}) + "\n"
        for s, items in enumerate(items_per_step)))
    return folder


@pytest.fixture
def two_prompts(processed, tmp_path):
    """Two runs' logs for two validation prompts: on the first the reference (the better answer) is the longer of
    the pair, on the second the shorter."""
    rows = [r for r in read_split(processed, "grpo/validation") if 6 <= len(r["reference"].split()) <= 30][:2]
    assert len(rows) == 2
    (a, ra), (b, rb) = ((r["id"], r["reference"]) for r in rows)
    n_a, n_b = len(ra.split()), len(rb.split())
    worse_a = " ".join(["ox"] * n_a)               # as many words as the reference, fewer characters
    worse_b = " ".join((FILLER * 6)[: n_b + 2])     # more words (within 1.5x), more characters
    assert len(worse_a) < len(ra) and len(worse_b) > len(rb)
    run1 = _log(tmp_path / "r1", [[(a, ra), (b, rb)], [(a, ra), (b, rb)]])
    run2 = _log(tmp_path / "r2", [[(a, worse_a), (b, worse_b)]])
    return [str(run1), str(run2)], rows


def test_pairs_of_the_logged_answers(processed, two_prompts):
    runs, rows = two_prompts
    pairs = policy_pairs(runs, str(processed))
    assert [(p["id"], p["chosen"]) for p in pairs] == [(r["id"], r["reference"]) for r in rows]
    assert all(p["reference"] == p["chosen"] and p["rejected"] != p["chosen"] for p in pairs)


def test_rank_gate_counts_the_order_and_the_length_preference(processed, two_prompts, monkeypatch):
    from utils.rewards import reward_model

    monkeypatch.setitem(reward_model._SCORERS, ("stub", None), CharScorer())
    got = rank_gate("stub", two_prompts[0], str(processed))
    # right on the first prompt (the better is the longer), wrong on the second; length is counted in words, so
    # only the second pair (the worse answer has 2 words more) counts there
    assert got == {"reward_model": "stub", "pairs": 2, "prompts": 2, "accuracy": 0.5, "prefers_longer": 1.0,
                   "longer_is_better": 0.0}


def test_errors_name_the_run(processed, tmp_path):
    stray = _log(tmp_path / "stray", [[("not-a-validation-id", "An answer.")]])
    with pytest.raises(UserError, match="'not-a-validation-id' is not in"):
        policy_pairs([str(stray)], str(processed))
    rows = read_split(processed, "grpo/validation")
    flat = _log(tmp_path / "flat", [[(rows[0]["id"], rows[0]["reference"])]] * 3)
    with pytest.raises(UserError, match="no two logged answers"):
        rank_gate("stub", [str(flat)], str(processed))


def test_cli_bad_per_prompt(capsys):
    from scripts.rank_gate import main

    with pytest.raises(SystemExit) as e:
        main(["runs/x", "--per-prompt", "0"])
    assert e.value.code == 2 and "--per-prompt 0: expected an integer >= 1" in capsys.readouterr().err


class CharPreference:
    """A stand-in reward as GRPO pays it: characters / 100."""

    def preference(self, prompts, questions, answers, refs):
        return [len(a) / 100 for a in answers]


def test_group_order_reads_the_logged_groups(processed, tmp_path, monkeypatch):
    from utils.rewards import reward_model
    from utils.rewards.reward_model import user_text
    from utils.training.grpo.rank_gate import group_order

    rows = [r for r in read_split(processed, "grpo/train") if 6 <= len(r["reference"].split()) <= 30]
    rows = [r for r in rows if sum(user_text(x) == user_text(r) for x in rows) == 1][:2]
    (ua, ra), (ub, rb) = ((user_text(r), r["reference"]) for r in rows)
    short = " ".join(["ox"] * len(ra.split()))             # worse, fewer characters: ordered right
    long = " ".join((FILLER * 6)[: len(rb.split()) + 2])  # worse, more characters: ordered wrong
    run = tmp_path / "run"
    run.mkdir()
    items = [{"question": q, "completion": a, "rewards": {}, "advantage": 0.0}
             for q, a in ((ua, ra), (ua, short), (ub, rb), (ub, long), ("A question of no train item?", "x"))]
    run.joinpath("samples.jsonl").write_text(json.dumps({"step": 4, "items": items}) + "\n" + '{"step": 8, "it')
    monkeypatch.setitem(reward_model._SCORERS, ("stub", None), CharPreference())
    got = group_order("stub", [str(run)], str(processed))
    spread = ((len(ra) - len(short)) / 200 + (len(long) - len(rb)) / 200) / 2
    assert got["groups"] == 2 and got["pairs"] == got["far_pairs"] == 2  # the unknown question and torn line: out
    assert got["accuracy"] == got["far_accuracy"] == 0.5
    assert got["spread"] == pytest.approx(spread, abs=1e-4) and got["benchmark_spread"] > 0.3

    with pytest.raises(UserError, match="no samples.jsonl"):
        group_order("stub", [str(tmp_path)], str(processed))
    run.joinpath("samples.jsonl").write_text(json.dumps({"step": 4, "items": items[-1:] * 2}) + "\n")
    with pytest.raises(UserError, match="no logged group of 2 or more"):
        group_order("stub", [str(run)], str(processed))
