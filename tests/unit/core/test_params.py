from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from ml_release.airflow.conf_guard import ConfGuardMiddleware
from ml_release.params import conf_errors

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("dag_id", "conf", "field"),
    [
        ("train_model", {"dataset_url": "s3://ml-release/x.csv"}, "conf.dataset_url: unknown key"),
        ("train_model", {"dataset_uri": "http://example.com/x.csv"}, "conf.dataset_uri"),
        ("train_model", {"dataset_uri": "s3://ml-release/../etc/passwd"}, "conf.dataset_uri"),
        ("train_model", {"dataset_uri": "s3://ml-release/a//b.csv"}, "conf.dataset_uri"),
        ("train_model", {"model_name": "Sentiment; rm -rf /"}, "conf.model_name"),
        ("train_model", {"epochs": 0}, "conf.epochs"),
        ("train_model", {"max_train_samples": "many"}, "conf.max_train_samples"),
        ("release_model", {"archive_uri": "s3://ml-release/m.mar"}, "conf.eval_dataset_uri: required"),
        ("release_model", {"model_version": "../x"}, "conf.model_version"),
        ("rollback_model", {"reason": ""}, "conf.reason"),
        ("release_model", {"pretraffic_checks": ["lod"]}, "conf.pretraffic_checks"),
        ("release_model", {"pretraffic_checks": ["load", "load"]}, "conf.pretraffic_checks"),
    ],
    ids=[
        "unknown-key",
        "not-s3",
        "dot-dot-traversal",
        "empty-segment",
        "model-name-injection",
        "epochs-zero",
        "wrong-type",
        "archive-without-eval-set",
        "version-traversal",
        "empty-reason",
        "unknown-pretraffic-check",
        "repeated-pretraffic-check",
    ],
)
def test_conf_errors_name_the_field(dag_id: str, conf: dict[str, Any], field: str) -> None:
    errors = conf_errors(dag_id, conf)
    assert any(e.startswith(field) for e in errors), errors


@pytest.mark.parametrize(
    ("dag_id", "conf"),
    [
        ("train_model", {}),
        ("train_model", None),
        (
            "train_model",
            {"dataset_uri": "s3://ml-release/datasets/tweets/2026-12-04/tweets.csv", "epochs": 1.5},
        ),
        ("release_model", {"model_version": "r0123456789ab"}),
        ("release_model", {"archive_uri": "s3://b-1/m.mar", "eval_dataset_uri": "s3://b-1/test.parquet"}),
        ("rollback_model", {"reason": "p99 regression seen by on-call"}),
        ("release_model", {"model_version": "r0123456789ab", "pretraffic_checks": []}),
    ],
    ids=["empty", "none", "dataset-and-override", "version", "archive-with-eval", "rollback", "canary-only"],
)
def test_valid_conf_has_no_errors(dag_id: str, conf: dict[str, Any] | None) -> None:
    assert conf_errors(dag_id, conf) == []


def _call(
    app: ConfGuardMiddleware, path: str, body: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[int, bytes, bytes]:
    sent: list[dict[str, Any]] = []
    chunks = [body[:5], body[5:]]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, out, b""


class EchoApp:
    """The app behind the middleware: answers 200 with the body it was given."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


AUTH = [(b"authorization", b"Bearer x")]


def test_guard_refuses_unknown_key_with_400_naming_it() -> None:
    body = json.dumps({"conf": {"dataset_url": "s3://b-1/x.csv"}}).encode()
    status, out, _ = _call(ConfGuardMiddleware(EchoApp()), "/api/v2/dags/train_model/dagRuns", body, AUTH)
    assert status == 400
    assert "conf.dataset_url: unknown key" in json.loads(out)["detail"]


def test_guard_passes_a_valid_trigger_with_its_body_intact() -> None:
    body = json.dumps({"conf": {"dataset_uri": "s3://b-1/x.csv"}, "logical_date": None}).encode()
    status, out, _ = _call(ConfGuardMiddleware(EchoApp()), "/api/v2/dags/train_model/dagRuns", body, AUTH)
    assert (status, out) == (200, body)


def test_guard_leaves_unauthenticated_requests_to_airflow() -> None:
    body = json.dumps({"conf": {"bogus": 1}}).encode()
    status, out, _ = _call(ConfGuardMiddleware(EchoApp()), "/api/v2/dags/train_model/dagRuns", body, [])
    assert (status, out) == (200, body)


def test_guard_ignores_other_dags_and_paths() -> None:
    body = json.dumps({"conf": {"bogus": 1}}).encode()
    app = ConfGuardMiddleware(EchoApp())
    assert _call(app, "/api/v2/dags/other_dag/dagRuns", body, AUTH)[0] == 200
    assert _call(app, "/api/v2/dags/train_model/dagRuns/abc/clear", body, AUTH)[0] == 200
