"""Typed configs: pydantic v2 models, frozen, unknown keys forbidden, bounds on every number.

One module an idea: ``base`` (StrictModel, the name pattern), ``dataset`` (DatasetConfig, ModelConfig),
``train`` (TrainConfig, PretrainConfig), ``simclr`` (SimCLR's settings), ``victim`` (VictimConfig and its
protocols), ``threat_model`` (ThreatModel, TargetSelection), ``members`` (AttackConfig, DefenseConfig),
``execution`` (ExecutionConfig), ``benchmark`` (BenchmarkConfig) and ``loading`` (load_benchmark: YAML in,
one ConfigError line out). Every name is importable from ``poison_core.config``.

Configs sit below the registries (pyproject.toml's layer contract): member names and parameters are
checked against the registries at preflight, by :func:`poison_core.members.check_names`.
"""

from poison_core.config.base import NAME_PATTERN, StrictModel
from poison_core.config.benchmark import BenchmarkConfig
from poison_core.config.dataset import DatasetConfig, ModelConfig, ModelName, RegistryName
from poison_core.config.execution import ExecutionConfig, RuntimeEnvConfig
from poison_core.config.loading import MAX_CONFIG_BYTES, MAX_YAML_DEPTH, load_benchmark, parse_config, read_yaml_text
from poison_core.config.members import AttackConfig, DefenseConfig
from poison_core.config.simclr import SimCLRConfig, SimCLRViews, SSLConfig
from poison_core.config.threat_model import SetupsFile, TargetSelection, ThreatModel
from poison_core.config.train import PretrainConfig, TrainConfig
from poison_core.config.victim import PROTOCOLS, Protocol, VictimConfig

__all__ = ["MAX_CONFIG_BYTES", "MAX_YAML_DEPTH", "NAME_PATTERN", "PROTOCOLS", "AttackConfig", "BenchmarkConfig",
           "DatasetConfig", "DefenseConfig", "ExecutionConfig", "ModelConfig", "ModelName", "PretrainConfig", "Protocol",
           "RegistryName", "RuntimeEnvConfig", "SSLConfig", "SimCLRConfig", "SimCLRViews", "StrictModel",
           "SetupsFile", "TargetSelection", "ThreatModel", "TrainConfig", "VictimConfig", "load_benchmark", "parse_config",
           "read_yaml_text"]
