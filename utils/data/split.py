"""Train / validation / test split without leaks: near-duplicates stay on one side.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

from utils.data.raw import CONTEXT_KEYED
from utils.data.text import jaccard, words


# ============================================================================= near duplicates and split
def near_duplicate_groups(questions: list[str], threshold: float) -> list[int]:
    """Group index per question; questions whose word-set Jaccard similarity >= threshold share a group
    (transitively). Exact: prefix filtering finds every such pair without comparing all of them."""
    sets = [frozenset(words(q)) for q in questions]
    freq = Counter(w for s in sets for w in s)
    ordered = [sorted(s, key=lambda w: (freq[w], w)) for s in sets]
    parent = list(range(len(sets)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    index: dict[str, list[int]] = defaultdict(list)
    for i, toks in enumerate(ordered):
        n = len(toks)
        # Two sets with Jaccard >= t share a token among the first n - ceil(t*n) + 1 rarest of each.
        prefix = n - int(-(-threshold * n // 1)) + 1 if n else 0
        cands = set()
        for w in toks[:prefix]:
            cands.update(index[w])
            index[w].append(i)
        for j in cands:
            if find(i) != find(j) and jaccard(sets[i], sets[j]) >= threshold:
                parent[find(i)] = find(j)
        if not toks:  # a question with no words only matches its exact twins
            index["\x00empty"].append(i)
    return [find(i) for i in range(len(sets))]


def dedup_key(r: dict) -> str:
    """The text near-duplicates are judged on (see CONTEXT_KEYED)."""
    return f"{r['context']}\n{r['question']}" if r["task"] in CONTEXT_KEYED and r["context"] else r["question"]


def split_records(records: list[dict], val_fraction: float, test_fraction: float, threshold: float,
                  seed: int) -> dict[str, list[dict]]:
    """Deterministic train/validation/test split, stratified by task, near-duplicate groups kept whole.

    Each group goes to one split as a unit, by the task of its first member; groups are ordered by a
    seeded hash of their questions, so the split does not depend on file order.
    """
    groups = near_duplicate_groups([dedup_key(r) for r in records], threshold)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_task: dict[str, list[list[int]]] = defaultdict(list)
    for g, idxs in members.items():
        by_task[records[idxs[0]]["task"]].append(idxs)
    out = {"train": [], "validation": [], "test": []}
    for task in sorted(by_task):
        gs = by_task[task]
        gs.sort(key=lambda idxs: hashlib.sha1(f"{seed}:{min(records[i]['id'] for i in idxs)}".encode()).hexdigest())
        total = sum(len(g) for g in gs)
        n_test, n_val = round(total * test_fraction), round(total * val_fraction)
        taken = Counter()
        for idxs in gs:
            # singletons fill the held-out splits first, so big groups of paraphrases train
            target = ("test" if taken["test"] + len(idxs) <= n_test and len(idxs) <= max(1, n_test // 20) else
                      "validation" if taken["validation"] + len(idxs) <= n_val and len(idxs) <= max(1, n_val // 20)
                      else "train")
            taken[target] += len(idxs)
            out[target].extend(records[i] for i in idxs)
    for k in out:
        out[k].sort(key=lambda r: r["id"])
        for r in out[k]:
            r["split"] = k
    for i, g in enumerate(groups):
        records[i]["group"] = f"g{g}"
    return out
