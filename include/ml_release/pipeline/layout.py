"""Where every artifact of a run lives in the bucket; keys come from runs, never from content."""

from __future__ import annotations

import dataclasses
import os

from ml_release.naming import check_model_name, check_version, join_key, parse_s3_uri, run_key

DEFAULT_ROOT = "s3://ml-release"


@dataclasses.dataclass(frozen=True)
class RunRef:
    """One Airflow run, as the core sees it."""

    dag_id: str
    run_id: str

    @property
    def key(self) -> str:
        return run_key(self.dag_id, self.run_id)


@dataclasses.dataclass(frozen=True)
class Layout:
    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        parse_s3_uri(self.root.rstrip("/") + "/x")
        object.__setattr__(self, "root", self.root.rstrip("/"))

    @classmethod
    def from_env(cls) -> Layout:
        return cls(os.environ.get("ML_RELEASE_ARTIFACT_ROOT", DEFAULT_ROOT))

    @property
    def bucket(self) -> str:
        return parse_s3_uri(self.root + "/x")[0]

    @property
    def registry_root(self) -> str:
        return f"{self.root}/registry"

    def run_prefix(self, model: str, run: RunRef) -> str:
        return f"{self.root}/{join_key('runs', check_model_name(model), run.key)}"

    def archive_uri(self, model: str, version: str) -> str:
        return f"{self.root}/{join_key('models', check_model_name(model), 'archives', check_version(version))}.mar"

    def release_prefix(self, model: str, run: RunRef) -> str:
        return f"{self.root}/{join_key('releases', check_model_name(model), run.key)}"
