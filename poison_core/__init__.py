"""Belladonna's pure core: datasets, models, training, attacks, defenses, audited poisons.

Importing this package has no side effects: no device is chosen, no seed is set, and none of
prefect, ray, mlflow, boto3 or s3fs is imported (orchestration wraps the core from outside).
``__version__`` is the installed distribution's (pyproject.toml is its one source); it names a release
and is recorded in provenance, but no stored output's key depends on it: keys carry a fingerprint of
the code itself (`poison_core.code_fingerprint`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("belladonna")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
