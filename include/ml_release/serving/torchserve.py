"""A typed client for TorchServe's inference and management APIs.

TorchServe is in limited maintenance, so everything that knows its URLs, its JSON shapes and its
token scheme lives here (and in :mod:`ml_release.serving.local`); the rest of the pipeline talks
to this client. Management calls raise :class:`TorchServeAPIError` (a
:class:`~ml_release.errors.ServingError`) carrying the HTTP status and TorchServe's own message;
:meth:`TorchServeClient.predict` never raises on an HTTP status, because a canary's 4xx/5xx are
measurements, not faults of the caller.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from ml_release.errors import ServingError
from ml_release.naming import check_model_name, check_version

READY = "READY"
VERSION_HEADER = "X-ML-Release-Model-Version"  # set by ml_release.packaging.handler


class TorchServeAPIError(ServingError):
    """Raised when TorchServe answers a management or inference call with an error status.

    ``status`` is the HTTP status (``None`` when the server could not be reached).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class TorchServeConfig:
    inference_url: str
    management_url: str
    metrics_url: str | None
    inference_token: str = dataclasses.field(repr=False)
    management_token: str = dataclasses.field(repr=False)
    timeout_s: float = 30

    @classmethod
    def from_key_file(
        cls,
        inference_url: str,
        management_url: str,
        key_file: Path,
        metrics_url: str | None = None,
    ) -> TorchServeConfig:
        """Read the tokens from TorchServe's ``key_file.json`` (written in its working directory)."""
        inference, management = read_key_file(key_file)
        return cls(
            inference_url=inference_url.rstrip("/"),
            management_url=management_url.rstrip("/"),
            metrics_url=metrics_url.rstrip("/") if metrics_url else None,
            inference_token=inference,
            management_token=management,
        )


def read_key_file(key_file: Path) -> tuple[str, str]:
    """Return ``(inference_token, management_token)`` from a TorchServe key file."""
    try:
        data = json.loads(Path(key_file).read_text(encoding="utf-8"))
        return str(data["inference"]["key"]), str(data["management"]["key"])
    except FileNotFoundError as exc:
        raise ServingError(f"TorchServe key file not found: {key_file}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        # TorchServe writes the file in place, so a reader can catch it half-written.
        raise ServingError(f"TorchServe key file {key_file} is incomplete or malformed: {exc!r}") from exc


@dataclasses.dataclass(frozen=True)
class Prediction:
    status: int
    body: Any
    latency_s: float
    version: str | None = None  # the version that answered, from the handler's response header


class TorchServeClient:
    """One ``requests.Session`` per client; the token depends on the API (inference, management)."""

    def __init__(self, config: TorchServeConfig) -> None:
        self.config = config
        self._session = requests.Session()

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> TorchServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inference API -------------------------------------------------------------------------

    def ping(self) -> bool:
        """TorchServe's liveness; it says Healthy before any model is loaded, so it is not readiness."""
        try:
            resp = self._session.get(
                f"{self.config.inference_url}/ping",
                headers=self._auth(self.config.inference_token),
                timeout=self.config.timeout_s,
            )
        except requests.RequestException:
            return False
        if resp.status_code != 200:
            return False
        try:
            return bool(resp.json().get("status") == "Healthy")
        except ValueError:
            return False

    def predict(self, model: str, payload: Any, version: str | None = None) -> Prediction:
        """POST one request; 4xx and 5xx come back as a :class:`Prediction`, not an exception."""
        url = f"{self.config.inference_url}/predictions/{_model(model)}"
        if version is not None:
            url += f"/{_version(version)}"
        started = time.perf_counter()
        try:
            resp = self._session.post(
                url,
                json=payload,
                headers=self._auth(self.config.inference_token),
                timeout=self.config.timeout_s,
            )
        except requests.RequestException as exc:
            raise TorchServeAPIError(f"POST {url} failed: {type(exc).__name__}: {exc}") from exc
        latency = time.perf_counter() - started
        try:
            body: Any = resp.json()
        except ValueError:
            body = resp.text
        return Prediction(resp.status_code, body, latency, resp.headers.get(VERSION_HEADER))

    # -- management API ------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        names: list[str] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 100}
            if token:
                params["next_page_token"] = token
            data = self._manage("GET", "/models", params=params)
            names.extend(str(m["modelName"]) for m in data.get("models", []))
            token = data.get("nextPageToken")
            if not token:
                return names

    def describe(self, model: str, version: str | None = None) -> list[dict[str, Any]]:
        """Describe one version, or every version (``version=None``); ``[]`` when not registered."""
        path = f"/models/{_model(model)}/{_version(version) if version is not None else 'all'}"
        try:
            data = self._manage("GET", path)
        except TorchServeAPIError as exc:
            if exc.status == 404:
                return []
            raise
        return list(data) if isinstance(data, list) else [data]

    def versions(self, model: str) -> list[str]:
        return [str(d["modelVersion"]) for d in self.describe(model)]

    def default_version(self, model: str) -> str | None:
        # Without a version in the path, TorchServe describes the default version only.
        try:
            data = self._manage("GET", f"/models/{_model(model)}")
        except TorchServeAPIError as exc:
            if exc.status == 404:
                return None
            raise
        return str(data[0]["modelVersion"]) if data else None

    def ready_workers(self, model: str, version: str) -> int:
        described = self.describe(model, version)
        return sum(1 for d in described for w in d.get("workers", []) if w.get("status") == READY)

    def register(
        self,
        mar: str,
        model_name: str,
        *,
        initial_workers: int = 1,
        synchronous: bool = True,
        timeout_s: float = 300,
    ) -> None:
        """Register ``mar`` (a file name in the model store) as ``model_name``.

        The version comes from the archive's manifest. A synchronous call returns once the
        workers have loaded the model; TorchServe itself unregisters a model whose workers fail.
        """
        if "/" in mar or "\\" in mar or mar in ("", ".", ".."):
            # URLs and paths are refused here as well as by allowed_urls: the local store is the
            # only source, and only after its sha256 was checked (G16).
            raise ServingError(f"register takes a file name in the model store, got {mar!r}")
        self._manage(
            "POST",
            "/models",
            params={
                "url": mar,
                "model_name": _model(model_name),
                "initial_workers": initial_workers,
                "synchronous": str(synchronous).lower(),
            },
            timeout_s=timeout_s,
        )

    def register_url(self, url: str, model_name: str, *, initial_workers: int = 1, timeout_s: float = 300) -> None:
        """Register from a URL (a presigned S3 URL in production); ``allowed_urls`` decides."""
        self._manage(
            "POST",
            "/models",
            params={
                "url": url,
                "model_name": _model(model_name),
                "initial_workers": initial_workers,
                "synchronous": "true",
            },
            timeout_s=timeout_s,
        )

    def wait_ready(self, model: str, version: str, timeout_s: float) -> int:
        """Poll until the version has at least one READY worker; return how many it has."""
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            try:
                ready = self.ready_workers(model, version)
                if ready >= 1:
                    return ready
                last = "0 READY workers"
            except ServingError as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise TorchServeAPIError(
                    f"{model} version {version} has no READY worker after {timeout_s:.0f}s ({last})"
                )
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))

    def set_default(self, model: str, version: str) -> None:
        self._manage("PUT", f"/models/{_model(model)}/{_version(version)}/set-default")

    def unregister(self, model: str, version: str) -> None:
        """Unregister one version; a version that is already gone is fine (idempotent)."""
        try:
            self._manage("DELETE", f"/models/{_model(model)}/{_version(version)}")
        except TorchServeAPIError as exc:
            if exc.status != 404:
                raise

    # -- plumbing ------------------------------------------------------------------------------

    @staticmethod
    def _auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def _manage(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        url = f"{self.config.management_url}{path}"
        what = f"{method} {path}"
        try:
            resp = self._session.request(
                method,
                url,
                params=params,
                headers=self._auth(self.config.management_token),
                timeout=timeout_s or self.config.timeout_s,
            )
        except requests.RequestException as exc:
            raise TorchServeAPIError(f"TorchServe {what} failed: {type(exc).__name__}: {exc}") from exc
        if resp.status_code >= 400:
            raise TorchServeAPIError(
                f"TorchServe {what} failed: HTTP {resp.status_code}: {_message(resp)}", resp.status_code
            )
        try:
            return resp.json()
        except ValueError:
            return resp.text


def _model(name: str) -> str:
    return quote(check_model_name(name), safe="")


def _version(version: str) -> str:
    return quote(check_version(version), safe="")


def _message(resp: requests.Response) -> str:
    """TorchServe's error message: ``{"code": ..., "type": ..., "message": ...}`` or plain text."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or resp.reason
    if isinstance(data, dict) and "message" in data:
        return str(data["message"])
    return json.dumps(data)[:500]
