"""How well a reward model ranks a policy's own answers, before it goes into GRPO's mix.

A reward model earns its place in GRPO only if, within one prompt's group, it orders the policy's answers the
way the benchmark does; otherwise its share of the advantage is its biases, which the policy finds
(docs/EXPERIMENTS.md, stops 24 and 32). The answers GRPO runs logged on the held-out validation prompts
(``heldout.jsonl``, greedy, from every evaluated step) are that policy's answers: for each prompt, pairs of
them of similar length whose benchmark scores differ clearly (:func:`utils.rewards.negatives.ranked_pairs`,
as the reward model's own ranked training pairs), scored by the reward model. ``scripts/rank_gate.py``
prints :func:`rank_gate`.

Such pairs are far apart: answers of different checkpoints. Within one GRPO group the sampled answers are
mostly close, and there a reward model may order them little better than a coin while its spread still
steers the advantage (stop 36). :func:`group_order` reads the groups the runs logged (``samples.jsonl``) and
measures the order on every pair of a group, and the reward's spread within a group beside the benchmark
score's.
"""

from __future__ import annotations

import statistics
from itertools import combinations
from pathlib import Path

from utils.core.artifacts import read_log
from utils.core.config import UserError
from utils.data.rows import read_split
from utils.training.grpo.callbacks import SAMPLES_LOG
from utils.training.grpo.compare import read_heldout


def policy_pairs(run_dirs: list[str], data_dir: str, per_prompt: int = 2) -> list[dict]:
    """Ranked pairs ``{"id", "task", "user", "reference", "chosen", "rejected"}`` of the answers the runs logged
    for each validation prompt (all their evaluated steps together), up to ``per_prompt`` a prompt, the widest
    benchmark-score gaps first."""
    from utils.rewards.negatives import ranked_pairs
    from utils.rewards.overlap import load_wordnet
    from utils.rewards.reward_model import user_text

    rows = {r["id"]: r for r in read_split(data_dir, "grpo/validation")}
    answers: dict[str, list[str]] = {}
    for d in run_dirs:
        for e in read_heldout(d):
            for it in e["items"]:
                if it.get("id") not in rows:
                    raise UserError(f"{d}: held-out item {it.get('id')!r} is not in {data_dir}/grpo/validation.jsonl; "
                                    "expected runs trained on this data folder")
                answers.setdefault(it["id"], []).append(str(it.get("answer") or ""))
    wordnet = load_wordnet()
    pairs = []
    for pid, texts in answers.items():
        row = rows[pid]
        ref = (row.get("reference") or "").strip()
        for better, worse in ranked_pairs(texts, ref, wordnet, per_prompt) if ref else []:
            pairs.append({"id": pid, "task": row.get("task"), "user": user_text(row), "reference": ref,
                          "chosen": better, "rejected": worse})
    return pairs


def rank_gate(reward_model: str, run_dirs: list[str], data_dir: str, per_prompt: int = 2,
              base_model: str | None = None) -> dict:
    """The reward model on :func:`policy_pairs`: the share of pairs it orders as the benchmark does (ties count
    half), the share of unequal-length pairs where it prefers the longer answer beside the share where the
    longer one is the better, and the pair and prompt counts."""
    from utils.rewards.reward_model import get_scorer
    from utils.training.reward_model import pairwise_accuracy, score_pairs

    pairs = policy_pairs(run_dirs, data_dir, per_prompt)
    if not pairs:
        raise UserError(f"{', '.join(run_dirs)}: no two logged answers to one prompt are far enough apart to rank; "
                        "expected runs with several held-out evaluations")
    chosen, rejected = score_pairs(get_scorer(reward_model, base_model), [{**p, "type": "ranked"} for p in pairs])
    acc = pairwise_accuracy([{"type": "ranked"} for _ in pairs], chosen, rejected)["overall"]["accuracy"]
    longer_model, longer_data = [], []
    for p, c, r in zip(pairs, chosen, rejected):
        nc, nr = len(p["chosen"].split()), len(p["rejected"].split())
        if nc != nr:
            longer_data.append(nc > nr)
            longer_model.append((c > r) == (nc > nr))
    share = (lambda xs: round(sum(xs) / len(xs), 4) if xs else None)
    return {"reward_model": reward_model, "pairs": len(pairs), "prompts": len({p["id"] for p in pairs}),
            "accuracy": acc, "prefers_longer": share(longer_model), "longer_is_better": share(longer_data)}


def logged_groups(run_dirs: list[str], data_dir: str) -> list[dict]:
    """The sampled groups the runs logged (``samples.jsonl``: the user turn, each completion), each as
    ``{"user", "reference", "answers"}`` with its reference found by the user turn among the train prompts
    (a user turn that two train items with different references share is left out)."""
    from utils.rewards.reward_model import user_text

    refs: dict[str, str | None] = {}
    for r in read_split(data_dir, "grpo/train"):
        u, ref = user_text(r), (r.get("reference") or "").strip()
        refs[u] = ref if refs.get(u, ref) == ref else None
    groups = []
    for d in run_dirs:
        path = Path(d) / SAMPLES_LOG
        if not path.is_file():
            raise UserError(f"{d}: no {SAMPLES_LOG} (grpo_train.py writes it when sample_steps > 0)")
        for entry in read_log(path, repair=False):  # read-only: the run may still be appending
            by: dict[str, list[str]] = {}
            for it in entry.get("items") or []:
                by.setdefault(str(it.get("question", "")), []).append(str(it.get("completion") or ""))
            for user, answers in by.items():
                if refs.get(user) and len(answers) >= 2:
                    groups.append({"user": user, "reference": refs[user], "answers": answers})
    if not groups:
        raise UserError(f"{', '.join(run_dirs)}: no logged group of 2 or more completions to a train prompt of "
                        f"{data_dir}; expected GRPO runs on this data folder")
    return groups


def group_order(reward_model: str, run_dirs: list[str], data_dir: str, base_model: str | None = None) -> dict:
    """The reward (as GRPO pays it) of every logged completion, against the benchmark's score within each
    group: the share of pairs ordered alike over every pair of a group, and over the far pairs that
    :func:`rank_gate` would build; the mean standard deviation within a group of the reward and of the
    benchmark score."""
    from utils.rewards.negatives import far_apart
    from utils.rewards.overlap import benchmark_score, load_wordnet
    from utils.rewards.reward_model import get_scorer
    from utils.training.reward_model import pairwise_accuracy

    groups = logged_groups(run_dirs, data_dir)
    scorer, wordnet = get_scorer(reward_model, base_model), load_wordnet()
    kinds, chosen, rejected, spread, bench_spread = [], [], [], [], []
    for g in groups:
        n = len(g["answers"])
        paid = scorer.preference([None] * n, [g["user"]] * n, g["answers"], [g["reference"]] * n)
        bench = [benchmark_score(a, g["reference"], wordnet) for a in g["answers"]]
        words = [len(a.split()) for a in g["answers"]]
        ok = [i for i in range(n) if paid[i] is not None]
        if len(ok) >= 2:
            spread.append(statistics.pstdev([paid[i] for i in ok]))
            bench_spread.append(statistics.pstdev([bench[i] for i in ok]))
        for i, j in combinations(ok, 2):
            if bench[i] != bench[j]:  # the benchmark's better answer is the pair's chosen one
                better, worse = (i, j) if bench[i] > bench[j] else (j, i)
                kinds.append({"type": "far" if far_apart(bench[i], bench[j], words[i], words[j]) else "close"})
                chosen.append(paid[better])
                rejected.append(paid[worse])
    acc = pairwise_accuracy(kinds, chosen, rejected)
    mean = (lambda xs: round(statistics.mean(xs), 4) if xs else None)
    return {"reward_model": reward_model, "groups": len(groups), "pairs": len(kinds),
            "accuracy": acc.get("overall", {}).get("accuracy"), "far_pairs": acc.get("far", {}).get("pairs", 0),
            "far_accuracy": acc.get("far", {}).get("accuracy"), "spread": mean(spread),
            "benchmark_spread": mean(bench_spread)}
