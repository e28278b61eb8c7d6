"""Shared pieces of the pipeline tests: a tiny benchmark, a Prefect server for the session, Ray teardown."""

from __future__ import annotations

import json
import os

import pytest
import torch

from infra.storage import Store
from poison_core.data import read_split
from poison_core.defenses.persist import load_classifier
from tasks.stages import dataset_prefix, read_poisons

TINY_BENCHMARK = """
name: tiny-pipeline
dataset: {name: digits, n_train: 300, n_test: 120, seed: 0}
victim:
  model: {name: mlp, width: 32}
  train: {epochs: 2, batch_size: 64}
threat: {epsilon: 255, budget: 0.05}
attacks:
  - {name: badnets, params: {target_class: 0, patch_size: 2}}
  - {name: label_flip, params: {mode: pair, source_class: 1, target_class: 7}}
seeds: [0, 1]
"""

QUIET = {"RAY_AUTH_MODE": "disabled", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def prefect_server():
    """One real temporary Prefect server (sqlite) for every flow run of the session."""
    for name, value in QUIET.items():
        os.environ.setdefault(name, value)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def fresh_ray():
    """Each test starts Ray itself (so workers inherit its environment) and it is stopped afterwards."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def audit_store(store: Store, cfg) -> dict[str, int]:
    """Every stored file reads back and passes its audit; returns the count per stage folder."""
    counts = {"datasets": 0, "poisons": 0, "models": 0, "cells": 0}
    train = None
    for key in store.list(""):
        folder = key.split("/")[0]
        counts[folder] = counts.get(folder, 0) + 1  # a left-over folder (checkpoints/) shows up here
        uri = store.uri(key)
        if folder == "datasets":
            split = read_split(uri)  # verifies the content checksum
            train = split if key.endswith("train.parquet") else train
    prefix = dataset_prefix(cfg.dataset)
    for key in store.list("poisons"):
        read_poisons(store, cfg, prefix, key, train)
    for key in store.list("models"):
        load_classifier(store.uri(key), cfg.victim, train.image_shape, train.num_classes, torch.device("cpu"))
    for key in store.list("cells"):
        json.loads(store.read_bytes(key))
    return counts
