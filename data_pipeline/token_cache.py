"""Tokenise a dataset once per tokenizer and length: ``encode_texts`` results cached on disk.

``cached_encode(texts, tokenizer, max_len)`` returns what ``encode_texts`` returns (int64 ``input_ids`` and
``attention_mask``, [n, max_len]). The cache file's name is a hash of:

- the tokenizer's identity: for ``VocabTokenizer`` a hash of its vocabulary; for a Hugging Face tokenizer
  its class, ``name_or_path``, vocabulary size, special-token ids and a hash of its full definition
  (``backend_tokenizer.to_str()`` for fast tokenizers, else its vocabulary), plus ``tokenizer_key`` when
  the caller passes one;
- ``max_len``;
- a hash of the texts (each text length-prefixed, so the list's boundaries count);
- a hash of ``data_pipeline/text.py``, so a change to the tokenisation code invalidates old entries.

Files are written atomically (temporary file in the same directory, then ``os.replace``); a corrupt or
mismatching file is recomputed and overwritten. Default directory: ``$CMC_FAST_CACHE/tokens``, else
``~/.cache/cmc-fast/tokens`` (the same base as the synthetic dataset's cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from . import safe_io
from . import text as text_module
from .cache import cache_root
from .text import VocabTokenizer, encode_texts

log = logging.getLogger(__name__)
FORMAT = 1


def default_cache_dir() -> Path:
    return cache_root() / "tokens"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A string that changes whenever the tokenizer would encode differently."""
    if isinstance(tokenizer, VocabTokenizer):
        return "vocab:" + _sha(json.dumps(tokenizer.vocab, ensure_ascii=False).encode("utf-8"))
    parts = {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": getattr(tokenizer, "vocab_size", None),
        "len": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        "specials": [getattr(tokenizer, f"{t}_token_id", None) for t in ("cls", "sep", "pad", "bos", "eos", "unk")],
        "lower": getattr(tokenizer, "do_lower_case", None),
    }
    definition = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        try:  # truncation/padding are call-time state the tokenizer rewrites on each call: not identity
            spec = json.loads(backend.to_str())
            spec.pop("truncation", None)
            spec.pop("padding", None)
            definition = _sha(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        except Exception:  # noqa: BLE001 - fall back to the vocabulary
            definition = None
    if definition is None and hasattr(tokenizer, "get_vocab"):
        definition = _sha(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    parts["definition"] = definition
    return "hf:" + json.dumps(parts, sort_keys=True, default=str)


def texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    h.update(len(texts).to_bytes(8, "little"))
    return h.hexdigest()


def _code_digest() -> str:
    try:
        return _sha(Path(text_module.__file__).read_bytes())
    except OSError:
        return "unknown"


def cache_key(texts: Sequence[str], tokenizer, max_len: int, tokenizer_key: str | None = None) -> str:
    parts = {"format": FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "tokenizer_key": tokenizer_key,
             "max_len": int(max_len), "texts": texts_digest(texts), "code": _code_digest()}
    return _sha(json.dumps(parts, sort_keys=True).encode("utf-8"))[:40]


def cache_path(texts: Sequence[str], tokenizer, max_len: int, cache_dir: str | os.PathLike | None = None,
               tokenizer_key: str | None = None) -> Path:
    """Where ``cached_encode`` keeps (or would keep) this encoding."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / f"tokens-{cache_key(texts, tokenizer, max_len, tokenizer_key)}.pt"


def _load(path: Path, n: int, max_len: int, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        with safe_io.open_regular(path) as f:  # a pipe or device planted in the cache is refused unopened
            blob = torch.load(f, map_location="cpu", weights_only=True)
        ids, mask = blob["input_ids"], blob["attention_mask"]
        if blob.get("key") != key or tuple(ids.shape) != (n, max_len) or tuple(mask.shape) != (n, max_len):
            raise ValueError("shape or key mismatch")
    except Exception as exc:  # noqa: BLE001 - any unreadable entry is recomputed
        if not os.path.lexists(path):
            return None
        log.warning("token cache: %s unusable (%s: %s); recomputing", path, type(exc).__name__, exc)
        return None
    return ids.to(torch.long), mask.to(torch.long)


def _save(path: Path, ids: torch.Tensor, mask: torch.Tensor, key: str, meta: dict) -> None:
    small = torch.int32 if (ids.numel() == 0 or int(ids.max()) < 2**31) else torch.long
    blob = {"key": key, "input_ids": ids.to(small), "attention_mask": mask.to(torch.uint8), "meta": meta}
    safe_io.atomic_write(path, lambda f: torch.save(blob, f))


def cached_encode(texts: Sequence[str], tokenizer, max_len: int, cache_dir: str | os.PathLike | None = None,
                  tokenizer_key: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_texts(texts, tokenizer, max_len)``, loaded from the disk cache when this exact encoding was
    computed before, else computed and stored. A cache directory that cannot be written only costs the
    cache (a warning is logged), never the run."""
    texts = list(texts)
    key = cache_key(texts, tokenizer, max_len, tokenizer_key)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = base / f"tokens-{key}.pt"
    hit = _load(path, len(texts), max_len, key)
    if hit is not None:
        log.info("token cache: hit %s (%d texts, max_len %d)", path, len(texts), max_len)
        return hit
    ids, mask = encode_texts(texts, tokenizer, max_len)
    meta = {"n": len(texts), "max_len": int(max_len), "tokenizer_key": tokenizer_key or "",
            "tokenizer": tokenizer_fingerprint(tokenizer)[:500]}
    try:
        _save(path, ids, mask, key, meta)
        log.info("token cache: stored %s (%d texts, max_len %d)", path, len(texts), max_len)
    except OSError as exc:
        log.warning("token cache: cannot write %s (%s); continuing without the cache", path, exc)
    return ids, mask
