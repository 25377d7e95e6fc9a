"""The release spec: one YAML file per model, loaded once into frozen dataclasses.

A spec is strict: an unknown key, a missing key or a value of the wrong type is a
``SpecError`` that names the key's path (``training.profiles.demo.batch_size``), never a silent
default. Per-run overrides (Airflow Params) go through :func:`ReleaseSpec.with_overrides`, which
applies the same checks.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from ml_release.errors import SpecError

SPEC_DIR = Path(__file__).resolve().parents[1] / "releases"

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


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    backend: Literal["local", "kubernetes"]
    profile: str
    base_model: str
    timeout_seconds: int
    profiles: Mapping[str, TrainingProfile]

    def __post_init__(self) -> None:
        if self.profile not in self.profiles:
            raise SpecError(f"training.profile: {self.profile!r} is not one of {sorted(self.profiles)}")

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


@dataclasses.dataclass(frozen=True)
class ReleaseChecksSpec:
    golden_texts: tuple[str, ...]
    pretraffic_latency_budget_ms: float
    ready_timeout_s: float
    accuracy: AccuracyCheckSpec
    load: LoadCheckSpec


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
    def for_model(cls, model_name: str, spec_dir: Path = SPEC_DIR) -> ReleaseSpec:
        from ml_release.naming import check_model_name

        check_model_name(model_name, field="model_name")
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
