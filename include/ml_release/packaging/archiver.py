"""Build a TorchServe ``.mar`` from a model saved with ``save_pretrained``.

The archive is self-contained: besides the weights, config and tokenizer it carries the
``ml_release`` package itself and a one-line entry file, so a TorchServe worker needs nothing of
ours installed (the worker puts the extracted archive first on its ``PYTHONPATH``).

Serving knobs from the release spec go into the archive's model-config YAML, which TorchServe
applies at registration: ``minWorkers = maxWorkers = workers`` (a fixed worker layout, PERFORMANCE.md
S3), ``batchSize``, ``maxBatchDelay``, ``responseTimeout``. TorchServe's model config cannot set
a worker's environment, so torch threads travel in its free-form ``handler:`` section, which the
handler reads; the environment variable ``ML_RELEASE_TORCH_THREADS`` of the TorchServe process
overrides it (see :func:`ml_release.packaging.handler.setting`).

Fault injection travels the same way, and only when a caller asks for it (``faults=``, for a test's
"bad canary"): a ``faults:`` mapping in the ``handler:`` section (see
:class:`ml_release.packaging.handler.FaultSettings`). An archive built without ``faults`` carries no
such key at all, and the pipeline never passes one.

A ``.mar``'s bytes differ on every build (the manifest holds a timestamp): key artifacts by run,
never by content.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_release
from ml_release.config import ServingSpec
from ml_release.errors import MLReleaseError
from ml_release.naming import check_model_name, check_version

if TYPE_CHECKING:
    from ml_release.packaging.handler import FaultSettings

SERIALIZED_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "config.json"
# Files a transformers tokenizer may be saved as; those present are shipped.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
ENTRY_MODULE = "ml_release_entry"
TS_CONFIG_FILE = "model-config.yaml"
_ENTRY_SOURCE = '''"""TorchServe entry point of an ml-release archive; the code is in ml_release/."""

from ml_release.packaging.handler import handle

__all__ = ["handle"]
'''


class ArchiveError(MLReleaseError):
    """Raised when a model directory cannot be archived (a missing file, a name clash)."""


def archive_file_name(model_name: str, version: str) -> str:
    """The ``.mar`` file name in a model store: one file per version, so versions never collide."""
    return f"{check_model_name(model_name)}-{check_version(version)}.mar"


def fault_mapping(faults: FaultSettings | Mapping[str, Any]) -> dict[str, Any]:
    """Validate fault settings the handler's way and return what goes into ``handler.faults``."""
    # Imported here: the handler module imports TorchServe, which only a build with faults needs.
    from ml_release.packaging.handler import FaultSettings

    settings = faults if isinstance(faults, FaultSettings) else FaultSettings.from_mapping(faults)
    if not settings.active:
        raise ArchiveError(f"faults {settings.to_mapping()!r} inject nothing; pass faults=None for a clean archive")
    return settings.to_mapping()


def model_config_yaml(
    serving: ServingSpec,
    max_length: int | None = None,
    faults: FaultSettings | Mapping[str, Any] | None = None,
) -> str:
    import yaml

    handler: dict[str, Any] = {"torch_threads": serving.torch_threads}
    if max_length is not None:
        handler["max_length"] = max_length
    if faults is not None:
        handler["faults"] = fault_mapping(faults)
    config = {
        "minWorkers": serving.workers,
        "maxWorkers": serving.workers,
        "batchSize": serving.batch_size,
        "maxBatchDelay": serving.max_batch_delay_ms,
        "responseTimeout": serving.response_timeout_s,
        "handler": handler,
    }
    return str(yaml.safe_dump(config, sort_keys=False))


def build_archive(
    model_dir: Path,
    model_name: str,
    version: str,
    serving: ServingSpec,
    out_dir: Path,
    *,
    max_length: int | None = None,
    overwrite: bool = False,
    faults: FaultSettings | Mapping[str, Any] | None = None,
) -> Path:
    """Archive ``model_dir`` as ``out_dir/<model_name>-<version>.mar`` and return its path.

    ``max_length`` (the training profile's) is baked into the handler's config when given; the
    handler defaults to 128 tokens otherwise. ``faults`` builds a deliberately bad candidate for
    tests (see the module docstring); it is validated before anything is written.
    """
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import package_model
    from model_archiver.model_packaging_utils import ModelExportUtils

    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    target = out_dir / archive_file_name(model_name, version)
    if target.exists() and not overwrite:
        raise ArchiveError(f"{target} already exists; archives are never overwritten silently")
    for required in (SERIALIZED_FILE, MODEL_CONFIG_FILE):
        if not (model_dir / required).is_file():
            raise ArchiveError(f"{model_dir} has no {required}: not a save_pretrained model directory")
    ts_config_text = model_config_yaml(serving, max_length, faults)
    tokenizer_files = [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not tokenizer_files:
        raise ArchiveError(f"{model_dir} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="ml-release-archive-", dir=out_dir) as tmp:
        staging = Path(tmp)
        extras = staging / "extra"
        extras.mkdir()
        for path in [model_dir / MODEL_CONFIG_FILE, *tokenizer_files]:
            shutil.copy2(path, extras / path.name)
        package_dir = Path(ml_release.__file__).resolve().parent
        shutil.copytree(
            package_dir,
            extras / "ml_release",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
        )
        entry = staging / f"{ENTRY_MODULE}.py"
        entry.write_text(_ENTRY_SOURCE, encoding="utf-8")
        ts_config = staging / TS_CONFIG_FILE
        ts_config.write_text(ts_config_text, encoding="utf-8")
        export = staging / "export"
        export.mkdir()

        # The archiver stages files in <system tmp>/<model_name>, shared by every build on the
        # machine; a unique name keeps concurrent builds apart. The manifest keeps the real name.
        staging_name = f"{model_name}-{version}-{staging.name.rsplit('-', 1)[-1]}"
        config = ModelArchiverConfig(
            model_name=staging_name,
            handler=str(entry),
            version=version,
            serialized_file=str(model_dir / SERIALIZED_FILE),
            extra_files=str(extras),
            export_path=str(export),
            archive_format="default",
            force=False,
            config_file=str(ts_config),
        )
        manifest = ModelExportUtils.generate_manifest_json(dataclasses.replace(config, model_name=model_name))
        package_model(config, manifest=manifest)
        # Written under out_dir and renamed: a reader never sees a half-written archive.
        (export / f"{staging_name}.mar").replace(target)
    return target
