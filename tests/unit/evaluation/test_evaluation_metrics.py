from __future__ import annotations

import numpy as np
import pytest

from ml_release.evaluation.metrics import classification_metrics, majority_baseline, predict_proba

pytestmark = pytest.mark.unit

LABELS = ("negative", "neutral", "positive")


def test_classification_metrics_match_hand_computed_values_when_a_class_is_never_predicted() -> None:
    # rows = true class: negative -> (neg, neu), neutral -> (neu, neu), positive -> (neg, neg)
    metrics = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 0], LABELS)

    assert metrics["n"] == 6
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    per_class = metrics["per_class"]
    assert per_class["negative"] == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2})
    assert per_class["neutral"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    # Never predicted: zero, not NaN, and it still counts in the macro average.
    assert per_class["positive"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert metrics["macro_f1"] == pytest.approx((0.4 + 0.8 + 0.0) / 3)


def test_classification_metrics_average_over_every_label_even_one_absent_from_the_data() -> None:
    metrics = classification_metrics([0, 1, 0], [0, 1, 0], LABELS)

    assert metrics["accuracy"] == 1.0
    assert metrics["per_class"]["positive"]["support"] == 0
    assert metrics["macro_f1"] == pytest.approx(2 / 3)


def test_classification_metrics_are_perfect_on_perfect_predictions() -> None:
    metrics = classification_metrics([2, 0, 1, 2], [2, 0, 1, 2], LABELS)

    assert (metrics["accuracy"], metrics["macro_f1"]) == (1.0, 1.0)
    assert metrics["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 2]]


@pytest.mark.parametrize(
    ("y_true", "y_pred"),
    [([], []), ([0, 1], [0]), ([0, 3], [0, 1]), ([0, 1], [-1, 1])],
    ids=["empty", "length-mismatch", "true-out-of-range", "pred-negative"],
)
def test_classification_metrics_refuse_input_they_cannot_score(y_true: list[int], y_pred: list[int]) -> None:
    with pytest.raises(ValueError):
        classification_metrics(y_true, y_pred, LABELS)


@pytest.mark.parametrize(
    ("train", "test", "expected"),
    [
        (["neg", "neg", "pos"], ["neg", "pos", "pos", "neu"], {"label": "neg", "accuracy": 0.25}),
        (["pos", "neg", "neg", "pos"], ["pos", "neg"], {"label": "neg", "accuracy": 0.5}),
        (["neu"], ["pos"], {"label": "neu", "accuracy": 0.0}),
    ],
    ids=["majority-from-train-not-test", "tie-goes-to-first-sorted", "majority-absent-from-test"],
)
def test_majority_baseline_predicts_the_train_majority_on_test(
    train: list[str], test: list[str], expected: dict[str, object]
) -> None:
    assert majority_baseline(train, test) == expected


@pytest.mark.parametrize(("train", "test"), [([], ["a"]), (["a"], [])], ids=["empty-train", "empty-test"])
def test_majority_baseline_refuses_empty_labels(train: list[str], test: list[str]) -> None:
    with pytest.raises(ValueError):
        majority_baseline(train, test)


@pytest.fixture(scope="module")
def tiny_model() -> tuple[object, object]:
    from ml_release.training.model import tiny_classifier

    return tiny_classifier(LABELS, seed=3)


def test_predict_proba_restores_input_order_across_length_sorted_batches(tiny_model: tuple) -> None:
    model, tokenizer = tiny_model
    texts = [
        "a much longer text that needs many more tokens than the others do, by far",
        "short",
        "medium length text here",
        "ok",
        "another fairly long sentence about self-driving cars and trust",
    ]
    model.train()

    batched = predict_proba(model, tokenizer, texts, batch_size=2, max_length=32)
    one_by_one = np.vstack([predict_proba(model, tokenizer, [t], batch_size=1, max_length=32) for t in texts])

    assert batched.shape == (5, 3)
    np.testing.assert_allclose(batched.sum(axis=1), 1.0, rtol=1e-5)
    # Padding is masked, so each row equals the unpadded prediction of its own text.
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert model.training, "predict_proba must leave the model in the mode it found it"


def test_predict_proba_of_no_texts_is_an_empty_matrix(tiny_model: tuple) -> None:
    model, tokenizer = tiny_model

    assert predict_proba(model, tokenizer, []).shape == (0, 3)
