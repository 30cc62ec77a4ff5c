"""Evaluation: metrics against hand-checked values, statistics, sampling, the answer cache and resume,
the user-file mode, the report files, the judge (local model and an OpenAI-compatible server), errors."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import math
import re
import shutil
import threading
from pathlib import Path

import pytest

from tests.conftest import ROOT
from utils.core.config import ConfigError, UserError, load_config
from utils.evaluation.answers import model_fingerprint
from utils.evaluation.config import EvalConfig, sample_rows
from utils.evaluation.judge import parse_judge_score
from utils.evaluation.metrics import score_answers, term_precision_recall
from utils.evaluation.stats import bootstrap_ci, majority_baseline, paired_comparison
from utils.rewards.lexicon import parse_lexicon
from utils.rewards.overlap import bleu1, load_wordnet, meteor

YAMLS = ["configs/cpu/eval.yaml", "configs/llama-3.2-3b/eval.yaml"]


def cfg_for(tmp_path: Path, **kw) -> EvalConfig:
    """A config on the tiny test setup: no reward model, short answers, outputs in tmp."""
    base = {"reward_model": None, "max_new_tokens": 6, "batch_size": 4, "bootstrap": 200,
            "cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path / "reports"), "examples": 1, "worst": 2}
    base.update(kw)
    return load_config(EvalConfig, None, base)


# ============================================================================= metrics, hand-checked
def test_bleu1_hand_checked():
    # 2 of the 4 answer words are in the reference; the answer is longer, so no brevity penalty
    assert bleu1("The cat ran away", "the cat sat") == pytest.approx(0.5)
    # every answer word matches, but 2 words for a 5-word reference: brevity penalty exp(1 - 5/2)
    assert bleu1("the cat", "the cat sat on mats") == pytest.approx(math.exp(-1.5))
    assert bleu1("", "the cat") == 0.0


@pytest.mark.slow  # loads WordNet
def test_meteor_hand_checked():
    wn = load_wordnet()
    if wn is None:
        pytest.skip("WordNet not installed for nltk (bash scripts/setup_wordnet.sh)")
    # 4 exact matches in one chunk: Fmean 1, penalty 0.5 * (1/4)^3
    assert meteor("this is a test", "This is a test.", wn) == pytest.approx(1 - 0.5 * 0.25 ** 3)
    # 'quick' matches 'fast' only through WordNet synonyms: the same score as an exact match
    assert meteor("the heart is quick", "the heart is fast", wn) == pytest.approx(1 - 0.5 * 0.25 ** 3)
    assert meteor("the heart is slow", "the heart is fast", wn) < 0.8


def test_meteor_degrades_without_wordnet(tmp_path, monkeypatch, caplog):
    import nltk

    from utils.rewards import overlap
    from utils.rewards.mix import build_reward_funcs

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    with caplog.at_level(logging.WARNING):
        assert overlap.load_wordnet() is None
        # the reward gives no value (and says so once, though GRPO asks every step) ...
        assert overlap.meteor_reward(["a b"] * 2, reference=["a b"] * 2) == [None, None]
        assert overlap.meteor_reward(["a b"], reference=["a b"]) == [None]
    warning = [r.getMessage() for r in caplog.records if "METEOR" in r.getMessage()]
    assert len(warning) == 1 and "\n" not in warning[0] and "setup_wordnet.sh" in warning[0]
    # ... and a mix that would train on it refuses to start; logged at weight 0, it is simply empty
    with pytest.raises(UserError, match="reward 'meteor' needs WordNet.*setup_wordnet.sh"):
        build_reward_funcs({"meteor": 1.0})
    assert build_reward_funcs({"rouge": 1.0, "meteor": 0.0})[1] == [1.0, 0.0]


def test_term_precision_recall_hand_checked():
    lex = parse_lexicon(["atrial fibrillation | af", "st depression", "qrs complex | qrs"])
    # answer names af and qrs; reference af and st depression: 1 of 2 each way
    assert term_precision_recall("AF with a wide QRS.", "Atrial fibrillation with ST depression.", lex) == (0.5, 0.5)
    assert term_precision_recall("Nothing relevant.", "Atrial fibrillation.", lex) == (0.0, 0.0)
    assert term_precision_recall("AF.", "No terms here.", lex) == (None, None)
    # the question's terms are left out on both sides, as in the terms reward
    assert term_precision_recall("AF with a wide QRS.", "Atrial fibrillation with ST depression.", lex,
                                 question="Is this AF?") == (0.0, 0.0)
    assert term_precision_recall("AF.", "Atrial fibrillation.", lex, question="Is this AF?") == (None, None)
    # a contradicted key fact takes the term credit, as it takes the terms reward
    ref = "Atrial fibrillation with ST depression in V1."
    assert term_precision_recall("Atrial fibrillation with ST depression in V1.", ref, lex) == (1.0, 1.0)
    assert term_precision_recall("Atrial fibrillation with ST depression in V6.", ref, lex) == (0.0, 0.0)


@pytest.mark.slow  # loads the sentence-embedding model
def test_scores_come_from_the_rewards(tmp_path):
    """The overlapping metrics are the reward functions' values, and key-term P/R agree with their F1."""
    from utils.rewards.mix import REWARDS

    cfg = cfg_for(tmp_path)
    rows = [{"id": "a", "task": "PRTK", "question": "May I see my ECG?", "reference": "Yes, you may see your ECG.",
             "label_yesno": "yes", "numbers": [], "followup_days": None, "prompt": []},
            {"id": "b", "task": "EBK", "question": "What is a normal QRS?",
             "reference": "A normal QRS complex lasts 80-120 ms in atrial fibrillation too.", "label_yesno": None,
             "numbers": None, "followup_days": None, "prompt": []}]
    answers = ["No, you may not.", "The QRS complex lasts 80-100 ms."]
    got = score_answers(answers, rows, "plain", cfg, None)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    for name in ("yesno", "rouge", "bleu1", "meteor", "terms", "numbers", "format", "length"):
        assert [g[name] for g in got] == REWARDS[name](answers, answer_format="plain", **cols), name
    assert got[0]["yesno"] == 0.0 and got[1]["yesno"] is None
    p, r = got[1]["terms_p"], got[1]["terms_r"]
    assert got[1]["terms"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
    assert got[0]["words"] == 4.0 and got[1]["bleu1"] == bleu1(answers[1], rows[1]["reference"]) > 0


# ============================================================================= statistics and sampling
def test_bootstrap_ci_matches_the_normal_approximation():
    ci = bootstrap_ci([0.0, 1.0] * 50, n_resamples=2000, seed=1)
    # mean 0.5, standard error 0.05: the 95% interval is ~0.5 +- 0.098
    assert ci["mean"] == 0.5 and ci["n"] == 100
    assert ci["lo"] == pytest.approx(0.402, abs=0.015) and ci["hi"] == pytest.approx(0.598, abs=0.015)
    assert bootstrap_ci([]) is None
    assert bootstrap_ci([0.3, 0.3]) == {"mean": 0.3, "lo": 0.3, "hi": 0.3, "n": 2}


def test_paired_comparison():
    a = [i / 20 for i in range(20)]
    same = paired_comparison(a, a)
    assert same["mean"] == 0 and same["p"] == 1.0
    better = paired_comparison(a, [x + 0.1 for x in a])
    assert better["mean"] == pytest.approx(0.1) and better["lo"] == pytest.approx(0.1) and better["p"] < 0.01
    noisy = paired_comparison([0, 1, 0, 1, 1, 0], [1, 0, 0, 1, 0, 1])
    assert noisy["lo"] < 0 < noisy["hi"] and noisy["p"] > 0.5


def test_majority_baseline():
    rows = [{"label_yesno": v} for v in ("yes", "yes", "no", None)]
    assert majority_baseline(rows, [0, 1, 2, 3]) == {"label": "yes", "accuracy": pytest.approx(2 / 3), "n": 3}
    assert majority_baseline(rows, [3]) is None


def test_balanced_accuracy_sees_through_always_yes():
    from utils.evaluation.stats import balanced_accuracy

    rows = [{"label_yesno": v} for v in ("yes",) * 9 + ("no", None)]
    always_yes = [{"yesno": 1.0}] * 9 + [{"yesno": 0.0}, {"yesno": None}]
    assert balanced_accuracy(rows, always_yes, list(range(11))) == 0.5  # plain accuracy 0.9
    mixed = [{"yesno": 1.0}] * 8 + [{"yesno": 0.0}, {"yesno": 1.0}, {}]
    assert balanced_accuracy(rows, mixed, list(range(11))) == pytest.approx((8 / 9 + 1) / 2)
    assert balanced_accuracy(rows, mixed, list(range(9))) is None  # one label only


def test_a_time_limited_training_run_is_noted(tmp_path):
    """GRPO's time limit records the steps it cut (metrics.json); evaluation turns that into a report note."""
    import time
    from types import SimpleNamespace

    from utils.evaluation.leakage import training_stopped_early
    from utils.training.grpo.callbacks import TimeLimit

    limit = TimeLimit(0.0001)
    state, control = SimpleNamespace(global_step=3, max_steps=10), SimpleNamespace(should_training_stop=False)
    limit.on_step_begin(None, state, control)
    time.sleep(0.02)
    limit.on_step_end(None, state, control)
    assert control.should_training_stop and limit.stopped["steps_run"] == 3
    (tmp_path / "metrics.json").write_text(json.dumps({"stopped_by_time_limit": limit.stopped}))
    note = training_stopped_early("rlhf", tmp_path)
    assert "after 3 of 10 planned steps" in note and "machine" in note
    assert training_stopped_early("sft", tmp_path / "missing") is None


def test_sample_rows_is_seeded_and_spread_over_tasks():
    rows = [{"id": f"{t}-{i}", "task": t} for t in ("A", "B", "C") for i in range(10)]
    s1 = sample_rows(rows, per_task=4, seed=1)
    assert [r["task"] for r in s1].count("A") == 4 and len(s1) == 12
    assert s1 == sample_rows(list(reversed(rows)), per_task=4, seed=1)  # file order does not matter
    assert s1 != sample_rows(rows, per_task=4, seed=2)
    small = sample_rows(rows, limit=5, seed=1)
    assert len(small) == 5 and {r["task"] for r in small} == {"A", "B", "C"}
    assert {r["task"] for r in sample_rows(rows, tasks=["B"])} == {"B"}


def test_parse_judge_score():
    assert parse_judge_score("Score: 5 - complete") == 1.0
    assert parse_judge_score("score=3 because of 10 ms error") == 0.5
    assert parse_judge_score("The answer is fine.") is None
    assert parse_judge_score("Score: 7") is None
    assert parse_judge_score("A score of N from 1 to 5 is unclear.") is None
    assert parse_judge_score("I give it 4 out of 5") == 0.75 and parse_judge_score("3/5") == 0.5
    # a digit in the prose is no grade (tests/test_judge.py has the full list)
    assert parse_judge_score("I would give it a 2.") is None and parse_judge_score("Out of 5, I give it 4") is None


# ============================================================================= config
@pytest.mark.parametrize("path", YAMLS)
def test_shipped_configs_load(path):
    cfg = load_config(EvalConfig, ROOT / path)
    assert cfg.models == ["base", "sft", "rlhf"] and cfg.judge == "none"


def test_config_cross_checks():
    with pytest.raises(ConfigError, match="judge_endpoint"):
        load_config(EvalConfig, None, {"judge": "openai", "judge_model": "m"})
    with pytest.raises(ConfigError, match="judge_model"):
        load_config(EvalConfig, None, {"judge": "local"})
    with pytest.raises(ConfigError, match="twice"):
        load_config(EvalConfig, None, {"models": "base,base"})
    with pytest.raises(ConfigError, match="judge_endpoint"):
        load_config(EvalConfig, None, {"judge_endpoint": "localhost:8000"})


def test_fingerprint_follows_the_files(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    (m / "model.safetensors").write_bytes(b"1234")
    before = model_fingerprint(str(m))
    assert model_fingerprint(str(m)) == before
    (m / "model.safetensors").write_bytes(b"123456")  # retrained into the same folder
    assert model_fingerprint(str(m)) != before
    assert model_fingerprint("owner/name") != model_fingerprint("owner/other")
    # by content, as the training phases' model identity: a copied folder keeps its cached answers
    import shutil

    shutil.copytree(m, tmp_path / "copy")
    assert model_fingerprint(str(tmp_path / "copy")) == model_fingerprint(str(m))


# ============================================================================= errors: one line, nothing written
@pytest.fixture
def fake_model(tmp_path) -> Path:
    """A folder the resolver accepts as a model; the error tests stop before anything loads it."""
    m = tmp_path / "fake-model"
    m.mkdir()
    (m / "config.json").write_text("{}")
    (m / "model.safetensors").write_bytes(b"")
    return m


def run_cli(argv, capsys) -> tuple[int, str]:
    import evaluate
    from utils.core.cli import run

    rc = run(evaluate.main, EvalConfig, evaluate.__doc__, argv)
    return rc, capsys.readouterr().err


def assert_nothing_written(tmp_path):
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())
    assert not (tmp_path / "cache").exists()


def common_flags(tmp_path, processed=None):
    flags = ["--reward-model", "null", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "reports")]
    if processed is not None:
        flags += ["--test-file", str(processed / "eval/test.jsonl")]
    return flags


def test_unknown_alias_and_missing_checkpoint(tmp_path, processed, capsys, monkeypatch):
    monkeypatch.setenv("ECG_MODELS_DIR", str(tmp_path / "models"))
    rc, err = run_cli(["--models", "sftt"] + common_flags(tmp_path, processed), capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: sftt:")
    rc, err = run_cli(["--models", "rlhf"] + common_flags(tmp_path, processed), capsys)
    assert rc == 2 and err.count("\n") == 1 and "grpo_train.py" in err
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("lines, expected", [
    (['{"question": "Q1?", "answer": "A1."}', '{"question": "Q2?", "answer": '], r"line 2 is not valid JSON"),
    (['{"question": "Q1?", "answer": "A1."}', "", '{"question": "Q2?"}'], r"line 3: missing field 'answer'"),
    (['{"question": "", "answer": "A."}'], r"line 1: field 'question' must be a non-empty string"),
    (['{"question": "Q?", "answer": "A.", "id": "x"}', '{"question": "R?", "answer": "B.", "id": "x"}'],
     r"line 2: id 'x' already used on line 1"),
    (['[1, 2]'], r"line 1 is not a JSON object"),
])
def test_bad_input_file(tmp_path, fake_model, capsys, lines, expected):
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(lines) + "\n")
    rc, err = run_cli(["--models", str(fake_model), "--input", str(f)] + common_flags(tmp_path), capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert str(f) in err and re.search(expected, err), err
    assert_nothing_written(tmp_path)


def test_missing_input_and_test_file(tmp_path, fake_model, capsys):
    rc, err = run_cli(["--models", str(fake_model), "--input", str(tmp_path / "nope.jsonl")] + common_flags(tmp_path),
                      capsys)
    assert rc == 2 and "nope.jsonl: not found" in err
    rc, err = run_cli(["--models", str(fake_model), "--test-file", str(tmp_path / "t.jsonl")] + common_flags(tmp_path),
                      capsys)
    assert rc == 2 and "prepare_data.py" in err
    assert_nothing_written(tmp_path)


# ============================================================================= the pipeline on the tiny model
class CountingGenerate:
    """Wraps utils.models.generation.generate: counts prompts, and can fail on the n-th call (an interruption)."""

    def __init__(self, monkeypatch, fail_on_call: int | None = None):
        from utils.models import generation

        self.real, self.prompts, self.calls, self.fail_on_call = generation.generate, 0, 0, fail_on_call
        monkeypatch.setattr(generation, "generate", self)

    def __call__(self, model, tok, prompts, **kw):
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise KeyboardInterrupt
        self.prompts += len(prompts)
        return self.real(model, tok, prompts, **kw)


def cache_lines(tmp_path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (tmp_path / "cache" / "answers").glob("*.jsonl"))


@pytest.mark.slow
def test_cache_and_resume(tmp_path, tiny_llama, processed, monkeypatch):
    from utils.evaluation.metrics import score_answers as real_score
    from utils.evaluation.run import run_evaluation

    test_file = str(processed / "eval/test.jsonl")
    n = len([line for line in Path(test_file).read_text().splitlines() if line.strip()])
    assert n > 4
    cfg = cfg_for(tmp_path, models=[str(tiny_llama)], test_file=test_file, batch_size=1)

    # interrupted in the second chunk (4 batches of 1): the first chunk's answers are kept, no report is written
    gen = CountingGenerate(monkeypatch, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(cfg)
    assert cache_lines(tmp_path) == 4
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())

    # the rerun generates only what is missing
    gen = CountingGenerate(monkeypatch)
    result, out = run_evaluation(cfg)
    assert gen.prompts == n - 4 and cache_lines(tmp_path) == n
    assert (out / "report.html").is_file()
    first = result.answers["tiny-llama"]

    # a complete cache: nothing generated, the same answers, and their scores read back, not computed
    import utils.evaluation.metrics as metrics

    gen = CountingGenerate(monkeypatch)
    scored = []
    monkeypatch.setattr(metrics, "score_answers", lambda *a, **k: scored.append(1) or real_score(*a, **k))
    again, _ = run_evaluation(cfg)
    assert gen.prompts == 0 and again.answers["tiny-llama"] == first
    assert again.generation["tiny-llama"].cached == n
    assert not scored and again.scores == result.scores
    # another mix: scored again
    reweighed, _ = run_evaluation(cfg_for(tmp_path, models=[str(tiny_llama)], test_file=test_file, batch_size=1,
                                          rewards={"rouge": 1.0}))
    assert scored == [1] and reweighed.scores["tiny-llama"][0]["total"] == result.scores["tiny-llama"][0]["rouge"]

    # another generation setting never reuses those answers
    gen = CountingGenerate(monkeypatch)
    run_evaluation(cfg_for(tmp_path, models=[str(tiny_llama)], test_file=test_file, batch_size=4, max_new_tokens=3))
    assert gen.prompts == n


@pytest.mark.slow
def test_user_file_mode(tmp_path, tiny_llama):
    from utils.evaluation.run import run_evaluation

    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in [
        {"question": "Is a PR interval of 240 ms prolonged?", "answer": "Yes, above 200 ms is first-degree AV block."},
        {"question": "What does a delta wave suggest?", "answer": "Pre-excitation, as in WPW.", "task": "EBK"},
        {"question": "How fast is sinus tachycardia?", "answer": "Faster than 100 bpm.", "id": "mine-3"},
    ]) + "\n")
    result, out = run_evaluation(cfg_for(tmp_path, models=[str(tiny_llama)], input=str(f)))
    assert out.name == "tiny-llama-mine" and str(f) in result.source
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and sorted(r["task"] for r in rows) == ["EBK", "user", "user"]
    assert "mine-3" in {r["id"] for r in rows}
    yes = [r for r in rows if r["question"].startswith("Is a PR")][0]
    # labelled like the test split: a yes/no question with a verdict, a reference with numbers
    assert yes["answers"]["tiny-llama"]["scores"]["yesno"] in (0.0, 1.0)
    assert yes["answers"]["tiny-llama"]["scores"]["numbers"] is not None
    assert result.summary["figures"]["tiny-llama"]["all"]["yesno"]["n"] == 1


@pytest.mark.slow
def test_report_files(tmp_path, tiny_llama, processed):
    """Two models (the second a copy with a training log): the report, its table, images and curves."""
    from utils.evaluation.metrics import METRIC_BY_NAME
    from utils.evaluation.run import run_evaluation

    sft = tmp_path / "tiny-sft"
    shutil.copytree(tiny_llama, sft)
    (sft / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"step": s, "loss": 2.0 / s, "reward": 0.1 * s, "kl": 0.01 * s, "completions/mean_length": 40 + s}
        for s in range(1, 6)] + [{"step": 5, "eval_loss": 1.1, "heldout/total": 0.6}]}))
    cfg = cfg_for(tmp_path, models=[str(tiny_llama), str(sft)], test_file=str(processed / "eval/test.jsonl"),
                  run_name="run1")
    result, out = run_evaluation(cfg)
    assert out == tmp_path / "reports" / "run1"
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"report.md", "report.html", "metrics.json", "answers.jsonl", "eval_config.yaml",
            "plots/metrics_by_model.png", "plots/metrics_by_task.png", "plots/answer_length.png",
            "plots/training_tiny-sft.png"} <= files
    assert "plots/training_tiny-llama.png" not in files
    assert not list(out.parent.glob(".run1*"))  # no temporary folder left

    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    # self-contained: every image inlined, nothing fetched from elsewhere
    images = re.findall(r'<img src="([^"]+)"', page)
    pngs = [p for p in files if p.endswith(".png")]
    assert len(images) == len(pngs)
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(?!data:)', page)
    # the comparison table holds both models with their figures and intervals
    figs = result.summary["figures"]
    rouge = figs["tiny-sft"]["all"]["rouge"]
    cell = f"{rouge['mean']:.3f} [{rouge['lo']:.3f}, {rouge['hi']:.3f}]"
    assert cell in page and cell in (out / "report.md").read_text()
    for m in result.metrics:
        assert METRIC_BY_NAME[m].label in page
    assert "tiny-sft vs tiny-llama" in page and "Side by side" in page and "Worst-scored answers" in page

    # the figures are the means of the per-item scores in answers.jsonl
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    vals = [r["answers"]["tiny-sft"]["scores"]["rouge"] for r in rows]
    assert rouge["mean"] == pytest.approx(sum(vals) / len(vals)) and rouge["n"] == len(rows)
    # the same weights, the same greedy answers: the paired difference is exactly 0
    assert result.answers["tiny-llama"] == result.answers["tiny-sft"]
    diff = result.paired[0]["metrics"]["rouge"]
    assert (diff["mean"], diff["lo"], diff["hi"], diff["p"]) == (0, 0, 0, 1.0)
    md = (out / "report.md").read_text()
    for p in pngs:
        assert f"]({p})" in md
    assert "tiny-llama: not trained by this pipeline" in md
    assert "no data for" not in md.split("tiny-sft: curves from")[1].split("\n")[0]


def test_training_history_sources(tmp_path):
    from utils.evaluation.report import curve_series, training_history

    folder = tmp_path / "m"
    run_dir = tmp_path / "runs" / "grpo"
    (run_dir / "checkpoint-4").mkdir(parents=True)
    folder.mkdir()
    (folder / "train_config.yaml").write_text(f"run_dir: {run_dir}\nanswer_format: plain\n")
    (run_dir / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": [
        {"step": 2, "loss": 1.0, "reward": 0.2, "kl": 0.0}, {"step": 4, "loss": 0.8, "reward": 0.4, "kl": 0.1}]}))
    # nothing in the model folder: the run folder's newest checkpoint
    source, hist = training_history(folder)
    assert "checkpoint-4" in source and len(hist) == 2
    panels = dict(curve_series(hist))
    assert set(panels) == {"loss", "reward", "KL"}
    assert panels["reward"] == [("train", [2, 4], [0.2, 0.4])]
    # the folder's own metrics.json wins over a run folder a later run may have reused
    (folder / "metrics.json").write_text(json.dumps({
        "train_curve": [{"step": 1, "reward": 2.5, "completions/mean_length": 30.0, "kl": None}],
        "heldout": [{"step": 0, "heldout/total": 0.70}, {"step": 1, "heldout/total": 0.72}]}))
    source, hist = training_history(folder)
    assert source.endswith("metrics.json") and hist == [
        {"step": 0, "heldout/total": 0.70}, {"step": 1, "reward": 2.5, "completions/mean_length": 30.0,
                                             "heldout/total": 0.72}]
    panels = dict(curve_series(hist))
    assert set(panels) == {"reward", "held-out reward (greedy)", "completion length (tokens)"}
    assert panels["reward"] == [("train", [1], [2.5])]
    assert panels["held-out reward (greedy)"] == [("held-out", [0, 1], [0.70, 0.72])]
    assert training_history(tmp_path / "none") is None


# ============================================================================= judge
class JudgeServer:
    """A minimal OpenAI-compatible chat endpoint on 127.0.0.1 that grades every answer 4."""

    def __init__(self):
        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                reply = json.dumps({"choices": [{"message": {"role": "assistant",
                                                             "content": "Score: 4. Mostly right."}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_judge_openai_endpoint(tmp_path, tiny_llama, processed, monkeypatch):
    from utils.evaluation.run import run_evaluation

    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    server = JudgeServer()
    try:
        cfg = cfg_for(tmp_path, models=[str(tiny_llama)], test_file=str(processed / "eval/test.jsonl"), limit=3,
                      judge="openai", judge_endpoint=server.url, judge_model="grader",
                      judge_api_key_env="TEST_JUDGE_KEY")
        result, out = run_evaluation(cfg)
        assert len(server.requests) == 3
        req = server.requests[0]
        assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
        assert req["body"]["model"] == "grader" and req["body"]["temperature"] == 0
        system, user = req["body"]["messages"]
        assert "Score the ANSWER from 1 to 5" in system["content"]
        assert any(r["reference"] in user["content"] for r in result.rows)
        assert [d["judge"] for d in result.scores["tiny-llama"]] == [0.75] * 3
        assert result.summary["figures"]["tiny-llama"]["all"]["judge"]["mean"] == 0.75
        assert "judge" in (out / "report.html").read_text()
        run_evaluation(cfg)  # cached: the endpoint is not asked again
        assert len(server.requests) == 3
    finally:
        server.close()


def test_judge_endpoint_down_is_one_line(tmp_path, monkeypatch):
    from utils.evaluation import judge

    monkeypatch.setattr(judge, "BACKOFF_BASE", 0.001)  # retried, but without the real pauses
    with pytest.raises(UserError) as e:
        judge.openai_chat("http://127.0.0.1:9/v1", "m", [{"role": "user", "content": "x"}], 8, None, 5)
    assert "judge_endpoint http://127.0.0.1:9/v1/chat/completions" in str(e.value) and "\n" not in str(e.value)
    assert f"gave up after {judge.MAX_ATTEMPTS} attempts" in str(e.value)


@pytest.mark.slow
def test_judge_local_model(tmp_path, tiny_llama, processed):
    from utils.evaluation.run import run_evaluation

    cfg = cfg_for(tmp_path, models=[str(tiny_llama)], test_file=str(processed / "eval/test.jsonl"), limit=3,
                  judge="local", judge_model=str(tiny_llama), judge_max_new_tokens=4)
    result, out = run_evaluation(cfg)
    judged = [d["judge"] for d in result.scores["tiny-llama"]]
    # a random model's replies rarely hold a grade: each one is a grade in [0, 1] or counted as unparsed
    assert len(judged) == 3 and all(v is None or v in (0, 0.25, 0.5, 0.75, 1.0) for v in judged)
    assert len(result.judge_replies["tiny-llama"]) == 3
    assert len((tmp_path / "cache" / "judge").glob("*.jsonl").__next__().read_text().splitlines()) == 3
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert all("judge_reply" in r["answers"]["tiny-llama"] for r in rows)


def test_missing_reward_model_is_a_note(tmp_path, monkeypatch):
    from utils.evaluation.metrics import reward_model_status

    monkeypatch.setenv("ECG_MODELS_DIR", str(tmp_path))
    rm, note = reward_model_status(cfg_for(tmp_path, reward_model="reward"))
    assert rm is None and "reward model column left out" in note and "reward_model.py" in note
    assert reward_model_status(cfg_for(tmp_path)) == (None, None)


def test_answer_cache_survives_a_torn_write(tmp_path):
    from utils.evaluation.answers import AnswerCache, ModelSpec

    spec = ModelSpec("m", "m", "m", "fp", "plain")
    row, prompt = {"id": "a"}, [{"role": "user", "content": "Q?"}]
    cache = AnswerCache(tmp_path, spec, {"max_new_tokens": 8})
    cache.add([(cache.key(row, prompt), "a", "Answer A.")])
    with cache.path.open("a") as f:
        f.write('{"key": "b", "id": "b", "compl')  # killed mid-line
    again = AnswerCache(tmp_path, spec, {"max_new_tokens": 8})
    assert again.entries == {cache.key(row, prompt): "Answer A."}
    again.add([("c", "c", "Answer C.")])
    assert AnswerCache(tmp_path, spec, {"max_new_tokens": 8}).entries["c"] == "Answer C."
    # another setting, another file: nothing reused
    assert AnswerCache(tmp_path, spec, {"max_new_tokens": 9}).entries == {}
    assert AnswerCache(tmp_path, ModelSpec("m", "m", "m", "fp2", "plain"), {"max_new_tokens": 8}).entries == {}


def test_answer_cache_parts_of_several_processes(tmp_path):
    """Each process appends to its own part file. The parts a killed run left are read by the next run's
    first process (whole lines only); merging writes what the file lacks (the parts', and the answers the
    other processes sent) once per key and removes the parts."""
    from utils.evaluation.answers import AnswerCache, ModelSpec

    spec, settings = ModelSpec("m", "m", "m", "fp", "plain"), {"max_new_tokens": 8}
    AnswerCache(tmp_path, spec, settings).add([("k0", "a", "A.")])
    for rank, items in [(0, [("k1", "b", "B.")]), (1, [("k2", "c", "C."), ("k0", "a", "A.")])]:
        AnswerCache(tmp_path, spec, settings, rank=rank).add(items)
    other = AnswerCache(tmp_path, spec, settings, rank=1)
    assert other.entries == {}  # not the first process: it reads nothing, the first decides what is missing
    path = other.path
    with path.with_name(path.name + ".part1").open("a") as f:
        f.write('{"key": "k3", "id": "d", "compl')  # killed mid-line
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".part0", path.name + ".part1"]
    first = AnswerCache(tmp_path, spec, settings, rank=0)
    assert first.entries == {"k0": "A.", "k1": "B.", "k2": "C."}
    first.merge([("k4", "e", "E."), ("k2", "c", "C.")])  # sent by the other processes
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(e["key"] for e in lines) == ["k0", "k1", "k2", "k4"]
    assert {e["key"]: e["id"] for e in lines}["k4"] == "e"
    assert AnswerCache(tmp_path, spec, settings).entries == {"k0": "A.", "k1": "B.", "k2": "C.", "k4": "E."}


@pytest.mark.slow  # loads WordNet and hashes the sentence-embedding model
def test_the_score_key_follows_what_a_score_depends_on(tmp_path, monkeypatch):
    """The score cache's key changes with the answers, the items, a reward option, the lexicon file's
    content, WordNet's presence and the code; the same inputs give the same key."""
    import utils.core.fingerprint as fingerprint
    import utils.rewards.overlap as overlap
    from utils.evaluation.metrics import _scoring_key

    lexicon = tmp_path / "terms.txt"
    lexicon.write_text("qt interval\n")
    cfg = cfg_for(tmp_path, term_lexicon=str(lexicon))
    rows = [{"id": "1", "question": "Q?", "reference": "A QT of 440 ms.", "task": "CK"}]
    key = _scoring_key(["A."], rows, "plain", cfg, None)
    assert _scoring_key(["A."], rows, "plain", cfg, None) == key
    assert _scoring_key(["B."], rows, "plain", cfg, None) != key
    assert _scoring_key(["A."], [{**rows[0], "reference": "A QT of 450 ms."}], "plain", cfg, None) != key
    assert _scoring_key(["A."], rows, "plain", cfg_for(tmp_path, term_lexicon=str(lexicon), number_tolerance=0.2),
                        None) != key
    lexicon.write_text("qt interval\npr interval\n")
    assert _scoring_key(["A."], rows, "plain", cfg, None) != key
    key = _scoring_key(["A."], rows, "plain", cfg, None)
    monkeypatch.setattr(overlap, "load_wordnet", lambda: None)
    assert _scoring_key(["A."], rows, "plain", cfg, None) != key
    monkeypatch.undo()
    monkeypatch.setattr(fingerprint, "source_sha256", lambda: "other code")
    assert _scoring_key(["A."], rows, "plain", cfg, None) != key


@pytest.mark.slow
def test_bench_eval_measures_against_the_bound_of_the_decode_dtype(tmp_path, tiny_llama, processed):
    """scripts/bench_eval.py end to end on the tiny model: with bf16 products the bound is measured in bf16, and
    the decoder (not model.generate) produced the answers."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"test_file: {processed / 'eval/test.jsonl'}\nmax_new_tokens: 4\nbatch_size: 2\n"
                   f"reward_model: null\nnum_threads: 1\n")
    r = subprocess.run([sys.executable, "scripts/bench_eval.py", "--config", str(cfg), "--model", str(tiny_llama),
                        "--n", "3", "--batch-sizes", "1,2", "--decode-dtype", "bfloat16"], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GFLOP/s matmul (bfloat16)" in r.stdout and "machine: " in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if re.match(r"\s+[12]\s+3\s", line)]
    assert [row[0] for row in rows] == ["1", "2"] and all(row[-1] == "decode" for row in rows)


def test_completions_bound_counts_every_step_of_the_longest_completion():
    """The bound on sampled completions: each decode step reads all weights whatever the rows still going,
    each token costs 2 FLOPs a weight; LoRA weights do not count (merged). Against the bound of every row
    going on to the end, it is lower by the rows' mean use when bandwidth binds, equal when FLOPs bind."""
    import torch

    from utils.core.runtime import completions_bound, decode_bound

    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000, bias=False))  # 1e6 fp32 weights, 4 MB
    model.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(10**6)))  # not read by the decoder
    bound = {"bandwidth_gb_s": 4.0, "matmul_gflop_s": 2.0}  # a step 1 ms; a token 1 ms
    # 16 rows, the longest 100 tokens, 400 tokens in all: 100 steps of 1 ms (bandwidth) < 400 tokens of 1 ms
    assert completions_bound(model, 100, 400, bound) == pytest.approx(1000.0)
    assert decode_bound(model, 16, bound) == pytest.approx(1000.0)  # FLOPs bind: the same
    slow_products = {"bandwidth_gb_s": 4.0, "matmul_gflop_s": 20.0}  # a token 0.1 ms: bandwidth binds
    assert completions_bound(model, 100, 400, slow_products) == pytest.approx(4000.0)  # 4 rows a step on average
    assert decode_bound(model, 16, slow_products) == pytest.approx(10000.0)  # as if 16 rows to the end
    assert completions_bound(model, 0, 0, bound) == 0.0
    # a bf16 decoder reads half the bytes
    assert completions_bound(model, 100, 400, slow_products, torch.bfloat16) == pytest.approx(8000.0)


def test_machine_bound_takes_the_best_of_its_trials(monkeypatch):
    """The bound is a peak: of three timed trials (copies 2 s, 1 s, 4 s; products 1 s, 0.5 s, 2 s), the fastest
    counts, so that one slow trial on a noisy machine does not lower the bound the benchmarks divide by."""
    import time

    import torch

    from utils.core.runtime import machine_bound

    durations = iter([2.0, 1.0, 1.0, 0.5, 4.0, 2.0])  # copy, product, copy, product, ...
    clock = {"t": 0.0, "start": True}

    def fake_clock():
        if not clock["start"]:
            clock["t"] += next(durations)
        clock["start"] = not clock["start"]
        return clock["t"]

    monkeypatch.setattr(time, "perf_counter", fake_clock)
    got = machine_bound(torch.float32, trials=3)
    copied = 5 * 2 * 64 * 2**20 * 4 / 1e9  # five copies of a 256 MiB buffer, read and written
    multiplied = 10 * 2 * 256 * 1024 * 4096 / 1e9  # ten decode-sized products
    assert got == {"bandwidth_gb_s": round(copied / 1.0, 1), "matmul_gflop_s": round(multiplied / 0.5, 1)}
