from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml_release.errors import ServingError, SpecError
from ml_release.serving.torchserve import TorchServeAPIError, TorchServeClient, TorchServeConfig
from tests.support.services import free_port

pytestmark = pytest.mark.unit


def write_key_file(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "management": {"key": "mgmt-secret", "expiration time": "2030-01-01T00:00:00Z"},
                "inference": {"key": "inf-secret", "expiration time": "2030-01-01T00:00:00Z"},
                "API": {"key": "api-secret"},
            }
        )
    )
    return path


def unreachable_config() -> TorchServeConfig:
    # A port nothing listens on: connection refused, immediately.
    port = free_port()
    return TorchServeConfig(
        inference_url=f"http://127.0.0.1:{port}",
        management_url=f"http://127.0.0.1:{port}",
        metrics_url=None,
        inference_token="i",
        management_token="m",
        timeout_s=2,
    )


def test_config_reads_both_tokens_from_the_key_file(tmp_path: Path) -> None:
    config = TorchServeConfig.from_key_file(
        "http://127.0.0.1:1/", "http://127.0.0.1:2", write_key_file(tmp_path / "key_file.json")
    )
    assert config.inference_token == "inf-secret"
    assert config.management_token == "mgmt-secret"
    assert config.inference_url == "http://127.0.0.1:1"


def test_config_repr_never_shows_tokens(tmp_path: Path) -> None:
    config = TorchServeConfig.from_key_file(
        "http://127.0.0.1:1", "http://127.0.0.1:2", write_key_file(tmp_path / "key_file.json")
    )
    assert "secret" not in repr(config)


@pytest.mark.parametrize(
    "content",
    [None, "", '{"management": {"key": "m"}', '{"inference": {"key": "i"}}'],
    ids=["missing", "empty", "half-written", "no-management-key"],
)
def test_an_unusable_key_file_is_a_serving_error(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "key_file.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ServingError, match="key file"):
        TorchServeConfig.from_key_file("http://127.0.0.1:1", "http://127.0.0.1:2", path)


@pytest.mark.parametrize(
    ("model", "version"),
    [("sentiment", "../all"), ("sentiment", "r1/set-default"), ("../models", "r1"), ("sentiment", "r1?x=1")],
    ids=["traversal-version", "path-injection", "traversal-model", "query-injection"],
)
def test_names_are_checked_before_they_reach_a_url(model: str, version: str) -> None:
    client = TorchServeClient(unreachable_config())
    with pytest.raises(SpecError):
        client.predict(model, {"text": "x"}, version=version)
    with pytest.raises(SpecError):
        client.unregister(model, version)
    with pytest.raises(SpecError):
        client.set_default(model, version)


@pytest.mark.parametrize(
    "mar",
    ["http://example.com/a.mar", "/tmp/a.mar", "../a.mar", ""],
    ids=["url", "absolute-path", "relative-path", "empty"],
)
def test_register_takes_only_a_file_name_in_the_store(mar: str) -> None:
    with pytest.raises(ServingError, match="file name in the model store"):
        TorchServeClient(unreachable_config()).register(mar, "sentiment")


def test_ping_is_false_when_nothing_listens() -> None:
    assert TorchServeClient(unreachable_config()).ping() is False


def test_predict_raises_on_connection_failure() -> None:
    with pytest.raises(ServingError, match="ConnectionError"):
        TorchServeClient(unreachable_config()).predict("sentiment", {"text": "x"})


def test_management_call_raises_with_no_status_on_connection_failure() -> None:
    with pytest.raises(TorchServeAPIError) as info:
        TorchServeClient(unreachable_config()).list_models()
    assert info.value.status is None


def test_wait_ready_gives_up_at_its_deadline() -> None:
    with pytest.raises(TorchServeAPIError, match="no READY worker after"):
        TorchServeClient(unreachable_config()).wait_ready("sentiment", "r1", timeout_s=0.5)
