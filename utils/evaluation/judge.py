"""The optional LLM judge: a 1-5 grade from any OpenAI-compatible endpoint or a local model.
"""

from __future__ import annotations

import gc
import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from utils.core.config import UserError
from utils.evaluation.answers import _sha, model_fingerprint
from utils.evaluation.config import JUDGE_RUBRIC, EvalConfig
from utils.models.loading import load_for_inference

# ============================================================================= judge
_SCORE = re.compile(r"score\W{0,3}([1-5])\b", re.IGNORECASE)


_DIGIT = re.compile(r"(?<![\d.])([1-5])(?!\d|\.\d)")


# the scale itself ("from 1 to 5", "out of 5") is not a grade
_SCALE = re.compile(r"\b1\s*(?:-|–|to|and)\s*5\b|(?:out of|/)\s*5\b", re.IGNORECASE)


def parse_judge_score(text: str) -> float | None:
    """The 1-5 grade in a judge reply, mapped to [0, 1]; None when the reply holds none.

    >>> parse_judge_score("Score: 4. Correct but omits the rate."), parse_judge_score("3/5"), parse_judge_score("n/a")
    (0.75, 0.5, None)
    """
    text = text or ""
    m = _SCORE.search(text) or _DIGIT.search(_SCALE.sub(" ", text))
    return (int(m.group(1)) - 1) / 4 if m else None


def judge_messages(rubric: str, row: dict, answer: str) -> list[dict]:
    user = (f"QUESTION:\n{row.get('question') or ''}\n\nREFERENCE ANSWER:\n{row.get('reference') or ''}\n\n"
            f"ANSWER TO GRADE:\n{answer or '(empty)'}\n\nGrade the answer. Reply \"Score: N\" (N from 1 to 5).")
    return [{"role": "system", "content": rubric}, {"role": "user", "content": user}]


def openai_chat(endpoint: str, model: str, messages: list[dict], max_tokens: int, api_key: str | None,
                timeout: float) -> str:
    """One reply from an OpenAI-compatible ``/chat/completions`` endpoint (temperature 0)."""
    url = endpoint.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions"
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read().decode("utf-8"))
        return str(data["choices"][0]["message"]["content"] or "")
    except urllib.error.HTTPError as e:
        raise UserError(f"judge_endpoint {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise UserError(f"judge_endpoint {url}: {getattr(e, 'reason', e)}") from None
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise UserError(f"judge_endpoint {url}: the reply is not an OpenAI chat completion") from None


class Judge:
    """Rubric scores of answers by a judge model, cached like the answers (keyed by judge, rubric,
    question, reference and answer)."""

    def __init__(self, cfg: EvalConfig):
        import os

        self.cfg = cfg
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

    def _replies(self, conversations: list[list[dict]]) -> list[str]:
        cfg = self.cfg
        if cfg.judge == "openai":
            def ask(m):
                return openai_chat(cfg.judge_endpoint, cfg.judge_model, m, cfg.judge_max_new_tokens, self.api_key,
                                   cfg.judge_timeout)

            with ThreadPoolExecutor(max_workers=cfg.judge_concurrency) as pool:
                return list(pool.map(ask, conversations))
        from utils.models import generation

        if self._model is None:
            self._model = load_for_inference(self.path, cfg.base_model, dtype=cfg.dtype)
        model, tok = self._model
        return generation.generate(model, tok, conversations, max_new_tokens=cfg.judge_max_new_tokens,
                                   batch_size=cfg.batch_size)

    def score(self, rows: list[dict], answers: list[str]) -> tuple[list[float | None], list[str]]:
        convs = [judge_messages(self.rubric, r, a) for r, a in zip(rows, answers)]
        keys = [_sha([self.tag, c])[:24] for c in convs]
        todo = [i for i, k in enumerate(keys) if k not in self.entries]
        chunk = max(self.cfg.batch_size, self.cfg.judge_concurrency) * 4
        for start in range(0, len(todo), chunk):
            idx = todo[start:start + chunk]
            replies = self._replies([convs[i] for i in idx])
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with self.file.open("a", encoding="utf-8") as f:
                for i, rep in zip(idx, replies):
                    f.write(json.dumps({"key": keys[i], "reply": rep}, ensure_ascii=False) + "\n")
                    self.entries[keys[i]] = rep
        replies = [self.entries[k] for k in keys]
        return [parse_judge_score(r) for r in replies], replies

    def close(self) -> None:
        self._model = None
        gc.collect()
