"""Rank-0 MLflow logging into the run the control plane created (Ray Train V2 has no MLflow callback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RunLogger:
    """No-op when run_id is None (ranks other than 0, or tracking off)."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self.client = None
        if run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient()

    def params(self, params: dict[str, Any]) -> None:
        if self.client:
            from mlflow.entities import Param

            batch = [Param(k, str(v)[:500]) for k, v in params.items()]
            self.client.log_batch(self.run_id, params=batch)

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.client:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k.replace(" ", "_"), float(v), now, step) for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=batch)

    def artifact(self, path: Path, artifact_path: str) -> None:
        if self.client:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def artifacts(self, directory: Path) -> None:
        if self.client:
            self.client.log_artifacts(self.run_id, str(directory))

    def register_model(self, name: str, source: str, tags: dict[str, str]) -> str | None:
        """A new version of the registered model `name` (created if missing) whose source is the export folder
        `source` (s3://...), linked to this run, with lineage `tags`; returns the version (None with tracking off).
        """
        if not self.client:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="rCM few-step students (rcm-distill)")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(name, source, run_id=self.run_id, tags=tags)
        self.client.set_tag(self.run_id, "rcm.registered_model", f"{name}/{version.version}")
        return str(version.version)
