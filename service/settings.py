"""Control-plane settings, read from the environment (or a .env file) once and cached."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PLACEHOLDERS = {"", "changeme", "secret", "password"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    ENVIRONMENT: Literal["development", "test", "production"] = "development"
    DATABASE_URL: str = "sqlite:///./.data/rcm.db"  # or postgresql+psycopg://user:pass@host/db
    RAY_DASHBOARD_URL: str = "http://127.0.0.1:8265"  # Ray Jobs REST API
    RAY_AUTH_TOKEN: str | None = None  # sent as a bearer token to Ray when set (KubeRay authOptions)
    MLFLOW_TRACKING_URI: str = "http://127.0.0.1:5000"
    S3_ENDPOINT_URL: str = "http://127.0.0.1:8333"
    S3_ACCESS_KEY: str  # no default: a secret
    S3_SECRET_KEY: str  # no default: a secret
    S3_REGION: str = "us-east-1"
    CHECKPOINT_BUCKET: str = "ckpt"
    MAX_BODY_BYTES: int = 256 * 1024  # larger request bodies get 413
    RECONCILE_INTERVAL_S: float = 1.0  # how often stored job state is synced with Ray and MLflow
    WORKER_ENTRYPOINT: str = "python -m workers.entrypoint"

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Settings:
        if self.ENVIRONMENT == "production":
            for name in ("S3_ACCESS_KEY", "S3_SECRET_KEY"):
                if getattr(self, name).lower() in _PLACEHOLDERS:
                    raise ValueError(f"{name} is a placeholder; set a real secret in production")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()  # type: ignore[call-arg]  # secrets come from the environment
