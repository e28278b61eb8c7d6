"""The torch devices the device-agnostic tests run on: always `cpu`, plus `cuda`.

The `cuda` parameter carries the `cuda` marker (so `pytest -m cuda` selects the CUDA tier) and, on a
machine where torch sees no CUDA device, a skip that says so; nothing is decided at import beyond
asking torch whether CUDA is there. Use the `device` fixture of tests/conftest.py, or
`@pytest.mark.parametrize("device", DEVICES)` for a test that needs no module-scoped state.
"""

from __future__ import annotations

import pytest
import torch

CUDA_SKIP = "CUDA not available: torch.cuda.is_available() is False"


def device_params() -> list:
    """`cpu`, and `cuda` marked `cuda` (skipped with CUDA_SKIP where torch.cuda.is_available() is False)."""
    cuda_marks = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP)]
    return [pytest.param(torch.device("cpu"), id="cpu"),
            pytest.param(torch.device("cuda"), id="cuda", marks=cuda_marks)]


DEVICES = device_params()


def on_device(module: torch.nn.Module, device: torch.device) -> bool:
    """Every parameter and buffer of `module` lives on `device` (cuda matches cuda:N of any N)."""
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type == device.type for t in tensors)
