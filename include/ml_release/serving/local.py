"""The embedded default: one TorchServe process on 127.0.0.1, owned by the local stack.

Security is the production posture, not a demo shortcut (G29, TorchServe's SECURITY.md,
CVE-2023-43654): every API listens on 127.0.0.1 only, token auth stays on, and ``allowed_urls``
matches nothing but ``.mar`` files in this instance's model store, so the management API cannot be
made to fetch an archive from the network. Archives reach the store through the pipeline, which
checks their sha256 against the registry first (G16), and are registered by file name.

Everything the instance writes lives under ``settings.home`` and ``settings.log_dir``: the key file
(TorchServe writes it in its working directory), its pid file and extracted archives (both under
its temp directory, which is pointed into ``home`` so that two instances on one machine never share
``/tmp/.model_server.pid``), and its logs (``LOG_LOCATION``/``METRICS_LOCATION``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ml_release.errors import ServingError
from ml_release.serving.torchserve import TorchServeClient, TorchServeConfig, read_key_file

KEY_FILE = "key_file.json"
CONFIG_FILE = "config.properties"
PID_FILE = ".model_server.pid"  # written by TorchServe's launcher in its temp directory
STDOUT_LOG = "torchserve.out"
TOKEN_EXPIRATION_MIN = 7 * 24 * 60  # a release (and a paused demo) must not outlive its tokens
MIN_JAVA = 17
_JAVA_MAIN = "org.pytorch.serve.ModelServer"
_INSTALL_JAVA = "install Java 17, e.g. `apt-get install openjdk-17-jre-headless`, or set JAVA_HOME"


@dataclasses.dataclass(frozen=True)
class LocalTorchServeSettings:
    home: Path
    model_store: Path
    log_dir: Path
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    # TorchServe also serves gRPC (on loopback); two instances on one host need distinct ports.
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071


def key_file(settings: LocalTorchServeSettings) -> Path:
    return Path(settings.home) / KEY_FILE


def config_file(settings: LocalTorchServeSettings) -> Path:
    return Path(settings.home) / CONFIG_FILE


def client_config(settings: LocalTorchServeSettings) -> TorchServeConfig:
    """The client config of a running instance (tokens from its key file)."""
    return TorchServeConfig.from_key_file(
        inference_url=f"http://127.0.0.1:{settings.inference_port}",
        management_url=f"http://127.0.0.1:{settings.management_port}",
        metrics_url=f"http://127.0.0.1:{settings.metrics_port}",
        key_file=key_file(settings),
    )


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    # The same lookup as TorchServe's launcher, so the check tests the java it will run.
    return str(Path(java_home) / "bin" / "java") if java_home else "java"


def java_major_version(version_output: str) -> int | None:
    """Parse ``java -version`` output: ``"17.0.15"`` -> 17, legacy ``"1.8.0_392"`` -> 8."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if not match:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2):
        return int(match.group(2))
    return major


def check_java() -> None:
    """Raise :class:`ServingError` unless Java 17 or newer is available, saying how to get it."""
    java = _java()
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise ServingError(f"TorchServe needs Java {MIN_JAVA}+, but `{java}` was not found: {_INSTALL_JAVA}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServingError(f"`{java} -version` failed ({exc}): {_INSTALL_JAVA}") from exc
    output = proc.stderr + proc.stdout
    major = java_major_version(output)
    if proc.returncode != 0 or major is None:
        raise ServingError(f"`{java} -version` gave no version ({output.strip()[:200]!r}): {_INSTALL_JAVA}")
    if major < MIN_JAVA:
        raise ServingError(f"TorchServe needs Java {MIN_JAVA}+, found Java {major} at `{java}`: {_INSTALL_JAVA}")


def allowed_urls_pattern(model_store: Path) -> str:
    """A Java regex matching only ``file://<model_store>/<name>.mar``.

    Written without backslashes, because ``config.properties`` is read with
    ``java.util.Properties``, which eats them; each special character becomes a ``[c]`` class.
    TorchServe splits ``allowed_urls`` on commas, so a store path with one is refused.
    """
    store = str(Path(model_store).resolve())
    if any(c in store for c in ",\\[]^\n\r"):
        raise ServingError(f"model store path {store!r} holds a character allowed_urls cannot express")
    quoted = "".join(c if c.isalnum() or c == "/" else f"[{c}]" for c in store)
    return f"file://{quoted}/[A-Za-z0-9][A-Za-z0-9_.-]*[.]mar"


def write_config(settings: LocalTorchServeSettings) -> Path:
    """Write ``config.properties`` for this instance and return its path."""
    home = Path(settings.home)
    home.mkdir(parents=True, exist_ok=True)
    store = Path(settings.model_store).resolve()
    props = {
        "inference_address": f"http://127.0.0.1:{settings.inference_port}",
        "management_address": f"http://127.0.0.1:{settings.management_port}",
        "metrics_address": f"http://127.0.0.1:{settings.metrics_port}",
        "grpc_inference_port": str(settings.grpc_inference_port),
        "grpc_management_port": str(settings.grpc_management_port),
        # Token auth is on by default; it is written out so nobody mistakes its absence for "off".
        "disable_token_authorization": "false",
        "token_expiration_min": str(TOKEN_EXPIRATION_MIN),
        "enable_model_api": "true",
        "allowed_urls": allowed_urls_pattern(store),
        "model_store": str(store),
        "default_workers_per_model": "1",
        "install_py_dep_per_model": "false",
        "disable_system_metrics": "true",
        # Per-version request and latency counters for the canary analysis, on /metrics.
        "metrics_mode": "prometheus",
        "enable_metrics_api": "true",
        # TS_* environment variables must not override this file (e.g. TS_ALLOWED_URLS).
        "enable_envvars_config": "false",
    }
    lines = ["# Written by ml_release.serving.local.write_config; regenerated on every start."]
    lines += [f"{key}={value}" for key, value in props.items()]
    path = config_file(settings)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _tmp_dir(settings: LocalTorchServeSettings) -> Path:
    return Path(settings.home) / "tmp"


def _env(settings: LocalTorchServeSettings) -> dict[str, str]:
    env = dict(os.environ)
    tmp = str(_tmp_dir(settings))
    # TMPDIR/TEMP: the launcher's pid file, Java's java.io.tmpdir (extracted archives) and the
    # workers' temp files all stay in this instance's home.
    env.update(
        TMPDIR=tmp,
        TEMP=tmp,
        TMP=tmp,
        LOG_LOCATION=str(settings.log_dir),
        METRICS_LOCATION=str(settings.log_dir),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    # TorchServe puts PYTHONPATH ahead of an archive's own directory on the worker's path; without
    # it, the ml_release bundled in each archive is what the worker runs.
    env.pop("PYTHONPATH", None)
    env.pop("TS_CONFIG_FILE", None)  # would override --ts-config
    return env


def _read_pid(settings: LocalTorchServeSettings) -> int | None:
    try:
        return int((_tmp_dir(settings) / PID_FILE).read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _server_process(settings: LocalTorchServeSettings) -> Any:
    """The psutil process of this instance's Java frontend, or None when it is not running."""
    import psutil

    pid = _read_pid(settings)
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or _JAVA_MAIN not in proc.cmdline():
            return None
        return proc
    except psutil.Error:
        return None


def _log_tail(settings: LocalTorchServeSettings, lines: int = 30) -> str:
    chunks = []
    for name in (STDOUT_LOG, "ts_log.log"):
        path = Path(settings.log_dir) / name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            chunks.append(f"--- {path} ---\n" + "\n".join(text))
    return "\n".join(chunks) or "(no logs)"


def start(settings: LocalTorchServeSettings, timeout_s: float = 120) -> TorchServeConfig:
    """Start TorchServe (or find it running) and return a client config once ``/ping`` answers.

    ``/ping`` says Healthy before any model is loaded: this is liveness, not model readiness.
    """
    if _server_process(settings) is not None:
        config = client_config(settings)
        with TorchServeClient(config) as client:
            if client.ping():
                return config
    check_java()
    for directory in (settings.home, settings.model_store, settings.log_dir, _tmp_dir(settings)):
        Path(directory).mkdir(parents=True, exist_ok=True)
    conf = write_config(settings)
    # A key file left by an earlier instance holds dead tokens; wait for the new one.
    key_file(settings).unlink(missing_ok=True)
    (_tmp_dir(settings) / PID_FILE).unlink(missing_ok=True)
    launcher = Path(sys.executable).with_name("torchserve")
    if not launcher.is_file():
        found = shutil.which("torchserve")
        if found is None:
            raise ServingError("the torchserve launcher is not installed (pip install torchserve)")
        launcher = Path(found)
    cmd = [
        str(launcher),
        "--start",
        "--ncs",
        "--ts-config",
        str(conf),
        "--model-store",
        str(Path(settings.model_store).resolve()),
    ]
    with (Path(settings.log_dir) / STDOUT_LOG).open("ab") as out:
        # The launcher spawns the Java frontend and exits; Java inherits this log file. Its own
        # session keeps it out of the caller's process group (a Ctrl-C in a test run).
        launched = subprocess.run(
            cmd,
            cwd=settings.home,
            env=_env(settings),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            timeout=60,
            check=False,
        )
    if launched.returncode != 0:
        raise ServingError(f"torchserve --start exited with {launched.returncode}:\n{_log_tail(settings)}")

    deadline = time.monotonic() + timeout_s
    while True:
        if _read_pid(settings) is not None and _server_process(settings) is None:
            raise ServingError(f"TorchServe exited during start-up:\n{_log_tail(settings)}")
        try:
            config = client_config(settings)
            with TorchServeClient(config) as client:
                if client.ping():
                    return config
        except ServingError:
            pass  # no key file yet, or caught half-written
        if time.monotonic() >= deadline:
            stop(settings)
            raise ServingError(f"TorchServe did not answer /ping within {timeout_s:.0f}s:\n{_log_tail(settings)}")
        time.sleep(0.2)


def stop(settings: LocalTorchServeSettings, timeout_s: float = 60) -> None:
    """Stop this instance and its workers; a no-op when it is not running."""
    from ml_release.processes import terminate_tree

    proc = _server_process(settings)
    if proc is not None:
        terminate_tree(proc, timeout_s)  # the frontend and its Python workers
    (_tmp_dir(settings) / PID_FILE).unlink(missing_ok=True)
    key_file(settings).unlink(missing_ok=True)


def status(settings: LocalTorchServeSettings) -> dict[str, Any]:
    """Best-effort state for a stack's status command; never raises."""
    proc = _server_process(settings)
    result: dict[str, Any] = {
        "running": proc is not None,
        "pid": proc.pid if proc is not None else None,
        "ports": {
            "inference": settings.inference_port,
            "management": settings.management_port,
            "metrics": settings.metrics_port,
            "grpc_inference": settings.grpc_inference_port,
            "grpc_management": settings.grpc_management_port,
        },
        "models": [],
    }
    if proc is None:
        return result
    try:
        with TorchServeClient(client_config(settings)) as client:
            result["healthy"] = client.ping()
            result["models"] = [
                {"name": name, "versions": client.versions(name), "default": client.default_version(name)}
                for name in client.list_models()
            ]
    except ServingError as exc:
        result["error"] = str(exc)
    return result


__all__ = [
    "LocalTorchServeSettings",
    "allowed_urls_pattern",
    "check_java",
    "client_config",
    "key_file",
    "read_key_file",
    "start",
    "status",
    "stop",
    "write_config",
]
