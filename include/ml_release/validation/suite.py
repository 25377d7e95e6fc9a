"""The great-expectations suite for an input dataset, derived from its :class:`DataSpec`.

The checks are first described as plain data (:func:`suite_checks`), so that the runner can map
each great-expectations result back to a stable check name and explain it in one sentence, and so
that the suite can be inspected without importing great-expectations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from ml_release.config import DataSpec

if TYPE_CHECKING:
    from great_expectations.core.expectation_suite import ExpectationSuite

# UTF-8 bytes that were decoded as latin-1 / cp1252: "Ã©" for "é", "â€™" for a right quote, "Â " for a
# no-break space. Their second byte is a continuation byte (0x80-0xBF), which real latin-1 text
# almost never puts after "Ã" or "Â".
MOJIBAKE_REGEX = r"Ã[\x80-\xbf]|â€|Â[\x80-\xbf ]"
# At least one character that is not whitespace.
NOT_BLANK_REGEX = r"\S"
CHECK_META_KEY = "ml_release_check"

Kind = Literal[
    "row_count",
    "columns",
    "not_null",
    "not_blank",
    "in_set",
    "length",
    "range",
    "unique_share",
    "mojibake",
    "share_min",
    "share_max",
]


@dataclasses.dataclass(frozen=True)
class Check:
    """One expectation of the suite, with the name reports use for it."""

    name: str
    kind: Kind
    expectation: str
    column: str | None
    kwargs: Mapping[str, Any]


def suite_name(spec: DataSpec) -> str:
    return f"input_{spec.text_column}_{spec.label_column}".replace(".", "_")


def suite_checks(spec: DataSpec) -> tuple[Check, ...]:
    """Every check the suite makes, in the order they are reported."""
    text, label = spec.text_column, spec.label_column
    checks = [
        # G6: every per-row expectation passes on zero rows; this floor is what fails them.
        Check(
            "table.row_count",
            "row_count",
            "ExpectTableRowCountToBeBetween",
            None,
            {"min_value": spec.min_rows},
        ),
        # G7: a missing, extra or renamed column fails, whatever order the columns come in.
        Check(
            "table.columns",
            "columns",
            "ExpectTableColumnsToMatchSet",
            None,
            {"column_set": list(spec.columns), "exact_match": True},
        ),
        Check("text.not_null", "not_null", "ExpectColumnValuesToNotBeNull", text, {}),
        Check("text.not_blank", "not_blank", "ExpectColumnValuesToMatchRegex", text, {"regex": NOT_BLANK_REGEX}),
        Check(
            "text.length",
            "length",
            "ExpectColumnValueLengthsToBeBetween",
            text,
            {"min_value": spec.min_text_length, "max_value": spec.max_text_length},
        ),
        Check(
            "text.duplicates",
            "unique_share",
            "ExpectColumnProportionOfUniqueValuesToBeBetween",
            text,
            {"min_value": _share(1 - spec.max_duplicate_ratio)},
        ),
        Check(
            "text.mojibake",
            "mojibake",
            "ExpectColumnValuesToNotMatchRegex",
            text,
            {"regex": MOJIBAKE_REGEX, "mostly": _share(1 - spec.max_mojibake_ratio)},
        ),
        Check("label.not_null", "not_null", "ExpectColumnValuesToNotBeNull", label, {}),
        Check("label.in_set", "in_set", "ExpectColumnValuesToBeInSet", label, {"value_set": list(spec.labels)}),
    ]
    if spec.confidence_column is not None:
        checks.append(
            Check(
                "confidence.range",
                "range",
                "ExpectColumnValuesToBeBetween",
                spec.confidence_column,
                {"min_value": 0, "max_value": 1},
            )
        )
    for value in spec.labels:
        # The share of one label is the share of rows "in the set {label}": mostly is a floor on
        # it; its ceiling is a floor on the share of rows not in that set.
        checks.append(
            Check(
                f"label.share_min[{value}]",
                "share_min",
                "ExpectColumnValuesToBeInSet",
                label,
                {"value_set": [value], "mostly": _share(spec.min_class_share)},
            )
        )
        checks.append(
            Check(
                f"label.share_max[{value}]",
                "share_max",
                "ExpectColumnValuesToNotBeInSet",
                label,
                {"value_set": [value], "mostly": _share(1 - spec.max_class_share)},
            )
        )
    return tuple(checks)


def build_expectation_suite(spec: DataSpec) -> ExpectationSuite:
    """The checks of :func:`suite_checks` as a great-expectations ``ExpectationSuite``.

    Each expectation carries its check name in ``meta`` so that a result can be traced back.
    """
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=suite_name(spec))
    for check in suite_checks(spec):
        expectation_cls = getattr(gx.expectations, check.expectation)
        kwargs = dict(check.kwargs)
        if check.column is not None:
            kwargs["column"] = check.column
        suite.add_expectation(expectation_cls(**kwargs, meta={CHECK_META_KEY: check.name}))
    return suite


def _share(value: float) -> float:
    # 1 - 0.8 is 0.19999999999999996; a rounded share keeps reports and boundaries readable.
    return round(min(max(value, 0.0), 1.0), 9)
