"""forest's ``packed`` export (Geiping et al., ICLR 2021; github.com/JonasGeiping/data-poisoning,
``forest/data/kettle_base.py`` ``export_poison``, mode ``packed``):
``torch.save([poison_delta, self.poison_ids], f'{path}poisons_packed_{date}.pth')``.

* ``poison_delta``: a float tensor (P, C, H, W), the perturbation forest adds to its *normalised*
  training inputs, i.e. in units of the dataset's per-channel std (forest/consts.py);
* ``poison_ids``: the poisons' training-set indices (forest's index = the dataset's original order),
  a torch integer tensor (random poison ids) or, for forest's benchmark runs
  (kettle_benchmark_experiment.py: the setups' ``base indices``), an int64 numpy array.

The poisoned image is what forest's own ``full`` export writes (``_torch_to_PIL``):
``clamp((x + delta) * std + mean, 0, 1) * 255 + 0.5`` truncated, with x the normalised clean image,
i.e. ``clamp(clean / 255 + delta * std, 0, 1)``. The std is not in the file, so the import names the
normalisation forest used (``normalization``: cifar10, cifar100, mnist, imagenet, tinyimagenet, or
none for ``NORMALIZE = False``); a CIFAR-10 config defaults to cifar10, any other dataset must name it.

The file is a plain torch save of a list of tensors, so it is read with ``torch.load(weights_only=True)``
(torch's restricted unpickler: tensors and containers; here also numpy integer arrays, and nothing
else), after its size is held to the budget: P <= the budget's poison count, float64 at most.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from poison_core.data.dataset import ImageDataset
from poison_core.errors import DatasetError
from poison_core.interop.common import Imported, check_count, sources, write_folder
from poison_core.paths import read_regular
from poison_core.poisons import PoisonSet

FOREST_STD = {
    "cifar10": (0.24703224003314972, 0.24348513782024384, 0.26158785820007324),
    "cifar100": (0.2673342823982239, 0.2564384639263153, 0.2761504650115967),
    "mnist": (0.30810782313346863,),
    "imagenet": (0.229, 0.224, 0.225),
    "tinyimagenet": (0.27698642015457153, 0.2690644860267639, 0.2820819020271301),
    "none": (1.0, 1.0, 1.0),
}
"""forest/consts.py's per-channel std of each dataset (the mean cancels out of the poisoned pixel)."""
NORMALIZATIONS = tuple(FOREST_STD)
PATTERN = "poisons_packed_*.pth"
_OVERHEAD = 1 << 20


def files(root: Path) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.glob(PATTERN) if p.is_file()) if root.is_dir() else [root]


def std_for(normalization: str | None, train: ImageDataset, what: str) -> np.ndarray:
    """forest's per-channel std for `normalization` (None: cifar10 for a CIFAR-10 config), shaped for
    (P, C, H, W) deltas; one line naming the field when it is missing or does not fit the images."""
    if normalization is None:
        if train.name.split("/")[0] != "cifar10":
            raise DatasetError(f"{what}: params.normalization: forest-packed deltas are in forest's normalised "
                               f"units; name the normalisation forest used ({', '.join(NORMALIZATIONS)})")
        normalization = "cifar10"
    if normalization not in FOREST_STD:
        raise DatasetError(f"{what}: params.normalization {normalization!r} is unknown; allowed: "
                           f"{', '.join(NORMALIZATIONS)}")
    channels = train.image_shape[-1]
    std = FOREST_STD[normalization]
    std = std[:channels] if normalization == "none" else std
    if len(std) != channels:
        raise DatasetError(f"{what}: params.normalization {normalization!r} has {len(std)} channel(s); the "
                           f"dataset's images have {channels}")
    return np.asarray(std, dtype=np.float64)[None, :, None, None]


def _numpy_int_globals() -> list[Any]:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    dtypes = [type(np.dtype(t)) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                          np.uint32, np.uint64)]
    return [_reconstruct, np.ndarray, np.dtype, *dtypes]


def _load(data: bytes, what: str) -> Any:
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_int_globals()):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure of the restricted load means a bad or hostile file
        text = str(exc)
        found = re.search(r"(?i)unsupported global:? (?:GLOBAL )?([\w.]+)", text) or re.search(
            r"got <class '([\w.]+)'>", text)
        lines = [line.strip() for line in text.splitlines() if line.strip() and not any(
            noise in line for noise in ("Weights only load failed", "Check the documentation", "WeightsUnpickler"))]
        reason = (f"global '{found.group(1)}' is forbidden" if found
                  else f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__)
        raise DatasetError(f"{what} refused by torch.load(weights_only=True): {reason}") from None


def _ids(value: Any, count: int, what: str) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise DatasetError(f"{what}: poison_ids must be integers, got {value.dtype}")
        value = value.numpy()
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise DatasetError(f"{what}: poison_ids must be integers")
        value = np.asarray(value, dtype=np.int64)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
        raise DatasetError(f"{what}: poison_ids must be an integer tensor, array or list, got "
                           f"{type(value).__name__}")
    if value.shape != (count,):
        raise DatasetError(f"{what}: {value.shape} poison_ids for {count} deltas")
    return value.astype(np.int64)


def read(root: Path, train: ImageDataset, test: ImageDataset, max_poisons: int,
         normalization: str | None = None) -> Imported:
    """The poisons of one packed file (or a folder holding exactly one ``poisons_packed_*.pth``)."""
    import torch

    root = Path(root)
    found = files(root)
    if len(found) != 1:
        raise DatasetError(f"forest-packed poisons: {str(root)!r} holds {len(found)} {PATTERN} files; name one")
    path, what = found[0], str(found[0])
    h, w, c = train.image_shape
    std = std_for(normalization, train, what)
    data = read_regular(path, what, max_poisons * (h * w * c * 8 + 8) + _OVERHEAD)
    packed = _load(data, what)
    if not isinstance(packed, (list, tuple)) or len(packed) != 2:
        raise DatasetError(f"{what}: expected [poison_delta, poison_ids] (forest's packed export), got "
                           f"{type(packed).__name__}" + (f" of {len(packed)}" if isinstance(packed, (list, tuple))
                                                         else ""))
    delta, raw_ids = packed
    if not isinstance(delta, torch.Tensor) or not delta.dtype.is_floating_point or delta.dim() != 4:
        raise DatasetError(f"{what}: poison_delta must be a float tensor (P, C, H, W)")
    check_count(int(delta.shape[0]), max_poisons, what)
    if tuple(delta.shape[1:]) != (c, h, w):
        raise DatasetError(f"{what}: poison_delta has shape {tuple(delta.shape)}; the dataset's images are "
                           f"(P, {c}, {h}, {w})")
    delta_np = delta.detach().double().numpy()
    if not np.isfinite(delta_np).all():
        raise DatasetError(f"{what}: poison_delta holds NaN or infinite values")
    ids = _ids(raw_ids, len(delta_np), what)
    present = np.isin(ids, train.ids)
    if not present.all():
        raise DatasetError(f"{what}: poison id {int(ids[~present][0])} is not in the config's training split")
    clean = train.images[train.positions(ids)].transpose(0, 3, 1, 2).astype(np.float64) / 255.0
    pixels = np.floor(np.clip(clean + delta_np * std, 0.0, 1.0) * 255.0 + 0.5)
    images = np.clip(pixels, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    labels = train.labels[train.positions(ids)]
    return Imported(ids=ids, images=np.ascontiguousarray(images), poison_labels=labels.astype(np.int64),
                    targets={"kind": "availability"}, sources=sources(root, found))


def write(out: Path, poison_set: PoisonSet, train: ImageDataset, test: ImageDataset,
          normalization: str | None = None) -> list[Path]:
    """A folder `out` holding ``poisons_packed_export.pth`` as forest writes it: float32 deltas in
    `normalization`'s units, rows in ascending id order, and the ids as an int64 tensor."""
    import torch

    std = std_for(normalization, train, f"export forest-packed to {out}")
    order = np.argsort(poison_set.ids, kind="stable")
    ids = poison_set.ids[order]
    clean = train.images[train.positions(ids)].transpose(0, 3, 1, 2).astype(np.float64)
    poisoned = poison_set.images[order].transpose(0, 3, 1, 2).astype(np.float64)
    delta = torch.from_numpy(((poisoned - clean) / 255.0 / std).astype(np.float32))
    return write_folder(out, lambda folder: torch.save([delta, torch.from_numpy(ids.astype(np.int64))],
                                                       folder / "poisons_packed_export.pth"))
