"""Atomic checkpoint and JSON writes: a killed run never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=False)


def write_json(obj: Any, path: str | Path) -> None:
    _atomic_write(Path(path), lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8")))


def write_text(text: str, path: str | Path) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))
