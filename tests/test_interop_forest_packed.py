"""forest's packed export (torch.save([poison_delta, poison_ids])): read as forest writes it, through
torch.load(weights_only=True); hostile files refused in one line."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from poison_core.attacks import CraftContext, make_attack
from poison_core.errors import DatasetError
from poison_core.interop import forest_packed
from tests.interop_helpers import THREAT, rgb_splits

TRAIN, TEST = rgb_splits()
MEAN = torch.tensor([0.4914672374725342, 0.4822617471218109, 0.4467701315879822])[:, None, None]
STD = torch.tensor(forest_packed.FOREST_STD["cifar10"])[:, None, None]


def imported(path, normalization="cifar10"):
    params = {"format": "forest-packed", "path": str(path), "normalization": normalization}
    return make_attack("imported", params).craft(CraftContext(train=TRAIN, test=TEST, threat=THREAT, seed=0))


def forest_pixels(clean: np.ndarray, delta: torch.Tensor) -> np.ndarray:
    """What forest's full export writes for these deltas: normalise (ToTensor, Normalize), add the delta,
    then _torch_to_PIL (clamp(x * ds + dm, 0, 1).mul(255).add_(0.5).clamp_(0, 255).to(uint8)), in float32."""
    out = []
    for image, d in zip(clean, delta):
        x = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - MEAN) / STD
        x = x + d
        out.append(torch.clamp(x * STD + MEAN, 0, 1).mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0)
                   .to(torch.uint8).numpy())
    return np.stack(out)


def packed(folder, ids, numpy_ids=False, seed=0, eps=8):
    """A folder as forest's export_poison(mode='packed') leaves it: deltas within eps/255 in normalised
    units (forest's projection), the ids a tensor or (its benchmark runs) the setups' numpy array."""
    gen = torch.Generator().manual_seed(seed)
    delta = (torch.rand((len(ids), 3, 8, 8), generator=gen) * 2 - 1) * (eps / 255) / STD
    folder.mkdir(parents=True, exist_ok=True)
    raw_ids = np.asarray(ids, dtype=np.int64) if numpy_ids else torch.tensor(ids)
    torch.save([delta, raw_ids], folder / "poisons_packed_2026-12-06.pth")
    return delta


@pytest.mark.parametrize("numpy_ids", [False, True])
def test_packed_file_written_like_forest_imports_as_forest_would_export_it(tmp_path, numpy_ids):
    ids = [int(i) for i in TRAIN.ids[TRAIN.labels == 1][:5]]
    delta = packed(tmp_path / "f", ids, numpy_ids=numpy_ids)
    ps = imported(tmp_path / "f")
    order = np.argsort(ps.ids)
    assert ps.ids[order].tolist() == sorted(ids) and not ps.flipped.any()
    expected = forest_pixels(TRAIN.images[TRAIN.positions(np.asarray(ids))], delta)
    diff = np.abs(ps.images[order].astype(int) - expected[np.argsort(ids)].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # float64 here, float32 in forest: ties may differ
    assert ps.targets == {"kind": "availability"} and ps.provenance["import"]["normalization"] == "cifar10"


def test_wrong_normalisation_is_caught_by_the_epsilon_audit(tmp_path):
    packed(tmp_path / "f", [int(i) for i in TRAIN.ids[:4]])
    with pytest.raises(Exception, match=r"exceeds epsilon 8/255"):
        imported(tmp_path / "f", normalization="none")  # deltas ~4x too large read as unnormalised


def test_normalisation_must_be_named_off_cifar10(tmp_path):
    packed(tmp_path / "f", [int(i) for i in TRAIN.ids[:4]])
    with pytest.raises(DatasetError, match=r"params.normalization: forest-packed deltas are in forest's normalised"):
        imported(tmp_path / "f", normalization=None)
    with pytest.raises(ValueError, match=r"normalization"):  # the config's Literal: one line in a YAML
        imported(tmp_path / "f", normalization="svhn")


class _System:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _save(folder, obj):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(obj, folder / "poisons_packed_x.pth")


DELTA = torch.zeros((2, 3, 8, 8))


@pytest.mark.parametrize("obj, message", [
    ([DELTA, _System()], r"refused by torch.load\(weights_only=True\): global '(posix|os|nt)\.system' is forbidden"),
    ([DELTA, np.array([1, 2], dtype=object)], r"refused by torch.load\(weights_only=True\): global "
                                              r"'numpy.dtypes.ObjectDType' is forbidden"),
    ([DELTA, np.array([1.0, 2.0])], r"global 'numpy.dtypes.Float64DType' is forbidden"),
    ({"delta": DELTA}, r"expected \[poison_delta, poison_ids\] \(forest's packed export\), got dict"),
    ([DELTA, torch.tensor([1.0, 2.0])], r"poison_ids must be integers, got torch.float32"),
    ([DELTA, torch.tensor([1, 2, 3])], r"\(3,\) poison_ids for 2 deltas"),
    ([torch.zeros((2, 1, 8, 8)), torch.tensor([1, 2])], r"poison_delta has shape \(2, 1, 8, 8\); the dataset's "
                                                        r"images are \(P, 3, 8, 8\)"),
    ([torch.zeros((2, 3, 8, 8), dtype=torch.int64), torch.tensor([1, 2])], r"poison_delta must be a float tensor"),
    ([torch.full((2, 3, 8, 8), float("nan")), torch.tensor([1, 2])], r"NaN or infinite"),
    ([DELTA, torch.tensor([1, 10**6])], r"poison id 1000000 is not in the config's training split"),
    ([torch.zeros((7, 3, 8, 8)), torch.arange(7)], r"holds 7 poisons; the threat model's budget allows at most 6"),
])
def test_hostile_packed_files_are_one_line(tmp_path, obj, message):
    _save(tmp_path / "f", obj)
    with pytest.raises(DatasetError, match=message) as info:
        imported(tmp_path / "f")
    assert "\n" not in str(info.value)


def test_plain_pickle_oversized_and_ambiguous_folders_are_refused(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "poisons_packed_x.pth").write_bytes(pickle.dumps([_System()]))  # not torch's format
    with pytest.raises(DatasetError, match=r"refused by torch.load\(weights_only=True\)"):
        imported(tmp_path / "p")
    with (tmp_path / "big.pth").open("wb") as handle:
        handle.truncate(20 * 2**20)  # sparse; 6 poisons of 8x8x3 float64 need far less
    with pytest.raises(DatasetError, match=r"is 20971520 bytes, more than the limit of"):
        imported(tmp_path / "big.pth")
    packed(tmp_path / "two", [int(TRAIN.ids[0])])
    torch.save([DELTA, torch.tensor([1, 2])], tmp_path / "two" / "poisons_packed_other.pth")
    with pytest.raises(DatasetError, match=r"holds 2 poisons_packed_\*\.pth files; name one"):
        imported(tmp_path / "two")
