"""Evaluation: every model answers the same questions; the answers are scored, compared and reported.

:func:`run_evaluation` does, in order:

1. **items** (:mod:`.config`): the test split, optionally sampled per task and capped, or a user's own
   JSONL file (``question`` and ``answer`` per line, ``task`` optional);
2. **answers** (:mod:`.answers`): each model generates in batches; answers are cached per model, so a
   rerun or an interrupted run generates only what is missing;
3. **scores** (:mod:`.metrics`): the metrics that are also rewards come from
   :func:`utils.rewards.mix.score_rows`, the code GRPO trains with; evaluation adds only its own figures
   (BLEU-1, METEOR, key-term precision and recall, answer length) and the optional judge (:mod:`.judge`);
4. **statistics** (:mod:`.stats`): a bootstrap confidence interval for every figure, and paired
   comparisons between models on the same items;
5. **report** (:mod:`.report`): ``<out_dir>/<run>/``, written to a temporary folder first so that a
   failed run leaves nothing half-written.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from utils.core.runtime import launched_processes, set_threads
from utils.data.formats import parse
from utils.evaluation.answers import generate_answers, resolve_models
from utils.evaluation.config import EvalConfig, load_items
from utils.evaluation.judge import Judge
from utils.evaluation.leakage import check_test_items, training_stopped_early
from utils.evaluation.metrics import METRIC_BY_NAME, METRICS, cached_scores, reward_model_status
from utils.evaluation.stats import EvalResult, compare_models, summarize
from utils.rewards.lexicon import load_lexicon
from utils.rewards.overlap import load_wordnet

log = logging.getLogger(__name__)


# ============================================================================= the run
def run_evaluation(cfg: EvalConfig) -> tuple[EvalResult | None, Path]:
    """Generate, score, compare and report (see the module docstring). Returns the result and the report
    folder; under several processes, the result on the first only (the others share the generation)."""
    from utils.evaluation.report import report_dir, write_report

    started = time.time()
    # Several processes (accelerate launch, torchrun) share the generation; the first scores and reports.
    # A process that finishes its share waits for the slowest at the gather, which a long answer list on
    # a slow machine can keep busy well past torch's default 10-30 minutes.
    state = launched_processes(timeout_minutes=24 * 60)
    set_threads(cfg.num_threads)
    if state is not None and not state.is_main_process:
        logging.getLogger("utils").setLevel(logging.ERROR)  # one process tells the story
    # Everything that can be wrong with the input is checked before the first answer is generated.
    rows, source = load_items(cfg)
    specs = resolve_models(cfg)
    out = report_dir(cfg, specs)
    notes: list[str] = []
    reward_model, note = reward_model_status(cfg)
    if note:
        log.warning("%s", note)
        notes.append(note)
    for spec in specs:  # no model is scored on questions it was trained on
        note = check_test_items(spec.name, spec.path, rows, None if cfg.input else cfg.test_file)
        if note:
            notes.append(note)
        note = training_stopped_early(spec.name, spec.path)
        if note:
            log.warning("%s", note)
            notes.append(note)
    judge = Judge(cfg) if cfg.judge != "none" and (state is None or state.is_main_process) else None
    load_lexicon(cfg.term_lexicon)
    wordnet = load_wordnet()
    if wordnet is None:
        notes.append("METEOR left out: nltk finds no WordNet data (run `bash scripts/setup_wordnet.sh`).")
    log.info("evaluating %s on %s", ", ".join(s.name for s in specs), source)

    answers, runs, scores, replies = {}, {}, {}, {}
    for spec in specs:
        answers[spec.name], runs[spec.name] = generate_answers(spec, rows, cfg, state)
    if state is not None:
        # no collective call follows: leave the group now, or a process exiting while gloo's threads still
        # run can abort ("terminate called without an active exception", seen once in CI)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if not state.is_main_process:
            return None, out
        # the other processes are done: their CPU threads are free for the scoring
        set_threads(cfg.num_threads * state.num_processes)
    for spec in specs:
        scores[spec.name] = cached_scores(spec.name, answers[spec.name], rows, spec.answer_format, cfg, reward_model)
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
