"""Evaluation: every model answers the same questions; the answers are scored, compared and reported.

:func:`run_evaluation` does, in order:

1. **items**: the test split (``data/processed/eval/test.jsonl``), optionally sampled per task and
   capped, or a user's own JSONL file (``question`` and ``answer`` per line, ``task`` optional);
2. **answers**: each model generates in batches through :mod:`utils.generation`; answers are cached
   per model in ``<cache_dir>/answers/<model>-<hash>.jsonl``, the hash covering the model's files and
   the generation settings and each line keyed by item id and prompt, so a rerun or an interrupted run
   generates only what is missing and a changed model or setting never reuses stale answers;
3. **scores**: the metrics that are also rewards (yes/no, key terms, numbers, ROUGE-L, semantic
   similarity, length, format, reward model, the weighted total) come from
   :func:`utils.rewards.score_rows`, the code GRPO trains with; evaluation adds only its own figures:
   BLEU-1 and METEOR (nltk), key-term precision and recall (the rewards' lexicon), answer length, and
   the optional judge;
4. **statistics**: a bootstrap confidence interval for every figure, and paired comparisons (mean
   difference, its bootstrap CI, a permutation p-value) between models on the same items;
5. **report**: ``<out_dir>/<run>/`` (see :mod:`utils.report`), written to a temporary folder first so
   that a failed run leaves nothing half-written.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import random
import re
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from utils.config import UserError, fld, non_negative, positive
from utils.formats import parse
from utils.rewards import REWARDS, RewardMix, load_lexicon, score_rows, term_sets
from utils.text import words

log = logging.getLogger(__name__)

TEST_FILE = "data/processed/eval/test.jsonl"
USER_TASK = "user"  # task of --input lines that name none


# ============================================================================= metrics
@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    group: str      # overlap | clinical | form: the headline tables' sections
    help: str
    unit: bool = True  # a score in [0, 1] (plotted together); False: a count such as words


METRICS: list[Metric] = [
    Metric("rouge", "ROUGE-L", "overlap", "ROUGE-L F1 against the reference (rouge-score, Porter stemmer); the "
           "rouge reward"),
    Metric("bleu1", "BLEU-1", "overlap", "unigram BLEU with brevity penalty (nltk, smoothing method 1) on lower-case "
           "word tokens"),
    Metric("meteor", "METEOR", "overlap", "METEOR (nltk: exact, Porter-stem and WordNet-synonym matches) on lower-case "
           "word tokens"),
    Metric("semantic", "semantic", "overlap", "cosine similarity of all-MiniLM-L6-v2 embeddings of answer and "
           "reference; the semantic reward"),
    Metric("yesno", "yes/no acc", "clinical", "share of yes/no questions whose answer opens with the reference's "
           "verdict; the yesno reward (majority baseline beside it)"),
    Metric("terms", "key terms F1", "clinical", "F1 of the lexicon's ECG/cardiology terms in answer vs reference, "
           "beyond those the question names; the terms reward"),
    Metric("terms_p", "key terms P", "clinical", "share of the answer's key terms that the reference names"),
    Metric("terms_r", "key terms R", "clinical", "share of the reference's key terms that the answer names"),
    Metric("numbers", "numbers", "clinical", "agreement of numbers with units and follow-up periods with the "
           "reference's; the numbers reward"),
    Metric("format", "format", "form", "share of answers that follow the answer format; the format reward"),
    Metric("length", "length score", "form", "1 unless the answer is too long, too short, truncated or looping; "
           "the length reward"),
    Metric("reward_model", "reward model", "form", "the trained reward model's preference for the answer over the "
           "reference (0.5: as good); the reward_model reward"),
    Metric("total", "reward (mix)", "form", "the weighted mean of the rewards in `rewards` (what GRPO maximises)"),
    Metric("judge", "judge", "form", "judge model's rubric score, 1-5 mapped to 0-1"),
    Metric("words", "words", "form", "answer length in words", unit=False),
]
METRIC_BY_NAME = {m.name: m for m in METRICS}


# ============================================================================= config
JUDGE_RUBRIC = """You grade answers to cardiology and ECG questions against a reference answer written by an expert.
Score the ANSWER from 1 to 5:
5 = correct and complete: agrees with the reference on every clinical point;
4 = correct, with minor omissions or imprecision;
3 = partly correct, or vague;
2 = mostly incorrect, or misses the main point;
1 = wrong, unsafe, off-topic or empty.
Reply with one line: "Score: N" and a one-sentence reason."""


def _http_url(x: str) -> bool:
    return x == "" or x.startswith(("http://", "https://"))


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
                              check=(_http_url, "an http:// or https:// URL"))
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
        if self.do_sample:
            s.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return s


# ============================================================================= items
def _line_numbers(path: Path) -> list[int]:
    """The physical line of each JSON row read_jsonl returns (it skips blank lines)."""
    with path.open(encoding="utf-8") as f:
        return [i for i, line in enumerate(f, 1) if line.strip()]


def _read_rows(path: Path) -> tuple[list[dict], list[int]]:
    from utils.data import read_jsonl

    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        rows = read_jsonl(path)
        lines = _line_numbers(path)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows, lines


def load_test_rows(path: str | Path) -> list[dict]:
    """The processed test split, each row checked for the fields evaluation reads."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; run `python prepare_data.py --config configs/cpu/prepare.yaml` first, "
                        "or evaluate your own file with --input FILE.jsonl")
    rows, lines = _read_rows(path)
    for r, no in zip(rows, lines):
        for key, kind in (("id", str), ("task", str), ("prompt", list), ("reference", str)):
            if not isinstance(r.get(key), kind):
                what = "missing" if key not in r else f"not a {kind.__name__}"
                raise UserError(f"{path}: line {no}: field '{key}' {what} (expected the rows prepare_data.py writes "
                                "to eval/test.jsonl)")
    return rows


def load_user_rows(path: str | Path, system_prompt: str) -> list[dict]:
    """A user's JSONL (``question``, ``answer``, optional ``task`` / ``id``) as evaluation rows, labelled
    (yes/no, numbers, follow-up) exactly as prepare_data.py labels the test split."""
    from utils.data import make_record, prompt_row

    path = Path(path)
    rows, lines = _read_rows(path)
    out, seen = [], {}
    for r, no in zip(rows, lines):
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


# ============================================================================= models
@dataclass
class ModelSpec:
    name: str            # the column name in the report
    ref: str             # what the user wrote
    path: str            # resolved folder or Hub id
    fingerprint: str     # changes when the model's files change
    answer_format: str   # the format it was trained on (else the config's)


def model_fingerprint(path: str) -> str:
    """A hash of a model folder's file names, sizes and modification times (and its base's, for an
    adapter): retraining into the same folder changes it. A Hub id is its own fingerprint."""
    from utils.models import adapter_base, resolve_model

    p = Path(path)
    if not p.is_dir():
        return path
    h = hashlib.sha1()
    for f in sorted(p.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".model"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    base = adapter_base(path)
    if base:
        try:
            h.update(model_fingerprint(resolve_model(base)).encode())
        except UserError:
            h.update(base.encode())
    return h.hexdigest()[:16]


def _display_name(ref: str, taken: set[str]) -> str:
    name = ref.rstrip("/").split("/")[-1] if ("/" in ref or Path(ref).exists()) else ref
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def resolve_models(cfg: EvalConfig) -> list[ModelSpec]:
    """Every model of ``cfg.models`` resolved before anything runs: an unknown alias or a missing
    checkpoint stops the run with the resolver's one-line message (which names the script that makes it)."""
    from utils.models import resolve_model
    from utils.training import read_train_config

    specs, taken = [], set()
    for ref in cfg.models:
        path = resolve_model(ref, cfg.base_model)
        trained = read_train_config(path) if Path(path).is_dir() else None
        fmt = (trained or {}).get("answer_format") or cfg.answer_format
        name = _display_name(ref, taken)
        taken.add(name)
        specs.append(ModelSpec(name, ref, path, model_fingerprint(path), fmt))
    return specs


# ============================================================================= answers and their cache
def _sha(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def prompt_for(row: dict, fmt: str) -> list[dict]:
    from utils.generation import with_format_instructions

    return with_format_instructions(row["prompt"], fmt)


class AnswerCache:
    """One JSONL file per (model files, generation settings); one line per item: ``{key, id, completion}``
    with ``key`` = hash(file hash, item id, prompt). Lines are appended after every batch, so an
    interrupted run keeps what it finished; a partial last line is dropped."""

    def __init__(self, cache_dir: str | Path, spec: ModelSpec, settings: dict):
        self.tag = _sha({"model": spec.fingerprint, "settings": settings, "format": spec.answer_format})[:12]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.name)
        self.path = Path(cache_dir) / "answers" / f"{slug}-{self.tag}.jsonl"
        self.entries: dict[str, str] = {}
        if self.path.is_file():
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):
                # a write cut short: drop the partial line, or the next append would run into it
                raw = raw[:raw.rfind(b"\n") + 1]
                self.path.write_bytes(raw)
                log.warning("%s: dropped a partial last line (an interrupted write)", self.path)
            bad = 0
            for line in raw.decode("utf-8", errors="replace").splitlines():
                try:
                    e = json.loads(line)
                    self.entries[e["key"]] = e["completion"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    bad += 1
            if bad:
                log.warning("%s: %d unreadable line(s) ignored; those answers are generated again", self.path, bad)

    def key(self, row: dict, prompt: list[dict]) -> str:
        return _sha([self.tag, row["id"], prompt])[:24]

    def add(self, items: list[tuple[str, str, str]]) -> None:
        """Append ``(key, id, completion)`` lines."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for key, item_id, completion in items:
                f.write(json.dumps({"key": key, "id": item_id, "completion": completion}, ensure_ascii=False) + "\n")
                self.entries[key] = completion
            f.flush()


@dataclass
class GenerationRun:
    cached: int = 0
    generated: int = 0
    seconds: float = 0.0
    new_tokens: int = 0

    @property
    def answers_per_second(self) -> float | None:
        return self.generated / self.seconds if self.seconds and self.generated else None


def generate_answers(spec: ModelSpec, rows: list[dict], cfg: EvalConfig) -> tuple[list[str], GenerationRun]:
    """The model's answer to every row, from the cache where there is one; the rest generated in chunks
    (each appended to the cache as soon as it is done). The model is loaded only when something is missing."""
    from utils import generation

    cache = AnswerCache(cfg.cache_dir, spec, cfg.generation_settings())
    prompts = [prompt_for(r, spec.answer_format) for r in rows]
    keys = [cache.key(r, p) for r, p in zip(rows, prompts)]
    todo = [i for i, k in enumerate(keys) if k not in cache.entries]
    run = GenerationRun(cached=len(rows) - len(todo))
    if todo:
        log.info("%s: generating %d answers (%d cached) -> %s", spec.name, len(todo), run.cached, cache.path)
        model, tok = generation.load_for_generation(spec.path, cfg.base_model, dtype=cfg.dtype)
        if cfg.repetition_penalty != 1.0:
            # generate() takes no repetition_penalty; transformers reads it from the generation config
            model.generation_config.repetition_penalty = cfg.repetition_penalty
        # Longest prompts first: similar lengths share a batch (little padding), and the slowest batch
        # comes first, so the progress log's rate is a safe estimate. One batch per call to generate, each
        # cached at once: an interruption loses at most one batch.
        todo.sort(key=lambda i: -len(json.dumps(prompts[i])))
        chunk = cfg.batch_size
        started = time.time()
        for c, start in enumerate(range(0, len(todo), chunk)):
            idx = todo[start:start + chunk]
            outs = generation.generate(model, tok, [prompts[i] for i in idx], max_new_tokens=cfg.max_new_tokens,
                                       batch_size=cfg.batch_size, do_sample=cfg.do_sample,
                                       temperature=cfg.temperature, top_p=cfg.top_p,
                                       seed=cfg.seed + c if cfg.do_sample else None)
            run.new_tokens += generation.last_stats.new_tokens
            cache.add([(keys[i], rows[i]["id"], o) for i, o in zip(idx, outs)])
            run.generated += len(idx)
            elapsed = time.time() - started
            log.info("%s: %d/%d answers (%.2f answers/s, %.0f tokens/s)", spec.name, run.generated, len(todo),
                     run.generated / elapsed, run.new_tokens / elapsed)
        run.seconds = time.time() - started
        del model, tok
        gc.collect()
    else:
        log.info("%s: all %d answers cached (%s)", spec.name, len(rows), cache.path)
    return [cache.entries[k] for k in keys], run


# ============================================================================= scoring
@functools.lru_cache(maxsize=4)
def _wordnet_reader(paths: tuple[str, ...]):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    with warnings.catch_warnings():
        # METEOR reads English synonyms only; the multilingual (OMW) data is not needed
        warnings.filterwarnings("ignore", message="The multilingual functions")
        return WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)


def load_wordnet():
    """nltk's WordNet reader, or None (with one warning line) when WordNet is not installed for nltk:
    METEOR is then left out rather than computed without its synonym stage."""
    import nltk

    try:
        return _wordnet_reader(tuple(nltk.data.path))
    except (LookupError, OSError):
        log.warning("METEOR skipped: nltk finds no WordNet data; install it with `bash scripts/setup_wordnet.sh` "
                    "(or python -c \"import nltk; nltk.download('wordnet')\")")
        return None


@functools.lru_cache(maxsize=1)
def _smoothing():
    from nltk.translate.bleu_score import SmoothingFunction

    return SmoothingFunction().method1


def bleu1(answer: str, reference: str) -> float:
    """Sentence BLEU-1 on lower-case word tokens (0 for an empty answer).

    >>> round(bleu1("The cat ran away", "the cat sat"), 3)
    0.5
    """
    from nltk.translate.bleu_score import sentence_bleu

    hyp, ref = words(answer), words(reference)
    if not hyp or not ref:
        return 0.0
    return float(sentence_bleu([ref], hyp, weights=(1.0,), smoothing_function=_smoothing()))


def meteor(answer: str, reference: str, wordnet) -> float:
    """METEOR on lower-case word tokens with nltk's defaults (alpha 0.9, beta 3, gamma 0.5)."""
    from nltk.translate.meteor_score import meteor_score

    hyp, ref = words(answer), words(reference)
    if not hyp or not ref:
        return 0.0
    return float(meteor_score([ref], hyp, wordnet=wordnet))


def term_precision_recall(answer: str, reference: str, lexicon,
                          question: str = "") -> tuple[float | None, float | None]:
    """Precision and recall of the key terms the terms reward matches (its lexicon and canonical names, less
    the question's terms); (None, None) when the reference names no term beyond the question's. An answer
    naming no such term has precision 0."""
    got, want = term_sets(answer, reference, question, lexicon)
    if not want:
        return None, None
    hit = len(got & want)
    return (hit / len(got) if got else 0.0), hit / len(want)


def reward_weights(cfg: EvalConfig, with_reward_model: bool) -> dict[str, float]:
    """Every reward, weighted as in the config's mix (weight 0: reported, not in the total)."""
    return {n: float(cfg.rewards.get(n, 0.0)) for n in REWARDS if n != "reward_model" or with_reward_model}


def score_answers(completions: list[str], rows: list[dict], answer_format: str, cfg: EvalConfig,
                  reward_model: str | None, wordnet) -> list[dict]:
    """Per-item metrics: the rewards (shared code) plus evaluation's own figures; None where a metric
    does not apply to the item."""
    weights = reward_weights(cfg, reward_model is not None)
    shared = score_rows(completions, rows, weights, answer_format, reward_model, base_model=cfg.base_model,
                        **cfg.reward_options())
    lexicon = load_lexicon(cfg.term_lexicon)
    out = []
    for c, r, s in zip(completions, rows, shared):
        answer, ref = parse(c, answer_format).answer, r.get("reference") or ""
        d = {m: s.get(m) for m in REWARDS if m in s}
        d["total"] = s.get("total")
        has_ref = bool(ref.strip())
        d["bleu1"] = bleu1(answer, ref) if has_ref else None
        d["meteor"] = meteor(answer, ref, wordnet) if has_ref and wordnet is not None else None
        d["terms_p"], d["terms_r"] = (term_precision_recall(answer, ref, lexicon, r.get("question") or "")
                                      if has_ref else (None, None))
        d["words"] = float(len(answer.split()))
        out.append(d)
    return out


def reward_model_status(cfg: EvalConfig) -> tuple[str | None, str | None]:
    """``(reward_model, None)`` when the configured reward model can score, else ``(None, note)``: the
    column is left out with a note rather than stopping a comparison of the models that do exist."""
    if not cfg.reward_model:
        return None, None
    import importlib.util

    from utils.models import resolve_model

    try:
        resolve_model(cfg.reward_model, cfg.base_model)
    except UserError as e:
        return None, f"reward model column left out: {e}"
    if importlib.util.find_spec("utils.reward_model") is None:
        return None, "reward model column left out: utils/reward_model.py is not in this checkout"
    return cfg.reward_model, None


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
            from utils.models import resolve_model

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
        from utils import generation

        if self._model is None:
            self._model = generation.load_for_generation(self.path, cfg.base_model, dtype=cfg.dtype)
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


# ============================================================================= statistics
def _values(scores: list[dict], metric: str, idx: list[int]) -> list[float]:
    return [scores[i][metric] for i in idx if scores[i].get(metric) is not None]


def bootstrap_ci(values, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict | None:
    """Mean and percentile-bootstrap CI of ``values``: ``{mean, lo, hi, n}``; None without values."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return {"mean": mean, "lo": mean, "hi": mean, "n": int(x.size)}
    res = stats.bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                          vectorized=True, rng=np.random.default_rng(seed))
    return {"mean": mean, "lo": float(res.confidence_interval.low), "hi": float(res.confidence_interval.high),
            "n": int(x.size)}


def paired_comparison(a, b, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict | None:
    """``b - a`` on the same items: mean difference, its bootstrap CI, and a two-sided paired permutation
    (sign-flip) p-value; None without pairs."""
    import numpy as np
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size == 0:
        return None
    d = b - a
    out = bootstrap_ci(d, n_resamples, confidence, seed)
    if np.all(d == 0):
        out["p"] = 1.0
        return out

    def mean_diff(x, y, axis=-1):
        return np.mean(y - x, axis=axis)

    res = stats.permutation_test((a, b), mean_diff, permutation_type="samples", n_resamples=n_resamples,
                                 vectorized=True, rng=np.random.default_rng(seed))
    out["p"] = float(res.pvalue)
    return out


def majority_baseline(rows: list[dict], idx: list[int]) -> dict | None:
    """Accuracy of always answering the most frequent yes/no label of these items."""
    labels = [rows[i]["label_yesno"] for i in idx if rows[i].get("label_yesno") in ("yes", "no")]
    if not labels:
        return None
    label, n = Counter(labels).most_common(1)[0]
    return {"label": label, "accuracy": n / len(labels), "n": len(labels)}


def summarize(rows: list[dict], scores: dict[str, list[dict]], metrics: list[str], cfg: EvalConfig) -> dict:
    """``{"groups": [...], "figures": {model: {group: {metric: ci}}}, "majority": {group: ...}}``, group
    'all' plus one per task."""
    groups = {"all": list(range(len(rows)))}
    for t in sorted({r["task"] for r in rows}):
        groups[t] = [i for i, r in enumerate(rows) if r["task"] == t]
    figures: dict = {}
    for name, sc in scores.items():
        figures[name] = {g: {m: bootstrap_ci(_values(sc, m, idx), cfg.bootstrap, cfg.confidence, cfg.seed)
                             for m in metrics} for g, idx in groups.items()}
    majority = {g: majority_baseline(rows, idx) for g, idx in groups.items()}
    return {"groups": list(groups), "sizes": {g: len(v) for g, v in groups.items()}, "figures": figures,
            "majority": majority}


def compare_models(scores: dict[str, list[dict]], metrics: list[str], cfg: EvalConfig) -> list[dict]:
    """Every later model against every earlier one, per metric, on the items both have a value for."""
    names = list(scores)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            row = {"a": a, "b": b, "metrics": {}}
            for m in metrics:
                pairs = [(x[m], y[m]) for x, y in zip(scores[a], scores[b])
                         if x.get(m) is not None and y.get(m) is not None]
                row["metrics"][m] = paired_comparison([p[0] for p in pairs], [p[1] for p in pairs], cfg.bootstrap,
                                                      cfg.confidence, cfg.seed)
            out.append(row)
    return out


# ============================================================================= the run
@dataclass
class EvalResult:
    cfg: EvalConfig
    source: str
    rows: list[dict]
    models: list[ModelSpec]
    answers: dict[str, list[str]]
    scores: dict[str, list[dict]]
    metrics: list[str]
    summary: dict
    paired: list[dict]
    generation: dict[str, GenerationRun]
    notes: list[str] = field(default_factory=list)
    judge_replies: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0


def run_evaluation(cfg: EvalConfig) -> tuple[EvalResult, Path]:
    """Generate, score, compare and report (see the module docstring). Returns the result and the report folder."""
    from utils.report import report_dir, write_report

    started = time.time()
    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    # Everything that can be wrong with the input is checked before the first answer is generated.
    rows, source = load_items(cfg)
    specs = resolve_models(cfg)
    out = report_dir(cfg, specs)
    notes: list[str] = []
    reward_model, note = reward_model_status(cfg)
    if note:
        log.warning("%s", note)
        notes.append(note)
    judge = Judge(cfg) if cfg.judge != "none" else None
    load_lexicon(cfg.term_lexicon)
    wordnet = load_wordnet()
    if wordnet is None:
        notes.append("METEOR left out: nltk finds no WordNet data (run `bash scripts/setup_wordnet.sh`).")
    log.info("evaluating %s on %s", ", ".join(s.name for s in specs), source)

    answers, runs, scores, replies = {}, {}, {}, {}
    for spec in specs:
        answers[spec.name], runs[spec.name] = generate_answers(spec, rows, cfg)
    for spec in specs:
        log.info("%s: scoring %d answers", spec.name, len(rows))
        scores[spec.name] = score_answers(answers[spec.name], rows, spec.answer_format, cfg, reward_model, wordnet)
    if judge is not None:
        for spec in specs:
            log.info("%s: judging %d answers with %s", spec.name, len(rows), judge.name)
            answer_texts = [parse(a, spec.answer_format).answer for a in answers[spec.name]]
            js, replies[spec.name] = judge.score(rows, answer_texts)
            for d, v in zip(scores[spec.name], js):
                d["judge"] = v
            unparsed = sum(v is None for v in js)
            if unparsed:
                notes.append(f"judge: {unparsed} of {len(js)} replies for {spec.name} hold no 1-5 score "
                             "(left out of its mean).")
        judge.close()
    metrics = [m.name for m in METRICS
               if any(d.get(m.name) is not None for sc in scores.values() for d in sc)]
    summary = summarize(rows, scores, metrics, cfg)
    paired = compare_models(scores, metrics, cfg) if len(specs) > 1 else []
    fmts = {s.answer_format for s in specs}
    if len(fmts) > 1:
        notes.append("Models were asked for different answer formats (" +
                     ", ".join(f"{s.name}: {s.answer_format}" for s in specs) + "), each the one it was trained on.")
    result = EvalResult(cfg, source, rows, specs, answers, scores, metrics, summary, paired, runs, notes, replies)
    result.seconds = time.time() - started
    write_report(result, out)
    return result, out


def headline(result: EvalResult, metrics: list[str] | None = None) -> str:
    """The overall table as plain text, for the script's closing summary."""
    metrics = [m for m in (metrics or result.metrics) if m in result.metrics]
    head = ["model"] + [METRIC_BY_NAME[m].label for m in metrics]
    lines = [head]
    for spec in result.models:
        f = result.summary["figures"][spec.name]["all"]
        lines.append([spec.name] + [("-" if f[m] is None else
                                     (f"{f[m]['mean']:.1f}" if not METRIC_BY_NAME[m].unit else f"{f[m]['mean']:.3f}"))
                                    for m in metrics])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in lines)

