"""The public run-configuration contract of every DAG, as JSON schemas.

One source of truth: the DAG files turn these into Airflow ``Param`` objects (the UI form and
Airflow's own per-key validation), the API-server plugin refuses unknown keys and bad values
with a 400 before a run exists (G1), and the first task of each run checks again so that a run
started some other way (the CLI, ``dags test``) is held to the same contract.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ml_release.naming import MODEL_NAME_PATTERN, S3_URI_PATTERN, VERSION_PATTERN

DEFAULT_MODEL = "sentiment"

# What a pattern means, for error messages a caller can act on.
_PATTERN_HINTS = {
    S3_URI_PATTERN: "an s3://bucket/key URI without '.', '..' or empty path segments",
    MODEL_NAME_PATTERN: "a lowercase name of letters, digits and '-' that starts with a letter",
    VERSION_PATTERN: "a version of letters, digits, '.', '_' and '-'",
}

_S3_URI = {"type": ["null", "string"], "pattern": S3_URI_PATTERN, "maxLength": 1024}

TRAIN_MODEL: dict[str, dict[str, Any]] = {
    "model_name": {
        "default": DEFAULT_MODEL,
        "type": "string",
        "pattern": MODEL_NAME_PATTERN,
        "description": "Which release spec to use: include/releases/<model_name>.yaml.",
    },
    "dataset_uri": {
        "default": None,
        **_S3_URI,
        "description": "s3:// URI of the labelled CSV. Empty: the newest drop under the spec's dataset_prefix.",
    },
    "training_profile": {
        "default": None,
        "type": ["null", "string"],
        "pattern": r"^[a-z][a-z0-9_-]{0,31}$",
        "description": "A profile of the spec's training.profiles (demo, full). Empty: the spec's default.",
    },
    "max_train_samples": {
        "default": None,
        "type": ["null", "integer"],
        "minimum": 1,
        "description": "Override: cap on training rows.",
    },
    "epochs": {
        "default": None,
        "type": ["null", "number"],
        "exclusiveMinimum": 0,
        "maximum": 100,
        "description": "Override: passes over the training rows.",
    },
    "learning_rate": {
        "default": None,
        "type": ["null", "number"],
        "exclusiveMinimum": 0,
        "maximum": 1,
        "description": "Override: peak learning rate.",
    },
}

RELEASE_MODEL: dict[str, dict[str, Any]] = {
    "model_name": TRAIN_MODEL["model_name"],
    "model_version": {
        "default": None,
        "type": ["null", "string"],
        "pattern": VERSION_PATTERN,
        "description": "A registered candidate version. Empty: the candidate of the triggering asset event.",
    },
    "archive_uri": {
        "default": None,
        **_S3_URI,
        "description": "s3:// URI of a .mar built elsewhere (then eval_dataset_uri is required).",
    },
    "eval_dataset_uri": {
        "default": None,
        **_S3_URI,
        "description": "s3:// URI of the labelled Parquet or CSV the candidate is judged on.",
    },
    "traffic_rate_per_s": {
        "default": None,
        "type": ["null", "number"],
        "minimum": 0,
        "maximum": 1000,
        "description": "Override: requests/s the pipeline sends through the production URL in each canary step "
        "(0: judge live traffic only). Empty: the spec's release.canary.traffic_rate_per_s.",
    },
    "pretraffic_checks": {
        "default": None,
        "type": ["null", "array"],
        "items": {"enum": ["accuracy", "load"]},
        "uniqueItems": True,
        "description": "Override: which checks run on the candidate's own URL before it gets production traffic "
        "([] leaves the judging to the progressive canary; a first release runs them all). "
        "Empty: the spec's release.pretraffic_checks.",
    },
}

ROLLBACK_MODEL: dict[str, dict[str, Any]] = {
    "model_name": TRAIN_MODEL["model_name"],
    "reason": {
        "default": "manual rollback",
        "type": "string",
        "minLength": 1,
        "maxLength": 500,
        "description": "Why production is being reverted; recorded in the registry history.",
    },
}

DAG_PARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "train_model": TRAIN_MODEL,
    "release_model": RELEASE_MODEL,
    "rollback_model": ROLLBACK_MODEL,
}


def schema_of(dag_id: str) -> dict[str, dict[str, Any]]:
    """The JSON schema of each conf key of ``dag_id``, without the defaults."""
    return {
        key: {k: v for k, v in copy.deepcopy(spec).items() if k not in ("default", "description")}
        for key, spec in DAG_PARAMS[dag_id].items()
    }


def conf_errors(dag_id: str, conf: Any) -> list[str]:
    """Every problem with ``conf`` for ``dag_id``, each naming its field; empty when valid."""
    import jsonschema

    if conf is None:
        return []
    if not isinstance(conf, Mapping):
        return [f"conf: must be a JSON object, got {type(conf).__name__}"]
    schemas = schema_of(dag_id)
    errors = [
        f"conf.{key}: unknown key (allowed: {', '.join(sorted(schemas))})" for key in sorted(set(conf) - set(schemas))
    ]
    for key in sorted(set(conf) & set(schemas)):
        validator = jsonschema.Draft7Validator(schemas[key])
        for err in validator.iter_errors(conf[key]):
            hint = _PATTERN_HINTS.get(err.schema.get("pattern", "")) if err.validator == "pattern" else None
            errors.append(f"conf.{key}: {conf[key]!r} is not {hint}" if hint else f"conf.{key}: {err.message}")
    if dag_id == "release_model" and conf.get("archive_uri") and not conf.get("eval_dataset_uri"):
        errors.append("conf.eval_dataset_uri: required when archive_uri is given")
    if dag_id == "release_model" and conf.get("archive_uri") and conf.get("model_version"):
        errors.append("conf.model_version: give either model_version or archive_uri, not both")
    return errors
