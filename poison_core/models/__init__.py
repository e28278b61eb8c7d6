"""The model registry: image classifiers that follow one features/head convention (poison_core.models.base).

Importing this package registers every member; a new architecture is a module here that registers
with ``@MODELS.register`` (importing ``MODELS`` and ``Classifier`` from ``poison_core.models.base``)
and is imported below.
"""

from poison_core.models.base import MIN_IMAGE_SIZE, MODELS, Classifier, ModelBuilder, ModelName, build_model
from poison_core.models import convnet, mlp, mobilenet, resnet, vgg  # noqa: F401  (registers members)
from poison_core.models.adapter import as_builder

MODELS.adapt = as_builder  # any nn.Module constructor taking num_classes becomes a builder

__all__ = ["MIN_IMAGE_SIZE", "MODELS", "Classifier", "ModelBuilder", "ModelName", "build_model"]
