"""Other tools' poison files, read into and written from Belladonna's PoisonSet.

Formats (one module each; pure numpy / PIL / pickle / torch, no orchestration imports):

* ``benchmark`` (:mod:`.benchmark`): Schwarzschild et al., 'Just How Toxic is Data Poisoning?',
  ICML 2021 (github.com/aks2203/poisoning-benchmark, how_to.md): ``poisons.pickle`` (a list of
  (PIL image, label)), ``base_indices.pickle`` (the bases' training-set indices) and
  ``target.pickle`` ((PIL image, label), or (PIL image, label, patch, [x, y]) for a triggered backdoor:
  a ``fixed_patch`` trigger, :mod:`.benchmark_trigger`); its ``poison_setups/*.pickle`` (the trials' keys) are read by
  :mod:`.setups` as the targeted attacks' key draw (``threat.targets.mode: setups``).
* ``forest-numpy`` and ``forest-full`` (:mod:`.forest`): Geiping et al.'s forest
  (github.com/JonasGeiping/data-poisoning, ``forest/data/kettle_base.py`` ``export_poison``):
  mode ``numpy`` (the whole poisoned training set as ``poisoned_training_data.npy`` and
  ``poisoned_training_labels.npy``) and mode ``full`` (an ImageFolder tree ``train/<class>/<idx>.png``,
  ``test/<class>/<idx>.png``, ``targets/<intended class>/<idx>.png``; ``limited`` trees, which hold
  only the poisoned training images, read the same way).
* ``forest-packed`` (:mod:`.forest_packed`): forest's mode ``packed``, ``torch.save([poison_delta,
  poison_ids])``: a plain torch save of tensors, read with ``torch.load(weights_only=True)``; the deltas
  are in forest's normalised units, so the import names forest's normalisation (``normalization``).
* ``arrays`` (:mod:`.arrays`): ``.npz`` with ``images`` (or ``x``/``poisons``), ``indices`` (or
  ``ids``) and optional ``labels``, or a folder with ``poisons.npy``, ``indices.npy`` and optional
  ``labels.npy``, as APBench and many papers ship poisons.

Pickles are read only through :mod:`poison_core.safe_pickle` (a restricted unpickler); ``.npy`` files with
``allow_pickle=False`` after their header's shape is checked against the limits.

Ids: an index in another tool's file is the sample's position in the dataset's *original* order, and
that is what a Belladonna id is (poison_core.data): CIFAR-10's train ids are positions in
``data_batch_1`` .. ``data_batch_5`` concatenated (torchvision's ``CIFAR10(train=True)`` order, so
the benchmark's ``base indices``), test ids positions in ``test_batch``; Fashion-MNIST's ids are
positions in the IDX files (``train-*`` and ``t10k-*`` each from 0); an image folder's ids are
positions in (sorted class folder, sorted file name) order within ``train/`` and ``test/`` (as
torchvision's ImageFolder orders them); digits' ids are positions in scikit-learn's array (train and
test split one source, so they share one range). Subsampling (``n_train``) keeps ids, so an index
outside the subsample is refused. forest-numpy rows carry no ids: row r is the training sample with
the r-th smallest id, which is the original index r when the split is the source's whole training set.

Every import is checked against the config's clean data: poisons whose pixels are not a perturbation
of the base they name (more than 5 % of their values further than 2 * epsilon + 32 grey levels from
it: another image, not a perturbation) are refused with the count and the first index; then the
PoisonSet audit holds them to epsilon on the uint8 grid, the budget and the labels.
"""

from __future__ import annotations

FORMATS = ("benchmark", "forest-numpy", "forest-full", "forest-packed", "arrays")
