from __future__ import annotations

import json
import math

import pytest

from ml_release.config import BlessingSpec
from ml_release.evaluation.blessing import bless

pytestmark = pytest.mark.unit

SPEC = BlessingSpec(min_accuracy=0.55, baseline_margin=0.05, max_regression=0.02)
NAN = math.nan


@pytest.mark.parametrize(
    ("accuracy", "baseline", "production", "blessed", "failing_rules"),
    [
        (0.612, 0.424, 0.600, True, []),
        (0.612, 0.424, None, True, []),
        (0.612, 0.424, 0.630, True, []),
        (0.540, 0.424, None, False, ["floor"]),
        (0.560, 0.520, None, False, ["baseline"]),
        (0.612, 0.424, 0.640, False, ["production"]),
        (0.401, 0.424, 0.700, False, ["floor", "baseline", "production"]),
        (0.574, 0.524, None, True, []),
        (NAN, 0.424, None, False, ["floor", "baseline", "production"]),
        (0.612, NAN, None, False, ["baseline"]),
        (0.612, 0.424, NAN, False, ["production"]),
    ],
    ids=[
        "all-pass-with-production",
        "all-pass-no-production",
        "regression-within-allowance",
        "below-floor",
        "below-baseline-plus-margin",
        "regresses-too-far-from-production",
        "fails-every-rule",
        "exactly-at-baseline-plus-margin",
        "nan-accuracy",
        "nan-baseline",
        "nan-production",
    ],
)
def test_bless_applies_floor_baseline_and_production_rules(
    accuracy: float, baseline: float, production: float | None, blessed: bool, failing_rules: list[str]
) -> None:
    result = bless(accuracy, baseline, production, SPEC)

    assert result.blessed is blessed
    assert len(result.reasons) == 3, "one reason per rule, pass or fail"
    failed = [
        rule
        for rule, reason in zip(("floor", "baseline", "production"), result.reasons, strict=True)
        if " < " in reason or "not a finite number" in reason
    ]
    assert failed == failing_rules


def test_bless_reasons_read_as_comparisons() -> None:
    failing = bless(0.401, 0.424, 0.45, SPEC)
    passing = bless(0.612, 0.424, None, SPEC)

    assert failing.reasons == (
        "accuracy 0.401 < floor 0.550",
        "accuracy 0.401 < baseline 0.424 + margin 0.050",
        "accuracy 0.401 < production 0.450 - max regression 0.020",
    )
    assert passing.reasons == (
        "accuracy 0.612 >= floor 0.550",
        "accuracy 0.612 >= baseline 0.424 + margin 0.050",
        "no production model: regression check not applicable",
    )


def test_bless_never_blesses_when_a_threshold_is_nan() -> None:
    result = bless(0.9, 0.4, None, BlessingSpec(min_accuracy=NAN, baseline_margin=0.05, max_regression=0.02))

    assert not result.blessed
    assert result.reasons[0].startswith("not a finite number")


def test_blessing_to_dict_is_strict_json_and_keeps_the_thresholds() -> None:
    result = bless(NAN, 0.424, None, SPEC)

    data = result.to_dict()

    json.dumps(data, allow_nan=False)
    assert data["accuracy"] is None
    assert data["blessed"] is False
    assert data["production_accuracy"] is None
    assert (data["min_accuracy"], data["baseline_margin"], data["max_regression"]) == (0.55, 0.05, 0.02)
    assert data["reasons"] == list(result.reasons)
