"""The data phase: config, the pipeline that prepare_data.py runs, and the data card.

The output folder is written whole into a temporary sibling and renamed into place with the completion
marker (:func:`utils.core.artifacts.atomic_save`): an interrupted run leaves the previous folder as it
was, never a mix of old and new splits. The card records each file's sha256 and row count, which
:mod:`utils.data.card` checks for the phases that read them. An existing output folder is replaced only
when prepare wrote it (marker and card), so pointing ``out_dir`` at someone's folder destroys nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from utils.core.artifacts import DONE_MARKER, atomic_save, replaceable
from utils.core.config import ConfigError, dump_yaml, fld, fraction
from utils.core.fingerprint import file_sha256
from utils.data.card import CARD_FILE, CARD_MD
from utils.data.download import download
from utils.data.raw import TASKS, UPSTREAM_COMMIT, UPSTREAM_REPO, CleanOptions, load_raw
from utils.data.rows import DataError, prompt_row, sft_row, write_jsonl
from utils.data.split import duplicate_groups, leak_report, split_records

log = logging.getLogger(__name__)

TASK_CODES = list(TASKS)


@dataclass
class PrepareConfig:
    raw_dir: str = fld("data/raw/ECG-Expert-QA", "Folder holding the ECG-Expert-QA JSON files.")
    out_dir: str = fld("data/processed", "Where the SFT, GRPO and evaluation sets and the data card go.")
    system_prompt_file: str = fld("data/system_prompt.txt", "System prompt put at the head of every conversation.")
    tasks: list[str] = fld(help="Tasks to read (codes; see SCHEMAS.md). Empty means all.",
                           choices=TASK_CODES, default_factory=list)
    sft_tasks: list[str] = fld(help="Tasks in the SFT set. Empty means every task read.",
                               choices=TASK_CODES, default_factory=list)
    grpo_tasks: list[str] = fld(help="Tasks in the GRPO set (prompts with references). Empty means every task read.",
                                choices=TASK_CODES, default_factory=list)
    eval_tasks: list[str] = fld(help="Tasks in the evaluation (test) set. Empty means every task read.",
                                choices=TASK_CODES, default_factory=list)
    val_fraction: float = fld(0.05, "Share of each task's items held out for validation.",
                              check=(fraction, "a fraction in [0, 1)"))
    test_fraction: float = fld(0.05, "Share of each task's items held out for the test set.",
                               check=(fraction, "a fraction in [0, 1)"))
    near_duplicate_threshold: float = fld(
        0.8, "Records whose prompts (context and question) or whose answers reach this word-set Jaccard "
        "similarity are kept on one side of the split.", check=(lambda x: 0.0 < x <= 1.0, "a number in (0, 1]"))
    seed: int = fld(1234, "Seed of the split: the same seed and data give the same split.")
    unrecoverable_mojibake: str = fld("drop", "Items with mis-decoded text that cannot be repaired: drop or keep "
                                      "(flagged).", choices=["drop", "keep"])
    drop_truncated: bool = fld(True, "Drop answers cut off mid-sentence (else keep them, flagged).")
    drop_contradictory: bool = fld(True, "Drop a question answered both Yes and No (else keep, flagged).")
    skip_bad_items: bool = fld(False, "Skip items whose keys fit no known shape (counted) instead of stopping.")
    tokenizer: str = fld("smollm2-135m-instruct", "Model whose tokenizer measures the token lengths in the data "
                         "card (a model reference; empty to skip).")
    download: bool = fld(False, "Fetch the pinned upstream commit's archive into raw_dir first.")
    download_url: str = fld(f"https://github.com/{UPSTREAM_REPO}/archive/{UPSTREAM_COMMIT}.zip",
                            "Archive to fetch with --download.")
    expected_blobs: dict[str, str] = fld(
        help="File name -> git blob hash prefix that --download verifies. Empty means the pinned commit's.",
        default_factory=dict)

    def __post_init__(self):
        if self.val_fraction + self.test_fraction >= 0.5:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction}: "
                             "expected < 0.5 so that most data trains")


def percentiles(values: list[int], ps=(50, 90, 95, 99)) -> dict:
    if not values:
        return {}
    s = sorted(values)
    out = {f"p{p}": s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] for p in ps}
    out["max"] = s[-1]
    out["mean"] = round(sum(s) / len(s), 1)
    return out


def token_lengths(records: list[dict], tokenizer_ref: str) -> dict:
    """Prompt, answer and whole-conversation token counts under the recipe's tokenizer and chat template."""
    from utils.models.loading import load_tokenizer

    tok = load_tokenizer(tokenizer_ref)
    prompt, answer, total = [], [], []
    by_task: dict[str, list[int]] = {}
    for r in records:
        p = len(tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])
        a = len(tok(r["reference"], add_special_tokens=False)["input_ids"]) + 1  # + end-of-turn token
        prompt.append(p)
        answer.append(a)
        total.append(p + a)
        by_task.setdefault(r["task"], []).append(a)
    return {"tokenizer": tokenizer_ref, "prompt": percentiles(prompt), "answer": percentiles(answer),
            "total": percentiles(total), "answer_by_task": {t: percentiles(v) for t, v in sorted(by_task.items())}}


class Laps:
    """Seconds each step took, for the card: where prepare spends its time."""

    def __init__(self):
        self.start, self.seconds = time.time(), {}

    def __call__(self, step: str) -> None:
        now = time.time()
        self.seconds[step] = round(now - self.start, 2)
        self.start = now


def check_replaceable_out(out_dir: Path) -> None:
    """An existing output folder is replaced only when prepare wrote it: its marker and its card."""
    if not replaceable(out_dir, DONE_MARKER, CARD_FILE):
        raise DataError(f"{out_dir}: exists and was not written by prepare_data.py (it lacks the {DONE_MARKER} "
                        f"marker or the {CARD_FILE} that prepare writes), so it is not replaced; choose another "
                        "--out-dir, or remove the folder yourself")


def write_outputs(folder: Path, files: dict[str, list[dict]]) -> dict:
    """Write each file; its row count and sha256 (of the bytes written) for the card."""
    out = {}
    for name, rows in files.items():
        n = write_jsonl(folder / name, rows)
        out[name] = {"rows": n, "sha256": file_sha256(folder / name)}
    return out


def run_prepare(cfg: PrepareConfig) -> dict:
    started = time.time()
    raw_dir, out_dir = Path(cfg.raw_dir), Path(cfg.out_dir)
    check_replaceable_out(out_dir)  # before any work: a refusal should cost nothing
    if cfg.download:
        expected = cfg.expected_blobs or {t.file: t.blob for t in TASKS.values()}
        download(raw_dir, cfg.download_url, expected)
    sp = Path(cfg.system_prompt_file)
    if not sp.is_file():
        raise ConfigError(f"system_prompt_file: {sp} not found")
    system_prompt = sp.read_text(encoding="utf-8").strip()
    opts = CleanOptions(cfg.unrecoverable_mojibake, cfg.drop_truncated, cfg.drop_contradictory, cfg.skip_bad_items)
    lap = Laps()
    records, report = load_raw(raw_dir, system_prompt, opts, cfg.tasks or None)
    if not records:
        raise DataError(f"{raw_dir}: no usable records after cleaning")
    lap("load_and_clean")
    grouping = duplicate_groups(records, cfg.near_duplicate_threshold)
    lap("near_duplicates")
    splits = split_records(records, cfg.val_fraction, cfg.test_fraction, cfg.near_duplicate_threshold, cfg.seed,
                           grouping.groups)
    lap("split")
    leaks = leak_report(splits, cfg.near_duplicate_threshold)
    lap("closest_train")

    def keep(rows, tasks):
        return [r for r in rows if not tasks or r["task"] in tasks]

    files = {
        "sft/train.jsonl": [sft_row(r) for r in keep(splits["train"], cfg.sft_tasks)],
        "sft/validation.jsonl": [sft_row(r) for r in keep(splits["validation"], cfg.sft_tasks)],
        "grpo/train.jsonl": [prompt_row(r) for r in keep(splits["train"], cfg.grpo_tasks)],
        "grpo/validation.jsonl": [prompt_row(r) for r in keep(splits["validation"], cfg.grpo_tasks)],
        "eval/test.jsonl": [prompt_row(r) for r in keep(splits["test"], cfg.eval_tasks)],
        "records.jsonl": [r for s in ("train", "validation", "test") for r in splits[s]],
    }
    card = data_card(cfg, report, splits, records, grouping.stats(), leaks)
    lap("card_and_token_lengths")

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        card["outputs"] = write_outputs(tmp, files)
        lap("write")
        card["timings"] = lap.seconds
        card["seconds"] = round(time.time() - started, 2)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / CARD_MD).write_text(card_markdown(card), encoding="utf-8")
        dump_yaml(cfg, tmp / "prepare_config.yaml")

    check_replaceable_out(out_dir)  # again: the folder may have appeared while we worked
    atomic_save(out_dir, write)
    log.info("wrote %s (%d records: %s) in %.1fs", out_dir, len(records),
             ", ".join(f"{k} {len(v)}" for k, v in splits.items()), card["seconds"])
    return card


def data_card(cfg, report, splits, records, groups: dict, leaks: dict) -> dict:
    per_task = {}
    for split, rows in splits.items():
        for r in rows:
            per_task.setdefault(r["task"], Counter())[split] += 1
    card = {
        "source": {"repo": UPSTREAM_REPO, "commit": UPSTREAM_COMMIT, "raw_dir": cfg.raw_dir},
        "files": report["files"],
        "cleaning": {"removed": dict(report["removed"]), "repaired": dict(report["repaired"]),
                     "flagged": dict(report["flagged"]), "ignored_fields": dict(report["ignored_fields"]),
                     "contradictory_questions": report.get("contradictory_questions", 0)},
        "records": len(records),
        "splits": {k: len(v) for k, v in splits.items()},
        "per_task": {t: dict(c) for t, c in sorted(per_task.items())},
        "near_duplicates": {"threshold": cfg.near_duplicate_threshold, "judged_on": ["prompt", "answer"], **groups},
        # what the split leaves: each held-out item's closest train item, on prompt and on answer
        "closest_train": leaks,
        "labels": {"yes_no": dict(Counter(r["label_yesno"] for r in records if r["label_yesno"])),
                   "disease": len({r["label_disease"] for r in records if r["label_disease"]}),
                   "followup": sum(1 for r in records if r["label_followup"]),
                   "with_numbers": sum(1 for r in records if r["numbers"])},
    }
    if cfg.tokenizer:
        card["token_lengths"] = token_lengths(records, cfg.tokenizer)
    return card


def card_markdown(card: dict) -> str:
    lines = ["# ECG-Expert-QA data card", "",
             f"Source: `{card['source']['repo']}` at `{card['source']['commit'][:8]}`, read from "
             f"`{card['source']['raw_dir']}`. {card['records']} records after cleaning.", "",
             "## Files", "", "| file | task | items | records |", "| --- | --- | ---: | ---: |"]
    for f, d in card["files"].items():
        lines.append(f"| {f} | {d['task']} | {d['items']} | {d['records_after_cleaning']} |")
    lines += ["", "## Cleaning", "", "| what | count |", "| --- | ---: |"]
    for kind in ("removed", "repaired", "flagged"):
        for k, v in sorted(card["cleaning"][kind].items()):
            lines.append(f"| {kind}: {k.replace('_', ' ')} | {v} |")
    lines.append(f"| questions answered both Yes and No | {card['cleaning']['contradictory_questions']} |")
    nd = card["near_duplicates"]
    lines += ["", "## Splits", "",
              (f"Near-duplicates (word Jaccard >= {nd['threshold']} on the prompt, context and question, or on the "
               f"answer) stay on one side: {nd['items_in_groups']} records in {nd['groups']} groups (largest "
               f"{nd['largest']}; by prompt alone {nd['by_prompt']['items_in_groups']} records, by answer alone "
               f"{nd['by_answer']['items_in_groups']})."),
              "", "| task | train | validation | test |", "| --- | ---: | ---: | ---: |"]
    for t, c in card["per_task"].items():
        lines.append(f"| {t} | {c.get('train', 0)} | {c.get('validation', 0)} | {c.get('test', 0)} |")
    s = card["splits"]
    lines.append(f"| **all** | {s['train']} | {s['validation']} | {s['test']} |")
    lines += closest_train_markdown(card["closest_train"])
    lab = card["labels"]
    lines += ["", "## Labels", "", f"- yes/no: {lab['yes_no']}", f"- diseases: {lab['disease']}",
              f"- follow-up intervals: {lab['followup']}", f"- answers with numbers and units: {lab['with_numbers']}"]
    if "token_lengths" in card:
        tl = card["token_lengths"]
        lines += ["", f"## Token lengths (`{tl['tokenizer']}`)", "",
                  "| part | p50 | p90 | p95 | p99 | max |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for part in ("prompt", "answer", "total"):
            p = tl[part]
            lines.append(f"| {part} | {p['p50']} | {p['p90']} | {p['p95']} | {p['p99']} | {p['max']} |")
        lines += ["", "| task | answer p50 | answer p95 | answer max |", "| --- | ---: | ---: | ---: |"]
        for t, p in tl["answer_by_task"].items():
            lines.append(f"| {t} | {p['p50']} | {p['p95']} | {p['max']} |")
    lines += ["", "## Outputs", "", "Checked by `utils.data.card.verify_splits` before a phase reads them.", ""]
    lines += [f"- `{k}`: {v['rows']} rows, sha256 `{v['sha256']}`" for k, v in card["outputs"].items()]
    lines += ["", f"Prepared in {card['seconds']} s.", ""]
    return "\n".join(lines)


def closest_train_markdown(leaks: dict) -> list[str]:
    """The closest train item of each held-out item, on prompt and on answer: the distribution and the
    closest test pairs."""
    lines = ["", "### Closest train item of each held-out item", "",
             f"Word Jaccard similarity; the split keeps pairs at or above {leaks['threshold']} on one side.", "",
             "| held out | on | max | p99 | p95 | p50 | " + " | ".join(
                 f">= {t}" for t in leaks["test"]["prompt"].get("at_or_above", {})) + " |",
             "| --- | --- | ---: | ---: | ---: | ---: | " + " | ".join(
                 "---:" for _ in leaks["test"]["prompt"].get("at_or_above", {})) + " |"]
    for held in ("test", "validation"):
        for key, s in leaks[held].items():
            if s.get("items"):
                lines.append(f"| {held} | {key} | {s['max']} | {s['p99']} | {s['p95']} | {s['p50']} | "
                             + " | ".join(str(n) for n in s["at_or_above"].values()) + " |")
    for key, s in leaks["test"].items():
        if s.get("closest"):
            lines += ["", f"Closest test / train pairs on the {key}: " + ", ".join(
                f"{c['id']} / {c['train_id']} ({c['similarity']})" for c in s["closest"]) + "."]
    return lines
