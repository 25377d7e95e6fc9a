"""Why a training pod failed, and whether another attempt can help (G13).

A pure function of the pod's last observed state (the Kubernetes API's JSON form, camelCase, as
``ApiClient().sanitize_for_serialization`` writes it) and, when the launch itself failed, the error
message the KubernetesPodOperator raised. The Airflow side turns a :class:`FailureVerdict` into a
retry decision; nothing here imports Airflow or the Kubernetes client.

Infrastructure failures (eviction, preemption, node loss, no capacity yet) retry up to
``infrastructure_retries``; an ``OOMKilled`` container retries up to ``oom_killed_retries`` (the
issue asks for a bounded retry; G13's "out-of-memory at a fixed batch size fails fast" is what
``oom_killed_retries: 0`` gives). A deterministic failure fails at once: the trainer's exit 2 (bad
config), 3 (bad data), 1 (an exception in our code), any exit code the spec lists in
``fail_fast_exit_codes``, an image that cannot be pulled, a missing Secret, the pod's own deadline
(G10). Any other exit (137 or 143 from a signal with no recorded disruption, 134 from an NCCL
abort) counts as an infrastructure failure: the trainer itself only ever exits 0, 1, 2 or 3.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection, Mapping
from typing import Any

# The trainer's exit codes (ml_release.training.trainer); repeated here to keep this module pure.
EXIT_CODE_ERROR = 1
EXIT_BAD_CONFIG = 2
EXIT_BAD_DATA = 3

# Container waiting reasons that no retry can fix: the image or the pod's config is wrong.
_BAD_SETUP_REASONS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}
)
# DisruptionTarget condition reasons (Kubernetes >= 1.26) -> class.
_DISRUPTIONS = {
    "PreemptionByScheduler": "preempted",
    "PreemptionByKubeScheduler": "preempted",
    "EvictionByEvictionAPI": "evicted",
    "TerminationByKubelet": "evicted",
    "DeletionByTaintManager": "node_lost",
    "DeletionByPodGC": "node_lost",
}


class FailureClass(enum.Enum):
    EVICTED = "evicted"
    PREEMPTED = "preempted"
    NODE_LOST = "node_lost"
    UNSCHEDULABLE = "unschedulable"
    OOM_KILLED = "oom_killed"
    BAD_CONFIG = "bad_config"
    BAD_DATA = "bad_data"
    CODE_ERROR = "code_error"
    FAIL_FAST_EXIT_CODE = "fail_fast_exit_code"
    BAD_IMAGE_OR_SETUP = "bad_image_or_setup"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNKNOWN = "unknown"  # killed by a signal, or failed with nothing recorded: treated as infrastructure

    @property
    def is_infrastructure(self) -> bool:
        return self in _INFRASTRUCTURE


_INFRASTRUCTURE = frozenset(
    {
        FailureClass.EVICTED,
        FailureClass.PREEMPTED,
        FailureClass.NODE_LOST,
        FailureClass.UNSCHEDULABLE,
        FailureClass.UNKNOWN,
    }
)


@dataclasses.dataclass(frozen=True)
class RetryBounds:
    infrastructure_retries: int
    oom_killed_retries: int
    fail_fast_exit_codes: Collection[int] = ()


@dataclasses.dataclass(frozen=True)
class FailureVerdict:
    failure: FailureClass
    retry: bool
    reason: str
    exit_code: int | None = None


def classify_pod(
    pod: Mapping[str, Any] | None,
    container: str = "base",
    launch_error: str | None = None,
    fail_fast_exit_codes: Collection[int] = (),
) -> tuple[FailureClass, int | None, str]:
    """Return (class, the container's exit code if it ran, a one-line explanation)."""
    status: Mapping[str, Any] = (pod or {}).get("status") or {}
    reason = status.get("reason") or ""
    message = status.get("message") or ""
    terminated, waiting = _container_state(status, container)
    exit_code = terminated.get("exitCode") if terminated else None

    if reason == "Evicted":
        return FailureClass.EVICTED, exit_code, f"pod evicted: {message or 'node pressure'}"
    if reason == "DeadlineExceeded":
        return FailureClass.DEADLINE_EXCEEDED, exit_code, f"activeDeadlineSeconds reached: {message}".rstrip(": ")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            cls = FailureClass(_DISRUPTIONS.get(cond.get("reason") or "", "evicted"))
            return cls, exit_code, f"pod disrupted ({cond.get('reason')}): {cond.get('message') or ''}".rstrip(": ")
    if reason in ("NodeLost", "UnexpectedAdmissionError", "NodeAffinity"):
        return FailureClass.NODE_LOST, exit_code, f"node lost ({reason}): {message}".rstrip(": ")
    if reason in ("Terminated", "Shutdown", "NodeShutdown"):
        # Graceful node shutdown: how a spot/preemptible VM's reclaim reaches a pod.
        return FailureClass.PREEMPTED, exit_code, f"node shut down ({reason}): {message}".rstrip(": ")
    if terminated and terminated.get("reason") == "OOMKilled":
        return FailureClass.OOM_KILLED, exit_code, "the trainer container was OOMKilled (memory_limit reached)"
    if waiting and waiting.get("reason") in _BAD_SETUP_REASONS:
        return (
            FailureClass.BAD_IMAGE_OR_SETUP,
            None,
            f"container could not start ({waiting.get('reason')}): {waiting.get('message') or ''}".rstrip(": "),
        )
    if exit_code is not None and exit_code != 0:
        if exit_code == EXIT_BAD_CONFIG:
            return FailureClass.BAD_CONFIG, exit_code, "trainer exit 2: bad arguments or configuration"
        if exit_code == EXIT_BAD_DATA:
            return FailureClass.BAD_DATA, exit_code, "trainer exit 3: bad input data"
        if exit_code == EXIT_CODE_ERROR:
            return FailureClass.CODE_ERROR, exit_code, "trainer exit 1: an exception in the training code"
        if exit_code in fail_fast_exit_codes:
            return FailureClass.FAIL_FAST_EXIT_CODE, exit_code, f"exit code {exit_code} is listed as fail-fast"
        return FailureClass.UNKNOWN, exit_code, f"trainer exited with code {exit_code}"
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            return (
                FailureClass.UNSCHEDULABLE,
                None,
                f"no node fits the pod yet: {cond.get('message') or ''}".rstrip(": "),
            )
    if launch_error:
        lowered = launch_error.lower()
        if any(r.lower() in lowered for r in _BAD_SETUP_REASONS) or "cannot be pulled" in lowered:
            return FailureClass.BAD_IMAGE_OR_SETUP, None, f"pod could not start: {launch_error.splitlines()[0]}"
        if "took too long" in lowered or "timeout" in lowered or "timed out" in lowered:
            return FailureClass.UNSCHEDULABLE, None, f"pod did not start in time: {launch_error.splitlines()[0]}"
    return FailureClass.UNKNOWN, exit_code, f"pod failed (phase {status.get('phase')!r}, reason {reason!r})"


def decide(
    pod: Mapping[str, Any] | None,
    try_number: int,
    bounds: RetryBounds,
    container: str = "base",
    launch_error: str | None = None,
) -> FailureVerdict:
    """Whether attempt ``try_number`` (1-based) of a failed pod may be followed by another."""
    failure, exit_code, why = classify_pod(pod, container, launch_error, bounds.fail_fast_exit_codes)
    if failure.is_infrastructure:
        limit = bounds.infrastructure_retries
    elif failure is FailureClass.OOM_KILLED:
        limit = bounds.oom_killed_retries
    else:
        return FailureVerdict(failure, False, f"{why}; retrying cannot help, failing fast", exit_code)
    retries_used = try_number - 1
    if retries_used >= limit:
        return FailureVerdict(failure, False, f"{why}; {retries_used} of {limit} retries used, giving up", exit_code)
    return FailureVerdict(failure, True, f"{why}; retry {retries_used + 1} of {limit}", exit_code)


def _container_state(status: Mapping[str, Any], container: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == container:
            state = cs.get("state") or {}
            last = cs.get("lastState") or {}
            return (state.get("terminated") or last.get("terminated") or {}), (state.get("waiting") or {})
    return {}, {}
