"""The training recipe's data augmentation: random crop of a zero-padded image and horizontal flip.

Every reference victim of the poisoning literature trains with it: 'pad 4, random crop 32, random
horizontal flip' on CIFAR-10 (Geiping et al.'s forest, forest/victims/training.py with
``augmentations=True`` and forest/data/kettle_base.py ``RandomTransform(shift=8, fliplr=True)``, i.e. a
shift of up to 4 px; Huang et al.'s Unlearnable Examples, dataset.py ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip``; Souri et al.'s Sleeper Agent; ABL's fine-tuning; WaNet's ``PostTensorTransform``;
DPA's base models). For 28x28 grayscale (MNIST-like) images forest uses half the CIFAR shift with the flip
kept (kettle_base.py: ``source_size=28, shift=4, fliplr=True``, a shift of up to 2 px), which is what
:func:`default_padding` returns for 28 px images.

A random crop of a zero-padded image is an integer translation, computed here by gathering pixels
(pure indexing), so it works on uint8 and float NCHW batches alike, is differentiable with respect to
float inputs (the crafting loops use it as Witches' Brew's 'differentiable data augmentation') and
draws every random number from the caller's ``torch.Generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def default_padding(height: int, width: int | None = None) -> int:
    """Zero padding of the recipe's random crop for an image of this size: 4 px from 32 px up (the CIFAR
    recipe), else max(1, side // 14) (2 px at 28 px: forest's MNIST setting; 1 px at 8 px)."""
    side = min(height, width if width is not None else height)
    return 4 if side >= 32 else max(1, side // 14)


def default_shift(height: int) -> int:
    """Shift of the usual 'pad 4, crop 32' CIFAR augmentation, scaled to the image: max(1, H // 8)
    (the crafting loops' differentiable augmentation)."""
    return max(1, height // 8)


def random_shift_flip(x: torch.Tensor, gen: torch.Generator, *, max_shift: int, flip: bool = True) -> torch.Tensor:
    """Translate each image of the NCHW batch by an integer (dy, dx) in [-max_shift, max_shift]
    (zero fill, i.e. a random crop of the image zero-padded by `max_shift`) and, with probability 1/2
    each when `flip`, mirror it left-right. Works on any dtype; differentiable for float inputs."""
    n, _, height, width = x.shape
    if max_shift > 0:
        offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen, device=gen.device).to(x.device)
        padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
        rows = offsets[0][:, None] + torch.arange(height, device=x.device)[None, :]
        cols = offsets[1][:, None] + torch.arange(width, device=x.device)[None, :]
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mirror = (torch.rand(n, generator=gen, device=gen.device) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x
