"""A small client of Airflow's public REST API, as an upstream system would use it.

It is what the demo and the end-to-end tests use, and what the README shows with curl:
get a JWT from ``/auth/token``, trigger a run with a caller-chosen ``dag_run_id`` (a repeat is
a 409, G3), poll the run, list its task instances.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

TERMINAL = {"success", "failed"}


class AirflowAPIError(RuntimeError):
    """Raised when the Airflow REST API answers with an error status."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class AirflowClient:
    def __init__(self, base_url: str, username: str, password: str, timeout_s: float = 30) -> None:
        import requests

        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        self._session.trust_env = False  # loopback only; never through a proxy
        resp = self._session.post(
            f"{self.base_url}/auth/token",
            json={"username": username, "password": password},
            timeout=timeout_s,
        )
        if resp.status_code >= 300:
            raise AirflowAPIError(resp.status_code, resp.text)
        self._session.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._session.request(method, f"{self.base_url}/api/v2{path}", timeout=self.timeout_s, **kwargs)
        if resp.status_code >= 300:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise AirflowAPIError(resp.status_code, detail)
        return resp.json() if resp.content else None

    def get_dag(self, dag_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/dags/{dag_id}"))

    def trigger(self, dag_id: str, conf: Mapping[str, Any], dag_run_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"conf": dict(conf), "logical_date": None}
        if dag_run_id:
            body["dag_run_id"] = dag_run_id
        return dict(self._call("POST", f"/dags/{dag_id}/dagRuns", json=body))

    def get_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}"))

    def list_runs(self, dag_id: str, limit: int = 20) -> list[dict[str, Any]]:
        data = self._call("GET", f"/dags/{dag_id}/dagRuns", params={"order_by": "-run_after", "limit": limit})
        return list(data["dag_runs"])

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        data = self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return list(data["task_instances"])

    def extra_links(self, dag_id: str, run_id: str, task_id: str) -> dict[str, str | None]:
        """The task's extra links (name -> URL), as the UI shows them."""
        data = self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/links")
        return dict(data["extra_links"])

    def wait_for_run(
        self,
        dag_id: str,
        run_id: str,
        timeout_s: float,
        on_change: Callable[[str, str | None], None] | None = None,
        poll_s: float = 2.0,
    ) -> dict[str, Any]:
        """Poll until the run ends; ``on_change(task_id, state)`` sees every task state change."""
        deadline = time.monotonic() + timeout_s
        seen: dict[str, str | None] = {}
        while True:
            run = self.get_run(dag_id, run_id)
            if on_change is not None:
                for ti in self.task_instances(dag_id, run_id):
                    if seen.get(ti["task_id"], "") != ti["state"]:
                        seen[ti["task_id"]] = ti["state"]
                        on_change(ti["task_id"], ti["state"])
            if run["state"] in TERMINAL:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dag_id}/{run_id} still {run['state']} after {timeout_s:.0f}s")
            time.sleep(poll_s)
