"""Deployment settings read from the environment, on demand (never at import time).

| variable | field | default |
| --- | --- | --- |
| ``BELLADONNA_STORE`` | ``store`` (root URI: a path or ``s3://bucket/prefix``) | ``./runs/store`` |
| ``BELLADONNA_RUN_DIR`` | ``run_dir`` (local run folder: MLflow db, artifacts) | ``./runs`` |
| ``BELLADONNA_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL`` | ``s3_endpoint`` (MinIO, moto) | none |
| ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` | credentials | none |
| ``AWS_PROFILE``, else ``AWS_DEFAULT_PROFILE`` | ``aws_profile`` (a profile of the shared config / credentials files) | none |
| ``AWS_DEFAULT_REGION``, else ``AWS_REGION`` | ``aws_region`` | none |
| ``BELLADONNA_S3_RETRIES`` | ``s3_retries`` (botocore ``max_attempts``: retries after the first try) | 2 |
| ``BELLADONNA_S3_CONNECT_TIMEOUT`` / ``BELLADONNA_S3_READ_TIMEOUT`` | seconds | 5 / 30 |
| ``MLFLOW_TRACKING_URI`` | ``mlflow_tracking_uri`` | ``sqlite:///<run_dir>/mlflow.db`` |
| ``BELLADONNA_RAY_CONNECT_TIMEOUT`` | ``ray_connect_timeout`` (seconds to reach a cluster's address) | 15 |
| ``BELLADONNA_RAY_RESOURCE_WAIT`` | ``ray_resource_wait`` (seconds for a node that fits a job, e.g. autoscaling) | 300 |

Credentials are :class:`pydantic.SecretStr`: they never appear in ``repr``, ``str`` or logs. Without
explicit keys, S3 credentials come from botocore's standard chain (profile files, web identity / IRSA,
container and instance roles: :func:`s3_credential_source`). :func:`job_env` is what a driver hands its Ray
jobs (their runtime_env), since a cluster's nodes do not share the driver's environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from poison_core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# field -> environment variables, first non-empty wins
ENV_VARS: dict[str, tuple[str, ...]] = {
    "store": ("BELLADONNA_STORE",),
    "run_dir": ("BELLADONNA_RUN_DIR",),
    "s3_endpoint": ("BELLADONNA_S3_ENDPOINT", "AWS_ENDPOINT_URL"),
    "aws_access_key_id": ("AWS_ACCESS_KEY_ID",),
    "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "aws_session_token": ("AWS_SESSION_TOKEN",),
    "aws_region": ("AWS_DEFAULT_REGION", "AWS_REGION"),
    "aws_profile": ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"),
    "s3_retries": ("BELLADONNA_S3_RETRIES",),
    "s3_connect_timeout": ("BELLADONNA_S3_CONNECT_TIMEOUT",),
    "s3_read_timeout": ("BELLADONNA_S3_READ_TIMEOUT",),
    "mlflow_tracking_uri": ("MLFLOW_TRACKING_URI",),
    "ray_connect_timeout": ("BELLADONNA_RAY_CONNECT_TIMEOUT",),
    "ray_resource_wait": ("BELLADONNA_RAY_RESOURCE_WAIT",),
}
_SECRET_FIELDS = frozenset({"aws_access_key_id", "aws_secret_access_key", "aws_session_token"})
JOB_ENV_PREFIXES = ("BELLADONNA_", "AWS_ENDPOINT_URL")
JOB_ENV_VARS = frozenset({
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
    # botocore's credential chain and S3 client configuration (env, shared files, web identity, container role)
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "AWS_EC2_METADATA_DISABLED",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CA_BUNDLE",
    "AWS_STS_REGIONAL_ENDPOINTS",
})
"""What :func:`job_env` hands on: these names and every name with a prefix of JOB_ENV_PREFIXES."""


def job_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of `environ` (default ``os.environ``) that every Ray job of a driver needs: the store,
    run folder and S3 settings (``BELLADONNA_*``), the MLflow tracking server, and whatever of botocore's
    credential chain is set. Values are credentials: pass them to Ray's runtime_env, never to a log."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if v and (k in JOB_ENV_VARS or k.startswith(JOB_ENV_PREFIXES))}


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
    aws_profile: str | None = Field(None, pattern=r"^[A-Za-z0-9_.@+=,-]{1,128}$")
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


def s3_credential_source(settings: Settings, root: str) -> str:
    """How the S3 store `root` authenticates: ``explicit`` (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY),
    else the name of the link of botocore's credential chain that answers (``shared-credentials-file``,
    ``config-file``, ``assume-role-with-web-identity``, ``container-role``, ``iam-role``, ...). InputError,
    one line naming what to set, when no link answers or one is misconfigured (a profile that does not
    exist, half a key pair). A credential that resolves but is refused is the bucket check's StorageError."""
    if settings.has_credentials:
        return "explicit"
    from botocore.exceptions import BotoCoreError, ProfileNotFound

    aws_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    try:
        return _chain_method(settings.aws_profile, aws_env)
    except LookupError:
        raise InputError(f"s3 store {root!r} needs credentials and botocore's credential chain found none: set "
                         "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (a profile of "
                         "~/.aws/credentials or ~/.aws/config), or run where web identity (IRSA) or an "
                         "instance / container role provides them") from None
    except ProfileNotFound:
        files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
                 os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
        profile = settings.aws_profile or os.environ.get("AWS_PROFILE")
        raise InputError(f"s3 store {root!r}: AWS_PROFILE {profile!r} is not a profile of "
                         f"{files[0]} or {files[1]}") from None
    except BotoCoreError as exc:  # half a key pair, a malformed config file, a failing credential process
        raise InputError(f"s3 store {root!r}: AWS credentials: {_first_line(exc)}") from None


@lru_cache(maxsize=8)
def _chain_method(profile: str | None, aws_env: tuple[tuple[str, str], ...]) -> str:
    """botocore's credential chain for `profile`, resolved once per process and environment (`aws_env` is
    the cache key); LookupError when it finds nothing. Logs which link answered, never a value."""
    import botocore.session

    credentials = botocore.session.Session(profile=profile).get_credentials()
    if credentials is None:
        raise LookupError("no AWS credentials")
    method = getattr(credentials, "method", None) or "botocore"
    log.info("s3: AWS credentials from botocore's %s provider", method)
    return method


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one_line(exc: ValidationError) -> str:
    """First validation problem as one line naming the environment variable; secret values are never echoed."""
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else "settings"
    where = ENV_VARS.get(field, (field,))[0]
    shown = "" if field in _SECRET_FIELDS else f" (got {err.get('input')!r})"
    return f"{where}: {err['msg']}{shown}"
