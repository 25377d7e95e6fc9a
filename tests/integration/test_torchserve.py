"""The handler, the archiver and the client against a real TorchServe (started by conftest)."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from ml_release.serving.torchserve import TorchServeAPIError, TorchServeClient
from tests.integration.conftest import TINY_LABELS, LocalTorchServe
from tests.support.services import wait_until

pytestmark = pytest.mark.integration


def register_and_wait(client: TorchServeClient, mar: str, model: str, version: str) -> float:
    started = time.monotonic()
    client.register(mar, model, timeout_s=180)
    client.wait_ready(model, version, timeout_s=180)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def two_versions(torchserve_client: TorchServeClient, tiny_archives: dict[str, str]) -> Iterator[str]:
    """Model ``tiny-a`` with v1 (registered first) and v2; its default is v1 on entry to each test."""
    model = "tiny-a"
    for version in ("v1", "v2"):
        register_and_wait(torchserve_client, tiny_archives[version], model, version)
    yield model
    torchserve_client.set_default(model, "v1")
    torchserve_client.unregister(model, "v2")
    torchserve_client.unregister(model, "v1")


def assert_prediction(body: object) -> None:
    assert isinstance(body, dict)
    assert set(body) == {"label", "scores"}
    assert set(body["scores"]) == set(TINY_LABELS)
    assert body["label"] in TINY_LABELS
    assert sum(body["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_torchserve_answers_ping_and_starts_quickly(
    torchserve: LocalTorchServe, torchserve_client: TorchServeClient
) -> None:
    assert torchserve_client.ping()
    assert torchserve.start_s < 120


def test_both_versions_reach_ready(torchserve_client: TorchServeClient, two_versions: str) -> None:
    assert sorted(torchserve_client.versions(two_versions)) == ["v1", "v2"]
    for version in ("v1", "v2"):
        assert torchserve_client.ready_workers(two_versions, version) >= 1


@pytest.mark.parametrize("version", ["v1", "v2"], ids=["v1", "v2"])
def test_each_version_answers_through_its_own_url(
    torchserve_client: TorchServeClient, two_versions: str, version: str
) -> None:
    prediction = torchserve_client.predict(two_versions, {"text": "I love this car"}, version=version)
    assert prediction.status == 200, prediction.body
    assert_prediction(prediction.body)
    assert prediction.version == version
    assert prediction.latency_s > 0


def test_first_registered_version_is_default_and_set_default_switches_it(
    torchserve_client: TorchServeClient, two_versions: str
) -> None:
    assert torchserve_client.default_version(two_versions) == "v1"
    assert torchserve_client.predict(two_versions, {"text": "hello"}).version == "v1"
    torchserve_client.set_default(two_versions, "v2")
    try:
        assert torchserve_client.default_version(two_versions) == "v2"
        assert torchserve_client.predict(two_versions, {"text": "hello"}).version == "v2"
    finally:
        torchserve_client.set_default(two_versions, "v1")


@pytest.mark.parametrize(
    ("api", "headers"),
    [
        ("inference", {}),
        ("inference", {"Authorization": "Bearer wrong-token"}),
        ("management", {}),
        ("management", {"Authorization": "Bearer wrong-token"}),
    ],
    ids=["inference-no-token", "inference-wrong-token", "management-no-token", "management-wrong-token"],
)
def test_a_request_without_the_right_token_is_refused(
    torchserve: LocalTorchServe, two_versions: str, api: str, headers: dict[str, str]
) -> None:
    if api == "inference":
        resp = requests.post(
            f"{torchserve.config.inference_url}/predictions/{two_versions}",
            json={"text": "hi"},
            headers=headers,
            timeout=10,
        )
    else:
        resp = requests.get(f"{torchserve.config.management_url}/models", headers=headers, timeout=10)
    # TorchServe 0.12 refuses with 400 (InvalidKeyException), not 401.
    assert resp.status_code in (400, 401)
    assert resp.json()["type"] == "InvalidKeyException"
    assert "Token Authorization failed" in resp.json()["message"]


def test_the_management_token_does_not_open_the_inference_api(torchserve: LocalTorchServe, two_versions: str) -> None:
    resp = requests.post(
        f"{torchserve.config.inference_url}/predictions/{two_versions}",
        json={"text": "hi"},
        headers={"Authorization": f"Bearer {torchserve.config.management_token}"},
        timeout=10,
    )
    assert resp.status_code in (400, 401)


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"txt": "typo"}, 'missing "text"'),
        ({"text": ""}, '"text" must be a non-empty string'),
        ({"text": 5}, '"text" must be a non-empty string'),
        ({"text": "ok", "lang": "en"}, "unknown keys 'lang'"),
        (["text"], "JSON object"),
        ("not json", "not JSON"),
    ],
    ids=["missing-text", "empty-text", "text-not-string", "unknown-key", "array", "json-string-not-object"],
)
def test_a_malformed_body_gets_400_naming_the_problem(
    torchserve_client: TorchServeClient, two_versions: str, payload: object, problem: str
) -> None:
    prediction = torchserve_client.predict(two_versions, payload)
    assert prediction.status == 400
    assert isinstance(prediction.body, dict)
    assert problem in prediction.body["error"]


def test_raw_non_json_bytes_get_400(torchserve: LocalTorchServe, two_versions: str) -> None:
    resp = requests.post(
        f"{torchserve.config.inference_url}/predictions/{two_versions}",
        data=b"{broken",
        headers={
            "Authorization": f"Bearer {torchserve.config.inference_token}",
            "Content-Type": "text/plain",
        },
        timeout=10,
    )
    assert resp.status_code == 400
    assert "not JSON" in resp.json()["error"]


def test_unregister_removes_one_version_and_the_other_keeps_serving(
    torchserve_client: TorchServeClient, tiny_archives: dict[str, str]
) -> None:
    model = "tiny-unregister"
    register_and_wait(torchserve_client, tiny_archives["v1"], model, "v1")
    register_and_wait(torchserve_client, tiny_archives["v2"], model, "v2")
    try:
        # TorchServe refuses to drop the default while another version exists; the client says why.
        with pytest.raises(TorchServeAPIError) as refused:
            torchserve_client.unregister(model, "v1")
        assert refused.value.status is not None and 400 <= refused.value.status < 500

        torchserve_client.unregister(model, "v2")
        assert torchserve_client.versions(model) == ["v1"]
        assert torchserve_client.describe(model, "v2") == []
        assert torchserve_client.predict(model, {"text": "still here"}, version="v2").status == 404
        ok = torchserve_client.predict(model, {"text": "still here"})
        assert ok.status == 200 and ok.version == "v1"
        torchserve_client.unregister(model, "v2")  # idempotent
    finally:
        torchserve_client.unregister(model, "v2")
        torchserve_client.unregister(model, "v1")
    wait_until(lambda: torchserve_client.describe(model) == [], 30, f"{model} to be gone")


def test_registering_an_http_url_is_refused(torchserve_client: TorchServeClient) -> None:
    with pytest.raises(TorchServeAPIError, match="does not match any allowed URL") as refused:
        torchserve_client.register_url("http://127.0.0.1:9/tiny-v1.mar", "tiny-remote")
    assert refused.value.status == 404
    assert torchserve_client.describe("tiny-remote") == []


def test_the_management_api_listens_on_loopback_only(torchserve: LocalTorchServe) -> None:
    import psutil

    from ml_release.serving import local

    pid = local.status(torchserve.settings)["pid"]
    ports = {
        torchserve.settings.inference_port,
        torchserve.settings.management_port,
        torchserve.settings.metrics_port,
    }
    listening = [
        c.laddr
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in ports
    ]
    assert {addr.port for addr in listening} == ports
    # Java listens on a dual-stack socket, so 127.0.0.1 shows up as ::ffff:127.0.0.1.
    assert {_ipv4(addr.ip) for addr in listening} == {"127.0.0.1"}
    for address in non_loopback_addresses():
        with socket.socket(socket.AF_INET) as sock:
            sock.settimeout(1)
            assert sock.connect_ex((address, torchserve.settings.management_port)) != 0


def _ipv4(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def non_loopback_addresses() -> list[str]:
    import psutil

    return [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]


def test_status_reports_the_running_instance(torchserve: LocalTorchServe, two_versions: str) -> None:
    from ml_release.serving import local

    status = local.status(torchserve.settings)
    assert status["running"] and status["healthy"]
    assert {"name": two_versions, "versions": ["v1", "v2"], "default": "v1"} in [
        {**m, "versions": sorted(m["versions"])} for m in status["models"]
    ]


def test_the_worker_runs_the_ml_release_bundled_in_the_archive(torchserve: LocalTorchServe, two_versions: str) -> None:
    log = (torchserve.settings.log_dir / "model_log.log").read_text(encoding="utf-8", errors="replace")
    loaded = [line.rsplit("ml_release=", 1)[1] for line in log.splitlines() if "ml-release handler ready" in line]
    assert loaded
    home_tmp = str(torchserve.settings.home / "tmp" / "models")
    assert all(path.startswith(home_tmp) for path in loaded), loaded
