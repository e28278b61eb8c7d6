"""The key contract (tasks.keys): content, validated params and code in every key; nothing else.

Fast tier: fingerprints of real files and of real source, keys of real configs, reasons and gc on a
real local store. The whole-pipeline checks (CLI, S3, a plug-in's source edited between two processes)
are in test_keys_pipeline.py.
"""

from __future__ import annotations

import os
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from infra.storage import Store
from poison_core.code_fingerprint import code_fingerprint, import_closure
from poison_core.config import DatasetConfig, load_benchmark
from poison_core.data.fingerprint import dataset_fingerprint, files_fingerprint
from poison_core.errors import DatasetError
from tasks import keys, stages
from tasks.records import read_record, reason
from tasks.recompute import Recompute
from tasks.store_gc import collect, remove
from tests.pipeline_helpers import TINY_BENCHMARK


def write_folder(root, pixels: int, n: int = 6) -> None:
    """A 3-class imagefolder of uncompressed 8x8 PNGs: every file's size depends on its shape only."""
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            value = (pixels + 40 * c + i) % 256
            Image.fromarray(np.full((8, 8), value, np.uint8)).save(root / f"class{c}" / f"{i}.png", compress_level=0)


def test_rewriting_images_in_place_with_the_same_size_and_mtime_changes_the_fingerprint(tmp_path):
    write_folder(tmp_path / "a", pixels=0)
    cfg = DatasetConfig(name="imagefolder", path=str(tmp_path / "a"))
    before = dataset_fingerprint(cfg)
    stats = {p: os.stat(p) for p in (tmp_path / "a").rglob("*.png")}
    write_folder(tmp_path / "a", pixels=7)
    for path, st in stats.items():  # a hostile rewrite: same names, sizes and modification times
        assert os.stat(path).st_size == st.st_size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert dataset_fingerprint(cfg) != before


def test_the_fingerprint_is_of_content_not_path(tmp_path):
    write_folder(tmp_path / "a", pixels=3)
    write_folder(tmp_path / "elsewhere" / "b", pixels=3)
    first = keys.dataset_prefix(DatasetConfig(name="imagefolder", path=str(tmp_path / "a")))
    moved = keys.dataset_prefix(DatasetConfig(name="imagefolder", path=str(tmp_path / "elsewhere" / "b")))
    assert first == moved
    (tmp_path / "a" / "class0" / "0.png").rename(tmp_path / "a" / "class1" / "99.png")  # relabelled: new data
    assert keys.dataset_prefix(DatasetConfig(name="imagefolder", path=str(tmp_path / "a"))) != first


def test_split_parameters_are_in_the_key_and_the_path_and_download_are_not():
    base = DatasetConfig(name="digits", n_train=300)
    assert keys.dataset_prefix(base) == keys.dataset_prefix(DatasetConfig(name="digits", n_train=300, download=True))
    assert keys.dataset_prefix(base) != keys.dataset_prefix(DatasetConfig(name="digits", n_train=301))
    assert keys.dataset_prefix(base) != keys.dataset_prefix(DatasetConfig(name="digits", n_train=300, seed=1))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_among_the_sources_is_refused_not_read(tmp_path):
    write_folder(tmp_path / "a", pixels=0, n=2)
    os.mkfifo(tmp_path / "a" / "class0" / "fifo.png")
    with pytest.raises(DatasetError, match="fifo.png.*not a regular file"):
        dataset_fingerprint(DatasetConfig(name="imagefolder", path=str(tmp_path / "a")))


def test_files_fingerprint_sees_names_and_bytes(tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    (tmp_path / "y").write_bytes(b"abc")
    one = files_fingerprint([("x", str(tmp_path / "x"))])
    assert one == files_fingerprint([("x", str(tmp_path / "y"))])
    assert one != files_fingerprint([("y", str(tmp_path / "y"))])
    (tmp_path / "y").write_bytes(b"abd")
    assert one != files_fingerprint([("x", str(tmp_path / "y"))])


def test_empty_params_and_explicit_defaults_share_one_key_and_a_changed_value_does_not():
    cfg = load_benchmark(TINY_BENCHMARK)
    prefix = keys.dataset_prefix(cfg.dataset)
    from poison_core.attacks import ATTACKS
    from poison_core.defenses import DEFENSES

    defaults = ATTACKS.get("badnets").Params().model_dump(mode="json")
    empty = cfg.model_copy(update={"attacks": (cfg.attacks[0].model_copy(update={"params": {}}),)})
    full = cfg.model_copy(update={"attacks": (cfg.attacks[0].model_copy(update={"params": defaults}),)})
    assert keys.poison_key(empty, prefix, empty.attacks[0], 0) == keys.poison_key(full, prefix, full.attacks[0], 0)
    changed = dict(defaults, patch_size=defaults["patch_size"] + 1)
    other = cfg.model_copy(update={"attacks": (cfg.attacks[0].model_copy(update={"params": changed}),)})
    assert keys.poison_key(other, prefix, other.attacks[0], 0) != keys.poison_key(full, prefix, full.attacks[0], 0)
    none_defaults = DEFENSES.get("trimmed_loss").Params().model_dump(mode="json")
    from poison_core.config import DefenseConfig

    assert keys.model_key(cfg, prefix, DefenseConfig(name="trimmed_loss"), 0, None) == \
        keys.model_key(cfg, prefix, DefenseConfig(name="trimmed_loss", params=none_defaults), 0, None)


def test_an_attack_without_a_surrogate_does_not_depend_on_the_surrogate_recipe():
    cfg = load_benchmark(TINY_BENCHMARK)
    other = load_benchmark(TINY_BENCHMARK + "surrogate: {model: {name: convnet}}\n")
    prefix = keys.dataset_prefix(cfg.dataset)
    flip = [a for a in cfg.attacks if a.name == "label_flip"][0]
    assert keys.poison_key(cfg, prefix, flip, 0) == keys.poison_key(other, prefix, flip, 0)
    wb = load_benchmark(TINY_BENCHMARK.replace("- {name: badnets, params: {target_class: 0, patch_size: 2}}",
                                               "- {name: witches_brew}"))
    wb2 = wb.model_copy(update={"surrogate": other.surrogate})
    brew = [a for a in wb.attacks if a.name == "witches_brew"][0]
    assert keys.poison_key(wb, prefix, brew, 0) != keys.poison_key(wb2, prefix, brew, 0)


def test_code_fingerprints_follow_the_member_and_shared_code_only():
    stage_modules = import_closure(("tasks.stages",))
    assert "poison_core.training" in stage_modules and "poison_core.attacks.base" in stage_modules
    assert not {"poison_core.attacks.badnets", "poison_core.attacks.witches_brew",
                "poison_core.defenses.abl"} & set(stage_modules)  # registration imports are not dependencies
    sleeper = import_closure(("poison_core.attacks.sleeper_agent",))
    assert "poison_core.attacks.witches_brew" in sleeper  # a real import between members is
    assert keys.attack_code("badnets") != keys.attack_code("label_flip") != keys.stage_code()
    assert keys.defense_code("abl") != keys.defense_code("none")


def test_docstrings_and_comments_do_not_change_a_fingerprint_and_code_does(tmp_path, monkeypatch):
    package = tmp_path / "fp_probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text("SCALE = 2\n")
    member = package / "member.py"
    source = textwrap.dedent('''
        """A member."""
        from fp_probe_pkg.helper import SCALE

        def run(x):
            """Doubles x."""
            return SCALE * x  # the rule
    ''')
    member.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    fingerprint = _fresh_fingerprint(["fp_probe_pkg.member"])
    member.write_text(source.replace('"""Doubles x."""', '"""Doubles x, documented better."""')
                      .replace("# the rule", "# reworded"))
    assert _fresh_fingerprint(["fp_probe_pkg.member"]) == fingerprint
    (package / "helper.py").write_text("SCALE = 3\n")  # an imported helper of the member's own package
    assert _fresh_fingerprint(["fp_probe_pkg.member"]) != fingerprint


def test_a_fingerprint_builds_no_syntax_tree_so_other_threads_parsing_cannot_break_it():
    """CPython 3.11 before 3.11.8 counts syntax-tree depth in one interpreter-wide counter: a thread
    building a tree while another does fails one of them with ``SystemError: AST constructor
    recursion depth mismatch`` (python/cpython#106905). A stage's fingerprint runs beside the tracking
    warm-up's threads, so it must not build a tree at all."""
    import ast
    import builtins

    real, trees = builtins.compile, []

    def recording(source, filename, mode, flags=0, *args, **kwargs):
        if flags & ast.PyCF_ONLY_AST:
            trees.append(filename)
        return real(source, filename, mode, flags, *args, **kwargs)

    builtins.compile = recording
    try:
        fingerprint = _fresh_fingerprint(["poison_core.attacks.witches_brew", "tasks.stages"])
    finally:
        builtins.compile = real
    assert len(fingerprint) == 16 and trees == []


def test_bare_strings_are_no_ops_and_f_strings_and_registrations_are_not(tmp_path, monkeypatch):
    package = tmp_path / "fp_probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    member = package / "member.py"
    source = 'def run(x):\n    "doc"\n    f"{x.append(1)}"\n    for i in range(2):\n        x.append(i)\n    return x\n'
    member.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    fingerprint = _fresh_fingerprint(["fp_probe_pkg.member"])
    member.write_text(source.replace('"doc"', "'other doc'  # and a comment\n\n    'a bare note'"))
    assert _fresh_fingerprint(["fp_probe_pkg.member"]) == fingerprint
    member.write_text(source.replace("append(1)", "append(2)"))  # an f-string runs its expressions
    assert _fresh_fingerprint(["fp_probe_pkg.member"]) != fingerprint
    member.write_text(source.replace("    return x", "        return x"))  # indentation is structure
    assert _fresh_fingerprint(["fp_probe_pkg.member"]) != fingerprint
    member.write_text(source.replace("    ", "  "))  # its width is not
    assert _fresh_fingerprint(["fp_probe_pkg.member"]) == fingerprint


def _fresh_fingerprint(modules: list[str]) -> str:
    """A fingerprint as a new process would compute it (the per-process caches cleared)."""
    from poison_core import code_fingerprint as cf

    for cached in (cf.import_closure, cf._parsed, cf._exists, cf._source_path):
        cached.cache_clear()
    for name in [m for m in sys.modules if m.startswith("fp_probe_pkg")]:
        del sys.modules[name]
    return code_fingerprint(modules)


def test_reason_names_what_changed():
    stage = keys.StageKey("poisons/a-1.parquet", "b/craft/a/seed0", {"input": "i", "params": "p", "code": "c"})
    assert reason(None, stage) == "new"
    assert reason({"key": "x", "parts": {"input": "i", "params": "p", "code": "old"}}, stage) == "code changed"
    assert reason({"key": "x", "parts": {"input": "j", "params": "q", "code": "c"}}, stage) == \
        "input changed, params changed"
    assert reason({"key": stage.key, "parts": stage.parts}, stage) == "missing"
    assert reason({"key": stage.key, "parts": stage.parts}, stage, forced=True) == "forced"


def test_recompute_targets_are_checked_and_force_downstream():
    cfg = load_benchmark(TINY_BENCHMARK)
    craft = Recompute.parse(["craft"], cfg)
    assert not craft.forces("pretrain") and craft.forces("craft", "badnets") and craft.forces("evaluate", "x", "none")
    attack = Recompute.parse(["label_flip"], cfg)
    assert attack.forces("craft", "label_flip") and not attack.forces("craft", "badnets")
    assert not attack.forces("retrain", None, "none")  # the clean victim does not depend on the attack
    from poison_core.errors import ConfigError

    with pytest.raises(ConfigError, match="--recompute: 'nosuch' is not 'all', a stage"):
        Recompute.parse(["nosuch"], cfg)


def test_stages_record_why_and_gc_removes_only_what_no_key_uses(tmp_path):
    cfg = load_benchmark(TINY_BENCHMARK.replace("seeds: [0, 1]", "seeds: [0]"))
    flip = [a for a in cfg.attacks if a.name == "label_flip"][0]
    defense = cfg.defenses[0]
    store = Store(str(tmp_path / "store"))

    def grid(cfg, force=False):
        prefix = stages.ingest(store, cfg.dataset, cfg.name).key
        poisons = stages.craft(store, cfg, prefix, flip, 0, force=force)
        model = stages.retrain(store, cfg, prefix, defense, 0, poisons.key, force=force)
        clean = stages.retrain(store, cfg, prefix, defense, 0, None)
        cell = stages.evaluate_cell(store, cfg, prefix, flip.key, defense.key, 0, poisons.key, model.key, clean.key)
        return poisons, model, clean, cell

    first = grid(cfg)
    assert [o.reason for o in first] == ["new"] * 4
    assert [o.reason for o in grid(cfg)] == ["reused"] * 4
    assert [o.reason for o in grid(cfg, force=True)][:2] == ["forced", "forced"]
    more = cfg.model_copy(update={"threat": cfg.threat.model_copy(update={"budget": 0.06})})
    second = grid(more)
    assert [o.reason for o in second] == ["params changed", "input changed", "reused", "input changed"]
    slot = keys.poison_stage(more, keys.dataset_prefix(more.dataset), flip, 0).slot
    assert read_record(store, slot)["key"] == second[0].key
    assert collect(store).garbage == ()  # everything is newer than the grace period
    found = collect(store, grace_seconds=0)
    stale = {key for key, _ in found.garbage}
    assert stale == {first[0].key, first[1].key, first[3].key}  # the clean victim and the dataset are still used
    remove(store, found)
    assert [o.reason for o in grid(more)] == ["reused"] * 4
    assert not store.exists(first[0].key)
