from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from ml_release.config import DataSpec, ReleaseSpec
from ml_release.data.split import (
    dataset_fingerprint,
    normalise_text,
    read_parquet_bytes,
    split_dataset,
    to_parquet_bytes,
)

pytestmark = pytest.mark.unit

LABELS = ("negative", "neutral", "positive")


@pytest.fixture(scope="module")
def spec() -> DataSpec:
    return ReleaseSpec.for_model("sentiment").data


def frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sentiment": [LABELS[i % 3] for i in range(rows)],
            "confidence": [0.5] * rows,
            "text": [f"Tweet {i}: the robot car drove me home" for i in range(rows)],
        }
    )


def with_salt(spec: DataSpec, salt: str) -> DataSpec:
    return dataclasses.replace(spec, split=dataclasses.replace(spec.split, salt=salt))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello   World", "hello world"),
        ("  padded\t\ttext \n", "padded text"),
        ("\uff26\uff35\uff2c\uff2c width", "full width"),
        ("Straße", "strasse"),
        ("\ufb01ne", "fine"),
        ("", ""),
    ],
    ids=["case-and-spaces", "tabs-newlines-edges", "fullwidth-nfkc", "casefold-eszett", "ligature", "empty"],
)
def test_normalise_text(text: str, expected: str) -> None:
    assert normalise_text(text) == expected


def test_split_has_three_frames_of_text_and_label(spec: DataSpec) -> None:
    splits = split_dataset(frame(300), spec)

    assert list(splits) == ["train", "validation", "test"]
    for part in splits.values():
        assert list(part.columns) == ["text", "label"]
        assert list(part.index) == list(range(len(part)))
    assert sum(len(part) for part in splits.values()) == 300


def test_split_is_deterministic(spec: DataSpec) -> None:
    first = split_dataset(frame(500), spec)
    second = split_dataset(frame(500), spec)

    for name in first:
        pd.testing.assert_frame_equal(first[name], second[name])


def test_a_row_keeps_its_split_whatever_the_rest_of_the_data(spec: DataSpec) -> None:
    full = split_dataset(frame(1000), spec)
    shuffled = split_dataset(frame(1000).sample(frac=1, random_state=3).iloc[:600], spec)

    for name in full:
        assert set(shuffled[name]["text"]) <= set(full[name]["text"])


def test_split_fractions_are_roughly_honoured(spec: DataSpec) -> None:
    rows = 20_000
    splits = split_dataset(frame(rows), spec)

    assert len(splits["test"]) / rows == pytest.approx(spec.split.test_fraction, abs=0.015)
    assert len(splits["validation"]) / rows == pytest.approx(spec.split.validation_fraction, abs=0.015)


def test_rows_keep_input_order_within_a_split(spec: DataSpec) -> None:
    df = frame(400)
    position = {text: i for i, text in enumerate(df["text"])}

    for part in split_dataset(df, spec).values():
        order = [position[text] for text in part["text"]]
        assert order == sorted(order)


def test_normalised_duplicates_are_collapsed_and_never_cross_splits(spec: DataSpec) -> None:
    base = frame(400)
    variants = base.assign(text=base["text"].str.upper().str.replace(" ", "   "))
    df = pd.concat([base, variants], ignore_index=True)

    splits = split_dataset(df, spec)

    keys = {name: {normalise_text(t) for t in part["text"]} for name, part in splits.items()}
    assert sum(len(part) for part in splits.values()) == 400
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    # The first spelling is the one kept.
    assert set(pd.concat(splits.values())["text"]) == set(base["text"])


def test_duplicates_with_conflicting_labels_are_all_dropped(spec: DataSpec) -> None:
    df = pd.DataFrame(
        {
            "sentiment": ["positive", "negative", "neutral", "neutral", "positive"],
            "confidence": [1.0] * 5,
            "text": ["Love it", "love  it", "It drives", "it DRIVES", "Fine car"],
        }
    )

    kept = pd.concat(split_dataset(df, spec).values())

    assert sorted(kept["text"]) == ["Fine car", "It drives"]
    assert dict(zip(kept["text"], kept["label"], strict=True)) == {
        "It drives": "neutral",
        "Fine car": "positive",
    }


def test_salt_reshuffles_the_split(spec: DataSpec) -> None:
    one = split_dataset(frame(500), spec)
    other = split_dataset(frame(500), with_salt(spec, "another-salt"))

    assert set(one["test"]["text"]) != set(other["test"]["text"])


def test_fingerprint_is_stable_and_changes_with_data_and_split_settings(spec: DataSpec) -> None:
    raw = b"sentiment,confidence,text\npositive,1.0,great car\n"
    base = dataset_fingerprint(raw, spec)

    assert base == dataset_fingerprint(raw, spec)
    assert len(base) == 64
    assert dataset_fingerprint(raw + b"negative,1.0,bad car\n", spec) != base
    assert dataset_fingerprint(raw, with_salt(spec, "ml-release-v2")) != base
    other_fraction = dataclasses.replace(spec.split, test_fraction=0.2)
    assert dataset_fingerprint(raw, dataclasses.replace(spec, split=other_fraction)) != base
    assert dataset_fingerprint(raw, dataclasses.replace(spec, labels=("negative", "positive"))) != base


def test_parquet_round_trip_keeps_rows_and_bytes_are_reproducible(spec: DataSpec) -> None:
    train = split_dataset(frame(200), spec)["train"]

    raw = to_parquet_bytes(train)

    assert raw == to_parquet_bytes(train)
    back = read_parquet_bytes(raw)
    assert list(back.columns) == ["text", "label"]
    assert back["text"].tolist() == train["text"].tolist()
    assert back["label"].tolist() == train["label"].tolist()
