"""The ml-release Airflow plugin: the trigger-conf guard on the API server, and the
"Release report" link on release_model's tasks."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from ml_release.airflow.conf_guard import ConfGuardMiddleware
from ml_release.airflow.links import ReleaseReportLink


class MLReleasePlugin(AirflowPlugin):
    name = "ml_release"
    fastapi_root_middlewares = [
        {"middleware": ConfGuardMiddleware, "args": [], "kwargs": {}, "name": "ml-release conf guard"}
    ]
    global_operator_extra_links = [ReleaseReportLink()]
