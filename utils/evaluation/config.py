"""Evaluation's config and its items: the test split (optionally sampled per task) or a user's own file.
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from utils.core.config import UserError, fld, non_negative, positive
from utils.models.decode import DECODE_DTYPES, resolve_decode_dtype
from utils.rewards.mix import RewardMix

TEST_FILE = "data/processed/eval/test.jsonl"


USER_TASK = "user"  # task of --input lines that name none


# ============================================================================= config
JUDGE_RUBRIC = """You grade answers to cardiology and ECG questions against a reference answer written by an expert.
Score the ANSWER from 1 to 5:
5 = correct and complete: agrees with the reference on every clinical point;
4 = correct, with minor omissions or imprecision;
3 = partly correct, or vague;
2 = mostly incorrect, or misses the main point;
1 = wrong, unsafe, off-topic or empty.
Reply with one line: "Score: N" and a one-sentence reason."""


def loopback_host(host: str | None) -> bool:
    """Whether ``host`` is this machine: localhost, 127.0.0.0/8 or ::1 (no name lookup, so a DNS name that
    resolves to 127.0.0.1 does not count: the check must not depend on a resolver an attacker may control)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def judge_url_ok(x: str) -> bool:
    """https:// to any host, plain http:// only to this machine: the request carries the API key and the
    answers, which must not cross a network in clear text."""
    if x == "":
        return True
    try:
        u = urlsplit(x)
        host = u.hostname
        u.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        return False
    return bool(host) and (u.scheme == "https" or (u.scheme == "http" and loopback_host(host)))


JUDGE_URL_EXPECTED = "an https:// URL (plain http:// only to localhost, 127.0.0.0/8 or ::1)"


@dataclass
class EvalConfig(RewardMix):
    """Evaluation settings; the reward fields (``rewards``, ``reward_model`` ...) are GRPO's, so the
    'reward (mix)' column is the reward GRPO maximised when both configs hold the same mix."""

    base_model: str = fld("smollm2-135m-instruct", "The recipe's base model: what the alias 'base' means.")
    models: list[str] = fld(help="Models to compare, in order: base, sft, rlhf, a folder (a full model or an adapter "
                            "on its base) or a Hub id. Paired comparisons are against the earlier models.",
                            default_factory=lambda: ["base", "sft", "rlhf"])
    test_file: str = fld(TEST_FILE, "The test split written by prepare_data.py.")
    input: str = fld("", "Your own JSONL file to evaluate on instead of test_file: one object per line with "
                     "'question' and 'answer' (the reference), optionally 'task' and 'id'.")
    system_prompt_file: str = fld("data/system_prompt.txt", "System prompt put before --input questions (the test "
                                  "split carries its own).")
    tasks: list[str] = fld(help="Only these tasks (empty: every task in the file).", default_factory=list)
    per_task: int = fld(0, "Questions sampled per task (seeded, the same for every model); 0: all.",
                        check=(non_negative, "an integer >= 0"))
    limit: int = fld(0, "At most this many questions in all, taken evenly across tasks; 0: no limit.",
                     check=(non_negative, "an integer >= 0"))
    seed: int = fld(1234, "Seed of the sample, of sampled generation and of the bootstrap.")
    # ---- generation
    max_new_tokens: int = fld(160, "Longest answer in tokens; longer ones are cut (and lose length score).",
                              check=(positive, "an integer > 0"))
    batch_size: int = fld(16, "Prompts generated together.", check=(positive, "an integer > 0"))
    do_sample: bool = fld(False, "Sample instead of greedy decoding.")
    temperature: float = fld(0.7, "Sampling temperature (with do_sample).", check=(positive, "a number > 0"))
    top_p: float = fld(0.95, "Nucleus sampling mass (with do_sample).",
                       check=(lambda x: 0 < x <= 1, "a number in (0, 1]"))
    repetition_penalty: float = fld(1.0, "Penalty on tokens already generated (1 = none).",
                                    check=(positive, "a number > 0"))
    dtype: str = fld("auto", "Weights dtype for generation; auto: bf16/fp16 on CUDA, fp32 on CPU.",
                     choices=["auto", "bfloat16", "float16", "float32"])
    decode_dtype: str = fld("model", "Matrix products of the CPU decoder: model: the weights' dtype; bfloat16: bf16 "
                            "products, fp32 elsewhere (2-4x faster products on a CPU with AMX, slower without "
                            "native bf16); auto: bfloat16 where the CPU has AMX. Answers differ from fp32's by "
                            "rounding, so the answer cache keeps them apart.", choices=DECODE_DTYPES)
    num_threads: int = fld(0, "CPU threads for torch; 0: torch's default.", check=(non_negative, "an integer >= 0"))
    # ---- outputs
    cache_dir: str = fld("reports/cache", "Generated answers (and judge scores), reused by later runs.")
    out_dir: str = fld("reports", "Reports go to out_dir/run_name/.")
    run_name: str = fld("", "Report folder name; empty: the model names joined by '-'.")
    # ---- statistics and report
    bootstrap: int = fld(1000, "Bootstrap resamples per confidence interval (and permutations per p-value).",
                         check=(lambda x: x >= 100, "an integer >= 100"))
    confidence: float = fld(0.95, "Confidence level of the intervals.",
                            check=(lambda x: 0 < x < 1, "a number in (0, 1)"))
    examples: int = fld(2, "Questions per task shown side by side in the report.",
                        check=(non_negative, "an integer >= 0"))
    worst: int = fld(5, "Lowest-scored answers shown per model.", check=(non_negative, "an integer >= 0"))
    # ---- judge
    judge: str = fld("none", "Model-to-model scoring with a rubric: none, local (a model through transformers) or "
                     "openai (any OpenAI-compatible chat endpoint).", choices=["none", "local", "openai"])
    judge_model: str = fld("", "local: a model reference (alias, folder, Hub id); openai: the model name the "
                           "endpoint serves.")
    judge_endpoint: str = fld("", "openai: base URL, e.g. http://localhost:8000/v1 (…/chat/completions is added).",
                              check=(judge_url_ok, JUDGE_URL_EXPECTED))
    judge_api_key_env: str = fld("OPENAI_API_KEY", "Environment variable holding the endpoint's API key (unset: "
                                 "no key sent).")
    judge_rubric: str = fld("", "Text file with the judge's rubric (its system prompt); empty: the built-in one.")
    judge_max_new_tokens: int = fld(48, "Longest judge reply in tokens.", check=(positive, "an integer > 0"))
    judge_concurrency: int = fld(4, "openai: requests in flight at once.", check=(positive, "an integer > 0"))
    judge_timeout: float = fld(120.0, "openai: seconds to wait for one reply.", check=(positive, "a number > 0"))

    def __post_init__(self):
        super().__post_init__()
        if not self.models:
            raise ValueError("models is empty; expected e.g. [base, sft, rlhf]")
        dup = [m for m, n in Counter(self.models).items() if n > 1]
        if dup:
            raise ValueError(f"models names {dup[0]!r} twice")
        if self.judge != "none" and not self.judge_model:
            raise ValueError(f"judge: {self.judge} needs judge_model (a model reference, or the endpoint's model name)")
        if self.judge == "openai" and not self.judge_endpoint:
            raise ValueError("judge: openai needs judge_endpoint (e.g. http://localhost:8000/v1)")

    def generation_settings(self) -> dict:
        s = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "dtype": self.dtype,
             "repetition_penalty": self.repetition_penalty}
        if resolve_decode_dtype(self.decode_dtype) is not None:  # fp32 products keep the key (and the caches) as before
            s["decode_dtype"] = "bfloat16"
        if self.do_sample:
            s.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return s


# ============================================================================= items
def load_test_rows(path: str | Path) -> list[dict]:
    """The processed test split, each row checked for the fields evaluation reads."""
    from utils.data.rows import PREPARE, read_rows

    return read_rows(path, "prompt", f"run `{PREPARE}` first, or evaluate your own file with --input FILE.jsonl")


def load_user_rows(path: str | Path, system_prompt: str) -> list[dict]:
    """A user's JSONL (``question``, ``answer``, optional ``task`` / ``id``) as evaluation rows, labelled
    (yes/no, numbers, follow-up) exactly as prepare_data.py labels the test split."""
    from utils.data.raw import make_record
    from utils.data.rows import prompt_row, read_jsonl_lines

    path = Path(path)
    lines = read_jsonl_lines(path, "expected your own JSONL file: one object per line with 'question' and 'answer'")
    if not lines:
        raise UserError(f"{path}: no rows")
    out, seen = [], {}
    for no, r in lines:
        for key in ("question", "answer"):
            if key not in r:
                raise UserError(f"{path}: line {no}: missing field '{key}' (each line needs 'question' and 'answer'; "
                                "'task' and 'id' are optional)")
            if not isinstance(r[key], str) or not r[key].strip():
                raise UserError(f"{path}: line {no}: field '{key}' must be a non-empty string")
        for key in ("task", "id"):
            if key in r and not (isinstance(r[key], str) and r[key].strip()):
                raise UserError(f"{path}: line {no}: field '{key}' must be a non-empty string when given")
        task = r.get("task", USER_TASK).strip()
        turns = [("user", r["question"].strip()), ("assistant", r["answer"].strip())]
        rec = make_record(task, path.name, no, None, turns, {}, system_prompt)
        row = prompt_row(rec)
        row["id"] = r["id"].strip() if "id" in r else row["id"]
        if row["id"] in seen:
            if "id" in r:
                raise UserError(f"{path}: line {no}: id {row['id']!r} already used on line {seen[row['id']]}")
            row["id"] = f"{row['id']}-L{no}"  # the same question and answer twice: keep both
        seen[row["id"]] = no
        out.append(row)
    return out


def sample_rows(rows: list[dict], per_task: int = 0, limit: int = 0, tasks: list[str] | None = None,
                seed: int = 1234) -> list[dict]:
    """A seeded sample: ``per_task`` items of each task, then at most ``limit`` in all, taken round-robin
    over tasks so a small limit still covers them. The same arguments always give the same items."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if not tasks or r["task"] in tasks:
            by_task[r["task"]].append(r)
    picked = {}
    for t in sorted(by_task):
        items = sorted(by_task[t], key=lambda r: r["id"])
        # one generator per task: adding or dropping a task does not change another task's sample
        random.Random(f"{seed}:{t}").shuffle(items)
        picked[t] = items[:per_task] if per_task else items
    order = [picked[t][i] for i in range(max((len(v) for v in picked.values()), default=0))
             for t in sorted(picked) if i < len(picked[t])]
    if limit:
        order = order[:limit]
    rank = {id(r): i for i, r in enumerate(order)}
    return sorted(order, key=lambda r: (r["task"], rank[id(r)]))


def load_items(cfg: EvalConfig) -> tuple[list[dict], str]:
    """The rows to evaluate and a one-line description of where they come from."""
    if cfg.input:
        sp = Path(cfg.system_prompt_file)
        if not sp.is_file():
            raise UserError(f"system_prompt_file: {sp} not found")
        rows = load_user_rows(cfg.input, sp.read_text(encoding="utf-8").strip())
        source = cfg.input
    else:
        rows = load_test_rows(cfg.test_file)
        source = cfg.test_file
    if cfg.tasks:
        known = sorted({r["task"] for r in rows})
        bad = [t for t in cfg.tasks if t not in known]
        if bad:
            raise UserError(f"tasks: {bad[0]!r} is not in {source} (tasks there: {', '.join(known)})")
    picked = sample_rows(rows, cfg.per_task, cfg.limit, cfg.tasks, cfg.seed)
    counts = Counter(r["task"] for r in picked)
    per_task = ", ".join(f"{t} {n}" for t, n in sorted(counts.items()))
    desc = f"{source}: {len(picked)} of {len(rows)} questions ({per_task})"
    return picked, desc
