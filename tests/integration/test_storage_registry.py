from __future__ import annotations

import pytest

from ml_release.errors import ArtifactIntegrityError, ObjectExistsError, PreconditionFailedError
from ml_release.packaging.registry import ModelRegistry

pytestmark = pytest.mark.integration


def test_create_only_write_never_overwrites(object_store, bucket: str) -> None:  # type: ignore[no-untyped-def]
    uri = f"s3://{bucket}/models/m/archives/r1.mar"
    object_store.put(uri, b"first", create_only=True)
    with pytest.raises(ObjectExistsError):
        object_store.put(uri, b"second", create_only=True)
    assert object_store.get_bytes(uri) == b"first"


def test_compare_and_swap_loses_to_a_concurrent_writer(object_store, bucket: str) -> None:  # type: ignore[no-untyped-def]
    uri = f"s3://{bucket}/registry/m/aliases/production.json"
    etag = object_store.put_json(uri, {"version": "a"}, create_only=True)
    object_store.put_json(uri, {"version": "b"}, if_match=etag)
    with pytest.raises(PreconditionFailedError):
        object_store.put_json(uri, {"version": "c"}, if_match=etag)
    assert object_store.get_json(uri) == {"version": "b"}


def _record(bucket: str, version: str = "r000000000001", sha: str = "a" * 64) -> dict[str, str]:
    return {
        "model_name": "sentiment",
        "model_version": version,
        "archive_uri": f"s3://{bucket}/models/sentiment/archives/{version}.mar",
        "sha256": sha,
    }


def test_registering_the_same_version_twice_gives_one_record(object_store, bucket: str) -> None:  # type: ignore[no-untyped-def]
    registry = ModelRegistry(object_store, f"s3://{bucket}/registry")
    first, created = registry.register_version(_record(bucket))
    again, created_again = registry.register_version(_record(bucket))
    assert (created, created_again) == (True, False)
    assert again == first
    keys = list(object_store.list_keys(f"s3://{bucket}/registry/sentiment/versions/"))
    assert len(keys) == 1


def test_a_different_artifact_under_an_existing_version_is_refused(object_store, bucket: str) -> None:  # type: ignore[no-untyped-def]
    registry = ModelRegistry(object_store, f"s3://{bucket}/registry")
    registry.register_version(_record(bucket))
    with pytest.raises(ArtifactIntegrityError, match="sha256"):
        registry.register_version(_record(bucket, sha="b" * 64))


def test_two_promotions_from_the_same_state_cannot_both_win(object_store, bucket: str) -> None:  # type: ignore[no-untyped-def]
    registry = ModelRegistry(object_store, f"s3://{bucket}/registry")
    assert registry.production("sentiment") is None
    first = registry.set_production("sentiment", "r000000000001", "release-1", None)
    seen = registry.production("sentiment")
    assert seen is not None and seen.version == "r000000000001"
    registry.set_production("sentiment", "r000000000002", "release-2", seen)
    with pytest.raises(PreconditionFailedError):
        registry.set_production("sentiment", "r000000000003", "release-3", seen)
    with pytest.raises(PreconditionFailedError):
        registry.set_production("sentiment", "r000000000004", "release-4", None)
    final = registry.production("sentiment")
    assert final is not None
    assert (final.version, final.previous_version) == ("r000000000002", first.version)
    assert [h["version"] for h in registry.history("sentiment")] == ["r000000000001", "r000000000002"]


def test_listing_the_bucket_root_lists_every_object(object_store, bucket: str) -> None:  # type: ignore[no-untyped-def]
    object_store.put(f"s3://{bucket}/a/b.json", b"{}")
    object_store.put(f"s3://{bucket}/c.json", b"{}")
    assert set(object_store.list_keys(f"s3://{bucket}/")) == {f"s3://{bucket}/a/b.json", f"s3://{bucket}/c.json"}
    assert list(object_store.list_keys(f"s3://{bucket}/a/")) == [f"s3://{bucket}/a/b.json"]


def test_a_presigned_url_gets_the_object_without_credentials(object_store, bucket: str) -> None:  # type: ignore[no-untyped-def]
    import requests

    uri = f"s3://{bucket}/reports/r1/report.html"
    object_store.put(uri, b"<html>report</html>", content_type="text/html; charset=utf-8")
    url = object_store.presigned_get_url(uri, expires_s=60)
    assert url.startswith("http") and "Signature" in url
    page = requests.get(url, timeout=10)  # a bare GET: no auth header, no boto3
    assert page.status_code == 200 and page.content == b"<html>report</html>"
    assert page.headers["Content-Type"].startswith("text/html")
