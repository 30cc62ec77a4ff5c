"""The LLM judge's endpoint client against a local fake OpenAI-compatible server that misbehaves (429, 5xx,
4xx, redirects, bodies that are no chat completion, cut or slow replies), its URL policy (https, or http to
this machine only) and its strict score parser."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest

from utils.core.config import ConfigError, UserError, load_config
from utils.evaluation import judge
from utils.evaluation.config import EvalConfig, judge_url_ok
from utils.evaluation.judge import Judge, openai_chat, parse_judge_score

MESSAGES = [{"role": "user", "content": "grade this"}]


def completion(text) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


class FakeEndpoint:
    """An OpenAI-compatible endpoint on 127.0.0.1 (port 0) that plays ``script``: one step per request, the
    last one repeated. A step is ``(status, body, headers)`` (a dict body is sent as JSON) or a function of
    the request's JSON body returning one; ``"slow"`` answers only after the test is over, ``"cut"`` sends
    part of a body and hangs up. Every request is recorded: method, path, headers, body."""

    def __init__(self, script):
        self.script, self.requests, self.released = list(script), [], threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.handle(self)

            do_GET = do_POST  # a redirected POST arrives as a GET: record it as well

            def log_message(self, *a):
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # the client hung up on a slow reply: expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        body = json.loads(raw) if raw else None
        self.requests.append({"method": h.command, "path": h.path, "headers": dict(h.headers), "body": body})
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        if callable(step):
            step = step(body)
        if step == "slow":
            self.released.wait(5)  # bounded: the test releases it when it ends
            step = (200, completion("Score: 5"), {})
        if step == "cut":
            h.send_response(200)
            h.send_header("Content-Length", "500")
            h.end_headers()
            h.wfile.write(b'{"choices": [{"mess')
            return
        status, payload, headers = step
        data = json.dumps(payload).encode() if isinstance(payload, (dict, list)) else payload
        h.send_response(status)
        for k, v in {"Content-Type": "application/json", **headers}.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(2)


@pytest.fixture
def endpoint():
    made = []

    def make(*script):
        made.append(FakeEndpoint(script))
        return made[-1]

    yield make
    for e in made:
        e.close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(judge, "BACKOFF_BASE", 0.001)


class Sleeps(list):
    """An injected sleep that records the pauses instead of taking them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def ask(url: str, sleep=None, **kw) -> str:
    kw.setdefault("timeout", 5)
    return openai_chat(url, "grader", MESSAGES, 8, "sk-secret", sleep=Sleeps() if sleep is None else sleep, **kw)


def one_line_error(url: str, **kw) -> str:
    with pytest.raises(UserError) as e:
        ask(url, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("judge_endpoint "), msg
    return msg


OK = (200, completion("Score: 4. Mostly right."), {})


# ============================================================================= retries
def test_429_twice_then_ok_waits_as_told(endpoint):
    server = endpoint((429, {"error": {"message": "slow down"}}, {"Retry-After": "2"}),
                      (429, b"", {"Retry-After": "1.5"}), OK)
    sleeps = Sleeps()
    assert ask(server.url, sleep=sleeps) == "Score: 4. Mostly right."
    assert sleeps == [2.0, 1.5] and len(server.requests) == 3


def test_503_then_ok_backs_off_with_jitter(endpoint, monkeypatch):
    monkeypatch.setattr(judge, "BACKOFF_BASE", 8.0)  # recorded, not slept
    server = endpoint((503, b"<html><body>Service Unavailable</body></html>", {"Content-Type": "text/html"}), OK)
    sleeps = Sleeps()
    assert ask(server.url, sleep=sleeps) == "Score: 4. Mostly right."
    assert len(sleeps) == 1 and 4.0 <= sleeps[0] <= 8.0 and len(server.requests) == 2


def test_500_forever_gives_up_after_the_attempts(endpoint, monkeypatch):
    monkeypatch.setattr(judge, "BACKOFF_BASE", 8.0)
    server = endpoint((500, {"error": {"message": "boom"}}, {}))
    sleeps = Sleeps()
    msg = one_line_error(server.url, sleep=sleeps, attempts=3)
    assert "HTTP 500" in msg and "boom" in msg and "gave up after 3 attempts" in msg
    assert len(server.requests) == 3 and len(sleeps) == 2
    assert 4.0 <= sleeps[0] <= 8.0 and 8.0 <= sleeps[1] <= 16.0  # doubled, jittered


def test_retry_after_is_capped_and_read_as_a_date():
    assert judge._retry_after("3") == 3.0 and judge._retry_after("100000") == judge.RETRY_AFTER_CAP
    assert judge._retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: retry now
    assert judge._retry_after("soon") is None and judge._retry_after("nan") is None and judge._retry_after(None) is None


def test_400_is_not_retried(endpoint):
    server = endpoint((400, {"error": {"message": "model 'grader' does not exist"}}, {}))
    sleeps = Sleeps()
    msg = one_line_error(server.url, sleep=sleeps)
    assert "HTTP 400" in msg and "model 'grader' does not exist" in msg
    assert len(server.requests) == 1 and sleeps == []


def test_connection_refused_is_retried_then_one_line():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = Sleeps()
    msg = one_line_error(f"http://127.0.0.1:{port}/v1", sleep=sleeps, attempts=2)
    assert "cannot connect" in msg and "gave up after 2 attempts" in msg and len(sleeps) == 1


def test_slow_reply_times_out_and_is_retried(endpoint):
    server = endpoint("slow")
    started = time.monotonic()
    msg = one_line_error(server.url, timeout=0.2, attempts=2)
    assert "no reply within 0.2 s" in msg and "gave up after 2 attempts" in msg
    assert len(server.requests) == 2 and time.monotonic() - started < 2


def test_cut_body_is_retried_then_one_line(endpoint):
    server = endpoint("cut")
    msg = one_line_error(server.url, attempts=2)
    assert "connection broken mid-reply" in msg and len(server.requests) == 2


def test_cut_body_then_ok(endpoint):
    server = endpoint("cut", OK)
    assert ask(server.url) == "Score: 4. Mostly right." and len(server.requests) == 2


# ============================================================================= redirects
@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_to_another_origin_is_refused_and_the_key_stays_home(endpoint, code):
    elsewhere = endpoint(OK)
    server = endpoint((code, b"", {"Location": f"{elsewhere.url}/chat/completions"}))
    msg = one_line_error(server.url)
    assert f"redirected (HTTP {code}) to {elsewhere.url}/chat/completions" in msg and "another origin" in msg
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-secret"
    assert elsewhere.requests == []  # neither the key nor the answers reached the other port


def test_same_origin_redirect_is_refused_naming_the_url(endpoint):
    server = endpoint((302, b"", {"Location": "/v2/chat/completions"}))
    msg = one_line_error(server.url)
    assert f"to http://127.0.0.1:{server.port}/v2/chat/completions" in msg and len(server.requests) == 1


# ============================================================================= malformed replies
@pytest.mark.parametrize("payload, says", [
    (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "not JSON: <html><body><h1>502 Bad Gateway"),
    (b"", "not JSON: (empty)"),
    (b"\xff\xfe garbage", "not JSON"),
    ({}, "no choices[0].message.content"),
    ({"error": {"message": "quota exceeded"}}, "quota exceeded"),
    ({"choices": []}, "no choices[0].message.content"),
    ({"choices": "Score: 4"}, "no choices[0].message.content"),
    ({"choices": [{"message": {}}]}, "no choices[0].message.content"),
    ({"choices": [{"text": "Score: 4"}]}, "no choices[0].message.content"),
    ([1, 2], "no choices[0].message.content"),
    (completion(4), "content is int, expected text"),
    (completion(["Score: 4"]), "content is list, expected text"),
])
def test_a_body_that_is_no_chat_completion_is_one_line_and_not_retried(endpoint, payload, says):
    server = endpoint((200, payload, {}))
    msg = one_line_error(server.url)
    assert says in msg and len(server.requests) == 1


def test_a_completion_without_text_is_an_empty_reply(endpoint):
    server = endpoint((200, completion(None), {}))
    assert ask(server.url) == "" and parse_judge_score("") is None


# ============================================================================= plain http
@pytest.mark.parametrize("url", ["https://api.openai.com/v1", "https://10.0.0.5:8443/v1", "http://localhost:8000/v1",
                                 "http://LOCALHOST/v1", "http://127.0.0.1:8000/v1", "http://127.4.5.6/v1",
                                 "http://[::1]:8000/v1", ""])
def test_urls_accepted(url):
    assert judge_url_ok(url)


@pytest.mark.parametrize("url", ["http://example.com/v1", "http://10.0.0.5:8000/v1", "http://[::2]/v1",
                                 "http://localhost.example.com/v1", "http://127.0.0.1.nip.io/v1",
                                 "http://127.0.0.1@example.com/v1", "ftp://localhost/v1", "localhost:8000",
                                 "https:///v1", "https://host:port/v1"])
def test_urls_refused(url):
    assert not judge_url_ok(url)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network traffic attempted")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_plain_http_to_another_host_is_refused_before_any_traffic(no_network):
    msg = one_line_error("http://example.com/v1")
    assert msg.startswith("judge_endpoint http://example.com/v1/chat/completions: expected an https:// URL")


def test_plain_http_to_another_host_is_refused_at_config_load(tmp_path, no_network):
    with pytest.raises(ConfigError) as e:
        load_config(EvalConfig, None, {"judge": "openai", "judge_model": "m",
                                       "judge_endpoint": "http://example.com/v1"})
    assert "'http://example.com/v1': expected an https:// URL" in str(e.value) and "\n" not in str(e.value)
    # a config built without load_config is refused when the judge is made, before any answer is generated
    cfg = EvalConfig(judge="openai", judge_model="m", judge_endpoint="http://example.com/v1", reward_model=None,
                     cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="expected an https:// URL"):
        Judge(cfg)


# ============================================================================= the grade
@pytest.mark.parametrize("text, grade", [
    ("Score: 4", 0.75), ("Score: 4. Correct but omits the rate.", 0.75), ("score 4/5", 0.75), ("4/5", 0.75),
    ("**4**", 0.75), ("Reasoning: the axis is right.\n**4**\n", 0.75), ("4", 0.75), (" 5.\n", 1.0),
    ("**Score:** 2 - misses the block", 0.25), ("SCORE=1", 0.0), ("I give it 3 out of 5.", 0.5),
    ("score=3 because of 10 ms error", 0.5), ("Score: 5 - complete. Score: 5", 1.0), ("Score (1-5): 4", 0.75),
    ("Score: **3**", 0.5), ("The final score is 2/5.", 0.25),
])
def test_scores_accepted(text, grade):
    assert parse_judge_score(text) == grade


@pytest.mark.parametrize("text", [
    "I'd give it between 3 and 4", "The answer mentions 5 leads", "", None, "n/a", "Score: 7", "Score: 4.5",
    "score 4/10", "Score: 3, then on reflection score: 4", "A score of N from 1 to 5 is unclear.",
    "I would give it a 2.", "Out of 5, I give it 4", "3/5/2024", "2/5 or 4/5", "12",
])
def test_scores_refused(text):
    assert parse_judge_score(text) is None


# ============================================================================= the Judge
def judge_cfg(tmp_path, url, **kw) -> EvalConfig:
    return load_config(EvalConfig, None, {"reward_model": None, "judge": "openai", "judge_model": "grader",
                                          "judge_endpoint": url, "judge_api_key_env": "TEST_JUDGE_KEY",
                                          "cache_dir": str(tmp_path / "cache"), "judge_timeout": 5, **kw})


ROWS = [{"question": f"q{i}", "reference": f"r{i}"} for i in range(3)]


def test_replies_without_a_score_are_counted_as_missing(tmp_path, endpoint, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    grades = {"a0": "Score: 4. Right.", "a1": "I'd give it between 3 and 4", "a2": "The answer mentions 5 leads"}
    server = endpoint(lambda body: (200, completion(next(g for a, g in grades.items()
                                                         if a in body["messages"][1]["content"])), {}))
    j = Judge(judge_cfg(tmp_path, server.url))
    scores, replies = j.score(ROWS, ["a0", "a1", "a2"])
    assert scores == [0.75, None, None] and replies[1] == "I'd give it between 3 and 4" and j.unparsed == 2
    assert all(r["headers"]["Authorization"] == "Bearer sk-test" for r in server.requests)
    assert j.score(ROWS, ["a0", "a1", "a2"])[0] == scores and len(server.requests) == 3  # cached


def test_replies_before_a_failure_are_kept_and_the_rest_not_sent(tmp_path, endpoint):
    server = endpoint(OK, (400, {"error": {"message": "context too long"}}, {}))
    cfg = judge_cfg(tmp_path, server.url, judge_concurrency=1)
    with pytest.raises(UserError, match="HTTP 400 Bad Request: context too long"):
        Judge(cfg).score(ROWS, ["a0", "a1", "a2"])
    assert len(server.requests) == 2  # the third was not sent once the second had failed
    server.script = [OK]
    again = Judge(cfg)
    assert again.score(ROWS, ["a0", "a1", "a2"])[0] == [0.75] * 3 and len(server.requests) == 4  # only the two left
