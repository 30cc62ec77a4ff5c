"""The evaluation report: ``reports/<run>/`` with report.md, a self-contained report.html, plots/*.png,
metrics.json, answers.jsonl and the resolved config.

The Markdown and the HTML are rendered from one list of blocks (headings, paragraphs, tables, images,
quoted answers), so the two always say the same. The HTML embeds its images as base64 data URIs and
carries its own CSS: it opens anywhere, as one file. Training curves come from the model folders' logs
(:func:`training_history`); a plot with no data is left out with a note.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from utils.evaluation.answers import ModelSpec
from utils.evaluation.metrics import METRIC_BY_NAME, METRICS
from utils.evaluation.stats import EvalResult

log = logging.getLogger(__name__)

# Per-task tables and plots keep to the figures a reader compares first.
TASK_METRICS = ["rouge", "bleu1", "meteor", "semantic", "yesno", "terms", "numbers", "total", "judge"]
GROUP_TITLES = {"overlap": "Overlap with the reference (the benchmark's metrics)",
                "clinical": "Clinical content", "form": "Form, preference and length"}
# What a report folder written before the completion marker existed holds (it may be replaced too).
REPORT_FILES = ("report.md", "metrics.json", "eval_config.yaml")
ANSWER_CHARS = 1500  # longer answers are cut in the report (answers.jsonl keeps them whole)


# ============================================================================= blocks
@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: str      # relative to the report folder
    caption: str


@dataclass
class Quote:
    title: str
    text: str


def to_markdown(blocks: list) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Table):
            def cell(x: str) -> str:
                return str(x).replace("|", "\\|").replace("\n", "<br>")

            out.append("| " + " | ".join(cell(h) for h in b.header) + " |")
            out.append("| " + " | ".join("---" if i == 0 else "---:" for i in range(len(b.header))) + " |")
            out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in b.rows]
            out.append("")
        elif isinstance(b, Image):
            out += [f"![{b.caption}]({b.path})", ""]
        elif isinstance(b, Quote):
            out.append(f"**{b.title}**")
            out += ["> " + line if line.strip() else ">" for line in (b.text or "(empty)").splitlines()]
            out.append("")
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.88em}
th,td{border:1px solid #ccc;padding:0.3em 0.6em;vertical-align:top}
th{background:#f3f3f3}td:not(:first-child){text-align:right;white-space:nowrap}
blockquote{margin:0.2em 0 1em;padding:0.4em 0.8em;border-left:4px solid #8aa;background:#f7fafa;white-space:pre-wrap}
img{max-width:100%;border:1px solid #eee}h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:2em}
.title{font-weight:600;margin-top:0.6em}
"""


def to_html(blocks: list, folder: Path, title: str) -> str:
    """One self-contained page: images inlined as data URIs, no external CSS or script."""
    e = html.escape
    out = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Table):
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr></thead><tbody>")
            for r in b.rows:
                out.append("<tr>" + "".join(f"<td>{e(str(c)).replace(chr(10), '<br>')}</td>" for c in r) + "</tr>")
            out.append("</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode((folder / b.path).read_bytes()).decode("ascii")
            out.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{e(b.caption)}\">"
                       f"<figcaption>{e(b.caption)}</figcaption></figure>")
        elif isinstance(b, Quote):
            out.append(f"<div class=\"title\">{e(b.title)}</div><blockquote>{e(b.text or '(empty)')}</blockquote>")
    out.append("</body></html>")
    return "\n".join(out)


# ============================================================================= formatting
def fmt_value(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if not METRIC_BY_NAME[metric].unit else f"{v:.3f}"


def fmt_ci(metric: str, ci: dict | None, with_n: bool = False) -> str:
    if not ci:
        return "-"
    s = f"{fmt_value(metric, ci['mean'])} [{fmt_value(metric, ci['lo'])}, {fmt_value(metric, ci['hi'])}]"
    return s + (f" n={ci['n']}" if with_n else "")


def fmt_diff(metric: str, d: dict | None) -> str:
    if not d:
        return "-"
    f = (lambda x: f"{x:+.1f}") if not METRIC_BY_NAME[metric].unit else (lambda x: f"{x:+.3f}")
    return f"{f(d['mean'])} [{f(d['lo'])}, {f(d['hi'])}]"


def clip(text: str, n: int = ANSWER_CHARS) -> str:
    text = text or ""
    return text if len(text) <= n else text[:n].rstrip() + f" … [{len(text) - n} more characters]"


# ============================================================================= training logs
CURVE_PANELS = [
    ("loss", [("loss", "train"), ("eval_loss", "validation")]),
    ("reward", [("reward", "train"), ("eval_reward", "validation")]),
    # GRPO's held-out figure is the weighted mean of the rewards (0-1), TRL's train reward their weighted
    # sum: two scales, two panels
    ("held-out reward (greedy)", [("heldout/total", "held-out")]),
    ("KL", [("kl", "train"), ("eval_kl", "validation")]),
    ("completion length (tokens)", [("completions/mean_length", "train"), ("completion_length", "train"),
                                    ("eval_completions/mean_length", "validation")]),
]


def _read_state(path: Path) -> list[dict] | None:
    try:
        hist = json.loads(path.read_text(encoding="utf-8")).get("log_history")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return [h for h in hist if isinstance(h, dict) and "step" in h] if isinstance(hist, list) else None


def _read_tensorboard(run_dir: Path) -> list[dict] | None:
    """Scalars of the newest TensorBoard log under ``run_dir`` as Trainer-style log entries
    ('train/loss' -> 'loss', 'eval/loss' -> 'eval_loss')."""
    files = sorted(run_dir.rglob("events.out.tfevents*"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        # its reader logs every torn or still-open event file at INFO: expected here, not news
        logging.getLogger("tensorboard").setLevel(logging.WARNING)
        acc = EventAccumulator(str(files[-1].parent), size_guidance={"scalars": 0})
        acc.Reload()
    except Exception as e:  # a torn event file must not stop the report
        log.warning("%s: TensorBoard log unreadable (%s)", files[-1].parent, e)
        return None
    by_step: dict[int, dict] = {}
    for tag in acc.Tags().get("scalars", []):
        key = (tag[len("train/"):] if tag.startswith("train/")
               else "eval_" + tag[len("eval/"):] if tag.startswith("eval/") else tag)
        for ev in acc.Scalars(tag):
            by_step.setdefault(int(ev.step), {"step": int(ev.step)})[key] = ev.value
    return [by_step[s] for s in sorted(by_step)] or None


def _read_metrics(path: Path) -> list[dict] | None:
    """The logs a phase keeps in its model folder's metrics.json (SFT: train_loss, eval_loss; GRPO:
    train_curve, heldout), merged into one Trainer-style entry per step."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    by_step: dict[int, dict] = {}
    for key in ("train_loss", "eval_loss", "train_curve", "heldout"):
        entries = m.get(key) if isinstance(m, dict) else None
        for e in entries if isinstance(entries, list) else []:
            if isinstance(e, dict) and isinstance(e.get("step"), (int, float)):
                by_step.setdefault(int(e["step"]), {"step": int(e["step"])}).update(
                    {k: v for k, v in e.items() if v is not None})
    return [by_step[s] for s in sorted(by_step)] or None


def training_history(folder: str | Path) -> tuple[str, list[dict]] | None:
    """The training log of a model folder, as ``(source, Trainer-style log entries)``, or None.

    The folder's own record comes first (a ``trainer_state.json`` in it or one level down, or the logs in
    its ``metrics.json``): it belongs to this very model. Only when it has none is the run folder its
    ``train_config.yaml`` names read (the newest checkpoint's ``trainer_state.json`` or the TensorBoard
    log), since a later run may have reused that folder. Among candidates the longest log wins."""
    from utils.core.artifacts import checkpoints, read_train_config

    folder = Path(folder)
    if not folder.is_dir():
        return None

    def longest(found):
        return max(found, key=lambda f: (max(h["step"] for h in f[1]), len(f[1]))) if found else None

    own: list[tuple[str, list[dict]]] = []
    for p in [folder / "trainer_state.json", *sorted(folder.glob("*/trainer_state.json"))]:
        if p.is_file() and (h := _read_state(p)):
            own.append((str(p), h))
    if (folder / "metrics.json").is_file() and (h := _read_metrics(folder / "metrics.json")):
        own.append((str(folder / "metrics.json"), h))
    if own:
        return longest(own)
    run: list[tuple[str, list[dict]]] = []
    run_dir = (read_train_config(folder) or {}).get("run_dir")
    if run_dir and Path(run_dir).is_dir():
        ckpts = checkpoints(run_dir)
        if ckpts and (h := _read_state(ckpts[-1] / "trainer_state.json")):
            run.append((str(ckpts[-1] / "trainer_state.json"), h))
        if h := _read_tensorboard(Path(run_dir)):
            run.append((f"the TensorBoard log in {run_dir}", h))
    return longest(run)


def curve_series(history: list[dict]) -> list[tuple[str, list[tuple[str, list, list]]]]:
    """The panels of :data:`CURVE_PANELS` that have data: ``[(title, [(label, steps, values)])]``."""
    panels = []
    for title, keys in CURVE_PANELS:
        lines, labels = [], set()
        for key, label in keys:
            pts = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
            if pts and label not in labels:
                labels.add(label)
                lines.append((label, [p[0] for p in pts], [p[1] for p in pts]))
        if lines:
            panels.append((title, lines))
    return panels


# ============================================================================= plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, result: EvalResult, metrics: list[str], group: str):
    import numpy as np

    names = [s.name for s in result.models]
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(metrics))
    for k, name in enumerate(names):
        figs = result.summary["figures"][name][group]
        means = [figs[m]["mean"] if figs.get(m) else np.nan for m in metrics]
        err = [[(figs[m]["mean"] - figs[m]["lo"]) if figs.get(m) else 0 for m in metrics],
               [(figs[m]["hi"] - figs[m]["mean"]) if figs.get(m) else 0 for m in metrics]]
        ax.bar(x + (k - (len(names) - 1) / 2) * width, means, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(x)
    ax.set_xlim(-0.5, len(metrics) - 0.5)
    return x


def plot_metrics_by_model(result: EvalResult, path: Path) -> bool:
    metrics = [m for m in result.metrics if METRIC_BY_NAME[m].unit]
    if not metrics:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(metrics) + 2), 4))
    _bars(ax, result, metrics, "all")
    ax.set_xticklabels([METRIC_BY_NAME[m].label for m in metrics], rotation=30, ha="right")
    maj = result.summary["majority"].get("all")
    if maj and "yesno" in metrics:
        i = metrics.index("yesno")
        ax.plot([i - 0.45, i + 0.45], [maj["accuracy"]] * 2, "k--", lw=1, label="yes/no majority")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"mean ({int(result.cfg.confidence * 100)}% CI)")
    ax.set_title(f"All tasks, {len(result.rows)} questions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_metrics_by_task(result: EvalResult, path: Path) -> bool:
    metrics = [m for m in TASK_METRICS if m in result.metrics]
    tasks = [g for g in result.summary["groups"] if g != "all"]
    if not metrics or not tasks:
        return False
    plt = _plt()
    cols = 2
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.8 * rows), squeeze=False)
    names = [s.name for s in result.models]
    import numpy as np

    width = 0.8 / len(names)
    for ax, m in zip(axes.flat, metrics):
        x = np.arange(len(tasks))
        for k, name in enumerate(names):
            figs = [result.summary["figures"][name][t].get(m) for t in tasks]
            means = [f["mean"] if f else np.nan for f in figs]
            err = [[f["mean"] - f["lo"] if f else 0 for f in figs], [f["hi"] - f["mean"] if f else 0 for f in figs]]
            ax.bar(x + (k - (len(names) - 1) / 2) * width, means, width, yerr=err, capsize=2, label=name)
        if m == "yesno":
            for i, t in enumerate(tasks):
                maj = result.summary["majority"].get(t)
                if maj:
                    ax.plot([i - 0.45, i + 0.45], [maj["accuracy"]] * 2, "k--", lw=1)
        ax.set_xticks(x)
        ax.set_xticklabels(tasks)
        ax.set_xlim(-0.5, len(tasks) - 0.5)  # keep every task's slot, also where a metric does not apply
        ax.set_ylim(0, 1.05)
        ax.set_title(METRIC_BY_NAME[m].label + (" (dashes: majority)" if m == "yesno" else ""), fontsize=10)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_lengths(result: EvalResult, path: Path) -> bool:
    plt = _plt()
    data = [[d["words"] for d in result.scores[s.name]] for s in result.models]
    data.append([float(len((r.get("reference") or "").split())) for r in result.rows])
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(data) + 2), 3.5))
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(data) + 1))
    ax.set_xticklabels([s.name for s in result.models] + ["reference"])
    ax.set_ylabel("words")
    ax.set_title("Answer length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_training(name: str, source: str, panels, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels):
        for label, steps, values in lines:
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if len(lines) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"{name}: training curves", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================= the report
def report_dir(cfg, specs: list[ModelSpec]) -> Path:
    name = cfg.run_name or "-".join(s.name for s in specs) + (f"-{Path(cfg.input).stem}" if cfg.input else "")
    return Path(cfg.out_dir) / name


def _metric_table(result: EvalResult, metrics: list[str], group: str) -> Table:
    rows = []
    balanced = result.summary.get("balanced_accuracy", {})
    for s in result.models:
        figs = result.summary["figures"][s.name][group]
        bal = balanced.get(s.name, {}).get(group)
        rows.append([s.name] + [fmt_ci(m, figs.get(m)) + (f"; balanced {bal:.3f}" if m == "yesno" and bal is not None
                                                           else "") for m in metrics])
    maj = result.summary["majority"].get(group)
    if maj and "yesno" in metrics:
        # always one label: balanced accuracy 0.5 whatever the share
        bal = "; balanced 0.500" if maj["accuracy"] < 1 else ""  # both labels present
        rows.append(["majority baseline"] + [f"{maj['accuracy']:.3f} (always {maj['label']}){bal}"
                                             if m == "yesno" else "" for m in metrics])
    ns = []
    for m in metrics:
        counts = {(result.summary["figures"][s.name][group].get(m) or {}).get("n", 0) for s in result.models}
        ns.append("/".join(str(c) for c in sorted(counts)))
    rows.append(["items scored"] + ns)
    return Table(["model"] + [METRIC_BY_NAME[m].label for m in metrics], rows)


def build_blocks(result: EvalResult, plots: dict[str, str], curves: list[tuple[str, str]],
                 curve_notes: list[str]) -> list:
    cfg = result.cfg
    names = [s.name for s in result.models]
    conf = f"{int(round(cfg.confidence * 100))}%"
    sampling = (f"sampling (temperature {cfg.temperature}, top-p {cfg.top_p}, seed {cfg.seed})" if cfg.do_sample
                else "greedy decoding")
    b: list = [Heading(1, "Evaluation: " + " vs ".join(names)),
               Para(f"Questions: {result.source}. Answers by {sampling}, at most {cfg.max_new_tokens} new tokens"
                    + (f", repetition penalty {cfg.repetition_penalty}" if cfg.repetition_penalty != 1.0 else "")
                    + f". Every figure is a mean with its {conf} bootstrap confidence interval ({cfg.bootstrap} "
                    f"resamples); n is the number of items a metric applies to. Written "
                    f"{time.strftime('%Y-%m-%d %H:%M')} in {result.seconds:.0f} s."),
               Table(["model", "reference", "resolved to", "answer format"],
                     [[s.name, s.ref, s.path, s.answer_format] for s in result.models])]
    b.append(Heading(2, "Headline: all tasks"))
    for group, title in GROUP_TITLES.items():
        metrics = [m.name for m in METRICS if m.group == group and m.name in result.metrics]
        if metrics:
            b += [Heading(3, title), _metric_table(result, metrics, "all")]
    if "by_model" in plots:
        b.append(Image(plots["by_model"], "Metrics by model, all tasks (error bars: confidence intervals)"))

    if result.paired:
        b.append(Heading(2, "Paired comparisons (same questions)"))
        b.append(Para(f"Difference = later model − earlier model on the items both have a value for; {conf} "
                      "bootstrap interval of the mean difference; p from a two-sided paired permutation test "
                      f"({cfg.bootstrap} sign flips). An interval that excludes 0 marks a difference beyond "
                      "sampling noise; with few items (n below ~30) the permutation p is the safer guide."))
        for pair in result.paired:
            rows = []
            for m in result.metrics:
                d = pair["metrics"].get(m)
                fa = result.summary["figures"][pair["a"]]["all"].get(m)
                fb = result.summary["figures"][pair["b"]]["all"].get(m)
                rows.append([METRIC_BY_NAME[m].label, fmt_value(m, fa["mean"] if fa else None),
                             fmt_value(m, fb["mean"] if fb else None), fmt_diff(m, d),
                             "-" if not d else (f"{d['p']:.3f}" + (" *" if d["p"] < 1 - cfg.confidence else "")),
                             str(d["n"]) if d else "0"])
            b += [Heading(3, f"{pair['b']} vs {pair['a']}"),
                  Table(["metric", pair["a"], pair["b"], f"difference [{conf} CI]", "p", "n"], rows)]

    b.append(Heading(2, "By task"))
    for t in [g for g in result.summary["groups"] if g != "all"]:
        metrics = [m for m in TASK_METRICS if m in result.metrics]
        b += [Heading(3, f"{t} ({result.summary['sizes'][t]} questions)"), _metric_table(result, metrics, t)]
    if "by_task" in plots:
        b.append(Image(plots["by_task"], "Metrics by task and model (error bars: confidence intervals)"))
    if "lengths" in plots:
        b.append(Image(plots["lengths"], "Answer length in words, models and reference"))

    b.append(Heading(2, "Training curves"))
    for name, path in curves:
        b.append(Image(path, f"{name}: training curves"))
    for note in curve_notes:
        b.append(Para(note))

    b.append(Heading(2, "Side by side"))
    shown = _examples(result)
    if not shown:
        b.append(Para("No examples requested (examples: 0)."))
    for i in shown:
        r = result.rows[i]
        b += [Heading(3, f"{r['task']} · {r['id']}"), Quote("Question", clip(r.get("question") or "")),
              Quote("Reference", clip(r.get("reference") or ""))]
        for s in result.models:
            b.append(Quote(f"{s.name} — {_scoreline(result.scores[s.name][i])}", clip(result.answers[s.name][i])))

    if cfg.worst:
        b.append(Heading(2, "Worst-scored answers"))
        b.append(Para(f"Per model, the {cfg.worst} answers with the lowest reward (mix)."))
        for s in result.models:
            sc = result.scores[s.name]
            order = sorted((i for i in range(len(sc)) if sc[i].get("total") is not None),
                           key=lambda i: (sc[i]["total"], sc[i].get("rouge") or 0.0))[:cfg.worst]
            b.append(Heading(3, s.name))
            for i in order:
                r = result.rows[i]
                b += [Para(f"{r['task']} · {r['id']} — {_scoreline(sc[i])}"),
                      Quote("Question", clip(r.get("question") or "", 600)),
                      Quote("Reference", clip(r.get("reference") or "", 800)),
                      Quote(f"{s.name}'s answer", clip(result.answers[s.name][i], 800))]

    b.append(Heading(2, "Generation"))
    rows = []
    for s in result.models:
        g = result.generation[s.name]
        rows.append([s.name, str(g.cached), str(g.generated), f"{g.seconds:.0f}",
                     f"{g.answers_per_second:.2f}" if g.answers_per_second else "-",
                     f"{g.new_tokens / g.seconds:.0f}" if g.seconds else "-"])
    b.append(Table(["model", "cached", "generated", "seconds", "answers/s", "new tokens/s"], rows))

    b.append(Heading(2, "Metrics"))
    b.append(Table(["metric", "what it measures"],
                   [[m.label, m.help] for m in METRICS if m.name in result.metrics]))
    weights = ", ".join(f"{k} {v:g}" for k, v in cfg.rewards.items())
    b.append(Para(f"Reward mix (the 'reward (mix)' column, weighted mean of the rewards that apply): {weights}. "
                  "The rewards come from utils/rewards/, the code GRPO trains with."))
    if result.notes:
        b.append(Heading(2, "Notes"))
        b += [Para(n) for n in result.notes]
    return b


def _scoreline(d: dict) -> str:
    parts = []
    for m in ("total", "rouge", "semantic", "yesno", "judge"):
        if d.get(m) is not None:
            parts.append(f"{METRIC_BY_NAME[m].label} {d[m]:.2f}")
    parts.append(f"{d.get('words', 0):.0f} words")
    return ", ".join(parts)


def _examples(result: EvalResult) -> list[int]:
    per_task: dict[str, list[int]] = {}
    for i, r in enumerate(result.rows):
        per_task.setdefault(r["task"], []).append(i)
    return [i for t in sorted(per_task) for i in per_task[t][:result.cfg.examples]]


def metrics_json(result: EvalResult) -> dict:
    from utils.core.config import to_dict

    return {"source": result.source, "items": len(result.rows), "config": to_dict(result.cfg),
            "models": [{"name": s.name, "ref": s.ref, "path": s.path, "fingerprint": s.fingerprint,
                        "answer_format": s.answer_format} for s in result.models],
            "metrics": {m: METRIC_BY_NAME[m].help for m in result.metrics},
            "summary": result.summary, "paired": result.paired,
            "generation": {k: {"cached": v.cached, "generated": v.generated, "seconds": round(v.seconds, 2),
                               "answers_per_second": v.answers_per_second, "new_tokens": v.new_tokens}
                           for k, v in result.generation.items()},
            "notes": result.notes, "seconds": round(result.seconds, 1)}


def _no_curves_note(s: ModelSpec) -> str:
    from utils.core.artifacts import read_train_config

    if not Path(s.path).is_dir():
        return f"{s.name}: a Hub model; no training log, no curves."
    if read_train_config(s.path) is None:
        return f"{s.name}: not trained by this pipeline (no train_config.yaml or training log in {s.path}); no curves."
    return (f"{s.name}: no training log with loss, reward, KL or length for {s.path} (looked for trainer_state.json, "
            "the run folder's checkpoints and TensorBoard log, metrics.json); no curves.")


def write_report(result: EvalResult, out: Path) -> Path:
    """Write the report folder through a temporary sibling renamed into place, so a failure midway
    leaves the previous report (or none), never half of one."""
    from utils.core.artifacts import atomic_save, check_replaceable
    from utils.core.config import dump_yaml

    out = Path(out)
    check_replaceable(out, "out_dir / run_name", legacy=REPORT_FILES)  # before any work

    def write(tmp: Path) -> None:
        (tmp / "plots").mkdir(parents=True)
        plots = {}
        for key, fn in (("by_model", plot_metrics_by_model), ("by_task", plot_metrics_by_task),
                        ("lengths", plot_lengths)):
            rel = f"plots/metrics_{key}.png" if key != "lengths" else "plots/answer_length.png"
            if fn(result, tmp / rel):
                plots[key] = rel
        curves, notes = [], []
        for s in result.models:
            found = training_history(s.path)
            panels = curve_series(found[1]) if found else []
            if not panels:
                notes.append(_no_curves_note(s))
                continue
            rel = f"plots/training_{s.name}.png"
            plot_training(s.name, found[0], panels, tmp / rel)
            curves.append((s.name, rel))
            missing = [t for t, _ in CURVE_PANELS if t not in {p[0] for p in panels}]
            notes.append(f"{s.name}: curves from {found[0]}" + (f"; no data for {', '.join(missing)}." if missing
                                                                   else "."))
        blocks = build_blocks(result, plots, curves, notes)
        title = "Evaluation: " + " vs ".join(s.name for s in result.models)
        (tmp / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
        (tmp / "report.html").write_text(to_html(blocks, tmp, title), encoding="utf-8")
        (tmp / "metrics.json").write_text(json.dumps(metrics_json(result), indent=1, ensure_ascii=False),
                                          encoding="utf-8")
        with (tmp / "answers.jsonl").open("w", encoding="utf-8") as f:
            for i, r in enumerate(result.rows):
                f.write(json.dumps({"id": r["id"], "task": r["task"], "question": r.get("question"),
                                    "reference": r.get("reference"),
                                    "answers": {s.name: {"text": result.answers[s.name][i],
                                                         "scores": result.scores[s.name][i],
                                                         **({"judge_reply": result.judge_replies[s.name][i]}
                                                            if s.name in result.judge_replies else {})}
                                                for s in result.models}}, ensure_ascii=False) + "\n")
        dump_yaml(result.cfg, tmp / "eval_config.yaml")

    try:
        atomic_save(out, write, "out_dir / run_name", legacy=REPORT_FILES)
    finally:
        # a failed write leaves nothing half-written (only this process's temporary folder is ours)
        shutil.rmtree(out.with_name(f"{out.name}.tmp-{os.getpid()}"), ignore_errors=True)
    log.info("report: %s", out / "report.html")
    return out
