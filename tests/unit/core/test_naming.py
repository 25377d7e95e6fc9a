from __future__ import annotations

import pytest

from ml_release.errors import InvalidURIError
from ml_release.naming import join_key, model_version_for_run, parse_s3_uri, run_key

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "uri",
    [
        "s3://ml-release/a/../b",
        "s3://ml-release/./a",
        "s3://ml-release/a//b",
        "http://x/y",
        "s3://UPPER/x",
        "s3://ml-release/a\x00b",
        "s3://ml-release/",
    ],
    ids=["dot-dot", "dot", "empty-segment", "http", "bad-bucket", "nul", "no-key"],
)
def test_parse_s3_uri_refuses_escapes(uri: str) -> None:
    with pytest.raises(InvalidURIError):
        parse_s3_uri(uri)


def test_parse_s3_uri_splits_bucket_and_key() -> None:
    assert parse_s3_uri("s3://ml-release/datasets/tweets/2026-12-04/tweets.csv") == (
        "ml-release",
        "datasets/tweets/2026-12-04/tweets.csv",
    )


def test_run_key_is_safe_deterministic_and_unique() -> None:
    a = run_key("train_model", "manual__2026-12-04T19:47:12.123+00:00")
    assert a == run_key("train_model", "manual__2026-12-04T19:47:12.123+00:00")
    assert a != run_key("train_model", "manual__2026-12-04T19:47:12.124+00:00")
    assert a != run_key("release_model", "manual__2026-12-04T19:47:12.123+00:00")
    join_key("runs", a)  # raises if unsafe
    assert run_key("d", "../../etc").count("..") == 0


def test_model_version_comes_from_the_run_not_the_bytes() -> None:
    v = model_version_for_run("train_model", "demo__1")
    assert v == model_version_for_run("train_model", "demo__1")
    assert v != model_version_for_run("train_model", "demo__2")
    assert v.startswith("r") and len(v) == 13


@pytest.mark.parametrize(
    "segment", ["..", "a/../b", "", "a b", "x;y"], ids=["dotdot", "nested", "empty", "space", "semicolon"]
)
def test_join_key_refuses_unsafe_segments(segment: str) -> None:
    with pytest.raises(InvalidURIError):
        join_key("runs", segment)
