"""TorchServe's own Context, built the way its MockContext does, for handler tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def make_context(model_dir: Path, batch: int, yaml_config: dict[str, Any] | None = None, version: str = "r1") -> Any:
    """A context for ``batch`` rows of model ``tiny`` at ``version``, one request processor a row."""
    from ts.context import Context, RequestProcessor

    manifest = {"model": {"modelName": "tiny", "modelVersion": version, "handler": "ml_release_entry.py"}}
    context = Context("tiny", str(model_dir), manifest, batch, None, "0.12.0", model_yaml_config=yaml_config)
    context.request_processor = [RequestProcessor({}) for _ in range(batch)]
    return context
