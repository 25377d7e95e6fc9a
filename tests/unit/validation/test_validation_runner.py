from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from ml_release.config import DataSpec, ReleaseSpec
from ml_release.data.dataset import sample_dataset_path
from ml_release.validation.runner import ExpectationOutcome, ValidationReport, validate_dataset

pytestmark = pytest.mark.unit

LABELS = ("negative", "neutral", "positive")


@pytest.fixture(scope="module")
def spec() -> DataSpec:
    return dataclasses.replace(ReleaseSpec.for_model("sentiment").data, min_rows=30)


def frame(rows: int = 60) -> pd.DataFrame:
    """A clean drop: balanced labels, unique texts, confidences in [0, 1]."""
    return pd.DataFrame(
        {
            "sentiment": [LABELS[i % 3] for i in range(rows)],
            "confidence": [round(0.3 + (i % 7) / 10, 2) for i in range(rows)],
            "text": [f"tweet number {i} about self-driving cars" for i in range(rows)],
        }
    )


def to_csv(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode("latin-1")


def failed(report: ValidationReport) -> dict[str, ExpectationOutcome]:
    return {outcome.expectation: outcome for outcome in report.failures()}


def test_clean_frame_passes(spec: DataSpec) -> None:
    report, df = validate_dataset(to_csv(frame()), spec)

    assert report.success, report.summary()
    assert report.row_count == 60
    assert report.exceptions == ()
    assert df is not None and list(df.columns) == ["sentiment", "confidence", "text"]
    assert report.summary() == f"all {len(report.outcomes)} checks passed"


def test_real_sample_passes_with_the_release_spec() -> None:
    spec = ReleaseSpec.for_model("sentiment").data
    report, df = validate_dataset(sample_dataset_path().read_bytes(), spec)

    assert report.success, report.summary()
    assert report.row_count == 38158
    assert df is not None and len(df) == 38158


@pytest.mark.parametrize(
    ("raw", "check", "phrase"),
    [
        (b"", "input.not_empty", "empty"),
        (b"  \n\n ", "input.not_empty", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" * 8, "input.is_text", "NUL"),
        (random.Random(7).randbytes(4096).replace(b"\x00", b"\x01"), "input.is_text", "control"),
        (b'sentiment,confidence,text\n"unterminated,0.5,hello\n', "input.is_csv", "not a parseable CSV"),
        (b"sentiment,confidence,text\npositive,0.5,ok,surplus\n", "input.is_csv", "not a parseable CSV"),
    ],
    ids=["empty-file", "whitespace-only", "png-bytes", "random-bytes", "open-quote", "ragged-row"],
)
def test_unreadable_input_fails_before_great_expectations(spec: DataSpec, raw: bytes, check: str, phrase: str) -> None:
    report, df = validate_dataset(raw, spec)

    assert not report.success
    assert df is None
    assert report.row_count is None
    assert list(failed(report)) == [check]
    assert phrase in failed(report)[check].detail
    assert not any(o.expectation.startswith(("table.", "text.", "label.")) for o in report.outcomes)


def test_input_the_encoding_cannot_decode_is_not_text(spec: DataSpec) -> None:
    utf8_spec = dataclasses.replace(spec, encoding="utf-8")

    report, df = validate_dataset(to_csv(frame()) + b"negative,0.5,caf\xe9 \xff\n", utf8_spec)

    assert df is None
    assert "cannot be decoded as utf-8" in failed(report)["input.is_text"].detail


def test_oversize_input_fails_before_parsing(spec: DataSpec) -> None:
    raw = to_csv(frame())
    small = dataclasses.replace(spec, max_bytes=len(raw) - 1)

    report, df = validate_dataset(raw, small)

    assert df is None
    assert [o.expectation for o in report.outcomes] == ["input.size_within_limit"]
    assert "over the" in report.outcomes[0].detail
    assert report.outcomes[0].observed == {"size_bytes": len(raw), "max_bytes": len(raw) - 1}


def test_header_only_csv_fails_the_row_count_floor(spec: DataSpec) -> None:
    report, df = validate_dataset(b"sentiment,confidence,text\n", spec)

    assert not report.success
    assert df is not None and len(df) == 0
    assert report.row_count == 0
    assert "table.row_count" in failed(report)
    assert "0 rows, need at least 30" in failed(report)["table.row_count"].detail


def test_missing_column_fails_its_checks_and_names_it(spec: DataSpec) -> None:
    report, _ = validate_dataset(to_csv(frame().drop(columns=["confidence"])), spec)

    failures = failed(report)
    assert not report.success
    assert set(failures) == {"table.columns", "confidence.range"}
    assert "missing ['confidence']" in failures["table.columns"].detail
    assert "column 'confidence' is missing" in failures["confidence.range"].detail
    assert "confidence" in report.summary()


def test_missing_label_column_fails_every_label_check(spec: DataSpec) -> None:
    report, _ = validate_dataset(to_csv(frame().rename(columns={"sentiment": "label"})), spec)

    failures = failed(report)
    label_checks = [o for o in report.outcomes if o.column == "sentiment"]
    assert label_checks and all(not o.success for o in label_checks)
    assert "missing ['sentiment'], unexpected ['label']" in failures["table.columns"].detail
    assert all("'sentiment' is missing" in o.detail for o in label_checks)


def test_extra_column_fails_the_exact_column_set(spec: DataSpec) -> None:
    report, _ = validate_dataset(to_csv(frame().assign(user="someone")), spec)

    assert list(failed(report)) == ["table.columns"]
    assert "unexpected ['user']" in failed(report)["table.columns"].detail
    assert failed(report)["table.columns"].unexpected_examples == ("user",)


def corrupt(column: str, value: object, every: int = 1, rows: int = 60) -> Callable[[], pd.DataFrame]:
    def build() -> pd.DataFrame:
        df = frame(rows)
        df[column] = df[column].astype(object)
        df.loc[df.index % every == 0, column] = value
        return df

    return build


@pytest.mark.parametrize(
    ("build", "check", "phrases"),
    [
        (corrupt("sentiment", "angry", every=20), "label.in_set", ["3 rows (5.0%) not in", "'angry'"]),
        (corrupt("text", "   ", every=15), "text.not_blank", ["4 rows", "are blank"]),
        (corrupt("confidence", 1.5, every=10), "confidence.range", ["6 rows", "outside [0, 1]", "1.5"]),
        (corrupt("confidence", -0.2, every=30), "confidence.range", ["2 rows", "-0.2"]),
        (corrupt("confidence", "high", every=30), "confidence.range", ["not numeric", "'high'"]),
        (corrupt("text", "x" * 501, every=30), "text.length", ["2 rows", "outside [3, 500]"]),
        (corrupt("text", "ok", every=30), "text.length", ["2 rows", "'ok'"]),
        (corrupt("text", "cafÃ© con leche, bitte", every=10), "text.mojibake", ["6 rows (10.0%)", "Ã©"]),
        (corrupt("text", "same old tweet", every=10), "text.duplicates", ["unique, need at least 95.0%"]),
    ],
    ids=[
        "unknown-label",
        "blank-text",
        "confidence-above-1",
        "confidence-below-0",
        "confidence-not-numeric",
        "text-too-long",
        "text-too-short",
        "mojibake-over-ceiling",
        "too-many-duplicates",
    ],
)
def test_bad_values_fail_the_check_that_names_them(
    spec: DataSpec, build: Callable[[], pd.DataFrame], check: str, phrases: list[str]
) -> None:
    report, df = validate_dataset(to_csv(build()), spec)

    assert not report.success
    assert df is not None
    assert check in failed(report), report.summary()
    for phrase in phrases:
        assert phrase in failed(report)[check].detail
    assert check in report.summary()


def test_null_labels_fail_not_null(spec: DataSpec) -> None:
    raw = to_csv(frame()) + b",0.5,a tweet without a label\n"

    report, _ = validate_dataset(raw, spec)

    assert "1 rows" in failed(report)["label.not_null"].detail


def test_texts_that_look_like_missing_markers_are_texts(spec: DataSpec) -> None:
    df = frame()
    df.loc[0, "text"] = "NaN"
    df.loc[1, "text"] = "null"

    report, parsed = validate_dataset(to_csv(df), spec)

    assert parsed is not None and parsed["text"].notna().all()
    assert "text.not_null" not in failed(report)


@pytest.mark.parametrize(
    ("shares", "check", "phrase"),
    [
        ({"negative": 47, "neutral": 12, "positive": 1}, "label.share_min[positive]", "floor 5.0%"),
        ({"negative": 52, "neutral": 4, "positive": 4}, "label.share_max[negative]", "ceiling 80.0%"),
    ],
    ids=["minority-class-under-floor", "majority-class-over-ceiling"],
)
def test_class_share_out_of_bounds_fails(spec: DataSpec, shares: dict[str, int], check: str, phrase: str) -> None:
    df = frame(sum(shares.values()))
    df["sentiment"] = [label for label, n in shares.items() for _ in range(n)]

    report, _ = validate_dataset(to_csv(df), spec)

    assert not report.success
    assert check in failed(report), report.summary()
    assert phrase in failed(report)[check].detail
    assert "share of" in failed(report)[check].detail


def test_report_is_json_and_explains_failures(spec: DataSpec) -> None:
    report, _ = validate_dataset(to_csv(corrupt("sentiment", "angry", every=20)()), spec)

    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["success"] is False
    assert as_dict["summary"].startswith(f"1 of {len(report.outcomes)} checks failed: label.in_set")
    outcome = next(o for o in as_dict["outcomes"] if o["expectation"] == "label.in_set")
    assert outcome["unexpected_examples"] == ["angry", "angry", "angry"]
    assert outcome["observed"]["unexpected_count"] == 3


def test_unexpected_examples_are_few_and_short(spec: DataSpec) -> None:
    report, _ = validate_dataset(to_csv(corrupt("text", "y" * 600, every=3)()), spec)

    outcome = failed(report)["text.length"]
    assert len(outcome.unexpected_examples) == 5
    assert all(len(example) == 200 for example in outcome.unexpected_examples)


def test_raised_exception_is_never_a_pass(spec: DataSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    from ml_release.validation import runner

    def explode(_: DataSpec) -> object:
        raise RuntimeError("metric store unavailable")

    monkeypatch.setattr(runner, "_build_checkpoint", explode)

    report, _ = validate_dataset(to_csv(frame()), spec)

    assert not report.success
    assert report.exceptions == ("great_expectations.run: RuntimeError: metric store unavailable",)
    assert "great_expectations.run" in failed(report)


def test_data_docs_are_written_when_asked(spec: DataSpec, tmp_path: Path) -> None:
    docs = tmp_path / "docs"

    report, _ = validate_dataset(to_csv(corrupt("sentiment", "angry", every=20)()), spec, docs_dir=docs)

    index = docs / "index.html"
    assert index.is_file()
    pages = list((docs / "validations").rglob("*.html"))
    assert len(pages) == 1
    assert "angry" in pages[0].read_text(encoding="utf-8")
    assert not report.success
