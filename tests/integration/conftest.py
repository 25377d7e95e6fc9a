from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml_release.config import ServingSpec
from ml_release.serving.local import LocalTorchServeSettings
from ml_release.serving.torchserve import TorchServeClient, TorchServeConfig
from tests.support.services import free_port

# One worker, one thread, no batching delay: the machine is small and shared.
TEST_SERVING = ServingSpec(batch_size=4, max_batch_delay_ms=5, workers=1, response_timeout_s=30, torch_threads=1)
TINY_LABELS = ("negative", "neutral", "positive")


@dataclasses.dataclass(frozen=True)
class LocalTorchServe:
    settings: LocalTorchServeSettings
    config: TorchServeConfig
    start_s: float


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTorchServe]:
    """A real TorchServe on free loopback ports, in its own directory; stopped after the session."""
    import time

    from ml_release.serving import local

    base = tmp_path_factory.mktemp("torchserve")
    settings = LocalTorchServeSettings(
        home=base / "home",
        model_store=base / "model-store",
        log_dir=base / "logs",
        inference_port=free_port(),
        management_port=free_port(),
        metrics_port=free_port(),
        grpc_inference_port=free_port(),
        grpc_management_port=free_port(),
    )
    started = time.monotonic()
    config = local.start(settings, timeout_s=120)
    try:
        yield LocalTorchServe(settings, config, time.monotonic() - started)
    finally:
        local.stop(settings)


@pytest.fixture(scope="session")
def torchserve_client(torchserve: LocalTorchServe) -> Iterator[TorchServeClient]:
    with TorchServeClient(torchserve.config) as client:
        yield client


@pytest.fixture(scope="session")
def tiny_archives(torchserve: LocalTorchServe, tiny_model_dir: Path) -> dict[str, str]:
    """Two versions of the tiny model in the model store: version -> file name to register."""
    from ml_release.packaging.archiver import build_archive

    return {
        version: build_archive(
            tiny_model_dir, "tiny", version, TEST_SERVING, torchserve.settings.model_store, max_length=32
        ).name
        for version in ("v1", "v2")
    }
