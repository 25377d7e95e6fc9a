"""Validate a raw dataset drop: cheap pre-checks, then the great-expectations suite.

The verdict fails closed. Bytes that are too large, empty, binary or not CSV never reach
great-expectations (G9); every exception great-expectations raises counts as a failure, whatever
it reported (G8); a column the suite needs but the data lacks fails every check on it, by name.

``great_expectations`` is imported inside :func:`validate_dataset` so that importing this module
(from a DAG file or a report builder) stays cheap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ml_release.config import DataSpec
from ml_release.data.dataset import read_csv_text
from ml_release.validation.suite import CHECK_META_KEY, Check, build_expectation_suite, suite_checks

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5
MAX_EXAMPLE_CHARS = 200
# Text legitimately holds tabs and line breaks; beyond that a CSV has essentially no C0 control
# characters, while random bytes have about 11 % of them.
MAX_CONTROL_SHARE = 0.01
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_DETAIL_EXAMPLE_CHARS = 60
_DOCS_SITE = "ml_release_validation"


@dataclasses.dataclass(frozen=True)
class ExpectationOutcome:
    """The result of one check, pre-check or expectation, explained in one sentence."""

    expectation: str
    column: str | None
    success: bool
    observed: Any
    unexpected_examples: tuple[str, ...]
    detail: str

    def __post_init__(self) -> None:
        # Results end up in the release record and in XCom: numpy scalars must not leak in.
        object.__setattr__(self, "observed", _jsonable(self.observed))

    def to_dict(self) -> dict[str, Any]:
        return {
            "expectation": self.expectation,
            "column": self.column,
            "success": self.success,
            "observed": self.observed,
            "unexpected_examples": list(self.unexpected_examples),
            "detail": self.detail,
        }


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    """The verdict on one dataset drop; ``success`` only if every check passed and nothing raised."""

    success: bool
    row_count: int | None
    size_bytes: int
    outcomes: tuple[ExpectationOutcome, ...]
    exceptions: tuple[str, ...]

    def failures(self) -> tuple[ExpectationOutcome, ...]:
        return tuple(outcome for outcome in self.outcomes if not outcome.success)

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "row_count": self.row_count,
            "size_bytes": self.size_bytes,
            "summary": self.summary(),
            "outcomes": [outcome.to_dict() for outcome in self.outcomes],
            "exceptions": list(self.exceptions),
        }

    def summary(self) -> str:
        failed = self.failures()
        total = len(self.outcomes)
        if not failed and not self.exceptions and self.success:
            return f"all {total} checks passed"
        text = f"{len(failed)} of {total} checks failed"
        if failed:
            text += ": " + ", ".join(outcome.expectation for outcome in failed)
        if self.exceptions:
            text += f"; {len(self.exceptions)} exception(s) raised: {self.exceptions[0]}"
        return text


def validate_dataset(
    raw: bytes, spec: DataSpec, docs_dir: Path | None = None
) -> tuple[ValidationReport, pd.DataFrame | None]:
    """Validate a CSV drop against ``spec``; return the report and, if it parsed, the DataFrame.

    With ``docs_dir``, great-expectations' HTML data docs for this validation are written there
    (``index.html``) whenever the suite ran (not when a pre-check stopped it); they are built after
    the verdict, and a failure to build them is logged, never turned into a pass or a fail.
    """
    size = len(raw)
    outcomes: list[ExpectationOutcome] = []

    def stop() -> tuple[ValidationReport, None]:
        return ValidationReport(False, None, size, tuple(outcomes), ()), None

    # G9: the caller bounds the download with a HEAD; this bounds whatever reached us anyway.
    within = size <= spec.max_bytes
    outcomes.append(
        _pre_check(
            "input.size_within_limit",
            within,
            {"size_bytes": size, "max_bytes": spec.max_bytes},
            f"input is {size:,} bytes, {'within' if within else 'over'} the {spec.max_bytes:,}-byte"
            " limit (data.max_bytes)",
        )
    )
    if not within:
        return stop()

    has_content = bool(raw.strip())
    outcomes.append(
        _pre_check(
            "input.not_empty",
            has_content,
            {"size_bytes": size},
            f"input has {size:,} bytes" if has_content else f"input is empty ({size} bytes, no content)",
        )
    )
    if not has_content:
        return stop()

    text_outcome, text = _check_is_text(raw, spec.encoding)
    outcomes.append(text_outcome)
    if text is None:
        return stop()

    try:
        df = read_csv_text(text, spec)
    except Exception as exc:  # ParserError, EmptyDataError, or anything else pandas trips on
        message = _first_line(str(exc))
        outcomes.append(
            _pre_check(
                "input.is_csv",
                False,
                {"error": f"{type(exc).__name__}: {message}"},
                f"input is not a parseable CSV: {message}",
            )
        )
        return stop()
    outcomes.append(
        _pre_check(
            "input.is_csv",
            True,
            {"rows": len(df), "columns": [str(c) for c in df.columns]},
            f"parsed {len(df):,} rows with columns {[str(c) for c in df.columns]}",
        )
    )

    ge_success, suite_outcomes, exceptions = _run_suite(df, spec, docs_dir)
    outcomes.extend(suite_outcomes)
    success = ge_success and not exceptions and all(outcome.success for outcome in outcomes)
    report = ValidationReport(success, len(df), size, tuple(outcomes), tuple(exceptions))
    return report, df


# -- pre-checks ------------------------------------------------------------------------------


def _pre_check(name: str, success: bool, observed: Any, detail: str) -> ExpectationOutcome:
    return ExpectationOutcome(name, None, success, observed, (), detail)


def _check_is_text(raw: bytes, encoding: str) -> tuple[ExpectationOutcome, str | None]:
    name = "input.is_text"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        detail = f"input cannot be decoded as {encoding} (data.encoding): {exc.reason} at byte {exc.start}"
        return _pre_check(name, False, {"encoding": encoding, "error": str(exc)}, detail), None
    nul_count = text.count("\x00")
    control_count = len(_CONTROL.findall(text)) if nul_count == 0 else nul_count
    control_share = control_count / max(len(text), 1)
    observed = {"nul_chars": nul_count, "control_share": round(control_share, 6)}
    if nul_count:
        detail = f"input looks binary, not text: {nul_count:,} NUL characters"
        return _pre_check(name, False, observed, detail), None
    if control_share > MAX_CONTROL_SHARE:
        detail = (
            f"input looks binary, not text: {control_share:.1%} of characters are control characters"
            f" (limit {MAX_CONTROL_SHARE:.0%})"
        )
        return _pre_check(name, False, observed, detail), None
    detail = f"input decodes as {encoding} text ({control_share:.2%} control characters)"
    return _pre_check(name, True, observed, detail), text


# -- great-expectations ----------------------------------------------------------------------


def _run_suite(
    df: pd.DataFrame, spec: DataSpec, docs_dir: Path | None
) -> tuple[bool, list[ExpectationOutcome], list[str]]:
    """Run the suite on ``df``; return GE's own verdict, one outcome per check, and exceptions."""
    checks = suite_checks(spec)
    try:
        context, checkpoint = _build_checkpoint(spec)
        checkpoint_result = checkpoint.run(batch_parameters={"dataframe": df})
        (validation_result,) = checkpoint_result.run_results.values()
    except Exception as exc:  # G8: whatever great-expectations raises is a failure, never a pass
        log.exception("great-expectations failed to run the suite")
        message = f"great_expectations.run: {type(exc).__name__}: {_first_line(str(exc))}"
        outcome = _pre_check(
            "great_expectations.run", False, None, f"great-expectations raised, so nothing passed: {message}"
        )
        return False, [outcome], [message]

    by_name: dict[str, Any] = {}
    for result in validation_result.results:
        by_name[str(result.expectation_config.meta.get(CHECK_META_KEY))] = result

    present = {str(c) for c in df.columns}
    outcomes: list[ExpectationOutcome] = []
    exceptions: list[str] = []
    for check in checks:
        result = by_name.get(check.name)
        if result is None:
            message = f"{check.name}: great-expectations returned no result for this check"
            exceptions.append(message)
            outcomes.append(ExpectationOutcome(check.name, check.column, False, None, (), message))
            continue
        raised = _exception_messages(result.exception_info)
        exceptions.extend(f"{check.name}: {m}" for m in raised)
        outcomes.append(_outcome(check, result.success, dict(result.result or {}), raised, present, df))

    if docs_dir is not None:
        _build_docs(context, docs_dir)
    return bool(validation_result.success), outcomes, exceptions


def _build_checkpoint(spec: DataSpec) -> tuple[Any, Any]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # Ephemeral: nothing on disk unless data docs are asked for, and no state shared across runs.
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch_definition = (
        context.data_sources.add_pandas("ml_release")
        .add_dataframe_asset("input")
        .add_batch_definition_whole_dataframe("whole")
    )
    suite = context.suites.add(build_expectation_suite(spec))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="validate_data", data=batch_definition, suite=suite)
    )
    # A checkpoint (not a bare definition.run) stores the result, which data docs are built from.
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="validate_data",
            validation_definitions=[definition],
            actions=[],
            # BASIC: counts and up to 20 examples, without SUMMARY's value counts over every row.
            result_format="BASIC",
        )
    )
    return context, checkpoint


def _build_docs(context: Any, docs_dir: Path) -> None:
    try:
        docs_dir.mkdir(parents=True, exist_ok=True)
        context.add_data_docs_site(
            site_name=_DOCS_SITE,
            site_config={
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        context.build_data_docs(site_names=[_DOCS_SITE])
    except Exception:
        # Docs are evidence for a human, built after the verdict; they never change it.
        log.exception("could not build great-expectations data docs in %s", docs_dir)


def _exception_messages(info: Any) -> list[str]:
    """Messages of raised exceptions from GE's ``exception_info``.

    It is either one ``{"raised_exception": ..., "exception_message": ...}`` or a mapping of metric
    ids to such dicts (when a metric failed to resolve).
    """
    if not isinstance(info, Mapping):
        return []
    if "raised_exception" in info:
        if info.get("raised_exception"):
            return [_first_line(str(info.get("exception_message") or "unknown exception"))]
        return []
    messages: list[str] = []
    for value in info.values():
        for message in _exception_messages(value):
            if message not in messages:
                messages.append(message)
    return messages


# -- explaining results ----------------------------------------------------------------------


def _outcome(
    check: Check,
    ge_success: bool | None,
    result: dict[str, Any],
    raised: Sequence[str],
    present: set[str],
    df: pd.DataFrame,
) -> ExpectationOutcome:
    examples = _examples(result.get("partial_unexpected_list") or [])
    if check.column is not None and check.column not in present:
        detail = f"column {check.column!r} is missing from the data, so {check.name} cannot pass"
        return ExpectationOutcome(check.name, check.column, False, None, (), detail)
    if raised and check.kind == "range" and not pd.api.types.is_numeric_dtype(df[check.column]):
        # Retyped column (G7): name what was found rather than GE's comparison error.
        numbers = pd.to_numeric(df[check.column], errors="coerce")
        bad = _examples(df[check.column][numbers.isna() & df[check.column].notna()].tolist())
        sample = f", e.g. {bad[0][:_DETAIL_EXAMPLE_CHARS]!r}" if bad else ""
        detail = f"column {check.column!r} is not numeric (dtype {df[check.column].dtype}){sample}"
        return ExpectationOutcome(check.name, check.column, False, None, bad, detail)
    if raised:
        detail = f"{_where(check)}great-expectations raised: {raised[0]}"
        return ExpectationOutcome(check.name, check.column, False, None, (), detail)
    success = bool(ge_success)
    kind = check.kind
    if kind == "row_count":
        observed = result.get("observed_value")
        detail = f"{observed} rows, need at least {check.kwargs['min_value']:,} (data.min_rows)"
        return ExpectationOutcome(check.name, None, success, observed, (), detail)
    if kind == "columns":
        expected = list(check.kwargs["column_set"])
        found = [str(c) for c in df.columns]
        missing = [c for c in expected if c not in present]
        extra = [c for c in found if c not in set(expected)]
        if success:
            detail = f"columns {found} match {expected}"
        else:
            parts = [f"missing {missing}"] if missing else []
            parts += [f"unexpected {extra}"] if extra else []
            detail = f"columns {found} do not match {expected}: {', '.join(parts)}"
        observed = {"columns": found, "missing": missing, "unexpected": extra}
        return ExpectationOutcome(check.name, None, success, observed, tuple(missing + extra), detail)
    if kind == "unique_share":
        share = result.get("observed_value")
        floor = float(check.kwargs["min_value"])
        share_text = f"{float(share):.1%}" if isinstance(share, int | float) else repr(share)
        detail = (
            f"column {check.column!r}: {share_text} of values are unique, need at least {floor:.1%}"
            f" (duplicate ratio at most {1 - floor:.1%}, data.max_duplicate_ratio)"
        )
        return ExpectationOutcome(check.name, check.column, success, share, (), detail)

    count = int(result.get("unexpected_count") or 0)
    percent = float(result.get("unexpected_percent") or 0.0)
    elements = int(result.get("element_count") or 0)
    missing_count = int(result.get("missing_count") or 0)
    observed = {
        "element_count": elements,
        "missing_count": missing_count,
        "unexpected_count": count,
        "unexpected_percent": round(percent, 6),
    }
    rows = f"{count:,} rows ({_percent(percent / 100)})"
    example = f", e.g. {examples[0][:_DETAIL_EXAMPLE_CHARS]!r}" if examples and count else ""
    column = f"column {check.column!r}: "
    if kind == "not_null":
        detail = f"{column}{rows} are null"
    elif kind == "not_blank":
        detail = f"{column}{rows} are blank{example}"
    elif kind == "in_set":
        detail = f"{column}{rows} not in {list(check.kwargs['value_set'])}{example}"
    elif kind == "length":
        bounds = f"[{check.kwargs['min_value']}, {check.kwargs['max_value']}]"
        detail = f"{column}{rows} have a length outside {bounds} (data.min/max_text_length){example}"
    elif kind == "range":
        bounds = f"[{check.kwargs['min_value']}, {check.kwargs['max_value']}]"
        detail = f"{column}{rows} outside {bounds}, nulls allowed{example}"
    elif kind == "mojibake":
        ceiling = 1 - float(check.kwargs["mostly"])
        detail = (
            f"{column}{rows} look like UTF-8 read as latin-1 (mojibake), ceiling {ceiling:.1%}"
            f" (data.max_mojibake_ratio){example}"
        )
    else:  # share_min, share_max
        (value,) = check.kwargs["value_set"]
        if kind == "share_min":
            share = 1 - percent / 100
            bound = f"floor {float(check.kwargs['mostly']):.1%} (data.min_class_share)"
        else:
            share = percent / 100
            bound = f"ceiling {1 - float(check.kwargs['mostly']):.1%} (data.max_class_share)"
        if elements - missing_count > 0:
            detail = f"{column}share of {value!r} is {share:.1%}, {bound}"
            observed["share"] = round(share, 6)
        else:
            # Per-row checks pass on zero rows (G6); say so rather than print a share of 0 %.
            detail = f"{column}share of {value!r} is undefined: no labelled rows; {bound}"
            observed["share"] = None
        examples = ()
    return ExpectationOutcome(check.name, check.column, success, observed, examples, detail)


def _percent(share: float) -> str:
    # A handful of bad rows in a large drop should not read as "0.0%".
    return f"{share:.2%}" if 0 < share < 0.001 else f"{share:.1%}"


def _where(check: Check) -> str:
    return f"column {check.column!r}: " if check.column is not None else ""


def _examples(values: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(value)[:MAX_EXAMPLE_CHARS] for value in list(values)[:MAX_EXAMPLES])


def _first_line(message: str) -> str:
    lines = message.strip().splitlines()
    return lines[0] if lines else message


def _jsonable(value: Any) -> Any:
    """Plain JSON types only: numpy scalars and other leftovers become numbers or strings."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    return str(value)
