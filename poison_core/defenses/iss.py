"""Image Shortcut Squeezing (Liu, Zhao & Larson, 'Image Shortcut Squeezing: Countering Perturbative
Availability Poisons with Compression', ICML 2023).

Perturbative availability poisons (error-minimising noise, synthetic/linear shortcuts, adversarial
poisons) plant a small, easily learnt pattern; ISS (Sec. 4) squeezes it out with simple compression
applied to the *training* images once before training, the victim then trains as usual:

* grayscale: the ITU-R 601-2 luma L = 0.299 R + 0.587 G + 0.114 B replicated to the three channels
  (PIL's ``convert("L")``, which torchvision's ``Grayscale(3)`` of the reference calls), against
  colour-based (low-frequency) shortcuts; on 1-channel data it is the identity;
* JPEG at a low quality factor (the paper's JPEG-10), against high-frequency poisons such as
  error-minimising noise crafted on a fully trained surrogate;
* bit-depth reduction (BDR, the reference's ``--bdr``, torchvision ``RandomPosterize(bits, p=1)``):
  keep the `bits` most significant bits of each uint8 pixel.

Test images are not squeezed: the reference squeezes them only under ``--ISS_both_train_test``, off by
default, and its reported numbers (README table: clean 94.68 -> 92.41 grayscale, 85.38 JPEG-10) are
for squeezed training and plain test data. The reference applies the squeeze in its data loader every
epoch; every squeeze here is deterministic, so squeezing once is the same.
"""

from __future__ import annotations

import io
from typing import Callable, ClassVar

import numpy as np
from PIL import Image
from pydantic import Field

from poison_core.defenses.base import (Defense, DefenseContext, DefenseParams, DefenseResult, register_defense,
                                       train_victim)

LUMA_16 = np.array([19595, 38470, 7471], dtype=np.int64)  # PIL's 16-bit fixed-point 601-2 weights
PAPER = "Liu, Zhao & Larson, ICML 2023, Image Shortcut Squeezing"


def jpeg_round_trip(images: np.ndarray, quality: int) -> np.ndarray:
    """Each uint8 (N, H, W, C) image encoded as a baseline JPEG of `quality` with PIL and decoded
    again (PIL's libjpeg is deterministic: the same image and quality give the same bytes)."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
        out[i] = decoded.reshape(image.shape)
    return out


def grayscale(images: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of RGB images in PIL's fixed point, (19595 R + 38470 G + 7471 B + 2^15) >> 16,
    replicated to three channels; 1-channel images are returned unchanged (they already are grayscale)."""
    if images.shape[-1] == 1:
        return images.copy()
    luma = (images.astype(np.int64) @ LUMA_16 + (1 << 15)) >> 16
    return np.repeat(luma.astype(np.uint8)[..., None], 3, axis=-1)


def reduce_bit_depth(images: np.ndarray, bits: int) -> np.ndarray:
    """Keep the `bits` most significant bits of every uint8 pixel (posterize): x & ~(2^(8 - bits) - 1)."""
    mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
    return images & mask


class SqueezeDefense(Defense):
    """Squeeze every training image once, then train the victim normally; test images stay as they are.

    A member names its squeeze function, called as ``squeezer(images, **params)``: the fields of its
    Params are that function's keyword arguments."""

    squeezer: ClassVar[Callable[..., np.ndarray]]

    def squeeze(self, images: np.ndarray) -> np.ndarray:
        """The squeezed uint8 (N, H, W, C) images."""
        return self.squeezer(images, **self.params.model_dump())

    def fit(self, ctx: DefenseContext) -> DefenseResult:
        squeezed = self.squeeze(ctx.train.images)
        change = np.abs(squeezed.astype(np.int16) - ctx.train.images.astype(np.int16))
        result = train_victim(ctx, ctx.train.replace(images=squeezed))
        result.info.update({"squeeze_mean_abs_change": float(change.mean()),
                            "squeeze_max_abs_change": float(change.max()) if change.size else 0.0})
        return result


class JpegParams(DefenseParams):
    """quality: the JPEG quality factor, 1-95 (the paper's JPEG-10: 10)."""

    quality: int = Field(10, ge=1, le=95)


class GrayscaleParams(DefenseParams):
    """No parameters: grayscale has none."""


class BitDepthParams(DefenseParams):
    """bits: bits kept per 8-bit channel, 1-7. The reference leaves ``--bdr`` unset by default; 2 is a
    strong squeeze of the kind the paper compares against (an 8/255 perturbation is mostly below the
    64-level step)."""

    bits: int = Field(2, ge=1, le=7)


@register_defense
class IssJpeg(SqueezeDefense):
    """JPEG-compress every training image at a low quality (Liu et al. 2023, Sec. 4, JPEG-10)."""

    name = "iss_jpeg"
    paper = f"{PAPER} (JPEG compression)"
    summary = "training: JPEG-compress the training images once (quality 10), then train normally"
    Params = JpegParams
    squeezer = staticmethod(jpeg_round_trip)


@register_defense
class IssGrayscale(SqueezeDefense):
    """Grayscale every training image (Liu et al. 2023, Sec. 4); the identity on 1-channel data."""

    name = "iss_grayscale"
    paper = f"{PAPER} (grayscale compression)"
    summary = "training: grayscale the training images once (identity on 1-channel data), then train normally"
    Params = GrayscaleParams
    squeezer = staticmethod(grayscale)


@register_defense
class IssBitDepth(SqueezeDefense):
    """Reduce every training image's bit depth (the reference's BDR squeeze, Liu et al. 2023)."""

    name = "iss_bitdepth"
    paper = f"{PAPER} (bit-depth reduction)"
    summary = "training: keep the top bits of each training pixel (2 of 8), then train normally"
    Params = BitDepthParams
    squeezer = staticmethod(reduce_bit_depth)
