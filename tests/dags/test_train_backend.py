"""train_model with training.backend: kubernetes: train is a KubernetesPodOperator, parsed cheaply."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dags

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "include" / "releases" / "sentiment.yaml"
DAG_FILE = ROOT / "dags" / "train_model.py"
HEAVY = ("torch", "transformers", "great_expectations", "boto3", "pandas", "scipy", "sklearn")


@pytest.fixture()
def kubernetes_spec_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    text = SPEC.read_text()
    assert "  backend: local" in text
    (tmp_path / "sentiment.yaml").write_text(text.replace("  backend: local", "  backend: kubernetes", 1))
    monkeypatch.setenv("ML_RELEASE_SPEC_DIR", str(tmp_path))
    return tmp_path


def test_kubernetes_backend_makes_train_a_pod_operator_between_split_and_evaluate(kubernetes_spec_dir: Path) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    dagbag = DagBag(dag_folder=str(DAG_FILE))
    assert dagbag.import_errors == {}
    dag = dagbag.dags["train_model"]
    train = dag.get_task("train")
    assert isinstance(train, KubernetesPodOperator)
    assert set(dag.task_ids) == {"validate_data", "split", "train", "evaluate", "package", "publish_candidate"}
    assert "split" in train.upstream_task_ids
    assert "evaluate" in train.downstream_task_ids
    assert train.do_xcom_push and train.retry_policy is not None
    assert train.on_finish_action.value == "delete_pod"


def test_local_backend_keeps_the_python_train_task() -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    dagbag = DagBag(dag_folder=str(DAG_FILE))
    assert not isinstance(dagbag.dags["train_model"].get_task("train"), KubernetesPodOperator)


def test_kubernetes_backend_parse_imports_no_ml_library(kubernetes_spec_dir: Path) -> None:
    """The provider brings the kubernetes client (about 0.7 s, README); nothing heavier may come."""
    code = (
        "import sys, runpy; sys.path[:0] = [{!r}, {!r}]; runpy.run_path({!r}); "
        "print(','.join(m for m in {!r} if m in sys.modules)); print('kubernetes' in sys.modules)"
    ).format(str(ROOT / "dags"), str(ROOT / "include"), str(DAG_FILE), HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, kubernetes = out.stdout.rstrip("\n").split("\n")[-2:]
    assert heavy == ""
    assert kubernetes == "True"  # the operator is really there; the local backend's test asserts its absence
