"""Belladonna's pure core: datasets, models, training, attacks, defenses, audited poisons.

Importing this package has no side effects: no device is chosen, no seed is set, and none of
prefect, ray, mlflow, boto3 or s3fs is imported (orchestration wraps the core from outside).
"""

__version__ = "0.2.0"
