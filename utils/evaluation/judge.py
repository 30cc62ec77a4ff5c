"""The optional LLM judge: a 1-5 grade from any OpenAI-compatible endpoint or a local model.

The endpoint client is deliberately strict: https only (plain http only to this machine), no redirect
followed, bounded retries with backoff on 429/5xx and broken connections, and a reply that is not a chat
completion reported in one line. A completion whose text holds no unambiguous grade is a missing score,
counted, never a digit picked out of the prose.
"""

from __future__ import annotations

import email.utils
import gc
import http.client
import json
import logging
import math
import random
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from utils.core.config import UserError
from utils.evaluation.answers import _sha, model_fingerprint
from utils.evaluation.config import JUDGE_RUBRIC, JUDGE_URL_EXPECTED, EvalConfig, judge_url_ok
from utils.models.loading import load_for_inference

log = logging.getLogger(__name__)

# ============================================================================= the grade in a reply
# Three forms, tried in order; the first form present decides alone, so "Score: 7" is no grade even if a
# bare "4" follows. Within a form every grade found must agree ("Score: 3 ... Score: 4" is none).
# "Score: 4", "**Score:** 4", "score=3", "score 4/5", "a score of 2", "Score (1-5): 4": the label the rubric
# asks for.
_LABELLED = re.compile(r"\bscore\b(?:\s*\([^()\n]{0,12}\))?[\s*_:=]{0,6}(?:of\s+|is\s+)?"
                       r"(\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*(\d+))?", re.IGNORECASE)
# "4/5", "4 out of 5": a grade on the rubric's scale, not part of a date or a longer fraction.
_FRACTION = re.compile(r"(?<![\w./])(\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*5(?![\w/]|\.\d)", re.IGNORECASE)
# "4", "**4**", "4." alone on its line (or as the whole reply). Horizontal space only: with \s the pattern
# spans newlines and rescans a run of blank lines from every line start (quadratic; minutes on 100k newlines).
_BARE = re.compile(r"^[ \t*_#>]*(\d+(?:\.\d+)?)[ \t*_]*\.?[ \t*_\r]*$", re.MULTILINE)


def _grade(number: str, out_of: str | None = None) -> int | None:
    """The integer 1-5 a match stands for; None for 7, 4.5 or 3/10."""
    if out_of is not None and out_of != "5":
        return None
    return int(number) if number in ("1", "2", "3", "4", "5") else None


def parse_judge_score(text: str) -> float | None:
    """The 1-5 grade in a judge reply, mapped to [0, 1]; None when the reply holds no unambiguous one
    (never a number that merely appears in the reasoning).

    >>> parse_judge_score("Score: 4. Correct but omits the rate."), parse_judge_score("score 3/5 - vague")
    (0.75, 0.5)
    >>> parse_judge_score("4/5"), parse_judge_score("Reason: right axis.\\n**5**"), parse_judge_score(" 2 ")
    (0.75, 1.0, 0.25)
    >>> [parse_judge_score(t) for t in ["I'd give it between 3 and 4", "The answer mentions 5 leads", "", "n/a"]]
    [None, None, None, None]
    >>> parse_judge_score("Score: 7"), parse_judge_score("Score: 4.5"), parse_judge_score("Score: 3, then score: 4")
    (None, None, None)
    """
    text = text or ""
    for form in (_LABELLED, _FRACTION, _BARE):
        grades = {_grade(*m.groups()) for m in form.finditer(text)}
        if grades:
            return (grades.pop() - 1) / 4 if len(grades) == 1 and None not in grades else None
    return None


def judge_messages(rubric: str, row: dict, answer: str) -> list[dict]:
    user = (f"QUESTION:\n{row.get('question') or ''}\n\nREFERENCE ANSWER:\n{row.get('reference') or ''}\n\n"
            f"ANSWER TO GRADE:\n{answer or '(empty)'}\n\nGrade the answer. Reply \"Score: N\" (N from 1 to 5).")
    return [{"role": "system", "content": rubric}, {"role": "user", "content": user}]


# ============================================================================= the endpoint
MAX_ATTEMPTS = 4  # one request and up to three retries
BACKOFF_BASE = 1.0  # seconds before the first retry, doubled for each next one (tests set it near 0)
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 60.0  # a server asking for a longer pause gets this one: a run must not hang on its word
MAX_REPLY_BYTES = 4 << 20  # a chat completion of 48 tokens is a few kB; anything near this is not one


class MalformedReply(ValueError):
    """A reply body that is not an OpenAI chat completion."""


class _Retryable(Exception):
    """A failure worth another try (429, 5xx, a broken or timed-out connection), with the server's pause."""

    def __init__(self, problem: str, retry_after: float | None = None):
        super().__init__(problem)
        self.problem, self.retry_after = problem, retry_after


def chat_url(endpoint: str) -> str:
    url = endpoint.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def check_endpoint(url: str) -> None:
    """Refuse, before any traffic, a URL that would carry the API key and the answers in clear text."""
    if not url or not judge_url_ok(url):
        raise UserError(f"judge_endpoint {url or '(empty)'}: expected {JUDGE_URL_EXPECTED}, since each request "
                        "carries the API key and the answers")


def _origin(url: str) -> tuple[str, str, int | None]:
    u = urllib.parse.urlsplit(url)
    try:
        port = u.port
    except ValueError:
        port = -1
    return u.scheme.lower(), (u.hostname or "").lower(), port or {"http": 80, "https": 443}.get(u.scheme.lower())


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect, naming where it points.

    Refused rather than followed without the Authorization header: a redirect to another origin would
    still hand the questions, references and answers to a host nobody configured (and, unauthenticated, it
    would fail or, worse, grade). Same-origin redirects are refused too: urllib turns a redirected POST into
    a GET without its body, which no chat endpoint answers, so following them only hides the real URL.
    """

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        fp.close()
        why = ("another origin would get the API key and the answers" if _origin(newurl) != _origin(req.full_url)
               else "a redirected POST loses its body")
        raise UserError(f"judge_endpoint {req.full_url}: redirected (HTTP {code}) to {newurl}; not followed, as "
                        f"{why}: set judge_endpoint to that URL if you trust it")


def _opener(url: str) -> urllib.request.OpenerDirector:
    handlers: list = [_NoRedirects]
    if urllib.parse.urlsplit(url).scheme == "http":
        # plain http is allowed only because it stays on this machine: an http_proxy from the environment
        # would carry the key across the network in clear text after all
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def _one_line(text: str | bytes, limit: int = 120) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _retry_after(value: str | None) -> float | None:
    """Seconds asked for by a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP) if math.isfinite(seconds) else None


def backoff(attempt: int) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): exponential, capped, with jitter so that the concurrent
    requests that failed together do not come back together."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _http_error(e: urllib.error.HTTPError, url: str) -> Exception:
    """An HTTP error status as a retryable failure (429, 5xx) or a one-line UserError (any other)."""
    try:
        body = e.read(2048)
    except (OSError, http.client.HTTPException):
        body = b""
    finally:
        e.close()
    try:  # an OpenAI-style {"error": {"message": ...}} says more than the status line
        detail = _one_line(str(json.loads(body)["error"]["message"]))
    except (ValueError, KeyError, TypeError):
        detail = _one_line(body)
    problem = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
    if e.code == 429 or e.code >= 500:
        return _Retryable(problem, _retry_after(e.headers.get("Retry-After") if e.headers else None))
    return UserError(f"judge_endpoint {url}: {problem}")


def _post(opener: urllib.request.OpenerDirector, req: urllib.request.Request, timeout: float) -> bytes:
    """One request's reply body; raises _Retryable or a one-line UserError."""
    url = req.full_url
    try:
        with opener.open(req, timeout=timeout) as resp:
            if resp.length is not None and resp.length > MAX_REPLY_BYTES:
                raise UserError(f"judge_endpoint {url}: a {resp.length}-byte reply is not a chat completion")
            # read() checks the body against Content-Length (a cut one raises IncompleteRead); without one,
            # the read is bounded instead
            body = resp.read() if resp.length is not None else resp.read(MAX_REPLY_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise _http_error(e, url) from None
    except TimeoutError:
        raise _Retryable(f"no reply within {timeout:g} s") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLCertVerificationError):  # retrying will not make it trusted
            raise UserError(f"judge_endpoint {url}: TLS certificate not trusted: {_one_line(str(e.reason))}") from None
        if isinstance(e.reason, TimeoutError):
            raise _Retryable(f"no connection within {timeout:g} s") from None
        raise _Retryable(f"cannot connect: {_one_line(str(e.reason))}") from None
    except http.client.InvalidURL as e:
        raise UserError(f"judge_endpoint {url}: {_one_line(str(e))}") from None
    except (http.client.HTTPException, OSError) as e:  # IncompleteRead, RemoteDisconnected, reset, TLS
        raise _Retryable(f"connection broken mid-reply: {_one_line(repr(e))}") from None
    if len(body) > MAX_REPLY_BYTES:
        raise UserError(f"judge_endpoint {url}: a reply over {MAX_REPLY_BYTES} bytes is not a chat completion")
    return body


def completion_text(body: bytes) -> str:
    """The reply text of an OpenAI chat-completion body ('' when it has none); MalformedReply, one line, when
    the body is not a chat completion at all (an HTML error page, an error object, a cut or odd JSON)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MalformedReply(f"the reply is not JSON: {_one_line(body) or '(empty)'}") from None
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise MalformedReply("the reply is not an OpenAI chat completion (no choices[0].message.content): "
                         f"{_one_line(body)}") from None
    if content is None:  # a completion without text (a refusal, a reasoning model cut short): no grade
        return ""
    if not isinstance(content, str):
        raise MalformedReply(f"choices[0].message.content is {type(content).__name__}, expected text")
    return content


def openai_chat(endpoint: str, model: str, messages: list[dict], max_tokens: int, api_key: str | None,
                timeout: float, *, attempts: int | None = None,
                sleep: Callable[[float], None] = time.sleep) -> str:
    """One reply from an OpenAI-compatible ``/chat/completions`` endpoint (temperature 0).

    ``timeout`` bounds each connect and read; 429, 5xx and broken connections are retried up to
    ``attempts`` (default MAX_ATTEMPTS) times in all, after the server's Retry-After or an exponential
    backoff. Any failure left is a one-line UserError naming the endpoint.
    """
    url = chat_url(endpoint)
    check_endpoint(url)
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    opener = _opener(url)
    attempts, attempt = attempts or MAX_ATTEMPTS, 1
    while True:
        try:
            return completion_text(_post(opener, req, timeout))
        except MalformedReply as e:
            raise UserError(f"judge_endpoint {url}: {e}") from None
        except _Retryable as e:
            if attempt >= attempts:
                raise UserError(f"judge_endpoint {url}: {e.problem} (gave up after {attempts} attempts)") from None
            pause = e.retry_after if e.retry_after is not None else backoff(attempt)
            log.warning("judge_endpoint %s: %s; retry %d of %d in %.1f s", url, e.problem, attempt, attempts - 1,
                        pause)
            sleep(pause)
            attempt += 1


# ============================================================================= the judge
class Judge:
    """Rubric scores of answers by a judge model, cached like the answers (keyed by judge, rubric,
    question, reference and answer).

    ``unparsed`` counts the replies, over every :meth:`score` call, that held no 1-5 grade (their score is
    None, left out of the means).
    """

    def __init__(self, cfg: EvalConfig):
        import os

        self.cfg = cfg
        if cfg.judge == "openai":  # refused here, before any answer is generated, as well as per request
            check_endpoint(chat_url(cfg.judge_endpoint))
        if cfg.judge_rubric:
            p = Path(cfg.judge_rubric)
            if not p.is_file():
                raise UserError(f"judge_rubric: {p} not found")
            self.rubric = p.read_text(encoding="utf-8").strip()
            if not self.rubric:
                raise UserError(f"judge_rubric: {p} is empty")
        else:
            self.rubric = JUDGE_RUBRIC
        self.api_key = os.environ.get(cfg.judge_api_key_env) if cfg.judge_api_key_env else None
        if cfg.judge == "local":
            from utils.models.resolve import resolve_model

            path = resolve_model(cfg.judge_model, cfg.base_model)
            ident = model_fingerprint(path)
        else:
            path, ident = cfg.judge_model, f"{cfg.judge_endpoint}|{cfg.judge_model}"
        self.path = path
        self.name = cfg.judge_model
        self.tag = _sha({"judge": ident, "kind": cfg.judge, "rubric": self.rubric,
                         "max_new_tokens": cfg.judge_max_new_tokens})[:12]
        self.file = Path(cfg.cache_dir) / "judge" / f"judge-{self.tag}.jsonl"
        self.entries: dict[str, str] = {}
        if self.file.is_file():
            for line in self.file.read_text(encoding="utf-8").splitlines():
                try:
                    e = json.loads(line)
                    self.entries[e["key"]] = e["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        self._model = None
        self.unparsed = 0

    def _ask_endpoint(self, conversations: list[list[dict]]) -> tuple[list[str | None], UserError | None]:
        """The endpoint's replies (None where none came) and the first failure; after one request has
        given up, the queued ones are not sent, so a dead endpoint costs one request's retries, not all."""
        cfg = self.cfg
        failures: list[UserError] = []

        def ask(m):
            if failures:
                return None
            try:
                return openai_chat(cfg.judge_endpoint, cfg.judge_model, m, cfg.judge_max_new_tokens, self.api_key,
                                   cfg.judge_timeout)
            except UserError as e:
                failures.append(e)
                return None

        with ThreadPoolExecutor(max_workers=cfg.judge_concurrency) as pool:
            replies = list(pool.map(ask, conversations))
        return replies, (failures[0] if failures else None)

    def _replies(self, conversations: list[list[dict]]) -> tuple[list[str | None], UserError | None]:
        cfg = self.cfg
        if cfg.judge == "openai":
            return self._ask_endpoint(conversations)
        from utils.models import generation

        if self._model is None:
            self._model = load_for_inference(self.path, cfg.base_model, dtype=cfg.dtype)
        model, tok = self._model
        return generation.generate(model, tok, conversations, max_new_tokens=cfg.judge_max_new_tokens,
                                   batch_size=cfg.batch_size), None

    def _remember(self, pairs: list[tuple[str, str]]) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with self.file.open("a", encoding="utf-8") as f:
            for key, reply in pairs:
                f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")
                self.entries[key] = reply

    def score(self, rows: list[dict], answers: list[str]) -> tuple[list[float | None], list[str]]:
        """Each answer's grade in [0, 1] (None: the reply held none) and the judge's replies. The replies
        that came are cached before a failure is raised, so a rerun asks only for the rest."""
        convs = [judge_messages(self.rubric, r, a) for r, a in zip(rows, answers)]
        keys = [_sha([self.tag, c])[:24] for c in convs]
        todo = [i for i, k in enumerate(keys) if k not in self.entries]
        chunk = max(self.cfg.batch_size, self.cfg.judge_concurrency) * 4
        for start in range(0, len(todo), chunk):
            idx = todo[start:start + chunk]
            replies, failure = self._replies([convs[i] for i in idx])
            self._remember([(keys[i], rep) for i, rep in zip(idx, replies) if rep is not None])
            if failure is not None:
                raise failure
        replies = [self.entries[k] for k in keys]
        scores = [parse_judge_score(r) for r in replies]
        missing = sum(s is None for s in scores)
        if missing:
            self.unparsed += missing
            log.warning("judge %s: %d of %d replies hold no 1-5 score (counted as missing), e.g. %r", self.name,
                        missing, len(replies), _one_line(next(r for r, s in zip(replies, scores) if s is None), 80))
        return scores, replies

    def close(self) -> None:
        self._model = None
        gc.collect()
