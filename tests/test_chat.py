"""chat.py: flags and errors, streaming sections, history trimming, commands, both modes end to end."""

from __future__ import annotations

import io
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.chat.session import (
    NOTICE,
    ChatConfig,
    ChatSession,
    ContextFull,
    Reply,
    SectionSplitter,
    fit_history,
    render_prompt,
    trained_format,
)
from utils.chat.terminal import ReplyPrinter, Style, chat_loop, handle_command, one_shot
from utils.core.config import UserError, load_config
from utils.data.formats import THINK_CLOSE, THINK_OPEN, parse, render

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def chat_cmd(*args) -> list[str]:
    return [sys.executable, str(ROOT / "chat.py"), *args]


def run_chat_py(*args, input: str | None = "", env: dict | None = None, cwd=ROOT, timeout=300):
    return subprocess.run(chat_cmd(*args), input=input, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "ECG_LOG_LEVEL": "WARNING", **(env or {})})


def fake_model_folder(folder: Path) -> Path:
    """Enough for resolve_model to accept the folder; loading it would fail, so only pre-load checks run."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def cfg(**kw) -> ChatConfig:
    return load_config(ChatConfig, None, {"system_prompt_file": str(ROOT / "data/system_prompt.txt"), **kw})


# ============================================================================= command line (fast)
def test_help_lists_the_flags_and_commands():
    r = run_chat_py("--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--model", "--prompt", "--interactive", "--system", "--max-new-tokens", "--temperature", "--top-p",
                 "--repetition-penalty", "--seed", "--dtype", "--device", "--answer-format", "--max-context"):
        assert flag in r.stdout
    assert "/reset" in r.stdout and "not medical advice" in r.stdout


@pytest.mark.parametrize("args, says", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--device", "gpu"], "device"),
    (["--answer-format", "json"], "answer_format"),
    (["--prompt", "hi", "--interactive"], "choose one"),
])
def test_bad_flags_are_one_line_errors(args, says):
    r = run_chat_py(*args)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and says in r.stderr and r.stderr.count("\n") == 1


def test_missing_checkpoint_names_the_script_that_makes_it(tmp_path):
    r = run_chat_py("--model", "sft", "--prompt", "hi", env={"ECG_MODELS_DIR": str(tmp_path)})
    assert r.returncode == 2
    assert "sft_train.py" in r.stderr


def test_empty_piped_input_without_prompt_is_an_error(tmp_path):
    folder = fake_model_folder(tmp_path / "m")
    r = run_chat_py("--model", str(folder), input="  \n")
    assert r.returncode == 2
    assert "no question" in r.stderr and "--prompt" in r.stderr


def test_missing_system_prompt_file_is_an_error(tmp_path):
    folder = fake_model_folder(tmp_path / "m")
    r = run_chat_py("--model", str(folder), "--prompt", "hi", "--system-prompt-file", str(tmp_path / "none.txt"))
    assert r.returncode == 2
    assert "none.txt" in r.stderr and "--system" in r.stderr


@pytest.mark.parametrize("recipe", ["cpu", "llama-3.2-3b"])
def test_recipe_configs_load_and_start_with_their_command(recipe):
    path = ROOT / "configs" / recipe / "chat.yaml"
    c = load_config(ChatConfig, path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("chat.py" in first or "chat_with_model.sh" in first)
    assert c.model == "rlhf"
    assert c.base_model == ("smollm2-135m-instruct" if recipe == "cpu" else "meta-llama/Llama-3.2-3B-Instruct")


def run_wrapper(*args, cwd=ROOT, env=None, input=""):
    return subprocess.run(["bash", str(ROOT / "scripts/chat_with_model.sh"), *args], capture_output=True, text=True,
                          cwd=cwd, input=input, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "ECG_LOG_LEVEL": "WARNING", **(env or {})})


def test_wrapper_runs_chat_py_with_the_recipe_config():
    r = run_wrapper("--help")
    assert r.returncode == 0, r.stderr
    assert "usage: chat.py" in r.stdout
    r = run_wrapper("--help", env={"RECIPE": "no-such-recipe"})
    assert r.returncode == 2 and "no-such-recipe" in r.stderr


def test_wrapper_passes_the_model_and_keeps_relative_folders(tmp_path):
    r = run_wrapper("sft", "--prompt", "hi", env={"ECG_MODELS_DIR": str(tmp_path)})
    assert r.returncode == 2 and "no finished sft model" in r.stderr
    fake_model_folder(tmp_path / "mine")
    # Relative to the caller's directory: accepted, so the run gets as far as reading the question.
    r = run_wrapper("mine", cwd=tmp_path, input="")
    assert r.returncode == 2 and "no question" in r.stderr, r.stderr


# ============================================================================= streamed sections (fast)
def split_stream(text: str, cuts: list[int], fmt: str) -> dict[str, str]:
    got = {"reasoning": "", "answer": ""}
    s = SectionSplitter(fmt, lambda sec, t: got.__setitem__(sec, got[sec] + t))
    prev = 0
    for c in sorted(set(min(c, len(text)) for c in cuts)) + [len(text)]:
        s.feed(text[prev:c])
        prev = c
    s.close()
    return got


PIECES = [THINK_OPEN, THINK_CLOSE, "<", "</", "think>", "<th", " ", "\n", "\t", "Yes,", "QT", "ms", "a b"]


@settings(max_examples=300, deadline=None)
@given(reasoning=st.text(), answer=st.text(), cuts=st.lists(st.integers(0, 400)))
def test_streamed_sections_equal_parse_on_well_formed_text(reasoning, answer, cuts):
    text = render(answer, "reasoning", reasoning)
    p = parse(text, "reasoning")
    got = split_stream(text, cuts, "reasoning")
    assert got["answer"] == p.answer
    assert got["reasoning"] == (p.reasoning or "")


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(PIECES) | st.text(max_size=3)), cuts=st.lists(st.integers(0, 100)),
       fmt=st.sampled_from(["plain", "reasoning"]))
def test_streamed_sections_equal_parse_when_the_text_starts_with_reasoning_or_has_none(parts, cuts, fmt):
    text = "".join(parts)
    if fmt == "reasoning" and THINK_OPEN in text and not text.lstrip().startswith(THINK_OPEN):
        return  # a preamble before <think>: parse drops it, a stream has shown it already
    p = parse(text, fmt)
    got = split_stream(text, cuts, fmt)
    assert got["answer"] == p.answer
    assert got["reasoning"] == (p.reasoning or "")


def test_printer_shows_reasoning_apart_from_the_answer():
    chunks = ["<thi", "nk>\nThe QT", " is long.\n</th", "ink>\nYes", ", it is prolonged.", "\n"]
    out = io.StringIO()
    printer = ReplyPrinter(out, "reasoning", True, Style(False))
    for c in chunks:
        printer.feed(c)
    printer.finish()
    assert out.getvalue() == "thinking> The QT is long.\nassistant> Yes, it is prolonged.\n"

    out = io.StringIO()
    printer = ReplyPrinter(out, "reasoning", False, Style(True))
    for c in chunks:
        printer.feed(c)
    printer.finish()
    assert ANSI.sub("", out.getvalue()) == "assistant> Yes, it is prolonged.\n"
    assert "QT" not in out.getvalue()


class CannedSession(ChatSession):
    """A session whose model replies with fixed text in chunks, to test what the modes do with replies."""

    def __init__(self, c: ChatConfig, reply: str, trained_format: str | None = None):
        super().__init__(c, None, None, trained_format=trained_format)
        self.reply_text, self.prompts = reply, []

    def prepare(self, user):
        self.prompts.append((self.system, list(self.history), user))
        return [1, 2, 3], 0

    def generate(self, ids, on_text=None):
        if on_text:
            for i in range(0, len(self.reply_text), 3):
                on_text(self.reply_text[i:i + 3])
        p = parse(self.reply_text, self.fmt)
        return Reply(self.reply_text, p.answer, p.reasoning, False)


def test_one_shot_prints_only_the_answer_on_stdout():
    s = CannedSession(cfg(answer_format="reasoning"), "<think>\nPeaked T waves.\n</think>\nHyperkalemia.")
    out, err = io.StringIO(), io.StringIO()
    one_shot(s, "What do peaked T waves indicate?", out, err)
    assert out.getvalue() == "Hyperkalemia.\n"
    assert NOTICE in err.getvalue() and "Peaked T waves." in err.getvalue()
    assert s.prompts[0][2] == "What do peaked T waves indicate?"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_one_shot_streams_to_a_terminal_with_the_answer_alone_on_stdout():
    s = CannedSession(cfg(answer_format="reasoning", color=False),
                      "<think>\nPeaked T waves.\n</think>\nHyperkalemia.")
    out, err = Terminal(), Terminal()
    one_shot(s, "What do peaked T waves indicate?", out, err)
    assert out.getvalue() == "Hyperkalemia.\n"
    assert err.getvalue() == NOTICE + "\nthinking> Peaked T waves.\n"
    s = CannedSession(cfg(answer_format="reasoning", color=False), "<think>\nnever finished")
    out, err = Terminal(), Terminal()
    one_shot(s, "q", out, err)
    assert out.getvalue() == "\n"


def test_reasoning_format_asks_for_the_think_section_in_the_system_prompt():
    plain, reasoning = CannedSession(cfg(), ""), CannedSession(cfg(answer_format="reasoning"), "")
    assert THINK_OPEN not in plain.system
    assert reasoning.system.startswith(plain.system) and THINK_OPEN in reasoning.system
    assert CannedSession(cfg(system=""), "").system == ""


def test_answer_format_auto_follows_the_model_folder(tmp_path):
    folder = fake_model_folder(tmp_path / "m")
    assert trained_format(str(folder)) is None
    (folder / "train_config.yaml").write_text("answer_format: reasoning\nlearning_rate: 0.0001\n")
    assert trained_format(str(folder)) == "reasoning"
    assert trained_format("meta-llama/Llama-3.2-3B-Instruct") is None
    auto = CannedSession(cfg(), "", trained_format="reasoning")
    assert auto.fmt == "reasoning" and THINK_OPEN in auto.system
    assert CannedSession(cfg(), "").fmt == "plain"
    assert CannedSession(cfg(answer_format="plain"), "", trained_format="reasoning").fmt == "plain"


def test_commands_change_the_session():
    s = CannedSession(cfg(), "Yes.")
    out, style = io.StringIO(), Style(False)
    s.history = [("q", "a")]
    assert handle_command(s, "/set temperature 0", out, style) and s.cfg.temperature == 0.0
    assert handle_command(s, "/set max-new-tokens 9", out, style) and s.cfg.max_new_tokens == 9
    with pytest.raises(UserError, match="expected a number >= 0"):
        handle_command(s, "/set temperature hot", out, style)
    with pytest.raises(UserError, match="not a setting"):
        handle_command(s, "/set model sft", out, style)
    with pytest.raises(UserError, match="unknown command"):
        handle_command(s, "/frobnicate", out, style)
    assert s.history == [("q", "a")]
    handle_command(s, "/system Be brief.", out, style)
    assert s.system == "Be brief." and s.history == []
    handle_command(s, "/system none", out, style)
    assert s.system == ""
    handle_command(s, "/system default", out, style)
    assert s.system.startswith("You are a careful cardiology")
    s.history = [("q", "a")]
    handle_command(s, "/reset", out, style)
    assert s.history == []
    assert handle_command(s, "/quit", out, style) is False


def test_chat_loop_keeps_the_answers_and_leaves_at_end_of_input():
    s = CannedSession(cfg(answer_format="reasoning"), "<think>\nhmm\n</think>\nSinus rhythm.")
    inp = io.StringIO("first question\nsecond \\\ncontinued\n//slash\n")
    out = io.StringIO()
    chat_loop(s, inp, out)
    text = out.getvalue()
    assert NOTICE in text and text.count("assistant> Sinus rhythm.") == 3 and "thinking> hmm" in text
    assert [p[2] for p in s.prompts] == ["first question", "second \ncontinued", "/slash"]
    # the reasoning stays out of the history
    assert s.prompts[2][1] == [("first question", "Sinus rhythm."), ("second \ncontinued", "Sinus rhythm.")]


# ============================================================================= with the tiny model (slow)
@pytest.fixture(scope="module")
def tiny_session_parts(tiny_llama):
    from utils.chat.session import load_for_chat

    return load_for_chat(str(tiny_llama), cfg(device="cpu"))


@pytest.mark.slow
def test_fit_history_drops_the_oldest_exchanges_first(tiny_session_parts):
    _, tok, _ = tiny_session_parts
    history = [(f"question number {i} " + "about the ECG " * 10, f"answer number {i} " + "sinus " * 10)
               for i in range(8)]
    full = len(render_prompt(tok, [{"role": "user", "content": "x"}]))
    ctx = full + 150
    ids, dropped = fit_history(tok, "System prompt.", history, "the new one", 40, ctx)
    assert 0 < dropped < len(history)
    assert len(ids) + 40 <= ctx
    text = tok.decode(ids)
    assert "System prompt." in text and "the new one" in text
    assert f"question number {dropped} " in text and f"question number {dropped - 1} " not in text
    # dropping one exchange fewer would not have fitted: the trimming keeps all it can
    ids_more, _ = fit_history(tok, "System prompt.", history[dropped - 1:], "the new one", 40, 10**6)
    assert len(ids_more) + 40 > ctx
    with pytest.raises(ContextFull, match="too long"):
        fit_history(tok, "System prompt.", history, "ECG " * 400, 40, ctx)


@pytest.mark.slow
def test_session_with_the_tiny_model_trims_reseeds_and_is_deterministic(tiny_session_parts, tiny_llama):
    model, tok, device = tiny_session_parts
    s = ChatSession(cfg(max_new_tokens=6, max_context=260, repetition_penalty=1.0), model, tok, device)
    out = io.StringIO()
    chat_loop(s, io.StringIO("".join(f"message {i} " + "about an ECG " * 20 + "\n" for i in range(4))), out)
    assert "(dropped the 1 oldest exchange(s) to fit the 260-token context)" in out.getvalue()
    assert out.getvalue().count("assistant> ") == 4
    assert 0 < len(s.history) < 4

    def answer(seed):
        s.history.clear()
        s.set("seed", str(seed))
        return s.generate(s.prepare("What is a normal PR interval?")[0]).text

    assert answer(7) == answer(7)
    s.set("temperature", "0")
    assert answer(1) == answer(2)


@pytest.mark.slow
def test_one_shot_from_the_command_line_and_from_stdin(tiny_llama):
    # Sampling with a fixed seed: as repeatable as greedy, and the random model's greedy reply is blank lines.
    flags = ["--model", str(tiny_llama), "--temperature", "1", "--seed", "3", "--max-new-tokens", "8"]
    r = run_chat_py(*flags, "--prompt", "What is a normal QRS duration?")
    assert r.returncode == 0, r.stderr
    assert NOTICE in r.stderr and NOTICE not in r.stdout
    assert r.stdout.endswith("\n") and r.stdout.strip()
    # the same question on standard input gets the same answer
    r2 = run_chat_py(*flags, input="What is a normal QRS duration?\n")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == r.stdout


@pytest.mark.slow
def test_interactive_with_piped_input(tiny_llama):
    script = "hello\n/settings\n/set temperature 0\n/set top_p 2\nhow are you?\n/reset\n/settings\n"
    r = run_chat_py("--model", str(tiny_llama), "--interactive", "--max-new-tokens", "5", input=script)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert NOTICE in out and not ANSI.search(out)  # no colours into a pipe
    assert out.count("you> ") == len(script.splitlines()) + 1  # one prompt per line, one more at end of input
    assert "assistant> " in out and "temperature = 0.0" in out and "expected a number in (0, 1]" in out
    first, last = out.index("history: "), out.rindex("history: ")
    assert out[first:].startswith("history: 1 exchange(s)") and out[last:].startswith("history: 0 exchange(s)")


def read_until(fd: int, pattern: str, buf: list[str], count: int = 1, timeout: float = 240) -> str:
    """Read the pty until ``pattern`` has shown up ``count`` times (ANSI codes and carriage returns removed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = ANSI.sub("", "".join(buf)).replace("\r", "")
        if text.count(pattern) >= count:
            return text
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                data = b""
            if not data:
                break
            buf.append(data.decode("utf-8", errors="replace"))
    raise AssertionError(f"{pattern!r} not seen; got: {ANSI.sub('', ''.join(buf))[-2000:]!r}")


@pytest.mark.slow
def test_interactive_in_a_terminal(tiny_llama):
    master, slave = os.openpty()
    env = {**os.environ, "ECG_LOG_LEVEL": "WARNING", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(chat_cmd("--model", str(tiny_llama), "--max-new-tokens", "5"), stdin=slave,
                            stdout=slave, stderr=slave, cwd=ROOT, env=env, start_new_session=True)
    os.close(slave)
    buf: list[str] = []
    try:
        read_until(master, "you> ", buf)
        os.write(master, b"What does a delta wave indicate?\n")
        text = read_until(master, "assistant> ", buf)
        assert NOTICE in text
        read_until(master, "you> ", buf, count=2)  # the prompt after the reply
        os.write(master, b"/settings\n")
        read_until(master, "history: 1 exchange(s)", buf)
        # Ctrl-D only once the prompt is back: sent earlier, while the terminal is still in line mode, the
        # end-of-file can be lost when the prompt switches it (seen once in CI on a loaded machine)
        read_until(master, "you> ", buf, count=3)
        os.write(master, b"\x04")  # Ctrl-D at the prompt leaves
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert "\x1b[" in "".join(buf)  # a terminal gets the colours
