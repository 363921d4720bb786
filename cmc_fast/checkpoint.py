"""Atomic checkpoint and JSON writes: a killed run never leaves a half-written file behind.

Checkpoints are read pickle-free (``torch.load(weights_only=True)``): run folders are shared and downloaded, and
a ``.pt`` whose pickle calls a function would otherwise run it. A file that is not a checkpoint this tool wrote
(truncated, empty, planted) raises ``UsageError`` naming it."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from cmc_fast.data_pipeline import safe_io
from cmc_fast.errors import UsageError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    safe_io.atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint this tool wrote (tensors, numbers, strings, lists, dicts), never unpickling anything else."""
    if not os.path.lexists(path):
        raise UsageError(f"{path}: checkpoint not found")
    try:  # a regular file only, opened non-blocking (a named pipe or /dev/zero in its place is refused unread)
        with safe_io.open_regular(path) as f:
            state = torch.load(f, map_location=map_location, weights_only=True)
    except safe_io.FileRefused as exc:
        raise UsageError(f"{exc}; restore it, or delete it to retrain that stage") from None
    except Exception as exc:  # noqa: BLE001 - truncated, empty, foreign or planted: all one answer
        raise UsageError(f"{path}: not a readable cmc-fast checkpoint ({load_error_reason(exc)}); restore it, "
                         "or delete it to retrain that stage") from None
    if not isinstance(state, dict):
        raise UsageError(f"{path}: not a cmc-fast checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def load_error_reason(exc: BaseException) -> str:
    """The exception's gist in one line; torch's advice to retry with weights_only=False is left out (that
    retry is exactly what must not happen to a file someone else supplied)."""
    full = str(exc).strip()
    if "Weights only load failed" in full or "weights_only" in full:
        found = re.search(r"GLOBAL ([\w.]+)", full)
        what = f" ({found.group(1)})" if found else ""
        return f"holds a Python object beyond tensors and plain data{what}; refused, loading it could run code"
    text = full.splitlines()[0] if full else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else f"{type(exc).__name__}: truncated or empty file"


def write_json(obj: Any, path: str | Path) -> None:
    """Standard JSON only: a non-finite float (a timing never measured, a NaN metric) is written as null, never
    as the bare NaN / Infinity that strict parsers reject."""
    text = json.dumps(_finite(obj), indent=2, ensure_ascii=False, allow_nan=False)
    safe_io.atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_text(text: str, path: str | Path) -> None:
    safe_io.atomic_write(path, lambda f: f.write(text.encode("utf-8")))
