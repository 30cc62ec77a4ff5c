"""Answer formats: how a completion is laid out, shared by SFT targets, rewards, evaluation and chat.

* ``plain``: the whole completion is the answer.
* ``reasoning``: a short reasoning section, then the answer::

      <think>
      The patient asks whether ...
      </think>
      Yes, you have the right to ...

Every reward and metric reads ``parse(text, fmt).answer``, so what SFT teaches, what GRPO rewards and
what evaluation measures is the same part of the text.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("plain", "reasoning")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _split_reasoning(text: str) -> tuple[str, str] | None:
    """``(reasoning, answer)`` when the text opens with ``<think>`` (after whitespace) and closes it, else None.

    Plain string searches, not a regex: the regex this replaces (``\\s*<think>\\s*(.*?)\\s*</think>``)
    backtracked in cubic time on an unclosed tag followed by whitespace (4 s for 2,000 spaces), so one
    degenerate completion could stall GRPO or evaluation for hours. The reasoning ends at the first
    ``</think>``, as the lazy regex's did.
    """
    body = text.lstrip()
    if not body.startswith(THINK_OPEN):
        return None
    end = body.find(THINK_CLOSE, len(THINK_OPEN))
    if end < 0:
        return None
    return body[len(THINK_OPEN):end].strip(), body[end + len(THINK_CLOSE):].strip()


@dataclass(frozen=True)
class Parsed:
    answer: str          # what rewards and metrics read
    reasoning: str | None
    well_formed: bool    # the completion follows the format exactly


def parse(text: str, fmt: str = "plain") -> Parsed:
    """Split a completion into reasoning and answer.

    >>> parse("<think>\\nQT is long.\\n</think>\\nYes, it is prolonged.", "reasoning")
    Parsed(answer='Yes, it is prolonged.', reasoning='QT is long.', well_formed=True)
    >>> parse("Yes, it is prolonged.", "reasoning").well_formed
    False
    """
    if text is None:
        text = ""
    if fmt == "plain":
        stray = THINK_OPEN in text or THINK_CLOSE in text
        return Parsed(text.strip(), None, bool(text.strip()) and not stray)
    if fmt == "reasoning":
        split = _split_reasoning(text)
        if split:
            reasoning, answer = split
            ok = bool(answer) and bool(reasoning) and THINK_OPEN not in answer and THINK_CLOSE not in answer
            return Parsed(answer, reasoning, ok)
        # An unclosed <think> means the answer never came (usually a completion cut at max length).
        if THINK_OPEN in text:
            return Parsed("", text.split(THINK_OPEN, 1)[1].strip(), False)
        return Parsed(text.strip(), None, False)
    raise ValueError(f"unknown answer format {fmt!r}; expected one of {', '.join(FORMATS)}")


def render(answer: str, fmt: str = "plain", reasoning: str | None = None) -> str:
    """The target text for an answer in the given format (the inverse of :func:`parse`)."""
    if fmt == "plain":
        return answer.strip()
    if fmt == "reasoning":
        return f"{THINK_OPEN}\n{(reasoning or '').strip()}\n{THINK_CLOSE}\n{answer.strip()}"
    raise ValueError(f"unknown answer format {fmt!r}; expected one of {', '.join(FORMATS)}")


FORMAT_INSTRUCTIONS = {
    "plain": "",
    "reasoning": (" First think briefly inside <think> and </think> tags, then give the answer after the "
                  "closing tag."),
}


def with_format_instructions(messages: list[dict], fmt: str) -> list[dict]:
    """The conversation with the answer format's instruction appended to its system prompt.

    SFT targets, GRPO prompts, evaluation and chat all ask for the format the same way, through this
    function, so that a model is never asked differently from how it was trained. The 'plain' format
    adds nothing. A conversation without a system message gets one holding only the instruction.
    """
    extra = FORMAT_INSTRUCTIONS[fmt]
    if not extra:
        return [dict(m) for m in messages]
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = out[0]["content"].rstrip() + extra
    else:
        out.insert(0, {"role": "system", "content": extra.strip()})
    return out
