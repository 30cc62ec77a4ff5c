"""How well a reward model ranks a policy's own answers, before it goes into GRPO's mix.

A reward model earns its place in GRPO only if, within one prompt's group, it orders the policy's answers the
way the benchmark does; otherwise its share of the advantage is its biases, which the policy finds
(docs/EXPERIMENTS.md, stops 24 and 32). The answers GRPO runs logged on the held-out validation prompts
(``heldout.jsonl``, greedy, from every evaluated step) are that policy's answers: for each prompt, pairs of
them of similar length whose benchmark scores differ clearly (:func:`utils.rewards.negatives.ranked_pairs`,
as the reward model's own ranked training pairs), scored by the reward model. ``scripts/rank_gate.py``
prints :func:`rank_gate`.
"""

from __future__ import annotations

from utils.core.config import UserError
from utils.data.rows import read_split
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
