"""Plug-ins: entry points of pip-installed distributions, import strings, broken plug-ins, the user's own
model and weights, and the contract check failing on deliberately bad members.

A distribution is installed with the real pip (``pip install --target``) into a folder of the test's own,
which a subprocess puts on its path: the environment the suite runs in is never changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from poison_core.config import load_benchmark
from poison_core.contract import ContractError, check_member
from poison_core.data import load_dataset
from poison_core.errors import ConfigError, PluginError, UnknownNameError
from poison_core.members import check_names
from poison_core.protocols import build_victim

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin"

BROKEN_PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"
[project]
name = "broken-plugin"
version = "0.0.1"
[project.entry-points."belladonna.attacks"]
fails_to_import = "broken_plugin.missing:Nothing"
badnets = "broken_plugin.shadow:Shadow"
not_an_attack = "broken_plugin.shadow:NOT_AN_ATTACK"
[tool.setuptools]
packages = ["broken_plugin"]
"""


def pip_target(tmp: Path, *packages: Path) -> Path:
    """`pip install --target` of `packages` (no dependencies, no network) into `tmp/site`."""
    target = tmp / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), *map(str, packages)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return target


def broken_package(tmp: Path) -> Path:
    root = tmp / "broken"
    (root / "broken_plugin").mkdir(parents=True)
    (root / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (root / "broken_plugin" / "__init__.py").write_text("")
    (root / "broken_plugin" / "shadow.py").write_text(textwrap.dedent("""
        from poison_core.plugin import Attack
        NOT_AN_ATTACK = 42
        class Shadow(Attack):
            name, paper, summary = "badnets", "-", "tries to replace a built-in"
            def _craft(self, ctx, n_poison, rng):
                raise AssertionError("never used")
    """))
    return root


def cli(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "belladonna.cli", *args], capture_output=True, text=True,
                          timeout=900, env=env)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("plugins")
    return pip_target(tmp, EXAMPLE, broken_package(tmp))


def test_listings_show_origins_and_broken_plugins_and_the_rest_still_works(site):
    attacks = cli(site, "attacks")
    assert attacks.returncode == 0, attacks.stderr
    assert "checker_noise" in attacks.stdout and "belladonna-example-plugin 0.1.0" in attacks.stdout
    assert "label_flip" in attacks.stdout and "built-in" in attacks.stdout
    flat = " ".join(attacks.stdout.split())
    assert "fails_to_import" in flat and "ModuleNotFoundError" in flat
    assert "shadows the built-in attack 'badnets'" in flat and "not an Attack subclass" in flat
    models = cli(site, "models")
    assert "tiny_cnn" in models.stdout and "belladonna-example-plugin" in models.stdout


@pytest.mark.parametrize("attack, message", [
    ("fails_to_import", "plug-in entry point 'fails_to_import' (belladonna.attacks) from broken-plugin 0.0.1: "
                        "ModuleNotFoundError"),
    ("not_an_attack", "from broken-plugin 0.0.1: 42 is not an Attack subclass"),
])
def test_a_config_using_a_broken_plugin_is_one_line_and_exit_2(site, tmp_path, attack, message):
    config = tmp_path / "bad.yaml"
    config.write_text(f"name: b\nattacks: [{{name: {attack}}}]\n")
    proc = cli(site, "validate", str(config))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    config.write_text("name: ok\nattacks: [{name: checker_noise}, {name: badnets}]\n"
                      "threat: {clean_label: false}\ndefenses: [{name: median_filter}]\n")
    good = cli(site, "validate", str(config))  # the built-in badnets is the one used, not the shadow
    assert good.returncode == 2 and "threat.clean_label: checker_noise is a clean-label attack" in good.stderr


def test_the_example_plugins_members_pass_the_contract_from_the_command_line(site):
    for kind, name in (("attack", "checker_noise"), ("defense", "median_filter"), ("model", "tiny_cnn")):
        proc = cli(site, "check", kind, name)
        assert proc.returncode == 0 and f"{kind} {name!r} passes the contract" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_the_example_plugin_runs_in_a_grid(site, tmp_path):
    config = tmp_path / "grid.yaml"
    config.write_text("""
name: plugin-grid
dataset: {name: digits, n_train: 300, n_test: 100}
victim: {model: {name: tiny_cnn, width: 8}, train: {epochs: 2, batch_size: 64}}
threat: {epsilon: 16, budget: 0.1, clean_label: true}
attacks: [{name: checker_noise}, {name: random_noise}]
defenses: [{name: none}, {name: median_filter}]
seeds: [0]
""")
    proc = cli(site, "run", str(config), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "plugin-grid" / "results.json").read_text())
    cells = {(r["attack"], r["defense"]) for r in results["rows"]}
    assert cells == {(a, d) for a in ("checker_noise", "random_noise") for d in ("none", "median_filter")}
    assert all(0.0 <= r["clean_acc"] <= 1.0 for r in results["rows"])


def test_members_by_import_string_and_unknown_ones():
    cfg = load_benchmark("name: s\nattacks: [{name: 'tests.plugin_members:Halves', id: halves}]\n"
                         "threat: {epsilon: 0, budget: 0.1}\n")
    assert cfg.attacks[0].key == "halves"
    from tasks import keys

    prefix = keys.dataset_prefix(cfg.dataset)
    assert keys.poison_key(cfg, prefix, cfg.attacks[0], 0).startswith("poisons/halves-")
    plain = load_benchmark("name: s\nattacks: [{name: 'tests.plugin_members:Halves'}]\nthreat: {epsilon: 0}\n")
    assert keys.poison_key(plain, prefix, plain.attacks[0], 0).startswith("poisons/tests.plugin_members_Halves-")
    with pytest.raises(ConfigError, match="cannot import 'Nothing' from 'tests.plugin_members'"):
        check_names(load_benchmark("name: s\nattacks: [{name: 'tests.plugin_members:Nothing'}]\n"))
    with pytest.raises(ConfigError, match="is not an Attack subclass"):
        check_names(load_benchmark("name: s\nattacks: [{name: 'tests.plugin_members:median'}]\n"))
    from poison_core.attacks import ATTACKS

    with pytest.raises(UnknownNameError):
        ATTACKS.get("no_such_attack")
    with pytest.raises(PluginError):
        ATTACKS.get("no.such.module:Thing")


@pytest.mark.parametrize("member, check", [
    ("tests.plugin_members:TooLoud", "epsilon"),
    ("tests.plugin_members:Relabels", "labels kept under clean-label"),
    ("tests.plugin_members:Unseeded", "deterministic"),
])
def test_the_contract_fails_with_a_clear_message_on_a_bad_attack(member, check):
    with pytest.raises(ContractError, match=f"attack '{member}' fails '{check}'"):
        check_member("attack", member)


def test_the_contract_fails_on_a_model_without_the_features_head_split():
    with pytest.raises(ContractError, match="fails 'features/head'"):
        check_member("model", "tests.plugin_members:no_head")


def test_a_torchvision_model_by_import_string_starts_from_the_users_weights(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18, resnet34

    torch.manual_seed(3)
    trained = resnet18(num_classes=5)  # another number of classes: the head is the only layer re-initialised
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    cfg = load_benchmark(f"""
name: w
dataset: {{name: digits, n_train: 64, n_test: 32}}
victim: {{model: {{name: 'torchvision.models:resnet18', weights: '{tmp_path / 'r18.safetensors'}'}},
         protocol: finetune, train: {{epochs: 1, batch_size: 32}}}}
attacks: [{{name: label_flip}}]
threat: {{epsilon: 0}}
""")
    train = load_dataset(cfg.dataset).train
    victim = build_victim(cfg.victim, train, seed=0, device="cpu")
    assert torch.equal(victim.body.layer4[1].conv2.weight, trained.layer4[1].conv2.weight)
    assert victim.head.out_features == 10 and victim.repeat  # 1-channel digits into a 3-channel model
    from poison_core.defenses import DefenseContext, make_defense

    result = make_defense("none").fit(DefenseContext(train=train, victim=cfg.victim, seed=0))
    assert result.classifier.predict_logits(train.images[:4]).shape == (4, 10)
    assert not torch.equal(result.classifier.model.body.layer4[1].conv2.weight, trained.layer4[1].conv2.weight)
    from tasks import keys

    prefix = keys.dataset_prefix(cfg.dataset)
    before = keys.model_key(cfg, prefix, cfg.defenses[0], 0, None)
    torch.manual_seed(4)
    save_file({k: v.contiguous() for k, v in resnet18(num_classes=5).state_dict().items()},
              str(tmp_path / "r18.safetensors"))
    assert keys.model_key(cfg, prefix, cfg.defenses[0], 0, None) != before  # the weights' content is an input
    save_file({k: v.contiguous() for k, v in resnet34().state_dict().items()}, str(tmp_path / "r34.safetensors"))
    other = cfg.victim.model_copy(update={"model": cfg.victim.model.model_copy(
        update={"weights": str(tmp_path / "r34.safetensors")})})
    with pytest.raises(ConfigError, match=r"victim.model.weights: .* has layer 'body.layer1.2"):
        build_victim(other, train, seed=0, device="cpu")
    assert np.isfinite(result.classifier.predict_logits(train.images[:2])).all()
