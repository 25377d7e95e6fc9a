"""Names that end up in S3 keys, TorchServe URLs and pod labels.

Every name that comes from a run's conf or id passes through here, so that nothing a caller
sends can traverse a prefix (``..``), inject a path segment or break a URL (G2).
"""

from __future__ import annotations

import hashlib
import re

from ml_release.errors import InvalidURIError, SpecError

_MODEL_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(?P<key>[^\x00-\x1f\x7f]+)$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# JSON-schema patterns used by the DAG Params; kept beside the checks they mirror.
MODEL_NAME_PATTERN = _MODEL_NAME.pattern
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/(?!(.*/)?\.\.?(/|$))(?!.*//)[^\x00-\x1f\x7f]+$"
VERSION_PATTERN = _VERSION.pattern


def check_model_name(name: str, field: str = "model_name") -> str:
    if not isinstance(name, str) or not _MODEL_NAME.match(name):
        raise SpecError(f"{field}: {name!r} must match {MODEL_NAME_PATTERN}")
    return name


def check_version(version: str, field: str = "model_version") -> str:
    if not isinstance(version, str) or not _VERSION.match(version):
        raise SpecError(f"{field}: {version!r} must match {VERSION_PATTERN}")
    return version


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` and refuse anything that could escape its prefix."""
    if not isinstance(uri, str):
        raise InvalidURIError(f"expected an s3:// URI, got {type(uri).__name__}")
    match = _S3_URI.match(uri)
    if not match:
        raise InvalidURIError(f"not a valid s3://bucket/key URI: {uri!r}")
    key = match["key"]
    segments = key.split("/")
    if any(seg in ("", ".", "..") for seg in segments[:-1]) or segments[-1] in (".", ".."):
        raise InvalidURIError(f"URI has an empty, '.' or '..' path segment: {uri!r}")
    return match["bucket"], key


def join_key(*parts: str) -> str:
    """Join key segments, each of which must already be a safe name."""
    for part in parts:
        for seg in part.split("/"):
            if seg in ("", ".", "..") or _SAFE.search(seg):
                raise InvalidURIError(f"unsafe key segment {seg!r} in {part!r}")
    return "/".join(parts)


def run_key(dag_id: str, run_id: str) -> str:
    """A short, URL- and key-safe, deterministic name for one Airflow run.

    Airflow run ids hold ``:`` and ``+``; the readable part is kept and a hash of the whole
    makes it unique, so a retried task of the same run always lands on the same keys.
    """
    readable = _SAFE.sub("-", run_id).strip("-.")[:40] or "run"
    digest = hashlib.sha256(f"{dag_id}\x00{run_id}".encode()).hexdigest()[:10]
    return f"{readable}-{digest}"


def model_version_for_run(dag_id: str, run_id: str) -> str:
    """The TorchServe and registry version of the model a training run produces.

    It comes from the run, never from the archive's bytes: a ``.mar`` differs on every build
    (its manifest holds a timestamp), so a re-run must find the same version, not a new one.
    """
    return "r" + hashlib.sha256(f"{dag_id}\x00{run_id}".encode()).hexdigest()[:12]
