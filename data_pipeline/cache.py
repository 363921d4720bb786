"""Where cmc-fast keeps what it derives from data: decoded images, token ids, generated data sets."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$CMC_FAST_CACHE`` or ~/.cache/cmc-fast."""
    return Path(os.environ.get("CMC_FAST_CACHE") or Path.home() / ".cache" / "cmc-fast")
