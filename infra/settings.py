"""Deployment settings read from the environment, on demand (never at import time).

| variable | field | default |
| --- | --- | --- |
| ``BELLADONNA_STORE`` | ``store`` (root URI: a path or ``s3://bucket/prefix``) | ``./runs/store`` |
| ``BELLADONNA_RUN_DIR`` | ``run_dir`` (local run folder: MLflow db, artifacts) | ``./runs`` |
| ``BELLADONNA_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL`` | ``s3_endpoint`` (MinIO, moto) | none |
| ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` | credentials | none |
| ``AWS_DEFAULT_REGION``, else ``AWS_REGION`` | ``aws_region`` | none |
| ``BELLADONNA_S3_RETRIES`` | ``s3_retries`` (botocore ``max_attempts``: retries after the first try) | 2 |
| ``BELLADONNA_S3_CONNECT_TIMEOUT`` / ``BELLADONNA_S3_READ_TIMEOUT`` | seconds | 5 / 30 |
| ``MLFLOW_TRACKING_URI`` | ``mlflow_tracking_uri`` | ``sqlite:///<run_dir>/mlflow.db`` |
| ``BELLADONNA_RAY_CONNECT_TIMEOUT`` | ``ray_connect_timeout`` (seconds to reach a cluster's address) | 15 |
| ``BELLADONNA_RAY_RESOURCE_WAIT`` | ``ray_resource_wait`` (seconds for a node that fits a job, e.g. autoscaling) | 300 |

Credentials are :class:`pydantic.SecretStr`: they never appear in ``repr``, ``str`` or logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from poison_core.errors import ConfigError

# field -> environment variables, first non-empty wins
ENV_VARS: dict[str, tuple[str, ...]] = {
    "store": ("BELLADONNA_STORE",),
    "run_dir": ("BELLADONNA_RUN_DIR",),
    "s3_endpoint": ("BELLADONNA_S3_ENDPOINT", "AWS_ENDPOINT_URL"),
    "aws_access_key_id": ("AWS_ACCESS_KEY_ID",),
    "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "aws_session_token": ("AWS_SESSION_TOKEN",),
    "aws_region": ("AWS_DEFAULT_REGION", "AWS_REGION"),
    "s3_retries": ("BELLADONNA_S3_RETRIES",),
    "s3_connect_timeout": ("BELLADONNA_S3_CONNECT_TIMEOUT",),
    "s3_read_timeout": ("BELLADONNA_S3_READ_TIMEOUT",),
    "mlflow_tracking_uri": ("MLFLOW_TRACKING_URI",),
    "ray_connect_timeout": ("BELLADONNA_RAY_CONNECT_TIMEOUT",),
    "ray_resource_wait": ("BELLADONNA_RAY_RESOURCE_WAIT",),
}
_SECRET_FIELDS = frozenset({"aws_access_key_id", "aws_secret_access_key", "aws_session_token"})


class Settings(BaseModel):
    """Where the store and the tracking server live, and how to reach S3. Build with :meth:`from_env`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str = Field("./runs/store", min_length=1)
    run_dir: str = Field("./runs", min_length=1)
    s3_endpoint: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    aws_region: str | None = None
    s3_retries: int = Field(2, ge=0, le=10)
    s3_connect_timeout: float = Field(5.0, gt=0, le=300)
    s3_read_timeout: float = Field(30.0, gt=0, le=3600)
    mlflow_tracking_uri: str | None = None
    ray_connect_timeout: float = Field(15.0, gt=0, le=3600)
    ray_resource_wait: float = Field(300.0, ge=0, le=86400)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from `environ` (default ``os.environ``); keyword `overrides` win over the environment."""
        env = os.environ if environ is None else environ
        raw: dict[str, object] = {}
        for name, variables in ENV_VARS.items():
            value = next((env[v] for v in variables if env.get(v)), None)
            if value is not None:
                raw[name] = value
        raw.update(overrides)
        try:
            return cls(**raw)
        except ValidationError as exc:
            raise ConfigError(_one_line(exc)) from None

    @property
    def has_credentials(self) -> bool:
        """True when both an access key id and a secret key are set."""
        return bool(self.aws_access_key_id and self.aws_access_key_id.get_secret_value()
                    and self.aws_secret_access_key and self.aws_secret_access_key.get_secret_value())

    @property
    def tracking_uri(self) -> str:
        """``MLFLOW_TRACKING_URI`` or a SQLite database in the run folder (MLflow 3 has no plain file store)."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{Path(self.run_dir).expanduser().resolve() / 'mlflow.db'}"


def _one_line(exc: ValidationError) -> str:
    """First validation problem as one line naming the environment variable; secret values are never echoed."""
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else "settings"
    where = ENV_VARS.get(field, (field,))[0]
    shown = "" if field in _SECRET_FIELDS else f" (got {err.get('input')!r})"
    return f"{where}: {err['msg']}{shown}"
