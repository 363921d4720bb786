"""Model builders: the AMP policy on a CPU, --device checked against the devices present, text encoders loaded in
float32 whatever the checkpoint's dtype."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from tiny import tiny_config

from cmc_fast import models
from cmc_fast.errors import UsageError
from cmc_fast.models import amp_dtype, cpu_has_native_bf16, resolve_device

AVX512_BF16_ONLY = "processor : 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
WITH_AMX = "processor : 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"


def test_native_bf16_means_amx_tiles():
    assert not cpu_has_native_bf16(AVX512_BF16_ONLY)
    assert cpu_has_native_bf16(WITH_AMX)
    assert not cpu_has_native_bf16("")


def test_amp_on_a_cpu_without_native_bf16_is_skipped_with_one_warning(tmp_path, monkeypatch, caplog):
    cfg = tiny_config(tmp_path, amp=True)
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    notes: list[str] = []
    with caplog.at_level(logging.WARNING, logger="cmc_fast"):
        assert amp_dtype(cfg, torch.device("cpu"), notes) is None
    assert len(caplog.records) == 1 and "--amp skipped" in caplog.records[0].getMessage()
    assert len(notes) == 1 and "amx_bf16" in notes[0]
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert amp_dtype(cfg, torch.device("cpu"), []) is torch.bfloat16
    assert amp_dtype(dataclasses.replace(cfg, amp=False), torch.device("cpu"), []) is None


def test_device_index_is_checked_against_the_devices_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UsageError, match=r"--device cuda:1: this machine has 1 CUDA device"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="--device cuda"):
        resolve_device("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_text_checkpoint_loads_in_float32(tmp_path, dtype):
    from transformers import BertConfig, BertModel, BertTokenizer

    from cmc_fast.encoders import load_text_model

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]) + "\n")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(dtype).save_pretrained(tmp_path / "ckpt")
    BertTokenizer(str(vocab)).save_pretrained(tmp_path / "ckpt")
    encoder, _ = load_text_model(str(tmp_path / "ckpt"))
    state = encoder.model.state_dict()
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    for key, value in reference.items():  # the checkpoint's values, widened (not a fresh init)
        if value.is_floating_point():
            torch.testing.assert_close(state[key], value.to(dtype).float(), rtol=0, atol=0)
    ids = torch.tensor([[2, 5, 6, 3, 0]])
    feat = encoder(ids, (ids != 0).long())
    assert feat.dtype == torch.float32 and torch.isfinite(feat).all()


def test_the_ready_made_attention_mask_matches_transformers_own():
    from cmc_fast.encoders import tiny_text_encoder

    torch.manual_seed(0)
    encoder = tiny_text_encoder(50, 12, dim=32, layers=2, dropout=0.0).eval()
    assert encoder.model.config._attn_implementation == "sdpa"
    ids = torch.randint(4, 50, (6, 12))
    mask = (torch.arange(12) < torch.tensor([12, 3, 7, 12, 1, 9])[:, None]).long()
    ids[mask == 0] = 0
    with torch.no_grad():
        ours = encoder(ids, mask)
        hidden = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state  # transformers' 2D path
        m = mask.unsqueeze(-1).float()
        theirs = (hidden * m).sum(1) / m.sum(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_cli_says_amp_was_skipped_on_the_console_once(tmp_path, monkeypatch, capsys):
    """A user who typed --amp on a CPU without bf16 units reads it on the console (once), not only in log.txt."""
    from tiny import TINY

    from cmc_fast import models
    from cmc_fast.cli import main

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert main(["train", *TINY, "--variant", "finetune-t", "--amp", "--data-root", str(tmp_path / "data"),
                 "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert err.count("cmc-fast: warning: --amp skipped") == 1, err
    assert "--amp skipped" in (tmp_path / "run" / "log.txt").read_text()
