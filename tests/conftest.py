"""Run the Triton kernels in the interpreter on machines without a GPU. This must happen before any
``kernels`` module is imported, which is why it sits at the top of the root conftest."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The real data: ../shared/data beside the checkout, or CMC_FAST_SHARED_DATA (a GPU machine gets a carried copy).
SHARED_DATA = os.environ.get("CMC_FAST_SHARED_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                                      "data")


@pytest.fixture
def shared_data() -> str:
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"real data not found at {path} (../shared/data beside the checkout, or CMC_FAST_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Token and image caches go to a per-session temporary directory, never the user's ~/.cache."""
    monkeypatch.setenv("CMC_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cmc-fast-cache"))
