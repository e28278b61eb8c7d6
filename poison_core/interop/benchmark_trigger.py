"""The 'Just How Toxic' benchmark's triggered-backdoor target: ``target.pickle`` holding
``(PIL image, label, patch, [startx, starty])`` (Schwarzschild et al., ICML 2021;
aks2203/poisoning-benchmark, how_to.md, craft_poisons_htbd.py / craft_poisons_clbd.py, poison_test.py).

poison_test.py takes the patch as a (3, p, p) float tensor in [0, 1] (``torch.tensor(patch)`` when it
is not one: a numpy array or nested lists work too), refuses a patch that is not (3, patch_size,
patch_size) or does not fit, pastes it into ``ToTensor()(target)[:, starty:starty + p, startx:startx + p]``
and turns the result back into a PIL image (``ToPILImage``: ``mul(255).byte()``, truncation). The attack
succeeds when the patched target is classified as the poisons' label.

Here the patch becomes a ``fixed_patch`` trigger (poison_core.triggers.fixed_patch): the same grey
levels (float32 ``patch * 255`` truncated, as ToPILImage does), the same place, pasted opaque
(epsilon 255), ``target_class`` the poisons' label and ``source_class`` the target's class. The crafting
scripts pickle the patch as a torch tensor, whose pickle rebuilds its storage with an unrestricted
``torch.load`` (``torch.storage._load_from_bytes``): such a file is refused with that reason; saving
``patch.numpy()`` instead gives a file both poison_test.py and this reader accept.

Export: a ``patch`` trigger pasted opaque (epsilon 255: the stamp is then the pattern itself) or a
``fixed_patch`` trigger is written as (C, p, p) float32 grey levels / 255 at its corner; a partial
stamp (epsilon < 255) depends on each image and a ``random_patch`` moves, so neither is a benchmark
patch and both are refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from poison_core.data.dataset import ImageDataset
from poison_core.errors import DatasetError
from poison_core.triggers import patch_pattern
from poison_core.triggers.base import _corner_slices
from poison_core.triggers.fixed_patch import patch_pixels

TORCH_REASON = ("a pickled torch tensor rebuilds its storage with an unrestricted torch.load "
                "(torch.storage._load_from_bytes), which is not run here; pickle the patch as a numpy array "
                "(patch.numpy()), which poison_test.py accepts too")


def _int(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DatasetError(f"{what} must be an integer, got {type(value).__name__}")
    return int(value)


def patch_from_target(patch: Any, location: Any, image_shape: tuple[int, ...], what: str) -> tuple[np.ndarray, int, int]:
    """(the (p, p, C) uint8 patch, top, left) of a triggered target's patch and [startx, starty]."""
    h, w, c = image_shape
    if isinstance(patch, (list, tuple)):
        try:
            patch = np.asarray(patch, dtype=np.float32)
        except (TypeError, ValueError):
            raise DatasetError(f"{what}: the patch must be a (C, p, p) array of floats in [0, 1]") from None
    if not isinstance(patch, np.ndarray) or patch.dtype.kind != "f":
        raise DatasetError(f"{what}: the patch must be a (C, p, p) float array in [0, 1], got "
                           f"{type(patch).__name__} {getattr(patch, 'dtype', '')}".rstrip())
    if patch.ndim != 3 or patch.shape[0] != c or patch.shape[1] != patch.shape[2] or not 1 <= patch.shape[1] <= min(h, w):
        raise DatasetError(f"{what}: the patch has shape {patch.shape}; expected ({c}, p, p) with 1 <= p <= "
                           f"{min(h, w)}")
    if not np.isfinite(patch).all() or patch.min() < 0 or patch.max() > 1:
        raise DatasetError(f"{what}: the patch's values must be finite and in [0, 1] (ToTensor's range)")
    if not isinstance(location, (list, tuple)) or len(location) != 2:
        raise DatasetError(f"{what}: the patch location must be [startx, starty], got {type(location).__name__}")
    left, top = (_int(v, f"{what}: patch location {n}") for v, n in zip(location, ("startx", "starty")))
    size = patch.shape[1]
    if left < 0 or top < 0 or left + size > w or top + size > h:
        raise DatasetError(f"{what}: a {size}x{size} patch at [startx {left}, starty {top}] does not fit "
                           f"{h}x{w} images")
    grey = np.clip(np.trunc(patch.astype(np.float32) * np.float32(255)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(grey.transpose(1, 2, 0)), top, left


def trigger_spec(pixels: np.ndarray, top: int, left: int, target_class: int, source_class: int) -> dict[str, Any]:
    return {"kind": "fixed_patch", "pixels": pixels.tolist(), "top": int(top), "left": int(left), "epsilon": 255,
            "target_class": int(target_class), "source_class": int(source_class)}


def to_benchmark(trigger: dict[str, Any], image_shape: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
    """(the (C, p, p) float32 patch, [startx, starty]) of a trigger the benchmark can express."""
    h, w, c = image_shape
    kind = trigger.get("kind")
    if int(trigger.get("epsilon", 255)) != 255 and kind in ("patch", "fixed_patch"):
        raise DatasetError(f"export benchmark: the trigger moves pixels by at most {trigger.get('epsilon')} "
                           "grey levels, so its stamp depends on each image; the benchmark pastes a fixed patch "
                           "(only epsilon 255 triggers can be written)")
    if kind == "fixed_patch":
        pixels, top, left = patch_pixels(trigger, c), int(trigger["top"]), int(trigger["left"])
    elif kind == "patch":
        size = int(trigger["size"])
        rows, cols = _corner_slices(trigger["position"], size, h, w, int(trigger.get("margin", 0)))
        pixels, top, left = patch_pattern(size, c, trigger.get("pattern", "checkerboard")), rows.start, cols.start
    else:
        raise DatasetError(f"export benchmark: a {kind!r} trigger is not a fixed patch at a fixed place; the "
                           "benchmark's triggered targets hold only that (patch and fixed_patch triggers)")
    return (pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)), [int(left), int(top)]


def backdoor_target(trigger: dict[str, Any], goal: dict[str, Any], test: ImageDataset) -> int:
    """The test id written as the benchmark's target: the goal's own (an imported trial), else the
    lowest-id test image of the trigger's source class (of any other class than the target class)."""
    if goal.get("target_ids"):
        return int(goal["target_ids"][0])
    source = trigger.get("source_class")
    pool = test.labels == int(source) if source is not None else test.labels != int(trigger["target_class"])
    if not pool.any():
        raise DatasetError("export benchmark: the test split has no image to patch as the target")
    return int(test.ids[pool].min())
