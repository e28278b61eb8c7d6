"""The stable surface for plug-in authors: everything a new attack, defense, model or dataset needs.

Import from here, not from the modules behind it (those may move between releases)::

    from poison_core.plugin import Attack, AttackParams, Crafted

A plug-in registers its members through entry points of its distribution (``pyproject.toml``)::

    [project.entry-points."belladonna.attacks"]
    my_attack = "my_pkg.attack:MyAttack"        # an Attack subclass
    [project.entry-points."belladonna.defenses"]
    my_defense = "my_pkg.defense:MyDefense"     # a Defense (or FilterDefense) subclass
    [project.entry-points."belladonna.models"]
    my_net = "my_pkg.model:my_net"              # (in_channels, num_classes, image_size, width) -> Classifier,
                                                # or any constructor taking num_classes (adapted)
    [project.entry-points."belladonna.datasets"]
    my_data = "my_pkg.data:load"                # (DatasetConfig) -> DatasetSplits; `load.sources` optional

or a config names it by import string (``name: my_pkg.attack:MyAttack``). ``check_member`` (also
``belladonna check attack|defense|model NAME``) runs the contract every built-in passes.
"""

from poison_core.attacks.base import Attack, AttackParams, CraftContext, Crafted
from poison_core.contract import check_member
from poison_core.data.dataset import DatasetSplits, ImageDataset
from poison_core.defenses.base import (Defense, DefenseContext, DefenseParams, DefenseResult, FilterDefense,
                                       ModelClassifier, Predictor, train_victim)
from poison_core.models import Classifier

__all__ = ["Attack", "AttackParams", "CraftContext", "Crafted", "Defense", "FilterDefense", "DefenseParams",
           "DefenseContext", "DefenseResult", "train_victim", "ImageDataset", "DatasetSplits", "Classifier",
           "Predictor", "ModelClassifier", "check_member"]
