"""Exceptions of the core package.

Two families: ``...Error`` is a fault that may be transient or a bug (retried where the caller
says so); ``...Failed`` is a gate's verdict on evidence (never retried, always explained).
"""

from __future__ import annotations


class MLReleaseError(Exception):
    """Raised when anything in the core package fails; the base of every error here."""


class SpecError(MLReleaseError, ValueError):
    """Raised when a release spec or a run override is malformed; the message names the key."""


class InvalidURIError(MLReleaseError, ValueError):
    """Raised when an object-store URI is malformed or tries to escape its prefix."""


class StorageError(MLReleaseError):
    """Raised when the object store fails after bounded retries, or refuses a request."""


class ObjectExistsError(StorageError):
    """Raised when a create-only write (``If-None-Match: *``) finds the key already present."""


class PreconditionFailedError(StorageError):
    """Raised when a compare-and-swap write (``If-Match``) lost the race."""


class ObjectNotFoundError(StorageError):
    """Raised when an object that must exist does not."""


class ArtifactIntegrityError(MLReleaseError):
    """Raised when an artifact's bytes no longer match the sha256 in its registry record."""


class GateFailed(MLReleaseError):
    """Raised when a gate (validation, blessing, pre-traffic, accuracy, load) rejects a candidate.

    ``evidence_uri`` points at the report that explains the verdict.
    """

    def __init__(self, message: str, evidence_uri: str | None = None) -> None:
        super().__init__(message)
        self.evidence_uri = evidence_uri


class DataValidationFailed(GateFailed):
    """Raised when the input dataset fails its great-expectations suite or cannot be read."""


class BlessingFailed(GateFailed):
    """Raised when a trained model does not beat its floor, its baseline or production."""


class ServingError(MLReleaseError):
    """Raised when TorchServe refuses or fails a management or inference call."""
