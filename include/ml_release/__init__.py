"""ml-release: the Airflow-free core of the release pipeline.

Everything here is plain Python that the DAGs, the trainer (locally or in a pod) and the
TorchServe handler import. Only :mod:`ml_release.airflow` imports Airflow.
"""

__version__ = "0.1.0"
