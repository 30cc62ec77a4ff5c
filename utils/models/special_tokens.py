"""Special-token strings inside message text stay text: a question or answer that contains ``<|eot_id|>`` or
``<|im_end|>`` must not end a turn, nor give the model a control token it never saw in that place.

Every path that tokenises conversations (generation, chat, the reward model, SFT examples, GRPO prompts)
escapes the message contents here before the chat template renders them. The escape inserts an invisible
U+2060 WORD JOINER after the first character of each special-token string, so the tokenizer no longer
finds the string and reads its characters as plain text, while the text still looks the same.

Why escaping rather than tokenising with ``split_special_tokens=True``: every path tokenises the rendered
template, whose own special tokens must stay special, and TRL's trainers tokenise the conversations
themselves; escaping the contents before templating is the one fix that holds for all of them.
"""

from __future__ import annotations

import re

# Invisible and not whitespace (str.strip and the templates' ``| trim`` keep it), and not one of the
# zero-width characters utils.data.text.normalize_whitespace removes.
JOINER = "\u2060"

# The shape of Llama 3's special tokens (<|eot_id|>, <|start_header_id|>, 256 in all) and of ChatML's turn
# tokens (<|im_start|>, <|im_end|>, <|endoftext|>): escaped also where no tokenizer is at hand (GRPO's
# prompts are built before the policy's tokenizer loads). Bounded, so matching is linear in the text.
_SHAPE = re.compile(r"<\|[^<>|\s]{1,64}\|>")


def special_token_strings(tok) -> list[str]:
    """The tokenizer's special tokens, longest first: those it reads as control tokens wherever they occur.

    Added tokens that are not special (e.g. a ``<think>`` some tokenizers add) are meant to appear in text
    and are left alone; so are empty or one-character specials, which cannot be escaped visibly intact.
    """
    found = set(getattr(tok, "all_special_tokens", None) or [])
    decoder = getattr(tok, "added_tokens_decoder", None) or {}
    found |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    return sorted((s for s in found if isinstance(s, str) and len(s.strip()) > 1), key=len, reverse=True)


def _break(s: str) -> str:
    return s[0] + JOINER + s[1:]


def escape_special_tokens(text: str, tok=None) -> str:
    """``text`` with every special-token string broken by a word joiner: strings of the ``<|name|>`` shape,
    and the tokenizer's own special tokens when ``tok`` is given. Escaping twice changes nothing.

    >>> escape_special_tokens("Is <|eot_id|> a token?") == "Is <\\u2060|eot_id|> a token?"
    True
    """
    return _escape(text, special_token_strings(tok) if tok is not None else [])


def escape_messages(messages: list[dict], tok=None) -> list[dict]:
    """A copy of a conversation with each message's content escaped (:func:`escape_special_tokens`)."""
    specials = special_token_strings(tok) if tok is not None else []
    return [{**m, "content": _escape(m["content"], specials)} if isinstance(m, dict) and "content" in m else m
            for m in messages]


def _escape(text: str, specials: list[str]) -> str:
    if not isinstance(text, str):
        return text
    text = _SHAPE.sub(lambda m: _break(m.group()), text)
    for s in specials:
        while s in text:  # a loop, not one replace: a special token may overlap its own next occurrence
            text = text.replace(s, _break(s))
    return text
