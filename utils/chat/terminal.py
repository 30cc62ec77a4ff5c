"""chat.py's two modes on a terminal.

* interactive (standard input is a terminal, or ``--interactive``): a read-reply loop with streamed tokens,
  multi-turn history trimmed to the model's context, and slash commands (``/help`` lists them);
* one-shot (``--prompt TEXT``, or text piped on standard input): the answer alone on stdout, for scripts;
  the notice and the reasoning section go to stderr.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import TextIO

from utils.chat.session import (
    NOTICE,
    SETTABLE,
    ChatConfig,
    ChatSession,
    ContextFull,
    Reply,
    SectionSplitter,
    load_for_chat,
    read_system_prompt,
    trained_format,
)
from utils.core.config import UserError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- display
class Style:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def dim(self, s: str) -> str:
        return f"\x1b[2m{s}\x1b[0m" if self.enabled and s else s

    def bold(self, s: str) -> str:
        return f"\x1b[1m{s}\x1b[0m" if self.enabled and s else s


def use_color(cfg: ChatConfig, stream: TextIO) -> bool:
    return cfg.color and not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


class ReplyPrinter:
    """Shows a streamed reply: the reasoning (dimmed, labelled ``thinking>``) apart from the answer."""

    def __init__(self, out: TextIO, fmt: str, show_reasoning: bool, style: Style, reasoning_out: TextIO | None = None,
                 answer_label: str = "assistant> "):
        self.streams = {"answer": out, "reasoning": reasoning_out or out}
        self.labels = {"answer": answer_label, "reasoning": "thinking> "}
        self.show_reasoning, self.style = show_reasoning, style
        self.current: str | None = None
        self.splitter = SectionSplitter(fmt, self._emit)
        self.answered = False

    def _emit(self, section: str, text: str) -> None:
        if section == "reasoning" and not self.show_reasoning:
            return
        out = self.streams[section]
        if section != self.current:
            if self.current is not None:
                self.streams[self.current].write("\n")
            if self.labels[section]:
                out.write(self.style.bold(self.labels[section]))
            self.current = section
        out.write(self.style.dim(text) if section == "reasoning" else text)
        out.flush()
        self.answered |= section == "answer"

    def feed(self, text: str) -> None:
        self.splitter.feed(text)

    def finish(self) -> None:
        self.splitter.close()
        if self.current is not None:
            self.streams[self.current].write("\n")
        for stream in self.streams.values():
            stream.flush()


# ----------------------------------------------------------------------------- interactive mode
HELP = """commands:
  /reset              forget the conversation (keeps the system prompt and settings)
  /system             show the system prompt;  /system TEXT  replace it (and reset)
                      /system default  the one from the file;  /system none  no system prompt
  /settings           show the model, the generation settings and the context in use
  /set KEY VALUE      change a setting: {keys}
  /help               this list
  /quit               leave (so do /exit and Ctrl-D)
A line ending in \\ continues on the next line; //text sends a message that starts with /."""


def _not_utf8(e: UnicodeError) -> UserError:
    return UserError(f"standard input is not UTF-8 text ({e.reason} at offset {e.start} of a chunk); expected "
                     "UTF-8, e.g. convert it with `iconv -f latin1 -t utf-8`")


def _utf8(text: str) -> str:
    """``text`` as read, refused when it holds undecodable bytes: in Python's UTF-8 mode and under the C
    locale standard input decodes them to lone surrogates instead of failing, and the tokenizer then
    fails with a traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _not_utf8(e) from None
    return text


def _read_line(inp: TextIO, out: TextIO, prompt: str) -> str | None:
    """One line from the user, None at end of input. A terminal gets readline editing through input()."""
    if inp is sys.stdin and out is sys.stdout and inp.isatty():
        try:
            return _utf8(input(prompt))
        except EOFError:
            return None
        except UnicodeDecodeError as e:
            raise _not_utf8(e) from None
    out.write(prompt)
    out.flush()
    try:
        line = _utf8(inp.readline())
    except UnicodeDecodeError as e:
        raise _not_utf8(e) from None
    if not line:
        return None
    line = line.rstrip("\r\n")
    # Piped input is not echoed by a terminal; writing it back keeps the output a readable transcript.
    if not (hasattr(inp, "isatty") and inp.isatty()):
        out.write(line + "\n")
    return line


def read_message(inp: TextIO, out: TextIO, style: Style) -> str | None:
    line = _read_line(inp, out, style.bold("you> "))
    if line is None:
        return None
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        line = _read_line(inp, out, "...> ")
        if line is None:
            line = ""
    parts.append(line)
    return "\n".join(parts)


def handle_command(session: ChatSession, line: str, out: TextIO, style: Style) -> bool:
    """Run one slash command; returns False when the chat should end."""
    name, _, arg = line[1:].partition(" ")
    name, arg = name.lower(), arg.strip()

    def say(text: str) -> None:
        out.write(style.dim(text) + "\n")

    if name in ("quit", "exit", "q"):
        return False
    if name in ("help", "h", "?"):
        say(HELP.format(keys=", ".join(SETTABLE)))
    elif name == "reset":
        session.history.clear()
        say("(conversation reset)")
    elif name == "system":
        if not arg:
            say(f"system: {session.system or '(none)'}")
        else:
            if arg == "default":
                session.base_system = read_system_prompt(dataclasses.replace(session.cfg, system=None))
            else:
                session.base_system = "" if arg == "none" else arg
            session.history.clear()
            say("(system prompt set; conversation reset)")
    elif name == "settings":
        for s in session.settings():
            say(s)
    elif name == "set":
        key, _, value = arg.partition(" ")
        if not key or not value.strip():
            raise UserError("usage: /set KEY VALUE, KEY one of " + ", ".join(SETTABLE))
        say(session.set(key.replace("-", "_"), value.strip()))
    else:
        raise UserError(f"unknown command /{name}; /help lists the commands")
    return True


def chat_loop(session: ChatSession, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """The interactive mode: read, reply, repeat until /quit or end of input."""
    style = Style(use_color(session.cfg, out))
    out.write(style.bold(f"ECG-GRPO chat · {session.model_name} · format {session.fmt}") +
              style.dim("  (/help for commands, /quit or Ctrl-D to leave)") + "\n")
    out.write(style.dim(NOTICE) + "\n")
    while True:
        try:
            line = read_message(inp, out, style)
        except KeyboardInterrupt:
            out.write("\n" + style.dim("(/quit or Ctrl-D to leave)") + "\n")
            continue
        if line is None:
            out.write("\n")
            break
        if not line.strip():
            continue
        if line.startswith("/") and not line.startswith("//"):
            try:
                if not handle_command(session, line.strip(), out, style):
                    break
            except UserError as e:
                out.write(f"error: {e}\n")
            continue
        user = line[1:] if line.startswith("//") else line
        try:
            reply_once(session, user, out, style)
        except ContextFull as e:
            out.write(f"error: {e}\n")
        except KeyboardInterrupt:
            out.write("\n" + style.dim("(stopped; this exchange is not kept)") + "\n")
        out.flush()


def reply_once(session: ChatSession, user: str, out: TextIO, style: Style) -> Reply:
    """Answer one message in the interactive mode, streaming it, and keep the exchange."""
    c = session.cfg
    ids, dropped = session.prepare(user)
    if dropped:
        out.write(style.dim(f"(dropped the {dropped} oldest exchange(s) to fit the {session.context}-token "
                            "context)") + "\n")
    printer = ReplyPrinter(out, session.fmt, c.show_reasoning, style)
    reply = session.generate(ids, printer.feed if c.stream else None)
    if not c.stream:
        printer.feed(reply.text)
    printer.finish()
    if not reply.answer:
        why = ("the reasoning did not finish within max_new_tokens; /set max_new_tokens N gives it more room"
               if reply.truncated else "the model ended its turn without one")
        out.write(style.dim(f"(no answer: {why})") + "\n")
    elif reply.truncated:
        out.write(style.dim(f"(cut at max_new_tokens={c.max_new_tokens})") + "\n")
    session.remember(user, reply)
    return reply


# ----------------------------------------------------------------------------- one-shot mode
def one_shot(session: ChatSession, question: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> Reply:
    """Answer ``question`` alone: the answer on ``out``; the notice and the reasoning on ``err``."""
    c = session.cfg
    err_style = Style(use_color(c, err))
    err.write(err_style.dim(NOTICE) + "\n")
    ids, _ = session.prepare(question)
    if c.stream and hasattr(out, "isatty") and out.isatty():
        # No label and no colour: stdout carries the answer alone, as in a pipe.
        printer = ReplyPrinter(out, session.fmt, c.show_reasoning, err_style, reasoning_out=err, answer_label="")
        reply = session.generate(ids, printer.feed)
        printer.finish()
        if not printer.answered:
            out.write("\n")
    else:
        reply = session.generate(ids)
        if c.show_reasoning and reply.reasoning:
            err.write(err_style.dim(f"thinking> {reply.reasoning}") + "\n")
        out.write(reply.answer + "\n")
    out.flush()
    if reply.truncated:
        log.warning("the reply was cut at max_new_tokens=%d", c.max_new_tokens)
    if not reply.answer:
        log.warning("no answer in the reply (format %s): %r", session.fmt, reply.text[:200])
    return reply


# ----------------------------------------------------------------------------- entry point
def run_chat(cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None,
             stderr: TextIO | None = None) -> None:
    """What chat.py runs: pick the mode, load the model, chat."""
    from utils.models.resolve import resolve_model

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    # Everything that can fail on input is checked before the slow model load.
    path = resolve_model(cfg.model, cfg.base_model)
    read_system_prompt(cfg)
    interactive = cfg.interactive or (not cfg.prompt and stdin.isatty())
    question = cfg.prompt
    if not interactive and not question:
        try:
            question = _utf8(stdin.read()).strip()
        except UnicodeDecodeError as e:
            raise _not_utf8(e) from None
        if not question:
            raise UserError("no question: standard input was empty (give --prompt TEXT, or run in a terminal, "
                            "or with --interactive, to chat)")
    model, tok, device = load_for_chat(path, cfg)
    session = ChatSession(cfg, model, tok, device, model_name=path, trained_format=trained_format(path))
    if interactive:
        if stdin is sys.stdin and stdin.isatty():
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        chat_loop(session, stdin, stdout)
    else:
        one_shot(session, question, stdout, stderr)
