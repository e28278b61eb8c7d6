"""Module-level functions and classes for the Ray tests (Ray workers import them by module name)."""

from __future__ import annotations

import os
from pathlib import Path

from infra.ray_runner import job_map
from poison_core.config import ExecutionConfig

CFG = ExecutionConfig(num_cpus=1, max_retries=2)


def square(x: int) -> int:
    return x * x


def sum_of_squares_nested(n: int) -> int:
    return sum(job_map(CFG)(square, [(i,) for i in range(n)]))


def die_once(marker: str, value: int) -> int:
    """Kills its own worker process the first time (as a node failure would), succeeds on the retry."""
    path = Path(marker)
    if not path.exists():
        path.write_text("died")
        os._exit(1)
    return value * 10


class Counter:
    def __init__(self, start: int) -> None:
        self.value = start

    def add(self, k: int) -> int:
        self.value += k
        return self.value

    def pid(self) -> int:
        return os.getpid()
