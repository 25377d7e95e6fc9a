"""An API-server middleware that refuses a bad trigger before Airflow creates a run (G1).

Airflow validates each declared Param, but it accepts conf keys nobody declared: a typo such as
``dataset_url`` would start a run on the default dataset. This middleware answers such a
``POST /api/v2/dags/<dag_id>/dagRuns`` with a 400 that names the field, so nothing is written.
Requests without credentials pass through untouched: Airflow answers them 401 first (G4).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ml_release.params import DAG_PARAMS, conf_errors

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_TRIGGER_PATH = re.compile(r"^/api/v2/dags/(?P<dag_id>[^/]+)/dagRuns/?$")
_MAX_BODY = 1024 * 1024


class ConfGuardMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _TRIGGER_PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if not match or scope.get("method") != "POST" or match["dag_id"] not in DAG_PARAMS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        if "authorization" not in headers and "cookie" not in headers:
            await self.app(scope, receive, send)
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            body = message.get("body", b"")
            size += len(body)
            if size > _MAX_BODY:
                await _reject(send, 413, ["request body over 1 MiB"])
                return
            chunks.append(body)
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)

        errors: list[str] = []
        try:
            payload = json.loads(raw or b"{}")
        except ValueError:
            payload = None  # Airflow itself answers malformed JSON with a 422
        if isinstance(payload, dict):
            errors = conf_errors(match["dag_id"], payload.get("conf"))
        if errors:
            await _reject(send, 400, errors)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reject(send: Send, status: int, errors: list[str]) -> None:
    body = json.dumps({"detail": "; ".join(errors), "errors": errors}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
