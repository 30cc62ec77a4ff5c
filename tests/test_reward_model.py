"""reward_model.py, utils/rewards/negatives.py, utils/training/reward_model.py: hard negatives, leak-free pairs, the configs, the command
line (help, score, audit), and a tiny reward model trained, used for scoring and audited end to end."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from utils.core.config import load_config
from utils.data.rows import read_split
from utils.data.text import extract_numbers, looks_truncated
from utils.rewards.audit import ATTACKS, FLIP_ATTACKS, audit_table, complete_row, run_audit
from utils.rewards.mix import score_rows
from utils.rewards.negatives import (
    NEGATIVE_TYPES,
    alter_numbers,
    balanced_subsample,
    build_pairs,
    contradict,
    flip_yesno,
    pad,
    ranked_pairs,
    truncate,
)
from utils.rewards.reward_model import encode
from utils.rewards.rules import numbers_reward
from utils.training.reward_model import RewardModelConfig, pairwise_accuracy

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "reward_model.py")
RULES = {"format": 0.5, "yesno": 1.0, "terms": 1.0, "numbers": 1.0, "rouge": 0.5, "length": 1.0}


def cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "ECG_LOG_LEVEL": "WARNING", **(env or {})}, timeout=timeout)


# ============================================================================= hard negatives
@pytest.mark.parametrize("reference, expected, reason", [
    ("Yes, you can request a copy of your ECG.", "No, you cannot request a copy of your ECG.",
     "verdict and modal flip together: a fluent wrong answer"),
    ("No, you cannot be forced to take the test.", "Yes, you can be forced to take the test.", "and back"),
    ("Yes, you have the right to refuse.", "No, you do not have the right to refuse.", "a right is negated"),
    ("YES. It is allowed. You can go.", "NO. It is not allowed. You can go.", "only the first sentence changes"),
    ("The PR interval is 200 ms.", None, "no leading verdict: nothing to flip"),
])
def test_flip_yesno(reference, expected, reason):
    assert flip_yesno(reference) == expected, reason


@pytest.mark.parametrize("reference, reason", [
    ("ST elevation in the inferior leads suggests an inferior STEMI.", "elevation and inferior are swappable"),
    ("Left bundle branch block widens the QRS.", "left and widens: 'left' swaps"),
    ("Hyperkalemia causes peaked T waves.", "hyperkalemia and peaked"),
])
def test_contradict_swaps_one_opposite_pair(reference, reason):
    out = contradict(reference, random.Random(0))
    assert out is not None and out != reference, reason
    changed = [(a, b) for a, b in zip(reference.split(), out.split()) if a != b]
    assert len({a.lower().strip(".,") for a, _ in changed}) == 1  # one pair of words, wherever it occurs


def test_contradict_none_without_opposites():
    assert contradict("Ask your cardiologist.", random.Random(0)) is None


@pytest.mark.parametrize("reference", ["The PR interval is 120-200 ms, or 0.12-0.20 s.", "A QTc of 460 ms.",
                                       "Come back every 3 months for an ECG."])
def test_alter_numbers_moves_every_number_out_of_tolerance(reference):
    out = alter_numbers(reference, random.Random(1))
    assert out is not None and out != reference
    assert numbers_reward([out], reference=[reference], followup_days=[91.3 if "month" in reference else None]) \
        == [0.0]


def test_alter_numbers_none_without_numbers():
    assert alter_numbers("Atrial fibrillation has no P waves.", random.Random(0)) is None


def test_truncate_cuts_mid_sentence():
    ref = "Atrial fibrillation shows an irregularly irregular rhythm without P waves and fibrillatory waves."
    out = truncate(ref, random.Random(0))
    assert out and ref.startswith(out) and looks_truncated(out) and len(out.split()) < len(ref.split())
    assert truncate("Too short to cut.", random.Random(0)) is None


def test_balanced_subsample_shares_types_equally():
    pairs = [{"type": "a", "i": i} for i in range(100)] + [{"type": "b", "i": i} for i in range(100)] + \
            [{"type": "c", "i": i} for i in range(5)]
    out = balanced_subsample(pairs, 60, seed=0)
    counts = {t: sum(p["type"] == t for p in out) for t in "abc"}
    assert counts == {"a": 28, "b": 27, "c": 5} or counts == {"a": 27, "b": 28, "c": 5}
    assert len(balanced_subsample(pairs, 0, seed=0)) == len(pairs)
    weighted = balanced_subsample(pairs, 60, seed=0, weights={"a": 3.0, "b": 1.0, "c": 0.0})
    assert {t: sum(p["type"] == t for p in weighted) for t in "abc"} == {"a": 45, "b": 15, "c": 0}


def test_pairwise_accuracy_counts_ties_half():
    pairs = [{"type": "x"}, {"type": "x"}, {"type": "y"}]
    acc = pairwise_accuracy(pairs, [1.0, 0.0, 2.0], [0.0, 0.0, 3.0])
    assert acc == {"overall": {"accuracy": 0.5, "pairs": 3}, "x": {"accuracy": 0.75, "pairs": 2},
                   "y": {"accuracy": 0.0, "pairs": 1}}


def test_pairs_do_not_leak_across_splits(processed):
    cfg = load_config(RewardModelConfig, None, {"data_dir": str(processed)})
    train, test = read_split(cfg.data_dir, "grpo/train"), read_split(cfg.data_dir, "eval/test")
    test_refs = {r["reference"] for r in test}
    pairs = build_pairs(test, [t for t in NEGATIVE_TYPES if t not in ("sampled", "ranked")], seed=0,
                        term_lexicon=cfg.term_lexicon)
    assert pairs and {p["type"] for p in pairs} >= {"truncate", "numbers", "padded"}
    for p in pairs:
        assert p["chosen"] in test_refs and p["chosen"] != p["rejected"]
        if p["type"] == "similar":  # another test item's answer, never a train one
            assert p["rejected"] in test_refs
        if p["type"] == "padded":  # the reference, then a sentence of another test item's answer
            assert p["rejected"].startswith(p["chosen"].rstrip(".")) and len(p["rejected"]) > len(p["chosen"])
            assert any(p["rejected"][len(p["chosen"]):].strip()[:20] in r for r in test_refs)
    train_pairs = build_pairs(train, ["similar"], seed=0)
    train_refs = {r["reference"] for r in train}
    assert train_pairs and all(p["rejected"] in train_refs for p in train_pairs)


REF = "The QT interval is prolonged, which raises the risk of torsades de pointes."


GOOD, BAD = "The QT interval is prolonged, raising the risk of torsades.", "The PR interval is short in this tracing."


@pytest.mark.parametrize("samples, expected, reason", [
    ([GOOD, BAD, "The QT interval is prolonged here."], [(GOOD, BAD)],
     "the widest gap among length-matched samples, better first"),
    ([BAD, GOOD], [(GOOD, BAD)], "the order of the samples does not matter"),
    (["The QT interval is prolonged, raising the risk of torsades de pointes.", "No."], [],
     "a pair apart in length by more than 1.5x teaches length, not content"),
    (["The QT interval is prolonged, which raises the risk of torsades.",
      "The QT interval is prolonged, which raises the risk of arrhythmia."], [],
     "under the minimum gap: wording, not a better answer"),
    ([BAD] * 3, [], "one distinct sample"),
    ([], [], "no samples"),
])
def test_ranked_pairs(samples, expected, reason):
    assert ranked_pairs(samples, REF) == expected, reason


def test_ranked_pairs_per_item_widest_gaps_first():
    samples = [GOOD, BAD, "The QT interval is prolonged in this tracing."]
    two = ranked_pairs(samples, REF, k=2)
    assert two[0] == (GOOD, BAD) and len(two) == 2 and len(set(two)) == 2
    assert ranked_pairs(samples, REF, k=1) == two[:1]
    assert len(ranked_pairs(samples, REF, k=10)) <= 3  # three samples make at most three pairs


def test_build_pairs_from_samples():
    rows = [{"id": "a", "task": "EBK", "question": "What does a long QT mean?", "reference": REF,
             "prompt": [{"role": "user", "content": "What does a long QT mean?"}]}]
    near, far = REF.replace("which raises", "raising"), "The PR interval is short in this tracing."
    sampled = {"a": [near, far, "The QT interval is prolonged, raising the risk of torsades."]}
    pairs = {p["type"]: p for p in build_pairs(rows, ["sampled", "ranked"], seed=0, sampled=sampled)}
    assert pairs["sampled"]["chosen"] == REF and pairs["sampled"]["rejected"] == far, "the near-copy is skipped"
    assert pairs["ranked"]["chosen"] != REF and pairs["ranked"]["rejected"] == far, "two samples, not the reference"
    assert build_pairs(rows, ["sampled", "ranked"], seed=0, sampled={"a": [near]}) == []
    more = build_pairs(rows, ["ranked"], seed=0, sampled=sampled, ranked_per_item=3)
    assert len(more) > 1 and more[0] == pairs["ranked"] and all(p["chosen"] != REF for p in more)


def test_pad():
    assert pad("The QT is long", "Beta blockers slow the heart. More.") == "The QT is long. Beta blockers slow the heart."
    assert pad("The QT is long.", "no final stop") == "The QT is long. no final stop"
    assert pad("The QT is long.", None) is None


@pytest.mark.slow
def test_sample_answers_draws_several_per_item_and_keeps_them(tiny_llama, processed, tmp_path, monkeypatch):
    import utils.models.generation as generation
    from utils.training.reward_model import SAMPLE_CACHE, sample_answers

    cfg = load_config(RewardModelConfig, None, {"data_dir": str(processed), "base_model": str(tiny_llama),
                                                "sample_model": str(tiny_llama), "sample_count": 3,
                                                "sample_max_new_tokens": 6, "negatives": ["ranked"]})
    rows = read_split(processed, "grpo/train")
    out = sample_answers(cfg, rows, 5, seed=0, cache_dir=tmp_path)
    assert 0 < len(out) <= 5 and set(out) <= {r["id"] for r in rows}
    assert all(1 <= len(v) <= 3 and all(isinstance(a, str) and a for a in v) for v in out.values())
    assert any(len(v) == 3 for v in out.values())
    assert sample_answers(cfg, rows, 5, seed=0) == out, "seeded"
    [kept] = tmp_path.glob(f"{SAMPLE_CACHE}*.json")

    def no_generation(*args, **kwargs):
        raise AssertionError("sampled again")

    real = generation.generate
    monkeypatch.setattr(generation, "generate", no_generation)
    assert sample_answers(cfg, rows, 5, seed=0, cache_dir=tmp_path) == out, "read back, not sampled"
    monkeypatch.setattr(generation, "generate", real)
    cfg.sample_count = 2  # other settings: other answers, sampled and kept beside the first
    assert all(len(v) <= 2 for v in sample_answers(cfg, rows, 5, seed=0, cache_dir=tmp_path).values())
    assert len(list(tmp_path.glob(f"{SAMPLE_CACHE}*.json"))) == 2
    cfg.sample_count = 3
    kept.write_text('{"key": ')  # a file cut short by a kill: sampled again, whole
    assert sample_answers(cfg, rows, 5, seed=0, cache_dir=tmp_path) == out
    assert json.loads(kept.read_text())["answers"] == out


def test_encode_fits_max_length(tiny_llama):
    from utils.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    ids = encode(tok, "Q? " * 300, "An answer that goes on. " * 500, max_length=64, max_prompt_tokens=16)
    assert len(ids) <= 64
    short = encode(tok, "Is it long?", "No.", max_length=64, max_prompt_tokens=16)
    assert tok.decode(short).count("No.") == 1


def test_encode_with_the_reference_reads_it_after_the_question(tiny_llama):
    from utils.models.loading import load_tokenizer
    from utils.rewards.reward_model import REFERENCE_HEADER

    tok = load_tokenizer(str(tiny_llama))
    plain = tok.decode(encode(tok, "Is the QT long?", "No.", 96, 16))
    graded = tok.decode(encode(tok, "Is the QT long?", "No.", 96, 16, "No, the QT is normal.", 24))
    assert REFERENCE_HEADER not in plain and "normal" not in plain
    assert f"Is the QT long?{REFERENCE_HEADER}No, the QT is normal." in graded and graded.count("No.") == 1
    # a long reference keeps its first reference_tokens tokens; the answer still fits
    ids = encode(tok, "Q? " * 300, "An answer that goes on. " * 500, 96, 16, "Start. " + "more " * 400, 24)
    text = tok.decode(ids)
    assert len(ids) <= 96 and f"{REFERENCE_HEADER}Start." in text and "An answer" in text
    # without reference_tokens, or without a reference, the layout is the plain one
    plain_ids = encode(tok, "Is the QT long?", "No.", 96, 16)
    assert encode(tok, "Is the QT long?", "No.", 96, 16, "No, normal.", 0) == plain_ids
    assert encode(tok, "Is the QT long?", "No.", 96, 16, "  ", 24) == plain_ids


def test_a_model_that_reads_the_reference_gives_its_own_sigmoid(tiny_llama):
    import math

    from tests.test_special_tokens import NaNModel
    from utils.models.loading import load_tokenizer
    from utils.rewards.reward_model import RewardScorer

    tok = load_tokenizer(str(tiny_llama))
    # a stand-in whose logit is the sequence's token count / 100 (no token id -1: never NaN), so the
    # reference, when read, changes the score
    graded = RewardScorer(NaNModel(-1), tok, 96, 16, reference_tokens=24)
    qs, answers = ["Is the QT long?"] * 2, ["No.", "No, it is normal."]
    short, long = ["No."] * 2, ["No, the QT interval is within its normal range here."] * 2
    raw = graded.scores(qs, answers, long)
    assert graded.preference([None] * 2, qs, answers, long) == [pytest.approx(1 / (1 + math.exp(-v))) for v in raw]
    assert graded.scores(qs, answers, short)[0] < raw[0]  # the reference is read
    # a model that does not read it: the preference over the reference, 0.5 for the reference itself
    plain = RewardScorer(NaNModel(-1), tok, 96, 16)
    assert plain.scores(qs, answers, long) == plain.scores(qs, answers)
    assert plain.preference([None], qs[:1], long[:1], long[:1]) == [pytest.approx(0.5)]


@pytest.mark.parametrize("row, yesno, days, reason", [
    ({"question": "What is AF?", "reference": "Yes, it is.", "task": "EBK"}, None, None, "not a yes/no question"),
    ({"question": "Can I refuse?", "reference": "No, you cannot.", "task": "CK"}, "no", None, "a yes/no question"),
    ({"question": "X", "reference": "Yes, it is.", "task": "PRTK"}, "yes", None, "PRTK is judged yes/no"),
    ({"question": "X", "reference": "Y", "label": "No"}, "no", None, "an explicit label wins"),
    ({"question": "When?", "reference": "Every 3 months.", "task": "PP"}, None, 91.32, "PP follow-up"),
])
def test_complete_row(row, yesno, days, reason):
    r = complete_row(row)
    assert r["label_yesno"] == yesno and r["followup_days"] == days, reason


# ============================================================================= configs and command line
@pytest.mark.parametrize("recipe", ["cpu", "llama-3.2-3b"])
def test_shipped_reward_configs_load(recipe):
    path = ROOT / f"configs/{recipe}/reward.yaml"
    assert path.read_text().startswith(f"# python reward_model.py --config configs/{recipe}/reward.yaml")
    cfg = load_config(RewardModelConfig, path)
    assert cfg.reward_model == "reward" and cfg.rewards.get("reward_model", 0) > 0
    assert set(cfg.negatives) <= set(NEGATIVE_TYPES)


def run_script(command, *args) -> int:
    """reward_model.py's command in this process (the subprocess tests pay torch's import each time)."""
    import reward_model as script
    from utils.core.cli import run

    fn = {"train": script.main, "score": script.score, "audit": script.audit, "terms": script.terms}[command]
    return run(fn, RewardModelConfig, script.__doc__, list(args))


@pytest.mark.parametrize("args, message", [
    (["--max-prompt-tokens", "300", "--max-length", "256"], "max_prompt_tokens 300 + reference_tokens 0 leave no room"),
    (["--reference-tokens", "160", "--max-prompt-tokens", "96", "--max-length", "256"],
     "max_prompt_tokens 96 + reference_tokens 160 leave no room"),
    (["--reference-tokens", "-1"], "reference_tokens"),
    (["--negatives", "similar,sampled"], "sample_model is empty"),
    (["--negatives", "ranked"], "sample_model is empty"),
    (["--negatives", "ranked", "--sample-model", "sft"], "sample_count is 1; expected >= 2"),
    (["--sample-count", "0"], "sample_count"),
    (["--negatives", "similr"], "expected one of similar"),
    (["--rewards", "{format: 1, reward_model: 1}", "--reward-model", ""], "reward_model is not set"),
    (["--rewards", "{format: 1, semantik: 1}"], "key 'rewards'"),
])
def test_bad_config_is_one_line(capsys, args, message):
    assert run_script("score", "--config", "configs/cpu/reward.yaml", *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: "), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [[], ["train"], ["score"], ["audit"], ["terms"]])
def test_help(command):
    r = cli(*command, "--help")
    assert r.returncode == 0 and "--config" in r.stdout and "--negatives" in r.stdout


def test_unknown_command():
    r = cli("scroe", "--config", "configs/cpu/reward.yaml")
    assert r.returncode == 2 and "unknown command 'scroe'" in r.stderr


SCORE_LINES = [
    {"question": "Can I ask for a copy of my ECG report?", "reference": "Yes, you have the right to a copy of your "
     "ECG report.", "completion": "Yes, you can request a copy of your ECG report.", "task": "PRTK"},
    {"question": "What is the normal PR interval?", "reference": "The normal PR interval is 120-200 ms, or "
     "0.12-0.20 s.", "completion": [{"role": "assistant", "content": "It is 0.12-0.2 s."}]},
    {"question": "How often should I come back?", "reference": "Come back every 3 months for an ECG.",
     "completion": "", "task": "PP", "label": None},
]


def test_score_command(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in SCORE_LINES))
    assert run_script("score", "--config", "configs/cpu/reward.yaml", "--rewards", json.dumps(RULES),
                      "--reward-model", "", "--input", str(src), "--output", str(dst)) == 0
    assert capsys.readouterr().out.strip() == str(dst)
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [{k: v for k, v in o.items() if k != "rewards"} for o in out] == SCORE_LINES  # lines come back whole
    want = score_rows(["Yes, you can request a copy of your ECG report.", "It is 0.12-0.2 s.", ""],
                      [complete_row(x) for x in SCORE_LINES], RULES)
    assert [o["rewards"] for o in out] == want
    assert out[0]["rewards"]["yesno"] == 1.0 and out[1]["rewards"]["yesno"] is None
    assert out[2]["rewards"]["numbers"] == 0.0 and out[2]["rewards"]["total"] < out[0]["rewards"]["total"]
    # without --output the scores go next to the input
    assert run_script("score", "--config", "configs/cpu/reward.yaml", "--rewards", json.dumps(RULES),
                      "--reward-model", "", "--input", str(src)) == 0
    assert (tmp_path / "in.scored.jsonl").read_text() == dst.read_text()


@pytest.mark.parametrize("content, message", [
    ('{"question": "Q", "reference": "R"}\n', "line 1: 'completion' is missing"),
    ('{"question": "Q", "reference": 3, "completion": "C"}\n', "line 1: 'reference' is int"),
    ('not json\n', "line 1 is not valid JSON"),
    ('', "no rows to score"),
])
def test_score_bad_input(tmp_path, capsys, content, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    assert run_script("score", "--config", "configs/cpu/reward.yaml", "--rewards", json.dumps(RULES),
                      "--reward-model", "", "--input", str(src)) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"error: {src}") and len(err.strip().splitlines()) == 1, err


def test_score_needs_input(capsys):
    assert run_script("score", "--config", "configs/cpu/reward.yaml", "--reward-model", "",
                      "--rewards", json.dumps(RULES)) == 2
    assert "--input FILE.jsonl is required" in capsys.readouterr().err


def test_terms_command_lists_missing_phrases(processed, capsys):
    assert run_script("terms", "--config", "configs/cpu/reward.yaml", "--data-dir", str(processed),
                      "--terms-top", "5") == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 5
    phrases = [line.split(None, 1)[1] for line in lines]
    from utils.rewards.lexicon import load_lexicon

    lex = load_lexicon()
    assert all(not lex.find(p) for p in phrases)  # nothing the lexicon already has


def test_audit_ranks_the_reference_above_every_attack(processed):
    """The shipped mix without the trained model (CI has none; the slow test below adds one)."""
    shipped = load_config(RewardModelConfig, ROOT / "configs/cpu/reward.yaml")
    rules = {k: v for k, v in shipped.rewards.items() if k not in ("reward_model", "semantic")}
    cfg = load_config(RewardModelConfig, ROOT / "configs/cpu/reward.yaml",
                      {"data_dir": str(processed), "rewards": json.dumps(rules), "reward_model": ""})
    result = run_audit(cfg)
    rows = {r["completion"]: r for r in result["rows"]}
    assert len(rows) == 13 == len(ATTACKS) + 1 and rows["reference (honest)"]["total"] > 0.9
    for name, r in rows.items():
        if name == "reference (honest)" or r["items"] == 0:
            continue
        assert r["below_reference"] and r["total"] < r["reference_total"], name
        assert r["ties_or_wins"] == 0.0, name
    assert result["passed"]
    assert rows["empty answer"]["total"] == 0.0 and rows["very long answer"]["length"] == 0.0
    # the fixture split's references have a number, a direction and a disease to flip, but no lead: an attack
    # that applies to no item is reported and not judged
    assert [rows[f"flipped {k}"]["items"] > 0 for k in ("number", "direction", "disease", "lead")] == [True] * 3 + [False]
    assert rows["flipped lead"]["below_reference"] is None and "| flipped lead | 0 |" in audit_table(result)
    for k in ("number", "direction", "disease"):
        r = rows[f"flipped {k}"]
        assert r["near_ties"] == 0.0 and r["reference_total"] - r["total"] >= 0.1, (k, r)


# One fact of each kind per reference, so that every flip attack applies (the fixture split has no lead).
FACT_REFERENCES = [
    "ST elevation in leads II, III and aVF points to an inferior infarction.",
    "A QTc above 460 ms in women is prolonged and raises the risk of torsades.",
    "Peaked T waves and a widened QRS suggest hyperkalemia; check potassium now.",
    "The rhythm is atrial fibrillation with a rapid ventricular response of 140 bpm.",
    "Deep S waves in V5 and V6 with a tall R in V1 point to right ventricular hypertrophy.",
]


def test_audit_flipped_facts_score_well_below_the_reference(processed):
    """Each flip attack against references that hold its kind of fact: every flipped answer scores below
    the reference of its own item, none within 0.01, on average by 0.1 or more (copying the reference but
    one word cost ROUGE-L about 0.03 and often nothing else before the terms reward checked contradictions)."""
    path = processed / "eval" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) >= len(FACT_REFERENCES)
    for i, ref in enumerate(FACT_REFERENCES):
        rows[i] = {**rows[i], "task": "CK", "reference": ref, "label_yesno": None, "label_disease": None,
                   "label_followup": None, "followup_days": None, "numbers": extract_numbers(ref)}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(RewardModelConfig, ROOT / "configs/cpu/reward.yaml",
                      {"data_dir": str(processed), "rewards": json.dumps(RULES), "reward_model": ""})
    result = run_audit(cfg)
    got = {r["completion"]: r for r in result["rows"]}
    for name in FLIP_ATTACKS:
        r = got[name]
        assert r["items"] >= 2 and r["below_reference"], (name, r)
        assert r["ties_or_wins"] == 0.0 and r["near_ties"] == 0.0, (name, r)
        assert r["reference_total"] - r["total"] >= 0.1, (name, r)
    assert result["passed"]


@pytest.mark.slow
def test_audit_with_semantic_reward(processed):
    cfg = load_config(RewardModelConfig, ROOT / "configs/cpu/reward.yaml",
                      {"data_dir": str(processed), "reward_model": "",
                       "rewards": "{format: 0.5, yesno: 1, terms: 1, numbers: 1, rouge: 0.5, semantic: 1, length: 1}"})
    assert run_audit(cfg)["passed"]


# ============================================================================= a tiny reward model, end to end
@pytest.mark.slow
def test_train_score_and_audit_a_tiny_reward_model(tiny_llama, processed, tmp_path, capsys):
    out = tmp_path / "reward"
    r = cli("--config", "configs/cpu/reward.yaml", "--base-model", str(tiny_llama), "--data-dir", str(processed),
            "--output-dir", str(out), "--run-dir", str(tmp_path / "run"), "--keep-layers", "0",
            "--lora-layers", "1", "--max-train-pairs", "48", "--batch-size", "8", "--per-device-batch-size", "8",
            "--max-length", "96", "--max-prompt-tokens", "32", "--max-eval-pairs", "8", "--eval-steps", "3",
            "--save-steps", "3", "--report-to", "", "--num-threads", "0",
            "--negatives", ",".join(NEGATIVE_TYPES), "--sample-model", str(tiny_llama), "--sample-items", "6",
            "--sample-count", "2",
            "--sample-max-new-tokens", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out pairwise accuracy" in r.stdout
    assert (out / ".complete").is_file() and (out / "adapter_config.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    acc = metrics["test_accuracy"]
    assert acc["overall"]["pairs"] == metrics["test_pairs"] > 0 and 0.0 <= acc["overall"]["accuracy"] <= 1.0
    assert {"sampled", "truncate", "overall"} <= set(acc) <= {"overall", *NEGATIVE_TYPES}
    assert metrics["global_step"] == 6 and metrics["train_pair_types"]["sampled"] > 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama)
    assert "Held-out pairwise accuracy" in (out / "README.md").read_text()
    assert load_config(RewardModelConfig, out / "train_config.yaml").keep_layers == 0

    # scoring with the trained model (in this process from here on: torch is imported once)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in SCORE_LINES))
    assert run_script("score", "--config", "configs/cpu/reward.yaml", "--rewards",
                      json.dumps({**RULES, "reward_model": 1.0}), "--reward-model", str(out), "--input", str(src),
                      "--output", str(dst)) == 0
    scored = [json.loads(line)["rewards"] for line in dst.read_text().splitlines()]
    assert all(0.0 < s["reward_model"] < 1.0 for s in scored[:2]) and scored[2]["reward_model"] == 0.0

    # the reward function itself, on strings that break naive code
    from utils.rewards.reward_model import reward_model_reward

    nasty = ["", "x" * 100_000, "🫀" * 500, "<think></think>", "Yes. " * 3000]
    vals = reward_model_reward(nasty, reward_model=str(out), question=["Is it long?"] * 5,
                               reference=["No, it is normal."] * 5)
    assert len(vals) == 5 and all(v is not None and 0.0 <= v <= 1.0 for v in vals) and vals[0] == 0.0
    # the reference against itself is an even match
    assert reward_model_reward(["No, it is normal."], reward_model=str(out), question=["Is it long?"],
                               reference=["No, it is normal."]) == [pytest.approx(0.5)]
    # ... which the ceiling at 0.5 pays in full, like every answer the model rates above the reference
    capped = reward_model_reward(nasty + ["No, it is normal."], reward_model=str(out), question=["Is it long?"] * 6,
                                 reference=["No, it is normal."] * 6, reward_model_ceiling=0.5)
    assert capped == [pytest.approx(min(v, 0.5) / 0.5) for v in vals] + [pytest.approx(1.0)]

    # the audit with the whole shipped mix, trained model included
    capsys.readouterr()
    assert run_script("audit", "--config", "configs/cpu/reward.yaml", "--data-dir", str(processed),
                      "--reward-model", str(out), "--output", str(tmp_path / "audit.json")) == 0
    result = json.loads((tmp_path / "audit.json").read_text())
    assert result["passed"] and result["mix"]["reward_model"] > 0
    assert "| keyword stuffing |" in capsys.readouterr().out

    # GRPO with the trained reward model in the mix: metrics.json and the model card say whether the policy
    # pleased it at the rule rewards' expense (the hacking check of the held-out prompts, first against last)
    from tests.test_grpo import TINY_REWARDS, run_cli, tiny_config

    weights = {**TINY_REWARDS, "reward_model": 1.0}
    cfg = tiny_config(tmp_path, tiny_llama, processed, rewards=weights, reward_model=str(out), max_steps=2,
                      run_dir=str(tmp_path / "grpo-run"), output_dir=str(tmp_path / "grpo-out"))
    assert run_cli(["--config", str(cfg)], capsys) == (0, "")
    m = json.loads((tmp_path / "grpo-out/metrics.json").read_text())
    h = m["reward_hacking"]
    assert set(h["learned"]) == {"reward_model"} and h["z"] == 2.0 and isinstance(h["signature"], bool)
    assert set(h["rules_falling"]) <= set(TINY_REWARDS) and h["learned"]["reward_model"]["n"] == 3
    assert "Learned against rule rewards" in (tmp_path / "grpo-out/README.md").read_text()


@pytest.mark.slow
def test_a_tiny_reward_model_that_reads_the_reference(tiny_llama, processed, tmp_path):
    out = tmp_path / "reward-ref"
    r = cli("--config", "configs/cpu/reward.yaml", "--base-model", str(tiny_llama), "--data-dir", str(processed),
            "--output-dir", str(out), "--run-dir", str(tmp_path / "run"), "--keep-layers", "0",
            "--lora-layers", "1", "--max-train-pairs", "16", "--batch-size", "8", "--per-device-batch-size", "8",
            "--max-length", "128", "--max-prompt-tokens", "32", "--reference-tokens", "48", "--report-to", "",
            "--negatives", "numbers,truncate,contradiction", "--max-test-items", "6", "--num-threads", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_config(RewardModelConfig, out / "train_config.yaml").reference_tokens == 48
    assert "sigmoid(r(question, reference, answer))" in (out / "README.md").read_text()

    import math

    from utils.rewards.reward_model import get_scorer, reward_model_reward

    scorer = get_scorer(str(out))
    assert scorer.reference_tokens == 48
    q, refs = ["Is the QT long?"] * 2, ["No, it is normal.", "Yes, it is prolonged."]
    got = reward_model_reward(["No, it is normal."] * 2, reward_model=str(out), question=q, reference=refs)
    raw = scorer.scores(q, ["No, it is normal."] * 2, refs)
    assert got == [pytest.approx(1 / (1 + math.exp(-v))) for v in raw] and raw[0] != raw[1]
