"""The ml-release Airflow plugin: the trigger-conf guard on the API server."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from ml_release.airflow.conf_guard import ConfGuardMiddleware


class MLReleasePlugin(AirflowPlugin):
    name = "ml_release"
    fastapi_root_middlewares = [
        {"middleware": ConfGuardMiddleware, "args": [], "kwargs": {}, "name": "ml-release conf guard"}
    ]
