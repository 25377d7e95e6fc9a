"""The embedded stack on one machine: moto's S3 server, TorchServe and Airflow standalone.

``ml-release stack start|stop|status``. Everything lives under one state folder (``.local/``
beside the repository, or ``$ML_RELEASE_HOME``): logs in ``logs/``, Airflow's home, TorchServe's
model store and tokens, and ``stack.env``, which a shell can source to use the same Airflow.
Ports come from environment variables (see :class:`StackSettings`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class StackSettings:
    home: Path
    s3_port: int
    airflow_port: int
    ts_inference_port: int
    ts_management_port: int
    ts_metrics_port: int
    ts_grpc_inference_port: int
    ts_grpc_management_port: int
    router_port: int
    bucket: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> StackSettings:
        return cls(
            home=Path(env.get("ML_RELEASE_HOME", REPO / ".local")).resolve(),
            s3_port=int(env.get("ML_RELEASE_S3_PORT", "9000")),
            airflow_port=int(env.get("ML_RELEASE_AIRFLOW_PORT", "8280")),
            ts_inference_port=int(env.get("ML_RELEASE_TS_INFERENCE_PORT", "8080")),
            ts_management_port=int(env.get("ML_RELEASE_TS_MANAGEMENT_PORT", "8081")),
            ts_metrics_port=int(env.get("ML_RELEASE_TS_METRICS_PORT", "8082")),
            ts_grpc_inference_port=int(env.get("ML_RELEASE_TS_GRPC_INFERENCE_PORT", "7070")),
            ts_grpc_management_port=int(env.get("ML_RELEASE_TS_GRPC_MANAGEMENT_PORT", "7071")),
            router_port=int(env.get("ML_RELEASE_ROUTER_PORT", "8090")),
            bucket=env.get("ML_RELEASE_BUCKET", "ml-release"),
        )

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.airflow_port}"

    @property
    def passwords_file(self) -> Path:
        return self.airflow_home / "passwords.json"

    def router(self) -> Any:
        from ml_release.serving.router import LocalRouterSettings

        return LocalRouterSettings(
            state_dir=self.home / "router",
            log_dir=self.logs / "router",
            listen_port=self.router_port,
            torchserve_inference_port=self.ts_inference_port,
        )

    def torchserve(self) -> Any:
        from ml_release.serving.local import LocalTorchServeSettings

        return LocalTorchServeSettings(
            home=self.home / "torchserve",
            model_store=self.home / "torchserve" / "model-store",
            log_dir=self.logs / "torchserve",
            inference_port=self.ts_inference_port,
            management_port=self.ts_management_port,
            metrics_port=self.ts_metrics_port,
            grpc_inference_port=self.ts_grpc_inference_port,
            grpc_management_port=self.ts_grpc_management_port,
        )


def _secret(path: Path, make: Callable[[], str]) -> str:
    """A value generated once and kept (mode 600), so restarts keep tokens and passwords valid."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    path.touch(mode=0o600)
    path.write_text(value)
    return value


def stack_env(s: StackSettings) -> dict[str, str]:
    """The environment every Airflow process of the stack runs with."""
    ts = s.torchserve()
    s3_key = "ml-release-local"
    s3_secret = _secret(s.home / "secrets" / "s3_secret", lambda: secrets.token_urlsafe(24))
    jwt_secret = _secret(s.home / "secrets" / "jwt_secret", lambda: secrets.token_urlsafe(32))
    aws_conn = {
        "conn_type": "aws",
        "login": s3_key,
        "password": s3_secret,
        "extra": {"endpoint_url": s.s3_endpoint, "region_name": "us-east-1"},
    }
    ts_conn = {
        "conn_type": "torchserve",
        "extra": {
            "inference_url": f"http://127.0.0.1:{s.ts_inference_port}",
            "management_url": f"http://127.0.0.1:{s.ts_management_port}",
            "metrics_url": f"http://127.0.0.1:{s.ts_metrics_port}",
            "key_file": str(ts.home / "key_file.json"),
            "model_store": str(ts.model_store),
            # The production URL: the router splits it between the stable and the canary version.
            "router_url": f"http://127.0.0.1:{s.router_port}",
            "router_state_dir": str(s.router().state_dir),
            "router_log_dir": str(s.router().log_dir),
        },
    }
    return {
        "AIRFLOW_HOME": str(s.airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # Two cores: a few task slots; the trainer takes both cores while it runs anyway.
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(s.passwords_file),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{s.airflow_url}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(s.airflow_port),
        "AIRFLOW__API__BASE_URL": s.airflow_url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret,
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(s.logs / "airflow-tasks"),
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(aws_conn),
        "AIRFLOW_CONN_TORCHSERVE_DEFAULT": json.dumps(ts_conn),
        "ML_RELEASE_ARTIFACT_ROOT": f"s3://{s.bucket}",
        "ML_RELEASE_HOME": str(s.home),
        "PYTHONPATH": str(REPO / "include"),
        # `airflow standalone` starts its components as `airflow ...` from PATH: the venv's first.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def client_env(s: StackSettings) -> dict[str, str]:
    """boto3's view of the stack's object store, for the demo and the tests."""
    conn = json.loads(stack_env(s)["AIRFLOW_CONN_AWS_DEFAULT"])
    return {
        "AWS_ENDPOINT_URL": s.s3_endpoint,
        "AWS_ACCESS_KEY_ID": conn["login"],
        "AWS_SECRET_ACCESS_KEY": conn["password"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str, log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    hint = f"; see {log_file}" if log_file else ""
    raise RuntimeError(f"{what} did not come up within {timeout_s:.0f}s{hint}")


def _pidfile(s: StackSettings, name: str) -> Path:
    return s.home / "run" / f"{name}.pid"


def _alive(s: StackSettings, name: str) -> int | None:
    path = _pidfile(s, name)
    if not path.exists():
        return None
    pid = int(path.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def _spawn(s: StackSettings, name: str, cmd: list[str], env: Mapping[str, str], cwd: Path) -> int:
    s.logs.mkdir(parents=True, exist_ok=True)
    _pidfile(s, name).parent.mkdir(parents=True, exist_ok=True)
    log = (s.logs / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env},
        cwd=cwd,
        start_new_session=True,
    )
    _pidfile(s, name).write_text(str(proc.pid))
    return proc.pid


def _group_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` that still run (zombies have stopped already)."""
    import psutil

    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return members


def _stop(s: StackSettings, name: str, timeout_s: float = 30) -> bool:
    """Stop a part and everything it started; return whether any of it was running.

    Each part is spawned as a session leader, so its process group is all of it: SIGTERM to the
    group, then SIGKILL to whatever is left after ``timeout_s``. The wait is for the whole group,
    not the leader alone: `airflow standalone` can exit on SIGTERM while a scheduler it started
    hangs in its own shutdown and would outlive the stack.
    """
    path = _pidfile(s, name)
    if not path.exists():
        return False
    pgid = int(path.read_text())
    running = bool(_group_members(pgid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_members(pgid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + timeout_s
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.3)
    path.unlink(missing_ok=True)
    return running


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def start(s: StackSettings, echo: Callable[[str], None] = print) -> None:
    from ml_release.serving import local as ts_local
    from ml_release.storage import ObjectStore, S3Config

    ts_local.check_java()  # fail before anything starts, with the install hint
    env = stack_env(s)
    s.home.mkdir(parents=True, exist_ok=True)

    if _alive(s, "moto") is None:
        echo(f"starting moto S3 server on {s.s3_endpoint}")
        _spawn(s, "moto", [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(s.s3_port)], {}, s.home)
    _wait(lambda: _http_ok(s.s3_endpoint), 60, "moto S3 server", s.logs / "moto.log")
    cenv = client_env(s)
    ObjectStore(
        S3Config(cenv["AWS_ENDPOINT_URL"], "us-east-1", cenv["AWS_ACCESS_KEY_ID"], cenv["AWS_SECRET_ACCESS_KEY"])
    ).ensure_bucket(s.bucket)

    ts = s.torchserve()
    if not ts_local.status(ts).get("running"):
        echo(f"starting TorchServe (inference :{s.ts_inference_port}, management 127.0.0.1:{s.ts_management_port})")
        ts_local.start(ts)

    from ml_release.serving.router import LocalRouter

    router = LocalRouter(s.router())
    if not router.running():
        echo(f"starting the HAProxy router on {s.router().url} (the production URL)")
    router.start()

    if _alive(s, "airflow") is None:
        s.airflow_home.mkdir(parents=True, exist_ok=True)
        _secret(s.passwords_file, lambda: json.dumps({"admin": secrets.token_urlsafe(16)}))
        echo(f"starting Airflow standalone on {s.airflow_url} (first start migrates the database)")
        _spawn(s, "airflow", [_bin("airflow"), "standalone"], env, s.airflow_home)
    _wait(
        lambda: _http_ok(f"{s.airflow_url}/api/v2/monitor/health"),
        240,
        "Airflow API server",
        s.logs / "airflow.log",
    )
    write_env_file(s, env)
    echo(f"stack is up; logs in {s.logs}; `source {s.home / 'stack.env'}` to use its Airflow CLI")


def write_env_file(s: StackSettings, env: Mapping[str, str]) -> None:
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted({**env, **client_env(s)}.items())]
    path = s.home / "stack.env"
    path.touch(mode=0o600)
    path.write_text("\n".join(lines) + "\n")


def stop(s: StackSettings, echo: Callable[[str], None] = print) -> None:
    from ml_release.serving import local as ts_local

    if _stop(s, "airflow"):
        echo("stopped Airflow")
    from ml_release.serving.router import LocalRouter

    router = LocalRouter(s.router())
    if router.running():
        router.stop()
        echo("stopped the router")
    try:
        ts_local.stop(s.torchserve())
        echo("stopped TorchServe")
    except Exception as exc:  # stop is best effort: a half-started stack must still come down
        echo(f"TorchServe: {exc}")
    if _stop(s, "moto"):
        echo("stopped moto S3 server")


def status(s: StackSettings) -> dict[str, Any]:
    from ml_release.serving import local as ts_local

    try:
        ts_status = ts_local.status(s.torchserve())
    except Exception as exc:
        ts_status = {"running": False, "error": str(exc)}
    from ml_release.serving.router import LocalRouter

    try:
        router_status = LocalRouter(s.router()).status()
    except Exception as exc:
        router_status = {"running": False, "error": str(exc)}
    return {
        "home": str(s.home),
        "router": router_status,
        "logs": str(s.logs),
        "s3": {
            "running": _http_ok(s.s3_endpoint),
            "pid": _alive(s, "moto"),
            "endpoint": s.s3_endpoint,
            "bucket": s.bucket,
        },
        "torchserve": ts_status,
        "airflow": {
            "running": _http_ok(f"{s.airflow_url}/api/v2/monitor/health"),
            "pid": _alive(s, "airflow"),
            "url": s.airflow_url,
            "user": "admin",
            "password_file": str(s.passwords_file),
        },
    }
