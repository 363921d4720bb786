"""cmc-fast: CMC (Wei et al., ICASSP 2022) cross-modal knowledge distillation for multi-modal fake news
detection, with fused Triton kernels for the NCE memory-bank scoring and BLOCK fusion.

The repository keeps ``kernels/`` and ``data_pipeline/`` at its top level (the required layout) and installs them
as ``cmc_fast.kernels`` and ``cmc_fast.data_pipeline``. Neither folder has an ``__init__.py``: a folder without one
is only a namespace portion, and any regular package of the same name found later on ``sys.path`` wins over it.
So with the repository root on ``sys.path`` (``python -m``, torchrun, a shell in the checkout), ``import kernels``
still gives Hugging Face's ``kernels`` (which transformers imports) when it is installed, and an empty namespace
that transformers recognises as "not installed" when it is not. A wheel puts the two folders inside this package
(pyproject's package-dir) and an editable install maps them; a plain source checkout has them beside this package,
and the finder below maps the two names onto those folders of the same checkout.

The ops themselves are named in ``cmc_fast.ops``.
"""

import importlib.abc
import importlib.machinery
import os
import sys

__version__ = "0.1.0"

_SUBPACKAGES = ("kernels", "data_pipeline")


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``cmc_fast.<name>`` as the namespace folder ``<name>/`` beside this package; submodules then resolve
    through its ``__path__`` as usual."""

    def __init__(self, folders: dict[str, str]):
        self.folders = folders

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [folder]
        return spec


def _map_checkout_folders() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    folders = {f"{__name__}.{name}": os.path.join(root, name) for name in _SUBPACKAGES
               if not os.path.isdir(os.path.join(here, name)) and os.path.isdir(os.path.join(root, name))}
    if folders and not any(isinstance(f, _CheckoutFinder) and f.folders == folders for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder(folders))


_map_checkout_folders()
