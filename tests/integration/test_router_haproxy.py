"""The local traffic split: a real HAProxy in front of the real TorchServe from conftest."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ml_release.packaging.handler import ERROR_HEADER, INJECTED, NON_FINITE, VERSION_HEADER
from ml_release.serving.router import (
    BACKEND_HEADER,
    BACKEND_VERSION_HEADER,
    CANARY,
    STABLE,
    LocalRouter,
    LocalRouterSettings,
)
from ml_release.serving.torchserve import TorchServeClient
from tests.integration.conftest import TEST_SERVING, LocalTorchServe
from tests.support.services import free_port, port_open, wait_until

pytestmark = pytest.mark.integration

MODEL = "tiny-routed"
FAULTY = "v3-faulty"
FAULTS = {"error_rate": 0.3, "nan_rate": 0.2, "seed": 7}
REQUESTS_PER_WEIGHT = 400
CONFIDENCE = 0.999


def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact two-sided binomial interval for a share."""
    from scipy.stats import beta

    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


@pytest.fixture(scope="module")
def versions(
    torchserve: LocalTorchServe,
    torchserve_client: TorchServeClient,
    tiny_archives: dict[str, str],
    tiny_model_dir: Path,
) -> Iterator[str]:
    """``MODEL`` with v1 (stable), v2 (a good canary) and a canary built with faults."""
    from ml_release.packaging.archiver import build_archive

    faulty = build_archive(
        tiny_model_dir, MODEL, FAULTY, TEST_SERVING, torchserve.settings.model_store, max_length=32, faults=FAULTS
    ).name
    for version, mar in (("v1", tiny_archives["v1"]), ("v2", tiny_archives["v2"]), (FAULTY, faulty)):
        torchserve_client.register(mar, MODEL, timeout_s=180)
        torchserve_client.wait_ready(MODEL, version, timeout_s=180)
    yield MODEL
    for version in (FAULTY, "v2", "v1"):
        torchserve_client.unregister(MODEL, version)


@pytest.fixture(scope="module")
def router(torchserve: LocalTorchServe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRouter]:
    base = tmp_path_factory.mktemp("router")
    settings = LocalRouterSettings(
        state_dir=base / "state",
        log_dir=base / "logs",
        listen_port=free_port(),
        torchserve_inference_port=torchserve.settings.inference_port,
        server_timeout_s=60,
    )
    router = LocalRouter(settings)
    router.start()
    wait_until(lambda: port_open(settings.listen_port), 30, "the router's listening port")
    try:
        yield router
    finally:
        router.stop()


@pytest.fixture()
def session(torchserve: LocalTorchServe) -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.headers["Authorization"] = f"Bearer {torchserve.config.inference_token}"
        yield s


def post(session: requests.Session, router: LocalRouter, path: str, text: str = "I love this car") -> requests.Response:
    return session.post(f"{router.settings.url}{path}", json={"text": text}, timeout=30)


def served_by(resp: requests.Response, router: LocalRouter) -> str:
    """The role that served a response; the handler's and the proxy's version headers must agree."""
    role = resp.headers[BACKEND_HEADER]
    assert resp.headers[BACKEND_VERSION_HEADER] == resp.headers[VERSION_HEADER], dict(resp.headers)
    state = router.desired_state()
    assert resp.headers[VERSION_HEADER] == (state.canary_version if role == CANARY else state.stable_version)
    return role


def test_every_weight_gives_the_canary_its_share_of_the_production_url(
    router: LocalRouter, versions: str, session: requests.Session, tmp_path_factory: pytest.TempPathFactory
) -> None:
    router.configure(versions, "v1", "v2")
    measured: dict[int, float] = {}
    for weight in (0, 5, 25, 50, 100):
        assert router.set_canary_weight(weight) == weight
        assert router.effective_weights() == {STABLE: 100.0 - weight, CANARY: float(weight)}
        roles = []
        for i in range(REQUESTS_PER_WEIGHT):
            resp = post(session, router, f"/predictions/{versions}", f"request {i}")
            assert resp.status_code == 200, resp.text
            roles.append(served_by(resp, router))
        canary = roles.count(CANARY)
        measured[weight] = canary / REQUESTS_PER_WEIGHT
        low, high = clopper_pearson(canary, REQUESTS_PER_WEIGHT)
        assert low <= weight / 100 <= high, f"weight {weight} %: canary served {canary}/{REQUESTS_PER_WEIGHT}"
        if weight == 0:
            assert canary == 0
        if weight == 100:
            assert canary == REQUESTS_PER_WEIGHT
    out = tmp_path_factory.getbasetemp() / "router-canary-shares.json"
    out.write_text(json.dumps(measured))
    print(f"canary share per weight: {measured} ({out})")


def test_a_faulty_canary_answers_5xx_on_its_share_through_its_version_url(
    router: LocalRouter, versions: str, session: requests.Session
) -> None:
    router.configure(versions, "v1", FAULTY)
    kinds: list[str] = []
    for i in range(REQUESTS_PER_WEIGHT):
        resp = post(session, router, f"/predictions/{versions}/{FAULTY}", f"request {i}")
        assert resp.headers[VERSION_HEADER] == FAULTY
        if resp.status_code == 200:
            kinds.append("ok")
            continue
        assert resp.status_code >= 500, resp.text
        kind = resp.headers[ERROR_HEADER]
        assert resp.json()["kind"] == kind
        kinds.append(kind)
    injected, non_finite = kinds.count(INJECTED), kinds.count(NON_FINITE)
    low, high = clopper_pearson(injected, len(kinds))
    assert low <= FAULTS["error_rate"] <= high, f"injected 5xx on {injected}/{len(kinds)}"
    # NaN is drawn only on the rows that were not already failed.
    low, high = clopper_pearson(non_finite, len(kinds))
    assert low <= (1 - FAULTS["error_rate"]) * FAULTS["nan_rate"] <= high, f"NaN on {non_finite}/{len(kinds)}"


def test_errors_through_the_production_url_are_all_the_canarys(
    router: LocalRouter, versions: str, session: requests.Session
) -> None:
    router.configure(versions, "v1", FAULTY)
    assert router.set_canary_weight(50) == 50
    try:
        by_role: dict[str, list[int]] = {STABLE: [], CANARY: []}
        for i in range(200):
            resp = post(session, router, f"/predictions/{versions}", f"request {i}")
            by_role[served_by(resp, router)].append(resp.status_code)
        assert by_role[STABLE] and all(code == 200 for code in by_role[STABLE])
        assert any(code >= 500 for code in by_role[CANARY])
    finally:
        router.set_canary_weight(0)


def test_stable_keeps_serving_when_the_canary_is_unregistered_at_weight_0(
    router: LocalRouter,
    versions: str,
    session: requests.Session,
    torchserve_client: TorchServeClient,
    tiny_archives: dict[str, str],
) -> None:
    router.configure(versions, "v1", "v2")
    assert router.set_canary_weight(0) == 0
    torchserve_client.unregister(versions, "v2")
    try:
        wait_until(lambda: "v2" not in torchserve_client.versions(versions), 30, "v2 unregistered")
        for i in range(100):
            resp = post(session, router, f"/predictions/{versions}", f"request {i}")
            assert resp.status_code == 200, resp.text
            assert served_by(resp, router) == STABLE
        # Weight 100 on an unregistered canary is TorchServe's 404, attributed to the canary.
        assert router.set_canary_weight(100) == 100
        resp = post(session, router, f"/predictions/{versions}")
        assert resp.status_code == 404
        assert resp.headers[BACKEND_HEADER] == CANARY
        assert resp.headers[BACKEND_VERSION_HEADER] == "v2"
    finally:
        router.set_canary_weight(0)
        torchserve_client.register(tiny_archives["v2"], versions, timeout_s=180)
        torchserve_client.wait_ready(versions, "v2", timeout_s=180)


def test_the_client_token_goes_through_and_token_auth_stays_on_torchserve(
    router: LocalRouter, versions: str, session: requests.Session
) -> None:
    router.configure(versions, "v1", "v2")
    assert post(session, router, f"/predictions/{versions}").status_code == 200
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        refused = requests.post(
            f"{router.settings.url}/predictions/{versions}", json={"text": "hi"}, headers=headers, timeout=30
        )
        assert refused.status_code in (400, 401)  # TorchServe 0.12 answers 400 (InvalidKeyException)
        assert "Token Authorization failed" in refused.json()["message"]
        assert refused.headers[BACKEND_HEADER] in (STABLE, CANARY)
    assert requests.get(f"{router.settings.url}/models", timeout=10).status_code == 404  # not routed


def test_a_restarted_router_comes_back_with_the_last_weight(
    router: LocalRouter, versions: str, session: requests.Session
) -> None:
    router.configure(versions, "v1", "v2")
    assert router.set_canary_weight(25) == 25
    try:
        again = LocalRouter(router.settings)
        assert again.start().canary_weight == 25  # adopts the running proxy
        router.stop()
        assert not router.running()
        assert again.start().canary_weight == 25  # a fresh process from the state on disk
        assert again.effective_weights() == {STABLE: 75.0, CANARY: 25.0}
        assert post(session, router, f"/predictions/{versions}").status_code == 200
    finally:
        router.set_canary_weight(0)


def test_route_changes_under_live_traffic_drop_no_request(
    router: LocalRouter, versions: str, torchserve: LocalTorchServe
) -> None:
    """Promotion and rollback reload the proxy while production traffic flows; in master-worker
    mode the new worker takes the listening socket over, so no new connection is refused or reset."""
    import threading

    headers = {"Authorization": f"Bearer {torchserve.config.inference_token}", "Connection": "close"}
    url = f"{router.settings.url}/predictions/{versions}"
    outcomes: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                resp = requests.post(url, json={"text": "I love this car"}, headers=headers, timeout=30)
                outcomes.append(str(resp.status_code) if BACKEND_HEADER in resp.headers else f"{resp.status_code}?")
            except requests.RequestException as exc:
                outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()

    def ten_more(what: str) -> None:
        target = len(outcomes) + 10
        wait_until(lambda: len(outcomes) >= target, 60, what)

    try:
        for canary in ("v2", None, "v2", None, "v2", None, "v2", None):
            ten_more("traffic between reloads")
            router.configure(versions, "v1", canary)
        ten_more("traffic after the last reload")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    failed = [o for o in outcomes if o != "200"]
    assert len(outcomes) >= 90 and not failed, f"{len(failed)} of {len(outcomes)} failed: {sorted(set(failed))}"
