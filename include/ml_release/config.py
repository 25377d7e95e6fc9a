"""The release spec: one YAML file per model, loaded once into frozen dataclasses.

A spec is strict: an unknown key, a missing key or a value of the wrong type is a
``SpecError`` that names the key's path (``training.profiles.demo.batch_size``), never a silent
default. Per-run overrides (Airflow Params) go through :func:`ReleaseSpec.with_overrides`, which
applies the same checks.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from ml_release.errors import SpecError

SPEC_DIR = Path(__file__).resolve().parents[1] / "releases"
# A deployment may mount its specs elsewhere (a ConfigMap); read at call time, so tests can point it.
SPEC_DIR_ENV = "ML_RELEASE_SPEC_DIR"

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    validation_fraction: float
    test_fraction: float
    salt: str

    def __post_init__(self) -> None:
        if not (0 < self.validation_fraction < 0.5 and 0 < self.test_fraction < 0.5):
            raise SpecError("data.split: fractions must lie in (0, 0.5)")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    dataset_prefix: str
    text_column: str
    label_column: str
    labels: tuple[str, ...]
    columns: tuple[str, ...]
    encoding: str
    max_bytes: int
    min_rows: int
    min_text_length: int
    max_text_length: int
    confidence_column: str | None
    max_duplicate_ratio: float
    max_mojibake_ratio: float
    min_class_share: float
    max_class_share: float
    split: SplitSpec

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise SpecError("data.labels: need at least two distinct labels")
        for col in (self.text_column, self.label_column):
            if col not in self.columns:
                raise SpecError(f"data.columns: must include {col!r}")
        from ml_release.naming import parse_s3_uri

        parse_s3_uri(self.dataset_prefix.rstrip("/") + "/x")
        if self.min_rows < 1:
            raise SpecError("data.min_rows: must be >= 1 (per-row checks pass on zero rows)")


@dataclasses.dataclass(frozen=True)
class TrainingProfile:
    max_train_samples: int | None
    max_eval_samples: int | None
    epochs: float
    batch_size: int
    gradient_accumulation_steps: int
    max_length: int
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    num_threads: int
    precision: Literal["fp32", "bf16"]
    compile: bool
    log_every_steps: int
    seed: int


# Kubernetes names and quantities, checked when the spec loads rather than by the API server later.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
# An image reference a pod can run reproducibly: a digest, or a tag that is not a moving one.
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/:-]*[a-z0-9](@sha256:[0-9a-f]{64}|:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$")
_MOVING_TAGS = frozenset({"latest", "main", "master", "stable", "edge", "nightly"})


@dataclasses.dataclass(frozen=True)
class TolerationSpec:
    key: str
    operator: Literal["Equal", "Exists"]
    value: str | None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]

    def __post_init__(self) -> None:
        if not _LABEL_KEY.match(self.key):
            raise SpecError(f"training.kubernetes.tolerations: {self.key!r} is not a valid taint key")
        if (self.operator == "Exists") != (self.value is None):
            raise SpecError(f"training.kubernetes.tolerations.{self.key}: Exists takes no value, Equal needs one")


@dataclasses.dataclass(frozen=True)
class KubernetesSpec:
    """Where and how the trainer runs as a pod (``training.backend: kubernetes``)."""

    kubernetes_conn_id: str
    namespace: str
    service_account: str
    image: str  # pinned: a digest, or an immutable tag
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"]
    gpus: int  # per node; > 1 runs torchrun --nproc_per_node=gpus
    gpu_resource: str
    nodes: int  # > 1 renders a Kubeflow PyTorchJob; the KubernetesPodOperator runs one node
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    shm_size: str  # memory-backed /dev/shm for DataLoader workers and NCCL
    node_selector: Mapping[str, str]
    required_node_labels: Mapping[str, tuple[str, ...]]  # node affinity: label in any of the values
    tolerations: tuple[TolerationSpec, ...]
    priority_class_name: str | None
    run_as_user: int
    s3_secret_name: str  # keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, mounted by secretKeyRef
    s3_endpoint_url: str | None  # not a secret; null for AWS itself
    s3_region: str
    active_deadline_seconds: int  # G10: the hard bound Kubernetes enforces without Airflow
    startup_timeout_seconds: int
    termination_grace_period_seconds: int
    infrastructure_retries: int  # eviction, preemption, node loss, unschedulable (G13)
    oom_killed_retries: int  # a container OOMKilled: at most this many retries
    fail_fast_exit_codes: tuple[int, ...]  # besides the trainer's own 1, 2 and 3
    deferrable: bool
    get_logs: bool
    reattach_on_restart: bool
    on_finish_action: Literal["delete_pod", "delete_succeeded_pod"]  # keep_pod would orphan GPUs (G11)

    def __post_init__(self) -> None:
        where = "training.kubernetes"
        for name in ("namespace", "service_account", "s3_secret_name"):
            if not _DNS_LABEL.match(getattr(self, name)):
                raise SpecError(f"{where}.{name}: {getattr(self, name)!r} is not a DNS-1123 label")
        if self.priority_class_name is not None and not _DNS_SUBDOMAIN.match(self.priority_class_name):
            raise SpecError(f"{where}.priority_class_name: {self.priority_class_name!r} is not a DNS name")
        if not _IMAGE.match(self.image):
            raise SpecError(f"{where}.image: {self.image!r} must be pinned by @sha256:<digest> or an immutable tag")
        if "@" not in self.image and self.image.rsplit(":", 1)[1] in _MOVING_TAGS:
            raise SpecError(f"{where}.image: tag {self.image.rsplit(':', 1)[1]!r} moves; pin a digest or a version")
        if self.gpus < 0 or self.nodes < 1:
            raise SpecError(f"{where}: gpus must be >= 0 and nodes >= 1")
        if self.nodes > 1 and self.gpus < 1:
            raise SpecError(f"{where}.nodes: several nodes need gpus >= 1 per node")
        if not _LABEL_KEY.match(self.gpu_resource):
            raise SpecError(f"{where}.gpu_resource: {self.gpu_resource!r} is not a resource name")
        for name in ("cpu_request", "cpu_limit", "memory_request", "memory_limit", "shm_size"):
            if not _QUANTITY.match(getattr(self, name)):
                raise SpecError(f"{where}.{name}: {getattr(self, name)!r} is not a Kubernetes quantity")
        if _quantity(self.cpu_request) > _quantity(self.cpu_limit):
            raise SpecError(f"{where}: cpu_request {self.cpu_request} exceeds cpu_limit {self.cpu_limit}")
        if _quantity(self.memory_request) > _quantity(self.memory_limit):
            raise SpecError(f"{where}: memory_request {self.memory_request} exceeds memory_limit {self.memory_limit}")
        if _quantity(self.shm_size) >= _quantity(self.memory_limit):
            # /dev/shm pages count against the container's memory limit.
            raise SpecError(f"{where}.shm_size: {self.shm_size} must stay below memory_limit {self.memory_limit}")
        for key, value in {**self.node_selector, **{k: "" for k in self.required_node_labels}}.items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise SpecError(f"{where}: {key}={value!r} is not a valid node label")
        for key, values in self.required_node_labels.items():
            if not values or not all(v and _LABEL_VALUE.match(v) for v in values):
                raise SpecError(f"{where}.required_node_labels.{key}: needs one or more label values")
        positive = ("active_deadline_seconds", "startup_timeout_seconds")
        for name in positive:
            if getattr(self, name) < 1:
                raise SpecError(f"{where}.{name}: must be >= 1")
        for name in ("termination_grace_period_seconds", "infrastructure_retries", "oom_killed_retries", "run_as_user"):
            if getattr(self, name) < 0:
                raise SpecError(f"{where}.{name}: must be >= 0")
        if self.run_as_user == 0:
            raise SpecError(f"{where}.run_as_user: the trainer never runs as root")
        if any(not 1 <= code <= 255 for code in self.fail_fast_exit_codes):
            raise SpecError(f"{where}.fail_fast_exit_codes: exit codes lie in 1..255")

    @property
    def max_retries(self) -> int:
        """The task's ``retries``: the largest bound of any retryable failure class."""
        return max(self.infrastructure_retries, self.oom_killed_retries)


def _quantity(text: str) -> float:
    """A Kubernetes quantity as a number, only to compare requests with limits."""
    match = re.match(r"^([0-9.]+)(.*)$", text)
    assert match is not None
    units = {
        "": 1,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    return float(match[1]) * units[match[2]]


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    backend: Literal["local", "kubernetes"]
    profile: str
    base_model: str
    timeout_seconds: int
    profiles: Mapping[str, TrainingProfile]
    kubernetes: KubernetesSpec

    def __post_init__(self) -> None:
        if self.profile not in self.profiles:
            raise SpecError(f"training.profile: {self.profile!r} is not one of {sorted(self.profiles)}")
        if self.kubernetes.active_deadline_seconds > self.timeout_seconds:
            # The pod's own bound (G10) must fire no later than the task's, or a lost worker leaves
            # a pod running past the time the spec promises.
            raise SpecError(
                f"training.kubernetes.active_deadline_seconds: {self.kubernetes.active_deadline_seconds} "
                f"exceeds training.timeout_seconds {self.timeout_seconds}"
            )

    @property
    def active(self) -> TrainingProfile:
        return self.profiles[self.profile]


@dataclasses.dataclass(frozen=True)
class BlessingSpec:
    min_accuracy: float
    baseline_margin: float
    max_regression: float


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    batch_size: int
    max_batch_delay_ms: int
    workers: int
    response_timeout_s: int
    torch_threads: int


@dataclasses.dataclass(frozen=True)
class LoadCheckSpec:
    requests: int
    rate_per_s: float
    timeout_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_error_rate: float


@dataclasses.dataclass(frozen=True)
class AccuracyCheckSpec:
    max_samples: int
    min_accuracy: float
    max_regression: float


PretrafficCheck = Literal["accuracy", "load"]
PRETRAFFIC_CHECKS: tuple[PretrafficCheck, ...] = ("accuracy", "load")


@dataclasses.dataclass(frozen=True)
class CanaryStep:
    weight: float  # percent of production traffic the canary receives during this step
    requests: int  # requests sent through the production URL in this step's window
    replay_rows: int  # labelled rows replayed through both versions in this step


@dataclasses.dataclass(frozen=True)
class CanarySpec:
    steps: tuple[CanaryStep, ...]
    max_weight: float  # G20: no step, and no retry of one, ever sets more
    traffic_rate_per_s: float  # held-out texts sent through the production URL; 0 = live traffic only
    request_timeout_s: float
    looks_per_step: int  # a step's traffic in this many parts; a Fail after any part ends the step early

    def __post_init__(self) -> None:
        if not self.steps:
            raise SpecError("release.canary.steps: at least one step")
        if not 0 < self.max_weight <= 100:
            raise SpecError("release.canary.max_weight: must lie in (0, 100]")
        weights = [step.weight for step in self.steps]
        if weights != sorted(weights) or not all(0 < w <= self.max_weight for w in weights):
            raise SpecError(f"release.canary.steps: weights {weights} must rise and lie in (0, max_weight]")
        if any(step.requests < 0 or step.replay_rows < 0 for step in self.steps):
            raise SpecError("release.canary.steps: requests and replay_rows must be >= 0")
        if self.traffic_rate_per_s < 0:
            raise SpecError("release.canary.traffic_rate_per_s: must be >= 0")
        if self.looks_per_step < 1:
            raise SpecError("release.canary.looks_per_step: must be >= 1 (1: judge each step at its end only)")


@dataclasses.dataclass(frozen=True)
class ReleaseChecksSpec:
    golden_texts: tuple[str, ...]
    pretraffic_latency_budget_ms: float
    ready_timeout_s: float
    # Checks on the candidate's own URL before it gets production traffic. The READY + golden gate
    # (G19) always runs; leaving one of these out lets the progressive canary alone judge that
    # aspect on production traffic, which needs a stable model: a first release runs them all.
    pretraffic_checks: tuple[PretrafficCheck, ...]
    accuracy: AccuracyCheckSpec
    load: LoadCheckSpec
    canary: CanarySpec
    analysis: AnalysisPolicy

    def __post_init__(self) -> None:
        if len(set(self.pretraffic_checks)) != len(self.pretraffic_checks):
            raise SpecError(f"release.pretraffic_checks: {list(self.pretraffic_checks)} names a check twice")


@dataclasses.dataclass(frozen=True)
class ReleaseSpec:
    model_name: str
    description: str
    schedule: str | None
    data: DataSpec
    training: TrainingSpec
    blessing: BlessingSpec
    serving: ServingSpec
    release: ReleaseChecksSpec

    def __post_init__(self) -> None:
        from ml_release.naming import check_model_name

        check_model_name(self.model_name, field="model_name")

    @classmethod
    def load(cls, path: str | Path) -> ReleaseSpec:
        import yaml

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise SpecError(f"release spec not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise SpecError(f"release spec {path} is not valid YAML: {exc}") from exc
        return build(cls, raw, path="")

    @classmethod
    def for_model(cls, model_name: str, spec_dir: Path | None = None) -> ReleaseSpec:
        from ml_release.naming import check_model_name

        check_model_name(model_name, field="model_name")
        if spec_dir is None:
            spec_dir = Path(os.environ.get(SPEC_DIR_ENV) or SPEC_DIR)
        return cls.load(spec_dir / f"{model_name}.yaml")

    def with_overrides(self, overrides: Mapping[str, Any]) -> ReleaseSpec:
        """Return a copy with dotted-path overrides applied (``{"training.profile": "full"}``)."""
        if not overrides:
            return self
        raw = to_plain(self)
        for dotted, value in overrides.items():
            node = raw
            parts = dotted.split(".")
            for part in parts[:-1]:
                if not isinstance(node, dict) or part not in node:
                    raise SpecError(f"{dotted}: no such spec key")
                node = node[part]
            if not isinstance(node, dict) or parts[-1] not in node:
                raise SpecError(f"{dotted}: no such spec key")
            node[parts[-1]] = value
        return build(type(self), raw, path="")


def to_plain(obj: Any) -> Any:
    """Turn a spec back into plain JSON-able data (for records and overrides)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    return obj


def build(cls: type[T], raw: Any, path: str) -> T:
    """Build dataclass ``cls`` from plain data, refusing unknown and missing keys."""
    where = path or "spec"
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
    kwargs = {}
    for name, field in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name not in raw:
            if field.default is not dataclasses.MISSING:
                continue
            raise SpecError(f"{key_path}: missing")
        kwargs[name] = _coerce(hints[name], raw[name], key_path)
    try:
        return cls(**kwargs)
    except SpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: {exc}") from exc


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if origin is Literal:
        if value not in args:
            raise SpecError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise SpecError(f"{path}: expected a list")
        return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise SpecError(f"{path}: expected a mapping")
        return types.MappingProxyType({str(k): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()})
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{path}: expected a string, got {value!r}")
        return value
    raise SpecError(f"{path}: unsupported spec type {tp!r}")  # pragma: no cover - spec authoring error


# At the end: the judge's policy is part of the spec, and the judge builds it with build() above.
from ml_release.analysis.judge import AnalysisPolicy  # noqa: E402
