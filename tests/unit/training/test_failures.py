"""Failure classes of a training pod: which retry (bounded) and which fail fast (G13)."""

from __future__ import annotations

from typing import Any

import pytest

from ml_release.training.failures import FailureClass, RetryBounds, classify_pod, decide

pytestmark = pytest.mark.unit

BOUNDS = RetryBounds(infrastructure_retries=3, oom_killed_retries=1, fail_fast_exit_codes=(139,))


def pod(
    *,
    phase: str = "Failed",
    reason: str | None = None,
    exit_code: int | None = None,
    term_reason: str | None = None,
    waiting: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if exit_code is not None:
        state["terminated"] = {"exitCode": exit_code, "reason": term_reason or "Error"}
    if waiting is not None:
        state["waiting"] = {"reason": waiting, "message": "details"}
    status: dict[str, Any] = {"phase": phase, "containerStatuses": [{"name": "base", "state": state}]}
    if reason:
        status["reason"] = reason
    if conditions:
        status["conditions"] = conditions
    return {"status": status}


def disruption(reason: str) -> list[dict[str, Any]]:
    return [{"type": "DisruptionTarget", "status": "True", "reason": reason, "message": "m"}]


@pytest.mark.parametrize(
    ("observed", "expected"),
    [
        (pod(reason="Evicted"), FailureClass.EVICTED),
        (pod(exit_code=137, conditions=disruption("EvictionByEvictionAPI")), FailureClass.EVICTED),
        (pod(exit_code=143, conditions=disruption("PreemptionByScheduler")), FailureClass.PREEMPTED),
        (pod(exit_code=143, reason="Terminated"), FailureClass.PREEMPTED),
        (pod(conditions=disruption("DeletionByTaintManager")), FailureClass.NODE_LOST),
        (pod(reason="NodeLost"), FailureClass.NODE_LOST),
        (
            pod(phase="Pending", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]),
            FailureClass.UNSCHEDULABLE,
        ),
        (pod(exit_code=137), FailureClass.UNKNOWN),
    ],
    ids=[
        "evicted",
        "evicted-by-api",
        "preempted",
        "spot-node-shutdown",
        "node-lost-taint",
        "node-lost",
        "unschedulable",
        "sigkill",
    ],
)
def test_infrastructure_failures_retry_up_to_their_bound(observed: dict[str, Any], expected: FailureClass) -> None:
    first = decide(observed, try_number=1, bounds=BOUNDS)
    last = decide(observed, try_number=4, bounds=BOUNDS)
    assert first.failure is expected and first.retry
    assert last.failure is expected and not last.retry
    assert "3 of 3 retries used" in last.reason


def test_oom_killed_retries_once_then_fails() -> None:
    observed = pod(exit_code=137, term_reason="OOMKilled")
    assert decide(observed, 1, BOUNDS).failure is FailureClass.OOM_KILLED
    assert decide(observed, 1, BOUNDS).retry
    assert not decide(observed, 2, BOUNDS).retry


def test_oom_killed_fails_fast_when_the_spec_allows_no_oom_retry() -> None:
    bounds = RetryBounds(infrastructure_retries=3, oom_killed_retries=0)
    assert not decide(pod(exit_code=137, term_reason="OOMKilled"), 1, bounds).retry


@pytest.mark.parametrize(
    ("exit_code", "expected"),
    [
        (2, FailureClass.BAD_CONFIG),
        (3, FailureClass.BAD_DATA),
        (1, FailureClass.CODE_ERROR),
        (139, FailureClass.FAIL_FAST_EXIT_CODE),
    ],
    ids=["bad-config-exit-2", "bad-data-exit-3", "code-exception-exit-1", "chosen-exit-code"],
)
def test_deterministic_exit_codes_fail_fast_on_the_first_try(exit_code: int, expected: FailureClass) -> None:
    verdict = decide(pod(exit_code=exit_code), try_number=1, bounds=BOUNDS)
    assert verdict.failure is expected
    assert verdict.exit_code == exit_code
    assert not verdict.retry
    assert "failing fast" in verdict.reason


def test_image_that_cannot_be_pulled_fails_fast() -> None:
    verdict = decide(pod(phase="Pending", waiting="ImagePullBackOff"), 1, BOUNDS)
    assert verdict.failure is FailureClass.BAD_IMAGE_OR_SETUP and not verdict.retry


def test_missing_secret_fails_fast() -> None:
    verdict = decide(pod(phase="Pending", waiting="CreateContainerConfigError"), 1, BOUNDS)
    assert verdict.failure is FailureClass.BAD_IMAGE_OR_SETUP and not verdict.retry


def test_pod_deadline_fails_fast() -> None:
    verdict = decide(pod(reason="DeadlineExceeded"), 1, BOUNDS)
    assert verdict.failure is FailureClass.DEADLINE_EXCEEDED and not verdict.retry


def test_startup_timeout_without_a_pod_state_counts_as_no_capacity() -> None:
    failure, _, _ = classify_pod(None, launch_error="PodLaunchFailedException: Pod took too long to start")
    assert failure is FailureClass.UNSCHEDULABLE


def test_eviction_wins_over_the_exit_code_it_caused() -> None:
    # An evicted trainer is SIGTERMed and may exit 1 on the way out: the eviction is the cause.
    assert classify_pod(pod(reason="Evicted", exit_code=1))[0] is FailureClass.EVICTED


class FakePodTask:
    """What the retry policy reads from a KubernetesPodOperator after a failure."""

    base_container_name = "base"

    def __init__(self, remote_pod: dict[str, Any] | None) -> None:
        self.remote_pod = remote_pod
        self.pod = None


@pytest.mark.parametrize(
    ("observed", "try_number", "action"),
    [
        (pod(reason="Evicted"), 1, "retry"),
        (pod(reason="Evicted"), 4, "fail"),
        (pod(exit_code=2), 1, "fail"),
        (pod(exit_code=137, term_reason="OOMKilled"), 1, "retry"),
    ],
    ids=["evicted-retries", "evicted-out-of-retries", "bad-config-fails", "oom-retries-once"],
)
def test_airflow_retry_policy_applies_the_classification(
    observed: dict[str, Any], try_number: int, action: str
) -> None:
    from ml_release.airflow.tasks import TrainingPodRetryPolicy

    policy = TrainingPodRetryPolicy(3, 1, (139,))
    decision = policy.evaluate(
        RuntimeError("Pod train-x returned a failure."), try_number, 4, {"task": FakePodTask(observed)}
    )
    assert decision.action.value == action
    assert decision.reason
    assert TrainingPodRetryPolicy.deserialize(policy.serialize()).bounds == policy.bounds
