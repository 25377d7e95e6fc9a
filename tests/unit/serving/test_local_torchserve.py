from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from ml_release.errors import ServingError
from ml_release.serving.local import (
    LocalTorchServeSettings,
    allowed_urls_pattern,
    check_java,
    java_major_version,
    write_config,
)

pytestmark = pytest.mark.unit


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key] = value
    return props


@pytest.fixture()
def settings(tmp_path: Path) -> LocalTorchServeSettings:
    return LocalTorchServeSettings(
        home=tmp_path / "home",
        model_store=tmp_path / "store",
        log_dir=tmp_path / "logs",
        inference_port=18080,
        management_port=18081,
        metrics_port=18082,
    )


def test_config_binds_every_api_to_loopback(settings: LocalTorchServeSettings) -> None:
    props = read_properties(write_config(settings))
    assert props["inference_address"] == "http://127.0.0.1:18080"
    assert props["management_address"] == "http://127.0.0.1:18081"
    assert props["metrics_address"] == "http://127.0.0.1:18082"


def test_config_keeps_token_auth_on_and_enables_the_model_api(settings: LocalTorchServeSettings) -> None:
    props = read_properties(write_config(settings))
    assert props["disable_token_authorization"] == "false"
    assert int(props["token_expiration_min"]) >= 24 * 60
    assert props["enable_model_api"] == "true"
    assert props["enable_envvars_config"] == "false"
    assert props["install_py_dep_per_model"] == "false"
    assert props["default_workers_per_model"] == "1"
    assert props["disable_system_metrics"] == "true"
    assert props["model_store"] == str(settings.model_store.resolve())


def test_config_has_no_backslash_for_java_properties_to_eat(settings: LocalTorchServeSettings) -> None:
    assert "\\" not in write_config(settings).read_text()


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("file://{store}/sentiment-r1.mar", True),
        ("FILE://{store}/sentiment-r1.mar", True),  # TorchServe matches case-insensitively
        ("http://example.com/sentiment-r1.mar", False),
        ("https://bucket.s3.amazonaws.com/sentiment-r1.mar", False),
        ("file:///etc/passwd", False),
        ("file://{store}/sub/sentiment-r1.mar", False),
        ("file://{store}/../sentiment-r1.mar", False),
        ("file://{store}/sentiment-r1.zip", False),
        ("file://{store}x/sentiment-r1.mar", False),
        ("sentiment-r1.mar", False),  # a bare name must not match: TorchServe would try to download it
    ],
    ids=[
        "store-file",
        "upper-case-scheme",
        "http",
        "https",
        "other-file",
        "store-subdir",
        "store-parent",
        "not-a-mar",
        "sibling-dir-prefix",
        "bare-name",
    ],
)
def test_allowed_urls_only_match_archives_in_the_store(tmp_path: Path, url: str, allowed: bool) -> None:
    store = tmp_path / "my store-1.0+x"
    pattern = allowed_urls_pattern(store)
    # The character classes used are read the same by Java's and Python's regex engines.
    matched = re.fullmatch(pattern, url.format(store=store.resolve()), re.IGNORECASE) is not None
    assert matched is allowed


def test_a_store_path_with_a_comma_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ServingError, match="allowed_urls"):
        allowed_urls_pattern(tmp_path / "a,b")


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_392"', 8),
        ('openjdk version "11.0.22" 2024-01-16', 11),
        ("garbage", None),
    ],
    ids=["17", "21-no-minor", "legacy-1.8", "11", "unparseable"],
)
def test_java_version_is_parsed(output: str, major: int | None) -> None:
    assert java_major_version(output) == major


def fake_java_home(tmp_path: Path, version_line: str) -> Path:
    home = tmp_path / "jdk"
    (home / "bin").mkdir(parents=True)
    java = home / "bin" / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return home


def test_old_java_is_refused_with_install_advice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAVA_HOME", str(fake_java_home(tmp_path, 'openjdk version "11.0.22" 2024-01-16')))
    with pytest.raises(ServingError, match=r"found Java 11.*apt-get install openjdk-17-jre-headless"):
        check_java()


def test_missing_java_is_refused_with_install_advice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    with pytest.raises(ServingError, match=r"not found.*openjdk-17-jre-headless"):
        check_java()


def test_java_17_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAVA_HOME", str(fake_java_home(tmp_path, 'openjdk version "17.0.15" 2025-04-15')))
    check_java()
