"""Dataset-scale attribution: ``attribute_dataset`` / ``load_attributions`` and the
``fxattr explain`` / ``fxattr view`` command line (see :mod:`fxattr.runner.cli`)."""

from fxattr.runner.dataset import RunSummary, attribute_dataset, load_attributions
from fxattr.runner.sources import ArrayDataset, ImageFolder
from fxattr.runner.storage import LazyAttributions

__all__ = ["ArrayDataset", "ImageFolder", "LazyAttributions", "RunSummary", "attribute_dataset",
           "load_attributions"]
