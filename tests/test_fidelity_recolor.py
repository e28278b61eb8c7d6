"""MetaPoison's colour perturbation, ReColorAdv (Laidlaw & Feizi, NeurIPS 2019; reference
github:wronnyhuang/metapoison recolor.py, meta.py ``colorperts`` / ``clipop_colorperts``):

* the transform: the identity at zero parameters, |shift| <= bound after the projection, differentiable,
  a smoothness term that is zero for a constant shift;
* MetaPoison with recolor: the colour meta-gradient is the loss's gradient plus the smoothness term's;
  a tiny run on digits gives a PoisonSet that audits, round-trips through Parquet and is seeded;
* the audit: colour parameters under color_epsilon 0, out of bound, NaN, or pixels that do not match the
  recomputed colour-shifted base all fail with one line; the preflight refuses recolor without a bound;
* recolor off: the same bytes as before (a digest measured at commit 42a8514, torch 2.14.1)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from poison_core import __version__
from poison_core.attacks import CraftContext, make_attack
from poison_core import recolor as rc
from poison_core.attacks._unroll import unrolled_recolor_grad
from poison_core.attacks.metapoison import MetaPoisonWorker
from poison_core.config import BenchmarkConfig, DatasetConfig, ModelConfig, TargetSelection, ThreatModel
from poison_core.data import load_dataset
from poison_core.errors import AuditError, ConfigError, DatasetError, InputError
from poison_core.io import bytes_to_table, table_to_bytes
from poison_core.models import build_model
from poison_core.poisons import (PoisonSet, additive_linf, audit, from_parquet_bytes, read_poison_set,
                                 to_parquet_bytes, write_poison_set)
from poison_core.preflight import check_benchmark
from tests.helpers import tiny_dataset

SPLITS = load_dataset(DatasetConfig(name="digits", n_train=200, n_test=60, seed=0))
TRAIN, TEST = SPLITS.train, SPLITS.test
FAST = {"steps": 2, "n_models": 2, "stagger_epochs": 2, "batch_size": 16, "epoch_batches": 3}
OFF_DIGEST = "c40052405eaa57fad94a3a5605b8eed2c16c65fb033ef3274adde31ff2955e80"
OFF_PARQUET = "34cd9d45f064c742fc60e5b612ef51a18aa841550c041a8773963420d7cfc0c5"  # code 0.2.0, pyarrow 25.0.1


def threat(color_epsilon: float = 0.04) -> ThreatModel:
    return ThreatModel(epsilon=16, budget=0.1, clean_label=True, targets=TargetSelection(n_targets=1),
                       color_epsilon=color_epsilon)


@pytest.fixture(scope="module")
def architecture(one_thread):
    return build_model(ModelConfig(name="convnet", width=8), TRAIN.image_shape, TRAIN.num_classes, seed=0)


def craft(architecture, params: dict, th: ThreatModel) -> PoisonSet:
    ctx = CraftContext(train=TRAIN, test=TEST, threat=th, seed=0, surrogates=[architecture])
    return make_attack("metapoison", {**FAST, **params}).craft(ctx)


@pytest.fixture(scope="module")
def recolored(architecture) -> PoisonSet:
    return craft(architecture, {"recolor": True}, threat())


def random_params(n: int, channels: int, points: int, scale: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, *([points] * channels), channels)
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale


@pytest.mark.parametrize("channels", [1, 3])
def test_zero_parameters_are_the_identity(channels):
    images = tiny_dataset(n=6, shape=(5, 5, channels)).images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    assert torch.allclose(rc.recolor(x, rc.zero_params(6, channels, 10, torch.float64)), x, atol=1e-12)
    assert np.array_equal(rc.shifted_base(images, np.zeros((6, *[10] * channels, channels), np.float32)), images)


@pytest.mark.parametrize("channels", [1, 3])
def test_projection_bounds_every_shift_and_keeps_the_grid_in_colour_space(channels):
    theta = rc.project(random_params(4, channels, 10, 0.5), 0.04)
    assert theta.abs().max() <= 0.04 and theta.abs().max() > 0.039
    moved = rc.grid_points(theta.shape[1:-1], torch.float64) + theta
    for axis in range(channels):
        assert moved[..., axis].min() >= rc.GRID_LOW[channels][axis]
        assert moved[..., axis].max() <= rc.GRID_HIGH[channels][axis]
    gen = torch.Generator().manual_seed(1)
    x = 0.3 + 0.4 * torch.rand(4, channels, 6, 6, generator=gen, dtype=torch.float64)  # stays inside the box
    y = rc.recolor(x, theta)
    if channels == 3:  # the shift is bounded in the colour space (YUV), pixel by pixel
        yuv = torch.tensor(rc.RGB_TO_YUV, dtype=torch.float64)
        x, y = x.permute(0, 2, 3, 1) @ yuv, y.permute(0, 2, 3, 1) @ yuv
    assert (y - x).abs().max() <= 0.04 + 1e-12 and (y - x).abs().max() > 0.01


def test_transform_is_differentiable_in_its_parameters():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 3, 3, generator=gen, dtype=torch.float64) * 0.6 + 0.2
    theta = rc.project(random_params(2, 3, 3, 0.1), 0.04).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: rc.recolor(x, t), (theta,))
    assert torch.autograd.gradcheck(rc.smoothness, (theta,))


def test_smoothness_is_zero_for_a_constant_shift_and_the_reference_mean_otherwise():
    assert rc.smoothness(torch.full((3, 10, 10, 10, 3), 0.03)) == 0
    theta = random_params(2, 3, 4, 0.04)
    diffs = [(theta.diff(dim=a) * 4) ** 2 for a in (1, 2, 3)]  # reference: (d * ncolorres)^2, one mean
    expected = torch.cat([d.reshape(-1) for d in diffs]).mean()
    assert float(rc.smoothness(theta)) == pytest.approx(float(expected), rel=1e-12)
    assert rc.smoothness(theta) > 0


def test_colour_meta_gradient_is_the_loss_gradient_plus_the_smoothness_gradient(architecture):
    """The unrolled gradient in theta matches a finite difference; the worker adds lambda * dR/dtheta
    once per unroll (reference objective cwT + smoothobj, accumulated per poison batch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    bases = torch.from_numpy(TRAIN.images[:4]).permute(0, 3, 1, 2).double() / 255
    theta = rc.project(random_params(4, 1, 10, 0.04, seed=3), 0.04)
    delta, labels = torch.zeros_like(bases), torch.tensor([0, 1, 2, 0])
    batch = (bases[:0], labels[:0], torch.arange(4))
    target = torch.from_numpy(TEST.images[:1]).permute(0, 3, 1, 2).double() / 255

    def loss_at(t: torch.Tensor) -> float:
        return unrolled_recolor_grad(model, bases, delta, t, labels, [batch, batch], target, 1, 0.5)[0]

    _, _, grad = unrolled_recolor_grad(model, bases, delta, theta, labels, [batch, batch], target, 1, 0.5)
    direction = random_params(4, 1, 10, 1.0, seed=4)
    direction[:, [0, -1]] = 0  # black and white pixels sit at the clamp's kink there (theta projected to 0)
    h = 1e-5
    numeric = (loss_at(theta + h * direction) - loss_at(theta - h * direction)) / (2 * h)
    assert float((grad * direction).sum()) == pytest.approx(numeric, rel=1e-4, abs=1e-7)

    pos = np.flatnonzero(TRAIN.labels == 0)[:4]
    color = rc.project(random_params(4, 1, 10, 0.04, seed=5), 0.04).float().numpy()
    grads = {}
    for lam in (0.0, 1.0):
        params = make_attack("metapoison", {**FAST, "recolor": True, "unroll_batch": "mixed",
                                            "recolor_smoothness": lam}).params
        worker = MetaPoisonWorker(architecture, TRAIN.images, TRAIN.labels, pos, TEST.images[:1], 1, params, 0, 0)
        grads[lam] = worker.adversarial_grad(np.zeros((4, 1, 8, 8), np.float32), 0, color)[2]
    smooth = torch.from_numpy(color).requires_grad_(True)
    (expected,) = torch.autograd.grad(rc.smoothness(smooth), smooth)
    assert np.allclose(grads[1.0] - grads[0.0], expected.numpy(), atol=1e-7)
    assert np.abs(expected.numpy()).max() > 1e-4


def test_recolored_poisons_audit_round_trip_and_are_seeded(architecture, recolored, tmp_path):
    ps = recolored
    assert ps.color.shape == (20, 10, 1) and ps.color.dtype == np.float32
    assert np.abs(ps.color).max() <= np.float32(0.04) and np.abs(ps.color).max() > 0.03
    audit(ps, TRAIN, threat())
    assert additive_linf(ps, TRAIN) <= 16
    clean = TRAIN.images[TRAIN.positions(ps.ids)].astype(int)
    assert np.abs(ps.images.astype(int) - clean).max() > 16  # the colour part moves pixels beyond eps
    uri = str(tmp_path / "recolor.parquet")
    write_poison_set(ps, uri, TRAIN)
    back = read_poison_set(uri, TRAIN, threat())
    assert np.array_equal(back.color, ps.color) and np.array_equal(back.images, ps.images)
    assert to_parquet_bytes(back) == to_parquet_bytes(ps)
    assert back.provenance["params"]["recolor"] is True and back.threat.color_epsilon == 0.04
    assert to_parquet_bytes(craft(architecture, {"recolor": True}, threat())) == to_parquet_bytes(ps)


def test_recolor_without_a_colour_bound_is_refused_before_any_work(architecture):
    with pytest.raises(ConfigError, match=r"^threat\.color_epsilon: .*allowed: 0 < color_epsilon <= 1"):
        craft(architecture, {"recolor": True}, threat(0.0))
    cfg = BenchmarkConfig(name="recolor", dataset=DatasetConfig(name="digits", n_train=200, n_test=60),
                          threat=threat(0.0), attacks=({"name": "metapoison", "params": {"recolor": True}},))
    with pytest.raises(InputError, match=r"^attacks\.metapoison: threat\.color_epsilon: ") as info:
        check_benchmark(cfg, SPLITS)
    assert "\n" not in str(info.value)


def test_audit_refuses_colour_parameters_under_color_epsilon_zero(recolored):
    with pytest.raises(AuditError, match=r"^poison set has a colour perturbation .* threat\.color_epsilon is 0"):
        audit(forged(recolored, threat=threat(0.0)), TRAIN)
    with pytest.raises(AuditError, match=r"recorded threat model differs.*color_epsilon 0\.04 \(expected None\)"):
        audit(recolored, TRAIN, threat(0.0))


def forged(ps: PoisonSet, **changes) -> PoisonSet:
    fields = {"ids": ps.ids, "images": ps.images, "orig_labels": ps.orig_labels, "poison_labels": ps.poison_labels,
              "threat": ps.threat, "n_train": ps.n_train, "targets": ps.targets, "provenance": ps.provenance,
              "color": ps.color}
    return PoisonSet(**{**fields, **changes})


def test_audit_refuses_forged_colour_parameters_and_pixels(recolored, tmp_path):
    ps = recolored
    with pytest.raises(AuditError, match=r"^colour parameter 0\.08 exceeds threat\.color_epsilon 0\.04$"):
        audit(forged(ps, color=ps.color * 2), TRAIN, threat())
    with pytest.raises(AuditError, match=r"colour parameter nan exceeds"):
        audit(forged(ps, color=np.where(np.arange(ps.color.size).reshape(ps.color.shape) == 7, np.nan, ps.color)),
              TRAIN, threat())
    base = rc.shifted_base(TRAIN.images[TRAIN.positions(ps.ids)], ps.color).astype(int)
    images = ps.images.copy()
    images[0, 0, 0, 0] = base[0, 0, 0, 0] + 17 if base[0, 0, 0, 0] + 17 <= 255 else base[0, 0, 0, 0] - 17
    with pytest.raises(AuditError, match=r"^perturbation L-inf 17/255 over the colour-shifted base exceeds epsilon"):
        audit(forged(ps, images=images), TRAIN, threat())
    with pytest.raises(AuditError, match=r"do not fit 1-channel images"):
        audit(forged(ps, color=np.zeros((20, 10, 10, 1), np.float32)), TRAIN, threat())
    # a forged file: the pixels kept, every colour parameter flipped (still within the bound)
    table = bytes_to_table(to_parquet_bytes(ps), "test")
    column = table.column("color").combine_chunks()
    flipped = pa.FixedSizeListArray.from_arrays(pa.array(-column.flatten().to_numpy()), column.type.list_size)
    uri = tmp_path / "forged.parquet"
    uri.write_bytes(table_to_bytes(table.set_column(table.column_names.index("color"), "color", flipped)))
    with pytest.raises(AuditError, match=r"^.*forged\.parquet: perturbation L-inf \d+/255 over the colour-shifted"):
        read_poison_set(str(uri), TRAIN, threat())
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"belladonna.color_grid"}
    with pytest.raises(DatasetError, match=r"colour column needs its grid"):
        from_parquet_bytes(table_to_bytes(table.replace_schema_metadata(meta)))


def test_audit_accepts_hand_made_rgb_colour_poisons():
    train = tiny_dataset(n=40, shape=(4, 4, 3))
    pos = np.arange(4)
    theta = rc.project(random_params(4, 3, 5, 0.04, seed=6), 0.04).float()
    delta = (torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(7)) * 2 - 1) * 8 / 255
    images = rc.quantize_recolored(train.images[pos], theta, delta, 8)
    th = ThreatModel(epsilon=8, budget=0.1, clean_label=True, color_epsilon=0.04)
    ps = PoisonSet(ids=train.ids[pos], images=images, orig_labels=train.labels[pos], poison_labels=train.labels[pos],
                   threat=th, n_train=len(train), color=theta.numpy())
    audit(ps, train)
    assert 0 < additive_linf(ps, train) <= 8
    assert np.array_equal(from_parquet_bytes(to_parquet_bytes(ps)).color, ps.color)


def test_recolor_off_gives_the_same_bytes_as_before(architecture):
    default = craft(architecture, {}, threat(0.0))
    explicit = craft(architecture, {"recolor": False, "recolor_grid": 4, "recolor_smoothness": 7.0}, threat(0.0))
    data = to_parquet_bytes(default)
    assert to_parquet_bytes(explicit) == data and default.color is None
    table = bytes_to_table(data, "test")
    assert table.column_names == ["id", "image", "orig_label", "poison_label"]
    assert b"belladonna.color_grid" not in table.schema.metadata
    assert b"color_epsilon" not in table.schema.metadata[b"belladonna.threat"]
    assert not any(k.startswith("recolor") for k in default.provenance["params"])
    if torch.__version__.split("+")[0] != "2.14.1":
        pytest.skip(f"the digests were measured with torch 2.14.1, not {torch.__version__}")
    digest = hashlib.sha256()
    for array in (default.ids, default.images, default.orig_labels, default.poison_labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    assert digest.hexdigest() == OFF_DIGEST
    if __version__ == "0.2.0" and pa.__version__ == "25.0.1":
        assert hashlib.sha256(data).hexdigest() == OFF_PARQUET
