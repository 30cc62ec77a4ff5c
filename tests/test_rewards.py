"""Rule-based rewards (utils/rewards/): one table per reward, each case with its reason; the
registry, the mix and its total; and a property test that every reward stays finite and in range
for any string at all."""

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils.core.config import ConfigError, UserError, load_config
from utils.data.text import extract_numbers
from utils.rewards.facts import FLIP_KINDS, contradictions, flip_fact, key_facts
from utils.rewards.lexicon import load_lexicon, parse_lexicon
from utils.rewards.mix import DEFAULT_WEIGHTS, REWARDS, RewardMix, build_reward_funcs, score_rows, weighted_total
from utils.rewards.rules import (
    compressibility,
    echo_share,
    format_reward,
    length_match_reward,
    length_reward,
    numbers_reward,
    repetition,
    rouge_l,
    rouge_reward,
    semantic_reward,
    terms_reward,
    yesno_reward,
)

THINK = "<think>\nThe question asks about the PR interval.\n</think>\n"


# ============================================================================= format
@pytest.mark.parametrize("text, fmt, expected, reason", [
    ("The PR interval is 120-200 ms.", "plain", 1.0, "a plain answer"),
    ("", "plain", 0.0, "nothing was answered"),
    ("   \n ", "plain", 0.0, "whitespace is no answer"),
    (THINK + "Yes, it is prolonged.", "plain", 0.0, "think tags do not belong in a plain answer"),
    (THINK + "Yes, it is prolonged.", "reasoning", 1.0, "reasoning, then the answer"),
    ("Yes, it is prolonged.", "reasoning", 0.0, "the reasoning section is missing"),
    ("<think>\nSome reasoning that never ends", "reasoning", 0.0, "unclosed think: cut off before the answer"),
    (THINK, "reasoning", 0.0, "reasoning without an answer"),
    ("<think></think>\nYes.", "reasoning", 0.0, "an empty reasoning section does not count"),
])
def test_format(text, fmt, expected, reason):
    assert format_reward([text], answer_format=fmt) == [expected], reason


# ============================================================================= yes / no
@pytest.mark.parametrize("answer, label, expected, reason", [
    ("Yes, you can ask for a copy.", "yes", 1.0, "the verdict matches"),
    ("No, you cannot.", "yes", 0.0, "the opposite verdict"),
    ("no. The test is mandatory.", "no", 1.0, "case does not matter"),
    ("I understand your concern. Yes, you may refuse.", "yes", 1.0, "the verdict may open the second sentence"),
    ("You may refuse the test.", "yes", 0.0, "no explicit verdict: the system prompt asks for one"),
    ("Not always.", "no", 0.0, "'Not' is not 'No'"),
    ("Yesterday it was fine.", "yes", 0.0, "'Yesterday' is not 'Yes'"),
    ("Yes, you can.", None, None, "items without a yes/no label are not judged"),
    ("Yes, you can.", "maybe", None, "an unknown label is no label"),
    ("", "yes", 0.0, "an empty answer gives no verdict"),
])
def test_yesno(answer, label, expected, reason):
    assert yesno_reward([answer], label_yesno=[label]) == [expected], reason


def test_yesno_reads_only_the_answer_part():
    # The reasoning may say anything; the answer after </think> is judged.
    text = "<think>\nYes, maybe, but no.\n</think>\nNo, you cannot."
    assert yesno_reward([text], label_yesno=["no"], answer_format="reasoning") == [1.0]
    assert yesno_reward([text], label_yesno=["yes"], answer_format="reasoning") == [0.0]


# ============================================================================= terms
REF_TERMS = "Atrial fibrillation with a rapid ventricular response and ST-segment depression in V5."


@pytest.mark.parametrize("answer, expected, reason", [
    (REF_TERMS, 1.0, "the reference itself names every term"),
    ("AF with RVR and ST depression in lead V5.", 1.0, "abbreviations and synonyms fold to one term"),
    ("Atrial fibrillation with rapid ventricular response.", 2 * 0.5 / 1.5, "half the terms, all right: F1 2/3"),
    ("Sinus rhythm.", 0.0, "only a term the reference does not name"),
    ("The patient should see a doctor.", 0.0, "no clinical term at all"),
    ("", 0.0, "an empty answer names nothing"),
])
def test_terms(answer, expected, reason):
    assert terms_reward([answer], reference=[REF_TERMS]) == [pytest.approx(expected)], reason


def test_terms_listing_many_terms_does_not_pay():
    lex = load_lexicon()
    everything = ", ".join(sorted(set(lex.terms.values())))
    honest = "Atrial fibrillation with rapid ventricular response."
    stuffed, half = terms_reward([everything, honest], reference=[REF_TERMS] * 2)
    assert stuffed < 0.05 < half
    # repeating a right term is no better than saying it once: terms count as a set
    once, many = terms_reward(["Atrial fibrillation.", "Atrial fibrillation. " * 30], reference=[REF_TERMS] * 2)
    assert once == many


@pytest.mark.parametrize("text, expected, reason", [
    ("Left bundle branch block.", {"left bundle branch block"}, "the longest term wins over 'bundle branch block'"),
    ("T-waves are inverted; peaked T waves.", {"t wave", "peaked t wave"}, "hyphens are spaces and plurals fold"),
    ("LBBB and RBBB", {"left bundle branch block", "right bundle branch block"}, "abbreviations"),
    ("A heart with a patient.", set(), "generic words are not terms"),
])
def test_lexicon_find(text, expected, reason):
    assert load_lexicon().find(text) == expected, reason


def test_terms_none_without_reference_terms():
    assert terms_reward(["Atrial fibrillation."], reference=["You have the right to a copy."]) == [None]


def test_terms_leave_out_the_question_terms():
    """Echoing the question's terms earns nothing (GRPO learnt to restate questions when it did)."""
    question = "How is atrial fibrillation with a rapid ventricular response managed?"
    echo = "Atrial fibrillation with a rapid ventricular response is managed as needed."
    answer = "Rate control; look for ST depression in V5."
    got = terms_reward([echo, answer, echo + " " + answer], reference=[REF_TERMS] * 3, question=[question] * 3)
    assert got == [0.0, 1.0, 1.0]  # the question's terms count on neither side: no precision lost either
    # without the question column the reward is the plain overlap, as before
    assert terms_reward([echo], reference=[REF_TERMS]) == [pytest.approx(2 * 0.5 / 1.5)]
    # a reference that names only the question's terms leaves nothing to judge: the reward does not apply
    assert terms_reward([echo], reference=["Atrial fibrillation is common."], question=[question]) == [None]


# ============================================================================= flipped facts (utils/rewards/facts.py)
@pytest.mark.parametrize("reference, kind, expected, reason", [
    ("The QT interval is prolonged in hypocalcemia.", "direction", "The QT interval is shortened in hypocalcemia.",
     "a duration"),
    ("ST elevation means injury; ST elevation in two leads counts.", "direction",
     "ST depression means injury; ST depression in two leads counts.", "the word flips wherever it occurs"),
    ("Increased risk of stroke.", "direction", "Decreased risk of stroke.", "the capital stays"),
    ("Delta waves are best seen in V1.", "lead", "Delta waves are best seen in V6.", "the precordial mirror image"),
    ("Q waves in lead III.", "lead", "Q waves in lead aVL.", "a roman limb lead after 'lead'"),
    ("Peaked T waves indicate hyperkalemia.", "disease", "Peaked T waves indicate hypokalemia.", "an electrolyte"),
    ("A STEMI needs reperfusion now.", "disease", "A NSTEMI needs reperfusion now.", "an abbreviation"),
    ("Atrial fibrillation shows no P waves.", "disease", "Atrial flutter shows no P waves.", "a two-word name"),
    ("Mobitz type II block needs a pacemaker.", "disease", "Mobitz type I block needs a pacemaker.",
     "the longest name wins, and its 'II' is no lead"),
])
def test_flip_fact(reference, kind, expected, reason):
    assert flip_fact(reference, random.Random(0), kind) == (expected, kind), reason


@pytest.mark.parametrize("reference, days", [("A QTc above 460 ms is prolonged.", None),
                                             ("The PR interval is 120-200 ms.", None),
                                             ("Come back every 3 months for an ECG.", 91.3)])
def test_flip_fact_moves_one_number_out_of_tolerance(reference, days):
    for seed in range(5):
        out, kind = flip_fact(reference, random.Random(seed), "number")
        changed = [(a, b) for a, b in zip(reference.split(), out.split()) if a != b]
        assert kind == "number" and len(changed) == 1, (out, changed)
        assert numbers_reward([out], reference=[reference], followup_days=[days])[0] < 0.5


@pytest.mark.parametrize("reference, kind, reason", [
    ("Ask your doctor about it.", None, "no key fact at all"),
    ("The PR interval is normal.", "number", "no number with a unit"),
    ("Yes, you have the right to a copy of your ECG.", "direction", "a patient's right is no direction"),
    ("Mobitz type II block is infranodal.", "lead", "'type II' is no lead"),
    ("Left and right bundle branch blocks differ.", "direction", "both named: a swap would only reorder them"),
])
def test_flip_fact_none_without_such_a_fact(reference, kind, reason):
    assert flip_fact(reference, random.Random(0), kind) is None, reason


def test_flip_fact_draws_a_kind_the_reference_has():
    ref = "Hyperkalemia gives peaked T waves in V2 and a QRS of 160 ms."
    kinds = {flip_fact(ref, random.Random(seed))[1] for seed in range(40)}
    assert kinds == set(FLIP_KINDS)
    with pytest.raises(ValueError, match="expected one of"):
        flip_fact(ref, random.Random(0), "colour")


REF_FACTS = "Hyperkalemia gives peaked T waves in V2."


@pytest.mark.parametrize("answer, expected, reason", [
    ("Hypokalemia gives peaked T waves in V2.", [("disease", "hyperkalemia", "hypokalemia")], "a disease swapped"),
    ("Hyperkalemia gives flattened T waves in V2.", [("direction", "peaked", "flattened")], "a direction swapped"),
    ("Hyperkalemia gives peaked T waves in V5.", [("lead", "V2", "V5")], "a lead swapped"),
    ("Hyperkalemia, unlike hypokalemia, gives peaked T waves in V2.", [], "naming both contradicts nothing"),
    ("Hyperkalemia gives tall T waves.", [], "leaving a fact out or rewording it contradicts nothing"),
    ("In hyperkalemia the T waves of V2 are peaked.", [], "a paraphrase"),
    ("", [], "an empty answer says nothing wrong"),
])
def test_contradictions(answer, expected, reason):
    assert contradictions(answer, REF_FACTS) == expected, reason
    assert contradictions(answer, REF_FACTS, key_facts(REF_FACTS)) == expected


# Hand-written references with a fact of one kind or more; the terms reward must see every flip of them.
FLIP_REFERENCES = [
    ("The QT interval is prolonged in hypocalcemia.", None),
    ("The risk of stroke is increased.", None),  # no lexicon term: the reward applies to the contradiction alone
    ("ST elevation in leads V1 and V2 suggests an anterior STEMI.", None),
    ("Peaked T waves indicate hyperkalemia.", "What do peaked T waves indicate?"),  # the question names the finding
    ("Atrial fibrillation shows no P waves and an irregular rhythm.", None),
    ("Left axis deviation is common in LAFB.", None),
]


@pytest.mark.parametrize("reference, question", FLIP_REFERENCES)
def test_terms_score_a_flipped_fact_below_the_truth(reference, question):
    flips = [f for k in ("direction", "lead", "disease") if (f := flip_fact(reference, random.Random(0), k))]
    assert flips
    for flipped, kind in flips:
        truth, wrong = terms_reward([reference, flipped], reference=[reference] * 2, question=[question] * 2)
        assert wrong == 0.0 and truth in (None, 1.0), (kind, flipped)


def test_the_mix_scores_a_flipped_fact_well_below_the_truth():
    """Today's rule mix (semantic similarity aside: it needs a model): one word changed cost ROUGE-L a
    little and often nothing else; a contradiction now costs the terms reward, a number the numbers one."""
    rules = {k: w for k, w in DEFAULT_WEIGHTS.items() if k != "semantic"}
    refs = FLIP_REFERENCES + [("A QTc above 460 ms is prolonged.", None)]
    for reference, question in refs:
        row = {"reference": reference, "question": question or "What does it mean?", "label_yesno": None,
               "numbers": extract_numbers(reference)}
        for kind in FLIP_KINDS:
            flipped = flip_fact(reference, random.Random(0), kind)
            if flipped:
                truth, wrong = (s["total"] for s in score_rows([reference, flipped[0]], [row, row], rules))
                assert truth - wrong >= 0.1, (kind, flipped[0], truth, wrong)


@pytest.mark.parametrize("lines, message", [
    (["# only a comment"], "no terms"),
    (["atrial fibrillation | af", "atrial flutter | af"], "already stands for"),
    (["!!! | af"], "has no letters"),
])
def test_lexicon_errors(lines, message):
    with pytest.raises(UserError, match=message):
        parse_lexicon(lines, "test.txt")


def test_shipped_lexicon_is_sizeable():
    lex = load_lexicon()
    assert len(lex) >= 300  # curated: waves, rhythms, conduction, ischemia, structure, drugs, tests, leads


# ============================================================================= numbers
@pytest.mark.parametrize("answer, reference, expected, reason", [
    ("The PR interval is 120-200 ms.", "The PR interval is 120-200 ms.", 1.0, "the same range"),
    ("The PR interval is 0.12-0.20 s.", "The PR interval is 120-200 ms.", 1.0, "seconds convert to milliseconds"),
    ("A rate of 100 /min.", "Faster than 100 bpm.", 1.0, "/min is bpm"),
    ("A QTc of 445 ms.", "A QTc of 460 ms.", 1.0, "within the 10% tolerance"),
    ("A QTc of 600 ms.", "A QTc of 460 ms.", 0.0, "outside the tolerance"),
    ("A QRS of 120 ms.", "A QRS of 80-120 ms.", 0.5, "a number inside the range only overlaps it"),
    ("A QRS of 120 bpm.", "A QRS of 120 ms.", 0.0, "same number, other dimension"),
    ("The PR interval is 120 ms.", "PR 120 ms and QRS 100 ms.", 2 * 1 * 0.5 / 1.5, "one of two: recall 1/2"),
    ("PR 120 ms, QRS 100 ms, QT 400 ms, RR 800 ms.", "PR 120 ms.", 2 * 0.25 / 1.25, "extra numbers: precision 1/4"),
    ("The PR interval is prolonged.", "The PR interval is 120-200 ms.", 0.0, "no number where one was due"),
    ("It is 120 ms.", "No numbers here.", None, "nothing to check"),
])
def test_numbers(answer, reference, expected, reason):
    assert numbers_reward([answer], reference=[reference]) == [pytest.approx(expected) if expected is not None
                                                              else None], reason


@pytest.mark.parametrize("answer, days, expected, reason", [
    ("Come back every 3 months.", 91.32, 1.0, "the same period"),
    ("Come back every 12 weeks.", 91.32, pytest.approx(1 - abs(math.log(84 / 91.32)) / math.log(2)),
     "weeks convert; 84 vs 91 days is nearly right"),
    ("Come back every 6 months.", 91.32, 0.0, "twice as long is wrong"),
    ("Come back when you can.", 91.32, 0.0, "no period given"),
])
def test_numbers_followup(answer, days, expected, reason):
    # the reference carries no unit-number of its own here, so the follow-up period is all that counts
    assert numbers_reward([answer], reference=["Regular check-ups."], followup_days=[days]) == [expected], reason


def test_numbers_uses_the_numbers_column():
    ref = "The PR interval is 120-200 ms."
    assert numbers_reward(["It is 0.3 s."], reference=["anything"], numbers=[extract_numbers(ref)]) == [0.0]
    assert numbers_reward(["It is 0.12-0.2 s."], reference=["anything"], numbers=[extract_numbers(ref)]) == [1.0]


def test_numbers_survive_overflow():
    # a 400-digit number is infinite as a float: skipped, never a NaN
    assert numbers_reward(["9" * 400 + " ms"], reference=["120 ms"]) == [0.0]


# ============================================================================= rouge
@pytest.mark.parametrize("answer, reference, expected, reason", [
    ("A normal QRS lasts 80-120 ms.", "A normal QRS lasts 80-120 ms.", 1.0, "identical"),
    ("", "A normal QRS lasts 80-120 ms.", 0.0, "empty"),
    ("Bananas are yellow.", "A normal QRS lasts 80-120 ms.", 0.0, "nothing in common"),
    ("Yes.", "", None, "no reference"),
])
def test_rouge(answer, reference, expected, reason):
    assert rouge_reward([answer], reference=[reference]) == [expected], reason


def test_rouge_of_a_long_answer_matches_the_uncapped_score():
    from rouge_score import rouge_scorer

    ref = "A normal QRS complex lasts 80 to 120 milliseconds in adults."
    answer = ref + " " + " ".join(f"filler{i}" for i in range(3000))  # far beyond ROUGE_MAX_WORDS
    exact = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, answer)["rougeL"].fmeasure
    assert rouge_l(answer, ref) == pytest.approx(exact, rel=1e-9)


# ============================================================================= length
REF_LEN = "Yes, you have the right to a copy of your ECG report."  # 12 words


@pytest.mark.parametrize("answer, expected, reason", [
    (REF_LEN, 1.0, "the reference's own length"),
    ("Yes, you may ask your provider for a copy of the full ECG report and its interpretation.", 1.0,
     "longer, within the budget of 2 x 12 + 20 words"),
    ("", 0.0, "empty"),
    ("Yes, you have the right to a copy of", 0.5, "stops mid-sentence"),
    ("Yes.", 1 / 3, "1 word of the 3 (a quarter of 12) expected at least"),
    (" ".join(["The report is yours to keep."] * 30), 0.0, "a loop"),
    ("!" * 500, 0.0, "a loop without words"),
])
def test_length(answer, expected, reason):
    assert length_reward([answer], reference=[REF_LEN]) == [pytest.approx(expected)], reason


@pytest.mark.parametrize("n_words, expected", [(12, 1.0), (6, 0.5), (24, 0.5), (36, 1 / 3), (0, 0.0)])
def test_length_match_pulls_both_ways(n_words, expected):
    answer = " ".join(["word"] * n_words)
    assert length_match_reward([answer], reference=[REF_LEN]) == [pytest.approx(expected)]
    assert length_match_reward([answer], reference=[""]) == [None]


ECHO_Q = "How does the presence of obesity influence cardiovascular risk and management?"
ECHO_REF = ("Obesity increases cardiovascular risk through hypertension, dyslipidemia and insulin resistance; "
            "management includes weight loss and lifestyle changes.")


@pytest.mark.parametrize("answer,expected,reason", [
    ("Obesity raises blood pressure and cholesterol, so weight loss and exercise are the core of management.", 1.0,
     "its own words"),
    ("The presence of obesity influences cardiovascular risk and management.", 1 - (3 / 9 - 0.2) / 0.3,
     "the question said back; 'the presence of' (3 of 9 words) is not the reference's wording"),
    ("How does the presence of obesity influence cardiovascular risk and management?", 0.0,
     "the question itself: 6 of its 11 words are not the reference's"),
    ("The presence of obesity increases cardiovascular risk through hypertension, dyslipidemia and insulin "
     "resistance; management includes weight loss and lifestyle changes.", 1.0,
     "one copied run ('the presence of obesity'), the rest is content: 2 of 19 words echo"),
])
def test_length_stops_paying_for_echoing_the_question(answer, expected, reason):
    got = length_reward([answer], reference=[ECHO_REF], question=[ECHO_Q])
    assert got == [pytest.approx(expected)], reason
    assert length_reward([answer], reference=[ECHO_REF]) == [1.0]  # without the question: no echo factor


def test_echo_allows_what_the_reference_restates_too():
    q = "Do I have the right to refuse an ECG if I feel it is unnecessary?"
    ref = "Yes, you have the right to refuse an ECG; discuss your concerns with your provider first."
    answer = "Yes, you have the right to refuse an ECG if you feel it is unnecessary."
    # 12 of its 15 words copy the question, but only 'if', 'feel', 'it', 'is', 'unnecessary' are not the reference's
    assert echo_share(answer, q, ref) == pytest.approx(5 / 15)
    assert echo_share("Yes, you have the right to refuse an ECG.", q, ref) == 0.0
    assert length_reward([answer], reference=[ref], question=[q]) == [pytest.approx(1 - (5 / 15 - 0.2) / 0.3)]
    assert echo_share("anything", "", ref) == 0.0 and echo_share("", q, ref) == 0.0


def test_length_penalty_grows_with_length():
    words_ = [f"w{i}" for i in range(400)]
    scores = [length_reward([" ".join(words_[:n]) + "."], reference=[REF_LEN])[0] for n in (44, 60, 80, 88, 200)]
    assert scores[0] == 1.0 and scores[-1] == 0.0  # budget 44 words; 0 at twice the budget
    assert scores == sorted(scores, reverse=True) and scores[1] > scores[2] > scores[3]


def test_length_without_reference_uses_the_budget():
    fresh = [f"w{i}" for i in range(300)]  # distinct words: no loop
    assert length_reward([" ".join(fresh[:150]) + "."], length_max_words=200) == [1.0]
    assert length_reward([" ".join(fresh) + "."], length_max_words=200)[0] < 1.0


def test_repetition_measures():
    assert repetition("The QRS is narrow and the rhythm is sinus at seventy beats per minute today.") == 0.0
    assert repetition("ab cd ef " * 20) > 0.9
    assert compressibility("ok " * 200) < 0.1 < compressibility("The QRS complex is narrow; sinus rhythm.")


# ============================================================================= semantic
@pytest.mark.slow
def test_semantic_orders_paraphrase_above_unrelated():
    ref = "The rhythm is atrial fibrillation with a fast ventricular rate."
    para, unrelated, empty = semantic_reward(
        ["Atrial fibrillation with a rapid ventricular response.", "Bring a copy of your insurance card.", ""],
        reference=[ref] * 3)
    assert para > 0.6 > unrelated >= 0.0 and empty == 0.0
    assert semantic_reward(["anything"], reference=[""]) == [None]


# ============================================================================= registry, mix, total
def test_registry_has_the_contract_names():
    assert {"format", "yesno", "terms", "numbers", "rouge", "bleu1", "meteor", "semantic", "length",
            "length_match", "reward_model"} <= set(REWARDS)


def test_build_reward_funcs_names_weights_and_binding():
    funcs, weights = build_reward_funcs({"format": 0.5, "yesno": 1.0, "length": 0.0}, answer_format="reasoning")
    assert [f.__name__ for f in funcs] == ["format", "yesno", "length"] and weights == [0.5, 1.0, 0.0]
    # answer_format is bound: a plain answer fails the reasoning format; TRL's extra kwargs are ignored
    assert funcs[0](["Yes."], trainer_state=object(), completion_ids=[[1]], log_metric=print) == [0.0]
    # TRL's conversational completions
    assert funcs[1]([[{"role": "assistant", "content": THINK + "No, never."}]], label_yesno=["no"]) == [1.0]


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": {"formatt": 1.0}}, "unknown reward 'formatt'; valid rewards: format, yesno"),
    ({"weights": {"format": 1.0}, "colour": 1}, "unknown reward option 'colour'"),
    ({"weights": {"reward_model": 1.0}}, "no reward_model is set"),
    ({"weights": {"format": 1.0}, "answer_format": "json"}, "answer_format 'json'"),
])
def test_build_reward_funcs_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        build_reward_funcs(**kwargs)


def test_total_is_the_weighted_mean_of_applicable_rewards():
    assert weighted_total({"a": 1.0, "b": None, "c": 0.0}, {"a": 3.0, "b": 5.0, "c": 1.0}) == 0.75
    assert weighted_total({"a": 1.0, "b": 0.0}, {"a": 1.0, "b": 0.0}) == 1.0  # weight 0 only reports
    assert weighted_total({"a": None}, {"a": 1.0}) is None


def test_score_rows_matches_the_single_rewards():
    rows = [{"reference": "No, it is not prolonged at 180 ms.", "label_yesno": "no", "question": "Is it long?"},
            {"reference": "Sinus tachycardia is faster than 100 bpm.", "label_yesno": None, "question": "What?"}]
    answers = ["No, 180 ms is normal.", "A sinus rhythm above 100 bpm."]
    weights = {"format": 0.5, "yesno": 1.0, "numbers": 1.0, "rouge": 0.5, "length": 1.0, "terms": 1.0}
    got = score_rows(answers, rows, weights)
    for name in weights:
        assert [g[name] for g in got] == REWARDS[name](answers, reference=[r["reference"] for r in rows],
                                                       label_yesno=[r["label_yesno"] for r in rows]), name
    assert got[1]["yesno"] is None
    for g in got:
        assert g["total"] == pytest.approx(weighted_total(g, weights))


def test_reward_mix_config(tmp_path):
    cfg = load_config(RewardMix, None, {"rewards": "{format: 1, yesno: 2}"})
    assert cfg.rewards == {"format": 1.0, "yesno": 2.0}
    assert load_config(RewardMix).rewards == DEFAULT_WEIGHTS
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewards: {format: 1, fromat: 1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'rewards'.*expected a mapping of reward names"):
        load_config(RewardMix, bad)
    bad.write_text("rewards: {format: 1, reward_model: 1}\n")
    with pytest.raises(ConfigError, match="reward_model is not set"):
        load_config(RewardMix, bad)


# ============================================================================= property test: any string
NASTY = ["", " ", "\n\t ", "x" * 100_000, "word " * 20_000, "🫀" * 1000, "<think>", "</think>", "<think></think>",
         "<think>\nYes\n</think>\n", "<b>Yes</b>, <i>120 ms</i>", "\x00\x01\x7f", "Yes" + "\u0301" * 50,
         "9" * 400 + " ms", "1e400 bpm", "−5 ms to −1 ms", "every 99999999999999999999 days", "٣٠ ms",
         "Yes, " + "ST elevation " * 500, "No. " * 5000, "\u202e reversed \u202c", "NaN ms", "inf bpm"]
TEXT = st.one_of(st.text(max_size=300), st.sampled_from(NASTY),
                 st.lists(st.sampled_from(["Yes,", "No.", "120", "ms", "0.2 s", "every", "3", "months", "QT",
                                           "atrial fibrillation", "<think>", "</think>", "\n", "-", "to", "bpm"]),
                          max_size=40).map(" ".join))
RULES = [n for n in REWARDS if n not in ("reward_model", "semantic")]


def _check(values, n):
    assert len(values) == n
    for v in values:
        assert v is None or (isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0), v


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(completions=st.lists(TEXT, min_size=1, max_size=3), reference=TEXT,
       label=st.sampled_from(["yes", "no", None]),
       days=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
       fmt=st.sampled_from(["plain", "reasoning"]))
def test_rule_rewards_are_finite_and_in_range_for_any_string(completions, reference, label, days, fmt):
    n = len(completions)
    cols = {"reference": [reference] * n, "label_yesno": [label] * n, "followup_days": [days] * n,
            "numbers": [extract_numbers(reference)] * n, "question": [reference] * n}
    for name in RULES:
        values = REWARDS[name](completions, answer_format=fmt, **cols)
        _check(values, n)
        # whether a reward applies depends on the item, never on the completion
        other = REWARDS[name](["A different answer."] * n, answer_format=fmt, **cols)
        assert [v is None for v in values] == [v is None for v in other], name


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(completions=st.lists(TEXT, min_size=1, max_size=3), reference=TEXT, fmt=st.sampled_from(["plain", "reasoning"]))
def test_semantic_reward_is_finite_and_in_range_for_any_string(completions, reference, fmt):
    _check(semantic_reward(completions, reference=[reference] * len(completions), answer_format=fmt),
           len(completions))


def test_reward_model_ceiling_pays_nothing_for_beating_the_reference(monkeypatch):
    from utils.rewards import reward_model
    from utils.rewards.mix import RewardMix

    class Stub:  # preferences of each answer over its reference, as the trained scorer gives them
        def preference(self, prompts, questions, answers, refs):
            return [{"worse": 0.2, "same": 0.5, "better": 0.9}[a] for a in answers]

    monkeypatch.setitem(reward_model._SCORERS, ("stub", None), Stub())
    kw = {"reward_model": "stub", "question": ["q"] * 4, "reference": ["r"] * 4}
    answers = ["worse", "same", "better", ""]
    assert reward_model.reward_model_reward(answers, **kw) == [0.2, 0.5, 0.9, 0.0]
    assert reward_model.reward_model_reward(answers, reward_model_ceiling=0.5, **kw) == [0.4, 1.0, 1.0, 0.0]

    mix = RewardMix(rewards={"reward_model": 1.0}, reward_model="stub", reward_model_ceiling=0.5)
    assert [d["total"] for d in mix.score(answers, [{"question": "q", "reference": "r"}] * 4)] == [0.4, 1.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match=r"reward_model_ceiling.*expected a number in \(0, 1\]"):
        load_config(RewardMix, None, {"reward_model_ceiling": 0.0})
