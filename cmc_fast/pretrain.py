"""Masked-language-model pre-training of the tiny text model on the training texts (BERT's objective, Devlin et
al. 2019), for runs that cannot load pretrained weights: a randomly initialised transformer fine-tuned on a few
thousand labelled posts learns the label from surface cues; learning the language of the posts first helps it
carry over to posts about other stories.

Only the fit split's texts are used (never validation or test). The vocabulary has no ``[MASK]``: ``[UNK]`` plays
its part, which is also what the fine-tuned model meets for tokens it has never seen.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger("cmc_fast")


def mask_tokens(ids: torch.Tensor, attention: torch.Tensor, *, special_ids: tuple[int, ...], mask_id: int,
                vocab_size: int, first_regular_id: int, generator: torch.Generator,
                rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: each real, non-special token is picked with probability ``rate``; a picked token
    becomes ``mask_id`` (80%), a random regular token (10%) or stays (10%). Returns (corrupted ids, picked mask);
    the targets are ``ids[picked]``."""
    eligible = attention.bool()
    for sid in special_ids:
        eligible &= ids != sid
    draw = torch.rand(ids.shape, generator=generator, device=ids.device)
    picked = (draw < rate) & eligible
    how = torch.rand(ids.shape, generator=generator, device=ids.device)
    out = ids.clone()
    out[picked & (how < 0.8)] = mask_id
    swap = picked & (how >= 0.8) & (how < 0.9)
    out[swap] = torch.randint(first_regular_id, vocab_size, (int(swap.sum()),), generator=generator,
                              device=ids.device)
    return out, picked


def pretrain_mlm(encoder: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor, tokenizer, *, epochs: int,
                 lr: float, batch_size: int, seed: int, progress: bool = True,
                 held_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[dict, list[dict]]:
    """Train ``encoder`` (a Hugging Face ``BertModel``) with a masked-LM head on the rows of ``ids``; returns its
    new state dict and one {epoch, mlm_loss, seconds} per epoch (plus ``held_out_loss``, the masked-token loss on
    ``held_out`` = (ids, attention) under fixed masks, when given; the first entry also has its value before
    training). The head's decoder is tied to the word embeddings (as in BERT) and is thrown away afterwards.
    Logits are computed for the masked positions only."""
    from transformers import BertForMaskedLM

    mlm = BertForMaskedLM(encoder.config).to(ids.device)
    mlm.bert.load_state_dict(encoder.state_dict())
    opt = torch.optim.AdamW(mlm.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    specials = (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id)
    first_regular = 1 + max(*specials, tokenizer.unk_id)  # random replacements are never special tokens
    corrupt = dict(special_ids=specials, mask_id=tokenizer.unk_id, vocab_size=len(tokenizer),
                   first_regular_id=first_regular)

    def held_out_loss() -> float:
        h_ids, h_att = held_out
        fixed = torch.Generator(device=h_ids.device).manual_seed(seed + 1)
        mlm.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for rows in torch.arange(len(h_ids), device=h_ids.device).split(256):
                corrupted, picked = mask_tokens(h_ids[rows], h_att[rows], generator=fixed, **corrupt)
                hidden = mlm.bert(input_ids=corrupted, attention_mask=h_att[rows]).last_hidden_state
                total += float(F.cross_entropy(mlm.cls(hidden[picked]), h_ids[rows][picked], reduction="sum"))
                count += int(picked.sum())
        mlm.train()
        return total / max(count, 1)

    start_loss = held_out_loss() if held_out is not None else None
    history = []
    mlm.train()
    for epoch in range(epochs):
        # the loss sum stays on the device (float64, as a Python float would add it): no host sync per step
        t0, total, batches = time.perf_counter(), torch.zeros((), dtype=torch.float64, device=ids.device), 0
        order = torch.randperm(len(ids), generator=gen, device=ids.device).split(batch_size)
        for rows in tqdm(order, desc=f"text-mlm {epoch + 1}/{epochs}", leave=False, disable=not progress):
            corrupted, picked = mask_tokens(ids[rows], attention[rows], generator=gen, **corrupt)
            if not picked.any():
                continue
            hidden = mlm.bert(input_ids=corrupted, attention_mask=attention[rows]).last_hidden_state
            loss = F.cross_entropy(mlm.cls(hidden[picked]), ids[rows][picked])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + loss.detach().double(), batches + 1
        entry = {"epoch": epoch + 1, "mlm_loss": float(total) / max(batches, 1), "seconds": time.perf_counter() - t0}
        if held_out is not None:
            entry["held_out_loss"] = held_out_loss()
            if epoch == 0:
                entry["held_out_loss_at_start"] = start_loss
        history.append(entry)
        log.info("text-mlm epoch %d/%d: masked-token loss %.4f%s (%.0fs)", epoch + 1, epochs, entry["mlm_loss"],
                 f", held out {entry['held_out_loss']:.4f}" if held_out is not None else "", entry["seconds"])
    return {k: v.detach().clone() for k, v in mlm.bert.state_dict().items()}, history
