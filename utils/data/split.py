"""Train / validation / test split without leaks: near-duplicates stay on one side.

A leak is judged on what the model sees and what it is scored against: two records are near-duplicates
when their prompts (every turn up to the answer: context and question) or their answers reach the word
Jaccard threshold. Either alone is a leak: the same advice asked in other words has the same answer to
memorise, and two questions whose answers match word for word teach the test answer. The data card then
measures what is left: each held-out item's closest train item on prompt and on answer.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass

from utils.data.text import words

# Similarities the data card counts held-out items at or above (the split's own threshold is added).
REPORT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


# ============================================================================= near duplicates
class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps chains short
            i = parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[ri] = rj

    def roots(self) -> list[int]:
        return [self.find(i) for i in range(len(self.parent))]


def near_duplicate_groups(texts: list[str], threshold: float) -> list[int]:
    """Group index per text; texts whose word-set Jaccard similarity >= threshold share a group
    (transitively). Exact: prefix filtering finds every such pair without comparing all of them."""
    sets = [frozenset(words(q)) for q in texts]
    freq = Counter(w for s in sets for w in s)
    ordered = [sorted(s, key=lambda w: (freq[w], w)) for s in sets]
    sizes = [len(s) for s in sets]
    uf = UnionFind(len(sets))

    index: dict[str, list[int]] = defaultdict(list)
    for i, toks in enumerate(ordered):
        n = len(toks)
        # Two sets with Jaccard >= t share a token among the first n - ceil(t*n) + 1 rarest of each.
        prefix = n - int(-(-threshold * n // 1)) + 1 if n else 0
        cands = set()
        for w in toks[:prefix]:
            cands.update(index[w])
            index[w].append(i)
        # Jaccard <= min/max of the sizes: a size outside [t*n, n/t] cannot reach t (the margin keeps
        # rounding from skipping a real pair); this skips most candidates before any set is intersected.
        lo, hi = threshold * n - 1e-9, n / threshold + 1e-9
        a = sets[i]
        for j in cands:
            nj = sizes[j]
            if lo <= nj <= hi and uf.find(i) != uf.find(j):
                inter = len(a & sets[j])
                if inter / (n + nj - inter) >= threshold:  # jaccard(), without building the union
                    uf.union(i, j)
        if not toks:  # a text with no words only matches its exact twins
            cands = index["\x00empty"]
            if cands:
                uf.union(i, cands[0])
            cands.append(i)
    return uf.roots()


def merge_groups(*groupings: list[int]) -> list[int]:
    """One group per item such that items sharing a group in any of ``groupings`` share it here."""
    uf = UnionFind(len(groupings[0]))
    for grouping in groupings:
        first: dict[int, int] = {}
        for i, g in enumerate(grouping):
            uf.union(i, first.setdefault(g, i))
    return uf.roots()


def prompt_text(r: dict) -> str:
    """What the model is given: every turn before the answer (context and question), the system prompt
    left out because every record shares it."""
    return "\n".join(m["content"] for m in r["messages"][:-1] if m["role"] != "system")


def answer_text(r: dict) -> str:
    return r["reference"]


# The two texts a near-duplicate is judged on, each on its own.
KEYS = {"prompt": prompt_text, "answer": answer_text}


@dataclass
class Grouping:
    groups: list[int]             # group per record: near-duplicates on prompt or answer, transitively
    by_key: dict[str, list[int]]  # the groups each key alone makes

    def stats(self) -> dict:
        def count(groups):
            sizes = Counter(groups).values()
            return {"items_in_groups": sum(n for n in sizes if n > 1), "groups": sum(1 for n in sizes if n > 1),
                    "largest": max(sizes, default=0)}
        return {**count(self.groups), **{f"by_{k}": count(g) for k, g in self.by_key.items()}}


def duplicate_groups(records: list[dict], threshold: float) -> Grouping:
    by_key = {k: near_duplicate_groups([fn(r) for r in records], threshold) for k, fn in KEYS.items()}
    return Grouping(merge_groups(*by_key.values()), by_key)


# ============================================================================= split
def split_records(records: list[dict], val_fraction: float, test_fraction: float, threshold: float,
                  seed: int, groups: list[int] | None = None) -> dict[str, list[dict]]:
    """Deterministic train/validation/test split, stratified by task, near-duplicate groups kept whole.

    ``groups`` (one per record, e.g. :func:`duplicate_groups`'s) is computed here when not given. Each group
    goes to one split as a unit, by the task of its first member; groups are ordered by a seeded hash of
    their ids, so the split does not depend on file order.
    """
    if groups is None:
        groups = duplicate_groups(records, threshold).groups
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


# ============================================================================= what is left: closest train items
def nearest_neighbours(queries: list[str], pool: list[str], chunk: int = 256) -> list[tuple[float, int]]:
    """For each query, ``(word Jaccard, index)`` of its most similar text in ``pool`` (index -1 when it
    shares no word with any). Exact, through an inverted index: a sparse product counts the shared words
    of every (query, pool) pair that shares one, so pairs with nothing in common cost nothing."""
    import numpy as np
    from scipy import sparse

    vocab: dict[str, int] = {}
    q_sets = [{vocab.setdefault(w, len(vocab)) for w in words(t)} for t in queries]
    p_sets = [{vocab.setdefault(w, len(vocab)) for w in words(t)} for t in pool]

    def matrix(sets):
        cols = np.fromiter((c for s in sets for c in s), dtype=np.int64)
        indptr = np.cumsum([0] + [len(s) for s in sets])
        return sparse.csr_matrix((np.ones(len(cols), dtype=np.int32), cols, indptr), shape=(len(sets), len(vocab)))

    q_len = np.array([len(s) for s in q_sets], dtype=np.float64)
    p_len = np.array([len(s) for s in p_sets], dtype=np.float64)
    pool_t = matrix(p_sets).T.tocsc()
    empty_in_pool = next((j for j, s in enumerate(p_sets) if not s), -1)
    q_mat = matrix(q_sets)
    out: list[tuple[float, int]] = []
    for start in range(0, len(q_sets), chunk):
        inter = (q_mat[start:start + chunk] @ pool_t).tocsr()
        for r in range(inter.shape[0]):
            i = start + r
            lo, hi = inter.indptr[r], inter.indptr[r + 1]
            if not q_sets[i]:  # no words: like jaccard(), only another wordless text is the same
                out.append((1.0, empty_in_pool) if empty_in_pool >= 0 else (0.0, -1))
                continue
            if lo == hi:
                out.append((0.0, -1))
                continue
            shared, cols = inter.data[lo:hi].astype(np.float64), inter.indices[lo:hi]
            sims = shared / (q_len[i] + p_len[cols] - shared)  # |a & b| / |a | b|, as jaccard() divides
            best = int(np.argmax(sims))
            out.append((float(sims[best]), int(cols[best])))
    return out


def similarity_summary(best: list[tuple[float, int]], ids: list[str], pool_ids: list[str], threshold: float,
                       top: int = 10) -> dict:
    """Distribution of held-out items' closest-train similarities, the counts at or above thresholds and
    the ``top`` closest pairs by id."""
    sims = sorted(s for s, _ in best)
    if not sims:
        return {"items": 0}

    def pick(p):
        return sims[min(len(sims) - 1, round(p / 100 * (len(sims) - 1)))]

    thresholds = sorted(set(REPORT_THRESHOLDS) | {threshold})
    order = sorted(range(len(best)), key=lambda i: (-best[i][0], ids[i]))[:top]
    return {"items": len(sims), "max": round(sims[-1], 4), "p99": round(pick(99), 4), "p95": round(pick(95), 4),
            "p50": round(pick(50), 4), "mean": round(sum(sims) / len(sims), 4),
            "at_or_above": {str(t): sum(1 for s in sims if s >= t) for t in thresholds},
            "closest": [{"id": ids[i], "train_id": pool_ids[best[i][1]] if best[i][1] >= 0 else None,
                         "similarity": round(best[i][0], 4)} for i in order]}


def leak_report(splits: dict[str, list[dict]], threshold: float, top: int = 10) -> dict:
    """For validation and test: each item's closest train item, on prompt and on answer separately."""
    train = splits["train"]
    train_ids = [r["id"] for r in train]
    report = {"threshold": threshold}
    for held in ("test", "validation"):
        rows = splits[held]
        report[held] = {k: similarity_summary(nearest_neighbours([fn(r) for r in rows], [fn(r) for r in train]),
                                              [r["id"] for r in rows], train_ids, threshold, top)
                        for k, fn in KEYS.items()}
    return report
