"""Tokenisation: a vocabulary tokenizer for the ``tiny`` text encoder, and head+tail truncation for any
Hugging Face tokenizer. Both return fixed-length ``input_ids`` / ``attention_mask`` int64 tensors."""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from . import safe_io

# CJK characters stand alone (Chinese has no spaces); other scripts split into lower-cased words. The word class
# excludes CJK explicitly: \w matches CJK too, so '2013年7月' would otherwise be glued into one token.
_CJK = "\u3400-\u9fff\uf900-\ufaff"
_TOKEN_RE = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+|[^\w\s]", re.UNICODE)
PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
VOCAB_FILE_LIMIT = 64 << 20  # a 1-million-token vocabulary is ~15 MB of JSON


def split_tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


def head_tail(ids: list[int], budget: int) -> list[int]:
    """Keep the first and last tokens when a text is too long (Sun et al. 2019: head+tail beats either)."""
    if len(ids) <= budget:
        return ids
    head = (budget + 1) // 2
    tail = budget - head
    return ids[:head] + (ids[len(ids) - tail:] if tail else [])


class VocabTokenizer:
    """Word/character vocabulary built from training texts, for randomly initialised text encoders."""

    def __init__(self, vocab: Sequence[str]):
        self.vocab = list(vocab)
        self.index = {t: i for i, t in enumerate(self.vocab)}
        for special in (PAD, UNK, CLS, SEP):
            if special not in self.index:
                raise ValueError(f"vocabulary lacks the special token {special}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = (self.index[t] for t in (PAD, UNK, CLS, SEP))

    @classmethod
    def build(cls, texts: Sequence[str], max_size: int = 20000, min_freq: int = 1) -> VocabTokenizer:
        counts = collections.Counter(t for text in texts for t in split_tokens(text))
        common = [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_freq]
        return cls([PAD, UNK, CLS, SEP] + common[: max(0, max_size - 4)])

    def __len__(self) -> int:
        return len(self.vocab)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> VocabTokenizer:
        """A saved vocabulary: a JSON list of distinct strings holding the special tokens, read through
        ``safe_io`` (a regular file within ``VOCAB_FILE_LIMIT``); anything else raises ``FileRefused`` naming it."""
        vocab = safe_io.read_json(path, VOCAB_FILE_LIMIT)
        if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
            raise safe_io.FileRefused(f"{path}: not a vocabulary (expected a JSON list of strings)")
        if len(set(vocab)) != len(vocab):
            raise safe_io.FileRefused(f"{path}: not a vocabulary (a token is listed twice)")
        try:
            return cls(vocab)
        except ValueError as exc:
            raise safe_io.FileRefused(f"{path}: not a vocabulary ({exc})") from None

    def encode(self, text: str) -> list[int]:
        return [self.index.get(t, self.unk_id) for t in split_tokens(text)]


def encode_texts(texts: Sequence[str], tokenizer, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] head+tail(tokens) [SEP], padded to ``max_len``. Works for ``VocabTokenizer`` and for Hugging
    Face tokenizers (their own special tokens are used)."""
    if max_len < 3:
        raise ValueError(f"--max-len must be at least 3, got {max_len}")
    if isinstance(tokenizer, VocabTokenizer):
        pieces = [tokenizer.encode(t) for t in texts]
        cls_id, sep_id, pad_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
    else:  # (a Hugging Face fast tokenizer raises IndexError on an empty batch)
        # verbose=False: long texts are cut to head + tail below, so the "longer than the maximum" warning is noise
        pieces = (tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
                  if texts else [])
        cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    specials = [t for t in (cls_id, sep_id) if t is not None]
    ids = torch.full((len(texts), max_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(texts), max_len), dtype=torch.long)
    for row, piece in enumerate(pieces):
        body = head_tail(list(piece), max_len - len(specials))
        seq = ([cls_id] if cls_id is not None else []) + body + ([sep_id] if sep_id is not None else [])
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask
