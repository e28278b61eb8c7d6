"""The benchmark's triggered-backdoor target.pickle (image, label, patch, [startx, starty]): read into a
fixed_patch trigger that stamps what poison_test.py stamps, written back for opaque patch triggers, and
hostile or malformed patches refused in one line."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torchvision import transforms

from poison_core.attacks import CraftContext, make_attack
from poison_core.config import ThreatModel
from poison_core.errors import DatasetError
from poison_core.interop import formats
from poison_core.triggers import apply_trigger
from tests.interop_helpers import THREAT, benchmark_trial, pil, rgb_splits

TRAIN, TEST = rgb_splits()


def imported(path, threat=THREAT):
    return make_attack("imported", {"format": "benchmark", "path": str(path)}).craft(
        CraftContext(train=TRAIN, test=TEST, threat=threat, seed=0))


def _target(folder, obj):
    with (folder / "target.pickle").open("wb") as handle:
        pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)


def poison_test_stamp(target_pil, patch, start):
    """poison_test.py's lines for a 4-tuple target: paste the patch into ToTensor(target), ToPILImage back."""
    startx, starty = start
    p = patch.shape[1]
    tensor = transforms.ToTensor()(target_pil)
    tensor[:, starty:starty + p, startx:startx + p] = torch.tensor(patch)
    return np.asarray(transforms.ToPILImage()(tensor))


def test_triggered_target_reads_as_the_patch_poison_test_pastes(tmp_path):
    info = benchmark_trial(tmp_path / "t", TRAIN, TEST)
    patch = np.random.default_rng(0).random((3, 3, 3)).astype(np.float32)  # what the crafting scripts pass
    _target(tmp_path / "t", (pil(TEST.images[3]), int(TEST.labels[3]), patch, [4, 1]))
    ps = imported(tmp_path / "t")
    assert ps.trigger["kind"] == "fixed_patch" and (ps.trigger["top"], ps.trigger["left"]) == (1, 4)
    assert ps.trigger["target_class"] == info["label"] and ps.trigger["source_class"] == int(TEST.labels[3])
    assert ps.targets == {"kind": "backdoor", "target_class": info["label"], "source_class": int(TEST.labels[3]),
                          "target_ids": [3]}
    ours = apply_trigger(ps.trigger, TEST.images[3:4])[0]
    assert np.array_equal(ours, poison_test_stamp(pil(TEST.images[3]), patch, [4, 1]))


def test_opaque_patch_trigger_round_trips_through_the_benchmark_format(tmp_path):
    threat = ThreatModel(epsilon=255, budget=0.1)
    badnets = make_attack("badnets", {"target_class": 1, "patch_size": 3, "position": "top-left", "margin": 1}).craft(
        CraftContext(train=TRAIN, test=TEST, threat=threat, seed=0))
    formats.write("benchmark", tmp_path / "out", badnets, TRAIN, TEST)
    with (tmp_path / "out" / "target.pickle").open("rb") as handle:
        image, label, patch, start = pickle.load(handle)
    assert patch.shape == (3, 3, 3) and patch.dtype == np.float32 and start == [1, 1]
    # What poison_test.py pastes on the exported target is what our trigger stamps on it.
    [target] = np.flatnonzero(np.all(TEST.images == np.asarray(image), axis=(1, 2, 3)))[:1]
    assert label != 1 and np.array_equal(poison_test_stamp(image, patch, start),
                                         apply_trigger(badnets.trigger, TEST.images[[target]])[0])
    back = imported(tmp_path / "out", threat)
    assert formats.same_poisons(badnets, back)
    assert np.array_equal(apply_trigger(back.trigger, TEST.images), apply_trigger(badnets.trigger, TEST.images))
    formats.write("benchmark", tmp_path / "again", back, TRAIN, TEST)  # the imported trigger writes back alike
    assert formats.input_fingerprint("benchmark", tmp_path / "again") == formats.input_fingerprint(
        "benchmark", tmp_path / "out")


def test_triggers_the_benchmark_cannot_express_are_refused_on_export(tmp_path):
    threat = ThreatModel(epsilon=32, budget=0.1)
    partial = make_attack("badnets", {"target_class": 1, "patch_size": 3}).craft(
        CraftContext(train=TRAIN, test=TEST, threat=threat, seed=0))
    with pytest.raises(DatasetError, match="moves pixels by at most 32 grey levels"):
        formats.write("benchmark", tmp_path / "out", partial, TRAIN, TEST)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("patch, start, message", [
    (torch.rand(3, 3, 3), [0, 0], r"global 'torch\._utils\._rebuild_tensor_v2' is forbidden: a pickled torch tensor "
                                  r"rebuilds its storage with an unrestricted torch.load"),
    (np.zeros((3, 3, 3), np.uint8), [0, 0], r"the patch must be a \(C, p, p\) float array in \[0, 1\], got ndarray"),
    (np.zeros((1, 3, 3), np.float32), [0, 0], r"the patch has shape \(1, 3, 3\); expected \(3, p, p\)"),
    (np.zeros((3, 9, 9), np.float32), [0, 0], r"expected \(3, p, p\) with 1 <= p <= 8"),
    (np.full((3, 3, 3), 1.5, np.float32), [0, 0], r"values must be finite and in \[0, 1\]"),
    (np.zeros((3, 3, 3), np.float32), [6, 0], r"a 3x3 patch at \[startx 6, starty 0\] does not fit 8x8 images"),
    (np.zeros((3, 3, 3), np.float32), [0, -1], r"does not fit"),
    (np.zeros((3, 3, 3), np.float32), [0.5, 0], r"patch location startx must be an integer, got float"),
    (np.zeros((3, 3, 3), np.float32), {"x": 0}, r"the patch location must be \[startx, starty\], got dict"),
    ([[["a"]]], [0, 0], r"the patch must be a \(C, p, p\) array of floats"),
])
def test_malformed_or_hostile_patches_are_one_line(tmp_path, patch, start, message):
    benchmark_trial(tmp_path / "t", TRAIN, TEST)
    _target(tmp_path / "t", (pil(TEST.images[3]), int(TEST.labels[3]), patch, start))
    with pytest.raises(DatasetError, match=message) as info:
        imported(tmp_path / "t")
    assert "\n" not in str(info.value) and "target.pickle" in str(info.value)
