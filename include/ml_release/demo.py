"""The demo release, driven exactly as an upstream system would drive it.

1. drop the sample CSV into the bucket (``datasets/tweets/<date>/tweets.csv``);
2. get a token and trigger ``train_model`` through the Airflow REST API;
3. follow ``train_model`` and the ``release_model`` run its candidate schedules;
4. print where the release record is, and ask the promoted model a question with curl.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml_release.airflow_client import AirflowClient
from ml_release.naming import run_key
from ml_release.stack import StackSettings, client_env


def airflow_client(s: StackSettings) -> AirflowClient:
    password = json.loads(s.passwords_file.read_text())["admin"]
    return AirflowClient(s.airflow_url, "admin", password)


def object_store(s: StackSettings) -> Any:
    from ml_release.storage import ObjectStore, S3Config

    env = client_env(s)
    return ObjectStore(
        S3Config(env["AWS_ENDPOINT_URL"], "us-east-1", env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    )


def drop_sample_dataset(s: StackSettings, day: dt.date) -> str:
    from ml_release.data.dataset import sample_dataset_path
    from ml_release.errors import ObjectExistsError

    uri = f"s3://{s.bucket}/datasets/tweets/{day.isoformat()}/tweets.csv"
    # Today's drop may already be there: an upstream system drops once a day.
    with contextlib.suppress(ObjectExistsError):
        object_store(s).put(uri, sample_dataset_path().read_bytes(), create_only=True, content_type="text/csv")
    return uri


def wait_for_dags(client: AirflowClient, dag_ids: tuple[str, ...], timeout_s: float = 300) -> None:
    from ml_release.airflow_client import AirflowAPIError

    deadline = time.monotonic() + timeout_s
    missing = list(dag_ids)
    while missing:
        try:
            client.get_dag(missing[0])
            missing.pop(0)
            continue
        except AirflowAPIError as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
        time.sleep(2)


def find_triggered_release(client: AirflowClient, after: str, timeout_s: float = 120) -> str:
    """The release_model run that train_model's candidate event scheduled."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in client.list_runs("release_model", limit=5):
            if run["run_type"] == "asset_triggered" and (run.get("run_after") or "") >= after:
                return str(run["dag_run_id"])
        time.sleep(2)
    raise TimeoutError("train_model succeeded but no release_model run was scheduled by its candidate")


def task_durations(client: AirflowClient, dag_id: str, run_id: str) -> list[tuple[str, str, float | None]]:
    rows = []
    for ti in sorted(client.task_instances(dag_id, run_id), key=lambda t: t.get("start_date") or "~"):
        rows.append((ti["task_id"], ti["state"], ti.get("duration")))
    return rows


def run_demo(s: StackSettings, echo: Callable[[str], None] = print) -> int:
    started = time.monotonic()

    def progress(dag_id: str) -> Callable[[str, str | None], None]:
        def show(task_id: str, state: str | None) -> None:
            if state is not None:
                echo(f"  [{time.monotonic() - started:6.0f}s] {dag_id}.{task_id}: {state}")

        return show

    client = airflow_client(s)
    wait_for_dags(client, ("train_model", "release_model"))
    dataset_uri = drop_sample_dataset(s, dt.date.today())
    echo(f"dropped the sample dataset at {dataset_uri}")

    train_run_id = f"demo__{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%S')}"
    triggered = client.trigger("train_model", {"dataset_uri": dataset_uri}, dag_run_id=train_run_id)
    echo(f"triggered train_model run {train_run_id} through the REST API")
    run = client.wait_for_run("train_model", train_run_id, timeout_s=3600, on_change=progress("train_model"))
    _print_durations(client, "train_model", train_run_id, echo)
    if run["state"] != "success":
        echo(f"train_model ended {run['state']}; task logs under {s.logs / 'airflow-tasks'}")
        return 1

    release_run_id = find_triggered_release(client, triggered["run_after"])
    echo(f"release_model run {release_run_id} was scheduled by the candidate")
    run = client.wait_for_run("release_model", release_run_id, timeout_s=3600, on_change=progress("release_model"))
    _print_durations(client, "release_model", release_run_id, echo)

    record_uri = f"s3://{s.bucket}/releases/sentiment/{run_key('release_model', release_run_id)}/record.json"
    store = object_store(s)
    record = store.get_json(record_uri)
    local_copy = s.home / "releases" / f"{run_key('release_model', release_run_id)}.json"
    local_copy.parent.mkdir(parents=True, exist_ok=True)
    local_copy.write_text(json.dumps(record, indent=2))
    echo("")
    echo(f"decision: {record['decision']} — {record['reason']}")
    echo(f"release record: {record_uri}")
    echo(f"  (a copy: {local_copy})")
    if record["decision"] != "promoted":
        return 1
    echo(f"whole demo: {time.monotonic() - started:.0f}s")
    return _curl_production(s, echo)


def _print_durations(client: AirflowClient, dag_id: str, run_id: str, echo: Callable[[str], None]) -> None:
    echo(f"{dag_id} task wall times:")
    for task_id, state, duration in task_durations(client, dag_id, run_id):
        echo(f"  {task_id:<20} {state or '-':<16} {'' if duration is None else f'{duration:7.1f}s'}")


def _curl_production(s: StackSettings, echo: Callable[[str], None]) -> int:
    key = json.loads((s.torchserve().home / "key_file.json").read_text())["inference"]["key"]
    cmd = [
        "curl",
        "-sS",
        "--fail-with-body",
        "-X",
        "POST",
        f"http://127.0.0.1:{s.ts_inference_port}/predictions/sentiment",
        "-H",
        "Content-Type: application/json",
        "-H",
        "Authorization: Bearer $INFERENCE_TOKEN",
        "-d",
        json.dumps({"text": "I can't wait to ride in a self-driving car!"}),
    ]
    echo("asking the promoted model:")
    echo(
        "  INFERENCE_TOKEN=$(python -c \"import json;print(json.load(open('"
        f"{s.torchserve().home / 'key_file.json'}'))['inference']['key'])\")"
    )
    echo("  " + " ".join(shlex.quote(c) if "$" not in c else f'"{c}"' for c in cmd))
    real = [c.replace("$INFERENCE_TOKEN", key) for c in cmd]
    out = subprocess.run(real, capture_output=True, text=True, check=False)
    echo("  -> " + (out.stdout.strip() or out.stderr.strip()))
    return out.returncode


def main(path: Path | None = None) -> int:
    return run_demo(StackSettings.from_env())
