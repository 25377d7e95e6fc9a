"""Shared wiring of the DAG files: Params from the core's schemas, the candidate Asset.

Cheap on purpose: the DAG processor imports this every parse (PERFORMANCE A1).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, Param

from ml_release.params import DAG_PARAMS

# train_model's publish_candidate emits an event here; release_model is scheduled on it.
MODEL_CANDIDATES = Asset(name="ml_release_model_candidates", uri="ml-release://model-candidates")

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "ml-release",
    "retries": 2,
    "retry_delay": timedelta(seconds=15),
    "retry_exponential_backoff": True,
}


def params_for(dag_id: str) -> dict[str, Param]:
    out = {}
    for key, schema in DAG_PARAMS[dag_id].items():
        schema = dict(schema)
        default = schema.pop("default")
        out[key] = Param(default, **schema)
    return out
