"""Where the trainer gets image batches: an ``ImageSource`` indexed by record, in the order asked for.

``batch(indices, train=, device=)`` -> float [b, 3, H, W] on ``device``: row i is record ``indices[i]``,
ImageNet-normalised, flipped left-right at random (p = 0.5, torch's RNG on ``device``) when ``train``; a record
without a decodable image gives an all-zero row and ``ok[record] == False`` with ``errors[record]`` saying why.

Each record has candidate image paths in order; the first one that decodes is used (``images.py`` for the
backends, geometry and what happens to each kind of bad file).

- ``CachedImages.build(paths_per_record, size, backend, cache_path=None)`` decodes every record once into a
  uint8 [N, 3, H, W] tensor (in RAM, or a memory-mapped file at ``cache_path`` with a ``.json`` beside it; the
  file is reused when its key - format, size, backend, image limits, every candidate path with its size and mtime -
  matches). Later epochs and stage 2 only gather, copy and normalise.
- ``StreamingImages`` decodes the requested records through the backend on every call (the per-epoch path; on
  CUDA it decodes on the GPU). ``ok`` / ``errors`` start from a cheap scan (missing and empty files) and are
  refined as records are decoded; ``validate()`` decodes everything once to settle them up front.

With the same backend and decode device both give identical batches.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import safe_io
from .image_backend import resolve_backend
from .image_files import DEFAULT_LIMITS, Limits, file_problem
from .images import DEFAULT_CHUNK, assign_rows, decode_uint8, normalize

CACHE_FORMAT = 2  # 2: the image limits are part of the key


@runtime_checkable
class ImageSource(Protocol):
    size: tuple[int, int]
    ok: torch.Tensor  # bool [N]
    errors: dict[int, str]  # record index -> why it has no image

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor, *, train: bool, device: torch.device | str) -> torch.Tensor: ...


def finish_batch(pixels: torch.Tensor, ok: torch.Tensor | None, *, train: bool, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [b, 3, H, W] on the target device -> normalised ``dtype``, random horizontal flip when ``train``,
    rows with ``ok == False`` zeroed (``ok=None``: every row decoded). Everything happens on ``pixels.device``."""
    if train:  # flip the uint8 pixels: a quarter of the memory traffic of flipping floats
        flip = torch.rand(pixels.shape[0], device=pixels.device, generator=generator) < 0.5
        pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
    x = normalize(pixels, dtype=torch.float32)
    if ok is not None and (ok.device.type != "cpu" or not bool(ok.all())):  # no device sync for the check
        x.masked_fill_(~ok.to(x.device).view(-1, 1, 1, 1), 0.0)
    return x.to(dtype)


class PinnedStaging:
    """Page-locked host buffers for host-to-GPU batch copies, allocated once and reused (regrown for a larger
    batch) instead of a ``pin_memory()`` per batch. Two buffers in turn: a buffer is refilled only after the
    copy that last read it has finished (its CUDA event, recorded one batch earlier, has long completed when the
    device is busy with the step in between)."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def gather_to(self, source: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """``source[rows]`` on ``device``, gathered straight into a pinned buffer and copied asynchronously."""
        i, self._turn = self._turn, self._turn ^ 1
        if self._events[i] is not None:
            self._events[i].synchronize()
        shape = (len(rows), *source.shape[1:])
        size = int(np.prod(shape))
        if self._buffers[i] is None or self._buffers[i].numel() < size:
            self._buffers[i] = torch.empty(size, dtype=torch.uint8).pin_memory()
        staged = self._buffers[i][:size].view(shape)
        np.take(source, rows, axis=0, out=staged.numpy())
        out = staged.to(device, non_blocking=True)
        self._events[i] = torch.cuda.Event()
        self._events[i].record(torch.cuda.current_stream(device))
        return out


def _next_readable(cands: Sequence[str], k: int, notes: list[str], limits: Limits) -> int:
    """The first candidate from ``k`` on that ``image_files.file_problem`` lets through (``len(cands)``: none); the
    ones passed over get their reason in ``notes``."""
    while k < len(cands):
        problem = file_problem(cands[k], limits)
        if problem is None:
            return k
        notes.append(problem)
        k += 1
    return k


def _scan(paths_per_record: Sequence[Sequence[str]], limits: Limits = DEFAULT_LIMITS
          ) -> tuple[list[int], dict[int, list[str]]]:
    """Per record, the first candidate that is a regular, non-empty file within the byte limit (``len`` = none
    left) and the notes on the ones skipped."""
    choice, notes = [], {}
    for r, cands in enumerate(paths_per_record):
        skipped: list[str] = []
        choice.append(_next_readable(cands, 0, skipped, limits))
        if skipped:
            notes[r] = skipped
    return choice, notes


class _Records:
    """Candidate paths per record and which one is in use; decodes a set of records to their first decodable
    candidate, remembering the choice so failing candidates are not retried."""

    def __init__(self, paths_per_record: Sequence[Sequence[str]], size: Sequence[int], backend: str, chunk: int,
                 device: torch.device | None, limits: Limits | None = None):
        self.paths = [list(p) for p in paths_per_record]
        self.limits = limits or DEFAULT_LIMITS
        self.size = (int(size[0]), int(size[1]))
        self.request = backend  # resolved per decode device ("auto" may pick DALI on CUDA only)
        self.backend = resolve_backend(backend, device)
        self.chunk = chunk
        self.choice, self.notes = _scan(self.paths, self.limits)
        n = len(self.paths)
        self.ok = torch.tensor([self.choice[r] < len(self.paths[r]) for r in range(n)], dtype=torch.bool)
        self.errors: dict[int, str] = {r: self._error(r) for r in range(n) if not self.ok[r]}

    def _error(self, r: int) -> str:
        return "; ".join(self.notes.get(r, [])) or "no image"

    def _advance(self, r: int) -> None:
        """Move record r to its next readable candidate."""
        self.choice[r] = _next_readable(self.paths[r], self.choice[r] + 1, self.notes.setdefault(r, []), self.limits)

    def decode(self, rows: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [len(rows), 3, H, W] on ``device`` and ok [len(rows)] for these (distinct) records."""
        h, w = self.size
        out = torch.zeros((len(rows), 3, h, w), dtype=torch.uint8, device=device)
        ok = torch.zeros(len(rows), dtype=torch.bool)
        pending = [p for p, r in enumerate(rows) if self.choice[r] < len(self.paths[r])]
        while pending:
            res = decode_uint8([self.paths[rows[p]][self.choice[rows[p]]] for p in pending], self.size, self.request,
                               device=device, chunk=self.chunk, limits=self.limits)
            good = [j for j in range(len(pending)) if res.ok[j]]
            if len(pending) == len(rows) and not ok.any():
                out = res.pixels  # the usual case: every record in one go, failed rows already zero
            elif good:
                decoded = res.pixels[torch.as_tensor(good, device=res.pixels.device)]
                assign_rows(out, [pending[j] for j in good], decoded)
            retry = []
            for j, p in enumerate(pending):
                r = rows[p]
                if res.ok[j]:
                    ok[p] = True
                    continue
                self.notes.setdefault(r, []).append(res.errors.get(j, "decode failed"))
                self._advance(r)
                if self.choice[r] < len(self.paths[r]):
                    retry.append(p)
            pending = retry
        for p, r in enumerate(rows):
            self.ok[r] = bool(ok[p])
            if ok[p]:
                self.errors.pop(r, None)
            else:
                self.errors[r] = self._error(r)
        return out, ok

    def chosen(self, r: int) -> str | None:
        return self.paths[r][self.choice[r]] if self.ok[r] else None


def _auto_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cache_key(paths_per_record: Sequence[Sequence[str]], size: tuple[int, int], backend: str,
               limits: Limits = DEFAULT_LIMITS) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT, list(size), backend, limits.max_bytes, limits.max_pixels]).encode())
    for cands in paths_per_record:
        row = []
        for p in cands:
            try:
                st = os.stat(p)
                row.append([p, st.st_size, st.st_mtime_ns])
            except OSError:
                row.append([p, None, None])
        h.update(json.dumps(row).encode())
    return h.hexdigest()


class CachedImages:
    """Every record decoded once to uint8 [N, 3, H, W] at training resolution (RAM or memory-mapped file)."""

    def __init__(self, pixels: torch.Tensor, ok: torch.Tensor, errors: dict[int, str], *, backend: str,
                 chosen: list[str | None] | None = None, cache_path: str | None = None, reused: bool = False):
        self.pixels = pixels
        self.size = (int(pixels.shape[2]), int(pixels.shape[3]))
        self.ok = ok
        self.errors = errors
        self.backend = backend
        self.chosen = chosen or [None] * len(ok)
        self.cache_path = cache_path
        self.reused = reused  # True when loaded from an existing cache file
        self._staging = PinnedStaging()

    def __len__(self) -> int:
        return int(self.ok.shape[0])

    @classmethod
    def build(cls, paths_per_record: Sequence[Sequence[str]], size: Sequence[int], backend: str = "auto",
              cache_path: str | None = None, *, device: torch.device | str | None = None,
              chunk: int = DEFAULT_CHUNK, progress: bool = True, limits: Limits | None = None) -> CachedImages:
        """Decode each record's first decodable image (on ``device``: CUDA when present unless given) and keep
        it as uint8 on the CPU; with ``cache_path``, in a memory-mapped file reused while its key matches."""
        dev = _auto_device(device)
        recs = _Records(paths_per_record, size, backend, chunk, dev, limits)
        n, (h, w) = len(recs.paths), recs.size
        key = _cache_key(recs.paths, recs.size, recs.backend, recs.limits) if cache_path else ""
        if cache_path:
            cached = cls._load(cache_path, key, n, (h, w))
            if cached is not None:
                return cached
        storage = None
        if cache_path and n:
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
            tmp = f"{cache_path}.tmp{os.getpid()}"
            storage = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, 3, h, w))
            pixels = torch.from_numpy(storage)
        else:
            pixels = torch.zeros((n, 3, h, w), dtype=torch.uint8)
        try:
            with tqdm(total=n, desc=f"decoding images ({recs.backend}, {h}x{w})", unit="img",
                      disable=not progress) as bar:
                for start in range(0, n, chunk):
                    rows = list(range(start, min(start + chunk, n)))
                    px, _ = recs.decode(rows, dev)
                    assign_rows(pixels, rows, px.cpu())
                    bar.update(len(rows))
        except BaseException:
            if storage is not None:  # no half-written cache left behind
                del pixels, storage
                os.remove(tmp)
            raise
        errors = dict(sorted(recs.errors.items()))
        chosen = [recs.chosen(r) for r in range(n)]
        if storage is not None:
            storage.flush()
            del pixels, storage
            os.replace(tmp, cache_path)
            meta = {"format": CACHE_FORMAT, "key": key, "n": n, "size": [h, w], "backend": recs.backend,
                    "ok": recs.ok.int().tolist(), "errors": {str(k): v for k, v in errors.items()}, "chosen": chosen}
            with open(f"{cache_path}.json.tmp", "w") as f:
                json.dump(meta, f)
            os.replace(f"{cache_path}.json.tmp", f"{cache_path}.json")
            pixels = cls._map(cache_path, n, (h, w))
        elif cache_path:  # no records: nothing to map, but record the key
            with open(f"{cache_path}.json", "w") as f:
                json.dump({"format": CACHE_FORMAT, "key": key, "n": 0, "size": [h, w], "backend": recs.backend,
                           "ok": [], "errors": {}, "chosen": []}, f)
        return cls(pixels, recs.ok.clone(), errors, backend=recs.backend, chosen=chosen, cache_path=cache_path)

    @staticmethod
    def _map(path: str, n: int, size: tuple[int, int]) -> torch.Tensor:
        # copy-on-write mapping: pages are read lazily, writes never reach the file
        return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=(n, 3, *size)))

    @classmethod
    def _load(cls, cache_path: str, key: str, n: int, size: tuple[int, int]) -> CachedImages | None:
        try:
            meta = safe_io.read_json(f"{cache_path}.json")
        except safe_io.FileRefused:
            return None
        if not isinstance(meta, dict):
            return None
        if meta.get("key") != key or meta.get("n") != n or meta.get("format") != CACHE_FORMAT:
            return None
        if n == 0:
            pixels = torch.zeros((0, 3, *size), dtype=torch.uint8)
        else:
            try:
                if os.path.getsize(cache_path) != n * 3 * size[0] * size[1]:
                    return None
            except OSError:
                return None
            pixels = cls._map(cache_path, n, size)
        ok = torch.tensor(meta["ok"], dtype=torch.bool)
        errors = {int(k): v for k, v in meta["errors"].items()}
        return cls(pixels, ok, errors, backend=meta["backend"], chosen=meta["chosen"], cache_path=cache_path,
                   reused=True)

    def batch(self, indices: torch.Tensor, *, train: bool, device: torch.device | str,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        idx = torch.as_tensor(indices).to("cpu", torch.long).numpy()
        dev = torch.device(device)
        if dev.type == "cuda":
            px = self._staging.gather_to(self.pixels.numpy(), idx, dev)
        else:  # numpy's gather: one thread, no OpenMP stalls
            px = torch.from_numpy(self.pixels.numpy()[idx]).to(dev)
        ok = self.ok.numpy()[idx]  # numpy, on the host: no tensor sync to check it
        return finish_batch(px, None if ok.all() else torch.from_numpy(ok), train=train, dtype=dtype)


class StreamingImages:
    """Decodes the requested records through the backend on every ``batch`` call, on the batch's device unless
    ``decode_device`` is given."""

    def __init__(self, paths_per_record: Sequence[Sequence[str]], size: Sequence[int], backend: str = "auto", *,
                 decode_device: torch.device | str | None = None, chunk: int = DEFAULT_CHUNK,
                 limits: Limits | None = None):
        self.decode_device = torch.device(decode_device) if decode_device is not None else None
        self._recs = _Records(paths_per_record, size, backend, chunk, self.decode_device, limits)
        self.size = self._recs.size
        self.backend = self._recs.backend  # for the decode device (CPU when not given: batches decode where asked)

    @classmethod
    def build(cls, paths_per_record: Sequence[Sequence[str]], size: Sequence[int], backend: str = "auto", *,
              decode_device: torch.device | str | None = None, chunk: int = DEFAULT_CHUNK,
              validate: bool = False, progress: bool = True, limits: Limits | None = None) -> StreamingImages:
        """The constructor, optionally followed by ``validate()``."""
        src = cls(paths_per_record, size, backend, decode_device=decode_device, chunk=chunk, limits=limits)
        return src.validate(progress=progress) if validate else src

    @property
    def ok(self) -> torch.Tensor:
        return self._recs.ok

    @property
    def errors(self) -> dict[int, str]:
        return dict(sorted(self._recs.errors.items()))

    def __len__(self) -> int:
        return len(self._recs.paths)

    def validate(self, *, progress: bool = True) -> StreamingImages:
        """Decode every record once (pixels discarded) so ``ok`` / ``errors`` are final before training."""
        n, chunk = len(self), self._recs.chunk
        dev = self.decode_device or _auto_device(None)
        with tqdm(total=n, desc=f"checking images ({self.backend})", unit="img", disable=not progress) as bar:
            for start in range(0, n, chunk):
                rows = list(range(start, min(start + chunk, n)))
                self._recs.decode(rows, dev)
                bar.update(len(rows))
        return self

    def batch(self, indices: torch.Tensor, *, train: bool, device: torch.device | str,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows = torch.as_tensor(indices).to("cpu", torch.long).tolist()
        dev = torch.device(device)
        unique = list(dict.fromkeys(rows))
        px, ok = self._recs.decode(unique, self.decode_device or dev)
        if len(unique) != len(rows):
            where = {r: p for p, r in enumerate(unique)}
            gather = torch.as_tensor([where[r] for r in rows])
            px, ok = px[gather.to(px.device)], ok[gather]
        return finish_batch(px.to(dev), ok, train=train, dtype=dtype)


def image_source(paths_per_record: Sequence[Sequence[str]], size: Sequence[int], backend: str = "auto", *,
                 cached: bool = False, cache_path: str | None = None, device: torch.device | str | None = None,
                 progress: bool = True, limits: Limits | None = None) -> CachedImages | StreamingImages:
    """``CachedImages`` when ``cached`` or a ``cache_path`` is given, else ``StreamingImages``."""
    if cached or cache_path:
        return CachedImages.build(paths_per_record, size, backend, cache_path, device=device, progress=progress,
                                  limits=limits)
    return StreamingImages(paths_per_record, size, backend, decode_device=device, limits=limits)


__all__ = ["CachedImages", "ImageSource", "StreamingImages", "finish_batch", "image_source"]
