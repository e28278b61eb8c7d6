"""Differentiable data augmentation for crafting (Geiping et al., 'Witches' Brew', ICLR 2021, Sec. 4:
"differentiable data augmentation" makes poisons robust to the victim's random crops and flips).

The implementation lives in :mod:`poison_core.augmentation`, shared with the training recipe's
augmentation (``TrainConfig.augment``); this module keeps the crafting loops' import path.
"""

from __future__ import annotations

from poison_core.augmentation import default_shift, random_shift_flip

__all__ = ["default_shift", "random_shift_flip"]
