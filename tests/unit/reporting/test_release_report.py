from __future__ import annotations

import copy
import json
import math
import re
from html.parser import HTMLParser
from typing import Any

import numpy as np
import pytest

from ml_release.analysis.judge import (
    LabelledReplay,
    StepMeasurements,
    VersionSamples,
    WorkerHealth,
    assess,
    decide_rollout,
    default_policy,
)
from ml_release.reporting.report import render_html, report_files

pytestmark = pytest.mark.unit

POLICY = default_policy()
HEALTHY = {"canary_health": WorkerHealth("2", workers=1), "stable_health": WorkerHealth("1", workers=1)}
LABELS = ("negative", "positive")
HOSTILE = "<script>alert(1)</script>"
VOID = {"meta", "br", "line", "circle", "rect", "polyline", "img", "hr", "input", "link"}

# The replay, counted by hand: rows are the truth, columns the answer.
#   canary: negative -> 110 negative, 10 positive;  positive -> 8 negative, 90 positive, 2 no answer
#   stable: negative -> 115 negative,  5 positive;  positive -> 0 negative, 100 positive
TRUTH = ("negative",) * 120 + ("positive",) * 100
CANARY_ANSWERS: tuple[str | None, ...] = ("negative",) * 110 + ("positive",) * 10 + ("negative",) * 8
CANARY_ANSWERS += ("positive",) * 90 + (None, None)
STABLE_ANSWERS: tuple[str | None, ...] = ("negative",) * 115 + ("positive",) * 5 + ("positive",) * 100


class StrictParser(HTMLParser):
    """Fails on a closing tag that does not match the open one; collects the confusion tables."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.titles: list[str] = []
        self.tables: list[tuple[str, list[list[str]]]] = []
        self._bold = False
        self._in_cm = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "b":
            self._bold = True
            self.titles.append("")
        if tag == "table" and ("class", "cm") in attrs:
            self._in_cm = True
            self.tables.append((self.titles[-1], []))
        if self._in_cm and tag == "tr":
            self.tables[-1][1].append([])
        if self._in_cm and tag in ("td", "th"):
            self._cell = []

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        pass

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag == "b":
            self._bold = False
        if tag == "table":
            self._in_cm = False
        if self._in_cm and tag in ("td", "th") and self._cell is not None:
            self.tables[-1][1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._bold:
            self.titles[-1] += data
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], f"unclosed tags: {parser.stack}"
    return parser


def samples(
    rng: np.random.Generator, version: str, n: int, *, extra_ms: float = 0.0, errors: int = 2
) -> VersionSamples:
    latencies = tuple(float(x) for x in rng.lognormal(math.log(20.0), 0.3, n) + extra_ms)
    statuses = (500,) * errors + (200,) * (n - errors)
    labels = tuple(rng.choice(LABELS, n - errors))
    return VersionSamples(version, latencies, statuses, labels)


def full_record(*, n: int = 1200) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    good = LabelledReplay(TRUTH, STABLE_ANSWERS, STABLE_ANSWERS, LABELS)
    bad = LabelledReplay(TRUTH, CANARY_ANSWERS, STABLE_ANSWERS, LABELS)
    measurements = [
        StepMeasurements(0, 5.0, samples(rng, "2", n), samples(rng, "1", n), good, **HEALTHY),
        StepMeasurements(
            1, 25.0, samples(rng, "2", n, extra_ms=400.0, errors=40), samples(rng, "1", n), bad, **HEALTHY
        ),
    ]
    verdicts = [assess(m, POLICY) for m in measurements]
    decision = decide_rollout(verdicts, POLICY, total_steps=4, elapsed_s=130.0)
    steps = [
        {
            "step": m.step,
            "weight": m.weight,
            "effective_weight": m.weight,
            "started_at": f"2024-05-01T10:0{2 * i}:00+00:00",
            "ended_at": f"2024-05-01T10:0{2 * i + 1}:00+00:00",
            "served": {"canary": n, "stable": n, "unattributed": 0},
            "measurements": m.to_dict(),
            "verdict": v.to_dict(),
        }
        for i, (m, v) in enumerate(zip(measurements, verdicts, strict=True))
    ]
    timeline = [
        {"at": "2024-05-01T10:00:00+00:00", "weight": 5.0, "effective_weight": 5.0, "reason": "step 0"},
        {"at": "2024-05-01T10:02:00+00:00", "weight": 25.0, "effective_weight": 24.0, "reason": "step 1"},
        {"at": "2024-05-01T10:03:10+00:00", "weight": 0.0, "effective_weight": 0.0, "reason": "rollback"},
    ]
    return {
        "schema": "ml-release/release-record/v1",
        "model_name": "sentiment",
        "release": {"dag_id": "release_model", "run_id": "manual__1", "key": "k"},
        "recorded_at": "2024-05-01T10:04:00+00:00",
        "candidate": {"model_name": "sentiment", "version": "2", "archive_uri": "s3://m/2.mar", "sha256": "ab" * 32},
        "previous_production_version": "1",
        "inputs": {"dataset_uri": "s3://data/d.csv", "training_run": None, "eval_dataset_uri": "s3://data/t.parquet"},
        "data_fingerprint": "f" * 16,
        "validation": {"passed": True},
        "training": {"profile": "demo", "metrics": {"loss": 0.3}},
        "evaluation": {
            "metrics_uri": "s3://runs/metrics.json",
            "metrics": {
                "n": 100,
                "accuracy": 0.87,
                "macro_f1": 0.861,
                "per_class": {"negative": {"support": 50}, "positive": {"support": 50}},
                "confusion_matrix": [[44, 6], [7, 43]],
            },
            "baseline": {"label": "negative", "accuracy": 0.5},
            "production": None,
            "blessing": {"blessed": True, "reasons": ["accuracy 0.870 >= floor 0.600"]},
        },
        "archive": {"uri": "s3://m/2.mar", "sha256": "ab" * 32},
        "checks": {
            "pretraffic_gate": {
                "passed": True,
                "reason": "1 READY worker(s), golden requests valid",
                "ready_workers": 1,
                "ready_in_s": 3.2,
                "golden": {"passed": True, "problems": [], "requests": [{"text": "great", "status": 200}]},
            },
            "check_accuracy": None,
        },
        "decision": "rolled_back",
        "reason": verdicts[1].message,
        "default_version_after": "1",
        "canary": {"mode": "progressive", "steps": steps, "weight_timeline": timeline, "decision": decision.to_dict()},
    }


def test_full_record_renders_decision_metrics_and_one_svg_per_plot() -> None:
    record = full_record()
    page = render_html(record)
    parse(page)
    assert [s["verdict"]["phase"] for s in record["canary"]["steps"]] == ["Pass", "Fail"]
    assert record["canary"]["decision"]["action"] == "rollback"
    assert "ROLLED BACK" in page and "#c92a2a" in page
    assert "Halt advancement" in page
    for metric in POLICY.metrics:
        assert metric.name in page
    # a latency plot per step, the error rates and the weight timeline
    assert page.count("<svg") == 4
    assert page.count("latency distribution, stable vs canary") >= 2
    assert "s3://m/2.mar" in page and "ab" * 32 in page
    assert "accuracy 0.870 &gt;= floor 0.600" in page
    assert "1 READY worker(s), golden requests valid" in page


def test_confusion_matrices_count_the_replay() -> None:
    tables = parse(render_html(full_record())).tables
    assert [title for title, _ in tables] == [
        "canary on the labelled replay: accuracy 0.977",
        "stable on the labelled replay: accuracy 0.977",
        "canary on the labelled replay: accuracy 0.909",
        "stable on the labelled replay: accuracy 0.977",
        "candidate on the test split",
    ]
    canary, stable, offline = tables[2][1], tables[3][1], tables[4][1]
    assert canary[0] == ["true \\ predicted", "negative", "positive", "(no answer)", "recall"]
    assert canary[1:] == [["negative", "110", "10", "0", "91.7%"], ["positive", "8", "90", "2", "90.0%"]]
    assert stable[0] == ["true \\ predicted", "negative", "positive", "recall"]
    assert stable[1:] == [["negative", "115", "5", "95.8%"], ["positive", "0", "100", "100.0%"]]
    assert offline[1:] == [["negative", "44", "6", "88.0%"], ["positive", "7", "43", "86.0%"]]


@pytest.mark.parametrize(
    ("decision", "phase", "colour", "shown"),
    [
        ("promoted", "Pass", "#2b8a3e", "PROMOTED"),
        ("rolled_back", "Fail", "#c92a2a", "ROLLED BACK"),
        ("rolled_back", "Inconclusive", "#e67700", "ROLLED BACK"),
        (None, None, "#e67700", "NO DECISION RECORDED"),
    ],
    ids=["promoted-green", "rolled-back-red", "inconclusive-amber", "missing-amber"],
)
def test_decision_banner_colour(decision: str | None, phase: str | None, colour: str, shown: str) -> None:
    page = render_html({"decision": decision, "canary": {"decision": {"phase": phase}}})
    assert f'class="decision" style="background:{colour}"' in page
    assert shown in page


def _sparse(record: dict[str, Any], change: str) -> dict[str, Any]:
    step = record["canary"]["steps"][0]
    if change == "no-canary":
        del record["canary"]
    elif change == "null-canary":
        record["canary"] = None
    elif change == "empty-steps":
        record["canary"] = {"mode": "progressive", "steps": [], "weight_timeline": [], "decision": None}
    elif change == "step-without-traffic":
        step["measurements"] = {"step": 0, "weight": 5.0, "canary": None, "stable": None, "replay": None}
        step["served"] = None
    elif change == "null-everywhere":
        step.update(measurements=None, verdict=None, served=None, started_at=None, weight=None)
        record["canary"]["steps"][1]["verdict"]["metrics"][0].update(
            value=None, stable_value=None, p_value=None, effect_size=None, threshold=None
        )
        record["canary"]["weight_timeline"] = None
        record.update(evaluation=None, checks=None, archive=None, candidate=None, reason=None)
    elif change == "nan-latencies":
        for side in ("canary", "stable"):
            step["measurements"][side]["latencies_ms"] = [None] * 10
    elif change == "first-release":
        for s in record["canary"]["steps"]:
            s["measurements"]["stable"] = None
            s["measurements"]["replay"]["stable"] = []
        record["canary"]["mode"] = "first_release"
        record["previous_production_version"] = None
    elif change == "empty-record":
        record.clear()
    return record


@pytest.mark.parametrize(
    "change",
    [
        "no-canary",
        "null-canary",
        "empty-steps",
        "step-without-traffic",
        "null-everywhere",
        "nan-latencies",
        "first-release",
        "empty-record",
    ],
)
def test_missing_parts_render_as_no_data(change: str) -> None:
    page = render_html(_sparse(full_record(n=300), change))
    parse(page)
    assert "no data" in page


def test_first_release_says_so_and_still_plots_the_canary() -> None:
    page = render_html(_sparse(full_record(n=300), "first-release"))
    assert "none (first release)" in page
    assert "stable latency: no data" in page
    assert page.count("<svg") == 4


def test_hostile_strings_are_escaped() -> None:
    record = full_record(n=300)
    record["model_name"] = HOSTILE
    record["reason"] = HOSTILE
    record["canary"]["steps"][0]["verdict"]["metrics"][0]["message"] = HOSTILE
    record["canary"]["steps"][0]["verdict"]["metrics"][0]["metric"] = HOSTILE
    record["canary"]["weight_timeline"][0]["reason"] = HOSTILE
    record["canary"]["steps"][0]["measurements"]["replay"]["labels"].append(HOSTILE)
    record["checks"]["pretraffic_gate"]["golden"]["requests"][0]["text"] = HOSTILE
    record["checks"][HOSTILE] = {"passed": False, "reason": HOSTILE, HOSTILE: HOSTILE}
    record["evaluation"]["blessing"]["reasons"] = [HOSTILE]
    page = render_html(record)
    parse(page)
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_report_files_hold_the_record_as_json_and_a_page_that_parses() -> None:
    record = full_record(n=300)
    files = report_files(record)
    assert set(files) == {"report.json", "report.html"}
    assert json.loads(files["report.json"]) == record
    parse(files["report.html"].decode())


def test_report_json_is_strict_when_the_record_holds_nan() -> None:
    record = {"model_name": "m", "canary": {"steps": [{"weight": math.nan}]}}
    files = report_files(copy.deepcopy(record))
    assert json.loads(files["report.json"]) == {"model_name": "m", "canary": {"steps": [{"weight": None}]}}
    parse(files["report.html"].decode())


def test_page_references_no_external_asset() -> None:
    page = render_html(full_record(n=300)).lower()
    for needle in ("http://", "https://", "src=", "href=", "url(", "<script", "<link", "@import"):
        assert needle not in page


def test_long_latency_arrays_are_downsampled() -> None:
    page = render_html(full_record(n=20_000))
    points = [len(p.split()) for p in re.findall(r'<polyline points="([^"]*)"', page)]
    assert points and max(points) <= 202
    assert len(page) < 150_000
