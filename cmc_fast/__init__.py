"""cmc-fast: CMC (Wei et al., ICASSP 2022) cross-modal knowledge distillation for multi-modal fake news
detection, with fused Triton kernels for the NCE memory-bank scoring and BLOCK fusion.

The repository keeps ``kernels/`` and ``data_pipeline/`` at its top level (the required layout) but installs
them as ``cmc_fast.kernels`` and ``cmc_fast.data_pipeline``: Hugging Face's ``kernels`` package, which
transformers uses, installs a top-level ``kernels`` too, and one environment must be able to hold both. A wheel
puts the two folders inside this package (pyproject's package-dir); a source checkout or an editable install
has them beside it, and the finder below maps the names onto those folders of the same checkout.
"""

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

_SUBPACKAGES = ("kernels", "data_pipeline")


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``cmc_fast.<name>`` in the folder ``<name>/`` beside this package; submodules then resolve through
    that package's ``__path__`` as usual."""

    def __init__(self, folders: dict[str, str]):
        self.folders = folders

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


def _map_checkout_folders() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    folders = {f"{__name__}.{name}": os.path.join(root, name) for name in _SUBPACKAGES
               if not os.path.isdir(os.path.join(here, name))
               and os.path.isfile(os.path.join(root, name, "__init__.py"))}
    if folders and not any(isinstance(f, _CheckoutFinder) and f.folders == folders for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder(folders))


_map_checkout_folders()
