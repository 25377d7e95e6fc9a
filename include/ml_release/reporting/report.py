"""The release report: the release record as JSON and as one self-contained HTML page.

The page needs no network and no JavaScript (CSS and SVG are inline), so it can be stored beside the
record and opened from an Airflow extra link years later. Every string taken from the record is
escaped, and any figure may be missing: a run that failed early, a first release with no stable, a
step with no traffic or a NaN serialised as ``null`` reads "no data" instead of breaking the page.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

CANARY = "#d9480f"
STABLE = "#1c7ed6"
UNATTRIBUTED = "#868e96"
PHASE_COLORS = {"Pass": "#2b8a3e", "Fail": "#c92a2a", "Inconclusive": "#e67700", "Error": "#862e9c"}
DECISION_COLORS = {"promoted": "#2b8a3e", "rolled_back": "#c92a2a", "inconclusive": "#e67700"}
ECDF_POINTS = 200  # a latency curve is drawn through this many quantiles, however many samples
NO_DATA = "no data"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#212529;margin:0 auto;max-width:1180px;
padding:0 20px 40px}
h1{font-size:22px;margin:24px 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #dee2e6}
h3{font-size:15px;margin:20px 0 6px}
.decision{border-radius:8px;color:#fff;padding:14px 18px;margin:12px 0}
.decision .what{font-size:30px;font-weight:700;letter-spacing:.5px}.decision .why{font-size:18px;margin-top:4px}
.meta{color:#495057}.nodata{color:#868e96;font-style:italic}
table{border-collapse:collapse;margin:6px 0}th,td{border:1px solid #dee2e6;padding:3px 7px;vertical-align:top}
th{background:#f1f3f5;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.phase{color:#fff;border-radius:4px;padding:1px 6px;font-weight:600;white-space:nowrap}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.cm td{min-width:44px;text-align:right}.cm th.corner{background:#fff}
svg{background:#fff;border:1px solid #e9ecef;margin:4px 0}svg text{font:11px system-ui,sans-serif;fill:#343a40}
code{font-size:12px;word-break:break-all}
"""


# -- reading the record -----------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _num(value: Any) -> float | None:
    """A finite number, or ``None`` for anything else (``null``, NaN, a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _numbers(values: Any) -> list[float]:
    return [x for x in (_num(v) for v in _list(values)) if x is not None]


def _time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics, as numpy's default."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _strict(value: Any) -> Any:
    """JSON has no NaN: a non-finite float becomes ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


# -- formatting -------------------------------------------------------------------------------


def _fmt(value: Any, kind: str = "") -> str:
    """A figure in its metric's unit; ``—`` when there is none."""
    x = _num(value)
    if x is None:
        return "—"
    if kind == "latency":
        return f"{x:.1f} ms" if abs(x) < 100 else f"{x:.0f} ms"
    if kind in ("error_rate", "unattributed_errors", "percent"):
        return f"{x:.2%}"
    if kind == "count":
        return f"{x:g}"
    if kind == "non_finite":
        return f"{x:.0f}"
    if kind == "p":
        return f"{x:.2g}"
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.0f}"


def _no_data(what: str) -> str:
    return f'<p class="nodata">{_e(what)}: {NO_DATA}</p>'


def _phase(phase: Any) -> str:
    text = str(phase) if phase else "—"
    return f'<span class="phase" style="background:{PHASE_COLORS.get(text, UNATTRIBUTED)}">{_e(text)}</span>'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """``rows`` hold HTML already escaped; ``header`` is plain text."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv(mapping: Mapping[str, Any], depth: int = 0) -> str:
    """Any plain mapping as a key/value table; nested mappings nest once, long lists are cut."""
    if not mapping:
        return f'<span class="nodata">{NO_DATA}</span>'
    rows = []
    for key, value in mapping.items():
        if isinstance(value, Mapping) and depth < 1:
            cell = _kv(value, depth + 1)
        elif isinstance(value, list | tuple):
            shown = ", ".join(_e(json.dumps(_strict(v), default=str)) for v in list(value)[:10])
            cell = shown + (f" … ({len(value)} items)" if len(value) > 10 else "") or "[]"
        elif value is None:
            cell = "—"
        elif isinstance(value, Mapping):
            cell = _e(json.dumps(_strict(value), default=str)[:400])
        else:
            cell = _e(f"{value:.4g}" if isinstance(value, float) else value)
        rows.append((_e(key), cell))
    return _table(("", ""), rows) if depth else _table(("field", "value"), rows)


# -- SVG --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Frame:
    """A plot area: data ranges mapped onto an SVG canvas of ``width`` x ``height`` pixels."""

    x0: float
    x1: float
    y0: float
    y1: float
    log_x: bool = False
    width: int = 560
    height: int = 250
    left: int = 62
    right: int = 16
    top: int = 14
    bottom: int = 42

    def sx(self, v: float) -> float:
        a, b = self.x0, self.x1
        if self.log_x:
            a, b, v = math.log10(a), math.log10(b), math.log10(max(v, self.x0))
        return self.left + (v - a) / ((b - a) or 1.0) * (self.width - self.left - self.right)

    def sy(self, v: float) -> float:
        return (
            self.height
            - self.bottom
            - (v - self.y0) / ((self.y1 - self.y0) or 1.0) * (self.height - self.top - self.bottom)
        )


def _svg(frame: _Frame, title: str, parts: Iterable[str]) -> str:
    return (
        f'<svg width="{frame.width}" height="{frame.height}" viewBox="0 0 {frame.width} {frame.height}" '
        f'role="img" aria-label="{_e(title)}"><title>{_e(title)}</title>{"".join(parts)}</svg>'
    )


def _text(x: float, y: float, s: str, anchor: str = "start", color: str = "", extra: str = "") -> str:
    fill = f' style="fill:{color}"' if color else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{fill}{extra}>{_e(s)}</text>'


def _line(x1: float, y1: float, x2: float, y2: float, color: str, dash: str = "", width: float = 1) -> str:
    d = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" stroke-width="{width}"{d}/>'


def _axes(
    frame: _Frame,
    xticks: Sequence[tuple[float, str]],
    yticks: Sequence[tuple[float, str]],
    xlabel: str,
    ylabel: str,
) -> list[str]:
    left, right = frame.left, frame.width - frame.right
    top, bottom = frame.top, frame.height - frame.bottom
    out = [_line(left, bottom, right, bottom, "#495057"), _line(left, top, left, bottom, "#495057")]
    for v, label in yticks:
        y = frame.sy(v)
        out += [_line(left, y, right, y, "#f1f3f5"), _text(left - 5, y + 4, label, "end")]
    for v, label in xticks:
        x = frame.sx(v)
        out += [_line(x, bottom, x, bottom + 4, "#495057"), _text(x, bottom + 16, label, "middle")]
    out.append(_text((left + right) / 2, frame.height - 6, xlabel, "middle"))
    y_mid = (top + bottom) / 2
    out.append(_text(14, y_mid, ylabel, "middle", extra=f' transform="rotate(-90 14 {y_mid:.1f})"'))
    return out


def _polyline(frame: _Frame, points: Sequence[tuple[float, float]], color: str, dash: str = "") -> str:
    coords = " ".join(f"{frame.sx(x):.1f},{frame.sy(y):.1f}" for x, y in points)
    d = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"{d}/>'


def _bar(frame: _Frame, x: float, width: float, value: float, color: str, tip: str) -> str:
    top, base = frame.sy(value), frame.sy(frame.y0)
    return (
        f'<rect x="{x:.1f}" y="{top:.1f}" width="{width:.1f}" height="{max(base - top, 0.5):.1f}" '
        f'fill="{color}"><title>{_e(tip)}</title></rect>'
    )


def _legend(frame: _Frame, entries: Sequence[tuple[str, str, str]]) -> list[str]:
    """(label, colour, dash) entries stacked in the plot's top-left corner."""
    out = []
    for i, (label, color, dash) in enumerate(entries):
        y = frame.top + 12 + 15 * i
        out += [_line(frame.left + 10, y - 4, frame.left + 30, y - 4, color, dash, 2), _text(frame.left + 35, y, label)]
    return out


def _linear_ticks(lo: float, hi: float, fmt: Callable[[float], str], n: int = 5) -> list[tuple[float, str]]:
    raw = (hi - lo) / max(n, 1) or 1.0
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    count = int((hi - first) / step + 1e-9) + 1
    return [(first + i * step, fmt(first + i * step)) for i in range(count)]


def _log_ticks(lo: float, hi: float) -> list[tuple[float, str]]:
    ticks = []
    for exp in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**exp
            if lo <= v <= hi:
                ticks.append((v, f"{v:g}"))
    if len(ticks) > 8:
        ticks = [t for t in ticks if t[1].lstrip("0.").startswith("1")]
    return ticks


# -- sections: header ------------------------------------------------------------------------


def _decision_key(record: Mapping[str, Any]) -> str:
    decision = str(record.get("decision") or "").lower()
    canary_phase = _map(_map(record.get("canary")).get("decision")).get("phase")
    if decision == "promoted":
        return "promoted"
    if canary_phase == "Inconclusive" or decision == "inconclusive" or not decision:
        return "inconclusive"
    return "rolled_back" if "roll" in decision else "inconclusive"


def _header(record: Mapping[str, Any]) -> str:
    model = record.get("model_name") or "unknown model"
    candidate = _map(record.get("candidate"))
    version = candidate.get("version") or "—"
    previous = record.get("previous_production_version") or "none (first release)"
    key = _decision_key(record)
    decision = str(record.get("decision") or "no decision recorded")
    reason = record.get("reason") or "no reason recorded"
    release = _map(record.get("release"))
    meta = [
        f"default version after: <b>{_e(record.get('default_version_after') or '—')}</b>",
        f"run: {_e(release.get('dag_id') or '—')} / {_e(release.get('run_id') or '—')}",
        f"recorded at: {_e(record.get('recorded_at') or '—')}",
    ]
    return (
        f"<h1>{_e(model)}: candidate {_e(version)} vs production {_e(previous)}</h1>"
        f'<div class="decision" style="background:{DECISION_COLORS[key]}">'
        f'<div class="what">{_e(decision.replace("_", " ").upper())}</div><div class="why">{_e(reason)}</div></div>'
        f'<p class="meta">{" · ".join(meta)}</p>'
    )


# -- sections: canary -------------------------------------------------------------------------


def _canary(record: Mapping[str, Any]) -> str:
    canary = _map(record.get("canary"))
    out = ["<h2>Canary analysis</h2>"]
    if not canary:
        return out[0] + _no_data("canary analysis (no canary ran)")
    decision = _map(canary.get("decision"))
    out.append(f'<p class="meta">mode: {_e(canary.get("mode") or "—")}</p>')
    if decision:
        counts = ", ".join(
            f"{k.replace('_', ' ')} {_e(decision.get(k, '—'))}"
            for k in ("failed_steps", "inconclusive_steps", "consecutive_errors")
        )
        out.append(
            f"<p>Rollout decision: <b>{_e(decision.get('action') or '—')}</b> {_phase(decision.get('phase'))} "
            f"{_e(decision.get('reason') or '')}<br><span class='meta'>{counts}</span></p>"
        )
    else:
        out.append(_no_data("rollout decision"))
    steps = [_map(s) for s in _list(canary.get("steps"))]
    if not steps:
        out.append(_no_data("canary steps"))
    for i, step in enumerate(steps):
        out.append(_step(step, i))
    out += ["<h3>Error rate per step</h3>", _error_rates_svg(steps)]
    out += ["<h3>Weight timeline</h3>", _timeline_svg(_list(canary.get("weight_timeline")), steps)]
    return "".join(out)


def _step(step: Mapping[str, Any], index: int) -> str:
    number = step.get("step", index)
    served = _map(step.get("served"))
    verdict = _map(step.get("verdict"))
    meas = _map(step.get("measurements"))
    served_text = (
        ", ".join(f"{_e(k)} {_e(_fmt(v, 'count'))}" for k, v in served.items()) if served else "no traffic recorded"
    )
    out = [
        f"<h3>Step {_e(number)}: weight {_e(_fmt(step.get('weight'), 'count'))}% "
        f"(effective {_e(_fmt(step.get('effective_weight'), 'count'))}%) {_phase(verdict.get('phase'))}</h3>",
        f'<p class="meta">{_e(step.get("started_at") or "—")} → {_e(step.get("ended_at") or "—")}; '
        f"served: {served_text}</p>",
    ]
    if verdict.get("message"):
        out.append(f"<p>{_e(verdict['message'])}</p>")
    for err in _list(meas.get("errors")):
        err = _map(err)
        out.append(f"<p>Provider error ({_e(err.get('provider', '?'))}): {_e(err.get('message', ''))}</p>")
    out.append(_verdict_table(_list(verdict.get("metrics"))))
    out.append('<div class="row">')
    out.append(f"<div>{_latency_svg(meas, number)}</div>")
    out.append(_confusion_pair(_map(meas.get("replay"))))
    out.append("</div>")
    return "".join(out)


def _verdict_table(metrics: Sequence[Any]) -> str:
    if not metrics:
        return _no_data("metric verdicts")
    rows = []
    for raw in metrics:
        m = _map(raw)
        kind = str(m.get("kind") or "")
        threshold = _fmt(m.get("threshold"), kind) if m.get("threshold") is not None else ""
        if m.get("max_regression") is not None:
            worse = "-" if m.get("direction") == "higher_is_better" else "+"
            threshold += f"{'; ' if threshold else ''}stable {worse} {_fmt(m.get('max_regression'), kind)}"
        effect = _fmt(m.get("effect_size"))
        if m.get("effect_name") and effect != "—":
            effect = f"{effect} ({m['effect_name']})"
        n = f"{_fmt(m.get('n_canary'), 'count')} / {_fmt(m.get('n_stable'), 'count')}"
        cells = (
            _e(m.get("metric") or "—"),
            _phase(m.get("phase")),
            _e(_fmt(m.get("value"), kind)),
            _e(_fmt(m.get("stable_value"), kind)),
            _e(threshold or "—"),
            _e(m.get("test") or "—"),
            _e(_fmt(m.get("p_value"), "p")),
            _e(effect),
            _e(n),
            _e(m.get("message") or ""),
        )
        rows.append(cells)
    header = (
        "metric",
        "phase",
        "canary",
        "stable",
        "threshold",
        "test",
        "p-value",
        "effect size",
        "n c / s",
        "message",
    )
    return _table(header, rows)


def _latency_svg(meas: Mapping[str, Any], step: Any) -> str:
    """Empirical CDFs of both versions' latencies on a log axis, with p50 and p99 marked."""
    series = []
    for name, color in (("stable", STABLE), ("canary", CANARY)):
        raw = _list(_map(meas.get(name)).get("latencies_ms"))
        values = sorted(_numbers(raw))
        if values:
            series.append((name, color, values, len(raw) - len(values)))
    if not series:
        return _no_data(f"step {step} latency")
    positive = [v for _, _, values, _ in series for v in values if v > 0]
    lo = min(positive) / 1.2 if positive else 0.1
    hi = max(max(values[-1] for _, _, values, _ in series), lo * 10) * 1.2
    frame = _Frame(lo, hi, 0.0, 1.0, log_x=True)
    yticks = [(q, f"{q:.0%}") for q in (0.0, 0.25, 0.5, 0.75, 1.0)]
    parts = _axes(frame, _log_ticks(lo, hi), yticks, "latency (ms, log scale)", "share of requests ≤ x")
    legend = []
    for i, (name, color, values, dropped) in enumerate(series):
        n = len(values)
        qs = [i / (ECDF_POINTS - 1) for i in range(ECDF_POINTS)] if n > ECDF_POINTS else None
        points = [(_quantile(values, q), q) for q in qs] if qs else [(v, (j + 1) / n) for j, v in enumerate(values)]
        parts.append(_polyline(frame, [(values[0], 0.0), *points], color))
        p50, p99 = _quantile(values, 0.5), _quantile(values, 0.99)
        for j, (q, v) in enumerate((("p50", p50), ("p99", p99))):
            x = frame.sx(v)
            parts.append(_line(x, frame.sy(0), x, frame.sy(1), color, "3,3"))
            parts.append(_text(x + 3, frame.sy(0) - 6 - 13 * (2 * i + j), q, color=color))
        extra = f", {dropped} non-finite dropped" if dropped else ""
        legend.append((f"{name}: n={n}, p50 {_fmt(p50, 'latency')}, p99 {_fmt(p99, 'latency')}{extra}", color, ""))
    parts += _legend(frame, legend)
    missing = {"stable", "canary"} - {s[0] for s in series}
    note = f'<div class="nodata">{" and ".join(sorted(missing))} latency: {NO_DATA}</div>' if missing else ""
    return _svg(frame, f"step {step}: latency distribution, stable vs canary", parts) + note


def _error_rates_svg(steps: Sequence[Mapping[str, Any]]) -> str:
    """Grouped bars: each step's error rate for canary, stable and responses that named no version."""
    groups: list[tuple[str, list[tuple[str, str, int, int]]]] = []
    slo = None
    for i, step in enumerate(steps):
        meas = _map(step.get("measurements"))
        bars = []
        for name, color in (("canary", CANARY), ("stable", STABLE)):
            statuses = _list(_map(meas.get(name)).get("statuses"))
            bars.append((name, color, len(statuses), sum(1 for s in statuses if not _ok(s))))
        unattributed = _list(meas.get("unattributed_statuses"))
        if unattributed:
            bars.append(("no version", UNATTRIBUTED, len(unattributed), sum(1 for s in unattributed if not _ok(s))))
        groups.append((f"step {step.get('step', i)}", bars))
        for m in _list(_map(step.get("verdict")).get("metrics")):
            if _map(m).get("kind") == "error_rate" and _num(_map(m).get("threshold")) is not None:
                slo = _num(_map(m).get("threshold"))
    if not any(n for _, bars in groups for _, _, n, _ in bars):
        return _no_data("error rates")
    rates = [e / n for _, bars in groups for _, _, n, e in bars if n]
    top = max([*rates, slo or 0.0, 0.01]) * 1.2
    frame = _Frame(0.0, float(len(groups)), 0.0, top, width=max(360, 150 * len(groups) + 80))
    parts = _axes(frame, [], _linear_ticks(0.0, top, lambda v: f"{v:.1%}"), "canary step", "error rate")
    series = max(len(bars) for _, bars in groups)
    slot = (frame.sx(1) - frame.sx(0)) * 0.8 / series
    for g, (label, bars) in enumerate(groups):
        x0 = frame.sx(g) + (frame.sx(1) - frame.sx(0)) * 0.1
        parts.append(_text(x0 + series * slot / 2, frame.height - frame.bottom + 16, label, "middle"))
        for b, (name, color, n, errors) in enumerate(bars):
            x = x0 + b * slot
            if not n:
                parts.append(_text(x + slot / 2, frame.sy(0) - 4, "n/a", "middle", UNATTRIBUTED))
                continue
            rate = errors / n
            parts.append(_bar(frame, x + 1, slot - 2, rate, color, f"{label} {name}: {errors} of {n} ({rate:.2%})"))
            parts.append(_text(x + slot / 2, frame.sy(rate) - 4, f"{rate:.1%}", "middle"))
    if slo is not None:
        y = frame.sy(slo)
        parts += [_line(frame.left, y, frame.width - frame.right, y, "#c92a2a", "6,3")]
        parts.append(_text(frame.width - frame.right - 4, y - 4, f"SLO {slo:.1%}", "end", "#c92a2a"))
    legend = [("canary", CANARY, ""), ("stable", STABLE, "")]
    if any(len(bars) > 2 for _, bars in groups):
        legend.append(("named no version", UNATTRIBUTED, ""))
    parts += _legend(frame, legend)
    return _svg(frame, "error rate per step and version", parts)


def _ok(status: Any) -> bool:
    return isinstance(status, int) and 200 <= status < 300


def _timeline_svg(timeline: Sequence[Any], steps: Sequence[Mapping[str, Any]]) -> str:
    """Desired and effective canary weight over time, as step functions."""
    events = [
        (t, _num(e.get("weight")), _num(e.get("effective_weight")), str(e.get("reason") or ""))
        for e in map(_map, timeline)
        if (t := _time(e.get("at"))) is not None
    ]
    source = "weight changes"
    if not events:  # an older record: fall back on when each step started
        source = "step starts (no weight timeline recorded)"
        events = [
            (t, _num(s.get("weight")), _num(s.get("effective_weight")), f"step {s.get('step', '?')}")
            for s in steps
            if (t := _time(s.get("started_at"))) is not None
        ]
    if not events:
        return _no_data("weight timeline")
    events.sort(key=lambda e: e[0])
    start = events[0][0]
    ends = [t for s in steps if (t := _time(s.get("ended_at"))) is not None]
    span = max([(t - start).total_seconds() for t in [*ends, events[-1][0]]] + [1.0])
    minutes = span > 300
    unit = 60.0 if minutes else 1.0
    frame = _Frame(0.0, span * 1.02, 0.0, 100.0)
    xticks = _linear_ticks(0.0, span, lambda v: f"{v / unit:g}")
    xlabel = f"{'minutes' if minutes else 'seconds'} since {start.isoformat(timespec='seconds')} ({source})"
    parts = _axes(frame, xticks, _linear_ticks(0.0, 100.0, lambda v: f"{v:g}%"), xlabel, "canary weight")
    for index, color, dash in ((1, CANARY, ""), (2, "#5f3dc4", "5,3")):
        points: list[tuple[float, float]] = []
        for t, *weights, _ in events:
            w = weights[index - 1]
            if w is None:
                continue
            x = (t - start).total_seconds()
            if points:
                points.append((x, points[-1][1]))
            points.append((x, w))
        if points:
            points.append((span, points[-1][1]))
            parts.append(_polyline(frame, points, color, dash))
    for t, weight, effective, reason in events:
        x = frame.sx((t - start).total_seconds())
        tip = f"{t.isoformat(timespec='seconds')}: weight {_fmt(weight, 'count')}%, effective "
        tip += f"{_fmt(effective, 'count')}% — {reason}"
        y = frame.sy(weight if weight is not None else 0.0)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{CANARY}"><title>{_e(tip)}</title></circle>')
    parts += _legend(frame, [("desired weight", CANARY, ""), ("effective weight (read back)", "#5f3dc4", "5,3")])
    rows = [
        (_e(t.isoformat(timespec="seconds")), _e(_fmt(w, "count")), _e(_fmt(ew, "count")), _e(r))
        for t, w, ew, r in events
    ]
    return _svg(frame, "canary weight over time", parts) + _table(("at", "weight %", "effective %", "reason"), rows)


# -- confusion matrices -----------------------------------------------------------------------


def _matrix(title: str, labels: Sequence[str], columns: Sequence[str], counts: Sequence[Sequence[int]]) -> str:
    """Rows are true classes; a cell's shade is its share of the row (green on the diagonal, red off it)."""
    head = f'<tr><th class="corner">true \\ predicted</th>{"".join(f"<th>{_e(c)}</th>" for c in columns)}'
    head += "<th>recall</th></tr>"
    body = []
    for r, label in enumerate(labels):
        row = counts[r]
        total = sum(row)
        cells = []
        for c, count in enumerate(row):
            share = count / total if total else 0.0
            rgb = "43,138,62" if c < len(columns) and columns[c] == label else "201,42,42"
            cells.append(
                f'<td style="background:rgba({rgb},{0.08 + 0.6 * share:.2f})" title="{share:.1%} of row">{count}</td>'
            )
        diag = row[list(columns).index(label)] if label in columns else 0
        recall = f"{diag / total:.1%}" if total else "—"
        body.append(f"<tr><th>{_e(label)}</th>{''.join(cells)}<td>{recall}</td></tr>")
    return f'<div><b>{_e(title)}</b><table class="cm">{head}{"".join(body)}</table></div>'


def _confusion_pair(replay: Mapping[str, Any]) -> str:
    truth = [str(t) for t in _list(replay.get("truth"))]
    if not truth:
        return f"<div>{_no_data('labelled replay')}</div>"
    out = []
    for name in ("canary", "stable"):
        predicted = _list(replay.get(name))
        if len(predicted) != len(truth):
            out.append(
                f"<div>{_no_data(f'{name} confusion matrix ({len(predicted)} answers for {len(truth)} rows)')}</div>"
            )
            continue
        answers = [None if p is None else str(p) for p in predicted]
        labels = [str(x) for x in _list(replay.get("labels"))] or sorted(
            set(truth) | {p for p in answers if p is not None}
        )
        labels += sorted({t for t in truth if t not in labels})
        columns = labels + sorted({p for p in answers if p is not None and p not in labels})
        if any(p is None for p in answers):
            columns.append("(no answer)")
        index = {c: i for i, c in enumerate(columns)}
        counts = [[0] * len(columns) for _ in labels]
        for t, p in zip(truth, answers, strict=True):
            counts[labels.index(t)][index["(no answer)" if p is None else p]] += 1
        correct = sum(counts[r][index[label]] for r, label in enumerate(labels))
        out.append(
            _matrix(f"{name} on the labelled replay: accuracy {correct / len(truth):.3f}", labels, columns, counts)
        )
    return "".join(out)


# -- sections: offline evidence ---------------------------------------------------------------


def _evaluation(record: Mapping[str, Any]) -> str:
    out = ["<h2>Offline evaluation</h2>"]
    evaluation = _map(record.get("evaluation"))
    if not evaluation:
        return out[0] + _no_data("offline evaluation")
    metrics, baseline = _map(evaluation.get("metrics")), _map(evaluation.get("baseline"))
    production, blessing = _map(evaluation.get("production")), _map(evaluation.get("blessing"))
    rows = [
        ("candidate", metrics.get("accuracy"), metrics.get("macro_f1"), metrics.get("n")),
        (f"majority baseline ({baseline.get('label', '—')})", baseline.get("accuracy"), None, None),
    ]
    if production:
        rows.append(
            (
                f"production {production.get('version', '')}",
                production.get("accuracy"),
                production.get("macro_f1"),
                None,
            )
        )
    out.append(
        _table(
            ("model", "accuracy", "macro-F1", "n"),
            [(_e(r[0]), _e(_fmt(r[1])), _e(_fmt(r[2])), _e(_fmt(r[3], "count"))) for r in rows],
        )
    )
    if blessing:
        verdict = "blessed" if blessing.get("blessed") else "not blessed"
        reasons = "".join(f"<li>{_e(r)}</li>" for r in _list(blessing.get("reasons")))
        out.append(f"<p>Blessing: <b>{verdict}</b></p><ul>{reasons}</ul>")
    else:
        out.append(_no_data("blessing"))
    per_class = _map(metrics.get("per_class"))
    matrix = _list(metrics.get("confusion_matrix"))
    labels = [str(k) for k in per_class]
    if labels and len(matrix) == len(labels) and all(len(_list(r)) == len(labels) for r in matrix):
        counts = [[int(_num(c) or 0) for c in _list(r)] for r in matrix]
        out.append(_matrix("candidate on the test split", labels, labels, counts))
    if evaluation.get("metrics_uri"):
        out.append(f"<p>metrics: <code>{_e(evaluation['metrics_uri'])}</code></p>")
    return "".join(out)


def _checks(record: Mapping[str, Any]) -> str:
    out = ["<h2>Pre-traffic gate and checks</h2>"]
    checks = _map(record.get("checks"))
    if not checks:
        return out[0] + _no_data("checks")
    for name, raw in checks.items():
        check = _map(raw)
        if not check:
            out.append(f"<h3>{_e(name)}</h3>" + _no_data(f"{name} (did not complete)"))
            continue
        passed = check.get("passed")
        phase = "Pass" if passed is True else "Fail" if passed is False else None
        out.append(f"<h3>{_e(name)} {_phase(phase)}</h3><p>{_e(check.get('reason') or '')}</p>")
        golden = [_map(g) for g in _list(_map(check.get("golden")).get("requests"))]
        if golden:
            rows = [
                (
                    _e(str(g.get("text", ""))[:80]),
                    _e(g.get("status", "—")),
                    _e(_fmt(g.get("latency_ms"), "latency")),
                    _e(json.dumps(_strict(g.get("body")), default=str)[:160]),
                )
                for g in golden
            ]
            out.append(_table(("golden text", "status", "latency", "answer"), rows))
        rest = {k: v for k, v in check.items() if k not in ("passed", "reason", "golden")}
        if rest:
            out.append(_kv(rest))
    return "".join(out)


def _provenance(record: Mapping[str, Any]) -> str:
    archive, inputs = _map(record.get("archive")), _map(record.get("inputs"))
    rows = [
        ("archive", archive.get("uri")),
        ("sha256", archive.get("sha256")),
        ("data fingerprint", record.get("data_fingerprint")),
        *((f"input: {k}", v) for k, v in inputs.items()),
    ]
    body = [(_e(k), f"<code>{_e(v)}</code>" if v else f'<span class="nodata">{NO_DATA}</span>') for k, v in rows]
    return "<h2>Archive and inputs</h2>" + _table(("what", "where"), body)


# -- entry points -----------------------------------------------------------------------------


def render_html(record: Mapping[str, Any]) -> str:
    """The release record as one self-contained HTML page: inline CSS and SVG, no scripts, no assets."""
    record = _map(record)
    title = f"{record.get('model_name') or 'release'} {_map(record.get('candidate')).get('version') or ''}: "
    title += str(record.get("decision") or "no decision")
    sections = (_header, _canary, _checks, _evaluation, _provenance)
    body = "".join(section(record) for section in sections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>"
    )


def report_files(record: Mapping[str, Any]) -> dict[str, bytes]:
    """``report.json`` (strict JSON: NaN becomes ``null``) and ``report.html``, ready to store."""
    return {
        "report.json": json.dumps(_strict(record), indent=2, sort_keys=True, allow_nan=False, default=str).encode(),
        "report.html": render_html(record).encode(),
    }
