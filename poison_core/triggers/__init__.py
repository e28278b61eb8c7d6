"""Backdoor triggers as JSON-able specs, registered by kind; importing this package registers every kind.

`apply_trigger(spec, images)` stamps the trigger a spec describes (its ``kind`` picks the registered
function) on uint8 NHWC images, at train and test time alike, each pixel moved by at most the spec's
``epsilon`` (poison_core.perturbation.towards). Kinds: ``patch`` (base), ``blend``, ``sig``, ``warp``,
``random_patch`` and ``fixed_patch``; a new kind is a module here, registered with ``@TRIGGERS.register`` and
imported below.
"""

from poison_core.triggers.base import CORNERS, TRIGGERS, TriggerFn, apply_trigger, patch_pattern
from poison_core.triggers import blend, fixed_patch, random_patch, sig, warp  # noqa: F401  (registers the kinds)

__all__ = ["CORNERS", "TRIGGERS", "TriggerFn", "apply_trigger", "patch_pattern"]
