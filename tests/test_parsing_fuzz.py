"""Every parser that reads model output runs in linear time: 100,000-character degenerate completions
(whitespace runs, unclosed or repeated <think> tags, digit, word and punctuation runs) take well under a
second per call. One catastrophically backtracking regex (the reasoning parser's took 4 s on '<think>'
and 2,000 spaces, growing with the cube of the length) stalls GRPO or evaluation for hours."""

import random
import re
import time

import pytest

from utils.data.formats import THINK_CLOSE, THINK_OPEN, Parsed, parse
from utils.data.text import (
    extract_numbers,
    followup_interval,
    is_yes_no_question,
    looks_truncated,
    normalize_whitespace,
    repair_mojibake,
    words,
    yes_no_of,
)
from utils.evaluation.judge import parse_judge_score
from utils.models.special_tokens import escape_special_tokens
from utils.rewards.lexicon import term_tokens
from utils.rewards.mix import REWARDS
from utils.rewards.negatives import alter_numbers, contradict, flip_yesno
from utils.rewards.reward_model import user_text
from utils.rewards.rules import answer_verdict, echo_share, repetition

N = 100_000
LIMIT = 1.0  # seconds per call


def _fill(unit: str, head: str = "", tail: str = "") -> str:
    """``head``, ``unit`` repeated, ``tail``: N characters in all."""
    body = N - len(head) - len(tail)
    return head + (unit * (body // len(unit) + 1))[:body] + tail


ADVERSARIAL = {
    "spaces": _fill(" "),
    "newlines": _fill("\n"),
    "mixed whitespace": _fill(" \t\n\u00a0\u2009\r"),
    "unclosed <think> then spaces": _fill(" ", THINK_OPEN),
    "unclosed <think> then whitespace and text": _fill("  \n the QT is long ", THINK_OPEN),
    "<think> repeated": _fill(THINK_OPEN),
    "</think> repeated": _fill(THINK_CLOSE),
    "<think></think> repeated": _fill(THINK_OPEN + THINK_CLOSE),
    "tags with whitespace": _fill(f"{THINK_OPEN} \n{THINK_CLOSE}\n "),
    "closed reasoning, then spaces and an open tag": _fill(" ", f"{THINK_OPEN}\nok\n{THINK_CLOSE}\n", THINK_OPEN),
    "digits": _fill("7"),
    "digits then a unit": _fill("9", tail=" ms"),
    "digits and spaces": _fill("1 "),
    "1.1.1.1": _fill("1."),
    "1,1,1,1": _fill("1,"),
    "1-1-1-1": _fill("1-"),
    "1 to 1 to": _fill("1 to "),
    "numbers with units": _fill("120 ms "),
    "a digit, then spaces": _fill(" ", "1"),
    "every, then spaces": _fill(" ", "every"),
    "every 3 every 3": _fill("every 3 "),
    "one long word": _fill("a"),
    "yes yes yes": _fill("yes "),
    "Yes, Yes, Yes,": _fill("Yes, "),
    "a-a-a-a": _fill("a-"),
    "a'a'a'a": _fill("a'"),
    "periods": _fill("."),
    "punctuation": _fill(".!?,;:—-()"),
    "special-token strings": _fill("<|eot_id|><|im_end|>"),
    "mojibake": _fill("鈥檚"),
    "a mix": _fill(f"{THINK_OPEN} 1.1 yes, a-a  ...\n\n{THINK_CLOSE} 120 ms every 3 months  "),
}

REFERENCE = ("Yes. A PR interval of 0.12-0.20 s (120-200 ms) is normal; atrial fibrillation with ST elevation "
             "needs a cardiologist, and you should come back every 3 months.")
QUESTION = "Is a PR interval of 160 ms normal in atrial fibrillation with ST elevation?"
COLUMNS = {"reference": [REFERENCE], "question": [QUESTION], "label_yesno": ["yes"],
           "numbers": [extract_numbers(REFERENCE)], "followup_days": [91.3]}
RULES = [n for n in REWARDS if n not in ("reward_model", "semantic")]  # those two need a model


def _reward(name: str, fmt: str):
    return lambda s: REWARDS[name]([s], answer_format=fmt, **COLUMNS)


PARSERS = {
    "parse plain": lambda s: parse(s, "plain"),
    "parse reasoning": lambda s: parse(s, "reasoning"),
    # utils/data/text.py
    "repair_mojibake": repair_mojibake,
    "normalize_whitespace": normalize_whitespace,
    "looks_truncated": looks_truncated,
    "words": words,
    "yes_no_of": yes_no_of,
    "is_yes_no_question": is_yes_no_question,
    "extract_numbers": extract_numbers,
    "followup_interval": followup_interval,
    # the rewards' own text handling
    "answer_verdict": answer_verdict,
    "repetition": repetition,
    "echo_share": lambda s: echo_share(s, QUESTION, REFERENCE),
    "term_tokens": term_tokens,  # the lexicon's look-up itself runs inside the terms reward below
    "parse_judge_score": parse_judge_score,
    "reward model user_text": lambda s: user_text({"prompt": [{"role": "user", "content": s}]}),
    "escape_special_tokens": escape_special_tokens,
    # hard negatives are built from references, not model output, but must not hang on a bad one either
    "flip_yesno": flip_yesno,
    "contradict": lambda s: contradict(s, random.Random(0)),
    "alter_numbers": lambda s: alter_numbers(s, random.Random(0)),
    **{f"{name} reward ({fmt})": _reward(name, fmt) for name in RULES for fmt in ("plain", "reasoning")},
}


@pytest.mark.parametrize("name", list(PARSERS))
def test_each_call_takes_under_a_second_on_degenerate_text(name):
    fn = PARSERS[name]
    fn("Yes, the PR interval is 160 ms.")  # first-call costs (imports, the lexicon) are not the parser's
    slow = []
    for label, text in ADVERSARIAL.items():
        started = time.perf_counter()
        fn(text)
        took = time.perf_counter() - started
        if took >= LIMIT:
            slow.append(f"{label}: {took:.2f} s")
    assert not slow, f"{name} is slow on 100,000-character inputs: {'; '.join(slow)}"


def test_the_set_covers_every_rule_reward_and_both_formats():
    assert {"format", "yesno", "terms", "numbers", "rouge", "length"} <= set(RULES)
    assert sum(k.endswith("reward (reasoning)") for k in PARSERS) == len(RULES)


# The regex the reasoning parser replaced: the reference for its behaviour, safe on short inputs only.
_OLD_REASONING = re.compile(r"^\s*<think>\s*(?P<r>.*?)\s*</think>\s*(?P<a>.*)$", re.DOTALL)


def _old_parse_reasoning(text: str) -> Parsed:
    m = _OLD_REASONING.match(text)
    if m:
        answer, reasoning = m.group("a").strip(), m.group("r").strip()
        ok = bool(answer) and bool(reasoning) and THINK_OPEN not in answer and THINK_CLOSE not in answer
        return Parsed(answer, reasoning, ok)
    if THINK_OPEN in text:
        return Parsed("", text.split(THINK_OPEN, 1)[1].strip(), False)
    return Parsed(text.strip(), None, False)


def test_reasoning_parser_agrees_with_the_regex_it_replaced():
    pieces = [THINK_OPEN, THINK_CLOSE, " ", "\n", "\u00a0", "\u3000", "\x1c", "a", "Yes.", "<", ">", "</think",
              "think>", "<think"]
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        assert parse(text, "reasoning") == _old_parse_reasoning(text), repr(text)
