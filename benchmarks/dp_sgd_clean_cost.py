"""Clean accuracy of the undefended victim and of DP-SGD victims (no attack), over seeds: what a DP-SGD
setting costs before any poison is in play (benchmarks/results/recipes.md, "DP-SGD defaults").

    python3 -m benchmarks.dp_sgd_clean_cost digits --seeds 0 1 2 \\
        --variant none --variant dp_sgd --variant 'dp_sgd {"granularity": "sample", "clip_norm": 1, "noise_multiplier": 0.1}'

`digits`: the ConvNet (BatchNorm) of tests/test_efficacy_defenses.py, 15 epochs, batch 64, lr 0.05, no
augmentation. `fashion-mnist`: 2,000 / 1,000 images, width-16 ConvNet, 8 epochs, crop-and-flip. One
thread. A variant is a defense name, optionally followed by its params as JSON. Prints one JSON line per
(variant, seed): clean accuracy, the last epoch's clipped fraction and mean gradient norm, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from poison_core.config import DatasetConfig, ModelConfig, TrainConfig, VictimConfig
from poison_core.data import load_dataset
from poison_core.defenses import DefenseContext, make_defense
from poison_core.evaluation import evaluate

SETTINGS = {
    "digits": (DatasetConfig(name="digits", seed=0),
               VictimConfig(model=ModelConfig(name="convnet"), train=TrainConfig(epochs=15, batch_size=64, lr=0.05))),
    "fashion-mnist": (DatasetConfig(name="fashion-mnist", n_train=2000, n_test=1000, seed=0),
                      VictimConfig(model=ModelConfig(name="convnet", width=16),
                                   train=TrainConfig(epochs=8, batch_size=64, lr=0.05, augment="crop-flip"))),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", action="append", required=True, help="NAME or 'NAME {json params}'")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data_cfg, victim = SETTINGS[args.setting]
    splits = load_dataset(data_cfg)
    for variant in args.variant:
        name, _, raw = variant.partition(" ")
        params = json.loads(raw) if raw.strip() else None
        for seed in args.seeds:
            start = time.perf_counter()
            result = make_defense(name, params).fit(DefenseContext(train=splits.train, victim=victim, seed=seed))
            last = result.history[-1] if result.history else {}
            sys.stdout.write(json.dumps({"setting": args.setting, "defense": name, "params": params, "seed": seed,
                              "clean_acc": round(evaluate(result.classifier, splits.test)["clean_acc"], 4),
                              "clipped_fraction": last.get("clipped_fraction"), "grad_norm": last.get("grad_norm"),
                              "seconds": round(time.perf_counter() - start, 1)}) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
