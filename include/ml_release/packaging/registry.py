"""The model registry: JSON records in the bucket, written with S3 conditional requests.

Layout under ``<root>/<model>/``::

    versions/<version>.json     one immutable record per version (create-only, G15)
    aliases/production.json     which version serves; moved only by compare-and-swap (G27)
    history/<n>-<version>.json  one entry per promotion or rollback, never rewritten

A version record says where the archive is, its sha256, and the lineage that earned it a
release: dataset fingerprint, validation summary, training metrics, blessing. Nothing is ever
overwritten: a second write of the same version is accepted only if it says the same thing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from ml_release.errors import ArtifactIntegrityError, ObjectExistsError, PreconditionFailedError
from ml_release.naming import check_model_name, check_version, join_key, parse_s3_uri
from ml_release.storage import ObjectStore

# Fields that identify an artifact: a re-registration must agree on them or it is refused.
_IDENTITY = ("model_name", "model_version", "archive_uri", "sha256")


@dataclasses.dataclass(frozen=True)
class ProductionAlias:
    version: str
    previous_version: str | None
    release_id: str
    updated_at: str
    etag: str

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("etag")
        return data


class ModelRegistry:
    def __init__(self, store: ObjectStore, root_uri: str) -> None:
        parse_s3_uri(root_uri.rstrip("/") + "/x")
        self.store = store
        self.root_uri = root_uri.rstrip("/")

    def _uri(self, model: str, *parts: str) -> str:
        check_model_name(model)
        return f"{self.root_uri}/{join_key(model, *parts)}"

    def version_uri(self, model: str, version: str) -> str:
        return self._uri(model, "versions", f"{check_version(version)}.json")

    def alias_uri(self, model: str) -> str:
        return self._uri(model, "aliases", "production.json")

    # -- versions ----------------------------------------------------------------------------

    def get_version(self, model: str, version: str) -> dict[str, Any] | None:
        found = self.store.get_json_with_etag(self.version_uri(model, version))
        return None if found is None else found[0]

    def register_version(self, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create a version record; returns ``(record, created)``.

        A repeat with the same identity returns the stored record (``created`` False); a repeat
        that disagrees on archive or sha256 is an integrity error, never an overwrite.
        """
        missing = [k for k in _IDENTITY if not record.get(k)]
        if missing:
            raise ValueError(f"registry record lacks {missing}")
        record = {"registered_at": _now(), **record}
        uri = self.version_uri(record["model_name"], record["model_version"])
        try:
            self.store.put_json(uri, record, create_only=True)
            return record, True
        except ObjectExistsError:
            stored = self.get_version(record["model_name"], record["model_version"])
            assert stored is not None
            diff = [k for k in _IDENTITY if stored.get(k) != record.get(k)]
            if diff:
                raise ArtifactIntegrityError(
                    f"{uri} already records a different artifact ({', '.join(diff)} differ)"
                ) from None
            return stored, False

    # -- production alias ---------------------------------------------------------------------

    def production(self, model: str) -> ProductionAlias | None:
        found = self.store.get_json_with_etag(self.alias_uri(model))
        if found is None:
            return None
        data, etag = found
        return ProductionAlias(
            version=data["version"],
            previous_version=data.get("previous_version"),
            release_id=data["release_id"],
            updated_at=data["updated_at"],
            etag=etag,
        )

    def set_production(
        self, model: str, version: str, release_id: str, expected: ProductionAlias | None
    ) -> ProductionAlias:
        """Move the production alias to ``version`` if nobody moved it since ``expected`` was read.

        Raises :class:`PreconditionFailedError` when another release won the race.
        """
        alias = {
            "version": check_version(version),
            "previous_version": expected.version if expected else None,
            "release_id": release_id,
            "updated_at": _now(),
        }
        uri = self.alias_uri(model)
        try:
            if expected is None:
                etag = self.store.put_json(uri, alias, create_only=True)
            else:
                etag = self.store.put_json(uri, alias, if_match=expected.etag)
        except ObjectExistsError as exc:
            raise PreconditionFailedError(f"{uri}: another release promoted first") from exc
        self.append_history(model, {"event": "promote", **alias})
        return ProductionAlias(etag=etag, **alias)  # type: ignore[arg-type]

    def append_history(self, model: str, entry: dict[str, Any]) -> str:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        version = check_version(str(entry.get("version", "none")))
        uri = self._uri(model, "history", f"{stamp}-{entry.get('event', 'event')}-{version}.json")
        self.store.put_json(uri, {"recorded_at": _now(), **entry}, create_only=True)
        return uri

    def history(self, model: str) -> list[dict[str, Any]]:
        prefix = self._uri(model, "history") + "/"
        return [self.store.get_json(uri) for uri in sorted(self.store.list_keys(prefix))]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
