"""The reward tooling of reward_model.py's other commands: ``score`` (a JSONL file through the mix),
``audit`` (adversarial completions against the honest reference) and ``terms`` (lexicon curation).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

from utils.core.config import UserError
from utils.data.rows import DataError, read_jsonl, read_split
from utils.data.text import extract_numbers, followup_interval, is_yes_no_question, yes_no_of
from utils.rewards.facts import FLIP_KINDS, flip_fact
from utils.rewards.lexicon import load_lexicon, term_tokens
from utils.rewards.mix import RewardMix
from utils.rewards.negatives import similar_answers, subsample
from utils.rewards.rules import completion_text

log = logging.getLogger(__name__)


# ============================================================================= score command
def complete_row(row: dict) -> dict:
    """A scoring row with the label columns the rewards read, filled in from the reference the way
    prepare_data.py labels its records when the row lacks them: ``label`` (yes/no) becomes
    ``label_yesno``; PRTK and yes/no questions get the reference's verdict; PP its follow-up period."""
    r = dict(row)
    lab = r.get("label")
    if "label_yesno" not in r:
        if isinstance(lab, str) and lab.strip().lower() in ("yes", "no"):
            r["label_yesno"] = lab.strip().lower()
        elif r.get("task") == "PRTK" or is_yes_no_question(r.get("question") or ""):
            r["label_yesno"] = yes_no_of(r.get("reference") or "")
        else:
            r["label_yesno"] = None
    if "followup_days" not in r:
        fu = followup_interval(r.get("reference") or "") if r.get("task") == "PP" else None
        r["followup_days"] = fu[1] if fu else None
    return r


def read_score_input(path: Path) -> list[dict]:
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no rows to score")
    for i, r in enumerate(rows, 1):
        for key in ("question", "reference", "completion"):
            v = r.get(key)
            if key == "completion" and isinstance(v, list):
                continue  # a conversational completion (TRL's message list)
            if not isinstance(v, str):
                raise DataError(f"{path}: line {i}: '{key}' is {'missing' if v is None else type(v).__name__}; "
                                "expected a string (lines need question, reference, completion)")
    return rows


def score_file(cfg: RewardMix) -> Path:
    """Score ``cfg.input`` with the configured mix; write each line back with ``rewards`` (every reward's
    value, None where it does not apply, and ``total``). Returns the output path."""
    if not cfg.input:
        raise UserError("score: --input FILE.jsonl is required (lines with question, reference, completion)")
    src = Path(cfg.input)
    dst = Path(cfg.output) if cfg.output else src.with_name(src.stem + ".scored.jsonl")
    rows = read_score_input(src)
    scored = cfg.score([completion_text(r["completion"]) for r in rows], [complete_row(r) for r in rows])
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r, s in zip(rows, scored):
            f.write(json.dumps({**r, "rewards": s}, ensure_ascii=False) + "\n")
    tmp.replace(dst)
    totals = [s["total"] for s in scored if s["total"] is not None]
    log.info("scored %d lines -> %s (mean total %.3f)", len(rows), dst, sum(totals) / max(1, len(totals)))
    return dst


# ============================================================================= reward-hacking audit
# Filler for "the right numbers in nonsense": words that carry no clinical meaning.
_NONSENSE = ("the purple elephant", "quietly sings about", "a teaspoon of", "over the mountain while",
             "seven umbrellas dance near", "because the moon prefers", "a bicycle made of", "tomorrow's cheese")


# Words appended to make a very long answer: fluent, on-topic sounding, and empty.
_PADDING = ("It is important to consider all of the relevant clinical factors in every case, to discuss the "
            "findings with a qualified healthcare professional, and to remember that individual circumstances "
            "can vary considerably from one patient to another.")


def _attack_keywords(row, ctx) -> str:
    lex_terms = ctx["terms"]
    ref_terms = sorted(ctx["lexicon"].find(row["reference"]))
    extra = ctx["rng"].sample(lex_terms, min(25, len(lex_terms)))
    return ", ".join(dict.fromkeys(ref_terms + extra)) + "."


def _attack_numbers(row, ctx) -> str:
    nums = [n["text"] for n in extract_numbers(row["reference"])]
    fu = followup_interval(row["reference"])
    if fu:
        nums.append(fu[0])
    rng = ctx["rng"]
    parts = []
    for n in nums or ["42"]:
        parts.append(f"{rng.choice(_NONSENSE).capitalize()} {n} {rng.choice(_NONSENSE)} {rng.choice(_NONSENSE)}.")
    return " ".join(parts)


ATTACKS = {
    "keyword stuffing": _attack_keywords,
    "repeat the question": lambda row, ctx: row["question"],
    "echo the system prompt": lambda row, ctx: ctx["system_prompt"],
    "'Yes' to everything": lambda row, ctx: "Yes.",
    "right numbers in nonsense": _attack_numbers,
    "empty answer": lambda row, ctx: "",
    "very long answer": lambda row, ctx: " ".join([row["reference"]] + [_PADDING] * 12),
    "answer to another question": lambda row, ctx: ctx["other"].get(row["id"]) or ctx["fallback"](row),
}


def _attack_flip(kind: str):
    def attack(row, ctx) -> str | None:
        flipped = flip_fact(row["reference"], ctx["rng"], kind)
        return flipped[0] if flipped else None

    return attack


# The reference with one key fact changed (utils/rewards/facts.py): fluent, nearly identical, wrong. Such an
# attack applies only to the items whose reference has a fact of its kind (None elsewhere) and is compared
# with the reference on those items; the audit also counts, pair by pair, the flipped answers that tie or
# nearly tie the reference of their own item.
FLIP_ATTACKS = {f"flipped {kind}": _attack_flip(kind) for kind in FLIP_KINDS}
ATTACKS.update(FLIP_ATTACKS)


HONEST = "reference (honest)"


# An attack "nearly ties" an item when its total comes within this of the reference's: a gap that small is
# what ROUGE-L and sentence similarity give any one-word change, and in a GRPO group it is lost in the
# spread of the other completions' totals.
TIE_MARGIN = 0.01


def build_audit(cfg: RewardMix, rows: list[dict]) -> dict[str, list[str | None]]:
    """For each attack (and the honest reference), one completion per row; None where the attack does
    not apply to the row (a flipped fact the reference does not have)."""
    sp = Path(cfg.system_prompt_file)
    system_prompt = sp.read_text(encoding="utf-8").strip() if sp.is_file() else ""
    if not system_prompt:
        system_prompt = next((m.get("content", "") for r in rows for m in (r.get("prompt") or [])
                              if isinstance(m, dict) and m.get("role") == "system"), "")
    lex = load_lexicon(cfg.term_lexicon)
    others = similar_answers(rows, cfg.term_lexicon)
    ctx = {"rng": random.Random(cfg.seed), "lexicon": lex, "terms": sorted(set(lex.terms.values())),
           "system_prompt": system_prompt, "other": {r["id"]: o for r, o in zip(rows, others)},
           "fallback": lambda row: rows[(rows.index(row) + 1) % len(rows)]["reference"]}
    out = {HONEST: [r["reference"] for r in rows]}
    for name, fn in ATTACKS.items():
        out[name] = [fn(r, ctx) for r in rows]
    return out


def _mean(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def run_audit(cfg: RewardMix) -> dict:
    """Score each attack and the honest reference on a seeded sample of test items with the
    configured mix. Returns {"rows": [{"completion", "items", "total", <reward>: mean, ...,
    "reference_total", "ties_or_wins", "near_ties", "below_reference"}], "passed": bool}.

    An attack is scored on the items it applies to (``items``); ``reference_total`` is the honest
    reference's mean total on those same items, ``ties_or_wins`` the share of them where the attack's
    total is at least the reference's, ``near_ties`` where it comes within :data:`TIE_MARGIN` of it.
    An attack passes when its mean total is below ``reference_total``; one that applies to no item is
    reported and not judged."""
    rows = subsample(read_split(cfg.data_dir, "eval/test"), cfg.audit_items, cfg.seed)
    completions = build_audit(cfg, rows)
    keys = [k for k in cfg.rewards] + ["total"]
    honest = cfg.score(completions[HONEST], rows)
    table = []
    for name, comps in completions.items():
        idx = [i for i, c in enumerate(comps) if c is not None]
        scored = honest if name == HONEST else \
            (cfg.score([comps[i] for i in idx], [rows[i] for i in idx]) if idx else [])
        entry = {"completion": name, "items": len(idx)}
        for key in keys:
            entry[key] = _mean([s.get(key) for s in scored])
        if name != HONEST:
            ref = [honest[i]["total"] for i in idx]
            entry["reference_total"] = _mean(ref)
            pairs = [(s["total"], r) for s, r in zip(scored, ref) if s["total"] is not None and r is not None]
            entry["ties_or_wins"] = round(sum(a >= r for a, r in pairs) / len(pairs), 4) if pairs else None
            entry["near_ties"] = round(sum(a > r - TIE_MARGIN for a, r in pairs) / len(pairs), 4) if pairs else None
            entry["below_reference"] = None if not idx else \
                (entry["total"] is not None and entry["reference_total"] is not None
                 and entry["total"] < entry["reference_total"])
        table.append(entry)
    result = {"mix": dict(cfg.rewards), "answer_format": cfg.answer_format, "reward_model": cfg.reward_model,
              "items": len(rows), "rows": table,
              "passed": all(e["below_reference"] is not False for e in table[1:])}
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def audit_table(result: dict) -> str:
    """The audit as a Markdown table: each completion's items, mean total and mean per reward, the
    reference's mean total on the same items, and the shares of items where the completion ties or
    beats the reference, and where it comes within TIE_MARGIN of it."""
    names = [k for k in result["mix"]]
    head = ("| completion | items | total | " + " | ".join(names)
            + f" | reference total | ties or wins | within {TIE_MARGIN} | below reference |")
    lines = [head, "|" + " --- |" * (len(names) + 7)]

    def num(x) -> str:
        return "" if x is None else f"{x:.3f}"

    for e in result["rows"]:
        cells = [num(e.get(n)) for n in names]
        below = "" if "below_reference" not in e else {None: "n/a", True: "yes", False: "**NO**"}[e["below_reference"]]
        lines.append(f"| {e['completion']} | {e.get('items', '')} | {num(e['total'])} | " + " | ".join(cells)
                     + f" | {num(e.get('reference_total'))} | {num(e.get('ties_or_wins'))} | {num(e.get('near_ties'))}"
                     + f" | {below} |")
    return "\n".join(lines)


# ============================================================================= lexicon curation aid
_STOP = set("""a an the and or of in on to for with by as at from is are was were be been being this that these
those it its their there which who whom whose what when where why how can could may might should would will do
does did not no yes you your i we our they he she his her them also such than then so if but about into over
under between during after before more most less very often usually typically include includes including
involves involve help helps ensure provide provides based due may well any all each other some further""".split())


def missing_terms(rows: list[dict], lexicon, top: int) -> list[tuple[str, int]]:
    """Frequent 1-3 word phrases of the references that the lexicon does not cover, by document
    frequency: candidates for a curator to add (or to leave out as too generic)."""
    counts: Counter = Counter()
    for r in rows:
        toks = term_tokens(r.get("reference") or "")
        grams = set()
        for n in (1, 2, 3):
            for i in range(len(toks) - n + 1):
                g = toks[i:i + n]
                if g[0] in _STOP or g[-1] in _STOP or any(t.isdigit() for t in g):
                    continue
                grams.add(tuple(g))
        counts.update(grams)
    known = set(lexicon.terms)
    out = []
    for g, c in counts.most_common():
        if g in known or any(g[i:i + n] in known for n in range(1, len(g) + 1) for i in range(len(g) - n + 1)):
            continue
        out.append((" ".join(g), c))
        if len(out) >= top:
            break
    return out


def run_terms(cfg: RewardMix) -> list[tuple[str, int]]:
    rows = read_split(cfg.data_dir, "grpo/train")
    lex = load_lexicon(cfg.term_lexicon)
    covered = sum(1 for r in rows if lex.find(r["reference"]))
    log.info("%s: %d terms; %d of %d train references (%.1f%%) name at least one", cfg.term_lexicon, len(lex),
             covered, len(rows), 100 * covered / max(1, len(rows)))
    return missing_terms(rows, lex, cfg.terms_top)
