"""Deterministic train / validation / test split, dataset fingerprint and Parquet round trips.

A row's split depends only on its normalised text and the spec's salt, never on row order,
randomness or the size of the drop: the same tweet lands in the same split in every drop, so a
re-run (or next month's larger drop) never leaks a test tweet into training.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import unicodedata

import pandas as pd

from ml_release.config import DataSpec

SPLITS = ("train", "validation", "test")
TEXT = "text"
LABEL = "label"

_WHITESPACE = re.compile(r"\s+")
_FINGERPRINT_VERSION = "ml-release-dataset-v1"
# 2**64 buckets: the first 16 hex digits of the digest read as a fraction in [0, 1).
_BUCKET_SCALE = float(1 << 64)


def normalise_text(text: str) -> str:
    """The form under which two texts count as the same tweet (NFKC, casefold, single spaces)."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def bucket_of(normalised: str, salt: str) -> float:
    """Where a normalised text falls in [0, 1): sha256(salt + text), read as a fraction."""
    digest = hashlib.sha256((salt + normalised).encode("utf-8")).hexdigest()
    return int(digest[:16], 16) / _BUCKET_SCALE


def split_dataset(df: pd.DataFrame, spec: DataSpec) -> dict[str, pd.DataFrame]:
    """Split validated data into ``train``, ``validation`` and ``test`` frames of (text, label).

    Exact duplicates after :func:`normalise_text` are collapsed first, keeping the first row; a
    group whose rows disagree on the label is dropped whole, since either label would teach the
    model something the data does not support. Rows keep their input order within each split.
    """
    frame = pd.DataFrame({TEXT: df[spec.text_column].astype("str"), LABEL: df[spec.label_column].astype("str")})
    # A null would become the string "nan" above; validation fails on nulls, so this only guards
    # a caller who skipped it.
    present = df[spec.text_column].notna() & df[spec.label_column].notna()
    frame = frame[present.to_numpy()]

    keys = frame[TEXT].map(normalise_text)
    labels_per_key = frame[LABEL].groupby(keys.to_numpy()).nunique()
    consistent = keys.map(labels_per_key).to_numpy() == 1
    first = ~keys.duplicated(keep="first").to_numpy()
    keep = consistent & first
    frame = frame[keep].reset_index(drop=True)
    keys = keys[keep].reset_index(drop=True)

    salt = spec.split.salt
    buckets = keys.map(lambda key: bucket_of(key, salt)).to_numpy(dtype=float)
    test_edge = spec.split.test_fraction
    validation_edge = test_edge + spec.split.validation_fraction
    masks = {
        "test": buckets < test_edge,
        "validation": (buckets >= test_edge) & (buckets < validation_edge),
        "train": buckets >= validation_edge,
    }
    return {name: frame[masks[name]].reset_index(drop=True) for name in SPLITS}


def dataset_fingerprint(raw: bytes, spec: DataSpec) -> str:
    """sha256 (hex) over the raw drop and every setting that changes what the split produces.

    Beyond the salt, fractions and labels, the encoding and the two column names are included:
    changing any of them changes the rows a model is trained on.
    """
    settings = {
        "version": _FINGERPRINT_VERSION,
        "salt": spec.split.salt,
        "validation_fraction": spec.split.validation_fraction,
        "test_fraction": spec.split.test_fraction,
        "labels": list(spec.labels),
        "encoding": spec.encoding,
        "text_column": spec.text_column,
        "label_column": spec.label_column,
    }
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    digest.update(b"\x00")
    digest.update(raw)
    return digest.hexdigest()


def to_parquet_bytes(df: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    df.to_parquet(buffer, engine="pyarrow", index=False)
    return buffer.getvalue()


def read_parquet_bytes(raw: bytes) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(raw), engine="pyarrow")
