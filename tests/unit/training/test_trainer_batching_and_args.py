from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pytest

from ml_release.errors import SpecError
from ml_release.training.trainer import (
    EncodedSplit,
    collate,
    length_bucketed_batches,
    linear_schedule,
    padding_efficiency,
    parse_args,
)

pytestmark = pytest.mark.unit

PROFILE: dict[str, Any] = {
    "max_train_samples": 100,
    "max_eval_samples": 50,
    "epochs": 1.0,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_length": 32,
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "warmup_ratio": 0.1,
    "num_threads": 1,
    "precision": "fp32",
    "compile": False,
    "log_every_steps": 5,
    "seed": 1,
}


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Tweet-like token lengths: most short, a long tail up to the truncation limit."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=3.0, sigma=0.6, size=n).astype(int), 3, 128).tolist()


@pytest.mark.parametrize(
    ("n", "batch_size"),
    [(5000, 32), (1003, 16), (7, 32), (64, 1)],
    ids=["large", "ragged-last-batch", "fewer-rows-than-a-batch", "batch-of-one"],
)
def test_length_bucketing_covers_every_sample_exactly_once(n: int, batch_size: int) -> None:
    batches = length_bucketed_batches(skewed_lengths(n), batch_size, seed=4)

    assert Counter(i for batch in batches for i in batch) == Counter(range(n))
    assert all(1 <= len(batch) <= batch_size for batch in batches)


@pytest.mark.parametrize(
    ("n", "batch_size"),
    [(5000, 32), (1003, 16), (2000, 128), (64, 1)],
    ids=["large", "ragged-last-batch", "large-batches", "batch-of-one"],
)
def test_length_bucketing_keeps_real_to_padded_tokens_at_least_0_7(n: int, batch_size: int) -> None:
    lengths = skewed_lengths(n)

    batches = length_bucketed_batches(lengths, batch_size, seed=4)

    assert padding_efficiency(lengths, batches) >= 0.7


def test_length_bucketing_beats_random_batches_on_skewed_lengths() -> None:
    lengths = skewed_lengths(5000)
    order = np.random.default_rng(0).permutation(5000).tolist()
    random_batches = [order[i : i + 32] for i in range(0, 5000, 32)]

    bucketed = padding_efficiency(lengths, length_bucketed_batches(lengths, 32, seed=0))

    assert padding_efficiency(lengths, random_batches) < 0.6 < 0.7 <= bucketed


def test_length_bucketing_is_seeded_and_does_not_order_batches_by_length() -> None:
    lengths = skewed_lengths(3000)

    first = length_bucketed_batches(lengths, 32, seed=7)
    again = length_bucketed_batches(lengths, 32, seed=7)
    other = length_bucketed_batches(lengths, 32, seed=8)

    assert first == again
    assert first != other
    widths = [max(lengths[i] for i in batch) for batch in first]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


def test_collate_pads_to_the_longest_row_and_masks_the_padding() -> None:
    split = EncodedSplit(input_ids=[[101, 7, 102], [101, 102], [101, 5, 6, 7, 102]], labels=[2, 0, 1])

    ids, mask, labels = collate(split, [1, 0], pad_id=0)

    assert ids.tolist() == [[101, 102, 0], [101, 7, 102]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert labels.tolist() == [0, 2]


def test_linear_schedule_warms_up_then_decays_to_zero() -> None:
    factor = linear_schedule(warmup_steps=4, total_steps=12)

    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0
    assert factor(8) == 0.5
    assert factor(12) == 0.0


def cli(**overrides: Any) -> list[str]:
    args = {
        "--train-uri": "s3://bucket-a/run/data/train.parquet",
        "--validation-uri": "s3://bucket-a/run/data/validation.parquet",
        "--output-uri": "s3://bucket-a/run/model",
        "--labels": "negative,neutral,positive",
        "--base-model": "all-MiniLM-L6-v2",
        "--profile-json": json.dumps(PROFILE),
    }
    args.update({k: v for k, v in overrides.items() if v is not None})
    return [part for pair in args.items() for part in pair] + ["--tiny"]


def test_parse_args_builds_a_typed_config_with_a_normalised_output_prefix() -> None:
    config = parse_args(cli())

    assert config.output_uri == "s3://bucket-a/run/model/"
    assert config.marker_uri == "s3://bucket-a/run/model/_SUCCESS"
    assert config.labels == ("negative", "neutral", "positive")
    assert config.profile.batch_size == 8
    assert config.tiny


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"--profile-json": json.dumps({**PROFILE, "lr": 1})}, "unknown key"),
        ({"--profile-json": json.dumps({k: v for k, v in PROFILE.items() if k != "seed"})}, "seed: missing"),
        ({"--profile-json": json.dumps({**PROFILE, "batch_size": "8"})}, "batch_size"),
        ({"--profile-json": json.dumps({**PROFILE, "batch_size": 0})}, "batch_size"),
        ({"--profile-json": json.dumps({**PROFILE, "precision": "fp16"})}, "precision"),
        ({"--profile-json": "{not json"}, "not valid JSON"),
        ({"--labels": "negative"}, "--labels"),
        ({"--labels": "a,b,a"}, "--labels"),
        ({"--output-uri": "s3://bucket-a/run/../other"}, "'..'"),
        ({"--train-uri": "/local/train.parquet"}, "s3://"),
    ],
    ids=[
        "unknown-profile-key",
        "missing-profile-key",
        "wrongly-typed-profile-value",
        "zero-batch-size",
        "unknown-precision",
        "profile-not-json",
        "one-label",
        "duplicate-label",
        "output-escapes-prefix",
        "train-not-s3",
    ],
)
def test_parse_args_refuses_bad_configuration_naming_the_field(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_args(cli(**overrides))


def test_parse_args_refuses_an_unknown_base_model_before_any_work() -> None:
    args = [a for a in cli(**{"--base-model": "no-such-model"}) if a != "--tiny"]

    with pytest.raises(SpecError, match="base_model"):
        parse_args(args)
