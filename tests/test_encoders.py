import json

import pytest
import torch

from cmc_fast.encoders import NgramEncoder, TinyCNN, build_image_encoder, tiny_text_encoder
from cmc_fast.errors import UsageError


def _gram_counts(enc: NgramEncoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How often each embedding row is used per post, read back through one-hot rows: [posts, rows]."""
    probe = NgramEncoder(enc.vocab_size, dim=enc.vocab_size + enc.buckets, buckets=enc.buckets, dropout=0.0).eval()
    with torch.no_grad():
        probe.embed.weight.copy_(torch.eye(enc.vocab_size + enc.buckets))
        kept = mask.sum(1)
        grams = kept + (kept - 1).clamp_min(0) + (kept - 2).clamp_min(0)  # uni-, bi- and trigrams of each post
        return probe(ids, mask) * grams[:, None]


def test_ngram_encoder_is_the_mean_of_its_grams_and_ignores_padding():
    torch.manual_seed(0)
    vocab, buckets = 50, 97
    enc = NgramEncoder(vocab_size=vocab, dim=8, buckets=buckets, dropout=0.0).eval()
    # posts: [5 7 9], [3 4], and the n-grams of the first one on their own: [5 7], [7 9]
    ids = torch.tensor([[5, 7, 9, 0, 0], [3, 4, 0, 0, 0], [5, 7, 0, 0, 0], [7, 9, 0, 0, 0]])
    mask = (ids != 0).long()
    counts = _gram_counts(enc, ids, mask).round()
    uni, hashed = counts[:, :vocab], counts[:, vocab:]
    # every real token once in the unigram rows; each bigram and trigram in one of the hashed rows
    for post, tokens in enumerate(([5, 7, 9], [3, 4], [5, 7], [7, 9])):
        expected = torch.zeros(vocab)
        expected[tokens] = 1
        torch.testing.assert_close(uni[post], expected)
        n = len(tokens)
        assert hashed[post].sum() == (n - 1) + max(n - 2, 0) and (hashed[post] >= 0).all()
    # a bigram hashes to the same row wherever it appears: [5 7 9]'s rows are its two bigrams' and one more
    rest = hashed[0] - hashed[2] - hashed[3]
    assert (rest >= 0).all() and rest.sum() == 1
    # the output is the mean of the embedding rows of those grams, computed from the counts
    out = enc(ids, mask)
    w = enc.embed.weight
    torch.testing.assert_close(out, (counts @ w) / counts.sum(1, keepdim=True))
    # padding content does not matter
    ids2 = ids.clone()
    ids2[0, 3:] = 11
    torch.testing.assert_close(enc(ids2, mask), out)


def test_tiny_text_encoder_pools_only_real_tokens():
    torch.manual_seed(0)
    enc = tiny_text_encoder(vocab_size=30, max_len=12, dim=32, layers=1).eval()
    ids = torch.randint(4, 30, (3, 12))
    mask = torch.ones_like(ids)
    mask[:, 8:] = 0
    out = enc(ids, mask)
    ids2 = ids.clone()
    ids2[:, 8:] = 5
    assert out.shape == (3, 32)
    torch.testing.assert_close(enc(ids2, mask), out)


def test_image_encoders_and_missing_weights():
    assert TinyCNN()(torch.rand(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(UsageError, match="--image-weights"):
        build_image_encoder("vgg19", "/no/such/vgg19.pth", (64, 32))
    enc = build_image_encoder("vgg19", None, (64, 32))
    assert enc.out_dim == 512 * 2 * 1


def _sentence_transformers_dir(tmp_path, modules, pooling_config) -> str:
    """A checkpoint folder holding only what ``declared_pooling`` reads: modules.json and the Pooling config."""
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    if pooling_config is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    return str(tmp_path)


POOLING_MODULE = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
MODES = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False}


@pytest.mark.parametrize("modules, pooling_config, expected", [
    ([POOLING_MODULE], {**MODES, "pooling_mode_mean_tokens": True}, "mean"),
    ([POOLING_MODULE], {**MODES, "pooling_mode_cls_token": True}, "cls"),
    ([POOLING_MODULE], {**MODES, "pooling_mode_max_tokens": True}, None),  # max is not built: the caller's default
    ([{"path": "", "type": "sentence_transformers.models.Transformer"}], None, None),  # no Pooling module
    ([POOLING_MODULE], None, None),  # the Pooling folder is missing
])
def test_the_pooling_a_checkpoint_declares_is_read(tmp_path, modules, pooling_config, expected):
    from cmc_fast.encoders import declared_pooling

    found = declared_pooling(_sentence_transformers_dir(tmp_path, modules, pooling_config))
    assert (found[0] if found else None) == expected
    if found:
        assert str(tmp_path / "1_Pooling" / "config.json") in found[1]
    assert declared_pooling(str(tmp_path / "elsewhere")) is None  # a folder without modules.json declares nothing


@pytest.mark.parametrize("modules, pooling_config, message", [
    ([{**POOLING_MODULE, "path": "../outside"}], None, "leaves the checkpoint"),
    ([POOLING_MODULE], ["not", "an", "object"], "expected a JSON object"),
])
def test_a_bad_pooling_declaration_is_refused_naming_the_file(tmp_path, modules, pooling_config, message):
    from cmc_fast.encoders import declared_pooling

    with pytest.raises(UsageError, match=message):
        declared_pooling(_sentence_transformers_dir(tmp_path, modules, pooling_config))
    (tmp_path / "modules.json").write_text("[{")
    with pytest.raises(UsageError, match="modules.json:1: invalid JSON"):
        declared_pooling(str(tmp_path))


def test_each_pooling_of_a_hugging_face_encoder_against_its_formula():
    from transformers import BertConfig, BertModel

    from cmc_fast.encoders import TextEncoder

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=16)).eval()
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state.double()
        expected = {"pooler": out.pooler_output.double(), "cls": hidden[:, 0],
                    "mean": torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(3)])}
        for mode, want in expected.items():
            got = TextEncoder(model, pooling=mode)(ids, mask)
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_pooler, sentence_transformers, expected", [
    (True, False, "pooler"), (False, False, "mean"), (True, True, "cls")])
def test_load_text_model_chooses_the_pooling_its_checkpoint_allows(tmp_path, with_pooler, sentence_transformers,
                                                                   expected):
    """A tiny random BERT saved as a local checkpoint: auto pools by its pooler where it has one, by the mean where
    it has none, and by what a sentence-transformers declaration asks for above both; a pooling given wins."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from cmc_fast.encoders import load_text_model

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "fake", "news", "real"]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(str(tmp_path / "ckpt"))
    config = BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    BertModel(config, add_pooling_layer=with_pooler).save_pretrained(str(tmp_path / "ckpt"))
    if sentence_transformers:
        _sentence_transformers_dir(tmp_path / "ckpt", [POOLING_MODULE], {**MODES, "pooling_mode_cls_token": True})
    encoder, _ = load_text_model(str(tmp_path / "ckpt"))
    assert encoder.pooling == expected
    assert ("declared by" in encoder.pooling_source) == sentence_transformers
    assert load_text_model(str(tmp_path / "ckpt"), "mean")[0].pooling == "mean"
