"""Model variants the e2e tests release: built in code from production's own weights."""

from __future__ import annotations

from pathlib import Path


def permute_labels(model_dir: Path, out: Path) -> Path:
    """The classifier's label rows permuted [1, 2, 0]: a confident, wrong model, saved under ``out``."""
    import torch

    from ml_release.training.model import load_classifier

    model, tokenizer, _ = load_classifier(model_dir)
    perm = torch.tensor([1, 2, 0])
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[perm])
        model.classifier.bias.copy_(model.classifier.bias[perm])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
