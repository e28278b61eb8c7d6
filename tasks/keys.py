"""The key contract: a stored output's key is the hash of everything that determines it, and nothing else.

Every key hashes three parts, which a rerun compares to say why it recomputed (`tasks.records`):

* ``input``: the *content* of what the stage reads: the dataset's source bytes
  (`poison_core.data.fingerprint`), never its path; and the keys of the upstream outputs (which hash
  their own inputs in turn). A victim pretrained on another dataset (`transfer`, `finetune`) adds
  that dataset's content;
* ``params``: the *validated* parameters with their defaults filled in (``{}`` and the explicit
  defaults are one key; a changed default is a new key), the threat model, the recipe, the seed;
* ``code``: the fingerprint of the source that computes the output (`poison_core.code_fingerprint`):
  the stage runner `tasks.stages` and every ``poison_core`` module it imports, plus the attack's or
  defense's own module and what it imports. An edit to one attack recomputes that attack's crafts,
  victims and cells; an edit to shared machinery (training, evaluation, the poison format) recomputes
  everything that uses it. Comments and docstrings are not part of it.

The file name keeps the member's grid key (`id` or name) in front of the hash, so a store can be read by
eye: ``datasets/<name>-<hash>/``, ``models/surrogate-<hash>.safetensors``,
``poisons/<attack>-<hash>.parquet``, ``models/<defense>-<hash>.safetensors``, ``cells/<hash>.json``.
Each output also has a *slot*, its place in a benchmark (``<benchmark>/craft/<attack>/seed<s>``),
which stays the same when the key changes: that is what a rerun compares against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from infra.storage import content_hash
from poison_core.attacks import ATTACKS
from poison_core.code_fingerprint import code_fingerprint, member_module
from poison_core.config import AttackConfig, BenchmarkConfig, DatasetConfig, DefenseConfig
from poison_core.data import DATASETS
from poison_core.data.fingerprint import dataset_fingerprint, file_digest
from poison_core.defenses import DEFENSES
from poison_core.interop.setups import fingerprint as setups_fingerprint
from poison_core.members import attack_params, defense_params
from poison_core.models import MODELS

STAGE_RUNNER = "tasks.stages"
"""The module whose import closure is the shared code of every stage."""

PARTS = ("input", "params", "code")


@dataclass(frozen=True)
class StageKey:
    """An output's store key, its slot, the hashes of its three parts, and the upstream keys it reads."""

    key: str
    slot: str
    parts: dict[str, str] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()


def _stage_key(name: str, slot: str, suffix: str, inputs: dict[str, Any], params: dict[str, Any],
               code: str, upstream: tuple[str, ...] = ()) -> StageKey:
    parts = {"input": content_hash(inputs), "params": content_hash(params), "code": code}
    return StageKey(f"{name}-{content_hash(parts)}{suffix}", slot, parts, upstream)


@lru_cache(maxsize=None)
def stage_code(*members: str) -> str:
    """The code fingerprint of the stage runner with the given member modules."""
    return code_fingerprint((STAGE_RUNNER, *members))


def attack_code(name: str) -> str:
    return stage_code(member_module(ATTACKS.get(name)))


def defense_code(name: str) -> str:
    return stage_code(member_module(DEFENSES.get(name)))


def _module(registry: Any, name: str) -> str:
    return member_module(registry.get(name))


def file_part(member_key: str) -> str:
    """A member's grid key as a store-key part (an import string's ':' and other characters become '_')."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", member_key)


def _weights(model: Any) -> str | None:
    """The content digest of a model's initial weights file (``model.weights``), None without one."""
    return None if model.weights is None else ":".join(map(str, file_digest(model.weights)))


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json") if model is not None else None


def dataset_stage(cfg: DatasetConfig, benchmark: str = "") -> StageKey:
    """The ingested splits: the dataset's content, how it is split and subsampled, the loading code."""
    split = cfg.model_dump(mode="json", exclude={"path", "download"})
    return _stage_key(f"datasets/{file_part(cfg.name)}", f"{benchmark}/ingest/{cfg.name}", "",
                      {"sources": dataset_fingerprint(cfg)}, split, stage_code(_module(DATASETS, cfg.name)))


def dataset_prefix(cfg: DatasetConfig) -> str:
    return dataset_stage(cfg).key


def surrogate_stage(cfg: BenchmarkConfig, prefix: str, seed: int, index: int) -> StageKey:
    """Surrogate `index` of `seed`: the attacker's recipe trained on the clean split."""
    recipe = cfg.surrogate_or_victim()
    params = {"surrogate": _dump(recipe), "seed": seed, "index": index}
    inputs = {"dataset": prefix, "weights": _weights(recipe.model)}
    return _stage_key("models/surrogate", f"{cfg.name}/pretrain/seed{seed}/{index}", ".safetensors",
                      inputs, params, stage_code(_module(MODELS, recipe.model.name)), (prefix,))


def surrogate_key(cfg: BenchmarkConfig, prefix: str, seed: int, index: int) -> str:
    return surrogate_stage(cfg, prefix, seed, index).key


def poison_stage(cfg: BenchmarkConfig, prefix: str, attack: AttackConfig, seed: int) -> StageKey:
    """An attack's PoisonSet for one seed. Its surrogates are inputs only when the attack uses them; an
    attack that reads files of its own (``input_fingerprint``) adds their content, and so does a threat
    model whose targeted keys come from a setups file (``targets.setups``: its bytes, not its path)."""
    cls = ATTACKS.get(attack.name)
    surrogates = ([surrogate_key(cfg, prefix, seed, i) for i in range(cfg.n_surrogates)]
                  if cls.needs_surrogate else [])
    inputs: dict[str, Any] = {"dataset": prefix, "surrogates": surrogates}
    parsed = attack_params(attack)
    if hasattr(cls, "input_fingerprint"):
        inputs["files"] = cls(parsed).input_fingerprint()
    threat = cfg.threat_for(attack)
    dumped = _dump(threat)
    if threat.targets.setups is not None:  # the keys file: its content is an input, its path is not a param
        inputs["setups"] = setups_fingerprint(threat.targets.setups.path)
        dumped["targets"]["setups"].pop("path")
    params = {"attack": attack.name, "params": parsed.model_dump(mode="json"), "seed": seed, "threat": dumped}
    return _stage_key(f"poisons/{file_part(attack.key)}", f"{cfg.name}/craft/{attack.key}/seed{seed}", ".parquet",
                      inputs, params, attack_code(attack.name), (prefix, *surrogates))


def poison_key(cfg: BenchmarkConfig, prefix: str, attack: AttackConfig, seed: int) -> str:
    return poison_stage(cfg, prefix, attack, seed).key


def _attack_of(poisons: str | None) -> str:
    """The attack's grid key from its PoisonSet key (``poisons/<attack>-<hash>.parquet``); 'clean' for None."""
    return "clean" if poisons is None else poisons.rsplit("/", 1)[-1].rsplit("-", 1)[0]


def model_stage(cfg: BenchmarkConfig, prefix: str, defense: DefenseConfig, seed: int,
                poisons: str | None) -> StageKey:
    """The victim under `defense` on the clean (poisons None) or poisoned training set."""
    inputs: dict[str, Any] = {"dataset": prefix, "poisons": poisons, "weights": _weights(cfg.victim.model)}
    if cfg.victim.pretrain is not None:
        inputs["pretrain"] = dataset_fingerprint(cfg.victim.pretrain.dataset)
    params = {"victim": _dump(cfg.victim), "defense": defense.name,
              "params": defense_params(defense).model_dump(mode="json"), "seed": seed}
    upstream = (prefix,) if poisons is None else (prefix, poisons)
    code = stage_code(_module(DEFENSES, defense.name), _module(MODELS, cfg.victim.model.name))
    return _stage_key(f"models/{file_part(defense.key)}",
                      f"{cfg.name}/retrain/{defense.key}/{_attack_of(poisons)}/seed{seed}", ".safetensors",
                      inputs, params, code, upstream)


def model_key(cfg: BenchmarkConfig, prefix: str, defense: DefenseConfig, seed: int, poisons: str | None) -> str:
    return model_stage(cfg, prefix, defense, seed, poisons).key


def cell_stage(cfg: BenchmarkConfig, attack: str, defense: str, seed: int, poisons: str, model: str,
               clean_model: str) -> StageKey:
    """One (attack, defense, seed) cell: its metrics from the poisoned and the clean victim."""
    inputs = {"poisons": poisons, "model": model, "clean": clean_model}
    params = {"attack": attack, "defense": defense, "seed": seed, "victim": _dump(cfg.victim)}
    return _stage_key("cells/cell", f"{cfg.name}/evaluate/{attack}/{defense}/seed{seed}", ".json", inputs, params,
                      stage_code(), (poisons, model, clean_model))
