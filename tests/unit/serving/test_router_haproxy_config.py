from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ml_release.errors import SpecError
from ml_release.serving.router import (
    BACKEND_HEADER,
    CANARY,
    STABLE,
    LocalRouter,
    LocalRouterSettings,
    RouterError,
    RouteState,
    parse_map,
    render_config,
    render_weights_map,
    weights_from_map,
    whole_percent,
)

pytestmark = pytest.mark.unit

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")


def settings(tmp_path: Path) -> LocalRouterSettings:
    return LocalRouterSettings(
        state_dir=tmp_path / "state", log_dir=tmp_path / "logs", listen_port=18090, torchserve_inference_port=18080
    )


def test_the_canary_is_chosen_by_a_draw_below_its_weight_and_each_backend_rewrites_to_its_version(
    tmp_path: Path,
) -> None:
    cfg = render_config(settings(tmp_path), RouteState("tiny", "v1", "v2", 5))
    assert "bind 127.0.0.1:18090" in cfg
    assert "rand(100)" in cfg
    assert f"map({tmp_path / 'state' / 'weights.map'},0)" in cfg
    assert (
        "use_backend version_canary if { path /predictions/tiny } { var(txn.draw),sub(txn.canary_weight) lt 0 }" in cfg
    )
    assert "http-request set-path /predictions/tiny/v1" in cfg
    assert "http-request set-path /predictions/tiny/v2" in cfg
    assert f"http-after-response set-header {BACKEND_HEADER} canary" in cfg
    assert "server torchserve 127.0.0.1:18080" in cfg
    assert "option redispatch" not in cfg and " check" not in cfg


def test_without_a_canary_there_is_no_draw_and_no_canary_backend(tmp_path: Path) -> None:
    cfg = render_config(settings(tmp_path), RouteState("tiny", "v1", None))
    assert "rand(" not in cfg and "version_canary" not in cfg
    assert "use_backend version_stable if { path /predictions/tiny }" in cfg


def test_the_listener_and_admin_socket_are_local(tmp_path: Path) -> None:
    cfg = render_config(settings(tmp_path), RouteState("tiny", "v1", "v2"))
    binds = [line.split()[1] for line in cfg.splitlines() if line.strip().startswith("bind ")]
    assert binds == ["127.0.0.1:18090"]
    assert f"stats socket {tmp_path / 'state' / 'haproxy.sock'} mode 600 level admin" in cfg


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
@pytest.mark.parametrize(
    "state",
    [RouteState(), RouteState("tiny", "v1"), RouteState("tiny", "v1", "v2", 25)],
    ids=["empty", "stable-only", "with-canary"],
)
def test_haproxy_accepts_the_rendered_config(tmp_path: Path, state: RouteState) -> None:
    s = settings(tmp_path)
    s.state_dir.mkdir(parents=True)
    s.weights_map.write_text(render_weights_map(state))
    s.config_path.write_text(render_config(s, state))
    checked = subprocess.run([str(HAPROXY), "-c", "-f", str(s.config_path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "WARNING" not in checked.stdout + checked.stderr


def test_the_routing_id_ignores_the_weight_and_follows_the_versions() -> None:
    assert RouteState("tiny", "v1", "v2", 5).routing_id() == RouteState("tiny", "v1", "v2", 50).routing_id()
    assert RouteState("tiny", "v1", "v2").routing_id() != RouteState("tiny", "v1", "v3").routing_id()


def test_the_state_round_trips_through_json() -> None:
    state = RouteState("tiny", "v1", "v2", 25)
    assert RouteState.from_json(state.to_json()) == state


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"model": "tiny", "stable_version": "v1", "canary_version": "v1"}, "is the stable version"),
        ({"model": "tiny"}, "needs a stable version"),
        ({"stable_version": "v1"}, "without a model"),
        ({"model": "tiny", "stable_version": "v1", "canary_weight": 5}, "without a canary"),
        ({"model": "tiny", "stable_version": "v1", "canary_version": "v2", "canary_weight": 101}, "0..100"),
    ],
    ids=["canary-is-stable", "no-stable", "no-model", "weight-without-canary", "weight-too-high"],
)
def test_a_bad_route_state_is_refused(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(RouterError, match=problem):
        RouteState(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"model": "Tiny/..", "stable_version": "v1"}, {"model": "tiny", "stable_version": "v1 }"}],
    ids=["model", "version"],
)
def test_names_that_could_inject_config_are_refused(kwargs: dict[str, str]) -> None:
    with pytest.raises(SpecError):
        RouteState(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "expected"), [(0, 0), (5, 5), (25.0, 25), (100, 100)], ids=str)
def test_whole_percent_accepts_whole_percents(raw: float, expected: int) -> None:
    assert whole_percent(raw) == expected


@pytest.mark.parametrize("raw", [-1, 100.5, 2.5, True, "5"], ids=["negative", "over", "fraction", "bool", "str"])
def test_whole_percent_refuses_what_the_router_cannot_express(raw: object) -> None:
    with pytest.raises(RouterError):
        whole_percent(raw)  # type: ignore[arg-type]


def test_show_map_is_parsed_into_weights() -> None:
    entries = parse_map("0x55d4a0 canary 25\n\n")
    assert entries == {"canary": "25"}
    assert weights_from_map(entries, RouteState("tiny", "v1", "v2", 25)) == {STABLE: 75.0, CANARY: 25.0}
    assert weights_from_map({}, RouteState("tiny", "v1")) == {STABLE: 100.0}
    assert weights_from_map({}, RouteState()) == {}


def test_a_map_without_the_canary_entry_is_an_error_not_zero() -> None:
    with pytest.raises(RouterError, match="no integer"):
        weights_from_map({}, RouteState("tiny", "v1", "v2"))


def test_setting_a_weight_without_a_canary_is_refused(tmp_path: Path) -> None:
    router = LocalRouter(settings(tmp_path))
    with pytest.raises(RouterError, match="no canary is configured"):
        router.set_canary_weight(5)


def test_status_of_a_router_that_never_ran_does_not_raise(tmp_path: Path) -> None:
    status = LocalRouter(settings(tmp_path)).status()
    assert status["running"] is False
    assert status["desired"]["model"] is None
