"""Attacks: one file per attack, registered by name in ATTACKS.

Importing this package registers every member; a new attack needs only a new file here and
its import below.
"""

from poison_core.attacks.base import (ATTACKS, ActorGroup, Attack, AttackParams, CraftContext, Crafted, LocalActorGroup,
                                      local_map, make_attack, register_attack)
from poison_core.attacks import badnets, label_flip  # noqa: F401  (registration)
from poison_core.attacks import (blend, clean_label_backdoor, clusters, controls, error_max, error_min,  # noqa: F401
                                 synthetic, tue)  # (registration)
from poison_core.attacks import convex_polytope, metapoison, poison_frogs, witches_brew  # noqa: F401  (registration)
from poison_core.attacks import bilevel, generative, influence, p_tampering, pgan, svm_poison  # noqa: F401
from poison_core.attacks import sig, wanet  # noqa: F401  (registration)
from poison_core.attacks import bullseye, hidden_trigger, sleeper_agent  # noqa: F401  (registration)
from poison_core.attacks import imported  # noqa: F401  (registration)

__all__ = ["ATTACKS", "ActorGroup", "Attack", "AttackParams", "CraftContext", "Crafted", "LocalActorGroup", "local_map",
           "make_attack", "register_attack"]
