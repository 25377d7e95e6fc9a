from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dags

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted(p for p in (ROOT / "dags").glob("*.py") if not p.name.startswith("_"))
HEAVY = ("torch", "transformers", "great_expectations", "boto3", "kubernetes", "pandas", "scipy", "sklearn")


@pytest.fixture(scope="module")
def dagbag():  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_dag_files_import_without_errors(dagbag) -> None:  # type: ignore[no-untyped-def]
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {"train_model", "release_model", "rollback_model"}


@pytest.mark.parametrize("path", DAG_FILES, ids=[p.stem for p in DAG_FILES])
def test_dag_id_equals_file_stem(dagbag, path: Path) -> None:  # type: ignore[no-untyped-def]
    assert path.stem in dagbag.dag_ids


@pytest.mark.parametrize("path", DAG_FILES, ids=[p.stem for p in DAG_FILES])
def test_dag_file_imports_no_heavy_module_at_parse_time(path: Path) -> None:
    code = (
        "import sys, runpy; sys.path[:0] = [{!r}, {!r}]; runpy.run_path({!r}); "
        "print(','.join(m for m in {!r} if m in sys.modules))"
    ).format(str(ROOT / "dags"), str(ROOT / "include"), str(path), HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_train_model_task_graph(dagbag) -> None:  # type: ignore[no-untyped-def]
    dag = dagbag.dags["train_model"]
    order = ["validate_data", "split", "train", "evaluate", "package", "publish_candidate"]
    assert set(dag.task_ids) == set(order)
    for upstream, downstream in itertools.pairwise(order):
        assert downstream in dag.get_task(upstream).downstream_task_ids
    assert dag.get_task("validate_data").retries == 0
    assert [o.name for o in dag.get_task("publish_candidate").outlets] == ["ml_release_model_candidates"]


def test_release_model_runs_on_candidates_and_always_cleans_up(dagbag) -> None:  # type: ignore[no-untyped-def]
    dag = dagbag.dags["release_model"]
    assert dag.max_active_runs == 1
    cleanup = dag.get_task("cleanup_canary")
    assert cleanup.is_teardown
    assert dag.get_task("decide").trigger_rule == "all_done"
    gates = ["deploy_canary", "pretraffic_gate", "check_accuracy", "check_load", "analyze_canary", "decide"]
    for upstream, downstream in itertools.pairwise(gates):
        assert downstream in dag.get_task(upstream).downstream_task_ids


@pytest.mark.parametrize("dag_id", ["train_model", "release_model", "rollback_model"])
def test_every_param_has_a_json_schema_type(dagbag, dag_id: str) -> None:  # type: ignore[no-untyped-def]
    from ml_release.params import DAG_PARAMS

    dag = dagbag.dags[dag_id]
    assert set(dag.params.keys()) == set(DAG_PARAMS[dag_id])
    for key in dag.params:
        assert "type" in dag.params.get_param(key).schema, key


def test_the_plugin_adds_a_release_report_link_that_stays_off_other_dags() -> None:
    import types

    sys.path.insert(0, str(ROOT / "plugins"))
    try:
        from ml_release_plugin import MLReleasePlugin
    finally:
        sys.path.remove(str(ROOT / "plugins"))
    (link,) = MLReleasePlugin.global_operator_extra_links
    assert link.name == "Release report"
    other = types.SimpleNamespace(dag_id="train_model", task_id="train", run_id="r1", map_index=-1)
    assert link.get_link(None, ti_key=other) == ""  # decided without touching the database
