"""Registry lookups and typed configs: bounds, unknown names and keys, one-line errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from poison_core.config import BenchmarkConfig, ThreatModel, load_benchmark, parse_config
from poison_core.errors import ConfigError, UnknownNameError
from poison_core.members import check_names
from poison_core.registry import Registry

GOOD = """
name: t
dataset: {name: digits}
attacks:
  - name: label_flip
    params: {mode: random}
"""


def test_registry_register_get_names_and_loud_unknown():
    reg: Registry = Registry("widget")
    reg.register("b", paper="P", summary="S")(int)
    reg.register("a")(str)
    assert reg.names() == ["a", "b"] and reg.get("b") is int and reg.entry("b").paper == "P"
    with pytest.raises(UnknownNameError, match=r"unknown widget 'c'; known: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(float)


def test_valid_benchmark_loads_with_defaults():
    cfg = load_benchmark(GOOD)
    assert isinstance(cfg, BenchmarkConfig)
    assert cfg.threat.epsilon == 16 and cfg.defenses[0].name == "none" and cfg.seeds == (0,)
    with pytest.raises(ValidationError):
        cfg.name = "other"  # frozen


def test_threat_model_max_poisons():
    assert ThreatModel(budget=0.3).max_poisons(1000) == 300
    assert ThreatModel(budget=0.01).max_poisons(99) == 0
    assert ThreatModel(budget=1.0).max_poisons(7) == 7


@pytest.mark.parametrize("patch, expected", [
    ("threat: {epsilon: 300}", r"^threat\.epsilon: .*less than or equal to 255 \(allowed: 0 <= epsilon <= 255; got 300\)"),
    ("threat: {epsilon: -1}", r"^threat\.epsilon: .*greater than or equal to 0"),
    ("threat: {budget: 0}", r"^threat\.budget: .*greater than 0 \(allowed: 0 < budget <= 1; got 0\)"),
    ("threat: {budget: 1.5}", r"^threat\.budget: .*less than or equal to 1"),
    ("threat: {radius: 3}", r"^threat\.radius: Extra inputs are not permitted"),
    ("victim: {train: {epochs: 0}}", r"^victim\.train\.epochs: .*allowed: 1 <= epochs <= 1000"),
    ("seeds: [1, 1]", r"^seeds: seeds must be distinct"),
])
def test_bad_fields_give_one_line_naming_field(patch, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        load_benchmark(GOOD + patch + "\n")
    assert "\n" not in str(info.value)


def _checked(text: str) -> BenchmarkConfig:
    cfg = load_benchmark(text)
    check_names(cfg)
    return cfg


@pytest.mark.parametrize("patch, expected", [
    ("victim: {model: {name: alexnet}}", r"^victim\.model\.name: unknown model 'alexnet'; known: .*convnet"),
    ("surrogate: {model: {name: alexnet}}", r"^surrogate\.model\.name: unknown model 'alexnet'; known: .*convnet"),
    ("dataset: {name: imagenet}", r"^dataset\.name: unknown dataset 'imagenet'; known: .*digits"),
    ("victim: {protocol: transfer, pretrain: {dataset: {name: imagenet}}}",
     r"^victim\.pretrain\.dataset\.name: unknown dataset 'imagenet'"),
    ("defenses: [{name: shield}]", r"^defenses\.0\.name: unknown defense 'shield'; known: .*none"),
])
def test_unknown_names_are_found_at_preflight_naming_the_field(patch, expected):
    cfg = load_benchmark(GOOD + patch + "\n")  # the schema alone does not know the registries
    with pytest.raises(ConfigError, match=expected) as info:
        check_names(cfg)
    assert "\n" not in str(info.value)


def test_unknown_attack_and_bad_params():
    with pytest.raises(ConfigError, match=r"^attacks\.0\.name: unknown attack 'frogs'; known: .*badnets.*label_flip"):
        _checked("name: t\nattacks: [{name: frogs}]\n")
    with pytest.raises(ConfigError, match=r"^attacks\.0: params of 'badnets': patch_size: .*allowed: 1 <= patch_size <= 64"):
        _checked("name: t\nattacks: [{name: badnets, params: {patch_size: 0}}]\n")
    with pytest.raises(ConfigError, match=r"params of 'label_flip': mode: "):
        _checked("name: t\nattacks: [{name: label_flip, params: {mode: sideways}}]\n")
    with pytest.raises(ConfigError, match=r"^attacks\.1: params of 'tue': model: .*unknown model 'alexnet'"):
        _checked("name: t\nattacks: [{name: label_flip}, {name: tue, params: {model: alexnet}}]\n")
    with pytest.raises(ConfigError, match=r"^attacks\.0\.params\.pretrain\.dataset\.name: unknown dataset 'imagenet'"):
        _checked("name: t\nattacks: [{name: unlearnable_clusters, params: {encoder_source: pretrained, "
                 "pretrain: {dataset: {name: imagenet}}}}]\n")
    _checked(GOOD)  # and a good config passes


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^malformed YAML at line \d+"):
        load_benchmark("name: t\nattacks: [\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_benchmark(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_benchmark("\n- a\n- b\n")


def test_parse_config_direct():
    with pytest.raises(ConfigError, match=r"^epsilon: "):
        parse_config(ThreatModel, {"epsilon": 256})


def test_two_configs_of_one_attack_need_ids():
    twice = "name: t\nattacks: [{name: label_flip}, {name: label_flip, params: {mode: random}}]\n"
    with pytest.raises(ConfigError, match=r"attacks: 'label_flip' appears twice; give each an `id`"):
        load_benchmark(twice)
    cfg = load_benchmark("name: t\nattacks: [{name: label_flip}, {name: label_flip, id: flip2}]\n")
    assert [a.key for a in cfg.attacks] == ["label_flip", "flip2"]
