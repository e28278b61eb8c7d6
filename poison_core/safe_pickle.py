"""A restricted unpickler for pickles that come from strangers (CIFAR batches, the benchmark's files).

Unpickling runs whatever callables the pickle names, so :class:`RestrictedUnpickler` resolves only
the globals a caller allows and refuses every other one with one line naming it (``global
'posix.system' is forbidden``). The allow-lists here cover what the supported formats need:

* numpy arrays and scalars: ``_reconstruct`` / ``ndarray`` (protocol <= 4), ``_frombuffer``
  (protocol 5), ``dtype`` and ``scalar``, under both numpy 1 (``numpy.core``) and numpy 2
  (``numpy._core``) module names. Object dtypes are refused: their items would be arbitrary objects.
* ``_codecs.encode`` with the latin-1 codec only: how protocol 2 spells ``bytes``.
* PIL images (``PIL.Image.Image``, pickled with protocol >= 2 as NEWOBJ + BUILD of
  ``[info, mode, size, palette, bytes]``): resolved to :class:`PickledImage`, which is *not* a PIL
  image; it checks mode, size (against poison_core.limits) and the byte count before it allocates
  anything and keeps the pixels as a uint8 (H, W, C) array.

Nothing else resolves: no builtins callables (``eval``, ``getattr``), no ``copyreg``, no torch.
Memory is bounded by the caller's file-size check: every object a restricted pickle can build is
at most a constant times the bytes that spell it.
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import Any, Mapping

import numpy as np

from poison_core.errors import DatasetError
from poison_core.limits import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE

Allowed = Mapping[tuple[str, str], Any]

_MODES = {"L": 1, "RGB": 3}


def _safe_dtype(*args: Any) -> np.dtype:
    """np.dtype(*args), refusing object dtypes (their items would be arbitrary unpickled objects)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"numpy dtype {dtype} holds Python objects; only plain numeric arrays are allowed")
    return dtype


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """_codecs.encode restricted to the latin-1 codec (protocol 2's spelling of a bytes object)."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is forbidden (only latin1)")
    return codecs.encode(obj, "latin1", errors)


def numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals a numpy array or scalar pickle references (numpy 1 and numpy 2 module names)."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
        from numpy._core.numeric import _frombuffer  # type: ignore[attr-defined]  # private, as pickles name it
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
        from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]

    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _safe_dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    return allowed


class PickledImage:
    """What a pickled ``PIL.Image.Image`` unpickles to here: its pixels as uint8 (H, W, C), C = 1 for
    mode 'L', 3 for 'RGB'. Other modes, oversized images and byte counts that do not match are refused
    in ``__setstate__`` before any pixel buffer is allocated."""

    array: np.ndarray

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, list) or len(state) != 5:
            raise pickle.UnpicklingError("PIL image state is not [info, mode, size, palette, data]")
        _info, mode, size, _palette, data = state
        if mode not in _MODES:
            raise pickle.UnpicklingError(f"PIL image mode {mode!r} is not supported (allowed: {', '.join(_MODES)})")
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(s, int) and 0 < s <= MAX_IMAGE_SIDE for s in size)
                or size[0] * size[1] > MAX_IMAGE_PIXELS):
            raise pickle.UnpicklingError(f"PIL image size {size!r} is outside 1..{MAX_IMAGE_SIDE} per side "
                                         f"and {MAX_IMAGE_PIXELS} pixels")
        width, height = size
        channels = _MODES[mode]
        if not isinstance(data, (bytes, bytearray)) or len(data) != width * height * channels:
            raise pickle.UnpicklingError(f"PIL image data holds {len(data) if isinstance(data, (bytes, bytearray)) else '?'} "
                                         f"bytes, expected {width * height * channels} for {mode} {width}x{height}")
        self.array = np.frombuffer(bytes(data), np.uint8).reshape(height, width, channels).copy()


def pil_globals() -> dict[tuple[str, str], Any]:
    """PIL images (protocol >= 2) and the latin-1 bytes spelling protocol 2 uses for their data."""
    return {("PIL.Image", "Image"): PickledImage, ("_codecs", "encode"): _latin1_encode}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals in `allowed` and refuses every other one."""

    def __init__(self, file: io.BufferedIOBase, allowed: Allowed, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._allowed = dict(allowed)

    def find_class(self, module: str, name: str) -> Any:
        """The allowed object for (module, name); any other global raises UnpicklingError."""
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")
        return self._allowed[(module, name)]


def safe_loads(data: bytes, allowed: Allowed, what: str, encoding: str = "ASCII") -> Any:
    """Unpickle `data` with only `allowed` globals; any failure (a forbidden global, a truncated or
    corrupt stream, a refused image) is one DatasetError line naming `what`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed, encoding=encoding).load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad or hostile file
        kind = "truncated" if isinstance(exc, EOFError) else type(exc).__name__
        raise DatasetError(f"{what} refused: {kind}: {exc or 'ran out of input'}") from None


def read_limited(path: Any, what: str, limit: int) -> bytes:
    """The bytes of `path` (a pathlib.Path), refused before reading when the file is larger than `limit`."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise DatasetError(f"{what} is {size} bytes, more than the {limit} this format can need here")
        return path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{what} cannot be read: {exc.strerror or exc}") from None
