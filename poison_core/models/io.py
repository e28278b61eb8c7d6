"""Model weights as safetensors state dicts, on any fsspec URI, never pickled.

``save_model`` writes atomically (temp name + rename locally, one PUT on object stores), so a reader
never sees a half-written file; ``load_state`` reads the bytes and loads them strictly into a model
of the same architecture. ``state_checksum`` fingerprints weights for provenance and tests.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from poison_core.errors import InputError
from poison_core.io import atomic_write_bytes, read_bytes


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as detached, contiguous CPU tensors (what safetensors stores)."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}


def save_model(model: nn.Module, uri_or_path: str | Path, metadata: dict[str, str] | None = None,
               storage_options: dict[str, Any] | None = None) -> None:
    """Write `model`'s state dict as safetensors to a path or fsspec URI; `metadata` is str -> str."""
    metadata = dict(metadata or {})
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise InputError(f"model metadata must map str to str; key {bad[0]!r} does not")
    data = safetensors_save(state_tensors(model), metadata=metadata or None)
    atomic_write_bytes(str(uri_or_path), data, storage_options)


def load_state(model: nn.Module, uri_or_path: str | Path,
               storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Load the safetensors weights at `uri_or_path` into `model` (strictly); returns the metadata.

    Raises InputError naming the file when it is not safetensors or does not fit the model.
    """
    where = str(uri_or_path)
    data = read_bytes(where, storage_options)
    try:
        tensors = safetensors_load(data)
        metadata = read_metadata(data)
    except (SafetensorError, ValueError) as exc:
        raise InputError(f"model file {where!r} is not a readable safetensors file: {exc}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InputError(f"model file {where!r} does not fit {type(model).__name__}: "
                         f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise InputError(f"model file {where!r}: {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=True)
    return metadata


def check_safetensors(data: bytes, where: str) -> None:
    """InputError naming `where` unless `data` parses as a whole safetensors file."""
    try:
        safetensors_load(data)
        read_metadata(data)
    except (SafetensorError, ValueError) as exc:
        raise InputError(f"model file {where!r} is not a readable safetensors file: {exc}") from None


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (8-byte little-endian header length, JSON header)."""
    meta = _header(data).get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("safetensors __metadata__ must map strings to strings")
    return dict(meta)


def tensor_names(data: bytes) -> list[str]:
    """The tensor names in safetensors bytes, from the header alone (no tensor is read)."""
    return [name for name in _header(data) if name != "__metadata__"]


def _header(data: bytes) -> dict[str, Any]:
    """The JSON header of safetensors bytes (8-byte little-endian length first); ValueError if malformed."""
    if len(data) < 8:
        raise ValueError("file is shorter than the 8-byte safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("safetensors header runs past the end of the file")
    try:
        header = json.loads(data[8:8 + length])
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"safetensors header is not JSON text ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    return header


def state_checksum(model: nn.Module) -> str:
    """sha256 over the state dict, keys sorted: name, dtype, shape and raw bytes of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_tensors(model).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
