"""A chat session with a checkpoint: the config, loading, the history trimmed to the model's context,
replies with the reasoning section split off.

torch and transformers are imported inside functions so that ``--help`` and config errors stay instant.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from utils.core.config import ConfigError, UserError, fld, load_config, non_negative, positive, to_dict
from utils.data.formats import FORMATS, THINK_CLOSE, THINK_OPEN, parse, with_format_instructions
from utils.models.generation import stop_token_ids
from utils.models.special_tokens import escape_messages

log = logging.getLogger(__name__)


NOTICE = "Research model, not a medical device: its answers are not medical advice."


DTYPES = ["auto", "bfloat16", "float16", "float32"]


# What /set may change during a session; the rest needs a new model load.
SETTABLE = ["max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed", "answer_format",
            "show_reasoning", "stream", "max_context"]


# Used when neither the model config nor --max-context gives a context size.
FALLBACK_CONTEXT = 2048


def _device_ok(d: str) -> bool:
    return d in ("auto", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", d) is not None


@dataclass
class ChatConfig:
    model: str = fld("rlhf", "Model to chat with: base, sft, rlhf, a model folder or a Hub id.")
    base_model: str = fld("smollm2-135m-instruct", "What `--model base` means (a model reference).")
    system: str | None = fld(None, "System prompt text; unset means the contents of system_prompt_file, "
                             "'' means none.")
    system_prompt_file: str = fld("data/system_prompt.txt", "File holding the default system prompt.")
    answer_format: str = fld("auto", "Answer format to ask for and to display: 'reasoning' shows the <think> "
                             "section apart from the answer; auto means the one in the model folder's "
                             "train_config.yaml (plain when there is none).", choices=["auto", *FORMATS])
    prompt: str = fld("", "One-shot: answer this question, print the answer and exit. Without it, text piped "
                      "on standard input is the question.")
    interactive: bool = fld(False, "Chat interactively even when standard input is not a terminal.")
    max_new_tokens: int = fld(256, "Most tokens generated per reply.", check=(positive, "an integer > 0"))
    temperature: float = fld(0.7, "Sampling temperature; 0 means greedy decoding (no sampling).",
                             check=(non_negative, "a number >= 0"))
    top_p: float = fld(0.9, "Nucleus sampling: keep the smallest token set with this much probability.",
                       check=(lambda p: 0.0 < p <= 1.0, "a number in (0, 1]"))
    repetition_penalty: float = fld(1.1, "Penalty on tokens already generated (1 = none).",
                                    check=(positive, "a number > 0"))
    seed: int = fld(1234, "Random seed, set at the start and by /set seed: the same seed, settings and "
                    "conversation give the same replies.")
    dtype: str = fld("auto", "Weights' dtype: auto is bfloat16/float16 on CUDA and float32 on CPU.",
                     choices=DTYPES)
    device: str = fld("auto", "Where to run: auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps.",
                      check=(_device_ok, "auto, cpu, mps, cuda or cuda:N"))
    max_context: int = fld(0, "Context size in tokens that prompt plus reply must fit; 0 means the model's "
                           "max_position_embeddings.", check=(non_negative, "an integer >= 0"))
    stream: bool = fld(True, "Print tokens as they are generated (one-shot mode streams only to a terminal, "
                       "so that a pipe receives exactly the parsed answer).")
    show_reasoning: bool = fld(True, "Show the reasoning section of the 'reasoning' format (one-shot mode: on "
                               "stderr).")
    color: bool = fld(True, "Dim reasoning and notices with ANSI colours when writing to a terminal "
                      "(NO_COLOR in the environment turns them off too).")

    def __post_init__(self):
        if self.prompt and self.interactive:
            raise ValueError("prompt and interactive: choose one (--prompt answers one question and exits)")


# ----------------------------------------------------------------------------- streaming sections
class SectionSplitter:
    """Split streamed text into the reasoning and the answer as it arrives.

    ``emit(section, text)`` receives ``"reasoning"`` or ``"answer"`` pieces whose concatenations equal
    ``formats.parse(full_text, fmt)``'s fields whenever the full text starts with the reasoning section or
    has none (the only layouts a streamed display can know in advance). A tag split across chunks is held
    back until it is complete; leading and trailing whitespace of each section is dropped, as parse does.
    """

    def __init__(self, fmt: str, emit: Callable[[str, str], None]):
        if fmt not in FORMATS:
            raise ValueError(f"unknown answer format {fmt!r}")
        self.fmt, self.emit = fmt, emit
        self.mode = "start" if fmt == "reasoning" else "answer"
        self.buf = ""
        self.started = {"reasoning": False, "answer": False}
        self.pending_ws = ""

    def feed(self, text: str) -> None:
        self.buf += text
        self._drain(final=False)

    def close(self) -> None:
        self._drain(final=True)
        self.pending_ws = ""

    def _drain(self, final: bool) -> None:
        if self.mode == "start":
            s = self.buf.lstrip()
            if s.startswith(THINK_OPEN):
                self.buf, self.mode = s[len(THINK_OPEN):], "reasoning"
            elif THINK_OPEN.startswith(s) and not final:
                return  # could still become "<think>"
            else:
                self.mode = "answer"
        if self.mode == "reasoning":
            i = self.buf.find(THINK_CLOSE)
            if i >= 0:
                self._out("reasoning", self.buf[:i])
                self.buf, self.mode, self.pending_ws = self.buf[i + len(THINK_CLOSE):], "answer", ""
            else:
                keep = 0 if final else _partial_suffix(self.buf, THINK_CLOSE)
                self._out("reasoning", self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return
        if self.mode == "answer":
            self._out("answer", self.buf)
            self.buf = ""

    def _out(self, section: str, text: str) -> None:
        if not self.started[section]:
            text = text.lstrip()
            if not text:
                return
            self.started[section] = True
        # Whitespace is held back until more text follows, so a section never ends in it.
        text = self.pending_ws + text
        body = text.rstrip()
        self.pending_ws = text[len(body):]
        if body:
            self.emit(section, body)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


# ----------------------------------------------------------------------------- history and context
class ContextFull(UserError):
    pass


def render_prompt(tok, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template, ready for the reply. A
    special-token string typed into a message is read as text (utils.models.special_tokens)."""
    try:
        text = tok.apply_chat_template(escape_messages(messages, tok), add_generation_prompt=True, tokenize=False)
    except ValueError as e:  # no chat template: a base (non-instruct) model
        raise UserError(f"the model's tokenizer has no usable chat template ({str(e).splitlines()[0]}); "
                        "chat.py needs an instruct or chat model") from None
    # The template writes the special tokens itself (e.g. <|begin_of_text|>).
    return tok(text, add_special_tokens=False)["input_ids"]


def fit_history(tok, system: str, history: list[tuple[str, str]], user: str, max_new_tokens: int,
                max_context: int) -> tuple[list[int], int]:
    """Render system + history + ``user``, dropping the oldest exchanges until prompt + reply fit.

    Returns ``(input_ids, dropped)``; the system prompt and the new message are never dropped. Raises
    :class:`ContextFull` when even the system prompt and the new message alone leave no room.
    """
    for dropped in range(len(history) + 1):
        messages = ([{"role": "system", "content": system}] if system else [])
        for q, a in history[dropped:]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": user})
        ids = render_prompt(tok, messages)
        if len(ids) + max_new_tokens <= max_context:
            return ids, dropped
    raise ContextFull(f"the message is too long: the prompt takes {len(ids)} tokens and the reply up to "
                      f"{max_new_tokens}, more than the {max_context}-token context; shorten it or lower "
                      "max_new_tokens")


# ----------------------------------------------------------------------------- loading
def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("device mps: not available here; use --device cpu")
    return name


def load_for_chat(path: str, cfg: ChatConfig):
    """(model, tokenizer, device) for a resolved model path; adapters are merged for speed."""
    from transformers.utils import logging as hf_logging

    from utils.models.loading import load_for_inference

    hf_logging.disable_progress_bar()  # the weight-loading bar would land in the chat
    device = resolve_device(cfg.device)
    # pick_dtype's auto chooses by CUDA's presence, not by the device asked for.
    dtype = "float32" if cfg.dtype == "auto" and device == "cpu" else cfg.dtype
    log.info("loading %s on %s (%s)", path, device, dtype)
    model, tok = load_for_inference(path, cfg.base_model, dtype=dtype, device=device)
    return model, tok, device


def model_context(model, tok) -> int:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not n:
        text_cfg = getattr(getattr(model, "config", None), "text_config", None)
        n = getattr(text_cfg, "max_position_embeddings", None)
    if not n and tok is not None and 0 < getattr(tok, "model_max_length", 0) < 10**7:
        n = tok.model_max_length
    return int(n or FALLBACK_CONTEXT)


def trained_format(path: str) -> str | None:
    """The answer format a model folder was trained with (its train_config.yaml), or None."""
    from utils.core.artifacts import read_train_config

    if not Path(path).is_dir():
        return None
    trained = read_train_config(path) or {}
    return trained.get("answer_format") if trained.get("answer_format") in FORMATS else None


def read_system_prompt(cfg: ChatConfig) -> str:
    if cfg.system is not None:
        return cfg.system.strip()
    path = Path(cfg.system_prompt_file)
    if not path.is_file():
        raise UserError(f"system_prompt_file: {path} not found (or give the prompt with --system TEXT)")
    return path.read_text(encoding="utf-8").strip()


# ----------------------------------------------------------------------------- the session
@dataclass
class Reply:
    text: str            # the whole completion, special tokens removed
    answer: str
    reasoning: str | None
    truncated: bool      # stopped by max_new_tokens, not by an end-of-turn token


class ChatSession:
    """One conversation with a loaded model: settings, system prompt, history, generation."""

    def __init__(self, cfg: ChatConfig, model, tok, device: str = "cpu", model_name: str = "",
                 trained_format: str | None = None):
        self.cfg, self.model, self.tok, self.device = cfg, model, tok, device
        self.model_name = model_name or cfg.model
        self.trained_format = trained_format
        if trained_format and cfg.answer_format not in ("auto", trained_format):
            log.warning("%s was trained with answer_format %s; asking for %s instead", self.model_name,
                        trained_format, cfg.answer_format)
        self.base_system = read_system_prompt(cfg)
        self.history: list[tuple[str, str]] = []
        self.reseed()

    # -- settings
    @property
    def fmt(self) -> str:
        """The answer format in use: the configured one, or with auto the model's own."""
        if self.cfg.answer_format == "auto":
            return self.trained_format or "plain"
        return self.cfg.answer_format

    @property
    def system(self) -> str:
        """The system prompt sent: the base prompt plus the answer format's instruction, as in training."""
        messages = [{"role": "system", "content": self.base_system}] if self.base_system else []
        messages = with_format_instructions(messages, self.fmt)
        return messages[0]["content"] if messages else ""

    @property
    def context(self) -> int:
        return self.cfg.max_context or model_context(self.model, self.tok)

    def reseed(self) -> None:
        if self.model is not None:
            from transformers import set_seed

            set_seed(self.cfg.seed)

    def set(self, key: str, value: str) -> str:
        """Change one setting (validated like a flag); returns the line to show."""
        if key not in SETTABLE:
            raise UserError(f"/set {key}: not a setting that can change during a chat; settable: "
                            + ", ".join(SETTABLE))
        try:
            self.cfg = load_config(ChatConfig, None, {**to_dict(self.cfg), key: value})
        except ConfigError as e:
            raise UserError(str(e).replace(f"command line --{key.replace('_', '-')}", "/set")) from None
        if key == "seed":
            self.reseed()
        return f"{key} = {getattr(self.cfg, key)}"

    def settings(self) -> list[str]:
        c = self.cfg
        sampling = (f"temperature {c.temperature}, top_p {c.top_p}" if c.temperature > 0 else "greedy (temperature 0)")
        system = self.system.replace("\n", " ")
        return [f"model: {self.model_name}  device: {self.device}  dtype: {self._dtype()}",
                f"answer_format: {self.fmt}{' (auto)' if c.answer_format == 'auto' else ''}  "
                f"show_reasoning: {c.show_reasoning}  stream: {c.stream}",
                f"max_new_tokens: {c.max_new_tokens}  {sampling}  repetition_penalty: {c.repetition_penalty}  "
                f"seed: {c.seed}",
                f"context: {self.context} tokens{'' if c.max_context else ' (the model’s)'}  "
                f"history: {len(self.history)} exchange(s)",
                f"system: {system[:200] + ('…' if len(system) > 200 else '') if system else '(none)'}"]

    def _dtype(self) -> str:
        try:
            return str(next(self.model.parameters()).dtype).replace("torch.", "")
        except (AttributeError, StopIteration, TypeError):
            return self.cfg.dtype

    # -- generation
    def prepare(self, user: str) -> tuple[list[int], int]:
        """Token ids for ``user`` after the history, trimming the history for good if it must."""
        ids, dropped = fit_history(self.tok, self.system, self.history, user, self.cfg.max_new_tokens, self.context)
        if dropped:
            del self.history[:dropped]
        return ids, dropped

    def generate(self, ids: list[int], on_text: Callable[[str], None] | None = None) -> Reply:
        """Generate a reply to the prompt ``ids``; ``on_text`` receives the decoded text as it comes."""
        import torch

        c = self.cfg
        streamer = _callback_streamer(self.tok, on_text) if on_text is not None else None
        eos = stop_token_ids(self.tok, self.model)
        if c.temperature > 0:
            sampling = dict(do_sample=True, temperature=c.temperature, top_p=c.top_p)
        else:  # explicit neutral values, or the checkpoint's own sampling defaults would leak in
            sampling = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
        input_ids = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=c.max_new_tokens, repetition_penalty=c.repetition_penalty,
                                      eos_token_id=eos or None, pad_token_id=self.tok.pad_token_id,
                                      streamer=streamer, **sampling)
        new = out[0, len(ids):].tolist()
        truncated = len(new) >= c.max_new_tokens and not (new and new[-1] in eos)
        text = self.tok.decode(new, skip_special_tokens=True)
        p = parse(text, self.fmt)
        return Reply(text, p.answer, p.reasoning, truncated)

    def remember(self, user: str, reply: Reply) -> None:
        # Only the answer goes back into the history: the reasoning is a scratchpad, and keeping it would
        # spend the context on text the next turn does not need.
        if reply.answer:
            self.history.append((user, reply.answer))


def _callback_streamer(tok, on_text: Callable[[str], None]):
    """A TextStreamer that hands its text to ``on_text`` instead of printing it."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    return CallbackStreamer(tok, skip_prompt=True, skip_special_tokens=True)
