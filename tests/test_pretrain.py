"""Masked-LM pre-training of the tiny text model: the corruption, that it learns, and the trainer's use of it."""

from __future__ import annotations

import dataclasses
import json

import torch
from cmc_fast.data_pipeline.text import VocabTokenizer, encode_texts

from cmc_fast.encoders import tiny_text_encoder
from cmc_fast.pretrain import mask_tokens, pretrain_mlm


def test_mask_tokens_follows_berts_recipe():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 500, (400, 64), generator=gen)
    attention = (torch.arange(64) < torch.randint(8, 64, (400, 1), generator=gen)).long()
    ids[:, 0] = 2  # [CLS]
    ids[attention == 0] = 0  # padding
    corrupted, picked = mask_tokens(ids, attention, special_ids=(0, 2, 3), mask_id=1, vocab_size=500,
                                    first_regular_id=4, generator=torch.Generator().manual_seed(1))
    eligible = (attention == 1) & (ids != 2)
    assert not (picked & ~eligible).any()  # never padding or a special token
    assert torch.equal(corrupted[~picked], ids[~picked])
    rate = picked.sum() / eligible.sum()
    assert 0.14 < float(rate) < 0.16
    n = int(picked.sum())
    masked = int((corrupted[picked] == 1).sum())
    kept = int((corrupted[picked] == ids[picked]).sum())
    assert abs(masked / n - 0.8) < 0.02
    assert abs(kept / n - 0.1) < 0.02 + 1 / 496  # a random replacement can hit the same token
    assert int(corrupted[picked].min()) >= 1 and int(corrupted[picked & (corrupted != 1)].min()) >= 4


def _corpus(n: int, seed: int) -> list[str]:
    """Sentences with a learnable structure: each is a 'word' pattern repeated, so context predicts a token."""
    gen = torch.Generator().manual_seed(seed)
    alphabet = "甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉"
    out = []
    for _ in range(n):
        word = "".join(alphabet[int(i)] for i in torch.randint(0, len(alphabet), (3,), generator=gen))
        out.append(word * 6)
    return out


def test_pretraining_learns_to_fill_in_masked_tokens():
    torch.manual_seed(0)
    train, held_out = _corpus(300, 0), _corpus(100, 1)
    tok = VocabTokenizer.build(train)
    ids, attention = encode_texts(train, tok, 24)
    test_ids, test_attention = encode_texts(held_out, tok, 24)
    encoder = tiny_text_encoder(len(tok), 24, dim=32, layers=1, dropout=0.0)
    before_state = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    state, history = pretrain_mlm(encoder.model, ids, attention, tok, epochs=20, lr=5e-3, batch_size=32, seed=0,
                                  progress=False, held_out=(test_ids, test_attention))
    assert [h["epoch"] for h in history] == list(range(1, 21))
    assert history[-1]["mlm_loss"] < history[0]["mlm_loss"]
    # the input encoder is untouched; the returned state loads strictly into a fresh one
    assert all(torch.equal(v, encoder.model.state_dict()[k]) for k, v in before_state.items())
    fresh = tiny_text_encoder(len(tok), 24, dim=32, layers=1, dropout=0.0)
    fresh.model.load_state_dict(state)
    # on sentences it never saw, the pre-trained model predicts masked tokens far better than at the start
    before, after = history[0]["held_out_loss_at_start"], history[-1]["held_out_loss"]
    assert after < 0.5 * before, (before, after)


def test_trainer_pretrains_once_and_every_text_model_starts_from_it(tmp_path):
    from tiny import tiny_config

    from cmc_fast.checkpoint import load_checkpoint
    from cmc_fast.trainer import Trainer

    tr = Trainer(tiny_config(tmp_path, variant="finetune-t", text_pretrain_epochs=1), tmp_path / "run")
    tr.setup()
    first, second = tr.ctx.build.text_encoder(), tr.ctx.build.text_encoder()
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "text-mlm.pt")["encoder"]
    for enc in (first, second):
        state = enc.model.state_dict()
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    tr.ctx.build.cfg = dataclasses.replace(tr.cfg, text_pretrain_epochs=0)
    plain = tr.ctx.build.text_encoder().model.state_dict()
    assert not torch.equal(plain["embeddings.word_embeddings.weight"], saved["embeddings.word_embeddings.weight"])
    assert len(tr.ctx.build.text_mlm_history) == 1


def test_cli_run_records_pretraining_and_resume_reuses_it(tmp_path):
    from tiny import TINY

    from cmc_fast.cli import main

    out = tmp_path / "run"
    assert main(["train", *TINY, "--variant", "finetune-t,cmc-t", "--text-pretrain-epochs", "2", "--data-root",
                 str(tmp_path / "data"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["text_mlm"]] == [1, 2]
    assert (out / "log.txt").read_text().count("text-mlm epoch 2/2") == 1  # two stages, one pre-training
    assert main(["train", "--resume", str(out)]) == 0
    log = (out / "log.txt").read_text()
    assert log.count("text-mlm epoch 2/2") == 1 and "pre-trained weights loaded" in log
    assert main(["train", *TINY, "--text-model", "ngram", "--text-pretrain-epochs", "1"]) == 2
