"""S3-compatible object storage through boto3 (AWS, MinIO, or moto's server locally).

Writes are transactions: ``put(..., create_only=True)`` sends ``If-None-Match: *`` so a re-run
can never overwrite (G15), and ``put(..., if_match=etag)`` is the compare-and-swap that records a
promotion (G27). Transient faults (throttling, 5xx, dropped connections) are retried a bounded
number of times by botocore's standard mode; 403, 404, 412 and bad digests are not (G18).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ml_release.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
)
from ml_release.naming import parse_s3_uri

_CHUNK = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class S3Config:
    """Where the object store is and how to reach it; credentials never leave this object."""

    endpoint_url: str | None = None
    region_name: str = "us-east-1"
    access_key_id: str | None = dataclasses.field(default=None, repr=False)
    secret_access_key: str | None = dataclasses.field(default=None, repr=False)
    max_attempts: int = 5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0

    @classmethod
    def from_env(cls) -> S3Config:
        """Read the standard AWS variables (the trainer pod gets them from a Kubernetes Secret)."""
        return cls(
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        )


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    etag: str
    metadata: dict[str, str]


class ObjectStore:
    """A thin, typed layer over one boto3 S3 client."""

    def __init__(self, config: S3Config | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.config = config or S3Config.from_env()
        self._client = boto3.client(
            "s3",
            endpoint_url=self.config.endpoint_url,
            region_name=self.config.region_name,
            aws_access_key_id=self.config.access_key_id,
            aws_secret_access_key=self.config.secret_access_key,
            config=Config(
                retries={"mode": "standard", "max_attempts": self.config.max_attempts},
                connect_timeout=self.config.connect_timeout_s,
                read_timeout=self.config.read_timeout_s,
                s3={"addressing_style": "path"},
            ),
        )

    @property
    def client(self) -> Any:
        return self._client

    # -- reads -------------------------------------------------------------------------------

    def head(self, uri: str) -> ObjectInfo | None:
        bucket, key = parse_s3_uri(uri)
        try:
            resp = self._client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if _status(exc) == 404:
                return None
            raise _storage_error(exc, f"HEAD {uri}") from exc
        return ObjectInfo(uri, int(resp["ContentLength"]), resp["ETag"], dict(resp.get("Metadata", {})))

    def exists(self, uri: str) -> bool:
        return self.head(uri) is not None

    def get_bytes(self, uri: str, max_bytes: int | None = None) -> bytes:
        bucket, key = parse_s3_uri(uri)
        try:
            resp = self._client.get_object(Bucket=bucket, Key=key)
            if max_bytes is not None and int(resp["ContentLength"]) > max_bytes:
                resp["Body"].close()
                raise StorageError(f"{uri} is {resp['ContentLength']} bytes, over the {max_bytes} limit")
            return bytes(resp["Body"].read())
        except StorageError:
            raise
        except Exception as exc:
            raise _storage_error(exc, f"GET {uri}") from exc

    def get_json(self, uri: str) -> Any:
        return json.loads(self.get_bytes(uri))

    def get_json_with_etag(self, uri: str) -> tuple[Any, str] | None:
        """Read a JSON object and the ETag to compare-and-swap it with; None when absent."""
        bucket, key = parse_s3_uri(uri)
        try:
            resp = self._client.get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if _status(exc) == 404:
                return None
            raise _storage_error(exc, f"GET {uri}") from exc
        return json.loads(resp["Body"].read()), resp["ETag"]

    def download(self, uri: str, path: Path) -> str:
        """Stream an object to ``path`` (written beside it, then renamed) and return its sha256."""
        bucket, key = parse_s3_uri(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        digest = hashlib.sha256()
        try:
            body = self._client.get_object(Bucket=bucket, Key=key)["Body"]
            with tmp.open("wb") as fh:
                for chunk in iter(lambda: body.read(_CHUNK), b""):
                    digest.update(chunk)
                    fh.write(chunk)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise _storage_error(exc, f"GET {uri}") from exc
        tmp.replace(path)
        return digest.hexdigest()

    def list_keys(self, prefix_uri: str) -> Iterator[str]:
        """Every object under ``prefix_uri``; ``s3://bucket/`` lists the whole bucket."""
        # Validate as if a name followed the prefix, so that an empty prefix is allowed.
        bucket, prefix = parse_s3_uri(prefix_uri + "x")
        prefix = prefix[:-1]
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield f"s3://{bucket}/{item['Key']}"
        except Exception as exc:
            raise _storage_error(exc, f"LIST {prefix_uri}") from exc

    # -- writes ------------------------------------------------------------------------------

    def put(
        self,
        uri: str,
        body: bytes,
        *,
        create_only: bool = False,
        if_match: str | None = None,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Write one object in a single PUT (never multipart, so nothing partial is left behind).

        ``create_only`` raises :class:`ObjectExistsError` if the key exists; ``if_match`` raises
        :class:`PreconditionFailedError` if the stored ETag changed. Returns the new ETag.
        """
        bucket, key = parse_s3_uri(uri)
        kwargs: dict[str, Any] = {
            "Bucket": bucket,
            "Key": key,
            "Body": body,
            "ContentType": content_type,
            "Metadata": metadata or {},
        }
        if create_only:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            return str(self._client.put_object(**kwargs)["ETag"])
        except Exception as exc:
            status = _status(exc)
            if status == 412 and create_only:
                raise ObjectExistsError(f"{uri} already exists") from exc
            if status in (409, 412):
                raise PreconditionFailedError(f"{uri} changed since it was read (ETag {if_match})") from exc
            raise _storage_error(exc, f"PUT {uri}") from exc

    def put_json(self, uri: str, obj: Any, **kwargs: Any) -> str:
        body = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        return self.put(uri, body, content_type="application/json", **kwargs)

    def put_file(self, uri: str, path: Path, **kwargs: Any) -> str:
        return self.put(uri, path.read_bytes(), **kwargs)

    def presigned_get_url(self, uri: str, expires_s: int = 3600) -> str:
        """A time-limited HTTPS (or, locally, HTTP) URL that GETs one object without credentials.

        Computed locally from the configured keys: no request is made, and no key is in the URL.
        """
        bucket, key = parse_s3_uri(uri)
        return str(
            self._client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(expires_s)
            )
        )

    def delete(self, uri: str) -> None:
        bucket, key = parse_s3_uri(uri)
        try:
            self._client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise _storage_error(exc, f"DELETE {uri}") from exc

    def ensure_bucket(self, bucket: str) -> None:
        try:
            self._client.head_bucket(Bucket=bucket)
            return
        except Exception as exc:
            if _status(exc) not in (404, 400):
                raise _storage_error(exc, f"HEAD bucket {bucket}") from exc
        try:
            self._client.create_bucket(Bucket=bucket)
        except Exception as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise _storage_error(exc, f"CREATE bucket {bucket}") from exc

    def incomplete_uploads(self, bucket: str) -> list[str]:
        """Keys with an unfinished multipart upload (tests assert there are none, G17)."""
        resp = self._client.list_multipart_uploads(Bucket=bucket)
        return [u["Key"] for u in resp.get("Uploads", [])]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def _storage_error(exc: Exception, what: str) -> StorageError:
    status = _status(exc)
    if status == 404:
        return ObjectNotFoundError(f"{what}: not found")
    detail = f"HTTP {status} {_code(exc)}" if status else f"{type(exc).__name__}: {exc}"
    return StorageError(f"{what} failed: {detail}")
