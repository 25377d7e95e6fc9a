"""Which pre-traffic checks a release runs: the spec's, the conf's, and never fewer on a first release."""

from __future__ import annotations

import types
from typing import Any

import pytest

from ml_release.config import ReleaseSpec

pytestmark = pytest.mark.dags

SPEC = ReleaseSpec.for_model("sentiment")


def decide(chosen: list[str] | None, production: str | None, check: str = "check_load") -> dict[str, Any]:
    from ml_release.airflow.tasks import _pretraffic

    ctx = types.SimpleNamespace(params={"pretraffic_checks": chosen}, spec=SPEC)
    return _pretraffic(ctx, check, production, lambda c: {"passed": True, "reason": "ran", "ran": True})  # type: ignore[arg-type]


def test_the_spec_runs_both_checks_by_default() -> None:
    assert SPEC.release.pretraffic_checks == ("accuracy", "load")
    assert decide(None, "r1")["ran"] and decide(None, "r1", "check_accuracy")["ran"]


def test_a_check_left_out_is_recorded_as_skipped_for_the_canary_to_judge() -> None:
    result = decide(["accuracy"], "r1")
    assert result["skipped"] and result["passed"] and "progressive canary" in result["reason"]
    assert decide(["accuracy"], "r1", "check_accuracy")["ran"]


def test_a_first_release_cannot_leave_a_check_out() -> None:
    result = decide([], None)
    assert result["passed"] is False and result["skipped"]
    assert "first release" in result["reason"]
