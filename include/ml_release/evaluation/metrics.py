"""Offline classification metrics, in plain numpy so that they are cheap to test and to trust.

Conventions follow scikit-learn's with ``zero_division=0``: a class that is never predicted has
precision 0, a class absent from the truth has recall 0, and the macro average runs over every
label the model knows, so a collapsed model cannot hide a class it never predicts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np


def predict_proba(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 128,
) -> np.ndarray:
    """Class probabilities, shape ``(len(texts), num_labels)``, rows in the order of ``texts``.

    Batches are cut from the texts sorted by token length, so that each batch pads to about its
    own length instead of the longest text's; the rows are put back in input order at the end.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_labels = int(model.config.num_labels)
    if len(texts) == 0:
        return np.zeros((0, num_labels), dtype=np.float32)
    encoded: list[list[int]] = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out = np.empty((len(encoded), num_labels), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in rows)
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    seq = encoded[i]
                    ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[r, : len(seq)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
                out[np.asarray(rows)] = probs
    finally:
        model.train(was_training)
    return out


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix.

    ``y_true`` and ``y_pred`` hold label indices into ``labels``. The confusion matrix's rows are
    the true class, its columns the predicted class. Empty input raises: a metric computed on no
    evidence must never read as a pass.
    """
    true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    k = len(labels)
    if k < 1:
        raise ValueError("labels must not be empty")
    if true.size == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} items but y_pred has {pred.size}")
    for name, arr in (("y_true", true), ("y_pred", pred)):
        if arr.min() < 0 or arr.max() >= k:
            raise ValueError(f"{name} holds an index outside [0, {k})")

    confusion = np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    return {
        "n": int(true.size),
        "accuracy": float(tp.sum() / true.size),
        "macro_f1": float(f1.mean()),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": confusion.tolist(),
    }


def majority_baseline(train_labels: Sequence[str], test_labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy on ``test_labels`` of always predicting the train split's most common label.

    Ties go to the label that sorts first, so that the baseline does not depend on row order.
    """
    if len(train_labels) == 0 or len(test_labels) == 0:
        raise ValueError("majority_baseline needs non-empty train and test labels")
    counts = Counter(train_labels)
    label = min(counts, key=lambda lab: (-counts[lab], lab))
    hits = sum(1 for lab in test_labels if lab == label)
    return {"label": label, "accuracy": hits / len(test_labels)}
