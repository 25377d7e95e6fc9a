"""The "Release report" extra link on every release_model task in the Airflow UI.

``decide`` pushes the report's URI as the XCom ``release_report_uri`` (also when it rolls back and
fails the run). The API server resolves the link when the UI asks for it: it reads that XCom and
presigns a short-lived GET for the report with the ``aws_default`` connection, so the browser needs
no S3 credentials and none appear in the page, the log or the XCom.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

from airflow.sdk import BaseOperatorLink

log = logging.getLogger(__name__)

REPORT_XCOM_KEY = "release_report_uri"
RELEASE_DAG = "release_model"
DECIDE_TASK = "decide"
LINK_EXPIRES_S = 3600


def report_uri_for(run_id: str) -> str | None:
    """The report URI ``decide`` pushed for this release_model run, or None before it has."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(
                key=REPORT_XCOM_KEY, run_id=run_id, dag_ids=RELEASE_DAG, task_ids=DECIDE_TASK
            ).with_only_columns(XComModel.value)
        ).first()
    if row is None:
        return None
    value: Any = row[0]
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # a plain string is stored as itself
            value = json.loads(value)
    return value if isinstance(value, str) and value.startswith("s3://") else None


class ReleaseReportLink(BaseOperatorLink):
    """Opens the release's HTML report (plots, verdict table, weight timeline)."""

    name = "Release report"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        if ti_key.dag_id != RELEASE_DAG:
            return ""
        uri = report_uri_for(ti_key.run_id)
        if uri is None:
            return ""
        from ml_release.airflow.hooks import ObjectStoreHook

        try:
            return ObjectStoreHook().get_store().presigned_get_url(uri, LINK_EXPIRES_S)
        except Exception:  # a link that cannot be built is an empty link, never a broken page
            log.exception("could not presign the release report %s", uri)
            return ""
