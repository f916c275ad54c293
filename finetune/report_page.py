"""``report.html``: one self-contained page to look at a finished run, written at the end of every run and by
``finetune report RUN``.

Everything comes from the run folder's files, so the page can be (re)written for any finished run, of any
task, without loading a model: ``config.yaml``, ``metrics.json``, ``train_log.jsonl``,
``predictions_test.jsonl`` and ``source.json``. The sections appear from what those files hold:

- the test metrics beside the baseline and the untouched base model (``before_training``), with a bar chart;
- the training and validation curves (inline SVG drawn here, from the log);
- a per-class table when the metrics have ``per_class``, and a confusion matrix when the prediction rows have
  ``label`` and ``prediction``;
- the worst errors, picked by the task's ``worst_predictions`` (``finetune.tasks.base``);
- the data, the training, the resolved config and the environment the run was made in.

The page makes no request: inline CSS, inline SVG, no script, no font, no link that loads anything.
"""

from __future__ import annotations

import collections
import datetime
import html
import json
import math
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import RunFolderError
from finetune.report import read_log
from finetune.run_folder import RunFolder

WORST_ERRORS = 12
"""Rows shown in the worst-errors table."""
CELL_CHARACTERS = 400
"""Longer texts are cut in table cells (the whole row is in ``predictions_test.jsonl``)."""
BAR_CHARTS = 2
"""Headline metrics drawn as bars (model, base model, baseline); the table has them all."""
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
SKIP_METRICS = {"eval_seconds", "generation_tokens_per_second"}
"""Scalars of ``metrics.json``'s test results that say how fast, not how good: not in the results table."""


def write_report(run: RunFolder, task: Any = None) -> Path:
    """Write ``report.html`` into a finished run folder; returns its path. ``task``: the run's task (class or
    instance), found from ``config.yaml`` when not given."""
    if not run.is_finished() or not run.config.is_file():
        raise RunFolderError(f"{run.path} is not a finished run (no {run.metrics.name}): nothing to report yet")
    config = yaml.safe_load(run.config.read_text(encoding="utf-8")) or {}
    if task is None:
        from finetune.tasks import task_class  # late: the page itself needs no task machinery

        task = task_class(config.get("run", {}).get("task", ""))
    page = render(run, config, task)
    tmp = run.report.with_name(run.report.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(run.report)
    return run.report


def render(run: RunFolder, config: dict[str, Any], task: Any) -> str:
    """The whole page as one HTML string."""
    summary = json.loads(run.metrics.read_text(encoding="utf-8"))
    records = read_log(run.log)
    rows = _read_rows(run.predictions)
    source = json.loads(run.source.read_text(encoding="utf-8")) if run.source.is_file() else {}
    headline = [m for m in task.headline_metrics if m in summary.get("test", {})]
    sections = [
        _overview(run, config, summary, task, source),
        _warnings(summary.get("warnings") or []),
        _results(summary, headline),
        _curves(records, config.get("train", {}).get("metric_for_best", "loss")),
        _per_class(summary.get("test", {}), rows),
        _worst(task, rows),
        _data(config, summary),
        _training(config, summary),
        _config(run),
        _environment(summary.get("environment")),
    ]
    title = f"{run.name}: {task.name} report"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<main>
{''.join(s for s in sections if s)}
<footer>Written by finetune from the files of <code>{_e(run.path)}</code> on
{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. The page loads nothing: the charts are inline SVG.</footer>
</main>
</body>
</html>
"""


STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; margin: 0;
       background: #f5f6f8; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; word-break: break-all; }
h2 { font-size: 19px; margin: 0 0 10px; }
section { background: #fff; border: 1px solid #dfe2e8; border-radius: 8px; padding: 16px 20px; margin: 16px 0; }
.subtitle { color: #5a6270; margin: 0; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 6px 18px; margin: 12px 0 0; }
.facts div { overflow-wrap: anywhere; }
.facts b { color: #5a6270; font-weight: 600; margin-right: 6px; white-space: nowrap; }
table { border-collapse: collapse; margin: 6px 0; font-size: 14px; }
th, td { border-bottom: 1px solid #e6e8ec; padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { max-width: 420px; white-space: pre-wrap; word-break: break-word; }
td.short { white-space: nowrap; }
.better { color: #137333; } .worse { color: #b3261e; }
.note { color: #5a6270; font-size: 13px; }
.warning { background: #fff4e5; border-color: #f0c36d; }
.charts { display: flex; flex-wrap: wrap; gap: 14px; }
svg.chart { background: #fff; border: 1px solid #e6e8ec; border-radius: 6px; }
svg text { font: 11px system-ui, sans-serif; fill: #1d2330; }
pre { background: #f7f8fa; border: 1px solid #e6e8ec; border-radius: 6px; padding: 10px; overflow: auto;
      font-size: 12.5px; max-height: 480px; }
.matrix td { text-align: center; min-width: 44px; }
footer { color: #5a6270; font-size: 12px; margin-top: 24px; }
"""


# --- sections -----------------------------------------------------------------------------------------
def _overview(run: RunFolder, config: dict[str, Any], summary: dict[str, Any], task: Any,
              source: dict[str, Any]) -> str:
    model = config.get("model", {}).get("name_or_path", "?")
    lora = config.get("lora", {})
    method = f"LoRA r={lora.get('r')}" if lora.get("method") == "lora" else "full fine-tuning"
    finished = datetime.datetime.fromtimestamp(run.metrics.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    params = summary.get("parameters") or {}
    facts = {
        "task": task.name, "model": model, "weights from": source.get("source", "-"), "method": method,
        "data": _data_name(config.get("data", {})), "finished": finished,
        "wall time": _duration(summary.get("wall_seconds")),
        "trainable parameters": f"{params['trainable']:,} of {params['total']:,}" if params else "-",
    }
    headline = next((m for m in task.headline_metrics if m in summary.get("test", {})), None)
    subtitle = ""
    if headline is not None:
        value = summary["test"][headline]
        baseline = (summary.get("baseline") or {}).get(headline)
        subtitle = f"test {headline} {_number(value)}" + (
            f" (baseline {_number(baseline)})" if isinstance(baseline, (int, float)) else "")
    items = "".join(f"<div><b>{_e(k)}</b>{_e(v)}</div>" for k, v in facts.items())
    return f"""<section id="overview"><h1>{_e(run.name)}</h1><p class="subtitle">{_e(subtitle)}</p>
<div class="facts">{items}</div></section>"""


def _warnings(warnings: list[str]) -> str:
    if not warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f'<section id="warnings" class="warning"><h2>Warnings</h2><ul>{items}</ul></section>'


def _results(summary: dict[str, Any], headline: list[str]) -> str:
    test, baseline = summary.get("test") or {}, summary.get("baseline") or {}
    before = summary.get("before_training") or {}
    names = headline + [k for k, v in test.items() if k not in headline and k not in SKIP_METRICS
                        and _is_number(v)]
    rows = []
    for name in names:
        value = test[name]
        cells = [f"<td>{_e(name)}</td>", f'<td class="num"><b>{_number(value)}</b></td>']
        for reference in (before, baseline):
            other = reference.get(name)
            cells.append(f'<td class="num">{_number(other)}{_delta(value, other, name)}</td>'
                         if _is_number(other) else '<td class="num">-</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = (f'<table id="results-table"><tr><th>metric</th><th class="num">this model</th>'
             f'<th class="num">before training</th><th class="num">baseline: {_e(baseline.get("name", "-"))}</th>'
             f'</tr>{"".join(rows)}</table>')
    bars = [(name, [("this model", test.get(name)), ("before training", before.get(name)),
                    ("baseline", baseline.get(name))]) for name in headline[:BAR_CHARTS]]
    chart = "".join(bar_chart(name, [(label, v) for label, v in values if _is_number(v)])
                    for name, values in bars)
    best = summary.get("best_validation") or {}
    best_text = ", ".join(f"validation {k} {_number(v)}" for k, v in best.items())
    return f"""<section id="results"><h2>Results on the held-out test split</h2>
<p class="note">The best checkpoint (step {_e(summary.get('best_step'))} of {_e(summary.get('global_step'))},
{_e(best_text)}) on {_e((summary.get('split_sizes') or {}).get('test', '?'))} test examples. In brackets: this model
minus the reference, green where this model is better.</p>{table}<div class="charts">{chart}</div></section>"""


def _curves(records: list[dict[str, Any]], metric: str) -> str:
    train = [r for r in records if "split" not in r and _is_number(r.get("loss"))]
    valid = [r for r in records if r.get("split") == "validation"]
    if not train and not valid:
        return '<section id="curves"><h2>Curves</h2><p class="note">No training log.</p></section>'
    charts = [line_chart("loss", [
        ("train loss", [(r["step"], r["loss"]) for r in train], False),
        ("validation loss", [(r["step"], r["loss"]) for r in valid if _is_number(r.get("loss"))], True)])]
    if metric != "loss" and any(_is_number(r.get(metric)) for r in valid):
        charts.append(line_chart(f"validation {metric}", [
            (f"validation {metric}", [(r["step"], r[metric]) for r in valid if _is_number(r.get(metric))], True)]))
    lr = [(r["step"], r["lr"]) for r in train if _is_number(r.get("lr"))]
    if lr:
        charts.append(line_chart("learning rate", [("learning rate", lr, False)]))
    return f'<section id="curves"><h2>Curves</h2><div class="charts">{"".join(charts)}</div></section>'


def _per_class(test: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    per_class = test.get("per_class")
    labelled = [r for r in rows if "label" in r and "prediction" in r]
    if not isinstance(per_class, dict) and not labelled:
        return ""
    parts = ['<section id="per-class"><h2>Per class</h2>']
    if isinstance(per_class, dict) and per_class:
        support = collections.Counter(str(r["label"]) for r in labelled)
        names = sorted({k for scores in per_class.values() for k in scores})
        head = "".join(f'<th class="num">{_e(n)}</th>' for n in names)
        body = "".join(
            f"<tr><td>{_e(label)}</td>" + "".join(f'<td class="num">{_number(scores.get(n))}</td>' for n in names)
            + (f'<td class="num">{support[label]}</td>' if labelled else "") + "</tr>"
            for label, scores in per_class.items())
        parts.append(f'<table id="per-class-table"><tr><th>class</th>{head}'
                     f'{"<th class=num>test examples</th>" if labelled else ""}</tr>{body}</table>')
    if labelled:
        parts.append(confusion_matrix(labelled, list(per_class) if isinstance(per_class, dict) else None))
    parts.append("</section>")
    return "".join(parts)


def confusion_matrix(rows: list[dict[str, Any]], order: list[str] | None = None) -> str:
    """A table: true label per row, predicted label per column, cells shaded by their share of the row."""
    labels = order or sorted({str(r["label"]) for r in rows} | {str(r["prediction"]) for r in rows})
    labels += sorted({str(r["prediction"]) for r in rows} - set(labels))
    counts = collections.Counter((str(r["label"]), str(r["prediction"])) for r in rows)
    head = "".join(f"<th>{_e(p)}</th>" for p in labels)
    body = []
    for true in labels:
        total = sum(counts[(true, p)] for p in labels) or 1
        cells = []
        for predicted in labels:
            n = counts[(true, predicted)]
            share = n / total
            hue = "19,115,51" if true == predicted else "179,38,30"
            cells.append(f'<td style="background: rgba({hue},{0.08 + 0.6 * share:.2f})" '
                         f'title="{_e(true)} predicted as {_e(predicted)}: {n}">{n}</td>')
        body.append(f"<tr><th>{_e(true)}</th>{''.join(cells)}</tr>")
    return (f'<p class="note">Confusion matrix: rows are the true labels, columns the predictions.</p>'
            f'<table id="confusion-matrix" class="matrix"><tr><th>true \\ predicted</th>{head}</tr>'
            f'{"".join(body)}</table>')


def _worst(task: Any, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ('<section id="worst"><h2>Worst errors</h2><p class="note">No prediction rows in '
                'predictions_test.jsonl.</p></section>')
    how, worst = task.worst_predictions(rows, WORST_ERRORS)
    if not worst:
        return f'<section id="worst"><h2>Worst errors</h2><p class="note">None: {_e(how)}.</p></section>'
    columns: list[str] = []
    for row in worst:
        columns += [k for k in row if k not in columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(row.get(c)) for c in columns) + "</tr>" for row in worst)
    return (f'<section id="worst"><h2>Worst errors</h2><p class="note">{_e(how)}.</p>'
            f'<table id="worst-table"><tr>{head}</tr>{body}</table></section>')


def _data(config: dict[str, Any], summary: dict[str, Any]) -> str:
    d = config.get("data", {})
    sizes = summary.get("split_sizes") or {}
    facts = [("source", _data_name(d))]
    for key in ("train_file", "validation_file", "test_file"):
        if d.get(key):
            facts.append((key, Path(d[key]).name))
    facts += [(f"{name} examples", f"{n:,}") for name, n in sizes.items()]
    facts += [(key, d[key]) for key in ("validation_size", "test_size", "max_train_samples", "max_eval_samples",
                                        "max_test_samples", "max_length") if d.get(key) is not None]
    facts.append(("seed", config.get("run", {}).get("seed")))
    return _fact_table("data", "Data", facts)


def _training(config: dict[str, Any], summary: dict[str, Any]) -> str:
    t = config.get("train", {})
    speed = summary.get("throughput") or {}
    facts = [("optimizer steps", summary.get("global_step")), ("best step", summary.get("best_step")),
             ("epochs", t.get("epochs")), ("max steps", t.get("max_steps")),
             ("batch", f"{t.get('batch_size')} x {t.get('gradient_accumulation_steps')} accumulation"),
             ("learning rate", f"{t.get('learning_rate')} ({t.get('scheduler')}, warmup {t.get('warmup_ratio')})"),
             ("training time", _duration(speed.get("train_seconds"))),
             ("tokens per second", speed.get("tokens_per_second")),
             ("skipped batches", summary.get("skipped_batches"))]
    return _fact_table("training", "Training", [(k, v) for k, v in facts if v is not None])


def _config(run: RunFolder) -> str:
    return (f'<section id="config"><h2>Config</h2><p class="note">The resolved <code>config.yaml</code>: '
            f'<code>finetune train {_e(run.config)}</code> repeats the run.</p>'
            f'<pre>{_e(run.config.read_text(encoding="utf-8"))}</pre></section>')


def _environment(environment: dict[str, Any] | None) -> str:
    if not environment:
        return ('<section id="environment"><h2>Environment</h2><p class="note">Not recorded (a run made by an '
                'older finetune).</p></section>')
    return _fact_table("environment", "Environment", list(environment.items()))


def _fact_table(anchor: str, title: str, facts: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e('-' if v is None else v)}</td></tr>" for k, v in facts)
    return f'<section id="{anchor}"><h2>{_e(title)}</h2><table id="{anchor}-table">{rows}</table></section>'


# --- charts (inline SVG) ------------------------------------------------------------------------------
def line_chart(title: str, series: list[tuple[str, list[tuple[float, float]], bool]], width: int = 520,
               height: int = 280) -> str:
    """Lines of (x, y) points against shared axes; ``True`` in a series marks its points with dots."""
    points = [p for _, values, _ in series for p in values if _finite(p[1])]
    left, right, top, bottom = 58, 14, 44, 40
    svg = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'xmlns="http://www.w3.org/2000/svg"><title>{_e(title)}</title>'
           f'<text x="{left}" y="17" font-weight="600">{_e(title)}</text>']
    if not points:
        svg.append(f'<text x="{left}" y="{height // 2}">no values</text></svg>')
        return "".join(svg)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1
    if y0 == y1:
        y0, y1 = y0 - (abs(y0) * 0.1 or 1), y1 + (abs(y1) * 0.1 or 1)
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    y_ticks, x_ticks = _ticks(y0, y1), _ticks(x0, x1)
    for tick in y_ticks:
        svg.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" '
                   f'stroke="#e6e8ec"/><text x="{left - 6}" y="{sy(tick) + 4:.1f}" text-anchor="end">'
                   f'{_tick_label(tick, y_ticks)}</text>')
    for tick in x_ticks:
        svg.append(f'<text x="{sx(tick):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                   f'{_tick_label(tick, x_ticks)}</text>')
    svg.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" text-anchor="middle">optimizer step'
               f'</text><rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
               f'fill="none" stroke="#c9ced6"/>')
    for index, (label, values, dots) in enumerate(series):
        color = COLORS[index % len(COLORS)]
        values = [(x, y) for x, y in values if _finite(y)]
        if len(values) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
            svg.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="1.8" points="{path}"/>')
        if dots or len(values) == 1:
            svg += [f'<circle class="series" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>'
                    for x, y in values]
        lx = left + index * 150  # legend between the title and the plot
        svg.append(f'<rect x="{lx}" y="{top - 18}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{lx + 14}" y="{top - 9}">{_e(label)}</text>')
    svg.append("</svg>")
    return "".join(svg)


def bar_chart(title: str, bars: list[tuple[str, float]], width: int = 340) -> str:
    """Horizontal bars from zero, one per (label, value)."""
    left, right, top, row = 112, 58, 30, 32
    height = max(101, top + row * len(bars) + 8)
    svg = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'xmlns="http://www.w3.org/2000/svg"><title>{_e(title)}</title>'
           f'<text x="10" y="18" font-weight="600">{_e(title)}</text>']
    values = [abs(v) for _, v in bars if _finite(v)]
    scale = (width - left - right) / (max(values) or 1) if values else 0
    for index, (label, value) in enumerate(bars):
        y = top + index * row
        length = abs(value) * scale if _finite(value) else 0
        svg.append(f'<text x="{left - 8}" y="{y + 17}" text-anchor="end">{_e(label)}</text>'
                   f'<rect class="bar" x="{left}" y="{y + 4}" width="{max(length, 1):.1f}" height="20" '
                   f'fill="{COLORS[index % len(COLORS)]}"/>'
                   f'<text x="{left + max(length, 1) + 5:.1f}" y="{y + 18}">{_number(value)}</text>')
    svg.append("</svg>")
    return "".join(svg)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values between ``low`` and ``high`` for axis labels."""
    span = high - low
    step = 10 ** math.floor(math.log10(span / count)) if span > 0 else 1
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= count:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _tick_label(value: float, ticks: list[float]) -> str:
    """As many decimals as the tick spacing needs (3.165, 3.170, ... not 3.17 three times)."""
    if abs(value) >= 1e5:
        return f"{value:.2e}"
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    return f"{value:.{decimals}f}"


# --- small helpers ------------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _data_name(d: dict[str, Any]) -> str:
    source = d.get("source", "?")
    if source == "files":
        return "files " + ", ".join(Path(d[k]).name for k in ("train_file", "validation_file", "test_file")
                                    if d.get(k))
    return source + (f" ({d['hub_config']})" if d.get("hub_config") else "")


def _cell(value: Any) -> str:
    if _is_number(value):
        return f'<td class="num">{_number(value)}</td>'
    if value is None:
        return "<td></td>"
    if isinstance(value, list) and all(isinstance(v, dict) and "content" in v for v in value):  # chat turns
        text = "\n".join(f"{v.get('role', '?')}: {v['content']}" for v in value)
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    if len(text) > CELL_CHARACTERS:
        text = text[:CELL_CHARACTERS] + " …"
    return f'<td class="{"short" if len(text) <= 24 else "text"}">{_e(text)}</td>'


def _delta(value: Any, other: Any, name: str) -> str:
    """This model's difference from a reference, green when better (lower for losses and perplexity)."""
    if not (_is_number(value) and _is_number(other)) or value == other:
        return ""
    lower_is_better = name in ("loss", "perplexity") or name.endswith("_loss")
    better = (value < other) if lower_is_better else (value > other)
    return f' <span class="{"better" if better else "worse"}">({value - other:+.4f})</span>'


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _number(value: Any) -> str:
    if not _is_number(value):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _duration(seconds: Any) -> str:
    if not _is_number(seconds):
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
