from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from ml_release.config import ServingSpec
from ml_release.errors import SpecError
from ml_release.packaging.archiver import ArchiveError, archive_file_name, build_archive

pytestmark = pytest.mark.unit

SERVING = ServingSpec(batch_size=4, max_batch_delay_ms=10, workers=2, response_timeout_s=30, torch_threads=1)


@pytest.fixture(scope="module")
def mar(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_archive(
        tiny_model_dir, "sentiment", "r0123abc", SERVING, tmp_path_factory.mktemp("store"), max_length=64
    )


def test_archive_is_named_by_model_and_version(mar: Path) -> None:
    assert mar.name == "sentiment-r0123abc.mar"
    assert sorted(p.name for p in mar.parent.iterdir()) == [mar.name]  # no staging left behind


def test_manifest_records_name_version_entry_and_config(mar: Path) -> None:
    with zipfile.ZipFile(mar) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert manifest["model"] == {
        "modelName": "sentiment",
        "serializedFile": "model.safetensors",
        "handler": "ml_release_entry.py",
        "modelVersion": "r0123abc",
        "configFile": "model-config.yaml",
    }


def test_archive_holds_weights_tokenizer_and_the_ml_release_package(mar: Path, tiny_model_dir: Path) -> None:
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
    tokenizer_files = {p.name for p in tiny_model_dir.iterdir() if p.name.startswith("tokenizer")}
    assert tokenizer_files
    assert {"model.safetensors", "config.json", "ml_release_entry.py", *tokenizer_files} <= names
    assert {"ml_release/__init__.py", "ml_release/packaging/handler.py", "ml_release/naming.py"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_model_config_carries_the_serving_spec(mar: Path) -> None:
    with zipfile.ZipFile(mar) as z:
        config = yaml.safe_load(z.read("model-config.yaml"))
    assert config == {
        "minWorkers": 2,
        "maxWorkers": 2,
        "batchSize": 4,
        "maxBatchDelay": 10,
        "responseTimeout": 30,
        "handler": {"torch_threads": 1, "max_length": 64},
    }


def test_extracted_archive_imports_its_own_ml_release(mar: Path, tmp_path: Path) -> None:
    """What a TorchServe worker does: the extracted archive goes first on PYTHONPATH."""
    with zipfile.ZipFile(mar) as z:
        z.extractall(tmp_path)
    code = "import ml_release_entry, ml_release;print(ml_release.__file__); print(callable(ml_release_entry.handle))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    imported, is_callable = out.stdout.split()
    assert Path(imported).resolve().is_relative_to(tmp_path.resolve())
    assert is_callable == "True"


def test_an_existing_archive_is_not_overwritten(mar: Path, tiny_model_dir: Path) -> None:
    before = mar.read_bytes()
    with pytest.raises(ArchiveError, match="already exists"):
        build_archive(tiny_model_dir, "sentiment", "r0123abc", SERVING, mar.parent)
    assert mar.read_bytes() == before


def test_a_directory_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ArchiveError, match=r"model\.safetensors"):
        build_archive(tmp_path, "sentiment", "r1", SERVING, tmp_path / "out")


@pytest.mark.parametrize(
    ("name", "version"),
    [("Sentiment", "r1"), ("../x", "r1"), ("sentiment", "../r1"), ("sentiment", "r1/x")],
    ids=["upper-case-name", "traversal-name", "traversal-version", "slash-version"],
)
def test_unsafe_names_are_refused_before_any_work(name: str, version: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError):
        archive_file_name(name, version)
    with pytest.raises(SpecError):
        build_archive(tmp_path, name, version, SERVING, tmp_path / "out")
    assert not (tmp_path / "out").exists()
