"""The local traffic split: HAProxy on 127.0.0.1 in front of the local TorchServe.

The production URL ``POST /predictions/<model>`` is split by weight between the stable and the
canary version; HAProxy forwards each request to ``/predictions/<model>/<version>`` on TorchServe.
Every response carries the handler's ``X-ML-Release-Model-Version`` and the proxy's own
``X-ML-Release-Backend`` (``stable``/``canary``) and ``X-ML-Release-Backend-Version``; the two
version headers agree, and the proxy's are present even on errors TorchServe or HAProxy generate
(a 404 from an unregistered version, a 503 from a dead worker), so every answer is attributable.
Any other ``/predictions/...`` path and ``/ping`` pass through to TorchServe unchanged (the labelled
replay can reach a version by its own URL); everything else is a 404 from the proxy. The client's
``Authorization`` header goes through untouched: token auth stays on TorchServe.

Why HAProxy rather than nginx: the weight must be read back from the running proxy after every
change (G20). HAProxy's runtime API (a stats socket, mode 600 in the state directory) changes a
map entry without a reload and answers ``show map`` from the running process, so the read-back is
the router's own view, not our config file. nginx's ``split_clients`` is fixed at config load: each
change needs a reload whose completion is asynchronous, and a read-back needs an extra location
that echoes what the workers loaded.

How the split is drawn: for each request to the production URL the frontend draws ``rand(100)``
and sends the request to the canary when the draw is below the canary's weight, read from a map
(``weights.map``, key ``canary``) that the runtime API updates. Each request is an independent
Bernoulli draw, so the canary's share is binomial around its weight; weight 0 sends no request
and 100 sends all. Weighted servers under ``balance roundrobin`` were tried first and rejected:
HAProxy's dynamic weighted round-robin keeps its schedule across a runtime ``set weight``, and right
after a change from 25 to 50 % it gave the canary 299 of the next 400 requests (75 %); a canary
must never get a burst above its step's weight (G20).

The frontend picks backend ``version_stable`` or ``version_canary``; each rewrites the path to its
version (backend rules run after backend selection) and sets the proxy's headers. No health checks
and no redispatch, on purpose: a failing canary's errors must reach the client and be counted
against the canary, never be retried on stable.

Weights are whole percents. Routing (model and versions) changes by a graceful reload
(master-worker mode, ``SIGUSR2``); the running config's id (a hash of the routing, shown as the
process description by ``show info``) confirms that the reload took. The desired state lives in
``router.json`` and the current weight in the map file too, so a proxy restarted after a crash
comes back with the last weight set, and :meth:`LocalRouter.start` reconciles with a proxy that is
already running (G26).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml_release.errors import ServingError
from ml_release.naming import check_model_name, check_version

HAPROXY = "haproxy"
CONFIG_FILE = "haproxy.cfg"
STATE_FILE = "router.json"
WEIGHTS_MAP = "weights.map"
SOCKET_FILE = "haproxy.sock"
PID_FILE = "haproxy.pid"
LOG_FILE = "haproxy.log"
BACKEND_HEADER = "X-ML-Release-Backend"
BACKEND_VERSION_HEADER = "X-ML-Release-Backend-Version"
STABLE = "stable"
CANARY = "canary"
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


class RouterError(ServingError):
    """Raised when the local router cannot be started, configured or read back."""


class WeightMismatchError(RouterError):
    """Raised when the weight read back from the running proxy is not the weight just set (G20)."""

    def __init__(self, message: str, expected: float, effective: float) -> None:
        super().__init__(message)
        self.expected = expected
        self.effective = effective


@dataclasses.dataclass(frozen=True)
class LocalRouterSettings:
    """Where the proxy listens, what it forwards to, and where it keeps its files.

    ``state_dir`` holds the config, the desired state, the pid file and the admin socket (whose
    path must fit in 107 bytes); ``log_dir`` the proxy's access and event log.
    """

    state_dir: Path
    log_dir: Path
    listen_port: int = 8090
    torchserve_inference_port: int = 8080
    server_timeout_s: int = 120
    maxconn: int = 512
    haproxy_bin: str | None = None

    @property
    def socket_path(self) -> Path:
        return Path(self.state_dir) / SOCKET_FILE

    @property
    def config_path(self) -> Path:
        return Path(self.state_dir) / CONFIG_FILE

    @property
    def weights_map(self) -> Path:
        return Path(self.state_dir) / WEIGHTS_MAP

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"


@dataclasses.dataclass(frozen=True)
class RouteState:
    """The desired routing: which model, which versions, the canary's weight in percent."""

    model: str | None = None
    stable_version: str | None = None
    canary_version: str | None = None
    canary_weight: int = 0

    def __post_init__(self) -> None:
        if self.model is not None:
            check_model_name(self.model)
            if self.stable_version is None:
                raise RouterError(f"model {self.model!r} needs a stable version")
        elif self.stable_version is not None or self.canary_version is not None:
            raise RouterError("versions given without a model")
        if self.stable_version is not None:
            check_version(self.stable_version, "stable_version")
        if self.canary_version is not None:
            check_version(self.canary_version, "canary_version")
            if self.canary_version == self.stable_version:
                raise RouterError(f"canary version {self.canary_version!r} is the stable version")
        if not 0 <= self.canary_weight <= 100:
            raise RouterError(f"canary weight must be in 0..100, got {self.canary_weight}")
        if self.canary_version is None and self.canary_weight != 0:
            raise RouterError("a canary weight without a canary version")

    def routing_id(self) -> str:
        """A hash of the routing (not the weight): a reload is confirmed when the proxy shows it."""
        routing = {"model": self.model, "stable": self.stable_version, "canary": self.canary_version}
        return hashlib.sha256(json.dumps(routing, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RouteState:
        data = json.loads(text)
        return cls(
            model=data.get("model"),
            stable_version=data.get("stable_version"),
            canary_version=data.get("canary_version"),
            canary_weight=int(data.get("canary_weight", 0)),
        )


def whole_percent(percent: float) -> int:
    """A weight in whole percent, refusing what the router cannot express exactly."""
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise RouterError(f"canary weight must be a number, got {percent!r}")
    if not 0 <= percent <= 100:
        raise RouterError(f"canary weight must be in [0, 100] percent, got {percent}")
    if percent != int(percent):
        raise RouterError(f"canary weight must be a whole percent, got {percent}")
    return int(percent)


def render_config(settings: LocalRouterSettings, state: RouteState) -> str:
    """The HAProxy configuration for ``state``; pure, so that it is unit-tested without HAProxy."""
    ts = f"127.0.0.1:{settings.torchserve_inference_port}"
    timeout = f"{int(settings.server_timeout_s)}s"
    lines = [
        f"# Written by ml_release.serving.router; routing {state.routing_id()}. Do not edit.",
        "global",
        "    nbthread 1",
        f"    maxconn {int(settings.maxconn)}",
        f"    stats socket {settings.socket_path} mode 600 level admin",
        "    log stderr format raw local0 info",
        f"    description ml-release-router {state.routing_id()}",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    timeout connect 5s",
        "    timeout client 60s",
        f"    timeout server {timeout}",
        "    timeout http-request 30s",
        "    timeout http-keep-alive 30s",
        "    retries 0",
        "",
        "frontend production",
        f"    bind 127.0.0.1:{int(settings.listen_port)}",
        # A client cannot pick the backend by sending the proxy's headers itself.
        f"    http-request del-header {BACKEND_HEADER}",
        f"    http-request del-header {BACKEND_VERSION_HEADER}",
        "    http-request return status 404 content-type text/plain string not-routed"
        " unless { path_beg /predictions/ } || { path /ping }",
    ]
    if state.model is not None:
        prod = f"{{ path /predictions/{state.model} }}"
        if state.canary_version is not None:
            lines += [
                f"    http-request set-var(txn.canary_weight) str({CANARY}),map({settings.weights_map},0) if {prod}",
                f"    http-request set-var(txn.draw) rand(100) if {prod}",
                f"    use_backend version_{CANARY} if {prod} {{ var(txn.draw),sub(txn.canary_weight) lt 0 }}",
            ]
        lines.append(f"    use_backend version_{STABLE} if {prod}")
    lines += [
        "    default_backend torchserve",
        "",
        "backend torchserve",
        f"    http-after-response set-header {BACKEND_HEADER} direct",
        f"    server torchserve {ts}",
        "",
    ]
    if state.model is not None and state.stable_version is not None:
        roles = [(STABLE, state.stable_version)]
        if state.canary_version is not None:
            roles.append((CANARY, state.canary_version))
        for role, version in roles:
            lines += [
                f"backend version_{role}",
                f"    http-request set-path /predictions/{state.model}/{version}",
                f"    http-after-response set-header {BACKEND_HEADER} {role}",
                f"    http-after-response set-header {BACKEND_VERSION_HEADER} {version}",
                f"    server torchserve {ts}",
                "",
            ]
    return "\n".join(lines)


def render_weights_map(state: RouteState) -> str:
    return f"{CANARY} {state.canary_weight}\n"


def parse_map(text: str) -> dict[str, str]:
    """``show map`` lines (``<id> <key> <value>``) as ``{key: value}``."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith("0x"):
            entries[parts[1]] = parts[2]
    return entries


def weights_from_map(entries: Mapping[str, str], state: RouteState) -> dict[str, float]:
    """The split the running proxy applies, in percent per role."""
    if state.model is None:
        return {}
    if state.canary_version is None:
        return {STABLE: 100.0}
    try:
        canary = int(entries[CANARY])
    except (KeyError, ValueError) as exc:
        raise RouterError(f"HAProxy's weights map has no integer {CANARY!r} entry: {entries}") from exc
    canary = min(max(canary, 0), 100)  # what the rand(100) comparison makes of any integer
    return {STABLE: float(100 - canary), CANARY: float(canary)}


def parse_stat_csv(text: str) -> dict[str, dict[str, str]]:
    """``show stat`` CSV rows keyed ``<proxy>/<server>``."""
    rows = [line for line in text.splitlines() if line.strip()]
    if not rows or not rows[0].startswith("# "):
        return {}
    header = rows[0][2:].split(",")
    result: dict[str, dict[str, str]] = {}
    for row in rows[1:]:
        fields = dict(zip(header, row.split(","), strict=False))
        result[f"{fields.get('pxname')}/{fields.get('svname')}"] = fields
    return result


class LocalRouter:
    """Start, configure and read back the local HAProxy; every public call works across processes.

    The state is on disk (``settings.state_dir``), so an Airflow task in a new process can pick up
    a router that an earlier task started.
    """

    def __init__(self, settings: LocalRouterSettings) -> None:
        self.settings = settings

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout_s: float = 30) -> RouteState:
        """Start the proxy (or adopt the running one) with the desired state on disk; return it."""
        settings = self.settings
        state = self.desired_state()
        if self._master_pid() is not None and self._answers():
            running = self._running_routing_id()
            if running != state.routing_id():
                self._reload(state, timeout_s)
            else:
                self._write_config(state)  # the file follows the desired weight, the runtime too
                self._apply_weight(state)
            return state
        self._stop_master()
        if len(str(settings.socket_path)) > _SOCKET_PATH_MAX:
            raise RouterError(f"admin socket path {settings.socket_path} is longer than {_SOCKET_PATH_MAX} bytes")
        for directory in (settings.state_dir, settings.log_dir):
            Path(directory).mkdir(parents=True, exist_ok=True)
        os.chmod(settings.state_dir, 0o700)
        self._write_config(state)
        settings.socket_path.unlink(missing_ok=True)
        with (Path(settings.log_dir) / LOG_FILE).open("ab") as log:
            # Master-worker mode in the foreground: the master's pid is ours to signal (reload on
            # SIGUSR2, stop on SIGTERM). Its own session keeps it out of the caller's Ctrl-C.
            proc = subprocess.Popen(
                [self._haproxy(), "-W", "-db", "-f", str(settings.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=settings.state_dir,
            )
        (Path(settings.state_dir) / PID_FILE).write_text(str(proc.pid))
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RouterError(f"HAProxy exited with {proc.returncode} during start-up:\n{self._log_tail()}")
            if self._answers() and self._running_routing_id() == state.routing_id():
                break
            if time.monotonic() >= deadline:
                self.stop()
                raise RouterError(f"HAProxy did not answer on its admin socket within {timeout_s:.0f}s")
            time.sleep(0.05)
        self._check_weight(state)
        return state

    def stop(self, timeout_s: float = 15) -> None:
        """Stop this instance's HAProxy (master and workers); a no-op when it is not running."""
        self._stop_master(timeout_s)
        self.settings.socket_path.unlink(missing_ok=True)

    def running(self) -> bool:
        return self._master_pid() is not None and self._answers()

    # -- routing -------------------------------------------------------------------------------

    def desired_state(self) -> RouteState:
        path = Path(self.settings.state_dir) / STATE_FILE
        try:
            return RouteState.from_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return RouteState()
        except (ValueError, TypeError) as exc:
            raise RouterError(f"router state {path} is malformed: {exc!r}") from exc

    def configure(
        self, model: str, stable_version: str, canary_version: str | None = None, timeout_s: float = 30
    ) -> dict[str, float]:
        """Route ``/predictions/<model>`` to stable and, if given, a canary; return effective weights.

        A new canary starts at weight 0; the same canary keeps its weight; no canary means all
        traffic on stable. The change is a graceful reload, confirmed by the running config's id.
        """
        current = self.desired_state()
        keep = canary_version is not None and (current.model, current.canary_version) == (model, canary_version)
        state = RouteState(
            model=model,
            stable_version=stable_version,
            canary_version=canary_version,
            canary_weight=current.canary_weight if keep else 0,
        )
        self._require_running()
        self._reload(state, timeout_s)
        return self.effective_weights()

    def set_canary_weight(self, percent: float) -> float:
        """Set the canary's share in whole percent; return the share read back from the proxy.

        Raises :class:`WeightMismatchError` when the running proxy does not apply that weight.
        """
        weight = whole_percent(percent)
        current = self.desired_state()
        if current.canary_version is None:
            raise RouterError("no canary is configured; call configure() with a canary version first")
        self._require_running()
        state = dataclasses.replace(current, canary_weight=weight)
        # The desired state is written first: a proxy restarted after a crash comes back with it.
        self._write_config(state)
        self._apply_weight(state)
        return self._check_weight(state)

    def effective_weights(self) -> dict[str, float]:
        """Percent of new requests per role (``stable``, ``canary``), read from the running proxy."""
        state = self.desired_state()
        if state.canary_version is None:
            return weights_from_map({}, state)
        return weights_from_map(parse_map(self.admin(f"show map {self.settings.weights_map}")), state)

    def status(self) -> dict[str, Any]:
        """Best-effort state for a stack's status command; never raises."""
        state = self.desired_state() if (Path(self.settings.state_dir) / STATE_FILE).exists() else RouteState()
        result: dict[str, Any] = {
            "running": False,
            "pid": self._master_pid(),
            "url": self.settings.url,
            "desired": dataclasses.asdict(state),
        }
        try:
            if not self._answers():
                return result
            result["running"] = True
            result["routing_current"] = self._running_routing_id() == state.routing_id()
            result["effective_weights"] = self.effective_weights()
            stats = parse_stat_csv(self.admin("show stat"))
            result["backends"] = {
                key.split("/", 1)[0]: {
                    "requests": int(row.get("stot") or 0),
                    "http_5xx": int(row.get("hrsp_5xx") or 0),
                }
                for key, row in stats.items()
                if key.startswith("version_") and key.endswith("/BACKEND")
            }
        except (RouterError, OSError, ValueError) as exc:
            result["error"] = str(exc)
        return result

    # -- HAProxy runtime API -------------------------------------------------------------------

    def admin(self, command: str, timeout_s: float = 5) -> str:
        """Send one command to the runtime API and return its answer."""
        if "\n" in command or ";" in command:
            raise RouterError(f"one runtime API command at a time, got {command!r}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout_s)
                sock.connect(str(self.settings.socket_path))
                sock.sendall(command.encode() + b"\n")
                chunks = []
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except OSError as exc:
            raise RouterError(f"HAProxy runtime API {command!r} failed: {exc}") from exc
        return b"".join(chunks).decode("utf-8", errors="replace")

    # -- plumbing ------------------------------------------------------------------------------

    def _haproxy(self) -> str:
        found = self.settings.haproxy_bin or shutil.which(HAPROXY) or shutil.which(HAPROXY, path="/usr/sbin:/sbin")
        if not found:
            raise RouterError("HAProxy is not installed: `apt-get install haproxy`")
        return found

    def _write_config(self, state: RouteState) -> None:
        """Validate and write the config, then the desired state; both atomically."""
        state_dir = Path(self.settings.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        # The map first: the config refers to it, and the running proxy does not reread it.
        map_tmp = self.settings.weights_map.with_suffix(".tmp")
        map_tmp.write_text(render_weights_map(state), encoding="utf-8")
        map_tmp.replace(self.settings.weights_map)
        text = render_config(self.settings, state)
        tmp = self.settings.config_path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        checked = subprocess.run(
            [self._haproxy(), "-c", "-q", "-f", str(tmp)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if checked.returncode != 0:
            raise RouterError(f"HAProxy refused the generated config:\n{checked.stdout}{checked.stderr}")
        tmp.replace(self.settings.config_path)
        state_tmp = state_dir / (STATE_FILE + ".tmp")
        state_tmp.write_text(state.to_json(), encoding="utf-8")
        state_tmp.replace(state_dir / STATE_FILE)

    def _reload(self, state: RouteState, timeout_s: float) -> None:
        pid = self._master_pid()
        if pid is None:
            raise RouterError("HAProxy is not running; call start() first")
        self._write_config(state)
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout_s
        want = state.routing_id()
        while True:
            try:
                if self._running_routing_id() == want:
                    break
            except RouterError:
                pass  # the new worker is taking the socket over
            if time.monotonic() >= deadline:
                raise RouterError(f"HAProxy did not load routing {want} within {timeout_s:.0f}s:\n{self._log_tail()}")
            time.sleep(0.05)
        # The weight comes from the file; runtime changes since the last reload were written there.
        self._check_weight(state)

    def _apply_weight(self, state: RouteState) -> None:
        if state.canary_version is None:
            return
        command = f"set map {self.settings.weights_map} {CANARY} {state.canary_weight}"
        answer = self.admin(command).strip()
        if answer:
            raise RouterError(f"HAProxy refused `{command}`: {answer}")

    def _check_weight(self, state: RouteState) -> float:
        if state.model is None:
            return 0.0
        weights = self.effective_weights()
        effective = weights.get(CANARY, 0.0)
        expected = float(state.canary_weight)
        if abs(effective - expected) > 1e-9 or (state.canary_version is None and CANARY in weights):
            raise WeightMismatchError(
                f"canary weight read back from HAProxy is {effective:g} %, expected {expected:g} % ({weights})",
                expected,
                effective,
            )
        return effective

    def _running_routing_id(self) -> str | None:
        for line in self.admin("show info").splitlines():
            if line.startswith("description:"):
                parts = line.split()
                return parts[-1] if len(parts) >= 3 else None
        return None

    def _answers(self) -> bool:
        try:
            return "Pid:" in self.admin("show info", timeout_s=2)
        except RouterError:
            return False

    def _require_running(self) -> None:
        if not self.running():
            raise RouterError(f"the local router is not running (state in {self.settings.state_dir})")

    def _master_pid(self) -> int | None:
        import psutil

        try:
            pid = int((Path(self.settings.state_dir) / PID_FILE).read_text().split()[0])
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            cmdline = proc.cmdline()
        except (FileNotFoundError, ValueError, IndexError, psutil.Error):
            return None
        if str(self.settings.config_path) not in cmdline:
            return None  # a recycled pid
        return pid

    def _stop_master(self, timeout_s: float = 15) -> None:
        import psutil

        from ml_release.processes import terminate_tree

        pid = self._master_pid()
        if pid is not None:
            with contextlib.suppress(psutil.NoSuchProcess):  # gone between the pid check and now
                terminate_tree(psutil.Process(pid), timeout_s, children_timeout_s=5)
        (Path(self.settings.state_dir) / PID_FILE).unlink(missing_ok=True)

    def _log_tail(self, lines: int = 30) -> str:
        path = Path(self.settings.log_dir) / LOG_FILE
        if not path.is_file():
            return "(no log)"
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


__all__ = [
    "BACKEND_HEADER",
    "BACKEND_VERSION_HEADER",
    "CANARY",
    "STABLE",
    "LocalRouter",
    "LocalRouterSettings",
    "RouteState",
    "RouterError",
    "WeightMismatchError",
    "parse_map",
    "render_config",
    "weights_from_map",
    "whole_percent",
]
