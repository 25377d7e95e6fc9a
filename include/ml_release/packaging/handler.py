"""The TorchServe handler of every ml-release archive: JSON text in, label and scores out.

Request body, one per row of a batch: ``{"text": "<non-empty string>"}``; any other key is refused
so that a client typo (``{"txt": ...}``) is a 400 that names it, not a silent prediction on nothing.
Response per valid row: ``{"label": str, "scores": {label: probability}}``. A malformed row gets
HTTP 400 and ``{"error": "<what is wrong>"}`` while the valid rows of the same batch are answered:
TorchServe batches unrelated clients together, and one bad client must not fail the others.

Non-finite scores are never answered as a label: such a row gets HTTP 500, the body
``{"error": ..., "kind": "non_finite_scores"}`` and the response header
``X-ML-Release-Error: non_finite_scores``, so the pre-traffic gate and the canary judge see a NaN
candidate as such, not as a generic 5xx and never as a confident prediction (G19, G21).

Fault injection (issue 4): a candidate can be told to misbehave, in the real handler, from a
``faults:`` mapping in the archive's model-config YAML (``handler: {faults: {...}}``, written by
:func:`ml_release.packaging.archiver.build_archive` only when asked) or from the worker's
environment variable ``ML_RELEASE_FAULTS`` (a JSON object; it wins over the archive). See
:class:`FaultSettings` for the keys. No faults is the default, and a worker with faults logs a
warning at load so that an injected fault is never mistaken for a real one.

The parsing and output shaping are plain functions so that they are tested without TorchServe;
:class:`TextClassifierHandler` only adds model loading and batching. The archive's entry file
imports :func:`handle` from here (TorchServe's function entry-point convention).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

THREADS_ENV = "ML_RELEASE_TORCH_THREADS"
MAX_LENGTH_ENV = "ML_RELEASE_MAX_LENGTH"
DEFAULT_THREADS = 1
DEFAULT_MAX_LENGTH = 128
ALLOWED_KEYS = frozenset({"text"})
# Lets a caller behind a traffic splitter see which version answered (canary accounting).
VERSION_HEADER = "X-ML-Release-Model-Version"
# Names the kind of a 5xx the handler chose to give: ``non_finite_scores`` or ``injected_fault``.
ERROR_HEADER = "X-ML-Release-Error"
NON_FINITE = "non_finite_scores"
INJECTED = "injected_fault"
FAULTS_ENV = "ML_RELEASE_FAULTS"


class RequestError(ValueError):
    """Raised when one request row is malformed; the message names the problem for the client."""


def parse_request(body: object) -> str:
    """Return the text of one request body, or raise :class:`RequestError` naming the problem.

    TorchServe hands the body over already JSON-decoded when the client sent
    ``Content-Type: application/json``, as bytes otherwise, so both shapes are accepted.
    """
    if body is None:
        raise RequestError('empty body: expected a JSON object {"text": "..."}')
    obj: object = body
    if isinstance(body, bytes | bytearray):
        try:
            obj = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"body is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    if isinstance(obj, str):
        if not obj.strip():
            raise RequestError('empty body: expected a JSON object {"text": "..."}')
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as exc:
            raise RequestError(f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(obj, Mapping):
        raise RequestError(f'body must be a JSON object {{"text": "..."}}, got {_json_type(obj)}')
    unknown = sorted(str(k) for k in obj if k not in ALLOWED_KEYS)
    if "text" not in obj:
        hint = f" (unknown keys: {', '.join(map(repr, unknown))})" if unknown else ""
        raise RequestError(f'missing "text"{hint}')
    if unknown:
        raise RequestError(f'unknown keys {", ".join(map(repr, unknown))}: only "text" is accepted')
    text = obj["text"]
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f'"text" must be a non-empty string, got {_describe(text)}')
    return text


def request_body(row: Mapping[str, Any]) -> object:
    """The body of one batch row: TorchServe names it ``data`` or ``body`` depending on the client."""
    if "data" in row and row["data"] is not None:
        return row["data"]
    return row.get("body")


class NonFiniteScoresError(ValueError):
    """Raised when the model produced NaN or infinite scores for a row."""


def postprocess_row(row: Sequence[float], labels: Sequence[str]) -> dict[str, Any]:
    """One softmax row as ``{"label", "scores"}``; :class:`NonFiniteScoresError` on NaN or inf."""
    if len(row) != len(labels):
        raise ValueError(f"model returned {len(row)} scores for {len(labels)} labels")
    scores = {label: float(p) for label, p in zip(labels, row, strict=True)}
    if not all(math.isfinite(p) for p in scores.values()):
        raise NonFiniteScoresError(f"model produced non-finite scores: {scores}")
    best = max(scores, key=lambda label: scores[label])
    return {"label": best, "scores": scores}


def postprocess(probabilities: Sequence[Sequence[float]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """Shape softmax rows into ``{"label", "scores"}`` dicts; refuse non-finite scores.

    A NaN from the model must surface as an error, never as a confident-looking label
    (the pre-traffic gate and the canary judge both count on it, G19).
    """
    return [postprocess_row(row, labels) for row in probabilities]


@dataclasses.dataclass(frozen=True)
class FaultSettings:
    """Faults a candidate injects into its own answers; the default injects none.

    ``error_rate``: the share of valid rows answered with ``error_status`` (a 5xx) instead of a
    prediction. ``latency_ms``: added once per batch before inference (every row of the batch waits
    for it, as with a slow model). ``nan_rate``: the share of valid rows whose scores are replaced by
    NaN, which the handler then answers as any non-finite output (HTTP 500, ``kind``
    ``non_finite_scores``). ``seed``: makes the draws repeatable. ``version``: when set, the faults
    apply only to a worker of that model version; it lets ``ML_RELEASE_FAULTS`` target the canary of
    a TorchServe process that also serves stable. ``after_rows``: the faults start only once the
    worker has answered this many well-formed rows, like a fault that shows under production
    traffic but not in a handful of pre-traffic golden requests (a leak, a cache that fills up).
    """

    error_rate: float = 0.0
    error_status: int = 503
    latency_ms: float = 0.0
    nan_rate: float = 0.0
    seed: int | None = None
    version: str | None = None
    after_rows: int = 0

    def __post_init__(self) -> None:
        for name in ("error_rate", "nan_rate"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"faults.{name} must be a number in [0, 1], got {value!r}")
        if not isinstance(self.error_status, int) or isinstance(self.error_status, bool):
            raise ValueError(f"faults.error_status must be an integer 500-599, got {self.error_status!r}")
        if not 500 <= self.error_status <= 599:
            raise ValueError(f"faults.error_status must be an integer 500-599, got {self.error_status!r}")
        latency = self.latency_ms
        if not isinstance(latency, int | float) or isinstance(latency, bool) or not 0 <= latency <= 600_000:
            raise ValueError(f"faults.latency_ms must be a number in [0, 600000], got {latency!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"faults.seed must be an integer, got {self.seed!r}")
        if self.version is not None and not isinstance(self.version, str):
            raise ValueError(f"faults.version must be a string, got {self.version!r}")
        if not isinstance(self.after_rows, int) or isinstance(self.after_rows, bool) or self.after_rows < 0:
            raise ValueError(f"faults.after_rows must be an integer >= 0, got {self.after_rows!r}")

    @property
    def active(self) -> bool:
        return self.error_rate > 0 or self.latency_ms > 0 or self.nan_rate > 0

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], source: str = "faults") -> FaultSettings:
        """Strict: an unknown key is refused, so a typo never silently injects nothing."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source} must be a mapping, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {', '.join(map(repr, unknown))}; known: {sorted(known)}")
        try:
            return cls(**{str(k): v for k, v in raw.items()})
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def to_mapping(self) -> dict[str, Any]:
        """The non-default keys, as written into an archive's model config."""
        default = FaultSettings()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }

    def applies_to(self, model_version: str | None) -> bool:
        return self.active and (self.version is None or self.version == model_version)


NO_FAULTS = FaultSettings()


def fault_settings(yaml_config: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> FaultSettings:
    """The worker's faults: ``ML_RELEASE_FAULTS`` (JSON) wins, then ``handler.faults``, else none."""
    env = os.environ if environ is None else environ
    raw_env = env.get(FAULTS_ENV)
    if raw_env is not None and raw_env.strip():
        try:
            parsed = json.loads(raw_env)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{FAULTS_ENV} is not JSON: {exc.msg}") from None
        return FaultSettings.from_mapping(parsed, FAULTS_ENV)
    handler_section = (yaml_config or {}).get("handler") or {}
    raw = handler_section.get("faults")
    if raw is None:
        return NO_FAULTS
    return FaultSettings.from_mapping(raw, "model config handler.faults")


def setting(env_name: str, yaml_config: Mapping[str, Any] | None, key: str, default: int) -> int:
    """An integer knob: the worker's environment wins, then the archive's model config, then default.

    The archive's model-config YAML (``handler:`` section) carries the release spec's choice; the
    environment lets an operator override it on one machine without rebuilding the archive.
    """
    raw: object = os.environ.get(env_name)
    source = env_name
    if raw is None and yaml_config is not None:
        raw = (yaml_config.get("handler") or {}).get(key)
        source = f"model config handler.{key}"
    if raw is None:
        return default
    try:
        value = int(str(raw))
    except ValueError:
        raise ValueError(f"{source} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{source} must be a positive integer, got {raw!r}")
    return value


class TextClassifierHandler(BaseHandler):
    """Serves a transformers sequence classifier saved with ``save_pretrained``."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer: Any = None
        self.labels: list[str] = []
        self.max_length = DEFAULT_MAX_LENGTH
        self.model_version: str | None = None
        self.faults = NO_FAULTS
        self._fault_rng = random.Random()
        self._rows_answered = 0  # well-formed rows this worker has seen; arms faults.after_rows

    def initialize(self, context: Any) -> None:
        # Nothing in a worker may reach a model hub; fail loudly on a missing file instead.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load floods TorchServe's model log
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        # TorchServe runs one process per worker and torch defaults to one intra-op thread per
        # logical CPU in each of them: N workers x N threads oversubscribe the cores and throughput
        # collapses (PERFORMANCE.md S3). The layout is therefore explicit: workers come from the
        # model config, threads per worker from here, default 1.
        threads = setting(THREADS_ENV, yaml_config, "torch_threads", DEFAULT_THREADS)
        torch.set_num_threads(threads)
        self.max_length = setting(MAX_LENGTH_ENV, yaml_config, "max_length", DEFAULT_MAX_LENGTH)

        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        self.model.to(self.device)
        self.model.eval()
        config = self.model.config
        self.labels = [str(config.id2label[i]) for i in range(config.num_labels)]
        manifest = getattr(context, "manifest", None) or {}
        self.model_version = (manifest.get("model") or {}).get("modelVersion")
        faults = fault_settings(yaml_config)
        self.faults = faults if faults.applies_to(self.model_version) else NO_FAULTS
        self._fault_rng = random.Random(self.faults.seed)
        if self.faults.active:
            logger.warning("FAULT INJECTION ACTIVE for version %s: %s", self.model_version, self.faults)
        self.context = context
        self.initialized = True
        import ml_release

        # The archive ships its own copy of ml_release; this line shows which copy a worker loaded.
        logger.info(
            "ml-release handler ready: labels=%s threads=%d max_length=%d version=%s ml_release=%s",
            self.labels,
            threads,
            self.max_length,
            self.model_version,
            ml_release.__file__,
        )

    def predict_proba(self, texts: Sequence[str]) -> list[list[float]]:
        import torch

        encoded = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            logits = self.model(**encoded).logits
        probabilities: list[list[float]] = torch.softmax(logits.float(), dim=-1).cpu().tolist()
        return probabilities

    def handle(self, data: Sequence[Mapping[str, Any]], context: Any) -> list[Any]:
        self.context = context
        outputs: list[Any] = [None] * len(data)
        valid: list[tuple[int, str]] = []
        armed_rows: set[int] = set()
        faults = self.faults
        for idx, row in enumerate(data):
            try:
                text = parse_request(request_body(row))
            except RequestError as exc:
                self._fail(context, idx, 400, str(exc), outputs)
                continue
            armed = faults.active and self._rows_answered >= faults.after_rows
            self._rows_answered += 1
            if armed and faults.error_rate > 0 and self._fault_rng.random() < faults.error_rate:
                message = f"injected fault: HTTP {faults.error_status} on {faults.error_rate:.0%} of requests"
                self._fail(context, idx, faults.error_status, message, outputs, kind=INJECTED)
                continue
            valid.append((idx, text))
            if armed:
                armed_rows.add(idx)
        if armed_rows and faults.latency_ms > 0:
            time.sleep(faults.latency_ms / 1000.0)
        if valid:
            try:
                probabilities = self.predict_proba([text for _, text in valid])
                if len(probabilities) != len(valid):
                    raise ValueError(f"model returned {len(probabilities)} rows for {len(valid)} requests")
            except ValueError as exc:
                logger.error("prediction failed: %s", exc)
                for idx, _ in valid:
                    self._fail(context, idx, 500, str(exc), outputs)
            else:
                for (idx, _), row_scores in zip(valid, probabilities, strict=True):
                    if idx in armed_rows and faults.nan_rate > 0 and self._fault_rng.random() < faults.nan_rate:
                        row_scores = [math.nan] * len(row_scores)
                    try:
                        outputs[idx] = postprocess_row(row_scores, self.labels)
                    except NonFiniteScoresError as exc:
                        logger.error("prediction failed: %s", exc)
                        self._fail(context, idx, 500, str(exc), outputs, kind=NON_FINITE)
                    except ValueError as exc:
                        logger.error("prediction failed: %s", exc)
                        self._fail(context, idx, 500, str(exc), outputs)
        if self.model_version:
            for idx in range(len(data)):
                context.set_response_header(idx, VERSION_HEADER, self.model_version)
        return outputs

    @staticmethod
    def _fail(context: Any, idx: int, code: int, message: str, outputs: list[Any], kind: str | None = None) -> None:
        context.set_response_status(code, message, idx=idx)
        outputs[idx] = {"error": message}
        if kind is not None:
            outputs[idx]["kind"] = kind
            context.set_response_header(idx, ERROR_HEADER, kind)


_service = TextClassifierHandler()


def handle(data: Sequence[Mapping[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe's function entry point: called once with ``data=None`` to load, then per batch."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)


def _json_type(value: object) -> str:
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return type(value).__name__


def _describe(value: object) -> str:
    if isinstance(value, str):
        return "an empty string" if not value else "a blank string"
    return _json_type(value)
