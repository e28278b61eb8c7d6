"""Interop formats: round trips, fixtures written the way each tool writes them, hostile pickles."""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poison_core.attacks import CraftContext, make_attack
from poison_core.errors import AuditError, DatasetError
from poison_core.interop import FORMATS, formats
from poison_core.safe_pickle import numpy_globals, pil_globals, safe_loads
from poison_core.poisons import to_parquet_bytes
from tests.interop_helpers import THREAT, benchmark_trial, rgb_splits

TRAIN, TEST = rgb_splits()


OPTIONS = {"forest-packed": {"normalization": "cifar10"}}
"""Options a format needs on the toy data (forest-packed: forest's normalisation; the toy is not CIFAR-10)."""


def imported(fmt: str, path: Path, threat=THREAT, **options):
    params = {"format": fmt, "path": str(path), **OPTIONS.get(fmt, {}), **options}
    return make_attack("imported", params).craft(CraftContext(train=TRAIN, test=TEST, threat=threat, seed=0))


def test_benchmark_trial_written_like_the_benchmark_imports(tmp_path):
    info = benchmark_trial(tmp_path / "trial", TRAIN, TEST)
    ps = imported("benchmark", tmp_path / "trial")
    order = np.argsort(info["ids"])
    assert np.array_equal(np.sort(ps.ids), info["ids"][order])
    assert np.array_equal(ps.images[np.argsort(ps.ids)], info["images"][order])
    assert set(ps.poison_labels) == {info["label"]} and not ps.flipped.any()
    assert ps.targets["target_ids"] == [info["target"]] and ps.targets["adversarial_classes"] == [info["label"]]
    sources = ps.provenance["import"]["sources"]
    assert ps.provenance["attack"] == "imported" and sorted(sources) == ["base_indices.pickle", "poisons.pickle",
                                                                        "target.pickle"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_then_import_gives_the_same_poison_set(tmp_path, fmt):
    benchmark_trial(tmp_path / "trial", TRAIN, TEST)
    original = imported("benchmark", tmp_path / "trial")
    formats.write(fmt, tmp_path / fmt, original, TRAIN, TEST, **OPTIONS.get(fmt, {}))
    back = imported(fmt, tmp_path / fmt)
    assert formats.same_poisons(original, back)
    # Byte-identical apart from where the files came from (provenance) and, for forest's numpy and
    # packed modes, the goal, which those formats cannot carry.
    goal = original.targets if fmt in ("forest-numpy", "forest-packed") else back.targets
    if fmt in ("forest-numpy", "forest-packed"):
        assert back.targets == {"kind": "availability"}
    assert to_parquet_bytes(replace(back, provenance=original.provenance, targets=goal)) == to_parquet_bytes(original)
    # A second export of the re-imported set writes the same bytes: the exporters are deterministic.
    formats.write(fmt, tmp_path / f"{fmt}-2", back, TRAIN, TEST, **OPTIONS.get(fmt, {}))
    if fmt != "arrays":  # np.savez stamps the archive members with the current time
        assert formats.input_fingerprint(fmt, tmp_path / fmt) == formats.input_fingerprint(fmt, tmp_path / f"{fmt}-2")


def _poisoned_copy(seed: int = 2):
    """Five bases of class 1 perturbed within 8, as forest adds poison_delta to its trainset."""
    rng = np.random.default_rng(seed)
    ids = np.flatnonzero(TRAIN.labels == 1)[:5]
    images = TRAIN.images.copy()
    images[ids] = np.clip(images[ids].astype(int) + rng.integers(-8, 9, images[ids].shape), 0, 255).astype(np.uint8)
    return ids, images


def test_forest_numpy_written_like_forest_imports(tmp_path):
    ids, images = _poisoned_copy()
    # forest: training_data = np.zeros([N, h, w, 3]) (float64), filled row idx by idx; labels likewise.
    (tmp_path / "f").mkdir()
    np.save(tmp_path / "f" / "poisoned_training_data.npy", images.astype(np.float64))
    np.save(tmp_path / "f" / "poisoned_training_labels.npy", TRAIN.labels.astype(np.float64))
    ps = imported("forest-numpy", tmp_path / "f")
    assert np.array_equal(np.sort(ps.ids), ids) and np.array_equal(ps.images[np.argsort(ps.ids)], images[ids])


def test_forest_full_tree_written_like_forest_imports(tmp_path):
    ids, images = _poisoned_copy()
    root = tmp_path / "full"
    for split, data, labels in (("train", images, TRAIN.labels), ("test", TEST.images, TEST.labels)):
        for idx, (image, label) in enumerate(zip(data, labels)):
            folder = root / split / TRAIN.class_names[label]
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).save(folder / f"{idx}.png")
    os.makedirs(root / "targets" / "cat")
    Image.fromarray(TEST.images[4]).save(root / "targets" / "cat" / "4.png")  # test 4 is class 1, intended cat
    ps = imported("forest-full", root)
    assert np.array_equal(np.sort(ps.ids), ids)
    assert ps.targets["target_ids"] == [4] and ps.targets["adversarial_classes"] == [0]


def test_plain_npz_with_paper_key_names_imports(tmp_path):
    ids, images = _poisoned_copy()
    np.savez(tmp_path / "p.npz", x=images[ids], idx=ids)  # no labels: the clean ones are kept
    ps = imported("arrays", tmp_path / "p.npz")
    assert np.array_equal(np.sort(ps.ids), ids) and ps.targets == {"kind": "availability"} and not ps.flipped.any()


def test_fingerprint_follows_content_not_location(tmp_path):
    benchmark_trial(tmp_path / "a", TRAIN, TEST)
    benchmark_trial(tmp_path / "b", TRAIN, TEST)
    benchmark_trial(tmp_path / "c", TRAIN, TEST, seed=9)
    fp = {d: make_attack("imported", {"format": "benchmark", "path": str(tmp_path / d)}).input_fingerprint()
          for d in "abc"}
    assert fp["a"] == fp["b"] != fp["c"]


class _System:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class Unknown:
    pass


ALLOWED = {**numpy_globals(), **pil_globals()}


@pytest.mark.parametrize("payload, message", [
    (pickle.dumps([_System()]), r"global '(posix|os|nt)\.system' is forbidden"),
    (pickle.dumps([Unknown()]), r"global 'test_interop\.Unknown' is forbidden|global 'tests\.test_interop\.Unknown'"),
    (pickle.dumps(np.array([object()], dtype=object)), "holds Python objects"),
    (pickle.dumps([(Image.fromarray(np.zeros((4, 4, 3), np.uint8)), 1)])[:-20], "truncated|UnpicklingError"),
])
def test_hostile_pickles_are_refused_with_one_line(payload, message):
    with pytest.raises(DatasetError, match=message) as info:
        safe_loads(payload, ALLOWED, "poisons.pickle")
    assert "\n" not in str(info.value)


def test_pil_state_claiming_a_huge_image_is_refused_before_allocation():
    # A PIL image pickle as protocol 2 spells it (GLOBAL, NEWOBJ, BUILD state), whose state claims
    # 100000 x 100000 pixels: PIL's own __setstate__ would allocate 30 GB before looking at the data.
    state = pickle.dumps([{}, "RGB", (100_000, 100_000), None, b"abc"], protocol=2)[2:-1]
    payload = b"\x80\x02cPIL.Image\nImage\n)\x81" + state + b"b."
    with pytest.raises(DatasetError, match="outside 1..8192 per side"):
        safe_loads(payload, ALLOWED, "poisons.pickle")


def _replace_pickle(folder: Path, name: str, obj) -> None:
    with (folder / name).open("wb") as handle:
        pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)


def test_more_poisons_than_the_budget_are_refused_before_conversion(tmp_path):
    benchmark_trial(tmp_path / "t", TRAIN, TEST)
    tiny = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    _replace_pickle(tmp_path / "t", "poisons.pickle", [(tiny, 1)] * 50_000)  # memo references: 2 bytes each
    with pytest.raises(DatasetError, match=r"poisons.pickle is \d+ bytes, more than the 6784 this format can need"):
        imported("benchmark", tmp_path / "t")  # refused by its size, before it is unpickled
    _replace_pickle(tmp_path / "t", "poisons.pickle", [(tiny, 1)] * 7)
    with pytest.raises(DatasetError, match="holds 7 poisons; the threat model's budget allows at most 6"):
        imported("benchmark", tmp_path / "t")


def test_mismatched_bases_are_refused_with_count_and_first_index(tmp_path):
    info = benchmark_trial(tmp_path / "t", TRAIN, TEST)
    _replace_pickle(tmp_path / "t", "base_indices.pickle", list(info["ids"] + 3))  # same class, other images
    with pytest.raises(DatasetError, match=rf"5 of 5 poisons do not match their bases .* first base index "
                                           rf"{info['ids'][0] + 3} "):
        imported("benchmark", tmp_path / "t")


def test_out_of_epsilon_poisons_fail_the_audit(tmp_path):
    benchmark_trial(tmp_path / "t", TRAIN, TEST, eps=12)
    with pytest.raises(AuditError, match=r"L-inf 12/255 exceeds epsilon 8/255"):
        imported("benchmark", tmp_path / "t")


def test_unknown_target_is_refused(tmp_path):
    benchmark_trial(tmp_path / "t", TRAIN, TEST)
    _replace_pickle(tmp_path / "t", "target.pickle", (Image.fromarray(255 - TEST.images[3]), 0))
    with pytest.raises(DatasetError, match="matches no image of the config's test split"):
        imported("benchmark", tmp_path / "t")


def test_npy_header_claiming_too_much_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "indices.npy", np.arange(10_000))
    np.save(tmp_path / "d" / "poisons.npy", np.zeros((10_000, 8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="claims .* more than the"):
        imported("arrays", tmp_path / "d")
