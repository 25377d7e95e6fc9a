"""Fine-tune the sentiment classifier and commit it to the object store atomically.

The same command runs as a local process (the default backend) and as the container command of a
Kubernetes training pod::

    python -m ml_release.training.trainer \\
        --train-uri s3://bucket/run/data/train.parquet \\
        --validation-uri s3://bucket/run/data/validation.parquet \\
        --output-uri s3://bucket/run/model/ \\
        --labels negative,neutral,positive \\
        --base-model all-MiniLM-L6-v2 \\
        --profile-json '{"max_train_samples": 6000, ...}' \\
        [--tiny] [--xcom-path /airflow/xcom/return.json]

Input parquet files hold the columns ``text`` and ``label`` (strings).

Commit protocol (G12, G14). Every attempt writes its files under a fresh prefix
``<output>/attempt-<12 hex>/`` with create-only PUTs, then writes the marker
``<output>/_SUCCESS`` last, also create-only. The marker holds ``model_uri`` (the attempt prefix),
``files`` (name -> sha256) and ``metrics``; readers trust nothing without it. A run that finds the
marker logs "already exists, skipping", checks it and reports it without training; a run that loses
the race for the marker reports the winner's. Abandoned attempt prefixes are unreferenced garbage,
never a half-visible model.

Result: the last line on stdout is ``ML_RELEASE_RESULT {"model_uri", "marker_uri", "metrics"}``;
with ``--xcom-path`` the same JSON is written there (the KubernetesPodOperator's XCom sidecar reads
``/airflow/xcom/return.json``). Logs go to stderr.

Several GPUs: under ``torchrun`` (``WORLD_SIZE > 1``) every rank trains on its shard of the
length-bucketed batches through DistributedDataParallel (NCCL on CUDA, gloo on CPU); rank 0 alone
evaluates, commits and prints the result. Throughput is logged as samples/s, tokens/s and an
estimate of model FLOP utilisation: 6 x parameters x tokens/s over the device's peak FLOP/s
(``ML_RELEASE_PEAK_FLOPS``, else a table of known GPUs; unknown on a CPU).

Exit codes (the Kubernetes backend classifies them for retries, G13):

* ``0`` the model is committed (now or by an earlier run);
* ``2`` bad arguments or configuration (argparse errors, unknown profile keys, bad URIs, an unknown
  base model): retrying cannot help;
* ``3`` bad input data (missing object, unreadable parquet, missing columns, unknown labels, no
  rows): retrying cannot help;
* ``1`` anything else (storage faults, out of memory, bugs): the caller decides whether to retry.

The process ends with ``os._exit`` once its streams are flushed, so that no library's C++ static
destructor can turn a finished run into a SIGABRT after the fact (pyarrow's parquet thread pool
does, now and then: apache/arrow#34314); the exit code is the contract above.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ml_release.config import TrainingProfile, build, to_plain
from ml_release.errors import (
    ArtifactIntegrityError,
    InvalidURIError,
    MLReleaseError,
    ObjectExistsError,
    ObjectNotFoundError,
    SpecError,
)
from ml_release.naming import parse_s3_uri

if TYPE_CHECKING:
    import torch

    from ml_release.storage import ObjectStore

log = logging.getLogger("ml_release.trainer")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_CONFIG = 2
EXIT_BAD_DATA = 3

RESULT_PREFIX = "ML_RELEASE_RESULT "
MARKER_NAME = "_SUCCESS"
METRICS_NAME = "metrics.json"
TEXT_COLUMN = "text"
LABEL_COLUMN = "label"

# Names listed in a marker become local paths in download_model: a tampered marker must not be
# able to write outside the destination directory.
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Length bucketing sorts within chunks of this many batches: enough to group similar lengths,
# few enough that batches still mix examples from across the epoch.
BUCKET_CHUNK_BATCHES = 50


class TrainingDataError(MLReleaseError, ValueError):
    """Raised when a training or validation split is missing, unreadable or violates its schema."""


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Validated command-line arguments."""

    train_uri: str
    validation_uri: str
    output_uri: str  # normalised to end with "/"
    labels: tuple[str, ...]
    base_model: str
    profile: TrainingProfile
    tiny: bool = False
    xcom_path: Path | None = None

    @property
    def marker_uri(self) -> str:
        return self.output_uri + MARKER_NAME


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
    """A tokenized split: unpadded token ids and label indices, row for row."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Distributed:
        import os

        env = os.environ if env is None else env
        return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


# Dense bf16 peak FLOP/s of GPUs the trainer knows, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
}


def peak_flops(device_name: str | None, env: Mapping[str, str] | None = None) -> float | None:
    """The peak FLOP/s to report utilisation against: ``ML_RELEASE_PEAK_FLOPS``, a known GPU, or None."""
    import os

    env = os.environ if env is None else env
    if env.get("ML_RELEASE_PEAK_FLOPS"):
        return float(env["ML_RELEASE_PEAK_FLOPS"])
    if not device_name:
        return None
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def model_flops_utilisation(params: int, tokens_per_s: float, peak: float | None) -> float | None:
    """6 x parameters x tokens/s (forward + backward of a dense model) over ``peak``; None if unknown."""
    if not peak:
        return None
    return 6.0 * params * tokens_per_s / peak


@dataclasses.dataclass(frozen=True)
class LoopStats:
    train_loss: float
    steps: int
    micro_batches: int
    samples: int
    real_tokens: int
    padded_tokens: int
    wall_s: float


# -- the public helpers readers use ---------------------------------------------------------------


def read_committed_model(store: ObjectStore, output_uri: str) -> dict[str, Any] | None:
    """Return the commit marker under ``output_uri``, or None if nothing is committed there.

    The marker is checked before it is returned: its ``model_uri`` must lie under ``output_uri``
    and every listed file must have a safe name and a sha256. A marker that fails is an
    :class:`ArtifactIntegrityError`, never None, because a silent "not committed" would let a
    re-run train and race the damaged commit.
    """
    output = _normalise_prefix(output_uri)
    marker_uri = output + MARKER_NAME
    if store.head(marker_uri) is None:
        return None
    try:
        marker = store.get_json(marker_uri)
    except ValueError as exc:
        raise ArtifactIntegrityError(f"{marker_uri} is not valid JSON: {exc}") from exc
    _check_marker(marker, output, marker_uri)
    return dict(marker)


def download_model(store: ObjectStore, marker: dict[str, Any], dest: Path) -> Path:
    """Download every file a marker lists into ``dest`` and check each one's sha256.

    Raises :class:`ArtifactIntegrityError` (and removes the bad file) on any mismatch.
    """
    model_uri = str(marker["model_uri"])
    files: dict[str, str] = dict(marker["files"])
    dest.mkdir(parents=True, exist_ok=True)
    for name, expected in sorted(files.items()):
        if not _FILE_NAME.match(name):
            raise ArtifactIntegrityError(f"marker lists an unsafe file name {name!r}")
        path = dest / name
        actual = store.download(model_uri + name, path)
        if actual != expected:
            path.unlink(missing_ok=True)
            raise ArtifactIntegrityError(f"{model_uri}{name}: sha256 {actual} does not match the marker's {expected}")
    return dest


# -- batching --------------------------------------------------------------------------------------


def length_bucketed_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    chunk_batches: int = BUCKET_CHUNK_BATCHES,
) -> list[list[int]]:
    """One epoch of batches (lists of row indices) that pad little and still look random.

    Rows are shuffled, cut into chunks of ``chunk_batches`` batches, sorted by length inside each
    chunk and cut into batches; the batch order is then shuffled so that the model does not see
    short texts first and long texts last. Every row appears exactly once.
    """
    import numpy as np

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)).tolist()
    chunk = batch_size * max(1, chunk_batches)
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        rows = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches.extend(rows[b : b + batch_size] for b in range(0, len(rows), batch_size))
    perm = rng.permutation(len(batches)).tolist()
    return [batches[i] for i in perm]


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens divided by the tokens the padded batches hold (1.0 means no padding)."""
    real = sum(lengths[i] for batch in batches for i in batch)
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return real / padded if padded else 1.0


def collate(split: EncodedSplit, rows: Sequence[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad one batch to its own longest row: (input_ids, attention_mask, labels)."""
    import torch

    width = max(len(split.input_ids[i]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        seq = split.input_ids[i]
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[r, : len(seq)] = 1
    labels = torch.tensor([split.labels[i] for i in rows], dtype=torch.long)
    return ids, mask, labels


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            # step + 1 so that the first optimizer step does not run with a learning rate of 0.
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


# -- the training loop -----------------------------------------------------------------------------


def train_loop(
    model: Any,
    split: EncodedSplit,
    profile: TrainingProfile,
    device: torch.device,
    pad_id: int,
    dist: Distributed | None = None,
    peak: float | None = None,
) -> LoopStats:
    """Fine-tune ``model`` in place on ``split`` and return what the loop measured.

    Everything that a DistributedDataParallel version would change lives here: the batches each
    rank sees (shard the list from :func:`length_bucketed_batches`), the wrapped model, and the
    reduction of the loss and throughput counters.
    """
    import contextlib

    import torch

    dist = dist or Distributed()
    accum = profile.gradient_accumulation_steps
    batches_per_epoch = math.ceil(len(split) / profile.batch_size)
    # Every rank runs the same number of micro-batches (DDP's all-reduce needs each rank to
    # take part in every step); together they cover the epochs the profile asks for.
    total_micro = max(1, round(profile.epochs * batches_per_epoch) // dist.world_size)
    total_steps = math.ceil(total_micro / accum)
    warmup_steps = max(1, math.ceil(profile.warmup_ratio * total_steps))

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    # Biases and LayerNorm gains are not weights to shrink: decaying them only hurts.
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": profile.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=profile.learning_rate,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup_steps, total_steps))
    use_bf16 = profile.precision == "bf16" and device.type == "cuda"
    n_params = sum(p.numel() for p in model.parameters())
    wrapped = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(wrapped) if profile.compile else wrapped

    log.info(
        "training: %d samples, %d micro-batches of %d per rank x %d rank(s), %d optimizer steps (accumulation %d), "
        "warmup %d, device %s, %s",
        len(split),
        total_micro,
        profile.batch_size,
        dist.world_size,
        total_steps,
        accum,
        warmup_steps,
        device,
        "bf16 autocast" if use_bf16 else "fp32",
    )

    def batches() -> Iterator[list[int]]:
        epoch = 0
        while True:
            # The same seed on every rank: the same batch list, of which each rank takes its share.
            epoch_batches = length_bucketed_batches(split.lengths, profile.batch_size, profile.seed + epoch)
            yield from epoch_batches[dist.rank :: dist.world_size]
            epoch += 1

    model.train()
    optimizer.zero_grad(set_to_none=True)
    lengths = split.lengths
    loss_sum = 0.0  # sample-weighted, for the final running mean
    window_loss, window_n = 0.0, 0
    samples = real_tokens = padded_tokens = 0
    step = 0
    micro = 0
    start = time.perf_counter()
    pending: torch.Tensor | None = None
    for micro, rows in enumerate(batches(), start=1):
        ids, mask, labels = collate(split, rows, pad_id)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        boundary = micro % accum == 0 or micro == total_micro
        # Between accumulation boundaries DDP need not all-reduce gradients: only the last one counts.
        sync = contextlib.nullcontext() if boundary or not dist.enabled else wrapped.no_sync()
        with sync:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = forward(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            (loss / accum).backward()
        # Accumulated on the device: a .item() every batch would force a sync on a GPU.
        pending = loss.detach() * len(rows) if pending is None else pending + loss.detach() * len(rows)
        samples += len(rows)
        real_tokens += sum(lengths[i] for i in rows)
        padded_tokens += ids.numel()
        window_n += len(rows)

        if boundary:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % profile.log_every_steps == 0 or step == total_steps:
                assert pending is not None
                pending_sum = float(pending.item())
                loss_sum += pending_sum
                window_loss += pending_sum
                pending = None
                elapsed = time.perf_counter() - start
                tokens_per_s = real_tokens * dist.world_size / elapsed
                mfu = model_flops_utilisation(n_params, tokens_per_s, peak)
                log.info(
                    "step %d/%d epoch %.2f loss %.4f lr %.2e %.1f samples/s %.0f tokens/s MFU %s "
                    "elapsed %.0fs eta %.0fs",
                    step,
                    total_steps,
                    micro * dist.world_size / batches_per_epoch,
                    window_loss / max(1, window_n),
                    scheduler.get_last_lr()[0],
                    samples * dist.world_size / elapsed,
                    tokens_per_s,
                    "unknown" if mfu is None else f"{mfu:.3f}",
                    elapsed,
                    elapsed / step * (total_steps - step),
                )
                window_loss, window_n = 0.0, 0
        if micro >= total_micro:
            break
    if pending is not None:
        loss_sum += float(pending.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if dist.enabled:
        import torch.distributed as torch_dist

        totals = torch.tensor([loss_sum, samples, real_tokens, padded_tokens], dtype=torch.float64, device=device)
        torch_dist.all_reduce(totals)
        loss_sum, samples, real_tokens, padded_tokens = totals.tolist()
        samples, real_tokens, padded_tokens = int(samples), int(real_tokens), int(padded_tokens)
    return LoopStats(
        train_loss=loss_sum / max(1, samples),
        steps=step,
        micro_batches=micro,
        samples=samples,
        real_tokens=real_tokens,
        padded_tokens=padded_tokens,
        wall_s=wall,
    )


# -- the run ---------------------------------------------------------------------------------------


def run(config: TrainerConfig, store: ObjectStore) -> dict[str, Any]:
    """Train and commit, or find the earlier commit; returns the result the CLI prints."""
    existing = read_committed_model(store, config.output_uri)
    if existing is not None:
        log.info("%s already exists, skipping: model %s", config.marker_uri, existing["model_uri"])
        _check_files_exist(store, existing)
        return _result(config, existing)

    started = time.perf_counter()
    train_df = _read_split(store, config.train_uri, config.labels, "train")
    val_df = _read_split(store, config.validation_uri, config.labels, "validation")
    marker = _train_and_commit(config, store, train_df, val_df, started)
    if not marker:  # a torchrun rank other than 0: rank 0 reports
        return {}
    return _result(config, marker)


def _train_and_commit(
    config: TrainerConfig, store: ObjectStore, train_df: Any, val_df: Any, started: float
) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # bars redraw with \r: noise in a pod's log

    profile = config.profile
    torch.set_num_threads(profile.num_threads)
    torch.manual_seed(profile.seed)
    np.random.seed(profile.seed)
    dist = Distributed.from_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.enabled:
        import torch.distributed as torch_dist

        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        log.info("rank %d of %d on %s", dist.rank, dist.world_size, device)
    try:
        return _train_on(config, store, train_df, val_df, started, device, dist)
    finally:
        if dist.enabled:
            import torch.distributed as torch_dist

            torch_dist.destroy_process_group()


def _train_on(
    config: TrainerConfig,
    store: ObjectStore,
    train_df: Any,
    val_df: Any,
    started: float,
    device: torch.device,
    dist: Distributed,
) -> dict[str, Any]:
    import torch

    from ml_release.evaluation.metrics import classification_metrics, predict_proba
    from ml_release.training.model import build_classifier, resolve_base_model, tiny_classifier

    profile = config.profile
    precision = "bf16" if profile.precision == "bf16" and device.type == "cuda" else "fp32"
    if precision != profile.precision:
        log.warning("precision %s needs CUDA; training in fp32 on %s", profile.precision, device)

    train_df = _subsample(train_df, profile.max_train_samples, profile.seed)
    val_df = _subsample(val_df, profile.max_eval_samples, profile.seed + 1)

    if config.tiny:
        model, tokenizer = tiny_classifier(config.labels, seed=profile.seed)
    else:
        model, tokenizer = build_classifier(resolve_base_model(config.base_model), config.labels)
    model.to(device)
    label_index = {label: i for i, label in enumerate(config.labels)}
    split = EncodedSplit(
        input_ids=tokenizer(train_df[TEXT_COLUMN].tolist(), truncation=True, max_length=profile.max_length)[
            "input_ids"
        ],
        labels=[label_index[v] for v in train_df[LABEL_COLUMN]],
    )
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    stats = train_loop(model, split, profile, device, pad_id, dist, peak)
    if not math.isfinite(stats.train_loss):
        # A diverged model must fail here, not be committed and found "already trained" by a retry.
        raise MLReleaseError(f"training diverged: loss {stats.train_loss}; lower the learning rate")
    if not dist.is_main:
        # Rank 0 evaluates and commits; the others wait for it so that torchrun ends them together.
        import torch.distributed as torch_dist

        torch_dist.barrier()
        return {}

    eval_start = time.perf_counter()
    probs = predict_proba(
        model,
        tokenizer,
        val_df[TEXT_COLUMN].tolist(),
        batch_size=max(64, 2 * profile.batch_size),
        max_length=profile.max_length,
    )
    val = classification_metrics(
        [label_index[v] for v in val_df[LABEL_COLUMN]], probs.argmax(axis=1).tolist(), config.labels
    )
    metrics: dict[str, Any] = {
        "train_loss": stats.train_loss,
        "validation_accuracy": val["accuracy"],
        "validation_macro_f1": val["macro_f1"],
        "validation_samples": val["n"],
        "samples_per_s": stats.samples / stats.wall_s,
        "tokens_per_s": stats.real_tokens / stats.wall_s,
        "model_flops_utilisation": model_flops_utilisation(
            sum(p.numel() for p in model.parameters()), stats.real_tokens / stats.wall_s, peak
        ),
        "peak_flops": peak,
        "world_size": dist.world_size,
        "real_to_padded_token_ratio": stats.real_tokens / max(1, stats.padded_tokens),
        "steps": stats.steps,
        "train_samples": len(split),
        "samples_seen": stats.samples,
        "wall_s": stats.wall_s,
        "eval_wall_s": time.perf_counter() - eval_start,
        "device": str(device),
        "precision": precision,
        "num_threads": profile.num_threads,
        "torch_version": torch.__version__,
        "base_model": "tiny" if config.tiny else config.base_model,
        "labels": list(config.labels),
        "profile": to_plain(profile),
    }
    log.info(
        "validation accuracy %.4f macro-F1 %.4f on %d samples; train loss %.4f",
        val["accuracy"],
        val["macro_f1"],
        val["n"],
        stats.train_loss,
    )

    with tempfile.TemporaryDirectory(prefix="ml-release-model-") as tmp:
        out = Path(tmp)
        model.to("cpu").save_pretrained(out)
        tokenizer.save_pretrained(out)
        metrics["total_wall_s"] = time.perf_counter() - started
        (out / METRICS_NAME).write_text(json.dumps(metrics, indent=2, sort_keys=True), encoding="utf-8")
        marker = commit_model(store, config.output_uri, out, metrics)
    if dist.enabled:
        import torch.distributed as torch_dist

        torch_dist.barrier()
    return marker


def commit_model(store: ObjectStore, output_uri: str, src: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Upload ``src``'s files under a fresh attempt prefix, then the marker; return the marker in force.

    ``output_uri`` must end with "/". If another writer's marker is already there, that marker
    wins and is returned; this attempt's files stay unreferenced.
    """
    from ml_release.storage import sha256_file

    attempt_uri = f"{output_uri}attempt-{uuid.uuid4().hex[:12]}/"
    files: dict[str, str] = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        name = path.relative_to(src).as_posix()
        if not _FILE_NAME.match(name):
            raise ArtifactIntegrityError(f"save_pretrained wrote an unexpected file {name!r}")
        files[name] = sha256_file(path)
        store.put_file(attempt_uri + name, path, create_only=True)
    marker = {"model_uri": attempt_uri, "files": files, "metrics": metrics}
    marker_uri = output_uri + MARKER_NAME
    try:
        store.put_json(marker_uri, marker, create_only=True)
    except ObjectExistsError:
        winner = read_committed_model(store, output_uri)
        if winner is None:  # pragma: no cover - a marker is never deleted
            raise
        log.warning(
            "another trainer committed %s first; using its model %s (this attempt %s is unreferenced)",
            marker_uri,
            winner["model_uri"],
            attempt_uri,
        )
        return winner
    log.info("committed %d files under %s; marker %s", len(files), attempt_uri, marker_uri)
    return marker


def _result(config: TrainerConfig, marker: dict[str, Any]) -> dict[str, Any]:
    return {"model_uri": marker["model_uri"], "marker_uri": config.marker_uri, "metrics": marker["metrics"]}


def _read_split(store: ObjectStore, uri: str, labels: Sequence[str], name: str) -> Any:
    import io

    import pandas as pd

    try:
        raw = store.get_bytes(uri)
    except ObjectNotFoundError as exc:
        raise TrainingDataError(f"{name} split {uri} does not exist") from exc
    try:
        df = pd.read_parquet(io.BytesIO(raw))
    except Exception as exc:
        raise TrainingDataError(f"{name} split {uri} is not a readable parquet file: {exc}") from exc
    missing = [c for c in (TEXT_COLUMN, LABEL_COLUMN) if c not in df.columns]
    if missing:
        raise TrainingDataError(f"{name} split {uri} lacks column(s) {missing}; has {list(df.columns)}")
    if len(df) == 0:
        raise TrainingDataError(f"{name} split {uri} has no rows")
    if df[TEXT_COLUMN].isna().any() or df[LABEL_COLUMN].isna().any():
        raise TrainingDataError(f"{name} split {uri} has null text or label values")
    unknown = sorted(set(df[LABEL_COLUMN].astype(str)) - set(labels))
    if unknown:
        raise TrainingDataError(f"{name} split {uri} has labels {unknown} outside {list(labels)}")
    out = pd.DataFrame({TEXT_COLUMN: df[TEXT_COLUMN].astype(str), LABEL_COLUMN: df[LABEL_COLUMN].astype(str)})
    log.info("%s split: %d rows from %s", name, len(out), uri)
    return out


def _subsample(df: Any, limit: int | None, seed: int) -> Any:
    import numpy as np

    if limit is None or len(df) <= limit:
        return df
    rows = np.sort(np.random.default_rng(seed).choice(len(df), size=limit, replace=False))
    return df.iloc[rows].reset_index(drop=True)


def _check_marker(marker: Any, output_uri: str, marker_uri: str) -> None:
    if not isinstance(marker, dict) or not {"model_uri", "files", "metrics"} <= set(marker):
        raise ArtifactIntegrityError(f"{marker_uri} lacks model_uri, files or metrics")
    model_uri, files = marker["model_uri"], marker["files"]
    if not isinstance(model_uri, str) or not model_uri.startswith(output_uri) or not model_uri.endswith("/"):
        raise ArtifactIntegrityError(f"{marker_uri}: model_uri {model_uri!r} is not a prefix under {output_uri}")
    if not isinstance(files, dict) or not files:
        raise ArtifactIntegrityError(f"{marker_uri}: files must be a non-empty mapping")
    for name, digest in files.items():
        if not isinstance(name, str) or not _FILE_NAME.match(name):
            raise ArtifactIntegrityError(f"{marker_uri}: unsafe file name {name!r}")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ArtifactIntegrityError(f"{marker_uri}: {name} has no sha256")
    if not isinstance(marker["metrics"], dict):
        raise ArtifactIntegrityError(f"{marker_uri}: metrics must be a mapping")


def _check_files_exist(store: ObjectStore, marker: dict[str, Any]) -> None:
    missing = [name for name in marker["files"] if store.head(marker["model_uri"] + name) is None]
    if missing:
        raise ArtifactIntegrityError(f"committed model {marker['model_uri']} lacks files {missing}")


def _normalise_prefix(uri: str) -> str:
    prefix = uri if uri.endswith("/") else uri + "/"
    parse_s3_uri(prefix + MARKER_NAME)
    return prefix


# -- command line ----------------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own exit code is 2 too; made explicit
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_CONFIG, f"{self.prog}: error: {message}\n")


def parse_args(argv: Sequence[str] | None = None) -> TrainerConfig:
    """Parse and validate the command line; raises :class:`SpecError` on a bad value."""
    parser = _ArgumentParser(prog="python -m ml_release.training.trainer", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--train-uri", required=True)
    parser.add_argument("--validation-uri", required=True)
    parser.add_argument("--output-uri", required=True, help="run-scoped prefix; the marker goes under it")
    parser.add_argument("--labels", required=True, help="comma-separated, in the model's output order")
    parser.add_argument("--base-model", required=True, help="an offline model name or a local directory")
    parser.add_argument("--profile-json", required=True, help="every field of TrainingProfile, as JSON")
    parser.add_argument("--tiny", action="store_true", help="tests only: a tiny random encoder")
    parser.add_argument("--xcom-path", type=Path, default=None)
    args = parser.parse_args(argv)

    try:
        raw_profile = json.loads(args.profile_json)
    except json.JSONDecodeError as exc:
        raise SpecError(f"--profile-json is not valid JSON: {exc}") from exc
    profile = build(TrainingProfile, raw_profile, "training.profile")
    _check_profile(profile)

    labels = tuple(label.strip() for label in args.labels.split(","))
    if len(labels) < 2 or len(set(labels)) != len(labels) or not all(labels):
        raise SpecError(f"--labels: need at least two distinct non-empty labels, got {args.labels!r}")
    try:
        for uri in (args.train_uri, args.validation_uri):
            parse_s3_uri(uri)
        output = _normalise_prefix(args.output_uri)
    except InvalidURIError as exc:
        raise SpecError(str(exc)) from exc
    if not args.tiny:
        from ml_release.training.model import resolve_base_model

        resolve_base_model(args.base_model)  # fail as a config error now, not after reading data
    return TrainerConfig(
        train_uri=args.train_uri,
        validation_uri=args.validation_uri,
        output_uri=output,
        labels=labels,
        base_model=args.base_model,
        profile=profile,
        tiny=args.tiny,
        xcom_path=args.xcom_path,
    )


def _check_profile(p: TrainingProfile) -> None:
    checks = [
        (p.max_train_samples is None or p.max_train_samples >= 1, "max_train_samples", ">= 1 or null"),
        (p.max_eval_samples is None or p.max_eval_samples >= 1, "max_eval_samples", ">= 1 or null"),
        (math.isfinite(p.epochs) and p.epochs > 0, "epochs", "> 0"),
        (p.batch_size >= 1, "batch_size", ">= 1"),
        (p.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", ">= 1"),
        (p.max_length >= 8, "max_length", ">= 8"),
        (math.isfinite(p.learning_rate) and p.learning_rate > 0, "learning_rate", "> 0"),
        (p.weight_decay >= 0, "weight_decay", ">= 0"),
        (0 <= p.warmup_ratio < 1, "warmup_ratio", "in [0, 1)"),
        (p.num_threads >= 1, "num_threads", ">= 1"),
        (p.log_every_steps >= 1, "log_every_steps", ">= 1"),
    ]
    for ok, key, rule in checks:
        if not ok:
            raise SpecError(f"training.profile.{key}: must be {rule}, got {getattr(p, key)!r}")


def _configure_logging() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def main(argv: Sequence[str] | None = None, store: ObjectStore | None = None) -> int:
    """Run the CLI and return its exit code (see the module docstring)."""
    _configure_logging()
    try:
        config = parse_args(argv)
    except SpecError as exc:
        log.error("bad configuration: %s", exc)
        return EXIT_BAD_CONFIG
    try:
        if store is None:
            from ml_release.storage import ObjectStore

            store = ObjectStore()
        result = run(config, store)
        if not result:
            return EXIT_OK
        line = json.dumps(result, sort_keys=True, allow_nan=False)
        if config.xcom_path is not None:
            config.xcom_path.parent.mkdir(parents=True, exist_ok=True)
            config.xcom_path.write_text(line, encoding="utf-8")
    except TrainingDataError as exc:
        log.error("bad input data: %s", exc)
        return EXIT_BAD_DATA
    except Exception:
        log.exception("training failed")
        return EXIT_FAILURE
    sys.stdout.write(RESULT_PREFIX + line + "\n")
    sys.stdout.flush()
    return EXIT_OK


def exit_now(code: int) -> NoReturn:
    """End the process with ``code``, skipping interpreter teardown (see the module docstring).

    Called when the run is over: the model is committed or the error logged, torch.distributed's
    group destroyed and temporary folders removed. Only the streams are left to flush.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        exit_code = main()
    except SystemExit as exc:  # argparse's --help and usage errors
        exit_code = EXIT_OK if exc.code is None else exc.code if isinstance(exc.code, int) else EXIT_BAD_CONFIG
    exit_now(exit_code)
