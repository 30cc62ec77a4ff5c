"""Every model answers the same questions: model specs, the answer cache, batched generation.

Answers are cached per model in ``<cache_dir>/answers/<model>-<hash>.jsonl``, the hash covering the model's
files and the generation settings and each line keyed by item id and prompt, so a rerun or an interrupted
run generates only what is missing and a changed model or setting never reuses stale answers.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from utils.core.artifacts import read_log
from utils.evaluation.config import EvalConfig
from utils.models.loading import load_for_inference

log = logging.getLogger(__name__)


# ============================================================================= models
@dataclass
class ModelSpec:
    name: str            # the column name in the report
    ref: str             # what the user wrote
    path: str            # resolved folder or Hub id
    fingerprint: str     # changes when the model's files change
    answer_format: str   # the format it was trained on (else the config's)


def model_fingerprint(path: str) -> str:
    """A short hash of what the model is, by content (:func:`utils.models.resolve.model_identity`: its
    config, tokenizer and weight files, and its base's for an adapter; a Hub id is itself), the same identity
    the training phases record: retraining into the same folder changes it, a copied or moved folder keeps
    its cached answers."""
    from utils.models.resolve import model_identity

    return hashlib.sha1(json.dumps(model_identity(path), sort_keys=True).encode()).hexdigest()[:16]


def _display_name(ref: str, taken: set[str]) -> str:
    name = ref.rstrip("/").split("/")[-1] if ("/" in ref or Path(ref).exists()) else ref
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def resolve_models(cfg: EvalConfig) -> list[ModelSpec]:
    """Every model of ``cfg.models`` resolved before anything runs: an unknown alias or a missing
    checkpoint stops the run with the resolver's one-line message (which names the script that makes it)."""
    from utils.core.artifacts import read_train_config
    from utils.models.resolve import resolve_model

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
    from utils.data.formats import with_format_instructions

    return with_format_instructions(row["prompt"], fmt)


def file_slug(name: str) -> str:
    """A model's display name as a cache file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class AnswerCache:
    """One JSONL file per (model files, generation settings); one line per item: ``{key, id, completion}``
    with ``key`` = hash(file hash, item id, prompt). Lines are appended after every batch, so an
    interrupted run keeps what it finished; a partial last line is dropped.

    Process ``rank`` of several appends to its own part file (``<file>.part<rank>``: two processes appending
    to one file could interleave their lines) and reads nothing (the first process decides what is
    missing); the first process reads the parts a killed run left, and :meth:`merge` folds every answer
    into the file and removes the parts. One evaluation per cache folder and model at a time."""

    def __init__(self, cache_dir: str | Path, spec: ModelSpec, settings: dict, rank: int | None = None):
        self.tag = _sha({"model": spec.fingerprint, "settings": settings, "format": spec.answer_format})[:12]
        self.path = Path(cache_dir) / "answers" / f"{file_slug(spec.name)}-{self.tag}.jsonl"
        self.write_path = self.path if rank is None else self.path.with_name(f"{self.path.name}.part{rank}")
        self.entries: dict[str, str] = {}
        self.ids: dict[str, str] = {}
        if not rank:  # a single process, or the first of several (before any other appends)
            for path in [self.path, *self._parts()]:
                self._read(path)

    def _parts(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.name}.part*"))

    def _read(self, path: Path) -> None:
        for e in read_log(path):  # a torn last line (an interrupted run) is dropped and generated again
            if isinstance(e.get("key"), str) and isinstance(e.get("completion"), str):
                self.entries[e["key"]] = e["completion"]
                self.ids[e["key"]] = e.get("id")

    def key(self, row: dict, prompt: list[dict]) -> str:
        return _sha([self.tag, row["id"], prompt])[:24]

    def add(self, items: list[tuple[str, str, str]]) -> None:
        """Append ``(key, id, completion)`` lines."""
        self.write_path.parent.mkdir(parents=True, exist_ok=True)
        with self.write_path.open("a", encoding="utf-8") as f:
            for key, item_id, completion in items:
                f.write(json.dumps({"key": key, "id": item_id, "completion": completion}, ensure_ascii=False) + "\n")
                self.entries[key], self.ids[key] = completion, item_id
            f.flush()

    def merge(self, items: list[tuple[str, str, str]]) -> None:
        """Write every answer known (read, generated here, and ``items`` from the other processes) that the
        cache file lacks into it, then remove the part files (the first process, once all have answered)."""
        for key, item_id, completion in items:
            self.entries[key], self.ids[key] = completion, item_id
        known = {e.get("key") for e in read_log(self.path)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for key, completion in self.entries.items():
                if key not in known:
                    f.write(json.dumps({"key": key, "id": self.ids.get(key), "completion": completion},
                                       ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # the answers are in the file before their parts go
        for part in self._parts():
            part.unlink()


@dataclass
class GenerationRun:
    cached: int = 0
    generated: int = 0
    seconds: float = 0.0
    new_tokens: int = 0

    @property
    def answers_per_second(self) -> float | None:
        return self.generated / self.seconds if self.seconds and self.generated else None


def generate_answers(spec: ModelSpec, rows: list[dict], cfg: EvalConfig, state=None) -> tuple[list[str], GenerationRun]:
    """The model's answer to every row, from the cache where there is one; the rest generated in chunks
    (each appended to the cache as soon as it is done). The model is loaded only when something is missing.

    ``state`` (accelerate's ``PartialState``) with several processes: the first decides what is missing,
    each generates every N-th of it on its own device, and the answers are gathered on the first, which
    alone returns them: N GPUs, or N single-thread processes on a CPU (decoding is bound by memory
    bandwidth there, so two one-thread processes answer nearly twice as fast as one two-thread process),
    share the work."""
    from utils.models import generation

    shards = state is not None and state.num_processes > 1
    rank, world = (state.process_index, state.num_processes) if shards else (0, 1)
    cache = AnswerCache(cfg.cache_dir, spec, cfg.generation_settings(), rank=rank if shards else None)
    prompts = [prompt_for(r, spec.answer_format) for r in rows]
    keys = [cache.key(r, p) for r, p in zip(rows, prompts)]
    todo = [i for i, k in enumerate(keys) if k not in cache.entries]
    run = GenerationRun(cached=len(rows) - len(todo))
    # Longest prompts first: similar lengths share a batch (little padding), and the slowest batch comes
    # first, so the progress log's rate is a safe estimate. Every N-th of that order per process gives
    # each a like mix of lengths.
    todo.sort(key=lambda i: -len(json.dumps(prompts[i])))
    if shards:
        from accelerate.utils import broadcast_object_list

        # the first process's reading of the cache decides what is missing, so all split one list
        todo = broadcast_object_list([todo if rank == 0 else None])[0]
        run.cached = len(rows) - len(todo)
    todo = todo[rank::world]
    mine: list[tuple[str, str, str]] = []
    if todo:
        log.info("%s: generating %d answers (%d cached%s) -> %s", spec.name, len(todo), run.cached,
                 f"; process {rank} of {world}" if shards else "", cache.write_path)
        model, tok = load_for_inference(spec.path, cfg.base_model, dtype=cfg.dtype,
                                        device=str(state.device) if state is not None else None)
        if cfg.repetition_penalty != 1.0:
            # generate() takes no repetition_penalty; transformers reads it from the generation config
            model.generation_config.repetition_penalty = cfg.repetition_penalty
        # Four batches per call to generate (on CPU its decoder keeps the rows full until a chunk's last
        # answers), each chunk cached at once: an interruption loses at most one chunk.
        chunk = 4 * cfg.batch_size
        started = time.time()
        for c, start in enumerate(range(0, len(todo), chunk)):
            idx = todo[start:start + chunk]
            outs = generation.generate(model, tok, [prompts[i] for i in idx], max_new_tokens=cfg.max_new_tokens,
                                       batch_size=cfg.batch_size, do_sample=cfg.do_sample,
                                       temperature=cfg.temperature, top_p=cfg.top_p,
                                       seed=cfg.seed + c * world + rank if cfg.do_sample else None,
                                       decode_dtype=cfg.decode_dtype)
            run.new_tokens += generation.last_stats.new_tokens
            done = [(keys[i], rows[i]["id"], o) for i, o in zip(idx, outs)]
            cache.add(done)
            mine += done
            run.generated += len(idx)
            elapsed = time.time() - started
            log.info("%s: %d/%d answers (%.2f answers/s, %.0f tokens/s)", spec.name, run.generated, len(todo),
                     run.generated / elapsed, run.new_tokens / elapsed)
        run.seconds = time.time() - started
        del model, tok
        gc.collect()
    elif run.cached == len(rows):
        log.info("%s: all %d answers cached (%s)", spec.name, len(rows), cache.path)
    if shards:
        from accelerate.utils import gather_object

        # the answers travel to the first process (no shared folder needed); each process timed its share
        # side by side with the others, so the run took the longest of those times
        shares = gather_object([(run.generated, run.seconds, run.new_tokens, mine)])
        run.generated = sum(g for g, _, _, _ in shares)
        run.new_tokens = sum(t for _, _, t, _ in shares)
        run.seconds = max(sec for _, sec, _, _ in shares)
        if rank != 0:
            return [], run  # the first process scores and reports
        cache.merge([item for *_, items in shares for item in items])
        if run.generated:
            log.info("%s: %d answers from %d processes (%s)", spec.name, run.generated, world,
                     " + ".join(str(g) for g, *_ in shares))
    return [cache.entries[k] for k in keys], run
