"""Hooks: an Airflow connection in, a frozen config of the core out.

``aws_default`` carries the object store's endpoint and credentials; ``torchserve_default``
carries TorchServe's addresses and where its tokens are. Tasks never see a secret in conf,
XCom or logs (G30): the configs hide credentials from ``repr``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook

from ml_release.serving.torchserve import TorchServeClient, TorchServeConfig
from ml_release.storage import ObjectStore, S3Config


class ObjectStoreHook(BaseHook):
    """Interact with S3-compatible storage (AWS, MinIO, moto) through the core's ObjectStore."""

    conn_name_attr = "aws_conn_id"
    default_conn_name = "aws_default"
    conn_type = "aws"
    hook_name = "ml-release object store"

    def __init__(self, aws_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.aws_conn_id = aws_conn_id

    def get_config(self) -> S3Config:
        conn = self.get_connection(self.aws_conn_id)
        extra = conn.extra_dejson
        return S3Config(
            endpoint_url=extra.get("endpoint_url"),
            region_name=extra.get("region_name", "us-east-1"),
            access_key_id=conn.login or None,
            secret_access_key=conn.password or None,
        )

    def get_store(self) -> ObjectStore:
        return ObjectStore(self.get_config())

    def child_env(self) -> dict[str, str]:
        """Variables for a local child process (the trainer); a pod gets a secretKeyRef instead."""
        cfg = self.get_config()
        env = {"AWS_DEFAULT_REGION": cfg.region_name}
        if cfg.endpoint_url:
            env["AWS_ENDPOINT_URL"] = cfg.endpoint_url
        if cfg.access_key_id and cfg.secret_access_key:
            env["AWS_ACCESS_KEY_ID"] = cfg.access_key_id
            env["AWS_SECRET_ACCESS_KEY"] = cfg.secret_access_key
        return env


class TorchServeHook(BaseHook):
    """Interact with TorchServe's management and inference APIs."""

    conn_name_attr = "torchserve_conn_id"
    default_conn_name = "torchserve_default"
    conn_type = "torchserve"
    hook_name = "TorchServe"

    def __init__(self, torchserve_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.torchserve_conn_id = torchserve_conn_id

    def get_config(self) -> TorchServeConfig:
        extra = self.get_connection(self.torchserve_conn_id).extra_dejson
        return TorchServeConfig.from_key_file(
            inference_url=extra["inference_url"],
            management_url=extra["management_url"],
            key_file=Path(extra["key_file"]),
            metrics_url=extra.get("metrics_url"),
        )

    def model_store(self) -> Path:
        return Path(self.get_connection(self.torchserve_conn_id).extra_dejson["model_store"])

    def get_client(self) -> TorchServeClient:
        return TorchServeClient(self.get_config())

    def get_router(self) -> Any:
        """The traffic router in front of TorchServe (the local HAProxy), or None if there is none."""
        from ml_release.serving.router import LocalRouter, LocalRouterSettings

        extra = self.get_connection(self.torchserve_conn_id).extra_dejson
        if not extra.get("router_state_dir"):
            return None
        return LocalRouter(
            LocalRouterSettings(
                state_dir=Path(extra["router_state_dir"]),
                log_dir=Path(extra["router_log_dir"]),
                listen_port=int(extra["router_url"].rsplit(":", 1)[1]),
                torchserve_inference_port=int(extra["inference_url"].rsplit(":", 1)[1]),
            )
        )
